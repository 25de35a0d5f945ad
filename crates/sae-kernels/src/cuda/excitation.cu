// Fused SE / SaE excitation, forward and backward, for f32, f16 and bf16.
//
// Structure (the Metal kernels in ../metal/excitation.metal follow it line for line):
//   sae_plane_sums  one block per (n, c) plane: z = mean(x) and, in the backward pass,
//                   sgx = sum(g * x); any strides.
//   sae_gates       one block per image: h = ReLU(W1 z + b1), s = sigmoid(W2 h + b2).
//   sae_scale       one thread per element: out = x * gate(s).
//   sae_dense_bwd   one block per image: da = sgx s (1 - s), dh = (W2^T da) masked by h > 0,
//                   dz = W1^T dh.
//   sae_param_grads one thread per parameter: dW1, db1, dW2, db2 summed over the batch.
//   sae_input_grad  one thread per element: dx = g * gate(s) + dz / HW.
// The packed parameter vector is [W1 (hidden x C) | b1 (hidden) | W2 (C x hidden) | b2 (C)].
// gate: 0 means out = x * s, 1 means out = x + x * s.

#include "common.cuh"

__device__ __forceinline__ float gate_factor(float s, uint32_t gate) { return gate == 1 ? 1.0f + s : s; }

template <typename T>
__device__ void plane_sums(const T *x, Strides4 xs, const T *g, Strides4 gs, uint32_t C, uint32_t H, uint32_t W,
                           float *mean_x, float *sum_gx) {
    const uint32_t plane = blockIdx.x, n = plane / C, c = plane % C;
    float sx = 0.0f, sgx = 0.0f;
    for (uint32_t k = threadIdx.x; k < H * W; k += blockDim.x) {
        const uint32_t i = k / W, j = k % W;
        const float xv = to_f(x[xs.offset + n * xs.s0 + c * xs.s1 + i * xs.s2 + j * xs.s3]);
        sx += xv;
        if (g != nullptr) sgx += to_f(g[gs.offset + n * gs.s0 + c * gs.s1 + i * gs.s2 + j * gs.s3]) * xv;
    }
    sx = block_sum(sx);
    sgx = block_sum(sgx);
    if (threadIdx.x == 0) {
        mean_x[plane] = sx / (float)(H * W);
        if (g != nullptr) sum_gx[plane] = sgx;
    }
}

// Dynamic shared memory: C + hidden floats.
template <typename T>
__device__ void gates(const T *p, const float *z, uint32_t C, uint32_t hidden, float *h_out, float *s_out) {
    extern __shared__ float smem[];
    float *z_s = smem, *h_s = smem + C;
    const uint32_t n = blockIdx.x;
    const T *w1 = p, *b1 = p + hidden * C, *w2 = b1 + hidden, *b2 = w2 + C * hidden;
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) z_s[c] = z[n * C + c];
    __syncthreads();
    for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) {
        float a = to_f(b1[j]);
        for (uint32_t c = 0; c < C; ++c) a += to_f(w1[j * C + c]) * z_s[c];
        h_s[j] = fmaxf(a, 0.0f);
        h_out[n * hidden + j] = h_s[j];
    }
    __syncthreads();
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
        float a = to_f(b2[c]);
        for (uint32_t j = 0; j < hidden; ++j) a += to_f(w2[c * hidden + j]) * h_s[j];
        s_out[n * C + c] = 1.0f / (1.0f + expf(-a));
    }
}

template <typename T>
__device__ void scale(const T *x, Strides4 xs, const float *s, uint32_t gate, uint32_t C, uint32_t H, uint32_t W,
                      size_t numel, T *out) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= numel) return;
    const size_t plane = idx / (H * W);
    const uint32_t k = idx % (H * W), i = k / W, j = k % W;
    const size_t n = plane / C, c = plane % C;
    const float xv = to_f(x[xs.offset + n * xs.s0 + c * xs.s1 + i * xs.s2 + j * xs.s3]);
    out[idx] = from_f<T>(xv * gate_factor(s[plane], gate));
}

// Dynamic shared memory: hidden + C + hidden floats.
template <typename T>
__device__ void dense_bwd(const T *p, const float *sum_gx, const float *s, const float *h, uint32_t C,
                          uint32_t hidden, float *da_out, float *dh_out, float *dz_out) {
    extern __shared__ float smem[];
    float *h_s = smem, *da_s = smem + hidden, *dh_s = da_s + C;
    const uint32_t n = blockIdx.x;
    const T *w1 = p, *w2 = p + hidden * C + hidden;
    for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) h_s[j] = h[n * hidden + j];
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
        const float sv = s[n * C + c];
        da_s[c] = sum_gx[n * C + c] * sv * (1.0f - sv);
        da_out[n * C + c] = da_s[c];
    }
    __syncthreads();
    for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) {
        float acc = 0.0f;
        if (h_s[j] > 0.0f)
            for (uint32_t c = 0; c < C; ++c) acc += to_f(w2[c * hidden + j]) * da_s[c];
        dh_s[j] = acc;
        dh_out[n * hidden + j] = acc;
    }
    __syncthreads();
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t j = 0; j < hidden; ++j) acc += to_f(w1[j * C + c]) * dh_s[j];
        dz_out[n * C + c] = acc;
    }
}

template <typename T>
__device__ void param_grads(const float *z, const float *h, const float *da, const float *dh, uint32_t N, uint32_t C,
                            uint32_t hidden, T *dparams) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t w1_len = (size_t)hidden * C, b1_end = w1_len + hidden, w2_end = b1_end + (size_t)C * hidden,
                 total = w2_end + C;
    if (idx >= total) return;
    float acc = 0.0f;
    if (idx < w1_len) {
        const uint32_t j = idx / C, c = idx % C;
        for (uint32_t n = 0; n < N; ++n) acc += dh[n * hidden + j] * z[n * C + c];
    } else if (idx < b1_end) {
        const uint32_t j = idx - w1_len;
        for (uint32_t n = 0; n < N; ++n) acc += dh[n * hidden + j];
    } else if (idx < w2_end) {
        const uint32_t r = idx - b1_end, c = r / hidden, j = r % hidden;
        for (uint32_t n = 0; n < N; ++n) acc += da[n * C + c] * h[n * hidden + j];
    } else {
        const uint32_t c = idx - w2_end;
        for (uint32_t n = 0; n < N; ++n) acc += da[n * C + c];
    }
    dparams[idx] = from_f<T>(acc);
}

template <typename T>
__device__ void input_grad(const T *g, Strides4 gs, const float *s, const float *dz, uint32_t gate, uint32_t C,
                           uint32_t H, uint32_t W, size_t numel, T *dx) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= numel) return;
    const size_t plane = idx / (H * W);
    const uint32_t k = idx % (H * W), i = k / W, j = k % W;
    const size_t n = plane / C, c = plane % C;
    const float gv = to_f(g[gs.offset + n * gs.s0 + c * gs.s1 + i * gs.s2 + j * gs.s3]);
    dx[idx] = from_f<T>(gv * gate_factor(s[plane], gate) + dz[plane] / (float)(H * W));
}

#define SAE_KERNELS(T, SUFFIX)                                                                                       \
    extern "C" __global__ void sae_plane_sums_##SUFFIX(const T *x, Strides4 xs, const T *g, Strides4 gs, uint32_t C,   \
                                                       uint32_t H, uint32_t W, float *mean_x, float *sum_gx) {         \
        plane_sums<T>(x, xs, g, gs, C, H, W, mean_x, sum_gx);                                                         \
    }                                                                                                                 \
    extern "C" __global__ void sae_gates_##SUFFIX(const T *p, const float *z, uint32_t C, uint32_t hidden,            \
                                                  float *h_out, float *s_out) {                                       \
        gates<T>(p, z, C, hidden, h_out, s_out);                                                                      \
    }                                                                                                                 \
    extern "C" __global__ void sae_scale_##SUFFIX(const T *x, Strides4 xs, const float *s, uint32_t gate, uint32_t C, \
                                                  uint32_t H, uint32_t W, size_t numel, T *out) {                     \
        scale<T>(x, xs, s, gate, C, H, W, numel, out);                                                                \
    }                                                                                                                 \
    extern "C" __global__ void sae_dense_bwd_##SUFFIX(const T *p, const float *sum_gx, const float *s, const float *h, \
                                                      uint32_t C, uint32_t hidden, float *da, float *dh, float *dz) { \
        dense_bwd<T>(p, sum_gx, s, h, C, hidden, da, dh, dz);                                                         \
    }                                                                                                                 \
    extern "C" __global__ void sae_param_grads_##SUFFIX(const float *z, const float *h, const float *da,              \
                                                        const float *dh, uint32_t N, uint32_t C, uint32_t hidden,     \
                                                        T *dparams) {                                                 \
        param_grads<T>(z, h, da, dh, N, C, hidden, dparams);                                                          \
    }                                                                                                                 \
    extern "C" __global__ void sae_input_grad_##SUFFIX(const T *g, Strides4 gs, const float *s, const float *dz,      \
                                                       uint32_t gate, uint32_t C, uint32_t H, uint32_t W,             \
                                                       size_t numel, T *dx) {                                         \
        input_grad<T>(g, gs, s, dz, gate, C, H, W, numel, dx);                                                        \
    }

SAE_KERNELS(float, f32)
SAE_KERNELS(__half, f16)
SAE_KERNELS(__nv_bfloat16, bf16)

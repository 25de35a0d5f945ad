// Fused SE / SaE excitation, forward and backward, for float, half and bfloat.
//
// Line for line the structure of ../cuda/excitation.cu (read that file's header first):
//   sae_plane_sums, sae_gates, sae_scale, sae_dense_bwd, sae_param_grads, sae_input_grad.
// The packed parameter vector is [W1 (hidden x C) | b1 (hidden) | W2 (C x hidden) | b2 (C)].
// gate: 0 means out = x * s, 1 means out = x + x * s.
// Threadgroups are 256 threads wide; threadgroup memory is passed by the host like CUDA's
// dynamic shared memory.

#include <metal_stdlib>
using namespace metal;

inline float gate_factor(float s, uint gate) { return gate == 1 ? 1.0f + s : s; }

struct Strides4 {
    ulong offset, s0, s1, s2, s3;
};

// Sum of v over the threadgroup (256 threads, 8 SIMD groups of 32).
inline float block_sum(float v, threadgroup float *partial, uint tid, uint simd_lane, uint simd_id) {
    v = simd_sum(v);
    if (simd_lane == 0) partial[simd_id] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = tid < 8 ? partial[tid] : 0.0f;
    if (simd_id == 0) v = simd_sum(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) partial[0] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = partial[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return v;
}

template <typename T>
void plane_sums(device const T *x, constant Strides4 &xs, device const T *g, constant Strides4 &gs, uint has_grad,
                uint C, uint H, uint W, device float *mean_x, device float *sum_gx, threadgroup float *partial,
                uint plane, uint tid, uint threads, uint simd_lane, uint simd_id) {
    const uint n = plane / C, c = plane % C;
    float sx = 0.0f, sgx = 0.0f;
    for (uint k = tid; k < H * W; k += threads) {
        const uint i = k / W, j = k % W;
        const float xv = float(x[xs.offset + n * xs.s0 + c * xs.s1 + i * xs.s2 + j * xs.s3]);
        sx += xv;
        if (has_grad) sgx += float(g[gs.offset + n * gs.s0 + c * gs.s1 + i * gs.s2 + j * gs.s3]) * xv;
    }
    sx = block_sum(sx, partial, tid, simd_lane, simd_id);
    sgx = block_sum(sgx, partial, tid, simd_lane, simd_id);
    if (tid == 0) {
        mean_x[plane] = sx / float(H * W);
        if (has_grad) sum_gx[plane] = sgx;
    }
}

template <typename T>
void gates(device const T *p, device const float *z, uint C, uint hidden, device float *h_out, device float *s_out,
           threadgroup float *smem, uint n, uint tid, uint threads) {
    threadgroup float *z_s = smem, *h_s = smem + C;
    device const T *w1 = p, *b1 = p + hidden * C, *w2 = b1 + hidden, *b2 = w2 + C * hidden;
    for (uint c = tid; c < C; c += threads) z_s[c] = z[n * C + c];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = tid; j < hidden; j += threads) {
        float a = float(b1[j]);
        for (uint c = 0; c < C; ++c) a += float(w1[j * C + c]) * z_s[c];
        h_s[j] = fmax(a, 0.0f);
        h_out[n * hidden + j] = h_s[j];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint c = tid; c < C; c += threads) {
        float a = float(b2[c]);
        for (uint j = 0; j < hidden; ++j) a += float(w2[c * hidden + j]) * h_s[j];
        s_out[n * C + c] = 1.0f / (1.0f + exp(-a));
    }
}

template <typename T>
void scale(device const T *x, constant Strides4 &xs, device const float *s, uint gate, uint C, uint H, uint W,
           ulong numel, device T *out, ulong idx) {
    if (idx >= numel) return;
    const ulong plane = idx / (H * W);
    const uint k = idx % (H * W), i = k / W, j = k % W;
    const ulong n = plane / C, c = plane % C;
    const float xv = float(x[xs.offset + n * xs.s0 + c * xs.s1 + i * xs.s2 + j * xs.s3]);
    out[idx] = T(xv * gate_factor(s[plane], gate));
}

template <typename T>
void dense_bwd(device const T *p, device const float *sum_gx, device const float *s, device const float *h, uint C,
               uint hidden, device float *da_out, device float *dh_out, device float *dz_out, threadgroup float *smem,
               uint n, uint tid, uint threads) {
    threadgroup float *h_s = smem, *da_s = smem + hidden, *dh_s = da_s + C;
    device const T *w1 = p, *w2 = p + hidden * C + hidden;
    for (uint j = tid; j < hidden; j += threads) h_s[j] = h[n * hidden + j];
    for (uint c = tid; c < C; c += threads) {
        const float sv = s[n * C + c];
        da_s[c] = sum_gx[n * C + c] * sv * (1.0f - sv);
        da_out[n * C + c] = da_s[c];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = tid; j < hidden; j += threads) {
        float acc = 0.0f;
        if (h_s[j] > 0.0f)
            for (uint c = 0; c < C; ++c) acc += float(w2[c * hidden + j]) * da_s[c];
        dh_s[j] = acc;
        dh_out[n * hidden + j] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint c = tid; c < C; c += threads) {
        float acc = 0.0f;
        for (uint j = 0; j < hidden; ++j) acc += float(w1[j * C + c]) * dh_s[j];
        dz_out[n * C + c] = acc;
    }
}

template <typename T>
void param_grads(device const float *z, device const float *h, device const float *da, device const float *dh, uint N,
                 uint C, uint hidden, device T *dparams, ulong idx) {
    const ulong w1_len = ulong(hidden) * C, b1_end = w1_len + hidden, w2_end = b1_end + ulong(C) * hidden,
                total = w2_end + C;
    if (idx >= total) return;
    float acc = 0.0f;
    if (idx < w1_len) {
        const uint j = idx / C, c = idx % C;
        for (uint n = 0; n < N; ++n) acc += dh[n * hidden + j] * z[n * C + c];
    } else if (idx < b1_end) {
        const uint j = idx - w1_len;
        for (uint n = 0; n < N; ++n) acc += dh[n * hidden + j];
    } else if (idx < w2_end) {
        const uint r = idx - b1_end, c = r / hidden, j = r % hidden;
        for (uint n = 0; n < N; ++n) acc += da[n * C + c] * h[n * hidden + j];
    } else {
        const uint c = idx - w2_end;
        for (uint n = 0; n < N; ++n) acc += da[n * C + c];
    }
    dparams[idx] = T(acc);
}

template <typename T>
void input_grad(device const T *g, constant Strides4 &gs, device const float *s, device const float *dz, uint gate,
                uint C, uint H, uint W, ulong numel, device T *dx, ulong idx) {
    if (idx >= numel) return;
    const ulong plane = idx / (H * W);
    const uint k = idx % (H * W), i = k / W, j = k % W;
    const ulong n = plane / C, c = plane % C;
    const float gv = float(g[gs.offset + n * gs.s0 + c * gs.s1 + i * gs.s2 + j * gs.s3]);
    dx[idx] = T(gv * gate_factor(s[plane], gate) + dz[plane] / float(H * W));
}

#define SAE_KERNELS(T, SUFFIX)                                                                                       \
    kernel void sae_plane_sums_##SUFFIX(device const T *x [[buffer(0)]], constant Strides4 &xs [[buffer(1)]],        \
                                        device const T *g [[buffer(2)]], constant Strides4 &gs [[buffer(3)]],        \
                                        constant uint &has_grad [[buffer(4)]], constant uint &C [[buffer(5)]],       \
                                        constant uint &H [[buffer(6)]], constant uint &W [[buffer(7)]],              \
                                        device float *mean_x [[buffer(8)]], device float *sum_gx [[buffer(9)]],      \
                                        uint plane [[threadgroup_position_in_grid]],                                 \
                                        uint tid [[thread_position_in_threadgroup]],                                 \
                                        uint threads [[threads_per_threadgroup]],                                    \
                                        uint simd_lane [[thread_index_in_simdgroup]],                                \
                                        uint simd_id [[simdgroup_index_in_threadgroup]]) {                           \
        threadgroup float partial[32];                                                                               \
        plane_sums<T>(x, xs, g, gs, has_grad, C, H, W, mean_x, sum_gx, partial, plane, tid, threads, simd_lane,      \
                      simd_id);                                                                                      \
    }                                                                                                                \
    kernel void sae_gates_##SUFFIX(device const T *p [[buffer(0)]], device const float *z [[buffer(1)]],             \
                                   constant uint &C [[buffer(2)]], constant uint &hidden [[buffer(3)]],              \
                                   device float *h_out [[buffer(4)]], device float *s_out [[buffer(5)]],             \
                                   threadgroup float *smem [[threadgroup(0)]],                                       \
                                   uint n [[threadgroup_position_in_grid]],                                          \
                                   uint tid [[thread_position_in_threadgroup]],                                      \
                                   uint threads [[threads_per_threadgroup]]) {                                       \
        gates<T>(p, z, C, hidden, h_out, s_out, smem, n, tid, threads);                                              \
    }                                                                                                                \
    kernel void sae_scale_##SUFFIX(device const T *x [[buffer(0)]], constant Strides4 &xs [[buffer(1)]],             \
                                   device const float *s [[buffer(2)]], constant uint &gate [[buffer(3)]],           \
                                   constant uint &C [[buffer(4)]], constant uint &H [[buffer(5)]],                   \
                                   constant uint &W [[buffer(6)]], constant ulong &numel [[buffer(7)]],              \
                                   device T *out [[buffer(8)]], uint idx [[thread_position_in_grid]]) {              \
        scale<T>(x, xs, s, gate, C, H, W, numel, out, idx);                                                          \
    }                                                                                                                \
    kernel void sae_dense_bwd_##SUFFIX(device const T *p [[buffer(0)]], device const float *sum_gx [[buffer(1)]],    \
                                       device const float *s [[buffer(2)]], device const float *h [[buffer(3)]],     \
                                       constant uint &C [[buffer(4)]], constant uint &hidden [[buffer(5)]],          \
                                       device float *da [[buffer(6)]], device float *dh [[buffer(7)]],               \
                                       device float *dz [[buffer(8)]], threadgroup float *smem [[threadgroup(0)]],   \
                                       uint n [[threadgroup_position_in_grid]],                                      \
                                       uint tid [[thread_position_in_threadgroup]],                                  \
                                       uint threads [[threads_per_threadgroup]]) {                                   \
        dense_bwd<T>(p, sum_gx, s, h, C, hidden, da, dh, dz, smem, n, tid, threads);                                 \
    }                                                                                                                \
    kernel void sae_param_grads_##SUFFIX(device const float *z [[buffer(0)]], device const float *h [[buffer(1)]],   \
                                         device const float *da [[buffer(2)]], device const float *dh [[buffer(3)]], \
                                         constant uint &N [[buffer(4)]], constant uint &C [[buffer(5)]],             \
                                         constant uint &hidden [[buffer(6)]], device T *dparams [[buffer(7)]],       \
                                         uint idx [[thread_position_in_grid]]) {                                     \
        param_grads<T>(z, h, da, dh, N, C, hidden, dparams, idx);                                                    \
    }                                                                                                                \
    kernel void sae_input_grad_##SUFFIX(device const T *g [[buffer(0)]], constant Strides4 &gs [[buffer(1)]],        \
                                        device const float *s [[buffer(2)]], device const float *dz [[buffer(3)]],   \
                                        constant uint &gate [[buffer(4)]], constant uint &C [[buffer(5)]],           \
                                        constant uint &H [[buffer(6)]], constant uint &W [[buffer(7)]],              \
                                        constant ulong &numel [[buffer(8)]], device T *dx [[buffer(9)]],             \
                                        uint idx [[thread_position_in_grid]]) {                                      \
        input_grad<T>(g, gs, s, dz, gate, C, H, W, numel, dx, idx);                                                  \
    }

SAE_KERNELS(float, f32)
SAE_KERNELS(half, f16)
SAE_KERNELS(bfloat, bf16)

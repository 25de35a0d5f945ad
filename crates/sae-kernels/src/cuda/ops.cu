// The networks' ops other than the excitation (excitation.cu) and the matrix multiplies (cuBLAS
// through Candle's matmul), for f32, f16 and bf16 with f32 arithmetic (f64 for BatchNorm's
// sums, as the CPU kernel). Each computes what the CPU kernel of the Rust module named in its
// comment computes; `src/cuda_ops.rs` launches them. Inputs take any strides (`Strides4`);
// outputs and output gradients marked "contiguous" are (N, C, H, W) in row-major order.
//
// Every kernel but the reductions is one thread per output element in a grid-stride loop, and
// gathers (no atomics), so results do not depend on scheduling. The reductions are one block
// per channel (BatchNorm) or per filter tap (depthwise weight gradient).

#include "common.cuh"

// Element e of a contiguous (N, C, H, W) tensor: its four indices.
struct Position {
    uint32_t n, c, i, j;
};

__device__ __forceinline__ Position position(size_t e, uint32_t C, uint32_t H, uint32_t W) {
    return Position{(uint32_t)(e / ((size_t)C * H * W)), (uint32_t)(e / ((size_t)H * W) % C), (uint32_t)(e / W % H),
                    (uint32_t)(e % W)};
}

// Calls f(ky, kx, iy, ix) for every tap (ky, kx) of output (oy, ox)'s window that reads an input
// (iy, ix) inside the image, in row-major order: a window's gather.
template <typename F> __device__ void for_each_tap(const Geometry &g, uint32_t oy, uint32_t ox, F f) {
    for (uint32_t ky = 0; ky < g.kh; ++ky) {
        const int iy = (int)(oy * g.stride + ky) - (int)g.pad;
        if (iy < 0 || iy >= (int)g.h) continue;
        for (uint32_t kx = 0; kx < g.kw; ++kx) {
            const int ix = (int)(ox * g.stride + kx) - (int)g.pad;
            if (ix < 0 || ix >= (int)g.w) continue;
            f(ky, kx, (uint32_t)iy, (uint32_t)ix);
        }
    }
}

// Calls f(ky, kx, oy, ox) for every output (oy, ox) whose window reads input (iy, ix) at tap
// (ky, kx): the transpose of for_each_tap, for the input gradients.
template <typename F> __device__ void for_each_reader(const Geometry &g, uint32_t iy, uint32_t ix, F f) {
    for (uint32_t ky = 0; ky < g.kh; ++ky) {
        const int ty = (int)(iy + g.pad) - (int)ky;
        if (ty < 0 || ty % g.stride != 0 || ty / g.stride >= g.oh) continue;
        for (uint32_t kx = 0; kx < g.kw; ++kx) {
            const int tx = (int)(ix + g.pad) - (int)kx;
            if (tx < 0 || tx % g.stride != 0 || tx / g.stride >= g.ow) continue;
            f(ky, kx, (uint32_t)(ty / g.stride), (uint32_t)(tx / g.stride));
        }
    }
}

// ---- conv.rs: im2col and col2im around cuBLAS multiplies ----

// col (C·kh·kw, N·OH·OW), row (c, ky, kx), column (n, oy, ox): the input value each tap sees
// at each output pixel, 0 in the padding.
template <typename T> __device__ void im2col(const T *x, Strides4 xs, Geometry g, T *col) {
    const size_t pixels = (size_t)g.n * g.oh * g.ow, count = (size_t)g.c * g.kh * g.kw * pixels;
    SAE_FOR_EACH(e, count) {
        const size_t row = e / pixels, column = e % pixels;
        const uint32_t n = column / ((size_t)g.oh * g.ow), oy = column / g.ow % g.oh, ox = column % g.ow;
        const uint32_t kx = row % g.kw, ky = row / g.kw % g.kh, c = row / ((size_t)g.kh * g.kw);
        const int iy = (int)(oy * g.stride + ky) - (int)g.pad, ix = (int)(ox * g.stride + kx) - (int)g.pad;
        const bool inside = iy >= 0 && iy < (int)g.h && ix >= 0 && ix < (int)g.w;
        col[e] = inside ? x[element(xs, n, c, iy, ix)] : from_f<T>(0.0f);
    }
}

// dx (contiguous) from the unrolled gradient dcol (laid out as im2col's col): each input
// element sums the columns that read it.
template <typename T> __device__ void col2im(const T *dcol, Geometry g, T *dx) {
    const size_t pixels = (size_t)g.n * g.oh * g.ow, count = (size_t)g.n * g.c * g.h * g.w;
    SAE_FOR_EACH(e, count) {
        const Position p = position(e, g.c, g.h, g.w);
        float acc = 0.0f;
        for_each_reader(g, p.i, p.j, [&](uint32_t ky, uint32_t kx, uint32_t oy, uint32_t ox) {
            const size_t row = ((size_t)p.c * g.kh + ky) * g.kw + kx;
            acc += to_f(dcol[row * pixels + ((size_t)p.n * g.oh + oy) * g.ow + ox]);
        });
        dx[e] = from_f<T>(acc);
    }
}

// ---- max_pool.rs ----

// Row-major index inside the window's input plane of the first maximum of window (oy, ox),
// a NaN winning over any number as in the CPU kernel.
template <typename T>
__device__ int window_argmax(const T *x, const Strides4 &xs, const Geometry &g, uint32_t n, uint32_t c, uint32_t oy,
                             uint32_t ox, float *value) {
    int best = -1;
    float m = -INFINITY;
    for_each_tap(g, oy, ox, [&](uint32_t, uint32_t, uint32_t iy, uint32_t ix) {
        const float v = to_f(x[element(xs, n, c, iy, ix)]);
        if (best < 0 || v > m || isnan(v)) {
            best = (int)(iy * g.w + ix);
            m = v;
        }
    });
    *value = m;
    return best;
}

template <typename T> __device__ void max_pool_fwd(const T *x, Strides4 xs, Geometry g, T *out) {
    const size_t count = (size_t)g.n * g.c * g.oh * g.ow;
    SAE_FOR_EACH(e, count) {
        const Position o = position(e, g.c, g.oh, g.ow);
        float m;
        window_argmax(x, xs, g, o.n, o.c, o.i, o.j, &m);
        out[e] = from_f<T>(m);
    }
}

// dx (contiguous): each input element sums the gradients of the windows whose first maximum
// it is.
template <typename T> __device__ void max_pool_bwd(const T *x, Strides4 xs, const T *grad, Strides4 gs, Geometry g, T *dx) {
    const size_t count = (size_t)g.n * g.c * g.h * g.w;
    SAE_FOR_EACH(e, count) {
        const Position p = position(e, g.c, g.h, g.w);
        float acc = 0.0f, unused;
        for_each_reader(g, p.i, p.j, [&](uint32_t, uint32_t, uint32_t oy, uint32_t ox) {
            if (window_argmax(x, xs, g, p.n, p.c, oy, ox, &unused) == (int)(p.i * g.w + p.j))
                acc += to_f(grad[element(gs, p.n, p.c, oy, ox)]);
        });
        dx[e] = from_f<T>(acc);
    }
}

// ---- depthwise.rs: weight (C, 1, kh, kw), contiguous ----

template <typename T> __device__ void depthwise_fwd(const T *x, Strides4 xs, const T *w, Geometry g, T *out) {
    const size_t count = (size_t)g.n * g.c * g.oh * g.ow;
    SAE_FOR_EACH(e, count) {
        const Position o = position(e, g.c, g.oh, g.ow);
        float acc = 0.0f;
        for_each_tap(g, o.i, o.j, [&](uint32_t ky, uint32_t kx, uint32_t iy, uint32_t ix) {
            acc += to_f(w[((size_t)o.c * g.kh + ky) * g.kw + kx]) * to_f(x[element(xs, o.n, o.c, iy, ix)]);
        });
        out[e] = from_f<T>(acc);
    }
}

// dx (contiguous, the first N·C·H·W elements of the packed output): each input element sums
// weight × gradient over the outputs that read it.
template <typename T>
__device__ void depthwise_bwd_input(const T *w, const T *grad, Strides4 gs, Geometry g, T *dx) {
    const size_t count = (size_t)g.n * g.c * g.h * g.w;
    SAE_FOR_EACH(e, count) {
        const Position p = position(e, g.c, g.h, g.w);
        float acc = 0.0f;
        for_each_reader(g, p.i, p.j, [&](uint32_t ky, uint32_t kx, uint32_t oy, uint32_t ox) {
            acc += to_f(w[((size_t)p.c * g.kh + ky) * g.kw + kx]) * to_f(grad[element(gs, p.n, p.c, oy, ox)]);
        });
        dx[e] = from_f<T>(acc);
    }
}

// dw (C·kh·kw): one block per tap (c, ky, kx), summing gradient × input over the batch.
template <typename T>
__device__ void depthwise_bwd_weight(const T *x, Strides4 xs, const T *grad, Strides4 gs, Geometry g, T *dw) {
    const uint32_t tap = blockIdx.x, kx = tap % g.kw, ky = tap / g.kw % g.kh, c = tap / (g.kh * g.kw);
    const size_t count = (size_t)g.n * g.oh * g.ow;
    float acc = 0.0f;
    for (size_t p = threadIdx.x; p < count; p += blockDim.x) {
        const uint32_t ox = p % g.ow, oy = p / g.ow % g.oh, n = p / ((size_t)g.oh * g.ow);
        const int iy = (int)(oy * g.stride + ky) - (int)g.pad, ix = (int)(ox * g.stride + kx) - (int)g.pad;
        if (iy < 0 || iy >= (int)g.h || ix < 0 || ix >= (int)g.w) continue;
        acc += to_f(grad[element(gs, n, c, oy, ox)]) * to_f(x[element(xs, n, c, iy, ix)]);
    }
    acc = block_total(acc);
    if (threadIdx.x == 0) dw[tap] = from_f<T>(acc);
}

// ---- batch_norm.rs ----

// stats (2·C floats): the mean of channel c at c, its biased variance at C + c. One block per
// channel, two passes in f64 accumulators.
template <typename T> __device__ void channel_stats(const T *x, Strides4 xs, Geometry g, float *stats) {
    const uint32_t c = blockIdx.x, plane = g.h * g.w;
    const size_t count = (size_t)g.n * plane;
    double sum = 0.0;
    for (size_t k = threadIdx.x; k < count; k += blockDim.x)
        sum += to_f(x[element(xs, k / plane, c, k % plane / g.w, k % g.w)]);
    const float mean = (float)(block_total(sum) / (double)count);
    double sq = 0.0;
    for (size_t k = threadIdx.x; k < count; k += blockDim.x) {
        const float d = to_f(x[element(xs, k / plane, c, k % plane / g.w, k % g.w)]) - mean;
        sq += (double)(d * d);
    }
    sq = block_total(sq);
    if (threadIdx.x == 0) {
        stats[c] = mean;
        stats[g.c + c] = (float)(sq / (double)count);
    }
}

// out (contiguous) = x̂·a[c] + b[c], x̂ = (x − mean[c])·inv_std[c] (training: a = γ, b = β), or
// x itself when mean is null (eval mode: a, b are the folded scale and shift); then max(·, 0)
// when relu is set.
template <typename T>
__device__ void channel_affine(const T *x, Strides4 xs, const T *a, const T *b, const float *mean,
                               const float *inv_std, uint32_t relu, Geometry g, T *out) {
    const size_t count = (size_t)g.n * g.c * g.h * g.w;
    SAE_FOR_EACH(e, count) {
        const Position p = position(e, g.c, g.h, g.w);
        const uint32_t c = p.c;
        float v = to_f(x[element(xs, p.n, c, p.i, p.j)]);
        if (mean != nullptr) v = (v - mean[c]) * inv_std[c];
        v = v * to_f(a[c]) + to_f(b[c]);
        // As Rust's f32::max(v, 0): 0 for NaN.
        out[e] = from_f<T>(relu != 0 && !(v > 0.0f) ? 0.0f : v);
    }
}

// One block per channel: Σ dy and Σ dy·(x − mean[c]) (x itself when mean is null) into
// sums[c] and sums[C + c], and the parameter gradients into the packed output's tail:
// dparam[c] = Σ dy·(x − mean)·inv_std (or Σ dy·x) at params[c], dshift[c] = Σ dy at
// params[C + c]. dy is contiguous.
template <typename T>
__device__ void channel_grad_sums(const T *x, Strides4 xs, const T *dy, const float *mean, const float *inv_std,
                                  Geometry g, float *sums, T *params) {
    const uint32_t c = blockIdx.x, plane = g.h * g.w;
    const size_t count = (size_t)g.n * plane;
    const float shift = mean != nullptr ? mean[c] : 0.0f;
    double sg = 0.0, sgx = 0.0;
    for (size_t k = threadIdx.x; k < count; k += blockDim.x) {
        const size_t n = k / plane, q = k % plane;
        const float gv = to_f(dy[(n * g.c + c) * plane + q]);
        sg += gv;
        sgx += (double)(gv * (to_f(x[element(xs, n, c, q / g.w, q % g.w)]) - shift));
    }
    sg = block_total(sg);
    sgx = block_total(sgx);
    if (threadIdx.x == 0) {
        sums[c] = (float)sg;
        sums[g.c + c] = (float)sgx;
        params[c] = from_f<T>((float)sgx * (mean != nullptr ? inv_std[c] : 1.0f));
        params[g.c + c] = from_f<T>((float)sg);
    }
}

// dx (contiguous). Training (mean set): dx = γ·inv_std·(dy − Σdy/M − x̂·Σdy·x̂/M), with
// a = γ. Eval (mean null): dx = dy·a[c], a the folded scale.
template <typename T>
__device__ void channel_input_grad(const T *x, Strides4 xs, const T *dy, const T *a, const float *mean,
                                   const float *inv_std, const float *sums, Geometry g, T *dx) {
    const size_t count = (size_t)g.n * g.c * g.h * g.w;
    const float m = (float)((size_t)g.n * g.h * g.w);
    SAE_FOR_EACH(e, count) {
        const Position p = position(e, g.c, g.h, g.w);
        const uint32_t c = p.c;
        const float gv = to_f(dy[e]);
        if (mean == nullptr) {
            dx[e] = from_f<T>(gv * to_f(a[c]));
            continue;
        }
        const float inv = inv_std[c], scale = to_f(a[c]) * inv;
        const float xhat = (to_f(x[element(xs, p.n, c, p.i, p.j)]) - mean[c]) * inv;
        dx[e] = from_f<T>(scale * (gv - sums[c] / m - xhat * (sums[g.c + c] * inv) / m));
    }
}

// ---- relu.rs: contiguous operands ----

template <typename T> __device__ void relu_fwd(const T *x, const T *y, size_t count, T *out) {
    SAE_FOR_EACH(e, count) {
        const float v = to_f(x[e]) + (y != nullptr ? to_f(y[e]) : 0.0f);
        // As Rust's f32::max(v, 0): 0 for NaN.
        out[e] = from_f<T>(v > 0.0f ? v : 0.0f);
    }
}

// dx = dy where the ReLU's output is positive, else 0.
template <typename T> __device__ void relu_bwd(const T *out, const T *dy, size_t count, T *dx) {
    SAE_FOR_EACH(e, count) dx[e] = to_f(out[e]) > 0.0f ? dy[e] : from_f<T>(0.0f);
}

// ReLU6 (MobileNet's activation): min(max(x, 0), 6), NaN kept as Rust's f32::clamp keeps it.
template <typename T> __device__ void relu6_fwd(const T *x, size_t count, T *out) {
    SAE_FOR_EACH(e, count) {
        const float v = to_f(x[e]);
        out[e] = from_f<T>(v < 0.0f ? 0.0f : (v > 6.0f ? 6.0f : v));
    }
}

// dx = dy where ReLU6's output is strictly inside (0, 6) (hardtanh's rule), else 0.
template <typename T> __device__ void relu6_bwd(const T *out, const T *dy, size_t count, T *dx) {
    SAE_FOR_EACH(e, count) {
        const float y = to_f(out[e]);
        dx[e] = y > 0.0f && y < 6.0f ? dy[e] : from_f<T>(0.0f);
    }
}

// ---- bias.rs: contiguous (N, C, H, W) operands, the bias (C) ----

// out = x + bias[c], rounded once to T.
template <typename T> __device__ void channel_bias(const T *x, const T *bias, Geometry g, T *out) {
    const size_t plane = (size_t)g.h * g.w, count = (size_t)g.n * g.c * plane;
    SAE_FOR_EACH(e, count) out[e] = from_f<T>(to_f(x[e]) + to_f(bias[e / plane % g.c]));
}

// sums[c] = Σ over (N, H, W) of channel c of the gradient: one block per channel, summed in f64.
template <typename T> __device__ void channel_sums(const T *grad, Geometry g, T *sums) {
    const uint32_t c = blockIdx.x;
    const size_t plane = (size_t)g.h * g.w, count = (size_t)g.n * plane;
    double acc = 0.0;
    for (size_t k = threadIdx.x; k < count; k += blockDim.x) acc += to_f(grad[(k / plane * g.c + c) * plane + k % plane]);
    acc = block_total(acc);
    if (threadIdx.x == 0) sums[c] = from_f<T>((float)acc);
}

#define SAE_OPS(T, SUFFIX)                                                                                             \
    extern "C" __global__ void sae_im2col_##SUFFIX(const T *x, Strides4 xs, Geometry g, T *col) {                      \
        im2col(x, xs, g, col);                                                                                         \
    }                                                                                                                  \
    extern "C" __global__ void sae_col2im_##SUFFIX(const T *dcol, Geometry g, T *dx) { col2im(dcol, g, dx); }          \
    extern "C" __global__ void sae_max_pool_fwd_##SUFFIX(const T *x, Strides4 xs, Geometry g, T *out) {                \
        max_pool_fwd(x, xs, g, out);                                                                                   \
    }                                                                                                                  \
    extern "C" __global__ void sae_max_pool_bwd_##SUFFIX(const T *x, Strides4 xs, const T *grad, Strides4 gs,          \
                                                         Geometry g, T *dx) {                                          \
        max_pool_bwd(x, xs, grad, gs, g, dx);                                                                          \
    }                                                                                                                  \
    extern "C" __global__ void sae_depthwise_fwd_##SUFFIX(const T *x, Strides4 xs, const T *w, Geometry g, T *out) {   \
        depthwise_fwd(x, xs, w, g, out);                                                                               \
    }                                                                                                                  \
    extern "C" __global__ void sae_depthwise_bwd_input_##SUFFIX(const T *w, const T *grad, Strides4 gs, Geometry g,    \
                                                                T *dx) {                                               \
        depthwise_bwd_input(w, grad, gs, g, dx);                                                                       \
    }                                                                                                                  \
    extern "C" __global__ void sae_depthwise_bwd_weight_##SUFFIX(const T *x, Strides4 xs, const T *grad, Strides4 gs,  \
                                                                 Geometry g, T *dw) {                                  \
        depthwise_bwd_weight(x, xs, grad, gs, g, dw);                                                                  \
    }                                                                                                                  \
    extern "C" __global__ void sae_channel_stats_##SUFFIX(const T *x, Strides4 xs, Geometry g, float *stats) {         \
        channel_stats(x, xs, g, stats);                                                                                \
    }                                                                                                                  \
    extern "C" __global__ void sae_channel_affine_##SUFFIX(const T *x, Strides4 xs, const T *a, const T *b,            \
                                                           const float *mean, const float *inv_std, uint32_t relu,     \
                                                           Geometry g, T *out) {                                       \
        channel_affine(x, xs, a, b, mean, inv_std, relu, g, out);                                                      \
    }                                                                                                                  \
    extern "C" __global__ void sae_channel_grad_sums_##SUFFIX(const T *x, Strides4 xs, const T *dy, const float *mean, \
                                                              const float *inv_std, Geometry g, float *sums,           \
                                                              T *params) {                                             \
        channel_grad_sums(x, xs, dy, mean, inv_std, g, sums, params);                                                  \
    }                                                                                                                  \
    extern "C" __global__ void sae_channel_input_grad_##SUFFIX(const T *x, Strides4 xs, const T *dy, const T *a,       \
                                                               const float *mean, const float *inv_std,                \
                                                               const float *sums, Geometry g, T *dx) {                 \
        channel_input_grad(x, xs, dy, a, mean, inv_std, sums, g, dx);                                                  \
    }                                                                                                                  \
    extern "C" __global__ void sae_relu_fwd_##SUFFIX(const T *x, const T *y, size_t count, T *out) {                   \
        relu_fwd(x, y, count, out);                                                                                    \
    }                                                                                                                  \
    extern "C" __global__ void sae_relu_bwd_##SUFFIX(const T *out, const T *dy, size_t count, T *dx) {                 \
        relu_bwd(out, dy, count, dx);                                                                                  \
    }                                                                                                                  \
    extern "C" __global__ void sae_relu6_fwd_##SUFFIX(const T *x, size_t count, T *out) { relu6_fwd(x, count, out); }  \
    extern "C" __global__ void sae_relu6_bwd_##SUFFIX(const T *out, const T *dy, size_t count, T *dx) {                \
        relu6_bwd(out, dy, count, dx);                                                                                 \
    }                                                                                                                  \
    extern "C" __global__ void sae_channel_bias_##SUFFIX(const T *x, const T *bias, Geometry g, T *out) {              \
        channel_bias(x, bias, g, out);                                                                                 \
    }                                                                                                                  \
    extern "C" __global__ void sae_channel_sums_##SUFFIX(const T *grad, Geometry g, T *sums) {                         \
        channel_sums(grad, g, sums);                                                                                   \
    }

SAE_OPS(float, f32)
SAE_OPS(__half, f16)
SAE_OPS(__nv_bfloat16, bf16)

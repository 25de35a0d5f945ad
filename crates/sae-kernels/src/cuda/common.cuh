// What every kernel file includes: element conversions (all arithmetic is in f32 or wider),
// the (N, C, H, W) stride description the Rust side passes (`layout::KernelStrides`), and a
// block-wide sum.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Sum of v over the block; blockDim.x must be a multiple of 32 and at most 1024.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    v = threadIdx.x < warps ? partial[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    __syncthreads();
    return v;
}

struct Strides4 {
    size_t offset, s0, s1, s2, s3;
};


// Sum of v over the block, returned to every thread (float or double); blockDim.x must be a
// multiple of 32 and at most 1024.
template <typename A> __device__ A block_total(A v) {
    __shared__ A partial[33];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? partial[lane] : A(0);
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
        if (lane == 0) partial[32] = v;
    }
    __syncthreads();
    v = partial[32];
    // No thread may write `partial` in a next call before every thread has read the total.
    __syncthreads();
    return v;
}

__device__ __forceinline__ size_t element(const Strides4 &s, size_t n, size_t c, size_t i, size_t j) {
    return s.offset + n * s.s0 + c * s.s1 + i * s.s2 + j * s.s3;
}

// The window geometry of a convolution, depthwise convolution or max-pool: input (N, C, H, W),
// kernel kh × kw, output OH × OW, one stride and padding for both sides
// (`cuda_ops::Geometry` on the Rust side).
struct Geometry {
    uint32_t n, c, h, w, kh, kw, oh, ow, stride, pad;
};

// Grid-stride loop over `count` elements: any grid size covers them.
#define SAE_FOR_EACH(e, count) \
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < (count); e += (size_t)gridDim.x * blockDim.x)

// CUDA on the CPU, for testing the project's .cu kernels without a GPU (see harness.cpp).
//
// A launch runs its blocks one after another on one set of real threads (one per thread of a
// block, reused from block to block), so
// __syncthreads is a barrier of the block's threads and a warp shuffle is an exchange between
// the 32 threads of a warp that meet at a barrier. Static __shared__ arrays are ordinary static
// storage (one block at a time uses them) and dynamic shared memory is a buffer per launch.
// What this cannot show: races that real hardware would expose between blocks running at
// once, warp-synchronous code that relies on lockstep without a shuffle or barrier, memory
// coalescing, register pressure and anything about timing.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct SaeDim3 {
    unsigned x, y, z;
};

inline thread_local SaeDim3 threadIdx, blockIdx;
inline SaeDim3 blockDim, gridDim;
inline std::vector<float> sae_dynamic_shared;
inline std::unique_ptr<std::barrier<>> sae_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> sae_warp_barriers;
inline std::vector<double> sae_warp_values;

inline void __syncthreads() { sae_block_barrier->arrive_and_wait(); }

// Lane i receives lane i + offset's value within its warp (its own past the warp's end); for
// float and double, exchanged as double (exact for both).
template <typename V> inline V __shfl_down_sync(unsigned, V v, int offset) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    sae_warp_values[threadIdx.x] = v;
    sae_warp_barriers[warp]->arrive_and_wait();
    const V r = lane + offset < 32 ? (V)sae_warp_values[warp * 32 + lane + offset] : v;
    sae_warp_barriers[warp]->arrive_and_wait();
    return r;
}

using std::isnan;
using std::max;
using std::min;

// kernel<<<grid, block, shared_floats * 4>>>(args...): one-dimensional grids and blocks.
template <typename... Params, typename... Args>
void sae_launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_floats, Args... args) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    sae_dynamic_shared.assign(shared_floats, 0.0f);
    sae_warp_values.assign(block, 0.0);
    sae_block_barrier = std::make_unique<std::barrier<>>(block);
    sae_warp_barriers.clear();
    for (unsigned w = 0; w < (block + 31) / 32; ++w) sae_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    // One thread per thread of a block, reused for every block; a barrier between blocks, so
    // that a block's static shared memory is not used by the next one while it runs.
    std::barrier between_blocks(block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                kernel(args...);
                between_blocks.arrive_and_wait();
            }
        });
    }
    for (auto &th : threads) th.join();
}

// Runs the kernels of src/cuda/ops.cu on the CPU (cuda_emulation.h) in the launch sequence of
// src/cuda_ops.rs, for the parity test tests/cuda_on_cpu.rs.
//
//   ops_harness INPUT OUTPUT
//
// INPUT (little endian): u64 op, dtype (0 f32, 1 f16, 2 bf16), threads per block, the most
// blocks an element-wise launch gets (fewer than its elements need, so that the grid-stride
// loops go round), the Geometry's ten sizes, the input's Strides4 (offset, four strides), the
// gradient's Strides4, relu, count; then the op's buffers, each as u64 byte length + bytes.
// OUTPUT: the op's result, elements of the dtype (the statistics: f32).
//
// op  buffers                          result
//  0  x                                im2col's col
//  1  dcol                             col2im's dx
//  2  x                                max-pool output
//  3  x, grad                          max-pool dx
//  4  x, w                             depthwise output
//  5  x, w, grad                       depthwise [dx | dw]
//  6  x                                channel statistics [mean | var] (f32)
//  7  x, a, b, mean, inv_std (f32)     BatchNorm / channel affine output (mean empty: eval)
//  8  x, a, dy, mean, inv_std (f32)    BatchNorm / channel affine [dx | da | db]
//  9  x, y                             relu(x + y) (y empty: relu(x))
// 10  out, dy                          ReLU's dx
// 11  x                                relu6(x)
// 12  out, dy                          ReLU6's dx
// 13  x, bias                          x + bias per channel (contiguous x)
// 14  grad                             per-channel sums of the gradient
#include "cuda_emulation.h"
#include "ops.cu"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>

struct Buffers {
    std::vector<std::vector<char>> parts;
    template <typename T> const T *get(size_t i) const {
        if (i >= parts.size()) throw std::runtime_error("missing buffer");
        return parts[i].empty() ? nullptr : (const T *)parts[i].data();
    }
};

struct Launch {
    unsigned block, max_blocks;
    unsigned elementwise(size_t count) const {
        return (unsigned)std::max<size_t>(1, std::min<size_t>((count + block - 1) / block, max_blocks));
    }
};

template <typename T> void write(std::ofstream &f, const std::vector<T> &v) {
    f.write((const char *)v.data(), v.size() * sizeof(T));
}

template <typename T>
void run(uint64_t op, const Launch &l, Geometry g, Strides4 xs, Strides4 gs, uint32_t relu, size_t count, const Buffers &b,
         std::ofstream &out) {
    const size_t in_len = (size_t)g.n * g.c * g.h * g.w, out_len = (size_t)g.n * g.c * g.oh * g.ow;
    const size_t taps = (size_t)g.c * g.kh * g.kw;
    switch (op) {
    case 0: {
        std::vector<T> col(taps * g.n * g.oh * g.ow);
        sae_launch(im2col<T>, l.elementwise(col.size()), l.block, 0, b.get<T>(0), xs, g, col.data());
        write(out, col);
        break;
    }
    case 1: {
        std::vector<T> dx(in_len);
        sae_launch(col2im<T>, l.elementwise(in_len), l.block, 0, b.get<T>(0), g, dx.data());
        write(out, dx);
        break;
    }
    case 2: {
        std::vector<T> y(out_len);
        sae_launch(max_pool_fwd<T>, l.elementwise(out_len), l.block, 0, b.get<T>(0), xs, g, y.data());
        write(out, y);
        break;
    }
    case 3: {
        std::vector<T> dx(in_len);
        sae_launch(max_pool_bwd<T>, l.elementwise(in_len), l.block, 0, b.get<T>(0), xs, b.get<T>(1), gs, g, dx.data());
        write(out, dx);
        break;
    }
    case 4: {
        std::vector<T> y(out_len);
        sae_launch(depthwise_fwd<T>, l.elementwise(out_len), l.block, 0, b.get<T>(0), xs, b.get<T>(1), g, y.data());
        write(out, y);
        break;
    }
    case 5: {
        std::vector<T> packed(in_len + taps);
        sae_launch(depthwise_bwd_input<T>, l.elementwise(in_len), l.block, 0, b.get<T>(1), b.get<T>(2), gs, g,
                   packed.data());
        sae_launch(depthwise_bwd_weight<T>, (unsigned)taps, l.block, 0, b.get<T>(0), xs, b.get<T>(2), gs, g,
                   packed.data() + in_len);
        write(out, packed);
        break;
    }
    case 6: {
        std::vector<float> stats(2 * g.c);
        sae_launch(channel_stats<T>, g.c, l.block, 0, b.get<T>(0), xs, g, stats.data());
        write(out, stats);
        break;
    }
    case 7: {
        std::vector<T> y(in_len);
        sae_launch(channel_affine<T>, l.elementwise(in_len), l.block, 0, b.get<T>(0), xs, b.get<T>(1), b.get<T>(2),
                   b.get<float>(3), b.get<float>(4), relu, g, y.data());
        write(out, y);
        break;
    }
    case 8: {
        std::vector<T> packed(in_len + 2 * g.c);
        std::vector<float> sums(2 * g.c);
        sae_launch(channel_grad_sums<T>, g.c, l.block, 0, b.get<T>(0), xs, b.get<T>(2), b.get<float>(3),
                   b.get<float>(4), g, sums.data(), packed.data() + in_len);
        sae_launch(channel_input_grad<T>, l.elementwise(in_len), l.block, 0, b.get<T>(0), xs, b.get<T>(2), b.get<T>(1),
                   b.get<float>(3), b.get<float>(4), (const float *)sums.data(), g, packed.data());
        write(out, packed);
        break;
    }
    case 9: {
        std::vector<T> y(count);
        sae_launch(relu_fwd<T>, l.elementwise(count), l.block, 0, b.get<T>(0), b.get<T>(1), count, y.data());
        write(out, y);
        break;
    }
    case 10: {
        std::vector<T> dx(count);
        sae_launch(relu_bwd<T>, l.elementwise(count), l.block, 0, b.get<T>(0), b.get<T>(1), count, dx.data());
        write(out, dx);
        break;
    }
    case 11: {
        std::vector<T> y(count);
        sae_launch(relu6_fwd<T>, l.elementwise(count), l.block, 0, b.get<T>(0), count, y.data());
        write(out, y);
        break;
    }
    case 12: {
        std::vector<T> dx(count);
        sae_launch(relu6_bwd<T>, l.elementwise(count), l.block, 0, b.get<T>(0), b.get<T>(1), count, dx.data());
        write(out, dx);
        break;
    }
    case 13: {
        std::vector<T> y(in_len);
        sae_launch(channel_bias<T>, l.elementwise(in_len), l.block, 0, b.get<T>(0), b.get<T>(1), g, y.data());
        write(out, y);
        break;
    }
    case 14: {
        std::vector<T> sums(g.c);
        sae_launch(channel_sums<T>, g.c, l.block, 0, b.get<T>(0), g, sums.data());
        write(out, sums);
        break;
    }
    default:
        throw std::runtime_error("unknown op");
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: ops_harness INPUT OUTPUT\n");
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    try {
        size_t at = 0;
        const auto u64 = [&]() {
            uint64_t v;
            if (at + 8 > bytes.size()) throw std::runtime_error("input too short");
            std::memcpy(&v, bytes.data() + at, 8);
            at += 8;
            return v;
        };
        const uint64_t op = u64(), dtype = u64();
        const Launch launch{(unsigned)u64(), (unsigned)u64()};
        uint32_t sizes[10];
        for (auto &s : sizes) s = (uint32_t)u64();
        const Geometry g{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4],
                         sizes[5], sizes[6], sizes[7], sizes[8], sizes[9]};
        Strides4 s[2];
        for (auto &t : s) t = Strides4{u64(), u64(), u64(), u64(), u64()};
        const uint32_t relu = (uint32_t)u64();
        const size_t count = u64();
        Buffers b;
        while (at < bytes.size()) {
            const size_t len = u64();
            if (at + len > bytes.size()) throw std::runtime_error("buffer past the end of the input");
            b.parts.emplace_back(bytes.begin() + at, bytes.begin() + at + len);
            at += len;
        }
        std::ofstream out(argv[2], std::ios::binary);
        switch (dtype) {
        case 0:
            run<float>(op, launch, g, s[0], s[1], relu, count, b, out);
            break;
        case 1:
            run<__half>(op, launch, g, s[0], s[1], relu, count, b, out);
            break;
        case 2:
            run<__nv_bfloat16>(op, launch, g, s[0], s[1], relu, count, b, out);
            break;
        default:
            throw std::runtime_error("unknown dtype");
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}

// Runs the excitation's CUDA kernels on the CPU (cuda_emulation.h) in the launch sequence of
// src/excitation/cuda.rs, for the parity test tests/cuda_on_cpu.rs.
//
//   harness INPUT OUTPUT
//
// INPUT (little endian): u64 dtype (0 f32, 1 f16, 2 bf16), N, C, H, W, hidden, gate, block;
// the input's offset and four strides and its storage length; the same for the output
// gradient; the packed parameters' length; then the three storages' elements. OUTPUT: the
// forward output (N·C·H·W elements) and the backward's packed [dx | dparams].
#include "cuda_emulation.h"
#include "excitation_cpu.cu"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>


template <typename T> std::vector<T> take(const std::vector<char> &bytes, size_t &at, size_t n) {
    std::vector<T> out(n);
    if (at + n * sizeof(T) > bytes.size()) throw std::runtime_error("input too short");
    std::memcpy(out.data(), bytes.data() + at, n * sizeof(T));
    at += n * sizeof(T);
    return out;
}

template <typename T>
void run(const std::vector<char> &bytes, size_t at, const uint64_t *h, const char *out_path,
         void (*plane_sums)(const T *, Strides4, const T *, Strides4, uint32_t, uint32_t, uint32_t, float *, float *),
         void (*gates)(const T *, const float *, uint32_t, uint32_t, float *, float *),
         void (*scale)(const T *, Strides4, const float *, uint32_t, uint32_t, uint32_t, uint32_t, size_t, T *),
         void (*dense_bwd)(const T *, const float *, const float *, const float *, uint32_t, uint32_t, float *, float *,
                           float *),
         void (*param_grads)(const float *, const float *, const float *, const float *, uint32_t, uint32_t, uint32_t,
                             T *),
         void (*input_grad)(const T *, Strides4, const float *, const float *, uint32_t, uint32_t, uint32_t, uint32_t,
                            size_t, T *)) {
    const uint32_t N = h[1], C = h[2], H = h[3], W = h[4], hidden = h[5], gate = h[6];
    const unsigned block = h[7];
    const Strides4 xs{h[8], h[9], h[10], h[11], h[12]}, gs{h[14], h[15], h[16], h[17], h[18]};
    const auto x = take<T>(bytes, at, h[13]);
    const auto g = take<T>(bytes, at, h[19]);
    const auto p = take<T>(bytes, at, h[20]);
    const size_t planes = (size_t)N * C, numel = planes * H * W, params = h[20];
    const auto grid = [block](size_t n) { return (unsigned)((n + block - 1) / block); };

    // Forward: plane sums → gates → scale.
    std::vector<float> mean_x(planes), sum_gx(planes, 0.0f), hid((size_t)N * hidden), s(planes);
    sae_launch(plane_sums, planes, block, 0, x.data(), xs, (const T *)nullptr, xs, C, H, W, mean_x.data(),
               sum_gx.data());
    sae_launch(gates, N, block, C + hidden, p.data(), (const float *)mean_x.data(), C, hidden, hid.data(), s.data());
    std::vector<T> out(numel);
    sae_launch(scale, grid(numel), block, 0, x.data(), xs, (const float *)s.data(), gate, C, H, W, numel, out.data());

    // Backward: plane sums with the gradient → gates → dense backward → dx and dparams.
    sae_launch(plane_sums, planes, block, 0, x.data(), xs, g.data(), gs, C, H, W, mean_x.data(), sum_gx.data());
    sae_launch(gates, N, block, C + hidden, p.data(), (const float *)mean_x.data(), C, hidden, hid.data(), s.data());
    std::vector<float> da(planes), dh((size_t)N * hidden), dz(planes);
    sae_launch(dense_bwd, N, block, 2 * hidden + C, p.data(), (const float *)sum_gx.data(), (const float *)s.data(),
               (const float *)hid.data(), C, hidden, da.data(), dh.data(), dz.data());
    std::vector<T> packed(numel + params);
    sae_launch(input_grad, grid(numel), block, 0, g.data(), gs, (const float *)s.data(), (const float *)dz.data(), gate,
               C, H, W, numel, packed.data());
    sae_launch(param_grads, grid(params), block, 0, (const float *)mean_x.data(), (const float *)hid.data(),
               (const float *)da.data(), (const float *)dh.data(), N, C, hidden, packed.data() + numel);

    std::ofstream f(out_path, std::ios::binary);
    f.write((const char *)out.data(), out.size() * sizeof(T));
    f.write((const char *)packed.data(), packed.size() * sizeof(T));
}

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: harness INPUT OUTPUT\n");
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t at = 0;
    const auto h = take<uint64_t>(bytes, at, 21);
    try {
        switch (h[0]) {
        case 0:
            run<float>(bytes, at, h.data(), argv[2], sae_plane_sums_f32, sae_gates_f32, sae_scale_f32, sae_dense_bwd_f32,
                       sae_param_grads_f32, sae_input_grad_f32);
            break;
        case 1:
            run<__half>(bytes, at, h.data(), argv[2], sae_plane_sums_f16, sae_gates_f16, sae_scale_f16,
                        sae_dense_bwd_f16, sae_param_grads_f16, sae_input_grad_f16);
            break;
        case 2:
            run<__nv_bfloat16>(bytes, at, h.data(), argv[2], sae_plane_sums_bf16, sae_gates_bf16, sae_scale_bf16,
                               sae_dense_bwd_bf16, sae_param_grads_bf16, sae_input_grad_bf16);
            break;
        default:
            std::fprintf(stderr, "unknown dtype %llu\n", (unsigned long long)h[0]);
            return 2;
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}

// The CUDA half type for the CUDA-on-CPU harness: IEEE binary16 through GCC's _Float16
// (round to nearest even, subnormals and infinities as the hardware does).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t bits;
};

inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.bits, 2);
    return (float)v;
}

inline __half __float2half(float f) {
    _Float16 v = (_Float16)f;
    __half h;
    std::memcpy(&h.bits, &v, 2);
    return h;
}

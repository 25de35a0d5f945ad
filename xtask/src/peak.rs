//! This machine's peak multiply-add throughput, measured rather than looked up: every rayon
//! thread runs independent chains of vector FMA instructions on registers (more chains than
//! the FMA latency × units, so the units never wait), and the FLOP count over the wall time is
//! the ceiling no kernel can pass. f32 with the widest FMA the CPU has (AVX-512 or AVX2), and
//! bf16 dot products (`vdpbf16ps`) where the CPU has AVX512-BF16, and AMX tile multiplies
//! (`tdpbf16ps`) where it has AMX-BF16. Also the CPU flags that
//! decide which kernels can run.

use rayon::prelude::*;
use std::time::Instant;

/// Measured peaks, GFLOP/s over all threads.
pub struct Peak {
    /// f32 FMA.
    pub f32_gflops: f64,
    /// The instruction set that reached it.
    pub f32_isa: &'static str,
    /// bf16 dot products accumulating in f32, if the CPU has them.
    pub bf16_gflops: Option<f64>,
    /// bf16 AMX tile multiplies accumulating in f32, if the CPU and OS have them.
    pub amx_gflops: Option<f64>,
}

impl Peak {
    /// Each peak the higher of two measurements (a measurement can only come out low: the
    /// machine busy, or a VM given less than its cores for a while).
    pub fn higher(self, other: Peak) -> Peak {
        let max = |a: Option<f64>, b: Option<f64>| a.into_iter().chain(b).reduce(f64::max);
        Peak {
            f32_gflops: self.f32_gflops.max(other.f32_gflops),
            f32_isa: self.f32_isa,
            bf16_gflops: max(self.bf16_gflops, other.bf16_gflops),
            amx_gflops: max(self.amx_gflops, other.amx_gflops),
        }
    }
}

/// The CPU flags (of `/proc/cpuinfo`) that matter for the kernels, in a fixed order.
pub fn cpu_flags() -> Vec<&'static str> {
    const FLAGS: [&str; 10] = [
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
    ];
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let present: Vec<&str> =
        info.lines().find(|l| l.starts_with("flags")).map(|l| l.split_whitespace().collect()).unwrap_or_default();
    FLAGS.into_iter().filter(|f| present.contains(f)).collect()
}

/// Runs `kernel(iterations)` (returning FLOPs done) on every thread at once, best of three.
fn gflops(kernel: fn(usize) -> f64) -> f64 {
    let iterations = 20_000_000;
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let flops: f64 = (0..rayon::current_num_threads()).into_par_iter().map(|_| kernel(iterations)).sum();
            flops / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Measures the peaks of this CPU.
pub fn measure() -> Peak {
    #[cfg(target_arch = "x86_64")]
    {
        let (f32_gflops, f32_isa) = if std::arch::is_x86_feature_detected!("avx512f") {
            (gflops(|i| sae_kernels::fma_register_flops(512, i).unwrap_or(0.0)), "AVX-512 FMA")
        } else if std::arch::is_x86_feature_detected!("fma") {
            (gflops(|i| sae_kernels::fma_register_flops(256, i).unwrap_or(0.0)), "AVX2 FMA")
        } else {
            (gflops(scalar_fma), "scalar")
        };
        let bf16 = std::arch::is_x86_feature_detected!("avx512bf16").then(|| gflops(x86::dot_bf16));
        let has_amx = sae_kernels::Bf16Multiply::of_this_cpu() == Some(sae_kernels::Bf16Multiply::AmxTiles);
        let amx = has_amx.then(|| gflops(amx_tiles));
        Peak { f32_gflops, f32_isa, bf16_gflops: bf16, amx_gflops: amx }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Peak { f32_gflops: gflops(scalar_fma), f32_isa: "scalar", bf16_gflops: None, amx_gflops: None }
}

/// Four independent AMX tile multiplies per round (a 16 × 16 × 32 product each: 16 cycles
/// on Sapphire Rapids, so a round in 64 cycles; fewer rounds than the vector kernels).
#[cfg(target_arch = "x86_64")]
fn amx_tiles(iterations: usize) -> f64 {
    sae_kernels::amx_register_flops(iterations / 8).unwrap_or(0.0)
}

/// Eight independent scalar chains (what the compiler vectorises or not).
fn scalar_fma(iterations: usize) -> f64 {
    let mut acc = [0f32; 8];
    for _ in 0..iterations {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iterations as f64 * 8.0 * 2.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Chains per kernel: FMA latency (4–5 cycles) × two FMA units, rounded up.
    const CHAINS: usize = 12;

    pub fn dot_bf16(iterations: usize) -> f64 {
        // SAFETY: called only where the CPU has AVX512-BF16 (checked by `measure`).
        unsafe { dot_bf16_inner(iterations) }
    }

    /// `vdpbf16ps`: per f32 lane, two bf16 products added to the accumulator (4 FLOP).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_bf16_inner(iterations: usize) -> f64 {
        let ones = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iterations {
            for r in acc.iter_mut() {
                *r = _mm512_dpbf16_ps(*r, ones, ones);
            }
        }
        std::hint::black_box(acc);
        iterations as f64 * (CHAINS * 16 * 4) as f64
    }
}

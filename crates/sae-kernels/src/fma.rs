//! f32 FMA chains on vector registers: how fast this CPU multiplies when nothing else limits
//! it. `xtask`'s peak measurement runs them on every thread; [`wide_fma_ratio`] compares the
//! 512-bit and 256-bit rates on one thread, which tells CPUs with two full-width 512-bit FMA
//! units (Intel's server cores: twice the FLOP/s of 256-bit FMAs) from those that split each
//! 512-bit FMA into two 256-bit halves (AMD's Zen 4: the same FLOP/s either way). Kernels whose
//! advantage is doing more multiplies in fewer passes over memory (`crate::direct`) pay only on
//! the first kind.

/// Independent chains per kernel: FMA latency (4–5 cycles) × two FMA units, rounded up, so the
/// units never wait for a result.
#[cfg(target_arch = "x86_64")]
const CHAINS: usize = 12;

/// FLOPs of `iterations` rounds of [`CHAINS`] independent f32 FMAs on `bits`-wide vector
/// registers (256: AVX2 and FMA; 512: AVX-512F); `None` where the CPU lacks them or `bits` is
/// neither.
pub fn fma_register_flops(bits: u32, iterations: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    match bits {
        // SAFETY: each kernel runs only where the CPU has its instructions.
        256 if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") => {
            return Some(unsafe { chains_256(iterations) })
        }
        512 if std::arch::is_x86_feature_detected!("avx512f") => return Some(unsafe { chains_512(iterations) }),
        _ => {}
    }
    let _ = (bits, iterations);
    None
}

/// The 512-bit FMA rate over the 256-bit one on the calling thread, in FLOP/s: about 2 with
/// full-width 512-bit FMA units, about 1 where a 512-bit FMA runs as two halves; `None` without
/// AVX-512F. The best of seven short alternating measurements of each (~1 ms in all), after a
/// 512-bit warm-up (Intel cores run their first 512-bit instructions at a fraction of the rate
/// while the upper halves of the units power up), so that a preempted measurement does not
/// decide it.
pub(crate) fn wide_fma_ratio() -> Option<f64> {
    const ITERATIONS: usize = 20_000;
    let rate = |bits| {
        let start = std::time::Instant::now();
        let flops = fma_register_flops(bits, ITERATIONS)?;
        Some(flops / start.elapsed().as_secs_f64().max(1e-9))
    };
    rate(512)?;
    let (mut best_256, mut best_512) = (0f64, 0f64);
    for _ in 0..7 {
        best_256 = best_256.max(rate(256)?);
        best_512 = best_512.max(rate(512)?);
    }
    Some(best_512 / best_256)
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_256(iterations: usize) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    std::hint::black_box(acc);
    iterations as f64 * (CHAINS * 8 * 2) as f64
}

/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_512(iterations: usize) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for r in acc.iter_mut() {
            *r = _mm512_fmadd_ps(*r, a, b);
        }
    }
    std::hint::black_box(acc);
    iterations as f64 * (CHAINS * 16 * 2) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_count_their_flops_and_refuse_unknown_widths() {
        assert_eq!(fma_register_flops(128, 10), None);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert_eq!(fma_register_flops(512, 10), Some(10.0 * 12.0 * 32.0));
            assert_eq!(fma_register_flops(256, 10), Some(10.0 * 12.0 * 16.0));
        }
    }

    /// On any CPU the 512-bit rate is between about the 256-bit one (split units) and twice it
    /// (full-width units); a ratio outside means the measurement measures something else.
    #[test]
    fn the_wide_fma_ratio_is_that_of_split_or_full_width_units() {
        let Some(ratio) = wide_fma_ratio() else { return };
        assert!((0.7..2.5).contains(&ratio), "512-bit over 256-bit FMA rate {ratio}");
    }
}

//! Both matrix-multiply paths on every x86-64 machine. The `gemm` crate (our convolutions' and
//! Candle's matmuls) picks its AVX-512 kernels at run time where the CPU has AVX-512F and
//! AVX2+FMA elsewhere, so a machine tests only one of them. `the_fallback_under_a_cpu_without_avx512`
//! re-runs `convolutions_and_matmuls_match_a_plain_loop` under qemu-user emulating a Haswell
//! (AVX2 and FMA, no AVX-512), where that test asserts the CPU it sees has no AVX-512, so the
//! other path is the one checked. Both compare with plain f64 loops, not with Candle (whose
//! matmul runs on the same `gemm`). The same holds for bf16 convolutions: bf16 dot products
//! (`vdpbf16ps`) where the CPU has AVX-512 BF16, f32 multiplies of the same values elsewhere
//! (the emulated Haswell).
//!
//! Without `qemu-x86_64` the emulated run says it is skipped, unless `SAE_REQUIRE_QEMU=1` (CI),
//! which makes that a failure.
#![cfg(target_arch = "x86_64")]

mod common;

use candle_core::{DType, Tensor};
use common::randn;
use sae_kernels::{conv2d, Conv2dConfig, Implementation};
use std::process::Command;

/// Set in the emulated run: the test must then see a CPU without AVX-512.
const EXPECT_NO_AVX512: &str = "SAE_EXPECT_NO_AVX512";

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// y[n, o, oy, ox] = Σ x[n, g·C/G + c, oy·s + ky − p, ox·s + kx − p] · w[o, c, ky, kx], in f64.
fn conv_plain(x: &Tensor, w: &Tensor, cfg: Conv2dConfig) -> Vec<f64> {
    let (n, c, h, wd) = x.dims4().unwrap();
    let (oc, cg, kh, kw) = w.dims4().unwrap();
    let (xv, wv) = (values(x), values(w));
    let (oh, ow) = ((h + 2 * cfg.padding - kh) / cfg.stride + 1, (wd + 2 * cfg.padding - kw) / cfg.stride + 1);
    let og = oc / cfg.groups;
    let mut y = vec![0f64; n * oc * oh * ow];
    for ni in 0..n {
        for o in 0..oc {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0f64;
                    for ci in 0..cg {
                        let channel = o / og * cg + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * cfg.stride + ky) as isize - cfg.padding as isize;
                                let ix = (ox * cfg.stride + kx) as isize - cfg.padding as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((ni * c + channel) * h + iy as usize) * wd + ix as usize;
                                acc += xv[xi] * wv[((o * cg + ci) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    y[((ni * oc + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    y
}

fn assert_close(what: &str, got: &Tensor, want: &[f64]) {
    assert_within(what, got, want, 0.0)
}

/// Within f32 summation error of the plain loop, plus `relative`·|value| (a rounded output).
fn assert_within(what: &str, got: &Tensor, want: &[f64], relative: f64) {
    let got = values(got);
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * scale.max(1.0) + relative * b.abs(),
            "{what}: element {i} is {a}, the plain loop gives {b}"
        );
    }
}

#[test]
fn convolutions_and_matmuls_match_a_plain_loop() {
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    if std::env::var_os(EXPECT_NO_AVX512).is_some() {
        assert!(!avx512, "the emulated CPU reports AVX-512F");
        assert!(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"));
    }
    eprintln!("CPU with AVX-512F: {avx512}, AVX-512 BF16: {}", std::arch::is_x86_feature_detected!("avx512bf16"));
    // Per-image multiplies (≥ 256 output pixels), the batched unrolled path, groups, 1×1.
    let cases = [
        ((2, 16, 17, 17), (24, 16, 3, 3), 1, 1, 1),
        ((3, 32, 7, 7), (48, 32, 1, 1), 1, 0, 1),
        ((2, 32, 9, 8), (32, 8, 3, 3), 2, 1, 4),
        ((1, 64, 5, 5), (80, 64, 3, 3), 1, 1, 1),
        // Batch 1, 128 channels × 256 pixels: in bf16 the dot-product kernel where the CPU has it.
        ((1, 32, 16, 16), (128, 32, 3, 3), 1, 1, 1),
        // 1×1 per image: the input planes are the unrolled input (in bf16, packed as stored).
        ((2, 64, 16, 16), (96, 64, 1, 1), 1, 0, 1),
    ];
    for (seed, (xd, wd, stride, padding, groups)) in cases.into_iter().enumerate() {
        let x = randn(seed as u64, &[xd.0, xd.1, xd.2, xd.3], DType::F32);
        let w = randn(seed as u64 + 50, &[wd.0, wd.1, wd.2, wd.3], DType::F32);
        let cfg = Conv2dConfig { stride, padding, groups };
        let y = conv2d(&x, &w, cfg, Implementation::Fused).unwrap();
        assert_close(&format!("conv2d {xd:?} {wd:?}"), &y, &conv_plain(&x, &w, cfg));
        // bf16 operands: exact products summed in f32, the result rounded once to bf16
        // (at most half a unit in the last of its 8 significant bits: 2⁻⁸ relative).
        let (x, w) = (x.to_dtype(DType::BF16).unwrap(), w.to_dtype(DType::BF16).unwrap());
        let y = conv2d(&x, &w, cfg, Implementation::Fused).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert_within(&format!("bf16 conv2d {xd:?} {wd:?}"), &y, &conv_plain(&x, &w, cfg), 1.0 / 256.0);
    }
    // Candle's matmul on the same `gemm`, odd sizes.
    for (m, k, n) in [(67, 129, 45), (128, 64, 96), (1, 300, 7)] {
        let (a, b) = (randn(m as u64, &[m, k], DType::F32), randn(n as u64, &[k, n], DType::F32));
        let (av, bv) = (values(&a), values(&b));
        let want: Vec<f64> = (0..m * n).map(|e| (0..k).map(|i| av[e / n * k + i] * bv[i * n + e % n]).sum()).collect();
        assert_close(&format!("matmul {m}×{k}×{n}"), &a.matmul(&b).unwrap(), &want);
    }
}

#[test]
fn the_fallback_under_a_cpu_without_avx512() {
    if std::env::var_os(EXPECT_NO_AVX512).is_some() {
        return; // this binary, run under qemu: only the test above is asked for
    }
    let qemu = std::env::var("QEMU_X86_64").unwrap_or_else(|_| "qemu-x86_64".into());
    let output = Command::new(&qemu)
        .args(["-cpu", "Haswell-v4"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "convolutions_and_matmuls_match_a_plain_loop", "--nocapture", "--test-threads", "1"])
        .env(EXPECT_NO_AVX512, "1")
        .output();
    match output {
        Ok(out) => {
            let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "under {qemu} -cpu Haswell-v4:\n{log}");
            assert!(log.contains("CPU with AVX-512F: false") && log.contains("1 passed"), "{log}");
        }
        Err(e) => {
            let required = std::env::var("SAE_REQUIRE_QEMU").is_ok_and(|v| v == "1");
            assert!(!required, "SAE_REQUIRE_QEMU=1 but {qemu} could not run: {e}");
            eprintln!("skipped: {qemu} could not run ({e}); the AVX2 fallback is untested on this machine");
        }
    }
}

//! Parity of every fused op with its reference (forward and every gradient), finite-difference
//! checks of the references, and errors for bad input.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sae_kernels::*;

/// Excitation weights for C channels and hidden width `hidden`, as Vars.
struct Weights {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

impl Weights {
    fn new(seed: u64, c: usize, hidden: usize, dtype: DType) -> Self {
        Self {
            w1: var(seed, &[hidden, c], dtype),
            b1: var(seed + 1, &[hidden], dtype),
            w2: var(seed + 2, &[c, hidden], dtype),
            b2: var(seed + 3, &[c], dtype),
        }
    }
    fn get(&self) -> ExcitationWeights<'_> {
        ExcitationWeights { fc1_weight: &self.w1, fc1_bias: &self.b1, fc2_weight: &self.w2, fc2_bias: &self.b2 }
    }
    fn vars(&self) -> [(&'static str, &Var); 4] {
        [("fc1_weight", &self.w1), ("fc1_bias", &self.b1), ("fc2_weight", &self.w2), ("fc2_bias", &self.b2)]
    }
}

/// (N, C, H, W, hidden) cases: batch 1, H = W = 1, odd sizes, C/r = 1, the SaE shape
/// C = 64, K = 4, r = 32 (hidden 8), and one larger plane.
const EXCITATION_CASES: &[(usize, usize, usize, usize, usize)] =
    &[(2, 64, 7, 7, 8), (1, 32, 1, 1, 1), (3, 48, 5, 9, 4), (1, 8, 3, 2, 4), (2, 16, 17, 13, 2)];

/// Input for a case: a Var and the op's input, which is the Var itself or, when `strided`,
/// its transpose — the layout BatchNorm's training output has.
fn input(seed: u64, n: usize, c: usize, h: usize, w: usize, strided: bool, dtype: DType) -> (Var, Tensor) {
    if strided {
        let v = var(seed, &[c, n, h, w], dtype);
        let t = v.transpose(0, 1).unwrap();
        assert!(n == 1 || c == 1 || !t.is_contiguous());
        (v, t)
    } else {
        let v = var(seed, &[n, c, h, w], dtype);
        let t = v.as_tensor().clone();
        (v, t)
    }
}

#[test]
fn excitation_fused_matches_reference_forward_and_backward() {
    for (case, &(n, c, h, w, hidden)) in EXCITATION_CASES.iter().enumerate() {
        for strided in [false, true] {
            for gate in [Gate::S, Gate::OnePlusS] {
                let what = format!("case {case} {:?} strided={strided} {gate:?}", (n, c, h, w, hidden));
                let (xv, x) = input(10 + case as u64, n, c, h, w, strided, DType::F32);
                let wts = Weights::new(100 + case as u64, c, hidden, DType::F32);
                let vars: Vec<_> = std::iter::once(("x", &xv)).chain(wts.vars()).collect();
                assert_fused_matches_reference(&what, &vars, 7, F32_TOL, |imp| {
                    excitation(&x, &wts.get(), gate, imp).unwrap()
                });
            }
        }
    }
}

/// `excitation_backward` called directly (no autograd graph) returns the gradients Candle's
/// autograd gives the reference for the same output gradient.
#[test]
fn excitation_backward_matches_reference_autograd() {
    for (case, &(n, c, h, w, hidden)) in EXCITATION_CASES.iter().enumerate() {
        let what = format!("case {case} {:?}", (n, c, h, w, hidden));
        let strided = case % 2 == 1;
        let (xv, x) = input(20 + case as u64, n, c, h, w, strided, DType::F32);
        let wts = Weights::new(200 + case as u64, c, hidden, DType::F32);
        let grad = randn(7, &[n, c, h, w], DType::F32);
        let out_ref = excitation_reference(&x, &wts.get(), Gate::OnePlusS).unwrap();
        let g_ref = (out_ref * &grad).unwrap().sum_all().unwrap().backward().unwrap();
        let g = excitation_backward(&x, &wts.get(), Gate::OnePlusS, &grad).unwrap();
        let dx_ref = g_ref.get(&xv).unwrap();
        let dx_ref = if strided { dx_ref.transpose(0, 1).unwrap() } else { dx_ref.clone() };
        assert_close(&format!("{what} d/dx"), &g.input, &dx_ref, F32_TOL);
        let fused = [&g.fc1_weight, &g.fc1_bias, &g.fc2_weight, &g.fc2_bias];
        for ((name, v), d) in wts.vars().into_iter().zip(fused) {
            assert_close(&format!("{what} d/d{name}"), d, g_ref.get(v).unwrap(), F32_TOL);
        }
    }
    let (_, x) = input(1, 2, 16, 3, 3, false, DType::F32);
    let wts = Weights::new(2, 16, 4, DType::F32);
    let err = excitation_backward(&x, &wts.get(), Gate::S, &randn(3, &[2, 16, 3, 4], DType::F32)).unwrap_err();
    assert!(err.to_string().contains("gradient shape [2, 16, 3, 4] differs from input shape [2, 16, 3, 3]"), "{err}");
}

#[test]
fn excitation_fused_matches_reference_in_bf16_and_f16() {
    for dtype in [DType::BF16, DType::F16] {
        let (xv, x) = input(3, 2, 64, 5, 5, true, dtype);
        let wts = Weights::new(4, 64, 8, dtype);
        let out_ref = excitation_reference(&x, &wts.get(), Gate::OnePlusS).unwrap();
        let out_fused = excitation(&x, &wts.get(), Gate::OnePlusS, Implementation::Fused).unwrap();
        assert_eq!(out_fused.dtype(), dtype);
        assert_close(&format!("{dtype:?} forward"), &out_fused, &out_ref, BF16_TOL);
        let g_fused = probe_loss(&out_fused, 1).unwrap().backward().unwrap();
        let g_ref = probe_loss(&out_ref, 1).unwrap().backward().unwrap();
        assert_close(&format!("{dtype:?} d/dx"), g_fused.get(&xv).unwrap(), g_ref.get(&xv).unwrap(), BF16_TOL);
        for (name, v) in wts.vars() {
            let what = format!("{dtype:?} d/d{name}");
            assert_close(&what, g_fused.get(v).unwrap(), g_ref.get(v).unwrap(), BF16_TOL);
        }
    }
}

/// f32 master weights with a bf16 or f16 input: the fused CPU kernel uses them whole (no
/// bf16 copy) and returns their gradients in f32, so its output and input gradient are the
/// f32 computation rounded once, and the weight gradients are the f32 ones. The reference
/// path casts them, and its weight gradients come back f32 through the cast.
/// `excitation_backward` gives the same f32 weight gradients as the autograd path.
#[test]
fn excitation_takes_f32_master_weights_with_a_bf16_input() {
    let (n, c, h, w, hidden) = (2, 64, 5, 5, 8);
    for gate in [Gate::S, Gate::OnePlusS] {
        // Input and output gradient hold bf16 values (exact in f16 at this scale as well).
        let x_values = randn(30, &[n, c, h, w], DType::BF16);
        let probe = randn(31, &[n, c, h, w], DType::BF16);
        let wts = Weights::new(300, c, hidden, DType::F32);
        let run = |dtype: DType, imp| {
            let x = Var::from_tensor(&x_values.to_dtype(dtype).unwrap()).unwrap();
            let out = excitation(&x, &wts.get(), gate, imp).unwrap();
            assert_eq!(out.dtype(), dtype, "{gate:?}: output dtype");
            let grads = (&out * probe.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(&x).unwrap().clone();
            let dw: Vec<Tensor> = wts.vars().iter().map(|(_, v)| grads.get(v).unwrap().clone()).collect();
            assert!(dw.iter().all(|d| d.dtype() == DType::F32), "{gate:?} {dtype:?}: weight gradients in f32");
            (out, dx, dw)
        };
        let (out_ref, dx_ref, dw_ref) = run(DType::F32, Implementation::Reference);
        for dtype in [DType::BF16, DType::F16] {
            let what = format!("{gate:?} {dtype:?}");
            let (out, dx, dw) = run(dtype, Implementation::Fused);
            assert_close(&format!("{what} output"), &out, &out_ref, BF16_ONCE_TOL);
            assert_close(&format!("{what} d/dx"), &dx, &dx_ref, BF16_ONCE_TOL);
            for ((name, _), (d, d_ref)) in wts.vars().iter().zip(dw.iter().zip(&dw_ref)) {
                assert_close(&format!("{what} d/d{name}"), d, d_ref, F32_TOL);
            }
            let (out, dx, dw) = run(dtype, Implementation::Reference);
            assert_close(&format!("{what} reference output"), &out, &out_ref, BF16_TOL);
            assert_close(&format!("{what} reference d/dx"), &dx, &dx_ref, BF16_TOL);
            for ((name, _), (d, d_ref)) in wts.vars().iter().zip(dw.iter().zip(&dw_ref)) {
                assert_close(&format!("{what} reference d/d{name}"), d, d_ref, BF16_TOL);
            }
        }
        let x = x_values.clone();
        let direct = excitation_backward(&x, &wts.get(), gate, &probe).unwrap();
        let (_, dx_autograd, dw_autograd) = run(DType::BF16, Implementation::Fused);
        assert_close(&format!("{gate:?} excitation_backward d/dx"), &direct.input, &dx_autograd, F32_TOL);
        let direct_dw = [&direct.fc1_weight, &direct.fc1_bias, &direct.fc2_weight, &direct.fc2_bias];
        for ((name, _), (d, d_ref)) in wts.vars().iter().zip(direct_dw.into_iter().zip(&dw_autograd)) {
            assert_eq!(d.dtype(), DType::F32, "excitation_backward d/d{name} dtype");
            assert_close(&format!("{gate:?} excitation_backward d/d{name}"), d, d_ref, F32_TOL);
        }
    }
    // Any other mix of dtypes is an error that names both.
    let x = randn(1, &[2, 16, 4, 4], DType::F16);
    let wts = Weights::new(1, 16, 4, DType::BF16);
    let err = excitation(&x, &wts.get(), Gate::S, Implementation::Fused).unwrap_err().to_string();
    assert!(err.contains("BF16") && err.contains("F16"), "{err}");
}

#[test]
fn excitation_reference_gradients_match_finite_differences() {
    for gate in [Gate::S, Gate::OnePlusS] {
        let (xv, x) = input(1, 2, 6, 3, 2, true, DType::F64);
        let wts = Weights::new(2, 6, 3, DType::F64);
        let f = || probe_loss(&excitation_reference(&x, &wts.get(), gate)?, 9);
        check_finite_differences(&format!("{gate:?} x"), &xv, &f);
        for (name, v) in wts.vars() {
            check_finite_differences(&format!("{gate:?} {name}"), v, &f);
        }
    }
}

#[test]
fn excitation_rejects_bad_shapes_and_dtypes() {
    let x = randn(1, &[2, 16, 4, 4], DType::F32);
    let good = Weights::new(1, 16, 4, DType::F32);
    let wrong_c = Weights::new(1, 8, 4, DType::F32);
    for imp in Implementation::ALL {
        let err = excitation(&x, &wrong_c.get(), Gate::S, imp).unwrap_err().to_string();
        assert!(err.contains("fc1_weight") || err.contains("channels"), "{err}");
        let err = excitation(&randn(1, &[2, 16, 4], DType::F32), &good.get(), Gate::S, imp).unwrap_err();
        assert!(err.to_string().contains("rank") || err.to_string().contains("dims"), "{err}");
        let b1 = randn(5, &[5], DType::F32);
        let bad = ExcitationWeights { fc1_bias: &b1, ..good.get() };
        let err = excitation(&x, &bad, Gate::S, imp).unwrap_err().to_string();
        assert!(err.contains("fc1_bias must have shape [4]"), "{err}");
    }
    let x64 = x.to_dtype(DType::F64).unwrap();
    let err = excitation(&x64, &good.get(), Gate::S, Implementation::Fused).unwrap_err().to_string();
    assert!(err.contains("dtype"), "{err}");
}

const POOL_CASES: &[(MaxPoolConfig, [usize; 4])] = &[
    (MaxPoolConfig { kernel: 3, stride: 2, padding: 1 }, [2, 3, 9, 9]),
    (MaxPoolConfig { kernel: 3, stride: 2, padding: 1 }, [1, 2, 8, 7]),
    (MaxPoolConfig { kernel: 2, stride: 2, padding: 0 }, [2, 2, 6, 4]),
    (MaxPoolConfig { kernel: 3, stride: 1, padding: 1 }, [1, 4, 5, 5]),
    (MaxPoolConfig { kernel: 3, stride: 2, padding: 1 }, [1, 1, 1, 1]),
    (MaxPoolConfig { kernel: 5, stride: 3, padding: 2 }, [2, 2, 11, 13]),
    (MaxPoolConfig { kernel: 4, stride: 3, padding: 1 }, [1, 3, 10, 9]),
    (MaxPoolConfig { kernel: 1, stride: 2, padding: 0 }, [1, 2, 5, 6]),
];

#[test]
fn max_pool_fused_matches_reference_forward_and_backward() {
    for (i, &(cfg, [n, c, h, w])) in POOL_CASES.iter().enumerate() {
        for strided in [false, true] {
            let what = format!("{cfg:?} {:?} strided={strided}", [n, c, h, w]);
            let (xv, x) = input(20 + i as u64, n, c, h, w, strided, DType::F32);
            assert_fused_matches_reference(&what, &[("x", &xv)], 3, F32_TOL, |imp| max_pool2d(&x, cfg, imp).unwrap());
        }
    }
}

#[test]
fn max_pool_matches_hand_computed_values() {
    // 1×1×4×4 input 0..16, 3×3 window, stride 2, padding 1: windows centred on (0,0), (0,2),
    // (2,0), (2,2) have maxima 5, 7, 13, 15.
    let x = Var::from_tensor(&Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap()).unwrap();
    let cfg = MaxPoolConfig { kernel: 3, stride: 2, padding: 1 };
    for imp in Implementation::ALL {
        let out = max_pool2d(&x, cfg, imp).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![5., 7., 13., 15.]);
        let dx = out
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut expect = vec![0f32; 16];
        for i in [5, 7, 13, 15] {
            expect[i] = 1.0;
        }
        assert_eq!(dx, expect, "{imp}");
    }
}

/// The fused gradient's rule on ties and NaNs, by hand: one 2×2 window per channel. A tie goes
/// to the first maximum in row-major order (here across rows: (0, 1), not (1, 0)); a NaN wins
/// and the output is NaN, and of two NaNs the later one gets the gradient.
#[test]
fn max_pool_fused_gradient_follows_its_tie_and_nan_rule() {
    let nan = f32::NAN;
    let values = vec![1., 9., 9., 2., nan, 3., nan, 1., 1., nan, 5., 2.];
    let x = Var::from_tensor(&Tensor::from_vec(values, (1, 3, 2, 2), &Device::Cpu).unwrap()).unwrap();
    let cfg = MaxPoolConfig { kernel: 2, stride: 2, padding: 0 };
    let y = max_pool2d(&x, cfg, Implementation::Fused).unwrap();
    let out = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(out[0], 9.0);
    assert!(out[1].is_nan() && out[2].is_nan(), "{out:?}");
    let probe = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap().reshape((1, 3, 1, 1)).unwrap();
    let dx = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = dx.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(dx, vec![0., 1., 0., 0., 0., 0., 2., 0., 0., 3., 0., 0.]);
}

/// Overlapping windows full of ties and NaNs (values from {0, 1, 2, NaN}), in f32 and bf16,
/// against a plain loop over each window: the output is the window's maximum (NaN if it has
/// one) and the gradient goes to its first maximum in row-major order, or its last NaN.
#[test]
fn max_pool_fused_gradient_follows_its_rule_in_overlapping_windows() {
    let cases = [
        (MaxPoolConfig { kernel: 3, stride: 2, padding: 1 }, (9, 8)),
        (MaxPoolConfig { kernel: 3, stride: 1, padding: 1 }, (5, 7)),
        (MaxPoolConfig { kernel: 5, stride: 3, padding: 2 }, (11, 10)),
    ];
    for (cfg, (h, w)) in cases {
        let (oh, ow) = cfg.output_size(h, w).unwrap();
        let c = 3;
        let values: Vec<f32> = (0..c * h * w)
            .map(|i| [0.0, 1.0, 2.0, 2.0, 1.0, f32::NAN][(i * 7 + i / 5) % if i < h * w { 5 } else { 6 }])
            .collect();
        let weights: Vec<f32> = (0..c * oh * ow).map(|i| 1.0 + i as f32).collect();
        // The plain loop.
        let (mut want_y, mut want_dx) = (vec![0f32; c * oh * ow], vec![0f32; c * h * w]);
        for ci in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best: Option<(usize, f32)> = None;
                    for y in (oy * cfg.stride).saturating_sub(cfg.padding)
                        ..(oy * cfg.stride + cfg.kernel - cfg.padding).min(h)
                    {
                        for x in (ox * cfg.stride).saturating_sub(cfg.padding)
                            ..(ox * cfg.stride + cfg.kernel - cfg.padding).min(w)
                        {
                            let (i, v) = (ci * h * w + y * w + x, values[ci * h * w + y * w + x]);
                            best = match best {
                                Some((_, b)) if !(v > b || v.is_nan()) => best,
                                _ => Some((i, v)),
                            };
                        }
                    }
                    let (i, v) = best.unwrap();
                    let o = (ci * oh + oy) * ow + ox;
                    want_y[o] = v;
                    want_dx[i] += weights[o];
                }
            }
        }
        for dtype in [DType::F32, DType::BF16] {
            let what = format!("{cfg:?} {h}×{w} {dtype:?}");
            let x = Var::from_tensor(
                &Tensor::from_vec(values.clone(), (1, c, h, w), &Device::Cpu).unwrap().to_dtype(dtype).unwrap(),
            )
            .unwrap();
            let y = max_pool2d(&x, cfg, Implementation::Fused).unwrap();
            let got_y = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (o, (&g, &want)) in got_y.iter().zip(&want_y).enumerate() {
                assert!(g == want || (g.is_nan() && want.is_nan()), "{what}: output {o}: {g} vs {want}");
            }
            let probe =
                Tensor::from_vec(weights.clone(), (1, c, oh, ow), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            // NaN outputs times their weight stay NaN in the loss; the gradient does not care.
            let grads = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
            let dx =
                grads.get(&x).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // bf16 holds the integer sums here exactly up to 256; compare in bf16's precision.
            for (i, (&g, &want)) in dx.iter().zip(&want_dx).enumerate() {
                assert!((g - want).abs() <= want.abs() / 128.0, "{what}: dx[{i}]: {g} vs {want}");
            }
        }
    }
}

#[test]
fn max_pool_reference_gradient_matches_finite_differences() {
    let (xv, x) = input(5, 1, 2, 5, 6, false, DType::F64);
    let cfg = MaxPoolConfig { kernel: 3, stride: 2, padding: 1 };
    check_finite_differences("max_pool x", &xv, &|| probe_loss(&max_pool2d_reference(&x, cfg)?, 2));
}

#[test]
fn max_pool_rejects_bad_configs() {
    let x = randn(1, &[1, 1, 4, 4], DType::F32);
    for imp in Implementation::ALL {
        let too_much_padding = MaxPoolConfig { kernel: 3, stride: 2, padding: 2 };
        assert!(max_pool2d(&x, too_much_padding, imp).unwrap_err().to_string().contains("padding 2"));
        let too_small = MaxPoolConfig { kernel: 7, stride: 1, padding: 0 };
        assert!(max_pool2d(&x, too_small, imp).unwrap_err().to_string().contains("smaller than the kernel"));
        let zero_stride = MaxPoolConfig { kernel: 2, stride: 0, padding: 0 };
        assert!(max_pool2d(&x, zero_stride, imp).is_err());
    }
}

const DEPTHWISE_CASES: &[(DepthwiseConfig, [usize; 4], [usize; 2])] = &[
    (DepthwiseConfig { stride: 1, padding: 1 }, [2, 5, 8, 8], [3, 3]),
    (DepthwiseConfig { stride: 2, padding: 1 }, [2, 4, 9, 7], [3, 3]),
    (DepthwiseConfig { stride: 1, padding: 0 }, [1, 3, 1, 1], [1, 1]),
    (DepthwiseConfig { stride: 2, padding: 2 }, [1, 6, 11, 10], [5, 5]),
    (DepthwiseConfig { stride: 1, padding: 1 }, [1, 2, 1, 1], [3, 3]),
];

#[test]
fn depthwise_fused_matches_reference_forward_and_backward() {
    for (i, &(cfg, [n, c, h, w], [kh, kw])) in DEPTHWISE_CASES.iter().enumerate() {
        for strided in [false, true] {
            let what = format!("{cfg:?} {:?} k={kh}x{kw} strided={strided}", [n, c, h, w]);
            let (xv, x) = input(30 + i as u64, n, c, h, w, strided, DType::F32);
            let k = var(40 + i as u64, &[c, 1, kh, kw], DType::F32);
            assert_fused_matches_reference(&what, &[("x", &xv), ("weight", &k)], 5, F32_TOL, |imp| {
                depthwise_conv2d(&x, k.as_tensor(), cfg, imp).unwrap()
            });
        }
    }
}

#[test]
fn depthwise_reference_gradients_match_finite_differences() {
    let (xv, x) = input(6, 1, 3, 5, 4, false, DType::F64);
    let k = var(7, &[3, 1, 3, 3], DType::F64);
    let cfg = DepthwiseConfig { stride: 2, padding: 1 };
    let f = || probe_loss(&depthwise_conv2d_reference(&x, k.as_tensor(), cfg)?, 4);
    check_finite_differences("depthwise x", &xv, &f);
    check_finite_differences("depthwise weight", &k, &f);
}

#[test]
fn depthwise_rejects_bad_weights() {
    let x = randn(1, &[1, 4, 6, 6], DType::F32);
    let cfg = DepthwiseConfig { stride: 1, padding: 1 };
    for imp in Implementation::ALL {
        let err = depthwise_conv2d(&x, &randn(2, &[3, 1, 3, 3], DType::F32), cfg, imp).unwrap_err().to_string();
        assert!(err.contains("weight must be (4, 1, kh, kw)"), "{err}");
        let err = depthwise_conv2d(&x, &randn(2, &[4, 2, 3, 3], DType::F32), cfg, imp).unwrap_err().to_string();
        assert!(err.contains("got [4, 2, 3, 3]"), "{err}");
    }
}

/// (config, input (N, C, H, W), weight (O, C / groups, kh, kw)): the shapes ResNet, ResNeXt
/// and MobileNet use (1×1 at strides 1 and 2, 3×3 at strides 1 and 2 with odd sizes, the 7×7/2
/// stem, grouped and depthwise), plus batch 1, a 1×1 image, a rectangular kernel and images of
/// over 1,000 pixels.
const CONV_CASES: &[(Conv2dConfig, [usize; 4], [usize; 4])] = &[
    (Conv2dConfig { stride: 1, padding: 0, groups: 1 }, [3, 8, 5, 6], [6, 8, 1, 1]),
    (Conv2dConfig { stride: 2, padding: 0, groups: 1 }, [2, 6, 7, 7], [10, 6, 1, 1]),
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [2, 5, 8, 7], [4, 5, 3, 3]),
    // 3×3 stride 1 without and with double padding, with the 128 tiles of 2×2 output pixels
    // from which Winograd's convolution takes them (its input gradient then has padding 2
    // and 0), odd sizes: all three products by F(3×3, 3×3), which needs over a fifth fewer
    // multiplies here (`winograd3`).
    (Conv2dConfig { stride: 1, padding: 0, groups: 1 }, [2, 3, 18, 17], [5, 3, 3, 3]),
    (Conv2dConfig { stride: 1, padding: 2, groups: 1 }, [2, 4, 13, 14], [3, 4, 3, 3]),
    // 4×4 images, 128 tiles in the batch: F(2×2, 3×3), since F(3×3) would need more
    // multiplies (four tiles of 25 against four of 16).
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [32, 3, 4, 4], [4, 3, 3, 3]),
    // 240 F(3×3) tiles per image: the batch in two chunks of images (3 and 2).
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [5, 2, 46, 45], [3, 2, 3, 3]),
    (Conv2dConfig { stride: 2, padding: 1, groups: 1 }, [3, 4, 9, 7], [6, 4, 3, 3]),
    (Conv2dConfig { stride: 2, padding: 3, groups: 1 }, [2, 3, 15, 13], [8, 3, 7, 7]),
    (Conv2dConfig { stride: 1, padding: 1, groups: 4 }, [2, 8, 6, 6], [12, 2, 3, 3]),
    (Conv2dConfig { stride: 2, padding: 1, groups: 2 }, [1, 6, 7, 8], [4, 3, 3, 3]),
    (Conv2dConfig { stride: 1, padding: 1, groups: 5 }, [2, 5, 6, 5], [5, 1, 3, 3]),
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [2, 3, 1, 1], [4, 3, 3, 3]),
    (Conv2dConfig { stride: 1, padding: 0, groups: 1 }, [1, 3, 6, 9], [2, 3, 2, 4]),
    (Conv2dConfig { stride: 1, padding: 0, groups: 1 }, [3, 4, 33, 32], [5, 4, 1, 1]),
    (Conv2dConfig { stride: 1, padding: 1, groups: 2 }, [2, 4, 32, 33], [6, 2, 3, 3]),
    (Conv2dConfig { stride: 2, padding: 3, groups: 1 }, [1, 3, 65, 64], [4, 3, 7, 7]),
    // One small image with more unrolled rows than output channels: its weight gradient is
    // summed as dW directly, where the image above sums dWᵀ (too few pixels to repay writing
    // it into dW; `ConvBackward::backward_per_image`).
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [1, 40, 2, 3], [24, 40, 3, 3]),
    // Large enough in both dimensions of every product (136 output channels, 143 pixels, 360
    // unrolled rows; see `cpu::matmul_threads`) for bf16 operands to take the bf16
    // dot-product multiply where the CPU has it, in all three products; odd sizes.
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [2, 40, 13, 11], [136, 40, 3, 3]),
    // The same for images multiplied one at a time (one image, its columns split between two
    // threads; images of 272 pixels), where the bf16 kernel packs the unrolled input (and its
    // transpose for dW, and dy for the input gradient's own convolution) straight from a
    // contiguous bf16 image (`gemm_bf16::Unrolled`).
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [1, 80, 21, 23], [72, 80, 3, 3]),
    (Conv2dConfig { stride: 1, padding: 0, groups: 1 }, [2, 80, 19, 18], [72, 80, 3, 3]),
    // A pointwise convolution of small images (225 pixels) multiplied side by side, large
    // enough for the bf16 dot-product kernel to pack its forward's operand and its weight
    // gradient's transpose straight from the images.
    (Conv2dConfig { stride: 1, padding: 0, groups: 1 }, [3, 256, 15, 15], [64, 256, 1, 1]),
    // Channels in whole vectors for the direct 3×3 kernel (`direct::Direct`) where the CPU has
    // AVX-512F (contiguous inputs; the strided ones take the other paths): images in parallel
    // (3 images, rows of 19 = tiles of 6, 6 and 7 pixels), all three products direct; one
    // image, its blocks of output channels in parallel (rows of 24), the input gradient by
    // Winograd (its 16 output channels are not a whole block of 32) beside a direct weight
    // gradient; rows of 33 (tiles of 8, 8, 8 and 9), too few tiles for Winograd.
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [3, 32, 7, 19], [64, 32, 3, 3]),
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [1, 16, 24, 24], [32, 16, 3, 3]),
    (Conv2dConfig { stride: 1, padding: 1, groups: 1 }, [2, 64, 5, 33], [32, 64, 3, 3]),
];

#[test]
fn conv_fused_matches_reference_forward_and_backward() {
    // Run again by `conv_cases_with_the_direct_kernel_forced_on_and_off` (on AVX-512 CPUs):
    // the variable must have decided the path.
    if let Ok(forced) = std::env::var(FORCE_DIRECT) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert_eq!(direct_conv3x3_in_use(), forced == "1", "{FORCE_DIRECT}={forced} did not decide the 3×3 path");
        }
    }
    for (i, &(cfg, [n, c, h, w], wshape)) in CONV_CASES.iter().enumerate() {
        for strided in [false, true] {
            let what = format!("{cfg:?} {:?} weight {wshape:?} strided={strided}", [n, c, h, w]);
            let (xv, x) = input(70 + i as u64, n, c, h, w, strided, DType::F32);
            let k = var(80 + i as u64, &wshape, DType::F32);
            assert_fused_matches_reference(&what, &[("x", &xv), ("weight", &k)], 5, F32_TOL, |imp| {
                conv2d(&x, k.as_tensor(), cfg, imp).unwrap()
            });
        }
    }
}

/// Forces the direct 3×3 kernel on (`1`) or off (`0`) where the CPU has AVX-512F.
const FORCE_DIRECT: &str = "SAE_DIRECT_CONV";

/// Asserts that test `name` of this binary passes in a process of its own with `var=value`
/// (for switches read once per process).
fn passes_in_a_child_process(name: &str, var: &str, value: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads", "1"])
        .env(var, value)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("1 passed"), "{name} with {var}={value}:\n{stdout}\n{stderr}");
}

/// Which of the direct 3×3 kernel and Winograd's algorithm takes ResNet's first-stage layers
/// depends on the CPU's FMA units (`direct_conv3x3_in_use`), so a machine would check only one:
/// the convolution cases again in processes of their own with each forced.
#[test]
fn conv_cases_with_the_direct_kernel_forced_on_and_off() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os(FORCE_DIRECT).is_none() && std::arch::is_x86_feature_detected!("avx512f") {
        for forced in ["1", "0"] {
            passes_in_a_child_process("conv_fused_matches_reference_forward_and_backward", FORCE_DIRECT, forced);
        }
        return;
    }
    println!("skipped: no AVX-512F, so neither path is the direct kernel (or already a forced run)");
}

/// bf16 convolutions, whose input the fused kernel unrolls in bf16 (and the bf16 kernel, where
/// the CPU has one, packs as stored; elsewhere, and for shallow products, it is widened for
/// the f32 kernels), against the f32 reference on the same bf16 values: output and both
/// gradients within bf16's rounding, contiguous and strided inputs, with bf16 weights and with
/// f32 master weights (of bf16 values).
#[test]
fn conv_fused_in_bf16_matches_the_f32_reference() {
    if std::env::var_os(DISABLE_BF16_PRODUCTS).is_some() {
        assert_eq!(Bf16Multiply::of_this_cpu(), None, "{DISABLE_BF16_PRODUCTS} did not turn the bf16 products off");
    }
    for (i, &(cfg, [n, c, h, w], wshape)) in CONV_CASES.iter().enumerate() {
        for strided in [false, true] {
            for master in [false, true] {
                let what = format!("{cfg:?} {:?} weight {wshape:?} strided={strided} master={master}", [n, c, h, w]);
                let (xv, x) = input(70 + i as u64, n, c, h, w, strided, DType::BF16);
                // Master weights hold bf16 values: the f32 products take master weights whole
                // and the bf16 kernels round them (see `conv2d`), and which one multiplies
                // depends on the shape, so unrounded ones would make the reference's rounding
                // shape-dependent too.
                let k = var(80 + i as u64, &wshape, DType::BF16);
                let k =
                    if master { Var::from_tensor(&k.as_tensor().to_dtype(DType::F32).unwrap()).unwrap() } else { k };
                let x32v = Var::from_tensor(&xv.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
                let x32 = if strided { x32v.transpose(0, 1).unwrap() } else { x32v.as_tensor().clone() };
                let k32 = Var::from_tensor(&k.as_tensor().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap())
                    .unwrap();
                let out = conv2d(&x, k.as_tensor(), cfg, Implementation::Fused).unwrap();
                assert_eq!(out.dtype(), DType::BF16, "{what}");
                let want = conv2d(&x32, k32.as_tensor(), cfg, Implementation::Reference).unwrap();
                let probe = randn(5, want.dims(), DType::BF16).to_dtype(DType::F32).unwrap();
                let loss = |y: &Tensor| (y.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap();
                let (grads, grads_ref) = (loss(&out).backward().unwrap(), loss(&want).backward().unwrap());
                assert_close(&format!("{what} forward"), &out, &want, BF16_TOL);
                assert_close(&format!("{what} d/dx"), grads.get(&xv).unwrap(), grads_ref.get(&x32v).unwrap(), BF16_TOL);
                assert_close(
                    &format!("{what} d/dweight"),
                    grads.get(&k).unwrap(),
                    grads_ref.get(&k32).unwrap(),
                    BF16_TOL,
                );
            }
        }
    }
}

/// Where the CPU multiplies bf16 (AMX tiles or AVX-512 BF16), the bf16 convolution cases again
/// in a process of their own with those products turned off: bf16 operands then take the f32
/// kernels (Winograd's included), the path of CPUs without AVX-512 BF16, which a machine with
/// it would otherwise never run.
#[test]
fn conv_cases_in_bf16_with_the_bf16_products_turned_off() {
    if std::env::var_os(DISABLE_BF16_PRODUCTS).is_none() && Bf16Multiply::of_this_cpu().is_some() {
        passes_in_a_child_process("conv_fused_in_bf16_matches_the_f32_reference", DISABLE_BF16_PRODUCTS, "1");
        return;
    }
    println!(
        "skipped: no bf16 multiplies on this CPU, so the bf16 cases already take the f32 kernels (or a forced run)"
    );
}

/// A convolution with eval-mode BatchNorm (and its ReLU) as one op: the fused kernel applies
/// the scale and shift to each image's output as it is multiplied, in both the per-image and
/// the batched paths; its output and the gradients of all four operands match the reference
/// convolution followed by the reference scale and shift.
#[test]
fn conv_affine_fused_matches_reference_forward_and_backward() {
    for (i, &(cfg, [n, c, h, w], wshape)) in CONV_CASES.iter().enumerate() {
        let (relu, strided) = (i % 2 == 0, i % 3 == 0);
        let what = format!("{cfg:?} {:?} weight {wshape:?} strided={strided} relu={relu}", [n, c, h, w]);
        let (xv, x) = input(90 + i as u64, n, c, h, w, strided, DType::F32);
        let k = var(110 + i as u64, &wshape, DType::F32);
        let (scale, shift) =
            (var(130 + i as u64, &[wshape[0]], DType::F32), var(150 + i as u64, &[wshape[0]], DType::F32));
        let vars = [("x", &xv), ("weight", &k), ("scale", &scale), ("shift", &shift)];
        assert_fused_matches_reference(&what, &vars, 5, F32_TOL, |imp| {
            conv2d_affine(&x, k.as_tensor(), cfg, scale.as_tensor(), shift.as_tensor(), relu, imp).unwrap()
        });
    }
}

#[test]
fn conv_affine_rejects_a_scale_or_shift_of_the_wrong_length() {
    let cfg = Conv2dConfig { stride: 1, padding: 1, groups: 1 };
    let (x, k) = (randn(1, &[2, 4, 5, 5], DType::F32), randn(2, &[6, 4, 3, 3], DType::F32));
    let (good, bad) = (randn(3, &[6], DType::F32), randn(4, &[4], DType::F32));
    for imp in [Implementation::Fused, Implementation::Reference] {
        let err = conv2d_affine(&x, &k, cfg, &bad, &good, true, imp).unwrap_err().to_string();
        assert!(err.contains("scale must be (6)") && err.contains("[4]"), "{err}");
        let err = conv2d_affine(&x, &k, cfg, &good, &bad, true, imp).unwrap_err().to_string();
        assert!(err.contains("shift must be (6)"), "{err}");
    }
}

/// A network's first convolution reads a plain tensor: only the weight gradient is
/// computed, and it is still right.
#[test]
fn conv_weight_gradient_without_input_gradient() {
    let cfg = Conv2dConfig { stride: 2, padding: 3, groups: 1 };
    let k = var(4, &[5, 3, 7, 7], DType::F32);
    // Small images are unrolled side by side, large ones (20×20 outputs) one at a time.
    for shape in [[4, 3, 11, 11], [3, 3, 40, 40]] {
        let x = randn(3, &shape, DType::F32);
        let grad = |imp| {
            let out = conv2d(&x, k.as_tensor(), cfg, imp).unwrap();
            let grads = probe_loss(&out, 6).unwrap().backward().unwrap();
            assert!(grads.get(&x).is_none());
            grads.get(&k).unwrap().clone()
        };
        let what = format!("stem {shape:?} d/dweight");
        assert_close(&what, &grad(Implementation::Fused), &grad(Implementation::Reference), F32_TOL);
    }
}

/// Independent of Candle's convolution: the fused kernel's own gradients against finite
/// differences of a direct sum over taps, in f64.
#[test]
fn conv_fused_gradients_match_finite_differences_of_a_direct_sum() {
    let cfg = Conv2dConfig { stride: 2, padding: 1, groups: 2 };
    let (n, c, h, w, o, kh, kw) = (2, 4, 5, 4, 4, 3, 3);
    let x = var(11, &[n, c, h, w], DType::F64);
    let k = var(12, &[o, c / 2, kh, kw], DType::F64);
    let direct = |x: &[f64], k: &[f64]| -> Vec<f64> {
        let (oh, ow) = ((h + 2 - kh) / 2 + 1, (w + 2 - kw) / 2 + 1);
        let mut out = vec![0.0; n * o * oh * ow];
        for ni in 0..n {
            for oi in 0..o {
                let gi = oi / (o / 2);
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0.0;
                        for cl in 0..c / 2 {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let ci = gi * (c / 2) + cl;
                                    acc += x[((ni * c + ci) * h + iy as usize) * w + ix as usize]
                                        * k[((oi * (c / 2) + cl) * kh + ky) * kw + kx];
                                }
                            }
                        }
                        out[((ni * o + oi) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        out
    };
    let flat = |v: &Var| v.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let reference = Tensor::new(direct(&flat(&x), &flat(&k)), &Device::Cpu).unwrap();
    let fused = conv2d(&x.to_dtype(DType::F32).unwrap(), &k.to_dtype(DType::F32).unwrap(), cfg, Implementation::Fused);
    assert_close("fused forward vs direct sum", &fused.unwrap().flatten_all().unwrap(), &reference, F32_TOL);
    // Gradients of the fused op (run in f32 and cast) against finite differences of the
    // direct sum in f64.
    let probe = randn(13, &[reference.elem_count()], DType::F64);
    let loss_of = |xd: &[f64], kd: &[f64]| -> f64 {
        direct(xd, kd).iter().zip(probe.to_vec1::<f64>().unwrap()).map(|(a, b)| a * b).sum()
    };
    let (xf, kf) = (
        Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap(),
        Var::from_tensor(&k.to_dtype(DType::F32).unwrap()).unwrap(),
    );
    let out = conv2d(&xf, &kf, cfg, Implementation::Fused).unwrap().flatten_all().unwrap();
    let grads = (out * probe.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v, base) in [("x", &xf, flat(&x)), ("weight", &kf, flat(&k))] {
        let analytic: Vec<f32> = grads.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (i, &a) in analytic.iter().enumerate() {
            let bump = |d: f64| {
                let mut p = base.clone();
                p[i] += d;
                if name == "x" {
                    loss_of(&p, &flat(&k))
                } else {
                    loss_of(&flat(&x), &p)
                }
            };
            let numeric = (bump(1e-6) - bump(-1e-6)) / 2e-6;
            assert!(
                (numeric - a as f64).abs() <= 1e-4 + 1e-4 * numeric.abs(),
                "d/d{name}[{i}]: fused {a} vs numeric {numeric}"
            );
        }
    }
}

#[test]
fn conv_falls_back_to_the_reference_for_f64_and_matches_it() {
    let cfg = Conv2dConfig { stride: 1, padding: 1, groups: 1 };
    let x = randn(1, &[1, 2, 4, 4], DType::F64);
    let k = randn(2, &[3, 2, 3, 3], DType::F64);
    let fused = conv2d(&x, &k, cfg, Implementation::Fused).unwrap();
    assert_close("f64", &fused, &conv2d_reference(&x, &k, cfg).unwrap(), (1e-12, 1e-12));
}

#[test]
fn conv_rejects_bad_shapes() {
    let x = randn(1, &[1, 4, 6, 6], DType::F32);
    let cfg = |stride, padding, groups| Conv2dConfig { stride, padding, groups };
    let cases: &[(&[usize], Conv2dConfig, &str)] = &[
        (&[8, 3, 3, 3], cfg(1, 1, 1), "has 3 input channels per group, but the input has 4 channels in 1 groups"),
        (&[8, 4, 3, 3], cfg(1, 1, 2), "has 4 input channels per group, but the input has 4 channels in 2 groups"),
        (&[6, 1, 3, 3], cfg(1, 1, 4), "cannot be split into 4 groups"),
        (&[8, 4, 9, 9], cfg(1, 1, 1), "smaller than the kernel 9×9"),
        (&[8, 4, 3], cfg(1, 1, 1), "weight must be (out channels"),
        (&[8, 4, 3, 3], cfg(0, 1, 1), "stride and groups must be positive"),
    ];
    for imp in Implementation::ALL {
        for (shape, c, expected) in cases {
            let err = conv2d(&x, &randn(2, shape, DType::F32), *c, imp).unwrap_err().to_string();
            assert!(err.contains(expected), "{imp} {shape:?}: {err}");
        }
        let err = conv2d(&randn(1, &[4, 6, 6], DType::F32), &randn(2, &[8, 4, 3, 3], DType::F32), cfg(1, 1, 1), imp);
        assert!(err.unwrap_err().to_string().contains("input must be (N, C, H, W)"));
        let err = conv2d(&x, &randn(2, &[8, 4, 3, 3], DType::F64), cfg(1, 1, 1), imp).unwrap_err().to_string();
        assert!(err.contains("weight dtype F64 differs from input dtype F32"), "{err}");
    }
}

/// (N, C, H, W) inputs for BatchNorm: batches of several sizes, a single pixel per channel
/// (zero variance), a plane of one column, and short planes in several tasks' blocks of
/// channels (3 × 41 × 2×2 has, in the bf16 eval-mode case with ReLU, an element that lands on
/// the ReLU's other side once the scale and shift are rounded to bf16: `relu_kinks`).
const BATCH_NORM_CASES: &[[usize; 4]] =
    &[[4, 3, 5, 5], [2, 6, 7, 1], [1, 2, 1, 1], [3, 4, 9, 8], [3, 41, 2, 2], [3, 40, 2, 2]];

#[test]
fn batch_norm_fused_matches_reference_forward_and_backward() {
    for (i, &[n, c, h, w]) in BATCH_NORM_CASES.iter().enumerate() {
        for (strided, relu) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("{:?} strided={strided} relu={relu}", [n, c, h, w]);
            let (xv, x) = input(90 + i as u64, n, c, h, w, strided, DType::F32);
            // Shift and scale the input so that the statistics are far from (0, 1).
            let x = ((x * 3.0).unwrap() + 2.0).unwrap();
            let gamma = var(91 + i as u64, &[c], DType::F32);
            let beta = var(92 + i as u64, &[c], DType::F32);
            let run = |imp| batch_norm_train(&x, gamma.as_tensor(), beta.as_tensor(), 1e-5, relu, imp).unwrap();
            let vars = [("x", &xv), ("gamma", &gamma), ("beta", &beta)];
            assert_fused_matches_reference(&what, &vars, 9, F32_TOL, |imp| run(imp).output);
            let (r, f) = (run(Implementation::Reference), run(Implementation::Fused));
            assert_close(&format!("{what} mean"), &f.mean, &r.mean, F32_TOL);
            assert_close(&format!("{what} variance"), &f.variance, &r.variance, F32_TOL);
        }
    }
}

/// A slice of channels (`narrow` on axis 1) leaves each image's planes side by side but the
/// images further apart than the slice: short planes are still taken as runs there, from an
/// offset and at the wider tensor's image stride.
#[test]
fn batch_norm_on_a_channel_slice_matches_reference() {
    for (i, [n, c, h, w]) in [[3usize, 40, 2, 2], [2, 9, 5, 5]].into_iter().enumerate() {
        let wide = var(120 + i as u64, &[n, c + 8, h, w], DType::F32);
        let x = wide.narrow(1, 5, c).unwrap();
        assert!(!x.is_contiguous());
        let (gamma, beta) = (var(121 + i as u64, &[c], DType::F32), var(122 + i as u64, &[c], DType::F32));
        let vars = [("x", &wide), ("gamma", &gamma), ("beta", &beta)];
        assert_fused_matches_reference(&format!("channel slice {:?}", [n, c, h, w]), &vars, 123, F32_TOL, |imp| {
            batch_norm_train(&x, gamma.as_tensor(), beta.as_tensor(), 1e-5, true, imp).unwrap().output
        });
    }
}

#[test]
fn batch_norm_eval_fused_matches_reference_forward_and_backward() {
    for (i, &[n, c, h, w]) in BATCH_NORM_CASES.iter().enumerate() {
        for (strided, relu) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("eval {:?} strided={strided} relu={relu}", [n, c, h, w]);
            let (xv, x) = input(110 + i as u64, n, c, h, w, strided, DType::F32);
            let gamma = var(111 + i as u64, &[c], DType::F32);
            let beta = var(112 + i as u64, &[c], DType::F32);
            let mean = randn(113 + i as u64, &[c], DType::F32);
            let variance = (randn(114 + i as u64, &[c], DType::F32).abs().unwrap() + 0.5).unwrap();
            let vars = [("x", &xv), ("gamma", &gamma), ("beta", &beta)];
            assert_fused_matches_reference(&what, &vars, 12, F32_TOL, |imp| {
                batch_norm_eval(&x, gamma.as_tensor(), beta.as_tensor(), &mean, &variance, 1e-5, relu, imp).unwrap()
            });
        }
    }
}

#[test]
fn batch_norm_statistics_match_a_hand_calculation() {
    // Channel 0 holds 1, 2, 3, 4 (mean 2.5, biased variance 1.25); channel 1 holds 5 four times.
    let x = Tensor::new(&[[[[1f32, 2.0]], [[5.0, 5.0]]], [[[3.0, 4.0]], [[5.0, 5.0]]]], &Device::Cpu).unwrap();
    let (gamma, beta) =
        (Tensor::new(&[2f32, 1.0], &Device::Cpu).unwrap(), Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap());
    for imp in Implementation::ALL {
        let out = batch_norm_train(&x, &gamma, &beta, 1e-5, false, imp).unwrap();
        assert_eq!(out.mean.to_vec1::<f32>().unwrap(), [2.5, 5.0], "{imp}");
        assert_eq!(out.variance.to_vec1::<f32>().unwrap(), [1.25, 0.0], "{imp}");
        let y: Vec<f32> = out.output.flatten_all().unwrap().to_vec1().unwrap();
        let s = 2.0 / (1.25f32 + 1e-5).sqrt();
        let expected = [0.5 - 1.5 * s, 0.5 - 0.5 * s, -1.0, -1.0, 0.5 + 0.5 * s, 0.5 + 1.5 * s, -1.0, -1.0];
        for (a, e) in y.iter().zip(expected) {
            assert!((a - e).abs() < 1e-5, "{imp}: {y:?} vs {expected:?}");
        }
    }
}

#[test]
fn batch_norm_reference_gradients_match_finite_differences() {
    let (xv, x) = input(93, 3, 2, 3, 2, false, DType::F64);
    let gamma = var(94, &[2], DType::F64);
    let beta = var(95, &[2], DType::F64);
    let f = || probe_loss(&batch_norm_train_reference(&x, gamma.as_tensor(), beta.as_tensor(), 1e-5)?.output, 10);
    check_finite_differences("batch norm x", &xv, &f);
    check_finite_differences("batch norm gamma", &gamma, &f);
    check_finite_differences("batch norm beta", &beta, &f);
}

#[test]
fn batch_norm_rejects_bad_input() {
    let x = randn(1, &[2, 3, 4, 4], DType::F32);
    let v = |n: usize| randn(2, &[n], DType::F32);
    for imp in Implementation::ALL {
        let err = |x: &Tensor, g: &Tensor, b: &Tensor, eps| {
            batch_norm_train(x, g, b, eps, false, imp).unwrap_err().to_string()
        };
        assert!(err(&x, &v(4), &v(3), 1e-5).contains("weight must be (3) for 3 channels, got [4]"));
        assert!(err(&x, &v(3), &v(2), 1e-5).contains("bias must be (3)"));
        assert!(err(&x, &v(3), &v(3).to_dtype(DType::F64).unwrap(), 1e-5).contains("bias dtype F64 differs"));
        assert!(err(&randn(1, &[2, 3, 4], DType::F32), &v(3), &v(3), 1e-5).contains("input must be (N, C, H, W)"));
        assert!(err(&x, &v(3), &v(3), 0.0).contains("eps must be positive"));
        let err = batch_norm_eval(&x, &v(3), &v(3), &v(2), &v(3), 1e-5, false, imp).unwrap_err().to_string();
        assert!(err.contains("running mean must be (3) for 3 channels, got [2]"), "{err}");
    }
}

#[test]
fn relu_fused_matches_reference_forward_and_backward() {
    for (i, &[n, c, h, w]) in [[2, 3, 5, 4], [1, 1, 1, 1], [3, 70, 40, 41]].iter().enumerate() {
        for strided in [false, true] {
            let (xv, x) = input(100 + i as u64, n, c, h, w, strided, DType::F32);
            let what = format!("{:?} strided={strided}", [n, c, h, w]);
            assert_fused_matches_reference(&what, &[("x", &xv)], 11, (0.0, 0.0), |imp| relu(&x, imp).unwrap());
        }
    }
    // At exactly zero the fused gradient is 0 (PyTorch's convention).
    check_relu_zero_convention();
}

#[test]
fn add_relu_fused_matches_reference_forward_and_backward() {
    for (i, &[n, c, h, w]) in [[2, 3, 5, 4], [1, 1, 1, 1], [3, 70, 40, 41]].iter().enumerate() {
        for strided in [false, true] {
            let (av, a) = input(120 + i as u64, n, c, h, w, strided, DType::F32);
            let (bv, b) = input(130 + i as u64, n, c, h, w, false, DType::F32);
            let what = format!("{:?} strided={strided}", [n, c, h, w]);
            assert_fused_matches_reference(&what, &[("a", &av), ("b", &bv)], 13, (0.0, 0.0), |imp| {
                add_relu(&a, &b, imp).unwrap()
            });
        }
    }
    let x = randn(1, &[2, 3], DType::F32);
    for imp in Implementation::ALL {
        let err = add_relu(&x, &randn(2, &[3, 2], DType::F32), imp).unwrap_err().to_string();
        assert!(err.contains("operand shapes [2, 3] and [3, 2] differ"), "{err}");
    }
}

/// BatchNorm's fused ReLU: its CPU backward recomputes the mask from the input and the forward's
/// per-channel affine instead of reading the output. Its gradients must equal bit for bit those
/// of BatchNorm followed by the separate ReLU op (which masks by the output), also where the
/// output is exactly 0 (channel 0 is constant and β₀ = 0, so it normalises to 0) and where the
/// gradient reaching a clamped output is infinite (it must not leak through as NaN).
#[test]
fn batch_norm_relu_backward_masks_as_the_separate_relu_does() {
    let (n, c, h, w) = (3, 4, 5, 6);
    for dtype in [DType::F32, DType::BF16] {
        let x: Vec<f32> = randn(140, &[n * c * h * w], DType::F32)
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, v)| if (i / (h * w)) % c == 0 { 0.75 } else { v * 3.0 + 1.0 })
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(x, (n, c, h, w), &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
            .unwrap();
        let gamma = var(141, &[c], dtype);
        let beta =
            Var::from_tensor(&Tensor::new(&[0f32, 0.3, -0.2, 0.1], &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
        let probe = |out: &Tensor| {
            // Random weights, infinite where the output was clamped to 0.
            let clamped = out.le(0.0).unwrap();
            let inf = Tensor::full(f32::INFINITY, out.dims(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            clamped.where_cond(&inf, &randn(142, out.dims(), dtype)).unwrap()
        };
        let gradients = |fused_relu: bool| {
            let bn = |relu| batch_norm_train(&x, &gamma, &beta, 1e-5, relu, Implementation::Fused).unwrap().output;
            let out = if fused_relu { bn(true) } else { relu(&bn(false), Implementation::Fused).unwrap() };
            let zeros = out.eq(0.0).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>();
            assert!(zeros.unwrap() >= (n * h * w) as f32, "{dtype:?}: channel 0 should be all zeros");
            let grads = out.mul(&probe(&out)).unwrap().sum_all().unwrap().backward().unwrap();
            [&x, &gamma, &beta].map(|v| grads.get(v).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap())
        };
        let (fused, separate) = (gradients(true), gradients(false));
        for (name, (f, s)) in ["x", "gamma", "beta"].iter().zip(fused.iter().zip(&separate)) {
            let (f, s) = (f.to_vec1::<f32>().unwrap(), s.to_vec1::<f32>().unwrap());
            assert!(f.iter().all(|v| v.is_finite()), "{dtype:?} {name}: {f:?}");
            assert_eq!(f, s, "{dtype:?} {name}: fused mask differs from the separate ReLU's");
        }
    }
}

/// The per-channel affine's input gradient is dy·scale (masked by its ReLU) whatever x holds:
/// an infinite input must not turn it into NaN, in either implementation.
#[test]
fn channel_affine_input_gradient_does_not_read_the_input() {
    let x = Var::new(&[[[[1f32, f32::INFINITY]], [[-2.0, 3.0]]]], &Device::Cpu).unwrap();
    let scale = Tensor::new(&[2f32, -0.5], &Device::Cpu).unwrap();
    let shift = Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
    for imp in Implementation::ALL {
        for (relu, expected) in [(false, [2.0, 2.0, -0.5, -0.5]), (true, [2.0, 2.0, -0.5, 0.0])] {
            let out = channel_affine(&x, &scale, &shift, relu, imp).unwrap();
            let grads = out.sum_all().unwrap().backward().unwrap();
            let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(dx, expected, "{imp} relu={relu}");
        }
    }
}

fn check_relu_zero_convention() {
    let x = Var::new(&[-1f32, 0.0, 2.0], &Device::Cpu).unwrap();
    let grads = relu(&x, Implementation::Fused).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>().unwrap(), [0.0, 0.0, 1.0]);
}

/// One bf16 rounding of the output (2⁻⁹ relative) with margin; the f32 arithmetic inside
/// differs from the reference's by f32 ulps only.
const BF16_ONCE_TOL: (f64, f64) = (1e-5, 4e-3);

/// BatchNorm's eval mode rounds its per-channel scale and shift to bf16 as well (each once,
/// from f32): with cancellation between x·scale and shift the error is 2⁻⁹ of those terms,
/// which reach about the largest output here.
const BF16_EVAL_TOL: (f64, f64) = (1e-2, 4e-3);

/// The CPU kernels' mixed precision: on bf16 operands an op computes in f32 and rounds its
/// result once, so its output and every gradient match the f32 reference run on the same
/// (bf16-representable) values within one bf16 rounding. `op` gets the operands (and the
/// implementation) as tensors made from Vars of `shapes`; `strided` transposes the first
/// operand's two leading axes, as in [`input`].
fn assert_bf16_rounds_the_reference_once(
    what: &str,
    shapes: &[&[usize]],
    strided: bool,
    seed: u64,
    tol: (f64, f64),
    op: impl Fn(&[Tensor], Implementation) -> Tensor,
) {
    let run = |dtype: DType, imp| {
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, &shape)| {
                let mut shape = shape.to_vec();
                if strided && i == 0 {
                    shape.swap(0, 1);
                }
                let values = randn(seed + i as u64, &shape, DType::BF16);
                Var::from_tensor(&values.to_dtype(dtype).unwrap()).unwrap()
            })
            .collect();
        let operands: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| if strided && i == 0 { v.transpose(0, 1).unwrap() } else { v.as_tensor().clone() })
            .collect();
        let out = op(&operands, imp);
        assert_eq!(out.dtype(), dtype, "{what}: output dtype");
        let probe = randn(seed + 99, out.dims(), DType::BF16).to_dtype(dtype).unwrap();
        let grads = (&out * probe).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
        (out, grads)
    };
    let (out, grads) = run(DType::BF16, Implementation::Fused);
    let (out_ref, grads_ref) = run(DType::F32, Implementation::Reference);
    assert_close(&format!("{what} bf16 forward"), &out, &out_ref, tol);
    let kinks = relu_kinks(&out, &out_ref);
    for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
        assert_eq!(g.dtype(), DType::BF16, "{what}: gradient {i} dtype");
        let what = format!("{what} bf16 d/d(operand {i})");
        // An element-wise op's input gradient, element by element against its output.
        let aligned = |t: &Tensor| if strided && i == 0 { t.transpose(0, 1).unwrap() } else { t.clone() };
        // A per-channel parameter's gradient (BatchNorm's γ and β) sums its channel's elements.
        let channels = |kinks: &[bool]| -> Vec<bool> {
            let (c, plane) = (out.dims()[1], out.dims()[2..].iter().product::<usize>());
            (0..c).map(|ci| kinks.chunks(plane).skip(ci).step_by(c).any(|p| p.contains(&true))).collect()
        };
        match &kinks {
            Some(kinks) if aligned(g).dims() == out.dims() => {
                assert_close_off(&what, &aligned(g), &aligned(r), tol, kinks, 100)
            }
            Some(kinks) if out.rank() == 4 && g.dims() == [out.dims()[1]] => {
                assert_close_off(&what, g, r, tol, &channels(kinks), 10)
            }
            _ => assert_close(&what, g, r, tol),
        }
    }
}

/// The elements of a ReLU's output at which the bf16 run and the f32 reference took different
/// sides of the kink: one clamped to zero, the other not, both within 2⁻⁶ of the largest
/// output of zero. Where an op rounds an input of the ReLU to bf16 (eval-mode BatchNorm's scale
/// and shift) an element that close to the kink can land on the other side, and its
/// gradient is then zero on one side only. `None` where no element did.
fn relu_kinks(out: &Tensor, out_ref: &Tensor) -> Option<Vec<bool>> {
    let values = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (a, b) = (values(out), values(out_ref));
    let near = b.iter().fold(0f64, |m, v| m.max(v.abs())) / 64.0;
    let kinks: Vec<bool> =
        a.iter().zip(&b).map(|(&x, &y)| (x == 0.0) != (y == 0.0) && x.abs() <= near && y.abs() <= near).collect();
    kinks.contains(&true).then_some(kinks)
}

/// [`assert_close`] but at the elements marked in `skip`, of which there may be at most one in
/// `one_in`.
fn assert_close_off(what: &str, a: &Tensor, b: &Tensor, tol: (f64, f64), skip: &[bool], one_in: usize) {
    let skipped = skip.iter().filter(|&&s| s).count();
    assert!(skipped * one_in <= skip.len(), "{what}: {skipped} of {} elements at a ReLU's kink", skip.len());
    let mask = Tensor::from_vec(skip.iter().map(|&s| u8::from(!s)).collect(), a.dims(), &Device::Cpu).unwrap();
    let zeros = Tensor::zeros(a.dims(), DType::F32, &Device::Cpu).unwrap();
    let keep = |t: &Tensor| mask.where_cond(&t.to_dtype(DType::F32).unwrap(), &zeros).unwrap();
    assert_close(what, &keep(a), &keep(b), tol);
}

#[test]
fn cpu_kernels_take_bf16_and_round_the_f32_result_once() {
    for (i, &(cfg, x, k)) in CONV_CASES.iter().enumerate() {
        for strided in [false, true] {
            let what = format!("conv {cfg:?} {x:?} weight {k:?} strided={strided}");
            assert_bf16_rounds_the_reference_once(
                &what,
                &[&x, &k],
                strided,
                300 + i as u64,
                BF16_ONCE_TOL,
                |t, imp| conv2d(&t[0], &t[1], cfg, imp).unwrap(),
            );
        }
    }
    for (i, &[n, c, h, w]) in BATCH_NORM_CASES.iter().enumerate() {
        for (strided, relu) in [(false, false), (true, true)] {
            let what = format!("batch norm {:?} strided={strided} relu={relu}", [n, c, h, w]);
            let shapes: [&[usize]; 3] = [&[n, c, h, w], &[c], &[c]];
            assert_bf16_rounds_the_reference_once(&what, &shapes, strided, 400 + i as u64, BF16_ONCE_TOL, |t, imp| {
                let out = batch_norm_train(&t[0], &t[1], &t[2], 1e-5, relu, imp).unwrap();
                assert_eq!((out.mean.dtype(), out.variance.dtype()), (DType::F32, DType::F32), "{what}");
                out.output
            });
            let what = format!("eval {what}");
            assert_bf16_rounds_the_reference_once(&what, &shapes, strided, 500 + i as u64, BF16_EVAL_TOL, |t, imp| {
                let stats = randn(7, &[2, c], DType::BF16).to_dtype(t[0].dtype()).unwrap();
                let (mean, var) = (stats.get(0).unwrap(), (stats.get(1).unwrap().abs().unwrap() + 0.5).unwrap());
                batch_norm_eval(&t[0], &t[1], &t[2], &mean, &var, 1e-5, relu, imp).unwrap()
            });
        }
    }
    let shape: &[usize] = &[2, 3, 5, 7];
    assert_bf16_rounds_the_reference_once("relu", &[shape], false, 600, BF16_ONCE_TOL, |t, imp| {
        relu(&t[0], imp).unwrap()
    });
    assert_bf16_rounds_the_reference_once("add_relu", &[shape, shape], false, 601, BF16_ONCE_TOL, |t, imp| {
        add_relu(&t[0], &t[1], imp).unwrap()
    });
}

/// The convolution with eval-mode BatchNorm on a bf16 input with f32 master weights and f32
/// scale and shift (as the models call it) against the f32 reference on the same values: the
/// output within one bf16 rounding per element. The gradients sum terms rounded to bf16 (the
/// convolution's output gradient is rounded once before the convolution's backward, as with
/// the two separate ops, and the scale's gradient sums the bf16 output), so their error is a
/// bf16 rounding of the largest gradient, not of each element: checked normwise.
#[test]
fn conv_affine_takes_bf16_with_f32_master_weights() {
    for (i, &(cfg, x_shape, k_shape)) in CONV_CASES.iter().enumerate() {
        let what = format!("conv affine {cfg:?} {x_shape:?} weight {k_shape:?}");
        let relu = i % 2 == 0;
        // bf16-representable input and weights (which bf16 products take exactly), so that
        // both runs start from the same numbers.
        let value = |seed: u64, shape: &[usize]| randn(seed, shape, DType::BF16).to_dtype(DType::F32).unwrap();
        let (xv, kv) = (
            Var::from_tensor(&value(700 + i as u64, &x_shape)).unwrap(),
            Var::from_tensor(&value(720 + i as u64, &k_shape)).unwrap(),
        );
        let (scale, shift) =
            (var(740 + i as u64, &k_shape[..1], DType::F32), var(760 + i as u64, &k_shape[..1], DType::F32));
        let probe = value(780 + i as u64, &[x_shape[0], k_shape[0], 1, 1]);
        let run = |dtype: DType, imp| {
            let x = xv.to_dtype(dtype).unwrap();
            let out = conv2d_affine(&x, kv.as_tensor(), cfg, scale.as_tensor(), shift.as_tensor(), relu, imp).unwrap();
            assert_eq!(out.dtype(), dtype, "{what}");
            let out = out.to_dtype(DType::F32).unwrap();
            let grads = out.broadcast_mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = [&xv, &kv, &scale, &shift].iter().map(|v| grads.get(v).unwrap().clone()).collect();
            (out, grads)
        };
        let (out, grads) = run(DType::BF16, Implementation::Fused);
        let (out_ref, grads_ref) = run(DType::F32, Implementation::Reference);
        assert_close(&format!("{what} output"), &out, &out_ref, BF16_EVAL_TOL);
        for (name, (g, r)) in ["x", "weight", "scale", "shift"].iter().zip(grads.iter().zip(&grads_ref)) {
            let largest = r.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert_close(&format!("{what} d/d{name}"), g, r, (largest / 128.0, 0.0));
        }
    }
}

/// Mixed precision's f32 master weights go into the convolution with a bf16 (or f16) input
/// as they are. With bf16-representable weights every product path computes the f32
/// reference's products exactly: the output and input gradient are that reference rounded
/// once to the input's type, and the weight gradient comes back in f32, never rounded
/// (f32 tolerance).
/// Weights that bf16 cannot represent stay within one bf16 rounding of the weights.
#[test]
fn conv_takes_f32_master_weights_with_a_bf16_input() {
    for (i, &(cfg, [n, c, h, w], wshape)) in CONV_CASES.iter().enumerate() {
        let what = format!("{cfg:?} {:?} weight {wshape:?}", [n, c, h, w]);
        let x_values = randn(700 + i as u64, &[n, c, h, w], DType::BF16);
        let w_values = randn(800 + i as u64, &wshape, DType::BF16).to_dtype(DType::F32).unwrap();
        let run = |dtype: DType, imp| {
            let x = Var::from_tensor(&x_values.to_dtype(dtype).unwrap()).unwrap();
            let k = Var::from_tensor(&w_values).unwrap();
            let out = conv2d(&x, &k, cfg, imp).unwrap();
            assert_eq!(out.dtype(), dtype, "{what}: output dtype");
            let probe = randn(900 + i as u64, out.dims(), DType::BF16).to_dtype(dtype).unwrap();
            let grads = (&out * probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (dx, dk) = (grads.get(&x).unwrap().clone(), grads.get(&k).unwrap().clone());
            assert_eq!((dx.dtype(), dk.dtype()), (dtype, DType::F32), "{what}: gradient dtypes");
            (out, dx, dk)
        };
        let (out_ref, dx_ref, dk_ref) = run(DType::F32, Implementation::Reference);
        for dtype in [DType::BF16, DType::F16] {
            let (out, dx, dk) = run(dtype, Implementation::Fused);
            assert_close(&format!("{what} {dtype:?} output"), &out, &out_ref, BF16_ONCE_TOL);
            assert_close(&format!("{what} {dtype:?} d/dx"), &dx, &dx_ref, BF16_ONCE_TOL);
            assert_close(&format!("{what} {dtype:?} d/dweight"), &dk, &dk_ref, F32_TOL);
        }
    }
    // Any f32 weights: rounded to bf16 (bf16 products) or not (f32 products), so within 2⁻⁸
    // of the sum of |x·w| of the f32 reference.
    let (cfg, [n, c, h, w], wshape) = CONV_CASES[CONV_CASES.len() - 1];
    let x = randn(1, &[n, c, h, w], DType::BF16);
    let k = randn(2, &wshape, DType::F32);
    let out = conv2d(&x, &k, cfg, Implementation::Fused).unwrap().to_dtype(DType::F32).unwrap();
    let x32 = x.to_dtype(DType::F32).unwrap();
    let out_ref = conv2d(&x32, &k, cfg, Implementation::Reference).unwrap();
    let magnitude = conv2d(&x32.abs().unwrap(), &k.abs().unwrap(), cfg, Implementation::Reference).unwrap();
    let excess = ((out - out_ref).unwrap().abs().unwrap() - (magnitude * (1.0 / 256.0)).unwrap()).unwrap();
    let worst = excess.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(worst <= 1e-4, "the output is {worst} beyond 2⁻⁸ of Σ|x·w|");
    // Any other mix of dtypes is an error that names both.
    let err = conv2d(&x.to_dtype(DType::F16).unwrap(), &k.to_dtype(DType::BF16).unwrap(), cfg, Implementation::Fused);
    let err = err.unwrap_err().to_string();
    assert!(err.contains("BF16") && err.contains("F16"), "{err}");
}

/// `cast` rounds to nearest even and carries the gradient back in the input's type.
#[test]
fn cast_rounds_to_nearest_and_carries_the_gradient_back() {
    // 1 + 2⁻⁸ is halfway between the bf16 values 1 and 1 + 2⁻⁷ (ties to even: 1);
    // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶ (ties to even: 1 + 2⁻⁶).
    let x = Var::new(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5e-3, 3.0e38f32], &Device::Cpu).unwrap();
    let y = cast(&x, DType::BF16).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let got: Vec<f32> = y.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    let expected: Vec<f32> =
        [1.0f32, 1.0 + 1.0 / 64.0, -2.5e-3, 3.0e38].iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    assert_eq!(got, expected);
    assert_eq!(got[..2], [1.0, 1.0 + 1.0 / 64.0]);
    let probe = Tensor::new(&[1.5f32, -2.0, 0.25, 4.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let grad = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grad.get(&x).unwrap();
    assert_eq!(g.dtype(), DType::F32);
    assert_eq!(g.to_vec1::<f32>().unwrap(), [1.5, -2.0, 0.25, 4.0]);
    assert_eq!(cast(&x, DType::F32).unwrap().id(), x.id(), "a cast to the same type is the tensor itself");
}

#[test]
fn implementation_and_gate_names_round_trip() {
    for imp in Implementation::ALL {
        assert_eq!(imp.name().parse::<Implementation>().unwrap(), imp);
    }
    for gate in [Gate::S, Gate::OnePlusS] {
        assert_eq!(gate.name().parse::<Gate>().unwrap(), gate);
    }
    assert!("fast".parse::<Implementation>().unwrap_err().to_string().contains("reference, fused"));
    assert!("sigmoid".parse::<Gate>().unwrap_err().to_string().contains("one_plus_s"));
}

/// The fused excitation on an accelerator against the CPU reference: forward and every
/// gradient, f32 and bf16, contiguous and strided input.
#[cfg(any(feature = "cuda", all(feature = "metal", target_os = "macos")))]
fn accelerator_parity(device: &Device) {
    for (case, &(n, c, h, w, hidden)) in EXCITATION_CASES.iter().enumerate() {
        for strided in [false, true] {
            for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, BF16_TOL)] {
                let what = format!("{device:?} case {case} strided={strided} {dtype:?}");
                let (xv, x) = input(50 + case as u64, n, c, h, w, strided, DType::F32);
                let wts = Weights::new(60 + case as u64, c, hidden, DType::F32);
                let out_ref = excitation_reference(&x, &wts.get(), Gate::OnePlusS).unwrap();
                let g_ref = probe_loss(&out_ref, 8).unwrap().backward().unwrap();

                let to_dev =
                    |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(device).unwrap()).unwrap();
                let dev_x_var = to_dev(xv.as_tensor());
                let dev_x = if strided { dev_x_var.transpose(0, 1).unwrap() } else { dev_x_var.as_tensor().clone() };
                let dw = [to_dev(&wts.w1), to_dev(&wts.b1), to_dev(&wts.w2), to_dev(&wts.b2)];
                let weights =
                    ExcitationWeights { fc1_weight: &dw[0], fc1_bias: &dw[1], fc2_weight: &dw[2], fc2_bias: &dw[3] };
                let out = excitation(&dev_x, &weights, Gate::OnePlusS, Implementation::Fused).unwrap();
                let probe = randn(8, out.dims(), DType::F32).to_dtype(dtype).unwrap().to_device(device).unwrap();
                let g = (out.clone() * probe).unwrap().sum_all().unwrap().backward().unwrap();
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                assert_close(&format!("{what} forward"), &cpu(&out), &out_ref, tol);
                assert_close(&format!("{what} d/dx"), &cpu(g.get(&dev_x_var).unwrap()), g_ref.get(&xv).unwrap(), tol);
                for ((name, v), d) in wts.vars().into_iter().zip(&dw) {
                    assert_close(&format!("{what} d/d{name}"), &cpu(g.get(d).unwrap()), g_ref.get(v).unwrap(), tol);
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_excitation_matches_cpu_reference() {
    accelerator_parity(&Device::new_cuda(0).expect("the cuda feature's tests need a CUDA device"));
}

#[cfg(all(feature = "metal", target_os = "macos"))]
#[test]
fn metal_excitation_matches_cpu_reference() {
    accelerator_parity(&Device::new_metal(0).expect("the metal feature's tests need a Metal device"));
}

/// The reduction layer given as K branches (`excitation_branches`, one packing copy) computes
/// what the stacked weight does (`excitation`, the reference and the fused op): the output
/// and the gradients of the input and of every branch's weight and bias, which must be the
/// rows of the stacked weight's gradients. In f32, and in bf16 with f32 master weights.
#[test]
fn excitation_branches_match_the_stacked_weights() {
    let values = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let (n, c, h, w, rows, k) = (2, 24, 5, 6, 3, 4);
    for dtype in [DType::F32, DType::BF16] {
        let weight_dtype = DType::F32;
        let (xv, x) = input(40, n, c, h, w, false, dtype);
        let fc1: Vec<(Var, Var)> = (0..k as u64)
            .map(|i| (var(50 + i, &[rows, c], weight_dtype), var(60 + i, &[rows], weight_dtype)))
            .collect();
        let (w2, b2) = (var(70, &[c, k * rows], weight_dtype), var(71, &[c], weight_dtype));
        let branches: Vec<(&Tensor, &Tensor)> = fc1.iter().map(|(w, b)| (w.as_tensor(), b.as_tensor())).collect();
        for imp in Implementation::ALL {
            let what = format!("{dtype:?} {imp:?}");
            let got = excitation_branches(&x, &branches, &w2, &b2, Gate::OnePlusS, imp).unwrap();
            let w1 = Tensor::cat(&fc1.iter().map(|(w, _)| w.as_tensor()).collect::<Vec<_>>(), 0).unwrap();
            let b1 = Tensor::cat(&fc1.iter().map(|(_, b)| b.as_tensor()).collect::<Vec<_>>(), 0).unwrap();
            let stacked = ExcitationWeights { fc1_weight: &w1, fc1_bias: &b1, fc2_weight: &w2, fc2_bias: &b2 };
            let want = excitation(&x, &stacked, Gate::OnePlusS, imp).unwrap();
            assert_eq!(values(&got), values(&want), "{what}: output");

            // Weighted sums so that every output element has its own gradient.
            let probe = randn(80, &[n, c, h, w], DType::F32);
            let loss = |y: &Tensor| y.to_dtype(DType::F32).unwrap().mul(&probe).unwrap().sum_all().unwrap();
            let (g_got, g_want) = (loss(&got).backward().unwrap(), loss(&want).backward().unwrap());
            let grad = |g: &candle_core::backprop::GradStore, t: &Tensor| values(g.get(t).unwrap());
            assert_eq!(grad(&g_got, &xv), grad(&g_want, &xv), "{what}: input gradient");
            for t in [w2.as_tensor(), b2.as_tensor()] {
                assert_eq!(grad(&g_got, t), grad(&g_want, t), "{what}: fc2 gradient");
            }
            for (i, (wi, bi)) in fc1.iter().enumerate() {
                assert_eq!(grad(&g_got, wi), grad(&g_want, wi), "{what}: branch {i} weight gradient");
                assert_eq!(grad(&g_got, bi), grad(&g_want, bi), "{what}: branch {i} bias gradient");
            }
        }
    }
}

/// Weights that need no gradient (plain or detached tensors) are read in place by the CPU
/// kernel instead of packed into one operand: the output must be the packed op's bit for bit
/// (equal branches are multiplied one by one in both), and so must the input's gradient, in
/// f32 and in bf16 with f32 master weights, for one branch and for several; branches of
/// different sizes agree within rounding.
#[test]
fn excitation_reads_weights_without_a_gradient_in_place() {
    let values = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    // (Whether both split the branches alike shows at a whole model's sizes: sae-models'
    // `the_forward_without_a_graph_matches_and_keeps_no_graph` fails where they do not.)
    let (n, c, h, w) = (2, 64, 3, 3);
    for dtype in [DType::F32, DType::BF16] {
        for rows in [vec![16], vec![4, 4, 4, 4], vec![8, 4]] {
            let what = format!("{dtype:?} rows {rows:?}");
            let (xv, x) = input(90, n, c, h, w, true, dtype);
            let fc1: Vec<(Var, Var)> = (0..rows.len() as u64)
                .map(|i| {
                    (var(91 + i, &[rows[i as usize], c], DType::F32), var(95 + i, &[rows[i as usize]], DType::F32))
                })
                .collect();
            let hidden = rows.iter().sum();
            let (w2, b2) = (var(99, &[c, hidden], DType::F32), var(100, &[c], DType::F32));
            let weights = |detach: bool| -> Vec<Tensor> {
                let all = fc1.iter().flat_map(|(w, b)| [w, b]).chain([&w2, &b2]);
                all.map(|v| if detach { v.as_tensor().detach() } else { v.as_tensor().clone() }).collect()
            };
            let run = |detach: bool| {
                let t = weights(detach);
                let branches: Vec<(&Tensor, &Tensor)> = t[..2 * rows.len()].chunks(2).map(|p| (&p[0], &p[1])).collect();
                let (w2, b2) = (&t[2 * rows.len()], &t[2 * rows.len() + 1]);
                let out = excitation_branches(&x, &branches, w2, b2, Gate::OnePlusS, Implementation::Fused).unwrap();
                let probe = randn(101, &[n, c, h, w], DType::F32);
                let grads =
                    out.to_dtype(DType::F32).unwrap().mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
                let weight_gradients = t.iter().filter(|w| grads.get(w).is_some()).count();
                (values(&out), values(grads.get(&xv).unwrap()), weight_gradients)
            };
            let (in_place, packed) = (run(true), run(false));
            assert_eq!((in_place.2, packed.2), (0, 2 * rows.len() + 2), "{what}: weight gradients");
            if rows.iter().all(|&r| r == rows[0]) {
                assert_eq!(in_place.0, packed.0, "{what}: output");
                assert_eq!(in_place.1, packed.1, "{what}: input gradient");
            } else {
                let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-5 + 1e-2 * b.abs());
                assert!(close(&in_place.0, &packed.0), "{what}: output");
                assert!(close(&in_place.1, &packed.1), "{what}: input gradient");
            }
        }
    }
}

#[test]
fn excitation_branches_reject_a_wrong_branch() {
    let x = randn(1, &[2, 16, 4, 4], DType::F32);
    let (w, b) = (randn(2, &[4, 16], DType::F32), randn(3, &[4], DType::F32));
    let (w_bad, b_bad) = (randn(4, &[4, 15], DType::F32), randn(5, &[3], DType::F32));
    let (w2, b2) = (randn(6, &[16, 8], DType::F32), randn(7, &[16], DType::F32));
    for imp in Implementation::ALL {
        let err = excitation_branches(&x, &[(&w, &b), (&w_bad, &b)], &w2, &b2, Gate::S, imp).unwrap_err();
        assert!(err.to_string().contains("fc1 branch 1 weight must have shape (rows > 0, 16)"), "{err}");
        let err = excitation_branches(&x, &[(&w, &b), (&w, &b_bad)], &w2, &b2, Gate::S, imp).unwrap_err();
        assert!(err.to_string().contains("fc1 branch 1 bias must have shape [4]"), "{err}");
        let err = excitation_branches(&x, &[(&w, &b)], &w2, &b2, Gate::S, imp).unwrap_err();
        assert!(err.to_string().contains("fc2_weight must have shape [16, 4]"), "{err}");
        let err = excitation_branches(&x, &[], &w2, &b2, Gate::S, imp).unwrap_err();
        assert!(err.to_string().contains("no reduction layer"), "{err}");
    }
}

/// `excitation_add_relu` is `add_relu(excitation_branches(x), shortcut)` in one pass: in f32
/// its output and every gradient (input, shortcut, each weight) must be the two ops' bit for
/// bit, with weights that need a gradient (the packed op) and without (read in place, no weight
/// gradient), for one branch and for several, strided inputs and batch 1; in bf16 see
/// [`assert_bf16_residual_end`]. The reference
/// kernels compose the reference ops (checked against the fused path within f32 tolerance).
#[test]
fn excitation_add_relu_matches_excitation_then_add_relu() {
    let values = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    for (case, &(n, c, h, w, ref rows)) in
        [(2, 16, 5, 6, vec![4]), (1, 24, 3, 3, vec![3, 3, 3, 3]), (3, 8, 1, 1, vec![2])].iter().enumerate()
    {
        for dtype in [DType::F32, DType::BF16] {
            for (strided, gate, detach) in
                [(false, Gate::S, false), (true, Gate::OnePlusS, false), (true, Gate::OnePlusS, true)]
            {
                let what = format!("case {case} {dtype:?} strided={strided} {gate:?} detached={detach}");
                let seed = 200 + 10 * case as u64;
                let (xv, x) = input(seed, n, c, h, w, strided, dtype);
                let sv = var(seed + 1, &[n, c, h, w], dtype);
                let fc1: Vec<(Var, Var)> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| {
                        (var(seed + 2 + i as u64, &[r, c], DType::F32), var(seed + 6 + i as u64, &[r], DType::F32))
                    })
                    .collect();
                let hidden = rows.iter().sum();
                let (w2, b2) = (var(seed + 8, &[c, hidden], DType::F32), var(seed + 9, &[c], DType::F32));
                let all: Vec<&Var> = fc1.iter().flat_map(|(w, b)| [w, b]).chain([&w2, &b2]).collect();
                let weights: Vec<Tensor> = all
                    .iter()
                    .map(|v| {
                        let t = if dtype == DType::F32 {
                            v.as_tensor().clone()
                        } else {
                            v.as_tensor().to_dtype(dtype).unwrap()
                        };
                        if detach {
                            t.detach()
                        } else {
                            t
                        }
                    })
                    .collect();
                let k = rows.len();
                let branches: Vec<(&Tensor, &Tensor)> = weights[..2 * k].chunks(2).map(|p| (&p[0], &p[1])).collect();
                let (w2t, b2t) = (&weights[2 * k], &weights[2 * k + 1]);
                let fused = excitation_add_relu(&x, &branches, w2t, b2t, gate, &sv, Implementation::Fused).unwrap();
                let e = excitation_branches(&x, &branches, w2t, b2t, gate, Implementation::Fused).unwrap();
                let composed = add_relu(&e, &sv, Implementation::Fused).unwrap();
                let (got, want) = (values(&fused), values(&composed));
                assert!(got.contains(&0.0) && got.iter().any(|&v| v > 0.0), "{what}: some outputs clamped");
                let probe = randn(seed + 10, &[n, c, h, w], DType::F32);
                let loss = |y: &Tensor| y.to_dtype(DType::F32).unwrap().mul(&probe).unwrap().sum_all().unwrap();
                let (g_got, g_want) = (loss(&fused).backward().unwrap(), loss(&composed).backward().unwrap());
                let mut targets: Vec<(&str, &Tensor)> = vec![("input", xv.as_tensor()), ("shortcut", sv.as_tensor())];
                targets.extend(weights.iter().map(|t| ("weight", t)));
                if dtype == DType::F32 {
                    assert_eq!(got, want, "{what}: output");
                    for (name, t) in targets {
                        let (a, b) = (g_got.get(t).map(values), g_want.get(t).map(values));
                        assert_eq!(a, b, "{what}: {name} gradient");
                        assert_eq!(a.is_some(), name != "weight" || !detach, "{what}: {name} gradient present");
                    }
                } else {
                    assert_bf16_residual_end(&what, &got, &want, &probe, g_got.get(&sv).unwrap());
                }
                if dtype == DType::F32 && !detach {
                    let vars: Vec<_> =
                        [("x", &xv), ("shortcut", &sv)].into_iter().chain(all.iter().map(|v| ("weight", *v))).collect();
                    assert_fused_matches_reference(&what, &vars, seed + 11, F32_TOL, |imp| {
                        excitation_add_relu(&x, &branches, w2t, b2t, gate, &sv, imp).unwrap()
                    });
                }
            }
        }
    }
}

#[test]
fn excitation_add_relu_rejects_a_wrong_shortcut() {
    let x = randn(1, &[2, 16, 4, 4], DType::F32);
    let (w, b) = (randn(2, &[4, 16], DType::F32), randn(3, &[4], DType::F32));
    let (w2, b2) = (randn(6, &[16, 4], DType::F32), randn(7, &[16], DType::F32));
    for imp in Implementation::ALL {
        let wrong_shape = randn(8, &[2, 16, 4, 5], DType::F32);
        let err = excitation_add_relu(&x, &[(&w, &b)], &w2, &b2, Gate::S, &wrong_shape, imp).unwrap_err().to_string();
        assert!(err.contains("[2, 16, 4, 5]") && err.contains("[2, 16, 4, 4]"), "{imp:?}: {err}");
    }
    let wrong_dtype = randn(8, &[2, 16, 4, 4], DType::BF16);
    let err = excitation_add_relu(&x, &[(&w, &b)], &w2, &b2, Gate::S, &wrong_dtype, Implementation::Fused)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shortcut") && err.contains("BF16"), "{err}");
}

/// `batch_norm_train_add_relu` is `add_relu(batch_norm_train(x), shortcut)` in one pass: in f32
/// its output, statistics and every gradient (input, γ, β, shortcut) must be the two ops' bit
/// for bit, contiguous and strided; in bf16 see [`assert_bf16_residual_end`]. The reference
/// kernels compose the reference ops.
#[test]
fn batch_norm_train_add_relu_matches_batch_norm_then_add_relu() {
    let values = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    for (i, &[n, c, h, w]) in BATCH_NORM_CASES.iter().enumerate() {
        for (dtype, strided) in [(DType::F32, false), (DType::F32, true), (DType::BF16, true)] {
            let what = format!("{:?} {dtype:?} strided={strided}", [n, c, h, w]);
            let seed = 300 + 10 * i as u64;
            let (xv, x) = input(seed, n, c, h, w, strided, dtype);
            let x = ((x * 3.0).unwrap() + 2.0).unwrap();
            let (gamma, beta) = (var(seed + 1, &[c], dtype), var(seed + 2, &[c], dtype));
            let sv = var(seed + 3, &[n, c, h, w], dtype);
            let (g, b) = (gamma.as_tensor(), beta.as_tensor());
            let fused = batch_norm_train_add_relu(&x, g, b, 1e-5, &sv, Implementation::Fused).unwrap();
            let bn = batch_norm_train(&x, g, b, 1e-5, false, Implementation::Fused).unwrap();
            let composed = add_relu(&bn.output, &sv, Implementation::Fused).unwrap();
            assert_eq!(values(&fused.mean), values(&bn.mean), "{what}: mean");
            assert_eq!(values(&fused.variance), values(&bn.variance), "{what}: variance");
            let (got, want) = (values(&fused.output), values(&composed));
            let probe = randn(seed + 4, &[n, c, h, w], DType::F32);
            let loss = |y: &Tensor| y.to_dtype(DType::F32).unwrap().mul(&probe).unwrap().sum_all().unwrap();
            let (g_got, g_want) = (loss(&fused.output).backward().unwrap(), loss(&composed).backward().unwrap());
            if dtype == DType::F32 {
                assert_eq!(got, want, "{what}: output");
                for (name, t) in [("input", xv.as_tensor()), ("gamma", g), ("beta", b), ("shortcut", sv.as_tensor())] {
                    assert_eq!(
                        values(g_got.get(t).unwrap()),
                        values(g_want.get(t).unwrap()),
                        "{what}: {name} gradient"
                    );
                }
                let vars = [("x", &xv), ("gamma", &gamma), ("beta", &beta), ("shortcut", &sv)];
                assert_fused_matches_reference(&what, &vars, seed + 5, F32_TOL, |imp| {
                    batch_norm_train_add_relu(&x, g, b, 1e-5, &sv, imp).unwrap().output
                });
            } else {
                assert_bf16_residual_end(&what, &got, &want, &probe, g_got.get(&sv).unwrap());
            }
        }
    }
    let x = randn(1, &[2, 3, 4, 4], DType::F32);
    let (g, b) = (randn(2, &[3], DType::F32), randn(3, &[3], DType::F32));
    for imp in Implementation::ALL {
        let err = batch_norm_train_add_relu(&x, &g, &b, 1e-5, &randn(4, &[2, 3, 4, 5], DType::F32), imp).unwrap_err();
        assert!(err.to_string().contains("shortcut ([2, 3, 4, 5]"), "{imp:?}: {err}");
    }
    let err = batch_norm_train_add_relu(&x, &g, &b, 1e-5, &randn(4, &[2, 3, 4, 4], DType::BF16), Implementation::Fused)
        .unwrap_err();
    assert!(err.to_string().contains("BF16"), "{err}");
}

/// A bf16 residual end (`… + shortcut` then ReLU in one op) against the two ops: the output
/// within bf16's rounding (the fused op skips one), and the shortcut's gradient exactly the
/// output gradient `probe` (rounded to bf16) where the fused output is positive. Where
/// `… + shortcut` is within a rounding of 0 the two may clamp differently, and a flipped
/// mask moves a whole plane's input gradient, so the other gradients are left to the f32
/// checks, which compare them bit for bit.
fn assert_bf16_residual_end(what: &str, got: &[f32], want: &[f32], probe: &Tensor, shortcut_grad: &Tensor) {
    let values = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let close = got.iter().zip(want).all(|(a, b)| (a - b).abs() <= 2e-2 + 1e-2 * b.abs());
    assert!(close, "{what}: output");
    let probe = values(&probe.to_dtype(DType::BF16).unwrap());
    let mask: Vec<f32> = got.iter().zip(probe).map(|(&y, p)| if y > 0.0 { p } else { 0.0 }).collect();
    assert_eq!(values(shortcut_grad), mask, "{what}: shortcut gradient");
}

/// (N, C, H, W) cases of a convolution's bias: batch 1, 1×1 planes (layer 4 at 32×32), odd
/// sizes, and planes longer than a vector.
const BIAS_CASES: &[[usize; 4]] = &[[2, 5, 3, 4], [1, 3, 1, 1], [3, 16, 7, 7], [2, 4, 1, 37], [1, 2, 19, 17]];

#[test]
fn channel_bias_fused_matches_reference_forward_and_backward() {
    for (i, &[n, c, h, w]) in BIAS_CASES.iter().enumerate() {
        for strided in [false, true] {
            let what = format!("{:?} strided={strided}", [n, c, h, w]);
            let (xv, x) = input(60 + i as u64, n, c, h, w, strided, DType::F32);
            let b = var(70 + i as u64, &[c], DType::F32);
            assert_fused_matches_reference(&what, &[("x", &xv), ("bias", &b)], 8, F32_TOL, |imp| {
                add_channel_bias(&x, b.as_tensor(), imp).unwrap()
            });
        }
    }
}

/// The bias gradient is the output gradient summed over (N, H, W), by hand in f64; the input
/// gradient is the output gradient itself.
#[test]
fn channel_bias_gradients_match_hand_sums() {
    let [n, c, h, w] = [3, 4, 5, 6];
    let (xv, x) = input(80, n, c, h, w, false, DType::F32);
    let b = var(81, &[c], DType::F32);
    let out = add_channel_bias(&x, b.as_tensor(), Implementation::Fused).unwrap();
    let grads = probe_loss(&out, 82).unwrap().backward().unwrap();
    let probe: Vec<f32> = randn(82, &[n, c, h, w], DType::F32).flatten_all().unwrap().to_vec1().unwrap();
    let by_hand: Vec<f64> = (0..c)
        .map(|ci| {
            (0..n).flat_map(|ni| (0..h * w).map(move |k| (ni * c + ci) * h * w + k)).map(|i| probe[i] as f64).sum()
        })
        .collect();
    let by_hand = Tensor::from_vec(by_hand, c, &Device::Cpu).unwrap();
    assert_close("d/dbias", grads.get(&b).unwrap(), &by_hand, (1e-5, 1e-6));
    let probe = randn(82, &[n, c, h, w], DType::F32);
    assert_close("d/dx", grads.get(&xv).unwrap(), &probe, (0.0, 0.0));
}

/// In bf16 and f16 the forward is the reference's bit for bit (one rounding of the f32 sum),
/// and the bias gradient, summed in f32 and f64, is within the type's rounding of the f32
/// reference on the same values (Candle's own bf16 reduction adds in bf16).
#[test]
fn channel_bias_in_bf16_and_f16_matches_the_reference() {
    for dtype in [DType::BF16, DType::F16] {
        for (i, &[n, c, h, w]) in BIAS_CASES.iter().enumerate() {
            let what = format!("{dtype:?} {:?}", [n, c, h, w]);
            let (xv, x) = input(90 + i as u64, n, c, h, w, false, dtype);
            let b = var(100 + i as u64, &[c], dtype);
            let fused = add_channel_bias(&x, b.as_tensor(), Implementation::Fused).unwrap();
            let reference = add_channel_bias(&x, b.as_tensor(), Implementation::Reference).unwrap();
            assert_close(&format!("{what} forward"), &fused, &reference, (0.0, 0.0));
            let grads = probe_loss(&fused, 9).unwrap().backward().unwrap();
            let wide = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
            let (x32, b32) = (wide(&x), wide(b.as_tensor()));
            let probe = randn(9, &[n, c, h, w], dtype).to_dtype(DType::F32).unwrap();
            let out32 = add_channel_bias(x32.as_tensor(), b32.as_tensor(), Implementation::Reference).unwrap();
            let grads32 = (out32 * probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close(&format!("{what} d/dbias"), grads.get(&b).unwrap(), grads32.get(&b32).unwrap(), BF16_TOL);
            assert_close(&format!("{what} d/dx"), grads.get(&xv).unwrap(), grads32.get(&x32).unwrap(), BF16_TOL);
        }
    }
}

#[test]
fn channel_bias_reference_gradients_match_finite_differences() {
    let (xv, x) = input(11, 2, 3, 2, 3, false, DType::F64);
    let b = var(12, &[3], DType::F64);
    let f = || probe_loss(&add_channel_bias(&x, b.as_tensor(), Implementation::Reference)?, 13);
    check_finite_differences("channel bias x", &xv, &f);
    check_finite_differences("channel bias", &b, &f);
}

#[test]
fn channel_bias_rejects_bad_shapes_and_dtypes() {
    let x = randn(1, &[2, 3, 4, 4], DType::F32);
    for imp in Implementation::ALL {
        let err = |x: &Tensor, b: &Tensor| add_channel_bias(x, b, imp).unwrap_err().to_string();
        assert!(err(&x, &randn(2, &[4], DType::F32)).contains("must be (3)"), "{imp:?}");
        assert!(err(&x, &randn(2, &[3], DType::BF16)).contains("dtype"), "{imp:?}");
        assert!(err(&randn(3, &[2, 3, 16], DType::F32), &randn(2, &[3], DType::F32)).contains("(N, C, H, W)"));
    }
}

/// Values over (−8, 8) with exact ties at 0 and 6 (where `relu6`'s gradient is 0 in both
/// implementations) and a few exactly inside.
fn relu6_input(seed: u64, shape: &[usize], dtype: DType) -> Var {
    let v: Vec<f32> = randn(seed, shape, DType::F32).flatten_all().unwrap().to_vec1().unwrap();
    let ties = [0.0, 6.0, 3.0, -0.0, 5.5];
    let v: Vec<f32> = v.iter().enumerate().map(|(i, x)| if i % 7 == 0 { ties[i / 7 % 5] } else { 8.0 * x }).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap()
}

#[test]
fn relu6_fused_matches_reference_forward_and_backward() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (i, shape) in [&[2, 5, 3, 4][..], &[1, 1, 1, 1], &[3, 70_001], &[9]].iter().enumerate() {
            let x = relu6_input(110 + i as u64, shape, dtype);
            let run = |imp| {
                let y = relu6(&x, imp).unwrap();
                let g = probe_loss(&y, 5).unwrap().backward().unwrap().get(&x).unwrap().clone();
                (y, g)
            };
            let ((y_ref, g_ref), (y, g)) = (run(Implementation::Reference), run(Implementation::Fused));
            // Exact: one comparison and no arithmetic per element.
            assert_close(&format!("{dtype:?} {shape:?} forward"), &y, &y_ref, (0.0, 0.0));
            assert_close(&format!("{dtype:?} {shape:?} d/dx"), &g, &g_ref, (0.0, 0.0));
        }
    }
}

#[test]
fn relu6_matches_hand_computed_values_and_gradients() {
    let x =
        Var::from_tensor(&Tensor::new(&[-1f32, 0.0, 0.5, 6.0, 7.0, 3.0, -0.0, 5.999], &Device::Cpu).unwrap()).unwrap();
    for imp in Implementation::ALL {
        let y = relu6(&x, imp).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [0.0, 0.0, 0.5, 6.0, 6.0, 3.0, 0.0, 5.999], "{imp:?}");
        let g = y.sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0], "{imp:?}");
    }
}

#[test]
fn relu6_reference_gradient_matches_finite_differences() {
    // Away from the kinks: values in (0.5, 5.5) and beyond (−1, 7).
    let v: Vec<f64> = (0..24).map(|i| [-1.5, 0.7, 2.0, 5.2, 6.8, 3.3][i % 6] + 0.01 * i as f64).collect();
    let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, 4), &Device::Cpu).unwrap()).unwrap();
    check_finite_differences("relu6 x", &x, &|| probe_loss(&relu6_reference(&x)?, 3));
}

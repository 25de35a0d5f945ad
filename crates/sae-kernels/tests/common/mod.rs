//! Helpers shared by the kernel tests: seeded random tensors and tolerance checks.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sae_kernels::Implementation;

/// Absolute + relative tolerance for f32 kernels against the f32 reference: the two sum in
/// different orders, so they differ by a few ulps of the largest partial sum.
pub const F32_TOL: (f64, f64) = (2e-5, 2e-4);
/// bf16 has 8 significant bits; both paths round their inputs and output once.
pub const BF16_TOL: (f64, f64) = (2e-2, 2e-2);
/// Finite differences in f64 with step 1e-6 on smooth-enough functions.
pub const FD_TOL: (f64, f64) = (1e-6, 1e-5);

pub fn randn(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

pub fn var(seed: u64, shape: &[usize], dtype: DType) -> Var {
    Var::from_tensor(&randn(seed, shape, dtype)).unwrap()
}

/// Asserts |a − b| ≤ atol + rtol·|b| elementwise, naming the worst element.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, (atol, rtol): (f64, f64)) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a: Vec<f64> = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let ok = (x - y).abs() <= atol + rtol * y.abs().max(scale * 1e-2);
        assert!(ok, "{what}: element {i} differs: {x} vs {y} (max |ref| {scale})");
    }
}

/// Loss `Σ out ⊙ probe` so that every output element gets a distinct gradient.
pub fn probe_loss(out: &Tensor, seed: u64) -> Result<Tensor> {
    let probe = randn(seed, out.dims(), out.dtype());
    (out * probe)?.sum_all()
}

/// Runs `op` with the reference and with the fused implementation and asserts that the outputs
/// agree, and so do the gradients of `probe_loss(output, probe_seed)` for every named variable.
pub fn assert_fused_matches_reference(
    what: &str,
    vars: &[(&str, &Var)],
    probe_seed: u64,
    tol: (f64, f64),
    op: impl Fn(Implementation) -> Tensor,
) {
    let run = |imp| {
        let out = op(imp);
        let grads = probe_loss(&out, probe_seed).unwrap().backward().unwrap();
        (out, grads)
    };
    let (out_ref, g_ref) = run(Implementation::Reference);
    let (out_fused, g_fused) = run(Implementation::Fused);
    assert_close(&format!("{what} forward"), &out_fused, &out_ref, tol);
    for (name, v) in vars {
        assert_close(&format!("{what} d/d{name}"), g_fused.get(v).unwrap(), g_ref.get(v).unwrap(), tol);
    }
}

/// Central finite-difference check of d f / d v for every element of `v` (f64).
pub fn check_finite_differences(what: &str, v: &Var, f: &dyn Fn() -> Result<Tensor>) {
    let loss = f().unwrap();
    let grads = loss.backward().unwrap();
    let analytic: Vec<f64> = grads.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    for (i, &a) in analytic.iter().enumerate() {
        let eval = |delta: f64| -> f64 {
            let mut p = base.clone();
            p[i] += delta;
            v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap()).unwrap();
            f().unwrap().to_scalar::<f64>().unwrap()
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let (atol, rtol) = FD_TOL;
        assert!((numeric - a).abs() <= atol + rtol * a.abs(), "{what}: d/d[{i}] analytic {a} vs numeric {numeric}");
    }
    v.set(&Tensor::from_vec(base, v.shape(), &Device::Cpu).unwrap()).unwrap();
}

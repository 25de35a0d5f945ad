//! The kernel switch end to end: whole networks built with the fused kernels and with the
//! reference compositions give the same logits and the same gradients.
//!
//! The two implementations sum in different orders, so they differ by rounding, and a deep
//! network amplifies rounding by its condition number: ReLU kinks, max-pool ties and
//! cancelling sums (the gradient of a stem BatchNorm's shift adds up 10⁵ terms of both signs)
//! turn a one-ulp difference into a relative change of 1e-3 or more. How much depends on the
//! CPU, because `gemm` blocks its sums by cache size. A fixed relative tolerance therefore
//! passes on one machine and fails on another. So the test measures the conditioning on the
//! machine it runs on: it moves the input by a relative 1e-6 (a few ulps) and records how
//! far each compared quantity moves under each implementation. The fused-vs-reference
//! difference must be within a small multiple of that movement, or of 1e-3 of the quantity's
//! scale, whichever is larger. A quantity too ill-conditioned to compare at all (movement above
//! 10 % of its scale) fails the test rather than silently loosening it: a wrong kernel gives
//! differences of the order of the values themselves, and the test must still see that.
//! The per-op parity tests in `sae-kernels` are the tight ones.

use candle_core::{Device, ModuleT, Tensor};
use sae_models::{config, Implementation, Model, Stem};

/// Relative input perturbation that measures the conditioning.
const PERTURBATION: f64 = 1e-6;
/// Allowed difference as a multiple of the movement under the perturbation.
const NOISE_MULTIPLE: f32 = 4.0;
/// Allowed difference relative to the quantity's scale, whatever the conditioning.
const RELATIVE_FLOOR: f32 = 1e-3;
/// Above this relative movement a quantity cannot be compared meaningfully.
const MAX_RELATIVE_NOISE: f32 = 0.1;

fn images(scale: f64) -> Tensor {
    let v: Vec<f32> = (0..4 * 3 * 64 * 64).map(|i| ((i * 13 % 89) as f32 / 44.0) - 1.0).collect();
    (Tensor::from_vec(v, (4, 3, 64, 64), &Device::Cpu).unwrap() * scale).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Everything compared for one model: (what, value), in a fixed order.
fn quantities(name: &str, stem: Stem, kernels: Implementation, input_scale: f64) -> Vec<(String, Tensor)> {
    // A fresh model each time: a training-mode forward moves the running statistics, which
    // eval mode then reads.
    let build = || {
        let mut cfg = config(name, 10).unwrap();
        cfg.stem = stem;
        cfg.kernels = kernels;
        Model::new(cfg, 11, &Device::Cpu).unwrap()
    };
    let x = images(input_scale);
    let mut out = vec![("train-mode logits".to_string(), build().forward_t(&x, true).unwrap())];
    // Gradients in eval mode: training-mode BatchNorm over a batch of four amplifies rounding
    // a hundredfold more (a 1e-6 input change moves the stem's gradients by about 1 %).
    let model = build();
    let logits = model.forward_t(&x, false).unwrap();
    let labels = Tensor::new(&[3u32, 7, 0, 9], &Device::Cpu).unwrap();
    let grads = candle_nn::loss::cross_entropy(&logits, &labels).unwrap().backward().unwrap();
    out.push(("eval-mode logits".to_string(), logits));
    for (n, var) in model.trainable_vars() {
        out.push((format!("gradient of {n}"), grads.get(&var).unwrap().clone()));
    }
    out
}

#[test]
fn fused_and_reference_kernels_give_the_same_network() {
    // Convolutions, BatchNorm (+ReLU), residual add+ReLU, SE and SaE modules, the stem
    // max-pool, and MobileNet's depthwise convolutions all switch.
    for (name, stem) in
        [("senetv2_resnet14b", Stem::Imagenet), ("seresnet18", Stem::Cifar), ("mobilenet_v1", Stem::Imagenet)]
    {
        let fused = quantities(name, stem, Implementation::Fused, 1.0);
        let reference = quantities(name, stem, Implementation::Reference, 1.0);
        let moved = [
            (&fused, quantities(name, stem, Implementation::Fused, 1.0 + PERTURBATION)),
            (&reference, quantities(name, stem, Implementation::Reference, 1.0 + PERTURBATION)),
            (&reference, quantities(name, stem, Implementation::Reference, 1.0 - PERTURBATION)),
        ];
        for (i, ((what, a), (_, b))) in fused.iter().zip(&reference).enumerate() {
            let noise = moved.iter().map(|(base, m)| max_abs_diff(&base[i].1, &m[i].1)).fold(0.0, f32::max);
            let scale = max_abs(b);
            assert!(
                noise <= MAX_RELATIVE_NOISE * scale,
                "{name}: {what} moves by {noise} (scale {scale}) under a {PERTURBATION} relative input change: \
                 too ill-conditioned to compare implementations"
            );
            let diff = max_abs_diff(a, b);
            let bound = (RELATIVE_FLOOR * scale).max(NOISE_MULTIPLE * noise) + 1e-6;
            assert!(
                diff <= bound,
                "{name}: {what} differs by {diff} between fused and reference (scale {scale}, \
                 movement under input perturbation {noise}, bound {bound})"
            );
        }
    }
}

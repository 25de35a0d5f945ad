//! The kernel switch end to end: whole networks built with the fused kernels and with the
//! reference compositions give the same logits and the same gradients.

use candle_core::{Device, ModuleT, Tensor};
use sae_models::{config, Implementation, Model, Stem};

fn images() -> Tensor {
    let v: Vec<f32> = (0..4 * 3 * 64 * 64).map(|i| ((i * 13 % 89) as f32 / 44.0) - 1.0).collect();
    Tensor::from_vec(v, (4, 3, 64, 64), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn fused_and_reference_kernels_give_the_same_network() {
    // Rounding differs between the two (sums in another order), and training-mode BatchNorm
    // on small batches amplifies it: a 1e-6 relative change of the input moves the stem's
    // gradients by about 1 %. So logits are compared in both modes with a 1e-3 relative
    // tolerance, and gradients in eval mode, where the network is well conditioned.
    // Convolutions, SaE modules, the stem max-pool, and MobileNet's depthwise convolutions
    // all switch.
    for (name, stem) in
        [("senetv2_resnet14b", Stem::Imagenet), ("seresnet18", Stem::Cifar), ("mobilenet_v1", Stem::Imagenet)]
    {
        let build = |kernels| {
            let mut cfg = config(name, 10).unwrap();
            cfg.stem = stem;
            cfg.kernels = kernels;
            Model::new(cfg, 11, &Device::Cpu).unwrap()
        };
        let fused = build(Implementation::Fused);
        let reference = build(Implementation::Reference);
        for train in [true, false] {
            let a = fused.forward_t(&images(), train).unwrap();
            let b = reference.forward_t(&images(), train).unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(
                max_abs_diff(&a, &b) <= 1e-3 * scale.max(1.0),
                "{name} train={train}: logits differ by {} (scale {scale})",
                max_abs_diff(&a, &b)
            );
        }
        // Fresh models: the training-mode forward above moved the running statistics by
        // rounding-level amounts, and eval mode on those amplifies them again.
        let (fused, reference) = (build(Implementation::Fused), build(Implementation::Reference));
        let labels = Tensor::new(&[3u32, 7, 0, 9], &Device::Cpu).unwrap();
        let loss =
            |m: &Model| candle_nn::loss::cross_entropy(&m.forward_t(&images(), false).unwrap(), &labels).unwrap();
        let (ga, gb) = (loss(&fused).backward().unwrap(), loss(&reference).backward().unwrap());
        let (va, vb) = (fused.trainable_vars(), reference.trainable_vars());
        for ((n, a), (_, b)) in va.iter().zip(&vb) {
            let (a, b) = (ga.get(a).unwrap(), gb.get(b).unwrap());
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(
                max_abs_diff(a, b) <= 1e-3 * scale + 1e-6,
                "{name}: gradient of {n} differs by {} (scale {scale})",
                max_abs_diff(a, b)
            );
        }
    }
}

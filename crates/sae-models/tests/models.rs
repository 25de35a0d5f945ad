//! Every registered model runs forward in train and eval mode, backpropagates to every
//! trainable tensor, and keeps BatchNorm running statistics out of the gradient.

use candle_core::{DType, Device, ModuleT, Tensor};
use sae_models::{config, is_running_stat, list, Model, Stem};

fn images(n: usize, size: usize) -> Tensor {
    // A fixed, non-constant pattern: every test sees the same input.
    let len = n * 3 * size * size;
    let v: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    Tensor::from_vec(v, (n, 3, size, size), &Device::Cpu).unwrap()
}

fn all_finite(t: &Tensor) -> bool {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())
}

#[test]
fn every_model_trains_and_evaluates() {
    let x = images(2, 32);
    for name in list() {
        let model = Model::from_name(name, 7, 0, &Device::Cpu).unwrap();
        let running_mean = || model.named_vars()["bn1.running_mean"].to_vec1::<f32>().unwrap();
        let before = running_mean();
        let logits = model.forward_t(&x, true).unwrap();
        assert_eq!(logits.dims(), &[2, 7], "{name} train");
        assert!(all_finite(&logits), "{name} train logits");
        let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        for (var_name, var) in model.named_vars() {
            let g = grads.get(&var);
            if is_running_stat(&var_name) {
                assert!(g.is_none(), "{name}: running statistic {var_name} got a gradient");
            } else {
                let g = g.unwrap_or_else(|| panic!("{name}: {var_name} has no gradient"));
                assert!(all_finite(g), "{name}: gradient of {var_name} not finite");
            }
        }
        // Training mode moved the running statistics of the stem's BatchNorm.
        assert!(before.iter().all(|&v| v == 0.0), "{name}: running mean starts at zero");
        assert!(running_mean().iter().any(|&v| v != 0.0), "{name}: running mean not updated");
        let eval = model.forward_t(&x, false).unwrap();
        assert_eq!(eval.dims(), &[2, 7], "{name} eval");
        assert!(all_finite(&eval), "{name} eval logits");
    }
}

/// The forward without a gradient graph gives the same logits as the differentiable one, in
/// both modes (train mode moving the running statistics the same way), for both network
/// families; and its graph stops at the head: no gradient reaches the stem.
#[test]
fn the_forward_without_a_graph_matches_and_keeps_no_graph() {
    let x = images(2, 32);
    for name in ["senetv2_resnet14b", "mobilenet_v1"] {
        let (with, without) =
            (Model::from_name(name, 5, 3, &Device::Cpu).unwrap(), Model::from_name(name, 5, 3, &Device::Cpu).unwrap());
        for train in [true, false] {
            let a = with.forward_t(&x, train).unwrap().to_vec2::<f32>().unwrap();
            let b = without.forward_without_graph(&x, train).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(a, b, "{name} train={train}");
        }
        let stat = |m: &Model| m.named_vars()["bn1.running_var"].to_vec1::<f32>().unwrap();
        assert_eq!(stat(&with), stat(&without), "{name}: running statistics");
        let logits = without.forward_without_graph(&x, false).unwrap();
        let grads = logits.sum_all().unwrap().backward().unwrap();
        let vars = without.named_vars();
        let (stem, head) = match name {
            "mobilenet_v1" => ("conv_stem.weight", "classifier.weight"),
            _ => ("conv1.weight", "fc.weight"),
        };
        assert!(grads.get(&vars[stem]).is_none(), "{name}: a gradient reached the stem");
        assert!(grads.get(&vars[head]).is_some(), "{name}: the head has no gradient");
    }
}

#[test]
fn eval_mode_is_per_image_and_train_mode_uses_batch_statistics() {
    let model = Model::from_name("senetv2_resnet14b", 5, 3, &Device::Cpu).unwrap();
    let x = images(3, 32);
    let batch = model.forward_t(&x, false).unwrap();
    let single = model.forward_t(&x.narrow(0, 1, 1).unwrap(), false).unwrap();
    let diff = (batch.narrow(0, 1, 1).unwrap() - &single).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "eval output depends on the rest of the batch");
    let train_batch = model.forward_t(&x, true).unwrap();
    let train_pair = model.forward_t(&x.narrow(0, 0, 2).unwrap(), true).unwrap();
    let diff = (train_batch.narrow(0, 1, 1).unwrap() - train_pair.narrow(0, 1, 1).unwrap()).unwrap();
    assert!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4, "train mode ignores batch");
}

#[test]
fn cifar_stem_keeps_resolution_and_counts_macs() {
    let mut cfg = config("resnet18", 10).unwrap();
    let imagenet = Model::new(cfg.clone(), 0, &Device::Cpu).unwrap();
    // ResNet-18 at 224×224 by hand: stem 112²·64·3·49 = 118,013,952; layer1 4 × 56²·64·64·9
    // = 462,422,016; layers 2–4 each 411,041,792 (a strided 3×3, three 3×3, a 1×1
    // downsample); fc 512·10 = 5,120.
    assert_eq!(imagenet.macs(224, 224), 118_013_952 + 462_422_016 + 3 * 411_041_792 + 5_120);
    cfg.stem = Stem::Cifar;
    let cifar = Model::new(cfg, 0, &Device::Cpu).unwrap();
    assert!(cifar.macs(32, 32) > imagenet.macs(32, 32) * 10);
    assert_eq!(cifar.forward_t(&images(2, 8), true).unwrap().dims(), &[2, 10]);
}

/// BatchNorm against a hand calculation with PyTorch's semantics: training mode normalises
/// with the batch's biased variance and moves the running statistics by 0.1 towards the batch
/// mean and the unbiased variance; eval mode uses the running statistics.
#[test]
fn batch_norm_running_statistics_follow_pytorch() {
    use candle_nn::VarMap;
    use sae_models::layers::BatchNorm;
    for kernels in [sae_models::Implementation::Fused, sae_models::Implementation::Reference] {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = BatchNorm::new(1, 1e-5, kernels, vb).unwrap();
        // One channel holding 1, 2, 3, 4: batch mean 2.5, biased variance 1.25, unbiased 5/3.
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap().reshape((2, 1, 1, 2)).unwrap();
        let y: Vec<f32> = bn.forward_t(&x, true).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let inv = 1.0 / (1.25f32 + 1e-5).sqrt();
        for (a, e) in y.iter().zip([-1.5 * inv, -0.5 * inv, 0.5 * inv, 1.5 * inv]) {
            assert!((a - e).abs() < 1e-5, "{kernels}: train output {y:?}");
        }
        let get = |name: &str| varmap.data().lock().unwrap()[name].as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((get("running_mean") - 0.25).abs() < 1e-6, "{kernels}: running mean {}", get("running_mean"));
        assert!((get("running_var") - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6, "{kernels}: running var");
        let eval: Vec<f32> = bn.forward_t(&x, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let rv = (0.9f32 + 0.1 * 5.0 / 3.0 + 1e-5).sqrt();
        assert!((eval[0] - (1.0 - 0.25) / rv).abs() < 1e-5, "{kernels}: eval output {eval:?}");
    }
}

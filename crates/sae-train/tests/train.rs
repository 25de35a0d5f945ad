//! Optimisers and schedules against hand-computed values; training on a small learnable
//! problem written in the CIFAR-10 layout; checkpoints, resume equivalence, the NaN guard and
//! damaged checkpoints.

use candle_core::{DType, Device, Tensor, Var};
use sae_models::{config, Implementation, Precision, Stem};
use sae_train::*;
use std::path::Path;

fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-train-{name}-")).tempdir().unwrap()
}

/// One step of the optimiser on θ with a fixed gradient function; returns θ after each step.
fn run_optimizer(cfg: OptimizerConfig, theta0: f32, grad: impl Fn(f32) -> f32, steps: usize) -> Vec<f32> {
    run_optimizer_with(cfg, Implementation::Fused, theta0, grad, steps)
}

fn run_optimizer_with(
    cfg: OptimizerConfig,
    implementation: Implementation,
    theta0: f32,
    grad: impl Fn(f32) -> f32,
    steps: usize,
) -> Vec<f32> {
    let var = Var::new(&[theta0], &Device::Cpu).unwrap();
    let mut opt = cfg.build(vec![("theta".into(), var.clone())], implementation);
    let mut out = Vec::new();
    for _ in 0..steps {
        let theta = var.to_vec1::<f32>().unwrap()[0];
        // loss = g·θ with g fixed at this θ gives gradient g.
        let g = Tensor::new(&[grad(theta)], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        out.push(var.to_vec1::<f32>().unwrap()[0]);
    }
    out
}

#[test]
fn adam_matches_keras_by_hand() {
    // Gradient 2θ from θ = 1. Step 1: m = 0.1·2 = 0.2, v = 0.001·4 = 0.004,
    // α = 0.001·√0.001/0.1 = 3.16228e-4, θ = 1 − α·0.2/(√0.004 + 1e-7) = 0.999 (to 1e-7).
    for implementation in Implementation::ALL {
        adam_by_hand(&run_optimizer_with(OptimizerConfig::keras_adam(), implementation, 1.0, |x| 2.0 * x, 2));
    }
}

/// AdamW against PyTorch's algorithm (`torch.optim.AdamW`'s documentation) written out in f64:
/// the decay `θ ← θ(1 − lr·wd)` first, then bias-corrected moments with ε added to `√v̂`. A
/// large ε and a small gradient make ε's place matter (Keras's form would miss by ~10 %), and
/// a large decay makes the decay's.
#[test]
fn adamw_matches_pytorch_by_hand() {
    let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-3, 0.1);
    let grad = |x: f64| 0.01 * x + 0.002;
    let (mut theta, mut m, mut v) = (1.0f64, 0.0, 0.0);
    let mut want = Vec::new();
    for t in 1..=4 {
        let g = grad(theta);
        theta *= 1.0 - lr * wd;
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        let (m_hat, v_hat) = (m / (1.0 - b1.powi(t)), v / (1.0 - b2.powi(t)));
        theta -= lr * m_hat / (v_hat.sqrt() + eps);
        want.push(theta);
    }
    let cfg = OptimizerConfig::AdamW { lr, beta1: b1, beta2: b2, eps, weight_decay: wd };
    for implementation in Implementation::ALL {
        let got = run_optimizer_with(cfg.clone(), implementation, 1.0, |x| grad(x as f64) as f32, 4);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{implementation}: {got:?} against {want:?}");
        }
    }
}

fn adam_by_hand(t: &[f32]) {
    let alpha1 = 1e-3 * (1.0f64 - 0.999).sqrt() / (1.0 - 0.9);
    let theta1 = 1.0 - alpha1 * 0.2 / (0.004f64.sqrt() + 1e-7);
    assert!((t[0] as f64 - theta1).abs() < 1e-6, "{} vs {theta1}", t[0]);
    // Step 2 with g = 2θ₁.
    let g2 = 2.0 * theta1;
    let m2 = 0.9 * 0.2 + 0.1 * g2;
    let v2 = 0.999 * 0.004 + 0.001 * g2 * g2;
    let alpha2 = 1e-3 * (1.0f64 - 0.999f64.powi(2)).sqrt() / (1.0 - 0.9f64.powi(2));
    let theta2 = theta1 - alpha2 * m2 / (v2.sqrt() + 1e-7);
    assert!((t[1] as f64 - theta2).abs() < 1e-6, "{} vs {theta2}", t[1]);
}

/// The in-place Adam update against the composition of Candle ops, on a tensor large enough to
/// be split across threads, over several steps with changing gradients.
#[test]
fn fused_adam_matches_the_reference_on_many_elements() {
    let n = 50_000;
    let init: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0).collect();
    let run = |implementation| {
        let var = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let mut opt = OptimizerConfig::keras_adam().build(vec![("w".into(), var.clone())], implementation);
        for step in 0..4 {
            // loss = Σ (w − target)² / 2 with a target that moves each step.
            let target = Tensor::new(&[step as f32 * 0.1], &Device::Cpu).unwrap();
            let loss =
                (var.as_tensor().broadcast_sub(&target).unwrap().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let state = opt.state_tensors().unwrap();
        let flat = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        [flat(var.as_tensor()), flat(&state["w.m"]), flat(&state["w.v"])]
    };
    let (fused, reference) = (run(Implementation::Fused), run(Implementation::Reference));
    for (what, (a, b)) in ["weights", "first moment", "second moment"].iter().zip(fused.iter().zip(&reference)) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-6 + 1e-5 * y.abs(), "{what}[{i}]: fused {x} vs reference {y}");
        }
    }
}

/// An optimiser's state file (what checkpoints write: Adam's interleaved moments straight from
/// its own memory, the reference's moment tensors, SGD's momentum) holds bit for bit what
/// `state_tensors` gives, with the variables' shapes.
#[test]
fn saved_optimiser_state_is_the_state() {
    let configs = [
        (OptimizerConfig::keras_adam(), Implementation::Fused),
        (OptimizerConfig::keras_adam(), Implementation::Reference),
        (
            OptimizerConfig::Sgd { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 0.0, decoupled: false },
            Implementation::Fused,
        ),
    ];
    for (cfg, implementation) in configs {
        let values =
            |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * seed % 997) as f32 / 500.0) - 1.0).collect() };
        let w = Var::from_tensor(&Tensor::from_vec(values(60, 7919), (5, 3, 2, 2), &Device::Cpu).unwrap()).unwrap();
        let b = Var::new(values(7, 104_729).as_slice(), &Device::Cpu).unwrap();
        let mut opt = cfg.build(vec![("w".into(), w.clone()), ("b".into(), b.clone())], implementation);
        for _ in 0..3 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap()
                + b.as_tensor().exp().unwrap().sum_all().unwrap())
            .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let dir = tmp("optimiser-state");
        let path = dir.path().join("optimizer.safetensors");
        opt.save_state(&path).unwrap();
        let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let state = opt.state_tensors().unwrap();
        let mut names: Vec<&String> = saved.keys().collect();
        names.sort();
        assert_eq!(names, state.keys().collect::<Vec<_>>(), "{cfg:?} {implementation:?}");
        for (name, expected) in &state {
            let got = &saved[name];
            assert_eq!(got.dims(), expected.dims(), "{name}");
            let bits = |t: &Tensor| {
                t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
            };
            assert_eq!(bits(got), bits(expected), "{name} of {cfg:?} {implementation:?}");
        }
        assert!(state.contains_key("w.m"), "{cfg:?} has a first moment or momentum for w");
    }
}

/// The optimiser runs exactly the Adam update its kernel switch names: bit for bit the fused
/// kernel or the Candle composition. The two round differently, so the test tells them apart.
#[test]
fn adam_runs_the_update_its_kernel_switch_names() {
    let n = 10_000;
    let init: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0).collect();
    let grad: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 3001) as f32 / 1500.0) - 1.0).collect();
    let g = Tensor::new(grad.as_slice(), &Device::Cpu).unwrap();
    let via_optimizer = |implementation| {
        let var = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let mut opt = OptimizerConfig::keras_adam().build(vec![("w".into(), var.clone())], implementation);
        for _ in 0..3 {
            // loss = Σ w·g has gradient g.
            let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        var.to_vec1::<f32>().unwrap()
    };
    let direct = |implementation| {
        let theta = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let zeros = || Var::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        let (m, v) = (zeros(), zeros());
        for t in 1..=3 {
            let alpha = 1e-3 * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
            let step = sae_kernels::AdamStep::adam(0.9, 0.999, 1e-7, alpha);
            match implementation {
                Implementation::Reference => sae_kernels::adam_update_reference(&theta, &g, &m, &v, step),
                Implementation::Fused => sae_kernels::adam_update(&theta, &g, &m, &v, step, Implementation::Fused),
            }
            .unwrap();
        }
        theta.to_vec1::<f32>().unwrap()
    };
    for implementation in Implementation::ALL {
        assert!(via_optimizer(implementation) == direct(implementation), "{implementation}: another update ran");
    }
    assert!(
        direct(Implementation::Reference) != direct(Implementation::Fused),
        "the implementations are not told apart"
    );
}

#[test]
fn sgd_variants_match_pytorch_by_hand() {
    let sgd = |momentum, nesterov, weight_decay, decoupled| OptimizerConfig::Sgd {
        lr: 0.1,
        momentum,
        nesterov,
        weight_decay,
        decoupled,
    };
    // Constant gradient 1, momentum 0.9: buffers 1, 1.9, 2.71; θ = 1 − 0.1·(1, 2.9, 5.61).
    let t = run_optimizer(sgd(0.9, false, 0.0, false), 1.0, |_| 1.0, 3);
    for (got, want) in t.iter().zip([0.9, 0.71, 0.439]) {
        assert!((got - want).abs() < 1e-6, "{t:?}");
    }
    // Nesterov: steps g + μ·b = 1.9, 2.71 → θ = 0.81, 0.539.
    let t = run_optimizer(sgd(0.9, true, 0.0, false), 1.0, |_| 1.0, 2);
    assert!((t[0] - 0.81).abs() < 1e-6 && (t[1] - 0.539).abs() < 1e-6, "{t:?}");
    // L2 decay 0.5, no momentum, zero gradient: θ ← θ − 0.1·0.5·θ = 0.95θ.
    let t = run_optimizer(sgd(0.0, false, 0.5, false), 2.0, |_| 0.0, 2);
    assert!((t[0] - 1.9).abs() < 1e-6 && (t[1] - 1.805).abs() < 1e-6, "{t:?}");
    // Decoupled decay with momentum: the decay bypasses the buffer. g = 1: θ = 2 − 0.1 − 0.1·0.5·2 = 1.8.
    let t = run_optimizer(sgd(0.9, false, 0.5, true), 2.0, |_| 1.0, 1);
    assert!((t[0] - 1.8).abs() < 1e-6, "{t:?}");
}

#[test]
fn schedules_match_their_formulas() {
    assert_eq!(Schedule::Constant.lr(0.01, 33.0), 0.01);
    let step = Schedule::Step { every: 15, gamma: 0.1 };
    assert_eq!(step.lr(0.01, 14.9), 0.01);
    assert!((step.lr(0.01, 15.0) - 0.001).abs() < 1e-12);
    assert!((step.lr(0.01, 45.5) - 1e-5).abs() < 1e-15);
    let cos = Schedule::Cosine { warmup_epochs: 2.0, total_epochs: 12.0, min_lr: 0.0 };
    assert!((cos.lr(1.0, 1.0) - 0.5).abs() < 1e-12);
    assert!((cos.lr(1.0, 2.0) - 1.0).abs() < 1e-12);
    assert!((cos.lr(1.0, 7.0) - 0.5).abs() < 1e-12);
    assert!(cos.lr(1.0, 12.0).abs() < 1e-12);
}

/// After a training step's backward pass every weight's gradient holds its own memory and no
/// more (with data parallelism, gradient accumulation or clipping they live until the
/// optimiser step): in f32 the fused SE/SaE ops' packed-weight
/// gradient was once kept whole by its first piece (19 MiB of SENetV2-ResNet-50's), and the
/// fused BatchNorm returns its gradients as views of one buffer.
#[test]
fn weight_gradients_hold_only_their_own_memory() {
    let dev = Device::Cpu;
    for name in ["senetv2_resnet14b", "seresnet14b"] {
        let model = sae_models::Model::from_name(name, 10, 1, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
        let labels = Tensor::new(&[1u32, 7], &dev).unwrap();
        let forward = |x: &Tensor| candle_core::ModuleT::forward_t(&model, x, true);
        let grads = forward_loss(forward, &x, &labels, None, 0.0, 1).unwrap().2.backward_consuming().unwrap();
        for (var_name, var) in model.trainable_vars() {
            let g = grads.get(&var).unwrap_or_else(|| panic!("{name}: {var_name} has no gradient"));
            let (storage, _) = g.storage_and_layout();
            let len = match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.len(),
                other => panic!("{name}: {var_name}'s gradient is not f32 on the CPU: {:?}", other.dtype()),
            };
            assert_eq!(len, g.elem_count(), "{name}: {var_name}'s gradient holds a larger buffer");
        }
    }
}

/// `backward_with_step` (each variable updated during the backward pass, as `sae train` does
/// in one process) leaves weights and optimiser state bit for bit where the backward pass
/// followed by `Optimizer::step` leaves them, over three steps of real models in f32 and
/// bf16, for Adam (both kernel switches) and SGD: it fails if any layer's backward read a
/// weight after that weight had been updated.
#[test]
fn updating_during_the_backward_pass_equals_a_step_after_it() {
    let dev = Device::Cpu;
    let sgd = OptimizerConfig::Sgd { lr: 0.01, momentum: 0.9, nesterov: true, weight_decay: 1e-3, decoupled: false };
    let optimizers = [
        (OptimizerConfig::keras_adam(), Implementation::Fused),
        (OptimizerConfig::keras_adam(), Implementation::Reference),
        (sgd, Implementation::Fused),
    ];
    let x = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &dev).unwrap();
    let labels = Tensor::new(&[1u32, 7], &dev).unwrap();
    for name in ["senetv2_resnet14b", "seresnet14b", "mobilenet_v1"] {
        for precision in [Precision::F32, Precision::Bf16] {
            for (opt_cfg, implementation) in &optimizers {
                if precision == Precision::Bf16 && *implementation == Implementation::Reference {
                    continue; // Candle's own CPU matmul has no bf16.
                }
                let build = || {
                    let mut cfg = config(name, 10).unwrap();
                    cfg.kernels = *implementation;
                    // With its ImageNet stem (the last layers at 1×1 here) MobileNet reaches
                    // NaN within these three SGD steps; the CIFAR stem keeps it finite.
                    cfg.stem = Stem::Cifar;
                    let mut model = sae_models::Model::new(cfg, 3, &dev).unwrap();
                    model.set_precision(precision);
                    let opt = opt_cfg.build(model.trainable_vars(), *implementation);
                    (model, opt)
                };
                let ((after, mut after_opt), (during, mut during_opt)) = (build(), build());
                for _ in 0..3 {
                    let loss = |model: &sae_models::Model| {
                        let forward = |x: &Tensor| candle_core::ModuleT::forward_t(model, x, true);
                        forward_loss(forward, &x, &labels, None, 0.1, 1).unwrap().2
                    };
                    after_opt.step(&loss(&after).backward_consuming().unwrap()).unwrap();
                    let left = backward_with_step(loss(&during), during_opt.as_mut()).unwrap();
                    for (var_name, var) in during.trainable_vars() {
                        assert!(left.get(&var).is_none(), "{name}: the optimiser did not take {var_name}'s gradient");
                    }
                }
                let what = format!("{name} {precision:?} {opt_cfg:?} {implementation:?}");
                let values =
                    |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let bits = |t: &Tensor| values(t).into_iter().map(f32::to_bits).collect::<Vec<_>>();
                for ((var_name, a), (_, b)) in after.trainable_vars().iter().zip(during.trainable_vars()) {
                    assert!(values(a.as_tensor()).iter().all(|v| v.is_finite()), "{what}: {var_name} not finite");
                    assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "{what}: {var_name} differs");
                }
                let (a, b) = (after_opt.state_tensors().unwrap(), during_opt.state_tensors().unwrap());
                assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}");
                for (key, t) in &a {
                    if key != "step" {
                        assert_eq!(bits(t), bits(&b[key]), "{what}: optimiser state {key} differs");
                    }
                }
                assert_eq!(after_opt.steps(), 3);
                assert_eq!(during_opt.steps(), 3);
            }
        }
    }
}

/// `sae train` updates during the backward pass (with accumulation, during the last batch's);
/// with a gradient clip it takes the step after it. A clip that never binds must not change a
/// thing: the same weights, bit for bit, and the same summaries.
#[test]
fn training_with_the_update_in_the_backward_pass_equals_the_separate_step() {
    let data = tmp("in-backward-data");
    let data = data.path();
    write_colour_dataset(data, 4, 2);
    // Each batch a step, and three batches a step (the sum over the earlier ones added to
    // during their passes; 40 images in batches of 10: a step of one batch ends the epoch).
    for accumulate in [1, 3] {
        let runs = [tmp("in-backward"), tmp("separate-step")];
        let mut histories = Vec::new();
        for (run, clip) in runs.iter().zip([None, Some(1e30)]) {
            let mut cfg = small_config("senetv2_resnet14b", data, 1);
            cfg.steps.clip_grad_norm = clip;
            cfg.steps.accumulate = accumulate;
            histories.push(train(&cfg, run.path(), &Device::Cpu, false, &mut LogLines::default()).unwrap());
        }
        let what = format!("accumulating {accumulate}");
        let same = checkpoint_model_bytes(runs[0].path()) == checkpoint_model_bytes(runs[1].path());
        assert!(same, "{what}: the weights differ");
        assert_same_rows(&histories[0], &histories[1]);
    }
}

/// A learnable CIFAR-10-layout problem: class k is a colour (a ramp of hue) plus noise.
fn write_colour_dataset(dir: &Path, train_per_class: usize, test_per_class: usize) {
    let mut state = 12345u64;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 60) as i32 - 30
    };
    let mut record = |label: usize| -> Vec<u8> {
        let base = [(label * 25) as i32, (255 - label * 25) as i32, ((label * 70) % 256) as i32];
        let mut r = vec![label as u8];
        for b in base {
            r.extend((0..1024).map(|_| (b + noise()).clamp(0, 255) as u8));
        }
        r
    };
    let files = ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
    for (f, name) in files.iter().enumerate() {
        let bytes: Vec<u8> = (0..train_per_class * 10 / 5).flat_map(|i| record((i + f) % 10)).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let bytes: Vec<u8> = (0..test_per_class * 10).flat_map(|i| record(i % 10)).collect();
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
    std::fs::write(dir.join("batches.meta.txt"), (0..10).map(|k| format!("colour{k}\n")).collect::<String>()).unwrap();
}

fn small_config(model: &str, data: &Path, epochs: usize) -> TrainConfig {
    let mut m = config(model, 10).unwrap();
    m.stem = Stem::Imagenet;
    TrainConfig {
        model: m,
        data: DataConfig {
            dataset: DatasetKind::Cifar10,
            dir: data.to_path_buf(),
            // Colour is all there is to learn; 16×16 keeps the tests fast.
            input_size: 16,
            train_images: None,
            eval_images: None,
            val_fraction: None,
        },
        optimizer: OptimizerConfig::keras_adam(),
        schedule: Schedule::Constant,
        epochs,
        batch_size: 10,
        seed: 1,
        label_smoothing: 0.0,
        steps: Default::default(),
        augment: Default::default(),
        precision: Default::default(),
    }
}

#[test]
fn resnet_senetv2_and_mobilenet_learn_a_small_problem() {
    let data = tmp("learn-data");
    let data = data.path();
    write_colour_dataset(data, 8, 5);
    for model in ["resnet14b", "senetv2_resnet14b", "mobilenet_v1"] {
        let run = tmp(&format!("learn-{model}"));
        let run = run.path();
        // 80 training images, batch 8, 20 epochs: 200 steps.
        let mut cfg = TrainConfig { batch_size: 8, ..small_config(model, data, 20) };
        if model == "mobilenet_v1" {
            // MobileNet's total stride of 32 would leave nothing of a 16×16 input to look at
            // after its stride-2 stem; the CIFAR stem keeps 1×1 at the end.
            cfg.model.stem = Stem::Cifar;
        }
        let history = train(&cfg, run, &Device::Cpu, false, &mut LogLines::default()).unwrap();
        let late = &history[15..];
        let best_late_loss = late.iter().map(|s| s.train_loss).fold(f64::INFINITY, f64::min);
        assert!(best_late_loss < 0.75 * history[0].train_loss, "{model}: loss did not fall: {history:?}");
        // Chance is 10 %; small-batch BatchNorm makes single evaluations noisy, so the best of
        // the last five epochs is compared.
        let best_late = late.iter().map(|s| s.eval_top1).fold(0.0, f64::max);
        assert!(best_late >= 60.0, "{model}: eval top-1 at most {best_late} in epochs 16-20");
        assert_same_rows(&read_summary(run).unwrap(), &history);
        let cfg = TrainConfig::read(run).unwrap();
        assert_eq!(cfg.model.name, model);
    }
}

/// Rows equal up to the precision `summary.csv` stores (resumed runs read earlier rows back).
fn assert_same_rows(a: &[EpochSummary], b: &[EpochSummary]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.epoch, y.epoch);
        for (u, v) in [
            (x.train_loss, y.train_loss),
            (x.train_top1, y.train_top1),
            (x.eval_loss, y.eval_loss),
            (x.eval_top1, y.eval_top1),
            (x.eval_top5, y.eval_top5),
        ] {
            assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "{x:?} vs {y:?}");
        }
    }
}

fn checkpoint_model_bytes(run: &Path) -> Vec<u8> {
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/last.json")).unwrap()).unwrap();
    std::fs::read(run.join("checkpoints").join(last["dir"].as_str().unwrap()).join("model.safetensors")).unwrap()
}

#[test]
fn resuming_gives_the_same_result_as_not_stopping() {
    let data = tmp("resume-data");
    let data = data.path();
    write_colour_dataset(data, 4, 2);
    let straight = tmp("resume-straight");
    let straight = straight.path();
    let cfg = small_config("senetv2_resnet14b", data, 2);
    let full = train(&cfg, straight, &Device::Cpu, false, &mut LogLines::default()).unwrap();
    let stopped = tmp("resume-stopped");
    let stopped = stopped.path();
    train(&small_config("senetv2_resnet14b", data, 1), stopped, &Device::Cpu, false, &mut LogLines::default()).unwrap();
    let resumed = train(&cfg, stopped, &Device::Cpu, true, &mut LogLines::default()).unwrap();
    assert_eq!(resumed.len(), 2);
    assert_eq!(checkpoint_model_bytes(straight), checkpoint_model_bytes(stopped), "weights differ after resume");
    assert_same_rows(&full, &resumed);
    // Only the last and the best checkpoints are kept.
    let kept: Vec<String> = std::fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("epoch-"))
        .collect();
    assert!(kept.len() <= 2 && kept.contains(&"epoch-0002".to_string()), "{kept:?}");

    // A second fresh run into the same directory is refused; a resume with another model is too.
    let err = train(&cfg, straight, &Device::Cpu, false, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("already holds a run"), "{err}");
    let other = small_config("seresnet14b", data, 3);
    let err = train(&other, straight, &Device::Cpu, true, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("different config"), "{err}");
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let data = tmp("nan-data");
    let data = data.path();
    write_colour_dataset(data, 4, 2);
    let run = tmp("nan-run");
    let run = run.path();
    let mut cfg = small_config("resnet14b", data, 3);
    // Epoch 1 at 1e-3; from epoch 2 the rate is 1e27, which overflows the weights.
    cfg.schedule = Schedule::Step { every: 1, gamma: 1e30 };
    let err = train(&cfg, run, &Device::Cpu, false, &mut LogLines::default()).unwrap_err();
    assert!(matches!(err, Error::NonFiniteLoss { epoch: 1, .. }), "{err}");
    assert!(err.to_string().contains("last good checkpoint"), "{err}");
    assert_eq!(read_summary(run).unwrap().len(), 1);
    let last = std::fs::read_to_string(run.join("checkpoints/last.json")).unwrap();
    assert!(last.contains("epoch-0001"), "{last}");
    // The kept checkpoint loads and is finite.
    let model = sae_models::Model::new(cfg.model.clone(), 0, &Device::Cpu).unwrap();
    model.load_weights(&run.join("checkpoints/epoch-0001/model.safetensors")).unwrap();
    for (name, v) in model.named_vars() {
        let s = v.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite(), "{name} not finite in the kept checkpoint");
    }
}

#[test]
fn damaged_checkpoints_give_clear_errors() {
    let data = tmp("damaged-data");
    let data = data.path();
    write_colour_dataset(data, 4, 2);
    let run = tmp("damaged-run");
    let run = run.path();
    let cfg = small_config("mobilenet_v1", data, 1);
    train(&cfg, run, &Device::Cpu, false, &mut LogLines::default()).unwrap();
    let ckpt = run.join("checkpoints/epoch-0001");
    let model_file = ckpt.join("model.safetensors");
    let good = std::fs::read(&model_file).unwrap();
    std::fs::write(&model_file, &good[..good.len() / 3]).unwrap();
    let longer = TrainConfig { epochs: 2, ..cfg.clone() };
    let err = train(&longer, run, &Device::Cpu, true, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors"), "{err}");
    std::fs::write(&model_file, &good).unwrap();
    std::fs::write(ckpt.join("state.json"), "{ not json").unwrap();
    let err = train(&longer, run, &Device::Cpu, true, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("epoch-0001") && err.contains("state.json"), "{err}");
    std::fs::write(ckpt.join("state.json"), r#"{"epoch":1,"step":1,"best_top1":0.0,"best_epoch":1}"#).unwrap();
    // The optimiser's state is read tensor by tensor: a truncated file is caught at its header.
    let opt_file = ckpt.join("optimizer.safetensors");
    let good = std::fs::read(&opt_file).unwrap();
    std::fs::write(&opt_file, &good[..good.len() - 4]).unwrap();
    let err = train(&longer, run, &Device::Cpu, true, &mut LogLines::default()).unwrap_err().to_string();
    assert!(
        err.contains("optimizer.safetensors")
            && err.contains("not a valid safetensors")
            && err.contains("the file holds"),
        "{err}"
    );
    std::fs::remove_file(&opt_file).unwrap();
    let err = train(&longer, run, &Device::Cpu, true, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("optimizer.safetensors"), "{err}");
}

/// Stops the run (as a kill would) by panicking after `after` training batches.
struct KillAfter {
    after: usize,
    seen: usize,
}

impl Progress for KillAfter {
    fn epoch_start(&mut self, _: usize, _: usize) {}
    fn batch(&mut self, _: f64, _: f64, _: f64) {
        self.seen += 1;
        if self.seen == self.after {
            panic!("killed");
        }
    }
    fn epoch_end(&mut self, _: &EpochSummary) {}
}

#[test]
fn a_run_killed_mid_epoch_resumes_from_its_last_step_checkpoint_with_the_same_result() {
    let data = tmp("kill-data");
    let data = data.path();
    write_colour_dataset(data, 4, 2);
    // 40 images, batch 4: 10 batches per epoch; 2 batches per step, a checkpoint every 2 steps,
    // clipping, a weight average, BatchNorm recalibration, the augmentation policy and mixing,
    // so that every piece of state and randomness must survive the restart.
    let mut cfg = TrainConfig { batch_size: 4, ..small_config("seresnet14b", data, 2) };
    cfg.steps = StepConfig {
        accumulate: 2,
        clip_grad_norm: Some(0.5),
        ema_decay: Some(0.9),
        checkpoint_every: Some(2),
        init: None,
        recalibrate_bn: 2,
        sync_bn: false,
    };
    cfg.augment = AugmentConfig { trivial_augment: true, mixup_alpha: 0.4, cutmix_alpha: 1.0, ..Default::default() };
    let straight = tmp("kill-straight");
    let straight = straight.path();
    let full = train(&cfg, straight, &Device::Cpu, false, &mut LogLines::default()).unwrap();
    let killed = tmp("kill-killed");
    let killed = killed.path();
    // Killed in epoch 2 after its 8th batch: the last checkpoint is after its 6th (step 5 + 3),
    // and step 9 (its 7th and 8th batches) was trained and logged after it.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train(&cfg, killed, &Device::Cpu, false, &mut KillAfter { after: 18, seen: 0 })
    }));
    assert!(outcome.is_err(), "the run was not killed");
    let last = std::fs::read_to_string(killed.join("checkpoints/last.json")).unwrap();
    assert!(last.contains("epoch-0001-batch-000006"), "{last}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(killed.join("checkpoints/epoch-0001-batch-000006/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!((state["epoch"].as_u64(), state["batch"].as_u64(), state["step"].as_u64()), (Some(1), Some(6), Some(8)));
    let resumed = train(&cfg, killed, &Device::Cpu, true, &mut LogLines::default()).unwrap();
    assert_eq!(checkpoint_model_bytes(straight), checkpoint_model_bytes(killed), "weights differ after resume");
    let ema = |run: &Path| std::fs::read(run.join("checkpoints/epoch-0002/ema.safetensors")).unwrap();
    assert_eq!(ema(straight), ema(killed), "weight averages differ after resume");
    assert_same_rows(&full, &resumed);
    // TensorBoard: the resume's file starts at step 9, which the killed opening logged too; as
    // TensorBoard keeps the later file's steps from there on, the run shows the uninterrupted
    // run's steps, each once, with the same values.
    let files = tensorboard_files(killed);
    assert_eq!(files.len(), 2);
    assert!(files[0].iter().any(|e| matches!(e, Logged::Scalars(9, v) if v[0].0 == "step/train_loss")));
    assert_eq!(files[1][1], Logged::Start(9));
    assert_eq!(step_losses(killed), step_losses(straight));
    assert_eq!(step_losses(straight).iter().map(|(step, _)| *step).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    if let Some(read) = tensorboard_reads(killed) {
        let points = read["step/train_loss"].as_array().unwrap();
        let want = step_losses(straight);
        assert_eq!(points.len(), want.len(), "{points:?}");
        for (p, (step, loss)) in points.iter().zip(&want) {
            assert_eq!((p[0].as_u64(), p[1].as_f64().map(|v| v as f32)), (Some(*step), Some(*loss)));
        }
    }
    // Killed within the first epoch, before any summary was written, it resumes too.
    let early = tmp("kill-early");
    let early = early.path();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train(&cfg, early, &Device::Cpu, false, &mut KillAfter { after: 5, seen: 0 })
    }));
    assert!(outcome.is_err() && !early.join("summary.csv").exists());
    let resumed = train(&cfg, early, &Device::Cpu, true, &mut LogLines::default()).unwrap();
    assert_eq!(checkpoint_model_bytes(straight), checkpoint_model_bytes(early), "weights differ after resume");
    assert_same_rows(&full, &resumed);
    // Five steps per epoch (ten batches, two per step).
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("checkpoints/epoch-0002/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"].as_u64(), Some(10));
}

#[test]
fn init_weights_fine_tune_with_a_new_head() {
    let data = tmp("init-data");
    let data = data.path();
    write_colour_dataset(data, 2, 1);
    let source = sae_models::Model::new(config("resnet14b", 7).unwrap(), 9, &Device::Cpu).unwrap();
    let weights = data.join("pretrained.safetensors");
    source.save(&weights).unwrap();
    let mut cfg = small_config("resnet14b", data, 1);
    cfg.model.stem = source.config().stem;
    cfg.optimizer =
        OptimizerConfig::Sgd { lr: 0.0, momentum: 0.0, nesterov: false, weight_decay: 0.0, decoupled: false };
    cfg.steps.init = Some(weights.clone());
    let run = tmp("init-run");
    let run = run.path();
    train(&cfg, run, &Device::Cpu, false, &mut LogLines::default()).unwrap();
    let trained = sae_models::Model::new(cfg.model.clone(), 0, &Device::Cpu).unwrap();
    trained.load_weights(&run.join("checkpoints/epoch-0001/model.safetensors")).unwrap();
    let (a, b) = (source.named_vars(), trained.named_vars());
    // With a zero learning rate the backbone is the source's; the 10-class head is new.
    let values = |v: &candle_core::Var| v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(values(&a["layer3.0.conv2.weight"]), values(&b["layer3.0.conv2.weight"]));
    assert_eq!(b["fc.weight"].dims(), &[10, 2048]);
    // A backbone of another shape is refused, naming the tensor.
    let other = sae_models::Model::new(config("resnet18", 7).unwrap(), 9, &Device::Cpu).unwrap();
    other.save(&weights).unwrap();
    let bad_run = tmp("init-bad");
    let bad_run = bad_run.path();
    let err = train(&cfg, bad_run, &Device::Cpu, false, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("pretrained.safetensors") && err.contains("layer1.1"), "{err}");
    assert!(!bad_run.join("config.json").exists(), "a failed start leaves no run behind");
}

/// A plain ResNet's weights start a SENetV2: the backbone is the ResNet's, the SaE modules keep
/// the seeded initialisation of the run. An SE-ResNet's weights are refused for it (their SE
/// layers are not SaE's).
#[test]
fn init_from_a_plain_resnet_starts_the_excitation_fresh() {
    let data = tmp("init-plain-data");
    let data = data.path();
    write_colour_dataset(data, 2, 1);
    let source = sae_models::Model::new(config("resnet14b", 7).unwrap(), 9, &Device::Cpu).unwrap();
    let weights = data.join("resnet.safetensors");
    source.save(&weights).unwrap();
    let mut cfg = small_config("senetv2_resnet14b", data, 1);
    cfg.model.stem = source.config().stem;
    cfg.optimizer =
        OptimizerConfig::Sgd { lr: 0.0, momentum: 0.0, nesterov: false, weight_decay: 0.0, decoupled: false };
    cfg.steps.init = Some(weights.clone());
    let run = tmp("init-plain-run");
    let run = run.path();
    train(&cfg, run, &Device::Cpu, false, &mut LogLines::default()).unwrap();
    let trained = sae_models::Model::new(cfg.model.clone(), 0, &Device::Cpu).unwrap();
    trained.load_weights(&run.join("checkpoints/epoch-0001/model.safetensors")).unwrap();
    let seeded = sae_models::Model::new(cfg.model.clone(), cfg.seed, &Device::Cpu).unwrap();
    let values = |v: &candle_core::Var| v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (from, got, fresh) = (source.named_vars(), trained.named_vars(), seeded.named_vars());
    assert_eq!(values(&got["layer2.0.conv1.weight"]), values(&from["layer2.0.conv1.weight"]));
    for name in ["layer2.0.se.fc1.3.weight", "layer4.0.se.fc2.bias"] {
        assert_eq!(values(&got[name]), values(&fresh[name]), "{name}");
    }
    let se = sae_models::Model::new(config("seresnet14b", 7).unwrap(), 9, &Device::Cpu).unwrap();
    se.save(&weights).unwrap();
    let err = train(&cfg, &tmp("init-se-run").path().join("run"), &Device::Cpu, false, &mut LogLines::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("unexpected tensor \"layer1.0.se.fc1.bias\""), "{err}");
}

/// Data that cannot be read, or whose classes are not the model's outputs, stops a run before
/// it writes anything: the same command with the data mended then starts it.
#[test]
fn unreadable_or_mismatched_data_leaves_no_run_behind() {
    let data = tmp("bad-data");
    let data = data.path();
    write_colour_dataset(data, 2, 1);
    let run = tmp("bad-data-run");
    let run = run.path().join("run");
    let mut cfg = small_config("resnet14b", data, 1);
    std::fs::rename(data.join("data_batch_3.bin"), data.join("kept.bin")).unwrap();
    let err = train(&cfg, &run, &Device::Cpu, false, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("data_batch_3.bin"), "{err}");
    assert!(!run.exists(), "unreadable data leaves no run behind");
    std::fs::rename(data.join("kept.bin"), data.join("data_batch_3.bin")).unwrap();
    cfg.model.num_classes = 7;
    let err = train(&cfg, &run, &Device::Cpu, false, &mut LogLines::default()).unwrap_err().to_string();
    assert!(err.contains("the dataset has 10 classes but the model has 7 outputs"), "{err}");
    assert!(!run.exists(), "a class mismatch leaves no run behind");
    cfg.model.num_classes = 10;
    train(&cfg, &run, &Device::Cpu, false, &mut LogLines::default()).unwrap();
}

/// bf16 mixed precision learns what f32 learns: the same short run (fixed data, seed and
/// batch order) in both precisions ends within 1 point of top-1, and the run records which
/// precision ran.
#[test]
fn bf16_run_ends_within_one_point_of_the_f32_run() {
    let data = tmp("bf16-data");
    let data = data.path();
    write_colour_dataset(data, 40, 20);
    let mut accuracy = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let run = tmp(&format!("bf16-{precision}"));
        let run = run.path();
        let mut cfg = TrainConfig { batch_size: 20, precision, ..small_config("resnet14b", data, 8) };
        // Evaluation-mode BatchNorm after a few steps swings by tens of points between epochs
        // (one image is 0.5 point here); statistics recalibrated to the final weights do not.
        cfg.steps.recalibrate_bn = 20;
        let history = train(&cfg, run, &Device::Cpu, false, &mut LogLines::default()).unwrap();
        accuracy.push(history.last().unwrap().eval_top1);
        assert_eq!(TrainConfig::read(run).unwrap().precision, precision);
        let log = std::fs::read_to_string(run.join("train.log")).unwrap();
        assert!(log.starts_with(&format!("# run started at epoch 0: precision {}", precision.describe(&Device::Cpu))));
    }
    let [f32_top1, bf16_top1] = accuracy[..] else { unreachable!() };
    assert!(f32_top1 >= 90.0, "the f32 run did not learn the problem: {f32_top1} %");
    assert!((bf16_top1 - f32_top1).abs() <= 1.0, "bf16 ended at {bf16_top1} %, f32 at {f32_top1} %");
}

/// What an event of a run's TensorBoard files holds, decoded here apart from the writer.
#[derive(Debug, PartialEq)]
enum Logged {
    Version,
    /// A `SessionLog` START at this step.
    Start(u64),
    /// Scalars (tag, value) at this step.
    Scalars(u64, Vec<(String, f32)>),
}

/// The protobuf fields of `bytes`: (number, varint value or bytes); fixed-width values as bytes.
fn proto_fields(mut bytes: &[u8]) -> Vec<(u64, u64, &[u8])> {
    fn varint(bytes: &mut &[u8]) -> u64 {
        let (mut value, mut shift) = (0u64, 0);
        loop {
            let byte = bytes[0];
            *bytes = &bytes[1..];
            value |= ((byte & 0x7f) as u64) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return value;
            }
        }
    }
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        let (number, wire) = (key >> 3, key & 7);
        let len = match wire {
            0 => {
                fields.push((number, varint(&mut bytes), &[][..]));
                continue;
            }
            1 => 8,
            2 => varint(&mut bytes) as usize,
            5 => 4,
            other => panic!("wire type {other}"),
        };
        fields.push((number, 0, &bytes[..len]));
        bytes = &bytes[len..];
    }
    fields
}

/// The events of each of a run's TensorBoard files, in the order TensorBoard reads them (by
/// name); every record's length and data CRC-32C checked.
fn tensorboard_files(run: &Path) -> Vec<Vec<Logged>> {
    let mut files: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    files.sort();
    let masked = |b: &[u8]| sae_train::tensorboard::crc32c(b).rotate_right(15).wrapping_add(0xa282_ead8);
    let decode = |data: &[u8]| {
        let fields = proto_fields(data);
        let step = fields.iter().find(|f| f.0 == 2).map_or(0, |f| f.1);
        if fields.iter().any(|f| f.0 == 3 && f.2 == b"brain.Event:2") {
            return Logged::Version;
        }
        if let Some(log) = fields.iter().find(|f| f.0 == 7) {
            assert_eq!(proto_fields(log.2), [(1, 1, &[][..])], "a START");
            return Logged::Start(step);
        }
        let summary = fields.iter().find(|f| f.0 == 5).expect("a summary");
        let values = proto_fields(summary.2)
            .iter()
            .map(|value| {
                let value = proto_fields(value.2);
                let tag = String::from_utf8(value[0].2.to_vec()).unwrap();
                (tag, f32::from_le_bytes(value[1].2.try_into().unwrap()))
            })
            .collect();
        Logged::Scalars(step, values)
    };
    files
        .iter()
        .map(|file| {
            let bytes = std::fs::read(file).unwrap();
            let mut events = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let len_bytes = &bytes[at..at + 8];
                let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
                assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked(len_bytes));
                let data = &bytes[at + 12..at + 12 + len];
                assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked(data));
                events.push(decode(data));
                at += 16 + len;
            }
            events
        })
        .collect()
}

/// The run's per-step training loss as TensorBoard shows it: by step, a later file's value from
/// its START on replacing what earlier files logged there.
fn step_losses(run: &Path) -> Vec<(u64, f32)> {
    let mut losses = std::collections::BTreeMap::new();
    for events in tensorboard_files(run) {
        for event in events {
            match event {
                Logged::Start(step) => losses.retain(|s, _| *s < step),
                Logged::Scalars(step, values) if values[0].0 == "step/train_loss" => {
                    assert!(losses.insert(step, values[0].1).is_none(), "step {step} logged twice in one opening");
                }
                _ => (),
            }
        }
    }
    losses.into_iter().collect()
}

/// With `SAE_TORCH_PYTHON` naming a Python with `tensorboard`, every scalar tag of the run as
/// TensorBoard's own reader gives it: `{tag: [[step, value], …]}`.
fn tensorboard_reads(run: &Path) -> Option<serde_json::Value> {
    let python = std::env::var_os("SAE_TORCH_PYTHON")?;
    let read = "import json, sys\n\
                from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
                ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
                print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}))";
    let out = std::process::Command::new(python).args(["-c", read]).arg(run).output().unwrap();
    if !out.status.success() {
        eprintln!("skipped TensorBoard's reader: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// A run's TensorBoard events: whole records, the file version first and a START at the first
/// step each opening logs; every step's scalars and every epoch's once (a resume adds a file
/// with only the steps and epochs after its checkpoint). TensorBoard's own reader, where there
/// is one, gets each epoch's scalars of summary.csv and every step.
#[test]
fn tensorboard_logs_every_step_and_epoch_once() {
    let data = tmp("tb-data");
    let data = data.path();
    write_colour_dataset(data, 2, 1);
    let run = tmp("tb-run");
    let run = run.path();
    train(&small_config("resnet14b", data, 1), run, &Device::Cpu, false, &mut LogLines::default()).unwrap();
    train(&small_config("resnet14b", data, 2), run, &Device::Cpu, true, &mut LogLines::default()).unwrap();
    // 20 images in batches of 10: two steps per epoch.
    let files = tensorboard_files(run);
    assert_eq!(files.len(), 2, "{files:?}");
    let summary = read_summary(run).unwrap();
    for (n, events) in files.iter().enumerate() {
        let (first_step, epoch) = (2 * n as u64 + 1, &summary[n]);
        assert_eq!(events[..2], [Logged::Version, Logged::Start(first_step)]);
        let tags = |e: &Logged| match e {
            Logged::Scalars(step, values) => (*step, values.iter().map(|v| v.0.clone()).collect::<Vec<_>>()),
            other => panic!("{other:?} after the file's start"),
        };
        let step_tags = vec!["step/train_loss".to_string(), "step/train_top1".into(), "step/lr".into()];
        assert_eq!(tags(&events[2]), (first_step, step_tags.clone()));
        assert_eq!(tags(&events[3]), (first_step + 1, step_tags));
        assert_eq!(events.len(), 5);
        let Logged::Scalars(step, values) = &events[4] else { unreachable!() };
        assert_eq!(*step, epoch.epoch as u64);
        let eval_top1 = values.iter().find(|v| v.0 == "eval/top1").unwrap().1;
        assert_eq!(eval_top1, epoch.eval_top1 as f32);
    }
    let Some(scalars) = tensorboard_reads(run) else { return };
    type Field = fn(&EpochSummary) -> f64;
    let tags: [(&str, Field); 2] = [("eval/top1", |s| s.eval_top1), ("train/loss", |s| s.train_loss)];
    for (tag, value) in tags {
        let points = scalars[tag].as_array().unwrap_or_else(|| panic!("no {tag} in {scalars}"));
        assert_eq!(points.len(), 2, "{tag}: {points:?}");
        for (p, s) in points.iter().zip(&summary) {
            assert_eq!(p[0].as_u64(), Some(s.epoch as u64));
            let (got, want) = (p[1].as_f64().unwrap(), value(s));
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{tag} epoch {}: {got} against {want}", s.epoch);
        }
    }
    let steps: Vec<u64> =
        scalars["step/train_loss"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

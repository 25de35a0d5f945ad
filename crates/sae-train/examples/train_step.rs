//! Runs training steps (or eval-mode forward passes) of one registered model on random data,
//! for profiling: `cargo run -p sae-train --example train_step -- MODEL SIZE BATCH STEPS
//! [reference] [eval] [warm-stats]`, e.g. under `perf record -g`. `warm-stats` first runs
//! training-mode forwards so that eval mode sees realistic BatchNorm running statistics (with
//! the initial ones, activations are unnormalised and some kernels slow down on their values).

use candle_core::{Device, ModuleT, Tensor};
use sae_models::Implementation;
use sae_train::metrics::cross_entropy;
use sae_train::optim::OptimizerConfig;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, size, batch, steps] = [0, 1, 2, 3].map(|i| args.get(i).cloned());
    let model = model.unwrap_or_else(|| "senetv2_resnet50".into());
    let size: usize = size.as_deref().unwrap_or("32").parse()?;
    let batch: usize = batch.as_deref().unwrap_or("16").parse()?;
    let steps: usize = steps.as_deref().unwrap_or("5").parse()?;
    let device = Device::Cpu;
    let mut cfg = sae_models::config(&model, 100)?;
    let flag = |name: &str| args.iter().skip(4).any(|a| a == name);
    if flag("reference") {
        cfg.kernels = Implementation::Reference;
    }
    let kernels = cfg.kernels;
    let net = sae_models::Model::new(cfg, 0, &device)?;
    let mut optimizer = OptimizerConfig::keras_adam().build(net.trainable_vars(), kernels);
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &device)?;
    let y = Tensor::new((0..batch as u32).map(|i| i % 100).collect::<Vec<_>>().as_slice(), &device)?;
    if flag("warm-stats") {
        // Training-mode forwards move the BatchNorm running statistics towards the batch's.
        for _ in 0..20 {
            device.with_context(|| net.forward_t(&x, true))?;
        }
    }
    for step in 0..steps {
        let t0 = Instant::now();
        if flag("eval") {
            device.with_context(|| net.forward_without_graph(&x, false))?;
            println!("step {step}: eval forward {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
            continue;
        }
        let loss = device.with_context(|| cross_entropy(&net.forward_t(&x, true)?, &y, 0.0))?;
        let value = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = device.with_context(|| loss.backward_consuming())?;
        let t2 = Instant::now();
        device.with_context(|| optimizer.step(&grads))?;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let t3 = Instant::now();
        println!(
            "step {step}: loss {value:.4}  forward {:.0} ms  backward {:.0} ms  optimiser {:.0} ms",
            ms(t0, t1),
            ms(t1, t2),
            ms(t2, t3)
        );
    }
    Ok(())
}

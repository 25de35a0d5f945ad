//! Throughput of a model on random inputs: training steps (forward, cross-entropy, backward
//! with the optimiser's update inside it, as `sae train` runs them) or inference (eval mode,
//! no graph). What `sae benchmark` reports for any model and `cargo xtask bench-train` measures
//! beside PyTorch.

use crate::metrics::cross_entropy;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::Result;
use candle_core::{DType, Device, ModuleT, Tensor};
use sae_models::{Model, ModelConfig, Precision};
use std::time::Instant;

/// Training-mode forwards run before timing inference, so that BatchNorm's running statistics
/// are realistic (momentum 0.1: 1 − 0.9²⁰ = 88 % of the way to the batch statistics): with the
/// initial ones the activations are unnormalised, and their values slow some kernels down
/// (ours and PyTorch's). `bench/pytorch/bench_train.py` does the same.
pub const WARM_STAT_FORWARDS: usize = 20;

/// What a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward in training mode, cross-entropy, backward and the optimiser's update.
    Train,
    /// Forward in eval mode without a graph.
    Infer,
}

impl Mode {
    /// "train" or "infer", as the command lines take it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Train => "train",
            Mode::Infer => "infer",
        }
    }
}

/// A model with random inputs and labels (and, to train, its optimiser), ready to run steps.
pub struct Bench {
    device: Device,
    model: Model,
    x: Tensor,
    y: Tensor,
    optimizer: Option<Box<dyn Optimizer>>,
}

impl Bench {
    /// `cfg` built with seed 0 in `precision`, a batch of `batch` random `size`×`size` images
    /// and labels; to train, `optimizer` over its weights (with the model's kernel switch).
    pub fn new(
        cfg: ModelConfig,
        precision: Precision,
        size: usize,
        batch: usize,
        mode: Mode,
        optimizer: &OptimizerConfig,
        device: &Device,
    ) -> Result<Self> {
        let kernels = cfg.kernels;
        let classes = cfg.num_classes as u32;
        let mut model = Model::new(cfg, 0, device)?;
        model.set_precision(precision);
        let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), device)?;
        let labels: Vec<u32> = (0..batch as u32).map(|i| i * 37 % classes.max(1)).collect();
        let y = Tensor::new(labels.as_slice(), device)?;
        // Only for training: its moments (twice the weights) are allocated when it is built.
        let optimizer = (mode == Mode::Train).then(|| optimizer.build(model.trainable_vars(), kernels));
        if mode == Mode::Infer {
            for _ in 0..WARM_STAT_FORWARDS {
                device.with_context(|| model.forward_without_graph(&x, true))?;
            }
        }
        Ok(Self { device: device.clone(), model, x, y, optimizer })
    }

    /// The model the steps run.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// One training step or inference: its forward and backward seconds (0 for inference),
    /// each ended by a synchronisation of the device, so that a GPU's queued work is counted.
    pub fn step(&mut self) -> Result<[f64; 2]> {
        let (device, model, x) = (&self.device, &self.model, &self.x);
        let t0 = Instant::now();
        let Some(optimizer) = self.optimizer.as_mut() else {
            device.with_context(|| model.forward_without_graph(x, false)?.to_dtype(DType::F32))?;
            device.synchronize()?;
            return Ok([t0.elapsed().as_secs_f64(), 0.0]);
        };
        let (loss, t1) = device.with_context(|| -> Result<_> {
            let loss = cross_entropy(&model.forward_t(x, true)?, &self.y, 0.0)?;
            loss.to_scalar::<f32>()?;
            Ok((loss, Instant::now()))
        })?;
        device.with_context(|| crate::backward_with_step(loss, optimizer.as_mut()))?;
        device.synchronize()?;
        Ok([(t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64()])
    }
}

/// Median seconds of a step and of its forward and backward parts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// A whole step (or inference).
    pub step: f64,
    /// The forward pass (with the loss, in training).
    pub forward: f64,
    /// The backward pass with the optimiser's update; 0 for inference.
    pub backward: f64,
    /// Steps timed.
    pub steps: usize,
}

/// Times `bench`: one warm-up step, then steps until at least `min_steps` and `seconds`.
pub fn measure(bench: &mut Bench, seconds: f64, min_steps: usize) -> Result<Timing> {
    bench.step()?;
    let mut parts = Vec::new();
    let start = Instant::now();
    while parts.len() < min_steps.max(1) || start.elapsed().as_secs_f64() < seconds {
        parts.push(bench.step()?);
    }
    let part = |i: usize| median(parts.iter().map(|p| p[i]).collect());
    Ok(Timing {
        step: median(parts.iter().map(|p| p[0] + p[1]).collect()),
        forward: part(0),
        backward: part(1),
        steps: parts.len(),
    })
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// This machine's CPU model and hardware threads (Linux's `/proc/cpuinfo`).
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {threads} hardware threads")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small model trains and infers; every part is timed, the step is their sum's median,
    /// and inference has no backward.
    #[test]
    fn measures_training_and_inference() {
        let cfg = sae_models::config("resnet14b", 10).unwrap();
        for mode in [Mode::Train, Mode::Infer] {
            let mut bench =
                Bench::new(cfg.clone(), Precision::F32, 16, 2, mode, &OptimizerConfig::keras_adam(), &Device::Cpu)
                    .unwrap();
            let t = measure(&mut bench, 0.0, 3).unwrap();
            assert_eq!(t.steps, 3);
            assert!(t.forward > 0.0 && t.step >= t.forward);
            assert_eq!(t.backward > 0.0, mode == Mode::Train, "{mode:?}: {t:?}");
        }
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 3.0);
    }
}

//! `sae benchmark`: images/s of models on this machine, inference and training steps on random
//! inputs (`sae_train::bench`), as timm's `benchmark.py` reports them for PyTorch models: per
//! model and mode the median step, its forward and backward parts, images/s and the GFLOP/s
//! that makes (2 FLOP per multiply-accumulate of the forward, three times that for a training
//! step).

use anyhow::{bail, Context, Result};
use sae_kernels::Implementation;
use sae_models::{ModelConfig, Precision};
use sae_train::bench::{Bench, Mode};
use sae_train::OptimizerConfig;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

/// The flags of `sae benchmark`.
#[derive(clap::Args, Debug)]
pub struct BenchmarkArgs {
    /// Registered model names (see `sae models`), comma-separated or repeated; `all` for every
    /// registered model.
    #[arg(long, value_delimiter = ',', required_unless_present = "config")]
    pub model: Vec<String>,
    /// A model's config JSON instead (written by `sae convert`, or a run's config.json, whose
    /// input size and precision are then the defaults).
    #[arg(long, conflicts_with = "model")]
    pub config: Option<PathBuf>,
    /// Classifier outputs, with --model.
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,
    /// Input side length [default: a run's, else 224].
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// What to time.
    #[arg(long, value_enum, default_value_t = Modes::Both)]
    pub mode: Modes,
    /// `f32`, or `bf16` mixed precision as `sae train --precision bf16` runs it [default: a
    /// run's, else f32].
    #[arg(long)]
    pub precision: Option<Precision>,
    /// `fused` kernels or the `reference` Candle compositions.
    #[arg(long, default_value = "fused")]
    pub kernels: Implementation,
    /// The optimiser a training step updates the weights with: `sgd` (momentum, as timm's
    /// benchmark), `adam` (Keras form) or `adamw`.
    #[arg(long, default_value = "sgd", value_parser = ["sgd", "adam", "adamw"])]
    pub optimizer: String,
    /// Seconds to time each model and mode, after a warm-up step (3 steps at least).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// `cpu`, `cuda` or `metal`.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    pub device: String,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the results to this CSV file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// Which steps `sae benchmark` times.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Modes {
    /// Inference: eval mode, no graph.
    Infer,
    /// Training steps: forward, cross-entropy, backward and the optimiser's update.
    Train,
    /// Both, inference first.
    Both,
}

impl Modes {
    fn modes(self) -> &'static [Mode] {
        match self {
            Modes::Infer => &[Mode::Infer],
            Modes::Train => &[Mode::Train],
            Modes::Both => &[Mode::Infer, Mode::Train],
        }
    }
}

/// One model and mode measured.
struct Measured {
    model: String,
    mode: Mode,
    params: usize,
    /// Multiply-accumulates of one image's forward.
    macs: u64,
    timing: sae_train::bench::Timing,
}

impl Measured {
    fn images_per_second(&self, batch: usize) -> f64 {
        batch as f64 / self.timing.step
    }

    /// GFLOP/s: 2 FLOP per multiply-accumulate, three passes' worth for a training step
    /// (forward, input gradient, weight gradient).
    fn gflops(&self, batch: usize) -> f64 {
        let passes = if self.mode == Mode::Train { 3.0 } else { 1.0 };
        2.0 * passes * self.macs as f64 * batch as f64 / self.timing.step / 1e9
    }
}

/// `sae benchmark`.
pub fn benchmark(a: &BenchmarkArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(a.seconds.is_finite() && a.seconds >= 0.0) {
        bail!("--seconds {} is not a duration (0 or more)", a.seconds);
    }
    let (configs, run_data, run_precision) = match &a.config {
        Some(path) => {
            let file = crate::read_config(path)?;
            (vec![file.model], file.data, file.precision)
        }
        None => {
            let names: Vec<String> = if a.model.iter().any(|m| m == "all") {
                sae_models::list().iter().map(|n| n.to_string()).collect()
            } else {
                a.model.clone()
            };
            let configs = names.iter().map(|n| sae_models::config(n, a.classes)).collect::<Result<Vec<_>, _>>()?;
            (configs, None, None)
        }
    };
    let size = a.input_size.or(run_data.map(|d| d.input_size)).unwrap_or(224);
    let precision = a.precision.or(run_precision).unwrap_or_default();
    let optimizer = match a.optimizer.as_str() {
        "adam" => OptimizerConfig::keras_adam(),
        "adamw" => OptimizerConfig::pytorch_adamw(),
        _ => OptimizerConfig::Sgd { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 1e-4, decoupled: false },
    };
    let device = crate::train::device(&a.device)?;
    eprintln!(
        "{}; {}, {} kernels, {size}×{size} inputs, batch {}, {} s per model and mode",
        sae_train::bench::machine(),
        precision.describe(&device),
        a.kernels,
        a.batch_size,
        a.seconds
    );
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "{:<26} {:<5} {:>9} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8}",
            "model", "mode", "params", "GMACs", "images/s", "step ms", "fwd ms", "bwd ms", "GFLOP/s"
        )?;
    }
    let mut rows = Vec::new();
    for cfg in configs {
        let name = cfg.name.clone();
        let params = cfg.param_counts()?.trainable;
        for &mode in a.mode.modes() {
            let cfg = ModelConfig { kernels: a.kernels, ..cfg.clone() };
            let measured = (|| -> Result<Measured> {
                let mut bench = Bench::new(cfg, precision, size, a.batch_size, mode, &optimizer, &device)?;
                let macs = bench.model().macs(size, size);
                let timing = sae_train::bench::measure(&mut bench, a.seconds, 3)?;
                Ok(Measured { model: name.clone(), mode, params, macs, timing })
            })()
            .with_context(|| {
                format!("benchmarking {name} ({}) at {size}×{size}, batch {}", mode.name(), a.batch_size)
            })?;
            let (t, batch) = (&measured.timing, a.batch_size);
            if a.json {
                let row = json!({
                    "model": measured.model, "mode": mode.name(), "input_size": size, "batch_size": batch,
                    "precision": precision.name(), "kernels": a.kernels.name(), "params": params, "macs": measured.macs,
                    "images_per_second": measured.images_per_second(batch), "step_seconds": t.step,
                    "forward_seconds": t.forward, "backward_seconds": t.backward, "steps": t.steps,
                    "gflops": measured.gflops(batch),
                });
                writeln!(out, "{row}")?;
            } else {
                writeln!(
                    out,
                    "{:<26} {:<5} {:>8.2}M {:>7.2} {:>9.1} {:>9.1} {:>8.1} {:>8} {:>8.0}",
                    measured.model,
                    mode.name(),
                    params as f64 / 1e6,
                    measured.macs as f64 / 1e9,
                    measured.images_per_second(batch),
                    1e3 * t.step,
                    1e3 * t.forward,
                    if mode == Mode::Train { format!("{:.1}", 1e3 * t.backward) } else { "–".into() },
                    measured.gflops(batch)
                )?;
            }
            out.flush()?;
            rows.push(measured);
        }
    }
    if let Some(path) = &a.csv {
        let mut csv = String::from("model,mode,input_size,batch_size,precision,kernels,params,macs,images_per_second,step_seconds,forward_seconds,backward_seconds,steps,gflops\n");
        for m in &rows {
            let (t, batch) = (&m.timing, a.batch_size);
            csv += &format!(
                "{},{},{size},{batch},{},{},{},{},{},{},{},{},{},{}\n",
                m.model,
                m.mode.name(),
                precision.name(),
                a.kernels.name(),
                m.params,
                m.macs,
                m.images_per_second(batch),
                t.step,
                t.forward,
                t.backward,
                t.steps,
                m.gflops(batch)
            );
        }
        sae_fs::write_atomic(path, csv.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

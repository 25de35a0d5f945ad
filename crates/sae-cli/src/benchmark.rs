//! `sae benchmark`: images/s of models on this machine, inference and training steps on random
//! inputs (`sae_train::bench`), as timm's `benchmark.py` reports them for PyTorch models: per
//! model and mode the median step, its forward and backward parts, images/s and the GFLOP/s
//! that makes (2 FLOP per multiply-accumulate of the forward, three times that for a training
//! step). With `--pytorch PYTHON`, the same networks in PyTorch eager beside them: the
//! `bench/pytorch` scripts, built into the binary, run by that Python in a process per model
//! and mode.

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
    /// The optimiser a training step updates the weights with, with `sae train`'s defaults:
    /// `sgd` (momentum, as timm's benchmark), `adam` (Keras form) or `adamw`.
    #[arg(long, default_value = "sgd", value_parser = ["sgd", "adam", "adamw"])]
    pub optimizer: String,
    /// Seconds to time each model and mode, after a warm-up step (3 steps at least).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Times to measure each model and mode (ours and PyTorch's in turn), keeping each side's
    /// fastest: a busy or virtual machine slows single runs.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// `cpu`, `cuda` or `metal`.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    pub device: String,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the results to this CSV file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Also time the same networks in PyTorch eager with this Python (it needs torch): each
    /// config's network as bench/pytorch/senetv2.py builds it, with the same input size, batch,
    /// threads and optimiser, bf16 as `torch.autocast`, and its parameter count checked equal.
    #[arg(long, value_name = "PYTHON")]
    pub pytorch: Option<PathBuf>,
}

/// The PyTorch scripts `--pytorch` runs, as they are in the repository.
const SENETV2_PY: &str = include_str!("../../../bench/pytorch/senetv2.py");
const BENCHMARK_PY: &str = include_str!("../../../bench/pytorch/benchmark.py");

/// One model and mode as PyTorch ran it.
struct TorchTiming {
    images_per_second: f64,
    step: f64,
    params: usize,
    version: String,
}

/// The scripts written to a directory of their own for the run of `sae benchmark`, removed
/// when dropped.
struct TorchScripts {
    dir: PathBuf,
    python: PathBuf,
}

impl TorchScripts {
    fn new(python: &std::path::Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("sae-benchmark-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let scripts = Self { dir, python: python.to_path_buf() };
        for (name, text) in [("senetv2.py", SENETV2_PY), ("benchmark.py", BENCHMARK_PY)] {
            let path = scripts.dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(scripts)
    }

    /// Times `cfg` in PyTorch as `a` asks, in a process of its own.
    fn time(
        &self,
        a: &BenchmarkArgs,
        cfg: &ModelConfig,
        size: usize,
        mode: Mode,
        precision: Precision,
    ) -> Result<TorchTiming> {
        let config = self.dir.join("model.json");
        std::fs::write(&config, serde_json::to_vec(cfg)?).with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = std::process::Command::new(&self.python);
        cmd.arg(self.dir.join("benchmark.py")).arg(&config);
        for (flag, value) in [
            ("--size", size.to_string()),
            ("--batch", a.batch_size.to_string()),
            ("--mode", mode.name().to_string()),
            ("--seconds", a.seconds.to_string()),
            ("--threads", rayon::current_num_threads().to_string()),
            ("--optimizer", a.optimizer.clone()),
            ("--device", a.device.clone()),
        ] {
            cmd.args([flag, value.as_str()]);
        }
        if precision == Precision::Bf16 {
            cmd.arg("--bf16");
        }
        let out = cmd.output().with_context(|| format!("running {} (--pytorch)", self.python.display()))?;
        if !out.status.success() {
            bail!(
                "PyTorch ({}) failed on {}: {}",
                self.python.display(),
                cfg.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let row: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("reading what {} printed", self.python.display()))?;
        let number = |key: &str| row[key].as_f64().with_context(|| format!("PyTorch's {key} missing in {row}"));
        Ok(TorchTiming {
            images_per_second: number("images_per_second")?,
            step: number("step_seconds")?,
            params: number("params")? as usize,
            version: row["torch"].as_str().unwrap_or("?").to_string(),
        })
    }
}

impl Drop for TorchScripts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    /// PyTorch's, with `--pytorch`.
    torch: Option<TorchTiming>,
}

impl Measured {
    /// Of two repeats, each side's faster timing.
    fn fastest(self, other: Measured) -> Measured {
        let timing = if other.timing.step < self.timing.step { other.timing } else { self.timing };
        let torch = match (self.torch, other.torch) {
            (Some(a), Some(b)) => Some(if b.step < a.step { b } else { a }),
            (a, b) => a.or(b),
        };
        Measured { timing, torch, ..self }
    }

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
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
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
    let optimizer =
        OptimizerConfig::default_named(&a.optimizer).with_context(|| format!("unknown optimizer {}", a.optimizer))?;
    let device = crate::train::device(&a.device)?;
    if a.pytorch.is_some() && a.device == "metal" {
        bail!("--pytorch times PyTorch on the CPU or CUDA, not on Metal");
    }
    let torch = a.pytorch.as_deref().map(TorchScripts::new).transpose()?;
    eprintln!(
        "{}; {}, {} kernels, {size}×{size} inputs, batch {}, {} s per model and mode, fastest of {}",
        sae_train::bench::machine(),
        precision.describe(&device),
        a.kernels,
        a.batch_size,
        a.seconds,
        a.repeats
    );
    let mut out = std::io::stdout().lock();
    if !a.json {
        write!(
            out,
            "{:<26} {:<5} {:>9} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8}",
            "model", "mode", "params", "GMACs", "images/s", "step ms", "fwd ms", "bwd ms", "GFLOP/s"
        )?;
        if torch.is_some() {
            write!(out, " {:>10} {:>9}", "PyTorch/s", "ours/PyT")?;
        }
        writeln!(out)?;
    }
    let mut rows = Vec::new();
    for cfg in configs {
        let name = cfg.name.clone();
        let params = cfg.param_counts()?.trainable;
        for &mode in a.mode.modes() {
            let cfg = ModelConfig { kernels: a.kernels, ..cfg.clone() };
            // Each repeat builds the model afresh, ours and PyTorch's in turn; each side's
            // fastest is kept.
            let measured = (|| -> Result<Measured> {
                let mut best: Option<Measured> = None;
                for _ in 0..a.repeats {
                    let mut bench = Bench::new(cfg.clone(), precision, size, a.batch_size, mode, &optimizer, &device)?;
                    let macs = bench.model().macs(size, size);
                    let timing = sae_train::bench::measure(&mut bench, a.seconds, 3)?;
                    drop(bench);
                    let torch = match &torch {
                        Some(scripts) => {
                            let t = scripts.time(a, &cfg, size, mode, precision)?;
                            if t.params != params {
                                bail!(
                                    "PyTorch's network has {} parameters, ours {params}: not the same network",
                                    t.params
                                );
                            }
                            Some(t)
                        }
                        None => None,
                    };
                    let this = Measured { model: name.clone(), mode, params, macs, timing, torch };
                    best = Some(match best {
                        None => this,
                        Some(best) => best.fastest(this),
                    });
                }
                best.context("--repeats must be at least 1")
            })()
            .with_context(|| {
                format!("benchmarking {name} ({}) at {size}×{size}, batch {}", mode.name(), a.batch_size)
            })?;
            let (t, batch) = (&measured.timing, a.batch_size);
            if a.json {
                let mut row = json!({
                    "model": measured.model, "mode": mode.name(), "input_size": size, "batch_size": batch,
                    "precision": precision.name(), "kernels": a.kernels.name(), "params": params, "macs": measured.macs,
                    "images_per_second": measured.images_per_second(batch), "step_seconds": t.step,
                    "forward_seconds": t.forward, "backward_seconds": t.backward, "steps": t.steps,
                    "gflops": measured.gflops(batch), "repeats": a.repeats,
                });
                if let Some(torch) = &measured.torch {
                    row["pytorch"] = json!({
                        "images_per_second": torch.images_per_second, "step_seconds": torch.step,
                        "params": torch.params, "version": torch.version,
                    });
                }
                writeln!(out, "{row}")?;
            } else {
                write!(
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
                if let Some(torch) = &measured.torch {
                    let ratio = measured.images_per_second(batch) / torch.images_per_second;
                    write!(out, " {:>10.1} {:>8.2}×", torch.images_per_second, ratio)?;
                }
                writeln!(out)?;
            }
            out.flush()?;
            rows.push(measured);
        }
    }
    if let Some(path) = &a.csv {
        let mut csv = String::from("model,mode,input_size,batch_size,precision,kernels,params,macs,images_per_second,step_seconds,forward_seconds,backward_seconds,steps,gflops,pytorch_images_per_second,pytorch_step_seconds\n");
        for m in &rows {
            let (t, batch) = (&m.timing, a.batch_size);
            let torch = m.torch.as_ref().map_or(",".to_string(), |t| format!("{},{}", t.images_per_second, t.step));
            csv += &format!(
                "{},{},{size},{batch},{},{},{},{},{},{},{},{},{},{},{torch}\n",
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

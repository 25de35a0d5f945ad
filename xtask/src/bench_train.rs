//! `cargo xtask bench-train`: training-step and inference images/s of the paper's models on
//! CPU, ours (default kernels, and Candle's own ops through the `reference` switch) next to
//! PyTorch eager measured in the same run by `bench/pytorch/bench_train.py`, written to
//! `results/train-speed.md` with the GFLOP/s reached and a forward / backward split of our
//! step (the optimiser's update inside the backward, as `sae train` runs it).

use crate::project_root;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use sae_kernels::Implementation;
use sae_models::{PaperPreset, Precision};
use sae_train::bench::{median, Bench, Mode, WARM_STAT_FORWARDS};
use sae_train::optim::OptimizerConfig;
use std::fmt::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

const CLASSES: usize = 100;

/// One measured configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Row {
    model: &'static str,
    size: usize,
    batch: usize,
    mode: Mode,
    /// The paper's Keras convention, as every reproduction preset builds its ResNets: a bias on
    /// every convolution and BatchNorm ε 1.001e-5 (`ModelConfig::with_paper_preset`). The
    /// registry's models, the other rows, follow PyTorch's: no convolution bias.
    keras: bool,
}

const fn row(model: &'static str, size: usize, batch: usize, mode: Mode) -> Row {
    Row { model, size, batch, mode, keras: false }
}

/// A training row in the Keras convention ([`Row::keras`]).
const fn keras_row(model: &'static str, size: usize, batch: usize) -> Row {
    Row { model, size, batch, mode: Mode::Train, keras: true }
}

impl Row {
    /// "senetv2_resnet50 140px batch 16 Train", for progress lines.
    fn label(&self) -> String {
        format!("{} {}px batch {} {:?}", self.model_name(), self.size, self.batch, self.mode)
    }

    /// The model's name, "(Keras)" after it in the Keras convention.
    fn model_name(&self) -> String {
        if self.keras {
            format!("{} (Keras)", self.model)
        } else {
            self.model.to_string()
        }
    }

    /// The model's configuration with the report's class count, in the row's convention.
    fn config(&self) -> Result<sae_models::ModelConfig> {
        let cfg = sae_models::config(self.model, CLASSES)?;
        Ok(if self.keras { cfg.with_paper_preset(PaperPreset::Imagenet { num_classes: CLASSES }) } else { cfg })
    }

    /// "pytorch" or "keras", as `bench-train-row` and the PyTorch script take it.
    fn convention(&self) -> &'static str {
        if self.keras {
            "keras"
        } else {
            "pytorch"
        }
    }
}

/// The rows the training-speed issue asks for: training at batch 16, inference at 1 and 16.
const ROWS: &[Row] = &[
    row("resnet50", 32, 16, Mode::Train),
    row("seresnet50", 32, 16, Mode::Train),
    row("senetv2_resnet50", 32, 16, Mode::Train),
    row("senetv2_resnet14b", 32, 16, Mode::Train),
    row("resnet50", 140, 16, Mode::Train),
    row("seresnet50", 140, 16, Mode::Train),
    row("senetv2_resnet50", 140, 16, Mode::Train),
    row("senetv2_resnet50", 140, 1, Mode::Infer),
    row("senetv2_resnet50", 140, 16, Mode::Infer),
    row("senetv2_resnet50", 224, 1, Mode::Infer),
    // What the cpu presets of `reproduce-table2` and `reproduce-table4` train (input, batch,
    // convention): a slow op only the Keras convention runs (the convolutions' bias gradients
    // once took 29 % of a step) shows here and nowhere else.
    keras_row("senetv2_resnet14b", 32, 32),
    keras_row("senetv2_resnet50", 64, 32),
];

/// Median step time (and its forward and backward parts, the optimiser's update inside the
/// backward as `sae train` runs it) after one warm-up step, over at least 3 steps and
/// `seconds`, and the measuring process's memory.
#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    step: f64,
    forward: f64,
    backward: f64,
    memory: Memory,
    /// The most heap live at once from building the model to the last step, above what was
    /// live before (bytes, as `sae_train::allocator::Counting` counts it): exact and the same
    /// from run to run, where the resident peak also holds what the allocator keeps mapped.
    heap: u64,
}

impl Timing {
    /// The faster of two measurements of one row, with the memory of the one that peaked
    /// higher (memory is not what a repeat should pick).
    fn fastest(self, other: Timing) -> Timing {
        Timing {
            memory: self.memory.higher(other.memory),
            heap: self.heap.max(other.heap),
            ..if other.step < self.step { other } else { self }
        }
    }
}

/// A process's resident memory: before the model was built, and its peak (bytes).
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    baseline: u64,
    peak: u64,
}

impl Memory {
    /// Of two runs of one row, the one whose memory peaked higher (repeats keep the fastest
    /// time but not the lowest memory).
    fn higher(self, other: Memory) -> Memory {
        if other.peak > self.peak {
            other
        } else {
            self
        }
    }

    /// "peak MB (+ above the baseline)".
    fn describe(&self) -> String {
        format!("{:.0} (+{:.0})", self.peak as f64 / 1e6, self.peak.saturating_sub(self.baseline) as f64 / 1e6)
    }
}

/// Bytes in MiB.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// `(VmRSS, VmHWM)` of this process from /proc/self/status, bytes (zeros where unreadable).
fn resident_memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Median seconds of `f` over at least `min_calls` calls and `seconds`, after two warm-up
/// calls; what `f` returns is dropped inside the timing (as a step drops its tensors).
pub(crate) fn median_seconds<T>(seconds: f64, min_calls: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?;
    f()?;
    let (mut times, start) = (Vec::new(), Instant::now());
    while times.len() < min_calls || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Measures one row in a process of its own (`xtask bench-train-row`), so that its peak
/// memory is its own.
fn measure_ours(r: Row, kernels: Implementation, precision: Precision, seconds: f64) -> Result<Timing> {
    let mode = if r.mode == Mode::Train { "train" } else { "infer" };
    let (size, batch, seconds) = (r.size.to_string(), r.batch.to_string(), seconds.to_string());
    let v = row_process(&[r.model, &size, &batch, mode, kernels.name(), precision.name(), &seconds, r.convention()])?;
    let &[step, forward, backward, baseline, peak, heap] = v.as_slice() else {
        bail!("bench-train-row printed {} numbers, expected 6", v.len())
    };
    let memory = Memory { baseline: baseline as u64, peak: peak as u64 };
    Ok(Timing { step, forward, backward, memory, heap: heap as u64 })
}

/// Our f32 sgemm rate ([`gemm_gflops`]) measured in a process of its own, as PyTorch's `a @ b`
/// is: a process's rate stays at one level for all its calls, and that level differs between
/// processes on the Xeon (266–416 GFLOP/s over eight processes; `results/train-profile.md`).
fn sgemm_in_own_process() -> Result<f64> {
    match row_process(&["sgemm"])?.as_slice() {
        &[gflops] => Ok(gflops),
        v => bail!("bench-train-row sgemm printed {} numbers, expected 1", v.len()),
    }
}

/// Runs `xtask bench-train-row ARGS` in a process of its own and reads the numbers it prints.
fn row_process(args: &[&str]) -> Result<Vec<f64>> {
    let what = args.join(" ");
    let out = Command::new(std::env::current_exe()?)
        .arg("bench-train-row")
        .args(args)
        .output()
        .with_context(|| format!("starting bench-train-row {what}"))?;
    if !out.status.success() {
        bail!("bench-train-row {what} failed: {}", String::from_utf8_lossy(&out.stderr))
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading the output of bench-train-row {what}"))
}

/// `xtask bench-train-row MODEL SIZE BATCH train|infer KERNELS PRECISION SECONDS pytorch|keras`:
/// one row measured in this process; prints step, forward and backward seconds (the backward with the
/// optimiser's update, as `sae train` runs it: `sae_train::backward_with_step`), then the
/// resident memory before the model was built, the process's peak and the row's heap peak
/// ([`Timing::heap`]), in bytes.
/// `xtask bench-train-row sgemm` prints [`gemm_gflops`] for f32 instead.
pub fn row_in_this_process(args: &[String]) -> Result<()> {
    if matches!(args, [what] if what == "sgemm") {
        println!("{}", gemm_gflops(DType::F32)?);
        return Ok(());
    }
    let [model, size, batch, mode, kernels, precision, seconds, convention] = args else {
        bail!("usage: bench-train-row MODEL SIZE BATCH train|infer KERNELS PRECISION SECONDS pytorch|keras, or bench-train-row sgemm")
    };
    // Any size and batch, for A/B checks beyond the report's rows; the model by its name in
    // the report (the rows hold `&'static str`).
    let model = row_model("bench-train-row", model)?;
    let number = |what: &str, v: &str| v.parse::<usize>().with_context(|| format!("bench-train-row: {what} {v:?}"));
    let mode = match mode.as_str() {
        "train" => Mode::Train,
        "infer" => Mode::Infer,
        other => bail!("bench-train-row: mode {other:?} is neither train nor infer"),
    };
    let keras = match convention.as_str() {
        "pytorch" => false,
        "keras" => true,
        other => bail!("bench-train-row: convention {other:?} is neither pytorch nor keras"),
    };
    let row = &Row { keras, ..row(model, number("size", size)?, number("batch", batch)?, mode) };
    let kernels: Implementation = kernels.parse()?;
    let t = measure_here(*row, kernels, precision.parse()?, seconds.parse()?)?;
    println!("{} {} {} {} {} {}", t.step, t.forward, t.backward, t.memory.baseline, t.memory.peak, t.heap);
    Ok(())
}

/// A row's model, inputs and (for training) Keras Adam, ready to run steps.
fn setup(r: Row, kernels: Implementation, precision: Precision) -> Result<Bench> {
    let mut cfg = r.config()?;
    cfg.kernels = kernels;
    Ok(Bench::new(cfg, precision, r.size, r.batch, r.mode, &OptimizerConfig::keras_adam(), &Device::Cpu)?)
}

/// `name` as the rows of the report hold it (`&'static str`), or an error naming `command`.
fn row_model(command: &str, name: &str) -> Result<&'static str> {
    ROWS.iter()
        .chain(BF16_ROWS)
        .map(|r| r.model)
        .find(|m| *m == name)
        .with_context(|| format!("{command}: no row of bench-train has model {name}"))
}

fn measure_here(r: Row, kernels: Implementation, precision: Precision, seconds: f64) -> Result<Timing> {
    let baseline = resident_memory().0;
    let (heap, timing) = sae_train::allocator::measure(|| -> Result<_> {
        Ok(sae_train::bench::measure(&mut setup(r, kernels, precision)?, seconds, 3)?)
    });
    let timing = timing?;
    Ok(Timing {
        step: timing.step,
        forward: timing.forward,
        backward: timing.backward,
        memory: Memory { baseline, peak: resident_memory().1 },
        heap: (heap.peak - heap.before) as u64,
    })
}

/// `cargo xtask step-heap`: the heap of one training step of `model` at `size`, `batch`, as
/// `sae_train::allocator::Counting` (xtask's allocator) counts it: what is held before the step (weights, Adam's moments, the
/// inputs), the step's peak above that, and what the step allocates. Prints three steps and
/// returns the third (the first two also allocate the kernels' caches and thread pools'
/// buffers, and the resident peak is the highest of all).
pub fn step_heap(
    model: &str,
    size: usize,
    batch: usize,
    kernels: Implementation,
    precision: Precision,
) -> Result<sae_train::allocator::HeapUse> {
    let model = row_model("step-heap", model)?;
    let r = row(model, size, batch, Mode::Train);
    let mut setup = setup(r, kernels, precision)?;
    let mut measure_step = |n: usize| -> Result<sae_train::allocator::HeapUse> {
        let (heap, step) = sae_train::allocator::measure(|| setup.step());
        step?;
        println!(
            "{model} {size}×{size} batch {batch}, {kernels} kernels, {precision}, training step {n}: heap held before {:.1} MiB, peak {:.1} MiB (+{:.1}), held after {:.1} MiB; allocated {:.1} MiB in {} allocations",
            mib(heap.before as u64),
            mib(heap.peak as u64),
            mib((heap.peak - heap.before) as u64),
            mib(heap.after as u64),
            mib(heap.allocated as u64),
            heap.allocations
        );
        Ok(heap)
    };
    measure_step(1)?;
    measure_step(2)?;
    measure_step(3)
}

/// Matrix-multiply GFLOP/s as our convolution drives it: a 1×1 convolution with 2,048 input
/// and output channels over 2,048 pixels is a 2048 × 2048 × 2048 multiply (plus a copy). In
/// f32 that is the `gemm` crate; in bf16 the bf16 dot-product kernel where the CPU has one
/// (plus the conversions of the operands and the result).
pub fn gemm_gflops(dtype: DType) -> Result<f64> {
    let device = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 2048, 32, 64), &device)?.to_dtype(dtype)?;
    let w = Tensor::randn(0f32, 1.0, (2048, 2048, 1, 1), &device)?.to_dtype(dtype)?;
    let cfg = sae_kernels::Conv2dConfig { stride: 1, padding: 0, groups: 1 };
    let multiply = || Ok(device.with_context(|| sae_kernels::conv2d(&x, &w, cfg, Implementation::Fused))?);
    // Timed as the PyTorch script times `a @ b`: two warm-up calls, then the median of at least
    // 3 calls and 2 s (six calls, the first one cold, once gave 332 GFLOP/s against 427 in the
    // runs around it on the Xeon: a stall of the VM outweighed them).
    Ok(2.0 * 2048f64.powi(3) / median_seconds(2.0, 3, multiply)? / 1e9)
}

/// One row as PyTorch ran it: images/s, parameter count and memory.
#[derive(Debug, Clone, Copy)]
struct TorchRow {
    images_per_second: f64,
    params: u64,
    memory: Memory,
}

impl TorchRow {
    /// As [`Timing::fastest`].
    fn fastest(self, other: TorchRow) -> TorchRow {
        let faster = if other.images_per_second > self.images_per_second { other } else { self };
        TorchRow { memory: self.memory.higher(other.memory), ..faster }
    }
}

/// Runs a script of `bench/pytorch/` (`bench_train.py` unless named): each call a process of
/// its own.
pub(crate) struct TorchScript<'a> {
    pub(crate) python: &'a PathBuf,
    pub(crate) seconds: f64,
}

impl TorchScript<'_> {
    fn run(&self, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        self.run_script("bench_train.py", args)
    }

    /// Runs `bench/pytorch/{name}` with the thread count, `--seconds` and `args`: one JSON
    /// value per line of its output.
    pub(crate) fn run_script(&self, name: &str, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        let script = project_root().join("bench/pytorch").join(name);
        let threads = rayon::current_num_threads().to_string();
        let mut cmd = Command::new(self.python);
        cmd.arg(&script).args(["--threads", &threads, "--seconds", &self.seconds.to_string()]).args(args);
        eprintln!(
            "$ {} {} --threads {threads} --seconds {} {}",
            self.python.display(),
            script.display(),
            self.seconds,
            args.join(" ")
        );
        let out = cmd.output().with_context(|| format!("running {}", self.python.display()))?;
        if !out.status.success() {
            bail!("{} failed ({}):\n{}", script.display(), out.status, String::from_utf8_lossy(&out.stderr))
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).context("parsing the PyTorch script's output"))
            .collect()
    }

    /// PyTorch's `a @ b` GFLOP/s (2048³, f32) and its version.
    fn matmul(&self) -> Result<(f64, String)> {
        let lines = self.run(&[])?;
        let head = lines.first().context("the PyTorch script printed nothing")?;
        Ok((
            head["matmul_gflops"].as_f64().context("no matmul_gflops")?,
            head["torch"].as_str().unwrap_or("?").to_string(),
        ))
    }

    /// One row with `variant` (`eager`, `autocast_bf16`).
    fn row(&self, r: Row, variant: &str) -> Result<TorchRow> {
        let mode = if r.mode == Mode::Train { "train" } else { "infer" };
        let row = format!("{}:{}:{}:{mode}:{}", r.model, r.size, r.batch, r.convention());
        let lines = self.run(&["--variant", variant, "--skip-matmul", "--rows", &row])?;
        let [v] = lines.as_slice() else { bail!("the PyTorch script printed {} rows, expected 1", lines.len()) };
        let bytes = |k: &str| v[k].as_u64().with_context(|| format!("no {k}"));
        Ok(TorchRow {
            images_per_second: v["images_per_second"].as_f64().context("no images_per_second")?,
            params: v["params"].as_u64().unwrap_or(0),
            memory: Memory { baseline: bytes("baseline_rss")?, peak: bytes("peak_rss")? },
        })
    }
}

/// A report's title, the command that made it, the machine, and its measured peak.
pub(crate) fn report_header(title: &str, peak: &crate::peak::Peak) -> Result<String> {
    let mut md = format!("# {title}\n\n");
    let command = std::iter::once("cargo xtask".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>();
    writeln!(
        md,
        "Made by `{}`. Machine: {}; {} rayon threads.",
        command.join(" "),
        crate::bench::machine(),
        rayon::current_num_threads()
    )?;
    let mut bf16 = match peak.bf16_gflops {
        Some(g) => format!(", bf16 dot products (`vdpbf16ps`) **{g:.0} GFLOP/s**"),
        None => ", no bf16 dot-product instructions".into(),
    };
    if let Some(g) = peak.amx_gflops {
        bf16 += &format!(", bf16 AMX tiles (`tdpbf16ps`) **{g:.0} GFLOP/s**");
    }
    writeln!(
        md,
        "CPU flags: {}. Measured peak of this machine on all threads (`xtask/src/peak.rs`, register-only FMA chains): \
         f32 {} **{:.0} GFLOP/s**{bf16}; every GFLOP/s below also says its % of the f32 peak. \
         f32 3×3 stride-1 convolutions with at most 64 channels (ResNet's first stage) run {}.\n",
        crate::peak::cpu_flags().join(", "),
        peak.f32_isa,
        peak.f32_gflops,
        if sae_kernels::direct_conv3x3_in_use() {
            "the direct kernel (this CPU's 512-bit FMAs run at twice its 256-bit ones)"
        } else {
            "Winograd's F(3×3, 3×3), or F(2×2, 3×3) where that needs fewer multiplies (no direct kernel: no AVX-512, or 512-bit FMAs at the 256-bit ones' FLOP rate)"
        }
    )?;
    Ok(md)
}

/// `repeats` measurements per row and side, alternating ours and PyTorch's; each side's
/// fastest counts (a busy machine only slows a run down).
pub fn run(seconds: f64, python: Option<PathBuf>, bf16: bool, repeats: usize) -> Result<()> {
    let repeats = repeats.max(1);
    let torch = python.as_ref().map(|python| TorchScript { python, seconds });
    if bf16 {
        return run_bf16(seconds, torch, repeats);
    }
    let machine_peak = crate::peak::measure();
    let (mut peak, mut torch_matmul) = (0f64, None::<(f64, String)>);
    for _ in 0..repeats {
        peak = peak.max(sgemm_in_own_process()?);
        if let Some(t) = &torch {
            let (gflops, version) = t.matmul()?;
            torch_matmul = Some((torch_matmul.map_or(gflops, |(g, _)| g.max(gflops)), version));
        }
    }
    // Each row's table cells but its GFLOP/s (which need the peak, measured again at the end):
    // the cells before them, ours and PyTorch's GFLOP/s, the cells after.
    let mut lines: Vec<(String, f64, Option<f64>, String)> = Vec::new();
    let mut measured = Vec::new();
    for r in ROWS {
        let model = r.config()?;
        let params = model.param_counts()?.trainable;
        let macs = sae_models::Model::new(model, 0, &Device::Cpu)?.macs(r.size, r.size) as f64;
        let flop_per_image = 2.0 * macs * if r.mode == Mode::Train { 3.0 } else { 1.0 };
        // Ours and PyTorch's in turn, each the fastest of its repeats.
        let mut ours = measure_ours(*r, Implementation::Fused, Precision::F32, seconds)?;
        let mut torch_row = torch.as_ref().map(|t| t.row(*r, "eager")).transpose()?;
        for _ in 1..repeats {
            ours = ours.fastest(measure_ours(*r, Implementation::Fused, Precision::F32, seconds)?);
            if let (Some(t), Some(row)) = (&torch, &mut torch_row) {
                *row = row.fastest(t.row(*r, "eager")?);
            }
        }
        let candle = measure_ours(*r, Implementation::Reference, Precision::F32, seconds)?;
        let ips = |t: &Timing| r.batch as f64 / t.step;
        eprintln!("{}: ours {:.1} img/s, Candle {:.1} img/s", r.label(), ips(&ours), ips(&candle));
        let (torch_ips, ratio, torch_gflops, torch_memory) = match torch_row {
            Some(TorchRow { images_per_second: tips, params: tparams, memory }) => {
                if tparams as usize != params {
                    bail!("{}: PyTorch's network has {tparams} parameters, ours {params}", r.model)
                }
                (
                    format!("{tips:.1}"),
                    format!("**{:.2}×**", ips(&ours) / tips),
                    Some(tips * flop_per_image / 1e9),
                    memory.describe(),
                )
            }
            None => ("—".into(), "—".into(), None, "—".into()),
        };
        let split = if r.mode == Mode::Train {
            format!("{:.0} / {:.0}", ours.forward * 1e3, ours.backward * 1e3)
        } else {
            format!("{:.0} / –", ours.forward * 1e3)
        };
        let mode = if r.mode == Mode::Train { "train" } else { "inference" };
        let (ours_ips, candle_ips) = (ips(&ours), ips(&candle));
        measured.push(Measured {
            row: *r,
            ours: ours_ips,
            torch: torch_row.map(|t| t.images_per_second),
            ours_gflops: ours_ips * flop_per_image / 1e9,
            ours_peak: ours.memory.peak,
            torch_peak: torch_row.map(|t| t.memory.peak),
        });
        lines.push((
            format!(
                "| {} | {}×{} | {} | {mode} | {params} | {ours_ips:.1} | {candle_ips:.1} | {torch_ips} | {ratio}",
                r.model_name(),
                r.size,
                r.size,
                r.batch
            ),
            ours_ips * flop_per_image / 1e9,
            torch_gflops,
            format!("{split} | {} | {torch_memory} |", ours.memory.describe()),
        ));
    }
    // The peak again after the rows, the higher kept: on the 2-core AMD EPYC one measurement
    // came out at 117 GFLOP/s against 232–235 before and after, in one of the VM's spells in
    // which two threads get one core's FMA rate, and would have set every row's % of peak.
    let machine_peak = machine_peak.higher(crate::peak::measure());
    let of_peak = |gflops: f64| format!("{gflops:.0} ({:.0} %)", 100.0 * gflops / machine_peak.f32_gflops);
    let mut md = report_header("Training speed on CPU", &machine_peak)?;
    writeln!(
        md,
        "Models from the registry with 100 classes and the ImageNet stem (7×7/2 conv, 3×3/2 max-pool), random"
    )?;
    writeln!(
        md,
        "inputs; a training step is forward (BatchNorm in training mode) + cross-entropy + backward + Keras Adam."
    )?;
    writeln!(
        md,
        "The registry's models follow PyTorch's convention (no convolution bias); rows marked *(Keras)* are in the paper's"
    )?;
    writeln!(
        md,
        "Keras convention, as the cpu presets of `reproduce-table2` (32×32) and `reproduce-table4` (64×64) train them: a bias on every convolution, BatchNorm ε 1.001e-5."
    )?;
    writeln!(
        md,
        "images/s = batch / median step time (one warm-up step, then at least 3 steps and {seconds} s); {}.",
        repeats_sentence(repeats)
    )?;
    writeln!(md, "Inference runs in eval mode after {WARM_STAT_FORWARDS} training-mode forwards have set realistic BatchNorm running statistics.")?;
    writeln!(
        md,
        "*ours* runs the default `fused` kernels; *Candle* the same model with `kernels = reference` (Candle's own"
    )?;
    writeln!(md, "convolution, pooling and composed excitation). GFLOP/s count 2 FLOP per multiply-accumulate of the")?;
    writeln!(
        md,
        "convolutions and dense layers, ×3 for a training step (forward, input gradient, weight gradient): the direct"
    )?;
    writeln!(
        md,
        "algorithm's count, by which the GFLOP/s of all three columns are comparable. Our f32 3×3 stride-1 convolutions run\nWinograd's F(3×3, 3×3) or F(2×2, 3×3), which do 25 multiplies where the direct algorithm does 81 (16 where it does 36),\nso that the share of the f32 peak they show is not the share of the FMA units they keep busy.\n"
    )?;
    match &torch_matmul {
        Some((gflops, version)) => writeln!(md, "PyTorch {version} eager, `torch.set_num_threads({})`, measured in the same run by `bench/pytorch/bench_train.py` (same networks: the parameter counts below are checked equal). sgemm 2048³ GFLOP/s, the fastest of {repeats} process(es) per side: `gemm` crate through our 1×1 convolution **{}**, PyTorch `a @ b` **{}**.\n", rayon::current_num_threads(), of_peak(peak), of_peak(*gflops))?,
        None => writeln!(md, "PyTorch not measured in this run (pass `--python` with a Python that has torch). sgemm 2048³ GFLOP/s, the fastest of {repeats} process(es): `gemm` crate through our 1×1 convolution **{}**.\n", of_peak(peak))?,
    }
    writeln!(md, "Every row is measured in a process of its own (ours, Candle's and PyTorch's), so that its peak resident memory (VmHWM) is its own: *peak MB* is that peak, and in brackets what it rose above the process's resident memory just before the model was built (for PyTorch that baseline includes the loaded torch library).\n")?;
    writeln!(md, "| model | input | batch | mode | params | ours img/s | Candle img/s | PyTorch img/s | ours / PyTorch | ours GFLOP/s (% of peak) | PyTorch GFLOP/s (% of peak) | ours: fwd / bwd with update ms | peak MB ours | peak MB PyTorch |")?;
    writeln!(md, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")?;
    for (before, ours, torch, after) in &lines {
        writeln!(md, "{before} | {} | {} | {after}", of_peak(*ours), torch.map_or("—".into(), of_peak))?;
    }
    let gemm = Gemm { ours: peak, torch: torch_matmul.map(|(g, _)| g), machine: machine_peak.f32_gflops };
    writeln!(md, "\n{}", render_targets(&f32_targets(&measured, gemm)))?;
    let out = project_root().join("results/train-speed.md");
    std::fs::create_dir_all(out.parent().expect("results dir"))?;
    sae_fs::write_atomic(&out, md.as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// How the report says repeats were taken.
fn repeats_sentence(repeats: usize) -> String {
    if repeats == 1 {
        "one measurement per row and side".into()
    } else {
        format!("each row measured {repeats} times per side, ours and PyTorch's in turn, and each side's fastest kept (with the highest peak memory of its runs)")
    }
}

/// What one row of the f32 report measured, for the targets.
#[derive(Debug, Clone, Copy)]
struct Measured {
    row: Row,
    /// Our images/s, and PyTorch's where it was measured.
    ours: f64,
    torch: Option<f64>,
    ours_gflops: f64,
    /// Peak resident memory (bytes) of our process and of PyTorch's.
    ours_peak: u64,
    torch_peak: Option<u64>,
}

/// sgemm 2048³ GFLOP/s: ours, PyTorch's `a @ b`, and the machine's measured f32 peak.
#[derive(Debug, Clone, Copy)]
struct Gemm {
    ours: f64,
    torch: Option<f64>,
    machine: f64,
}

/// One target of the CPU-speed issue: what it asks, whether this run met it, and the numbers
/// that decide it (for each failing row, the row and its value).
struct Target {
    what: &'static str,
    met: bool,
    detail: String,
}

/// A target over rows: met where every row's value (`None`: not measured) passes `pass`; the
/// detail lists the rows that do not, or says how many passed.
fn every_row(
    what: &'static str,
    rows: impl IntoIterator<Item = (Row, Option<f64>)>,
    pass: impl Fn(f64) -> bool,
    unit: &str,
) -> Target {
    let (mut checked, mut failing) = (0, Vec::new());
    for (r, value) in rows {
        let Some(v) = value else { continue };
        checked += 1;
        if !pass(v) {
            failing.push(format!(
                "{} {}×{} batch {} {:?}: {v:.2}{unit}",
                r.model_name(),
                r.size,
                r.size,
                r.batch,
                r.mode
            ));
        }
    }
    let detail = match (checked, failing.len()) {
        (0, _) => "not measured in this run".into(),
        (n, 0) => format!("all {n} rows"),
        (n, f) => format!("{f} of {n} rows short: {}", failing.join("; ")),
    };
    Target { what, met: checked > 0 && failing.is_empty(), detail }
}

/// The f32 targets of the CPU-speed issue, judged on this run's numbers.
fn f32_targets(rows: &[Measured], gemm: Gemm) -> Vec<Target> {
    let over = |keep: fn(&Row) -> bool, value: fn(&Measured, f64) -> Option<f64>| {
        rows.iter().filter(move |m| keep(&m.row)).map(move |m| (m.row, value(m, gemm.machine)))
    };
    let gemm_share = gemm.ours / gemm.machine;
    vec![
        Target {
            what: "sgemm 2048³ ≥ 80 % of the measured f32 peak",
            met: gemm_share >= 0.8,
            detail: format!("{:.0} %", 100.0 * gemm_share),
        },
        Target {
            what: "sgemm 2048³ ≥ PyTorch's `a @ b`",
            met: gemm.torch.is_some_and(|t| gemm.ours >= t),
            detail: match gemm.torch {
                Some(t) => format!("{:.0} vs {t:.0} GFLOP/s", gemm.ours),
                None => "not measured in this run".into(),
            },
        },
        every_row(
            "every 140×140 and 224×224 row ≥ 1.3× PyTorch",
            over(|r| r.size >= 140, |m, _| m.torch.map(|t| m.ours / t)),
            |r| r >= 1.3,
            "×",
        ),
        every_row(
            "every 32×32 row ≥ 1.0× PyTorch",
            over(|r| r.size == 32, |m, _| m.torch.map(|t| m.ours / t)),
            |r| r >= 1.0,
            "×",
        ),
        every_row(
            "140×140 training ≥ 50 % of the f32 peak",
            over(|r| r.size == 140 && r.mode == Mode::Train, |m, peak| Some(100.0 * m.ours_gflops / peak)),
            |p| p >= 50.0,
            " %",
        ),
        every_row(
            "peak memory of every row ≤ PyTorch's",
            over(|_| true, |m, _| m.torch_peak.map(|t| m.ours_peak as f64 / t as f64)),
            |r| r <= 1.0,
            "× PyTorch's",
        ),
    ]
}

/// The targets as a Markdown section.
fn render_targets(targets: &[Target]) -> String {
    let mut md = String::from("## Targets of the CPU-speed issue, in this run\n\n");
    for t in targets {
        let verdict = if t.met { "met" } else { "not met" };
        md.push_str(&format!("- **{verdict}**: {} ({})\n", t.what, t.detail));
    }
    md
}

/// The rows of the bf16 comparison: both image sizes, training and inference.
const BF16_ROWS: &[Row] = &[
    row("resnet50", 32, 16, Mode::Train),
    row("senetv2_resnet50", 32, 16, Mode::Train),
    row("senetv2_resnet50", 140, 16, Mode::Train),
    row("senetv2_resnet50", 140, 16, Mode::Infer),
];

/// `bench-train --bf16`: our f32 and bf16 mixed precision beside PyTorch eager f32 and bf16
/// autocast, speed and peak memory, each row in a process of its own; writes
/// `results/train-speed-bf16.md`.
fn run_bf16(seconds: f64, torch: Option<TorchScript>, repeats: usize) -> Result<()> {
    let version = torch.as_ref().map(|t| t.matmul().map(|(_, v)| v)).transpose()?;
    let machine_peak = crate::peak::measure();
    let mut md = String::new();
    writeln!(md, "Rows and timing as in `results/train-speed.md` (random inputs, median step, each row in its own process; {}). *bf16* is `--precision bf16`: bf16 activations, f32 master weights (which our CPU convolutions and excitations take as they are, returning f32 weight gradients; other layers use bf16 copies), Adam state, BatchNorm statistics and loss; on the CPU our convolutions multiply bf16 with f32 sums (AMX tiles where the CPU has AMX-BF16, else AVX-512 BF16 dot products) where the products are large enough to repay packing, and every other kernel converts bf16 operands to f32 for the arithmetic and rounds each result once (bf16 storage, f32 compute). This run's convolutions multiply with {}. PyTorch bf16 is `torch.autocast(\"cpu\", dtype=torch.bfloat16)` around the forward and loss.\n", repeats_sentence(repeats), sae_kernels::Bf16Multiply::of_this_cpu().map_or("f32 instructions (this CPU has no bf16 multiplies, or `SAE_DISABLE_BF16_PRODUCTS` is set)", sae_kernels::Bf16Multiply::describe))?;
    match &version {
        Some(v) => writeln!(md, "PyTorch {v} measured in the same run.\n")?,
        None => writeln!(md, "PyTorch not measured in this run (pass `--python`).\n")?,
    }
    writeln!(md, "*peak MB* is each process's peak resident memory (VmHWM), and in brackets its rise above the resident memory before the model was built; *peak heap* is the most heap our row's process held at once from building the model to its last step, above what it held before, as xtask's counting allocator (`sae_train::allocator::Counting` around mimalloc) sees it: exact and the same from run to run, where the resident peak also holds what mimalloc keeps mapped and moves by a few % between runs.\n")?;
    writeln!(md, "| model | input | batch | mode | ours f32 img/s | ours bf16 img/s | bf16 / f32 | PyTorch f32 img/s | PyTorch bf16 img/s | ours bf16 / PyTorch bf16 | peak MB ours f32 | ours bf16 | PyTorch f32 | PyTorch bf16 | peak heap MiB ours f32 / bf16 |")?;
    writeln!(md, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut measured = Vec::new();
    for r in BF16_ROWS {
        // Our f32 and bf16, PyTorch's eager and autocast, in turn, each the fastest of its repeats.
        let ours = |precision| measure_ours(*r, Implementation::Fused, precision, seconds);
        let (mut f32_run, mut bf16_run) = (ours(Precision::F32)?, ours(Precision::Bf16)?);
        let mut torch_runs = torch
            .as_ref()
            .map(|t| Ok::<_, anyhow::Error>((t.row(*r, "eager")?, t.row(*r, "autocast_bf16")?)))
            .transpose()?;
        for _ in 1..repeats {
            f32_run = f32_run.fastest(ours(Precision::F32)?);
            bf16_run = bf16_run.fastest(ours(Precision::Bf16)?);
            if let (Some(t), Some((e, a))) = (&torch, &mut torch_runs) {
                *e = e.fastest(t.row(*r, "eager")?);
                *a = a.fastest(t.row(*r, "autocast_bf16")?);
            }
        }
        let ips = |t: &Timing| r.batch as f64 / t.step;
        eprintln!("{}: f32 {:.1} img/s, bf16 {:.1} img/s", r.label(), ips(&f32_run), ips(&bf16_run));
        measured.push(MeasuredBf16 {
            row: *r,
            f32: ips(&f32_run),
            bf16: ips(&bf16_run),
            torch_bf16: torch_runs.map(|(_, a)| a.images_per_second),
            f32_peak: f32_run.memory.peak,
            bf16_peak: bf16_run.memory.peak,
            f32_heap: f32_run.heap,
            bf16_heap: bf16_run.heap,
        });
        let (torch_f32, torch_bf16, ratio, mem_f32, mem_bf16) = match torch_runs {
            Some((e, a)) => (
                format!("{:.1}", e.images_per_second),
                format!("{:.1}", a.images_per_second),
                format!("**{:.2}×**", ips(&bf16_run) / a.images_per_second),
                e.memory.describe(),
                a.memory.describe(),
            ),
            None => ("—".into(), "—".into(), "—".into(), "—".into(), "—".into()),
        };
        let mode = if r.mode == Mode::Train { "train" } else { "inference" };
        writeln!(
            md,
            "| {} | {}×{} | {} | {mode} | {:.1} | {:.1} | **{:.2}×** | {torch_f32} | {torch_bf16} | {ratio} | {} | {} | {mem_f32} | {mem_bf16} | {:.1} / {:.1} |",
            r.model, r.size, r.size, r.batch, ips(&f32_run), ips(&bf16_run), ips(&bf16_run) / ips(&f32_run),
            f32_run.memory.describe(), bf16_run.memory.describe(), mib(f32_run.heap), mib(bf16_run.heap),
        )?;
    }
    writeln!(md, "\n{}", render_targets(&bf16_targets(&measured)))?;
    // The peak again after the rows, the higher kept (as in `run`).
    let md = report_header("bf16 mixed precision on CPU", &machine_peak.higher(crate::peak::measure()))? + &md;
    let out = project_root().join("results/train-speed-bf16.md");
    sae_fs::write_atomic(&out, md.as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// What one row of the bf16 report measured, for the targets: images/s, peak resident
/// memory and heap peak (bytes) of our f32 and bf16 runs, and PyTorch's bf16 autocast images/s.
#[derive(Debug, Clone, Copy)]
struct MeasuredBf16 {
    row: Row,
    f32: f64,
    bf16: f64,
    torch_bf16: Option<f64>,
    f32_peak: u64,
    bf16_peak: u64,
    f32_heap: u64,
    bf16_heap: u64,
}

/// The bf16 targets of the CPU-speed issue: training in bf16 at least as fast as our f32 and
/// with lower peak memory, and every row at least as fast as PyTorch's bf16 autocast. Peak
/// memory is judged twice: on the resident peak, and on the heap peak, which is exact (at
/// 32×32 bf16 saves ~2 % of the heap, less than the resident peak moves between runs).
fn bf16_targets(rows: &[MeasuredBf16]) -> Vec<Target> {
    let training = || rows.iter().filter(|m| m.row.mode == Mode::Train);
    vec![
        every_row(
            "bf16 training ≥ our f32 training",
            training().map(|m| (m.row, Some(m.bf16 / m.f32))),
            |r| r >= 1.0,
            "×",
        ),
        every_row(
            "bf16 training's peak memory < our f32's",
            training().map(|m| (m.row, Some(m.bf16_peak as f64 / m.f32_peak as f64))),
            |r| r < 1.0,
            "×",
        ),
        every_row(
            "bf16 training's peak heap < our f32's",
            training().map(|m| (m.row, Some(m.bf16_heap as f64 / m.f32_heap as f64))),
            |r| r < 1.0,
            "×",
        ),
        every_row(
            "every bf16 row ≥ PyTorch's bf16 autocast",
            rows.iter().map(|m| (m.row, m.torch_bf16.map(|t| m.bf16 / t))),
            |r| r >= 1.0,
            "×",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_keep_the_fastest_run_and_the_highest_peak_memory() {
        let ours = |step, peak| Timing { step, memory: Memory { baseline: 1, peak }, ..Default::default() };
        let best = ours(2.0, 10).fastest(ours(1.5, 7)).fastest(ours(1.8, 12));
        assert_eq!((best.step, best.memory.peak), (1.5, 12));
        let torch = |ips, peak| TorchRow { images_per_second: ips, params: 3, memory: Memory { baseline: 1, peak } };
        let best = torch(10.0, 5).fastest(torch(12.0, 4));
        assert_eq!((best.images_per_second, best.memory.peak), (12.0, 5));
    }

    /// A Keras row builds the reproduction presets' network: a bias on every convolution (the
    /// 7×7 stem's 64, and per bottleneck stage 10 × its width: 1×1, 3×3, 1×1 to 4×, and the 4×
    /// projection) and Keras's BatchNorm ε.
    #[test]
    fn a_keras_row_adds_the_convolution_biases() {
        let plain = row("senetv2_resnet14b", 32, 32, Mode::Train);
        let keras = keras_row("senetv2_resnet14b", 32, 32);
        let (p, k) = (plain.config().unwrap(), keras.config().unwrap());
        assert!(!p.conv_bias && k.conv_bias && k.bn_eps == 1.001e-5);
        let count = |c: &sae_models::ModelConfig| c.param_counts().unwrap().trainable;
        assert_eq!(count(&k) - count(&p), 64 + 10 * (64 + 128 + 256 + 512));
        assert_eq!(
            (plain.model_name(), keras.label()),
            ("senetv2_resnet14b".into(), "senetv2_resnet14b (Keras) 32px batch 32 Train".into())
        );
    }

    fn measured(
        model: &'static str,
        size: usize,
        mode: Mode,
        ours: f64,
        torch: f64,
        gflops: f64,
        mem: (u64, u64),
    ) -> Measured {
        Measured {
            row: row(model, size, 16, mode),
            ours,
            torch: Some(torch),
            ours_gflops: gflops,
            ours_peak: mem.0,
            torch_peak: Some(mem.1),
        }
    }

    /// Each f32 target is judged on its own rows and threshold: a 140×140 row at 1.29×
    /// fails the 1.3× target while a 32×32 row at exactly 1.0× passes its own; 50 % of peak
    /// is computed against the machine's peak, not the gemm rate.
    #[test]
    fn the_f32_targets_follow_the_numbers() {
        let rows = [
            measured("resnet50", 32, Mode::Train, 100.0, 100.0, 20.0, (5, 10)),
            measured("resnet50", 140, Mode::Train, 12.9, 10.0, 99.0, (5, 10)),
            measured("senetv2_resnet50", 224, Mode::Infer, 20.0, 10.0, 150.0, (11, 10)),
        ];
        let targets = f32_targets(&rows, Gemm { ours: 170.0, torch: Some(180.0), machine: 200.0 });
        let verdicts: Vec<(bool, &str)> = targets.iter().map(|t| (t.met, t.detail.as_str())).collect();
        assert_eq!(
            verdicts,
            [
                (true, "85 %"),
                (false, "170 vs 180 GFLOP/s"),
                (false, "1 of 2 rows short: resnet50 140×140 batch 16 Train: 1.29×"),
                (true, "all 1 rows"),
                (false, "1 of 1 rows short: resnet50 140×140 batch 16 Train: 49.50 %"),
                (false, "1 of 3 rows short: senetv2_resnet50 224×224 batch 16 Infer: 1.10× PyTorch's"),
            ]
        );
        let md = render_targets(&targets);
        assert!(md.contains("- **met**: sgemm 2048³ ≥ 80 % of the measured f32 peak (85 %)"), "{md}");
    }

    /// Without PyTorch in the run, its targets are not met and say so (never "all 0 rows").
    #[test]
    fn targets_without_pytorch_are_not_measured() {
        let mut m = measured("resnet50", 32, Mode::Train, 100.0, 1.0, 20.0, (5, 10));
        (m.torch, m.torch_peak) = (None, None);
        let targets = f32_targets(&[m], Gemm { ours: 170.0, torch: None, machine: 200.0 });
        let about_pytorch: Vec<&Target> = targets.iter().filter(|t| t.what.contains("PyTorch")).collect();
        assert_eq!(about_pytorch.len(), 4);
        for t in about_pytorch {
            assert!(!t.met && t.detail == "not measured in this run", "{}: {}", t.what, t.detail);
        }
    }

    /// bf16 speed and memory are judged on training rows only; the PyTorch comparison on all.
    #[test]
    fn the_bf16_targets_follow_the_numbers() {
        let m = |mode, f32, bf16, torch, mem: (u64, u64), heap: (u64, u64)| MeasuredBf16 {
            row: row("senetv2_resnet50", 140, 16, mode),
            f32,
            bf16,
            torch_bf16: Some(torch),
            f32_peak: mem.0,
            bf16_peak: mem.1,
            f32_heap: heap.0,
            bf16_heap: heap.1,
        };
        let rows =
            [m(Mode::Train, 10.0, 10.0, 9.0, (10, 7), (5, 5)), m(Mode::Infer, 30.0, 20.0, 25.0, (10, 12), (5, 6))];
        let verdicts: Vec<(bool, String)> = bf16_targets(&rows).into_iter().map(|t| (t.met, t.detail)).collect();
        assert_eq!(
            verdicts,
            [
                (true, "all 1 rows".to_string()),
                (true, "all 1 rows".to_string()),
                (false, "1 of 1 rows short: senetv2_resnet50 140×140 batch 16 Train: 1.00×".to_string()),
                (false, "1 of 2 rows short: senetv2_resnet50 140×140 batch 16 Infer: 0.80×".to_string()),
            ]
        );
    }
}

//! The project's task runner (see <https://github.com/matklad/cargo-xtask/>): `cargo xtask ci`,
//! `params`, `peak`, `bench-kernels`, `bench-data`, `bench-dist`, `bench-train`, `gpu-check`,
//! `reproduce-table2|3|4`; `cargo xtask` lists them.

mod bench;
mod bench_data;
mod bench_dist;
mod bench_layers;
mod bench_train;
mod gpu_check;
mod peak;
mod ptx;
mod reproduce;
mod tidy;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

/// mimalloc instead of glibc's malloc, as in the `sae` binary (see there): the benchmarks
/// measure what users run. Counted, for `step-heap` (a few relaxed atomic adds per
/// allocation; a training step makes a few thousand).
#[global_allocator]
static ALLOCATOR: sae_train::allocator::Counting<mimalloc::MiMalloc> =
    sae_train::allocator::Counting(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tasks of the sae workspace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What to run before pushing: fmt --check, clippy -D warnings, all tests, the multi-process
    /// tests under mpirun (skipped without OpenMPI unless SAE_REQUIRE_MPI=1), tidy, the GPU
    /// check's runner on the CPU (`gpu-check --run --device cpu --smoke`), bench-layers and
    /// step-heap on small inputs, and the CUDA kernels
    /// compiled to PTX (skipped without nvcc unless SAE_REQUIRE_NVCC=1).
    Ci,
    /// Checks that every crate and module starts with a `//!` doc comment.
    Tidy,
    /// Compiles every CUDA kernel to PTX for sm_90 and sm_80 (needs nvcc, no GPU).
    Ptx,
    /// Parameter counts (PyTorch trainable and the paper's Keras convention) of every
    /// registered model at 10, 20 and 100 classes, and MACs at 224×224.
    Params {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prints this CPU's kernel-relevant flags, its measured peak FMA throughput (f32, and bf16
    /// dot products where present) on all threads, and the sgemm rate our convolutions reach.
    Peak,
    /// Measures data parallelism on this machine (needs OpenMPI): the all-reduce of a ResNet-50
    /// gradient between two processes, and training images/s of 1 process × 2 threads against
    /// 2 processes × 1 thread on real CIFAR-10; writes `results/distributed.md`.
    BenchDist {
        /// CIFAR-10 binary directory (default: ../shared/datasets/cifar-10-batches-bin).
        #[arg(long)]
        cifar10: Option<PathBuf>,
        /// Training images of the timed epoch.
        #[arg(long, default_value_t = 1024)]
        images: usize,
        /// Batch per process (the single process gets twice this).
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Measures the data pipeline's images/s on real data and writes `results/data.md`.
    BenchData {
        /// CIFAR-10 binary directory (default: ../shared/datasets/cifar-10-batches-bin).
        #[arg(long)]
        cifar10: Option<PathBuf>,
        /// ImageNet-style folder of JPEGs (default: ../shared/datasets/imagenette-250/train).
        #[arg(long)]
        folder: Option<PathBuf>,
    },
    /// Table 2 of the paper (CIFAR-10): trains or reuses runs, writes results/table2.md.
    ReproduceTable2(ReproduceArgs),
    /// Table 3 of the paper (CIFAR-100): trains or reuses runs, writes results/table3.md.
    ReproduceTable3(ReproduceArgs),
    /// Table 4 of the paper (ImageNet-style folder): trains or reuses runs, writes results/table4.md.
    ReproduceTable4(ReproduceArgs),
    /// Training-step and inference images/s of the paper's models, ours vs Candle's own ops
    /// vs PyTorch eager (when `--python` is given), written to `results/train-speed.md`.
    BenchTrain {
        /// Minimum measuring time per row and implementation, in seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// A Python interpreter with torch installed, to run `bench/pytorch/bench_train.py`.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Instead: f32 against `--precision bf16` (and PyTorch's bf16 autocast), written to
        /// `results/train-speed-bf16.md`.
        #[arg(long)]
        bf16: bool,
        /// Measurements per row and side, ours and PyTorch's in turn; each side's fastest
        /// counts. More than one steadies the ratios on a machine whose speed drifts.
        #[arg(long, default_value_t = 1)]
        repeats: usize,
    },
    /// Builds the CUDA check runner into `target/gpu/` (`xtask.gz` and `gpu-check.sh`, which
    /// starts it; needs nvcc, no GPU); with `--run`, runs it on a machine with an NVIDIA GPU: every op's parity with the CPU, 50 training
    /// steps per model family, the excitation's bandwidth and senetv2_resnet50's images/s next
    /// to PyTorch; writes OUT/gpu.md (commit it as results/gpu.md).
    GpuCheck {
        /// Run the checks (on the GPU machine) instead of building the runner.
        #[arg(long)]
        run: bool,
        /// `cuda`, or `cpu` to exercise the runner here.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Small sizes and short timings (CI runs the runner this way on the CPU).
        #[arg(long)]
        smoke: bool,
        /// Where gpu.md goes.
        #[arg(long, default_value = "target/gpu-check-report")]
        out: PathBuf,
        /// Python with PyTorch (default on CUDA: python3).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// The heap of the first three training steps (random inputs, Keras Adam) as this
    /// process's allocator counts it: held before, peak, and bytes and allocations made.
    /// Exact and repeatable, where bench-train's resident peaks move by ±15 MB.
    StepHeap {
        /// A model of bench-train's rows (resnet50, seresnet50, senetv2_resnet50, …).
        model: String,
        /// Input size (height = width).
        #[arg(long, default_value_t = 32)]
        size: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: sae_models::Precision,
        /// fused (ours) or reference (Candle's own ops).
        #[arg(long, default_value = "fused")]
        kernels: sae_kernels::Implementation,
    },
    /// One row of bench-train, measured in this process (bench-train runs each row this way).
    #[command(hide = true)]
    BenchTrainRow { args: Vec<String> },
    /// Every convolution of ResNet-50 one at a time, forward and backward, ours in f32 next to
    /// PyTorch eager; writes `results/conv-layers.md`.
    BenchLayers {
        /// Input size (height = width) of the network the layers are taken from.
        #[arg(long, default_value_t = 140)]
        size: usize,
        /// Batch size.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Minimum measuring time per layer, pass and side, in seconds.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Measurements per layer and side, ours and PyTorch's in turn; each side's fastest
        /// counts.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// A Python interpreter with torch installed, to run `bench/pytorch/bench_layers.py`.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Only the layers whose name contains this (`layer4`, `conv2`, `stem`, …).
        #[arg(long)]
        only: Option<String>,
        /// bf16 inputs with f32 master weights, as in `--precision bf16` training, beside
        /// PyTorch's bf16 autocast.
        #[arg(long)]
        bf16: bool,
        /// Where the report goes [default: results/conv-layers.md, or
        /// results/conv-layers-bf16.md with --bf16].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Runs the kernel benchmarks and writes `results/kernels.md`.
    BenchKernels {
        /// Criterion's measurement time per benchmark, in seconds.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
}

#[derive(clap::Args)]
struct ReproduceArgs {
    /// Dataset directory (CIFAR binary layout, or a folder with train/ and val/); default: the
    /// shared datasets beside the repository where they exist, else CIFAR-10/100 downloaded
    /// from the Hugging Face Hub into its cache (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE apply).
    #[arg(long)]
    data: Option<PathBuf>,
    /// `paper` (the article's settings), `cpu` (scaled for a 2-core CPU) or `smoke` (minutes).
    #[arg(long, value_enum, default_value_t = reproduce::PresetName::Cpu)]
    preset: reproduce::PresetName,
    /// Seeds, comma-separated; one run per model and seed. Default: the preset's (cpu: 0–19
    /// for Tables 2 and 3, 0–9 for Table 4; paper and smoke: 0).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// CIFAR-100 label set: `coarse` (20, the paper's heads) or `fine` (100).
    #[arg(long, value_enum, default_value_t = reproduce::Labels::Coarse)]
    labels: reproduce::Labels,
    /// `cpu`, `cuda` or `metal`.
    #[arg(long, value_enum, default_value_t = reproduce::DeviceName::Cpu)]
    device: reproduce::DeviceName,
    /// `f32`, or `bf16` mixed precision; bf16 runs and reports go to `runs/tableN/PRESET-bf16`
    /// and `results/tableN-bf16.md`.
    #[arg(long, default_value = "f32")]
    precision: sae_models::Precision,
    /// Where runs go (default runs/tableN).
    #[arg(long)]
    runs: Option<PathBuf>,
}

fn reproduce(table: reproduce::Table, number: u8, args: ReproduceArgs) -> Result<()> {
    let root = project_root();
    let data = match args.data {
        Some(d) => d,
        None => reproduce::default_data(table, &root)?,
    };
    let opts = reproduce::Options {
        data,
        preset: args.preset,
        seeds: args.seeds,
        labels: args.labels,
        device: args.device,
        precision: args.precision,
        runs: args.runs.unwrap_or_else(|| root.join(format!("runs/table{number}"))),
        out: root.join(match args.precision {
            sae_models::Precision::F32 => format!("results/table{number}.md"),
            p => format!("results/table{number}-{p}.md"),
        }),
        command: std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
    };
    reproduce::reproduce(table, &opts).map(|_| ())
}

/// The workspace root (the parent of this crate's directory).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs `cargo ARGS` in the project root, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo).args(args).current_dir(project_root()).status().context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "))
    }
    Ok(())
}

fn params(json: bool) -> Result<()> {
    const CLASSES: [usize; 3] = [10, 20, 100];
    let mut rows = Vec::new();
    for name in sae_models::list() {
        let mut counts = Vec::new();
        for classes in CLASSES {
            let c = sae_models::config(name, classes)?.param_counts()?;
            counts.push((classes, c));
        }
        let model = sae_models::Model::new(sae_models::config(name, 1000)?, 0, &candle_core::Device::Cpu)?;
        rows.push((name, counts, model.macs(224, 224)));
    }
    if json {
        let value: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, counts, macs)| {
                serde_json::json!({
                    "model": name,
                    "macs_224_1000_classes": macs,
                    "params": counts.iter().map(|(classes, c)| serde_json::json!({
                        "num_classes": classes, "trainable": c.trainable, "keras": c.keras,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "{:<26} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}",
            "model", "torch@10", "keras@10", "torch@20", "keras@20", "torch@100", "keras@100", "GMACs@224"
        );
        for (name, counts, macs) in rows {
            print!("{name:<26}");
            for (_, c) in counts {
                print!(" {:>12} {:>12}", c.trainable, c.keras);
            }
            println!(" {:>10.3}", macs as f64 / 1e9);
        }
        println!("\ntorch: trainable parameters, PyTorch style (no conv bias, BatchNorm weight+bias).");
        println!("keras: the paper's convention (conv biases on ResNets, all four BatchNorm vectors).");
        println!("GMACs: convolution and dense multiply-accumulates for one 224×224 image, 1000 classes.");
    }
    Ok(())
}

/// Whether OpenMPI's `mpirun` is installed.
pub fn has_mpirun() -> bool {
    Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The `mpi` feature's clippy and its multi-process tests (`mpirun -np 2`), when OpenMPI is
/// installed; without it they are skipped, unless `SAE_REQUIRE_MPI=1` (CI sets it).
fn mpi_check() -> Result<()> {
    if !has_mpirun() {
        if std::env::var("SAE_REQUIRE_MPI").is_ok_and(|v| v == "1") {
            bail!("SAE_REQUIRE_MPI=1 but there is no mpirun (install OpenMPI: openmpi-bin libopenmpi-dev libclang-dev)")
        }
        eprintln!("mpi: skipped, no mpirun found (install OpenMPI to run the multi-process tests)");
        return Ok(());
    }
    cargo(&[
        "clippy",
        "-p",
        "sae-train",
        "-p",
        "sae-cli",
        "--all-targets",
        "--features",
        "mpi",
        "--",
        "-D",
        "warnings",
    ])?;
    // One test at a time: each runs two ranks, which is all the cores of a CI machine.
    cargo(&["test", "-p", "sae-cli", "--features", "mpi", "--test", "mpi", "--", "--test-threads", "1"])
}

fn main() -> Result<()> {
    sae_kernels::shorten_candle_spin();
    sae_train::allocator::keep_freed_memory();
    let cli = Cli::parse();
    std::env::set_current_dir(project_root())?;
    match cli.command {
        Cmd::Ci => {
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            cargo(&["test", "--workspace"])?;
            mpi_check()?;
            tidy::check(&project_root())?;
            // The GPU runner's code, on the CPU with small sizes (PyTorch too where the interop
            // tests' Python is set), so that it works when a GPU session comes.
            gpu_check::run(&gpu_check::RunOptions {
                device: "cpu".into(),
                smoke: true,
                out: project_root().join("target/gpu-check-smoke"),
                python: std::env::var_os("SAE_TORCH_PYTHON").map(PathBuf::from),
            })?;
            // bench-layers on ResNet-50 at 32×32 (1×1 images in layer 4), batch 2, one quick
            // timing per layer and side, in f32 and bf16.
            for bf16 in [false, true] {
                bench_layers::run(&bench_layers::Options {
                    size: 32,
                    batch: 2,
                    seconds: 0.0,
                    repeats: 1,
                    python: std::env::var_os("SAE_TORCH_PYTHON").map(PathBuf::from),
                    only: None,
                    bf16,
                    out: project_root().join("target/bench-layers-smoke").join(bench_layers::report_name(bf16)),
                })?;
            }
            // step-heap on a small model: the command runs, and its counters count.
            let kernels = sae_kernels::Implementation::Fused;
            let heap = bench_train::step_heap("senetv2_resnet14b", 32, 2, kernels, sae_models::Precision::F32)?;
            if heap.allocations == 0 || heap.peak <= heap.before {
                bail!("step-heap counted nothing: {heap:?}");
            }
            ptx::check(&project_root())
        }
        Cmd::Tidy => tidy::check(&project_root()),
        Cmd::Ptx => ptx::check(&project_root()),
        Cmd::Params { json } => params(json),
        Cmd::BenchKernels { seconds } => bench::kernels(seconds),
        Cmd::BenchLayers { size, batch, seconds, repeats, python, only, bf16, out } => {
            let out = out.unwrap_or_else(|| PathBuf::from("results").join(bench_layers::report_name(bf16)));
            bench_layers::run(&bench_layers::Options { size, batch, seconds, repeats, python, only, bf16, out })
        }
        Cmd::GpuCheck { run: false, .. } => gpu_check::build(&project_root()),
        Cmd::GpuCheck { run: true, device, smoke, out, python } => {
            gpu_check::run(&gpu_check::RunOptions { device, smoke, out, python })
        }
        Cmd::BenchTrain { seconds, python, bf16, repeats } => bench_train::run(seconds, python, bf16, repeats),
        Cmd::BenchTrainRow { args } => bench_train::row_in_this_process(&args),
        Cmd::StepHeap { model, size, batch, precision, kernels } => {
            bench_train::step_heap(&model, size, batch, kernels, precision).map(drop)
        }
        Cmd::ReproduceTable2(a) => reproduce(reproduce::Table::Two, 2, a),
        Cmd::ReproduceTable3(a) => reproduce(reproduce::Table::Three, 3, a),
        Cmd::ReproduceTable4(a) => reproduce(reproduce::Table::Four, 4, a),
        Cmd::BenchData { cifar10, folder } => bench_data::run(cifar10, folder),
        Cmd::Peak => {
            let p = peak::measure();
            println!("CPU: {}", bench::machine());
            println!("flags: {}", peak::cpu_flags().join(" "));
            println!("peak f32 ({}): {:.1} GFLOP/s", p.f32_isa, p.f32_gflops);
            match p.bf16_gflops {
                Some(g) => println!("peak bf16 dot products: {g:.1} GFLOP/s"),
                None => println!("peak bf16 dot products: none (no AVX512-BF16)"),
            }
            if let Some(g) = p.amx_gflops {
                println!("peak bf16 AMX tiles: {g:.1} GFLOP/s");
            }
            for (dtype, name) in [(candle_core::DType::F32, "sgemm"), (candle_core::DType::BF16, "bf16")] {
                let gflops = bench_train::gemm_gflops(dtype)?;
                println!(
                    "{name} 2048³ through our 1×1 convolution: {gflops:.1} GFLOP/s ({:.0} % of the f32 peak)",
                    100.0 * gflops / p.f32_gflops
                );
            }
            Ok(())
        }
        Cmd::BenchDist { cifar10, images, batch } => bench_dist::run(cifar10, images, batch),
    }
}

#[cfg(test)]
mod tests {
    use sae_train::allocator::measure;

    /// This binary's allocator counts (`step-heap` reads its counters).
    #[test]
    fn the_allocator_counts_what_a_closure_allocates_and_frees() {
        let (heap, len) = measure(|| {
            let a = vec![1u8; 3 << 20];
            let b = vec![2u8; 1 << 20];
            drop(a);
            let c = vec![3u8; 1 << 20];
            b.len() + c.len()
        });
        assert_eq!(len, 2 << 20);
        // Other test threads may allocate meanwhile: bounds, not equalities.
        assert!(heap.allocated >= 5 << 20, "{heap:?}");
        assert!(heap.allocations >= 3, "{heap:?}");
        assert!(heap.peak >= heap.before + (4 << 20), "{heap:?}");
    }
}

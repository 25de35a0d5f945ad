//! `cargo xtask bench-dist`: what data parallelism costs on this machine, written to
//! `results/distributed.md`. It builds `sae` with the `mpi` feature (OpenMPI must be
//! installed) and, in one call:
//! - times the gradient all-reduce of a ResNet-50 (25.6 M floats) and of one float (latency)
//!   between two processes (`mpirun -np 2 sae allreduce-bench`);
//! - trains the same epoch of real CIFAR-10 as 1 process × 2 threads (batch 2b) and as
//!   2 processes × 1 thread (batch b each, with and without synchronised BatchNorm), and
//!   compares their images/s;
//! - extrapolates to 8 and 64 ranks with the ring all-reduce model (ARCHITECTURE.md).

use crate::{bench::machine, cargo, project_root};
use anyhow::{bail, Context, Result};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const RESNET50_PARAMS: usize = 25_557_032;

fn mpirun(sae: &Path, threads: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.args(["-np", "2", "--oversubscribe", "--mca", "btl_vader_single_copy_mechanism", "none"]);
    cmd.args(["-x", &format!("RAYON_NUM_THREADS={threads}")]);
    cmd.arg(sae).args(args);
    cmd
}

fn output(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{what}: running {cmd:?} (is OpenMPI installed?)"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (seconds, bus GB/s) of `mpirun -np 2 sae allreduce-bench`.
fn all_reduce(sae: &Path, elements: usize, repeats: usize) -> Result<(f64, f64)> {
    let (e, r) = (elements.to_string(), repeats.to_string());
    let line = output(mpirun(sae, 1, &["allreduce-bench", "--elements", &e, "--repeats", &r]), "all-reduce")?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).context("allreduce-bench output")?;
    Ok((v["seconds"].as_f64().unwrap_or(f64::NAN), v["bus_gb_per_s"].as_f64().unwrap_or(f64::NAN)))
}

/// Training images/s of the run in `dir` (its only epoch).
fn images_per_second(dir: &Path) -> Result<f64> {
    let rows = sae_train::read_summary(dir)?;
    rows.first().map(|r| r.images_per_second).context("the run wrote no epoch")
}

pub fn run(cifar: Option<PathBuf>, images: usize, batch: usize) -> Result<()> {
    let root = project_root();
    let cifar = cifar.unwrap_or_else(|| root.join("../shared/datasets/cifar-10-batches-bin"));
    if !cifar.join("data_batch_1.bin").is_file() {
        bail!("no CIFAR-10 binary batches in {} (pass --cifar10 DIR)", cifar.display());
    }
    cargo(&["build", "--release", "-p", "sae-cli", "--features", "mpi"])?;
    let sae = root.join("target/release/sae");

    eprintln!("bench-dist: all-reduce of {RESNET50_PARAMS} floats and of 1");
    let (big_s, bus) = all_reduce(&sae, RESNET50_PARAMS, 10)?;
    let (latency, _) = all_reduce(&sae, 1, 200)?;

    let scratch = std::env::temp_dir().join(format!("sae-bench-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let (n, eval) = (images.to_string(), "500".to_string());
    let train_args = |out: &Path, batch: usize| -> Vec<String> {
        let args = [
            "train",
            "--model",
            "senetv2_resnet18",
            "--stem",
            "cifar",
            "--data",
            cifar.to_str().unwrap_or_default(),
            "--input-size",
            "32",
            "--train-images",
            &n,
            "--eval-images",
            &eval,
            "--epochs",
            "1",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--batch-size",
            &batch.to_string(),
            "--out",
            out.to_str().unwrap_or_default(),
        ];
        args.iter().map(|a| a.to_string()).collect()
    };
    let mut rows = Vec::new();
    eprintln!("bench-dist: 1 process × 2 threads, batch {}", 2 * batch);
    let one = scratch.join("one");
    let mut cmd = Command::new(&sae);
    cmd.env("RAYON_NUM_THREADS", "2").args(train_args(&one, 2 * batch));
    output(cmd, "single-process training")?;
    rows.push(("1 process × 2 threads", format!("{}", 2 * batch), images_per_second(&one)?));
    for sync in [false, true] {
        eprintln!("bench-dist: 2 processes × 1 thread, batch {batch} each{}", if sync { ", sync BN" } else { "" });
        let dir = scratch.join(if sync { "two-sync" } else { "two" });
        let mut args = train_args(&dir, batch);
        if sync {
            args.push("--sync-bn".into());
        }
        output(mpirun(&sae, 1, &args.iter().map(String::as_str).collect::<Vec<_>>()), "2-process training")?;
        let label = if sync { "2 processes × 1 thread, sync BN" } else { "2 processes × 1 thread" };
        rows.push((label, format!("{batch} × 2"), images_per_second(&dir)?));
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let mut md = String::new();
    writeln!(md, "# Data-parallel training on one machine\n")?;
    writeln!(md, "Made by `cargo xtask bench-dist` on {} (OpenMPI over shared memory, one call).\n", machine())?;
    writeln!(md, "## Gradient all-reduce (`mpirun -np 2 sae allreduce-bench`)\n")?;
    writeln!(md, "| buffer | median time | bus bandwidth |")?;
    writeln!(md, "|---|---:|---:|")?;
    writeln!(
        md,
        "| ResNet-50 gradient, {RESNET50_PARAMS} f32 ({:.0} MB) | {:.1} ms | {bus:.2} GB/s |",
        RESNET50_PARAMS as f64 * 4e-6,
        big_s * 1e3
    )?;
    writeln!(md, "| 1 f32 (latency α) | {:.1} µs | — |\n", latency * 1e6)?;
    writeln!(md, "## Training, senetv2_resnet18 (CIFAR stem), real CIFAR-10 32×32, {images} images, SGD\n")?;
    writeln!(md, "| processes × threads | batch | images/s | vs 1 × 2 |")?;
    writeln!(md, "|---|---|---:|---:|")?;
    let base = rows[0].2;
    for (label, batch, ips) in &rows {
        writeln!(md, "| {label} | {batch} | {ips:.1} | {:.2}× |", ips / base)?;
    }
    // Ring all-reduce: 2(W − 1) steps of S/W bytes each, every step paying the latency α.
    let bytes = RESNET50_PARAMS as f64 * 4.0;
    let ring =
        |w: f64, gb_per_s: f64, alpha: f64| 2.0 * (w - 1.0) / w * bytes / (gb_per_s * 1e9) + 2.0 * (w - 1.0) * alpha;
    writeln!(md, "\n## Expected all-reduce time of a ResNet-50 gradient at more ranks\n")?;
    writeln!(
        md,
        "The ring all-reduce model `T(W) = 2(W−1)/W · S/B + 2(W−1)·α` (S = {:.0} MB), with B the bus bandwidth and α \
         the latency measured above (shared memory), and with a 100 Gb/s network (B = 12.5 GB/s, α = 5 µs):\n",
        bytes / 1e6
    )?;
    writeln!(md, "| ranks | shared memory (measured B, α) | 100 Gb/s network |")?;
    writeln!(md, "|---:|---:|---:|")?;
    for w in [2.0, 8.0, 64.0] {
        writeln!(md, "| {w} | {:.1} ms | {:.1} ms |", ring(w, bus, latency) * 1e3, ring(w, 12.5, 5e-6) * 1e3)?;
    }
    writeln!(
        md,
        "\nThe time per rank tends to `2·S/B` as W grows: the all-reduce costs about the same at 64 ranks as at 8, \
         while each rank's compute per step stays that of its own batch; the step waits for the all-reduce after \
         backward (no overlap), so scaling efficiency is `compute / (compute + T(W))`."
    )?;
    let path = root.join("results/distributed.md");
    sae_fs::write_atomic(&path, md.as_bytes())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

//! Compiles the CUDA kernel sources to PTX with nvcc, and fully to SASS (`-cubin`, through
//! ptxas, with spills and local memory reported as errors), so a syntax, type, register or
//! resource error in a kernel fails CI even on machines without a GPU, and type-checks the Rust side of the `cuda`
//! feature (the launchers in `sae-kernels/src/excitation/cuda.rs`, its CUDA tests and the models on top)
//! with `cargo clippy --features cuda`, which builds Candle's own CUDA kernels with the same
//! nvcc but links nothing. nvcc is `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`. Without nvcc
//! the check is skipped, unless `SAE_REQUIRE_NVCC=1` (CI sets it).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// GPU architectures checked: Hopper (the H100/H200 machines) and Ampere.
const ARCHS: [&str; 2] = ["sm_90", "sm_80"];

pub(crate) fn nvcc() -> Option<PathBuf> {
    let candidates = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")).into_iter();
    let candidates = candidates.chain(std::iter::once(PathBuf::from("nvcc")));
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

pub fn check(root: &Path) -> Result<()> {
    let Some(nvcc) = nvcc() else {
        if std::env::var("SAE_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
            bail!("SAE_REQUIRE_NVCC=1 but no nvcc was found (set CUDA_HOME)")
        }
        eprintln!("ptx: skipped, no nvcc found (set CUDA_HOME to check the CUDA kernels)");
        return Ok(());
    };
    let mut sources = Vec::new();
    for krate in std::fs::read_dir(root.join("crates"))?.flatten() {
        let dir = krate.path().join("src/cuda");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            sources.extend(entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "cu")));
        }
    }
    sources.sort();
    let out_dir = root.join("target/ptx-check");
    std::fs::create_dir_all(&out_dir)?;
    for src in &sources {
        for arch in ARCHS {
            let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
            let out = out_dir.join(format!("{stem}.{arch}.ptx"));
            let status = Command::new(&nvcc)
                .args(["--ptx", "-std=c++17", "-O3", "-Werror", "all-warnings", &format!("-arch={arch}"), "-o"])
                .arg(&out)
                .arg(src)
                .status()
                .with_context(|| format!("running {}", nvcc.display()))?;
            if !status.success() {
                bail!("nvcc failed on {} for {arch}", src.display())
            }
            let ptx = std::fs::read_to_string(&out)?;
            // SASS: ptxas allocates registers and shared memory for the real architecture.
            let cubin = Command::new(&nvcc)
                .args(["-cubin", "-std=c++17", "-O3", &format!("-arch={arch}"), "--resource-usage"])
                .args(["-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror", "-o"])
                .arg(out.with_extension("cubin"))
                .arg(src)
                .output()
                .with_context(|| format!("running {}", nvcc.display()))?;
            let report = String::from_utf8_lossy(&cubin.stderr);
            if !cubin.status.success() {
                bail!("ptxas failed on {} for {arch}:\n{report}", src.display())
            }
            let registers = report
                .lines()
                .filter_map(|l| l.split("Used ").nth(1)?.split(' ').next()?.parse::<u32>().ok())
                .max()
                .unwrap_or(0);
            eprintln!(
                "ptx: {} for {arch}: {} kernels, SASS at most {registers} registers per thread, no spills",
                src.strip_prefix(root).unwrap_or(src).display(),
                ptx.matches(".entry").count()
            );
        }
    }
    if sources.is_empty() {
        bail!("no CUDA sources found under crates/*/src/cuda")
    }
    check_cuda_feature(root, &nvcc)
}

/// `cargo clippy --features cuda` on the crates with CUDA code, in its own target directory.
fn check_cuda_feature(root: &Path, nvcc: &Path) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // With OpenMPI present, the NCCL backend of data-parallel training (which needs MPI to
    // start) is type-checked too.
    let features = match crate::has_mpirun() {
        true => "sae-kernels/cuda,sae-models/cuda,sae-train/nccl,sae-cli/nccl",
        false => "sae-kernels/cuda,sae-models/cuda,sae-train/cuda,sae-cli/cuda",
    };
    cmd.current_dir(root).args([
        "clippy",
        "-p",
        "sae-kernels",
        "-p",
        "sae-models",
        "-p",
        "sae-train",
        "-p",
        "sae-cli",
        "--features",
        features,
        "--tests",
        "--target-dir",
        "target/cuda-check",
        "--",
        "-D",
        "warnings",
    ]);
    cuda_env(&mut cmd, nvcc)?;
    eprintln!("ptx: cargo clippy --features {features} (builds Candle's CUDA kernels; slow the first time)");
    let status = cmd.status().context("running cargo clippy --features cuda")?;
    if !status.success() {
        bail!("cargo clippy --features cuda failed")
    }
    Ok(())
}

/// What a cargo build with the `cuda` feature needs: `nvcc`'s directory on `PATH`, `CUDA_HOME`
/// and its headers for Candle's kernels, and a compute capability when no GPU is present
/// (`CUDA_COMPUTE_CAP`, default 90 here).
pub(crate) fn cuda_env(cmd: &mut Command, nvcc: &Path) -> Result<()> {
    let bin = nvcc.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(bin) = bin {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(paths)?);
        if let Some(home) = bin.parent() {
            cmd.env("CUDA_HOME", home);
            if std::env::var_os("NVCC_APPEND_FLAGS").is_none() {
                cmd.env("NVCC_APPEND_FLAGS", format!("-I{}", home.join("include").display()));
            }
        }
    }
    if std::env::var_os("CUDA_COMPUTE_CAP").is_none() {
        cmd.env("CUDA_COMPUTE_CAP", "90");
    }
    Ok(())
}

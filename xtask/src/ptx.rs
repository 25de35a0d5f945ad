//! Compiles the CUDA kernel sources to PTX with nvcc, so a syntax or type error in a kernel
//! fails CI even on machines without a GPU. nvcc is `$CUDA_HOME/bin/nvcc`, else `nvcc` on
//! `PATH`. Without nvcc the check is skipped, unless `SAE_REQUIRE_NVCC=1` (CI sets it).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// GPU architectures checked: Hopper (the H100/H200 machines) and Ampere.
const ARCHS: [&str; 2] = ["sm_90", "sm_80"];

fn nvcc() -> Option<PathBuf> {
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
            eprintln!(
                "ptx: {} for {arch}: {} kernels",
                src.strip_prefix(root).unwrap_or(src).display(),
                ptx.matches(".entry").count()
            );
        }
    }
    if sources.is_empty() {
        bail!("no CUDA sources found under crates/*/src/cuda")
    }
    Ok(())
}

//! Compiles the CUDA kernels in `src/cuda/*.cu` to PTX when the `cuda` feature is on, and
//! writes `OUT_DIR/sae_ptx.rs` with one `pub const NAME: &str` per kernel file. Without the
//! feature it does nothing, so the default build needs no CUDA toolkit.
//!
//! nvcc is found as `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`; the target is
//! `sm_$CUDA_COMPUTE_CAP` (default 90). The PTX is JIT-compiled by the driver at first use.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").ok().map(PathBuf::from).unwrap_or_else(|| match std::env::var_os("CUDA_HOME") {
        Some(home) => PathBuf::from(home).join("bin/nvcc"),
        None => PathBuf::from("nvcc"),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim_start_matches("sm_");
    let mut consts = String::new();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/cuda")
        .expect("src/cuda exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("UTF-8 kernel file name").to_string();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-std=c++17", "-O3", &format!("-arch=sm_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} (set NVCC or CUDA_HOME): {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", src.display());
        consts.push_str(&format!(
            "pub const {}: &str = include_str!({:?});\n",
            stem.to_uppercase(),
            ptx.display().to_string()
        ));
    }
    std::fs::write(out_dir.join("sae_ptx.rs"), consts).expect("writing sae_ptx.rs");
}

//! `cargo xtask gpu-check`: everything the CUDA path must show on a real GPU, in one command
//! for a machine that has the NVIDIA driver and PyTorch but no Rust toolchain.
//!
//! Here (any machine with nvcc): `cargo xtask gpu-check` builds this runner with the `cuda`
//! feature into `target/gpu/xtask.gz` (stripped and compressed: 16 MB to carry), linked
//! against CUDA 13's libraries (a toolkit's, or pip's wheels and a driver stub), and writes
//! `target/gpu/gpu-check.sh`. There: `target/gpu/gpu-check.sh --out DIR` puts the machine's
//! CUDA libraries (PyTorch's nvidia-* wheels, or /usr/local/cuda) on the loader's path, says
//! which are missing if any, and runs `xtask gpu-check --run`, which
//!
//! 1. runs every op's parity check: the fused op on the GPU in f32, f16 and bf16 against the
//!    reference on the CPU in f32 on the same rounded values, output and every gradient;
//! 2. trains each model family 50 steps on generated data: the first steps' losses must match
//!    the CPU's, and the loss must fall;
//! 3. measures the fused excitation's memory bandwidth against a device copy, and training
//!    and inference images/s of `senetv2_resnet50` (224×224, batch 64) in f32, whole-network
//!    bf16 and mixed precision (`--precision bf16`), with PyTorch
//!    (`bench/pytorch/bench_train.py`: eager f32, and channels_last with bf16 autocast,
//!    cuDNN benchmark mode) in the same call;
//!
//! and writes `DIR/gpu.md`, to be committed as `results/gpu.md`. A failing section is written
//! into the report and makes the command fail at the end, so one run always reports all it can;
//! `DIR/gpu.md` is rewritten after every section, so a run stopped by a time limit keeps what it
//! measured.
//! `--device cpu --smoke` runs the same code on the CPU with small sizes (CI does, to keep this
//! runner working between the rare GPU sessions).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use sae_kernels::Implementation;
use sae_models::Precision;
use sae_train::metrics::cross_entropy;
use sae_train::optim::OptimizerConfig;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The most the runner may take when carried to a GPU machine (gzip-compressed: Candle's
/// CUDA kernels make the stripped binary about 60 MB, 16 MB compressed).
const MAX_CARRIED_BYTES: u64 = 50 << 20;

/// The CUDA libraries Candle links (cudarc's `dynamic-linking`), with the SONAME versions of
/// CUDA 13; the driver's `libcuda` comes separately (a stub at link time).
const CUDA_LIBRARIES: [(&str, &str); 5] =
    [("cublas", "13"), ("cublasLt", "13"), ("cudart", "13"), ("nvrtc", "13"), ("curand", "10")];

/// The wheels that hold [`CUDA_LIBRARIES`], for linking where the CUDA toolkit is only nvcc.
const CUDA_WHEELS: [&str; 4] =
    ["nvidia-cublas==13.0.*", "nvidia-cuda-runtime==13.0.*", "nvidia-cuda-nvrtc==13.0.*", "nvidia-curand==10.4.*"];

/// Runs the runner beside it with the CUDA libraries of the machine's PyTorch (its nvidia-*
/// wheels) or CUDA install on the loader's path: the binary links them, so it cannot start
/// without them.
const WRAPPER: &str = r#"#!/bin/sh
# Written by `cargo xtask gpu-check`. Usage: target/gpu/gpu-check.sh [--out DIR] [--python PY]
here=$(dirname "$0")
bin=${TMPDIR:-/tmp}/sae-gpu-check-xtask
gzip -dc "$here/xtask.gz" > "$bin" && chmod +x "$bin" || exit 1
py=${PYTHON:-python3}
wheels=$("$py" -c 'import glob, site; print(":".join(d for s in site.getsitepackages() for d in glob.glob(s + "/nvidia/*/lib")))' 2>/dev/null)
export LD_LIBRARY_PATH="${wheels}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
missing=$(ldd "$bin" | grep 'not found')
if [ -n "$missing" ]; then
    echo "gpu-check: CUDA libraries not found:" >&2
    echo "$missing" >&2
    echo "install PyTorch with CUDA 13 (its nvidia-* wheels, found through \$PYTHON, default python3) or the CUDA 13 toolkit in /usr/local/cuda, or set LD_LIBRARY_PATH" >&2
    exit 1
fi
exec "$bin" gpu-check --run "$@"
"#;

/// Builds the CUDA runner into `target/gpu/xtask.gz`, with `target/gpu/gpu-check.sh` to start it.
pub fn build(root: &Path) -> Result<()> {
    let Some(nvcc) = crate::ptx::nvcc() else { bail!("gpu-check: no nvcc found; set CUDA_HOME to a CUDA 13 toolkit") };
    let link_dirs = link_libraries(root, &nvcc)?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args([
        "build",
        "--release",
        "-p",
        "xtask",
        "--features",
        "cuda",
        "--target-dir",
        "target/gpu-check",
    ]);
    crate::ptx::cuda_env(&mut cmd, &nvcc)?;
    // The C compiler driving the link searches LIBRARY_PATH for `-l` libraries; unlike
    // RUSTFLAGS it does not make cargo rebuild the dependencies.
    let mut library_path = link_dirs;
    if let Some(old) = std::env::var_os("LIBRARY_PATH") {
        library_path.extend(std::env::split_paths(&old));
    }
    cmd.env("LIBRARY_PATH", std::env::join_paths(library_path)?);
    cmd.env("CARGO_PROFILE_RELEASE_STRIP", "symbols").env("CARGO_PROFILE_RELEASE_DEBUG", "0");
    eprintln!("gpu-check: cargo build --release -p xtask --features cuda (slow the first time)");
    if !cmd.status().context("running cargo build")?.success() {
        bail!("gpu-check: building the CUDA runner failed")
    }
    let dir = root.join("target/gpu");
    std::fs::create_dir_all(&dir)?;
    let bin = root.join("target/gpu-check/release/xtask");
    let carried = dir.join("xtask.gz");
    let gz = Command::new("gzip").arg("-9").arg("-c").arg(&bin).output().context("running gzip")?;
    if !gz.status.success() {
        bail!("gpu-check: gzip failed on {}", bin.display())
    }
    sae_fs::write_atomic(&carried, &gz.stdout)?;
    let wrapper = dir.join("gpu-check.sh");
    std::fs::write(&wrapper, WRAPPER)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let size = gz.stdout.len() as u64;
    if size > MAX_CARRIED_BYTES {
        bail!(
            "gpu-check: the runner is {} MB compressed, over the {} MB that can be carried",
            size >> 20,
            MAX_CARRIED_BYTES >> 20
        )
    }
    println!(
        "gpu-check: {} ({:.1} MB; {:.1} MB uncompressed). On the GPU machine, from the repository root:\n  target/gpu/gpu-check.sh --out OUT_DIR\nthen commit OUT_DIR/gpu.md as results/gpu.md.",
        carried.display(),
        size as f64 / 1e6,
        std::fs::metadata(&bin)?.len() as f64 / 1e6
    );
    Ok(())
}

/// Directories to link the CUDA libraries from: a full toolkit's `lib64` and `lib64/stubs`
/// beside nvcc, or else `target/gpu-check/link` with the libraries of [`CUDA_WHEELS`]
/// (installed once into `~/.cache/sae/cuda13-libs`) under their link names and a stub
/// `libcuda.so` (the driver is the GPU machine's).
fn link_libraries(root: &Path, nvcc: &Path) -> Result<Vec<PathBuf>> {
    if let Some(home) = nvcc.parent().and_then(Path::parent) {
        let lib64 = home.join("lib64");
        if lib64.join("libcublas.so").exists() && lib64.join("stubs/libcuda.so").exists() {
            return Ok(vec![lib64.clone(), lib64.join("stubs")]);
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")?;
    let wheels =
        std::env::var_os("SAE_CUDA_LIBS_DIR").map(PathBuf::from).unwrap_or(home.join(".cache/sae/cuda13-libs"));
    let lib = wheels.join("nvidia/cu13/lib");
    if !CUDA_LIBRARIES.iter().all(|(name, v)| lib.join(format!("lib{name}.so.{v}")).exists()) {
        eprintln!("gpu-check: pip install {} (about 700 MB, once) into {}", CUDA_WHEELS.join(" "), wheels.display());
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target"])
            .arg(&wheels)
            .args(CUDA_WHEELS)
            .status()
            .context("running pip")?;
        if !status.success() {
            bail!("gpu-check: pip could not install the CUDA libraries to link against")
        }
    }
    let link = root.join("target/gpu-check/link");
    std::fs::create_dir_all(&link)?;
    for (name, version) in CUDA_LIBRARIES {
        let path = link.join(format!("lib{name}.so"));
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib.join(format!("lib{name}.so.{version}")), &path)?;
    }
    driver_stub(root, &link)?;
    Ok(vec![link])
}

/// `libcuda.so` (SONAME `libcuda.so.1`) defining every driver function cudarc declares, each
/// returning 0: enough to link; at run time the loader binds the real driver.
fn driver_stub(root: &Path, link: &Path) -> Result<()> {
    let metadata = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--features", "xtask/cuda"])
        .output()
        .context("running cargo metadata")?;
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).context("reading cargo metadata")?;
    let manifest = metadata["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not among the dependencies")?;
    let sys = Path::new(manifest).with_file_name("src/driver/sys/mod.rs");
    let source = std::fs::read_to_string(&sys).with_context(|| format!("reading {}", sys.display()))?;
    let mut names: Vec<&str> = source
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.len() > 3 && w.starts_with("cu") && w.as_bytes()[2].is_ascii_uppercase())
        .collect();
    names.sort_unstable();
    names.dedup();
    let stub: String = names.iter().map(|n| format!("int {n}(void) {{ return 0; }}\n")).collect();
    let c = link.join("cuda_stub.c");
    std::fs::write(&c, stub)?;
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(link.join("libcuda.so"))
        .arg(&c)
        .status()
        .context("running cc")?;
    if !status.success() {
        bail!("gpu-check: compiling the libcuda stub failed")
    }
    Ok(())
}

/// Options of a run on the GPU machine.
pub struct RunOptions {
    pub device: String,
    pub smoke: bool,
    pub out: PathBuf,
    pub python: Option<PathBuf>,
}

/// An error's message on one line, fit for a table cell (Candle appends a backtrace when
/// RUST_BACKTRACE is set).
fn brief(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").replace('|', "/")
}

/// The report under construction, and whether any check failed.
struct Report {
    md: String,
    failures: Vec<String>,
    /// Where the report is written after every section, so a run cut short by a time limit
    /// still leaves what it measured.
    path: PathBuf,
}

impl Report {
    fn section(&mut self, title: &str) {
        eprintln!("gpu-check: {title}");
        let _ = writeln!(self.md, "\n## {title}\n");
    }

    /// Appends a section's text and records the rows it says failed, or records the section's
    /// error; the run goes on either way.
    fn add(&mut self, what: &str, outcome: Result<(String, Vec<String>)>) {
        match outcome {
            Ok((md, failed)) => {
                self.md.push_str(&md);
                self.failures.extend(failed.into_iter().map(|f| format!("{what}: {f}")));
            }
            Err(e) => {
                eprintln!("gpu-check: {what} FAILED: {e:#}");
                let _ = writeln!(self.md, "\n**{what} failed:** `{}`\n", brief(&e));
                self.failures.push(what.to_string());
            }
        }
        if let Err(e) = sae_fs::write_atomic(&self.path, self.md.as_bytes()) {
            eprintln!("gpu-check: writing {}: {e:#}", self.path.display());
        }
    }
}

/// Runs the checks on the GPU machine (or, with `--device cpu`, here).
pub fn run(opts: &RunOptions) -> Result<()> {
    // On the GPU machine the Python with PyTorch is `python3`; elsewhere PyTorch is measured
    // only when `--python` names one.
    let python = opts.python.clone().or_else(|| (opts.device == "cuda").then(|| PathBuf::from("python3")));
    let device = sae_train::device(&opts.device, 0)?;
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out)?;
    let path = opts.out.join("gpu.md");
    let mut report = Report { md: String::new(), failures: Vec::new(), path: path.clone() };
    let _ = writeln!(
        report.md,
        "# GPU check\n\nWritten by `target/gpu/gpu-check.sh` (`xtask gpu-check --run`; `cargo xtask gpu-check` builds it)."
    );
    report.section("Machine");
    let smi = nvidia_smi("name,memory.total,driver_version").unwrap_or_else(|| "no nvidia-smi".into());
    let _ = writeln!(report.md, "- device: `{}` ({smi})\n- smoke sizes: {}", opts.device, opts.smoke);

    report.section("Parity of every fused op with the CPU reference");
    report.add("parity", parity(&device));
    report.section("50 training steps per model family");
    report.add("training", training(&device, opts.smoke));
    report.section("Fused excitation: memory bandwidth");
    report.add("bandwidth", bandwidth(&device, opts.smoke).map(|text| (text, Vec::new())));
    let (model, size, batch) = if opts.smoke { ("senetv2_resnet14b", 32, 4) } else { ("senetv2_resnet50", 224, 64) };
    report.section(&format!("Throughput: {model}, {size}×{size}, batch {batch}"));
    let measured = throughput(&device, model, size, batch, opts.smoke, python.as_deref(), &opts.device);
    report.add("throughput", measured.map(|text| (text, Vec::new())));

    let _ = writeln!(
        report.md,
        "\n## Verdict\n\n{} in {:.0} s.",
        if report.failures.is_empty() {
            "Every check passed".to_string()
        } else {
            format!("FAILED: {}", report.failures.join("; "))
        },
        started.elapsed().as_secs_f64()
    );
    sae_fs::write_atomic(&path, report.md.as_bytes())?;
    println!("{}", report.md);
    eprintln!("gpu-check: wrote {}", path.display());
    if !report.failures.is_empty() {
        bail!("gpu-check: {} check(s) failed: {}", report.failures.len(), report.failures.join("; "))
    }
    Ok(())
}

/// Values in [−1, 1) from `seed` (splitmix64), rounded to `dtype` and back: what both sides
/// of a parity check see.
fn rounded(seed: u64, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let values: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F32)?)
}

/// The largest |a − b| relative to max |b| (its scale), with b the reference.
fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    if a.dims() != b.dims() {
        bail!("shape {:?}, reference {:?}", a.dims(), b.dims())
    }
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
}

type OpFn = Box<dyn Fn(&[Tensor], Implementation) -> candle_core::Result<Tensor>>;

/// One op's parity case: its inputs' shapes, and the op applied to inputs of any device.
struct ParityCase {
    name: &'static str,
    inputs: Vec<Vec<usize>>,
    /// The CPU implementation the GPU is held to: the reference, except for max-pool, whose
    /// reference gives every tied maximum the gradient (bf16 inputs do tie), and the ReLUs.
    cpu: Implementation,
    op: OpFn,
    /// Checked in f32 only: the op ends in add_relu after a rounded intermediate (CUDA's
    /// BatchNorm or excitation output, then the addition), and at this size some sums round
    /// across 0 in f16/bf16, where the ReLU's gradient is all or nothing against the f32
    /// reference. The small cases check the same kernels in f16 and bf16.
    f32_only: bool,
}

fn parity_cases() -> Vec<ParityCase> {
    use sae_kernels::*;
    let case = |name, inputs: &[&[usize]], cpu, op: OpFn| ParityCase {
        name,
        inputs: inputs.iter().map(|d| d.to_vec()).collect(),
        cpu,
        op,
        f32_only: false,
    };
    let r = Implementation::Reference;
    vec![
        case(
            "excitation SaE (K=4, r=4), gate 1+s",
            &[&[3, 64, 7, 5], &[64, 64], &[64], &[64, 64], &[64]],
            r,
            Box::new(|t, imp| {
                let w = ExcitationWeights { fc1_weight: &t[1], fc1_bias: &t[2], fc2_weight: &t[3], fc2_bias: &t[4] };
                excitation(&t[0], &w, Gate::OnePlusS, imp)
            }),
        ),
        case(
            "excitation SE (r=16), gate s",
            &[&[2, 48, 9, 9], &[3, 48], &[3], &[48, 3], &[48]],
            r,
            Box::new(|t, imp| {
                let w = ExcitationWeights { fc1_weight: &t[1], fc1_bias: &t[2], fc2_weight: &t[3], fc2_bias: &t[4] };
                excitation(&t[0], &w, Gate::S, imp)
            }),
        ),
        case(
            "conv2d 3×3 stride 2 pad 1",
            &[&[2, 16, 15, 13], &[24, 16, 3, 3]],
            r,
            Box::new(|t, imp| conv2d(&t[0], &t[1], Conv2dConfig { stride: 2, padding: 1, groups: 1 }, imp)),
        ),
        case(
            "conv2d 1×1, batch 1",
            &[&[1, 32, 7, 7], &[48, 32, 1, 1]],
            r,
            Box::new(|t, imp| conv2d(&t[0], &t[1], Conv2dConfig { stride: 1, padding: 0, groups: 1 }, imp)),
        ),
        case(
            "conv2d 3×3 groups 8",
            &[&[2, 32, 9, 9], &[32, 4, 3, 3]],
            r,
            Box::new(|t, imp| conv2d(&t[0], &t[1], Conv2dConfig { stride: 1, padding: 1, groups: 8 }, imp)),
        ),
        case(
            "conv2d 7×7 stride 2 pad 3 (stem)",
            &[&[2, 3, 32, 32], &[16, 3, 7, 7]],
            r,
            Box::new(|t, imp| conv2d(&t[0], &t[1], Conv2dConfig { stride: 2, padding: 3, groups: 1 }, imp)),
        ),
        case(
            "max_pool2d 3×3 stride 2 pad 1",
            &[&[2, 8, 15, 13]],
            Implementation::Fused,
            Box::new(|t, imp| max_pool2d(&t[0], MaxPoolConfig { kernel: 3, stride: 2, padding: 1 }, imp)),
        ),
        case(
            "depthwise 3×3 stride 2 pad 1",
            &[&[2, 32, 14, 11], &[32, 1, 3, 3]],
            r,
            Box::new(|t, imp| depthwise_conv2d(&t[0], &t[1], DepthwiseConfig { stride: 2, padding: 1 }, imp)),
        ),
        case(
            "batch_norm train + ReLU",
            &[&[4, 24, 9, 7], &[24], &[24]],
            r,
            Box::new(|t, imp| batch_norm_train(&t[0], &t[1], &t[2], 1e-5, true, imp).map(|o| o.output)),
        ),
        case(
            "batch_norm train",
            &[&[1, 16, 5, 5], &[16], &[16]],
            r,
            Box::new(|t, imp| batch_norm_train(&t[0], &t[1], &t[2], 1e-3, false, imp).map(|o| o.output)),
        ),
        case(
            "batch_norm eval + ReLU",
            &[&[3, 24, 6, 6], &[24], &[24], &[24]],
            r,
            Box::new(|t, imp| {
                // Running mean from the third input, a positive running variance from it too.
                let var = (t[3].abs()? + 0.5)?;
                batch_norm_eval(&t[0], &t[1], &t[2], &t[3], &var, 1e-5, true, imp)
            }),
        ),
        // At the shapes of the 50-layer models' last stages at 32×32 (batch 16; 1024 and 2048
        // channels at 2×2 and 1×1), where the small cases above have not reached. The ones that
        // end in add_relu are held to the CPU kernel, as the ReLUs below are.
        ParityCase {
            f32_only: true,
            ..case(
                "excitation SaE (K=4, r=32) + add_relu at (16, 2048, 1, 1)",
                &[
                    &[16, 2048, 1, 1],
                    &[64, 2048],
                    &[64],
                    &[64, 2048],
                    &[64],
                    &[64, 2048],
                    &[64],
                    &[64, 2048],
                    &[64],
                    &[2048, 256],
                    &[2048],
                    &[16, 2048, 1, 1],
                ],
                Implementation::Fused,
                Box::new(|t, imp| {
                    // Weights at the scale of an initialised layer (1/√fan-in), so that the gate's
                    // sigmoid is not saturated everywhere.
                    let w1: Vec<Tensor> =
                        (0..4).map(|k| &t[1 + 2 * k] / 2048f64.sqrt()).collect::<candle_core::Result<_>>()?;
                    let fc1: Vec<(&Tensor, &Tensor)> = (0..4).map(|k| (&w1[k], &t[2 + 2 * k])).collect();
                    let w2 = (&t[9] / 256f64.sqrt())?;
                    excitation_add_relu(&t[0], &fc1, &w2, &t[10], Gate::OnePlusS, &t[11], imp)
                }),
            )
        },
        case(
            "batch_norm train + ReLU at (16, 2048, 1, 1)",
            &[&[16, 2048, 1, 1], &[2048], &[2048]],
            r,
            Box::new(|t, imp| batch_norm_train(&t[0], &t[1], &t[2], 1e-5, true, imp).map(|o| o.output)),
        ),
        ParityCase {
            f32_only: true,
            ..case(
                "batch_norm train + add_relu at (16, 1024, 2, 2)",
                &[&[16, 1024, 2, 2], &[1024], &[1024], &[16, 1024, 2, 2]],
                Implementation::Fused,
                Box::new(|t, imp| batch_norm_train_add_relu(&t[0], &t[1], &t[2], 1e-5, &t[3], imp).map(|o| o.output)),
            )
        },
        case(
            "conv2d 1×1 512 → 2048 at (16, 512, 1, 1)",
            &[&[16, 512, 1, 1], &[2048, 512, 1, 1]],
            r,
            Box::new(|t, imp| conv2d(&t[0], &t[1], Conv2dConfig { stride: 1, padding: 0, groups: 1 }, imp)),
        ),
        case(
            "conv2d 3×3 groups 32 at (16, 1024, 2, 2)",
            &[&[16, 1024, 2, 2], &[1024, 32, 3, 3]],
            r,
            Box::new(|t, imp| conv2d(&t[0], &t[1], Conv2dConfig { stride: 1, padding: 1, groups: 32 }, imp)),
        ),
        case(
            "depthwise 3×3 at (16, 1024, 2, 2)",
            &[&[16, 1024, 2, 2], &[1024, 1, 3, 3]],
            r,
            Box::new(|t, imp| depthwise_conv2d(&t[0], &t[1], DepthwiseConfig { stride: 1, padding: 1 }, imp)),
        ),
        // ReLUs are held to the CPU kernel too: at an output of exactly 0 (a bf16 sum a + b
        // meets it where b = −a) it passes no gradient, PyTorch's convention; Candle's
        // reference passes it.
        case("relu", &[&[4, 16, 9, 9]], Implementation::Fused, Box::new(|t, imp| relu(&t[0], imp))),
        case(
            "add_relu",
            &[&[4, 16, 9, 9], &[4, 16, 9, 9]],
            Implementation::Fused,
            Box::new(|t, imp| add_relu(&t[0], &t[1], imp)),
        ),
        // Held to the CPU kernel as the ReLUs above: no gradient at exactly 0 and 6.
        case("relu6", &[&[4, 16, 9, 9]], Implementation::Fused, Box::new(|t, imp| relu6(&t[0], imp))),
        case("add_channel_bias", &[&[4, 16, 9, 9], &[16]], r, Box::new(|t, imp| add_channel_bias(&t[0], &t[1], imp))),
    ]
}

/// The dtypes the fused ops are checked in: f32, f16 and bf16 on CUDA; on the CPU (the smoke
/// run) f32 and f16, as Candle's CPU matmul has no bf16.
fn dtypes_on(device: &Device) -> Vec<DType> {
    match device {
        Device::Cpu => vec![DType::F32, DType::F16],
        _ => vec![DType::F32, DType::F16, DType::BF16],
    }
}

/// Every case in each dtype of [`dtypes_on`]: the fused op on `device` against the CPU in f32, output
/// and the gradient of Σ output ⊙ probe for every input.
fn parity(device: &Device) -> Result<(String, Vec<String>)> {
    let mut md =
        String::from("| op | dtype | output | worst gradient | tolerance | result |\n|---|---|---:|---:|---:|---|\n");
    let mut failed = Vec::new();
    for (i, case) in parity_cases().iter().enumerate() {
        let dtypes = dtypes_on(device).into_iter().zip([1e-4, 1e-2, 4e-2]);
        for (dtype, tol) in dtypes.filter(|&(d, _)| !case.f32_only || d == DType::F32) {
            let inputs: Vec<Tensor> = case
                .inputs
                .iter()
                .enumerate()
                .map(|(k, d)| rounded((i * 10 + k) as u64, d, dtype))
                .collect::<Result<_>>()?;
            let run = |dev: &Device, dt: DType, imp: Implementation| -> Result<(Tensor, Vec<Option<Tensor>>)> {
                let vars: Vec<Var> = inputs
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?))
                    .collect::<candle_core::Result<_>>()?;
                let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let out = (case.op)(&tensors, imp)?.to_dtype(DType::F32)?;
                let probe = Tensor::ones(out.dims(), DType::F32, dev)?.cumsum(out.rank() - 1)?.cos()?;
                let grads = (&out * probe)?.sum_all()?.backward()?;
                let grads = vars
                    .iter()
                    .map(|v| grads.get(v).map(|g| g.to_dtype(DType::F32)).transpose())
                    .collect::<candle_core::Result<_>>()?;
                Ok((out, grads))
            };
            let outcome = (|| -> Result<(f64, f64)> {
                let (out_ref, g_ref) = run(&Device::Cpu, DType::F32, case.cpu)?;
                let (out, g) = run(device, dtype, Implementation::Fused)?;
                let out_err = relative_error(&out, &out_ref)?;
                let mut grad_err = 0f64;
                for (k, (a, b)) in g.iter().zip(&g_ref).enumerate() {
                    match (a, b) {
                        (Some(a), Some(b)) => {
                            grad_err = grad_err.max(relative_error(a, b).with_context(|| format!("input {k}"))?)
                        }
                        (None, None) => {}
                        _ => bail!("input {k}: a gradient on one side only"),
                    }
                }
                Ok((out_err, grad_err))
            })();
            let name = format!("{} {dtype:?}", case.name);
            match outcome {
                Ok((o, g)) => {
                    let ok = o <= tol && g <= tol;
                    let _ = writeln!(
                        md,
                        "| {} | {dtype:?} | {o:.1e} | {g:.1e} | {tol:.0e} | {} |",
                        case.name,
                        if ok { "pass" } else { "**FAIL**" }
                    );
                    if !ok {
                        failed.push(name);
                    }
                }
                Err(e) => {
                    let _ = writeln!(md, "| {} | {dtype:?} | | | | **error**: `{}` |", case.name, brief(&e));
                    failed.push(name);
                }
            }
        }
    }
    let _ = writeln!(md, "\nErrors are max |GPU − CPU| / max |CPU| over the output and over each input's gradient; inputs are rounded to the dtype first, the CPU computes in f32. Max-pool is held to the CPU kernel (first maximum on ties), and so are the ReLUs (no gradient at an output of exactly 0).");
    Ok((md, failed))
}

/// A learnable batch: class k's images are a pattern of frequency k plus noise.
fn generated_batch(batch: usize, size: usize, classes: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut pixels = Vec::with_capacity(batch * 3 * size * size);
    let labels: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
    for (i, &k) in labels.iter().enumerate() {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let phase = (k as f32 + 1.0) * (x + 2 * y + c) as f32 / size as f32;
                    let noise = ((i * 7919 + c * 104729 + y * 31 + x * 17) % 97) as f32 / 97.0 - 0.5;
                    pixels.push(phase.sin() + 0.3 * noise);
                }
            }
        }
    }
    Ok((Tensor::from_vec(pixels, (batch, 3, size, size), device)?, Tensor::new(labels.as_slice(), device)?))
}

/// One model's losses over some Adam steps, and its first step's gradients (on the CPU).
struct FamilyRun {
    losses: Vec<f32>,
    first_gradients: Vec<(String, Tensor)>,
}

/// `steps` Adam steps of model `name` on [`generated_batch`] (`(classes, batch, size)`) scaled
/// by `input_scale`, from the weights of seed 0.
fn train_family(
    name: &str,
    dev: &Device,
    steps: usize,
    (classes, batch, size): (usize, usize, usize),
    input_scale: f64,
) -> Result<FamilyRun> {
    let model = sae_models::Model::new(sae_models::config(name, classes)?, 0, dev)?;
    let vars = model.trainable_vars();
    let mut opt = OptimizerConfig::keras_adam().build(vars.clone(), Implementation::Fused);
    let (x, y) = generated_batch(batch, size, classes, dev)?;
    let x = (x * input_scale)?;
    let mut run = FamilyRun { losses: Vec::new(), first_gradients: Vec::new() };
    for step in 0..steps {
        let loss = cross_entropy(&model.forward_t(&x, true)?, &y, 0.0)?;
        run.losses.push(loss.to_scalar::<f32>()?);
        let grads = loss.backward_consuming()?;
        if step == 0 {
            for (var_name, var) in &vars {
                let g = grads.get(var).with_context(|| format!("no gradient for {var_name}"))?;
                run.first_gradients.push((var_name.clone(), g.to_device(&Device::Cpu)?.to_dtype(DType::F32)?));
            }
        }
        opt.step(&grads)?;
    }
    Ok(run)
}

/// Every parameter's [`relative_error`] of `a`'s first gradient against `b`'s, worst first.
fn gradient_errors(a: &FamilyRun, b: &FamilyRun) -> Result<Vec<(f64, String)>> {
    let mut errors = Vec::new();
    for ((var_name, g), (_, reference)) in a.first_gradients.iter().zip(&b.first_gradients) {
        errors
            .push((relative_error(g, reference).with_context(|| format!("gradient of {var_name}"))?, var_name.clone()));
    }
    errors.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(errors)
}

/// How far a parameter's first gradient on the device may be from the CPU's (max |Δ| / max
/// |CPU|) where the model's gradients are well conditioned (see [`INPUT_NUDGE`]).
const GRADIENT_TOLERANCE: f64 = 1e-3;

/// The relative change of the input by which the training check measures how much a model's
/// gradients move without any error: about ten f32 roundings.
const INPUT_NUDGE: f64 = 1e-6;

/// Each family 50 (smoke: 12) Adam steps on one generated batch on `device`; the first 3
/// steps also on the CPU from the same weights.
fn training(device: &Device, smoke: bool) -> Result<(String, Vec<String>)> {
    let families: &[&str] = if smoke {
        &["senetv2_resnet14b", "mobilenet_v1"]
    } else {
        &["resnet18", "seresnet18", "senetv2_resnet18", "senetv2_resnet50", "senetv2_resnext50_32x4d", "mobilenet_v1"]
    };
    let steps = if smoke { 12 } else { 50 };
    let (classes, batch, size) = (10, 16, 32);
    let mut md = format!(
        "| model | first 3 losses, device | CPU | worst loss difference | worst first-step gradient (parameter) | CPU, input × (1 + {INPUT_NUDGE:.0e}) | mean of first 5 → last 5 | result |\n|---|---|---|---:|---|---:|---|---|\n",
    );
    let (mut failed, mut details) = (Vec::new(), Vec::new());
    for &name in families {
        // The device's run, the CPU's, every parameter's gradient error (worst first), and
        // the worst change of the CPU's gradients under the input nudge.
        type Comparison = (FamilyRun, FamilyRun, Vec<(f64, String)>, f64);
        let outcome = (|| -> Result<Comparison> {
            let run = |dev: &Device, n: usize, input_scale: f64| {
                train_family(name, dev, n, (classes, batch, size), input_scale)
            };
            let (gpu, cpu) = (run(device, steps, 1.0)?, run(&Device::Cpu, 3, 1.0)?);
            // The same measure on the CPU with the input moved by a rounding error: how far
            // the model's gradients move where nothing is wrong.
            let nudged = run(&Device::Cpu, 1, 1.0 + INPUT_NUDGE)?;
            let cpu_spread = gradient_errors(&nudged, &cpu)?.first().map_or(0.0, |e| e.0);
            let errors = gradient_errors(&gpu, &cpu)?;
            Ok((gpu, cpu, errors, cpu_spread))
        })();
        match outcome {
            Ok((FamilyRun { losses: gpu, .. }, FamilyRun { losses: cpu, .. }, errors, cpu_spread)) => {
                let (grad_err, grad_var) = errors.first().cloned().unwrap_or_default();
                let over: Vec<String> =
                    errors.iter().filter(|e| e.0 > GRADIENT_TOLERANCE).map(|(e, v)| format!("`{v}` {e:.1e}")).collect();
                if !over.is_empty() {
                    let shown = over.len().min(12);
                    details.push(format!(
                        "- {name}: {} of {} parameters' first gradients over {GRADIENT_TOLERANCE:.0e}: {}{}",
                        over.len(),
                        errors.len(),
                        over[..shown].join(", "),
                        if over.len() > shown { ", …" } else { "" }
                    ));
                }
                let diff = gpu.iter().zip(&cpu).map(|(a, b)| ((a - b) / b.abs().max(1.0)).abs()).fold(0f32, f32::max);
                let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
                let (first, last) = (mean(&gpu[..5]), mean(&gpu[gpu.len() - 5..]));
                let first_loss = ((gpu[0] - cpu[0]) / cpu[0].abs().max(1.0)).abs();
                let ok = first_loss <= 1e-4
                    && grad_err <= GRADIENT_TOLERANCE.max(2.0 * cpu_spread)
                    && last < 0.7 * first
                    && gpu.iter().all(|l| l.is_finite());
                let fmt = |v: &[f32]| v.iter().map(|l| format!("{l:.4}")).collect::<Vec<_>>().join(", ");
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {diff:.1e} | {grad_err:.1e} (`{grad_var}`) | {cpu_spread:.1e} | {first:.3} → {last:.3} | {} |",
                    fmt(&gpu[..3]),
                    fmt(&cpu),
                    if ok { "pass" } else { "**FAIL**" }
                );
                if !ok {
                    failed.push(name.to_string());
                }
            }
            Err(e) => {
                let _ = writeln!(md, "| {name} | | | | | | | **error**: `{}` |", brief(&e));
                failed.push(name.to_string());
            }
        }
    }
    if !details.is_empty() {
        let _ = writeln!(md, "\n{}", details.join("\n"));
    }
    let _ = writeln!(md, "\n{steps} Adam steps (Keras settings) on one generated batch of {batch} images of {size}×{size}, {classes} classes, default (fused) kernels. Pass: from the same initial weights, the first loss within 1e-4 (relative) of the CPU's; every parameter's first gradient within {GRADIENT_TOLERANCE:.0e} of the CPU's (max |GPU − CPU| / max |CPU| per parameter; the worst is shown), or within twice the most the CPU's own gradients move (same measure) when its input is scaled by 1 + {INPUT_NUDGE:.0e}, where that is larger; and the last five steps' mean loss below 70 % of the first five's. The 50-layer models' and MobileNet's gradients at 32×32 are chaotic (BatchNorm over 16 values at 1×1 and 2×2 after many blocks: a change at the level of rounding flips ReLUs, and one flipped unit of 16 moves a gradient element by a good fraction), so there the per-op parity above, at these models' own shapes, is what holds the GPU's kernels to 1e-4. The later losses are shown, not held to the CPU's: Adam's first update, lr · g / (|g| + 1e-7), moves every weight by about ±lr, so a gradient near zero whose sign the summation order decides moves its weight a full lr either way.");
    Ok((md, failed))
}

/// Median seconds of `f` (which must finish its device work) after two warm-up calls, over
/// at least 3 calls and `seconds`.
fn timed(device: &Device, seconds: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    crate::bench_train::median_seconds(seconds, 3, || {
        f()?;
        Ok(device.synchronize()?)
    })
}

/// `nvidia-smi --query-gpu=FIELDS` (CSV, no header), if it runs.
fn nvidia_smi(fields: &str) -> Option<String> {
    let out =
        Command::new("nvidia-smi").args([&format!("--query-gpu={fields}"), "--format=csv,noheader"]).output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Nominal HBM bandwidth of the GPUs this is likely to meet, bytes/s.
fn nominal_bandwidth(name: &str) -> Option<f64> {
    [("H200", 4.8e12), ("H100 SXM", 3.35e12), ("H100 PCIe", 2.0e12), ("A100-SXM4-80GB", 2.04e12), ("A100", 1.55e12)]
        .iter()
        .find(|(k, _)| name.contains(k))
        .map(|&(_, v)| v)
}

fn bandwidth(device: &Device, smoke: bool) -> Result<String> {
    use sae_kernels::{excitation, ExcitationWeights, Gate};
    let (n, c, hw) = if smoke { (4, 64, 14) } else { (64, 256, 56) };
    let hidden = 4 * c / 32;
    let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), device)?;
    let w = [
        Tensor::randn(0f32, 0.1, (hidden, c), device)?,
        Tensor::zeros(hidden, DType::F32, device)?,
        Tensor::randn(0f32, 0.1, (c, hidden), device)?,
        Tensor::zeros(c, DType::F32, device)?,
    ];
    let weights = ExcitationWeights { fc1_weight: &w[0], fc1_bias: &w[1], fc2_weight: &w[2], fc2_bias: &w[3] };
    let bytes = (x.elem_count() * 4) as f64;
    let seconds = if smoke { 0.2 } else { 2.0 };
    let fused =
        timed(device, seconds, || Ok(excitation(&x, &weights, Gate::OnePlusS, Implementation::Fused).map(drop)?))?;
    let copy = timed(device, seconds, || Ok(x.copy().map(drop)?))?;
    // The fused forward reads x twice (plane sums, then scale) and writes the output once; a
    // copy reads and writes once each.
    let (fused_bw, copy_bw) = (3.0 * bytes / fused, 2.0 * bytes / copy);
    let name = nvidia_smi("name").unwrap_or_default();
    let mut md = format!(
        "Input ({n}, {c}, {hw}, {hw}) f32, SaE K=4 r=32, forward. Fused: {:.3} ms, {:.0} GB/s (3 × {:.0} MB moved); device copy of the input: {:.3} ms, {:.0} GB/s; fused / copy = **{:.0} %**",
        fused * 1e3,
        fused_bw / 1e9,
        bytes / 1e6,
        copy * 1e3,
        copy_bw / 1e9,
        100.0 * fused_bw / copy_bw
    );
    if let Some(peak) = nominal_bandwidth(&name) {
        let _ = write!(md, "; of the {name}'s nominal {:.1} TB/s: **{:.0} %**", peak / 1e12, 100.0 * fused_bw / peak);
    }
    md.push_str(".\n");
    Ok(md)
}

/// Images/s of one training step (forward, backward, Adam) or one inference forward, with
/// the variables in `dtype` and the forward in `precision`.
#[allow(clippy::too_many_arguments)]
fn ours(
    device: &Device,
    model: &str,
    size: usize,
    batch: usize,
    dtype: DType,
    precision: Precision,
    train: bool,
    seconds: f64,
) -> Result<f64> {
    let mut net = sae_models::Model::new_with_dtype(sae_models::config(model, 1000)?, 0, device, dtype)?;
    net.set_precision(precision);
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), device)?.to_dtype(dtype)?;
    let y = Tensor::new((0..batch as u32).map(|i| i * 37 % 1000).collect::<Vec<_>>().as_slice(), device)?;
    let mut opt = OptimizerConfig::keras_adam().build(net.trainable_vars(), Implementation::Fused);
    let step = timed(device, seconds, || {
        if train {
            // The update inside the backward pass, as `sae train` takes a step on one device.
            let loss = cross_entropy(&net.forward_t(&x, true)?.to_dtype(DType::F32)?, &y, 0.0)?;
            sae_train::backward_with_step(loss, opt.as_mut())?;
        } else {
            net.forward_without_graph(&x, false)?;
        }
        Ok(())
    })?;
    Ok(batch as f64 / step)
}

/// Where an f32 training step's time goes: the median forward (train mode, building the
/// graph), forward + backward, and whole step, as "forward F ms, backward B ms, Adam A ms".
fn step_split(device: &Device, model: &str, size: usize, batch: usize, seconds: f64) -> Result<String> {
    let net = sae_models::Model::new(sae_models::config(model, 1000)?, 0, device)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), device)?;
    let y = Tensor::new((0..batch as u32).map(|i| i * 37 % 1000).collect::<Vec<_>>().as_slice(), device)?;
    let mut opt = OptimizerConfig::keras_adam().build(net.trainable_vars(), Implementation::Fused);
    let loss = || -> Result<Tensor> { Ok(cross_entropy(&net.forward_t(&x, true)?, &y, 0.0)?) };
    let forward = timed(device, seconds, || loss().map(drop))?;
    let backward = timed(device, seconds, || Ok(loss()?.backward_consuming().map(drop)?))?;
    let step = timed(device, seconds, || Ok(opt.step(&loss()?.backward_consuming()?)?))?;
    Ok(format!(
        "forward {:.1} ms, backward {:.1} ms, Adam {:.1} ms",
        forward * 1e3,
        (backward - forward) * 1e3,
        (step - backward) * 1e3
    ))
}

/// PyTorch's images/s for the same rows: (eager f32, channels_last + bf16 autocast).
fn torch_rows(
    python: &Path,
    device: &str,
    model: &str,
    size: usize,
    batch: usize,
    seconds: f64,
) -> Result<Vec<(String, f64)>> {
    let script = std::env::current_dir()?.join("bench/pytorch/bench_train.py");
    let rows = format!("{model}:{size}:{batch}:train,{model}:{size}:{batch}:infer");
    let mut out = Vec::new();
    for variant in ["eager", "channels_last_bf16"] {
        let o = Command::new(python)
            .arg(&script)
            .args(["--device", device, "--variant", variant, "--seconds", &seconds.to_string(), "--rows", &rows])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !o.status.success() {
            bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&o.stderr))
        }
        let lines: Vec<serde_json::Value> =
            String::from_utf8_lossy(&o.stdout).lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        let version = lines.first().and_then(|l| l["torch"].as_str()).unwrap_or("?").to_string();
        for l in lines.iter().skip(1) {
            let mode = l["mode"].as_str().unwrap_or("?");
            out.push((
                format!("PyTorch {version} {variant}, {mode}"),
                l["images_per_second"].as_f64().context("no images/s")?,
            ));
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn throughput(
    device: &Device,
    model: &str,
    size: usize,
    batch: usize,
    smoke: bool,
    python: Option<&Path>,
    device_name: &str,
) -> Result<String> {
    let seconds = if smoke { 0.5 } else { 10.0 };
    let mut md = String::from("| what | images/s |\n|---|---:|\n");
    let mut ours_f32_train = None;
    let mut variants: Vec<_> = dtypes_on(device)
        .into_iter()
        .filter(|&d| d != DType::F16)
        .map(|d| (d, Precision::F32, if d == DType::F32 { "f32" } else { "bf16 (weights and activations)" }))
        .collect();
    variants.push((DType::F32, Precision::Bf16, "`--precision bf16` (f32 master weights)"));
    for (dtype, precision, what) in variants {
        for train in [true, false] {
            let mode = if train { "train" } else { "infer" };
            match ours(device, model, size, batch, dtype, precision, train, seconds) {
                Ok(v) => {
                    if train && dtype == DType::F32 && precision == Precision::F32 {
                        ours_f32_train = Some(v);
                    }
                    let _ = writeln!(md, "| sae {what}, {mode} | {v:.1} |");
                }
                Err(e) => {
                    let _ = writeln!(md, "| sae {what}, {mode} | **error**: `{}` |", brief(&e));
                }
            }
        }
    }
    match step_split(device, model, size, batch, seconds / 3.0) {
        Ok(split) => {
            let _ = writeln!(md, "| sae f32, train step split | {split} |");
        }
        Err(e) => {
            let _ = writeln!(md, "| sae f32, train step split | **error**: `{}` |", brief(&e));
        }
    }
    if device.is_cuda() {
        // PyTorch's cuDNN convolutions use TF32 by default (torch.backends.cudnn.allow_tf32).
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        let tf32 = ours(device, model, size, batch, DType::F32, Precision::F32, true, seconds);
        candle_core::cuda::set_gemm_reduced_precision_f32(false);
        match tf32 {
            Ok(v) => {
                let _ = writeln!(md, "| sae f32 with TF32 matmuls (PyTorch's cuDNN default), train | {v:.1} |");
            }
            Err(e) => {
                let _ = writeln!(md, "| sae f32 with TF32 matmuls, train | **error**: `{}` |", brief(&e));
            }
        }
    }
    let Some(python) = python else {
        md.push_str("\nPyTorch not measured (no `--python`).\n");
        return Ok(md);
    };
    match torch_rows(python, device_name, model, size, batch, seconds) {
        Ok(rows) => {
            for (what, v) in &rows {
                let _ = writeln!(md, "| {what} | {v:.1} |");
            }
            let eager_train = rows.iter().find(|(w, _)| w.contains("eager, train")).map(|r| r.1);
            if let (Some(a), Some(b)) = (ours_f32_train, eager_train) {
                let _ = writeln!(md, "\nTraining f32, sae / PyTorch eager: **{:.2}×** (target ≥ 1).", a / b);
            }
        }
        Err(e) => {
            let _ = writeln!(md, "| PyTorch | **error**: `{}` |", brief(&e));
        }
    }
    let _ = writeln!(md, "\nTraining: forward, backward and the Adam step; inference: an eval-mode forward. Median step after two warm-ups, at least {seconds} s each, synchronised.");
    Ok(md)
}

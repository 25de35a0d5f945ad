//! The excitation's CUDA kernels (`src/cuda/excitation.cu`) run on the CPU and match the
//! reference, forward and every gradient, for f32, f16 and bf16, contiguous and strided inputs,
//! both gates, batch 1, odd sizes and blocks of several warps.
//!
//! No GPU is needed: `tests/cuda_on_cpu/` compiles the `.cu` source as C++20 with the host
//! compiler against `cuda_emulation.h` (threads per block meeting at real barriers, warp
//! shuffles as exchanges between a warp's threads, shared memory) and stub `cuda_fp16.h` /
//! `cuda_bf16.h`, and `harness.cpp` launches the kernels in the sequence `excitation/cuda.rs`
//! uses. The one source change is textual: dynamic shared memory (`extern __shared__`) becomes
//! the launch's buffer. What this proves and what it cannot (races between concurrently
//! running blocks, lockstep assumptions, performance) is in `cuda_emulation.h` and
//! ARCHITECTURE.md. Without a C++20 compiler (`CXX`, else `c++`) the test says it is skipped,
//! unless `SAE_REQUIRE_CXX=1` (CI), which makes that a failure.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sae_kernels::{excitation_reference, ExcitationWeights, Gate};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Threads per block: two warps (every emulated thread is a real one, and 2 cores spend their
/// time in barriers), and once the 256 that `excitation/cuda.rs` launches with.
const BLOCK: u64 = 64;
const CUDA_RS_BLOCK: u64 = 256;

/// Compiles `cpp` (a harness in `tests/cuda_on_cpu/`) into `dir` with the stub CUDA headers,
/// `src/cuda` and `dir` on the include path; `None` when there is no C++ compiler (and it is
/// not required).
fn build(dir: &Path, cpp: &str) -> Option<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let exe = dir.join(cpp.trim_end_matches(".cpp"));
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-o"])
        .arg(&exe)
        .arg("-I")
        .arg(here.join("tests/cuda_on_cpu/include"))
        .arg("-I")
        .arg(dir)
        .arg("-I")
        .arg(here.join("src/cuda"))
        .arg(here.join("tests/cuda_on_cpu").join(cpp))
        .status();
    match status {
        Ok(s) if s.success() => Some(exe),
        other => {
            let required = std::env::var("SAE_REQUIRE_CXX").is_ok_and(|v| v == "1");
            assert!(!required, "SAE_REQUIRE_CXX=1 but {cxx} could not build {cpp}: {other:?}");
            eprintln!("skipped: {cxx} could not build the CUDA-on-CPU harness {cpp} ({other:?})");
            None
        }
    }
}

/// The excitation's harness: the kernel source with its dynamic shared memory made the
/// launch's buffer (the one textual change).
fn excitation_harness(dir: &Path) -> Option<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(here.join("src/cuda/excitation.cu")).unwrap();
    let dynamic = "extern __shared__ float smem[];";
    assert!(source.contains(dynamic), "the kernels' dynamic shared memory declaration changed");
    std::fs::write(dir.join("excitation_cpu.cu"), source.replace(dynamic, "float *smem = sae_dynamic_shared.data();"))
        .unwrap();
    build(dir, "harness.cpp")
}

fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-{name}-")).tempdir().unwrap()
}

/// Element bytes of `t` (any dtype of the three) in storage order.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => panic!("{other:?}"),
    }
}

fn from_bytes(b: &[u8], dtype: DType, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = match dtype {
        DType::F32 => b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        DType::F16 => b.chunks(2).map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect(),
        _ => b.chunks(2).map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect(),
    };
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn cuda_kernels_on_the_cpu_match_the_reference() {
    let dir = scratch_dir("cuda-on-cpu");
    let dir = dir.path();
    let Some(exe) = excitation_harness(dir) else { return };
    // (N, C, H, W, hidden): batch 1, 1×1 planes, odd sizes, C/r = 1, planes longer than a block.
    let cases = [(2, 64, 7, 7, 8), (1, 32, 1, 1, 1), (3, 48, 5, 9, 4), (2, 16, 17, 19, 2), (1, 300, 3, 3, 7)];
    let mut checked = 0;
    for (case, &(n, c, h, w, hidden)) in cases.iter().enumerate() {
        for strided in [false, true] {
            for gate in [Gate::S, Gate::OnePlusS] {
                for (dtype, code, tol) in
                    [(DType::F32, 0u64, F32_TOL), (DType::F16, 1, BF16_TOL), (DType::BF16, 2, BF16_TOL)]
                {
                    let what = format!("case {case} {:?} strided={strided} {gate:?} {dtype:?}", (n, c, h, w, hidden));
                    let seed = 100 * case as u64;
                    // The input in the dtype: contiguous (N, C, H, W), or the transpose of a
                    // (C, N, H, W) storage.
                    let storage =
                        if strided { randn(seed, &[c, n, h, w], dtype) } else { randn(seed, &[n, c, h, w], dtype) };
                    let x = if strided { storage.transpose(0, 1).unwrap() } else { storage.clone() };
                    let (s0, s1) = if strided { (h * w, n * h * w) } else { (c * h * w, h * w) };
                    let grad = randn(seed + 9, &[n, c, h, w], dtype);
                    let weights = [
                        randn(seed + 1, &[hidden, c], dtype),
                        randn(seed + 2, &[hidden], dtype),
                        randn(seed + 3, &[c, hidden], dtype),
                        randn(seed + 4, &[c], dtype),
                    ];
                    let packed =
                        Tensor::cat(&weights.iter().map(|t| t.flatten_all().unwrap()).collect::<Vec<_>>(), 0).unwrap();
                    let mut input: Vec<u8> = Vec::new();
                    let header: [u64; 21] = [
                        code,
                        n as u64,
                        c as u64,
                        h as u64,
                        w as u64,
                        hidden as u64,
                        (gate == Gate::OnePlusS) as u64,
                        if case == 0 && !strided && dtype == DType::F32 { CUDA_RS_BLOCK } else { BLOCK },
                        0,
                        s0 as u64,
                        s1 as u64,
                        w as u64,
                        1,
                        storage.elem_count() as u64,
                        0,
                        (c * h * w) as u64,
                        (h * w) as u64,
                        w as u64,
                        1,
                        grad.elem_count() as u64,
                        packed.elem_count() as u64,
                    ];
                    input.extend(header.iter().flat_map(|v| v.to_le_bytes()));
                    for t in [&storage, &grad, &packed] {
                        input.extend(bytes(t));
                    }
                    let (inp, out) = (dir.join("in.bin"), dir.join("out.bin"));
                    std::fs::write(&inp, input).unwrap();
                    let status = Command::new(&exe).arg(&inp).arg(&out).status().unwrap();
                    assert!(status.success(), "{what}: harness failed");
                    let result = std::fs::read(&out).unwrap();
                    let elem = dtype.size_in_bytes();
                    let numel = n * c * h * w;
                    let forward = from_bytes(&result[..numel * elem], dtype, &[n, c, h, w]);
                    let backward = &result[numel * elem..];

                    // The reference in f32 on the same (rounded) values, through autograd.
                    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                    let xv = Var::from_tensor(&f32_of(&x)).unwrap();
                    let vars = weights.each_ref().map(|t| Var::from_tensor(&f32_of(t)).unwrap());
                    let ew = ExcitationWeights {
                        fc1_weight: &vars[0],
                        fc1_bias: &vars[1],
                        fc2_weight: &vars[2],
                        fc2_bias: &vars[3],
                    };
                    let out_ref = excitation_reference(&xv, &ew, gate).unwrap();
                    let loss = (&out_ref * f32_of(&grad)).unwrap().sum_all().unwrap();
                    let grads = loss.backward().unwrap();
                    assert_close(&format!("{what} forward"), &forward, &out_ref, tol);
                    let dx = from_bytes(&backward[..numel * elem], dtype, &[n, c, h, w]);
                    assert_close(&format!("{what} d/dx"), &dx, grads.get(&xv).unwrap(), tol);
                    let mut at = numel * elem;
                    for (name, v) in ["fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"].iter().zip(&vars) {
                        let len = v.elem_count() * elem;
                        let got = from_bytes(&backward[at..at + len], dtype, v.dims());
                        assert_close(&format!("{what} d/d{name}"), &got, grads.get(v).unwrap(), tol);
                        at += len;
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, cases.len() * 12);
}

/// `src/cuda/ops.cu` through `ops_harness.cpp`: one call of the harness per kernel sequence.
struct OpsHarness {
    exe: PathBuf,
    dir: PathBuf,
    dtype: DType,
    /// Threads per block, and the most blocks an element-wise launch gets.
    block: u64,
    max_blocks: u64,
}

/// An (N, C, H, W) operand as the harness receives it: its storage and `Strides4`, and the
/// same values as an f32 tensor for the references.
struct Operand {
    storage: Vec<u8>,
    strides: [usize; 5],
    f32: Tensor,
}

/// Random values in `dtype`: contiguous, or (strided) the (N, C) transpose of a (C, N, H, W)
/// storage that starts one element in.
fn operand(seed: u64, [n, c, h, w]: [usize; 4], dtype: DType, strided: bool) -> Operand {
    if !strided {
        let t = randn(seed, &[n, c, h, w], dtype);
        return Operand {
            storage: bytes(&t),
            strides: [0, c * h * w, h * w, w, 1],
            f32: t.to_dtype(DType::F32).unwrap(),
        };
    }
    let flat = randn(seed, &[1 + n * c * h * w], dtype);
    let view = flat.narrow(0, 1, n * c * h * w).unwrap().reshape((c, n, h, w)).unwrap().transpose(0, 1).unwrap();
    Operand { storage: bytes(&flat), strides: [1, h * w, n * h * w, w, 1], f32: view.to_dtype(DType::F32).unwrap() }
}

impl OpsHarness {
    /// Runs harness op `op` and returns its output, `len` elements of `out_dtype`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        op: u64,
        geometry: [usize; 10],
        xs: [usize; 5],
        gs: [usize; 5],
        relu: bool,
        count: usize,
        buffers: &[&[u8]],
        out_dtype: DType,
        shape: &[usize],
    ) -> Tensor {
        let code = match self.dtype {
            DType::F32 => 0u64,
            DType::F16 => 1,
            _ => 2,
        };
        let header = [op, code, self.block, self.max_blocks]
            .into_iter()
            .chain(geometry.iter().chain(&xs).chain(&gs).map(|&v| v as u64).chain([relu as u64, count as u64]));
        let mut input: Vec<u8> = header.flat_map(u64::to_le_bytes).collect();
        for b in buffers {
            input.extend((b.len() as u64).to_le_bytes());
            input.extend_from_slice(b);
        }
        let (inp, out) = (self.dir.join("ops_in.bin"), self.dir.join("ops_out.bin"));
        std::fs::write(&inp, input).unwrap();
        let status = Command::new(&self.exe).arg(&inp).arg(&out).status().unwrap();
        assert!(status.success(), "ops harness op {op} failed");
        let result = std::fs::read(&out).unwrap();
        let len: usize = shape.iter().product();
        assert_eq!(result.len(), len * out_dtype.size_in_bytes(), "op {op}: output length");
        from_bytes(&result, out_dtype, shape)
    }

    /// The dtype's bytes of an f32 tensor (rounded once).
    fn encode(&self, t: &Tensor) -> Vec<u8> {
        bytes(&t.to_dtype(self.dtype).unwrap())
    }

    fn tol(&self) -> (f64, f64) {
        if self.dtype == DType::F32 {
            F32_TOL
        } else {
            BF16_TOL
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// (output, gradient of Σ output ⊙ probe for every var) of an f32 CPU op.
fn with_grads(vars: &[&Var], probe: &Tensor, f: impl Fn() -> Tensor) -> (Tensor, Vec<Tensor>) {
    let out = f();
    let grads = (&out * probe).unwrap().sum_all().unwrap().backward().unwrap();
    (out, vars.iter().map(|v| grads.get(v).unwrap().clone()).collect())
}

#[test]
fn ops_kernels_on_the_cpu_match_the_reference() {
    use sae_kernels::*;
    let dir = scratch_dir("cuda-ops-on-cpu");
    let dir = dir.path();
    let Some(exe) = build(dir, "ops_harness.cpp") else { return };
    let contiguous = |[_, c, h, w]: [usize; 4]| [0, c * h * w, h * w, w, 1];
    let mut checked = 0;
    for (dtype, strided, block, max_blocks) in [
        (DType::F32, false, CUDA_RS_BLOCK, 1 << 20),
        (DType::F32, true, BLOCK, 3),
        (DType::F16, true, BLOCK, 3),
        (DType::BF16, false, BLOCK, 3),
        (DType::BF16, true, BLOCK, 5),
    ] {
        let h = OpsHarness { exe: exe.clone(), dir: dir.to_path_buf(), dtype, block, max_blocks };
        let tol = h.tol();
        let what = |op: &str, dims: &dyn std::fmt::Debug| format!("{op} {dims:?} {dtype:?} strided={strided}");

        // Convolution: im2col, the groups' multiplies in f32 here, col2im of Wᵀ·dy.
        for (seed, x_dims, (oc, kh, kw), stride, pad, groups) in [
            (1, [2, 6, 9, 7], (4, 3, 3), 2, 1, 2),
            (2, [1, 3, 5, 5], (5, 1, 1), 1, 0, 1),
            (3, [3, 4, 8, 6], (4, 3, 2), 3, 2, 4),
        ] {
            let [n, c, hh, ww] = x_dims;
            let x = operand(seed, x_dims, dtype, strided);
            let wt = Var::from_tensor(&randn(seed + 1, &[oc, c / groups, kh, kw], dtype).to_dtype(DType::F32).unwrap())
                .unwrap();
            let xv = Var::from_tensor(&x.f32).unwrap();
            let cfg = Conv2dConfig { stride, padding: pad, groups };
            let (oh, ow) = ((hh + 2 * pad - kh) / stride + 1, (ww + 2 * pad - kw) / stride + 1);
            let probe = randn(seed + 2, &[n, oc, oh, ow], dtype).to_dtype(DType::F32).unwrap();
            let (y_ref, g_ref) = with_grads(&[&xv, &wt], &probe, || conv2d_reference(&xv, &wt, cfg).unwrap());
            let geometry = [n, c, hh, ww, kh, kw, oh, ow, stride, pad];
            let (kg, og, np) = (c / groups * kh * kw, oc / groups, n * oh * ow);
            let col = h.run(0, geometry, x.strides, x.strides, false, 0, &[&x.storage], dtype, &[groups, kg, np]);
            let w_g = wt.reshape((groups, og, kg)).unwrap();
            let y = w_g.matmul(&col).unwrap().reshape((oc, n, oh, ow)).unwrap().transpose(0, 1).unwrap();
            // The unrolled values are copies, so the product is f32 arithmetic on both sides.
            assert_close(&what("conv2d via im2col", &x_dims), &y, &y_ref, F32_TOL);
            let dy = probe.transpose(0, 1).unwrap().reshape((groups, og, np)).unwrap();
            let dcol = w_g.transpose(1, 2).unwrap().matmul(&dy).unwrap();
            let dx = h.run(1, geometry, x.strides, x.strides, false, 0, &[&h.encode(&dcol)], dtype, &x_dims);
            assert_close(&what("conv2d dx via col2im", &x_dims), &dx, &g_ref[0], tol);
            checked += 2;
        }

        // Max-pool against the CPU kernel (a tie goes to the first maximum in both; in f16 and
        // bf16 the rounded inputs do tie).
        for (seed, x_dims, k, stride, pad) in
            [(4, [2, 3, 9, 7], 3, 2, 1), (5, [1, 2, 5, 5], 2, 2, 0), (6, [3, 2, 6, 8], 3, 1, 1)]
        {
            let [n, c, hh, ww] = x_dims;
            let x = operand(seed, x_dims, dtype, strided);
            let xv = Var::from_tensor(&x.f32).unwrap();
            let cfg = MaxPoolConfig { kernel: k, stride, padding: pad };
            let (oh, ow) = cfg.output_size(hh, ww).unwrap();
            let probe = randn(seed + 1, &[n, c, oh, ow], dtype).to_dtype(DType::F32).unwrap();
            let (y_ref, g_ref) = with_grads(&[&xv], &probe, || max_pool2d(&xv, cfg, Implementation::Fused).unwrap());
            let geometry = [n, c, hh, ww, k, k, oh, ow, stride, pad];
            let y = h.run(2, geometry, x.strides, x.strides, false, 0, &[&x.storage], dtype, &[n, c, oh, ow]);
            assert_close(&what("max_pool2d", &x_dims), &y, &y_ref, F32_TOL);
            // The gradient strided too: the transpose of a (C, N, OH, OW) storage.
            let (g_bytes, g_strides) = if strided {
                (h.encode(&probe.transpose(0, 1).unwrap().contiguous().unwrap()), [0, oh * ow, n * oh * ow, ow, 1])
            } else {
                (h.encode(&probe), contiguous([n, c, oh, ow]))
            };
            let dx = h.run(3, geometry, x.strides, g_strides, false, 0, &[&x.storage, &g_bytes], dtype, &x_dims);
            assert_close(&what("max_pool2d dx", &x_dims), &dx, &g_ref[0], tol);
            checked += 2;
        }

        // Depthwise convolution.
        for (seed, x_dims, k, stride, pad) in
            [(7, [2, 6, 9, 7], 3, 1, 1), (8, [1, 3, 5, 5], 3, 2, 1), (9, [2, 4, 6, 5], 1, 1, 0)]
        {
            let [n, c, hh, ww] = x_dims;
            let x = operand(seed, x_dims, dtype, strided);
            let xv = Var::from_tensor(&x.f32).unwrap();
            let w_t = randn(seed + 1, &[c, 1, k, k], dtype);
            let wv = Var::from_tensor(&w_t.to_dtype(DType::F32).unwrap()).unwrap();
            let cfg = DepthwiseConfig { stride, padding: pad };
            let (oh, ow) = ((hh + 2 * pad - k) / stride + 1, (ww + 2 * pad - k) / stride + 1);
            let probe = randn(seed + 2, &[n, c, oh, ow], dtype).to_dtype(DType::F32).unwrap();
            let (y_ref, g_ref) = with_grads(&[&xv, &wv], &probe, || depthwise_conv2d_reference(&xv, &wv, cfg).unwrap());
            let geometry = [n, c, hh, ww, k, k, oh, ow, stride, pad];
            let w_bytes = bytes(&w_t);
            let bufs: [&[u8]; 2] = [&x.storage, &w_bytes];
            let y = h.run(4, geometry, x.strides, x.strides, false, 0, &bufs, dtype, &[n, c, oh, ow]);
            assert_close(&what("depthwise_conv2d", &x_dims), &y, &y_ref, tol);
            let g_bytes = h.encode(&probe);
            let numel = n * c * hh * ww;
            let bufs: [&[u8]; 3] = [&x.storage, &w_bytes, &g_bytes];
            let gs = contiguous([n, c, oh, ow]);
            let packed = h.run(5, geometry, x.strides, gs, false, 0, &bufs, dtype, &[numel + c * k * k]);
            assert_close(
                &what("depthwise dx", &x_dims),
                &packed.narrow(0, 0, numel).unwrap().reshape(&x_dims[..]).unwrap(),
                &g_ref[0],
                tol,
            );
            let dw = packed.narrow(0, numel, c * k * k).unwrap().reshape((c, 1, k, k)).unwrap();
            assert_close(&what("depthwise dw", &x_dims), &dw, &g_ref[1], tol);
            checked += 3;
        }

        // BatchNorm: statistics; training forward (with and without ReLU) and backward with the
        // statistics passed as the Rust op passes them; eval mode's scale and shift.
        for (seed, x_dims) in [(10, [2, 6, 5, 7]), (11, [1, 3, 2, 3]), (12, [3, 2, 17, 19])] {
            let [n, c, hh, ww] = x_dims;
            let x = operand(seed, x_dims, dtype, strided);
            let xv = Var::from_tensor(&x.f32).unwrap();
            let (gamma, beta) = (randn(seed + 1, &[c], dtype), randn(seed + 2, &[c], dtype));
            let gv = Var::from_tensor(&gamma.to_dtype(DType::F32).unwrap()).unwrap();
            let bv = Var::from_tensor(&beta.to_dtype(DType::F32).unwrap()).unwrap();
            let probe = randn(seed + 3, &x_dims, dtype).to_dtype(DType::F32).unwrap();
            let geometry = [n, c, hh, ww, 1, 1, hh, ww, 1, 0];
            let reference = batch_norm_train_reference(&xv, &gv, &bv, 1e-5).unwrap();
            let stats = h.run(6, geometry, x.strides, x.strides, false, 0, &[&x.storage], DType::F32, &[2, c]);
            assert_close(&what("batch_norm mean", &x_dims), &stats.get(0).unwrap(), &reference.mean, F32_TOL);
            assert_close(&what("batch_norm variance", &x_dims), &stats.get(1).unwrap(), &reference.variance, F32_TOL);
            let mean = reference.mean.to_vec1::<f32>().unwrap();
            let inv_std: Vec<f32> =
                reference.variance.to_vec1::<f32>().unwrap().iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            let (mean_b, inv_b, gamma_b, beta_b) = (f32_bytes(&mean), f32_bytes(&inv_std), bytes(&gamma), bytes(&beta));
            for relu in [false, true] {
                let bufs: [&[u8]; 5] = [&x.storage, &gamma_b, &beta_b, &mean_b, &inv_b];
                let y = h.run(7, geometry, x.strides, x.strides, relu, 0, &bufs, dtype, &x_dims);
                let y_ref = if relu { reference.output.relu().unwrap() } else { reference.output.clone() };
                assert_close(&what(&format!("batch_norm relu={relu}"), &x_dims), &y, &y_ref, tol);
            }
            let (_, g_ref) = with_grads(&[&xv, &gv, &bv], &probe, || {
                batch_norm_train_reference(&xv, &gv, &bv, 1e-5).unwrap().output
            });
            let dy = h.encode(&probe);
            let bufs: [&[u8]; 5] = [&x.storage, &gamma_b, &dy, &mean_b, &inv_b];
            let numel = n * c * hh * ww;
            let packed = h.run(8, geometry, x.strides, x.strides, false, 0, &bufs, dtype, &[numel + 2 * c]);
            let dx = packed.narrow(0, 0, numel).unwrap().reshape(&x_dims[..]).unwrap();
            assert_close(&what("batch_norm dx", &x_dims), &dx, &g_ref[0], tol);
            assert_close(&what("batch_norm dγ", &x_dims), &packed.narrow(0, numel, c).unwrap(), &g_ref[1], tol);
            assert_close(&what("batch_norm dβ", &x_dims), &packed.narrow(0, numel + c, c).unwrap(), &g_ref[2], tol);

            // Eval mode: γ and β as the folded scale and shift, no statistics.
            let affine = || {
                xv.broadcast_mul(&gv.reshape((1, c, 1, 1)).unwrap())
                    .unwrap()
                    .broadcast_add(&bv.reshape((1, c, 1, 1)).unwrap())
                    .unwrap()
            };
            let (y_ref, g_ref) = with_grads(&[&xv, &gv, &bv], &probe, affine);
            let bufs: [&[u8]; 5] = [&x.storage, &gamma_b, &beta_b, &[], &[]];
            let y = h.run(7, geometry, x.strides, x.strides, false, 0, &bufs, dtype, &x_dims);
            assert_close(&what("batch_norm eval", &x_dims), &y, &y_ref, tol);
            let bufs: [&[u8]; 5] = [&x.storage, &gamma_b, &dy, &[], &[]];
            let packed = h.run(8, geometry, x.strides, x.strides, false, 0, &bufs, dtype, &[numel + 2 * c]);
            let dx = packed.narrow(0, 0, numel).unwrap().reshape(&x_dims[..]).unwrap();
            assert_close(&what("batch_norm eval dx", &x_dims), &dx, &g_ref[0], tol);
            assert_close(
                &what("batch_norm eval dscale", &x_dims),
                &packed.narrow(0, numel, c).unwrap(),
                &g_ref[1],
                tol,
            );
            assert_close(
                &what("batch_norm eval dshift", &x_dims),
                &packed.narrow(0, numel + c, c).unwrap(),
                &g_ref[2],
                tol,
            );
            checked += 11;
        }

        // ReLU, the residual addition + ReLU, and the ReLU's backward (contiguous operands).
        let dims = [3, 5, 7, 11];
        let count = dims.iter().product();
        let (a, b) = (randn(13, &dims, dtype), randn(14, &dims, dtype));
        let (af, bf) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        let none = [0; 10];
        let y = h.run(9, none, [0; 5], [0; 5], false, count, &[&bytes(&a), &[]], dtype, &dims);
        assert_close(&what("relu", &dims), &y, &af.relu().unwrap(), F32_TOL);
        let y = h.run(9, none, [0; 5], [0; 5], false, count, &[&bytes(&a), &bytes(&b)], dtype, &dims);
        let sum = (&af + &bf).unwrap().to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        assert_close(&what("add_relu", &dims), &y, &sum.relu().unwrap(), tol);
        let dx = h.run(10, none, [0; 5], [0; 5], false, count, &[&bytes(&a), &bytes(&b)], dtype, &dims);
        let mask = af.gt(0.0).unwrap().to_dtype(DType::F32).unwrap();
        assert_close(&what("relu dx", &dims), &dx, &(&bf * mask).unwrap(), F32_TOL);
        checked += 3;

        // ReLU6 (values at exactly 0 and 6 among them, where no gradient passes) and its
        // backward, against the reference composition and its rule.
        let scaled = (randn(15, &dims, DType::F32) * 5.0).unwrap().to_dtype(dtype).unwrap().flatten_all().unwrap();
        let edges = Tensor::new(&[0f32, 6.0, -0.0, 7.5], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let x6 =
            Tensor::cat(&[&edges, &scaled.narrow(0, 4, count - 4).unwrap()], 0).unwrap().reshape(&dims[..]).unwrap();
        let x6f = x6.to_dtype(DType::F32).unwrap();
        let y = h.run(11, none, [0; 5], [0; 5], false, count, &[&bytes(&x6)], dtype, &dims);
        assert_close(&what("relu6", &dims), &y, &relu6_reference(&x6f).unwrap(), F32_TOL);
        let y6 = x6.clamp(0f32, 6f32).unwrap();
        let dx = h.run(12, none, [0; 5], [0; 5], false, count, &[&bytes(&y6), &bytes(&b)], dtype, &dims);
        let inside = x6f.gt(0.0).unwrap().minimum(&x6f.lt(6.0).unwrap()).unwrap().to_dtype(DType::F32).unwrap();
        assert_close(&what("relu6 dx", &dims), &dx, &(&bf * inside).unwrap(), F32_TOL);
        // A convolution's bias per channel, and the bias gradient: the sums of each channel.
        let [n, c, hh, ww] = dims;
        let geometry = [n, c, hh, ww, 1, 1, hh, ww, 1, 0];
        let bias = randn(16, &[c], dtype);
        let y = h.run(13, geometry, [0; 5], [0; 5], false, 0, &[&bytes(&a), &bytes(&bias)], dtype, &dims);
        let biased = af.broadcast_add(&bias.to_dtype(DType::F32).unwrap().reshape((1, c, 1, 1)).unwrap()).unwrap();
        let rounded = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        assert_close(&what("add_channel_bias", &dims), &y, &rounded(biased), tol);
        let sums = h.run(14, geometry, [0; 5], [0; 5], false, 0, &[&bytes(&b)], dtype, &[c]);
        assert_close(&what("add_channel_bias dbias", &dims), &sums, &rounded(bf.sum((0, 2, 3)).unwrap()), tol);
        checked += 4;
    }
    assert_eq!(checked, 5 * (6 + 6 + 9 + 33 + 3 + 4));
}

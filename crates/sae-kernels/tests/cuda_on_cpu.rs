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

/// Builds the harness once; `None` when there is no C++ compiler (and it is not required).
fn harness(dir: &Path) -> Option<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(here.join("src/cuda/excitation.cu")).unwrap();
    let dynamic = "extern __shared__ float smem[];";
    assert!(source.contains(dynamic), "the kernels' dynamic shared memory declaration changed");
    std::fs::write(dir.join("excitation_cpu.cu"), source.replace(dynamic, "float *smem = sae_dynamic_shared.data();"))
        .unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let exe = dir.join("harness");
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-o"])
        .arg(&exe)
        .arg("-I")
        .arg(here.join("tests/cuda_on_cpu/include"))
        .arg("-I")
        .arg(dir)
        .arg(here.join("tests/cuda_on_cpu/harness.cpp"))
        .status();
    match status {
        Ok(s) if s.success() => Some(exe),
        other => {
            let required = std::env::var("SAE_REQUIRE_CXX").is_ok_and(|v| v == "1");
            assert!(!required, "SAE_REQUIRE_CXX=1 but {cxx} could not build the harness: {other:?}");
            eprintln!("skipped: {cxx} could not build the CUDA-on-CPU harness ({other:?})");
            None
        }
    }
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
    let dir = std::env::temp_dir().join(format!("sae-cuda-on-cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Some(exe) = harness(&dir) else { return };
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
    std::fs::remove_dir_all(&dir).unwrap();
}

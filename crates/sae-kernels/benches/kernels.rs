//! Criterion benchmarks of the fused kernels against their references (and Candle's own
//! way), at the shapes the paper's models produce, plus this machine's memory bandwidth.
//! `cargo xtask bench-kernels` runs them and writes `results/kernels.md`.
//!
//! Benchmark ids are `<group>/<implementation>/<pass>`; the xtask reads criterion's estimates
//! by those ids. Backward passes start from `sum_all`, whose gradient is a broadcast of ones,
//! except the excitation's `fused/kernels`, which calls the fused forward and backward ops
//! directly to time them apart from Candle's autograd.

#![allow(missing_docs)] // criterion_group! generates undocumented public functions.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use sae_kernels::*;
use std::hint::black_box;
use std::time::Duration;

/// mimalloc, as the `sae` and `xtask` binaries declare (`cargo xtask bench-kernels` runs this
/// with `MIMALLOC_PURGE_DELAY=-1`, as they set it): with glibc's malloc every large buffer is a
/// fresh `mmap` whose pages fault in on each iteration, which made the convolutions' times
/// swing by half between runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn measurement_time() -> Duration {
    let secs = std::env::var("SAE_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    Duration::from_secs(secs)
}

/// The excitation shapes of the issue: ResNet-50 stages at 140×140 input and a CIFAR batch.
pub const EXCITATION_SHAPES: [[usize; 4]; 4] =
    [[16, 256, 35, 35], [16, 1024, 9, 9], [16, 2048, 5, 5], [128, 256, 8, 8]];

fn excitation_benches(c: &mut Criterion) {
    for shape in EXCITATION_SHAPES {
        for (module, k) in [("se", 1), ("sae", 4)] {
            let ch = shape[1];
            let hidden = k * ch / 32;
            let x = Var::from_tensor(&randn(1, &shape)).unwrap();
            let w1 = Var::from_tensor(&(randn(2, &[hidden, ch]) * 0.1).unwrap()).unwrap();
            let b1 = Var::from_tensor(&randn(3, &[hidden])).unwrap();
            let w2 = Var::from_tensor(&(randn(4, &[ch, hidden]) * 0.1).unwrap()).unwrap();
            let b2 = Var::from_tensor(&randn(5, &[ch])).unwrap();
            let weights = ExcitationWeights { fc1_weight: &w1, fc1_bias: &b1, fc2_weight: &w2, fc2_bias: &b2 };
            let name = format!("excitation-{module}-{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
            let mut group = c.benchmark_group(&name);
            group.sample_size(10).measurement_time(measurement_time()).warm_up_time(Duration::from_millis(500));
            for imp in Implementation::ALL {
                group.bench_function(BenchmarkId::new(imp.name(), "fwd"), |b| {
                    b.iter(|| black_box(excitation(&x, &weights, Gate::OnePlusS, imp).unwrap()))
                });
                group.bench_function(BenchmarkId::new(imp.name(), "fwd+bwd"), |b| {
                    b.iter(|| {
                        let y = excitation(&x, &weights, Gate::OnePlusS, imp).unwrap();
                        black_box(y.sum_all().unwrap().backward().unwrap())
                    })
                });
            }
            // The fused kernels alone: the forward op and the backward op called directly, with
            // the gradient `sum_all` would give (ones) already in memory: no graph, no gradient store.
            let ones = x.ones_like().unwrap();
            group.bench_function(BenchmarkId::new("fused", "kernels"), |b| {
                b.iter(|| {
                    let y = excitation(&x, &weights, Gate::OnePlusS, Implementation::Fused).unwrap();
                    black_box((y, excitation_backward(&x, &weights, Gate::OnePlusS, &ones).unwrap()))
                })
            });
            group.finish();
        }
    }
}

/// Depthwise shapes of MobileNet v1 at 140×140 input: first block, middle, last.
pub const DEPTHWISE_SHAPES: [([usize; 4], usize); 3] =
    [([16, 32, 70, 70], 1), ([16, 512, 9, 9], 1), ([16, 512, 9, 9], 2)];

fn depthwise_benches(c: &mut Criterion) {
    for (shape, stride) in DEPTHWISE_SHAPES {
        let x = Var::from_tensor(&randn(1, &shape)).unwrap();
        let w = Var::from_tensor(&randn(2, &[shape[1], 1, 3, 3])).unwrap();
        let cfg = DepthwiseConfig { stride, padding: 1 };
        let name = format!("depthwise-{}x{}x{}x{}-s{stride}", shape[0], shape[1], shape[2], shape[3]);
        let mut group = c.benchmark_group(&name);
        group.sample_size(10).measurement_time(measurement_time()).warm_up_time(Duration::from_millis(500));
        for imp in Implementation::ALL {
            group.bench_function(BenchmarkId::new(imp.name(), "fwd"), |b| {
                b.iter(|| black_box(depthwise_conv2d(&x, &w, cfg, imp).unwrap()))
            });
            group.bench_function(BenchmarkId::new(imp.name(), "fwd+bwd"), |b| {
                b.iter(|| black_box(depthwise_conv2d(&x, &w, cfg, imp).unwrap().sum_all().unwrap().backward().unwrap()))
            });
        }
        group.finish();
    }
}

/// Convolutions of ResNet-50 at 140×140 input, batch 16 (input shape, output channels, kernel,
/// stride): layer 1's 3×3 (Winograd in f32) and 1×1 reduction, layer 2's stride-2 3×3, layer
/// 3's 3×3 (Winograd) and 1×1 reduction, the 7×7 stem; and layers 4's, 2's and 3's 3×3 at 32×32
/// input, on 1×1, 4×4 and 2×2 images.
pub const CONV_SHAPES: [([usize; 4], usize, usize, usize); 9] = [
    ([16, 64, 35, 35], 64, 3, 1),
    ([16, 256, 35, 35], 64, 1, 1),
    ([16, 128, 35, 35], 128, 3, 2),
    ([16, 256, 9, 9], 256, 3, 1),
    ([16, 1024, 9, 9], 256, 1, 1),
    ([16, 3, 140, 140], 64, 7, 2),
    ([16, 512, 1, 1], 512, 3, 1),
    ([16, 128, 4, 4], 128, 3, 1),
    ([16, 256, 2, 2], 256, 3, 1),
];

/// Group `conv-NxCxHxW-oO-kK-sS`: Candle's `conv2d` (*reference*) and ours (*fused*) in f32,
/// and ours on bf16 activations with f32 master weights (*fused-bf16*, as `--precision bf16`
/// trains).
fn conv_benches(c: &mut Criterion) {
    for (shape, oc, k, stride) in CONV_SHAPES {
        let cfg = Conv2dConfig { stride, padding: k / 2, groups: 1 };
        // The stem's input is the image, which no gradient flows to in training.
        let input = |t: Tensor| if shape[1] == 3 { t } else { Var::from_tensor(&t).unwrap().as_tensor().clone() };
        let x32 = randn(1, &shape);
        let (x, xb) = (input(x32.clone()), input(x32.to_dtype(DType::BF16).unwrap()));
        let w = Var::from_tensor(&(randn(2, &[oc, shape[1], k, k]) * 0.1).unwrap()).unwrap();
        let name = format!("conv-{}x{}x{}x{}-o{oc}-k{k}-s{stride}", shape[0], shape[1], shape[2], shape[3]);
        let mut group = c.benchmark_group(&name);
        group.sample_size(10).measurement_time(measurement_time()).warm_up_time(Duration::from_millis(500));
        let runs = [
            ("reference", &x, Implementation::Reference),
            ("fused", &x, Implementation::Fused),
            ("fused-bf16", &xb, Implementation::Fused),
        ];
        for (id, x, imp) in runs {
            group.bench_function(BenchmarkId::new(id, "fwd"), |b| {
                b.iter(|| black_box(conv2d(x, &w, cfg, imp).unwrap()))
            });
            // The loss in f32 (as `--precision bf16` computes it): Candle's own bf16 `sum_all`
            // and the bf16 gradient it broadcasts took 50 % of this benchmark's time.
            group.bench_function(BenchmarkId::new(id, "fwd+bwd"), |b| {
                b.iter(|| {
                    let y = conv2d(x, &w, cfg, imp).unwrap().to_dtype(DType::F32).unwrap();
                    black_box(y.sum_all().unwrap().backward().unwrap())
                })
            });
        }
        group.finish();
    }
}

/// ResNet's stem pool at 140×140 (after the 7×7/2 conv) and 224×224 input.
pub const POOL_SHAPES: [[usize; 4]; 2] = [[16, 64, 70, 70], [16, 64, 112, 112]];

fn max_pool_benches(c: &mut Criterion) {
    let cfg = MaxPoolConfig { kernel: 3, stride: 2, padding: 1 };
    for shape in POOL_SHAPES {
        let x = Var::from_tensor(&randn(1, &shape)).unwrap();
        let name = format!("max-pool-{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        let mut group = c.benchmark_group(&name);
        group.sample_size(10).measurement_time(measurement_time()).warm_up_time(Duration::from_millis(500));
        // Candle's own way: pad (zeros are safe after a ReLU) and pool; it has no backward.
        group.bench_function(BenchmarkId::new("candle", "fwd"), |b| {
            b.iter(|| {
                let p = x.pad_with_zeros(2, 1, 1).unwrap().pad_with_zeros(3, 1, 1).unwrap();
                black_box(p.max_pool2d_with_stride(3, 2).unwrap())
            })
        });
        for imp in Implementation::ALL {
            group.bench_function(BenchmarkId::new(imp.name(), "fwd"), |b| {
                b.iter(|| black_box(max_pool2d(&x, cfg, imp).unwrap()))
            });
            // Inference: an input no gradient flows to (the fused op keeps no argmax).
            let detached = x.as_tensor().detach();
            group.bench_function(BenchmarkId::new(imp.name(), "fwd-no-grad"), |b| {
                b.iter(|| black_box(max_pool2d(&detached, cfg, imp).unwrap()))
            });
            group.bench_function(BenchmarkId::new(imp.name(), "fwd+bwd"), |b| {
                b.iter(|| black_box(max_pool2d(&x, cfg, imp).unwrap().sum_all().unwrap().backward().unwrap()))
            });
        }
        group.finish();
    }
}

/// BatchNorm + ReLU in training mode at ResNet-50's shapes, batch 16: at 140×140 input layer 1's
/// 256 channels at 35×35 and layer 2's 512 at 18×18; at 32×32 input layer 1's 256 at 8×8,
/// layer 2's 512 at 4×4 and layer 4's 2048 at 1×1, where the planes are short and what is done
/// per plane counts.
pub const BATCH_NORM_SHAPES: [[usize; 4]; 5] =
    [[16, 256, 35, 35], [16, 512, 18, 18], [16, 256, 8, 8], [16, 512, 4, 4], [16, 2048, 1, 1]];

fn batch_norm_benches(c: &mut Criterion) {
    for shape in BATCH_NORM_SHAPES {
        let x = Var::from_tensor(&randn(1, &shape)).unwrap();
        let gamma = Var::from_tensor(&(randn(2, &[shape[1]]) + 1.0).unwrap()).unwrap();
        let beta = Var::from_tensor(&randn(3, &[shape[1]])).unwrap();
        let name = format!("batch-norm-{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        let mut group = c.benchmark_group(&name);
        group.sample_size(10).measurement_time(measurement_time()).warm_up_time(Duration::from_millis(500));
        for imp in Implementation::ALL {
            let forward = || batch_norm_train(&x, &gamma, &beta, 1e-5, true, imp).unwrap().output;
            group.bench_function(BenchmarkId::new(imp.name(), "fwd"), |b| b.iter(|| black_box(forward())));
            group.bench_function(BenchmarkId::new(imp.name(), "fwd+bwd"), |b| {
                b.iter(|| black_box(forward().sum_all().unwrap().backward().unwrap()))
            });
        }
        // bf16 activations, γ and β cast to bf16 in the graph, as mixed-precision training runs it.
        let x = Var::from_tensor(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        let forward = || {
            let (gamma, beta) = (cast(&gamma, DType::BF16).unwrap(), cast(&beta, DType::BF16).unwrap());
            batch_norm_train(&x, &gamma, &beta, 1e-5, true, Implementation::Fused).unwrap().output
        };
        group.bench_function(BenchmarkId::new("fused-bf16", "fwd"), |b| b.iter(|| black_box(forward())));
        // Summed in f32 (Candle's bf16 sum is scalar code that would take most of the time).
        group.bench_function(BenchmarkId::new("fused-bf16", "fwd+bwd"), |b| {
            b.iter(|| black_box(forward().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap()))
        });
        group.finish();
    }
}

/// An SE/SaE block's end in training mode — BatchNorm, the excitation, the shortcut addition
/// and the ReLU — composed of the two fused ops (`batch_norm_train`, `excitation_add_relu`)
/// and as one (`batch_norm_excitation_add_relu`), at layer 1's and layer 3's shapes of a
/// SENetV2-ResNet-50 at 140×140 input and layer 3's at 32×32 (short planes), batch 16.
pub const BLOCK_END_SHAPES: [[usize; 4]; 3] = [[16, 256, 35, 35], [16, 1024, 9, 9], [16, 1024, 2, 2]];

fn block_end_benches(c: &mut Criterion) {
    for shape in BLOCK_END_SHAPES {
        for (module, k) in [("se", 1), ("sae", 4)] {
            let ch = shape[1];
            let hidden = ch / 32;
            let x = Var::from_tensor(&randn(1, &shape)).unwrap();
            let shortcut = Var::from_tensor(&randn(2, &shape)).unwrap();
            let gamma = Var::from_tensor(&(randn(3, &[ch]) + 1.0).unwrap()).unwrap();
            let beta = Var::from_tensor(&randn(4, &[ch])).unwrap();
            let fc1: Vec<(Var, Var)> = (0..k as u64)
                .map(|i| {
                    let w = Var::from_tensor(&(randn(10 + i, &[hidden, ch]) * 0.1).unwrap()).unwrap();
                    (w, Var::from_tensor(&randn(20 + i, &[hidden])).unwrap())
                })
                .collect();
            let fc1: Vec<(&Tensor, &Tensor)> = fc1.iter().map(|(w, b)| (w.as_tensor(), b.as_tensor())).collect();
            let w2 = Var::from_tensor(&(randn(5, &[ch, k * hidden]) * 0.1).unwrap()).unwrap();
            let b2 = Var::from_tensor(&randn(6, &[ch])).unwrap();
            let gate = Gate::OnePlusS;
            let composed = || {
                let y = batch_norm_train(&x, &gamma, &beta, 1e-5, false, Implementation::Fused).unwrap().output;
                excitation_add_relu(&y, &fc1, &w2, &b2, gate, &shortcut, Implementation::Fused).unwrap()
            };
            let fused = || {
                let fused = Implementation::Fused;
                batch_norm_excitation_add_relu(&x, &gamma, &beta, 1e-5, &fc1, &w2, &b2, gate, &shortcut, fused)
                    .unwrap()
                    .output
            };
            let name = format!("block-end-{module}-{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
            let mut group = c.benchmark_group(&name);
            group.sample_size(10).measurement_time(measurement_time()).warm_up_time(Duration::from_millis(500));
            for (id, forward) in [("composed", &composed as &dyn Fn() -> Tensor), ("fused", &fused)] {
                group.bench_function(BenchmarkId::new(id, "fwd"), |b| b.iter(|| black_box(forward())));
                group.bench_function(BenchmarkId::new(id, "fwd+bwd"), |b| {
                    b.iter(|| black_box(forward().sum_all().unwrap().backward().unwrap()))
                });
            }
            group.finish();
        }
    }
}

/// Parameters in the Adam benchmark: about a sixth of ResNet-50's, 16 MiB of f32 per stream.
pub const ADAM_PARAMS: usize = 4 << 20;

/// One Adam step over [`ADAM_PARAMS`] parameters: the reference (Candle ops), the three fused
/// passes over moment tensors, and the one pass over interleaved moments the optimiser runs.
fn adam_benches(c: &mut Criterion) {
    let step = AdamStep::adam(0.9, 0.999, 1e-7, 1e-4);
    let theta = Var::from_tensor(&randn(1, &[ADAM_PARAMS])).unwrap();
    let grad = randn(2, &[ADAM_PARAMS]);
    let zeros = || Var::zeros(ADAM_PARAMS, DType::F32, &Device::Cpu).unwrap();
    let (m, v) = (zeros(), zeros());
    let mut moments = vec![0f32; 2 * ADAM_PARAMS];
    let mut group = c.benchmark_group(format!("adam-{ADAM_PARAMS}"));
    group.sample_size(10).measurement_time(measurement_time()).warm_up_time(Duration::from_millis(500));
    group.bench_function(BenchmarkId::new("reference", "step"), |b| {
        b.iter(|| adam_update_reference(&theta, &grad, &m, &v, step).unwrap())
    });
    group.bench_function(BenchmarkId::new("fused", "step"), |b| {
        b.iter(|| adam_update(&theta, &grad, &m, &v, step, Implementation::Fused).unwrap())
    });
    group.bench_function(BenchmarkId::new("interleaved", "step"), |b| {
        b.iter(|| adam_update_interleaved(&theta, &grad, &mut moments, step).unwrap())
    });
    group.finish();
}

/// Memory bandwidth of this machine: copying a 256 MiB buffer (read + write) with two threads.
fn bandwidth_bench(c: &mut Criterion) {
    use rayon::prelude::*;
    let n = 64 << 20;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let mut group = c.benchmark_group("memory-bandwidth");
    group.sample_size(10).measurement_time(measurement_time());
    group.bench_function("copy-256MiB", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
            black_box(&dst);
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bandwidth_bench,
    excitation_benches,
    depthwise_benches,
    max_pool_benches,
    conv_benches,
    batch_norm_benches,
    block_end_benches,
    adam_benches
);
criterion_main!(benches);

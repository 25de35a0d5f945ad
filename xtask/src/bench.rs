//! `cargo xtask bench-kernels`: runs the criterion benchmarks of `sae-kernels` and turns
//! criterion's estimates into `results/kernels.md` (time, speed-up, achieved GB/s against
//! the memory bandwidth measured in the same run).

use crate::{cargo, project_root};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// Mean time in seconds of every benchmark, keyed by (group, function, parameter).
type Estimates = BTreeMap<(String, String, String), f64>;

fn read_estimates(dir: &Path, out: &mut Estimates) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let meta = path.join("new/benchmark.json");
        if meta.exists() {
            let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta)?)?;
            let est: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path.join("new/estimates.json"))?)?;
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
            let key = (s(&meta["group_id"]), s(&meta["function_id"]), s(&meta["value_str"]));
            let mean_ns = est["mean"]["point_estimate"].as_f64().context("estimate without a mean")?;
            out.insert(key, mean_ns * 1e-9);
        } else {
            read_estimates(&path, out)?;
        }
    }
    Ok(())
}

pub use sae_train::bench::machine;

/// Elements of a shape written `16x256x35x35` at the end of a group name.
fn elements(group: &str) -> usize {
    let dims = group.rsplit('-').find(|p| p.contains('x')).unwrap_or("");
    dims.split('x').filter_map(|d| d.parse::<usize>().ok()).product()
}

pub fn kernels(seconds: u64) -> Result<()> {
    let root = project_root();
    let criterion_dir = root.join("target/criterion");
    if criterion_dir.exists() {
        std::fs::remove_dir_all(&criterion_dir)?;
    }
    std::env::set_var("SAE_BENCH_SECONDS", seconds.to_string());
    // Freed memory stays mapped, as in the binaries (`sae_train::allocator::keep_freed_memory`).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        std::env::set_var("MIMALLOC_PURGE_DELAY", "-1");
    }
    cargo(&["bench", "-p", "sae-kernels", "--bench", "kernels"])?;
    let mut est = Estimates::new();
    read_estimates(&criterion_dir, &mut est)?;
    let get = |g: &str, f: &str, p: &str| est.get(&(g.to_string(), f.to_string(), p.to_string())).copied();
    let copy = get("memory-bandwidth", "copy-256MiB", "").context("no bandwidth estimate")?;
    let bandwidth = 2.0 * (256u64 << 20) as f64 / copy / 1e9;
    let groups: Vec<String> =
        est.keys().map(|k| k.0.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();

    let mut md = String::new();
    writeln!(md, "# Kernel benchmarks\n")?;
    writeln!(md, "Made by `cargo xtask bench-kernels --seconds {seconds}` (criterion, CPU; f32 but for the convolutions' bf16 columns; mimalloc, freed memory kept mapped, as in the binaries).")?;
    writeln!(
        md,
        "Machine: {}. Measured memory bandwidth (2-thread copy of 256 MiB, read + write): **{bandwidth:.1} GB/s**.\n",
        machine()
    )?;
    writeln!(md, "## Excitation (pool → K dense C→C/32 → concat → dense → sigmoid → `u + u·s`)\n")?;
    writeln!(md, "*fwd* is the forward pass; *fwd+bwd* adds `sum_all().backward()` through Candle's autograd,")?;
    writeln!(md, "which is how training runs it. *kernels* is the fused forward op and the fused backward op")?;
    writeln!(md, "(`excitation_backward`) called directly with the loss gradient already in memory: the kernels'")?;
    writeln!(md, "own time, without the gradient bookkeeping Candle's autograd adds around any op (it zero-fills")?;
    writeln!(md, "and adds into a new tensor for every gradient it stores, here the input's and the output's).\n")?;
    writeln!(md, "The memory bound counts one f32 pass per read or write of a full tensor: the forward reads the")?;
    writeln!(md, "input twice and writes the output once (3 passes); the backward reads the input and the")?;
    writeln!(md, "gradient and writes the input gradient (3 more). % of bandwidth is that traffic over the time,")?;
    writeln!(md, "against the bandwidth measured above (tensors of a few MB partly stay in the last-level cache,")?;
    writeln!(md, "so the forward can pass 100 %; the bound ignores the weights, 4 MB at C = 2048 with K = 4).")?;
    writeln!(md, "*bookkeeping* is fused fwd+bwd minus kernels: what Candle's autograd costs around the op")?;
    writeln!(md, "(slightly understated: *kernels* packs the weights into one tensor for each of its two calls,")?;
    writeln!(md, "autograd once).")?;
    writeln!(md, "*cap* is reference fwd+bwd over bookkeeping: the fwd+bwd speed-up the fused op would reach")?;
    writeln!(md, "through autograd if its kernels took no time at all.\n")?;
    writeln!(
        md,
        "| module | shape | reference fwd ms | fused fwd ms | fwd speed-up | fwd % of bandwidth | \
         reference fwd+bwd ms | fused fwd+bwd ms | fwd+bwd speed-up | kernels ms | kernels % of bandwidth | bookkeeping ms | cap |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for g in groups.iter().filter(|g| g.starts_with("excitation-")) {
        let module = if g.starts_with("excitation-sae") { "SaE (K=4)" } else { "SE" };
        let shape = g.rsplit('-').next().unwrap_or("");
        let (Some(rf), Some(ff), Some(rb), Some(fb), Some(k)) = (
            get(g, "reference", "fwd"),
            get(g, "fused", "fwd"),
            get(g, "reference", "fwd+bwd"),
            get(g, "fused", "fwd+bwd"),
            get(g, "fused", "kernels"),
        ) else {
            continue;
        };
        let share = |passes: f64, secs: f64| 100.0 * passes * 4.0 * elements(g) as f64 / secs / 1e9 / bandwidth;
        writeln!(
            md,
            "| {module} | {shape} | {:.3} | {:.3} | {:.2}× | {:.0} % | {:.3} | {:.3} | {:.2}× | {:.3} | {:.0} % | {:.3} | {:.1}× |",
            rf * 1e3,
            ff * 1e3,
            rf / ff,
            share(3.0, ff),
            rb * 1e3,
            fb * 1e3,
            rb / fb,
            k * 1e3,
            share(6.0, k),
            (fb - k) * 1e3,
            rb / (fb - k),
        )?;
    }
    writeln!(md, "\n## Depthwise 3×3 convolution (MobileNet v1 shapes at 140×140 input)\n")?;
    writeln!(md, "The reference is Candle's grouped `conv2d` (one convolution per channel, then a concatenation).\n")?;
    writeln!(md, "| shape | stride | pass | Candle grouped conv ms | fused ms | speed-up |")?;
    writeln!(md, "|---|---|---|---:|---:|---:|")?;
    for g in groups.iter().filter(|g| g.starts_with("depthwise-")) {
        let mut parts = g.trim_start_matches("depthwise-").split('-');
        let (shape, stride) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").trim_start_matches('s'));
        for pass in ["fwd", "fwd+bwd"] {
            let (Some(r), Some(f)) = (get(g, "reference", pass), get(g, "fused", pass)) else { continue };
            writeln!(md, "| {shape} | {stride} | {pass} | {:.3} | {:.3} | {:.1}× |", r * 1e3, f * 1e3, r / f)?;
        }
    }
    writeln!(md, "\n## Max-pool 3×3, stride 2, padding 1 (ResNet stem)\n")?;
    writeln!(
        md,
        "Candle's own way pads and calls `max_pool2d_with_stride`, which has no backward for stride ≠ kernel.\n"
    )?;
    writeln!(md, "| shape | pass | Candle ms | reference ms | fused ms | fused vs Candle | fused vs reference |")?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|")?;
    for g in groups.iter().filter(|g| g.starts_with("max-pool-")) {
        let shape = g.trim_start_matches("max-pool-");
        for pass in ["fwd", "fwd+bwd"] {
            let (Some(r), Some(f)) = (get(g, "reference", pass), get(g, "fused", pass)) else { continue };
            let candle = get(g, "candle", pass);
            let c_ms = candle.map_or("—".to_string(), |c| format!("{:.3}", c * 1e3));
            let c_x = candle.map_or("—".to_string(), |c| format!("{:.1}×", c / f));
            writeln!(md, "| {shape} | {pass} | {c_ms} | {:.3} | {:.3} | {c_x} | {:.1}× |", r * 1e3, f * 1e3, r / f)?;
        }
    }
    writeln!(md, "\n## Convolutions (ResNet-50 at 140×140 input, batch 16; layers 2–4's 3×3 at 32×32)\n")?;
    writeln!(md, "The reference is Candle's `conv2d` (its backward: `conv_transpose2d` for the input gradient).")?;
    writeln!(
        md,
        "*fused* is ours in f32 (Winograd's F(3×3, 3×3) or F(2×2, 3×3) for the stride-1 3×3 ones), *fused bf16* ours"
    )?;
    writeln!(md, "on bf16 activations with f32 master weights, as `--precision bf16` trains. GFLOP/s count the")?;
    writeln!(md, "direct algorithm's 2 FLOP per multiply-accumulate, ×3 for fwd+bwd (both gradients; ×2 for the")?;
    writeln!(md, "stem, whose input takes none, as in training). fwd+bwd starts from an f32")?;
    writeln!(md, "`sum_all` of the output, as the bf16 training's loss is f32.\n")?;
    writeln!(
        md,
        "| input | out | kernel | stride | pass | reference ms | fused ms | speed-up | fused GFLOP/s | fused bf16 ms | bf16 GFLOP/s |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")?;
    for g in groups.iter().filter(|g| g.starts_with("conv-")) {
        // conv-NxCxHxW-oO-kK-sS
        let parts: Vec<&str> = g.trim_start_matches("conv-").split('-').collect();
        let [shape, o, k, s] = parts[..] else { continue };
        let (o, k, s) = (o.trim_start_matches('o'), k.trim_start_matches('k'), s.trim_start_matches('s'));
        let dims: Vec<usize> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
        let (Ok(oc), Ok(kk), Ok(st), &[n, c, h, w]) =
            (o.parse::<usize>(), k.parse::<usize>(), s.parse::<usize>(), &dims[..])
        else {
            continue;
        };
        let out_size = |len: usize| crate::bench_layers::output_size(len, kk, st);
        let macs = (n * oc * out_size(h) * out_size(w) * c * kk * kk) as f64;
        // The stem's input (3 channels, the image) takes no gradient: its backward is one product.
        let backward_products = if c == 3 { 1.0 } else { 2.0 };
        for (pass, factor) in [("fwd", 1.0), ("fwd+bwd", 1.0 + backward_products)] {
            let (Some(r), Some(f)) = (get(g, "reference", pass), get(g, "fused", pass)) else { continue };
            let gflops = |secs: f64| 2.0 * factor * macs / secs / 1e9;
            let (b_ms, b_gf) = get(g, "fused-bf16", pass).map_or(("—".to_string(), "—".to_string()), |b| {
                (format!("{:.3}", b * 1e3), format!("{:.0}", gflops(b)))
            });
            writeln!(
                md,
                "| {shape} | {oc} | {kk}×{kk} | {st} | {pass} | {:.3} | {:.3} | {:.1}× | {:.0} | {b_ms} | {b_gf} |",
                r * 1e3,
                f * 1e3,
                r / f,
                gflops(f)
            )?;
        }
    }
    writeln!(md, "\n## BatchNorm + ReLU, training mode (ResNet-50 at 140×140 and 32×32 input, batch 16)\n")?;
    writeln!(md, "The reference is composed of Candle ops (`batch_norm_train_reference`, then `relu`); *fused* is")?;
    writeln!(md, "`batch_norm_train` with its ReLU. fwd+bwd adds `sum_all().backward()` through Candle's autograd")?;
    writeln!(md, "(its gradient is a broadcast of ones), as the convolutions' do. *fused bf16* is the fused op on")?;
    writeln!(md, "bf16 input, γ and β cast to bf16 as mixed-precision training does; its fwd+bwd sums the output")?;
    writeln!(md, "in f32 (`to_dtype`, then `sum_all`: Candle's own bf16 sum is scalar code slower than the op).\n")?;
    writeln!(md, "| shape | pass | reference ms | fused ms | speed-up | fused bf16 ms |")?;
    writeln!(md, "|---|---|---:|---:|---:|---:|")?;
    for g in groups.iter().filter(|g| g.starts_with("batch-norm-")) {
        let shape = g.trim_start_matches("batch-norm-");
        for pass in ["fwd", "fwd+bwd"] {
            let (Some(r), Some(f)) = (get(g, "reference", pass), get(g, "fused", pass)) else { continue };
            let bf16 = get(g, "fused-bf16", pass).map_or("—".to_string(), |b| format!("{:.3}", b * 1e3));
            writeln!(md, "| {shape} | {pass} | {:.3} | {:.3} | {:.1}× | {bf16} |", r * 1e3, f * 1e3, r / f)?;
        }
    }
    writeln!(md, "\n## SE/SaE block end, training mode (SENetV2-ResNet-50 at 140×140 and 32×32 input, batch 16)\n")?;
    writeln!(md, "BatchNorm (batch statistics) → excitation (K = 1 or 4 branches of C/32, `u + u·s`) → shortcut")?;
    writeln!(md, "addition → ReLU. *composed* is the two fused ops a block ran before (`batch_norm_train`, then")?;
    writeln!(md, "`excitation_add_relu`); *fused* is `batch_norm_excitation_add_relu`, which pools from BatchNorm's")?;
    writeln!(md, "statistics pass and never forms BatchNorm's output. fwd+bwd adds `sum_all().backward()`.\n")?;
    writeln!(md, "| module | shape | pass | composed ms | fused ms | speed-up |")?;
    writeln!(md, "|---|---|---|---:|---:|---:|")?;
    for g in groups.iter().filter(|g| g.starts_with("block-end-")) {
        let module = if g.starts_with("block-end-sae") { "SaE (K=4)" } else { "SE" };
        let shape = g.rsplit('-').next().unwrap_or("");
        for pass in ["fwd", "fwd+bwd"] {
            let (Some(c), Some(f)) = (get(g, "composed", pass), get(g, "fused", pass)) else { continue };
            writeln!(md, "| {module} | {shape} | {pass} | {:.3} | {:.3} | {:.2}× |", c * 1e3, f * 1e3, c / f)?;
        }
    }
    writeln!(md, "\n## Adam step\n")?;
    writeln!(md, "One step over the parameters (f32): the reference composed of Candle ops, the three fused passes")?;
    writeln!(md, "over moment tensors (`adam_update`: 10 streams of the parameters' size), and the one pass over")?;
    writeln!(md, "interleaved moments that the optimiser runs (`adam_update_interleaved`: 7 streams). GB/s counts")?;
    writeln!(md, "those streams over the time, against the bandwidth measured above (16 bytes a parameter stay")?;
    writeln!(md, "in memory between steps: where the last-level cache holds part of them, the share passes")?;
    writeln!(md, "100 %).\n")?;
    writeln!(md, "| parameters | implementation | ms | GB/s | % of bandwidth |")?;
    writeln!(md, "|---:|---|---:|---:|---:|")?;
    for g in groups.iter().filter(|g| g.starts_with("adam-")) {
        let params: f64 = g.trim_start_matches("adam-").parse().unwrap_or(0.0);
        for (id, streams) in [("reference", None), ("fused", Some(10.0)), ("interleaved", Some(7.0))] {
            let Some(t) = get(g, id, "step") else { continue };
            let (gbs, share) = streams.map_or(("—".to_string(), "—".to_string()), |s: f64| {
                let gbs = s * 4.0 * params / t / 1e9;
                (format!("{gbs:.1}"), format!("{:.0} %", 100.0 * gbs / bandwidth))
            });
            writeln!(md, "| {params} | {id} | {:.2} | {gbs} | {share} |", t * 1e3)?;
        }
    }
    let out = root.join("results/kernels.md");
    std::fs::create_dir_all(out.parent().expect("results dir"))?;
    sae_fs::write_atomic(&out, md.as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

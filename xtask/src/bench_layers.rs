//! `cargo xtask bench-layers`: every convolution of ResNet-50 (and so of SE-ResNet-50 and
//! SENetV2-ResNet-50, which add no convolution) at one input size, forward and backward one
//! at a time, ours in f32 next to PyTorch eager measured in the same run by
//! `bench/pytorch/bench_layers.py`, written to `results/conv-layers.md`. Where `bench-train`
//! says how a whole step compares, this says which layers make the difference.

use crate::bench_train::{median_seconds, report_header, TorchScript};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use sae_kernels::{conv2d, Conv2dConfig, Implementation};
use std::fmt::Write;
use std::path::PathBuf;

/// One distinct convolution of the network and how often it occurs.
#[derive(Debug, Clone, PartialEq)]
struct Layer {
    /// Where it is: "stem", "layer2.0 conv2", "layer3.1–5 conv1", …
    name: String,
    /// Input (batch, channels, height, width).
    input: [usize; 4],
    out_channels: usize,
    kernel: usize,
    stride: usize,
    count: usize,
}

impl Layer {
    /// The stem's input is the image: no gradient flows to it in training.
    fn input_gradient(&self) -> bool {
        self.input[1] != 3
    }

    fn output_size(&self) -> (usize, usize) {
        let out = |x: usize| output_size(x, self.kernel, self.stride);
        (out(self.input[2]), out(self.input[3]))
    }

    /// FLOP of the forward by the direct algorithm (2 per multiply-accumulate).
    fn forward_flop(&self) -> f64 {
        let [n, c, _, _] = self.input;
        let (oh, ow) = self.output_size();
        2.0 * (n * c * self.out_channels * self.kernel * self.kernel * oh * ow) as f64
    }

    /// The backward's: the weight gradient, and the input gradient where there is one.
    fn backward_flop(&self) -> f64 {
        self.forward_flop() * if self.input_gradient() { 2.0 } else { 1.0 }
    }
}

/// Output length of a convolution (and of ResNet's max-pool) with padding `kernel / 2` along
/// an input of `len`.
pub(crate) fn output_size(len: usize, kernel: usize, stride: usize) -> usize {
    (len + 2 * (kernel / 2) - kernel) / stride + 1
}

/// ResNet-50's convolutions at `size`×`size` input, batch `batch`: the 7×7/2 stem (then the
/// 3×3/2 max-pool), and four stages of 3, 4, 6, 3 bottlenecks (1×1, 3×3 with the stage's
/// stride in its first block, 1×1 expanding 4×, and a 1×1 projection in each first block).
/// Layers with the same shape are listed once with their count.
fn resnet50_layers(size: usize, batch: usize) -> Vec<Layer> {
    let mut layers = Vec::new();
    let mut add = |name: String, c: usize, h: usize, o: usize, k: usize, s: usize, count: usize| {
        layers.push(Layer { name, input: [batch, c, h, h], out_channels: o, kernel: k, stride: s, count })
    };
    add("stem".into(), 3, size, 64, 7, 2, 1);
    let mut h = output_size(output_size(size, 7, 2), 3, 2);
    let mut in_ch = 64;
    for (stage, (blocks, planes)) in [(3, 64), (4, 128), (6, 256), (3, 512)].into_iter().enumerate() {
        let (name, stride, out) = (format!("layer{}", stage + 1), if stage == 0 { 1 } else { 2 }, planes * 4);
        let rest = if blocks > 2 { format!("{name}.1–{}", blocks - 1) } else { format!("{name}.1") };
        let h2 = output_size(h, 3, stride);
        add(format!("{name}.0 conv1"), in_ch, h, planes, 1, 1, 1);
        add(format!("{name}.0 conv2"), planes, h, planes, 3, stride, 1);
        add(format!("{rest} conv2"), planes, h2, planes, 3, 1, blocks - 1);
        add(format!("{name}.* conv3"), planes, h2, out, 1, 1, blocks);
        add(format!("{name}.0 downsample"), in_ch, h, out, 1, stride, 1);
        add(format!("{rest} conv1"), out, h2, planes, 1, 1, blocks - 1);
        (h, in_ch) = (h2, out);
    }
    // Merge equal shapes (layer1's first conv2 and the rest are the same stride-1 layer).
    let mut merged: Vec<Layer> = Vec::new();
    for l in layers {
        let same = |m: &&mut Layer| {
            (m.input, m.out_channels, m.kernel, m.stride) == (l.input, l.out_channels, l.kernel, l.stride)
        };
        match merged.iter_mut().find(|m| same(m)) {
            Some(m) => {
                m.count += l.count;
                m.name = format!("{}, {}", m.name, l.name);
            }
            None => merged.push(l),
        }
    }
    merged
}

/// Forward and backward milliseconds of one layer, ours: the forward records the graph, as in
/// training; the backward is Candle's `backward` of the output (an all-ones output gradient)
/// through our convolution's gradient op, from an output computed once.
/// With `bf16` the input is bf16 and the weight stays f32, as `--precision bf16` training
/// runs them.
fn measure_ours(l: &Layer, seconds: f64, bf16: bool) -> Result<(f64, f64)> {
    let cfg = Conv2dConfig { stride: l.stride, padding: l.kernel / 2, groups: 1 };
    let x = Tensor::randn(0f32, 1.0, l.input.as_slice(), &Device::Cpu)?;
    let x = if bf16 { x.to_dtype(DType::BF16)? } else { x };
    let x = if l.input_gradient() { Var::from_tensor(&x)?.as_tensor().clone() } else { x };
    let w = Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (l.out_channels, l.input[1], l.kernel, l.kernel), &Device::Cpu)? * 0.1)?,
    )?;
    // At least 5 calls, as `bench_layers.py` times them.
    let forward = median_seconds(seconds, 5, || Ok(conv2d(&x, &w, cfg, Implementation::Fused)?))?;
    let y = conv2d(&x, &w, cfg, Implementation::Fused)?;
    let backward = median_seconds(seconds, 5, || Ok(y.backward()?))?;
    Ok((forward * 1e3, backward * 1e3))
}

/// What `cargo xtask bench-layers` measures and where the report goes.
pub struct Options {
    /// Input size (height = width) of the network.
    pub size: usize,
    pub batch: usize,
    /// Minimum measuring time per layer, pass and side.
    pub seconds: f64,
    /// Measurements per layer and side, ours and PyTorch's in turn; each side's fastest counts.
    pub repeats: usize,
    /// Python with torch, for PyTorch's side.
    pub python: Option<PathBuf>,
    /// Only the layers whose name contains this.
    pub only: Option<String>,
    /// bf16 inputs with f32 weights, beside PyTorch's bf16 autocast.
    pub bf16: bool,
    pub out: PathBuf,
}

/// The report's file name: `conv-layers.md`, or `conv-layers-bf16.md` for bf16.
pub fn report_name(bf16: bool) -> &'static str {
    if bf16 {
        "conv-layers-bf16.md"
    } else {
        "conv-layers.md"
    }
}

/// Measures the layers of `options` and writes the report.
pub fn run(options: &Options) -> Result<()> {
    let Options { size, batch, seconds, repeats, ref python, ref only, bf16, ref out } = *options;
    if size < 32 {
        bail!("bench-layers: input size {size} is below 32, where ResNet-50's last stage has no pixels left")
    }
    let mut layers = resnet50_layers(size, batch);
    if let Some(only) = only {
        layers.retain(|l| l.name.contains(only.as_str()));
        if layers.is_empty() {
            bail!("bench-layers: no layer's name contains {only:?} (names look like \"layer3.1–5 conv2\")")
        }
    }
    let torch = python.as_ref().map(|python| TorchScript { python, seconds });
    let repeats = repeats.max(1);
    let shapes = serde_json::to_string(
        &layers
            .iter()
            .map(|l| {
                let [n, c, h, w] = l.input;
                serde_json::json!([n, c, h, w, l.out_channels, l.kernel, l.stride, l.input_gradient()])
            })
            .collect::<Vec<_>>(),
    )?;
    let machine_peak = crate::peak::measure();
    let fastest = |a: Option<(f64, f64)>, b: (f64, f64)| a.map_or(b, |a: (f64, f64)| (a.0.min(b.0), a.1.min(b.1)));
    let (mut ours, mut theirs) = (vec![None; layers.len()], vec![None; layers.len()]);
    let mut version = None;
    for repeat in 0..repeats {
        for (i, l) in layers.iter().enumerate() {
            let m = measure_ours(l, seconds, bf16)?;
            eprintln!("{} ({:?} → {}): ours {:.3} / {:.3} ms", l.name, l.input, l.out_channels, m.0, m.1);
            ours[i] = Some(fastest(ours[i], m));
        }
        if let Some(t) = &torch {
            let precision = if bf16 { "bf16" } else { "f32" };
            let lines = t.run_script("bench_layers.py", &["--shapes", &shapes, "--precision", precision])?;
            let (head, rows) = lines.split_first().context("the PyTorch script printed nothing")?;
            if rows.len() != layers.len() {
                bail!("the PyTorch script printed {} layers, expected {}", rows.len(), layers.len())
            }
            version = head["torch"].as_str().map(str::to_string);
            for (i, row) in rows.iter().enumerate() {
                let ms = |k: &str| row[k].as_f64().with_context(|| format!("no {k} in {row}"));
                theirs[i] = Some(fastest(theirs[i], (ms("forward_ms")?, ms("backward_ms")?)));
            }
        }
        eprintln!("repeat {} of {repeats} done", repeat + 1);
    }
    // The peak again after the layers, the higher kept (as `bench-train` does).
    let machine_peak = machine_peak.higher(crate::peak::measure());
    let md = report(size, batch, seconds, repeats, bf16, &machine_peak, &layers, &ours, &theirs, version)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    sae_fs::write_atomic(out, md.as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    size: usize,
    batch: usize,
    seconds: f64,
    repeats: usize,
    bf16: bool,
    peak: &crate::peak::Peak,
    layers: &[Layer],
    ours: &[Option<(f64, f64)>],
    theirs: &[Option<(f64, f64)>],
    version: Option<String>,
) -> Result<String> {
    let title =
        if bf16 { "ResNet-50's convolutions one at a time, bf16" } else { "ResNet-50's convolutions one at a time" };
    let mut md = report_header(title, peak)?;
    let precision = if bf16 {
        "bf16 inputs and output with f32 weights (as `--precision bf16` trains: our convolution takes the f32 \
         master weight and returns its gradient in f32; PyTorch's runs under `torch.autocast(\"cpu\", \
         dtype=torch.bfloat16)`, which casts the weight to bf16 on every call, as in autocast training)"
    } else {
        "f32"
    };
    writeln!(
        md,
        "Every distinct convolution of ResNet-50 (SE-ResNet-50 and SENetV2-ResNet-50 have the same ones) at \
         {size}×{size} input, batch {batch}, {precision}, random inputs, weights and no bias; *count* is how often the \
         shape occurs in the network. *fwd* is the forward with autograd recording, as in training; *bwd* the \
         convolution's backward alone (input and weight gradients from an all-ones output gradient; the stem's \
         input takes none), from an output computed once. Median milliseconds over at least {seconds} s and 5 \
         calls; {repeats} measurement(s) per layer and side, ours and PyTorch's in turn, each side's fastest kept. \
         GFLOP/s count the direct algorithm's 2 FLOP per multiply-accumulate (our f32 3×3 stride-1 convolutions \
         run Winograd's F(3×3, 3×3) or F(2×2, 3×3), which need fewer); *speed-up* is PyTorch's time over ours.\n"
    )?;
    match &version {
        Some(v) => writeln!(
            md,
            "PyTorch {v} eager{} (`torch.nn.functional.conv2d`, `torch.autograd.grad`), `torch.set_num_threads({})`, \
             measured by `bench/pytorch/bench_layers.py` in the same run.\n",
            if bf16 { " with bf16 autocast" } else { "" },
            rayon::current_num_threads()
        )?,
        None => writeln!(md, "PyTorch not measured in this run (pass `--python` with a Python that has torch).\n")?,
    }
    writeln!(md, "| layer | input | out | kernel | stride | count | ours fwd ms | PyTorch fwd ms | fwd speed-up | ours bwd ms | PyTorch bwd ms | bwd speed-up | ours fwd / bwd GFLOP/s (% of peak) |")?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let of_peak = |gflops: f64| format!("{gflops:.0} ({:.0} %)", 100.0 * gflops / peak.f32_gflops);
    let (mut total_ours, mut total_theirs) = ((0.0, 0.0), (0.0, 0.0));
    for ((l, o), t) in layers.iter().zip(ours).zip(theirs) {
        let (of, ob) = o.context("a layer was not measured")?;
        let count = l.count as f64;
        total_ours = (total_ours.0 + count * of, total_ours.1 + count * ob);
        let [_, c, h, w] = l.input;
        let (tf, tb, fx, bx) = match t {
            Some((tf, tb)) => {
                total_theirs = (total_theirs.0 + count * tf, total_theirs.1 + count * tb);
                (format!("{tf:.2}"), format!("{tb:.2}"), format!("{:.2}×", tf / of), format!("{:.2}×", tb / ob))
            }
            None => ("—".into(), "—".into(), "—".into(), "—".into()),
        };
        writeln!(
            md,
            "| {} | {c}×{h}×{w} | {} | {}×{} | {} | {} | {of:.2} | {tf} | {fx} | {ob:.2} | {tb} | {bx} | {} / {} |",
            l.name,
            l.out_channels,
            l.kernel,
            l.kernel,
            l.stride,
            l.count,
            of_peak(l.forward_flop() / of / 1e6),
            of_peak(l.backward_flop() / ob / 1e6)
        )?;
    }
    let (of, ob) = total_ours;
    if version.is_some() {
        let (tf, tb) = total_theirs;
        writeln!(
            md,
            "| **all, × count** | | | | | | **{of:.1}** | **{tf:.1}** | **{:.2}×** | **{ob:.1}** | **{tb:.1}** | **{:.2}×** | |",
            tf / of,
            tb / ob
        )?;
    } else {
        writeln!(md, "| **all, × count** | | | | | | **{of:.1}** | — | — | **{ob:.1}** | — | — | |")?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listed layers are ResNet-50's: its 53 convolutions, whose multiply-accumulates add
    /// up to the registry's model's count less its classifier's (2048 × classes), at two
    /// sizes, with the stages' spatial sizes of torchvision's ResNet-50.
    #[test]
    fn the_layers_are_resnet50s() {
        let model = sae_models::Model::new(sae_models::config("resnet50", 10).unwrap(), 0, &Device::Cpu).unwrap();
        for size in [224, 140] {
            let layers = resnet50_layers(size, 1);
            assert_eq!(layers.iter().map(|l| l.count).sum::<usize>(), 53);
            let macs: f64 = layers.iter().map(|l| l.count as f64 * l.forward_flop() / 2.0).sum();
            assert_eq!(macs as u64, model.macs(size, size) - 2048 * 10, "{size}×{size}");
        }
        let layers = resnet50_layers(224, 1);
        let sizes: Vec<usize> = layers.iter().filter(|l| l.kernel == 3 && l.stride == 1).map(|l| l.input[2]).collect();
        assert_eq!(sizes, [56, 28, 14, 7]);
        // At 140×140 the stages run at 35, 18, 9 and 5 pixels.
        let sizes: Vec<usize> =
            resnet50_layers(140, 16).iter().filter(|l| l.kernel == 3 && l.stride == 1).map(|l| l.input[2]).collect();
        assert_eq!(sizes, [35, 18, 9, 5]);
    }
}

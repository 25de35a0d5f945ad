//! BatchNorm's CPU passes over short planes (ResNet's later stages at 32×32 input: 4×4, 2×2
//! and 1×1). Plane by plane, a 1×1 plane is one value behind a task, a call and a loop of its
//! own, and the statistics are a task per channel: on the 2-core AMD EPYC the fused forward
//! of a 16 × 2048 × 1×1 batch took longer than Candle's dozen composed ops. Here a task takes
//! a block of channels, and each image's planes of the block — side by side in memory — are
//! one run of values, passed through in one loop with the per-channel values (mean, scale,
//! shift, …) spread out to one per element of the run ([`ShortPlanes::spread`]). The
//! squared deviations and the gradients' sums add the runs of all images element by element,
//! then each channel's elements.
//! The SE/SaE block ends (`excitation/batch_norm_end.rs`) take their passes over the same
//! runs.

use super::{ChannelGradients, GradientSums, ReluMask};
use crate::cpu::{copy_converted, uninit, vectorized, Elem};
use crate::layout::Strided4;
use rayon::prelude::*;
use std::ops::Range;

/// Planes of at most this many values are taken as runs (see the module doc). On the 2-core
/// AMD EPYC (`cargo bench --bench kernels -- batch-norm`, two alternating rounds, f32, batch 16):
/// 2048 × 1×1 forward 403–572 → 146–169 µs, forward + backward 775–1476 → 286–389 µs; 512 × 4×4
/// forward + backward 779–998 → 561–649 µs; 256 × 8×8 forward 116–146 → 185–211 µs as runs,
/// so 8×8 planes stay planes. In the ResNet-50 32×32 training step (`bench-train-row`, fastest
/// of four alternating pairs) f32 96.0 → 89.6 ms, bf16 82.7 → 73.2 ms.
const SHORT_PLANE: usize = 16;

/// The most values of one image a task's run takes: its spread-out rows (up to five) and
/// sums stay in the L1 and L2 caches.
const MAX_RUN: usize = 2048;

/// An (N, C, H, W) operand with short planes, each image's channels side by side.
#[derive(Clone, Copy)]
pub(crate) struct ShortPlanes {
    n: usize,
    c: usize,
    plane_len: usize,
    /// Element offset of image 0's channel 0 and the distance between images.
    offset: usize,
    image_stride: usize,
    /// Channels per task.
    block: usize,
}

impl ShortPlanes {
    /// `xs` as runs of short planes, where its planes are short and each image's lie side by
    /// side (any distance between images).
    pub(crate) fn new(xs: &Strided4) -> Option<Self> {
        let [n, c, h, w] = xs.dims;
        let plane_len = h * w;
        let side_by_side = xs.strides[1] == plane_len && xs.strides[2] == w && xs.strides[3] == 1;
        if !(side_by_side && (1..=SHORT_PLANE).contains(&plane_len) && n > 0 && c > 0) {
            return None;
        }
        // At least four tasks per thread, and no run longer than MAX_RUN.
        let for_tasks = c / (4 * rayon::current_num_threads());
        let block = for_tasks.min(MAX_RUN / plane_len).max(1);
        Some(Self { n, c, plane_len, offset: xs.offset, image_stride: xs.strides[0], block })
    }

    /// The tasks' blocks of channels.
    pub(crate) fn blocks(&self) -> Vec<Range<usize>> {
        (0..self.c).step_by(self.block).map(|c0| c0..(c0 + self.block).min(self.c)).collect()
    }

    /// Image `ni`'s planes of `channels` in `x` (laid out as this describes).
    pub(crate) fn run<'a, T>(&self, x: &'a [T], ni: usize, channels: &Range<usize>) -> &'a [T] {
        &x[self.offset + ni * self.image_stride + channels.start * self.plane_len..][..channels.len() * self.plane_len]
    }

    /// The same in a contiguous (N, C, H, W) tensor of this shape.
    pub(crate) fn contiguous_run<'a, T>(&self, data: &'a [T], ni: usize, channels: &Range<usize>) -> &'a [T] {
        &data[(ni * self.c + channels.start) * self.plane_len..][..channels.len() * self.plane_len]
    }

    /// `value(c)` for every element of a run of `channels`. Filled plane by plane: collected
    /// from a `flat_map` of `repeat_n`, which has no exact length and steps element by
    /// element, this was a fifth of the SE block end's forward and backward at 16 × 1024 × 2×2
    /// (the block ends spread per image).
    pub(crate) fn spread(&self, channels: &Range<usize>, value: impl Fn(usize) -> f32) -> Vec<f32> {
        let mut out = uninit::<f32>(channels.len() * self.plane_len);
        for (plane, ci) in out.chunks_exact_mut(self.plane_len).zip(channels.clone()) {
            plane.fill(value(ci));
        }
        out
    }

    /// A contiguous (N, C, H, W) buffer of this shape cut into each task's runs, image by image.
    pub(crate) fn task_runs<'a, T>(&self, data: &'a mut [T]) -> Vec<Vec<&'a mut [T]>> {
        self.task_runs_of(data, self.plane_len)
    }

    /// The same for an (N, C, `per_channel`) buffer: per-plane values with `per_channel` 1.
    pub(crate) fn task_runs_of<'a, T>(&self, data: &'a mut [T], per_channel: usize) -> Vec<Vec<&'a mut [T]>> {
        let blocks = self.blocks();
        let mut runs: Vec<Vec<&mut [T]>> = blocks.iter().map(|_| Vec::with_capacity(self.n)).collect();
        for image in data.chunks_mut(self.c * per_channel) {
            let mut rest = image;
            for (task, channels) in runs.iter_mut().zip(&blocks) {
                let (run, after) = rest.split_at_mut(channels.len() * per_channel);
                task.push(run);
                rest = after;
            }
        }
        runs
    }

    /// Each channel's f64 sum of its elements in `values` (a run's worth, one per element).
    fn channel_sums<'a>(&self, values: &'a [f32]) -> impl Iterator<Item = f64> + 'a {
        values.chunks_exact(self.plane_len).map(|p| p.iter().map(|&v| v as f64).sum())
    }
}

/// Per-channel (mean, biased variance) and the plane sums (one per image, f32) of
/// `super::channel_and_plane_stats`, over runs.
pub(super) fn stats<T: Elem>(x: &[T], s: &ShortPlanes) -> Vec<((f32, f32), Vec<f32>)> {
    let count = (s.n * s.plane_len) as f64;
    let per_block: Vec<Vec<_>> = s
        .blocks()
        .into_par_iter()
        .map(|channels| {
            vectorized!({
                let mut plane_sums = vec![vec![0f32; s.n]; channels.len()];
                for ni in 0..s.n {
                    let run = s.run(x, ni, &channels);
                    for (sums, plane) in plane_sums.iter_mut().zip(run.chunks_exact(s.plane_len)) {
                        sums[ni] = plane.iter().map(|v| v.to_f32()).sum();
                    }
                }
                // Each channel's sum from its plane sums in f64, as `channel_and_plane_stats` has it.
                let means: Vec<f32> = plane_sums
                    .iter()
                    .map(|sums| (sums.iter().map(|&v| v as f64).sum::<f64>() / count) as f32)
                    .collect();
                let mean = s.spread(&channels, |ci| means[ci - channels.start]);
                let mut squares = vec![0f32; channels.len() * s.plane_len];
                for ni in 0..s.n {
                    let run = s.run(x, ni, &channels);
                    for ((a, v), m) in squares.iter_mut().zip(run).zip(&mean) {
                        let d = v.to_f32() - m;
                        *a += d * d;
                    }
                }
                let variances = s.channel_sums(&squares).map(|sq| (sq / count) as f32);
                means.iter().zip(variances).map(|(&m, v)| (m, v)).zip(plane_sums).collect()
            })
        })
        .collect();
    per_block.into_iter().flatten().collect()
}

/// `super::affine` over runs: `x·scale + shift` (+ `residual`) (clamped at 0 when `relu`),
/// into a contiguous (N, C, H, W).
pub(super) fn affine<T: Elem>(
    x: &[T],
    s: &ShortPlanes,
    relu: bool,
    residual: Option<&[T]>,
    coef: impl Fn(usize) -> (f32, f32) + Sync,
) -> Vec<T> {
    let mut out = uninit::<T>(s.n * s.c * s.plane_len);
    s.task_runs(&mut out).into_par_iter().zip(s.blocks()).for_each(|(outputs, channels)| {
        vectorized!({
            let (scale, shift) = (s.spread(&channels, |ci| coef(ci).0), s.spread(&channels, |ci| coef(ci).1));
            let clamp = |v: f32| if relu { v.max(0.0) } else { v };
            for (ni, y) in outputs.into_iter().enumerate() {
                let run = s.run(x, ni, &channels).iter().zip(scale.iter().zip(&shift));
                match residual {
                    Some(r) => {
                        let r = s.contiguous_run(r, ni, &channels);
                        for ((y, (v, (&a, &b))), r) in y.iter_mut().zip(run).zip(r) {
                            *y = T::from_f32(clamp(v.to_f32() * a + b + r.to_f32()));
                        }
                    }
                    None => {
                        y.iter_mut().zip(run).for_each(|(y, (v, (&a, &b)))| *y = T::from_f32(clamp(v.to_f32() * a + b)))
                    }
                }
            }
        })
    });
    out
}

/// `super::channel_gradients` over runs: `dx` into `dx` (contiguous, x's shape), the masked
/// dy into `masked` where given, and each channel's `(dparam, dshift)`. Σ dy·(x − centre) is
/// summed element by element across the images, the centre subtracted from each x.
#[allow(clippy::too_many_arguments)]
pub(super) fn gradients<T: Elem>(
    x: &[T],
    s: &ShortPlanes,
    g: &[T],
    relu: ReluMask<'_, T>,
    dx: &mut [T],
    masked: Option<&mut [T]>,
    centre: impl Fn(usize) -> f32 + Sync,
    gradients: impl Fn(usize, GradientSums) -> ChannelGradients + Sync,
) -> Vec<(f32, f32)> {
    let dx_runs = s.task_runs(dx);
    let masked_runs: Vec<Option<Vec<&mut [T]>>> = match masked {
        Some(m) => s.task_runs(m).into_iter().map(Some).collect(),
        None => dx_runs.iter().map(|_| None).collect(),
    };
    let per_block: Vec<Vec<(f32, f32)>> = dx_runs
        .into_par_iter()
        .zip(masked_runs)
        .zip(s.blocks())
        .map(|((dx_runs, masked_runs), channels)| {
            vectorized!({
                let len = channels.len() * s.plane_len;
                let centre = s.spread(&channels, &centre);
                let relu_affine = match relu {
                    ReluMask::Recomputed(a) => {
                        Some((s.spread(&channels, |ci| a[ci].0), s.spread(&channels, |ci| a[ci].1)))
                    }
                    _ => None,
                };
                // The masked dy of every image in f32, for the dx pass to read back.
                let mut dy = uninit::<f32>(s.n * len);
                let (mut sum_dy, mut sum_dy_x) = (vec![0f32; len], vec![0f32; len]);
                for (ni, d) in dy.chunks_exact_mut(len).enumerate() {
                    let (xr, gr) = (s.run(x, ni, &channels), s.contiguous_run(g, ni, &channels));
                    // Selects, not products, as `super::channel_gradients` masks.
                    match (relu, &relu_affine) {
                        (ReluMask::ByOutput(y), _) => {
                            let y = s.contiguous_run(y, ni, &channels);
                            for (d, (&gv, &yv)) in d.iter_mut().zip(gr.iter().zip(y)) {
                                let gv = gv.to_f32();
                                *d = if yv.to_f32() > 0.0 { gv } else { 0.0 };
                            }
                        }
                        (_, Some((scale, shift))) => {
                            for ((d, (&gv, &xv)), (a, b)) in
                                d.iter_mut().zip(gr.iter().zip(xr)).zip(scale.iter().zip(shift))
                            {
                                let gv = gv.to_f32();
                                *d = if xv.to_f32() * a + b > 0.0 { gv } else { 0.0 };
                            }
                        }
                        _ => copy_converted(gr, d),
                    }
                    for (((sd, sdx), (&dv, xv)), c) in
                        sum_dy.iter_mut().zip(&mut sum_dy_x).zip(d.iter().zip(xr)).zip(&centre)
                    {
                        *sd += dv;
                        *sdx += dv * (xv.to_f32() - c);
                    }
                }
                let channel_gradients: Vec<ChannelGradients> = channels
                    .clone()
                    .zip(s.channel_sums(&sum_dy).zip(s.channel_sums(&sum_dy_x)))
                    .map(|(ci, (dy, dy_x))| gradients(ci, GradientSums { dy: dy as f32, dy_x: dy_x as f32 }))
                    .collect();
                let coefficient = |i: usize| s.spread(&channels, |ci| channel_gradients[ci - channels.start].dx[i]);
                let (a, k, b) = (coefficient(0), coefficient(1), coefficient(2));
                for (ni, out) in dx_runs.into_iter().enumerate() {
                    let (xr, d) = (s.run(x, ni, &channels), &dy[ni * len..(ni + 1) * len]);
                    for (out, ((&dv, xv), ((&a, &k), &b))) in
                        out.iter_mut().zip(d.iter().zip(xr).zip(a.iter().zip(&k).zip(&b)))
                    {
                        // An eval-mode scale (k = b = 0): dx does not depend on x, and a
                        // non-finite x must not make it NaN through x·0.
                        let v = if k == 0.0 && b == 0.0 { dv * a } else { dv * a + xv.to_f32() * k + b };
                        *out = T::from_f32(v);
                    }
                }
                if let Some(masked_runs) = masked_runs {
                    for (m, d) in masked_runs.into_iter().zip(dy.chunks_exact(len)) {
                        copy_converted(d, m);
                    }
                }
                channel_gradients.iter().map(|g| (g.dparam, g.dshift)).collect()
            })
        })
        .collect();
    per_block.into_iter().flatten().collect()
}

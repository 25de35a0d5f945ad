//! 2-D max-pool with zero-cost padding (padded cells never win) and any stride, with a
//! backward pass. Candle's own `max_pool2d` has no padding and no backward unless
//! kernel == stride, which ResNet's 3×3/2 stem pool needs.
//!
//! Output size follows PyTorch (`ceil_mode = false`): `(H + 2·padding − kernel) / stride + 1`.
//! Gradients go to the first maximal element of each window in row-major order; the
//! reference gives tied elements the gradient each, so the two agree when maxima are unique.
//!
//! The fused kernel runs on the CPU (the forward keeps each window's argmax for the backward)
//! and on CUDA (`src/cuda/ops.cu`: one thread per output, and per input element for the
//! gradient, which recomputes the windows' first maxima: no atomics); on other devices
//! [`max_pool2d`] runs the reference.

use crate::cpu::{
    copy_converted, dispatch_float, min_planes_per_task, plane_f32, same_dtype, uninit, vectorized, write_f32,
};
use crate::layout::Strided4;
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Square max-pool window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPoolConfig {
    /// Window size.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Cells of implicit −∞ padding on each side; at most `kernel / 2`.
    pub padding: usize,
}

impl MaxPoolConfig {
    /// Output (height, width) for an input of `h` × `w`, or an error for an invalid config.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if self.kernel == 0 || self.stride == 0 {
            bail!("max_pool2d: kernel and stride must be positive, got {self:?}")
        }
        if 2 * self.padding > self.kernel {
            bail!("max_pool2d: padding {} must be at most half the kernel {}", self.padding, self.kernel)
        }
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            bail!("max_pool2d: input {h}×{w} with padding {} is smaller than the kernel {}", self.padding, self.kernel)
        }
        let out = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        Ok((out(h), out(w)))
    }
}

/// Max-pools `x` (N, C, H, W) with the chosen implementation.
pub fn max_pool2d(x: &Tensor, cfg: MaxPoolConfig, implementation: Implementation) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    cfg.output_size(h, w)?;
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x) => {
            x.apply_op1(MaxPool { cfg, argmax: Arc::new(OnceLock::new()), record: x.track_op() })
        }
        _ => max_pool2d_reference(x, cfg),
    }
}

/// Max-pool composed of differentiable Candle ops: pad with −∞, gather the K² shifted
/// strided views with `index_select`, and take their maximum.
pub fn max_pool2d_reference(x: &Tensor, cfg: MaxPoolConfig) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = cfg.output_size(h, w)?;
    let p = cfg.padding;
    let x = if p > 0 {
        let fill = |shape: (usize, usize, usize, usize)| {
            Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
        };
        let rows = fill((n, c, p, w))?;
        let x = Tensor::cat(&[&rows, x, &rows], 2)?;
        let cols = fill((n, c, h + 2 * p, p))?;
        Tensor::cat(&[&cols, &x, &cols], 3)?
    } else {
        x.clone()
    };
    // `index_select` needs a contiguous source, and `cat` along an inner dim may not give one.
    let x = x.contiguous()?;
    let taps = |k: usize, len: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..len).map(|o| (o * cfg.stride + k) as u32).collect();
        Tensor::new(idx, x.device())
    };
    let mut windows = Vec::with_capacity(cfg.kernel * cfg.kernel);
    for ki in 0..cfg.kernel {
        let rows = x.index_select(&taps(ki, oh)?, 2)?;
        for kj in 0..cfg.kernel {
            windows.push(rows.index_select(&taps(kj, ow)?, 3)?);
        }
    }
    Tensor::stack(&windows, 4)?.max(4)
}

/// The forward op. On the CPU it keeps, where a gradient may be asked for (`record`), the
/// flat in-plane index of every window's maximum, found anyway while pooling: the backward
/// pass then scatters the gradient without scanning the windows again (it did, and that
/// scan was 2–3 % of a ResNet-50 training step on the Xeon of `results/train-profile.md`).
struct MaxPool {
    cfg: MaxPoolConfig,
    argmax: Arc<OnceLock<Vec<u32>>>,
    record: bool,
}

/// Scratch of one task of the CPU forward pass ([`MaxPoolConfig::pool_plane`]).
#[derive(Default)]
struct PoolScratch {
    /// One input row split into its `stride` phases.
    phases: Vec<f32>,
    /// Every input row's window maxima (H × OW), and where they are.
    rows: Vec<f32>,
    row_at: Vec<u32>,
    /// The column of the input row each tap of each output reads (kernel × OW).
    tap_columns: Vec<u32>,
    /// One output row's maxima, and where they are.
    acc: Vec<f32>,
    acc_at: Vec<u32>,
}

/// All ones where `v` wins over the maximum so far `m` (it is larger, or NaN), else zero.
#[inline(always)]
fn wins(v: f32, m: f32) -> u32 {
    (((v > m) | v.is_nan()) as u32).wrapping_neg()
}

/// `a` where `mask` is all ones, `b` where it is zero (see [`MaxPoolConfig::pool_plane`]).
#[inline(always)]
fn select(mask: u32, a: u32, b: u32) -> u32 {
    (a & mask) | (b & !mask)
}

/// `len` indices with unspecified values, every one written before it is read.
#[allow(clippy::uninit_vec)]
fn uninit_indices(len: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: u32 has no invalid bit patterns and the capacity is `len`; the forward pass
    // writes every index.
    unsafe { v.set_len(len) };
    v
}

/// Backward op: (x, output gradient) → input gradient; on the CPU from the forward's argmax.
struct MaxPoolBackward {
    cfg: MaxPoolConfig,
    argmax: Arc<OnceLock<Vec<u32>>>,
}

impl MaxPoolConfig {
    /// Input positions `lo..hi` (non-empty) covered by window `o` along a side of `len` cells.
    #[inline(always)]
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = o * self.stride;
        (start.saturating_sub(self.padding), (start + self.kernel - self.padding).min(len))
    }

    /// Outputs `lo..hi` whose tap `k` reads a position inside a side of `len` cells.
    #[inline(always)]
    fn valid_outputs(&self, k: usize, len: usize, outputs: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(k).div_ceil(self.stride).min(outputs);
        let hi = (len + self.padding).saturating_sub(k).div_ceil(self.stride).clamp(lo, outputs);
        (lo, hi)
    }

    /// Pools one plane (`h × w` values) into `out` (rows of `ow`), and with `INDEX` writes the
    /// flat in-plane index of each window's winner into `argmax`.
    ///
    /// Separable: the maximum over each window's columns for every input row (and where it
    /// is), then over each window's rows. A larger value wins each step, a NaN wins over
    /// everything and a later NaN over an earlier one: so the index is the first maximum in
    /// row-major order, or the last NaN, and the value is NaN where the window has one
    /// (PyTorch's rule). For the row pass each row is first split into its `stride` phases,
    /// so that every tap reads its outputs' inputs contiguously, and the compare-and-selects
    /// run along the outputs as bit operations: they vectorise (with `if` on the compare
    /// the index-keeping loops did not, and the pass took three times as long: `cargo bench
    /// -p sae-kernels --bench kernels -- max-pool`). `padding ≤ kernel / 2` guarantees every
    /// window holds at least one real element.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn pool_plane<const INDEX: bool>(
        &self,
        values: &[f32],
        (h, w): (usize, usize),
        ow: usize,
        scratch: &mut PoolScratch,
        out: &mut [f32],
        argmax: &mut [u32],
    ) {
        let PoolScratch { phases, rows, row_at, tap_columns, acc, acc_at } = scratch;
        let stride = self.stride;
        let phase_len = w.div_ceil(stride);
        phases.resize(stride * phase_len, 0.0);
        rows.resize(h * ow, 0.0);
        // Left empty without `INDEX` (never read then).
        if INDEX {
            row_at.resize(h * ow, 0);
            tap_columns.clear();
            tap_columns.extend(
                (0..self.kernel)
                    .flat_map(|k| (0..ow).map(move |o| (o * stride + k).saturating_sub(self.padding) as u32)),
            );
        }
        for (y, row) in values.chunks_exact(w).enumerate() {
            for (r, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
                for (p, &v) in phase.iter_mut().zip(row.iter().skip(r).step_by(stride)) {
                    *p = v;
                }
            }
            let maxima = &mut rows[y * ow..(y + 1) * ow];
            maxima.fill(f32::NEG_INFINITY);
            if INDEX {
                for (o, a) in row_at[y * ow..(y + 1) * ow].iter_mut().enumerate() {
                    *a = self.window(o, w).0 as u32;
                }
            }
            for k in 0..self.kernel {
                let (lo, hi) = self.valid_outputs(k, w, ow);
                if lo == hi {
                    continue;
                }
                // Output `o` reads column `o·stride + k − padding` = (o + q)·stride + r.
                let shift = k as isize - self.padding as isize;
                let (q, r) = (shift.div_euclid(stride as isize), shift.rem_euclid(stride as isize) as usize);
                let start = (lo as isize + q) as usize;
                let taps = &phases[r * phase_len + start..r * phase_len + start + (hi - lo)];
                let maxima = &mut maxima[lo..hi];
                // Two loops, not one with `if INDEX` on indexed writes: zipped slices have no
                // bounds checks to stop the vectorisation.
                if INDEX {
                    let at = &mut row_at[y * ow + lo..y * ow + hi];
                    let columns = &tap_columns[k * ow + lo..k * ow + hi];
                    for (((m, a), &v), &column) in maxima.iter_mut().zip(at).zip(taps).zip(columns) {
                        let take = wins(v, *m);
                        *a = select(take, column, *a);
                        *m = f32::from_bits(select(take, v.to_bits(), m.to_bits()));
                    }
                } else {
                    for (m, &v) in maxima.iter_mut().zip(taps) {
                        *m = f32::from_bits(select(wins(v, *m), v.to_bits(), m.to_bits()));
                    }
                }
            }
        }
        acc.resize(ow, 0.0);
        acc_at.resize(ow, 0);
        for (oy, out) in out.chunks_exact_mut(ow).enumerate() {
            let (lo, hi) = self.window(oy, h);
            acc.copy_from_slice(&rows[lo * ow..(lo + 1) * ow]);
            if INDEX {
                let offset = (lo * w) as u32;
                acc_at.iter_mut().zip(&row_at[lo * ow..(lo + 1) * ow]).for_each(|(a, &column)| *a = column + offset);
            }
            for y in lo + 1..hi {
                let maxima = &rows[y * ow..(y + 1) * ow];
                if INDEX {
                    // The rows' indices are columns; the plane's index is `y·w` + column.
                    let (at, offset) = (&row_at[y * ow..(y + 1) * ow], (y * w) as u32);
                    for (((a, a_at), &m), &m_at) in acc.iter_mut().zip(acc_at.iter_mut()).zip(maxima).zip(at) {
                        let take = wins(m, *a);
                        *a_at = select(take, m_at + offset, *a_at);
                        *a = f32::from_bits(select(take, m.to_bits(), a.to_bits()));
                    }
                } else {
                    for (a, &m) in acc.iter_mut().zip(maxima) {
                        *a = f32::from_bits(select(wins(m, *a), m.to_bits(), a.to_bits()));
                    }
                }
            }
            out.copy_from_slice(acc);
            if INDEX {
                argmax[oy * ow..(oy + 1) * ow].copy_from_slice(acc_at);
            }
        }
    }

    /// The CUDA kernels' description of a pool over `x`.
    #[cfg(feature = "cuda")]
    fn kernel_geometry(&self, op: &str, xl: &Layout) -> Result<crate::cuda_ops::KernelGeometry> {
        let Strided4 { dims, .. } = Strided4::new(op, "input", xl)?;
        let (oh, ow) = self.output_size(dims[2], dims[3])?;
        crate::cuda_ops::KernelGeometry::new(op, dims, [self.kernel; 2], [oh, ow], self.stride, self.padding)
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "sae-max-pool2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let cfg = self.cfg;
        let xs = Strided4::new("max_pool2d", "input", xl)?;
        let [n, c, h, w] = xs.dims;
        let (oh, ow) = cfg.output_size(h, w)?;
        if h * w > u32::MAX as usize {
            bail!("max_pool2d: planes of {h}×{w} are too large for the kernel's u32 indices")
        }
        let mut argmax = if self.record { uninit_indices(n * c * oh * ow) } else { Vec::new() };
        let out = dispatch_float!("max_pool2d", x, |x: T| {
            let mut out = uninit::<T>(n * c * oh * ow);
            // Per task: a plane as f32 (unless it already is a contiguous f32 slice), the
            // output plane in f32 (unless `T` is f32), and the pool's scratch.
            let scratch = || (Vec::new(), Vec::new(), PoolScratch::default());
            let pool = |(buf, out_buf, scratch): &mut (Vec<f32>, Vec<f32>, PoolScratch),
                        plane: usize,
                        out: &mut [T],
                        argmax: &mut [u32]| {
                let values = plane_f32(x, &xs, plane / c, plane % c, buf);
                // In `vectorized!` code, 16 lanes where the CPU has AVX-512: the stem's pool
                // (16 × 64 × 70×70, with the argmax kept) 6.7 → 5.0 ms on the 2-core AMD EPYC
                // (a throwaway timing loop, fastest of 9 × 5 calls).
                write_f32(out, out_buf, |out| {
                    if self.record {
                        vectorized!(cfg.pool_plane::<true>(values, (h, w), ow, scratch, out, argmax))
                    } else {
                        vectorized!(cfg.pool_plane::<false>(values, (h, w), ow, scratch, out, argmax))
                    }
                })
            };
            let planes = out.par_chunks_mut(oh * ow).with_min_len(min_planes_per_task(h * w)).enumerate();
            if self.record {
                planes
                    .zip(argmax.par_chunks_mut(oh * ow))
                    .for_each_init(scratch, |scratch, ((plane, out), argmax)| pool(scratch, plane, out, argmax));
            } else {
                planes.for_each_init(scratch, |scratch, (plane, out)| pool(scratch, plane, out, &mut []));
            }
            T::to_cpu_storage_owned(out)
        });
        if self.record && self.argmax.set(argmax).is_err() {
            bail!("max_pool2d: the op ran twice")
        }
        Ok((out, Shape::from((n, c, oh, ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.cfg.kernel_geometry("max_pool2d", xl)?;
        let shape = Shape::from((g.n as usize, g.c as usize, g.oh as usize, g.ow as usize));
        Ok((crate::cuda_ops::max_pool(x, xl, g)?, shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let backward = MaxPoolBackward { cfg: self.cfg, argmax: self.argmax.clone() };
        Ok(Some(x.apply_op2_no_bwd(grad, &backward)?))
    }
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "sae-max-pool2d-backward"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let cfg = self.cfg;
        let xs = Strided4::new("max_pool2d backward", "input", xl)?;
        let gs = Strided4::new("max_pool2d backward", "output gradient", gl)?;
        let [n, c, h, w] = xs.dims;
        let (oh, ow) = cfg.output_size(h, w)?;
        if gs.dims != [n, c, oh, ow] {
            bail!("max_pool2d backward: gradient shape {:?}, expected {:?}", gs.dims, [n, c, oh, ow])
        }
        let Some(argmax) = self.argmax.get().filter(|a| a.len() == n * c * oh * ow) else {
            bail!("max_pool2d backward: the forward pass kept no window maxima for this input")
        };
        let out = dispatch_float!("max_pool2d backward", x, |_x: T| {
            let g = same_dtype::<T>("max_pool2d backward", g)?;
            let mut dx = uninit::<T>(n * c * h * w);
            dx.par_chunks_mut(h * w).with_min_len(min_planes_per_task(h * w)).enumerate().for_each_init(
                || (Vec::new(), vec![0f32; h * w]),
                |(g_buf, acc), (plane, dx)| {
                    let (ni, ci) = (plane / c, plane % c);
                    let grads = plane_f32(g, &gs, ni, ci, g_buf);
                    acc.iter_mut().for_each(|v| *v = 0.0);
                    for (&i, &gv) in argmax[plane * oh * ow..(plane + 1) * oh * ow].iter().zip(grads) {
                        acc[i as usize] += gv;
                    }
                    copy_converted(acc, dx);
                },
            );
            T::to_cpu_storage_owned(dx)
        });
        Ok((out, Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let geometry = self.cfg.kernel_geometry("max_pool2d backward", xl)?;
        let expected = [geometry.n, geometry.c, geometry.oh, geometry.ow].map(|v| v as usize);
        if gl.dims() != expected {
            bail!("max_pool2d backward: gradient shape {:?}, expected {:?}", gl.dims(), expected)
        }
        Ok((crate::cuda_ops::max_pool_backward(x, xl, g, gl, geometry)?, xl.shape().clone()))
    }
}

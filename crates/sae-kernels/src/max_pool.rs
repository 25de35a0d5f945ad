//! 2-D max-pool with zero-cost padding (padded cells never win) and any stride, with a
//! backward pass. Candle's own `max_pool2d` has no padding and no backward unless
//! kernel == stride, which ResNet's 3×3/2 stem pool needs.
//!
//! Output size follows PyTorch (`ceil_mode = false`): `(H + 2·padding − kernel) / stride + 1`.
//! Gradients go to the first maximal element of each window in row-major order; the
//! reference gives tied elements the gradient each, so the two agree when maxima are unique.
//!
//! The fused kernel runs on the CPU and on CUDA (`src/cuda/ops.cu`: one thread per output, and
//! per input element for the gradient, which recomputes the windows' first maxima: no atomics);
//! on other devices [`max_pool2d`] runs the reference.

use crate::cpu::{copy_converted, dispatch_float, min_planes_per_task, plane_f32, same_dtype, uninit, Elem};
use crate::layout::Strided4;
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

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
        Implementation::Fused if crate::has_fused_kernel(x) => x.apply_op1(MaxPool(cfg)),
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

struct MaxPool(MaxPoolConfig);

/// Backward op: (x, output gradient) → input gradient.
struct MaxPoolBackward(MaxPoolConfig);

/// The larger of two values, NaN if either is (NaNs propagate as in PyTorch).
#[inline(always)]
fn nan_max(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

impl MaxPoolConfig {
    /// Input positions `lo..hi` (non-empty) covered by window `o` along a side of `len` cells.
    #[inline(always)]
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = o * self.stride;
        (start.saturating_sub(self.padding), (start + self.kernel - self.padding).min(len))
    }

    /// Output columns `lo..hi` whose tap `k` reads an input column inside a side of `len`.
    #[inline(always)]
    fn valid_outputs(&self, k: usize, len: usize, outputs: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(k).div_ceil(self.stride).min(outputs);
        let hi = (len + self.padding).saturating_sub(k).div_ceil(self.stride).clamp(lo, outputs);
        (lo, hi)
    }

    /// For every window of output row `oy` of one plane (`w` columns), the flat index of its
    /// first maximum (of its last NaN, where there is one, so that NaNs propagate as in
    /// PyTorch) into `best`; `best_value` is scratch of the same length (`ow`).
    ///
    /// The windows of a row are scanned together, tap by tap in row-major order, so that no
    /// compare waits for the previous one (one window at a time is a chain of dependent
    /// compare-and-selects, three times slower). `padding ≤ kernel / 2` guarantees every
    /// window holds at least one real element, which starts it.
    fn row_argmax(&self, plane: &[f32], h: usize, w: usize, oy: usize, best: &mut [usize], best_value: &mut [f32]) {
        let (y0, y1) = self.window(oy, h);
        for (ox, (b, v)) in best.iter_mut().zip(best_value.iter_mut()).enumerate() {
            *b = y0 * w + self.window(ox, w).0;
            *v = f32::NEG_INFINITY;
        }
        for y in y0..y1 {
            let row = &plane[y * w..(y + 1) * w];
            for k in 0..self.kernel {
                let (lo, hi) = self.valid_outputs(k, w, best.len());
                for ox in lo..hi {
                    let ix = ox * self.stride + k - self.padding;
                    let v = row[ix];
                    // Selects, not a branch: which element wins is data.
                    let take = (v > best_value[ox]) | v.is_nan();
                    best[ox] = if take { y * w + ix } else { best[ox] };
                    best_value[ox] = if take { v } else { best_value[ox] };
                }
            }
        }
    }
}

impl MaxPoolConfig {
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
        let cfg = self.0;
        let xs = Strided4::new("max_pool2d", "input", xl)?;
        let [n, c, h, w] = xs.dims;
        let (oh, ow) = cfg.output_size(h, w)?;
        let out = dispatch_float!("max_pool2d", x, |x: T| {
            let mut out = uninit::<T>(n * c * oh * ow);
            // Separable: the maximum over each window's columns for every input row, then over
            // each window's rows. Per plane: its values as f32 (unless it already is a
            // contiguous f32 slice) and the row maxima (H × OW).
            let scratch = || (Vec::new(), vec![0f32; h * ow], vec![0f32; ow]);
            out.par_chunks_mut(oh * ow).with_min_len(min_planes_per_task(h * w)).enumerate().for_each_init(
                scratch,
                |(buf, rows, acc), (plane, out)| {
                    let (ni, ci) = (plane / c, plane % c);
                    let values = plane_f32(x, &xs, ni, ci, buf);
                    for (row, maxima) in values.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
                        for (o, m) in maxima.iter_mut().enumerate() {
                            let (lo, hi) = cfg.window(o, w);
                            *m = row[lo..hi].iter().fold(f32::NEG_INFINITY, |m, &v| nan_max(m, v));
                        }
                    }
                    for (oy, out) in out.chunks_exact_mut(ow).enumerate() {
                        let (lo, hi) = cfg.window(oy, h);
                        acc.copy_from_slice(&rows[lo * ow..(lo + 1) * ow]);
                        for maxima in rows[(lo + 1) * ow..hi * ow].chunks_exact(ow) {
                            acc.iter_mut().zip(maxima).for_each(|(a, &m)| *a = nan_max(*a, m));
                        }
                        out.iter_mut().zip(acc.iter()).for_each(|(o, &a)| *o = T::from_f32(a));
                    }
                },
            );
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from((n, c, oh, ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0.kernel_geometry("max_pool2d", xl)?;
        let shape = Shape::from((g.n as usize, g.c as usize, g.oh as usize, g.ow as usize));
        Ok((crate::cuda_ops::max_pool(x, xl, g)?, shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(grad, &MaxPoolBackward(self.0))?))
    }
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "sae-max-pool2d-backward"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let cfg = self.0;
        let xs = Strided4::new("max_pool2d backward", "input", xl)?;
        let gs = Strided4::new("max_pool2d backward", "output gradient", gl)?;
        let [n, c, h, w] = xs.dims;
        let (oh, ow) = cfg.output_size(h, w)?;
        if gs.dims != [n, c, oh, ow] {
            bail!("max_pool2d backward: gradient shape {:?}, expected {:?}", gs.dims, [n, c, oh, ow])
        }
        let out = dispatch_float!("max_pool2d backward", x, |x: T| {
            let g = same_dtype::<T>("max_pool2d backward", g)?;
            let mut dx = uninit::<T>(n * c * h * w);
            dx.par_chunks_mut(h * w).with_min_len(min_planes_per_task(h * w)).enumerate().for_each_init(
                || (Vec::new(), Vec::new(), vec![0f32; h * w], vec![0usize; ow], vec![0f32; ow]),
                |(x_buf, g_buf, acc, best, best_value), (plane, dx)| {
                    let (ni, ci) = (plane / c, plane % c);
                    let values = plane_f32(x, &xs, ni, ci, x_buf);
                    let grads = plane_f32(g, &gs, ni, ci, g_buf);
                    acc.iter_mut().for_each(|v| *v = 0.0);
                    for (oy, grads) in grads.chunks_exact(ow).enumerate() {
                        cfg.row_argmax(values, h, w, oy, best, best_value);
                        for (&i, &gv) in best.iter().zip(grads) {
                            acc[i] += gv;
                        }
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
        let geometry = self.0.kernel_geometry("max_pool2d backward", xl)?;
        let expected = [geometry.n, geometry.c, geometry.oh, geometry.ow].map(|v| v as usize);
        if gl.dims() != expected {
            bail!("max_pool2d backward: gradient shape {:?}, expected {:?}", gl.dims(), expected)
        }
        Ok((crate::cuda_ops::max_pool_backward(x, xl, g, gl, geometry)?, xl.shape().clone()))
    }
}

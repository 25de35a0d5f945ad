//! Depthwise 2-D convolution (groups = channels, one filter per channel), forward and
//! backward. Candle runs a grouped convolution as one convolution per group followed by a
//! concatenation, which for MobileNet v1's 32–1,024 groups is thousands of tiny calls.
//!
//! The CPU kernel works plane by plane: it copies each (n, c) plane into a zero-padded
//! buffer once, then accumulates the K² taps as shifted row updates, which vectorise for
//! stride 1. On CUDA (`src/cuda/ops.cu`) the forward and the input gradient are
//! one thread per element, the weight gradient one block per filter tap. On other devices
//! [`depthwise_conv2d`] runs the reference (Candle's grouped `conv2d`).

use crate::cpu::{as_f32, dispatch_float, min_planes_per_task, same_dtype, uninit, unpack, Elem};
use crate::layout::Strided4;
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Stride and zero padding of a depthwise convolution (square, dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthwiseConfig {
    /// Step between output positions.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
}

/// Geometry of one call, validated once.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn new(x: &[usize], weight: &[usize], cfg: DepthwiseConfig) -> Result<Self> {
        let [n, c, h, w] = match x {
            &[n, c, h, w] => [n, c, h, w],
            _ => bail!("depthwise_conv2d: input must be (N, C, H, W), got {x:?}"),
        };
        let (kh, kw) = match weight {
            &[wc, 1, kh, kw] if wc == c => (kh, kw),
            _ => bail!("depthwise_conv2d: weight must be ({c}, 1, kh, kw) for {c} input channels, got {weight:?}"),
        };
        if cfg.stride == 0 {
            bail!("depthwise_conv2d: stride must be positive")
        }
        if h + 2 * cfg.padding < kh || w + 2 * cfg.padding < kw {
            bail!("depthwise_conv2d: input {h}×{w} with padding {} is smaller than the kernel {kh}×{kw}", cfg.padding)
        }
        let oh = (h + 2 * cfg.padding - kh) / cfg.stride + 1;
        let ow = (w + 2 * cfg.padding - kw) / cfg.stride + 1;
        Ok(Self { n, c, h, w, kh, kw, oh, ow, stride: cfg.stride, pad: cfg.padding })
    }

    /// The CUDA kernels' description of this call.
    #[cfg(feature = "cuda")]
    fn kernel(&self, op: &str) -> Result<crate::cuda_ops::KernelGeometry> {
        let x = [self.n, self.c, self.h, self.w];
        crate::cuda_ops::KernelGeometry::new(op, x, [self.kh, self.kw], [self.oh, self.ow], self.stride, self.pad)
    }

    fn padded(&self) -> (usize, usize) {
        (self.h + 2 * self.pad, self.w + 2 * self.pad)
    }

    /// Copies plane (n, c) of `x` into the interior of the zeroed padded buffer `buf`.
    fn load_padded<T: Elem>(&self, x: &[T], xs: &Strided4, n: usize, c: usize, buf: &mut Vec<f32>) {
        let (ph, pw) = self.padded();
        buf.clear();
        buf.resize(ph * pw, 0.0);
        let (w, pad) = (self.w, self.pad);
        xs.for_each_in_plane(x, n, c, |k, v| buf[(k / w + pad) * pw + k % w + pad] = v.to_f32());
    }
}

/// Convolves `x` (N, C, H, W) with `weight` (C, 1, kh, kw), one filter per channel.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    cfg: DepthwiseConfig,
    implementation: Implementation,
) -> Result<Tensor> {
    Geometry::new(x.dims(), weight.dims(), cfg)?;
    if weight.dtype() != x.dtype() {
        bail!("depthwise_conv2d: weight dtype {:?} differs from input dtype {:?}", weight.dtype(), x.dtype())
    }
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x) => x.apply_op2(&weight.contiguous()?, Depthwise(cfg)),
        _ => depthwise_conv2d_reference(x, weight, cfg),
    }
}

/// Candle's grouped convolution with `groups = C`: the reference.
///
/// The input is zero-padded explicitly and cropped to the rows and columns the windows
/// reach, because Candle 0.11's convolution backward returns a wrongly sized input gradient
/// when `(H + 2·padding − k)` is not a multiple of the stride.
pub fn depthwise_conv2d_reference(x: &Tensor, weight: &Tensor, cfg: DepthwiseConfig) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), weight.dims(), cfg)?;
    let used_h = (g.oh - 1) * g.stride + g.kh;
    let used_w = (g.ow - 1) * g.stride + g.kw;
    let x = x.pad_with_zeros(2, g.pad, g.pad)?.pad_with_zeros(3, g.pad, g.pad)?;
    let x = x.narrow(2, 0, used_h)?.narrow(3, 0, used_w)?;
    x.conv2d(weight, 0, cfg.stride, 1, g.c)
}

struct Depthwise(DepthwiseConfig);

/// Backward op: (x, weight, output gradient) → [dx | dweight] packed in one 1-D tensor.
struct DepthwiseBackward(DepthwiseConfig);

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "sae-depthwise-conv2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.dims(), wl.dims(), self.0)?;
        let xs = Strided4::new("depthwise_conv2d", "input", xl)?;
        let (_, pw) = g.padded();
        let taps = g.kh * g.kw;
        let out = dispatch_float!("depthwise_conv2d", x, |x: T| {
            let wf = as_f32("depthwise_conv2d", "weight", same_dtype::<T>("depthwise_conv2d", w)?, wl)?;
            let mut out = uninit::<T>(g.n * g.c * g.oh * g.ow);
            out.par_chunks_mut(g.oh * g.ow).with_min_len(min_planes_per_task(g.h * g.w)).enumerate().for_each_init(
                || (Vec::new(), vec![0f32; g.ow]),
                |(buf, row), (plane, out)| {
                    let ci = plane % g.c;
                    g.load_padded(x, &xs, plane / g.c, ci, buf);
                    let k = &wf[ci * taps..(ci + 1) * taps];
                    for oy in 0..g.oh {
                        row.iter_mut().for_each(|v| *v = 0.0);
                        for ky in 0..g.kh {
                            let src = &buf[(oy * g.stride + ky) * pw..];
                            for kx in 0..g.kw {
                                let wv = k[ky * g.kw + kx];
                                if g.stride == 1 {
                                    for (r, &v) in row.iter_mut().zip(&src[kx..kx + g.ow]) {
                                        *r += wv * v;
                                    }
                                } else {
                                    for (ox, r) in row.iter_mut().enumerate() {
                                        *r += wv * src[ox * g.stride + kx];
                                    }
                                }
                            }
                        }
                        for (o, &r) in out[oy * g.ow..(oy + 1) * g.ow].iter_mut().zip(row.iter()) {
                            *o = T::from_f32(r);
                        }
                    }
                },
            );
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from((g.n, g.c, g.oh, g.ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(xl.dims(), wl.dims(), self.0)?;
        let out = crate::cuda_ops::depthwise(x, xl, w, wl, g.kernel("depthwise_conv2d")?)?;
        Ok((out, Shape::from((g.n, g.c, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, grad, &DepthwiseBackward(self.0))?;
        let [dx, dw] = unpack(&packed, [x.dims(), w.dims()])?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for DepthwiseBackward {
    fn name(&self) -> &'static str {
        "sae-depthwise-conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        gr: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "depthwise_conv2d backward";
        let g = Geometry::new(xl.dims(), wl.dims(), self.0)?;
        let xs = Strided4::new(op, "input", xl)?;
        let gs = Strided4::new(op, "output gradient", gl)?;
        if gs.dims != [g.n, g.c, g.oh, g.ow] {
            bail!("{op}: gradient shape {:?}, expected {:?}", gs.dims, [g.n, g.c, g.oh, g.ow])
        }
        let (ph, pw) = g.padded();
        let taps = g.kh * g.kw;
        let numel = g.n * g.c * g.h * g.w;
        let out = dispatch_float!(op, x, |x: T| {
            let wf = as_f32(op, "weight", same_dtype::<T>(op, w)?, wl)?;
            let gr = same_dtype::<T>(op, gr)?;
            let mut out = uninit::<T>(numel + g.c * taps);
            let (dx, dw_out) = out.split_at_mut(numel);
            // Each plane yields its input gradient and its partial weight gradient.
            let partial: Vec<Vec<f32>> = dx
                .par_chunks_mut(g.h * g.w)
                .with_min_len(min_planes_per_task(g.h * g.w))
                .enumerate()
                .map_init(
                    || (Vec::new(), Vec::new(), vec![0f32; g.oh * g.ow]),
                    |(xbuf, dbuf, gbuf), (plane, dx)| {
                        let (ni, ci) = (plane / g.c, plane % g.c);
                        g.load_padded(x, &xs, ni, ci, xbuf);
                        gs.for_each_in_plane(gr, ni, ci, |k, v| gbuf[k] = v.to_f32());
                        dbuf.clear();
                        dbuf.resize(ph * pw, 0.0);
                        let k = &wf[ci * taps..(ci + 1) * taps];
                        let mut dk = vec![0f32; taps];
                        for oy in 0..g.oh {
                            let grow = &gbuf[oy * g.ow..(oy + 1) * g.ow];
                            for ky in 0..g.kh {
                                let at = (oy * g.stride + ky) * pw;
                                for kx in 0..g.kw {
                                    let t = ky * g.kw + kx;
                                    let mut acc = 0f32;
                                    if g.stride == 1 {
                                        let xrow = &xbuf[at + kx..at + kx + g.ow];
                                        let ds = &mut dbuf[at + kx..at + kx + g.ow];
                                        for ((d, &xv), &gv) in ds.iter_mut().zip(xrow).zip(grow) {
                                            *d += k[t] * gv;
                                            acc += gv * xv;
                                        }
                                    } else {
                                        for (ox, &gv) in grow.iter().enumerate() {
                                            let i = at + ox * g.stride + kx;
                                            dbuf[i] += k[t] * gv;
                                            acc += gv * xbuf[i];
                                        }
                                    }
                                    dk[t] += acc;
                                }
                            }
                        }
                        for y in 0..g.h {
                            let src = &dbuf[(y + g.pad) * pw + g.pad..(y + g.pad) * pw + g.pad + g.w];
                            for (d, &v) in dx[y * g.w..(y + 1) * g.w].iter_mut().zip(src) {
                                *d = T::from_f32(v);
                            }
                        }
                        dk
                    },
                )
                .collect();
            for ci in 0..g.c {
                for t in 0..taps {
                    let sum: f32 = (0..g.n).map(|ni| partial[ni * g.c + ci][t]).sum();
                    dw_out[ci * taps + t] = T::from_f32(sum);
                }
            }
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from(numel + g.c * taps)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        gr: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let op = "depthwise_conv2d backward";
        let g = Geometry::new(xl.dims(), wl.dims(), self.0)?;
        if gl.dims() != [g.n, g.c, g.oh, g.ow] {
            bail!("{op}: gradient shape {:?}, expected {:?}", gl.dims(), [g.n, g.c, g.oh, g.ow])
        }
        let out = crate::cuda_ops::depthwise_backward(x, xl, w, wl, gr, gl, g.kernel(op)?)?;
        Ok((out, Shape::from(g.n * g.c * g.h * g.w + g.c * g.kh * g.kw)))
    }
}

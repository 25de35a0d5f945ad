//! 2-D convolution (any stride, zero padding and channel groups; dilation 1), forward and
//! backward, as im2col + the `gemm` crate's matrix multiply.
//!
//! Candle 0.11 computes a convolution's input gradient with `conv_transpose2d`, a direct loop
//! of dot products that runs at a fraction of the machine's matrix-multiply speed, and that
//! gradient has the wrong size when `(H + 2·padding − k)` is not a multiple of the stride.
//! Here all three products are matrix multiplies over the unrolled input ("col", one row per
//! (input channel, ky, kx), one column per output pixel), per image and per group:
//!
//! * forward: `y = W · col`
//! * input gradient: `dcol = Wᵀ · dy`, then col2im adds each column back where it was read
//! * weight gradient: `dW += dy · colᵀ`, summed over the batch
//!
//! A 1×1 stride-1 convolution without padding reads its input plane by plane as the matrix
//! itself, with no unrolling. Images are spread over rayon tasks when there are at least as
//! many images as threads (each multiply then runs on one thread); otherwise each multiply is
//! itself parallel. The fused kernel is CPU and `f32` only; elsewhere [`conv2d`] runs the
//! reference (Candle's `conv2d`).

use crate::cpu::{matmul_on, Mat, Strided4};
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Stride, zero padding and channel groups of a convolution (dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Step between output positions.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Channel groups: input and output channels are split into this many independent sets.
    pub groups: usize,
}

/// Geometry of one call, validated once.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oc: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    pad: usize,
    groups: usize,
}

impl Geometry {
    fn new(x: &[usize], weight: &[usize], cfg: Conv2dConfig) -> Result<Self> {
        let &[n, c, h, w] = x else { bail!("conv2d: input must be (N, C, H, W), got {x:?}") };
        let &[oc, cg, kh, kw] = weight else {
            bail!("conv2d: weight must be (out channels, in channels / groups, kh, kw), got {weight:?}")
        };
        if [c, oc, kh, kw].contains(&0) {
            bail!("conv2d: channels and kernel sizes must be positive, got input {x:?} and weight {weight:?}")
        }
        if cfg.stride == 0 || cfg.groups == 0 {
            bail!("conv2d: stride and groups must be positive, got {cfg:?}")
        }
        if c % cfg.groups != 0 || oc % cfg.groups != 0 {
            bail!("conv2d: {c} input and {oc} output channels cannot be split into {} groups", cfg.groups)
        }
        if cg != c / cfg.groups {
            bail!(
                "conv2d: weight {weight:?} has {cg} input channels per group, but the input has {c} channels in {} groups",
                cfg.groups
            )
        }
        if h + 2 * cfg.padding < kh || w + 2 * cfg.padding < kw {
            bail!("conv2d: input {h}×{w} with padding {} is smaller than the kernel {kh}×{kw}", cfg.padding)
        }
        let oh = (h + 2 * cfg.padding - kh) / cfg.stride + 1;
        let ow = (w + 2 * cfg.padding - kw) / cfg.stride + 1;
        Ok(Self { n, c, h, w, oc, kh, kw, oh, ow, stride: cfg.stride, pad: cfg.padding, groups: cfg.groups })
    }

    /// Output pixels per image (columns of `col`).
    fn pixels(&self) -> usize {
        self.oh * self.ow
    }

    /// Rows of `col` per group: input channels per group × kernel taps.
    fn rows_per_group(&self) -> usize {
        self.c / self.groups * self.kh * self.kw
    }

    fn out_per_group(&self) -> usize {
        self.oc / self.groups
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output columns `lo..hi` whose input column `ox·stride + kx − pad` lies inside the image.
    fn valid_columns(&self, kx: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).div_ceil(self.stride).min(self.ow);
        let hi = (self.w + self.pad).saturating_sub(kx).div_ceil(self.stride).clamp(lo, self.ow);
        (lo, hi)
    }

    /// Input row read by output row `oy` at tap `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky).checked_sub(self.pad).filter(|&iy| iy < self.h)
    }

    /// Unrolls image `n` of `x` into `col` (C·kh·kw rows × oh·ow columns, row-major).
    fn im2col(&self, x: &[f32], xs: &Strided4, n: usize, col: &mut [f32]) {
        let p = self.pixels();
        for ci in 0..self.c {
            let plane = xs.offset + n * xs.strides[0] + ci * xs.strides[1];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut col[((ci * self.kh + ky) * self.kw + kx) * p..][..p];
                    let (lo, hi) = self.valid_columns(kx);
                    for (oy, out) in row.chunks_exact_mut(self.ow).enumerate() {
                        let Some(iy) = self.input_row(oy, ky) else {
                            out.fill(0.0);
                            continue;
                        };
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        let start = plane + iy * xs.strides[2];
                        let ix0 = lo * self.stride + kx - self.pad;
                        if self.stride == 1 && xs.strides[3] == 1 {
                            out[lo..hi].copy_from_slice(&x[start + ix0..start + ix0 + hi - lo]);
                        } else {
                            let step = self.stride * xs.strides[3];
                            for (j, o) in out[lo..hi].iter_mut().enumerate() {
                                *o = x[start + ix0 * xs.strides[3] + j * step];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds every column of `dcol` back to the input positions [`Self::im2col`] read it
    /// from; `dx` is one contiguous (C, H, W) image.
    fn col2im(&self, dcol: &[f32], dx: &mut [f32]) {
        let p = self.pixels();
        for ci in 0..self.c {
            let plane = &mut dx[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &dcol[((ci * self.kh + ky) * self.kw + kx) * p..][..p];
                    let (lo, hi) = self.valid_columns(kx);
                    for (oy, src) in row.chunks_exact(self.ow).enumerate() {
                        let Some(iy) = self.input_row(oy, ky) else { continue };
                        let ix0 = lo * self.stride + kx - self.pad;
                        let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                        if self.stride == 1 {
                            for (d, &s) in dst[ix0..ix0 + hi - lo].iter_mut().zip(&src[lo..hi]) {
                                *d += s;
                            }
                        } else {
                            for (j, &s) in src[lo..hi].iter().enumerate() {
                                dst[ix0 + j * self.stride] += s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Image `n` of `x` as the matrix the multiplies read (rows: C or C·kh·kw, columns: output
    /// pixels): the input itself for a pointwise convolution over contiguous planes, else its
    /// unrolling into `col`.
    fn input_matrix<'a>(&self, x: &'a [f32], xs: &Strided4, n: usize, col: &'a mut Vec<f32>) -> Mat<'a> {
        if self.is_pointwise() && xs.strides[3] == 1 && xs.strides[2] == self.w {
            let start = xs.offset + n * xs.strides[0];
            return Mat { data: &x[start..], rs: xs.strides[1], cs: 1 };
        }
        let len = self.c * self.kh * self.kw * self.pixels();
        if col.len() < len {
            col.resize(len, 0.0);
        }
        self.im2col(x, xs, n, &mut col[..len]);
        Mat { data: &col[..len], rs: self.pixels(), cs: 1 }
    }

    /// How to spread `n` images over the rayon pool: (images per task, whether each matrix
    /// multiply should itself be parallel).
    fn schedule(&self) -> (usize, bool) {
        let threads = rayon::current_num_threads();
        if threads > 1 && self.n >= threads {
            (self.n.div_ceil(threads), false)
        } else {
            (self.n.max(1), true)
        }
    }
}

/// Group `g`'s rows of a matrix whose rows are grouped in blocks of `rows`.
fn group_rows<'a>(m: Mat<'a>, g: usize, rows: usize) -> Mat<'a> {
    Mat { data: &m.data[g * rows * m.rs..], ..m }
}

/// Convolves `x` (N, C, H, W) with `weight` (O, C / groups, kh, kw).
pub fn conv2d(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig, implementation: Implementation) -> Result<Tensor> {
    Geometry::new(x.dims(), weight.dims(), cfg)?;
    if weight.dtype() != x.dtype() {
        bail!("conv2d: weight dtype {:?} differs from input dtype {:?}", weight.dtype(), x.dtype())
    }
    match implementation {
        Implementation::Fused if x.device().is_cpu() && x.dtype() == DType::F32 => {
            x.apply_op2(&weight.contiguous()?, Conv(cfg))
        }
        _ => conv2d_reference(x, weight, cfg),
    }
}

/// Candle's `conv2d`: the reference.
///
/// The input is zero-padded explicitly and cropped to the rows and columns the windows
/// reach, because Candle 0.11's convolution backward returns a wrongly sized input gradient
/// when `(H + 2·padding − k)` is not a multiple of the stride.
pub fn conv2d_reference(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), weight.dims(), cfg)?;
    let used_h = (g.oh - 1) * g.stride + g.kh;
    let used_w = (g.ow - 1) * g.stride + g.kw;
    let x = if g.pad > 0 { x.pad_with_zeros(2, g.pad, g.pad)?.pad_with_zeros(3, g.pad, g.pad)? } else { x.clone() };
    let x = x.narrow(2, 0, used_h)?.narrow(3, 0, used_w)?;
    x.conv2d(weight, 0, cfg.stride, 1, cfg.groups)
}

struct Conv(Conv2dConfig);

/// Backward op: (x, weight, output gradient) → [dx | dweight] packed in one 1-D tensor; dx
/// is left out when the input needs no gradient (a network's first convolution).
struct ConvBackward {
    cfg: Conv2dConfig,
    input_gradient: bool,
}

/// `storage`'s `f32` data; the public [`conv2d`] only sends `f32` to the CPU kernel.
fn f32_data<'a>(op: &str, what: &str, storage: &'a CpuStorage) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(v) => Ok(v),
        other => bail!(
            "{op}: the CPU kernel takes f32, but the {what} is {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

/// `layout`'s elements of `data`, which must be contiguous.
fn contiguous<'a>(op: &str, what: &str, data: &'a [f32], layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the {what} must be contiguous"),
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "sae-conv2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = "conv2d";
        let g = Geometry::new(xl.dims(), wl.dims(), self.0)?;
        let xs = Strided4::new(op, "input", xl)?;
        let x = f32_data(op, "input", x)?;
        let w = contiguous(op, "weight", f32_data(op, "weight", w)?, wl)?;
        let (p, kg, og) = (g.pixels(), g.rows_per_group(), g.out_per_group());
        let image_len = g.oc * p;
        let mut out = vec![0f32; g.n * image_len];
        let (per_task, parallel_gemm) = g.schedule();
        out.par_chunks_mut(per_task * image_len).enumerate().for_each(|(task, images)| {
            let mut col = Vec::new();
            for (i, y) in images.chunks_exact_mut(image_len).enumerate() {
                let input = g.input_matrix(x, &xs, task * per_task + i, &mut col);
                for gi in 0..g.groups {
                    let wg = Mat { data: &w[gi * og * kg..], rs: kg, cs: 1 };
                    let y = &mut y[gi * og * p..(gi + 1) * og * p];
                    matmul_on(og, p, kg, wg, group_rows(input, gi, kg), y, false, parallel_gemm);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.oc, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let input_gradient = x.track_op();
        let op = ConvBackward { cfg: self.0, input_gradient };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let dx_len = if input_gradient { x.elem_count() } else { 0 };
        let dx = if input_gradient { Some(packed.narrow(0, 0, dx_len)?.reshape(x.shape())?) } else { None };
        let dw = packed.narrow(0, dx_len, w.elem_count())?.reshape(w.shape())?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "sae-conv2d-backward"
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
        let op = "conv2d backward";
        let g = Geometry::new(xl.dims(), wl.dims(), self.cfg)?;
        if gl.dims() != [g.n, g.oc, g.oh, g.ow] {
            bail!("{op}: gradient shape {:?}, expected {:?}", gl.dims(), [g.n, g.oc, g.oh, g.ow])
        }
        let xs = Strided4::new(op, "input", xl)?;
        let x = f32_data(op, "input", x)?;
        let w = contiguous(op, "weight", f32_data(op, "weight", w)?, wl)?;
        let gr = contiguous(op, "output gradient", f32_data(op, "output gradient", gr)?, gl)?;
        let (p, kg, og, cg) = (g.pixels(), g.rows_per_group(), g.out_per_group(), g.c / g.groups);
        let image_len = if self.input_gradient { g.c * g.h * g.w } else { 0 };
        let w_len = g.oc * kg;
        let mut out = vec![0f32; g.n * image_len + w_len];
        let (dx, dw) = out.split_at_mut(g.n * image_len);
        let (per_task, parallel_gemm) = g.schedule();
        let tasks = g.n.div_ceil(per_task);
        let dx_per_task: Vec<&mut [f32]> = if self.input_gradient {
            dx.chunks_mut(per_task * image_len).collect()
        } else {
            (0..tasks).map(|_| <&mut [f32]>::default()).collect()
        };
        // Each task returns its partial weight gradient; they are summed below.
        let partial: Vec<Vec<f32>> = dx_per_task
            .into_par_iter()
            .enumerate()
            .map(|(task, dx)| {
                let (mut col, mut dcol) = (Vec::new(), Vec::new());
                let mut dw = vec![0f32; w_len];
                let images = (task * per_task..((task + 1) * per_task).min(g.n)).enumerate();
                for (i, ni) in images {
                    let dy = Mat { data: &gr[ni * g.oc * p..(ni + 1) * g.oc * p], rs: p, cs: 1 };
                    let input = g.input_matrix(x, &xs, ni, &mut col);
                    for gi in 0..g.groups {
                        let dyg = group_rows(dy, gi, og);
                        let ig = group_rows(input, gi, kg);
                        let colt = Mat { data: ig.data, rs: 1, cs: ig.rs };
                        matmul_on(og, kg, p, dyg, colt, &mut dw[gi * og * kg..(gi + 1) * og * kg], true, parallel_gemm);
                    }
                    if !self.input_gradient {
                        continue;
                    }
                    let dx = &mut dx[i * image_len..(i + 1) * image_len];
                    if g.is_pointwise() {
                        for gi in 0..g.groups {
                            let wt = Mat { data: &w[gi * og * kg..], rs: 1, cs: kg };
                            let dxg = &mut dx[gi * cg * p..(gi + 1) * cg * p];
                            matmul_on(kg, p, og, wt, group_rows(dy, gi, og), dxg, false, parallel_gemm);
                        }
                    } else {
                        let len = g.c * g.kh * g.kw * p;
                        dcol.resize(len, 0.0);
                        for gi in 0..g.groups {
                            let wt = Mat { data: &w[gi * og * kg..], rs: 1, cs: kg };
                            let dcolg = &mut dcol[gi * kg * p..(gi + 1) * kg * p];
                            matmul_on(kg, p, og, wt, group_rows(dy, gi, og), dcolg, false, parallel_gemm);
                        }
                        g.col2im(&dcol, dx);
                    }
                }
                dw
            })
            .collect();
        for part in &partial {
            for (d, &v) in dw.iter_mut().zip(part) {
                *d += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(g.n * image_len + w_len)))
    }
}

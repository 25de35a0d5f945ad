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
//! A 3×3 stride-1 ungrouped convolution (most of ResNet's 3×3 ones) with f32 products takes
//! Winograd's F(2×2, 3×3) algorithm instead for all three products (`crate::winograd`: 16
//! multiplies per 2×2 output pixels instead of 36, the input expanded 4 times instead of 9),
//! but for the weight gradient of a batch with few tiles (small images), which is unrolled —
//! or F(3×3, 3×3) for all three (`crate::winograd3`: 25 multiplies per 3×3 output pixels)
//! where that needs at least a fifth fewer multiplies.
//! Where such a convolution has at most 64 channels in and out (ResNet's first stage) and the
//! CPU has AVX-512 with full-width 512-bit FMA units, all three are computed directly instead
//! (`crate::direct`: the input in 16-channel blocks, no unrolling and no transforms).
//!
//! Images with at least [`PER_IMAGE_PIXELS`] output pixels (and batches of one) run one
//! multiply per image and group, written straight into the image's place in the output:
//! images are spread over rayon tasks when there are at least as many as threads (each
//! multiply then runs on one thread), otherwise each multiply is itself parallel; a 1×1
//! stride-1 convolution without padding reads its input planes as the matrix itself, with no
//! unrolling. Smaller images are unrolled side by side into one matrix per chunk of the batch,
//! so that the multiplies are large enough for the gemm kernels. This im2col kernel fuses no
//! steps; [`Implementation::Fused`] selects it because it replaces Candle's slow paths. On the
//! CPU it takes f32, bf16 and f16 (unrolled in their own type for the bf16 kernel, in f32 for
//! the f32 ones; rounded once when written); bf16 products of a stride-1 ungrouped convolution
//! of a contiguous input, where the bf16 kernel takes them, are packed straight from the images
//! with no unrolled copy (implicit GEMM: `gemm_bf16::Unrolled`, and `UnrolledT` for the weight
//! gradient's `colᵀ`), and their input gradient is the convolution of dy with the turned
//! weights, packed the same way, instead of `Wᵀ · dy` and col2im. On CUDA, `Fused` is the same
//! three products as graph nodes: an im2col kernel (`src/cuda/ops.cu`) for the whole batch,
//! Candle's batched matmul (cuBLAS) and col2im as the im2col node's gradient, so the input
//! gradient does not go through Candle's direct `conv_transpose2d` kernel. Elsewhere
//! [`conv2d`] runs the reference (Candle's `conv2d`).

use crate::cpu::{
    as_f32, bf16_kernel_takes, contiguous, convert, copy_converted, dispatch_float, f32_contiguous, matmul,
    matmul_threads, matmul_threads_unrolled, min_planes_per_task, read_f32, same_dtype, same_type, uninit,
    weight_as_f32, write_f32, Elem, GradientSlot, Mat, Products,
};
use crate::direct::Direct;
use crate::gemm_bf16::{ImplicitOperand, Unrolled, UnrolledT};
use crate::layout::Strided4;
use crate::winograd::{transform_weights, Winograd};
use crate::winograd3;
use crate::Implementation;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use half::bf16;
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

    /// For each tap (ky, kx), in the weights' order, each output pixel's input offset `iy·w + ix`
    /// in a contiguous input plane, or `None` where the tap reads padding: where output rows
    /// are at most [`MAPPED_ROW`] pixels. Unrolling such images row by row (`im2col_row`, and
    /// `col2im` alike) handles a handful of values per call to a bounds check, a fill and a
    /// `memmove`; through the map it is one loop over the image's pixels per tap.
    fn tap_maps(&self) -> Option<TapMaps> {
        let maps = (0..self.kh * self.kw).map(|t| {
            let (ky, kx) = (t / self.kw, t % self.kw);
            let offset = |k: usize| {
                let iy = self.input_row(k / self.ow, ky)?;
                let ix = (k % self.ow * self.stride + kx).checked_sub(self.pad).filter(|&ix| ix < self.w)?;
                Some(iy * self.w + ix)
            };
            (0..self.pixels()).map(offset).collect()
        });
        (self.ow <= MAPPED_ROW).then(|| maps.collect())
    }

    /// Fills `out` (oh·ow values) with the input values that tap (ky, kx) of channel `ci` sees
    /// at every output pixel of image `n`: one row of the unrolled input.
    #[allow(clippy::too_many_arguments)]
    fn im2col_row<T: Elem, U: Elem>(
        &self,
        x: &[T],
        xs: &Strided4,
        n: usize,
        ci: usize,
        ky: usize,
        kx: usize,
        out: &mut [U],
    ) {
        let plane = xs.offset + n * xs.strides[0] + ci * xs.strides[1];
        let (lo, hi) = self.valid_columns(kx);
        let zero = U::from_f32(0.0);
        for (oy, out) in out.chunks_exact_mut(self.ow).enumerate() {
            let Some(iy) = self.input_row(oy, ky) else {
                out.fill(zero);
                continue;
            };
            out[..lo].fill(zero);
            out[hi..].fill(zero);
            let start = plane + iy * xs.strides[2];
            let ix0 = lo * self.stride + kx - self.pad;
            if self.stride == 1 && xs.strides[3] == 1 {
                copy_converted(&x[start + ix0..start + ix0 + hi - lo], &mut out[lo..hi]);
            } else {
                let (step, first, out) = (self.stride * xs.strides[3], start + ix0 * xs.strides[3], &mut out[lo..hi]);
                // Every `step`-th value from `first`. Stride 2 (ResNet's stem and downsampling)
                // as pairs, which the compiler turns into vector shuffles (an indexed loop
                // stays scalar), where the row's last pair lies inside `x`.
                match x.get(first..first + 2 * out.len()) {
                    Some(pairs) if step == 2 => out
                        .iter_mut()
                        .zip(pairs.chunks_exact(2))
                        .for_each(|(o, pair)| *o = U::from_f32(pair[0].to_f32())),
                    _ => out
                        .iter_mut()
                        .zip(x[first..].iter().step_by(step))
                        .for_each(|(o, v)| *o = U::from_f32(v.to_f32())),
                }
            }
        }
    }

    /// Adds every column of one image's part of an unrolled gradient `dcol` (row `r` at
    /// `dcol[r · ld]`, laid out as [`Self::im2col_into`] writes it) back to the input
    /// positions it was read from; `dx` is one contiguous (C, H, W) image.
    /// `maps` are [`Self::tap_maps`], where the rows are short enough to take them.
    fn col2im(&self, dcol: &[f32], ld: usize, dx: &mut [f32], maps: Option<&TapMaps>) {
        let p = self.pixels();
        for ci in 0..self.c {
            let plane = &mut dx[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            if let Some(maps) = maps {
                for (t, map) in maps.iter().enumerate() {
                    let row = &dcol[(ci * self.kh * self.kw + t) * ld..][..p];
                    for (&v, offset) in row.iter().zip(map) {
                        if let Some(i) = *offset {
                            plane[i] += v;
                        }
                    }
                }
                continue;
            }
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &dcol[((ci * self.kh + ky) * self.kw + kx) * ld..][..p];
                    let (lo, hi) = self.valid_columns(kx);
                    for (oy, src) in row.chunks_exact(self.ow).enumerate() {
                        let Some(iy) = self.input_row(oy, ky) else { continue };
                        let ix0 = lo * self.stride + kx - self.pad;
                        let (first, src) = (iy * self.w + ix0, &src[lo..hi]);
                        if self.stride == 1 {
                            plane[first..first + src.len()].iter_mut().zip(src).for_each(|(d, &s)| *d += s);
                        } else {
                            // As pairs for stride 2 (as in `im2col_row`), where the last fits.
                            match plane.get_mut(first..first + 2 * src.len()) {
                                Some(pairs) if self.stride == 2 => {
                                    pairs.chunks_exact_mut(2).zip(src).for_each(|(pair, &s)| pair[0] += s)
                                }
                                _ => {
                                    plane[first..].iter_mut().step_by(self.stride).zip(src).for_each(|(d, &s)| *d += s)
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Winograd's shapes for a 3×3 stride-1 ungrouped convolution with padding up to 2 and f32
    /// products (bf16 ones multiply faster directly), where they save multiplies.
    fn winograd(&self, products: Products) -> Option<Winograd<2>> {
        let eligible =
            self.kh == 3 && self.kw == 3 && self.stride == 1 && self.groups == 1 && products == Products::F32;
        eligible
            .then(|| Winograd::new(self.n, self.c, self.h, self.w, self.oc, self.pad))
            .flatten()
            .filter(Winograd::pays)
    }

    /// Winograd's F(3×3, 3×3) shapes for a convolution that takes F(2×2, 3×3)
    /// ([`Self::winograd`]), where they need at least a fifth fewer multiplies: all three
    /// products then take them. ResNet's 3×3 convolutions at 140×140 (35, 18, 9 and 5 pixels:
    /// 31–44 % fewer) and at 224×224 but for layer 4 do; at 32×32 inputs none does (8×8 images
    /// save 12 %, and ran level; F(3×3)'s rounding is a few times F(2×2)'s, which a run's
    /// small-batch BatchNorm amplifies, so it takes only the shapes that repay it). On the AMD EPYC of
    /// `results/train-profile.md`, `xtask bench-layers`, fastest of three alternating runs,
    /// forward / backward ms, F(2×2) against F(3×3): layer 1 5.6 / 12.2 against 4.9 / 11.2,
    /// layer 2 5.2 / 10.0 against 4.6 / 10.2, layer 3 6.6 / 11.9 against 3.7 / 8.2, layer 4
    /// 9.6 / 20.3 against 7.6 / 15.9.
    fn winograd3(&self, products: Products) -> Option<Winograd<3>> {
        let f2 = self.winograd(products)?;
        Winograd::new(self.n, self.c, self.h, self.w, self.oc, self.pad)
            .filter(|f3| 5 * f3.multiplies() <= 4 * f2.multiplies())
    }

    /// A 1×1 stride-1 unpadded convolution: the unrolled input is the input itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// `dw [+]= dy · colᵀ` for every group over `np` pixels: `dy` is (O × np), `col` the
    /// unrolled input (C·kh·kw rows of np, `col.rs` apart), `dw` (O × C/groups·kh·kw), or each
    /// group's transpose when `transposed`.
    #[allow(clippy::too_many_arguments)]
    fn weight_gradient(
        &self,
        products: Products,
        transposed: bool,
        threads: usize,
        dy: &[f32],
        np: usize,
        col: Mat,
        dw: &mut [f32],
        accumulate: bool,
    ) {
        let (kg, og) = (self.rows_per_group(), self.out_per_group());
        for gi in 0..self.groups {
            let block = &mut dw[gi * og * kg..(gi + 1) * og * kg];
            let (dy, rs) = (&dy[gi * og * np..], col.rs);
            let col = &col.data[gi * kg * rs..];
            if transposed {
                let (col, dyt) = (Mat { data: col, rs, cs: 1 }, Mat { data: dy, rs: 1, cs: np });
                matmul_threads(products, threads, kg, og, np, col, dyt, block, accumulate);
            } else {
                let (dy, colt) = (Mat { data: dy, rs: np, cs: 1 }, Mat { data: col, rs: 1, cs: rs });
                matmul_threads(products, threads, og, kg, np, dy, colt, block, accumulate);
            }
        }
    }

    /// Each group's dWᵀ (C/groups·kh·kw × O/groups) in `dwt`, written transposed into `dw`.
    fn untranspose_weight_gradient(&self, dwt: &[f32], dw: &mut [f32]) {
        let (kg, og) = (self.rows_per_group(), self.out_per_group());
        for (dw, dwt) in dw.chunks_exact_mut(og * kg).zip(dwt.chunks_exact(og * kg)) {
            for (k, row) in dwt.chunks_exact(og).enumerate() {
                for (o, &v) in row.iter().enumerate() {
                    dw[o * kg + k] = v;
                }
            }
        }
    }

    /// The unrolled input of `images` of a bf16 input whose values are contiguous, where the
    /// convolution is stride 1 and ungrouped: what the bf16 kernel packs straight from the
    /// images ([`Unrolled`]) instead of from an unrolled copy. Not for a pointwise convolution
    /// of one image, whose planes are the matrix itself; several images side by side (the
    /// batched path) would otherwise be copied into one matrix: on the AMD EPYC, alternating
    /// `bench-train-row` pairs, a ResNet-50 32×32 bf16 training step 90.0–145.6 → 84.1–144.9
    /// ms (ten pairs, every rank lower), SENetV2-ResNet-50 140×140 bf16 inference 0.208–0.236
    /// → 0.194–0.207 s, its training level.
    fn unrolled_bf16<'a, T: Elem>(
        &self,
        x: &'a [T],
        xs: &Strided4,
        images: std::ops::Range<usize>,
    ) -> Option<Unrolled<'a>> {
        let image_len = self.c * self.h * self.w;
        let plain = self.stride == 1 && self.groups == 1 && !(self.is_pointwise() && images.len() == 1);
        let contiguous = xs.strides[3] == 1
            && xs.strides[2] == self.w
            && xs.strides[1] == self.h * self.w
            && (images.len() == 1 || xs.strides[0] == image_len);
        let x = same_type::<T, bf16>(x).filter(|_| plain && contiguous)?;
        let x = x.get(xs.offset + images.start * xs.strides[0]..)?.get(..images.len() * image_len)?;
        Some(Unrolled::new(x, (self.c, self.h, self.w), (self.kh, self.kw), self.pad))
    }

    /// The output gradient `gr` (N, O, OH, OW) unrolled as the input of the convolution that
    /// gives this convolution's input gradient (see [`Self::turned_weights`]): where the
    /// convolution is stride 1, ungrouped, square and not pointwise, and `gr` bf16. Column
    /// `n · H·W + pixel` is input pixel `pixel` of image `n`.
    fn input_gradient_convolution<'a, T: Elem>(&self, gr: &'a [T]) -> Option<Unrolled<'a>> {
        let fits = self.stride == 1 && self.groups == 1 && self.kh == self.kw && self.pad < self.kh;
        let gr = same_type::<T, bf16>(gr).filter(|_| fits && !self.is_pointwise())?;
        Some(Unrolled::new(gr, (self.oc, self.oh, self.ow), (self.kh, self.kw), self.kh - 1 - self.pad))
    }

    /// This convolution as a [`Direct`] one, with its f32 input `x` (N, C, H, W) contiguous:
    /// where it is 3×3, stride 1, padding 1, ungrouped, f32 and contiguous, and the kernel
    /// takes the shape (`Direct::new`).
    fn direct<'a, T: Elem>(&self, x: &'a [T], xs: &Strided4) -> Option<(Direct, &'a [f32])> {
        let image_len = self.c * self.h * self.w;
        let contiguous = xs.strides == [image_len, self.h * self.w, self.w, 1];
        let x = T::as_f32_slice(x).filter(|_| contiguous && self.is_direct_shape())?;
        Some((Direct::new(self.c, self.h, self.w, self.oc)?, x.get(xs.offset..)?.get(..self.n * image_len)?))
    }

    /// The input gradient's convolution (of dy with [`Self::turned_weights`]) as a [`Direct`]
    /// one, with `gr` (N, O, H, W, contiguous) in f32, where the kernel takes it.
    fn direct_input_gradient<'a, T: Elem>(&self, gr: &'a [T]) -> Option<(Direct, &'a [f32])> {
        let gr = T::as_f32_slice(gr).filter(|_| self.is_direct_shape())?;
        Some((Direct::new(self.oc, self.oh, self.ow, self.c)?, gr))
    }

    /// 3×3, stride 1, padding 1, ungrouped: output and input the same size.
    fn is_direct_shape(&self) -> bool {
        self.kh == 3 && self.kw == 3 && self.stride == 1 && self.pad == 1 && self.groups == 1
    }

    /// The weights (O, C, kh, kw) as the input gradient's convolution takes them: (C, O·kh·kw),
    /// each kernel turned by 180°.
    fn turned_weights(&self, w: &[f32]) -> Vec<f32> {
        let (taps, o_taps) = (self.kh * self.kw, self.oc * self.kh * self.kw);
        let mut turned = vec![0f32; self.c * o_taps];
        for (o, filters) in w.chunks_exact(self.c * taps).enumerate() {
            for (ci, kernel) in filters.chunks_exact(taps).enumerate() {
                for (t, &v) in kernel.iter().enumerate() {
                    turned[ci * o_taps + o * taps + (taps - 1 - t)] = v;
                }
            }
        }
        turned
    }

    /// Whether images are multiplied one at a time (see the module doc).
    fn per_image(&self) -> bool {
        self.pixels() >= PER_IMAGE_PIXELS || self.n == 1
    }

    /// Image `n`'s unrolled input (C·kh·kw × oh·ow) as a matrix of `U` (f32, or the input's
    /// own type): its input planes themselves for a 1×1 stride-1 unpadded convolution whose
    /// planes are contiguous and of type `U`, otherwise unrolled into `scratch` (reused
    /// between images of one task).
    fn image_matrix<'a, T: Elem, U: Elem>(
        &self,
        x: &'a [T],
        xs: &Strided4,
        n: usize,
        scratch: &'a mut Vec<U>,
    ) -> Mat<'a, U> {
        if self.is_pointwise() && xs.strides[3] == 1 && xs.strides[2] == self.w {
            if let Some(x) = same_type::<T, U>(x) {
                return Mat { data: &x[xs.offset + n * xs.strides[0]..], rs: xs.strides[1], cs: 1 };
            }
        }
        self.im2col_into(x, xs, n..n + 1, scratch);
        Mat { data: scratch, rs: self.pixels(), cs: 1 }
    }

    /// `y` (O × np) = W · col for every group on up to `threads` threads, `col` the unrolled
    /// input of one or more images side by side (C·kh·kw rows of `np` pixels).
    fn multiply_unrolled<U: Elem>(
        &self,
        products: Products,
        threads: usize,
        w: &[f32],
        col: Mat<U>,
        np: usize,
        y: &mut [f32],
    ) {
        let (kg, og) = (self.rows_per_group(), self.out_per_group());
        for gi in 0..self.groups {
            let wg = Mat { data: &w[gi * og * kg..], rs: kg, cs: 1 };
            let colg = Mat { data: &col.data[gi * kg * col.rs..], ..col };
            matmul_threads(products, threads, og, np, kg, wg, colg, &mut y[gi * og * np..(gi + 1) * og * np], false);
        }
    }

    /// Images per multiply: as many as keep the unrolled input under `budget` floats.
    fn images_per_chunk(&self, budget: usize) -> usize {
        (budget / (self.c * self.kh * self.kw * self.pixels())).clamp(1, self.n.max(1))
    }

    /// Images `images` unrolled side by side into `col`: C·kh·kw rows × (images · oh·ow)
    /// columns, image `images.start + i` in the columns from `i · oh·ow`.
    fn im2col_into<T: Elem, U: Elem>(&self, x: &[T], xs: &Strided4, images: std::ops::Range<usize>, col: &mut Vec<U>) {
        let p = self.pixels();
        let ld = images.len() * p;
        let len = self.c * self.kh * self.kw * ld;
        // Every element is written below (zeros where a tap falls in the padding).
        if col.len() != len {
            *col = uninit::<U>(len);
        }
        let maps = self.tap_maps().filter(|_| xs.strides[3] == 1 && xs.strides[2] == self.w);
        let (taps, zero) = (self.kh * self.kw, U::from_f32(0.0));
        col.par_chunks_mut(ld).enumerate().for_each(|(r, row)| {
            let (ci, ky, kx) = (r / taps, r / self.kw % self.kh, r % self.kw);
            for (out, ni) in row.chunks_exact_mut(p).zip(images.clone()) {
                let Some(maps) = &maps else {
                    self.im2col_row(x, xs, ni, ci, ky, kx, out);
                    continue;
                };
                let (plane, map) = (&x[xs.offset + ni * xs.strides[0] + ci * xs.strides[1]..], &maps[r % taps]);
                // A bf16 image unrolled for the bf16 kernel is copied, not converted and back.
                match same_type::<T, U>(plane) {
                    Some(plane) => out.iter_mut().zip(map).for_each(|(o, m)| *o = m.map_or(zero, |i| plane[i])),
                    None => out
                        .iter_mut()
                        .zip(map)
                        .for_each(|(o, m)| *o = m.map_or(zero, |i| U::from_f32(plane[i].to_f32()))),
                }
            }
        });
    }
}

/// The widest output rows that are unrolled through [`Geometry::tap_maps`] (ResNet's layers 2–4
/// at 32×32 input: 4, 2 and 1 pixels).
const MAPPED_ROW: usize = 7;

/// [`Geometry::tap_maps`]: per tap, per output pixel, the input offset it reads, if any.
type TapMaps = Vec<Vec<Option<usize>>>;

/// Output pixels per image from which images are multiplied one at a time. Below it (ResNet's
/// late stages have 1–81 pixels) one multiply per image is too small for the gemm kernels;
/// above it, multiplying in place saves transposing the batch in and out of the unrolled
/// layout.
const PER_IMAGE_PIXELS: usize = 256;

/// The most floats an unrolled input may take (64 MiB); larger batches are multiplied in
/// chunks of images (at least one image per chunk). One multiply per image would be too small for the gemm kernels where
/// images are small (ResNet's last stages have 1–81 pixels).
const COL_BUDGET: usize = 16 << 20;

/// Convolves `x` (N, C, H, W) with `weight` (O, C / groups, kh, kw).
///
/// `weight` has `x`'s dtype, or is f32 with a bf16 or f16 `x`: the f32 master weights of
/// mixed-precision training. The CPU kernel then uses them as they are, with no copy in
/// `x`'s type: its bf16 products (AMX tiles, AVX-512 BF16) round them to bf16 as they pack
/// them, its f32 products take them whole, and their gradient comes back f32, summed in f32
/// and never rounded to bf16. Every other path converts them to `x`'s type first.
pub fn conv2d(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig, implementation: Implementation) -> Result<Tensor> {
    check_operands(x, weight, cfg)?;
    match implementation {
        Implementation::Fused if x.device().is_cpu() && crate::has_fused_kernel(x) => {
            x.apply_op2(&weight.contiguous()?, Conv { cfg, col_budget: COL_BUDGET })
        }
        Implementation::Fused if x.device().is_cuda() && crate::has_fused_kernel(x) => {
            conv2d_unrolled(x, &crate::cast(weight, x.dtype())?, cfg)
        }
        _ => conv2d_reference(x, &crate::cast(weight, x.dtype())?, cfg),
    }
}

/// The shapes of a convolution and the dtypes [`conv2d`] accepts.
fn check_operands(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig) -> Result<()> {
    Geometry::new(x.dims(), weight.dims(), cfg)?;
    let master_weights = weight.dtype() == DType::F32 && matches!(x.dtype(), DType::BF16 | DType::F16);
    if weight.dtype() != x.dtype() && !master_weights {
        bail!("conv2d: weight dtype {:?} differs from input dtype {:?} (and is not f32 master weights for a bf16 or f16 input)", weight.dtype(), x.dtype())
    }
    Ok(())
}

/// `max(conv2d(x, weight)·scale[c] + shift[c], 0)` per output channel `c` (without the
/// `max` unless `relu`): a convolution followed by eval-mode BatchNorm (see
/// [`crate::batch_norm_eval_affine`]) and its ReLU, as one op.
///
/// On the CPU the fused kernel applies the scale, shift and ReLU to each image's output right
/// after its multiply, while it is in cache, instead of in a pass of its own over the whole
/// output; everything else is [`conv2d`]'s (`weight` may be f32 master weights with a bf16 or
/// f16 input). Its backward, for eval-mode fine-tuning, recomputes the convolution's output
/// (it is not kept) for the gradient of `scale`. `scale` and `shift` (O) may have any float
/// type; the kernel applies them in f32. Elsewhere the two ops run one after the other.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_affine(
    x: &Tensor,
    weight: &Tensor,
    cfg: Conv2dConfig,
    scale: &Tensor,
    shift: &Tensor,
    relu: bool,
    implementation: Implementation,
) -> Result<Tensor> {
    let oc = weight.dims().first().copied().unwrap_or(0);
    for (name, t) in [("scale", scale), ("shift", shift)] {
        if t.dims() != [oc] {
            bail!("conv2d_affine: {name} must be ({oc}) for {oc} output channels, got {:?}", t.dims())
        }
    }
    match implementation {
        Implementation::Fused if x.device().is_cpu() && crate::has_fused_kernel(x) => {
            check_operands(x, weight, cfg)?;
            let affine = Tensor::stack(&[crate::cast(scale, DType::F32)?, crate::cast(shift, DType::F32)?], 0)?;
            x.apply_op3(&weight.contiguous()?, &affine, ConvAffine { conv: Conv { cfg, col_budget: COL_BUDGET }, relu })
        }
        _ => crate::batch_norm::channel_affine(
            &conv2d(x, weight, cfg, implementation)?,
            scale,
            shift,
            relu,
            implementation,
        ),
    }
}

/// The convolution as differentiable graph nodes around the device's batched matrix multiply
/// (cuBLAS on CUDA): unroll the whole batch ([`Im2Col`], whose gradient is col2im), multiply
/// each group's weights (G, O/G, C/G·kh·kw) with its rows of the unrolled input, and move the
/// batch axis back to the front. Autograd's matmul gradients are then the weight gradient
/// `dy · colᵀ` and `dcol = Wᵀ · dy`, so no step goes through Candle's `conv_transpose2d`.
/// CUDA's fused path; on the CPU (f32) it serves the test that checks the composition.
fn conv2d_unrolled(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), weight.dims(), cfg)?;
    let (kg, og, p) = (g.rows_per_group(), g.out_per_group(), g.pixels());
    let col = x.apply_op1(Im2Col(g))?.reshape((g.groups, kg, g.n * p))?;
    let y = weight.contiguous()?.reshape((g.groups, og, kg))?.matmul(&col)?;
    y.reshape((g.oc, g.n, p))?.transpose(0, 1)?.contiguous()?.reshape((g.n, g.oc, g.oh, g.ow))
}

/// x (N, C, H, W) → its unrolled input (C·kh·kw, N·OH·OW), rows (c, ky, kx), columns (n, oy, ox).
struct Im2Col(Geometry);

/// The unrolled gradient (C·kh·kw, N·OH·OW) → the input gradient (N, C, H, W).
struct Col2Im(Geometry);

impl Geometry {
    /// The CUDA kernels' description of this call.
    #[cfg(feature = "cuda")]
    fn kernel(&self, op: &str) -> Result<crate::cuda_ops::KernelGeometry> {
        let x = [self.n, self.c, self.h, self.w];
        crate::cuda_ops::KernelGeometry::new(op, x, [self.kh, self.kw], [self.oh, self.ow], self.stride, self.pad)
    }

    fn unrolled_shape(&self) -> Shape {
        Shape::from((self.c * self.kh * self.kw, self.n * self.pixels()))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "sae-im2col"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, xs) = (self.0, Strided4::new("conv2d", "input", xl)?);
        let col = dispatch_float!("conv2d", x, |x: T| {
            let mut col = Vec::<T>::new();
            g.im2col_into(x, &xs, 0..g.n, &mut col);
            T::to_cpu_storage_owned(col)
        });
        Ok((col, g.unrolled_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::im2col(x, xl, self.0.kernel("conv2d")?)?, self.0.unrolled_shape()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "sae-col2im"
    }

    fn cpu_fwd(&self, dcol: &CpuStorage, dl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, op) = (self.0, "conv2d backward");
        let shape = Shape::from((g.n, g.c, g.h, g.w));
        let dx = dispatch_float!(op, dcol, |dcol: T| {
            let dcol = as_f32(op, "unrolled gradient", dcol, dl)?;
            let (image_len, ld) = (g.c * g.h * g.w, g.n * g.pixels());
            let (mut dx, maps) = (vec![0f32; g.n * image_len], g.tap_maps());
            dx.par_chunks_mut(image_len)
                .enumerate()
                .for_each(|(n, d)| g.col2im(&dcol[n * g.pixels()..], ld, d, maps.as_ref()));
            T::to_cpu_storage_owned(dx.into_iter().map(T::from_f32).collect())
        });
        Ok((dx, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, d: &candle_core::CudaStorage, dl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        Ok((crate::cuda_ops::col2im(d, dl, g.kernel("conv2d backward")?)?, Shape::from((g.n, g.c, g.h, g.w))))
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

struct Conv {
    cfg: Conv2dConfig,
    /// [`COL_BUDGET`], smaller in tests of the chunking.
    col_budget: usize,
}

/// Backward op: (x, weight, output gradient) → dx, empty when the input needs no gradient (a
/// network's first convolution). The weight gradient, in the weight's dtype (f32 for master
/// weights, see [`conv2d`]), is left in `weight_gradient` for [`Conv::bwd`] to take: a custom
/// op returns one storage of one dtype.
struct ConvBackward {
    cfg: Conv2dConfig,
    col_budget: usize,
    input_gradient: bool,
    weight_gradient: GradientSlot,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "sae-conv2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.dims(), wl.dims(), self.cfg)?;
        self.cpu_forward("conv2d", &g, x, xl, w, wl, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let input_gradient = x.track_op();
        let op = ConvBackward {
            cfg: self.cfg,
            col_budget: self.col_budget,
            input_gradient,
            weight_gradient: GradientSlot::default(),
        };
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let dw = op.weight_gradient.take("conv2d backward")?;
        Ok((input_gradient.then_some(dx), Some(dw)))
    }
}

/// [`conv2d_affine`]'s op: (x, weight, [scale; shift] as an f32 (2, O)) → the scaled,
/// shifted (and clamped) convolution.
struct ConvAffine {
    conv: Conv,
    relu: bool,
}

/// A per-channel `v·scale + shift`, clamped at 0 when `relu`, applied to each output plane.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
    relu: bool,
}

impl Epilogue<'_> {
    fn apply(&self, channel: usize, plane: &mut [f32]) {
        let (scale, shift) = (self.scale[channel], self.shift[channel]);
        if self.relu {
            plane.iter_mut().for_each(|v| *v = (*v * scale + shift).max(0.0));
        } else {
            plane.iter_mut().for_each(|v| *v = *v * scale + shift);
        }
    }
}

impl CustomOp3 for ConvAffine {
    fn name(&self) -> &'static str {
        "sae-conv2d-affine"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        affine: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "conv2d_affine";
        let g = Geometry::new(xl.dims(), wl.dims(), self.conv.cfg)?;
        let affine = f32_contiguous(op, "scale and shift", affine, al)?;
        if affine.len() != 2 * g.oc {
            bail!("{op}: scale and shift have {} values for {} output channels", affine.len(), g.oc)
        }
        let (scale, shift) = affine.split_at(g.oc);
        self.conv.cpu_forward(op, &g, x, xl, w, wl, Some(Epilogue { scale, shift, relu: self.relu }))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        affine: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The convolution's own output, recomputed: dscale = Σ dv·conv.
        let conv = x.detach().apply_op2_no_bwd(&w.detach(), &self.conv)?;
        let dv = crate::batch_norm::gradient_before_relu(res, grad, self.relu)?.to_dtype(DType::F32)?;
        let dshift = dv.sum((0, 2, 3))?;
        let dscale = (&dv * conv.to_dtype(DType::F32)?)?.sum((0, 2, 3))?;
        let scale = affine.get(0)?.reshape((1, (), 1, 1))?;
        let dconv = dv.broadcast_mul(&scale)?.to_dtype(x.dtype())?;
        let (dx, dw) = self.conv.bwd(x, w, &conv, &dconv)?;
        Ok((dx, dw, Some(Tensor::stack(&[dscale, dshift], 0)?)))
    }
}

impl Conv {
    /// The CPU forward of [`Conv`] and [`ConvAffine`]: the input's layout, the weights in
    /// f32, [`Self::forward`] on the input's element type.
    #[allow(clippy::too_many_arguments)]
    fn cpu_forward(
        &self,
        op: &str,
        g: &Geometry,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        epilogue: Option<Epilogue>,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = Strided4::new(op, "input", xl)?;
        let out = dispatch_float!(op, x, |x: T| {
            let w = weight_as_f32::<T>(op, w, wl)?;
            T::to_cpu_storage_owned(self.forward(g, x, &xs, &w, epilogue))
        });
        Ok((out, Shape::from((g.n, g.oc, g.oh, g.ow))))
    }

    /// The forward pass in f32 arithmetic on any element type, with `epilogue` applied to each
    /// output plane before it is written (per image, while the image's output is in cache).
    /// The input is unrolled in its own type where the bf16 kernel multiplies (it packs bf16
    /// as it is) and in f32 where the `gemm` crate's f32 kernels do; sums and the output
    /// before its conversion are f32.
    fn forward<T: Elem>(&self, g: &Geometry, x: &[T], xs: &Strided4, w: &[f32], epilogue: Option<Epilogue>) -> Vec<T> {
        let products = Products::for_operands::<T>();
        let (p, kg, og) = (g.pixels(), g.rows_per_group(), g.out_per_group());
        // Every element is written by a multiply (without accumulation) or a copy below.
        let mut out = uninit::<T>(g.n * g.oc * p);
        if let (Some((direct, x)), Some(y)) = (g.direct(x, xs), T::as_f32_slice_mut(&mut out)) {
            direct.forward(x, &direct.pack_weights(w), y, |c, plane| {
                if let Some(e) = epilogue {
                    e.apply(c, plane)
                }
            });
            return out;
        }
        if let Some(winograd) = g.winograd3(products) {
            let u = winograd3::transform_weights(w, g.oc, g.c, false);
            winograd.forward(x, xs, &u, &mut out, |c, plane| {
                if let Some(e) = epilogue {
                    e.apply(c, plane)
                }
            });
            return out;
        }
        if let Some(winograd) = g.winograd(products) {
            let u = transform_weights(w, g.oc, g.c, false);
            winograd.forward(x, xs, &u, &mut out, |c, plane| {
                if let Some(e) = epilogue {
                    e.apply(c, plane)
                }
            });
            return out;
        }
        if g.per_image() {
            let pool = rayon::current_num_threads();
            // Scratch per task: the unrolled image in the input's type for the bf16 kernel and
            // in f32 for the f32 kernels (as in the batched path below), and the f32 output.
            type Scratch<T> = (Vec<T>, Vec<f32>, Vec<f32>);
            let image = |threads: usize, (col, col_f32, y): &mut Scratch<T>, n: usize, out: &mut [T]| {
                write_f32(out, y, |out| {
                    let wg = Mat { data: w, rs: kg, cs: 1 };
                    let packed_from_image = products == Products::Bf16
                        && g.unrolled_bf16(x, xs, n..n + 1)
                            .is_some_and(|images| matmul_threads_unrolled(threads, og, p, kg, wg, images, out, false));
                    if !packed_from_image {
                        if products == Products::F32 {
                            g.multiply_unrolled(products, threads, w, g.image_matrix(x, xs, n, col_f32), p, out);
                        } else {
                            g.multiply_unrolled(products, threads, w, g.image_matrix(x, xs, n, col), p, out);
                        }
                    }
                    if let Some(e) = epilogue {
                        // In parallel where the multiply was (a batch smaller than the pool).
                        if threads > 1 {
                            let planes = out.par_chunks_mut(p).with_min_len(min_planes_per_task(p));
                            planes.enumerate().for_each(|(c, plane)| e.apply(c, plane));
                        } else {
                            out.chunks_exact_mut(p).enumerate().for_each(|(c, plane)| e.apply(c, plane));
                        }
                    }
                })
            };
            if g.n >= pool {
                out.par_chunks_mut(g.oc * p)
                    .enumerate()
                    .for_each_init(Default::default, |scratch, (n, o)| image(1, scratch, n, o));
            } else {
                let mut scratch = Default::default();
                out.chunks_mut(g.oc * p).enumerate().for_each(|(n, o)| image(pool, &mut scratch, n, o));
            }
            return out;
        }
        let chunk = g.images_per_chunk(self.col_budget);
        // Unrolled in the input's type for the bf16 kernel, which packs it as it is; in f32 for
        // the f32 kernels, converted as it is copied, instead of widened again block by block
        // in `matmul` (a bf16 input on a CPU without bf16 multiplies).
        let (mut col, mut col_f32) = (Vec::<T>::new(), Vec::<f32>::new());
        for (c, out) in out.chunks_mut(chunk * g.oc * p).enumerate() {
            let images = c * chunk..(c * chunk + chunk).min(g.n);
            let np = images.len() * p;
            let mut y = uninit::<f32>(g.oc * np);
            let wg = Mat { data: w, rs: kg, cs: 1 };
            let threads = rayon::current_num_threads();
            let packed_from_images = products == Products::Bf16
                && g.unrolled_bf16(x, xs, images.clone())
                    .is_some_and(|unrolled| matmul_threads_unrolled(threads, og, np, kg, wg, unrolled, &mut y, false));
            if !packed_from_images {
                if products == Products::F32 {
                    g.im2col_into(x, xs, images, &mut col_f32);
                    g.multiply_unrolled(products, threads, w, Mat { data: &col_f32, rs: np, cs: 1 }, np, &mut y);
                } else {
                    g.im2col_into(x, xs, images, &mut col);
                    g.multiply_unrolled(products, threads, w, Mat { data: &col, rs: np, cs: 1 }, np, &mut y);
                }
            }
            // (O, images · P) → (images, O, P).
            out.par_chunks_mut(p).enumerate().for_each_init(Vec::new, |buf, (plane, o)| {
                let (i, oi) = (plane / g.oc, plane % g.oc);
                let y = &y[oi * np + i * p..][..p];
                match epilogue {
                    Some(e) => write_f32(o, buf, |o| {
                        o.copy_from_slice(y);
                        e.apply(oi, o)
                    }),
                    None => copy_converted(y, o),
                }
            });
        }
        out
    }
}

impl ConvBackward {
    /// The backward pass one image at a time: images are split into one contiguous range per
    /// thread, each range sums its own weight gradient, and the ranges' sums are added.
    #[allow(clippy::too_many_arguments)]
    fn backward_per_image<T: Elem>(
        &self,
        input_gradient: bool,
        g: &Geometry,
        x: &[T],
        xs: &Strided4,
        w: &[f32],
        gr: &[T],
        dx: &mut [T],
        dw: &mut [f32],
    ) {
        let (p, kg, og) = (g.pixels(), g.rows_per_group(), g.out_per_group());
        let products = Products::for_operands::<T>();
        let image_len = g.c * g.h * g.w;
        let pool = rayon::current_num_threads();
        // Each range multiplies on one thread when there are enough images for all threads.
        let (ranges, threads) = if g.n >= pool { (pool, 1) } else { (1, pool) };
        let per_range = g.n.div_ceil(ranges);
        let mut dx_ranges: Vec<Option<&mut [T]>> = if input_gradient {
            dx.chunks_mut(per_range * image_len).map(Some).collect()
        } else {
            (0..g.n.div_ceil(per_range)).map(|_| None).collect()
        };
        // dcol = Wᵀ · dy; for a pointwise convolution dcol is dx itself.
        let pointwise = g.is_pointwise();
        // Where packing dy is cheaper than packing the unrolled input, the weight gradient is
        // summed transposed: the `gemm` crate runs its tiles along the output's contiguous
        // dimension and packs the operand that runs along it by transposing it (both are
        // contiguous along the depth, the pixels), so for dWᵀ (C·kh·kw × O) it transposes dy
        // (O × pixels) rather than the unrolled input (C·kh·kw × pixels), 9 times less for a
        // 3×3 convolution. dWᵀ goes into dW once per range of images. Only for f32 products
        // of whole images: ResNet-50 140×140 f32 training on the Xeon, alternating `xtask
        // bench-train-row`, backward 0.500–0.514 → 0.487–0.490 s; in the batched path below
        // (small images, depth = the batch's pixels) the 32×32 backward took twice as long,
        // and the bf16 kernels pack their own way (bf16 140×140 backward 0.37 → 0.41 s).
        // Writing dWᵀ into dW is a strided pass over the whole weight gradient per range,
        // which only a range with many pixels repays: with a batch of one image, the late
        // layers' few pixels saved nothing and the passes took a third of a ResNet-50 32×32
        // f32 training step on the AMD EPYC (`bench-train-row resnet50 32 1 train fused f32`).
        let transposed = products == Products::F32 && og < kg && per_range * p * (kg - og) >= 4 * og * kg;
        // A stride-1 convolution's input gradient is itself a convolution: of dy, with the
        // weights swapped to (C, O) and turned by 180°, padding kh − 1 − pad. For bf16 the
        // kernel then packs dy straight from its planes and writes dx's: no dcol, no col2im
        // (col2im 5.3 → 2.5 % of a 140×140 SENetV2-ResNet-50 bf16 step on the AMD EPYC). Not
        // in the batched path below: from images a few pixels wide, packing dy's nine-fold
        // unrolling run by run cost more than col2im (32×32 backward 5–10 % slower).
        // Only where the bf16 kernel takes the product: the turned weights are a strided pass
        // over the weights, which the small images of batch-one training do not repay (on the
        // AMD EPYC 5 % of a ResNet-50 32×32 bf16 step with one image, for products that then
        // went the unrolled way).
        let gradient_conv = (input_gradient
            && products == Products::Bf16
            && !pointwise
            && bf16_kernel_takes(threads, g.c, g.h * g.w, og * g.kh * g.kw))
        .then(|| g.input_gradient_convolution(gr))
        .flatten();
        let turned = gradient_conv.map(|_| g.turned_weights(w)).unwrap_or_default();
        let maps = g.tap_maps();
        let image_range = |r: usize, mut dx: Option<&mut [T]>, dw: &mut [f32]| {
            let (mut scratch, mut dy_buf, mut dx_buf) = (Vec::new(), Vec::new(), Vec::new());
            let mut dcol = if dx.is_some() && !pointwise { uninit::<f32>(g.groups * kg * p) } else { Vec::new() };
            let mut dwt = if transposed { uninit::<f32>(dw.len()) } else { Vec::new() };
            for (i, n) in (r * per_range..((r + 1) * per_range).min(g.n)).enumerate() {
                let dy = read_f32(&gr[n * g.oc * p..(n + 1) * g.oc * p], &mut dy_buf);
                // dW [+]= dy · colᵀ, colᵀ packed straight from a bf16 image where the bf16
                // kernel takes the product, else from the image unrolled in f32.
                let packed_from_image = products == Products::Bf16
                    && g.unrolled_bf16(x, xs, n..n + 1).is_some_and(|image| {
                        let dy = Mat { data: dy, rs: p, cs: 1 };
                        matmul_threads_unrolled(threads, og, kg, p, dy, UnrolledT::new(image), dw, i > 0)
                    });
                if !packed_from_image {
                    let col = g.image_matrix::<T, f32>(x, xs, n, &mut scratch);
                    let target = if transposed { &mut dwt[..] } else { &mut dw[..] };
                    g.weight_gradient(products, transposed, threads, dy, p, col, target, i > 0);
                }
                let Some(dx) = dx.as_deref_mut() else { continue };
                write_f32(&mut dx[i * image_len..(i + 1) * image_len], &mut dx_buf, |dx| {
                    if let Some(dy_conv) = gradient_conv {
                        let wt = Mat { data: &turned, rs: og * g.kh * g.kw, cs: 1 };
                        let dy = dy_conv.columns_from(n * g.h * g.w);
                        if matmul_threads_unrolled(threads, g.c, g.h * g.w, og * g.kh * g.kw, wt, dy, dx, false) {
                            return;
                        }
                    }
                    let target: &mut [f32] = if pointwise { dx } else { &mut dcol };
                    for gi in 0..g.groups {
                        let wt = Mat { data: &w[gi * og * kg..], rs: 1, cs: kg };
                        let dyg = Mat { data: &dy[gi * og * p..], rs: p, cs: 1 };
                        let target = &mut target[gi * kg * p..(gi + 1) * kg * p];
                        matmul_threads(products, threads, kg, p, og, wt, dyg, target, false);
                    }
                    if !pointwise {
                        dx.fill(0.0);
                        g.col2im(&dcol, p, dx, maps.as_ref());
                    }
                });
            }
            if transposed {
                g.untranspose_weight_gradient(&dwt, dw);
            }
        };
        if ranges == 1 {
            image_range(0, dx_ranges.pop().flatten(), dw);
            return;
        }
        let partial: Vec<Vec<f32>> = dx_ranges
            .into_par_iter()
            .enumerate()
            .map(|(r, dx)| {
                let mut dw = uninit::<f32>(dw.len());
                image_range(r, dx, &mut dw);
                dw
            })
            .collect();
        dw.copy_from_slice(&partial[0]);
        for part in &partial[1..] {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
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
        let (dx, dw) = dispatch_float!(op, x, |x: T| {
            let w32 = weight_as_f32::<T>(op, w, wl)?;
            let gr = contiguous(op, "output gradient", same_dtype::<T>(op, gr)?, gl)?;
            let (dx, dw) = self.backward(&g, x, &xs, &w32, gr);
            let dw = match w {
                CpuStorage::F32(_) => Tensor::from_vec(dw, wl.dims(), &Device::Cpu)?,
                _ => Tensor::from_vec(convert::<f32, T>(&dw), wl.dims(), &Device::Cpu)?,
            };
            (T::to_cpu_storage_owned(dx), dw)
        });
        self.weight_gradient.put(op, dw)?;
        let shape = if self.input_gradient { Shape::from((g.n, g.c, g.h, g.w)) } else { Shape::from(0) };
        Ok((dx, shape))
    }
}

impl ConvBackward {
    /// (dx, dW) in f32 arithmetic on any element type; dW is summed in f32 and left in f32.
    fn backward<T: Elem>(&self, g: &Geometry, x: &[T], xs: &Strided4, w: &[f32], gr: &[T]) -> (Vec<T>, Vec<f32>) {
        let products = Products::for_operands::<T>();
        let (p, kg) = (g.pixels(), g.rows_per_group());
        let image_len = if self.input_gradient { g.c * g.h * g.w } else { 0 };
        // Every element is written below: dW by its first multiply or a copy, dx by a
        // multiply or zero-filled before col2im adds into it, or by Winograd's or the direct
        // convolution.
        let (mut dx, mut dw) = (uninit::<T>(g.n * image_len), uninit::<f32>(g.oc * kg));
        let (winograd, winograd3) = (g.winograd(products), g.winograd3(products));
        // dx and dW each by the direct kernel where it takes the shape (f32), else by
        // Winograd's where it takes it (F(3×3) where it takes it, else F(2×2)), else both
        // unrolled together.
        let direct_dx = g.direct_input_gradient(gr).filter(|_| self.input_gradient);
        let direct_dw = g.direct(x, xs).zip(T::as_f32_slice(gr));
        if (self.input_gradient && direct_dx.is_none() || direct_dw.is_none()) && winograd.is_none() {
            self.backward_unrolled(self.input_gradient, g, x, xs, w, gr, &mut dx, &mut dw);
            return (dx, dw);
        }
        let dys = Strided4 { dims: [g.n, g.oc, g.oh, g.ow], strides: [g.oc * p, p, g.ow, 1], offset: 0 };
        match (direct_dx, T::as_f32_slice_mut(&mut dx), winograd3, winograd) {
            (Some((direct, dy)), Some(dx), _, _) => {
                direct.forward(dy, &direct.pack_weights(&g.turned_weights(w)), dx, |_, _| ())
            }
            (_, _, Some(winograd), _) if self.input_gradient => {
                let u = winograd3::transform_weights(w, g.oc, g.c, true);
                winograd.input_gradient().forward(gr, &dys, &u, &mut dx, |_, _| ());
            }
            (_, _, None, Some(winograd)) if self.input_gradient => {
                let u = transform_weights(w, g.oc, g.c, true);
                winograd.input_gradient().forward(gr, &dys, &u, &mut dx, |_, _| ());
            }
            _ => {}
        }
        match (direct_dw, winograd3, winograd) {
            (Some(((direct, x), dy)), _, _) => direct.weight_gradient(x, dy, &mut dw),
            (None, Some(winograd), _) => winograd.weight_gradient(x, xs, gr, &mut dw),
            (None, None, Some(winograd)) if winograd.weight_gradient_pays() => {
                winograd.weight_gradient(x, xs, gr, &mut dw)
            }
            _ => self.backward_unrolled(false, g, x, xs, w, gr, &mut [], &mut dw),
        }
        (dx, dw)
    }

    /// The backward pass as unrolled products (see the module doc): dW, and dx where
    /// `input_gradient` (`dx` holds N images then, and is empty otherwise).
    #[allow(clippy::too_many_arguments)]
    fn backward_unrolled<T: Elem>(
        &self,
        input_gradient: bool,
        g: &Geometry,
        x: &[T],
        xs: &Strided4,
        w: &[f32],
        gr: &[T],
        dx: &mut [T],
        dw: &mut [f32],
    ) {
        if g.per_image() {
            return self.backward_per_image(input_gradient, g, x, xs, w, gr, dx, dw);
        }
        let products = Products::for_operands::<T>();
        let (p, kg, og) = (g.pixels(), g.rows_per_group(), g.out_per_group());
        let image_len = g.c * g.h * g.w;
        let chunk = g.images_per_chunk(self.col_budget);
        let (mut col, maps) = (Vec::<f32>::new(), g.tap_maps());
        for c in 0..g.n.div_ceil(chunk) {
            let images = c * chunk..(c * chunk + chunk).min(g.n);
            let np = images.len() * p;
            // The output gradient as (O, images · P), like the forward's product.
            let mut dy = uninit::<f32>(g.oc * np);
            dy.par_chunks_mut(np).enumerate().for_each(|(oi, row)| {
                for (r, ni) in row.chunks_exact_mut(p).zip(images.clone()) {
                    copy_converted(&gr[(ni * g.oc + oi) * p..][..p], r);
                }
            });
            let threads = rayon::current_num_threads();
            // dW [+]= dy · colᵀ, colᵀ packed straight from bf16 images where the bf16 kernel
            // takes the product, else from the images unrolled in f32.
            let packed_from_images = products == Products::Bf16
                && g.unrolled_bf16(x, xs, images.clone()).is_some_and(|unrolled| {
                    let dy = Mat { data: &dy, rs: np, cs: 1 };
                    matmul_threads_unrolled(threads, og, kg, np, dy, UnrolledT::new(unrolled), dw, c > 0)
                });
            if !packed_from_images {
                g.im2col_into(x, xs, images.clone(), &mut col);
                let col = Mat { data: &col, rs: np, cs: 1 };
                g.weight_gradient(products, false, threads, &dy, np, col, dw, c > 0);
            }
            if !input_gradient {
                continue;
            }
            // `col` is no longer needed (or was never filled): it becomes dcol = Wᵀ · dy.
            if col.len() != g.groups * kg * np {
                col = uninit::<f32>(g.groups * kg * np);
            }
            for gi in 0..g.groups {
                let wt = Mat { data: &w[gi * og * kg..], rs: 1, cs: kg };
                let dyg = Mat { data: &dy[gi * og * np..], rs: np, cs: 1 };
                matmul(products, kg, np, og, wt, dyg, &mut col[gi * kg * np..(gi + 1) * kg * np], false);
            }
            let dx = &mut dx[images.start * image_len..images.end * image_len];
            dx.par_chunks_mut(image_len).enumerate().for_each_init(Vec::new, |buf, (i, d)| {
                write_f32(d, buf, |d| {
                    d.fill(0.0);
                    g.col2im(&col[i * p..], np, d, maps.as_ref())
                })
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// CUDA's composition (unroll, batched multiply, col2im as the unroll's gradient) computes
    /// the reference's output and gradients: on the CPU, with odd sizes, stride, padding,
    /// groups and batch 1.
    #[test]
    fn unrolled_composition_matches_the_reference() {
        let cases = [
            ((2, 6, 9, 7), (4, 3, 3, 3), 2, 1, 2),
            ((1, 3, 5, 5), (5, 3, 1, 1), 1, 0, 1),
            ((3, 4, 8, 6), (4, 1, 3, 2), 3, 2, 4),
        ];
        for (xd, wd, stride, padding, groups) in cases {
            let cfg = Conv2dConfig { stride, padding, groups };
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, xd, &Device::Cpu).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, wd, &Device::Cpu).unwrap()).unwrap();
            let out_dims = conv2d_reference(&x, &w, cfg).unwrap().dims().to_vec();
            let probe = Tensor::randn(0f32, 1.0, out_dims, &Device::Cpu).unwrap();
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
                let y = f(x.as_tensor(), w.as_tensor()).unwrap();
                let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                [y, grads.get(&x).unwrap().clone(), grads.get(&w).unwrap().clone()]
            };
            let unrolled = run(&|x, w| conv2d_unrolled(x, w, cfg));
            let reference = run(&|x, w| conv2d_reference(x, w, cfg));
            for (what, (a, b)) in
                ["output", "input gradient", "weight gradient"].iter().zip(unrolled.iter().zip(&reference))
            {
                assert_eq!(a.dims(), b.dims(), "{what} {xd:?}");
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "{what} {xd:?} {wd:?}: differs by {diff}");
            }
        }
    }

    /// Batches larger than the unrolling budget are multiplied in chunks of images, and the
    /// weight gradient sums over the chunks: the same results as one chunk.
    #[test]
    fn chunked_batches_match_one_chunk() {
        let cfg = Conv2dConfig { stride: 2, padding: 1, groups: 2 };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 4, 7, 6), &Device::Cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 2, 3, 3), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (5, 6, 4, 3), &Device::Cpu).unwrap();
        let run = |col_budget| {
            let y = x.apply_op2(&w, Conv { cfg, col_budget }).unwrap();
            let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            [y, grads.get(&x).unwrap().clone(), grads.get(&w).unwrap().clone()]
        };
        // 4·9·12 = 432 floats per image: budgets of 1 and 2 images, and all 5 at once.
        let whole = run(COL_BUDGET);
        for budget in [432, 900] {
            for (a, b) in run(budget).iter().zip(&whole) {
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-5, "budget {budget}: differs by {diff}");
            }
        }
    }
}

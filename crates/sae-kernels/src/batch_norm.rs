//! BatchNorm in training mode (batch statistics), forward and backward.
//!
//! Candle composes it from about a dozen element-wise and reduction ops, each a full pass over
//! the activation with its own allocation, and differentiates each of them. Here the forward is
//! two passes (per-channel mean and variance, then normalise + scale + shift) and the backward
//! two more (per-channel Σ dy and Σ dy·x̂, then the input gradient):
//!
//! ```text
//! x̂ = (x − μ) / √(σ² + ε)        y = γ·x̂ + β
//! dβ = Σ dy     dγ = Σ dy·x̂     dx = γ / √(σ² + ε) · (dy − dβ/M − x̂·dγ/M)
//! ```
//!
//! with sums and M = N·H·W over each channel, σ² the biased batch variance. The batch mean
//! and variance are returned for the caller's running statistics. In eval mode
//! ([`batch_norm_eval`]) it is one per-channel scale and shift, in one pass each way. Both can
//! apply a ReLU in the same pass (`relu`); the backward then masks the gradient (on the CPU
//! recomputing the mask from the input, in its own passes; on CUDA by the output), so
//! BatchNorm + ReLU is one graph node instead of two (Candle's backward adds a `zeros_like`
//! and an `add` for every node's gradient). The fused kernels take f32/f16/bf16 on the CPU
//! (f32 arithmetic, statistics in f32) and on CUDA (`src/cuda/ops.cu`, the same passes with
//! f64 sums); elsewhere [`batch_norm_train`] runs the reference. On CUDA the per-channel statistics go to the host
//! and back between the two forward passes (a synchronisation per BatchNorm), because the ops
//! carry them as plain vectors.

use crate::cpu::{
    as_f32, contiguous, copy_converted, dispatch_float, min_planes_per_task, plane_f32, same_dtype, uninit, unpack,
    vectorized, write_f32, Elem, GradientSlot,
};
use crate::layout::Strided4;
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

pub(crate) mod short;

/// Output of [`batch_norm_train`].
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// The normalised, scaled and shifted input, (N, C, H, W).
    pub output: Tensor,
    /// Per-channel batch mean, (C), f32 whatever the input's type, not differentiable.
    pub mean: Tensor,
    /// Per-channel biased batch variance, (C), f32, not differentiable.
    pub variance: Tensor,
}

pub(crate) fn check(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<usize> {
    let &[_, c, _, _] = x.dims() else { bail!("batch_norm: input must be (N, C, H, W), got {:?}", x.dims()) };
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [c] {
            bail!("batch_norm: {name} must be ({c}) for {c} channels, got {:?}", t.dims())
        }
        if t.dtype() != x.dtype() {
            bail!("batch_norm: {name} dtype {:?} differs from input dtype {:?}", t.dtype(), x.dtype())
        }
    }
    if x.elem_count() == 0 {
        bail!("batch_norm: empty input {:?}", x.dims())
    }
    Ok(c)
}

/// BatchNorm of `x` (N, C, H, W) with batch statistics, `weight` γ and `bias` β (C each),
/// followed by a ReLU when `relu` is set (fused: the ReLU costs no extra pass or graph node).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    implementation: Implementation,
) -> Result<BatchNormOutput> {
    check(x, weight, bias)?;
    check_eps(eps)?;
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x) => {
            let (mean, variance, stats) = batch_stats(x, eps)?;
            let op = BatchNormTrain { stats, relu };
            let output = x.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
            Ok(BatchNormOutput { output, mean, variance })
        }
        _ => {
            let out = batch_norm_train_reference(x, weight, bias, eps)?;
            Ok(BatchNormOutput { output: relu_if(out.output, relu)?, ..out })
        }
    }
}

/// `max(BN(x) + shortcut, 0)` with batch statistics: the end of a residual block, whose
/// shortcut `shortcut` has `x`'s shape and dtype. The fused CPU kernel adds the shortcut and
/// clamps as it normalises, so BatchNorm's output is neither written out and read back by
/// [`crate::add_relu`] nor kept alive for the backward pass, whose ReLU mask (by the output)
/// gives the shortcut's gradient and BatchNorm's. Elsewhere, and with the reference kernels,
/// [`batch_norm_train`] then [`crate::add_relu`].
pub fn batch_norm_train_add_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    shortcut: &Tensor,
    implementation: Implementation,
) -> Result<BatchNormOutput> {
    check(x, weight, bias)?;
    check_eps(eps)?;
    crate::relu::check_shortcut("batch_norm", x, shortcut)?;
    if implementation == Implementation::Fused && crate::has_fused_kernel(x) && x.device().is_cpu() {
        let (mean, variance, stats) = batch_stats(x, eps)?;
        // γ and β as one operand: with the shortcut the op has three.
        let params = Tensor::cat(&[weight, bias], 0)?;
        let output = x.apply_op3(&params, &shortcut.contiguous()?, BatchNormTrainAddRelu { stats })?;
        return Ok(BatchNormOutput { output, mean, variance });
    }
    let out = batch_norm_train(x, weight, bias, eps, false, implementation)?;
    Ok(BatchNormOutput { output: crate::add_relu(&out.output, shortcut, implementation)?, ..out })
}

pub(crate) fn check_eps(eps: f64) -> Result<()> {
    if eps.is_nan() || eps <= 0.0 {
        bail!("batch_norm: eps must be positive, got {eps}")
    }
    Ok(())
}

/// The batch's per-channel mean and biased variance (f32 tensors of any input type) and the
/// same as the ops carry them; the values go through the host in one copy (a synchronisation
/// on CUDA).
fn batch_stats(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor, BatchStats)> {
    let stats = x.detach().apply_op1_no_bwd(&ChannelStats)?;
    let (mean, variance) = (stats.get(0)?, stats.get(1)?);
    let [mean_v, var_v]: [Vec<f32>; 2] = stats
        .to_vec2::<f32>()?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("batch_norm: statistics are not (2, C)".into()))?;
    let inv_std = var_v.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
    Ok((mean, variance, BatchStats { mean: mean_v, inv_std }))
}

/// `max(t, 0)` with Candle's op when `relu` is set: the references' ReLU.
fn relu_if(t: Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        t.relu()
    } else {
        Ok(t)
    }
}

/// The gradient reaching the input of an op's fused ReLU, from the op's output:
/// `grad · (output > 0)` when `relu` is set, else `grad` itself (contiguous).
pub(crate) fn gradient_before_relu(output: &Tensor, grad: &Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        crate::relu::relu_gradient(output, grad)
    } else {
        grad.contiguous()
    }
}

/// The same composed from Candle ops (differentiated by Candle's autograd): the reference.
pub fn batch_norm_train_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<BatchNormOutput> {
    let c = check(x, weight, bias)?;
    // Channels first, flattened: (C, N·H·W).
    let flat = x.transpose(0, 1)?.flatten_from(1)?;
    let mean = flat.mean_keepdim(D::Minus1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normalised = centred.broadcast_div(&(&variance + eps)?.sqrt()?)?;
    let y = normalised.broadcast_mul(&weight.reshape((c, 1))?)?.broadcast_add(&bias.reshape((c, 1))?)?;
    let (n, _, h, w) = x.dims4()?;
    let output = y.reshape((c, n, h, w))?.transpose(0, 1)?;
    let stat = |t: Tensor| t.flatten_all()?.detach().to_dtype(DType::F32);
    Ok(BatchNormOutput { output, mean: stat(mean)?, variance: stat(variance)? })
}

/// BatchNorm of `x` (N, C, H, W) with given statistics (eval mode): `y = (x − mean)·γ/√(var + ε) + β`,
/// followed by a ReLU when `relu` is set.
/// The per-channel scale and shift are computed with Candle ops (so gradients reach γ and β);
/// the fused kernel applies them in one pass.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
    implementation: Implementation,
) -> Result<Tensor> {
    let c = check(x, weight, bias)?;
    for (name, t) in [("running mean", running_mean), ("running variance", running_var)] {
        if t.dims() != [c] {
            bail!("batch_norm: {name} must be ({c}) for {c} channels, got {:?}", t.dims())
        }
    }
    let (scale, shift) = batch_norm_eval_affine(weight, bias, running_mean, running_var, eps)?;
    channel_affine(x, &scale, &shift, relu, implementation)
}

/// Eval-mode BatchNorm as a per-channel `(scale, shift)`, both f32 (C):
/// `scale = γ/√(var + ε)`, `shift = β − mean·scale`, computed with Candle ops (so gradients
/// reach γ and β) in f32 whatever the parameters' type (bf16 would round every intermediate).
pub fn batch_norm_eval_affine(
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let f32 = |t: &Tensor| crate::cast(t, DType::F32);
    let scale = (f32(weight)? / (f32(running_var)? + eps)?.sqrt()?)?;
    let shift = (f32(bias)? - (f32(running_mean)? * &scale)?)?;
    Ok((scale, shift))
}

/// `x·scale[c] + shift[c]` per channel of `x` (N, C, H, W), then a ReLU when `relu` is set;
/// `scale` and `shift` (C) of any float type are rounded once to `x`'s.
pub fn channel_affine(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    relu: bool,
    implementation: Implementation,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let (scale, shift) = (crate::cast(scale, x.dtype())?, crate::cast(shift, x.dtype())?);
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x) => {
            x.apply_op3(&scale.contiguous()?, &shift.contiguous()?, ChannelAffine { relu })
        }
        _ => {
            relu_if(x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?.broadcast_add(&shift.reshape((1, c, 1, 1))?)?, relu)
        }
    }
}

/// `y = x·scale[c] + shift[c]` per channel, then `max(y, 0)` when `relu` is set.
struct ChannelAffine {
    relu: bool,
}

/// (x, scale, dy) → [dx | dscale | dshift] packed in one 1-D tensor.
struct ChannelAffineBackward {
    /// The forward's per-channel (scale, shift) when it ended in a ReLU and `dy` is the
    /// gradient of that ReLU's output (CPU only; see [`channel_gradients`]).
    relu: Option<ReluAffine>,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "sae-channel-affine"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        scale: &CpuStorage,
        sl: &Layout,
        shift: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (op, xs) = ("batch_norm", Strided4::new("batch_norm", "input", xl)?);
        let out = dispatch_float!(op, x, |x: T| {
            let scale = as_f32(op, "scale", same_dtype::<T>(op, scale)?, sl)?;
            let shift = as_f32(op, "shift", same_dtype::<T>(op, shift)?, tl)?;
            T::to_cpu_storage_owned(affine(x, &xs, self.relu, None, |c| (scale[c], shift[c])))
        });
        Ok((out, Shape::from(xs.dims.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::channel_affine(x, xl, a, al, b, bl, None, self.relu)?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (relu, grad) = backward_relu(self.relu, x, res, grad, || {
            Ok(f32_values(scale)?.into_iter().zip(f32_values(shift)?).collect())
        })?;
        let op = ChannelAffineBackward { relu };
        let packed = x.apply_op3_no_bwd(scale, &grad, &op)?;
        let [dx, dscale, dshift] = unpack(&packed, [x.dims(), scale.dims(), scale.dims()])?;
        Ok((Some(dx), Some(dscale), Some(dshift)))
    }
}

impl CustomOp3 for ChannelAffineBackward {
    fn name(&self) -> &'static str {
        "sae-channel-affine-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        scale: &CpuStorage,
        sl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = backward_layout(xl, gl)?;
        dispatch_float!("batch_norm backward", x, |x: T| {
            let (scale, g) = backward_operands::<T>(scale, sl, g, gl)?;
            // d scale = Σ dy·x, d shift = Σ dy, dx = dy·scale.
            Ok(channel_gradients(
                x,
                &xs,
                g,
                self.relu.as_deref().map_or(ReluMask::None, ReluMask::Recomputed),
                None,
                |_| 0.0,
                |ci, sums| ChannelGradients { dparam: sums.dy_x, dshift: sums.dy, dx: [scale[ci], 0.0, 0.0] },
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let len = xl.shape().elem_count() + 2 * al.shape().elem_count();
        Ok((crate::cuda_ops::channel_affine_backward(x, xl, a, al, g, gl, None)?, Shape::from(len)))
    }
}

/// `x·scale + shift` with per-channel `(scale, shift) = coef(c)`, as a contiguous (N, C, H, W),
/// plus `residual` (contiguous, `x`'s shape) where one is given, clamped at 0 when `relu` is
/// set.
fn affine<T: Elem>(
    x: &[T],
    xs: &Strided4,
    relu: bool,
    residual: Option<&[T]>,
    coef: impl Fn(usize) -> (f32, f32) + Sync,
) -> Vec<T> {
    if let Some(s) = short::ShortPlanes::new(xs) {
        return short::affine(x, &s, relu, residual, coef);
    }
    let [n, c, h, w] = xs.dims;
    let mut out = uninit::<T>(n * c * h * w);
    let planes = out.par_chunks_mut(h * w).with_min_len(min_planes_per_task(h * w)).enumerate();
    planes.for_each_init(Vec::new, |buf, (plane, y)| {
        let (ni, ci) = (plane / c, plane % c);
        let (scale, shift) = coef(ci);
        write_f32(y, buf, |y| {
            match xs.contiguous_plane(x, ni, ci) {
                Some(p) => y.iter_mut().zip(p).for_each(|(y, v)| *y = v.to_f32() * scale + shift),
                None => xs.for_each_in_plane(x, ni, ci, |k, v| y[k] = v.to_f32() * scale + shift),
            }
            if let Some(r) = residual {
                let r = &r[plane * y.len()..(plane + 1) * y.len()];
                y.iter_mut().zip(r).for_each(|(y, r)| *y += r.to_f32());
            }
            if relu {
                y.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        })
    });
    out
}

/// (N, C, H, W) → (2, C): per-channel mean and biased variance (two passes, for accuracy).
struct ChannelStats;

/// y = (x − mean)·inv_std·γ + β with the batch statistics computed beforehand.
struct BatchNormTrain {
    stats: BatchStats,
    relu: bool,
}

/// (x, [γ | β], shortcut) → `max(BN(x) + shortcut, 0)` on the CPU ([`batch_norm_train_add_relu`]).
struct BatchNormTrainAddRelu {
    stats: BatchStats,
}

/// The per-channel `(scale, shift)` of a forward that ended in a ReLU, from which a CPU
/// backward recomputes the ReLU's mask.
type ReluAffine = Vec<(f32, f32)>;

/// What the backward op of a per-channel affine that may end in a fused ReLU (`relu`) starts
/// from: on the CPU, the output gradient as it is with the forward's per-channel
/// `(scale, shift)` from `affine`, for the op to mask it itself from the input
/// ([`channel_gradients`]); elsewhere no affine and the gradient masked by the output first
/// ([`gradient_before_relu`]).
fn backward_relu(
    relu: bool,
    x: &Tensor,
    output: &Tensor,
    grad: &Tensor,
    affine: impl FnOnce() -> Result<ReluAffine>,
) -> Result<(Option<ReluAffine>, Tensor)> {
    if relu && x.device().is_cpu() {
        Ok((Some(affine()?), grad.contiguous()?))
    } else {
        Ok((None, gradient_before_relu(output, grad, relu)?))
    }
}

/// A per-channel parameter's values as f32 (exact from bf16/f16), on the host.
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// A batch's per-channel statistics, as the training-mode ops carry them.
#[derive(Clone)]
pub(crate) struct BatchStats {
    pub(crate) mean: Vec<f32>,
    pub(crate) inv_std: Vec<f32>,
}

impl BatchStats {
    /// BatchNorm's per-channel gradients for [`channel_gradients`], with γ `w`: dβ = Σ dy and
    /// dγ = Σ dy·x̂ = inv_std · Σ dy·(x − mean); then dx = γ·inv_std·(dy − dβ/M − x̂·dγ/M), as
    /// dy·a + x·k + b per channel.
    fn gradients<'a>(
        &'a self,
        w: &'a [f32],
        xs: &Strided4,
    ) -> impl Fn(usize, GradientSums) -> ChannelGradients + Sync + 'a {
        let count = (xs.dims[0] * xs.plane_len()) as f32;
        move |ci, sums| {
            let (mean, inv_std) = (self.mean[ci], self.inv_std[ci]);
            let dw = sums.dy_x * inv_std;
            let a = w[ci] * inv_std;
            let k = -a * inv_std * dw / count;
            ChannelGradients { dparam: dw, dshift: sums.dy, dx: [a, k, -a * sums.dy / count - k * mean] }
        }
    }

    /// Channel `c`'s `(scale, shift)` of `y = x·scale + shift`: `scale = γ·inv_std`,
    /// `shift = β − mean·scale`. The forward and the backward's ReLU mask both compute it
    /// here, so that the mask sees the very values the forward clamped.
    pub(crate) fn affine(&self, c: usize, gamma: &[f32], beta: &[f32]) -> (f32, f32) {
        let scale = self.inv_std[c] * gamma[c];
        (scale, beta[c] - self.mean[c] * scale)
    }
}

/// (x, the forward's output, its gradient) → [dx | dγ | dβ] of a block end
/// ([`batch_norm_train_add_relu`], CPU): the ReLU's mask taken from the output as BatchNorm's
/// backward reads the gradient, and the masked gradient — the shortcut's — written beside,
/// left in `shortcut_gradient`. A ReLU backward of its own was one more pass over the
/// block's output and gradient into a new buffer that BatchNorm's backward read back: in the
/// ResNet-50 140×140 f32 training step (per-op timers of a throwaway build, three alternating
/// pairs on the 2-core Xeon) the block ends' BatchNorm backward and ReLU masks took 83–88 ms
/// per step, this op and the other BatchNorm backward ops 67–69.
struct BatchNormAddReluBackward {
    stats: BatchStats,
    /// γ as f32.
    gamma: Vec<f32>,
    shortcut_gradient: GradientSlot,
}

/// (x, γ, dy) → [dx | dγ | dβ] packed in one 1-D tensor.
struct BatchNormBackward {
    stats: BatchStats,
    /// The forward's per-channel (scale, shift) when it ended in a ReLU and `dy` is the
    /// gradient of that ReLU's output (CPU only; see [`channel_gradients`]).
    relu: Option<ReluAffine>,
}

/// Channel `c`'s planes as f32, image by image: in place where they are contiguous f32, else
/// all converted (or gathered) once into `buf`, so that passes over them convert nothing.
/// BatchNorm's statistics read a channel twice; converting each bf16 plane twice made them
/// take 5.4 ms per ResNet-50 32×32 training step against f32's 3.3 on the Xeon.
#[inline(always)]
fn channel_planes<'a, T: Elem>(x: &'a [T], xs: &Strided4, c: usize, buf: &'a mut Vec<f32>) -> Vec<&'a [f32]> {
    let (n, plane_len) = (xs.dims[0], xs.plane_len());
    let in_place: Option<Vec<&[f32]>> =
        (0..n).map(|ni| xs.contiguous_plane(x, ni, c).and_then(T::as_f32_slice)).collect();
    if let Some(planes) = in_place {
        return planes;
    }
    if plane_len == 0 {
        return vec![&[]; n];
    }
    buf.resize(n * plane_len, 0.0);
    for (ni, plane) in buf.chunks_exact_mut(plane_len).enumerate() {
        match xs.contiguous_plane(x, ni, c) {
            Some(p) => copy_converted(p, plane),
            None => xs.for_each_in_plane(x, ni, c, |k, v| plane[k] = v.to_f32()),
        }
    }
    buf.chunks_exact(plane_len).collect()
}

/// A block end's backward operands beside its input (laid out as `xs`): the block's output
/// `y` and its gradient `g`, each checked to have the input's shape and type `T`, contiguous.
/// The block ends' backward ops ([`BatchNormAddReluBackward`] and the SE/SaE one in
/// `excitation::batch_norm_end`) mask `g` by `y`.
pub(crate) fn block_end_operands<'a, T: Elem>(
    op: &str,
    xs: &Strided4,
    y: &'a CpuStorage,
    yl: &Layout,
    g: &'a CpuStorage,
    gl: &Layout,
) -> Result<(&'a [T], &'a [T])> {
    for (what, layout) in [("output", yl), ("output gradient", gl)] {
        if layout.dims() != xs.dims {
            bail!("{op}: {what} shape {:?}, expected {:?}", layout.dims(), xs.dims)
        }
    }
    let y = contiguous(op, "output", same_dtype::<T>(op, y)?, yl)?;
    Ok((y, contiguous(op, "output gradient", same_dtype::<T>(op, g)?, gl)?))
}

/// The input layout of both backward ops, checked against the output gradient's shape.
fn backward_layout(xl: &Layout, gl: &Layout) -> Result<Strided4> {
    let xs = Strided4::new("batch_norm backward", "input", xl)?;
    if gl.dims() != xs.dims {
        bail!("batch_norm backward: gradient shape {:?}, expected {:?}", gl.dims(), xs.dims)
    }
    Ok(xs)
}

/// The other operands of both backward ops, of the input's type `T`: the per-channel
/// parameter (scale or γ) as f32 and the contiguous output gradient.
fn backward_operands<'a, T: Elem>(
    param: &'a CpuStorage,
    pl: &Layout,
    g: &'a CpuStorage,
    gl: &Layout,
) -> Result<(std::borrow::Cow<'a, [f32]>, &'a [T])> {
    let op = "batch_norm backward";
    Ok((
        as_f32(op, "weight", same_dtype::<T>(op, param)?, pl)?,
        contiguous(op, "output gradient", same_dtype::<T>(op, g)?, gl)?,
    ))
}

/// One channel's sums over the batch for the backward passes.
#[derive(Debug, Clone, Copy)]
struct GradientSums {
    /// Σ dy: the gradient of the shift (β).
    dy: f32,
    /// Σ dy·(x − centre): with the batch mean as the centre, the gradient of γ before its
    /// `inv_std`; with centre 0, the gradient of an eval-mode scale.
    dy_x: f32,
}

/// What a backward op makes of one channel's [`GradientSums`]: the gradients of its two
/// per-channel parameters, and `dx = dy·a + x·k + b` as `[a, k, b]` (with k = b = 0, `dy·a`
/// alone).
struct ChannelGradients {
    dparam: f32,
    dshift: f32,
    dx: [f32; 3],
}

/// Channels per task of [`channel_gradients`]: one image's planes of a block of channels lie
/// side by side, so a block reads and writes runs of at least [`BLOCK_RUN`] bytes where a
/// channel alone has a plane (5×5 planes are 100 bytes), with all of the block's x and dy
/// (both passes read them) within [`BLOCK_BYTES`] of cache, and at least four tasks per thread.
fn channels_per_block(n: usize, c: usize, plane_len: usize) -> usize {
    let plane_bytes = plane_len * std::mem::size_of::<f32>();
    let for_runs = BLOCK_RUN.div_ceil(plane_bytes);
    let in_cache = BLOCK_BYTES / (2 * n * plane_bytes);
    let for_tasks = c / (4 * rayon::current_num_threads());
    for_runs.min(in_cache).min(for_tasks).max(1)
}

/// See [`channels_per_block`].
const BLOCK_RUN: usize = 16 << 10;
const BLOCK_BYTES: usize = 1 << 20;

/// Asks for image `ni`'s planes of `channels` ahead of their use, where `data` (laid out as
/// `xs`) has them side by side (and `ni` is an image): the hardware's prefetcher restarts at
/// every run of planes (and 4 KiB page).
fn prefetch_planes<T>(data: &[T], xs: &Strided4, ni: usize, channels: std::ops::Range<usize>) {
    let [n, c, _, w] = xs.dims;
    let plane_len = xs.plane_len();
    if ni < n && xs.strides == [c * plane_len, plane_len, w, 1] {
        let start = xs.offset + (ni * c + channels.start) * plane_len;
        crate::cpu::prefetch(&data[start..start + channels.len() * plane_len]);
    }
}

/// One plane of `dx` and, where it is written, the same plane of the masked dy, for a task
/// of [`channel_gradients`] to take.
type PlanePair<'a, T> = (Option<&'a mut [T]>, Option<&'a mut [T]>);

/// How [`channel_gradients`] masks its output gradient by the forward's ReLU.
#[derive(Clone, Copy)]
enum ReluMask<'a, T> {
    /// No ReLU: dy is the gradient as it is.
    None,
    /// The forward's per-channel `(scale, shift)`: dy counts only where `x·scale + shift > 0` —
    /// the forward's arithmetic recomputed bit for bit, instead of a pass of its own that
    /// masks the gradient by the output and writes it out.
    Recomputed(&'a [(f32, f32)]),
    /// The forward's output (of a block end, `max(BN(x) + shortcut, 0)`, which `x` alone does
    /// not give): dy counts only where it is positive, as the ReLU's own backward has it.
    ByOutput(&'a [T]),
}

/// The packed output `[dx | dparam | dshift]` of a backward op, channel by channel: the
/// channel's [`GradientSums`] over its planes (Σ dy·(x − centre(c)), the centre subtracted
/// plane by plane before the f64 accumulation so that a large mean does not cancel away the
/// sum's precision), then `dx` from `gradients(c, sums)` while the channel's planes are still
/// in cache — x and dy come from memory once, where a pass over all planes for the sums and
/// another for dx read them twice. A task takes a block of channels ([`channels_per_block`])
/// image by image, with the next image's run prefetched: channel by channel, each plane was a
/// run of its own (4.9 KB at 35×35, the next one megabytes away). With the caches flushed
/// before each call (a throwaway loop on the 2-core Xeon), 16 × 256 × 35×35 took 4.99 →
/// 4.03 ms, 512 × 18×18 2.69 → 2.23, 9×9 and 5×5 level; in the ResNet-50 140×140 training
/// step (`bench-train-row`, three alternating pairs) all of BatchNorm's backward ops
/// 63 / 79 / 74 → 59 / 60 / 60 ms.
///
/// `relu` says whether the forward ended in a ReLU whose output's gradient `g` is, and how dy
/// is masked by it ([`ReluMask`]); with [`ReluMask::ByOutput`] the masked dy is also written
/// to `masked`, in `g`'s layout.
fn channel_gradients<T: Elem>(
    x: &[T],
    xs: &Strided4,
    g: &[T],
    relu: ReluMask<'_, T>,
    masked: Option<&mut [T]>,
    centre: impl Fn(usize) -> f32 + Sync,
    gradients: impl Fn(usize, GradientSums) -> ChannelGradients + Sync,
) -> (CpuStorage, Shape) {
    let [n, c, h, w] = xs.dims;
    let plane_len = h * w;
    let len = n * c * plane_len + 2 * c;
    let mut out = uninit::<T>(len);
    let (dx, per_channel) = out.split_at_mut(n * c * plane_len);
    if let Some(s) = short::ShortPlanes::new(xs) {
        let params = short::gradients(x, &s, g, relu, dx, masked, centre, gradients);
        for (ci, (dparam, dshift)) in params.into_iter().enumerate() {
            per_channel[ci] = T::from_f32(dparam);
            per_channel[c + ci] = T::from_f32(dshift);
        }
        return (T::to_cpu_storage_owned(out), Shape::from(len));
    }
    let block = channels_per_block(n, c, plane_len);
    // Each block of channels' dx planes, one from every image, as disjoint slices: block b's
    // are `dx_planes[b·block·n..]`, image by image and within an image channel by channel, so
    // that a task writes (and reads x and dy) in runs of `block` planes, contiguous in memory.
    // Beside each its plane of `masked`, where that is written.
    let at = |ni: usize, ci: usize| {
        let (b, k) = (ci / block, ci % block);
        b * block * n + ni * (c - b * block).min(block) + k
    };
    let mut dx_planes: Vec<PlanePair<T>> = (0..n * c).map(|_| (None, None)).collect();
    for (ni, image) in dx.chunks_mut(c * plane_len).enumerate() {
        for (ci, plane) in image.chunks_mut(plane_len).enumerate() {
            dx_planes[at(ni, ci)].0 = Some(plane);
        }
    }
    if let Some(masked) = masked {
        for (ni, image) in masked.chunks_mut(c * plane_len).enumerate() {
            for (ci, plane) in image.chunks_mut(plane_len).enumerate() {
                dx_planes[at(ni, ci)].1 = Some(plane);
            }
        }
    }
    // Where plane (ni, ci) of dy lies in `g`.
    let gs = Strided4 { dims: xs.dims, strides: [c * plane_len, plane_len, w, 1], offset: 0 };
    let dy_range = |ni: usize, ci: usize| (ni * c + ci) * plane_len..(ni * c + ci + 1) * plane_len;
    // f32 dy without a ReLU is read where it is; otherwise each block's dy is converted and
    // masked once into a buffer that the dx pass reads back from cache.
    let g_f32 = T::as_f32_slice(g).filter(|_| matches!(relu, ReluMask::None));
    let params: Vec<Vec<(f32, f32)>> = dx_planes
        .par_chunks_mut(block * n)
        .enumerate()
        .map_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(x_buf, dy_buf, dx_buf), (b, planes)| {
                // 16 lanes where the CPU has AVX-512, the same sums in the same order: on the
                // 2-core AMD EPYC layer 1's 256 × 35×35 (batch 16, with the ReLU mask) 3.90 →
                // 3.41 ms, layer 2's 512 × 18×18 2.45 → 1.90, layer 4's 5×5 level (fastest
                // of three alternating rounds of a throwaway timing loop); the statistics
                // below 0.93 → 0.62 and 0.32 → 0.25 ms.
                vectorized!({
                    let channels = b * block..(b * block + block).min(c);
                    let in_block = channels.len();
                    // Block-local index of plane (ni, ci) in `planes` and `dy_buf`.
                    let local = |ni: usize, ci: usize| ni * in_block + (ci - channels.start);
                    if g_f32.is_none() && dy_buf.len() != in_block * n * plane_len {
                        *dy_buf = uninit::<f32>(in_block * n * plane_len);
                    }
                    let mut sums = vec![(0f64, 0f64); in_block];
                    // Image by image, each channel's planes summed in image order as a channel
                    // at a time would.
                    for ni in 0..n {
                        prefetch_planes(x, xs, ni + 1, channels.clone());
                        prefetch_planes(g, &gs, ni + 1, channels.clone());
                        if let ReluMask::ByOutput(output) = relu {
                            prefetch_planes(output, &gs, ni + 1, channels.clone());
                        }
                        for ci in channels.clone() {
                            let centre = centre(ci);
                            let xp = plane_f32(x, xs, ni, ci, x_buf);
                            let dyp = match g_f32 {
                                Some(g32) => &g32[dy_range(ni, ci)],
                                None => {
                                    let d = &mut dy_buf[local(ni, ci) * plane_len..][..plane_len];
                                    match relu {
                                        ReluMask::None => copy_converted(&g[dy_range(ni, ci)], d),
                                        // The forward's ReLU passed what was positive (a select, not
                                        // a product: a non-finite dy where it clamped stays out).
                                        // Written so that LLVM vectorises the select: dy loaded
                                        // before it, the iterators zipped as (d, (dy, x)) — either
                                        // changed, the loop stays scalar with a branch per element.
                                        ReluMask::Recomputed(affine) => {
                                            let (scale, shift) = affine[ci];
                                            for (d, (&gv, &xv)) in d.iter_mut().zip(g[dy_range(ni, ci)].iter().zip(xp))
                                            {
                                                let gv = gv.to_f32();
                                                *d = if xv * scale + shift > 0.0 { gv } else { 0.0 };
                                            }
                                        }
                                        ReluMask::ByOutput(output) => {
                                            let (g, y) = (&g[dy_range(ni, ci)], &output[dy_range(ni, ci)]);
                                            for (d, (&gv, &yv)) in d.iter_mut().zip(g.iter().zip(y)) {
                                                let gv = gv.to_f32();
                                                *d = if yv.to_f32() > 0.0 { gv } else { 0.0 };
                                            }
                                        }
                                    }
                                    if let Some(m) = planes[local(ni, ci)].1.take() {
                                        copy_converted(d, m);
                                    }
                                    &*d
                                }
                            };
                            let (sg, sgx) = crate::cpu::sum_and_dot(dyp, xp);
                            let (dy, dy_x) = &mut sums[ci - channels.start];
                            *dy += sg as f64;
                            *dy_x += (sgx - centre * sg) as f64;
                        }
                    }
                    let gradients: Vec<ChannelGradients> = channels
                        .clone()
                        .zip(&sums)
                        .map(|(ci, &(dy, dy_x))| gradients(ci, GradientSums { dy: dy as f32, dy_x: dy_x as f32 }))
                        .collect();
                    for ni in 0..n {
                        for (ci, channel) in channels.clone().zip(&gradients) {
                            let [a, k, b] = channel.dx;
                            let plane = planes[local(ni, ci)].0.take().expect("each plane is written once");
                            let xp = plane_f32(x, xs, ni, ci, x_buf);
                            let dyp = match g_f32 {
                                Some(g32) => &g32[dy_range(ni, ci)],
                                None => &dy_buf[local(ni, ci) * plane_len..][..plane_len],
                            };
                            write_f32(plane, dx_buf, |d| {
                                if k == 0.0 && b == 0.0 {
                                    // An eval-mode scale: dx does not depend on x, and a
                                    // non-finite x must not make it NaN through x·0.
                                    d.iter_mut().zip(dyp).for_each(|(d, &gv)| *d = gv * a)
                                } else {
                                    d.iter_mut().zip(dyp).zip(xp).for_each(|((d, &gv), &xv)| *d = gv * a + xv * k + b)
                                }
                            });
                        }
                    }
                    gradients.iter().map(|g| (g.dparam, g.dshift)).collect()
                })
            },
        )
        .collect();
    for (ci, (dparam, dshift)) in params.into_iter().flatten().enumerate() {
        per_channel[ci] = T::from_f32(dparam);
        per_channel[c + ci] = T::from_f32(dshift);
    }
    (T::to_cpu_storage_owned(out), Shape::from(len))
}

/// Per-channel (mean, biased variance) of `x`, in f64 accumulators.
fn channel_stats<T: Elem>(x: &[T], xs: &Strided4) -> Vec<(f32, f32)> {
    channel_and_plane_stats(x, xs).into_iter().map(|(stats, _)| stats).collect()
}

/// [`channel_stats`] with each channel's plane sums (one per image, in f32), which its first
/// pass computes anyway: the pooled means of the BatchNorm + excitation op
/// (`crate::excitation::batch_norm_excitation_add_relu`).
pub(crate) fn channel_and_plane_stats<T: Elem>(x: &[T], xs: &Strided4) -> Vec<((f32, f32), Vec<f32>)> {
    if let Some(s) = short::ShortPlanes::new(xs) {
        return short::stats(x, &s);
    }
    let count = (xs.dims[0] * xs.plane_len()) as f64;
    (0..xs.dims[1])
        .into_par_iter()
        .map_init(Vec::new, |buf, c| {
            vectorized!({
                let planes = channel_planes(x, xs, c, buf);
                let plane_sums: Vec<f32> = planes.iter().map(|p| crate::cpu::sum(p)).collect();
                let sum: f64 = plane_sums.iter().map(|&s| s as f64).sum();
                let mean = (sum / count) as f32;
                let mut sq = 0f64;
                planes.iter().for_each(|p| {
                    let mut acc = [0f32; 8];
                    let chunks = p.chunks_exact(8);
                    let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
                    for ch in chunks {
                        for l in 0..8 {
                            let d = ch[l] - mean;
                            acc[l] += d * d;
                        }
                    }
                    sq += (tail + acc.iter().sum::<f32>()) as f64;
                });
                ((mean, (sq / count) as f32), plane_sums)
            })
        })
        .collect()
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "sae-batch-norm-stats"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = Strided4::new("batch_norm", "input", xl)?;
        let stats = dispatch_float!("batch_norm", x, |x: T| channel_stats::<T>(x, &xs));
        let (mean, var): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
        Ok((CpuStorage::F32([mean, var].concat()), Shape::from((2, xs.dims[1]))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let c = Strided4::new("batch_norm", "input", xl)?.dims[1];
        Ok((crate::cuda_ops::channel_stats(x, xl)?, Shape::from((2, c))))
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "sae-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (op, xs) = ("batch_norm", Strided4::new("batch_norm", "input", xl)?);
        let out = dispatch_float!(op, x, |x: T| {
            let w = as_f32(op, "weight", same_dtype::<T>(op, w)?, wl)?;
            let b = as_f32(op, "bias", same_dtype::<T>(op, b)?, bl)?;
            T::to_cpu_storage_owned(affine(x, &xs, self.relu, None, |c| self.stats.affine(c, &w, &b)))
        });
        Ok((out, Shape::from(xs.dims.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::channel_affine(
            x,
            xl,
            a,
            al,
            b,
            bl,
            Some((&self.stats.mean, &self.stats.inv_std)),
            self.relu,
        )?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (relu, grad) = backward_relu(self.relu, x, res, grad, || {
            let (gamma, beta) = (f32_values(w)?, f32_values(b)?);
            Ok((0..gamma.len()).map(|c| self.stats.affine(c, &gamma, &beta)).collect())
        })?;
        let op = BatchNormBackward { stats: self.stats.clone(), relu };
        let packed = x.apply_op3_no_bwd(w, &grad, &op)?;
        let [dx, dw, db] = unpack(&packed, [x.dims(), w.dims(), b.dims()])?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for BatchNormTrainAddRelu {
    fn name(&self) -> &'static str {
        "sae-batch-norm-train-add-relu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (op, xs) = ("batch_norm", Strided4::new("batch_norm", "input", xl)?);
        let out = dispatch_float!(op, x, |x: T| {
            let p = as_f32(op, "weight and bias", same_dtype::<T>(op, p)?, pl)?;
            let (w, b) = p.split_at(xs.dims[1]);
            let r = crate::relu::shortcut_slice::<T>(op, r, rl, xl.shape().elem_count())?;
            T::to_cpu_storage_owned(affine(x, &xs, true, Some(r), |c| self.stats.affine(c, w, b)))
        });
        Ok((out, Shape::from(xs.dims.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let gamma = f32_values(&params.narrow(0, 0, c)?)?;
        let op =
            BatchNormAddReluBackward { stats: self.stats.clone(), gamma, shortcut_gradient: GradientSlot::default() };
        let packed = x.apply_op3_no_bwd(&res.contiguous()?, &grad.contiguous()?, &op)?;
        let [dx, dw, db] = unpack(&packed, [x.dims(), &[c], &[c]])?;
        let shortcut = op.shortcut_gradient.take("batch_norm backward")?;
        Ok((Some(dx), Some(Tensor::cat(&[dw, db], 0)?), Some(shortcut)))
    }
}

impl CustomOp3 for BatchNormAddReluBackward {
    fn name(&self) -> &'static str {
        "sae-batch-norm-add-relu-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "batch_norm backward";
        let xs = Strided4::new(op, "input", xl)?;
        dispatch_float!(op, x, |x: T| {
            let (y, g) = block_end_operands::<T>(op, &xs, y, yl, g, gl)?;
            let mut masked = uninit::<T>(g.len());
            let mean = &self.stats.mean;
            let gradients = self.stats.gradients(&self.gamma, &xs);
            let out = channel_gradients(x, &xs, g, ReluMask::ByOutput(y), Some(&mut masked), |ci| mean[ci], gradients);
            self.shortcut_gradient.put(op, Tensor::from_vec(masked, xs.dims.to_vec(), &candle_core::Device::Cpu)?)?;
            Ok(out)
        })
    }
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "sae-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = backward_layout(xl, gl)?;
        dispatch_float!("batch_norm backward", x, |x: T| {
            let (w, g) = backward_operands::<T>(w, wl, g, gl)?;
            let relu = self.relu.as_deref().map_or(ReluMask::None, ReluMask::Recomputed);
            let mean = &self.stats.mean;
            Ok(channel_gradients(x, &xs, g, relu, None, |ci| mean[ci], self.stats.gradients(&w, &xs)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let len = xl.shape().elem_count() + 2 * al.shape().elem_count();
        Ok((
            crate::cuda_ops::channel_affine_backward(
                x,
                xl,
                a,
                al,
                g,
                gl,
                Some((&self.stats.mean, &self.stats.inv_std)),
            )?,
            Shape::from(len),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of channels (four per task at 5×5, the last one short; at 4×4 and 1×1 the short
    /// planes' runs, [`short`]) and each ReLU mask give each channel the sums and `dx` of a
    /// plain loop over its elements (and the mask by the output its masked dy); the statistics
    /// of the same input its mean, variance and plane sums.
    #[test]
    fn statistics_and_gradients_in_blocks_of_channels_equal_a_plain_loop() {
        for dims in [[3usize, 37, 5, 5], [3, 37, 4, 4], [3, 37, 1, 1]] {
            statistics_and_gradients_equal_a_plain_loop(dims);
        }
    }

    fn statistics_and_gradients_equal_a_plain_loop(dims: [usize; 4]) {
        let [n, c, h, w] = dims;
        let plane = h * w;
        let value = |i: usize, k: usize| ((i * k) % 101) as f32 * 0.05 - 2.5;
        let x: Vec<f32> = (0..n * c * plane).map(|i| value(i, 7919)).collect();
        let g: Vec<f32> = (0..n * c * plane).map(|i| value(i, 31)).collect();
        let xs = Strided4 { dims, strides: [c * plane, plane, w, 1], offset: 0 };
        let relu: Vec<(f32, f32)> = (0..c).map(|i| (1.0 + i as f32 * 0.01, -0.3)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool");
        if plane == 25 {
            assert_eq!(pool.install(|| channels_per_block(n, c, plane)), 4);
        }
        assert_eq!(pool.install(|| short::ShortPlanes::new(&xs).is_some()), plane <= 16, "{dims:?}");
        let centre = |ci: usize| ci as f32 * 0.01;
        let dx_of = |ci: usize, s: GradientSums| [s.dy * 0.5 + ci as f32, s.dy_x * 0.25, 0.125];
        let stats = pool.install(|| channel_and_plane_stats::<f32>(&x, &xs));
        for (ci, ((mean, variance), plane_sums)) in stats.iter().enumerate() {
            let values = || (0..n).flat_map(|ni| x[(ni * c + ci) * plane..][..plane].iter().map(|&v| v as f64));
            let expected_mean = values().sum::<f64>() / (n * plane) as f64;
            let expected_variance = values().map(|v| (v - expected_mean).powi(2)).sum::<f64>() / (n * plane) as f64;
            assert!((*mean as f64 - expected_mean).abs() <= 1e-5, "channel {ci} mean {mean} vs {expected_mean}");
            assert!((*variance as f64 - expected_variance).abs() <= 1e-4, "channel {ci} variance {variance}");
            for (ni, &sum) in plane_sums.iter().enumerate() {
                let expected: f32 = x[(ni * c + ci) * plane..][..plane].iter().sum();
                assert!((sum - expected).abs() <= 1e-4, "channel {ci} image {ni} plane sum {sum} vs {expected}");
            }
        }
        // A block end's output: positive, zero where its ReLU clamped.
        let output: Vec<f32> = (0..n * c * plane).map(|i| value(i, 613).max(0.0)).collect();
        for mode in [ReluMask::None, ReluMask::Recomputed(&relu), ReluMask::ByOutput(&output)] {
            let sums = |ci: usize, s: GradientSums| ChannelGradients { dparam: s.dy_x, dshift: s.dy, dx: dx_of(ci, s) };
            let mut masked = vec![f32::NAN; n * c * plane];
            let by_output = matches!(mode, ReluMask::ByOutput(_));
            let out = pool.install(|| {
                let masked = by_output.then_some(&mut masked[..]);
                channel_gradients::<f32>(&x, &xs, &g, mode, masked, centre, sums).0
            });
            let CpuStorage::F32(out) = out else { unreachable!("f32 in, f32 out") };
            let mode_name = match mode {
                ReluMask::None => "no relu",
                ReluMask::Recomputed(_) => "relu recomputed",
                ReluMask::ByOutput(_) => "relu by output",
            };
            for ci in 0..c {
                let at = |ni: usize, k: usize| (ni * c + ci) * plane + k;
                let dy = |ni: usize, k: usize| match mode {
                    ReluMask::Recomputed(r) if x[at(ni, k)] * r[ci].0 + r[ci].1 <= 0.0 => 0.0,
                    ReluMask::ByOutput(y) if y[at(ni, k)] <= 0.0 => 0.0,
                    _ => g[at(ni, k)] as f64,
                };
                let elements = || (0..n).flat_map(|ni| (0..plane).map(move |k| (ni, k)));
                let sum_dy: f64 = elements().map(|(ni, k)| dy(ni, k)).sum();
                let sum_dy_x: f64 = elements().map(|(ni, k)| dy(ni, k) * (x[at(ni, k)] - centre(ci)) as f64).sum();
                let close = |a: f32, b: f64, what: &str| {
                    assert!(
                        (a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "channel {ci} {what}: {a} vs {b}, {mode_name}"
                    )
                };
                let close = |a: f32, b: f64, what: &str| close(a, b, &format!("{dims:?} {what}"));
                close(out[n * c * plane + c + ci], sum_dy, "Σ dy");
                close(out[n * c * plane + ci], sum_dy_x, "Σ dy·x");
                let [a, k, b] = dx_of(ci, GradientSums { dy: sum_dy as f32, dy_x: sum_dy_x as f32 });
                for (ni, e) in elements() {
                    let expected = dy(ni, e) * a as f64 + (x[at(ni, e)] * k + b) as f64;
                    close(out[at(ni, e)], expected, "dx");
                    if by_output {
                        close(masked[at(ni, e)], dy(ni, e), "masked dy");
                    }
                }
            }
        }
    }

    /// The statistics and gradients in `vectorized!` code (16 lanes where the CPU has AVX-512)
    /// are the baseline build's bits: planes of 7×5 and 9×9 leave remainders at every width, and
    /// 37 channels of 3×1 (short planes) runs of 111 values.
    #[test]
    fn vectorized_statistics_and_gradients_equal_the_baseline_bit_for_bit() {
        use crate::cpu::BASELINE_VECTORS;
        use std::sync::atomic::Ordering;
        for dims in [[3usize, 5, 7, 5], [2, 3, 9, 9], [3, 37, 3, 1]] {
            let [n, c, h, w] = dims;
            let value = |i: usize, k: usize| ((i * k) % 97) as f32 * 0.173 - 7.0;
            let x: Vec<f32> = (0..n * c * h * w).map(|i| value(i, 7919)).collect();
            let g: Vec<f32> = (0..n * c * h * w).map(|i| value(i, 31)).collect();
            let xs = Strided4 { dims, strides: [c * h * w, h * w, w, 1], offset: 0 };
            let relu: Vec<(f32, f32)> = (0..c).map(|i| (1.0 + i as f32 * 0.1, -0.5)).collect();
            let run = |baseline: bool| {
                BASELINE_VECTORS.store(baseline, Ordering::SeqCst);
                let stats = channel_stats::<f32>(&x, &xs);
                let gradients = [None, Some(&relu[..])].map(|relu| {
                    let sums = |_: usize, s: GradientSums| ChannelGradients {
                        dparam: s.dy_x,
                        dshift: s.dy,
                        dx: [1.5, 0.5, -0.25],
                    };
                    match channel_gradients::<f32>(
                        &x,
                        &xs,
                        &g,
                        relu.map_or(ReluMask::None, ReluMask::Recomputed),
                        None,
                        |_| 0.5,
                        sums,
                    )
                    .0
                    {
                        CpuStorage::F32(v) => v,
                        _ => unreachable!("f32 in, f32 out"),
                    }
                });
                BASELINE_VECTORS.store(false, Ordering::SeqCst);
                (stats, gradients)
            };
            let (wide, baseline) = (run(false), run(true));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let stat_bits = |s: &[(f32, f32)]| s.iter().map(|(m, v)| (m.to_bits(), v.to_bits())).collect::<Vec<_>>();
            assert_eq!(stat_bits(&wide.0), stat_bits(&baseline.0), "{dims:?} statistics");
            for (k, (a, b)) in wide.1.iter().zip(&baseline.1).enumerate() {
                assert_eq!(bits(a), bits(b), "{dims:?} gradients, relu {}", k == 1);
            }
        }
    }
}

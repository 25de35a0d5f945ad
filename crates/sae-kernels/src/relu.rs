//! ReLU with a one-pass backward, alone or after a residual addition ([`add_relu`]), and
//! ReLU6 ([`relu6`]).
//!
//! Candle differentiates `relu` as `grad · (x ≥ 0)` built from `zeros_like`, `ge`, a dtype
//! conversion and a product: four passes and four allocations per ReLU, and a ResNet-50 has 49
//! of them. Here the backward is one pass over the output and its gradient, with PyTorch's
//! convention at zero (the gradient is 0 where the output is 0). The fused kernels take
//! f32/f16/bf16 on the CPU and on CUDA; elsewhere [`relu`] runs Candle's `relu`, the
//! reference.

use crate::cpu::{contiguous, dispatch_float, same_dtype, uninit, Elem};
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `max(x, 0)` element-wise.
pub fn relu(x: &Tensor, implementation: Implementation) -> Result<Tensor> {
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x) => x.contiguous()?.apply_op1(Relu),
        _ => x.relu(),
    }
}

/// `min(max(x, 0), 6)` element-wise (MobileNet's activation), with the gradient passed where
/// `0 < x < 6` and 0 elsewhere, as PyTorch's `hardtanh` (Candle's `clamp` passes half at
/// `x = 0` and `x = 6`, which MobileNet meets: a depthwise window of zeros gives an exact 0).
/// The fused kernels run on the CPU and CUDA for f32/f16/bf16; elsewhere [`relu6_reference`]. Both
/// differ from a plain `clamp` in speed too: its backward builds equality masks for both
/// operands of a `maximum` and a `minimum` against broadcast scalars, and a MobileNet v1
/// training step at 32×32 spent ~45 % of its time in those passes (`perf` of `sae train`, the
/// Zen 5 EPYC).
pub fn relu6(x: &Tensor, implementation: Implementation) -> Result<Tensor> {
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x) => x.contiguous()?.apply_op1(Relu6),
        _ => relu6_reference(x),
    }
}

/// [`relu6`] composed from Candle ops: `x` where `0 < x < 6`, else `clamp(x, 0, 6)` detached,
/// so that the gradient follows `hardtanh`'s rule.
pub fn relu6_reference(x: &Tensor) -> Result<Tensor> {
    let inside = x.gt(0f64)?.minimum(&x.lt(6f64)?)?;
    inside.where_cond(x, &x.clamp(0f32, 6f32)?.detach())
}

/// `max(a + b, 0)` element-wise (a residual connection and its ReLU) as one graph node.
pub fn add_relu(a: &Tensor, b: &Tensor, implementation: Implementation) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!("add_relu: operand shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(a) && a.dtype() == b.dtype() => {
            a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
        }
        _ => (a + b)?.relu(),
    }
}

/// Checks that a residual block's `shortcut` can be added to `x` inside `op` (the same shape
/// and dtype), for the ops that end in the addition and its ReLU themselves.
pub(crate) fn check_shortcut(op: &str, x: &Tensor, shortcut: &Tensor) -> Result<()> {
    if shortcut.dims() != x.dims() || shortcut.dtype() != x.dtype() {
        bail!(
            "{op}: the shortcut ({:?}, {:?}) must have the input's shape and dtype ({:?}, {:?})",
            shortcut.dims(),
            shortcut.dtype(),
            x.dims(),
            x.dtype()
        )
    }
    Ok(())
}

/// The shortcut operand's data in a CPU kernel: `T`, contiguous, `len` elements (the input's).
pub(crate) fn shortcut_slice<'a, T: Elem>(op: &str, r: &'a CpuStorage, rl: &Layout, len: usize) -> Result<&'a [T]> {
    let r = contiguous(op, "shortcut", same_dtype::<T>(op, r)?, rl)?;
    if r.len() != len {
        bail!("{op}: the shortcut has {} elements, the input {len}", r.len())
    }
    Ok(r)
}

/// `grad · (output > 0)`: the gradient through a ReLU, from its output.
pub(crate) fn relu_gradient(output: &Tensor, grad: &Tensor) -> Result<Tensor> {
    output.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &Activation::Relu)
}

struct Relu;

struct AddRelu;

struct Relu6;

/// An activation whose input gradient comes from its output: as a `CustomOp2`, (output,
/// output gradient) → input gradient.
#[derive(Clone, Copy)]
pub(crate) enum Activation {
    /// The gradient passes where the output is positive.
    Relu,
    /// The gradient passes where the output is strictly inside (0, 6), exactly where the input
    /// is ([`relu6`]).
    Relu6,
}

impl Activation {
    /// The backward op's name in errors.
    pub(crate) fn backward_name(self) -> &'static str {
        match self {
            Activation::Relu => "relu backward",
            Activation::Relu6 => "relu6 backward",
        }
    }
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

/// `f(a[i], b[i])` for every element, in parallel, in f32 arithmetic: f32 data as it is (the
/// loop the f32 kernels always ran), bf16/f16 converted per element.
fn map2<T: Elem>(a: &[T], b: &[T], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<T> {
    let mut out = uninit::<T>(a.len());
    if let (Some(a), Some(b), Some(o)) = (T::as_f32_slice(a), T::as_f32_slice(b), T::as_f32_slice_mut(&mut out)) {
        o.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
        return out;
    }
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = T::from_f32(f(a.to_f32(), b.to_f32()));
        }
    });
    out
}

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "sae-relu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("relu", x, |x: T| {
            let x = contiguous("relu", "input", x, l)?;
            T::to_cpu_storage_owned(map2(x, x, |v, _| v.max(0.0)))
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::relu(x, l, None)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(relu_gradient(res, grad)?))
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "sae-add-relu"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("add_relu", a, |a: T| {
            let a = contiguous("add_relu", "first operand", a, al)?;
            let b = contiguous("add_relu", "second operand", same_dtype::<T>("add_relu", b)?, bl)?;
            if a.len() != b.len() {
                bail!("add_relu: operands have {} and {} elements", a.len(), b.len())
            }
            T::to_cpu_storage_owned(map2(a, b, |a, b| (a + b).max(0.0)))
        });
        Ok((out, al.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::relu(a, al, Some((b, bl)))?, al.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = relu_gradient(res, grad)?;
        Ok((Some(grad.clone()), Some(grad)))
    }
}

impl CustomOp2 for Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "sae-relu-backward",
            Activation::Relu6 => "sae-relu6-backward",
        }
    }

    fn cpu_fwd(&self, y: &CpuStorage, yl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        // One predicate per op, so that the element loop has no branch on the activation.
        match self {
            Activation::Relu => gradient_where(self.backward_name(), y, yl, g, gl, |y| y > 0.0),
            Activation::Relu6 => gradient_where(self.backward_name(), y, yl, g, gl, |y| y > 0.0 && y < 6.0),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::activation_backward(*self, y, yl, g, gl)?, yl.shape().clone()))
    }
}

impl CustomOp1 for Relu6 {
    fn name(&self) -> &'static str {
        "sae-relu6"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("relu6", x, |x: T| {
            let x = contiguous("relu6", "input", x, l)?;
            T::to_cpu_storage_owned(map2(x, x, |v, _| v.clamp(0.0, 6.0)))
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::relu6(x, l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &Activation::Relu6)?))
    }
}

/// An activation's input gradient from its output `y` and output gradient `g`: `g` where
/// `passes(y)`, else 0.
fn gradient_where(
    op: &str,
    y: &CpuStorage,
    yl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    passes: impl Fn(f32) -> bool + Sync,
) -> Result<(CpuStorage, Shape)> {
    let out = dispatch_float!(op, y, |y: T| {
        let y = contiguous(op, "output", y, yl)?;
        let g = contiguous(op, "output gradient", same_dtype::<T>(op, g)?, gl)?;
        if y.len() != g.len() {
            bail!("{op}: output has {} elements, its gradient {}", y.len(), g.len())
        }
        T::to_cpu_storage_owned(map2(y, g, |y, g| if passes(y) { g } else { 0.0 }))
    });
    Ok((out, yl.shape().clone()))
}

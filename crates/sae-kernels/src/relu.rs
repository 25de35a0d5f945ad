//! ReLU with a one-pass backward, alone or after a residual addition ([`add_relu`]).
//!
//! Candle differentiates `relu` as `grad · (x ≥ 0)` built from `zeros_like`, `ge`, a dtype
//! conversion and a product: four passes and four allocations per ReLU, and a ResNet-50 has 49
//! of them. Here the backward is one pass over the output and its gradient, with PyTorch's
//! convention at zero (the gradient is 0 where the output is 0). The fused kernels take
//! `f32` on the CPU and f32/f16/bf16 on CUDA; elsewhere [`relu`] runs Candle's `relu`, the
//! reference.

use crate::cpu::{f32_contiguous, uninit};
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `max(x, 0)` element-wise.
pub fn relu(x: &Tensor, implementation: Implementation) -> Result<Tensor> {
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x, true) => x.contiguous()?.apply_op1(Relu),
        _ => x.relu(),
    }
}

/// `max(a + b, 0)` element-wise (a residual connection and its ReLU) as one graph node.
pub fn add_relu(a: &Tensor, b: &Tensor, implementation: Implementation) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!("add_relu: operand shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(a, true) && a.dtype() == b.dtype() => {
            a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
        }
        _ => (a + b)?.relu(),
    }
}

/// `grad · (output > 0)`: the gradient through a ReLU, from its output.
pub(crate) fn relu_gradient(output: &Tensor, grad: &Tensor) -> Result<Tensor> {
    output.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ReluBackward)
}

struct Relu;

struct AddRelu;

/// (output, output gradient) → input gradient.
struct ReluBackward;

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "sae-relu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contiguous("relu", "input", x, l)?;
        let mut out = uninit::<f32>(x.len());
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
            o.iter_mut().zip(x).for_each(|(o, &v)| *o = v.max(0.0));
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
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
        let (a, b) =
            (f32_contiguous("add_relu", "first operand", a, al)?, f32_contiguous("add_relu", "second operand", b, bl)?);
        let mut out = uninit::<f32>(a.len());
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = (a + b).max(0.0);
            }
        });
        Ok((CpuStorage::F32(out), al.shape().clone()))
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

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "sae-relu-backward"
    }

    fn cpu_fwd(&self, y: &CpuStorage, yl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32_contiguous("relu", "output", y, yl)?, f32_contiguous("relu", "output gradient", g, gl)?);
        if y.len() != g.len() {
            bail!("relu backward: output has {} elements, its gradient {}", y.len(), g.len())
        }
        let mut out = uninit::<f32>(y.len());
        out.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(o, (y, g))| {
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = if y > 0.0 { g } else { 0.0 };
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::relu_backward(y, yl, g, gl)?, yl.shape().clone()))
    }
}

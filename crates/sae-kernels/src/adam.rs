//! The Adam update in place, in three element-wise passes and no allocation.
//!
//! Composed from Candle ops, one Adam step over a ResNet-50's 24 M parameters is about a dozen
//! full passes, each allocating its output (about 200 ms on two cores, as long as the backward
//! pass of a 32×32 batch). Here the moments and the parameters are updated where they are:
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·g      v ← β₂·v + (1 − β₂)·g²      θ ← d·θ − α·m / (√v + ε)
//! ```
//!
//! with `α` the step's learning rate, bias corrections folded in by the caller, and `d` the
//! decoupled weight decay's factor (AdamW's `1 − lr·wd`; 1 for Adam, which leaves θ as it is). The fused
//! kernel takes contiguous `f32` on the CPU; anything else runs [`adam_update_reference`], the
//! same update composed of Candle ops, which writes its results into the same variables.
//!
//! The update is memory-bound, and Candle's in-place ops change one tensor each, so the
//! moments as tensors take three passes: ten streams of the parameters' size. An optimiser
//! that keeps the moments in its own memory can use [`adam_update_interleaved`] instead: one
//! pass over the parameter, its gradient and the (m, v) pairs, seven streams.

use crate::cpu::{f32_contiguous, f32_contiguous_mut, vectorized};
use crate::Implementation;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::sync::Mutex;

/// Hyper-parameters of one Adam step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to √v.
    pub eps: f64,
    /// Step size, bias corrections included.
    pub alpha: f64,
    /// θ's factor before the step: `1 − lr·wd` for AdamW's decoupled weight decay, 1 for Adam
    /// (θ·1 is θ exactly: Adam's results do not change).
    pub decay: f64,
}

impl AdamStep {
    /// Adam's step (no weight decay).
    pub fn adam(beta1: f64, beta2: f64, eps: f64, alpha: f64) -> Self {
        Self { beta1, beta2, eps, alpha, decay: 1.0 }
    }
}

/// Applies one Adam step to `theta` with gradient `grad`, updating `theta` and the moments `m`
/// and `v` where they are, with the chosen implementation.
pub fn adam_update(
    theta: &Var,
    grad: &Tensor,
    m: &Var,
    v: &Var,
    step: AdamStep,
    implementation: Implementation,
) -> Result<()> {
    for (name, t) in [("gradient", grad), ("first moment", m.as_tensor()), ("second moment", v.as_tensor())] {
        if t.shape() != theta.shape() {
            bail!("adam: {name} has shape {:?}, the parameter {:?}", t.dims(), theta.dims())
        }
    }
    let fusable = [theta.as_tensor(), grad, m.as_tensor(), v.as_tensor()].into_iter().all(adam_kernel_takes);
    if implementation == Implementation::Reference || !fusable {
        return adam_update_reference(theta, grad, m, v, step);
    }
    m.inplace_op2(grad, &Moment { decay: step.beta1 as f32, square: false })?;
    v.inplace_op2(grad, &Moment { decay: step.beta2 as f32, square: true })?;
    theta.inplace_op3(m, v, &Apply { alpha: step.alpha as f32, eps: step.eps as f32, decay: step.decay as f32 })
}

/// Whether the fused kernels take this tensor (a parameter, gradient or moment): contiguous
/// f32 on the CPU.
pub fn adam_kernel_takes(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// Whether [`adam_update_interleaved`] takes this parameter and gradient: both
/// [`adam_kernel_takes`], of one shape.
pub fn adam_interleaved_applies(theta: &Var, grad: &Tensor) -> bool {
    adam_kernel_takes(theta) && adam_kernel_takes(grad) && grad.shape() == theta.shape()
}

/// [`adam_update`] with the moments in `moments`, `m` and `v` of each element side by side
/// (`[m₀, v₀, m₁, v₁, …]`), all in one pass. `theta` and `grad` must be contiguous f32 on the
/// CPU ([`adam_interleaved_applies`]) and `moments` twice as long as `theta`.
pub fn adam_update_interleaved(theta: &Var, grad: &Tensor, moments: &mut [f32], step: AdamStep) -> Result<()> {
    if !adam_interleaved_applies(theta, grad) {
        bail!("adam: the interleaved update takes contiguous f32 CPU tensors of one shape (parameter {:?} {:?}, gradient {:?} {:?})", theta.dtype(), theta.dims(), grad.dtype(), grad.dims())
    }
    if moments.len() != 2 * theta.elem_count() {
        bail!("adam: {} interleaved moments for a parameter of {} elements", moments.len(), theta.elem_count())
    }
    theta.inplace_op2(grad, &Interleaved { moments: Mutex::new(moments), step })
}

/// The Adam step composed of Candle ops, the definition the fused update is tested against.
pub fn adam_update_reference(theta: &Var, grad: &Tensor, m: &Var, v: &Var, step: AdamStep) -> Result<()> {
    let AdamStep { beta1, beta2, eps, alpha, decay } = step;
    let m_new = ((m.as_tensor() * beta1)? + (grad * (1.0 - beta1))?)?;
    let v_new = ((v.as_tensor() * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
    let update = (m_new.div(&(v_new.sqrt()? + eps)?)? * alpha)?;
    theta.set(&((theta.as_tensor() * decay)? - update)?)?;
    m.set(&m_new)?;
    v.set(&v_new)
}

/// `dst ← decay·dst + (1 − decay)·g` (or `g²`).
struct Moment {
    decay: f32,
    square: bool,
}

/// `θ ← d·θ − α·m / (√v + ε)`.
struct Apply {
    alpha: f32,
    eps: f32,
    decay: f32,
}

/// The whole step with the moments in the optimiser's memory (see [`adam_update_interleaved`]).
struct Interleaved<'a> {
    moments: Mutex<&'a mut [f32]>,
    step: AdamStep,
}

impl InplaceOp2 for Interleaved<'_> {
    fn name(&self) -> &'static str {
        "sae-adam-interleaved"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (theta, g) =
            (f32_contiguous_mut("adam", "updated tensor", dst, dst_l)?, f32_contiguous("adam", "gradient", g, gl)?);
        let Ok(mut moments) = self.moments.lock() else { bail!("adam: the moments' lock is poisoned") };
        let AdamStep { beta1, beta2, eps, alpha, decay } = self.step;
        let (beta1, beta2, eps, alpha, decay) = (beta1 as f32, beta2 as f32, eps as f32, alpha as f32, decay as f32);
        theta.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(moments.par_chunks_mut(2 * CHUNK)).for_each(
            |((theta, g), mv)| {
                vectorized!(for ((t, &g), mv) in theta.iter_mut().zip(g).zip(mv.chunks_exact_mut(2)) {
                    let m = beta1 * mv[0] + (1.0 - beta1) * g;
                    let v = beta2 * mv[1] + (1.0 - beta2) * g * g;
                    *t = decay * *t - alpha * m / (v.sqrt() + eps);
                    mv[0] = m;
                    mv[1] = v;
                })
            },
        );
        Ok(())
    }
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "sae-adam-moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (dst, g) =
            (f32_contiguous_mut("adam", "updated tensor", dst, dst_l)?, f32_contiguous("adam", "gradient", g, gl)?);
        let (decay, rest) = (self.decay, 1.0 - self.decay);
        dst.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(d, g)| {
            if self.square {
                d.iter_mut().zip(g).for_each(|(d, &g)| *d = decay * *d + rest * g * g);
            } else {
                d.iter_mut().zip(g).for_each(|(d, &g)| *d = decay * *d + rest * g);
            }
        });
        Ok(())
    }
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "sae-adam-apply"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (theta, m, v) = (
            f32_contiguous_mut("adam", "updated tensor", dst, dst_l)?,
            f32_contiguous("adam", "first moment", m, ml)?,
            f32_contiguous("adam", "second moment", v, vl)?,
        );
        theta.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(t, (m, v))| {
            for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                *t = self.decay * *t - self.alpha * m / (v.sqrt() + self.eps);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One pass over interleaved moments computes bit for bit what the three passes over
    /// moment tensors do, over several steps; wrong lengths and dtypes are errors.
    #[test]
    fn the_interleaved_update_equals_the_three_passes() -> Result<()> {
        let n = 3 * CHUNK + 17;
        let values = |seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * seed % 2003) as f32 / 1000.0) - 1.0).collect() };
        let (init, grad) = (values(7919), values(104_729));
        let g = Tensor::new(grad.as_slice(), &Device::Cpu)?;
        let (theta3, m, v) = (
            Var::new(init.as_slice(), &Device::Cpu)?,
            Var::zeros(n, DType::F32, &Device::Cpu)?,
            Var::zeros(n, DType::F32, &Device::Cpu)?,
        );
        let theta1 = Var::new(init.as_slice(), &Device::Cpu)?;
        let mut moments = vec![0f32; 2 * n];
        for t in 1..=3 {
            // AdamW's decay too (1 − lr·wd), which both apply to θ before the step.
            let step = AdamStep { decay: 1.0 - 1e-3 * t as f64, ..AdamStep::adam(0.9, 0.999, 1e-7, 1e-3 * t as f64) };
            adam_update(&theta3, &g, &m, &v, step, Implementation::Fused)?;
            adam_update_interleaved(&theta1, &g, &mut moments, step)?;
        }
        assert_eq!(theta1.to_vec1::<f32>()?, theta3.to_vec1::<f32>()?);
        let (ms, vs): (Vec<f32>, Vec<f32>) = moments.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
        assert_eq!((ms, vs), (m.to_vec1::<f32>()?, v.to_vec1::<f32>()?));
        let step = AdamStep::adam(0.9, 0.999, 1e-7, 1e-3);
        let err = adam_update_interleaved(&theta1, &g, &mut moments[1..], step).unwrap_err().to_string();
        assert!(err.contains(&format!("{}", 2 * n - 1)), "{err}");
        let err = adam_update_interleaved(&theta1, &g.to_dtype(DType::F64)?, &mut moments, step).unwrap_err();
        assert!(err.to_string().contains("F64"), "{err}");
        Ok(())
    }
}

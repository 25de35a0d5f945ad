//! The SE / SaE excitation: squeeze (global average pool), K parallel reductions,
//! concatenation, excitation and scaling, as one op.
//!
//! For `u` of shape (N, C, H, W):
//!
//! ```text
//! z   = mean_{H,W} u                               (N, C)
//! h_k = ReLU(W1_k z + b1_k)      k = 1..K          (N, C/r) each
//! h   = concat(h_1, …, h_K)                        (N, K·C/r)
//! s   = sigmoid(W2 h + b2)                         (N, C)
//! out = u ⊙ s         (Gate::S, the original SENet)
//!     = u + u ⊙ s     (Gate::OnePlusS, the SENetV2 authors' code)
//! ```
//!
//! The K branches all read the same `z`, so their concatenation equals one dense layer whose
//! weight is the branches' weights stacked row-wise. [`ExcitationWeights::fc1_weight`] is that
//! stack, (K·C/r, C); models keep one tensor per branch and stack them before calling.
//!
//! The fused CPU kernel reads `u` once in the forward pass to pool it and once to scale it,
//! and in the backward pass reads `u` once and the output gradient twice, which is what the
//! math requires. The gates `s` are recomputed in the backward pass from the pooled values
//! (a few kFLOP per image) rather than kept alive between passes.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
mod op;

pub use op::Gate;

use crate::cpu::{dispatch_float, same_dtype, unpack, weight_as_f32, GradientSlot};
use crate::Implementation;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use op::{ExcitationBackwardOp, ExcitationOp};

/// The dense layers of an SE (K = 1) or SaE (K > 1) module.
///
/// # Shapes
/// * `fc1_weight`: (K·C/r, C) — the K branch weights stacked in branch order
/// * `fc1_bias`: (K·C/r)
/// * `fc2_weight`: (C, K·C/r)
/// * `fc2_bias`: (C)
#[derive(Debug, Clone, Copy)]
pub struct ExcitationWeights<'a> {
    /// Stacked reduction weights, (K·C/r, C).
    pub fc1_weight: &'a Tensor,
    /// Stacked reduction biases, (K·C/r).
    pub fc1_bias: &'a Tensor,
    /// Excitation weight, (C, K·C/r).
    pub fc2_weight: &'a Tensor,
    /// Excitation bias, (C).
    pub fc2_bias: &'a Tensor,
}

impl ExcitationWeights<'_> {
    /// Checks the shapes against `channels` and returns the hidden width K·C/r.
    fn hidden(&self, channels: usize) -> Result<usize> {
        let (hidden, c1) = self.fc1_weight.dims2()?;
        let expect = |t: &Tensor, name: &str, dims: &[usize]| -> Result<()> {
            if t.dims() != dims {
                bail!("excitation: {name} must have shape {dims:?}, got {:?}", t.dims())
            }
            Ok(())
        };
        expect(self.fc1_weight, "fc1_weight", &[hidden, channels])?;
        if c1 != channels || hidden == 0 {
            bail!("excitation: fc1_weight must have shape (hidden > 0, {channels}), got {:?}", self.fc1_weight.dims())
        }
        expect(self.fc1_bias, "fc1_bias", &[hidden])?;
        expect(self.fc2_weight, "fc2_weight", &[channels, hidden])?;
        expect(self.fc2_bias, "fc2_bias", &[channels])?;
        Ok(hidden)
    }
}

/// Applies the excitation with the chosen implementation.
///
/// The weights have `x`'s dtype, or are all f32 with a bf16 or f16 `x`: the f32 master
/// weights of mixed-precision training, which the fused CPU kernel uses as they are and
/// whose gradients it returns in f32 (see `master_weights` in the source); the other paths
/// cast them to `x`'s dtype first.
///
/// # Shapes
/// * `x`: (N, C, H, W), any strides; the weights as in [`ExcitationWeights`]
/// * returns (N, C, H, W), contiguous
pub fn excitation(
    x: &Tensor,
    weights: &ExcitationWeights,
    gate: Gate,
    implementation: Implementation,
) -> Result<Tensor> {
    if master_weights(x, weights) && !(implementation == Implementation::Fused && x.device().is_cpu()) {
        let cast = |t: &Tensor| crate::cast(t, x.dtype());
        let (w1, b1, w2, b2) =
            (cast(weights.fc1_weight)?, cast(weights.fc1_bias)?, cast(weights.fc2_weight)?, cast(weights.fc2_bias)?);
        let weights = ExcitationWeights { fc1_weight: &w1, fc1_bias: &b1, fc2_weight: &w2, fc2_bias: &b2 };
        return excitation(x, &weights, gate, implementation);
    }
    match implementation {
        Implementation::Reference => excitation_reference(x, weights, gate),
        Implementation::Fused => excitation_fused(x, weights, gate),
    }
}

/// Whether the weights are the f32 master weights of mixed-precision training for a bf16 or
/// f16 input (all four f32). The fused CPU kernel takes them as they are: it computes in f32
/// anyway, so a bf16 copy per step would only be rounded and converted back, and their
/// gradient is returned in f32. Every other path casts them to the input's dtype first.
fn master_weights(x: &Tensor, weights: &ExcitationWeights) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
        && [weights.fc1_weight, weights.fc1_bias, weights.fc2_weight, weights.fc2_bias]
            .iter()
            .all(|t| t.dtype() == DType::F32)
}

/// The excitation composed of plain Candle ops; the definition the fused op is tested against.
pub fn excitation_reference(x: &Tensor, weights: &ExcitationWeights, gate: Gate) -> Result<Tensor> {
    let (_, channels, _, _) = x.dims4()?;
    weights.hidden(channels)?;
    let z = x.mean((2, 3))?;
    let h = z.matmul(&weights.fc1_weight.t()?)?.broadcast_add(weights.fc1_bias)?.relu()?;
    let a = h.matmul(&weights.fc2_weight.t()?)?.broadcast_add(weights.fc2_bias)?;
    let s = (a.neg()?.exp()? + 1.0)?.recip()?.unsqueeze(2)?.unsqueeze(3)?;
    let scaled = x.broadcast_mul(&s)?;
    match gate {
        Gate::S => Ok(scaled),
        Gate::OnePlusS => x + scaled,
    }
}

fn excitation_fused(x: &Tensor, weights: &ExcitationWeights, gate: Gate) -> Result<Tensor> {
    let (op, params) = fused_operands(x, weights, gate)?;
    x.apply_op2(&params, op)
}

/// The gradients of [`excitation`] with respect to its input and every weight.
#[derive(Debug, Clone)]
pub struct ExcitationGradients {
    /// Gradient for the input, (N, C, H, W).
    pub input: Tensor,
    /// Gradient for the stacked reduction weights, (K·C/r, C).
    pub fc1_weight: Tensor,
    /// Gradient for the stacked reduction biases, (K·C/r).
    pub fc1_bias: Tensor,
    /// Gradient for the excitation weight, (C, K·C/r).
    pub fc2_weight: Tensor,
    /// Gradient for the excitation bias, (C).
    pub fc2_bias: Tensor,
}

/// The fused backward pass on its own: the gradients of [`excitation`] for an output gradient
/// `grad` (N, C, H, W), computed by the same kernel Candle's autograd calls, without building
/// a graph or accumulating into a gradient store. For custom training loops, and for
/// measuring the kernels apart from Candle's gradient bookkeeping.
pub fn excitation_backward(
    x: &Tensor,
    weights: &ExcitationWeights,
    gate: Gate,
    grad: &Tensor,
) -> Result<ExcitationGradients> {
    if master_weights(x, weights) && !x.device().is_cpu() {
        bail!("excitation_backward: f32 master weights with a {:?} input are for the CPU kernel only", x.dtype())
    }
    let (op, params) = fused_operands(x, weights, gate)?;
    let (input, params) = op.backward(x, &params, grad)?;
    let shapes =
        [weights.fc1_weight.dims(), weights.fc1_bias.dims(), weights.fc2_weight.dims(), weights.fc2_bias.dims()];
    let [fc1_weight, fc1_bias, fc2_weight, fc2_bias] = unpack(&params.flatten_all()?, shapes)?;
    Ok(ExcitationGradients { input, fc1_weight, fc1_bias, fc2_weight, fc2_bias })
}

impl ExcitationOp {
    /// The gradients for `x` (its shape) and for the packed parameters (1-D, their dtype).
    fn backward(&self, x: &Tensor, params: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let op = ExcitationBackwardOp(*self, GradientSlot::default());
        let out = x.apply_op3_no_bwd(params, grad, &op)?;
        if params.dtype() == x.dtype() {
            let [dx, dparams] = unpack(&out, [x.dims(), params.dims()])?;
            return Ok((dx, dparams));
        }
        let dparams = op.1.take("excitation backward")?;
        Ok((out.reshape(x.dims())?, dparams))
    }
}

/// Checks the weights against `x` and packs them for the fused ops.
fn fused_operands(x: &Tensor, weights: &ExcitationWeights, gate: Gate) -> Result<(ExcitationOp, Tensor)> {
    let (_, channels, _, _) = x.dims4()?;
    let hidden = weights.hidden(channels)?;
    let master = master_weights(x, weights);
    for (name, t) in [
        ("fc1_weight", weights.fc1_weight),
        ("fc1_bias", weights.fc1_bias),
        ("fc2_weight", weights.fc2_weight),
        ("fc2_bias", weights.fc2_bias),
    ] {
        if t.dtype() != x.dtype() && !master {
            bail!(
                "excitation: {name} has dtype {:?} but the input has {:?} (and the weights are not all f32 master weights for a bf16 or f16 input)",
                t.dtype(),
                x.dtype()
            )
        }
    }
    // One flat parameter tensor keeps the op at two operands; Candle's `cat` backward splits
    // the parameter gradient back onto the individual weights.
    let params = Tensor::cat(
        &[
            weights.fc1_weight.flatten_all()?,
            weights.fc1_bias.clone(),
            weights.fc2_weight.flatten_all()?,
            weights.fc2_bias.clone(),
        ],
        0,
    )?;
    Ok((ExcitationOp { channels, hidden, gate }, params))
}

impl CustomOp2 for ExcitationOp {
    fn name(&self) -> &'static str {
        "sae-excitation"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, p: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("excitation", x, |x: T| {
            let p = weight_as_f32::<T>("excitation", p, pl)?;
            T::to_cpu_storage_owned(self.cpu_forward::<T>(x, xl, &p)?)
        });
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::excitation_forward(self, x, xl, p, pl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        p: &candle_core::MetalStorage,
        pl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        metal::excitation_forward(self, x, xl, p, pl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dparams) = self.backward(x, params, grad)?;
        Ok((Some(dx), Some(dparams)))
    }
}

impl CustomOp3 for ExcitationBackwardOp {
    fn name(&self) -> &'static str {
        "sae-excitation-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "excitation backward";
        // f32 master weights with a narrower input: their gradient goes to the slot, in f32.
        let packed = BackendStorage::dtype(p) == BackendStorage::dtype(x);
        let (out, dparams) = dispatch_float!(op, x, |x: T| {
            let params = weight_as_f32::<T>(op, p, pl)?;
            let g = same_dtype::<T>(op, g)?;
            let (out, dparams) = self.0.cpu_backward::<T>(x, xl, &params, g, gl, packed)?;
            (T::to_cpu_storage_owned(out), dparams)
        });
        if packed {
            return Ok((out, Shape::from(xl.shape().elem_count() + self.0.offsets().len)));
        }
        let dparams = Tensor::from_vec(dparams, pl.shape(), &candle_core::Device::Cpu)?;
        self.1.put(op, dparams)?;
        Ok((out, Shape::from(xl.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::excitation_backward(&self.0, x, xl, p, pl, g, gl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        p: &candle_core::MetalStorage,
        pl: &Layout,
        g: &candle_core::MetalStorage,
        gl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        metal::excitation_backward(&self.0, x, xl, p, pl, g, gl)
    }
}

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
//! stack, (K·C/r, C); [`excitation_branches`] takes one tensor per branch, as models keep
//! them, and the fused op packs them with the other weights in one copy.
//!
//! The fused CPU kernel reads `u` once in the forward pass to pool it and once to scale it,
//! and in the backward pass reads `u` once and the output gradient twice, which is what the
//! math requires. The gates `s` are recomputed in the backward pass from the pooled values
//! (a few kFLOP per image) rather than kept alive between passes.

mod batch_norm_end;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
mod op;

pub use batch_norm_end::batch_norm_excitation_add_relu;
pub use op::Gate;

use crate::cpu::{dispatch_float, same_dtype, unpack, weight_as_f32, GradientSlot};
use crate::relu::shortcut_slice;
use crate::Implementation;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use cpu::DenseParams;
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
        let fc1 = [(self.fc1_weight, self.fc1_bias)];
        Dense { fc1: &fc1, fc2_weight: self.fc2_weight, fc2_bias: self.fc2_bias }.check_shapes(channels)
    }
}

/// The name of branch `k`'s `what` ("weight", "bias") in errors: `fc1_weight` where the
/// reduction layer is one tensor.
fn fc1_name(branches: usize, k: usize, what: &str) -> String {
    if branches == 1 {
        format!("fc1_{what}")
    } else {
        format!("fc1 branch {k} {what}")
    }
}

/// Applies the excitation with the chosen implementation.
///
/// The weights have `x`'s dtype, or are all f32 with a bf16 or f16 `x`: the f32 master
/// weights of mixed-precision training, which the fused CPU kernel uses as they are and
/// whose gradients it returns in f32 (see `Dense::master` in the source); the other paths
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
    let fc1 = [(weights.fc1_weight, weights.fc1_bias)];
    excitation_branches(x, &fc1, weights.fc2_weight, weights.fc2_bias, gate, implementation)
}

/// [`excitation`] with the reduction layer given as its K branches, `fc1[k]` = (weight
/// (C/r, C), bias (C/r)) in concatenation order, as an SaE module keeps them. The fused op
/// packs all weights into one operand anyway, so it takes the branches straight into that
/// copy: stacking them first (`Tensor::cat`) and calling [`excitation`] computes the same with
/// one more copy of the reduction weights per call (in both directions in training).
pub fn excitation_branches(
    x: &Tensor,
    fc1: &[(&Tensor, &Tensor)],
    fc2_weight: &Tensor,
    fc2_bias: &Tensor,
    gate: Gate,
    implementation: Implementation,
) -> Result<Tensor> {
    let dense = Dense { fc1, fc2_weight, fc2_bias };
    let master = dense.master(x);
    if implementation == Implementation::Fused && x.device().is_cpu() && !dense.tracked() {
        return x.apply_op1(ExcitationUnpacked::new(x, dense, gate)?);
    }
    if implementation == Implementation::Fused && (x.device().is_cpu() || !master) {
        let (op, params) = fused_operands(x, dense, gate)?;
        return x.apply_op2(&params, op);
    }
    // The other paths take one stacked reduction weight, of the input's dtype (checked first,
    // so that a wrong branch is named rather than failing the stacking).
    dense.check_shapes(x.dims4()?.1)?;
    let stacked;
    let (w1, b1) = match fc1 {
        [(w, b)] => (*w, *b),
        _ => {
            let (ws, bs): (Vec<&Tensor>, Vec<&Tensor>) = fc1.iter().copied().unzip();
            stacked = (Tensor::cat(&ws, 0)?, Tensor::cat(&bs, 0)?);
            (&stacked.0, &stacked.1)
        }
    };
    if master {
        let cast = |t: &Tensor| crate::cast(t, x.dtype());
        let (w1, b1, w2, b2) = (cast(w1)?, cast(b1)?, cast(fc2_weight)?, cast(fc2_bias)?);
        let weights = ExcitationWeights { fc1_weight: &w1, fc1_bias: &b1, fc2_weight: &w2, fc2_bias: &b2 };
        return excitation(x, &weights, gate, implementation);
    }
    // What is left is the reference: the fused op has run above.
    excitation_reference(x, &ExcitationWeights { fc1_weight: w1, fc1_bias: b1, fc2_weight, fc2_bias }, gate)
}

/// `max(excitation_branches(x, …) + shortcut, 0)`: a residual block's excitation, addition
/// and ReLU. The fused CPU kernel adds the shortcut and clamps as it scales, so the
/// excitation's output is never written out and read back (nor kept alive for the backward
/// pass); its backward is the ReLU's mask on the output gradient, which is the shortcut's
/// gradient, then [`excitation_branches`]' backward. Elsewhere, and with the reference
/// kernels, [`excitation_branches`] then [`crate::add_relu`]. `shortcut` has `x`'s shape and
/// dtype.
#[allow(clippy::too_many_arguments)]
pub fn excitation_add_relu(
    x: &Tensor,
    fc1: &[(&Tensor, &Tensor)],
    fc2_weight: &Tensor,
    fc2_bias: &Tensor,
    gate: Gate,
    shortcut: &Tensor,
    implementation: Implementation,
) -> Result<Tensor> {
    if implementation != Implementation::Fused || !x.device().is_cpu() {
        let y = excitation_branches(x, fc1, fc2_weight, fc2_bias, gate, implementation)?;
        return crate::add_relu(&y, shortcut, implementation);
    }
    crate::relu::check_shortcut("excitation", x, shortcut)?;
    let dense = Dense { fc1, fc2_weight, fc2_bias };
    let shortcut = shortcut.contiguous()?;
    if dense.tracked() {
        let (op, params) = fused_operands(x, dense, gate)?;
        return x.apply_op3(&params, &shortcut, op);
    }
    x.apply_op2(&shortcut, ExcitationUnpacked::new(x, dense, gate)?)
}

/// An SE/SaE layer's dense weights as the ops take them: the reduction layer as its K
/// branches (weight, bias) and the excitation layer.
#[derive(Clone, Copy)]
struct Dense<'a> {
    fc1: &'a [(&'a Tensor, &'a Tensor)],
    fc2_weight: &'a Tensor,
    fc2_bias: &'a Tensor,
}

impl Dense<'_> {
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.fc1.iter().flat_map(|&(w, b)| [w, b]).chain([self.fc2_weight, self.fc2_bias])
    }

    /// Checks the reduction layers (one (weight, bias) per branch; with one, the stack of all
    /// branches) and the excitation layer against `channels`; returns the hidden width.
    fn check_shapes(&self, channels: usize) -> Result<usize> {
        let expect = |t: &Tensor, name: &str, dims: &[usize]| -> Result<()> {
            if t.dims() != dims {
                bail!("excitation: {name} must have shape {dims:?}, got {:?}", t.dims())
            }
            Ok(())
        };
        if self.fc1.is_empty() {
            bail!("excitation: no reduction layer (fc1) given")
        }
        let mut hidden = 0;
        for (k, (weight, bias)) in self.fc1.iter().enumerate() {
            let name = |what: &str| fc1_name(self.fc1.len(), k, what);
            let rows = match weight.dims() {
                &[rows, c] if c == channels && rows > 0 => rows,
                other => bail!("excitation: {} must have shape (rows > 0, {channels}), got {other:?}", name("weight")),
            };
            expect(bias, &name("bias"), &[rows])?;
            hidden += rows;
        }
        expect(self.fc2_weight, "fc2_weight", &[channels, hidden])?;
        expect(self.fc2_bias, "fc2_bias", &[channels])?;
        Ok(hidden)
    }

    /// Whether they are the f32 master weights of mixed-precision training for a bf16 or f16
    /// input `x` (all f32). The fused CPU kernel takes them as they are: it computes in f32
    /// anyway, so a bf16 copy per step would only be rounded and converted back, and their
    /// gradient is returned in f32. Every other path casts them to the input's dtype first.
    fn master(&self, x: &Tensor) -> bool {
        matches!(x.dtype(), DType::BF16 | DType::F16) && self.tensors().all(|t| t.dtype() == DType::F32)
    }

    /// Whether any of them needs a gradient.
    fn tracked(&self) -> bool {
        self.tensors().any(|t| t.track_op())
    }
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
    let fc1 = [(weights.fc1_weight, weights.fc1_bias)];
    let dense = Dense { fc1: &fc1, fc2_weight: weights.fc2_weight, fc2_bias: weights.fc2_bias };
    if dense.master(x) && !x.device().is_cpu() {
        bail!("excitation_backward: f32 master weights with a {:?} input are for the CPU kernel only", x.dtype())
    }
    let (op, params) = fused_operands(x, dense, gate)?;
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
        op.1.gradients("excitation backward", &out, x.dims(), params)
    }
}

/// Checks the weights against `x` and packs them for the fused ops: the reduction weights
/// (branch by branch: their stack), their biases, the excitation weight and bias, in one copy.
fn fused_operands(x: &Tensor, dense: Dense, gate: Gate) -> Result<(ExcitationOp, Tensor)> {
    let op = checked_op(x, dense, gate)?;
    // One flat parameter tensor keeps the op at two operands; Candle's `cat` backward splits
    // the parameter gradient back onto the individual weights.
    Ok((op, Tensor::cat(&packed_pieces(dense)?, 0)?))
}

/// The weights flattened, in the packed operand's order (see [`fused_operands`]).
fn packed_pieces(dense: Dense) -> Result<Vec<Tensor>> {
    let mut pieces: Vec<Tensor> = dense.fc1.iter().map(|(w, _)| w.flatten_all()).collect::<Result<_>>()?;
    pieces.extend(dense.fc1.iter().map(|(_, b)| (*b).clone()));
    pieces.extend([dense.fc2_weight.flatten_all()?, dense.fc2_bias.clone()]);
    Ok(pieces)
}

/// The op for `x` and these weights, after checking their shapes and dtypes. Branches of
/// equal size stay branches in its forward products (see [`ExcitationOp::branches`]).
fn checked_op(x: &Tensor, dense: Dense, gate: Gate) -> Result<ExcitationOp> {
    let (_, channels, _, _) = x.dims4()?;
    let hidden = dense.check_shapes(channels)?;
    let (master, fc1) = (dense.master(x), dense.fc1);
    // The names are formatted only for the error: this runs on every call.
    let check_dtype = |t: &Tensor, name: &dyn Fn() -> String| -> Result<()> {
        if t.dtype() != x.dtype() && !master {
            bail!(
                "excitation: {} has dtype {:?} but the input has {:?} (and the weights are not all f32 master weights for a bf16 or f16 input)",
                name(),
                t.dtype(),
                x.dtype()
            )
        }
        Ok(())
    };
    for (k, &(w, b)) in fc1.iter().enumerate() {
        check_dtype(w, &|| fc1_name(fc1.len(), k, "weight"))?;
        check_dtype(b, &|| fc1_name(fc1.len(), k, "bias"))?;
    }
    check_dtype(dense.fc2_weight, &|| "fc2_weight".into())?;
    check_dtype(dense.fc2_bias, &|| "fc2_bias".into())?;
    let equal = fc1.iter().all(|(w, _)| w.dim(0).ok() == Some(hidden / fc1.len()));
    Ok(ExcitationOp { channels, hidden, branches: if equal { fc1.len() } else { 1 }, gate })
}

/// The CPU forward op where no weight needs a gradient (inference, or weights detached): the
/// kernel reads the weights from their own storage instead of a copy of them all in one packed
/// operand, which a differentiable op needs (Candle's custom ops take at most three operands,
/// and the packed gradient is split back onto the weights). At batch 1 that copy per call was
/// 5 % of a SENetV2-ResNet-50 140×140 inference. The input's gradient, if one is asked for,
/// comes from the packed backward op.
struct ExcitationUnpacked {
    op: ExcitationOp,
    fc1: Vec<(Tensor, Tensor)>,
    fc2: (Tensor, Tensor),
}

impl ExcitationUnpacked {
    fn new(x: &Tensor, dense: Dense, gate: Gate) -> Result<Self> {
        let op = checked_op(x, dense, gate)?;
        let fc1 = dense.fc1.iter().map(|&(w, b)| (w.clone(), b.clone())).collect();
        Ok(Self { op, fc1, fc2: (dense.fc2_weight.clone(), dense.fc2_bias.clone()) })
    }

    /// The forward pass, with the residual addition and ReLU when a `residual` is given.
    fn forward(&self, x: &CpuStorage, xl: &Layout, residual: Option<(&CpuStorage, &Layout)>) -> Result<CpuStorage> {
        let k = self.fc1.len();
        let tensors =
            self.fc1.iter().map(|(w, _)| w).chain(self.fc1.iter().map(|(_, b)| b)).chain([&self.fc2.0, &self.fc2.1]);
        let storages: Vec<_> = tensors.map(|t| t.storage_and_layout()).collect();
        Ok(dispatch_float!("excitation", x, |x: T| {
            let values = storages
                .iter()
                .map(|(storage, layout)| match &**storage {
                    Storage::Cpu(w) => weight_as_f32::<T>("excitation", w, layout),
                    _ => bail!("excitation: the weights are not on the CPU"),
                })
                .collect::<Result<Vec<_>>>()?;
            let params = DenseParams {
                w1: values[..k].iter().map(|v| &**v).collect(),
                b1: values[k..2 * k].iter().map(|v| &**v).collect(),
                w2: &values[2 * k],
                b2: &values[2 * k + 1],
            };
            let len = xl.shape().elem_count();
            let residual = residual.map(|(r, rl)| shortcut_slice::<T>("excitation", r, rl, len)).transpose()?;
            T::to_cpu_storage_owned(self.op.cpu_forward::<T>(x, xl, &params, residual)?)
        }))
    }

    /// The input's gradient, from the packed backward op.
    fn input_gradient(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let fc1: Vec<(&Tensor, &Tensor)> = self.fc1.iter().map(|(w, b)| (w, b)).collect();
        let dense = Dense { fc1: &fc1, fc2_weight: &self.fc2.0, fc2_bias: &self.fc2.1 };
        let (op, params) = fused_operands(x, dense, self.op.gate)?;
        Ok(op.backward(x, &params, grad)?.0)
    }
}

impl CustomOp1 for ExcitationUnpacked {
    fn name(&self) -> &'static str {
        "sae-excitation-unpacked"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.forward(x, xl, None)?, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_gradient(x, grad)?))
    }
}

/// (x, shortcut): [`excitation_add_relu`] without weight gradients.
impl CustomOp2 for ExcitationUnpacked {
    fn name(&self) -> &'static str {
        "sae-excitation-add-relu-unpacked"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, r: &CpuStorage, rl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.forward(x, xl, Some((r, rl)))?, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _r: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = crate::relu::relu_gradient(res, grad)?;
        Ok((Some(self.input_gradient(x, &grad)?), Some(grad)))
    }
}

/// (x, packed parameters, shortcut): [`excitation_add_relu`] on the CPU.
impl CustomOp3 for ExcitationOp {
    fn name(&self) -> &'static str {
        "sae-excitation-add-relu"
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
        let out = dispatch_float!("excitation", x, |x: T| {
            let p = weight_as_f32::<T>("excitation", p, pl)?;
            let r = shortcut_slice::<T>("excitation", r, rl, xl.shape().elem_count())?;
            T::to_cpu_storage_owned(self.cpu_forward::<T>(x, xl, &DenseParams::packed(self, &p)?, Some(r))?)
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = crate::relu::relu_gradient(res, grad)?;
        let (dx, dparams) = self.backward(x, params, &grad)?;
        Ok((Some(dx), Some(dparams), Some(grad)))
    }
}

impl CustomOp2 for ExcitationOp {
    fn name(&self) -> &'static str {
        "sae-excitation"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, p: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("excitation", x, |x: T| {
            let p = weight_as_f32::<T>("excitation", p, pl)?;
            T::to_cpu_storage_owned(self.cpu_forward::<T>(x, xl, &DenseParams::packed(self, &p)?, None)?)
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
        let (out, dparams) = dispatch_float!(op, x, |x: T| {
            let params = weight_as_f32::<T>(op, p, pl)?;
            let g = same_dtype::<T>(op, g)?;
            let (out, dparams) = self.0.cpu_backward::<T>(x, xl, &params, g, gl)?;
            (T::to_cpu_storage_owned(out), dparams)
        });
        self.1.output(op, out, xl.shape().elem_count(), dparams)
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

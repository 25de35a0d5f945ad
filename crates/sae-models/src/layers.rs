//! Layers shared by the networks: convolution (through `sae-kernels`), BatchNorm,
//! dense, and the SE / SaE channel-attention module.
//!
//! Each layer is a struct implementing `Module`/`ModuleT`, built by `new(…, vb)` where `vb`
//! is already at the layer's path, so tensor names follow PyTorch state dicts. Every layer
//! runs in its input's type: it rounds its weights to that type for the pass (a no-op when
//! they already have it), which is how [`crate::Precision::Bf16`] reaches every layer.

use crate::config::ModelConfig;
use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};
use sae_kernels::cast;
use sae_kernels::{Conv2dConfig, DepthwiseConfig, Gate, Implementation};

/// Kaiming-normal with fan-out and ReLU gain, as torchvision initialises ResNet convolutions.
const CONV_INIT: Init =
    Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanOut, non_linearity: NonLinearity::ReLU };

/// Shape of a convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Channel groups.
    pub groups: usize,
}

impl ConvSpec {
    /// A convolution with `padding = kernel / 2` and one group.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Self {
        Self { in_channels, out_channels, kernel, stride, padding: kernel / 2, groups: 1 }
    }

    /// The same with `groups` groups.
    pub fn grouped(self, groups: usize) -> Self {
        Self { groups, ..self }
    }

    /// Output (height, width) for an input of `h` × `w`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let out = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (out(h), out(w))
    }

    /// Multiply-accumulates for an input of `h` × `w`.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let (oh, ow) = self.output_size(h, w);
        (oh * ow * self.out_channels * (self.in_channels / self.groups) * self.kernel * self.kernel) as u64
    }

    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }
}

/// 2-D convolution with an optional bias, run by `sae-kernels` (its depthwise op when
/// groups = channels).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    spec: ConvSpec,
    kernels: Implementation,
}

impl Conv2d {
    /// Creates `weight` (out, in / groups, k, k) and, when `bias`, `bias` (out) under `vb`.
    pub fn new(spec: ConvSpec, bias: bool, kernels: Implementation, vb: VarBuilder) -> Result<Self> {
        let shape = (spec.out_channels, spec.in_channels / spec.groups, spec.kernel, spec.kernel);
        let weight = vb.get_with_hints(shape, "weight", CONV_INIT)?;
        let bias = if bias { Some(vb.get_with_hints(spec.out_channels, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, spec, kernels })
    }

    /// The convolution's shape.
    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// `max(conv(x)·scale + shift, 0)` per output channel (without the `max` unless `relu`)
    /// as one op where the convolution is not depthwise (`sae_kernels::conv2d_affine`); a
    /// bias folds into the shift.
    fn forward_affine(&self, x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
        let s = &self.spec;
        let shift = match &self.bias {
            Some(b) => (shift + (cast(b, DType::F32)? * scale)?)?,
            None => shift.clone(),
        };
        if s.is_depthwise() {
            return sae_kernels::channel_affine(&self.forward(x)?, scale, &shift, relu, self.kernels);
        }
        let cfg = Conv2dConfig { stride: s.stride, padding: s.padding, groups: s.groups };
        sae_kernels::conv2d_affine(x, &self.weight, cfg, scale, &shift, relu, self.kernels)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let y = if s.is_depthwise() {
            let cfg = DepthwiseConfig { stride: s.stride, padding: s.padding };
            sae_kernels::depthwise_conv2d(x, &cast(&self.weight, x.dtype())?, cfg, self.kernels)?
        } else {
            // The convolution takes f32 (master) weights with a bf16 input as they are: no
            // bf16 copy of them, and an f32 gradient (see `sae_kernels::conv2d`).
            let cfg = Conv2dConfig { stride: s.stride, padding: s.padding, groups: s.groups };
            sae_kernels::conv2d(x, &self.weight, cfg, self.kernels)?
        };
        match &self.bias {
            Some(b) => sae_kernels::add_channel_bias(&y, &cast(b, x.dtype())?, self.kernels),
            None => Ok(y),
        }
    }
}

/// What follows a BatchNorm in the same op.
#[derive(Clone, Copy)]
enum Then<'a> {
    Nothing,
    Relu,
    /// `max(BN(x) + shortcut, 0)`: the end of a residual block.
    AddRelu(&'a Tensor),
    /// `max(excitation(BN(x)) + shortcut, 0)`: the end of an SE/SaE residual block; with
    /// `graph` false no gradient reaches the excitation's weights.
    ExciteAddRelu {
        excitation: &'a Excitation,
        shortcut: &'a Tensor,
        graph: bool,
    },
}

impl Then<'_> {
    /// Whether an op that knows no shortcut ends in a ReLU.
    fn relu(self) -> bool {
        matches!(self, Then::Relu)
    }

    /// `max(y + shortcut, 0)` for `AddRelu` (where the op before knew no shortcut), that after
    /// the excitation for `ExciteAddRelu`, else `y`.
    fn add_relu(self, y: Tensor, kernels: Implementation) -> Result<Tensor> {
        match self {
            Then::AddRelu(shortcut) => sae_kernels::add_relu(&y, shortcut, kernels),
            Then::ExciteAddRelu { excitation, shortcut, graph } => excitation.forward_add_relu(&y, shortcut, graph),
            _ => Ok(y),
        }
    }
}

/// Momentum of the running statistics, as PyTorch's: `running = 0.9·running + 0.1·batch`.
const BN_MOMENTUM: f64 = 0.1;

/// BatchNorm over channels with `weight`, `bias`, `running_mean`, `running_var` (PyTorch's
/// names and semantics): batch statistics and a running-statistics update (unbiased variance)
/// in training mode, the running statistics in eval mode. Training mode runs the
/// `sae-kernels` op, or takes the statistics over all replicas inside
/// [`crate::sync_batch_norm::with_sync_batch_norm`].
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    kernels: Implementation,
}

impl BatchNorm {
    /// Creates the four vectors of `channels` under `vb` (γ = 1, β = 0, mean 0, variance 1).
    pub fn new(channels: usize, eps: f64, kernels: Implementation, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
        Ok(Self { weight, bias, running_mean, running_var, eps, kernels })
    }

    /// BatchNorm followed by a ReLU, fused into one op (`max(BN(x), 0)`).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, Then::Relu)
    }

    /// Eval mode as a per-channel `(scale, shift)`, f32 (see `sae_kernels::batch_norm_eval_affine`).
    fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let (mean, var) = (self.running_mean.as_tensor(), self.running_var.as_tensor());
        sae_kernels::batch_norm_eval_affine(&self.weight, &self.bias, mean, var, self.eps)
    }

    fn forward_then(&self, x: &Tensor, train: bool, then: Then) -> Result<Tensor> {
        let (weight, bias) = (cast(&self.weight, x.dtype())?, cast(&self.bias, x.dtype())?);
        if !train {
            let (mean, var) = (self.running_mean.as_tensor(), self.running_var.as_tensor());
            let y = sae_kernels::batch_norm_eval(x, &weight, &bias, mean, var, self.eps, then.relu(), self.kernels)?;
            return then.add_relu(y, self.kernels);
        }
        let (out, count) = match crate::sync_batch_norm::current() {
            Some(sum) => {
                let (out, count) =
                    crate::sync_batch_norm::batch_norm_train_synced(x, &weight, &bias, self.eps, then.relu(), &sum)?;
                (sae_kernels::BatchNormOutput { output: then.add_relu(out.output, self.kernels)?, ..out }, count)
            }
            None => {
                let (n, _, h, w) = x.dims4()?;
                let out = match then {
                    Then::AddRelu(shortcut) => {
                        sae_kernels::batch_norm_train_add_relu(x, &weight, &bias, self.eps, shortcut, self.kernels)?
                    }
                    Then::ExciteAddRelu { excitation, shortcut, graph } => {
                        excitation.after_batch_norm(x, &weight, &bias, self.eps, shortcut, graph)?
                    }
                    _ => sae_kernels::batch_norm_train(x, &weight, &bias, self.eps, then.relu(), self.kernels)?,
                };
                (out, n * h * w)
            }
        };
        let count = count as f64;
        let unbiased = if count > 1.0 { (out.variance * (count / (count - 1.0)))? } else { out.variance };
        let update = |running: &Var, batch: &Tensor| -> Result<()> {
            let batch = cast(batch, running.dtype())?;
            running.set(&((running.as_tensor().detach() * (1.0 - BN_MOMENTUM))? + (batch * BN_MOMENTUM)?)?)
        };
        update(&self.running_mean, &out.mean)?;
        update(&self.running_var, &unbiased)?;
        Ok(out.output)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, Then::Nothing)
    }
}

/// Dense layer `y = x Wᵀ + b` with PyTorch's default initialisation, U(±1/√fan_in).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Creates `weight` (out, in) and `bias` (out) under `vb`.
    pub fn new(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let weight = vb.get_with_hints((out_features, in_features), "weight", init)?;
        let bias = vb.get_with_hints(out_features, "bias", init)?;
        Ok(Self { weight, bias })
    }

    /// The weight, (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, (out).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&cast(&self.weight, x.dtype())?.t()?)?.broadcast_add(&cast(&self.bias, x.dtype())?)
    }
}

/// The SE module (one reduction layer) or the SaE module of SENetV2 (K parallel reduction
/// layers whose outputs are concatenated).
///
/// Tensor names: SE has `fc1.weight` (C/r, C), `fc1.bias`, `fc2.weight` (C, C/r),
/// `fc2.bias`. SaE has one reduction layer per branch, `fc1.{k}.weight` (C/r, C) and
/// `fc1.{k}.bias` for k = 0..K−1 in concatenation order, then `fc2.weight` (C, K·C/r) and
/// `fc2.bias`.
#[derive(Debug, Clone)]
pub struct Excitation {
    channels: usize,
    hidden: usize,
    branches: Vec<Linear>,
    fc2: Linear,
    gate: Gate,
    kernels: Implementation,
}

impl Excitation {
    /// SE on `channels` channels when `cardinality` is `None`, SaE with K branches otherwise.
    pub fn new(channels: usize, cardinality: Option<usize>, cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let reduced = cfg.reduced_channels(channels);
        let fc1 = vb.pp("fc1");
        let branches = match cardinality {
            None => vec![Linear::new(channels, reduced, fc1)?],
            Some(k) => (0..k).map(|i| Linear::new(channels, reduced, fc1.pp(i))).collect::<Result<_>>()?,
        };
        let hidden = reduced * branches.len();
        let fc2 = Linear::new(hidden, channels, vb.pp("fc2"))?;
        Ok(Self { channels, hidden, branches, fc2, gate: cfg.gate, kernels: cfg.kernels })
    }

    /// Multiply-accumulates of the dense layers for one image.
    pub fn macs(&self) -> u64 {
        (2 * self.channels * self.hidden) as u64
    }
}

impl Module for Excitation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None, true)
    }
}

impl Excitation {
    /// `max(self(x) + shortcut, 0)`, a residual block's end, in one pass on the CPU
    /// (`sae_kernels::excitation_add_relu`). With `graph` false the weights go to the kernel
    /// detached: no gradient can reach them, so the CPU kernel reads them in place instead of
    /// packing a copy of them all into one operand for its backward.
    pub(crate) fn forward_add_relu(&self, x: &Tensor, shortcut: &Tensor, graph: bool) -> Result<Tensor> {
        self.forward_residual(x, Some(shortcut), graph)
    }

    /// The dense layers' weights as the kernels take them: f32 weights stay f32 with a bf16
    /// or f16 input (`excitation` takes them as master weights — the CPU kernel computes in
    /// f32 — or casts them itself), others are cast to `x`'s dtype; detached unless `graph`.
    fn weights_for(&self, x: &Tensor, graph: bool) -> Result<DenseWeights> {
        let master = matches!(x.dtype(), DType::BF16 | DType::F16);
        let like_x = |t: &Tensor| {
            let t = if master && t.dtype() == DType::F32 { t.clone() } else { cast(t, x.dtype())? };
            Ok::<_, candle_core::Error>(if graph { t } else { t.detach() })
        };
        let fc1 = self.branches.iter().map(|b| Ok((like_x(b.weight())?, like_x(b.bias())?))).collect::<Result<_>>()?;
        Ok((fc1, like_x(self.fc2.weight())?, like_x(self.fc2.bias())?))
    }

    fn forward_residual(&self, x: &Tensor, shortcut: Option<&Tensor>, graph: bool) -> Result<Tensor> {
        let (fc1, w2, b2) = self.weights_for(x, graph)?;
        let fc1: Vec<(&Tensor, &Tensor)> = fc1.iter().map(|(w, b)| (w, b)).collect();
        // The branches go to the kernel as they are: it packs them with the other weights in
        // one copy (stacking them here first was a second copy per call).
        match shortcut {
            None => sae_kernels::excitation_branches(x, &fc1, &w2, &b2, self.gate, self.kernels),
            Some(s) => sae_kernels::excitation_add_relu(x, &fc1, &w2, &b2, self.gate, s, self.kernels),
        }
    }

    /// `max(self(BN(x)) + shortcut, 0)` with BatchNorm in training mode (γ `weight`, β
    /// `bias`), one op on the CPU (`sae_kernels::batch_norm_excitation_add_relu`):
    /// BatchNorm's output is neither written out nor kept for the backward pass. With `graph`
    /// false the dense layers' weights go to it detached.
    fn after_batch_norm(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        shortcut: &Tensor,
        graph: bool,
    ) -> Result<sae_kernels::BatchNormOutput> {
        let (fc1, w2, b2) = self.weights_for(x, graph)?;
        let fc1: Vec<(&Tensor, &Tensor)> = fc1.iter().map(|(w, b)| (w, b)).collect();
        sae_kernels::batch_norm_excitation_add_relu(
            x,
            weight,
            bias,
            eps,
            &fc1,
            &w2,
            &b2,
            self.gate,
            shortcut,
            self.kernels,
        )
    }
}

/// An excitation's dense weights as its kernels take them: the reduction branches' (weight,
/// bias), then the excitation layer's weight and bias.
type DenseWeights = (Vec<(Tensor, Tensor)>, Tensor, Tensor);

/// A convolution followed by BatchNorm, the unit every network here is built from.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// The convolution.
    pub conv: Conv2d,
    /// Its BatchNorm.
    pub bn: BatchNorm,
}

impl ConvBn {
    /// `conv` at `vb.pp(conv_name)`, `bn` at `vb.pp(bn_name)`.
    pub fn new(spec: ConvSpec, cfg: &ModelConfig, vb: &VarBuilder, conv_name: &str, bn_name: &str) -> Result<Self> {
        let conv = Conv2d::new(spec, cfg.conv_bias, cfg.kernels, vb.pp(conv_name))?;
        let bn = BatchNorm::new(spec.out_channels, cfg.bn_eps, cfg.kernels, vb.pp(bn_name))?;
        Ok(Self { conv, bn })
    }

    /// Convolution, BatchNorm and a ReLU (the last two fused; in eval mode all three).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, Then::Relu)
    }

    /// `max(BN(conv(x)) + shortcut, 0)`, a residual block's end; in training mode BatchNorm,
    /// the addition and the ReLU are one op (`sae_kernels::batch_norm_train_add_relu`).
    pub fn forward_add_relu_t(&self, x: &Tensor, shortcut: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, Then::AddRelu(shortcut))
    }

    /// `max(excitation(BN(conv(x))) + shortcut, 0)` in training mode, an SE/SaE residual
    /// block's end: BatchNorm, the excitation, the addition and the ReLU are one op on the CPU
    /// (`sae_kernels::batch_norm_excitation_add_relu`). With `graph` false no gradient reaches
    /// the excitation's weights.
    pub(crate) fn train_excitation_add_relu(
        &self,
        x: &Tensor,
        excitation: &Excitation,
        shortcut: &Tensor,
        graph: bool,
    ) -> Result<Tensor> {
        self.forward_then(x, true, Then::ExciteAddRelu { excitation, shortcut, graph })
    }

    /// In eval mode BatchNorm is a per-channel scale and shift, which the convolution
    /// applies to each image's output while it is in cache (no pass of its own).
    fn forward_then(&self, x: &Tensor, train: bool, then: Then) -> Result<Tensor> {
        if train {
            return self.bn.forward_then(&x.apply(&self.conv)?, train, then);
        }
        let (scale, shift) = self.bn.eval_affine()?;
        then.add_relu(self.conv.forward_affine(x, &scale, &shift, then.relu())?, self.bn.kernels)
    }
}

impl ModuleT for ConvBn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, Then::Nothing)
    }
}

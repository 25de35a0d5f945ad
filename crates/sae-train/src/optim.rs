//! Optimisers: Adam as Keras defines it (the paper's CIFAR setting) and SGD with momentum,
//! optional Nesterov and L2 or decoupled weight decay (the paper's ImageNet setting).
//!
//! They update only the variables they are given — the model's trainable ones, never the
//! BatchNorm running statistics — and their state (moments, step) saves to named tensors
//! for checkpoints.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, TensorId, Var};
use sae_kernels::{
    adam_interleaved_applies, adam_kernel_takes, adam_update, adam_update_interleaved, AdamStep, Implementation,
};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Where [`Optimizer::load_state`] gets each saved tensor, by name: `None` where it was not
/// saved (a moment never updated).
pub type StateSource<'a> = &'a mut dyn FnMut(&str) -> Result<Option<Tensor>>;

/// Optimiser settings, serialised with each run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// Adam, Keras form: `α_t = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)`, `θ −= α_t·m/(√v + ε)`.
    Adam {
        /// Learning rate (Keras default 1e-3).
        lr: f64,
        /// β₁ (0.9).
        beta1: f64,
        /// β₂ (0.999).
        beta2: f64,
        /// ε (Keras 1e-7).
        eps: f64,
    },
    /// AdamW, PyTorch's form (`torch.optim.AdamW`, timm's usual optimiser): weight decay
    /// decoupled from the gradient, `θ ← θ·(1 − lr·wd)`, then Adam with bias-corrected moments
    /// and ε added to the corrected `√v̂`: `θ −= lr·m̂/(√v̂ + ε)`.
    #[serde(rename = "adamw")]
    AdamW {
        /// Learning rate (PyTorch default 1e-3).
        lr: f64,
        /// β₁ (0.9).
        beta1: f64,
        /// β₂ (0.999).
        beta2: f64,
        /// ε (PyTorch 1e-8).
        eps: f64,
        /// Decoupled weight decay (PyTorch default 1e-2).
        weight_decay: f64,
    },
    /// SGD with momentum (PyTorch form: `b = μb + g`, step `g + μb` with Nesterov, else `b`).
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum μ.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
        /// Weight decay.
        weight_decay: f64,
        /// `true`: decoupled (`θ −= lr·wd·θ`); `false`: L2 (`g += wd·θ`).
        decoupled: bool,
    },
}

impl OptimizerConfig {
    /// Keras's Adam defaults, the paper's CIFAR optimiser.
    pub fn keras_adam() -> Self {
        OptimizerConfig::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-7 }
    }

    /// PyTorch's AdamW defaults: lr 1e-3, β (0.9, 0.999), ε 1e-8, weight decay 1e-2.
    pub fn pytorch_adamw() -> Self {
        OptimizerConfig::AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }

    /// The paper's ImageNet optimiser: SGD, momentum 0.9, L2 weight decay 1e-4, lr 0.01.
    pub fn paper_sgd() -> Self {
        OptimizerConfig::Sgd { lr: 0.01, momentum: 0.9, nesterov: false, weight_decay: 1e-4, decoupled: false }
    }

    /// The defaults of the optimiser named `name` as the command lines name them (the config's
    /// `kind`): `adam` Keras's Adam, `adamw` PyTorch's AdamW, `sgd` the paper's SGD.
    pub fn default_named(name: &str) -> Option<Self> {
        match name {
            "adam" => Some(Self::keras_adam()),
            "adamw" => Some(Self::pytorch_adamw()),
            "sgd" => Some(Self::paper_sgd()),
            _ => None,
        }
    }

    /// This optimiser's name, as [`Self::default_named`] takes it.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Adam { .. } => "adam",
            OptimizerConfig::AdamW { .. } => "adamw",
            OptimizerConfig::Sgd { .. } => "sgd",
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Adam { lr, .. } | OptimizerConfig::AdamW { lr, .. } | OptimizerConfig::Sgd { lr, .. } => {
                *lr
            }
        }
    }

    /// The optimiser this config describes, over `vars` (name, variable). `implementation` is
    /// the run's kernel switch (`ModelConfig::kernels`): Adam's update runs the fused in-place
    /// kernel or its Candle composition; SGD is always composed of Candle ops.
    pub fn build(&self, vars: Vec<(String, Var)>, implementation: Implementation) -> Box<dyn Optimizer> {
        match *self {
            OptimizerConfig::Adam { lr, beta1, beta2, eps } => {
                Box::new(Adam::new(vars, implementation, [lr, beta1, beta2, eps], None))
            }
            OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                Box::new(Adam::new(vars, implementation, [lr, beta1, beta2, eps], Some(weight_decay)))
            }
            OptimizerConfig::Sgd { lr, momentum, nesterov, weight_decay, decoupled } => {
                Box::new(Sgd { lr, momentum, nesterov, weight_decay, decoupled, params: Params::new(vars) })
            }
        }
    }
}

/// An optimiser over named variables, as candle-nn's: it updates only the variables it was
/// built with, from the gradients of one backward pass, and its state (moments or momentum
/// buffers, the step count) saves to named tensors for checkpoints. `Send`, so that a step can
/// run in the thread pool the forward and backward ran in (`Device::with_context`).
pub trait Optimizer: Send {
    /// Starts a step: the step count goes up by one, and [`Optimizer::update`] then updates
    /// the variables one at a time (during a backward pass: `Tensor::backward_consuming_with`).
    fn begin_step(&mut self);
    /// Updates the variable whose tensor has id `var` from its gradient `grad`, as part of the
    /// step [`Optimizer::begin_step`] started; `false`, and nothing done, where `var` is not one
    /// of the optimiser's.
    fn update(&mut self, var: TensorId, grad: &Tensor) -> Result<bool>;
    /// The ids of the variables' tensors, in the order the optimiser was given them.
    fn variable_ids(&self) -> Vec<TensorId>;
    /// Applies one update from `grads`. Variables without a gradient are left alone.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.begin_step();
        for id in self.variable_ids() {
            if let Some(g) = grads.get_id(id) {
                self.update(id, g)?;
            }
        }
        Ok(())
    }
    /// Current learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate (schedules call this).
    fn set_lr(&mut self, lr: f64);
    /// Steps taken.
    fn steps(&self) -> u64;
    /// State as named tensors: `{var}.m`, `{var}.v` (the momentum buffer is `{var}.m`) and
    /// `step` (a one-element tensor); copies, as [`Optimizer::for_each_state_tensor`] makes
    /// them.
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut tensors = BTreeMap::new();
        self.for_each_state_tensor(&mut |name, t| {
            tensors.insert(name, t);
            Ok(())
        })?;
        Ok(tensors)
    }
    /// Restores state saved by [`Optimizer::state_tensors`], checking shapes, asking `tensors`
    /// for each by name as it goes (so that a file can be read one tensor at a time); `path`
    /// names the file in errors. After an error the state is partly restored: callers drop
    /// the optimiser (a run that cannot resume stops).
    fn load_state(&mut self, tensors: StateSource, path: &Path) -> Result<()>;
    /// Hands [`Optimizer::state_tensors`] to `f` one at a time, in the order
    /// [`Optimizer::load_state`] asks for them: `step`, then each variable's `m` and `v` in the
    /// order the optimiser was given the variables (rank 0's state to the other ranks, who
    /// load each tensor as it arrives).
    fn for_each_state_tensor(&self, f: &mut dyn FnMut(String, Tensor) -> Result<()>) -> Result<()>;
    /// Writes [`Optimizer::state_tensors`] to `path` as safetensors (checkpoints), each tensor
    /// read out of the optimiser's memory only as the writer reaches it.
    fn save_state(&self, path: &Path) -> Result<()>;
}

/// One tensor of an optimiser's saved state: a tensor, or one moment (`which`: 0 for m, 1 for
/// v) of a variable's interleaved (m, v) pairs, whose values are read out only when a tensor
/// or the file writer needs them.
enum StateView<'a> {
    Tensor(Tensor),
    /// A state tensor the optimiser holds (copied where a tensor is made of it: the updates
    /// change it in place).
    State(&'a Var),
    Moment {
        pairs: &'a [f32],
        which: usize,
        var: &'a Var,
    },
}

impl StateView<'_> {
    /// One moment's values, out of (m, v) pairs.
    fn moment(pairs: &[f32], which: usize) -> impl Iterator<Item = f32> + '_ {
        pairs.iter().skip(which).step_by(2).copied()
    }

    fn into_tensor(self) -> Result<Tensor> {
        Ok(match self {
            Self::Tensor(t) => t,
            Self::State(t) => t.as_tensor().copy()?,
            Self::Moment { pairs, which, var } => {
                Tensor::from_vec(Self::moment(pairs, which).collect(), var.shape(), var.device())?
            }
        })
    }
}

impl safetensors::View for StateView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Self::Tensor(t) => safetensors::View::dtype(t),
            Self::State(t) => safetensors::View::dtype(t.as_tensor()),
            Self::Moment { .. } => safetensors::Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Self::Tensor(t) => t.dims(),
            Self::State(t) => t.dims(),
            Self::Moment { var, .. } => var.dims(),
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Tensor(t) => safetensors::View::data(t),
            Self::State(t) => safetensors::View::data(t.as_tensor()),
            Self::Moment { pairs, which, .. } => {
                Cow::Owned(Self::moment(pairs, *which).flat_map(f32::to_le_bytes).collect())
            }
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Self::Tensor(t) => safetensors::View::data_len(t),
            Self::State(t) => safetensors::View::data_len(t.as_tensor()),
            Self::Moment { pairs, .. } => pairs.len() / 2 * std::mem::size_of::<f32>(),
        }
    }
}

/// Writes `views` to `path` as safetensors, each read out as the writer reaches it.
fn save_views(views: Vec<(String, StateView<'_>)>, path: &Path) -> Result<()> {
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })
}

/// The variables an optimiser updates, with up to two state tensors each (created at the
/// first step) and the step count.
struct Params {
    vars: Vec<(String, Var)>,
    /// Each variable's index in `vars`, by its tensor's id.
    index: HashMap<TensorId, usize>,
    /// Per variable: (first moment or momentum buffer, second moment).
    state: Vec<(Option<Var>, Option<Var>)>,
    step: u64,
}

impl Params {
    fn new(vars: Vec<(String, Var)>) -> Self {
        let state = vec![(None, None); vars.len()];
        let index = vars.iter().enumerate().map(|(i, (_, var))| (var.id(), i)).collect();
        Self { vars, index, state, step: 0 }
    }

    fn ids(&self) -> Vec<TensorId> {
        self.vars.iter().map(|(_, var)| var.id()).collect()
    }

    /// The state in the order [`Optimizer::load_state`] asks for it: `step`, then for each
    /// variable `m` and `v` where present (`variable_state` gives them as views; where it
    /// returns `None`, `self.state`'s are taken).
    fn state_views<'a>(
        &'a self,
        variable_state: impl Fn(usize) -> Option<[StateView<'a>; 2]>,
    ) -> Result<Vec<(String, StateView<'a>)>> {
        let device = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
        let mut out = vec![("step".to_string(), StateView::Tensor(Tensor::new(&[self.step as i64], &device)?))];
        for (i, ((name, _), (m, v))) in self.vars.iter().zip(&self.state).enumerate() {
            let views = match variable_state(i) {
                Some([m, v]) => [Some(m), Some(v)],
                None => [m.as_ref().map(StateView::State), v.as_ref().map(StateView::State)],
            };
            for (suffix, view) in ["m", "v"].into_iter().zip(views) {
                if let Some(view) = view {
                    out.push((format!("{name}.{suffix}"), view));
                }
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, tensors: StateSource, path: &Path) -> Result<()> {
        self.load_state_into(tensors, path, |_, _, _| Ok(false))
    }

    /// [`Self::load_state`], offering each moment, once checked, to `take(variable index,
    /// 0 for m or 1 for v, the tensor or None)` first: where it returns true the caller has
    /// kept it (Adam's interleaved pairs), and the variable's slot stays empty.
    fn load_state_into(
        &mut self,
        tensors: StateSource,
        path: &Path,
        mut take: impl FnMut(usize, usize, Option<&Tensor>) -> Result<bool>,
    ) -> Result<()> {
        let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        let step = tensors("step")?.ok_or_else(|| bad("optimiser state has no `step`".into()))?;
        self.step = match step.to_vec1::<i64>().map_err(|e| bad(format!("`step`: {e}")))?.as_slice() {
            &[step] if step >= 0 => step as u64,
            other => return Err(bad(format!("`step` must be one non-negative integer, got {other:?}"))),
        };
        for (i, ((name, var), (m, v))) in self.vars.iter().zip(self.state.iter_mut()).enumerate() {
            for (which, (suffix, slot)) in [("m", m), ("v", v)].into_iter().enumerate() {
                let t = tensors(&format!("{name}.{suffix}"))?;
                if let Some(t) = t.as_ref().filter(|t| t.dims() != var.dims() || t.dtype() != var.dtype()) {
                    return Err(bad(format!(
                        "optimiser state {name}.{suffix} is {:?} {:?}, expected {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        var.dtype(),
                        var.dims()
                    )));
                }
                *slot = match t {
                    _ if take(i, which, t.as_ref())? => None,
                    Some(t) => Some(Var::from_tensor(&t.to_device(var.device())?)?),
                    None => None,
                };
            }
        }
        Ok(())
    }
}

/// Adam, Keras form (see [`OptimizerConfig::Adam`]), or AdamW, PyTorch's
/// ([`OptimizerConfig::AdamW`]).
pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// AdamW's decoupled weight decay; `None` for Keras's Adam.
    adamw: Option<f64>,
    implementation: Implementation,
    params: Params,
    /// Per variable, with the fused kernels on the CPU: its moments as (m, v) pairs, updated
    /// with the parameter in one pass (`sae_kernels::adam_update_interleaved`); the variable's
    /// slots in `params.state` are then empty. Elsewhere the moments are tensors there.
    interleaved: Vec<Option<Vec<f32>>>,
}

/// Zeroed (m, v) pairs for a variable the interleaved update will take (contiguous f32 on the
/// CPU, fused kernels), made when the optimiser is: allocated during the first step instead,
/// 180 MB of moments for ResNet-50 land among that step's activations and gradients, and the
/// resident peak of ResNet-50's 32×32 run rose by 25–40 MB (`results/train-profile.md`).
fn moments_up_front(var: &Var, implementation: Implementation) -> Option<Vec<f32>> {
    let fits = implementation == Implementation::Fused && adam_kernel_takes(var);
    fits.then(|| vec![0.0; 2 * var.elem_count()])
}

/// `m` and `v` (zeros where absent) as (m, v) pairs.
fn interleave(m: Option<Var>, v: Option<Var>, len: usize) -> Result<Vec<f32>> {
    if m.is_none() && v.is_none() {
        return Ok(vec![0.0; 2 * len]);
    }
    let values = |t: Option<Var>| -> Result<Vec<f32>> {
        Ok(match t {
            Some(t) => t.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; len],
        })
    };
    let (m, v) = (values(m)?, values(v)?);
    Ok(m.iter().zip(&v).flat_map(|(&m, &v)| [m, v]).collect())
}

/// (m, v) pairs as two tensors of `var`'s shape.
fn deinterleave(pairs: &[f32], var: &Var) -> Result<(Tensor, Tensor)> {
    let moment = |which| StateView::Moment { pairs, which, var }.into_tensor();
    Ok((moment(0)?, moment(1)?))
}

impl Adam {
    /// Over `vars` with `[lr, β₁, β₂, ε]`, and AdamW's decoupled weight decay where given.
    fn new(
        vars: Vec<(String, Var)>,
        implementation: Implementation,
        [lr, beta1, beta2, eps]: [f64; 4],
        adamw: Option<f64>,
    ) -> Self {
        let interleaved = vars.iter().map(|(_, var)| moments_up_front(var, implementation)).collect();
        Adam { lr, beta1, beta2, eps, adamw, implementation, params: Params::new(vars), interleaved }
    }

    /// The state as [`Optimizer::state_tensors`] names it, in [`Optimizer::load_state`]'s
    /// order: the tensors `params` holds, and a view of each interleaved variable's moments.
    fn state_views(&self) -> Result<Vec<(String, StateView<'_>)>> {
        self.params.state_views(|i| {
            let pairs = self.interleaved[i].as_deref()?;
            Some([0, 1].map(|which| StateView::Moment { pairs, which, var: &self.params.vars[i].1 }))
        })
    }
}

impl Optimizer for Adam {
    fn begin_step(&mut self) {
        self.params.step += 1;
    }

    fn update(&mut self, var: TensorId, grad: &Tensor) -> Result<bool> {
        let Some(&i) = self.params.index.get(&var) else { return Ok(false) };
        let t = self.params.step as i32;
        let (correction1, correction2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        let alpha = self.lr * correction2.sqrt() / correction1;
        let step = match self.adamw {
            None => AdamStep::adam(self.beta1, self.beta2, self.eps, alpha),
            // PyTorch's lr·m̂/(√v̂ + ε) is α·m/(√v + ε·√(1 − β₂ᵗ)) with Keras's α.
            Some(wd) => AdamStep {
                decay: 1.0 - self.lr * wd,
                ..AdamStep::adam(self.beta1, self.beta2, self.eps * correction2.sqrt(), alpha)
            },
        };
        let (var, (m, v), interleaved) = (&self.params.vars[i].1, &mut self.params.state[i], &mut self.interleaved[i]);
        // Detached: the optimiser state never keeps the graph a gradient may carry.
        let g = grad.detach();
        if self.implementation == Implementation::Fused && adam_interleaved_applies(var, &g) {
            let pairs = match interleaved {
                Some(pairs) => pairs,
                None => interleaved.insert(interleave(m.take(), v.take(), var.elem_count())?),
            };
            adam_update_interleaved(var, &g, pairs, step)?;
            return Ok(true);
        }
        if let Some(pairs) = interleaved.take() {
            let (m_values, v_values) = deinterleave(&pairs, var)?;
            (*m, *v) = (Some(Var::from_tensor(&m_values)?), Some(Var::from_tensor(&v_values)?));
        }
        let zeros = || Var::zeros(g.shape(), g.dtype(), g.device());
        let m = match m {
            Some(m) => m,
            None => m.insert(zeros()?),
        };
        let v = match v {
            Some(v) => v,
            None => v.insert(zeros()?),
        };
        adam_update(var, &g, m, v, step, self.implementation)?;
        Ok(true)
    }

    fn variable_ids(&self) -> Vec<TensorId> {
        self.params.ids()
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn steps(&self) -> u64 {
        self.params.step
    }

    fn for_each_state_tensor(&self, f: &mut dyn FnMut(String, Tensor) -> Result<()>) -> Result<()> {
        self.state_views()?.into_iter().try_for_each(|(name, view)| f(name, view.into_tensor()?))
    }

    /// Built as tensors first, the moments were a second copy of all of them (twice the
    /// weights: 190 MB for ResNet-50) held while the checkpoint was written, above a 32×32
    /// training step's own peak.
    fn save_state(&self, path: &Path) -> Result<()> {
        save_views(self.state_views()?, path)
    }

    /// Interleaved moments are written into their pairs in place, each as it is read and
    /// checked: loaded as variables and then interleaved anew, every moment was held three
    /// times at once (the tensors, their copies, the new pairs) while a run resumed.
    fn load_state(&mut self, tensors: StateSource, path: &Path) -> Result<()> {
        let interleaved = &mut self.interleaved;
        self.params.load_state_into(tensors, path, |i, which, t| {
            let Some(pairs) = &mut interleaved[i] else { return Ok(false) };
            let slots = pairs.iter_mut().skip(which).step_by(2);
            match t {
                Some(t) => slots.zip(t.flatten_all()?.to_vec1::<f32>()?).for_each(|(p, v)| *p = v),
                None => slots.for_each(|p| *p = 0.0),
            }
            Ok(true)
        })
    }
}

/// SGD with momentum, PyTorch form (see [`OptimizerConfig::Sgd`]).
pub struct Sgd {
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    decoupled: bool,
    params: Params,
}

impl Optimizer for Sgd {
    fn begin_step(&mut self) {
        self.params.step += 1;
    }

    fn update(&mut self, var: TensorId, grad: &Tensor) -> Result<bool> {
        let Some(&i) = self.params.index.get(&var) else { return Ok(false) };
        let (var, (buffer, _)) = (&self.params.vars[i].1, &mut self.params.state[i]);
        // Detached: the momentum buffer never keeps the graph a gradient may carry.
        let mut g = grad.detach();
        let theta = &var.as_tensor().detach();
        if self.weight_decay != 0.0 && !self.decoupled {
            g = (g + (theta * self.weight_decay)?)?;
        }
        if self.momentum != 0.0 {
            let b = match buffer {
                Some(b) => {
                    b.set(&((b.as_tensor() * self.momentum)? + &g)?)?;
                    b
                }
                None => buffer.insert(Var::from_tensor(&g)?),
            };
            g = if self.nesterov { (g + (b.as_tensor() * self.momentum)?)? } else { b.as_tensor().detach() };
        }
        let mut new = (theta - (g * self.lr)?)?;
        if self.weight_decay != 0.0 && self.decoupled {
            new = (new - (theta * (self.lr * self.weight_decay))?)?;
        }
        var.set(&new)?;
        Ok(true)
    }

    fn variable_ids(&self) -> Vec<TensorId> {
        self.params.ids()
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn steps(&self) -> u64 {
        self.params.step
    }

    fn for_each_state_tensor(&self, f: &mut dyn FnMut(String, Tensor) -> Result<()>) -> Result<()> {
        self.params.state_views(|_| None)?.into_iter().try_for_each(|(name, view)| f(name, view.into_tensor()?))
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        save_views(self.params.state_views(|_| None)?, path)
    }

    fn load_state(&mut self, tensors: StateSource, path: &Path) -> Result<()> {
        self.params.load_state(tensors, path)
    }
}

/// Learning-rate schedules, by epoch (fractional within an epoch for warm-up and cosine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` every `every` epochs (the paper: ×0.1 every 15).
    Step {
        /// Epochs between decays.
        every: usize,
        /// Decay factor.
        gamma: f64,
    },
    /// Linear warm-up from 0 over `warmup_epochs`, then cosine from the base rate to `min_lr`
    /// at `total_epochs`.
    Cosine {
        /// Warm-up length in epochs.
        warmup_epochs: f64,
        /// Length of the whole schedule.
        total_epochs: f64,
        /// Final rate.
        min_lr: f64,
    },
}

impl Schedule {
    /// The rate at (fractional) `epoch` for base rate `base`.
    pub fn lr(&self, base: f64, epoch: f64) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / every.max(1) as f64).floor() as i32),
            Schedule::Cosine { warmup_epochs, total_epochs, min_lr } => {
                if epoch < warmup_epochs {
                    base * epoch / warmup_epochs
                } else {
                    let span = (total_epochs - warmup_epochs).max(f64::EPSILON);
                    let progress = ((epoch - warmup_epochs) / span).clamp(0.0, 1.0);
                    min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }
}

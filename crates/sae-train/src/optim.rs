//! Optimisers: Adam as Keras defines it (the paper's CIFAR setting) and SGD with momentum,
//! optional Nesterov and L2 or decoupled weight decay (the paper's ImageNet setting).
//!
//! They update only the variables they are given — the model's trainable ones, never the
//! BatchNorm running statistics — and their state (moments, step) saves to named tensors
//! for checkpoints.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use sae_kernels::{adam_update, AdamStep, Implementation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

    /// The paper's ImageNet optimiser: SGD, momentum 0.9, L2 weight decay 1e-4, lr 0.01.
    pub fn paper_sgd() -> Self {
        OptimizerConfig::Sgd { lr: 0.01, momentum: 0.9, nesterov: false, weight_decay: 1e-4, decoupled: false }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Adam { lr, .. } | OptimizerConfig::Sgd { lr, .. } => *lr,
        }
    }
}

/// An optimiser over named variables.
pub struct Optimizer {
    config: OptimizerConfig,
    vars: Vec<(String, Var)>,
    /// Per variable: (first moment or momentum buffer, second moment); created lazily.
    state: Vec<(Option<Tensor>, Option<Tensor>)>,
    step: u64,
    lr: f64,
    implementation: Implementation,
}

impl Optimizer {
    /// An optimiser for `vars` (name, variable).
    pub fn new(config: OptimizerConfig, vars: Vec<(String, Var)>) -> Self {
        let state = vec![(None, None); vars.len()];
        let lr = config.lr();
        Self { config, vars, state, step: 0, lr, implementation: Implementation::Fused }
    }

    /// The same with Adam's update run by `implementation`: `fused` (the default) updates in
    /// place on CPU, `reference` composes Candle ops. SGD always composes Candle ops.
    pub fn with_implementation(mut self, implementation: Implementation) -> Self {
        self.implementation = implementation;
        self
    }

    /// Current learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate (schedules call this).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update from `grads`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for ((_, var), (m, v)) in self.vars.iter().zip(self.state.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            // Gradients can carry Candle's graph (of the step that made them); detach so the
            // moments never keep earlier steps' graphs alive.
            let g = &g.detach();
            let theta = &var.as_tensor().detach();
            match self.config {
                OptimizerConfig::Adam { beta1, beta2, eps, .. } => {
                    let alpha = self.lr * (1.0 - beta2.powi(t)).sqrt() / (1.0 - beta1.powi(t));
                    if self.implementation == Implementation::Fused {
                        if m.is_none() {
                            *m = Some(g.zeros_like()?);
                        }
                        if v.is_none() {
                            *v = Some(g.zeros_like()?);
                        }
                        if let (Some(m), Some(v)) = (m.as_ref(), v.as_ref()) {
                            if adam_update(var.as_tensor(), g, m, v, AdamStep { beta1, beta2, eps, alpha })? {
                                continue;
                            }
                        }
                    }
                    let m_new = match m.take() {
                        Some(m) => ((m * beta1)? + (g * (1.0 - beta1))?)?,
                        None => (g * (1.0 - beta1))?,
                    };
                    let v_new = match v.take() {
                        Some(v) => ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        None => (g.sqr()? * (1.0 - beta2))?,
                    };
                    let update = (m_new.div(&(v_new.sqrt()? + eps)?)? * alpha)?;
                    var.set(&(theta - update)?)?;
                    *m = Some(m_new);
                    *v = Some(v_new);
                }
                OptimizerConfig::Sgd { momentum, nesterov, weight_decay, decoupled, .. } => {
                    let mut g = g.clone();
                    if weight_decay != 0.0 && !decoupled {
                        g = (g + (theta * weight_decay)?)?;
                    }
                    if momentum != 0.0 {
                        let buf = match m.take() {
                            Some(b) => ((b * momentum)? + &g)?,
                            None => g.clone(),
                        };
                        g = if nesterov { (g + (&buf * momentum)?)? } else { buf.clone() };
                        *m = Some(buf);
                    }
                    let mut new = (theta - (g * self.lr)?)?;
                    if weight_decay != 0.0 && decoupled {
                        new = (new - (theta * (self.lr * weight_decay))?)?;
                    }
                    var.set(&new)?;
                }
            }
        }
        Ok(())
    }

    /// State as named tensors: `{var}.m`, `{var}.v` and `step` (a one-element tensor).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for ((name, _), (m, v)) in self.vars.iter().zip(&self.state) {
            // Copies: the fused Adam update changes the moments in place.
            if let Some(m) = m {
                out.insert(format!("{name}.m"), m.copy()?);
            }
            if let Some(v) = v {
                out.insert(format!("{name}.v"), v.copy()?);
            }
        }
        let device = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        out.insert("step".into(), Tensor::new(&[self.step as i64], &device)?);
        Ok(out)
    }

    /// Restores state saved by [`Optimizer::state_tensors`], checking shapes.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        path: &std::path::Path,
    ) -> Result<()> {
        let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        let step = tensors.get("step").ok_or_else(|| bad("optimiser state has no `step`".into()))?;
        self.step = step.to_vec1::<i64>()?.first().copied().unwrap_or(0) as u64;
        for ((name, var), (m, v)) in self.vars.iter().zip(self.state.iter_mut()) {
            for (suffix, slot) in [("m", m), ("v", v)] {
                *slot = match tensors.get(&format!("{name}.{suffix}")) {
                    Some(t) if t.dims() != var.dims() => {
                        return Err(bad(format!(
                            "optimiser state {name}.{suffix} has shape {:?}, expected {:?}",
                            t.dims(),
                            var.dims()
                        )))
                    }
                    Some(t) => Some(t.to_device(var.device())?),
                    None => None,
                };
            }
        }
        Ok(())
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

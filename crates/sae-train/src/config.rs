//! What determines a run: [`TrainConfig`] (model, data, optimiser, schedule, epochs, batch,
//! seed), saved as the run's `config.json` and read back to resume it.

use crate::error::io;
use crate::optim::{OptimizerConfig, Schedule};
use crate::{Error, Result};
use sae_models::{ModelConfig, Precision};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which dataset a run reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// CIFAR-10 binary directory.
    Cifar10,
    /// CIFAR-100 binary directory, 100 fine labels.
    Cifar100Fine,
    /// CIFAR-100 binary directory, 20 coarse labels.
    Cifar100Coarse,
    /// ImageNet-style folder: `train/` and `val/`, or with [`DataConfig::val_fraction`] the
    /// class folders alone (in `train/` or at the top).
    Folder,
}

/// Data settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// The dataset.
    pub dataset: DatasetKind,
    /// Where it is.
    pub dir: PathBuf,
    /// Input side length.
    pub input_size: usize,
    /// Train on this many images (a seeded uniform subset), or all.
    pub train_images: Option<usize>,
    /// Evaluate on this many images (a seeded uniform subset), or all.
    pub eval_images: Option<usize>,
    /// For a folder without `val/`: the fraction of each class's images held out for
    /// evaluation (`sae_data::ImageFolder::split_by_fraction`: the same images for every seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fraction: Option<f64>,
}

/// Everything that determines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// The optimiser.
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Epochs.
    pub epochs: usize,
    /// Training batch size.
    pub batch_size: usize,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Label smoothing ε (0 for none).
    pub label_smoothing: f64,
    /// How optimiser steps are taken and the run is saved.
    #[serde(default)]
    pub steps: StepConfig,
    /// Augmentation beyond the dataset's crop and flip.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Number format of training and evaluation: f32, or bf16 mixed precision (f32 master
    /// weights, optimiser state, BatchNorm statistics and loss).
    #[serde(default)]
    pub precision: Precision,
}

/// Augmentation beyond the crop and flip of the training transform (see `sae_data::augment`).
/// The default adds none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    /// A TrivialAugment-style policy on every training image.
    pub trivial_augment: bool,
    /// Mixup's Beta(α, α); 0 for none.
    pub mixup_alpha: f64,
    /// CutMix's Beta(α, α); 0 for none.
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed.
    pub mix_prob: f64,
    /// With both mixup and CutMix on, the probability of CutMix.
    pub switch_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { trivial_augment: false, mixup_alpha: 0.0, cutmix_alpha: 0.0, mix_prob: 1.0, switch_prob: 0.5 }
    }
}

impl AugmentConfig {
    /// The batch mixing of the loader.
    pub fn mixing(&self) -> sae_data::Mixing {
        sae_data::Mixing {
            mixup_alpha: self.mixup_alpha as f32,
            cutmix_alpha: self.cutmix_alpha as f32,
            prob: self.mix_prob as f32,
            switch_prob: self.switch_prob as f32,
        }
    }
}

/// How gradients become optimiser steps, and how often a run is saved. The defaults are one
/// batch per step, no clipping, no weight average, a checkpoint per epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StepConfig {
    /// Batches whose (averaged) gradients make one optimiser step; 0 or 1 for every batch.
    /// Accumulating k batches of b equals one step on a batch of k·b (without BatchNorm,
    /// whose statistics stay per batch).
    pub accumulate: usize,
    /// Clip the gradients' global L2 norm to this before each step.
    pub clip_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights (and BatchNorm statistics),
    /// `ema ← d·ema + (1 − d)·w` after every step, evaluate it, and save it as `ema.safetensors`.
    pub ema_decay: Option<f64>,
    /// Also checkpoint every this many optimiser steps, so that a killed run loses at most
    /// that many; it resumes mid-epoch.
    pub checkpoint_every: Option<usize>,
    /// Weights to start from instead of the seeded initialisation: safetensors or a PyTorch
    /// checkpoint, or `hf:OWNER/NAME[@REVISION]` (a Hub model repository's weights, as timm
    /// publishes them: `sae_data::resolve_weights`). A classifier head of another class count,
    /// and the excitation modules where the weights are a plain ResNet's, keep their fresh
    /// initialisation.
    pub init: Option<PathBuf>,
    /// Before each evaluation, this many training batches (the epoch's first) go through the
    /// evaluated model in training mode, without gradients, to recalibrate BatchNorm's running
    /// statistics to the current weights (each batch weighs 10 %: 50 batches leave 0.5 % of the
    /// old statistics). 0 for none.
    pub recalibrate_bn: usize,
    /// With several processes, BatchNorm's batch statistics over all their images (synchronised
    /// BatchNorm) instead of each process's own.
    pub sync_bn: bool,
}

impl StepConfig {
    /// Batches per optimiser step (at least 1).
    pub fn batches_per_step(&self) -> usize {
        self.accumulate.max(1)
    }
}

impl TrainConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.epochs == 0 || self.batch_size == 0 || self.data.input_size == 0 {
            return Err(Error::Config("epochs, batch_size and input_size must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::Config(format!("label_smoothing must be in [0, 1), got {}", self.label_smoothing)));
        }
        let s = &self.steps;
        if let Some(c) = s.clip_grad_norm.filter(|c| !(*c > 0.0 && c.is_finite())) {
            return Err(Error::Config(format!("clip_grad_norm must be positive, got {c}")));
        }
        if let Some(d) = s.ema_decay.filter(|d| !(0.0..1.0).contains(d)) {
            return Err(Error::Config(format!("ema_decay must be in [0, 1), got {d}")));
        }
        let a = &self.augment;
        if !(a.mixup_alpha >= 0.0 && a.cutmix_alpha >= 0.0 && a.mixup_alpha.is_finite() && a.cutmix_alpha.is_finite()) {
            return Err(Error::Config(format!(
                "mixup and cutmix α must be ≥ 0, got {} and {}",
                a.mixup_alpha, a.cutmix_alpha
            )));
        }
        if !(0.0..=1.0).contains(&a.mix_prob) || !(0.0..=1.0).contains(&a.switch_prob) {
            return Err(Error::Config(format!(
                "mix_prob and switch_prob must be in [0, 1], got {} and {}",
                a.mix_prob, a.switch_prob
            )));
        }
        if s.sync_bn && self.precision != Precision::F32 {
            return Err(Error::Config(format!("sync_bn runs in f32 only, not with precision {}", self.precision)));
        }
        if s.checkpoint_every == Some(0) {
            return Err(Error::Config("checkpoint_every must be at least 1 step".into()));
        }
        Ok(())
    }

    /// Reads a run's `config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
    }
}

/// The file a run's config is saved in.
pub const CONFIG_FILE: &str = "config.json";

/// The file a run's class names are saved in, one per line in label order, so that its
/// predictions can be named without its data (`sae predict --run`).
pub const CLASSES_FILE: &str = "classes.txt";

/// A run's class names from its [`CLASSES_FILE`]; `None` for a run written before it was kept.
pub fn read_class_names(dir: &Path) -> Result<Option<Vec<String>>> {
    let path = dir.join(CLASSES_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.lines().map(str::to_string).collect())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

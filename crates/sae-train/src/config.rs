//! What determines a run: [`TrainConfig`] (model, data, optimiser, schedule, epochs, batch,
//! seed), saved as the run's `config.json` and read back to resume it.

use crate::error::io;
use crate::optim::{OptimizerConfig, Schedule};
use crate::{Error, Result};
use sae_models::ModelConfig;
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
    /// ImageNet-style folder with `train/` and `val/`.
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

//! Training and evaluation of the `sae-models` networks on `sae-data` datasets: the loop,
//! optimisers (Keras-style Adam, SGD with momentum), learning-rate schedules, metrics, atomic
//! checkpoints, resumable run directories, PNG plots of the curves.
//!
//! Modules, each with one job: `config` (what a run is), `data` (its datasets), `train` (the
//! loop), `optim` (optimisers and schedules), `metrics`, `checkpoint`, `summary`
//! (`summary.csv`), `progress` (bar or log lines), `plot` (`curves.png`).

pub mod allocator;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod stats;
pub mod summary;
pub mod tensorboard;
pub mod train;

pub use config::{AugmentConfig, DataConfig, DatasetKind, StepConfig, TrainConfig};
pub use device::device;
pub use dist::{Collective, SingleProcess};
pub use error::{Error, Result};
pub use metrics::Evaluation;
pub use optim::{Adam, Optimizer, OptimizerConfig, Schedule, Sgd};
pub use progress::{default_progress, Bar, LogLines, Progress};
pub use summary::{read_summary, EpochSummary};
pub use train::{
    backward_with_step, evaluate, evaluate_all, evaluate_all_with, evaluate_sharded, forward_loss, train, train_with,
};

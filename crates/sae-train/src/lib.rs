//! Training and evaluation of the `sae-models` networks on `sae-data` datasets: the loop,
//! optimisers (Keras-style Adam, SGD with momentum), learning-rate schedules, metrics, atomic
//! checkpoints, resumable run directories, PNG plots of the curves.

pub mod checkpoint;
pub mod error;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod train;

pub use error::{Error, Result};
pub use optim::{Optimizer, OptimizerConfig, Schedule};
pub use train::{
    default_progress, evaluate, read_summary, train, DataConfig, DatasetKind, EpochSummary, LogLines, Progress,
    TrainConfig,
};

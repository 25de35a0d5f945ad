//! The crate's typed errors.

use std::path::PathBuf;

/// Errors of `sae-train`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model error (config, weights).
    #[error(transparent)]
    Model(#[from] sae_models::Error),
    /// A data error (files, images).
    #[error(transparent)]
    Data(#[from] sae_data::Error),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint that is missing, damaged or from another run.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A `summary.csv` that does not parse.
    #[error("summary {}: {reason}", path.display())]
    Summary {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The loss became NaN or infinite.
    #[error("loss is {value} at epoch {epoch}, step {step}; stopped, the last good checkpoint is kept in {}", dir.display())]
    NonFiniteLoss {
        /// The loss value.
        value: f32,
        /// Epoch (0-based).
        epoch: usize,
        /// Global step.
        step: usize,
        /// The run directory.
        dir: PathBuf,
    },
    /// An invalid training setting.
    #[error("invalid training config: {0}")]
    Config(String),
    /// A plot that could not be drawn or encoded.
    #[error("plot {}: {reason}", path.display())]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A device that this build or machine cannot provide.
    #[error("{0}")]
    Device(String),
    /// Several processes cannot train together as asked (launcher, backend, world size).
    #[error("data-parallel training: {0}")]
    Distributed(String),
    /// JSON (config or state) that does not parse.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
}

impl From<sae_fs::Error> for Error {
    fn from(e: sae_fs::Error) -> Self {
        Error::Io { path: e.path, source: e.source }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

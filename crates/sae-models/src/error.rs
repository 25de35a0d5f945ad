//! The crate's typed errors: every variant names the model, file or tensor at fault.

use std::path::PathBuf;

/// Errors of `sae-models`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model name the registry does not know.
    #[error("unknown model {name:?}; known models: {}", known.join(", "))]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Every registered name.
        known: Vec<&'static str>,
    },
    /// A precision name that is not one of [`crate::Precision::ALL`].
    #[error("unknown precision {name:?}; known precisions: {}", known.join(", "))]
    UnknownPrecision {
        /// The name asked for.
        name: String,
        /// Every known name.
        known: Vec<&'static str>,
    },
    /// A config value out of range or inconsistent.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A weights file that is not valid safetensors.
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },
    /// A tensor the model needs is absent from the weights file.
    #[error("{}: tensor {name:?} is missing", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's state-dict name.
        name: String,
    },
    /// A checkpoint that cannot be read as a state dict or mapped onto one of our models.
    #[error("{}: {reason}", path.display())]
    StateDict {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor has the wrong shape.
    #[error("{}: tensor {name:?} has shape {found:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's state-dict name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// A tensor has the wrong dtype.
    #[error("{}: tensor {name:?} has dtype {found}, expected {expected}", path.display())]
    DtypeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's state-dict name.
        name: String,
        /// The model's dtype.
        expected: String,
        /// The file's dtype.
        found: String,
    },
    /// The file holds a tensor the model does not have (a different model or config).
    #[error("{}: unexpected tensor {name:?}, which model {model} does not have", path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The model's registry name.
        model: String,
    },
    /// An image that could not be decoded.
    #[error("{}: cannot decode image: {reason}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// What the decoder reported.
        reason: String,
    },
    /// A config file that is not valid JSON for [`crate::ModelConfig`].
    #[error("model config JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<sae_fs::Error> for Error {
    fn from(e: sae_fs::Error) -> Self {
        Error::Io { path: e.path, source: e.source }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

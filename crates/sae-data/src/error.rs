//! The crate's typed errors: each names the file (and record or image) and what is wrong.

use std::path::PathBuf;

/// Errors of `sae-data`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file whose contents do not follow the dataset's layout.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the record where there is one.
        reason: String,
    },
    /// An image that could not be decoded.
    #[error("{}: cannot decode image: {reason}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// What the decoder reported.
        reason: String,
    },
    /// A setting out of range (batch size 0, crop larger than the image, …).
    #[error("invalid setting: {0}")]
    Invalid(String),
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

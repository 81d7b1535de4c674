//! One error type for the library: every message names the file, key, tensor or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A config file (or override) whose key is missing, mistyped or out of range.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A weights file that is missing a tensor, holds one of the wrong shape, or is corrupt.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },

    /// A value the caller gave that cannot be used (steps 0, an unknown name, ...).
    #[error("{0}")]
    InvalidInput(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config { path: path.into(), message: message.into() }
    }
    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Weights { path: path.into(), message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }
}

/// Shorthand for returning an [`Error::InvalidInput`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::InvalidInput(format!($($arg)*))) };
}

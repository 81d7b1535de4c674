//! One error type for the library: every message names the file, key, tensor or value at fault.

use std::path::PathBuf;

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed; shown without the backtrace candle attaches when
    /// RUST_BACKTRACE is set, so errors stay one line.
    #[error("{}", first_line(.0))]
    Candle(#[from] candle_core::Error),

    /// (The cause is part of the message, not a `source`, so that error chains print it once.)
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },

    /// A config file (or override) whose key is missing, mistyped or out of range.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file (or what stands for it, e.g. `preset tiny`).
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },

    /// A weights file that is missing a tensor, holds one of the wrong shape, or is corrupt.
    #[error("{}: {message}", path.display())]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        message: String,
    },

    /// A value the caller gave that cannot be used (steps 0, an unknown name, ...).
    #[error("{0}")]
    InvalidInput(String),

    /// The run was stopped through its interrupt flag (`StableDiffusionPipeline::interrupt`).
    #[error("interrupted")]
    Interrupted,
}

/// A candle error's message on one line, without the backtrace candle attaches when
/// RUST_BACKTRACE is set: that backtrace is never formatted (resolving its symbols reads the
/// binary's debug information, hundreds of MB, for a message nobody asked to see).
pub(crate) fn first_line(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => first_line(inner),
        E::Context { inner, context } => format!("{context}: {}", first_line(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), first_line(inner)),
        other => other.to_string().lines().next().unwrap_or_default().trim_end().to_string(),
    }
}

/// The library's `Result`, with [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }
    /// An [`Error::Config`] in `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config { path: path.into(), message: message.into() }
    }
    /// An [`Error::Weights`] in `path`.
    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Weights { path: path.into(), message: message.into() }
    }
    /// An [`Error::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }
    /// A failure while building a model from `path`'s tensors (a missing tensor, a wrong
    /// shape) is reported as that file's problem.
    pub fn in_weights_file(self, path: &std::path::Path) -> Self {
        match self {
            Error::Candle(e) => Error::weights(path, first_line(&e)),
            other => other,
        }
    }
    /// An invalid value found while building from `path`'s config (an unknown name, a value
    /// out of range) is reported as that file's problem.
    pub fn in_config_file(self, path: &std::path::Path) -> Self {
        match self {
            Error::InvalidInput(message) => Error::config(path, message),
            other => other,
        }
    }
}

/// Shorthand for returning an [`Error::InvalidInput`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::InvalidInput(format!($($arg)*))) };
}

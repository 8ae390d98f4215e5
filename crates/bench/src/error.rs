//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a config, running a benchmark or writing and
/// reading its reports.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The YAML could not be parsed or has a wrong type; the message names the key
    /// (`load.stages[0].rate: invalid type ...`) and the position.
    #[error("invalid config{}: {message}", source_suffix(.origin))]
    ConfigParse {
        /// Where the config came from (a file path), if known.
        origin: Option<String>,
        /// Parser message, including the key path.
        message: String,
    },
    /// A value parsed but is not acceptable (out of range, missing section, conflicting keys).
    #[error("invalid config: `{key}`: {message}")]
    ConfigInvalid {
        /// Dotted key path, e.g. `load.stages[2].duration`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The config is valid for inference-perf but uses a feature `llmsched bench` does not
    /// implement.
    #[error("unsupported by llmsched bench: `{key}`: {message}")]
    Unsupported {
        /// Dotted key path of the feature.
        key: String,
        /// Explanation and, where possible, the alternative.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        /// What was being done ("cannot read", "cannot write", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A result file exists but does not have the expected layout.
    #[error("cannot parse {}: {message}", .path.display())]
    ResultFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model server could not be queried before the run (e.g. `/v1/models`).
    #[error("cannot reach the model server at {url}: {message}")]
    Server {
        /// The URL that was tried.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// Loading a tokenizer or tokenizing failed.
    #[error(transparent)]
    Tokenizer(#[from] llmsched_tokenizer::TokenizerError),
    /// Rendering a plot failed.
    #[error("cannot render plot: {0}")]
    Plot(String),
    /// Serializing a report failed.
    #[error("cannot serialize {what}: {message}")]
    Serialize {
        /// Which report.
        what: &'static str,
        /// Serializer message.
        message: String,
    },
    /// The load generator's thread or runtime failed.
    #[error("load generator failed: {0}")]
    Runtime(String),
    /// A command-line argument is wrong.
    #[error("{0}")]
    Usage(String),
}

fn source_suffix(origin: &Option<String>) -> String {
    origin
        .as_ref()
        .map(|o| format!(" in {o}"))
        .unwrap_or_default()
}

impl BenchError {
    /// Shorthand for [`BenchError::ConfigInvalid`].
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::ConfigInvalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`BenchError::Unsupported`].
    pub fn unsupported(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unsupported {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`BenchError::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

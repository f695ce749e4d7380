//! The engine's error type. Every variant names what went wrong precisely enough for the
//! server to map it to an HTTP status and an OpenAI-shaped body without guessing.

use std::path::PathBuf;

/// Errors raised by the engine crate.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A tensor operation failed (shape mismatch, device error, ...). Internal.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A model file could not be read or is malformed (truncated, corrupt, missing tensor).
    #[error("cannot load model file {}: {msg}", path.display())]
    Load { path: PathBuf, msg: String },
    /// The model's configuration is not one this engine supports.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template error: {0}")]
    Template(String),
    /// A user-supplied parameter is out of range; names the field, the limit and the value.
    #[error("invalid value for `{field}`: {msg}")]
    InvalidParam { field: &'static str, msg: String },
    /// The requested device or dtype is not available in this build or on this machine.
    #[error("device error: {0}")]
    Device(String),
    /// Configuration (models.toml, configs/) is invalid; names the file and key.
    #[error("configuration error: {0}")]
    Config(String),
    /// The engine's waiting queue is full; retry later (HTTP 429).
    #[error("server overloaded: {waiting} requests waiting (limit {limit}); retry later")]
    Overloaded { waiting: usize, limit: usize },
    /// The engine is shutting down or its thread has stopped.
    #[error("engine is not running: {0}")]
    Unavailable(String),
    #[error("i/o error on {}: {source}", path.display())]
    Io { path: PathBuf, #[source] source: std::io::Error },
}

impl EngineError {
    pub fn invalid(field: &'static str, msg: impl Into<String>) -> Self {
        EngineError::InvalidParam { field, msg: msg.into() }
    }
    pub fn load(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        EngineError::Load { path: path.into(), msg: msg.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

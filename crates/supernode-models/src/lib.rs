//! Model loading and the forward passes. Knows no request.
//!
//! - [`gguf`] and [`safetensors`] read model files into named [`Tensor`]s (GGUF names) and
//!   [`Metadata`] (GGUF keys);
//! - [`config`] resolves them into one checked [`ModelConfig`];
//! - [`layers`] holds the shared layers; one file per architecture composes them.

pub mod metadata;
pub mod tensor;

pub use metadata::{MetaValue, Metadata};
pub use tensor::{Storage, Tensor};

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    /// A file that is not what it claims to be: bad magic, truncated, inconsistent.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArch { arch: String, supported: String },
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

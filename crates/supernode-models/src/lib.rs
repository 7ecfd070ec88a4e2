//! Model loading and the forward passes. Knows no request.
//!
//! - [`gguf`] and [`safetensors`] read model files into named [`Tensor`]s (GGUF names, HF
//!   names mapped by [`names`]) and [`Metadata`] (GGUF keys);
//! - [`config`] resolves them into one checked [`ModelConfig`];
//! - [`layers`] holds the shared layers; [`arch`] has one file per architecture family composing
//!   them (with its config reading), and the registry of names;
//! - [`numerics`] is how a model computes, resolved from the precision asked for; [`trace`] lets
//!   a caller see the named activations of a forward pass;
//! - [`loader::load_model`] is the entry point; [`Batch`] and [`KvCache`] are what a forward
//!   pass consumes.

pub mod arch;
pub mod batch;
pub mod config;
pub mod gguf;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod metadata;
pub mod names;
pub mod numerics;
pub mod safetensors;
pub mod tensor;
pub mod trace;
pub mod weights;

pub use arch::Model;
pub use batch::Batch;
pub use config::ModelConfig;
pub use kv_cache::{KvCache, KvDType, KvData, KvLayerSpec, KvRegion, KvValues};
pub use loader::{load_model, partial_load_note, LoadOptions, LoadedModel, ModelSource};
pub use metadata::{MetaValue, Metadata};
pub use numerics::Numerics;
pub use tensor::{Storage, Tensor};
pub use trace::{Named, Trace};

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

/// A name read from a model file (a key, a tensor name, a dtype) as error messages show it:
/// control characters escaped, so that an error stays one line and a file's bytes never reach
/// a terminal raw, and cut after 100 characters.
#[derive(Clone, Copy)]
pub(crate) struct Shown<'a>(pub &'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MAX: usize = 100;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX {
                return f.write_str("…");
            }
            match c.is_control() {
                true => write!(f, "{}", c.escape_default())?,
                false => write!(f, "{c}")?,
            }
        }
        Ok(())
    }
}

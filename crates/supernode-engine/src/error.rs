//! The engine's one error type. Every variant names the operation or parameter that failed, so
//! the server can turn it into an OpenAI error body in one place.

use std::path::PathBuf;

/// Everything that can go wrong in the engine: tokenizers, chat templates, generation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] supernode_models::ModelError),
    /// Building a tokenizer from GGUF metadata or `tokenizer.json` failed.
    #[error("tokenizer ({op}): {msg}")]
    Tokenizer { op: &'static str, msg: String },
    /// Compiling or rendering a chat template failed (including `raise_exception` in the template).
    #[error("chat template ({op}): {msg}")]
    Template { op: &'static str, msg: String },
    /// Reading a file failed.
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    /// Building a vocabulary's grammar trie or compiling a request's grammar failed.
    #[error("grammar ({op}): {msg}")]
    Constraint { op: &'static str, msg: String },
    /// A request or parameter that cannot be served as given.
    #[error("{0}")]
    Invalid(String),
}

impl EngineError {
    pub(crate) fn tokenizer(op: &'static str, msg: impl Into<String>) -> EngineError {
        EngineError::Tokenizer {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn template(op: &'static str, msg: impl Into<String>) -> EngineError {
        EngineError::Template {
            op,
            msg: msg.into(),
        }
    }
}

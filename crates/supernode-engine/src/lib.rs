//! supernode-engine: tokenizers, chat templates, sampler, KV cache, generation loop. Knows no HTTP.

pub mod chat;
pub mod constraint;
pub mod embed;
pub mod engine;
pub mod error;
pub mod load;
pub mod sampler;
pub mod session;
pub mod spec;
pub mod tokenizer;
pub mod tool_parser;

pub use error::EngineError;

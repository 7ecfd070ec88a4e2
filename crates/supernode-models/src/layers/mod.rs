//! Shared layers, composed by the per-architecture files: one linear, one norm, one rope,
//! one attention layer (the only code that writes the KV cache), one feed-forward.

mod attention;
mod embedding;
mod ffn;
mod linear;
mod norm;
mod output;
mod rope;

pub use attention::Attention;
pub use embedding::Embedding;
pub use ffn::Mlp;
pub use linear::Linear;
pub use norm::RmsNorm;
pub use output::OutputHead;
pub use rope::{Rope, RopeTable};

//! Shared layers, composed by the per-architecture files: one linear, one norm, one rope,
//! the attention layers (MHA/GQA, and MLA next to it: the only code that writes the KV cache),
//! the feed-forwards (dense, mixture of experts).

mod attention;
mod embedding;
mod ffn;
mod linear;
mod mla;
mod moe;
mod norm;
mod output;
mod rope;

pub use attention::Attention;
pub use embedding::Embedding;
pub use ffn::Mlp;
pub use linear::{Linear, StackedLinear};
pub use mla::{Mla, MlaQuery};
pub use moe::{Ffn, Moe};
pub use norm::RmsNorm;
pub use output::OutputHead;
pub use rope::{Rope, RopeTable};

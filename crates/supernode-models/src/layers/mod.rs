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

use crate::kv_cache::{KvLayerSpec, LayerKv};
use crate::Batch;

/// The attention layer of a block.
pub trait BlockAttention: Send + Sync {
    /// `x`: the normalised `n × hidden` input of the batch; writes `n × hidden` to `out` and
    /// the batch's rows into `kv`.
    fn forward(
        &self,
        x: &[f32],
        batch: &Batch,
        rope: &RopeTable,
        kv: &mut LayerKv,
        block_size: usize,
        out: &mut [f32],
    );
    /// Bytes of projection weights read per token.
    fn weight_bytes(&self) -> usize;
    /// The geometry and element type of this layer's cache rows.
    fn kv_spec(&self) -> KvLayerSpec;
}

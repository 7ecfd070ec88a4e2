//! Shared layers, composed by the per-architecture files: one linear, one norm, one rope,
//! the attention layers (MHA/GQA, and MLA next to it: the only code that writes the KV cache),
//! Gated DeltaNet linear attention (its state in recurrent slots, not K/V rows), the
//! feed-forwards (dense, mixture of experts). Each loads its own tensors by their GGUF names
//! from the [`Weights`](crate::weights::Weights) and computes with their
//! [`Numerics`](crate::numerics::Numerics).

mod attention;
mod compressed;
mod embedding;
mod ffn;
mod gated_deltanet;
mod hyper;
mod indexer;
mod linear;
mod mla;
mod moe;
mod norm;
mod output;
mod rope;

pub use attention::Attention;
pub use compressed::{Compressor, V4Attn, V4Indexer};
pub use embedding::Embedding;
pub use ffn::Mlp;
pub use gated_deltanet::{DeltaJournal, DeltaNetShape, GatedDeltaNet};
pub use hyper::{HyperConnection, HyperHead, Mixes};
pub use indexer::{IndexQueries, Indexer};
pub use linear::{Linear, StackedLinear};
pub use mla::{Mla, MlaQuery};
pub use moe::{Ffn, Moe};
pub use norm::{LayerNorm, RmsNorm};
pub use output::OutputHead;
pub use rope::{Rope, RopeTable};

use crate::kv_cache::{KvLayerSpec, LayerKv};
use crate::trace::Trace;
use crate::Batch;

/// What a block's layers run with besides their input: the batch, its rope table, the KV
/// cache's block size, the block's index and the trace that its named activations go to.
pub struct LayerCtx<'a, 'h> {
    pub batch: &'a Batch<'a>,
    pub rope: &'a RopeTable,
    pub block_size: usize,
    pub layer: usize,
    pub trace: &'a mut Trace<'h>,
}

impl LayerCtx<'_, '_> {
    /// Shows `values` (one row per token of the batch) as this block's `name` to the trace.
    pub fn cb(&mut self, name: &'static str, values: &[f32]) {
        self.trace
            .cb(name, Some(self.layer), self.batch.len(), values);
    }
}

/// The attention layer of a block.
pub trait BlockAttention: Send + Sync {
    /// `x`: the normalised `n × hidden` input of the batch; writes `n × hidden` to `out` and
    /// the batch's rows into `kv`.
    fn forward(&self, x: &[f32], ctx: &mut LayerCtx, kv: &mut LayerKv, out: &mut [f32]);
    /// Bytes of projection weights read per token.
    fn weight_bytes(&self) -> usize;
    /// The geometry and element type of this layer's cache rows.
    fn kv_spec(&self) -> KvLayerSpec;
    /// Floats of recurrent state per sequence ([`crate::kv_cache::RecurrentState`]), 0 for a
    /// layer that keeps K/V rows.
    fn state_width(&self) -> usize {
        0
    }
    /// Puts state slot `slot` back to the end of the first `accepted` drafts of the last step
    /// that carried drafts for it ([`crate::Model::rollback_drafts`]); nothing for a layer
    /// without recurrent state.
    fn rollback_drafts(&self, _kv: &mut LayerKv, _slot: usize, _accepted: usize) {}
}

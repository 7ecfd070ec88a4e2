//! One file per architecture, each composing the shared layers; the [`Model`] trait they share.

pub mod decoder;
pub mod deepseek_v3;
pub mod gemma3;
pub mod llama;

use crate::kv_cache::{KvCache, KvLayerSpec};
use crate::{Batch, ModelConfig, Result};

/// A loaded model that computes logits for a flat batch.
pub trait Model: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// The geometry of each layer's KV cache rows.
    fn kv_specs(&self) -> Vec<KvLayerSpec>;

    /// Runs the batch, writing its K/V into `kv`; returns the logits of the rows in
    /// `batch.logits_for`, `vocab_size` each, in that order.
    fn forward(&self, batch: &Batch, kv: &mut KvCache) -> Result<Vec<f32>>;

    /// Bytes of weights read to decode one token (for bandwidth figures).
    fn weight_bytes_per_token(&self) -> usize;
}

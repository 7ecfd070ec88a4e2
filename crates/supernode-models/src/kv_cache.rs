//! The KV cache tensors: per layer, a pool of fixed-size blocks of key and value rows.
//!
//! This is storage only. Which blocks belong to which sequence is the engine's bookkeeping
//! (its block pool); the model's one attention layer writes and reads rows through a
//! [`Batch`]'s block tables. Layers may differ in geometry (e.g. MLA stores a latent).

use supernode_kernels::ops::KvView;

use crate::{Batch, ModelError, Result};

/// Geometry of one layer's cache rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayerSpec {
    pub n_kv_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
}

impl KvLayerSpec {
    /// The same MHA/GQA geometry on every layer of `cfg`.
    pub fn uniform(cfg: &crate::ModelConfig) -> Vec<KvLayerSpec> {
        let spec = KvLayerSpec {
            n_kv_heads: cfg.n_kv_heads,
            k_dim: cfg.head_dim,
            v_dim: cfg.v_head_dim,
        };
        vec![spec; cfg.n_layers]
    }

    /// f32 values per token (keys and values of all heads).
    pub fn floats_per_token(&self) -> usize {
        self.n_kv_heads * (self.k_dim + self.v_dim)
    }
}

/// One layer's keys and values: `num_blocks * block_size` slots.
#[derive(Debug)]
pub struct LayerKv {
    pub spec: KvLayerSpec,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The whole cache.
#[derive(Debug)]
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `block_size` slots for every layer.
    pub fn new(specs: &[KvLayerSpec], block_size: usize, num_blocks: usize) -> Result<KvCache> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::Invalid(
                "KV cache needs at least one block of one slot".into(),
            ));
        }
        let slots = block_size
            .checked_mul(num_blocks)
            .ok_or_else(|| ModelError::Invalid("KV cache size overflows".into()))?;
        let layers = specs
            .iter()
            .map(|&spec| LayerKv {
                spec,
                k: vec![0.0; slots * spec.n_kv_heads * spec.k_dim],
                v: vec![0.0; slots * spec.n_kv_heads * spec.v_dim],
            })
            .collect();
        Ok(KvCache {
            block_size,
            num_blocks,
            layers,
        })
    }

    /// Bytes per token over all layers.
    pub fn bytes_per_token(specs: &[KvLayerSpec]) -> usize {
        specs.iter().map(|s| s.floats_per_token() * 4).sum()
    }

    /// Checks that every token of `batch` has a valid slot and id, so the forward pass can
    /// index without further checks.
    pub fn check_batch(&self, batch: &Batch, vocab_size: usize) -> Result<()> {
        let n = batch.tokens.len();
        if batch.positions.len() != n || batch.seq_of.len() != n {
            return Err(ModelError::Invalid("batch arrays differ in length".into()));
        }
        for t in 0..n {
            if batch.tokens[t] as usize >= vocab_size {
                return Err(ModelError::Invalid(format!(
                    "token id {} is outside the vocabulary of {vocab_size}",
                    batch.tokens[t]
                )));
            }
            let table = batch.block_tables.get(batch.seq_of[t]).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "token {t} names sequence {}, which is not in the batch",
                    batch.seq_of[t]
                ))
            })?;
            let block = table
                .get(batch.positions[t] / self.block_size)
                .ok_or_else(|| {
                    ModelError::Invalid(format!("position {} has no KV block", batch.positions[t]))
                })?;
            if *block as usize >= self.num_blocks {
                return Err(ModelError::Invalid(format!(
                    "KV block {block} does not exist"
                )));
            }
        }
        for table in batch.block_tables {
            if let Some(b) = table.iter().find(|&&b| b as usize >= self.num_blocks) {
                return Err(ModelError::Invalid(format!("KV block {b} does not exist")));
            }
        }
        if let Some(&r) = batch.logits_for.iter().find(|&&r| r >= n) {
            return Err(ModelError::Invalid(format!(
                "logits requested for row {r} of a {n}-token batch"
            )));
        }
        Ok(())
    }
}

impl LayerKv {
    /// Writes the key and value rows of one token (all KV heads) into `slot`.
    pub fn write(&mut self, slot: usize, k: &[f32], v: &[f32]) {
        let kw = self.spec.n_kv_heads * self.spec.k_dim;
        let vw = self.spec.n_kv_heads * self.spec.v_dim;
        self.k[slot * kw..(slot + 1) * kw].copy_from_slice(k);
        self.v[slot * vw..(slot + 1) * vw].copy_from_slice(v);
    }

    /// A read-only view for the attention kernel.
    pub fn view(&self, block_size: usize) -> KvView<'_> {
        KvView {
            k: &self.k,
            v: &self.v,
            block_size,
            n_kv_heads: self.spec.n_kv_heads,
            k_dim: self.spec.k_dim,
            v_dim: self.spec.v_dim,
        }
    }
}

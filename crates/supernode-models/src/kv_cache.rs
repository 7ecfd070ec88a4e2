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
    /// Values per head as the attention reads them.
    pub v_dim: usize,
    pub values: KvValues,
}

/// Where a layer's values live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvValues {
    /// In their own rows of `n_kv_heads * v_dim`.
    Stored,
    /// The first `v_dim` floats of each key row, not stored again: MLA, whose one "key head"
    /// is `[latent c, roped key]` and whose values are the latent `c`.
    InKeys,
}

impl KvLayerSpec {
    /// The same MHA/GQA geometry on every layer of `cfg`.
    pub fn uniform(cfg: &crate::ModelConfig) -> Vec<KvLayerSpec> {
        let spec = KvLayerSpec {
            n_kv_heads: cfg.n_kv_heads,
            k_dim: cfg.head_dim,
            v_dim: cfg.v_head_dim,
            values: KvValues::Stored,
        };
        vec![spec; cfg.n_layers]
    }

    /// A multi-head latent attention layer: per token one row of the compressed latent
    /// (`kv_lora_rank`, normalised) and the shared roped key (`rope_dim`); the latent doubles
    /// as the values.
    pub fn mla(kv_lora_rank: usize, rope_dim: usize) -> KvLayerSpec {
        KvLayerSpec {
            n_kv_heads: 1,
            k_dim: kv_lora_rank + rope_dim,
            v_dim: kv_lora_rank,
            values: KvValues::InKeys,
        }
    }

    /// Floats stored per token for the keys (`k`) and for the values (`v`).
    fn stored_widths(&self) -> (usize, usize) {
        let v = match self.values {
            KvValues::Stored => self.n_kv_heads * self.v_dim,
            KvValues::InKeys => 0,
        };
        (self.n_kv_heads * self.k_dim, v)
    }

    /// f32 values stored per token (keys and values of all heads).
    pub fn floats_per_token(&self) -> usize {
        let (k, v) = self.stored_widths();
        k + v
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
            .map(|&spec| {
                let (kw, vw) = spec.stored_widths();
                LayerKv {
                    spec,
                    k: vec![0.0; slots * kw],
                    v: vec![0.0; slots * vw],
                }
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
    /// Writes the key and value rows of one token (all KV heads) into `slot`; `v` is empty
    /// when the values live in the keys.
    pub fn write(&mut self, slot: usize, k: &[f32], v: &[f32]) {
        let (kw, vw) = self.spec.stored_widths();
        self.k[slot * kw..(slot + 1) * kw].copy_from_slice(k);
        self.v[slot * vw..(slot + 1) * vw].copy_from_slice(v);
    }

    /// A read-only view for the attention kernel. When the values live in the keys, the view's
    /// values are the key rows (stride `k_dim`), of which the kernel reads the first
    /// `AttnShape::v_dim`.
    pub fn view(&self, block_size: usize) -> KvView<'_> {
        let (v, v_dim) = match self.spec.values {
            KvValues::Stored => (&self.v, self.spec.v_dim),
            KvValues::InKeys => (&self.k, self.spec.k_dim),
        };
        KvView {
            k: &self.k,
            v,
            block_size,
            n_kv_heads: self.spec.n_kv_heads,
            k_dim: self.spec.k_dim,
            v_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MLA keeps the latent and the roped key per token and layer, nothing per head: DeepSeek-V3
    /// (61 layers, rank 512, rope 64) stores 576 floats per layer where full K/V would be
    /// 128 heads × (192 + 128).
    #[test]
    fn mla_spec_stores_latent_and_rope_key_only() {
        let spec = KvLayerSpec::mla(512, 64);
        assert_eq!(spec.floats_per_token(), 512 + 64);
        let specs = vec![spec; 61];
        assert_eq!(KvCache::bytes_per_token(&specs), 61 * 576 * 4);
        let full = KvLayerSpec {
            n_kv_heads: 128,
            k_dim: 192,
            v_dim: 128,
            values: KvValues::Stored,
        };
        assert_eq!(
            KvCache::bytes_per_token(&vec![full; 61]),
            61 * 128 * 320 * 4
        );

        let mut cache = KvCache::new(&[KvLayerSpec::mla(3, 2)], 2, 2).unwrap();
        let layer = &mut cache.layers[0];
        assert_eq!((layer.k.len(), layer.v.len()), (4 * 5, 0));
        layer.write(3, &[1.0, 2.0, 3.0, 4.0, 5.0], &[]);
        let view = layer.view(2);
        // The values are read from the key rows: latent first.
        assert_eq!((view.v_dim, &view.v[15..18]), (5, &[1.0, 2.0, 3.0][..]));
    }
}

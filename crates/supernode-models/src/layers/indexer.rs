//! DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2): the part of
//! [`Mla`](super::Mla) that picks, for each query, the `top_k` cached positions it attends to.
//!
//! ```text
//! k_t   = rope_halves(LayerNorm(wk x_t))                  one key per token, cached
//! q_t,h = rope_halves(wq_b(norm(q_a x_t)))_h              heads of the query LoRA's latent
//! w_t,h = weights_proj(x_t)_h / sqrt(n_heads)
//! score(t, p) = Σ_h w_t,h · relu(q_t,h · k_p / sqrt(head_dim))     p ≤ pos(t)
//! ```
//!
//! Rope covers the first `qk_rope_dim` dims of each head and pairs halves, where MLA's own rope
//! pairs neighbours. Follows transformers' `DeepseekV32Indexer` (which, like this, skips the
//! reference's Hadamard rotation: it is orthogonal and leaves `q · k` as it is) and llama.cpp's
//! `deepseek32` graph. The keys are written to the layer's cache beside the latent
//! ([`LayerKv::write_index`]); the scores read them back through the paged view, so a query sees
//! the same keys whether its context came in one step, in chunks, or from a prefix cache.

use supernode_kernels::ops::{index_scores, round_slice_f16, top_k_positions, KvView, RopeStyle};
use supernode_kernels::scratch::zeroed;

use super::{LayerNorm, Linear, RopeTable};
use crate::config::{IndexerConfig, MlaConfig};
use crate::kv_cache::LayerKv;
use crate::weights::Weights;
use crate::{Batch, ModelConfig, Result};

/// llama.cpp's `f_norm_eps` and transformers' `nn.LayerNorm(eps=1e-6)` of the indexer's keys.
const K_NORM_EPS: f32 = 1e-6;

pub struct Indexer {
    /// `[q_lora_rank → n_heads * head_dim]` (GGUF `indexer.attn_q_b`).
    pub wq_b: Linear,
    /// `[hidden → head_dim]` (`indexer.attn_k`).
    pub wk: Linear,
    /// `[head_dim]` weight and bias (`indexer.k_norm`).
    pub k_norm: LayerNorm,
    /// `[hidden → n_heads]`: each head's weight per token (`indexer.proj`).
    pub weights_proj: Linear,
    pub n_heads: usize,
    pub head_dim: usize,
    /// The roped dims at the start of each head (MLA's rope dim).
    pub rope_dim: usize,
    /// Positions each query attends to.
    pub top_k: usize,
    /// Round the cached keys to f16 (the layer's rows are f16 then).
    pub f16_rounding: bool,
}

/// The batch's indexer queries and head weights, `n × n_heads × head_dim` and `n × n_heads`.
pub struct IndexQueries {
    q: Vec<f32>,
    w: Vec<f32>,
}

impl Indexer {
    /// Layer `layer`'s indexer from its GGUF-named tensors (`indexer.attn_q_b`,
    /// `indexer.attn_k`, `indexer.k_norm` with its bias, `indexer.proj`).
    pub fn load(
        cfg: &ModelConfig,
        mla: &MlaConfig,
        ix: &IndexerConfig,
        w: &Weights,
        layer: usize,
    ) -> Result<Indexer> {
        let p = |n: &str| format!("blk.{layer}.indexer.{n}");
        let (h, d) = (cfg.hidden, ix.head_dim);
        // Validated: an indexer comes with a query LoRA.
        let q_rank = mla.q_lora_rank.unwrap_or_default();
        Ok(Indexer {
            wq_b: w.linear(&p("attn_q_b"), ix.n_heads * d, q_rank)?,
            wk: w.linear(&p("attn_k"), d, h)?,
            k_norm: LayerNorm {
                w: w.vector(&p("k_norm.weight"), d)?,
                b: w.vector(&p("k_norm.bias"), d)?,
                eps: K_NORM_EPS,
            },
            weights_proj: w.linear(&p("proj"), ix.n_heads, h)?,
            n_heads: ix.n_heads,
            head_dim: d,
            rope_dim: mla.qk_rope_dim,
            top_k: ix.top_k,
            f16_rounding: w.numerics().f16_rounding,
        })
    }

    /// Bytes of projection weights read per token.
    pub fn weight_bytes(&self) -> usize {
        self.wq_b.weight_bytes() + self.wk.weight_bytes() + self.weights_proj.weight_bytes()
    }

    /// Computes the keys of the batch's `n` tokens from their normed input `x` and writes them
    /// to the cache; returns them (`n × head_dim`, for the trace).
    pub fn write_keys(
        &self,
        x: &[f32],
        batch: &Batch,
        rope: &RopeTable,
        block_size: usize,
        kv: &mut LayerKv,
    ) -> Vec<f32> {
        let (n, d) = (batch.len(), self.head_dim);
        let mut k = vec![0.0; n * d];
        self.wk.forward(x, n, &mut k);
        self.k_norm.forward_inplace(&mut k);
        for (t, row) in k.chunks_exact_mut(d).enumerate() {
            rope.apply_as(
                t,
                &mut row[..self.rope_dim],
                self.rope_dim,
                RopeStyle::Halves,
            );
            if self.f16_rounding {
                round_slice_f16(row);
            }
            kv.write_index(batch.slot(t, block_size), row);
        }
        k
    }

    /// The batch's roped queries from the query LoRA's normed latent `q_latent` and the head
    /// weights from the normed input `x`.
    pub fn queries(&self, q_latent: &[f32], x: &[f32], n: usize, rope: &RopeTable) -> IndexQueries {
        let (heads, d, rd) = (self.n_heads, self.head_dim, self.rope_dim);
        let mut q = vec![0.0; n * heads * d];
        self.wq_b.forward(q_latent, n, &mut q);
        for (t, row) in q.chunks_exact_mut(heads * d).enumerate() {
            for head in row.chunks_exact_mut(d) {
                rope.apply_as(t, &mut head[..rd], rd, RopeStyle::Halves);
            }
        }
        let mut w = vec![0.0; n * heads];
        self.weights_proj.forward(x, n, &mut w);
        let s = (heads as f32).powf(-0.5);
        w.iter_mut().for_each(|v| *v *= s);
        IndexQueries { q, w }
    }

    /// The positions batch token `t` (at position `pos`) attends to: all of `0..=pos` while
    /// they are no more than `top_k`, else the `top_k` best-scored, ascending. `keys` is the
    /// layer's [`LayerKv::index_view`].
    pub fn select(
        &self,
        queries: &IndexQueries,
        t: usize,
        keys: &KvView,
        block_table: &[u32],
        pos: usize,
        out: &mut Vec<usize>,
    ) {
        let (heads, d) = (self.n_heads, self.head_dim);
        let mut scores = zeroed(pos + 1);
        index_scores(
            &queries.q[t * heads * d..(t + 1) * heads * d],
            &queries.w[t * heads..(t + 1) * heads],
            keys,
            block_table,
            0..pos + 1,
            (d as f32).powf(-0.5),
            &mut scores,
        );
        top_k_positions(&scores, 0, self.top_k, out);
    }
}

//! The attention layer (MHA/GQA): projections, optional per-head Q/K norms, rope, the KV
//! cache write, causal attention over the paged cache (optionally a sliding window), and
//! the output projection. This and its MLA sibling ([`super::Mla`]) are the only code that
//! writes the KV cache.

use std::ops::Range;

use supernode_kernels::ops::{
    attention_group, attention_group_parallel, round_slice_f16, AttnShape, KvView,
};
use supernode_kernels::pool;

use super::{BlockAttention, Linear, RmsNorm, RopeTable};
use crate::kv_cache::{KvDType, KvLayerSpec, KvValues, LayerKv};
use crate::Batch;

/// From this many tokens on, queries and keys are prepared (normed, roped, rounded) in parallel.
const PARALLEL_PREPARE_TOKENS: usize = 8;

/// [`attention_group`] or [`attention_group_parallel`].
type GroupFn = fn(&[f32], &KvView, usize, &[u32], Range<usize>, &AttnShape, &mut [f32]);

pub struct Attention {
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    /// Per-head RMSNorm of queries and keys (Qwen3, Gemma 3), applied before rope.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub shape: AttnShape,
    /// Attend only to the last `window` positions (inclusive of the token itself).
    pub window: Option<usize>,
}

impl BlockAttention for Attention {
    /// Bytes of projection weights read per token.
    fn weight_bytes(&self) -> usize {
        [&self.wq, &self.wk, &self.wv, &self.wo]
            .iter()
            .map(|l| l.weight_bytes())
            .sum()
    }

    /// The geometry and element type of this layer's cache rows: f16 when it rounds its keys and
    /// values to f16 ([`KvDType::for_rounding`]).
    fn kv_spec(&self) -> KvLayerSpec {
        let s = &self.shape;
        KvLayerSpec {
            n_kv_heads: s.n_kv_heads,
            k_dim: s.k_dim,
            v_dim: s.v_dim,
            values: KvValues::Stored,
            dtype: KvDType::for_rounding(s.f16_rounding),
        }
    }

    /// `x`: the normalised `n × hidden` input of the batch; writes `n × hidden` to `out`.
    fn forward(
        &self,
        x: &[f32],
        batch: &Batch,
        rope: &RopeTable,
        kv: &mut LayerKv,
        block_size: usize,
        out: &mut [f32],
    ) {
        let n = batch.len();
        let s = &self.shape;
        let (qw, kw, vw) = (
            s.n_heads * s.k_dim,
            s.n_kv_heads * s.k_dim,
            s.n_kv_heads * s.v_dim,
        );
        let mut q = vec![0.0; n * qw];
        let mut k = vec![0.0; n * kw];
        let mut v = vec![0.0; n * vw];
        Linear::forward_many(
            &[&self.wq, &self.wk, &self.wv],
            x,
            n,
            &mut [&mut q, &mut k, &mut v],
        );
        // Per-head norms, rope and f16 rounding, token by token (in parallel over the tokens
        // of a long batch: each token's values are its own, so the bits are the same).
        let prepare = |t: usize, x: &mut [f32], norm: &Option<RmsNorm>| {
            if let Some(norm) = norm {
                norm.forward_inplace(x);
            }
            rope.apply(t, x, s.k_dim);
            if s.f16_rounding {
                round_slice_f16(x);
            }
        };
        if n >= PARALLEL_PREPARE_TOKENS {
            pool::for_each_chunk_mut(&mut q, qw, |t, qt| prepare(t, qt, &self.q_norm));
            pool::for_each_chunk_mut(&mut k, kw, |t, kt| prepare(t, kt, &self.k_norm));
        } else {
            for (t, qt) in q.chunks_exact_mut(qw).enumerate() {
                prepare(t, qt, &self.q_norm);
            }
            for (t, kt) in k.chunks_exact_mut(kw).enumerate() {
                prepare(t, kt, &self.k_norm);
            }
        }
        for t in 0..n {
            let vt = &mut v[t * vw..(t + 1) * vw];
            if s.f16_rounding {
                round_slice_f16(vt);
            }
            kv.write(batch.slot(t, block_size), &k[t * kw..(t + 1) * kw], vt);
        }
        let view = kv.view(block_size);
        // One task per (token, KV head), covering the query heads that share that KV head, so
        // each K/V row is read once per group. With fewer groups than can keep the threads busy
        // (decode), each group is spread over the threads instead. Both are bit-identical to
        // one `attention_head` per query head.
        let mut attn = vec![0.0; n * s.n_heads * s.v_dim];
        let group = s.n_heads / s.n_kv_heads;
        let run = |i: usize, o: &mut [f32], attend: GroupFn| {
            let (t, g) = (i / s.n_kv_heads, i % s.n_kv_heads);
            let pos = batch.positions[t];
            let start = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let table = batch.block_tables[batch.seq_of[t]];
            let qg = &q[t * qw + g * group * s.k_dim..t * qw + (g + 1) * group * s.k_dim];
            attend(qg, &view, g, table, start..pos + 1, s, o);
        };
        if n * s.n_kv_heads < 2 * pool::threads() {
            for (i, o) in attn.chunks_mut(group * s.v_dim).enumerate() {
                run(i, o, attention_group_parallel);
            }
        } else {
            pool::for_each_chunk_mut(&mut attn, group * s.v_dim, |i, o| {
                run(i, o, attention_group)
            });
        }
        self.wo.forward(&attn, n, out);
    }
}

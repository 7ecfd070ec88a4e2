//! The attention layer (MHA/GQA): projections, optional per-head Q/K norms, rope, the KV
//! cache write, causal attention over the paged cache (optionally a sliding window), and
//! the output projection; optionally an output gate (Qwen3.5 / Qwen3-Next: the query
//! projection gives each head its query and a gate, and the attention output is multiplied by
//! the gate's sigmoid before the output projection). This and its MLA sibling ([`super::Mla`]) are the only code that
//! writes the KV cache. It loads its own tensors ([`Attention::load`]).

use supernode_kernels::ops::{
    attention_group, attention_groups_parallel, round_slice_f16, AttnShape, GroupSpan,
};
use supernode_kernels::pool;
use supernode_kernels::scratch::zeroed;

use super::{BlockAttention, LayerCtx, Linear, RmsNorm};
use crate::kv_cache::{KvDType, KvLayerSpec, KvValues, LayerKv};
use crate::weights::Weights;
use crate::{ModelConfig, Result};

/// From this many tokens on, queries and keys are prepared (normed, roped, rounded) in parallel.
const PARALLEL_PREPARE_TOKENS: usize = 8;

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
    /// The element type of the cache rows: f16 when keys and values are rounded to f16
    /// ([`KvDType::for_rounding`]).
    pub kv_dtype: KvDType,
    /// `wq` gives `[query, gate]` per head, and the output is `sigmoid(gate) * attention`.
    pub output_gate: bool,
}

impl Attention {
    /// Layer `layer`'s attention from its GGUF-named tensors: `attn_q`, `attn_k`, `attn_v`,
    /// `attn_output` (with their biases where the file has them: Qwen2), and the per-head
    /// norms `attn_q_norm`, `attn_k_norm` when `qk_norm` (Qwen3, Gemma 3); windowed as the
    /// config says ([`ModelConfig::window_of`]).
    pub fn load(cfg: &ModelConfig, w: &Weights, layer: usize, qk_norm: bool) -> Result<Attention> {
        Self::load_with(cfg, w, layer, qk_norm, false)
    }

    /// The gated attention of Qwen3.5 and Qwen3-Next: `attn_q` of `2 * n_heads * head_dim`
    /// rows (each head's query, then its gate), per-head Q/K norms.
    pub fn load_gated(cfg: &ModelConfig, w: &Weights, layer: usize) -> Result<Attention> {
        Self::load_with(cfg, w, layer, true, true)
    }

    fn load_with(
        cfg: &ModelConfig,
        w: &Weights,
        layer: usize,
        qk_norm: bool,
        output_gate: bool,
    ) -> Result<Attention> {
        let p = |n: &str| format!("blk.{layer}.{n}");
        let (h, hd, eps, off) = (cfg.hidden, cfg.head_dim, cfg.rms_eps, cfg.norm_offset);
        let numerics = w.numerics();
        let head_norm = |n: &str| qk_norm.then(|| w.rms_norm(&p(n), hd, eps, off)).transpose();
        Ok(Attention {
            wq: w.linear(
                &p("attn_q"),
                (1 + usize::from(output_gate)) * cfg.n_heads * hd,
                h,
            )?,
            wk: w.linear(&p("attn_k"), cfg.n_kv_heads * hd, h)?,
            wv: w.linear(&p("attn_v"), cfg.n_kv_heads * cfg.v_head_dim, h)?,
            wo: w.linear(&p("attn_output"), h, cfg.n_heads * cfg.v_head_dim)?,
            q_norm: head_norm("attn_q_norm.weight")?,
            k_norm: head_norm("attn_k_norm.weight")?,
            shape: AttnShape {
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                k_dim: hd,
                v_dim: cfg.v_head_dim,
                scale: cfg.attn_scale,
                softcap: None,
                f16_rounding: numerics.f16_rounding,
            },
            window: cfg.window_of(layer),
            kv_dtype: numerics.kv_dtype,
            output_gate,
        })
    }
}

impl BlockAttention for Attention {
    /// Bytes of projection weights read per token.
    fn weight_bytes(&self) -> usize {
        [&self.wq, &self.wk, &self.wv, &self.wo]
            .iter()
            .map(|l| l.weight_bytes())
            .sum()
    }

    /// The geometry and element type of this layer's cache rows.
    fn kv_spec(&self) -> KvLayerSpec {
        let s = &self.shape;
        KvLayerSpec {
            n_kv_heads: s.n_kv_heads,
            k_dim: s.k_dim,
            v_dim: s.v_dim,
            values: KvValues::Stored,
            dtype: self.kv_dtype,
            index_dim: 0,
        }
    }

    /// `x`: the normalised `n × hidden` input of the batch; writes `n × hidden` to `out`.
    fn forward(&self, x: &[f32], ctx: &mut LayerCtx, kv: &mut LayerKv, out: &mut [f32]) {
        let (batch, rope, block_size) = (ctx.batch, ctx.rope, ctx.block_size);
        let n = batch.len();
        let s = &self.shape;
        let (qw, kw, vw) = (
            s.n_heads * s.k_dim,
            s.n_kv_heads * s.k_dim,
            s.n_kv_heads * s.v_dim,
        );
        let gated = usize::from(self.output_gate);
        let mut q = zeroed(n * qw * (1 + gated));
        let mut k = zeroed(n * kw);
        let mut v = zeroed(n * vw);
        Linear::forward_many(
            &[&self.wq, &self.wk, &self.wv],
            x,
            n,
            &mut [&mut q, &mut k, &mut v],
        );
        // Each head's `[query, gate]` apart: the queries, then the gates.
        let mut gate = zeroed(n * qw * gated);
        if self.output_gate {
            let full = std::mem::replace(&mut q, zeroed(n * qw));
            let hd = s.k_dim;
            for ((src, qd), gd) in full
                .chunks_exact(2 * hd)
                .zip(q.chunks_exact_mut(hd))
                .zip(gate.chunks_exact_mut(hd))
            {
                qd.copy_from_slice(&src[..hd]);
                gd.copy_from_slice(&src[hd..]);
            }
        }
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
        ctx.cb("q", &q);
        ctx.cb("k", &k);
        ctx.cb("v", &v);
        let view = kv.view(block_size);
        // One group per (token, KV head), covering the query heads that share that KV head, so
        // each K/V row is read once per group: one task per group when they split evenly over
        // the threads (two KV heads on two threads: Qwen2.5, Qwen3-MoE) or there are enough of
        // them to keep the threads busy, else (decode of one KV head, or three on two threads)
        // all groups spread over the threads together, phase by phase. Both are bit-identical
        // to one `attention_head` per query head.
        let mut attn = zeroed(n * s.n_heads * s.v_dim);
        let group = s.n_heads / s.n_kv_heads;
        let span = |i: usize| {
            let t = i / s.n_kv_heads;
            let pos = batch.positions[t];
            let start = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            GroupSpan {
                kv_head: i % s.n_kv_heads,
                block_table: batch.block_tables[batch.seq_of[t]],
                ctx: start..pos + 1,
            }
        };
        let (groups, threads) = (n * s.n_kv_heads, pool::threads());
        if groups < 2 * threads && !groups.is_multiple_of(threads) {
            let spans: Vec<GroupSpan> = (0..n * s.n_kv_heads).map(span).collect();
            attention_groups_parallel(&q, &view, &spans, s, &mut attn);
        } else {
            pool::for_each_chunk_mut(&mut attn, group * s.v_dim, |i, o| {
                let GroupSpan {
                    kv_head,
                    block_table,
                    ctx,
                } = span(i);
                let qg = &q[i * group * s.k_dim..(i + 1) * group * s.k_dim];
                attention_group(qg, &view, kv_head, block_table, ctx, s, o)
            });
        }
        if self.output_gate {
            ctx.cb("attn_pregate", &attn);
            attn.iter_mut()
                .zip(gate.iter())
                .for_each(|(a, &g)| *a *= 1.0 / (1.0 + (-g).exp()));
        }
        self.wo.forward(&attn, n, out);
    }
}

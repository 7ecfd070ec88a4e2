//! Multi-head latent attention (DeepSeek-V2/V3), in the absorbed form for every token.
//!
//! The cache row of a token is `[c, k_pe]`: the normalised latent `c = norm(kv_a(x)[..rank])`
//! and the roped shared key `k_pe` ([`KvLayerSpec::mla`](crate::KvLayerSpec::mla)). Head `h`'s
//! key is `[W_UK_h c, k_pe]` and its value `W_UV_h c` (`W_UK_h`, `W_UV_h`: head `h`'s rows of
//! `kv_b`), so with the query `[q_nope, q_pe]`:
//!
//! ```text
//! score = q_nope · W_UK_h c + q_pe · k_pe = [W_UK_hᵀ q_nope, q_pe] · [c, k_pe]
//! out_h = Σ p · W_UV_h c = W_UV_h (Σ p · c)
//! ```
//!
//! so attention runs as MQA over the cache rows themselves (one KV head of `rank + rope` dims
//! whose values are the first `rank` dims), with the absorbed query `W_UK_hᵀ q_nope` and the
//! per-head expansion `W_UV_h` after it. Prefill, chunked prefill and decode take this one path,
//! so they agree bit for bit. Like [`Attention`](super::Attention), this is code that writes the
//! KV cache, through [`LayerKv::write`].
//!
//! With an [`Indexer`] (DeepSeek-V3.2's sparse attention) a query attends to the `top_k`
//! positions the indexer picks instead of its whole context, in the same absorbed form: the
//! attention kernel reads only those cache rows ([`attention_group_at`]), so the latent work of
//! a token is bounded by `top_k` however long the context. While a context has no more than
//! `top_k` positions every one of them is picked, which is V3's dense attention bit for bit.

use supernode_kernels::ops::{attention_group_at, attention_head, round_slice_f16, AttnShape};
use supernode_kernels::pool;
use supernode_kernels::scratch::zeroed;

use super::{BlockAttention, Indexer, LayerCtx, Linear, RmsNorm, StackedLinear};
use crate::config::MlaConfig;
use crate::kv_cache::{KvDType, KvLayerSpec, LayerKv};
use crate::weights::Weights;
use crate::{ModelConfig, Result};

/// How queries are made.
pub enum MlaQuery {
    /// `q_b(norm(q_a(x)))`: DeepSeek-V3's query LoRA.
    LoRa { a: Linear, norm: RmsNorm, b: Linear },
    /// `q(x)`: no query compression (DeepSeek-V2-Lite).
    Plain(Linear),
}

pub struct Mla {
    pub q: MlaQuery,
    /// `[hidden, rank + rope]`: the latent and the shared rope key.
    pub kv_a: Linear,
    /// `[rank]`
    pub kv_norm: RmsNorm,
    /// Per head, `W_UK_hᵀ`: `rank × nope` (GGUF `attn_k_b`).
    pub k_b: StackedLinear,
    /// Per head, `W_UV_h`: `v_dim × rank` (GGUF `attn_v_b`).
    pub v_b: StackedLinear,
    /// `[n_heads * v_dim, hidden]`
    pub wo: Linear,
    pub n_heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub rank: usize,
    pub v_dim: usize,
    /// Softmax scale of the full `q·k` (YaRN-corrected).
    pub scale: f32,
    /// Round queries, cache rows and softmax weights to f16 (llama.cpp's numerics).
    pub f16_rounding: bool,
    /// The element type of the cache rows: f16 when they are rounded to f16
    /// ([`KvDType::for_rounding`]).
    pub kv_dtype: KvDType,
    /// The lightning indexer of sparse attention (DeepSeek-V3.2); `None`: dense.
    pub indexer: Option<Indexer>,
}

impl BlockAttention for Mla {
    /// Bytes of projection weights read per token.
    fn weight_bytes(&self) -> usize {
        let q = match &self.q {
            MlaQuery::LoRa { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
            MlaQuery::Plain(q) => q.weight_bytes(),
        };
        q + self.kv_a.weight_bytes()
            + self.k_b.weight_bytes()
            + self.v_b.weight_bytes()
            + self.wo.weight_bytes()
            + self.indexer.as_ref().map_or(0, Indexer::weight_bytes)
    }

    /// The geometry and element type of this layer's cache rows: the latent and the roped key,
    /// and the indexer's key where there is one.
    fn kv_spec(&self) -> KvLayerSpec {
        match &self.indexer {
            None => KvLayerSpec::mla(self.rank, self.rope, self.kv_dtype),
            Some(ix) => KvLayerSpec::mla_indexed(self.rank, self.rope, ix.head_dim, self.kv_dtype),
        }
    }

    /// `x`: the normalised `n × hidden` input of the batch; writes `n × hidden` to `out`.
    fn forward(&self, x: &[f32], ctx: &mut LayerCtx, kv: &mut LayerKv, out: &mut [f32]) {
        let (batch, rope, block_size) = (ctx.batch, ctx.rope, ctx.block_size);
        let n = batch.len();
        let (heads, nope, rd, rank) = (self.n_heads, self.nope, self.rope, self.rank);
        let qk = nope + rd;
        let mut q = zeroed(n * heads * qk);
        // The query LoRA's normed latent, which the indexer reads too.
        let q_latent = match &self.q {
            MlaQuery::LoRa { a, norm, b } => {
                let mut qa = zeroed(n * a.rows());
                a.forward(x, n, &mut qa);
                norm.forward_inplace(&mut qa);
                b.forward(&qa, n, &mut q);
                Some(qa)
            }
            MlaQuery::Plain(wq) => {
                wq.forward(x, n, &mut q);
                None
            }
        };
        let kw = rank + rd;
        let mut ckv = zeroed(n * kw);
        self.kv_a.forward(x, n, &mut ckv);
        for (t, row) in ckv.chunks_exact_mut(kw).enumerate() {
            self.kv_norm.forward_inplace(&mut row[..rank]);
            rope.apply(t, &mut row[rank..], rd);
            if self.f16_rounding {
                round_slice_f16(row);
            }
            kv.write(batch.slot(t, block_size), row, &[]);
        }
        // The absorbed queries `[W_UK_hᵀ q_nope, q_pe]`, token-major then head.
        let mut qa = zeroed(n * heads * kw);
        let mut q_nope = zeroed(n * nope);
        let mut q_lat = zeroed(n * rank);
        for h in 0..heads {
            for t in 0..n {
                let src = &q[(t * heads + h) * qk..(t * heads + h + 1) * qk];
                q_nope[t * nope..(t + 1) * nope].copy_from_slice(&src[..nope]);
            }
            self.k_b.forward(h, &q_nope, n, &mut q_lat);
            for t in 0..n {
                let src = &mut q[(t * heads + h) * qk..(t * heads + h + 1) * qk];
                rope.apply(t, &mut src[nope..], rd);
                let dst = &mut qa[(t * heads + h) * kw..(t * heads + h + 1) * kw];
                dst[..rank].copy_from_slice(&q_lat[t * rank..(t + 1) * rank]);
                dst[rank..].copy_from_slice(&src[nope..]);
                if self.f16_rounding {
                    round_slice_f16(dst);
                }
            }
        }
        ctx.cb("q", &q);
        ctx.cb("kv", &ckv);
        let index = match (&self.indexer, &q_latent) {
            (Some(ix), Some(q_latent)) => {
                let keys = ix.write_keys(x, batch, rope, block_size, kv);
                ctx.cb("indexer_k", &keys);
                Some((ix, ix.queries(q_latent, x, n, rope)))
            }
            _ => None,
        };
        let view = kv.view(block_size);
        let shape = AttnShape {
            n_heads: heads,
            n_kv_heads: 1,
            k_dim: kw,
            v_dim: rank,
            scale: self.scale,
            softcap: None,
            f16_rounding: self.f16_rounding,
        };
        // Latent outputs `Σ p · c`, one task per (token, head): over the token's whole context,
        // or (sparse) over the positions its indexer picked, chosen first, one task per token.
        let picked: Vec<Vec<usize>> = match &index {
            None => Vec::new(),
            Some((ix, queries)) => {
                let keys = kv.index_view(block_size);
                let mut picked = vec![Vec::new(); n];
                pool::for_each_chunk_mut(&mut picked, 1, |t, out| {
                    let pos = batch.positions[t];
                    if pos >= ix.top_k {
                        let table = batch.block_tables[batch.seq_of[t]];
                        ix.select(queries, t, &keys, table, pos, &mut out[0]);
                    }
                });
                picked
            }
        };
        let mut lat = zeroed(n * heads * rank);
        pool::for_each_chunk_mut(&mut lat, rank, |i, o| {
            let t = i / heads;
            let table = batch.block_tables[batch.seq_of[t]];
            let qh = &qa[i * kw..(i + 1) * kw];
            match picked.get(t).filter(|p| !p.is_empty()) {
                Some(positions) => attention_group_at(qh, &view, 0, table, positions, &shape, o),
                None => {
                    let ctx = 0..batch.positions[t] + 1;
                    attention_head(qh, &view, 0, table, ctx, &shape, o);
                }
            }
        });
        // Per head `W_UV_h`, into the heads' concatenated outputs.
        let vd = self.v_dim;
        let mut attn = zeroed(n * heads * vd);
        let mut lat_h = zeroed(n * rank);
        let mut out_h = zeroed(n * vd);
        for h in 0..heads {
            for t in 0..n {
                let src = &lat[(t * heads + h) * rank..(t * heads + h + 1) * rank];
                lat_h[t * rank..(t + 1) * rank].copy_from_slice(src);
            }
            self.v_b.forward(h, &lat_h, n, &mut out_h);
            for t in 0..n {
                attn[(t * heads + h) * vd..(t * heads + h + 1) * vd]
                    .copy_from_slice(&out_h[t * vd..(t + 1) * vd]);
            }
        }
        self.wo.forward(&attn, n, out);
    }
}

impl Mla {
    /// Layer `layer`'s MLA from its GGUF-named tensors: the query LoRA (`attn_q_a`,
    /// `attn_q_a_norm`, `attn_q_b`) or `attn_q`; `attn_kv_a_mqa`, `attn_kv_a_norm`,
    /// `attn_output`; and the per-head expansions either split and stacked as newer llama.cpp
    /// converters write them (`attn_k_b`: `[nope, rank, heads]`, `attn_v_b`: `[rank, v, heads]`)
    /// or as one `attn_kv_b` (`[rank, heads * (nope + v)]`, HF's `kv_b_proj`), which is split
    /// here (`W_UK` transposed) into f32.
    pub fn load(cfg: &ModelConfig, mla: &MlaConfig, w: &Weights, layer: usize) -> Result<Mla> {
        let p = |n: &str| format!("blk.{layer}.{n}");
        let (h, heads, eps) = (cfg.hidden, cfg.n_heads, cfg.rms_eps);
        let (nope, rd, rank, vd) = (
            mla.qk_nope_dim,
            mla.qk_rope_dim,
            mla.kv_lora_rank,
            cfg.v_head_dim,
        );
        let q = match mla.q_lora_rank {
            Some(r) => MlaQuery::LoRa {
                a: w.linear(&p("attn_q_a"), r, h)?,
                norm: w.rms_norm(&p("attn_q_a_norm.weight"), r, eps, 0.0)?,
                b: w.linear(&p("attn_q_b"), heads * (nope + rd), r)?,
            },
            None => MlaQuery::Plain(w.linear(&p("attn_q"), heads * (nope + rd), h)?),
        };
        let (k_b, v_b) = if w.get(&p("attn_kv_b.weight")).is_some() {
            let kv_b = w.values(&p("attn_kv_b.weight"), &[rank, heads * (nope + vd)])?;
            let mut k_b = vec![0.0; heads * rank * nope];
            let mut v_b = Vec::with_capacity(heads * vd * rank);
            for (hd, rows) in kv_b.chunks_exact((nope + vd) * rank).enumerate() {
                // rows: `nope` rows of W_UK_h, then `vd` rows of W_UV_h, each of `rank`.
                for j in 0..nope {
                    for r in 0..rank {
                        k_b[(hd * rank + r) * nope + j] = rows[j * rank + r];
                    }
                }
                v_b.extend_from_slice(&rows[nope * rank..]);
            }
            (
                w.stacked_from_f32(&p("attn_k_b.weight"), &k_b, heads, rank, nope),
                w.stacked_from_f32(&p("attn_v_b.weight"), &v_b, heads, vd, rank),
            )
        } else {
            (
                w.stacked(&p("attn_k_b"), heads, rank, nope)?,
                w.stacked(&p("attn_v_b"), heads, vd, rank)?,
            )
        };
        Ok(Mla {
            q,
            kv_a: w.linear(&p("attn_kv_a_mqa"), rank + rd, h)?,
            kv_norm: w.rms_norm(&p("attn_kv_a_norm.weight"), rank, eps, 0.0)?,
            k_b,
            v_b,
            wo: w.linear(&p("attn_output"), h, heads * vd)?,
            n_heads: heads,
            nope,
            rope: rd,
            rank,
            v_dim: vd,
            scale: cfg.attn_scale,
            f16_rounding: w.numerics().f16_rounding,
            kv_dtype: w.numerics().kv_dtype,
            indexer: mla
                .indexer
                .as_ref()
                .map(|ix| Indexer::load(cfg, mla, ix, w, layer))
                .transpose()?,
        })
    }
}

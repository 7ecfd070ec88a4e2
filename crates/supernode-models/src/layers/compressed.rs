//! DeepSeek-V4's attention: one shared key-value head, a sliding window, and, on the
//! compressed layers, entries that each summarise a window of tokens.
//!
//! ```text
//! q     = rope(rmsnorm_per_head(q_b(norm(q_a x))))            n_heads of head_dim; rope on the last dims
//! kv_t  = rope(norm(kv x_t))                                  one head, the keys and the values
//! entry_w = rope_at(w·m)(norm(Σ_slots softmax_slot(gate + ape) ⊙ kv))    per channel
//! o_h   = Σ_i p_i kv_i,  p = softmax([q_h·k_i / sqrt(d) ..., sink_h])[..-1]
//! out   = o_b(o_a_g(unrope(o)_g))                            grouped low-rank output
//! ```
//!
//! A query at position `p` attends to the keys of positions `p-window+1 ..= p` and to the
//! entries of the windows that have closed by `p` (`w < (p+1)/m`):
//! - heavily compressed attention (HCA) to all of them, windows of `hca_rate` tokens;
//! - compressed sparse attention (CSA) to the `top_k` a lightning indexer scores best (all of
//!   them while they are no more), windows of `csa_rate` tokens that overlap: entry `w` mixes
//!   the first half of the projections of window `w-1` with the second half of window `w`'s.
//!   The indexer has a compressor of its own (at its own head size) whose entries are its keys.
//!
//! **The cache.** Per token the layer keeps its `kv` row (keys, which are the values) and, in
//! the rows beside it ([`KvLayerSpec::shared_kv`]), each compressor's raw projections (`kv`
//! and `gate`); the row of a window's last token keeps the window's entry in place of the part
//! of its projections no later entry reads, written when that token is computed. A token writes its own row only, and every row is a function of the tokens
//! up to its position, so blocks, chunked prefill, preemption, rolled-back drafts and the prefix
//! cache treat it as any KV row: a window closing in a later chunk reads its earlier tokens'
//! projections back from the cache.
//!
//! Follows transformers' `DeepseekV4Attention`, `DeepseekV4CSACompressor`,
//! `DeepseekV4HCACompressor` and `DeepseekV4Indexer`.

use supernode_kernels::ops::{round_slice_f16, RopeStyle};
use supernode_kernels::pool;
use supernode_kernels::scratch::zeroed;

use super::{BlockAttention, LayerCtx, Linear, RmsNorm, Rope, StackedLinear};
use crate::config::{V4Attention, V4Config};
use crate::kv_cache::{KvDType, KvLayerSpec, LayerKv};
use crate::weights::Weights;
use crate::{Batch, ModelConfig, Result};

/// One compressor: its projections of every token and the window they are pooled over.
pub struct Compressor {
    /// `[c·dim, hidden]` each, `c` = 2 where windows overlap, else 1.
    pub kv: Linear,
    pub gate: Linear,
    /// `[rate, c·dim]`: the gate's bias per slot of a window (`ape`, transformers'
    /// `position_bias`).
    pub ape: Vec<f32>,
    /// `[dim]`
    pub norm: RmsNorm,
    pub rate: usize,
    pub dim: usize,
    pub overlap: bool,
}

impl Compressor {
    fn load(
        w: &Weights,
        prefix: &str,
        hidden: usize,
        dim: usize,
        rate: usize,
        overlap: bool,
        eps: f32,
    ) -> Result<Compressor> {
        let c = if overlap { 2 } else { 1 };
        Ok(Compressor {
            kv: w.linear(&format!("{prefix}kv"), c * dim, hidden)?,
            gate: w.linear(&format!("{prefix}gate"), c * dim, hidden)?,
            ape: w.values(&format!("{prefix}ape.weight"), &[c * dim, rate])?,
            norm: w.rms_norm(&format!("{prefix}norm.weight"), dim, eps, 0.0)?,
            rate,
            dim,
            overlap,
        })
    }

    fn width(&self) -> usize {
        self.kv.rows()
    }

    /// Values this compressor keeps per token: both projections (`kv` then `gate`). The row of
    /// a window's last token gets the window's entry in place of the part of its `kv` that no
    /// later entry reads ([`Compressor::entry_at`]).
    fn row_width(&self) -> usize {
        2 * self.width()
    }

    /// Where, in the row of a window's last token, the window's entry is kept: over the last
    /// `dim` of its `kv` projection. That is the only part (HCA), or the second half (CSA,
    /// which the next window's entry does not read: it reads this window's first half), and the
    /// entry is computed before it is written there.
    fn entry_at(&self, offset: usize) -> usize {
        offset + self.width() - self.dim
    }

    fn weight_bytes(&self) -> usize {
        self.kv.weight_bytes() + self.gate.weight_bytes()
    }

    /// Writes the batch's projections into the rows from `offset`.
    fn write_projections(
        &self,
        x: &[f32],
        batch: &Batch,
        block_size: usize,
        offset: usize,
        f16: bool,
        kv: &mut LayerKv,
    ) {
        let (n, c) = (batch.len(), self.width());
        let mut proj = zeroed(n * c);
        let mut gate = zeroed(n * c);
        self.kv.forward(x, n, &mut proj);
        self.gate.forward(x, n, &mut gate);
        for t in 0..n {
            let slot = batch.slot(t, block_size);
            for (i, src) in [&mut proj, &mut gate].into_iter().enumerate() {
                let row = &mut src[t * c..(t + 1) * c];
                if f16 {
                    round_slice_f16(row);
                }
                kv.write_index_at(slot, offset + i * c, row);
            }
        }
    }

    /// The entry of window `w` of the sequence whose slots `slot_of` gives, from the
    /// projections in the rows at `offset`: pooled, normed and roped at position `w·rate`.
    fn entry(
        &self,
        w: usize,
        slot_of: &dyn Fn(usize) -> usize,
        offset: usize,
        kv: &LayerKv,
        rope: &Rope,
        rope_dim: usize,
    ) -> Vec<f32> {
        let (d, m, c) = (self.dim, self.rate, self.width());
        // Per slot of the pool: the kv values and the gate (+ ape) of each channel.
        let mut slots: Vec<(Vec<f32>, Vec<f32>)> = Vec::with_capacity(2 * m);
        let mut read = |pos: usize, j: usize, half: usize| {
            let slot = slot_of(pos);
            let (mut v, mut g) = (vec![0.0; d], vec![0.0; d]);
            kv.read_index_at(slot, offset + half * d, &mut v);
            kv.read_index_at(slot, offset + c + half * d, &mut g);
            g.iter_mut()
                .zip(&self.ape[j * c + half * d..j * c + (half + 1) * d])
                .for_each(|(g, &a)| *g += a);
            slots.push((v, g));
        };
        if self.overlap {
            // The first halves of the window before (none before the first window), then the
            // second halves of this one.
            if w > 0 {
                (0..m).for_each(|j| read((w - 1) * m + j, j, 0));
            }
            (0..m).for_each(|j| read(w * m + j, j, 1));
        } else {
            (0..m).for_each(|j| read(w * m + j, j, 0));
        }
        let mut e = vec![0.0; d];
        for (ch, out) in e.iter_mut().enumerate() {
            let max = slots
                .iter()
                .map(|(_, g)| g[ch])
                .fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = slots.iter().map(|(_, g)| (g[ch] - max).exp()).sum();
            *out = slots
                .iter()
                .map(|(v, g)| v[ch] * ((g[ch] - max).exp() / sum))
                .sum();
        }
        self.norm.forward_inplace(&mut e);
        let table = rope.table(&[w * m]);
        table.apply_as(0, &mut e[d - rope_dim..], rope_dim, RopeStyle::Interleaved);
        e
    }

    /// Computes the entry of every window a batch token closes and writes it into that token's
    /// own row ([`Compressor::entry_at`]). (Into no other row: a row depends only on the tokens
    /// up to its position, so blocks shared through the prefix cache are never written.)
    #[allow(clippy::too_many_arguments)]
    fn close_windows(
        &self,
        batch: &Batch,
        block_size: usize,
        offset: usize,
        f16: bool,
        kv: &mut LayerKv,
        rope: &Rope,
        rope_dim: usize,
    ) {
        let m = self.rate;
        for t in 0..batch.len() {
            let pos = batch.positions[t];
            if !(pos + 1).is_multiple_of(m) {
                continue;
            }
            let w = (pos + 1) / m - 1;
            let table = batch.block_tables[batch.seq_of[t]];
            let slot_of = |p: usize| table[p / block_size] as usize * block_size + p % block_size;
            let mut e = self.entry(w, &slot_of, offset, kv, rope, rope_dim);
            if f16 {
                round_slice_f16(&mut e);
            }
            kv.write_index_at(slot_of(pos), self.entry_at(offset), &e);
        }
    }

    /// The entries of windows `ws` of a sequence, each from the row of its window's last token
    /// (`ws.len() × dim`).
    fn gather(
        &self,
        ws: impl ExactSizeIterator<Item = usize>,
        slot_of: &dyn Fn(usize) -> usize,
        offset: usize,
        kv: &LayerKv,
    ) -> Vec<f32> {
        let m = self.rate;
        let at = self.entry_at(offset);
        let mut out = vec![0.0; ws.len() * self.dim];
        for (w, e) in ws.zip(out.chunks_exact_mut(self.dim)) {
            kv.read_index_at(slot_of(w * m + m - 1), at, e);
        }
        out
    }
}

/// The lightning indexer of a CSA layer: its compressor's entries are its keys.
pub struct V4Indexer {
    pub comp: Compressor,
    /// `[n_heads · head_dim, q_lora_rank]`
    pub q_b: Linear,
    /// `[n_heads, hidden]`
    pub weights_proj: Linear,
    pub n_heads: usize,
    pub head_dim: usize,
    pub top_k: usize,
}

/// A DeepSeek-V4 layer's attention.
pub struct V4Attn {
    pub q_a: Linear,
    pub q_a_norm: RmsNorm,
    pub q_b: Linear,
    pub kv: Linear,
    pub kv_norm: RmsNorm,
    /// Per group `[o_lora_rank, n_heads · head_dim / o_groups]`.
    pub o_a: StackedLinear,
    pub o_b: Linear,
    pub sinks: Vec<f32>,
    pub kind: V4Attention,
    pub compressor: Option<Compressor>,
    pub indexer: Option<V4Indexer>,
    /// The rope of this layer's queries and keys (the main one on sliding layers, the
    /// compressed one on the others), and the compressed one of its entries and indexer.
    pub rope: Rope,
    pub compress_rope: Rope,
    pub n_heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub window: usize,
    pub groups: usize,
    /// The per-head query norm's epsilon.
    pub eps: f32,
    pub f16_rounding: bool,
    pub kv_dtype: KvDType,
}

impl V4Attn {
    /// Layer `layer`'s attention from its GGUF-named tensors (llama.cpp's `deepseek4` names).
    pub fn load(cfg: &ModelConfig, v4: &V4Config, w: &Weights, layer: usize) -> Result<V4Attn> {
        let p = |n: &str| format!("blk.{layer}.{n}");
        let (h, hd, heads) = (cfg.hidden, cfg.head_dim, cfg.n_heads);
        let (g, r) = (v4.o_groups, v4.o_lora_rank);
        let kind = v4.layers[layer];
        let eps = cfg.rms_eps;
        let in_g = heads * hd / g;
        let o_a = w.values(&p("attn_output_a.weight"), &[in_g, g * r])?;
        let compressor = match kind {
            V4Attention::Sliding => None,
            V4Attention::Csa => Some(Compressor::load(
                w,
                &p("attn_compressor_"),
                h,
                hd,
                v4.csa_rate,
                true,
                eps,
            )?),
            V4Attention::Hca => Some(Compressor::load(
                w,
                &p("attn_compressor_"),
                h,
                hd,
                v4.hca_rate,
                false,
                eps,
            )?),
        };
        let indexer = match kind {
            V4Attention::Csa => {
                let ix = &v4.indexer;
                Some(V4Indexer {
                    comp: Compressor::load(
                        w,
                        &p("indexer_compressor_"),
                        h,
                        ix.head_dim,
                        v4.csa_rate,
                        true,
                        eps,
                    )?,
                    q_b: w.linear(
                        &p("indexer.attn_q_b"),
                        ix.n_heads * ix.head_dim,
                        v4.q_lora_rank,
                    )?,
                    weights_proj: w.linear(&p("indexer.proj"), ix.n_heads, h)?,
                    n_heads: ix.n_heads,
                    head_dim: ix.head_dim,
                    top_k: ix.top_k,
                })
            }
            _ => None,
        };
        let compress_rope = Rope::new(&v4.compress_rope);
        Ok(V4Attn {
            q_a: w.linear(&p("attn_q_a"), v4.q_lora_rank, h)?,
            q_a_norm: w.rms_norm(&p("attn_q_a_norm.weight"), v4.q_lora_rank, eps, 0.0)?,
            q_b: w.linear(&p("attn_q_b"), heads * hd, v4.q_lora_rank)?,
            kv: w.linear(&p("attn_kv"), hd, h)?,
            kv_norm: w.rms_norm(&p("attn_kv_a_norm.weight"), hd, eps, 0.0)?,
            o_a: w.stacked_from_f32(&p("attn_output_a.weight"), &o_a, g, r, in_g),
            o_b: w.linear(&p("attn_output_b"), h, g * r)?,
            sinks: w.vector(&p("attn_sinks.weight"), heads)?,
            kind,
            compressor,
            indexer,
            rope: match kind {
                V4Attention::Sliding => Rope::new(&cfg.rope),
                _ => Rope::new(&v4.compress_rope),
            },
            compress_rope,
            n_heads: heads,
            head_dim: hd,
            rope_dim: cfg.rope.dim,
            window: v4.window,
            groups: g,
            eps,
            f16_rounding: w.numerics().f16_rounding,
            kv_dtype: w.numerics().kv_dtype,
        })
    }

    /// Where the indexer's compressor's values start in a token's extra row.
    fn indexer_offset(&self) -> usize {
        self.compressor.as_ref().map_or(0, Compressor::row_width)
    }

    /// The entries query `t` attends to (`count × head_dim`), ascending by window.
    #[allow(clippy::too_many_arguments)]
    fn entries_for(
        &self,
        t: usize,
        pos: usize,
        slot_of: &dyn Fn(usize) -> usize,
        kv: &LayerKv,
        iq: Option<(&[f32], &[f32])>,
    ) -> Vec<f32> {
        let Some(comp) = &self.compressor else {
            return Vec::new();
        };
        let count = (pos + 1) / comp.rate;
        if count == 0 {
            return Vec::new();
        }
        let (Some(ix), Some((q, wts))) = (&self.indexer, iq) else {
            return comp.gather(0..count, slot_of, 0, kv);
        };
        if count <= ix.top_k {
            return comp.gather(0..count, slot_of, 0, kv);
        }
        // Score every closed window by its indexer key; gather only the `top_k` best entries.
        let (nh, d) = (ix.n_heads, ix.head_dim);
        let keys = ix.comp.gather(0..count, slot_of, self.indexer_offset(), kv);
        let q = &q[t * nh * d..(t + 1) * nh * d];
        let wts = &wts[t * nh..(t + 1) * nh];
        let scale = (d as f32).powf(-0.5);
        let scores: Vec<f32> = keys
            .chunks_exact(d)
            .map(|k| {
                q.chunks_exact(d)
                    .zip(wts)
                    .map(|(qh, &wh)| {
                        let dot: f32 = qh.iter().zip(k).map(|(a, b)| a * b).sum();
                        dot.max(0.0) * scale * wh
                    })
                    .sum()
            })
            .collect();
        let mut picked = Vec::with_capacity(ix.top_k);
        supernode_kernels::ops::top_k_positions(&scores, 0, ix.top_k, &mut picked);
        comp.gather(picked.into_iter(), slot_of, 0, kv)
    }
}

impl BlockAttention for V4Attn {
    fn weight_bytes(&self) -> usize {
        let comp = self.compressor.as_ref().map_or(0, Compressor::weight_bytes);
        let ix = self.indexer.as_ref().map_or(0, |ix| {
            ix.comp.weight_bytes() + ix.q_b.weight_bytes() + ix.weights_proj.weight_bytes()
        });
        self.q_a.weight_bytes()
            + self.q_b.weight_bytes()
            + self.kv.weight_bytes()
            + self.o_a.weight_bytes()
            + self.o_b.weight_bytes()
            + comp
            + ix
    }

    fn kv_spec(&self) -> KvLayerSpec {
        let aux = self.indexer_offset() + self.indexer.as_ref().map_or(0, |ix| ix.comp.row_width());
        KvLayerSpec::shared_kv(self.head_dim, aux, self.kv_dtype)
    }

    fn forward(&self, x: &[f32], ctx: &mut LayerCtx, kv: &mut LayerKv, out: &mut [f32]) {
        let (batch, block_size) = (ctx.batch, ctx.block_size);
        let n = batch.len();
        let (heads, hd, rd) = (self.n_heads, self.head_dim, self.rope_dim);
        let rope = self.rope.table(batch.positions);
        // Rows of an f16 cache take f16 values: everything cached is rounded first (the
        // numerics' f16 rounding, or an f16 cache in exact precision).
        let f16 = self.f16_rounding || self.kv_dtype == KvDType::F16;
        // Queries: the LoRA's normed latent (which the indexer reads too), then per head an
        // RMSNorm without weight and the rope on the last `rope_dim` dims.
        let mut q_lat = zeroed(n * self.q_a.rows());
        self.q_a.forward(x, n, &mut q_lat);
        self.q_a_norm.forward_inplace(&mut q_lat);
        let mut q = zeroed(n * heads * hd);
        self.q_b.forward(&q_lat, n, &mut q);
        for (t, row) in q.chunks_exact_mut(heads * hd).enumerate() {
            for head in row.chunks_exact_mut(hd) {
                let ms = head.iter().map(|v| v * v).sum::<f32>() / hd as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                head.iter_mut().for_each(|v| *v *= r);
                rope.apply_as(t, &mut head[hd - rd..], rd, RopeStyle::Interleaved);
            }
        }
        ctx.cb("q", &q);
        // The shared key-value head of every token, into the cache.
        let mut kvr = zeroed(n * hd);
        self.kv.forward(x, n, &mut kvr);
        for (t, row) in kvr.chunks_exact_mut(hd).enumerate() {
            self.kv_norm.forward_inplace(row);
            rope.apply_as(t, &mut row[hd - rd..], rd, RopeStyle::Interleaved);
            if f16 {
                round_slice_f16(row);
            }
            kv.write(batch.slot(t, block_size), row, &[]);
        }
        ctx.cb("kv", &kvr);
        // The compressors: every token's projections, then the entries of the windows the
        // batch closes (which may read projections of earlier steps back from the cache).
        let ix_off = self.indexer_offset();
        if let Some(comp) = &self.compressor {
            comp.write_projections(x, batch, block_size, 0, f16, kv);
            comp.close_windows(batch, block_size, 0, f16, kv, &self.compress_rope, rd);
        }
        let iq = self.indexer.as_ref().map(|ix| {
            ix.comp
                .write_projections(x, batch, block_size, ix_off, f16, kv);
            ix.comp
                .close_windows(batch, block_size, ix_off, f16, kv, &self.compress_rope, rd);
            let (nh, d) = (ix.n_heads, ix.head_dim);
            let mut iq = zeroed(n * nh * d);
            ix.q_b.forward(&q_lat, n, &mut iq);
            let crope = self.compress_rope.table(batch.positions);
            for (t, row) in iq.chunks_exact_mut(nh * d).enumerate() {
                for head in row.chunks_exact_mut(d) {
                    crope.apply_as(t, &mut head[d - rd..], rd, RopeStyle::Interleaved);
                }
            }
            let mut wts = zeroed(n * nh);
            ix.weights_proj.forward(x, n, &mut wts);
            let s = (nh as f32).powf(-0.5);
            wts.iter_mut().for_each(|v| *v *= s);
            (iq.to_vec(), wts.to_vec())
        });
        // Attention, token by token (in parallel): the window's keys and the chosen entries.
        let mut o = zeroed(n * heads * hd);
        let scale = (hd as f32).powf(-0.5);
        let kv: &LayerKv = kv;
        let iq = iq.as_ref().map(|(q, w)| (q.as_slice(), w.as_slice()));
        pool::for_each_chunk_mut(&mut o, heads * hd, |t, ot| {
            let pos = batch.positions[t];
            let table = batch.block_tables[batch.seq_of[t]];
            let slot_of = |p: usize| table[p / block_size] as usize * block_size + p % block_size;
            let first = (pos + 1).saturating_sub(self.window);
            let mut keys = vec![0.0; (pos + 1 - first) * hd];
            for (p, k) in (first..=pos).zip(keys.chunks_exact_mut(hd)) {
                kv.read_key(slot_of(p), k);
            }
            keys.extend_from_slice(&self.entries_for(t, pos, &slot_of, kv, iq));
            let mut logits = vec![0.0; keys.len() / hd];
            for (h, oh) in ot.chunks_exact_mut(hd).enumerate() {
                let qh = &q[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                for (l, k) in logits.iter_mut().zip(keys.chunks_exact(hd)) {
                    *l = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                }
                // The sink takes part in the softmax only.
                let sink = self.sinks[h];
                let max = logits.iter().copied().fold(sink, f32::max);
                let mut sum = (sink - max).exp();
                for l in logits.iter_mut() {
                    *l = (*l - max).exp();
                    sum += *l;
                }
                for (&p, k) in logits.iter().zip(keys.chunks_exact(hd)) {
                    let p = p / sum;
                    oh.iter_mut().zip(k).for_each(|(o, &v)| *o += p * v);
                }
                // The values were roped keys: rotate the output back at the query's position.
                rope.apply_inverse_as(t, &mut oh[hd - rd..], rd, RopeStyle::Interleaved);
            }
        });
        ctx.cb("attn_heads", &o);
        // The grouped low-rank output: each group of heads to its own `o_lora_rank`, then
        // all of them to `hidden`.
        let g = self.groups;
        let in_g = heads * hd / g;
        let r = self.o_a.rows();
        let mut mid = zeroed(n * g * r);
        let mut xg = zeroed(n * in_g);
        let mut yg = zeroed(n * r);
        for gi in 0..g {
            for t in 0..n {
                let src = &o[t * heads * hd + gi * in_g..t * heads * hd + (gi + 1) * in_g];
                xg[t * in_g..(t + 1) * in_g].copy_from_slice(src);
            }
            self.o_a.forward(gi, &xg, n, &mut yg);
            for t in 0..n {
                mid[t * g * r + gi * r..t * g * r + (gi + 1) * r]
                    .copy_from_slice(&yg[t * r..(t + 1) * r]);
            }
        }
        self.o_b.forward(&mid, n, out);
    }
}

//! The pre-norm decoder that every architecture composes: the Llama family and DeepSeek differ
//! only in the attention layer (GQA or MLA) each block holds, Gemma 3 in options of this one
//! loop (post-norms, per-layer rope, embedding scale, logit soft-cap).
//!
//! ```text
//! x = embed(tokens) * embed_scale
//! for each block:  x += post_attn_norm?(attn(attn_norm(x)))     (rope of the layer's kind)
//!                  x += post_ffn_norm?(ffn(ffn_norm(x)))         (ffn: dense or MoE)
//! logits = softcap?(head(output_norm(x)))            (rows in batch.logits_for only)
//! ```
//!
//! A checkpoint's multi-token-prediction layer (NextN: DeepSeek-V3's MTP module, Qwen3.5's
//! `mtp`) is one more block of the same kind, after the decoder's, with its own input:
//!
//! ```text
//! x = eh_proj([enorm(embed(token_p)) ; hnorm(h_{p-1})])   h: a hidden state after the final norm
//! x = block(x)                                            (its own one-layer KV cache)
//! h_p = head_norm(x);  logits = head(h_p)                 (the model's head unless it has one)
//! ```
//!
//! What the config says applies to every architecture alike: the embedding scale
//! ([`ModelConfig::embed_scale`]), the final soft-cap ([`ModelConfig::final_softcap`]), the norm
//! weights' offset, and the windowed layers with their own rope
//! ([`ModelConfig::sliding_window`]); what the config does not say is a [`DecoderOptions`].

use supernode_kernels::ops::{softcap, Activation};
use supernode_kernels::scratch::zeroed;

use crate::arch::Model;
use crate::kv_cache::{KvCache, KvLayerSpec};
use crate::layers::{
    BlockAttention, Embedding, Ffn, HyperConnection, HyperHead, LayerCtx, Linear, Mixes,
    OutputHead, RmsNorm, Rope,
};
use crate::trace::Trace;
use crate::weights::Weights;
use crate::{Batch, ModelConfig, Result};

/// What an architecture chooses of the decoder beyond its config.
#[derive(Clone, Copy, Debug)]
pub struct DecoderOptions {
    /// The feed-forwards' activation (SiLU: SwiGLU; GELU: GeGLU).
    pub act: Activation,
    /// A norm after the attention and after the feed-forward too (`post_attention_norm`,
    /// `post_ffw_norm`: Gemma's "sandwich" blocks).
    pub post_norms: bool,
    /// The GGUF name (in a block) of the norm before the feed-forward: `ffn_norm.weight`, or
    /// `post_attention_norm.weight` (llama.cpp's Qwen3.5 / Qwen3-Next names for it).
    pub ffn_norm: &'static str,
}

/// One block; all norms are `[hidden]` (per-head norms live inside the attention).
struct Block<A> {
    attn_norm: RmsNorm,
    attn: A,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    ffn: Ffn,
    post_ffn_norm: Option<RmsNorm>,
    /// Windowed (local) layer: uses the local rope.
    local: bool,
    /// Hyper-connections around the attention and the feed-forward (DeepSeek-V4): the residual
    /// is `hc_mult` streams per token, collapsed into each one's input and expanded after.
    hc: Option<(HyperConnection, HyperConnection)>,
}

impl<A: BlockAttention> Block<A> {
    /// The block on the residual stream `x` (`n × hidden`; `n × hc_mult·hidden` with
    /// hyper-connections), `xn` and `y` its `n × hidden` scratch.
    fn forward(
        &self,
        x: &mut [f32],
        xn: &mut [f32],
        y: &mut [f32],
        ctx: &mut LayerCtx,
        kv: &mut crate::kv_cache::LayerKv,
    ) {
        if let Some((attn_hc, ffn_hc)) = &self.hc {
            return self.forward_hyper(attn_hc, ffn_hc, x, xn, y, ctx, kv);
        }
        self.attn_norm.forward(x, xn);
        ctx.cb("attn_norm", xn);
        self.attn.forward(xn, ctx, kv, y);
        ctx.cb("attn_out", y);
        if let Some(norm) = &self.post_attn_norm {
            norm.forward_inplace(y);
            ctx.cb("attn_post_norm", y);
        }
        x.iter_mut().zip(y.iter()).for_each(|(a, b)| *a += b);
        ctx.cb("ffn_inp", x);
        self.ffn_norm.forward(x, xn);
        ctx.cb("ffn_norm", xn);
        self.ffn.forward(xn, ctx.batch.tokens, y);
        ctx.cb("ffn_out", y);
        if let Some(norm) = &self.post_ffn_norm {
            norm.forward_inplace(y);
            ctx.cb("ffn_post_norm", y);
        }
        x.iter_mut().zip(y.iter()).for_each(|(a, b)| *a += b);
        ctx.cb("l_out", x);
    }

    /// [`Block::forward`] with hyper-connections: each sub-layer reads its streams collapsed
    /// and its output is expanded back into them, token by token.
    #[allow(clippy::too_many_arguments)]
    fn forward_hyper(
        &self,
        attn_hc: &HyperConnection,
        ffn_hc: &HyperConnection,
        x: &mut [f32],
        xn: &mut [f32],
        y: &mut [f32],
        ctx: &mut LayerCtx,
        kv: &mut crate::kv_cache::LayerKv,
    ) {
        let n = ctx.batch.len();
        let h = xn.len() / n.max(1);
        let streams = x.len() / n.max(1);
        let mut u = zeroed(n * h);
        let collapse = |hc: &HyperConnection, x: &[f32], u: &mut [f32]| -> Vec<Mixes> {
            x.chunks_exact(streams)
                .zip(u.chunks_exact_mut(h))
                .map(|(xt, ut)| hc.collapse(xt, ut))
                .collect()
        };
        let expand = |hc: &HyperConnection, mixes: &[Mixes], y: &[f32], x: &mut [f32]| {
            for ((m, yt), xt) in mixes
                .iter()
                .zip(y.chunks_exact(h))
                .zip(x.chunks_exact_mut(streams))
            {
                hc.expand(m, yt, xt);
            }
        };
        let mixes = collapse(attn_hc, x, &mut u);
        self.attn_norm.forward(&u, xn);
        ctx.cb("attn_norm", xn);
        self.attn.forward(xn, ctx, kv, y);
        ctx.cb("attn_out", y);
        expand(attn_hc, &mixes, y, x);
        ctx.cb("ffn_inp", x);
        let mixes = collapse(ffn_hc, x, &mut u);
        self.ffn_norm.forward(&u, xn);
        ctx.cb("ffn_norm", xn);
        self.ffn.forward(xn, ctx.batch.tokens, y);
        ctx.cb("ffn_out", y);
        expand(ffn_hc, &mixes, y, x);
        ctx.cb("l_out", x);
    }
}

/// The first multi-token-prediction layer (GGUF `blk.{n_layers}.nextn.*` beside the block's own
/// tensors), loaded when [`ModelConfig::load_nextn`] asks for it.
struct NextN<A> {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    /// `[2 hidden, hidden]`: the normed embedding and hidden state, concatenated, to `hidden`.
    eh_proj: Linear,
    block: Block<A>,
    /// `nextn.shared_head_norm`, or the model's final norm.
    head_norm: RmsNorm,
    /// `nextn.shared_head_head` if the checkpoint has its own; else the model's head.
    head: Option<Linear>,
    /// `nextn.embed_tokens` if the checkpoint has its own; else the model's embedding.
    embed: Option<Embedding>,
}

/// A pre-norm decoder with attention `A`, gated (or MoE) feed-forwards, a final RMSNorm and a
/// tied or untied output head.
pub struct PreNormDecoder<A> {
    cfg: ModelConfig,
    /// `[hidden, vocab]`
    embed: Embedding,
    blocks: Vec<Block<A>>,
    /// Final norm, `output.weight` (or the embedding when tied) and the final logit soft-cap
    /// if the config has one.
    output: OutputHead,
    /// The rope of the layers that attend to the whole context.
    rope: Rope,
    /// The rope of the windowed layers, if the config has any.
    rope_local: Option<Rope>,
    nextn: Option<NextN<A>>,
    /// The final collapse of the residual streams, with hyper-connections.
    hc_head: Option<HyperHead>,
}

impl<A: BlockAttention> PreNormDecoder<A> {
    /// Loads the embedding, norms, feed-forwards and head from their GGUF names; `attn(i)`
    /// builds layer `i`'s attention.
    pub fn load(
        cfg: ModelConfig,
        w: &Weights,
        opts: DecoderOptions,
        attn: impl Fn(usize) -> Result<A>,
    ) -> Result<PreNormDecoder<A>> {
        let (h, eps, off) = (cfg.hidden, cfg.rms_eps, cfg.norm_offset);
        let norm = |name: &str| w.rms_norm(name, h, eps, off);
        let embed = w.embedding("token_embd.weight", cfg.vocab_size, h)?;
        let head = match w.opt_linear("output", cfg.vocab_size, h)? {
            Some(head) => head,
            None => w.linear_from(embed.table().clone(), None),
        };
        let sliding = cfg.sliding_window.as_ref();
        let block = |i: usize| -> Result<Block<A>> {
            let p = |n: &str| format!("blk.{i}.{n}");
            let post_norm = |n: &str| opts.post_norms.then(|| norm(&p(n))).transpose();
            Ok(Block {
                attn_norm: norm(&p("attn_norm.weight"))?,
                attn: attn(i)?,
                post_attn_norm: post_norm("post_attention_norm.weight")?,
                ffn_norm: norm(&p(opts.ffn_norm))?,
                ffn: Ffn::load(&cfg, w, i, opts.act)?,
                post_ffn_norm: post_norm("post_ffw_norm.weight")?,
                local: sliding.is_some_and(|s| s.layers.get(i).copied().unwrap_or(false)),
                hc: match &cfg.v4 {
                    Some(v4) => {
                        let hc = |name: &str| {
                            HyperConnection::load(
                                w,
                                &p(name),
                                v4.hc_mult,
                                h,
                                v4.hc_iters,
                                v4.hc_eps,
                                eps,
                            )
                        };
                        Some((hc("hc_attn_")?, hc("hc_ffn_")?))
                    }
                    None => None,
                },
            })
        };
        let blocks = (0..cfg.n_layers).map(block).collect::<Result<Vec<_>>>()?;
        let nextn = match cfg.load_nextn && cfg.nextn_layers > 0 {
            false => None,
            true => {
                let i = cfg.n_layers;
                let p = |n: &str| format!("blk.{i}.nextn.{n}");
                let head_norm = match w.get(&p("shared_head_norm.weight")) {
                    Some(_) => norm(&p("shared_head_norm.weight"))?,
                    None => norm("output_norm.weight")?,
                };
                Some(NextN {
                    enorm: norm(&p("enorm.weight"))?,
                    hnorm: norm(&p("hnorm.weight"))?,
                    eh_proj: w.linear(&p("eh_proj"), h, 2 * h)?,
                    block: block(i)?,
                    head_norm,
                    head: w.opt_linear(&p("shared_head_head"), cfg.vocab_size, h)?,
                    embed: match w.get(&p("embed_tokens.weight")) {
                        Some(_) => {
                            Some(w.embedding(&p("embed_tokens.weight"), cfg.vocab_size, h)?)
                        }
                        None => None,
                    },
                })
            }
        };
        let hc_head = match &cfg.v4 {
            Some(v4) => Some(HyperHead::load(w, v4.hc_mult, h, v4.hc_eps, eps)?),
            None => None,
        };
        Ok(PreNormDecoder {
            nextn,
            hc_head,
            output: OutputHead {
                norm: norm("output_norm.weight")?,
                head,
                softcap: cfg.final_softcap,
            },
            rope: Rope::new(&cfg.rope),
            rope_local: sliding.map(|s| Rope::new(&s.rope)),
            cfg,
            embed,
            blocks,
        })
    }
}

impl<A: BlockAttention> Model for PreNormDecoder<A> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_specs(&self) -> Vec<KvLayerSpec> {
        self.blocks.iter().map(|b| b.attn.kv_spec()).collect()
    }

    fn state_widths(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.attn.state_width()).collect()
    }

    fn has_nextn(&self) -> bool {
        self.nextn.is_some()
    }

    fn nextn_kv_specs(&self) -> Vec<KvLayerSpec> {
        self.nextn.iter().map(|m| m.block.attn.kv_spec()).collect()
    }

    fn forward_nextn(
        &self,
        batch: &Batch,
        hidden: &[f32],
        kv: &mut KvCache,
        hidden_out: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let Some(m) = &self.nextn else {
            return Err(crate::arch::no_nextn());
        };
        kv.check_batch(batch, self.cfg.vocab_size)?;
        let (n, h) = (batch.len(), self.cfg.hidden);
        if kv.layers.len() != 1 || kv.layers[0].spec != m.block.attn.kv_spec() {
            return Err(crate::ModelError::Invalid(
                "the multi-token-prediction layer needs a one-layer cache of its own geometry"
                    .into(),
            ));
        }
        if hidden.len() != n * h {
            return Err(crate::ModelError::Invalid(format!(
                "{} hidden values for {n} rows of {h}",
                hidden.len()
            )));
        }
        let mut e = zeroed(n * h);
        m.embed
            .as_ref()
            .unwrap_or(&self.embed)
            .forward(batch.tokens, self.cfg.embed_scale, &mut e);
        let mut cat = zeroed(2 * n * h);
        for ((row, e), hid) in cat
            .chunks_exact_mut(2 * h)
            .zip(e.chunks_exact(h))
            .zip(hidden.chunks_exact(h))
        {
            let (a, b) = row.split_at_mut(h);
            m.enorm.forward(e, a);
            m.hnorm.forward(hid, b);
        }
        let mut x = zeroed(n * h);
        m.eh_proj.forward(&cat, n, &mut x);
        let rope = self.rope.table(batch.positions);
        let mut trace = Trace::default();
        let mut ctx = LayerCtx {
            batch,
            rope: &rope,
            block_size: kv.block_size,
            layer: self.cfg.n_layers,
            trace: &mut trace,
        };
        let (mut xn, mut y) = (zeroed(n * h), zeroed(n * h));
        m.block
            .forward(&mut x, &mut xn, &mut y, &mut ctx, &mut kv.layers[0]);
        x.chunks_exact_mut(h)
            .for_each(|row| m.head_norm.forward_inplace(row));
        let rows = batch.logits_for;
        let mut picked = zeroed(rows.len() * h);
        for (&r, out) in rows.iter().zip(picked.chunks_exact_mut(h)) {
            out.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        let head = m.head.as_ref().unwrap_or(&self.output.head);
        let mut logits = vec![0.0; rows.len() * self.cfg.vocab_size];
        head.forward(&picked, rows.len(), &mut logits);
        if let Some(cap) = self.output.softcap {
            logits.iter_mut().for_each(|l| *l = softcap(*l, cap));
        }
        *hidden_out = x.to_vec();
        Ok(logits)
    }

    fn rollback_drafts(&self, kv: &mut KvCache, slot: usize, accepted: usize) {
        for (block, layer) in self.blocks.iter().zip(kv.layers.iter_mut()) {
            block.attn.rollback_drafts(layer, slot, accepted);
        }
    }

    fn forward_traced(
        &self,
        batch: &Batch,
        kv: &mut KvCache,
        trace: &mut Trace<'_>,
    ) -> Result<Vec<f32>> {
        kv.check_batch(batch, self.cfg.vocab_size)?;
        for (i, (block, layer)) in self.blocks.iter().zip(&kv.layers).enumerate() {
            let want = block.attn.state_width();
            if want > 0 && (layer.state.width != want || kv.num_state_slots == 0) {
                return Err(crate::ModelError::Invalid(format!(
                    "layer {i} needs recurrent state slots of {want} floats; the cache has {} \
                     slots of {}",
                    kv.num_state_slots, layer.state.width
                )));
            }
        }
        let (n, h) = (batch.len(), self.cfg.hidden);
        let mut x = zeroed(n * h);
        let mut xn = zeroed(n * h);
        let mut y = zeroed(n * h);
        self.embed
            .forward(batch.tokens, self.cfg.embed_scale, &mut x);
        trace.cb("inp_embd", None, n, &x);
        if let Some(v4) = &self.cfg.v4 {
            // Hyper-connections: every stream starts as the embedding.
            let streams = v4.hc_mult;
            let mut wide = zeroed(n * streams * h);
            for (row, e) in wide.chunks_exact_mut(streams * h).zip(x.chunks_exact(h)) {
                row.chunks_exact_mut(h).for_each(|s| s.copy_from_slice(e));
            }
            x = wide;
        }
        let rope = self.rope.table(batch.positions);
        let rope_local = self.rope_local.as_ref().map(|r| r.table(batch.positions));
        let block_size = kv.block_size;
        for (layer, (block, layer_kv)) in self.blocks.iter().zip(kv.layers.iter_mut()).enumerate() {
            let mut ctx = LayerCtx {
                batch,
                rope: match (&rope_local, block.local) {
                    (Some(local), true) => local,
                    _ => &rope,
                },
                block_size,
                layer,
                trace,
            };
            block.forward(&mut x, &mut xn, &mut y, &mut ctx, layer_kv);
        }
        if let Some(head) = &self.hc_head {
            let mut collapsed = zeroed(n * h);
            head.forward(&x, &mut collapsed);
            x = collapsed;
        }
        if trace.is_on() {
            let mut normed = x.to_vec();
            normed
                .chunks_exact_mut(h)
                .for_each(|row| self.output.norm.forward_inplace(row));
            trace.cb("result_norm", None, n, &normed);
        }
        Ok(self.output.forward(&x, batch.logits_for))
    }

    fn weight_bytes_per_token(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.attn.weight_bytes() + b.ffn.weight_bytes())
            .sum();
        blocks + self.output.head.weight_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use supernode_kernels::Precision;

    use super::*;
    use crate::arch::{deepseek_v3, gemma3, llama};
    use crate::numerics::Numerics;
    use crate::safetensors::read_safetensors_dir;
    use crate::trace::Named;

    /// The config and weights of the HF fixture `arch`.
    fn fixture(arch: &str, precision: Precision) -> (ModelConfig, Weights) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf")
            .join(arch);
        let st = read_safetensors_dir(&dir).unwrap();
        let cfg = ModelConfig::from_hf(&st.config).unwrap();
        (cfg, Weights::new(st.tensors, Numerics::new(precision)))
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The hook sees layer 0's activations under `names`, in that order, and every block's
    /// `l_out` (one row of `hidden` per token, blocks in order); the last `l_out` through the
    /// final norm and head gives the logits the forward pass returns, and a traced pass returns
    /// the same bits as an untraced one.
    fn check_trace<A: BlockAttention>(m: &PreNormDecoder<A>, names: &[&str]) {
        let tokens: Vec<u32> = (1..=7).collect();
        let n = tokens.len();
        let positions: Vec<usize> = (0..n).collect();
        let rows: Vec<usize> = (0..n).collect();
        let table = [0u32, 1];
        let tables = [table.as_slice()];
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            seq_of: &vec![0; n],
            block_tables: &tables,
            logits_for: &rows,
            state_slots: &[],
            chunked_until: &[],
            drafts: &[],
        };
        let specs = m.kv_specs();
        let plain = m
            .forward(&batch, &mut KvCache::new(&specs, 4, 2).unwrap())
            .unwrap();
        let mut seen = Vec::new();
        let mut l_out = Vec::new();
        let mut result_norm = Vec::new();
        let traced = {
            let mut hook = |a: &Named| {
                assert_eq!(a.rows, n, "{}", a.name);
                if a.layer == Some(0) {
                    seen.push(a.name);
                }
                if a.name == "l_out" {
                    l_out.push((a.layer, a.values.to_vec()));
                }
                if a.name == "result_norm" {
                    assert_eq!(a.layer, None);
                    result_norm.push(a.values.to_vec());
                }
            };
            let mut kv = KvCache::new(&specs, 4, 2).unwrap();
            m.forward_traced(&batch, &mut kv, &mut Trace::new(&mut hook))
                .unwrap()
        };
        assert_eq!(bits(&plain), bits(&traced));
        assert_eq!(seen, names);
        let layers: Vec<Option<usize>> = l_out.iter().map(|(l, _)| *l).collect();
        assert_eq!(layers, (0..m.cfg.n_layers).map(Some).collect::<Vec<_>>());
        assert!(l_out.iter().all(|(_, v)| v.len() == n * m.cfg.hidden));
        let last = &l_out[l_out.len() - 1].1;
        assert_eq!(bits(&m.output.forward(last, &rows)), bits(&traced));
        // `result_norm`: the last `l_out`, each row through the final norm, shown once.
        let mut normed = last.clone();
        normed
            .chunks_exact_mut(m.cfg.hidden)
            .for_each(|r| m.output.norm.forward_inplace(r));
        assert_eq!(result_norm.len(), 1);
        assert_eq!(bits(&result_norm[0]), bits(&normed));
    }

    #[test]
    fn the_hook_sees_every_layer_and_the_logits_follow_from_the_last() {
        let gqa = [
            "attn_norm",
            "q",
            "k",
            "v",
            "attn_out",
            "ffn_inp",
            "ffn_norm",
            "ffn_out",
            "l_out",
        ];
        let sandwich = [
            "attn_norm",
            "q",
            "k",
            "v",
            "attn_out",
            "attn_post_norm",
            "ffn_inp",
            "ffn_norm",
            "ffn_out",
            "ffn_post_norm",
            "l_out",
        ];
        let mla = [
            "attn_norm",
            "q",
            "kv",
            "attn_out",
            "ffn_inp",
            "ffn_norm",
            "ffn_out",
            "l_out",
        ];
        let mut mla_indexed = mla.to_vec();
        mla_indexed.insert(3, "indexer_k");
        for precision in [Precision::Exact, Precision::Quantized] {
            for arch in ["llama", "qwen3_moe"] {
                let (cfg, w) = fixture(arch, precision);
                check_trace(&llama::load(cfg, &w).unwrap(), &gqa);
            }
            let (cfg, w) = fixture("gemma3_text", precision);
            check_trace(&gemma3::load(cfg, &w).unwrap(), &sandwich);
            let (cfg, w) = fixture("deepseek_v3", precision);
            check_trace(&deepseek_v3::load(cfg, &w).unwrap(), &mla);
            let (cfg, w) = fixture("deepseek_v32", precision);
            check_trace(&deepseek_v3::load(cfg, &w).unwrap(), &mla_indexed);
        }
    }
}

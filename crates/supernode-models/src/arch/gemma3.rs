//! Gemma 3 (text): "sandwich" blocks with a norm before and after both the attention and the
//! GeGLU feed-forward, per-head Q/K RMSNorms, sliding-window attention on five layers of six
//! (each kind with its own rope), embeddings scaled by `sqrt(hidden)`, a tied output head.
//!
//! ```text
//! x = embed(tokens) * sqrt(hidden)
//! for each block:  x += post_attn_norm(attn(attn_norm(x)))     (local or global attention)
//!                  x += post_ffw_norm(mlp(ffn_norm(x)))         (GELU-tanh gate)
//! logits = softcap?(head(output_norm(x)))          (rows in batch.logits_for only)
//! ```
//!
//! Follows llama.cpp's `llm_build_gemma3` and transformers' `Gemma3ForCausalLM`; every
//! difference between the two (norm offsets, rope of the local layers, query scale) is
//! resolved in [`ModelConfig`].

use supernode_kernels::ops::{Activation, AttnShape};
use supernode_kernels::Precision;

use crate::arch::Model;
use crate::kv_cache::{KvCache, KvLayerSpec};
use crate::layers::{Attention, BlockAttention, Embedding, Mlp, OutputHead, RmsNorm, Rope};
use crate::weights::Weights;
use crate::{Batch, ModelConfig, Result};

/// One decoder block; all norms are `[hidden]` except the per-head Q/K norms (`[head_dim]`,
/// inside `attn`).
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    post_ffn_norm: RmsNorm,
    /// Windowed (local) layer: uses the local rope; its `attn.window` is set.
    local: bool,
}

pub struct Gemma3 {
    cfg: ModelConfig,
    /// `[hidden, vocab]`
    embed: Embedding,
    blocks: Vec<Block>,
    /// Final norm, `output.weight` or the embedding when tied (always, in Gemma 3), and the
    /// final logit soft-cap if the config has one.
    output: OutputHead,
    /// The rope of the global layers.
    rope_global: Rope,
    /// The rope of the local (windowed) layers.
    rope_local: Rope,
}

impl Gemma3 {
    pub fn new(cfg: ModelConfig, w: &Weights) -> Result<Gemma3> {
        let (h, eps, off, hd) = (cfg.hidden, cfg.rms_eps, cfg.norm_offset, cfg.head_dim);
        let embed = w.embedding("token_embd.weight", cfg.vocab_size, h)?;
        let head = match w.opt_linear("output", cfg.vocab_size, h)? {
            Some(head) => head,
            None => w.linear_from(embed.table().clone(), None),
        };
        let shape = AttnShape {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            k_dim: hd,
            v_dim: cfg.v_head_dim,
            scale: cfg.attn_scale,
            softcap: None,
            f16_rounding: w.precision() == Precision::Quantized,
        };
        // llama.cpp's table GELU in its numerics; the formula itself otherwise.
        let gelu = match w.precision() {
            Precision::Quantized => Activation::GeluF16Table,
            Precision::Exact => Activation::GeluTanh,
        };
        let sliding = cfg.sliding_window.as_ref();
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let p = |n: &str| format!("blk.{i}.{n}");
                let local = sliding.is_some_and(|s| s.layers[i]);
                Ok(Block {
                    attn_norm: w.rms_norm(&p("attn_norm.weight"), h, eps, off)?,
                    attn: Attention {
                        wq: w.linear(&p("attn_q"), cfg.n_heads * hd, h)?,
                        wk: w.linear(&p("attn_k"), cfg.n_kv_heads * hd, h)?,
                        wv: w.linear(&p("attn_v"), cfg.n_kv_heads * cfg.v_head_dim, h)?,
                        wo: w.linear(&p("attn_output"), h, cfg.n_heads * cfg.v_head_dim)?,
                        q_norm: Some(w.rms_norm(&p("attn_q_norm.weight"), hd, eps, off)?),
                        k_norm: Some(w.rms_norm(&p("attn_k_norm.weight"), hd, eps, off)?),
                        shape,
                        window: sliding.filter(|_| local).map(|s| s.size),
                    },
                    post_attn_norm: w.rms_norm(&p("post_attention_norm.weight"), h, eps, off)?,
                    ffn_norm: w.rms_norm(&p("ffn_norm.weight"), h, eps, off)?,
                    mlp: Mlp::load(w, i, "", cfg.ffn_dim, h, gelu)?,
                    post_ffn_norm: w.rms_norm(&p("post_ffw_norm.weight"), h, eps, off)?,
                    local,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gemma3 {
            output: OutputHead {
                norm: w.rms_norm("output_norm.weight", h, eps, off)?,
                head,
                softcap: cfg.final_softcap,
            },
            rope_global: Rope::new(&cfg.rope),
            rope_local: Rope::new(sliding.map_or(&cfg.rope, |s| &s.rope)),
            cfg,
            embed,
            blocks,
        })
    }
}

impl Model for Gemma3 {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_specs(&self) -> Vec<KvLayerSpec> {
        self.blocks.iter().map(|b| b.attn.kv_spec()).collect()
    }

    fn forward(&self, batch: &Batch, kv: &mut KvCache) -> Result<Vec<f32>> {
        kv.check_batch(batch, self.cfg.vocab_size)?;
        let (n, h) = (batch.len(), self.cfg.hidden);
        let mut x = vec![0.0; n * h];
        let mut xn = vec![0.0; n * h];
        let mut y = vec![0.0; n * h];
        self.embed
            .forward(batch.tokens, self.cfg.embed_scale, &mut x);
        let rope_global = self.rope_global.table(batch.positions);
        let rope_local = self.rope_local.table(batch.positions);
        let block_size = kv.block_size;
        for (block, layer_kv) in self.blocks.iter().zip(kv.layers.iter_mut()) {
            let rope = if block.local {
                &rope_local
            } else {
                &rope_global
            };
            block.attn_norm.forward(&x, &mut xn);
            block
                .attn
                .forward(&xn, batch, rope, layer_kv, block_size, &mut y);
            block.post_attn_norm.forward_inplace(&mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            block.ffn_norm.forward(&x, &mut xn);
            block.mlp.forward(&xn, n, &mut y);
            block.post_ffn_norm.forward_inplace(&mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        Ok(self.output.forward(&x, batch.logits_for))
    }

    fn weight_bytes_per_token(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.attn.weight_bytes() + b.mlp.weight_bytes())
            .sum();
        blocks + self.output.head.weight_bytes()
    }
}

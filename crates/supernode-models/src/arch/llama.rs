//! The Llama family: llama (Llama 2/3, SmolLM2, ...), qwen2, qwen3 and qwen3_moe — one
//! pre-norm decoder of GQA attention with rope and a SwiGLU feed-forward (dense, or a mixture
//! of SwiGLU experts), a final RMSNorm and a tied or untied output head.
//!
//! ```text
//! x = embed(tokens)
//! for each block:  x += attn(rms_norm(x)) ;  x += ffn(rms_norm(x))     (ffn: dense or MoE)
//! logits = head(rms_norm(x))            (rows in batch.logits_for only)
//! ```
//!
//! What tells the members apart lives outside the forward pass: Qwen2's Q/K/V biases are
//! picked up by [`Weights::linear`] wherever the file has them, Qwen3's per-head Q/K RMSNorms
//! (applied before rope) are required for [`Arch::Qwen3`] and [`Arch::Qwen3Moe`] and absent
//! otherwise, Qwen3-MoE's sparse layers and routing are [`ModelConfig::moe`], and the rope
//! style (permuted llama GGUF rows or not) is settled in [`ModelConfig`].

use supernode_kernels::ops::{silu, AttnShape};
use supernode_kernels::Precision;

use crate::arch::Model;
use crate::config::Arch;
use crate::kv_cache::{KvCache, KvLayerSpec};
use crate::layers::{Attention, Embedding, Ffn, OutputHead, RmsNorm, Rope};
use crate::weights::Weights;
use crate::{Batch, ModelConfig, Result};

/// One decoder block; the norms are `[hidden]` except Qwen3's per-head Q/K norms
/// (`[head_dim]`, inside `attn`).
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    ffn: Ffn,
}

pub struct Llama {
    cfg: ModelConfig,
    /// `[hidden, vocab]`
    embed: Embedding,
    blocks: Vec<Block>,
    /// Final norm and `output.weight` (or the embedding when tied).
    output: OutputHead,
    rope: Rope,
}

impl Llama {
    pub fn new(cfg: ModelConfig, w: &Weights) -> Result<Llama> {
        let (h, eps, hd) = (cfg.hidden, cfg.rms_eps, cfg.head_dim);
        let qk_norm = matches!(cfg.arch, Arch::Qwen3 | Arch::Qwen3Moe);
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
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let p = |n: &str| format!("blk.{i}.{n}");
                let head_norm =
                    |n: &str| qk_norm.then(|| w.rms_norm(&p(n), hd, eps, 0.0)).transpose();
                Ok(Block {
                    attn_norm: w.rms_norm(&p("attn_norm.weight"), h, eps, 0.0)?,
                    attn: Attention {
                        wq: w.linear(&p("attn_q"), cfg.n_heads * hd, h)?,
                        wk: w.linear(&p("attn_k"), cfg.n_kv_heads * hd, h)?,
                        wv: w.linear(&p("attn_v"), cfg.n_kv_heads * cfg.v_head_dim, h)?,
                        wo: w.linear(&p("attn_output"), h, cfg.n_heads * cfg.v_head_dim)?,
                        q_norm: head_norm("attn_q_norm.weight")?,
                        k_norm: head_norm("attn_k_norm.weight")?,
                        shape,
                        window: None,
                    },
                    ffn_norm: w.rms_norm(&p("ffn_norm.weight"), h, eps, 0.0)?,
                    ffn: Ffn::load(&cfg, w, i, silu)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Llama {
            output: OutputHead {
                norm: w.rms_norm("output_norm.weight", h, eps, 0.0)?,
                head,
                softcap: None,
            },
            rope: Rope::new(&cfg.rope),
            cfg,
            embed,
            blocks,
        })
    }
}

impl Model for Llama {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_specs(&self) -> Vec<KvLayerSpec> {
        KvLayerSpec::uniform(&self.cfg)
    }

    fn forward(&self, batch: &Batch, kv: &mut KvCache) -> Result<Vec<f32>> {
        kv.check_batch(batch, self.cfg.vocab_size)?;
        let (n, h) = (batch.len(), self.cfg.hidden);
        let mut x = vec![0.0; n * h];
        let mut xn = vec![0.0; n * h];
        let mut y = vec![0.0; n * h];
        self.embed.forward(batch.tokens, 1.0, &mut x);
        let rope = self.rope.table(batch.positions);
        let block_size = kv.block_size;
        for (block, layer_kv) in self.blocks.iter().zip(kv.layers.iter_mut()) {
            block.attn_norm.forward(&x, &mut xn);
            block
                .attn
                .forward(&xn, batch, &rope, layer_kv, block_size, &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            block.ffn_norm.forward(&x, &mut xn);
            block.ffn.forward(&xn, n, &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
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

//! DeepSeek-V3 / R1 (and V2, as llama.cpp's `deepseek2`): multi-head latent attention whose
//! cache holds one compressed latent and one roped key per token, and a mixture of experts with
//! a sigmoid router, a selection-only bias, group-limited choice and a shared expert; the first
//! layers keep a dense SwiGLU.
//!
//! ```text
//! x = embed(tokens)
//! for each block:  x += mla(rms_norm(x)) ;  x += ffn(rms_norm(x))      (ffn: MoE or dense)
//! logits = head(rms_norm(x))            (rows in batch.logits_for only)
//! ```
//!
//! Follows transformers' `DeepseekV3ForCausalLM` and llama.cpp's `llm_build_deepseek2` (MLA
//! branch). YaRN's frequencies, cos/sin factor and softmax correction are settled in
//! [`ModelConfig`]; the MLA sizes in [`ModelConfig::mla`], the routing in [`ModelConfig::moe`].

use supernode_kernels::ops::silu;

use crate::arch::Model;
use crate::kv_cache::{KvCache, KvLayerSpec};
use crate::layers::{Embedding, Ffn, Mla, OutputHead, RmsNorm, Rope};
use crate::weights::Weights;
use crate::{Batch, ModelConfig, ModelError, Result};

/// One decoder block; both norms are `[hidden]` (MLA's own norms are inside `attn`).
struct Block {
    attn_norm: RmsNorm,
    attn: Mla,
    ffn_norm: RmsNorm,
    ffn: Ffn,
}

pub struct DeepseekV3 {
    cfg: ModelConfig,
    /// `[hidden, vocab]`
    embed: Embedding,
    blocks: Vec<Block>,
    /// Final norm and `output.weight` (or the embedding when tied).
    output: OutputHead,
    /// The rope of the `qk_rope_dim` dims (YaRN-scaled in V3).
    rope: Rope,
}

impl DeepseekV3 {
    pub fn new(cfg: ModelConfig, w: &Weights) -> Result<DeepseekV3> {
        let mla = cfg.mla.clone().ok_or_else(|| {
            ModelError::Invalid("a DeepSeek model needs an MLA configuration".into())
        })?;
        let (h, eps) = (cfg.hidden, cfg.rms_eps);
        let embed = w.embedding("token_embd.weight", cfg.vocab_size, h)?;
        let head = match w.opt_linear("output", cfg.vocab_size, h)? {
            Some(head) => head,
            None => w.linear_from(embed.table().clone(), None),
        };
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let p = |n: &str| format!("blk.{i}.{n}");
                Ok(Block {
                    attn_norm: w.rms_norm(&p("attn_norm.weight"), h, eps, 0.0)?,
                    attn: Mla::load(&cfg, &mla, w, i)?,
                    ffn_norm: w.rms_norm(&p("ffn_norm.weight"), h, eps, 0.0)?,
                    ffn: Ffn::load(&cfg, w, i, silu)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeepseekV3 {
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

impl Model for DeepseekV3 {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_specs(&self) -> Vec<KvLayerSpec> {
        let b = &self.blocks[0].attn;
        vec![KvLayerSpec::mla(b.rank, b.rope); self.cfg.n_layers]
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

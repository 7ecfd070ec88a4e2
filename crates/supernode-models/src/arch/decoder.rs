//! The pre-norm decoder that the Llama family and DeepSeek share; they differ only in the
//! attention layer (GQA or MLA) each block holds.
//!
//! ```text
//! x = embed(tokens)
//! for each block:  x += attn(rms_norm(x)) ;  x += ffn(rms_norm(x))     (ffn: dense or MoE)
//! logits = head(rms_norm(x))            (rows in batch.logits_for only)
//! ```

use supernode_kernels::ops::Activation;

use crate::arch::Model;
use crate::kv_cache::{KvCache, KvLayerSpec};
use crate::layers::{BlockAttention, Embedding, Ffn, OutputHead, RmsNorm, Rope};
use crate::weights::Weights;
use crate::{Batch, ModelConfig, Result};

/// One block; both norms are `[hidden]` (per-head norms live inside the attention).
struct Block<A> {
    attn_norm: RmsNorm,
    attn: A,
    ffn_norm: RmsNorm,
    ffn: Ffn,
}

/// A pre-norm decoder with attention `A`, SwiGLU (or MoE) feed-forwards, a final RMSNorm and a
/// tied or untied output head.
pub struct PreNormDecoder<A> {
    cfg: ModelConfig,
    /// `[hidden, vocab]`
    embed: Embedding,
    blocks: Vec<Block<A>>,
    /// Final norm and `output.weight` (or the embedding when tied).
    output: OutputHead,
    rope: Rope,
}

impl<A: BlockAttention> PreNormDecoder<A> {
    /// Loads the embedding, norms, feed-forwards and head from their GGUF names; `attn(i)`
    /// builds layer `i`'s attention.
    pub fn load(
        cfg: ModelConfig,
        w: &Weights,
        attn: impl Fn(usize) -> Result<A>,
    ) -> Result<PreNormDecoder<A>> {
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
                    attn: attn(i)?,
                    ffn_norm: w.rms_norm(&p("ffn_norm.weight"), h, eps, 0.0)?,
                    ffn: Ffn::load(&cfg, w, i, Activation::Silu)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PreNormDecoder {
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

impl<A: BlockAttention> Model for PreNormDecoder<A> {
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

//! The Llama family: llama (Llama 2/3, SmolLM2, ...), qwen2, qwen3 and qwen3_moe — one
//! pre-norm decoder of GQA attention with rope and a SwiGLU feed-forward (dense, or a mixture
//! of SwiGLU experts), a final RMSNorm and a tied or untied output head.
//!
//! The forward pass is the shared [`PreNormDecoder`] with GQA [`Attention`].
//!
//! What tells the members apart lives outside the forward pass: Qwen2's Q/K/V biases are
//! picked up by [`Weights::linear`] wherever the file has them, Qwen3's per-head Q/K RMSNorms
//! (applied before rope) are required for [`Arch::Qwen3`] and [`Arch::Qwen3Moe`] and absent
//! otherwise, Qwen3-MoE's sparse layers and routing are [`ModelConfig::moe`], and the rope
//! style (permuted llama GGUF rows or not) is settled in [`ModelConfig`].

use supernode_kernels::ops::AttnShape;
use supernode_kernels::Precision;

use crate::arch::decoder::PreNormDecoder;
use crate::config::Arch;
use crate::layers::Attention;
use crate::weights::Weights;
use crate::{ModelConfig, Result};

/// A Llama-family model.
pub type Llama = PreNormDecoder<Attention>;

impl PreNormDecoder<Attention> {
    pub fn new(cfg: ModelConfig, w: &Weights) -> Result<Llama> {
        let (h, eps, hd) = (cfg.hidden, cfg.rms_eps, cfg.head_dim);
        let qk_norm = matches!(cfg.arch, Arch::Qwen3 | Arch::Qwen3Moe);
        let shape = AttnShape {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            k_dim: hd,
            v_dim: cfg.v_head_dim,
            scale: cfg.attn_scale,
            softcap: None,
            f16_rounding: w.precision() == Precision::Quantized,
        };
        let c = cfg.clone();
        PreNormDecoder::load(cfg, w, |i| {
            let p = |n: &str| format!("blk.{i}.{n}");
            let head_norm = |n: &str| qk_norm.then(|| w.rms_norm(&p(n), hd, eps, 0.0)).transpose();
            Ok(Attention {
                wq: w.linear(&p("attn_q"), c.n_heads * hd, h)?,
                wk: w.linear(&p("attn_k"), c.n_kv_heads * hd, h)?,
                wv: w.linear(&p("attn_v"), c.n_kv_heads * c.v_head_dim, h)?,
                wo: w.linear(&p("attn_output"), h, c.n_heads * c.v_head_dim)?,
                q_norm: head_norm("attn_q_norm.weight")?,
                k_norm: head_norm("attn_k_norm.weight")?,
                shape,
                window: None,
            })
        })
    }
}

//! DeepSeek-V3 / R1 (and V2, as llama.cpp's `deepseek2`): multi-head latent attention whose
//! cache holds one compressed latent and one roped key per token, and a mixture of experts with
//! a sigmoid router, a selection-only bias, group-limited choice and a shared expert; the first
//! layers keep a dense SwiGLU.
//!
//! The forward pass is the shared [`PreNormDecoder`] with [`Mla`] attention.
//!
//! Follows transformers' `DeepseekV3ForCausalLM` and llama.cpp's `llm_build_deepseek2` (MLA
//! branch). YaRN's frequencies, cos/sin factor and softmax correction are settled in
//! [`ModelConfig`]; the MLA sizes in [`ModelConfig::mla`], the routing in [`ModelConfig::moe`].

use crate::arch::decoder::PreNormDecoder;
use crate::layers::Mla;
use crate::weights::Weights;
use crate::{ModelConfig, ModelError, Result};

/// A DeepSeek-V3 / R1 model.
pub type DeepseekV3 = PreNormDecoder<Mla>;

impl PreNormDecoder<Mla> {
    pub fn new(cfg: ModelConfig, w: &Weights) -> Result<DeepseekV3> {
        let mla = cfg.mla.clone().ok_or_else(|| {
            ModelError::Invalid("a DeepSeek model needs an MLA configuration".into())
        })?;
        let c = cfg.clone();
        PreNormDecoder::load(cfg, w, |i| Mla::load(&c, &mla, w, i))
    }
}

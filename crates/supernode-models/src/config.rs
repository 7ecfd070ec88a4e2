//! One checked model configuration, resolved from GGUF metadata or from an HF `config.json`.
//!
//! Model code reads only [`ModelConfig`]; every field is range-checked here (sizes within
//! `1..=2^24`, heads divisible into KV groups, rope dims even and within the head, finite
//! positive epsilons, bases, factors and caps, experts and groups that can be routed, MLA ranks),
//! so the forward pass can index freely. A bad value is a load error naming the GGUF or
//! config.json key it came from; a mistyped config.json value is one too, never a default.

use serde_json::Value;
use supernode_kernels::ops::RopeStyle;

use crate::{MetaValue, Metadata, ModelError, Result};

/// The architectures supernode runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma3,
    /// Llama with Q/K/V biases (built by the Llama family's builder).
    Qwen2,
    /// Llama with per-head Q/K RMSNorms (built by the Llama family's builder).
    Qwen3,
    /// Qwen3 with a sparse mixture-of-experts feed-forward on some layers (built by the Llama
    /// family's builder).
    Qwen3Moe,
    /// DeepSeek-V3 / R1: multi-head latent attention and a grouped sigmoid-routed MoE with a
    /// shared expert (llama.cpp's `deepseek2`, which covers V2 and V3).
    DeepseekV3,
}

impl Arch {
    /// GGUF `general.architecture` names, HF `model_type` names.
    const TABLE: [(Arch, &'static str, &'static str); 6] = [
        (Arch::Llama, "llama", "llama"),
        (Arch::Gemma3, "gemma3", "gemma3_text"),
        (Arch::Qwen2, "qwen2", "qwen2"),
        (Arch::Qwen3, "qwen3", "qwen3"),
        (Arch::Qwen3Moe, "qwen3moe", "qwen3_moe"),
        (Arch::DeepseekV3, "deepseek2", "deepseek_v3"),
    ];

    pub fn from_gguf_name(name: &str) -> Result<Arch> {
        Self::TABLE
            .iter()
            .find(|(_, g, _)| *g == name)
            .map(|(a, _, _)| *a)
            .ok_or_else(|| unsupported(name, false))
    }

    pub fn from_hf_model_type(name: &str) -> Result<Arch> {
        Self::TABLE
            .iter()
            .find(|(_, _, h)| *h == name)
            .map(|(a, _, _)| *a)
            .ok_or_else(|| unsupported(name, true))
    }

    /// The GGUF name, which prefixes the architecture's metadata keys.
    pub fn gguf_name(self) -> &'static str {
        Self::TABLE
            .iter()
            .find(|(a, _, _)| *a == self)
            .map_or("?", |(_, g, _)| g)
    }
}

/// The error for an architecture name we lack, listing the names of the same kind (GGUF
/// `general.architecture` or HF `model_type`) that we support.
fn unsupported(name: &str, hf: bool) -> ModelError {
    ModelError::UnsupportedArch {
        arch: name.to_string(),
        supported: Arch::TABLE
            .iter()
            .map(|&(_, g, h)| if hf { h } else { g })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// How rope frequencies are stretched for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: wavelengths longer than `original_max_pos / low_freq_factor` are stretched
    /// by `factor`, those shorter than `original_max_pos / high_freq_factor` are kept, and
    /// those between are interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_pos: f64,
    },
    /// Each pair's frequency divided by its own factor: GGUF's `rope_freqs.weight`, which is
    /// how llama.cpp's converter stores Llama 3 scaling.
    Factors(Vec<f64>),
    /// YaRN (transformers' `_compute_yarn_parameters`, ggml's `rope_yarn`): pairs below the
    /// correction dim of `beta_fast` rotations over `original_max_pos` keep their frequency,
    /// those above that of `beta_slow` are divided by `factor`, a linear ramp in between; the
    /// cosines and sines are multiplied by `attn_factor`.
    Yarn {
        factor: f64,
        original_max_pos: f64,
        beta_fast: f64,
        beta_slow: f64,
        /// Multiplies cos and sin (transformers' `attention_factor`).
        attn_factor: f64,
        /// Round the correction range outwards to whole pairs (transformers' `truncate`,
        /// default true; ggml always does).
        truncate: bool,
    },
}

/// YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 for `factor <= 1`).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// Rotary position embedding settings of an attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotated dimensions per head (even; ≤ head_dim).
    pub dim: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The factor on every cosine and sine (YaRN's attention factor; 1 otherwise).
    pub fn attn_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn { attn_factor, .. } => attn_factor,
            _ => 1.0,
        }
    }

    /// Angular frequency of each of the `dim / 2` dimension pairs.
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.dim as f64;
        (0..self.dim / 2)
            .map(|i| {
                let f = self.theta.powf(-(2.0 * i as f64) / dim);
                match &self.scaling {
                    &RopeScaling::Yarn {
                        factor,
                        original_max_pos: orig,
                        beta_fast,
                        beta_slow,
                        truncate,
                        ..
                    } => {
                        // The pair index at which a wavelength fits `rot` times in `orig`.
                        let corr = |rot: f64| {
                            dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()
                                / (2.0 * self.theta.ln())
                        };
                        let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
                        if truncate {
                            (low, high) = (low.floor(), high.ceil());
                        }
                        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                        if low == high {
                            high += 0.001;
                        }
                        // 0: keep the frequency (extrapolate), 1: divide it (interpolate).
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * ramp + f * (1.0 - ramp)
                    }
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Factors(factors) => f / factors[i],
                    &RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_pos: orig,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < orig / high {
                            f
                        } else if wavelen > orig / low {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

/// Sliding-window attention on some of the layers (Gemma 3's local layers).
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Positions a query attends to, its own included.
    pub size: usize,
    /// `layers[i]`: whether layer `i` is windowed; the others attend to the whole context.
    pub layers: Vec<bool>,
    /// The rope of the windowed layers (Gemma 3: base 10 000, never scaled); the other layers
    /// use [`ModelConfig::rope`].
    pub rope: RopeConfig,
}

/// How a mixture-of-experts router turns its logits into expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over all experts (Qwen MoE, DeepSeek-V2).
    Softmax,
    /// Independent sigmoids (DeepSeek-V3).
    Sigmoid,
}

/// A sparse mixture-of-experts feed-forward: routing and expert sizes.
///
/// Per token: `scores = gating(router · x)`; experts are chosen by `scores + bias` (DeepSeek-V3's
/// `e_score_correction_bias`, when the file has one) among the `groups_used` best of `n_groups`
/// groups of consecutive experts (a group scores the sum of its two best), `n_used` of them;
/// their weights are the unbiased scores, divided by their sum if `norm_weights`, times `scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_experts: usize,
    /// Experts used per token (top-k).
    pub n_used: usize,
    /// Intermediate size of each routed expert (a SwiGLU).
    pub expert_ffn_dim: usize,
    /// Shared experts, fused into one SwiGLU of `n_shared * expert_ffn_dim`; 0 for none.
    pub n_shared: usize,
    pub gating: Gating,
    pub norm_weights: bool,
    pub scale: f32,
    /// Expert groups (1: no group limit) and how many of them a token may use.
    pub n_groups: usize,
    pub groups_used: usize,
    /// `layers[i]`: whether layer `i` is sparse; the others have the dense `ffn_dim` MLP.
    pub layers: Vec<bool>,
}

/// DeepSeek's multi-head latent attention (MLA).
///
/// Queries: `q_b(norm(q_a(x)))` (or `q(x)` without a query LoRA), per head `qk_nope_dim`
/// position-free dims then `rope.dim` roped ones. Keys and values come from one latent
/// `c = norm(kv_a(x)[..kv_lora_rank])` shared by all heads, plus a roped key
/// `kv_a(x)[kv_lora_rank..]` also shared; `kv_b` expands `c` into each head's key (no rope) and
/// value. The cache keeps only `c` and the roped key.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaConfig {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_dim: usize,
    /// = the rope dim; `head_dim == qk_nope_dim + qk_rope_dim`.
    pub qk_rope_dim: usize,
}

/// The checked configuration of a decoder-only transformer.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Dimension of each query/key head.
    pub head_dim: usize,
    /// Dimension of each value head.
    pub v_head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    /// The context length the model was trained for.
    pub context_len: usize,
    pub rms_eps: f32,
    /// Added to every RMSNorm weight: 1 for Gemma's `(1 + w)` norms in HF checkpoints (whose
    /// GGUF conversion already added it), 0 otherwise.
    pub norm_offset: f32,
    /// The rope of every layer (of the full-attention layers where `sliding_window` is set).
    pub rope: RopeConfig,
    /// Multiplies the token embeddings (Gemma: `sqrt(hidden)`; 1 otherwise).
    pub embed_scale: f32,
    /// Multiplies `q·k` before the softmax (usually `1/sqrt(head_dim)`).
    pub attn_scale: f32,
    pub sliding_window: Option<SlidingWindow>,
    /// Soft-capping of the output logits, `cap * tanh(logit / cap)`.
    pub final_softcap: Option<f32>,
    /// The sparse feed-forward of MoE models.
    pub moe: Option<MoeConfig>,
    /// Multi-head latent attention instead of MHA/GQA (DeepSeek); `head_dim` and `v_head_dim`
    /// are then the per-head sizes after expansion (`qk_nope + qk_rope`, `v_head_dim`).
    pub mla: Option<MlaConfig>,
}

impl ModelConfig {
    /// From GGUF metadata (`{arch}.block_count`, ...). The vocabulary size is llama.cpp's: the
    /// length of `tokenizer.ggml.tokens` (which `{arch}.vocab_size` must equal when a file has
    /// both); `vocab_from_tensors`, the row count of the embedding, when a file has neither.
    pub fn from_gguf(meta: &Metadata, vocab_from_tensors: usize) -> Result<ModelConfig> {
        let arch_name = meta
            .get_str("general.architecture")?
            .ok_or_else(|| ModelError::Metadata("missing `general.architecture`".into()))?;
        let arch = Arch::from_gguf_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            meta.get_usize(&key(k))?
                .ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
        };
        let hidden = req("embedding_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = meta
            .get_usize(&key("attention.head_count_kv"))?
            .unwrap_or(n_heads);
        let head_dim = match meta.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let v_head_dim = meta
            .get_usize(&key("attention.value_length"))?
            .unwrap_or(head_dim);
        let scaling = match meta.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: meta.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some("yarn") => {
                let factor = meta.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                // DeepSeek's converter writes `0.1 * mscale_all_dim` here and means YaRN's
                // magnitude correction to go wholly into the softmax scale (llama.cpp's
                // TAG_DEEPSEEK2_YARN_LOG_MUL_FIX): cos and sin are then left unscaled, as
                // transformers leaves them when `mscale == mscale_all_dim`.
                let in_softmax = arch == Arch::DeepseekV3
                    && meta
                        .get_f64(&key("rope.scaling.yarn_log_multiplier"))?
                        .is_some();
                let attn_factor = meta
                    .get_f64(&key("rope.scaling.attn_factor"))?
                    .unwrap_or(1.0);
                RopeScaling::Yarn {
                    factor,
                    original_max_pos: match meta
                        .get_usize(&key("rope.scaling.original_context_length"))?
                    {
                        Some(n) => n as f64,
                        None => req("context_length")? as f64,
                    },
                    beta_fast: meta
                        .get_f64(&key("rope.scaling.yarn_beta_fast"))?
                        .unwrap_or(32.0),
                    beta_slow: meta
                        .get_f64(&key("rope.scaling.yarn_beta_slow"))?
                        .unwrap_or(1.0),
                    attn_factor: if in_softmax {
                        1.0
                    } else {
                        attn_factor * yarn_mscale(factor, 1.0)
                    },
                    truncate: true,
                }
            }
            Some(other) => {
                return Err(ModelError::Metadata(format!(
                    "rope scaling type `{other}` is not supported (supported: none, linear, yarn)"
                )))
            }
        };
        let mut cfg = ModelConfig {
            arch,
            n_layers: req("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            v_head_dim,
            ffn_dim: req("feed_forward_length")?,
            vocab_size: gguf_vocab_size(meta, &key("vocab_size"), vocab_from_tensors)?,
            context_len: req("context_length")?,
            rms_eps: meta
                .get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5) as f32,
            norm_offset: 0.0,
            rope: RopeConfig {
                theta: meta.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
                dim: meta
                    .get_usize(&key("rope.dimension_count"))?
                    .unwrap_or(head_dim),
                // llama.cpp's converter permutes Q/K rows of llama checkpoints so that ggml's
                // "normal" (adjacent-pair) rope is right for GGUF files; Gemma's and Qwen's
                // rows are not permuted and llama.cpp ropes them in "neox" (halves) mode
                // (`llama_model_rope_type`).
                // DeepSeek's rope dims come in adjacent pairs in the checkpoint itself
                // (transformers' `rope_interleave`), unpermuted by the converter.
                style: match arch {
                    Arch::Llama | Arch::DeepseekV3 => RopeStyle::Interleaved,
                    Arch::Gemma3 | Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe => RopeStyle::Halves,
                },
                scaling,
            },
            embed_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
            final_softcap: None,
            moe: None,
            mla: None,
        };
        // The per-layer tables of the extras are sized by it.
        cfg.validate_layer_count(Source::Gguf)?;
        match arch {
            Arch::Gemma3 => cfg.gemma3_from_gguf(meta)?,
            Arch::Qwen3Moe => cfg.qwen3moe_from_gguf(meta)?,
            Arch::DeepseekV3 => cfg.deepseek2_from_gguf(meta)?,
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => {}
        }
        cfg.validate(Source::Gguf)?;
        Ok(cfg)
    }

    /// Qwen3-MoE's router as llama.cpp's `qwen3moe` runs it: softmax over `expert_count`
    /// experts, top `expert_used_count`, renormalised (llama.cpp hard-codes it; a file's
    /// `expert_weights_norm` overrides). Every layer is sparse here; the loader marks layers
    /// without a router (`ffn_gate_inp`) dense, see [`ModelConfig::with_moe_layers`].
    fn qwen3moe_from_gguf(&mut self, meta: &Metadata) -> Result<()> {
        let key = |k: &str| format!("qwen3moe.{k}");
        let req = |k: &str| -> Result<usize> {
            meta.get_usize(&key(k))?
                .ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
        };
        self.moe = Some(MoeConfig {
            n_experts: req("expert_count")?,
            n_used: req("expert_used_count")?,
            expert_ffn_dim: req("expert_feed_forward_length")?,
            n_shared: 0,
            gating: Gating::Softmax,
            norm_weights: meta.get_bool(&key("expert_weights_norm"))?.unwrap_or(true),
            scale: 1.0,
            n_groups: 1,
            groups_used: 1,
            layers: vec![true; self.n_layers],
        });
        Ok(())
    }

    /// DeepSeek-V2/V3 as llama.cpp's converter writes them (`deepseek2`): MLA sizes from
    /// `attention.{q,kv}_lora_rank`, per-head sizes from `attention.key_length_mla` /
    /// `value_length_mla` (newer files, whose `key_length` is the latent row `kv_lora_rank +
    /// rope`) or `key_length` / `value_length` (older ones); the MoE from `expert_*` keys, the
    /// first `leading_dense_block_count` layers dense; the YaRN softmax correction from
    /// `rope.scaling.yarn_log_multiplier` (`0.1 * mscale_all_dim`).
    fn deepseek2_from_gguf(&mut self, meta: &Metadata) -> Result<()> {
        let key = |k: &str| format!("deepseek2.{k}");
        let opt = |k: &str| meta.get_usize(&key(k));
        let req = |k: &str| -> Result<usize> {
            opt(k)?.ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
        };
        let kv_lora_rank = req("attention.kv_lora_rank")?;
        let rope_dim = self.rope.dim;
        match (
            opt("attention.key_length_mla")?,
            opt("attention.value_length_mla")?,
        ) {
            (Some(k), Some(v)) => (self.head_dim, self.v_head_dim) = (k, v),
            (None, None) => {}
            _ => {
                return Err(ModelError::Metadata(format!(
                    "`{}` and `{}` come together",
                    key("attention.key_length_mla"),
                    key("attention.value_length_mla")
                )))
            }
        }
        self.n_kv_heads = self.n_heads;
        self.mla = Some(MlaConfig {
            q_lora_rank: opt("attention.q_lora_rank")?,
            kv_lora_rank,
            qk_nope_dim: self.head_dim.saturating_sub(rope_dim),
            qk_rope_dim: rope_dim,
        });
        self.attn_scale = 1.0 / (self.head_dim as f32).sqrt();
        if let (RopeScaling::Yarn { factor, .. }, Some(log_mul)) = (
            &self.rope.scaling,
            meta.get_f64(&key("rope.scaling.yarn_log_multiplier"))?,
        ) {
            let m = yarn_mscale(*factor, log_mul / 0.1);
            self.attn_scale *= (m * m) as f32;
        }
        let gating = match opt("expert_gating_func")? {
            None | Some(1) => Gating::Softmax,
            Some(2) => Gating::Sigmoid,
            Some(other) => {
                return Err(ModelError::Metadata(format!(
                    "`{}` {other} is not supported (supported: 1 softmax, 2 sigmoid)",
                    key("expert_gating_func")
                )))
            }
        };
        let dense = opt("leading_dense_block_count")?.unwrap_or(0);
        if dense > self.n_layers {
            return Err(ModelError::Metadata(format!(
                "`{}` is {dense}, more than the {} layers (`{}`)",
                key("leading_dense_block_count"),
                self.n_layers,
                key("block_count")
            )));
        }
        self.moe = Some(MoeConfig {
            n_experts: req("expert_count")?,
            n_used: req("expert_used_count")?,
            expert_ffn_dim: req("expert_feed_forward_length")?,
            n_shared: opt("expert_shared_count")?.unwrap_or(0),
            gating,
            norm_weights: meta.get_bool(&key("expert_weights_norm"))?.unwrap_or(false),
            scale: meta.get_f64(&key("expert_weights_scale"))?.unwrap_or(1.0) as f32,
            n_groups: opt("expert_group_count")?.unwrap_or(1).max(1),
            groups_used: opt("expert_group_used_count")?.unwrap_or(1).max(1),
            layers: (0..self.n_layers).map(|i| i >= dense).collect(),
        });
        Ok(())
    }

    /// The config with the sparse layers of its MoE replaced by `layers` (GGUF: the layers
    /// that have a router tensor).
    pub fn with_moe_layers(mut self, layers: Vec<bool>) -> Result<ModelConfig> {
        match &mut self.moe {
            Some(moe) => moe.layers = layers,
            None => {
                return Err(ModelError::Metadata(
                    "sparse layers given for a model without experts".into(),
                ))
            }
        }
        self.validate(Source::Gguf)?;
        Ok(self)
    }

    /// Gemma 3's extras as llama.cpp reads them (`llama_load_hparams_gemma3`): every 6th layer
    /// (`i % 6 == 5`) attends globally with the file's rope, the others over
    /// `attention.sliding_window` positions with an unscaled rope of base 10 000 (hard-coded
    /// by llama.cpp, not in the file); embeddings scaled by `sqrt(hidden)`; the query scale
    /// `1/sqrt(head_dim)`, except for the 27B (62 layers), whose `query_pre_attn_scalar` is
    /// `hidden / heads`. The norm weights already hold Gemma's `1 + w`.
    fn gemma3_from_gguf(&mut self, meta: &Metadata) -> Result<()> {
        let key = |k: &str| format!("gemma3.{k}");
        let size = meta
            .get_usize(&key("attention.sliding_window"))?
            .ok_or_else(|| {
                ModelError::Metadata(format!("missing `{}`", key("attention.sliding_window")))
            })?;
        self.sliding_window = Some(SlidingWindow {
            size,
            layers: (0..self.n_layers).map(|i| i % 6 < 5).collect(),
            rope: RopeConfig {
                theta: 10_000.0,
                scaling: RopeScaling::None,
                ..self.rope.clone()
            },
        });
        self.embed_scale = (self.hidden as f32).sqrt();
        let query_pre_attn_scalar = if self.n_layers == 62 {
            self.hidden / self.n_heads.max(1)
        } else {
            self.head_dim
        };
        self.attn_scale = 1.0 / (query_pre_attn_scalar as f32).sqrt();
        self.final_softcap = meta
            .get_f64(&key("final_logit_softcapping"))?
            .map(|c| c as f32);
        Ok(())
    }

    /// From an HF `config.json`, in either the older `rope_theta`/`rope_scaling` style or the
    /// newer `rope_parameters` style.
    ///
    /// A multimodal Gemma 3 (`model_type` `gemma3`) is read from its `text_config`.
    pub fn from_hf(config: &Value) -> Result<ModelConfig> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::Metadata("config.json has no `model_type`".into()))?;
        if model_type == "gemma3" {
            let mut text = config
                .get("text_config")
                .filter(|t| t.is_object())
                .cloned()
                .ok_or_else(|| {
                    ModelError::Metadata(
                        "config.json: a `gemma3` model needs a `text_config` object".into(),
                    )
                })?;
            text["model_type"] = "gemma3_text".into();
            return Self::from_hf(&text);
        }
        let arch = Arch::from_hf_model_type(model_type)?;
        let config = &with_hf_defaults(arch, config);
        let int = |k: &str| hf_int(config, k);
        let req = |k: &str| -> Result<usize> {
            int(k)?.ok_or_else(|| ModelError::Metadata(format!("config.json: missing `{k}`")))
        };
        let hidden = req("hidden_size")?;
        let n_heads = req("num_attention_heads")?;
        let head_dim = match int("head_dim")? {
            Some(d) => d,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let (theta, scaling) = hf_rope(config, config.get("rope_parameters"), 10_000.0)?;
        let mut cfg = ModelConfig {
            arch,
            n_layers: req("num_hidden_layers")?,
            hidden,
            n_heads,
            n_kv_heads: int("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim,
            v_head_dim: head_dim,
            ffn_dim: req("intermediate_size")?,
            vocab_size: req("vocab_size")?,
            context_len: int("max_position_embeddings")?.unwrap_or(2048),
            rms_eps: hf_num(config, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            norm_offset: 0.0,
            rope: RopeConfig {
                theta,
                dim: head_dim,
                // HF checkpoints are not permuted: transformers' rotate_half pairs halves.
                style: RopeStyle::Halves,
                scaling,
            },
            embed_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
            final_softcap: None,
            moe: None,
            mla: None,
        };
        // The per-layer tables of the extras are sized by it.
        cfg.validate_layer_count(Source::Hf)?;
        match arch {
            Arch::Gemma3 => cfg.gemma3_from_hf(config)?,
            Arch::Qwen3Moe => {
                llama_family_hf_checks(config)?;
                cfg.qwen3_moe_from_hf(config)?;
            }
            Arch::DeepseekV3 => {
                llama_family_hf_checks(config)?;
                cfg.deepseek_v3_from_hf(config)?;
            }
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => llama_family_hf_checks(config)?,
        }
        cfg.validate(Source::Hf)?;
        Ok(cfg)
    }

    /// Qwen3-MoE's experts as transformers' `Qwen3MoeSparseMoeBlock` uses them: layer `i` is
    /// sparse when `num_experts > 0`, `i` is not in `mlp_only_layers` and
    /// `(i + 1) % decoder_sparse_step == 0`; softmax router, top `num_experts_per_tok`,
    /// renormalised if `norm_topk_prob`. (transformers 5 writes `num_local_experts`.)
    fn qwen3_moe_from_hf(&mut self, config: &Value) -> Result<()> {
        let n_experts = hf_int(config, "num_experts")?
            .or(hf_int(config, "num_local_experts")?)
            .unwrap_or(128);
        let step = hf_int(config, "decoder_sparse_step")?.unwrap_or(1);
        if step == 0 {
            return Err(ModelError::Metadata(
                "config.json: `decoder_sparse_step` is 0; it must be at least 1".into(),
            ));
        }
        let dense: Vec<usize> = match config.get("mlp_only_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                ModelError::Metadata(format!(
                    "config.json: `mlp_only_layers` should be a list of layer indices, got {v}"
                ))
            })?,
        };
        if let Some(i) = dense.iter().find(|&&i| i >= self.n_layers) {
            return Err(ModelError::Metadata(format!(
                "config.json: `mlp_only_layers` names layer {i}, but there are {} \
                 (`num_hidden_layers`)",
                self.n_layers
            )));
        }
        self.moe = Some(MoeConfig {
            n_experts,
            n_used: hf_int(config, "num_experts_per_tok")?.unwrap_or(8),
            expert_ffn_dim: hf_int(config, "moe_intermediate_size")?.unwrap_or(768),
            n_shared: 0,
            gating: Gating::Softmax,
            norm_weights: hf_bool(config, "norm_topk_prob")?.unwrap_or(false),
            scale: 1.0,
            n_groups: 1,
            groups_used: 1,
            layers: (0..self.n_layers)
                .map(|i| !dense.contains(&i) && n_experts > 0 && (i + 1) % step == 0)
                .collect(),
        });
        if n_experts == 0 {
            // No sparse layer: the experts' sizes are never used.
            self.moe = None;
        }
        Ok(())
    }

    /// DeepSeek-V3 as transformers' `DeepseekV3ForCausalLM` computes it: MLA with head dim
    /// `qk_nope_head_dim + qk_rope_head_dim`, rope on the last `qk_rope_head_dim` dims in
    /// adjacent pairs (unless `rope_interleave` is false), softmax scale
    /// `qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2` under YaRN with `mscale_all_dim`;
    /// sigmoid router with `e_score_correction_bias`, `n_group` groups of which `topk_group`
    /// are kept, `routed_scaling_factor`, `n_shared_experts`; layers from
    /// `first_k_dense_replace` on are sparse. transformers ignores `scoring_func` and
    /// `topk_method` (always sigmoid, "noaux_tc"); a config naming others is refused rather
    /// than computed differently from its model.
    fn deepseek_v3_from_hf(&mut self, config: &Value) -> Result<()> {
        let bad = |m: String| ModelError::Metadata(format!("config.json: {m}"));
        let int = |k: &str| hf_int(config, k);
        for (k, want) in [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")] {
            match config.get(k).and_then(Value::as_str) {
                None => {}
                Some(v) if v == want => {}
                Some(v) => {
                    return Err(bad(format!(
                        "`{k}` `{v}` is not supported by deepseek_v3 (supported: {want})"
                    )))
                }
            }
        }
        let nope = int("qk_nope_head_dim")?.unwrap_or(128);
        let rope = int("qk_rope_head_dim")?.unwrap_or(64);
        self.head_dim = nope + rope;
        self.v_head_dim = int("v_head_dim")?.unwrap_or(128);
        self.n_kv_heads = self.n_heads;
        self.rope.dim = rope;
        if hf_bool(config, "rope_interleave")? == Some(false) {
            self.rope.style = RopeStyle::Halves;
        } else {
            self.rope.style = RopeStyle::Interleaved;
        }
        self.mla = Some(MlaConfig {
            q_lora_rank: int("q_lora_rank")?,
            kv_lora_rank: int("kv_lora_rank")?.unwrap_or(512),
            qk_nope_dim: nope,
            qk_rope_dim: rope,
        });
        self.attn_scale = 1.0 / (self.head_dim as f32).sqrt();
        if let RopeScaling::Yarn { factor, .. } = self.rope.scaling {
            let all_dim = hf_rope_field(config, config.get("rope_parameters"), "mscale_all_dim")
                .map(|v| hf_as_num("rope_scaling.mscale_all_dim", v))
                .transpose()?
                .unwrap_or(0.0);
            if all_dim != 0.0 {
                let m = yarn_mscale(factor, all_dim);
                self.attn_scale *= (m * m) as f32;
            }
        }
        let dense = int("first_k_dense_replace")?.unwrap_or(3);
        if dense > self.n_layers {
            return Err(bad(format!(
                "`first_k_dense_replace` is {dense}, more than the {} layers \
                 (`num_hidden_layers`)",
                self.n_layers
            )));
        }
        self.moe = Some(MoeConfig {
            n_experts: int("n_routed_experts")?
                .or(int("num_local_experts")?)
                .unwrap_or(256),
            n_used: int("num_experts_per_tok")?.unwrap_or(8),
            expert_ffn_dim: int("moe_intermediate_size")?.unwrap_or(2048),
            n_shared: int("n_shared_experts")?.unwrap_or(1),
            gating: Gating::Sigmoid,
            norm_weights: hf_bool(config, "norm_topk_prob")?.unwrap_or(true),
            scale: hf_num(config, "routed_scaling_factor")?.unwrap_or(2.5) as f32,
            n_groups: int("n_group")?.unwrap_or(8),
            groups_used: int("topk_group")?.unwrap_or(4),
            layers: (0..self.n_layers).map(|i| i >= dense).collect(),
        });
        Ok(())
    }

    /// Gemma 3's extras as transformers' `Gemma3TextConfig` defines them: `(1 + w)` norms,
    /// embeddings scaled by `sqrt(hidden)`, the query scale `query_pre_attn_scalar^-0.5`,
    /// sliding-window layers from `layer_types` (or every layer but each
    /// `sliding_window_pattern`-th), and their own rope: `rope_parameters.sliding_attention`
    /// (transformers 5) or an unscaled one of base `rope_local_base_freq`.
    fn gemma3_from_hf(&mut self, config: &Value) -> Result<()> {
        let bad = |m: String| ModelError::Metadata(format!("config.json: {m}"));
        let num = |k: &str| hf_num(config, k);
        if let Some(act) = config.get("hidden_activation").and_then(Value::as_str) {
            if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh") {
                return Err(bad(format!(
                    "hidden_activation `{act}` is not supported (supported: gelu_pytorch_tanh)"
                )));
            }
        }
        if num("attn_logit_softcapping")?.is_some() {
            return Err(bad("attention soft-capping is not supported".into()));
        }
        let size = hf_int(config, "sliding_window")?
            .ok_or_else(|| bad("missing `sliding_window`".into()))?;
        let layers = match config.get("layer_types").and_then(Value::as_array) {
            Some(types) => {
                if types.len() != self.n_layers {
                    return Err(bad(format!(
                        "`layer_types` has {} entries for {} layers",
                        types.len(),
                        self.n_layers
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(bad(format!("unknown layer type {t} in `layer_types`"))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => {
                let pattern = hf_int(config, "sliding_window_pattern")?.unwrap_or(6);
                if pattern == 0 {
                    return Err(bad(
                        "`sliding_window_pattern` is 0; it must be at least 1".into()
                    ));
                }
                (0..self.n_layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        let per_type = config
            .get("rope_parameters")
            .filter(|p| p.get("full_attention").is_some());
        let local = match per_type {
            Some(p) => {
                let (theta, scaling) = hf_rope(&Value::Null, p.get("full_attention"), 1e6)?;
                self.rope.theta = theta;
                self.rope.scaling = scaling;
                hf_rope(&Value::Null, p.get("sliding_attention"), 10_000.0)?
            }
            None => (
                num("rope_local_base_freq")?.unwrap_or(10_000.0),
                RopeScaling::None,
            ),
        };
        self.sliding_window = Some(SlidingWindow {
            size,
            layers,
            rope: RopeConfig {
                theta: local.0,
                scaling: local.1,
                ..self.rope.clone()
            },
        });
        self.norm_offset = 1.0;
        self.embed_scale = (self.hidden as f32).sqrt();
        self.attn_scale =
            num("query_pre_attn_scalar")?.map_or(self.attn_scale, |s| (1.0 / s.sqrt()) as f32);
        self.final_softcap = num("final_logit_softcapping")?.map(|c| c as f32);
        Ok(())
    }

    /// Every parameter in range, or an error naming the key (of the format `src`) that the bad
    /// value came from and the rule it breaks.
    fn validate(&self, src: Source) -> Result<()> {
        self.validate_sizes(src)?;
        let bad = |m: String| Err(out_of_range(src, m));
        let key = |gguf: &str, hf: &str| self.key(src, gguf, hf);
        if !(self.attn_scale.is_finite() && self.attn_scale > 0.0) {
            let from = match (self.arch, src) {
                (Arch::Gemma3, Source::Hf) => key("", "query_pre_attn_scalar"),
                (Arch::DeepseekV3, _) => key(
                    "rope.scaling.yarn_log_multiplier",
                    "rope_scaling.mscale_all_dim",
                ),
                _ => self.head_dim_key(src),
            };
            return bad(format!(
                "the attention scale {} (from {from}) must be a finite number > 0",
                self.attn_scale
            ));
        }
        if let Some(cap) = self.final_softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return bad(format!(
                    "{} is {cap}; it must be a finite number > 0",
                    key("final_logit_softcapping", "final_logit_softcapping")
                ));
            }
        }
        if let Some(sw) = &self.sliding_window {
            let window = key("attention.sliding_window", "sliding_window");
            if sw.size == 0 || sw.size > MAX_SIZE {
                return bad(format!(
                    "{window} is {}; it must be between 1 and {MAX_SIZE}",
                    sw.size
                ));
            }
            if sw.layers.len() != self.n_layers {
                return bad(format!(
                    "the sliding-window pattern covers {} layers of {} ({})",
                    sw.layers.len(),
                    self.n_layers,
                    key("block_count", "layer_types")
                ));
            }
            Self::validate_rope(&sw.rope, self.head_dim, &self.rope_keys(src, true))?;
        }
        if let Some(moe) = &self.moe {
            self.validate_moe(moe, src)?;
        }
        if let Some(mla) = &self.mla {
            for (k, rank) in [
                (
                    key("attention.kv_lora_rank", "kv_lora_rank"),
                    Some(mla.kv_lora_rank),
                ),
                (key("attention.q_lora_rank", "q_lora_rank"), mla.q_lora_rank),
            ] {
                if let Some(r) = rank.filter(|&r| r == 0 || r > MAX_SIZE) {
                    return bad(format!("{k} is {r}; it must be between 1 and {MAX_SIZE}"));
                }
            }
            if mla.qk_nope_dim == 0 {
                return bad(match src {
                    Source::Hf => {
                        format!("`qk_nope_head_dim` is 0; it must be between 1 and {MAX_SIZE}")
                    }
                    Source::Gguf => format!(
                        "{} is {}, which leaves no query/key dimensions without rope beside \
                         the {} of {}",
                        self.head_dim_key(src),
                        self.head_dim,
                        mla.qk_rope_dim,
                        self.rope_keys(src, false).dim
                    ),
                });
            }
            if mla.qk_rope_dim != self.rope.dim
                || mla.qk_nope_dim + mla.qk_rope_dim != self.head_dim
            {
                return bad(format!(
                    "MLA head dim {} ({}) is not the no-rope dim {} plus the rope dim {} ({})",
                    self.head_dim,
                    self.head_dim_key(src),
                    mla.qk_nope_dim,
                    mla.qk_rope_dim,
                    self.rope_keys(src, false).dim
                ));
            }
        }
        Self::validate_rope(&self.rope, self.head_dim, &self.rope_keys(src, false))
    }

    /// The key of a parameter in the format `src`, quoted: GGUF's `{arch}.{gguf}` or
    /// config.json's `hf`.
    fn key(&self, src: Source, gguf: &str, hf: &str) -> String {
        match src {
            Source::Gguf => format!("`{}.{gguf}`", self.arch.gguf_name()),
            Source::Hf => format!("`{hf}`"),
        }
    }

    /// The key of the query/key head dim, and where its default comes from.
    fn head_dim_key(&self, src: Source) -> String {
        match self.arch {
            Arch::DeepseekV3 => self.key(
                src,
                "attention.key_length_mla",
                "qk_nope_head_dim` + `qk_rope_head_dim",
            ),
            _ => {
                let (key, default) = match src {
                    Source::Gguf => (
                        self.key(src, "attention.key_length", ""),
                        self.key(src, "embedding_length` / `attention.head_count", ""),
                    ),
                    Source::Hf => (
                        "`head_dim`".to_string(),
                        "`hidden_size` / `num_attention_heads`".to_string(),
                    ),
                };
                format!("{key} (default {default})")
            }
        }
    }

    /// The keys of the main rope (`local`: of the sliding-window layers' rope).
    fn rope_keys(&self, src: Source, local: bool) -> RopeKeys {
        let dim = match (self.arch, src) {
            (Arch::DeepseekV3, _) => self.key(src, "rope.dimension_count", "qk_rope_head_dim"),
            (_, Source::Gguf) => format!(
                "{} (default the head dim)",
                self.key(src, "rope.dimension_count", "")
            ),
            (_, Source::Hf) => self.head_dim_key(src),
        };
        let (theta, scaling) = match (src, local) {
            (Source::Gguf, false) => (
                self.key(src, "rope.freq_base", ""),
                format!("{}.rope.scaling", self.arch.gguf_name()),
            ),
            // llama.cpp's fixed rope of Gemma 3's local layers.
            (Source::Gguf, true) => (
                "the local layers' fixed rope base".into(),
                "the local layers' rope".into(),
            ),
            (Source::Hf, false) => ("`rope_theta`".into(), "rope_scaling".into()),
            (Source::Hf, true) => (
                "`rope_local_base_freq`".into(),
                "rope_parameters.sliding_attention".into(),
            ),
        };
        RopeKeys {
            src,
            theta,
            dim,
            scaling,
        }
    }

    fn validate_moe(&self, moe: &MoeConfig, src: Source) -> Result<()> {
        let bad = |m: String| Err(out_of_range(src, m));
        let deepseek = self.arch == Arch::DeepseekV3;
        let key = |gguf: &str, qwen: &str, ds: &str| {
            self.key(src, gguf, if deepseek { ds } else { qwen })
        };
        let experts = key("expert_count", "num_experts", "n_routed_experts");
        let groups = key("expert_group_count", "n_group", "n_group");
        let groups_used = key("expert_group_used_count", "topk_group", "topk_group");
        let used = key(
            "expert_used_count",
            "num_experts_per_tok",
            "num_experts_per_tok",
        );
        for (k, v) in [
            (&experts, moe.n_experts),
            (&used, moe.n_used),
            (
                &key(
                    "expert_feed_forward_length",
                    "moe_intermediate_size",
                    "moe_intermediate_size",
                ),
                moe.expert_ffn_dim,
            ),
            (&groups, moe.n_groups),
            (&groups_used, moe.groups_used),
        ] {
            if v == 0 || v > MAX_SIZE {
                return bad(format!("{k} is {v}; it must be between 1 and {MAX_SIZE}"));
            }
        }
        if moe.n_shared > 1 << 12 {
            return bad(format!(
                "{} is {}; it must be at most {}",
                key(
                    "expert_shared_count",
                    "n_shared_experts",
                    "n_shared_experts"
                ),
                moe.n_shared,
                1 << 12
            ));
        }
        if !moe.n_experts.is_multiple_of(moe.n_groups) || moe.groups_used > moe.n_groups {
            return bad(format!(
                "{} experts ({experts}) in {} groups ({groups}), {} of them used \
                 ({groups_used}): groups must divide the experts and be at least as many as \
                 are used",
                moe.n_experts, moe.n_groups, moe.groups_used
            ));
        }
        let reachable = moe.groups_used * (moe.n_experts / moe.n_groups);
        if moe.n_used > reachable {
            return bad(format!(
                "{used} is {}, but only {reachable} experts are in the {} groups used \
                 ({groups_used}) of {} experts ({experts})",
                moe.n_used, moe.groups_used, moe.n_experts
            ));
        }
        if !(moe.scale.is_finite() && moe.scale > 0.0) {
            return bad(format!(
                "{} is {}; it must be a finite number > 0",
                key(
                    "expert_weights_scale",
                    "routed_scaling_factor",
                    "routed_scaling_factor"
                ),
                moe.scale
            ));
        }
        if moe.layers.len() != self.n_layers {
            return bad(format!(
                "the sparse-layer pattern covers {} layers of {} ({})",
                moe.layers.len(),
                self.n_layers,
                key("block_count", "num_hidden_layers", "num_hidden_layers")
            ));
        }
        Ok(())
    }

    fn validate_rope(rope: &RopeConfig, head_dim: usize, keys: &RopeKeys) -> Result<()> {
        let bad = |m: String| Err(out_of_range(keys.src, m));
        if rope.dim == 0 || !rope.dim.is_multiple_of(2) || rope.dim > head_dim {
            return bad(format!(
                "{} is {}; the rotated dimensions must be even, > 0 and at most the head dim \
                 {head_dim}",
                keys.dim, rope.dim
            ));
        }
        if !(rope.theta.is_finite() && rope.theta > 1.0) {
            return bad(format!(
                "{} is {}; the rope base must be a finite number > 1",
                keys.theta, rope.theta
            ));
        }
        let positive = |k: String, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bad(format!("{k} is {v}; it must be a finite number > 0"))
            }
        };
        match &rope.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive(keys.field("factor", "factor"), *factor)?,
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_pos,
            } => {
                for (k, v) in [
                    ("factor", factor),
                    ("low_freq_factor", low),
                    ("high_freq_factor", high),
                    ("original_max_position_embeddings", original_max_pos),
                ] {
                    positive(keys.field(k, k), v)?;
                }
                if high <= low {
                    return bad(format!(
                        "{} ({high}) must be greater than {} ({low})",
                        keys.field("high_freq_factor", "high_freq_factor"),
                        keys.field("low_freq_factor", "low_freq_factor")
                    ));
                }
            }
            &RopeScaling::Yarn {
                factor,
                original_max_pos,
                beta_fast,
                beta_slow,
                attn_factor,
                ..
            } => {
                for (gguf, hf, v) in [
                    ("factor", "factor", factor),
                    (
                        "original_context_length",
                        "original_max_position_embeddings",
                        original_max_pos,
                    ),
                    ("yarn_beta_fast", "beta_fast", beta_fast),
                    ("yarn_beta_slow", "beta_slow", beta_slow),
                    ("attn_factor", "attention_factor", attn_factor),
                ] {
                    positive(keys.field(gguf, hf), v)?;
                }
            }
            RopeScaling::Factors(f) => {
                if f.len() != rope.dim / 2 {
                    return bad(format!(
                        "`{ROPE_FREQS}` has {} values for the {} rope pairs of {}",
                        f.len(),
                        rope.dim / 2,
                        keys.dim
                    ));
                }
                if let Some(v) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                    return bad(format!(
                        "`{ROPE_FREQS}` holds {v}; every factor must be a finite number > 0"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The config with the main rope's frequencies divided by `factors` (one per pair, GGUF's
    /// `rope_freqs.weight`).
    pub fn with_rope_factors(mut self, factors: Vec<f64>) -> Result<ModelConfig> {
        if self.rope.scaling != RopeScaling::None {
            return Err(ModelError::Metadata(format!(
                "`{ROPE_FREQS}` on top of the rope scaling of `{}.rope.scaling.type`",
                self.arch.gguf_name()
            )));
        }
        self.rope.scaling = RopeScaling::Factors(factors);
        Self::validate_rope(
            &self.rope,
            self.head_dim,
            &self.rope_keys(Source::Gguf, false),
        )?;
        Ok(self)
    }

    fn validate_layer_count(&self, src: Source) -> Result<()> {
        if self.n_layers == 0 || self.n_layers > MAX_SIZE {
            return Err(out_of_range(
                src,
                format!(
                    "{} is {}; it must be between 1 and {MAX_SIZE}",
                    self.key(src, "block_count", "num_hidden_layers"),
                    self.n_layers
                ),
            ));
        }
        Ok(())
    }

    fn validate_sizes(&self, src: Source) -> Result<()> {
        let bad = |m: String| Err(out_of_range(src, m));
        let key = |gguf: &str, hf: &str| self.key(src, gguf, hf);
        let heads = key("attention.head_count", "num_attention_heads");
        let kv_heads = key("attention.head_count_kv", "num_key_value_heads");
        let v_head_dim = match self.arch {
            Arch::DeepseekV3 => key("attention.value_length_mla", "v_head_dim"),
            _ => key("attention.value_length", "head_dim"),
        };
        let vocab = match src {
            Source::Gguf => format!(
                "the vocabulary size ({}, `{TOKENS_KEY}` or the rows of `token_embd.weight`)",
                key("vocab_size", "")
            ),
            Source::Hf => key("", "vocab_size"),
        };
        self.validate_layer_count(src)?;
        for (k, v) in [
            (key("embedding_length", "hidden_size"), self.hidden),
            (heads.clone(), self.n_heads),
            (kv_heads.clone(), self.n_kv_heads),
            (self.head_dim_key(src), self.head_dim),
            (v_head_dim, self.v_head_dim),
            (
                key("feed_forward_length", "intermediate_size"),
                self.ffn_dim,
            ),
            (vocab, self.vocab_size),
            (
                key("context_length", "max_position_embeddings"),
                self.context_len,
            ),
        ] {
            if v == 0 || v > MAX_SIZE {
                return bad(format!("{k} is {v}; it must be between 1 and {MAX_SIZE}"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads ({heads}) cannot be grouped over {} KV heads ({kv_heads})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return bad(format!(
                "{} is {}; the norm epsilon must be a finite number > 0 and < 1",
                key("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                self.rms_eps
            ));
        }
        Ok(())
    }
}

/// The GGUF key of the token list, whose length is the vocabulary size.
pub const TOKENS_KEY: &str = "tokenizer.ggml.tokens";

/// llama.cpp's vocabulary size: the length of `tokenizer.ggml.tokens`, which `vocab_key`
/// (`{arch}.vocab_size`) must equal when a file has both; `rows` when it has neither.
fn gguf_vocab_size(meta: &Metadata, vocab_key: &str, rows: usize) -> Result<usize> {
    let tokens = meta.get_array(TOKENS_KEY)?.map(<[MetaValue]>::len);
    match (meta.get_usize(vocab_key)?, tokens) {
        (Some(v), Some(t)) if v != t => Err(ModelError::Metadata(format!(
            "`{vocab_key}` is {v} but `{TOKENS_KEY}` lists {t} tokens"
        ))),
        (v, t) => Ok(v.or(t).unwrap_or(rows)),
    }
}

/// The largest size, count or length a parameter may have: larger values are corrupt files
/// (real models stay far below it), and products of a few of them cannot overflow.
const MAX_SIZE: usize = 1 << 24;

/// GGUF's per-pair rope frequency divisors, as llama.cpp's converter stores Llama 3 rope
/// scaling.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Which format a config was read from, so that a check can name the key a bad value came
/// from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// GGUF metadata: keys `{arch}.{name}`.
    Gguf,
    /// An HF `config.json`.
    Hf,
}

/// The error for a parameter out of range; `msg` names its key.
fn out_of_range(src: Source, msg: String) -> ModelError {
    ModelError::Metadata(match src {
        Source::Gguf => msg,
        Source::Hf => format!("config.json: {msg}"),
    })
}

/// The keys a rope's values came from, quoted, for error messages.
struct RopeKeys {
    src: Source,
    theta: String,
    dim: String,
    /// What holds the scaling fields: `{arch}.rope.scaling` (GGUF) or `rope_scaling`.
    scaling: String,
}

impl RopeKeys {
    /// The key of a scaling field, named `gguf` in GGUF and `hf` in config.json.
    fn field(&self, gguf: &str, hf: &str) -> String {
        let name = match self.src {
            Source::Gguf => gguf,
            Source::Hf => hf,
        };
        format!("`{}.{name}`", self.scaling)
    }
}

/// A non-negative integer `k` of `config`, `None` when absent or null.
fn hf_int(config: &Value, k: &str) -> Result<Option<usize>> {
    match config.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|u| Some(u as usize)).ok_or_else(|| {
            ModelError::Metadata(format!(
                "config.json: `{k}` should be a non-negative integer, got {v}"
            ))
        }),
    }
}

/// A number `k` of `config`, `None` when absent or null.
fn hf_num(config: &Value, k: &str) -> Result<Option<f64>> {
    match config.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => hf_as_num(k, v).map(Some),
    }
}

/// The value `v` of key `k` as a number.
fn hf_as_num(k: &str, v: &Value) -> Result<f64> {
    v.as_f64().ok_or_else(|| {
        ModelError::Metadata(format!("config.json: `{k}` should be a number, got {v}"))
    })
}

/// A bool `k` of `config`, `None` when absent or null.
fn hf_bool(config: &Value, k: &str) -> Result<Option<bool>> {
    match config.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            ModelError::Metadata(format!("config.json: `{k}` should be a bool, got {v}"))
        }),
    }
}

/// Field `k` of the rope dict `params`, or of the older top-level `rope_scaling`.
fn hf_rope_field<'a>(config: &'a Value, params: Option<&'a Value>, k: &str) -> Option<&'a Value> {
    params
        .and_then(|p| p.get(k))
        .or_else(|| config.get("rope_scaling").and_then(|p| p.get(k)))
        .filter(|v| !v.is_null())
}

/// Rope base and scaling from an HF rope dict `params` (`rope_parameters`, or one layer type's
/// entry of it), falling back on the older top-level `rope_theta` and `rope_scaling`.
fn hf_rope(
    config: &Value,
    params: Option<&Value>,
    default_theta: f64,
) -> Result<(f64, RopeScaling)> {
    let field = |k: &str| hf_rope_field(config, params, k);
    let theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) if !v.is_null() => hf_as_num("rope_theta", v)?,
        _ => hf_num(config, "rope_theta")?.unwrap_or(default_theta),
    };
    let num = |k: &str| {
        field(k)
            .map(|v| hf_as_num(&format!("rope_scaling.{k}"), v))
            .transpose()
    };
    let rope_type = field("rope_type")
        .or_else(|| field("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?.unwrap_or(1.0),
        },
        "llama3" => {
            let num = |k: &str| {
                num(k)?.ok_or_else(|| {
                    ModelError::Metadata(format!("config.json: llama3 rope scaling needs `{k}`"))
                })
            };
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_pos: num("original_max_position_embeddings")?,
            }
        }
        "yarn" => {
            let max_pos = hf_num(config, "max_position_embeddings")?;
            let original_max_pos = num("original_max_position_embeddings")?
                .or(max_pos)
                .ok_or_else(|| {
                    ModelError::Metadata(
                        "config.json: yarn rope scaling needs `original_max_position_embeddings`"
                            .into(),
                    )
                })?;
            // transformers: a missing factor is the context extension itself.
            let factor = match (num("factor")?, max_pos) {
                (Some(f), _) => f,
                (None, Some(m)) => m / original_max_pos,
                (None, None) => {
                    return Err(ModelError::Metadata(
                        "config.json: yarn rope scaling needs `factor`".into(),
                    ))
                }
            };
            // `attention_factor`, else from `mscale` / `mscale_all_dim` when both are set
            // (non-zero), else YaRN's default `0.1 ln(factor) + 1`.
            let attn_factor = match (
                num("attention_factor")?,
                num("mscale")?,
                num("mscale_all_dim")?,
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            let nonzero = |k: &str, default: f64| -> Result<f64> {
                Ok(num(k)?.filter(|v| *v != 0.0).unwrap_or(default))
            };
            RopeScaling::Yarn {
                factor,
                original_max_pos,
                beta_fast: nonzero("beta_fast", 32.0)?,
                beta_slow: nonzero("beta_slow", 1.0)?,
                attn_factor,
                truncate: match field("truncate") {
                    None => true,
                    Some(v) => v.as_bool().ok_or_else(|| {
                        ModelError::Metadata(format!(
                            "config.json: `rope_scaling.truncate` should be a bool, got {v}"
                        ))
                    })?,
                },
            }
        }
        other => {
            return Err(ModelError::Metadata(format!(
                "config.json: rope type `{other}` is not supported (supported: default, linear, llama3, yarn)"
            )))
        }
    };
    Ok((theta, scaling))
}

/// What the Llama family's builder does not do, refused by name: another activation than
/// SiLU, and sliding-window attention (Qwen2's `use_sliding_window`, which transformers
/// applies to the layers from `max_window_layers` on; it is off in every released Qwen2, and
/// its `sliding_window` value is then ignored, as here).
fn llama_family_hf_checks(config: &Value) -> Result<()> {
    let bad = |m: String| Err(ModelError::Metadata(format!("config.json: {m}")));
    if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return bad(format!(
                "hidden_act `{act}` is not supported (supported: silu)"
            ));
        }
    }
    let sliding_layers = config
        .get("layer_types")
        .and_then(Value::as_array)
        .is_some_and(|t| t.iter().any(|t| t.as_str() != Some("full_attention")));
    if config.get("use_sliding_window").and_then(Value::as_bool) == Some(true) || sliding_layers {
        return bad("sliding-window attention (`use_sliding_window`) is not supported".into());
    }
    Ok(())
}

/// `config` with the defaults of the architecture's transformers config class filled in where
/// a key is absent (`save_pretrained` leaves out values equal to the defaults).
fn with_hf_defaults(arch: Arch, config: &Value) -> Value {
    let defaults = match arch {
        Arch::Llama => serde_json::json!({}),
        // transformers' `Qwen2Config`.
        Arch::Qwen2 => serde_json::json!({
            "vocab_size": 151_936, "hidden_size": 4096, "intermediate_size": 22_016,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
        }),
        // transformers' `Qwen3Config`: `head_dim` is 128 whatever `hidden / heads` is.
        Arch::Qwen3 => serde_json::json!({
            "vocab_size": 151_936, "hidden_size": 4096, "intermediate_size": 22_016,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "head_dim": 128, "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6,
            "rope_theta": 10_000.0,
        }),
        // transformers' `Qwen3MoeConfig` (expert counts are read with their defaults, since
        // transformers 5 renames `num_experts`); `head_dim` defaults to `hidden / heads`.
        Arch::Qwen3Moe => serde_json::json!({
            "vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 6144,
            "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4,
            "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
        }),
        // transformers' `DeepseekV3Config` (MLA and MoE sizes are read with their defaults).
        Arch::DeepseekV3 => serde_json::json!({
            "vocab_size": 129_280, "hidden_size": 7168, "intermediate_size": 18_432,
            "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
        }),
        // transformers' `Gemma3TextConfig`.
        Arch::Gemma3 => serde_json::json!({
            "vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "query_pre_attn_scalar": 256, "sliding_window": 4096,
        }),
    };
    let mut out = config.clone();
    if let (Some(obj), Some(defaults)) = (out.as_object_mut(), defaults.as_object()) {
        for (k, v) in defaults {
            if obj.get(k).is_none_or(Value::is_null) {
                obj.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MetaValue;

    fn llama_meta() -> Metadata {
        let mut m = Metadata::default();
        let mut put = |k: &str, v: MetaValue| {
            m.entries.insert(k.to_string(), v);
        };
        put("general.architecture", MetaValue::String("llama".into()));
        put("llama.embedding_length", MetaValue::U32(64));
        put("llama.attention.head_count", MetaValue::U32(4));
        put("llama.attention.head_count_kv", MetaValue::U32(2));
        put("llama.block_count", MetaValue::U32(2));
        put("llama.feed_forward_length", MetaValue::U32(128));
        put("llama.context_length", MetaValue::U32(256));
        put("llama.rope.freq_base", MetaValue::F32(100000.0));
        m
    }

    #[test]
    fn gguf_defaults_and_checks() {
        let cfg = ModelConfig::from_gguf(&llama_meta(), 100).unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.vocab_size, 100);
        assert_eq!(cfg.rope.dim, 16);
        assert_eq!(cfg.rope.style, RopeStyle::Interleaved);
        let mut m = llama_meta();
        m.entries
            .insert("llama.attention.head_count_kv".into(), MetaValue::U32(3));
        assert!(ModelConfig::from_gguf(&m, 100)
            .unwrap_err()
            .to_string()
            .contains("grouped"));
        m.entries.insert(
            "general.architecture".into(),
            MetaValue::String("mamba".into()),
        );
        let err = ModelConfig::from_gguf(&m, 100).unwrap_err().to_string();
        assert!(err.contains("mamba") && err.contains("llama"), "{err}");
    }

    /// llama.cpp's `llama_model_rope_type`: "normal" (adjacent pairs) for llama, whose Q/K rows
    /// its converter permutes, "neox" (halves) for qwen2 and qwen3, whose rows it does not.
    #[test]
    fn gguf_rope_style_per_arch() {
        for (arch, style) in [
            ("llama", RopeStyle::Interleaved),
            ("qwen2", RopeStyle::Halves),
            ("qwen3", RopeStyle::Halves),
        ] {
            let mut m = Metadata::default();
            for (k, v) in llama_meta().entries {
                let k = k.replacen("llama.", &format!("{arch}."), 1);
                let v = match v {
                    MetaValue::String(s) if s == "llama" => MetaValue::String(arch.into()),
                    v => v,
                };
                m.entries.insert(k, v);
            }
            let cfg = ModelConfig::from_gguf(&m, 100).unwrap();
            assert_eq!(cfg.arch.gguf_name(), arch);
            assert_eq!(cfg.rope.style, style, "{arch}");
            assert_eq!(cfg.rope.theta, 1e5, "{arch}");
            // Qwen3's head dim is not `hidden / heads`: `attention.key_length` says it.
            m.entries
                .insert(format!("{arch}.attention.key_length"), MetaValue::U32(24));
            let cfg = ModelConfig::from_gguf(&m, 100).unwrap();
            assert_eq!((cfg.head_dim, cfg.v_head_dim, cfg.rope.dim), (24, 24, 24));
        }
    }

    #[test]
    fn qwen_hf_defaults_and_sliding_window() {
        let qwen2 = serde_json::json!({
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "rope_theta": 1e6, "hidden_act": "silu",
            "use_sliding_window": false, "sliding_window": 4, "max_window_layers": 1
        });
        let cfg = ModelConfig::from_hf(&qwen2).unwrap();
        assert_eq!(cfg.arch, Arch::Qwen2);
        assert_eq!((cfg.head_dim, cfg.rope.theta), (16, 1e6));
        assert_eq!(cfg.rope.style, RopeStyle::Halves);
        assert!(
            cfg.sliding_window.is_none(),
            "`sliding_window` is ignored when off"
        );
        assert_eq!(cfg.context_len, 32_768);
        let mut windowed = qwen2.clone();
        windowed["use_sliding_window"] = true.into();
        let err = ModelConfig::from_hf(&windowed).unwrap_err().to_string();
        assert!(
            err.contains("use_sliding_window") && err.contains("not supported"),
            "{err}"
        );
        let mut gelu = qwen2;
        gelu["hidden_act"] = "gelu".into();
        let err = ModelConfig::from_hf(&gelu).unwrap_err().to_string();
        assert!(err.contains("hidden_act `gelu`"), "{err}");
        // `Qwen3Config`'s head dim defaults to 128, not `hidden / heads`.
        let qwen3 = serde_json::json!({
            "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 8,
            "vocab_size": 256
        });
        let cfg = ModelConfig::from_hf(&qwen3).unwrap();
        assert_eq!(cfg.arch, Arch::Qwen3);
        assert_eq!((cfg.head_dim, cfg.rope.dim), (128, 128));
        assert_eq!(cfg.attn_scale, 1.0 / 128f32.sqrt());
        assert_eq!((cfg.rope.theta, cfg.rms_eps), (1e4, 1e-6));
    }

    #[test]
    fn gemma3_gguf_windows_ropes_and_scales() {
        let mut m = Metadata::default();
        let mut put = |k: &str, v: MetaValue| {
            m.entries.insert(k.to_string(), v);
        };
        put("general.architecture", MetaValue::String("gemma3".into()));
        put("gemma3.embedding_length", MetaValue::U32(640));
        put("gemma3.attention.head_count", MetaValue::U32(4));
        put("gemma3.attention.head_count_kv", MetaValue::U32(1));
        put("gemma3.attention.key_length", MetaValue::U32(256));
        put("gemma3.block_count", MetaValue::U32(18));
        put("gemma3.feed_forward_length", MetaValue::U32(2048));
        put("gemma3.context_length", MetaValue::U32(32768));
        put("gemma3.rope.freq_base", MetaValue::F32(1e6));
        put("gemma3.attention.sliding_window", MetaValue::U32(512));
        put(
            "gemma3.rope.scaling.type",
            MetaValue::String("linear".into()),
        );
        put("gemma3.rope.scaling.factor", MetaValue::F32(8.0));
        let cfg = ModelConfig::from_gguf(&m, 1000).unwrap();
        let sw = cfg.sliding_window.as_ref().unwrap();
        assert_eq!(sw.size, 512);
        let global: Vec<usize> = (0..18).filter(|&i| !sw.layers[i]).collect();
        assert_eq!(global, [5, 11, 17]);
        assert_eq!(cfg.rope.style, RopeStyle::Halves);
        assert_eq!(cfg.rope.theta, 1e6);
        assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(sw.rope.theta, 1e4);
        assert_eq!(sw.rope.scaling, RopeScaling::None);
        assert_eq!(cfg.norm_offset, 0.0);
        assert_eq!(cfg.attn_scale, 1.0 / 16.0);
        assert_eq!(cfg.embed_scale, 640f32.sqrt());
        assert_eq!(cfg.final_softcap, None);
        m.entries.remove("gemma3.attention.sliding_window");
        let err = ModelConfig::from_gguf(&m, 1000).unwrap_err().to_string();
        assert!(err.contains("gemma3.attention.sliding_window"), "{err}");
    }

    #[test]
    fn gemma3_hf_defaults_layer_types_and_wrapper() {
        // As `save_pretrained` writes it: values equal to `Gemma3TextConfig`'s defaults left out.
        let text = serde_json::json!({
            "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 16, "vocab_size": 100, "query_pre_attn_scalar": 64,
            "sliding_window": 8, "rope_scaling": {"rope_type": "linear", "factor": 8.0}
        });
        let cfg = ModelConfig::from_hf(&text).unwrap();
        let sw = cfg.sliding_window.as_ref().unwrap();
        assert_eq!(sw.layers, [true, true, true, true, true, false, true]);
        assert_eq!(cfg.rope.theta, 1e6);
        assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!((sw.rope.theta, &sw.rope.scaling), (1e4, &RopeScaling::None));
        assert_eq!(cfg.norm_offset, 1.0);
        assert_eq!(cfg.attn_scale, 0.125);
        assert_eq!(cfg.rms_eps, 1e-6);
        // transformers 5: `layer_types` and per-type `rope_parameters`.
        let mut v5 = text.clone();
        v5["layer_types"] = serde_json::json!([
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention"
        ]);
        v5["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "default", "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}
        });
        v5.as_object_mut().unwrap().remove("rope_scaling");
        let cfg = ModelConfig::from_hf(&v5).unwrap();
        let sw = cfg.sliding_window.as_ref().unwrap();
        assert_eq!(sw.layers, [false, true, true, false, true, true, false]);
        assert_eq!((cfg.rope.theta, sw.rope.theta), (5e5, 2e4));
        assert_eq!(cfg.rope.scaling, RopeScaling::None);
        // The multimodal wrapper is read from its `text_config`.
        let wrapper = serde_json::json!({"model_type": "gemma3", "text_config": text});
        assert_eq!(ModelConfig::from_hf(&wrapper).unwrap().n_layers, 7);
        let err = ModelConfig::from_hf(&serde_json::json!({"model_type": "gemma3"})).unwrap_err();
        assert!(err.to_string().contains("text_config"), "{err}");
        let mut bad = v5;
        bad["layer_types"] = serde_json::json!(["full_attention"]);
        let err = ModelConfig::from_hf(&bad).unwrap_err();
        assert!(err.to_string().contains("layer_types"), "{err}");
    }

    #[test]
    fn hf_config_both_rope_styles() {
        let old: Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
            "vocab_size": 100, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}
        });
        let cfg = ModelConfig::from_hf(&old).unwrap();
        assert_eq!(cfg.rope.theta, 5e5);
        assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(cfg.rope.style, RopeStyle::Halves);
        let new: Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
            "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}
        });
        let cfg = ModelConfig::from_hf(&new).unwrap();
        assert_eq!(cfg.rope.theta, 1e4);
        assert_eq!(cfg.n_kv_heads, 4);
        let err = ModelConfig::from_hf(&serde_json::json!({"model_type": "rwkv"})).unwrap_err();
        assert!(err.to_string().contains("supported: llama"), "{err}");
    }

    fn fixture_config(arch: &str, file: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf")
            .join(arch)
            .join(file);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-9 * y.abs())
    }

    /// The DeepSeek-V3 fixture in both layouts: MLA sizes, interleaved YaRN rope (ramp
    /// weights 1, 2/3, 1/3, 0 over the 4 pairs), the mscale²-corrected softmax scale, routing.
    #[test]
    fn deepseek_v3_hf_mla_yarn_and_routing() {
        for file in ["config.json", "config.transformers5.json"] {
            let cfg = ModelConfig::from_hf(&fixture_config("deepseek_v3", file)).unwrap();
            assert_eq!(cfg.arch, Arch::DeepseekV3);
            assert_eq!(
                (cfg.head_dim, cfg.v_head_dim, cfg.rope.dim),
                (24, 16, 8),
                "{file}"
            );
            assert_eq!(cfg.rope.style, RopeStyle::Interleaved);
            let mla = cfg.mla.as_ref().unwrap();
            assert_eq!(
                (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_dim),
                (Some(32), 16, 16)
            );
            assert!(
                close(&cfg.rope.inv_freq(), &[1.0, 0.075, 0.005, 0.00025]),
                "{file}: {:?}",
                cfg.rope.inv_freq()
            );
            assert_eq!(cfg.rope.attn_factor(), 1.0, "mscale == mscale_all_dim");
            let m = 1.0 + 0.1 * 4f64.ln();
            assert!((f64::from(cfg.attn_scale) - m * m / 24f64.sqrt()).abs() < 1e-6);
            let moe = cfg.moe.as_ref().unwrap();
            assert_eq!(moe.gating, Gating::Sigmoid);
            assert_eq!(
                (
                    moe.n_experts,
                    moe.n_used,
                    moe.n_groups,
                    moe.groups_used,
                    moe.n_shared
                ),
                (8, 2, 4, 2, 1)
            );
            assert_eq!((moe.scale, moe.norm_weights), (2.5, true));
            assert_eq!(moe.layers, [false, true, true]);
        }
        let v = fixture_config("deepseek_v3_noqlora", "config.json");
        let cfg = ModelConfig::from_hf(&v).unwrap();
        assert_eq!(cfg.mla.as_ref().unwrap().q_lora_rank, None);
        let (a, b) = (1.0 + 0.08 * 4f64.ln(), 1.0 + 0.12 * 4f64.ln());
        assert!((cfg.rope.attn_factor() - a / b).abs() < 1e-12);
        assert!((f64::from(cfg.attn_scale) - b * b / 24f64.sqrt()).abs() < 1e-6);
        let mut halves = v.clone();
        halves["rope_interleave"] = false.into();
        assert_eq!(
            ModelConfig::from_hf(&halves).unwrap().rope.style,
            RopeStyle::Halves
        );
        let mut softmax = v;
        softmax["scoring_func"] = "softmax".into();
        let err = ModelConfig::from_hf(&softmax).unwrap_err().to_string();
        assert!(err.contains("`scoring_func` `softmax`"), "{err}");
    }

    /// The DeepSeek-V3 fixture's config as llama.cpp's converter writes it.
    fn deepseek2_meta() -> Metadata {
        let mut m = Metadata::default();
        let mut put = |k: &str, v: MetaValue| {
            m.entries.insert(format!("deepseek2.{k}"), v);
        };
        for (k, v) in [
            ("block_count", 3),
            ("context_length", 4096),
            ("embedding_length", 64),
            ("feed_forward_length", 128),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 1),
            ("attention.q_lora_rank", 32),
            ("attention.kv_lora_rank", 16),
            ("attention.key_length", 24),
            ("attention.value_length", 16),
            ("attention.key_length_mla", 24),
            ("attention.value_length_mla", 16),
            ("rope.dimension_count", 8),
            ("rope.scaling.original_context_length", 1024),
            ("leading_dense_block_count", 1),
            ("expert_count", 8),
            ("expert_used_count", 2),
            ("expert_feed_forward_length", 32),
            ("expert_shared_count", 1),
            ("expert_group_count", 4),
            ("expert_group_used_count", 2),
            ("expert_gating_func", 2),
        ] {
            put(k, MetaValue::U32(v));
        }
        put("rope.freq_base", MetaValue::F32(10000.0));
        put("rope.scaling.type", MetaValue::String("yarn".into()));
        put("rope.scaling.factor", MetaValue::F32(4.0));
        put("rope.scaling.yarn_log_multiplier", MetaValue::F32(0.1));
        put("expert_weights_scale", MetaValue::F32(2.5));
        put("expert_weights_norm", MetaValue::Bool(true));
        m.entries.insert(
            "general.architecture".into(),
            MetaValue::String("deepseek2".into()),
        );
        m
    }

    /// llama.cpp's converter's keys for the same model give the same config.
    #[test]
    fn deepseek2_gguf_matches_hf() {
        let m = deepseek2_meta();
        let gguf = ModelConfig::from_gguf(&m, 256).unwrap();
        let hf = ModelConfig::from_hf(&fixture_config("deepseek_v3", "config.json")).unwrap();
        assert_eq!(gguf.mla, hf.mla);
        assert_eq!(gguf.moe, hf.moe);
        assert_eq!((gguf.head_dim, gguf.v_head_dim), (24, 16));
        assert_eq!(gguf.rope.style, hf.rope.style);
        assert!(close(&gguf.rope.inv_freq(), &hf.rope.inv_freq()));
        assert_eq!(gguf.rope.attn_factor(), 1.0);
        assert!((gguf.attn_scale - hf.attn_scale).abs() < 1e-6);
    }

    /// Sparse layers: `(i + 1) % decoder_sparse_step == 0` and not in `mlp_only_layers`;
    /// transformers 5 names the expert count `num_local_experts`.
    #[test]
    fn qwen3_moe_hf_sparse_layers() {
        for file in ["config.json", "config.transformers5.json"] {
            let cfg = ModelConfig::from_hf(&fixture_config("qwen3_moe", file)).unwrap();
            assert_eq!((cfg.head_dim, cfg.rope.style), (24, RopeStyle::Halves));
            let moe = cfg.moe.as_ref().unwrap();
            assert_eq!(
                moe.layers,
                [false, true, false, true, false, false],
                "{file}"
            );
            assert_eq!((moe.n_experts, moe.n_used, moe.expert_ffn_dim), (8, 2, 32));
            assert_eq!(
                (moe.gating, moe.norm_weights, moe.n_groups),
                (Gating::Softmax, true, 1)
            );
        }
        let mut none = fixture_config("qwen3_moe", "config.json");
        none["num_experts"] = 0.into();
        assert!(ModelConfig::from_hf(&none).unwrap().moe.is_none());
        let err = ModelConfig::from_hf(&serde_json::json!({"model_type": "mixtral"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mixtral") && err.contains("qwen3_moe") && err.contains("deepseek_v3"),
            "{err}"
        );
    }

    /// GGUF's per-pair factors (`rope_freqs.weight`) reproduce HF's llama3 formula.
    #[test]
    fn llama3_rope_scaling_and_factors_agree() {
        let llama3 = RopeConfig {
            theta: 500_000.0,
            dim: 128,
            style: RopeStyle::Interleaved,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_pos: 8192.0,
            },
        };
        let plain = RopeConfig {
            scaling: RopeScaling::None,
            ..llama3.clone()
        };
        let (scaled, base) = (llama3.inv_freq(), plain.inv_freq());
        assert_eq!(scaled[0], base[0], "short wavelengths are kept");
        assert!(
            (scaled[63] - base[63] / 8.0).abs() < 1e-18,
            "long wavelengths are stretched"
        );
        assert!(
            scaled.iter().zip(&base).any(|(s, b)| s < b && *s > b / 8.0),
            "some are interpolated"
        );
        let factors = RopeConfig {
            scaling: RopeScaling::Factors(base.iter().zip(&scaled).map(|(b, s)| b / s).collect()),
            ..llama3.clone()
        };
        for (a, b) in factors.inv_freq().iter().zip(&scaled) {
            assert!((a - b).abs() <= 1e-12 * b);
        }
    }

    /// `llama_meta` under another architecture's name, with `extra` keys (unprefixed) set.
    fn meta_for(arch: &str, extra: &[(&str, MetaValue)]) -> Metadata {
        let mut m = Metadata::default();
        for (k, v) in llama_meta().entries {
            let k = k.replacen("llama.", &format!("{arch}."), 1);
            let v = match v {
                MetaValue::String(s) if s == "llama" => MetaValue::String(arch.into()),
                v => v,
            };
            m.entries.insert(k, v);
        }
        for (k, v) in extra {
            m.entries.insert(format!("{arch}.{k}"), v.clone());
        }
        m
    }

    /// The error of `m` with `key` set to `v`, which must name `key` (and every `also`).
    fn gguf_err_names(m: &Metadata, key: &str, v: MetaValue, also: &[&str]) {
        let mut m = m.clone();
        m.entries.insert(key.into(), v.clone());
        let err = match ModelConfig::from_gguf(&m, 100) {
            Ok(_) => panic!("`{key}` = {v:?} loads"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&format!("`{key}`")), "`{key}` = {v:?}: {err}");
        for a in also {
            assert!(err.contains(a), "`{key}` = {v:?}: `{a}` not in {err}");
        }
    }

    /// A zero rope dimension used to pass and then panic in the forward pass; every GGUF value
    /// out of range is a load error naming its key.
    #[test]
    fn gguf_values_out_of_range_name_their_key() {
        use MetaValue::{String as S, F32, U32};
        let llama = llama_meta();
        for (k, v) in [
            ("llama.rope.dimension_count", U32(0)),
            ("llama.rope.dimension_count", U32(7)),
            ("llama.rope.dimension_count", U32(32)),
            ("llama.block_count", U32(0)),
            ("llama.embedding_length", U32(0)),
            ("llama.attention.head_count", U32(0)),
            ("llama.attention.head_count_kv", U32(0)),
            ("llama.attention.key_length", U32(0)),
            ("llama.attention.value_length", U32(0)),
            ("llama.feed_forward_length", U32(0)),
            ("llama.context_length", U32(0)),
            ("llama.context_length", U32(1 << 30)),
            ("llama.vocab_size", U32(0)),
            ("llama.attention.layer_norm_rms_epsilon", F32(0.0)),
            ("llama.attention.layer_norm_rms_epsilon", F32(-1e-5)),
            ("llama.attention.layer_norm_rms_epsilon", F32(f32::NAN)),
            ("llama.attention.layer_norm_rms_epsilon", F32(2.0)),
            ("llama.rope.freq_base", F32(0.5)),
            ("llama.rope.freq_base", F32(f32::INFINITY)),
            ("llama.rope.freq_base", F32(f32::NAN)),
        ] {
            gguf_err_names(&llama, k, v, &[]);
        }
        gguf_err_names(
            &llama,
            "llama.attention.head_count_kv",
            U32(3),
            &["grouped", "`llama.attention.head_count`"],
        );
        let mut linear = llama.clone();
        linear
            .entries
            .insert("llama.rope.scaling.type".into(), S("linear".into()));
        gguf_err_names(&linear, "llama.rope.scaling.factor", F32(0.0), &[]);
        gguf_err_names(&linear, "llama.rope.scaling.factor", F32(f32::NAN), &[]);
        let mut yarn = llama.clone();
        yarn.entries
            .insert("llama.rope.scaling.type".into(), S("yarn".into()));
        for k in [
            "factor",
            "original_context_length",
            "yarn_beta_fast",
            "yarn_beta_slow",
            "attn_factor",
        ] {
            let v = if k == "original_context_length" {
                U32(0)
            } else {
                F32(-1.0)
            };
            gguf_err_names(&yarn, &format!("llama.rope.scaling.{k}"), v, &[]);
        }
        // `{arch}.vocab_size` and the token list disagree.
        let mut tokens = llama.clone();
        tokens.entries.insert(
            TOKENS_KEY.into(),
            MetaValue::Array(vec![S("a".into()), S("b".into())]),
        );
        gguf_err_names(
            &tokens,
            "llama.vocab_size",
            U32(3),
            &["`tokenizer.ggml.tokens`"],
        );
        assert_eq!(ModelConfig::from_gguf(&tokens, 100).unwrap().vocab_size, 2);

        let gemma = meta_for("gemma3", &[("attention.sliding_window", U32(4))]);
        for (k, v) in [
            ("gemma3.attention.sliding_window", U32(0)),
            ("gemma3.final_logit_softcapping", F32(0.0)),
            ("gemma3.final_logit_softcapping", F32(f32::INFINITY)),
        ] {
            gguf_err_names(&gemma, k, v, &[]);
        }

        let qwen3moe = meta_for(
            "qwen3moe",
            &[
                ("expert_count", U32(8)),
                ("expert_used_count", U32(2)),
                ("expert_feed_forward_length", U32(32)),
            ],
        );
        for (k, v) in [
            ("qwen3moe.expert_count", U32(0)),
            ("qwen3moe.expert_used_count", U32(0)),
            ("qwen3moe.expert_used_count", U32(9)),
            ("qwen3moe.expert_feed_forward_length", U32(0)),
        ] {
            gguf_err_names(&qwen3moe, k, v, &[]);
        }

        let ds = deepseek2_meta();
        for (k, v) in [
            ("deepseek2.attention.kv_lora_rank", U32(0)),
            ("deepseek2.attention.q_lora_rank", U32(0)),
            ("deepseek2.attention.key_length_mla", U32(8)),
            ("deepseek2.rope.dimension_count", U32(0)),
            ("deepseek2.expert_group_count", U32(3)),
            ("deepseek2.expert_group_used_count", U32(5)),
            ("deepseek2.expert_weights_scale", F32(0.0)),
            ("deepseek2.expert_shared_count", U32(1 << 20)),
            ("deepseek2.leading_dense_block_count", U32(4)),
        ] {
            gguf_err_names(&ds, k, v, &[]);
        }
    }

    /// GGUF's `rope_freqs.weight`: one finite factor > 0 per rope pair.
    #[test]
    fn rope_factors_are_checked() {
        let cfg = ModelConfig::from_gguf(&llama_meta(), 100).unwrap();
        for bad in [vec![1.0; 7], vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]] {
            let err = cfg.clone().with_rope_factors(bad).unwrap_err().to_string();
            assert!(err.contains("`rope_freqs.weight`"), "{err}");
        }
        assert!(cfg.with_rope_factors(vec![2.0; 8]).is_ok());
    }

    /// The error of config.json `v` with `key` (a `/`-separated path) set to `value`, which
    /// must name the key's last part.
    fn hf_err_names(v: &Value, key: &str, value: Value) {
        let mut v = v.clone();
        let name = key.rsplit('/').next().unwrap_or(key);
        v.pointer_mut(&format!("/{key}"))
            .map(|slot| *slot = value.clone())
            .unwrap_or_else(|| v[key] = value.clone());
        let err = match ModelConfig::from_hf(&v) {
            Ok(_) => panic!("`{key}` = {value} loads"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(name), "`{key}` = {value}: {err}");
    }

    /// Every config.json value out of range, or of the wrong type, is a load error naming its
    /// key (a mistyped value used to fall back on the default silently).
    #[test]
    fn hf_values_out_of_range_name_their_key() {
        use serde_json::json;
        let llama = fixture_config("llama", "config.json");
        for (k, v) in [
            ("num_hidden_layers", json!(0)),
            ("hidden_size", json!(0)),
            ("num_attention_heads", json!(0)),
            ("num_key_value_heads", json!(0)),
            ("num_key_value_heads", json!(3)),
            ("head_dim", json!(0)),
            ("head_dim", json!(15)),
            ("intermediate_size", json!(0)),
            ("vocab_size", json!(0)),
            ("max_position_embeddings", json!(0)),
            ("rms_norm_eps", json!(0.0)),
            ("rms_norm_eps", json!(-1e-6)),
            ("rms_norm_eps", json!("1e-6")),
            ("rope_theta", json!(1.0)),
            ("rope_theta", json!("10000")),
            ("rope_scaling/factor", json!(0.0)),
            ("rope_scaling/factor", json!("8")),
            ("rope_scaling/low_freq_factor", json!(5.0)),
            ("rope_scaling/original_max_position_embeddings", json!(-1)),
        ] {
            hf_err_names(&llama, k, v);
        }
        let gemma = fixture_config("gemma3_text", "config.json");
        for (k, v) in [
            ("sliding_window", json!(0)),
            ("sliding_window", json!(-4)),
            ("query_pre_attn_scalar", json!(0)),
            ("final_logit_softcapping", json!(-1.0)),
            ("rope_local_base_freq", json!(0.5)),
        ] {
            hf_err_names(&gemma, k, v);
        }
        let mut no_types = gemma;
        no_types.as_object_mut().unwrap().remove("layer_types");
        hf_err_names(&no_types, "sliding_window_pattern", json!(0));
        let qwen3moe = fixture_config("qwen3_moe", "config.json");
        for (k, v) in [
            ("num_experts_per_tok", json!(0)),
            ("num_experts_per_tok", json!(9)),
            ("moe_intermediate_size", json!(0)),
            ("decoder_sparse_step", json!(0)),
            ("mlp_only_layers", json!([6])),
            ("norm_topk_prob", json!("yes")),
        ] {
            hf_err_names(&qwen3moe, k, v);
        }
        let ds = fixture_config("deepseek_v3", "config.json");
        for (k, v) in [
            ("kv_lora_rank", json!(0)),
            ("q_lora_rank", json!(0)),
            ("qk_nope_head_dim", json!(0)),
            ("qk_rope_head_dim", json!(0)),
            ("qk_rope_head_dim", json!(7)),
            ("v_head_dim", json!(0)),
            ("n_routed_experts", json!(0)),
            ("n_group", json!(3)),
            ("topk_group", json!(5)),
            ("routed_scaling_factor", json!(0.0)),
            ("first_k_dense_replace", json!(4)),
            ("rope_scaling/beta_fast", json!(-1)),
            ("rope_scaling/mscale_all_dim", json!("1")),
        ] {
            hf_err_names(&ds, k, v);
        }
    }
}

//! One checked model configuration, resolved from GGUF metadata or from an HF `config.json`.
//!
//! Model code reads only [`ModelConfig`]; every field is validated here (non-zero sizes, heads
//! divisible into KV groups, rope dims within the head), so the forward pass can index freely.

use serde_json::Value;
use supernode_kernels::ops::RopeStyle;

use crate::{Metadata, ModelError, Result};

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
    /// From GGUF metadata (`{arch}.block_count`, ...). `vocab_from_tensors` is the row count of
    /// the embedding, used when the file has no `{arch}.vocab_size`.
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
            vocab_size: meta
                .get_usize(&key("vocab_size"))?
                .unwrap_or(vocab_from_tensors),
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
        match arch {
            Arch::Gemma3 => cfg.gemma3_from_gguf(meta)?,
            Arch::Qwen3Moe => cfg.qwen3moe_from_gguf(meta)?,
            Arch::DeepseekV3 => cfg.deepseek2_from_gguf(meta)?,
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => {}
        }
        cfg.validate()?;
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
        self.validate()?;
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
        let num = |k: &str| config.get(k).and_then(Value::as_f64);
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
            rms_eps: num("rms_norm_eps").unwrap_or(1e-6) as f32,
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
        cfg.validate()?;
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
        let step = hf_int(config, "decoder_sparse_step")?.unwrap_or(1).max(1);
        let dense: Vec<usize> = match config.get("mlp_only_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                ModelError::Metadata(format!(
                    "config.json: `mlp_only_layers` should be a list of layer indices, got {v}"
                ))
            })?,
        };
        self.moe = Some(MoeConfig {
            n_experts,
            n_used: hf_int(config, "num_experts_per_tok")?.unwrap_or(8),
            expert_ffn_dim: hf_int(config, "moe_intermediate_size")?.unwrap_or(768),
            n_shared: 0,
            gating: Gating::Softmax,
            norm_weights: config
                .get("norm_topk_prob")
                .and_then(Value::as_bool)
                .unwrap_or(false),
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
        if config.get("rope_interleave").and_then(Value::as_bool) == Some(false) {
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
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            if all_dim != 0.0 {
                let m = yarn_mscale(factor, all_dim);
                self.attn_scale *= (m * m) as f32;
            }
        }
        let dense = int("first_k_dense_replace")?.unwrap_or(3);
        self.moe = Some(MoeConfig {
            n_experts: int("n_routed_experts")?
                .or(int("num_local_experts")?)
                .unwrap_or(256),
            n_used: int("num_experts_per_tok")?.unwrap_or(8),
            expert_ffn_dim: int("moe_intermediate_size")?.unwrap_or(2048),
            n_shared: int("n_shared_experts")?.unwrap_or(1),
            gating: Gating::Sigmoid,
            norm_weights: config
                .get("norm_topk_prob")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            scale: config
                .get("routed_scaling_factor")
                .and_then(Value::as_f64)
                .unwrap_or(2.5) as f32,
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
        let num = |k: &str| config.get(k).and_then(Value::as_f64);
        if let Some(act) = config.get("hidden_activation").and_then(Value::as_str) {
            if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh") {
                return Err(bad(format!(
                    "hidden_activation `{act}` is not supported (supported: gelu_pytorch_tanh)"
                )));
            }
        }
        if num("attn_logit_softcapping").is_some() {
            return Err(bad("attention soft-capping is not supported".into()));
        }
        let size = config
            .get("sliding_window")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("missing `sliding_window`".into()))? as usize;
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
                let pattern = config
                    .get("sliding_window_pattern")
                    .and_then(Value::as_u64)
                    .unwrap_or(6)
                    .max(1) as usize;
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
                num("rope_local_base_freq").unwrap_or(10_000.0),
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
            num("query_pre_attn_scalar").map_or(self.attn_scale, |s| (1.0 / s.sqrt()) as f32);
        self.final_softcap = num("final_logit_softcapping").map(|c| c as f32);
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        self.validate_sizes()?;
        let bad = |m: String| Err(ModelError::Metadata(m));
        for (name, v) in [
            ("embedding scale", self.embed_scale),
            ("attention scale", self.attn_scale),
            ("final soft-cap", self.final_softcap.unwrap_or(1.0)),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} {v} must be a finite number > 0"));
            }
        }
        if !self.norm_offset.is_finite() {
            return bad(format!("norm offset {} is invalid", self.norm_offset));
        }
        if let Some(sw) = &self.sliding_window {
            if sw.size == 0 {
                return bad("sliding window is 0".into());
            }
            if sw.layers.len() != self.n_layers {
                return bad(format!(
                    "sliding-window pattern covers {} layers of {}",
                    sw.layers.len(),
                    self.n_layers
                ));
            }
            Self::validate_rope(&sw.rope, self.head_dim)?;
        }
        if let Some(moe) = &self.moe {
            self.validate_moe(moe)?;
        }
        if let Some(mla) = &self.mla {
            let q_rank = mla.q_lora_rank.unwrap_or(1);
            if mla.kv_lora_rank == 0
                || q_rank == 0
                || mla.kv_lora_rank > 1 << 24
                || q_rank > 1 << 24
            {
                return bad(format!(
                    "MLA ranks must be > 0 (kv_lora_rank {}, q_lora_rank {q_rank})",
                    mla.kv_lora_rank
                ));
            }
            if mla.qk_rope_dim != self.rope.dim
                || mla.qk_nope_dim + mla.qk_rope_dim != self.head_dim
            {
                return bad(format!(
                    "MLA head dim {} is not the no-rope dim {} plus the rope dim {} (rope over {})",
                    self.head_dim, mla.qk_nope_dim, mla.qk_rope_dim, self.rope.dim
                ));
            }
        }
        Self::validate_rope(&self.rope, self.head_dim)
    }

    fn validate_moe(&self, moe: &MoeConfig) -> Result<()> {
        let bad = |m: String| Err(ModelError::Metadata(m));
        for (name, v) in [
            ("expert count", moe.n_experts),
            ("experts used per token", moe.n_used),
            ("expert feed-forward size", moe.expert_ffn_dim),
            ("expert group count", moe.n_groups),
            ("expert groups used", moe.groups_used),
        ] {
            if v == 0 || v > 1 << 24 {
                return bad(format!("{name} is {v}"));
            }
        }
        if moe.n_shared > 1 << 12 {
            return bad(format!("{} shared experts is absurd", moe.n_shared));
        }
        if !moe.n_experts.is_multiple_of(moe.n_groups) || moe.groups_used > moe.n_groups {
            return bad(format!(
                "{} experts in {} groups, {} of them used: groups must divide the experts and \
                 be at least as many as are used",
                moe.n_experts, moe.n_groups, moe.groups_used
            ));
        }
        let reachable = moe.groups_used * (moe.n_experts / moe.n_groups);
        if moe.n_used > reachable {
            return bad(format!(
                "{} experts used per token, but only {reachable} are in the {} groups used",
                moe.n_used, moe.groups_used
            ));
        }
        if !(moe.scale.is_finite() && moe.scale > 0.0) {
            return bad(format!(
                "expert weight scale {} must be a finite number > 0",
                moe.scale
            ));
        }
        if moe.layers.len() != self.n_layers {
            return bad(format!(
                "the sparse-layer pattern covers {} layers of {}",
                moe.layers.len(),
                self.n_layers
            ));
        }
        Ok(())
    }

    fn validate_rope(rope: &RopeConfig, head_dim: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::Metadata(m));
        if !rope.dim.is_multiple_of(2) || rope.dim > head_dim {
            return bad(format!(
                "rope dimension {} must be even and at most the head dim {head_dim}",
                rope.dim
            ));
        }
        if !(rope.theta.is_finite() && rope.theta > 1.0) {
            return bad(format!(
                "rope base {} must be a finite number > 1",
                rope.theta
            ));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        match &rope.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !positive(*factor) {
                    return bad(format!(
                        "rope scaling factor {factor} must be a finite number > 0"
                    ));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_pos,
            } => {
                if ![
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_pos,
                ]
                .into_iter()
                .all(positive)
                    || high_freq_factor <= low_freq_factor
                {
                    return bad(format!(
                        "llama3 rope scaling needs positive factor ({factor}), low_freq_factor \
                         ({low_freq_factor}) < high_freq_factor ({high_freq_factor}) and \
                         original_max_position_embeddings ({original_max_pos})"
                    ));
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_pos,
                beta_fast,
                beta_slow,
                attn_factor,
                ..
            } => {
                if ![
                    *factor,
                    *original_max_pos,
                    *beta_fast,
                    *beta_slow,
                    *attn_factor,
                ]
                .into_iter()
                .all(positive)
                {
                    return bad(format!(
                        "yarn rope scaling needs positive factor ({factor}), \
                         original_max_position_embeddings ({original_max_pos}), beta_fast \
                         ({beta_fast}), beta_slow ({beta_slow}) and attention factor ({attn_factor})"
                    ));
                }
            }
            RopeScaling::Factors(f) => {
                if f.len() != rope.dim / 2 || !f.iter().copied().all(positive) {
                    return bad(format!(
                        "rope frequency factors: {} values for {} pairs, all must be finite and > 0",
                        f.len(),
                        rope.dim / 2
                    ));
                }
            }
        }
        Ok(())
    }

    /// The config with the main rope's frequencies divided by `factors` (one per pair).
    pub fn with_rope_factors(mut self, factors: Vec<f64>) -> Result<ModelConfig> {
        if self.rope.scaling != RopeScaling::None {
            return Err(ModelError::Metadata(
                "rope frequency factors on top of another rope scaling".into(),
            ));
        }
        self.rope.scaling = RopeScaling::Factors(factors);
        Self::validate_rope(&self.rope, self.head_dim)?;
        Ok(self)
    }

    fn validate_sizes(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Metadata(m));
        for (name, v) in [
            ("layer count", self.n_layers),
            ("hidden size", self.hidden),
            ("head count", self.n_heads),
            ("KV head count", self.n_kv_heads),
            ("head dim", self.head_dim),
            ("value head dim", self.v_head_dim),
            ("feed-forward size", self.ffn_dim),
            ("vocabulary size", self.vocab_size),
            ("context length", self.context_len),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
            if v > 1 << 24 {
                return bad(format!("{name} is {v}, which is absurd"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads cannot be grouped over {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("norm epsilon {} is invalid", self.rms_eps));
        }
        Ok(())
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
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| config.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(default_theta);
    let rope_type = field("rope_type")
        .or_else(|| field("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: field("factor").and_then(Value::as_f64).unwrap_or(1.0),
        },
        "llama3" => {
            let num = |k: &str| {
                field(k).and_then(Value::as_f64).ok_or_else(|| {
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
            let num = |k: &str| field(k).and_then(Value::as_f64);
            let max_pos = config
                .get("max_position_embeddings")
                .and_then(Value::as_f64);
            let original_max_pos = num("original_max_position_embeddings")
                .or(max_pos)
                .ok_or_else(|| {
                    ModelError::Metadata(
                        "config.json: yarn rope scaling needs `original_max_position_embeddings`"
                            .into(),
                    )
                })?;
            // transformers: a missing factor is the context extension itself.
            let factor = match (num("factor"), max_pos) {
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
            let attn_factor = match (num("attention_factor"), num("mscale"), num("mscale_all_dim"))
            {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            let nonzero = |k: &str, default: f64| num(k).filter(|v| *v != 0.0).unwrap_or(default);
            RopeScaling::Yarn {
                factor,
                original_max_pos,
                beta_fast: nonzero("beta_fast", 32.0),
                beta_slow: nonzero("beta_slow", 1.0),
                attn_factor,
                truncate: field("truncate").and_then(Value::as_bool).unwrap_or(true),
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

    /// llama.cpp's converter's keys for the same model give the same config.
    #[test]
    fn deepseek2_gguf_matches_hf() {
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
}

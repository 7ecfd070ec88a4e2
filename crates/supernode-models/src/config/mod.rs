//! One checked model configuration, resolved from GGUF metadata or from an HF `config.json`.
//!
//! Model code reads only [`ModelConfig`]; every field is range-checked (in `validate.rs`: sizes
//! within `1..=2^24`, heads divisible into KV groups, rope dims even and within the head, finite
//! positive epsilons, bases, factors and caps, experts and groups that can be routed, MLA ranks),
//! so the forward pass can index freely. A bad value is a load error naming the GGUF or
//! config.json key it came from; a mistyped config.json value is one too, never a default.
//!
//! This module reads what every architecture shares (sizes, heads, norms, rope); each
//! architecture's file in [`crate::arch`] reads its own keys and defaults, through the entry
//! points its [`Family`](crate::arch::Family) registers.

mod hf;
mod rope;
#[cfg(test)]
pub(crate) mod tests;
mod validate;

pub(crate) use hf::{hf_as_num, hf_bool, hf_int, hf_num, hf_rope, hf_rope_field};
pub use rope::{yarn_mscale, RopeConfig, RopeScaling};
pub use validate::KeyNames;
pub(crate) use validate::Source;

use serde_json::Value;
use supernode_kernels::ops::RopeStyle;

use crate::arch::{self, Arch};
use crate::{MetaValue, Metadata, ModelError, Result};

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
    /// `sqrt(softplus(l))` of each logit (DeepSeek-V4's `sqrtsoftplus`).
    SqrtSoftplus,
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
    /// The shared expert's intermediate size where it is not `n_shared * expert_ffn_dim`
    /// (Qwen3.5-MoE, Qwen3-Next: `shared_expert_intermediate_size`, one shared expert).
    pub shared_ffn_dim: Option<usize>,
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
    /// DeepSeek Sparse Attention (V3.2): a lightning indexer picks the positions each query
    /// attends to; `None`: every position.
    pub indexer: Option<IndexerConfig>,
}

/// DeepSeek-V3.2's lightning indexer: `n_heads` query heads of `head_dim` from the query
/// LoRA's normed latent, one key of `head_dim` per token (`LayerNorm(wk x)`), both roped in
/// halves on their first `qk_rope_dim` dims; position `p` scores
/// `Σ_h w_h(x) relu(q_h · k_p / sqrt(head_dim)) / sqrt(n_heads)`, and each query attends to
/// its `top_k` best positions.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexerConfig {
    pub n_heads: usize,
    pub head_dim: usize,
    pub top_k: usize,
}

/// The attention of one DeepSeek-V4 layer: every kind attends to a sliding window of its own
/// recent tokens; the compressed kinds add entries that each summarise a window of `rate`
/// tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4Attention {
    /// The sliding window only (`sliding_attention`, compress ratio 0).
    Sliding,
    /// Compressed sparse attention (`compressed_sparse_attention`): overlapping windows of
    /// [`V4Config::csa_rate`], of which a lightning indexer picks `top_k` per query.
    Csa,
    /// Heavily compressed attention (`heavily_compressed_attention`): every entry of
    /// non-overlapping windows of [`V4Config::hca_rate`].
    Hca,
}

/// What DeepSeek-V4 adds to a decoder (transformers' `DeepseekV4Config`): per-layer attention
/// kinds over one shared key-value head (keys are values) with per-head sinks and a grouped
/// low-rank output; a second rope for the compressed kinds; hyper-connections (`hc_mult`
/// residual streams mixed through Sinkhorn-normalised matrices); hash-routed MoE layers; a
/// clamped SwiGLU. [`ModelConfig::rope`] is the "main" rope (sliding layers).
#[derive(Clone, Debug, PartialEq)]
pub struct V4Config {
    pub layers: Vec<V4Attention>,
    pub csa_rate: usize,
    pub hca_rate: usize,
    /// Positions a query attends to in its window, its own included.
    pub window: usize,
    pub q_lora_rank: usize,
    /// The rope of the compressed layers, their entries and their indexer.
    pub compress_rope: RopeConfig,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub hc_mult: usize,
    pub hc_iters: usize,
    pub hc_eps: f32,
    /// The CSA layers' lightning indexer (`top_k` entries per query).
    pub indexer: IndexerConfig,
    /// `hash_layers[i]`: layer `i` routes by a fixed token → experts table (`tid2eid`).
    pub hash_layers: Vec<bool>,
    /// Routed and shared experts clamp the gate to `<= limit` and the up projection to
    /// `[-limit, limit]` before the SwiGLU.
    pub swiglu_limit: f32,
}

/// Gated DeltaNet linear attention on some of the layers (Qwen3.5, Qwen3-Next); the other
/// layers are gated full attention.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearAttnConfig {
    pub n_k_heads: usize,
    pub n_v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    /// The causal convolution's kernel size.
    pub conv_taps: usize,
    /// Value head `h` reads key head `h % n_k_heads` (llama.cpp's `qwen35` files) instead of
    /// `h / (n_v_heads / n_k_heads)`.
    pub tiled_v_heads: bool,
    /// `layers[i]`: whether layer `i` is linear attention.
    pub layers: Vec<bool>,
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
    /// Linear attention on some layers (hybrid models: Qwen3.5, Qwen3-Next).
    pub linear: Option<LinearAttnConfig>,
    /// DeepSeek-V4's attention, residual streams and routing.
    pub v4: Option<V4Config>,
    /// Multi-token-prediction (NextN) layers the checkpoint has after its `n_layers` decoder
    /// layers (Qwen3.5's `mtp_num_hidden_layers`, DeepSeek's `num_nextn_predict_layers`,
    /// GGUF's `nextn_predict_layers`, which llama.cpp's converter counts in `block_count`).
    /// Next-token decoding never uses them; they are the drafters of speculative decoding.
    pub nextn_layers: usize,
    /// Load the first NextN layer with the model ([`crate::LoadOptions::mtp`]).
    pub load_nextn: bool,
}

impl ModelConfig {
    /// A config with the architecture's extras at their plain values (no embedding scale,
    /// `1/sqrt(head_dim)` attention scale, no sliding window, soft-cap, experts or latent
    /// attention). The readers fill the common fields over it, then the architecture's own
    /// reader sets its extras ([`ModelConfig::read_extras`]).
    fn plain(arch: Arch, head_dim: usize) -> ModelConfig {
        ModelConfig {
            arch,
            n_layers: 0,
            hidden: 0,
            n_heads: 0,
            n_kv_heads: 0,
            head_dim,
            v_head_dim: head_dim,
            ffn_dim: 0,
            vocab_size: 0,
            context_len: 0,
            rms_eps: 1e-6,
            norm_offset: 0.0,
            rope: RopeConfig {
                theta: 10_000.0,
                dim: head_dim,
                style: RopeStyle::Halves,
                scaling: RopeScaling::None,
            },
            embed_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
            final_softcap: None,
            moe: None,
            mla: None,
            linear: None,
            v4: None,
            nextn_layers: 0,
            load_nextn: false,
        }
    }

    /// Runs the family's reader of its extras over the common fields, then validates the whole.
    fn read_extras(
        mut self,
        source: Source,
        read: impl FnOnce(&mut ModelConfig) -> Result<()>,
    ) -> Result<ModelConfig> {
        // The per-layer tables of the extras are sized by it.
        self.validate_layer_count(source)?;
        read(&mut self)?;
        self.validate(source)?;
        Ok(self)
    }

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
                    // (DeepSeek's reader moves this correction into the softmax scale.)
                    attn_factor: attn_factor * yarn_mscale(factor, 1.0),
                    truncate: true,
                }
            }
            Some(other) => {
                return Err(ModelError::Metadata(format!(
                    "rope scaling type `{other}` is not supported (supported: none, linear, yarn)"
                )))
            }
        };
        // llama.cpp's converter appends the NextN layers to `block_count`; the decoder's layers
        // are the ones before them.
        let blocks = req("block_count")?;
        let nextn = meta.get_usize(&key("nextn_predict_layers"))?.unwrap_or(0);
        if nextn > 0 && nextn >= blocks {
            return Err(ModelError::Metadata(format!(
                "`{}` is {nextn}, which leaves none of the {blocks} layers of `{}` to the decoder",
                key("nextn_predict_layers"),
                key("block_count")
            )));
        }
        let cfg = ModelConfig {
            arch,
            n_layers: blocks - nextn,
            nextn_layers: nextn,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            v_head_dim,
            // A model whose every layer is sparse (Qwen3.5-MoE) has no dense feed-forward size;
            // the experts' size stands in for it (and is never used as a dense one).
            ffn_dim: match meta.get_usize(&key("feed_forward_length"))? {
                Some(d) => d,
                None => meta
                    .get_usize(&key("expert_feed_forward_length"))?
                    .ok_or_else(|| {
                        ModelError::Metadata(format!("missing `{}`", key("feed_forward_length")))
                    })?,
            },
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
                // llama.cpp's "neox" mode; an architecture whose GGUF rows pair adjacent
                // dims sets its own (`llama_model_rope_type`).
                style: RopeStyle::Halves,
                scaling,
            },
            ..ModelConfig::plain(arch, head_dim)
        };
        cfg.read_extras(Source::Gguf, |cfg| (arch.family().read_gguf)(cfg, meta))
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

    /// From an HF `config.json`, in either the older `rope_theta`/`rope_scaling` style or the
    /// newer `rope_parameters` style.
    ///
    /// A wrapper `model_type` (multimodal Gemma 3's `gemma3`) is read from its text model's
    /// config ([`arch::hf_wrapper`]).
    pub fn from_hf(config: &Value) -> Result<ModelConfig> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::Metadata("config.json has no `model_type`".into()))?;
        if let Some(text_config) = arch::hf_wrapper(model_type) {
            return Self::from_hf(&text_config(config)?);
        }
        let arch = Arch::from_hf_model_type(model_type)?;
        let config = &with_hf_defaults(config, &(arch.family().hf_defaults)(arch));
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
        let cfg = ModelConfig {
            arch,
            n_layers: req("num_hidden_layers")?,
            nextn_layers: match int("mtp_num_hidden_layers")? {
                Some(n) => n,
                None => int("num_nextn_predict_layers")?.unwrap_or(0),
            },
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
            ..ModelConfig::plain(arch, head_dim)
        };
        cfg.read_extras(Source::Hf, |cfg| (arch.family().read_hf)(cfg, config))
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

    /// The sliding window of layer `layer`, `None` where it attends to the whole context.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .as_ref()
            .filter(|s| s.layers[layer])
            .map(|s| s.size)
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

/// `config` with `defaults` (an architecture's transformers config class defaults) filled in
/// where a key is absent (`save_pretrained` leaves out values equal to the defaults).
fn with_hf_defaults(config: &Value, defaults: &Value) -> Value {
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

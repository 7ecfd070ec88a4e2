//! The range checks of a [`ModelConfig`]: every value a forward pass indexes with is checked
//! once here, and a bad one is an error naming the GGUF or config.json key it came from (an
//! architecture names its own keys where they differ from the shared ones: [`KeyNames`]).

use super::{ModelConfig, MoeConfig, RopeConfig, RopeScaling, MAX_SIZE, ROPE_FREQS, TOKENS_KEY};
use crate::{ModelError, Result};

/// The keys an architecture reads some values from where they differ from the shared ones,
/// for error messages: `(GGUF key under "{arch}.", config.json key)`.
pub struct KeyNames {
    /// The query/key head dim; `None`: `attention.key_length` / `head_dim`, with their defaults.
    pub head_dim: Option<(&'static str, &'static str)>,
    /// The value head dim.
    pub v_head_dim: (&'static str, &'static str),
    /// The rope dim; `None`: `rope.dimension_count` (default the head dim) / the head dim.
    pub rope_dim: Option<(&'static str, &'static str)>,
    /// What the attention scale comes from in each format besides the head dim: `(GGUF,
    /// config.json)`, `None` where only the head dim sets it.
    pub attn_scale: (Option<&'static str>, Option<&'static str>),
    /// config.json's routed expert count.
    pub hf_experts: &'static str,
}

impl KeyNames {
    /// The shared keys.
    pub const SHARED: KeyNames = KeyNames {
        head_dim: None,
        v_head_dim: ("attention.value_length", "head_dim"),
        rope_dim: None,
        attn_scale: (None, None),
        hf_experts: "num_experts",
    };
}

/// Which format a config was read from, so that a check can name the key a bad value came
/// from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// GGUF metadata: keys `{arch}.{name}`.
    Gguf,
    /// An HF `config.json`.
    Hf,
}

/// The error for a parameter out of range; `msg` names its key.
pub(crate) fn out_of_range(src: Source, msg: String) -> ModelError {
    ModelError::Metadata(match src {
        Source::Gguf => msg,
        Source::Hf => format!("config.json: {msg}"),
    })
}

/// The keys a rope's values came from, quoted, for error messages.
pub(crate) struct RopeKeys {
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

impl ModelConfig {
    /// The keys this config's architecture names its own.
    fn keys(&self) -> &'static KeyNames {
        &self.arch.family().keys
    }

    /// Every parameter in range, or an error naming the key (of the format `src`) that the bad
    /// value came from and the rule it breaks.
    pub(crate) fn validate(&self, src: Source) -> Result<()> {
        self.validate_sizes(src)?;
        let bad = |m: String| Err(out_of_range(src, m));
        let key = |gguf: &str, hf: &str| self.key(src, gguf, hf);
        if !(self.attn_scale.is_finite() && self.attn_scale > 0.0) {
            let from = match (src, self.keys().attn_scale) {
                (Source::Gguf, (Some(gguf), _)) => key(gguf, ""),
                (Source::Hf, (_, Some(hf))) => key("", hf),
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
            if let Some(ix) = &mla.indexer {
                for (k, v) in [
                    (
                        key("attention.indexer.head_count", "index_n_heads"),
                        ix.n_heads,
                    ),
                    (
                        key("attention.indexer.key_length", "index_head_dim"),
                        ix.head_dim,
                    ),
                    (key("attention.indexer.top_k", "index_topk"), ix.top_k),
                ] {
                    if v == 0 || v > MAX_SIZE {
                        return bad(format!("{k} is {v}; it must be between 1 and {MAX_SIZE}"));
                    }
                }
                if ix.head_dim < mla.qk_rope_dim {
                    return bad(format!(
                        "{} is {}, less than the {} roped dims ({})",
                        key("attention.indexer.key_length", "index_head_dim"),
                        ix.head_dim,
                        mla.qk_rope_dim,
                        self.rope_keys(src, false).dim
                    ));
                }
                if mla.q_lora_rank.is_none() {
                    return bad(format!(
                        "the lightning indexer reads the query LoRA's latent, and {} is not set",
                        key("attention.q_lora_rank", "q_lora_rank")
                    ));
                }
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
    pub(crate) fn key(&self, src: Source, gguf: &str, hf: &str) -> String {
        match src {
            Source::Gguf => format!("`{}.{gguf}`", self.arch.gguf_name()),
            Source::Hf => format!("`{hf}`"),
        }
    }

    /// The key of the query/key head dim, and where its default comes from.
    fn head_dim_key(&self, src: Source) -> String {
        match self.keys().head_dim {
            Some((gguf, hf)) => self.key(src, gguf, hf),
            None => {
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
    pub(crate) fn rope_keys(&self, src: Source, local: bool) -> RopeKeys {
        let dim = match (self.keys().rope_dim, src) {
            (Some((gguf, hf)), _) => self.key(src, gguf, hf),
            (None, Source::Gguf) => format!(
                "{} (default the head dim)",
                self.key(src, "rope.dimension_count", "")
            ),
            (None, Source::Hf) => self.head_dim_key(src),
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
        let key = |gguf: &str, hf: &str| self.key(src, gguf, hf);
        let experts = key("expert_count", self.keys().hf_experts);
        let groups = key("expert_group_count", "n_group");
        let groups_used = key("expert_group_used_count", "topk_group");
        let used = key("expert_used_count", "num_experts_per_tok");
        for (k, v) in [
            (&experts, moe.n_experts),
            (&used, moe.n_used),
            (
                &key("expert_feed_forward_length", "moe_intermediate_size"),
                moe.expert_ffn_dim,
            ),
            (&groups, moe.n_groups),
            (&groups_used, moe.groups_used),
        ] {
            if v == 0 || v > MAX_SIZE {
                return bad(format!("{k} is {v}; it must be between 1 and {MAX_SIZE}"));
            }
        }
        if let Some(d) = moe.shared_ffn_dim.filter(|&d| d == 0 || d > MAX_SIZE) {
            return bad(format!(
                "{} is {d}; it must be between 1 and {MAX_SIZE}",
                key(
                    "expert_shared_feed_forward_length",
                    "shared_expert_intermediate_size"
                )
            ));
        }
        if moe.n_shared > 1 << 12 {
            return bad(format!(
                "{} is {}; it must be at most {}",
                key("expert_shared_count", "n_shared_experts"),
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
                key("expert_weights_scale", "routed_scaling_factor"),
                moe.scale
            ));
        }
        if moe.layers.len() != self.n_layers {
            return bad(format!(
                "the sparse-layer pattern covers {} layers of {} ({})",
                moe.layers.len(),
                self.n_layers,
                key("block_count", "num_hidden_layers")
            ));
        }
        Ok(())
    }

    pub(crate) fn validate_rope(rope: &RopeConfig, head_dim: usize, keys: &RopeKeys) -> Result<()> {
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

    pub(crate) fn validate_layer_count(&self, src: Source) -> Result<()> {
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
        let (gguf, hf) = self.keys().v_head_dim;
        let v_head_dim = key(gguf, hf);
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

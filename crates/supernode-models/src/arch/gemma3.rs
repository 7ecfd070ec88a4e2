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
//! The forward pass is the shared [`PreNormDecoder`] with post-norms and GQA [`Attention`]
//! with per-head norms; this file reads the config (GGUF and config.json) into it.
//!
//! Follows llama.cpp's `llm_build_gemma3` and transformers' `Gemma3ForCausalLM`; every
//! difference between the two (norm offsets, rope of the local layers, query scale) is
//! resolved in the [`ModelConfig`] read here.

use serde_json::Value;

use crate::arch::decoder::{DecoderOptions, PreNormDecoder};
use crate::arch::{Arch, Family, Model};
use crate::config::{hf_int, hf_num, hf_rope, KeyNames, RopeConfig, RopeScaling, SlidingWindow};
use crate::layers::Attention;
use crate::names::{only, Row};
use crate::weights::Weights;
use crate::{Metadata, ModelConfig, ModelError, Result};

/// The family's entry points.
pub const FAMILY: Family = Family {
    read_gguf: gemma3_from_gguf,
    hf_defaults,
    read_hf: gemma3_from_hf,
    gguf_tensors: None,
    build,
    keys: KeyNames {
        attn_scale: (None, Some("query_pre_attn_scalar")),
        ..KeyNames::SHARED
    },
    hf_names: HF_NAMES,
};

/// Architectures whose decoder layers have four norms: pre- and post-attention, pre- and
/// post-feed-forward. In them HF's `post_attention_layernorm` is a real post-norm.
pub const SANDWICH_NORMS: &[&str] = &["gemma2", "gemma3", "gemma3_text"];

/// The sandwich norms' names (the shared table maps `post_attention_layernorm` to the
/// feed-forward's pre-norm everywhere else).
const HF_NAMES: &[Row] = &[
    only(
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
        SANDWICH_NORMS,
    ),
    only(
        "pre_feedforward_layernorm.weight",
        "ffn_norm.weight",
        SANDWICH_NORMS,
    ),
    only(
        "post_feedforward_layernorm.weight",
        "post_ffw_norm.weight",
        SANDWICH_NORMS,
    ),
];

/// A Gemma 3 model.
pub type Gemma3 = PreNormDecoder<Attention>;

/// Loads a Gemma 3 model: post-norms, the numerics' GELU, per-head Q/K norms.
pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Gemma3> {
    let opts = DecoderOptions {
        act: w.numerics().gelu,
        post_norms: true,
        ffn_norm: "ffn_norm.weight",
    };
    let c = cfg.clone();
    PreNormDecoder::load(cfg, w, opts, |i| Attention::load(&c, w, i, true))
}

fn build(cfg: ModelConfig, w: &Weights) -> Result<Box<dyn Model>> {
    Ok(Box::new(load(cfg, w)?))
}

/// The config.json of the text model inside a multimodal Gemma 3 (`model_type` `gemma3`).
pub fn hf_text_config(config: &Value) -> Result<Value> {
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
    Ok(text)
}

/// transformers' `Gemma3TextConfig` defaults.
fn hf_defaults(_: Arch) -> Value {
    serde_json::json!({
        "vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 256, "sliding_window": 4096,
    })
}

/// Gemma 3's extras as llama.cpp reads them (`llama_load_hparams_gemma3`): every 6th layer
/// (`i % 6 == 5`) attends globally with the file's rope, the others over
/// `attention.sliding_window` positions with an unscaled rope of base 10 000 (hard-coded
/// by llama.cpp, not in the file); embeddings scaled by `sqrt(hidden)`; the query scale
/// `1/sqrt(head_dim)`, except for the 27B (62 layers), whose `query_pre_attn_scalar` is
/// `hidden / heads`. The norm weights already hold Gemma's `1 + w`.
fn gemma3_from_gguf(cfg: &mut ModelConfig, meta: &Metadata) -> Result<()> {
    let key = |k: &str| format!("gemma3.{k}");
    let size = meta
        .get_usize(&key("attention.sliding_window"))?
        .ok_or_else(|| {
            ModelError::Metadata(format!("missing `{}`", key("attention.sliding_window")))
        })?;
    cfg.sliding_window = Some(SlidingWindow {
        size,
        layers: (0..cfg.n_layers).map(|i| i % 6 < 5).collect(),
        rope: RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
            ..cfg.rope.clone()
        },
    });
    cfg.embed_scale = (cfg.hidden as f32).sqrt();
    let query_pre_attn_scalar = if cfg.n_layers == 62 {
        cfg.hidden / cfg.n_heads.max(1)
    } else {
        cfg.head_dim
    };
    cfg.attn_scale = 1.0 / (query_pre_attn_scalar as f32).sqrt();
    cfg.final_softcap = meta
        .get_f64(&key("final_logit_softcapping"))?
        .map(|c| c as f32);
    Ok(())
}

/// Gemma 3's extras as transformers' `Gemma3TextConfig` defines them: `(1 + w)` norms,
/// embeddings scaled by `sqrt(hidden)`, the query scale `query_pre_attn_scalar^-0.5`,
/// sliding-window layers from `layer_types` (or every layer but each
/// `sliding_window_pattern`-th), and their own rope: `rope_parameters.sliding_attention`
/// (transformers 5) or an unscaled one of base `rope_local_base_freq`.
fn gemma3_from_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
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
    let size =
        hf_int(config, "sliding_window")?.ok_or_else(|| bad("missing `sliding_window`".into()))?;
    let layers = match config.get("layer_types").and_then(Value::as_array) {
        Some(types) => {
            if types.len() != cfg.n_layers {
                return Err(bad(format!(
                    "`layer_types` has {} entries for {} layers",
                    types.len(),
                    cfg.n_layers
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
            (0..cfg.n_layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let per_type = config
        .get("rope_parameters")
        .filter(|p| p.get("full_attention").is_some());
    let local = match per_type {
        Some(p) => {
            let (theta, scaling) = hf_rope(&Value::Null, p.get("full_attention"), 1e6)?;
            cfg.rope.theta = theta;
            cfg.rope.scaling = scaling;
            hf_rope(&Value::Null, p.get("sliding_attention"), 10_000.0)?
        }
        None => (
            num("rope_local_base_freq")?.unwrap_or(10_000.0),
            RopeScaling::None,
        ),
    };
    cfg.sliding_window = Some(SlidingWindow {
        size,
        layers,
        rope: RopeConfig {
            theta: local.0,
            scaling: local.1,
            ..cfg.rope.clone()
        },
    });
    cfg.norm_offset = 1.0;
    cfg.embed_scale = (cfg.hidden as f32).sqrt();
    cfg.attn_scale =
        num("query_pre_attn_scalar")?.map_or(cfg.attn_scale, |s| (1.0 / s.sqrt()) as f32);
    cfg.final_softcap = num("final_logit_softcapping")?.map(|c| c as f32);
    Ok(())
}

#[cfg(test)]
mod tests {
    use supernode_kernels::ops::RopeStyle;

    use crate::config::RopeScaling;
    use crate::{MetaValue, Metadata, ModelConfig};

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
}

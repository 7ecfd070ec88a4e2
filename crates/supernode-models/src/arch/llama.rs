//! The Llama family: llama (Llama 2/3, SmolLM2, ...), qwen2, qwen3 and qwen3_moe — one
//! pre-norm decoder of GQA attention with rope and a SwiGLU feed-forward (dense, or a mixture
//! of SwiGLU experts), a final RMSNorm and a tied or untied output head.
//!
//! The forward pass is the shared [`PreNormDecoder`] with GQA [`Attention`].
//!
//! What tells the members apart: Qwen2's Q/K/V biases are picked up by [`Weights::linear`]
//! wherever the file has them, Qwen3's per-head Q/K RMSNorms (applied before rope) are required
//! for [`Arch::Qwen3`] and [`Arch::Qwen3Moe`] and absent otherwise, Qwen3-MoE's sparse layers and
//! routing are [`ModelConfig::moe`] (read here), and the rope style of GGUF files (permuted
//! llama rows or not) is set here.

use serde_json::Value;
use supernode_kernels::ops::{Activation, RopeStyle};

use crate::arch::decoder::{DecoderOptions, PreNormDecoder};
use crate::arch::{Arch, Family, Model};
use crate::config::{hf_bool, hf_int, Gating, KeyNames, MoeConfig};
use crate::layers::Attention;
use crate::weights::Weights;
use crate::{Metadata, ModelConfig, ModelError, Result};

/// The family's entry points.
pub const FAMILY: Family = Family {
    read_gguf,
    hf_defaults,
    read_hf,
    gguf_tensors: Some(dense_layers_from_tensors),
    build,
    keys: KeyNames::SHARED,
    hf_names: &[],
};

/// A Llama-family model.
pub type Llama = PreNormDecoder<Attention>;

/// Loads a Llama-family model.
pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Llama> {
    let qk_norm = matches!(cfg.arch, Arch::Qwen3 | Arch::Qwen3Moe);
    let opts = DecoderOptions {
        act: Activation::Silu,
        post_norms: false,
        ffn_norm: "ffn_norm.weight",
    };
    let c = cfg.clone();
    PreNormDecoder::load(cfg, w, opts, |i| Attention::load(&c, w, i, qk_norm))
}

fn build(cfg: ModelConfig, w: &Weights) -> Result<Box<dyn Model>> {
    Ok(Box::new(load(cfg, w)?))
}

/// The rope style of GGUF files, and Qwen3-MoE's experts.
fn read_gguf(cfg: &mut ModelConfig, meta: &Metadata) -> Result<()> {
    // llama.cpp's converter permutes Q/K rows of llama checkpoints so that ggml's "normal"
    // (adjacent-pair) rope is right for GGUF files; Qwen's rows are not permuted and llama.cpp
    // ropes them in "neox" (halves) mode (`llama_model_rope_type`).
    if cfg.arch == Arch::Llama {
        cfg.rope.style = RopeStyle::Interleaved;
    }
    if cfg.arch == Arch::Qwen3Moe {
        qwen3moe_from_gguf(cfg, meta)?;
    }
    Ok(())
}

/// Qwen3-MoE's router as llama.cpp's `qwen3moe` runs it: softmax over `expert_count`
/// experts, top `expert_used_count`, renormalised (llama.cpp hard-codes it; a file's
/// `expert_weights_norm` overrides). Every layer is sparse here; [`dense_layers_from_tensors`]
/// then marks the layers without a router (`ffn_gate_inp`) dense.
fn qwen3moe_from_gguf(cfg: &mut ModelConfig, meta: &Metadata) -> Result<()> {
    let key = |k: &str| format!("qwen3moe.{k}");
    let req = |k: &str| -> Result<usize> {
        meta.get_usize(&key(k))?
            .ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
    };
    cfg.moe = Some(MoeConfig {
        n_experts: req("expert_count")?,
        n_used: req("expert_used_count")?,
        expert_ffn_dim: req("expert_feed_forward_length")?,
        n_shared: 0,
        shared_ffn_dim: None,
        gating: Gating::Softmax,
        norm_weights: meta.get_bool(&key("expert_weights_norm"))?.unwrap_or(true),
        scale: 1.0,
        n_groups: 1,
        groups_used: 1,
        layers: vec![true; cfg.n_layers],
    });
    Ok(())
}

/// llama.cpp's `qwen3moe` makes every layer sparse; a file may keep dense layers (as
/// `mlp_only_layers` / `decoder_sparse_step` do), told by their lack of a router.
fn dense_layers_from_tensors(cfg: ModelConfig, w: &Weights) -> Result<ModelConfig> {
    if cfg.arch != Arch::Qwen3Moe {
        return Ok(cfg);
    }
    let sparse = (0..cfg.n_layers)
        .map(|i| w.get(&format!("blk.{i}.ffn_gate_inp.weight")).is_some())
        .collect();
    cfg.with_moe_layers(sparse)
}

/// What the family cannot run, and Qwen3-MoE's experts.
fn read_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
    hf_checks(config)?;
    if cfg.arch == Arch::Qwen3Moe {
        qwen3_moe_from_hf(cfg, config)?;
    }
    Ok(())
}

/// What the Llama family's builder (and DeepSeek's, on the same decoder) does not do, refused by name: another activation than
/// SiLU, and sliding-window attention (Qwen2's `use_sliding_window`, which transformers
/// applies to the layers from `max_window_layers` on; it is off in every released Qwen2, and
/// its `sliding_window` value is then ignored, as here).
pub(crate) fn hf_checks(config: &Value) -> Result<()> {
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

/// Qwen3-MoE's experts as transformers' `Qwen3MoeSparseMoeBlock` uses them: layer `i` is
/// sparse when `num_experts > 0`, `i` is not in `mlp_only_layers` and
/// `(i + 1) % decoder_sparse_step == 0`; softmax router, top `num_experts_per_tok`,
/// renormalised if `norm_topk_prob`. (transformers 5 writes `num_local_experts`.)
pub(crate) fn qwen3_moe_from_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
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
    if let Some(i) = dense.iter().find(|&&i| i >= cfg.n_layers) {
        return Err(ModelError::Metadata(format!(
            "config.json: `mlp_only_layers` names layer {i}, but there are {} \
             (`num_hidden_layers`)",
            cfg.n_layers
        )));
    }
    cfg.moe = Some(MoeConfig {
        n_experts,
        n_used: hf_int(config, "num_experts_per_tok")?.unwrap_or(8),
        expert_ffn_dim: hf_int(config, "moe_intermediate_size")?.unwrap_or(768),
        n_shared: 0,
        shared_ffn_dim: None,
        gating: Gating::Softmax,
        norm_weights: hf_bool(config, "norm_topk_prob")?.unwrap_or(false),
        scale: 1.0,
        n_groups: 1,
        groups_used: 1,
        layers: (0..cfg.n_layers)
            .map(|i| !dense.contains(&i) && n_experts > 0 && (i + 1) % step == 0)
            .collect(),
    });
    if n_experts == 0 {
        // No sparse layer: the experts' sizes are never used.
        cfg.moe = None;
    }
    Ok(())
}

/// The defaults of `arch`'s transformers config class.
fn hf_defaults(arch: Arch) -> Value {
    match arch {
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
        _ => unreachable!("not in the Llama family"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use supernode_kernels::ops::RopeStyle;

    use crate::arch::Arch;
    use crate::config::tests::{fixture_config, llama_meta};
    use crate::config::{Gating, RopeScaling};
    use crate::{MetaValue, Metadata, ModelConfig};

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
}

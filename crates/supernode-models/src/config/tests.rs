//! The checks of values out of range for every architecture (each error names its key), and
//! the test configs the architectures' own tests share.

use serde_json::Value;
use supernode_kernels::ops::RopeStyle;

use super::{RopeConfig, RopeScaling, TOKENS_KEY};
use crate::{MetaValue, Metadata, ModelConfig};

pub(crate) fn llama_meta() -> Metadata {
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

pub(crate) fn fixture_config(arch: &str, file: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(arch)
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub(crate) fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-9 * y.abs())
}

/// The DeepSeek-V3 fixture's config as llama.cpp's converter writes it.
pub(crate) fn deepseek2_meta() -> Metadata {
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

/// `llama_meta` under another architecture's name, with `extra` keys (unprefixed) set.
pub(crate) fn meta_for(arch: &str, extra: &[(&str, MetaValue)]) -> Metadata {
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

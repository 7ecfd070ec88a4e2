//! DeepSeek-V4 (transformers' `deepseek_v4`, llama.cpp's `deepseek4`): per-layer sliding,
//! compressed sparse (CSA) and heavily compressed (HCA) attention over one shared key-value
//! head, hyper-connections, hash-routed MoE layers beside learned-routed ones with a
//! `sqrtsoftplus` router and a clamped SwiGLU.
//!
//! The forward pass is the shared [`PreNormDecoder`] with [`V4Attn`] attention and its
//! hyper-connection residual ([`crate::layers::HyperConnection`]); the feed-forward is the
//! shared [`crate::layers::Moe`] with its hash and clamp options. This file reads the config
//! and names the tensors.
//!
//! Follows transformers' `DeepseekV4ForCausalLM`: every layer is MoE with one shared expert
//! of `moe_intermediate_size`; routing weights are always renormalised; the multi-token
//! prediction layers (`mtp.*`) are not part of the model and are not loaded.

use serde_json::Value;
use supernode_kernels::ops::RopeStyle;

use crate::arch::decoder::PreNormDecoder;
use crate::arch::{deepseek_v3, Arch, Family, Model};
use crate::config::{
    hf_bool, hf_int, hf_num, hf_rope, Gating, IndexerConfig, KeyNames, MoeConfig, RopeConfig,
    RopeScaling, V4Attention, V4Config,
};
use crate::layers::V4Attn;
use crate::names::{only, Row};
use crate::weights::Weights;
use crate::{Metadata, ModelConfig, ModelError, Result};

/// The family's entry points.
pub const FAMILY: Family = Family {
    read_gguf,
    hf_defaults,
    read_hf,
    gguf_tensors: None,
    build,
    keys: KEYS,
    hf_names: HF_NAMES,
};

const KEYS: KeyNames = KeyNames {
    head_dim: None,
    v_head_dim: ("attention.value_length", "head_dim"),
    rope_dim: Some((
        "rope.dimension_count",
        "qk_rope_head_dim` / `partial_rotary_factor",
    )),
    attn_scale: (None, None),
    hf_experts: "n_routed_experts",
};

pub(crate) const V4: &[&str] = &["deepseek_v4", "deepseek4"];

/// A layer's tensors as DeepSeek's checkpoints name them (which is also how transformers saves
/// them: its own module names are renamed back on save), with llama.cpp's `deepseek4` names.
/// Routed experts: `w1` gate, `w3` up, `w2` down.
const HF_NAMES: &[Row] = &[
    only("attn.wq_a.weight", "attn_q_a.weight", V4),
    only("attn.q_norm.weight", "attn_q_a_norm.weight", V4),
    only("attn.wq_b.weight", "attn_q_b.weight", V4),
    only("attn.wkv.weight", "attn_kv.weight", V4),
    only("attn.norm.weight", "attn_kv_a_norm.weight", V4),
    only("attn.wo_a.weight", "attn_output_a.weight", V4),
    only("attn.wo_b.weight", "attn_output_b.weight", V4),
    only("attn.attn_sink", "attn_sinks.weight", V4),
    only(
        "attn.compressor.wkv.weight",
        "attn_compressor_kv.weight",
        V4,
    ),
    only(
        "attn.compressor.wgate.weight",
        "attn_compressor_gate.weight",
        V4,
    ),
    only("attn.compressor.ape", "attn_compressor_ape.weight", V4),
    only(
        "attn.compressor.norm.weight",
        "attn_compressor_norm.weight",
        V4,
    ),
    only(
        "attn.indexer.compressor.wkv.weight",
        "indexer_compressor_kv.weight",
        V4,
    ),
    only(
        "attn.indexer.compressor.wgate.weight",
        "indexer_compressor_gate.weight",
        V4,
    ),
    only(
        "attn.indexer.compressor.ape",
        "indexer_compressor_ape.weight",
        V4,
    ),
    only(
        "attn.indexer.compressor.norm.weight",
        "indexer_compressor_norm.weight",
        V4,
    ),
    only("attn.indexer.wq_b.weight", "indexer.attn_q_b.weight", V4),
    only(
        "attn.indexer.weights_proj.weight",
        "indexer.proj.weight",
        V4,
    ),
    only("attn_norm.weight", "attn_norm.weight", V4),
    only("ffn_norm.weight", "ffn_norm.weight", V4),
    only("hc_attn_fn", "hc_attn_fn.weight", V4),
    only("hc_attn_base", "hc_attn_base.weight", V4),
    only("hc_attn_scale", "hc_attn_scale.weight", V4),
    only("hc_ffn_fn", "hc_ffn_fn.weight", V4),
    only("hc_ffn_base", "hc_ffn_base.weight", V4),
    only("hc_ffn_scale", "hc_ffn_scale.weight", V4),
    only("ffn.gate.weight", "ffn_gate_inp.weight", V4),
    only("ffn.gate.bias", "exp_probs_b.bias", V4),
    only("ffn.gate.tid2eid", "ffn_gate_tid2eid.weight", V4),
    only("ffn.experts.{e}.w1.weight", "ffn_gate_exps.weight", V4),
    only("ffn.experts.{e}.w3.weight", "ffn_up_exps.weight", V4),
    only("ffn.experts.{e}.w2.weight", "ffn_down_exps.weight", V4),
    only("ffn.shared_experts.w1.weight", "ffn_gate_shexp.weight", V4),
    only("ffn.shared_experts.w3.weight", "ffn_up_shexp.weight", V4),
    only("ffn.shared_experts.w2.weight", "ffn_down_shexp.weight", V4),
];

fn build(cfg: ModelConfig, w: &Weights) -> Result<Box<dyn Model>> {
    let v4 = cfg
        .v4
        .clone()
        .ok_or_else(|| ModelError::Invalid("a DeepSeek-V4 config without its V4 part".into()))?;
    let attn_cfg = cfg.clone();
    Ok(Box::new(PreNormDecoder::load(
        cfg,
        w,
        deepseek_v3::OPTIONS,
        |i| V4Attn::load(&attn_cfg, &v4, w, i),
    )?))
}

/// llama.cpp's `deepseek4` files, by the keys its converter writes: the shared reading gives the
/// sizes and the rope (whose YaRN is the compressed layers'; llama.cpp takes its magnitude
/// factor back out, as transformers leaves it at 1), and these give the rest.
fn read_gguf(cfg: &mut ModelConfig, meta: &Metadata) -> Result<()> {
    let arch = cfg.arch.gguf_name();
    let key = |k: &str| format!("{arch}.{k}");
    let bad = |m: String| ModelError::Metadata(m);
    let opt = |k: &str| meta.get_usize(&key(k));
    let req =
        |k: &str| -> Result<usize> { opt(k)?.ok_or_else(|| bad(format!("missing `{}`", key(k)))) };
    let num = |k: &str| -> Result<f64> {
        meta.get_f64(&key(k))?
            .ok_or_else(|| bad(format!("missing `{}`", key(k))))
    };
    // One value, or one per layer that must all be the same.
    let one_of = |k: &str| -> Result<f64> {
        match meta.get_array(&key(k))? {
            None => num(k),
            Some(values) => {
                let all: Option<Vec<f64>> = values.iter().map(|v| v.as_f64()).collect();
                match all.as_deref() {
                    Some([first, rest @ ..]) if rest.iter().all(|v| v == first) => Ok(*first),
                    _ => Err(bad(format!(
                        "`{}` must give every layer the same number",
                        key(k)
                    ))),
                }
            }
        }
    };
    let n = cfg.n_layers;
    if cfg.n_kv_heads != 1 {
        return Err(bad(format!(
            "`{}` is {}: deepseek4 has one shared key-value head",
            key("attention.head_count_kv"),
            cfg.n_kv_heads
        )));
    }
    let ratios = meta
        .get_array(&key("attention.compress_ratios"))?
        .ok_or_else(|| bad(format!("missing `{}`", key("attention.compress_ratios"))))?;
    if ratios.len() < n {
        return Err(bad(format!(
            "`{}` lists {} layers, fewer than the {n} of `{}`",
            key("attention.compress_ratios"),
            ratios.len(),
            key("block_count")
        )));
    }
    // llama.cpp's CSA ratio is 4; any other non-zero ratio is HCA's (128 in its files).
    let mut hca_rate = None;
    let mut layers = Vec::with_capacity(n);
    for r in &ratios[..n] {
        let r = r
            .as_i64()
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| {
                bad(format!(
                    "`{}` holds {r:?}",
                    key("attention.compress_ratios")
                ))
            })?;
        layers.push(match r {
            0 => V4Attention::Sliding,
            4 => V4Attention::Csa,
            r if hca_rate.is_none_or(|h| h == r) => {
                hca_rate = Some(r);
                V4Attention::Hca
            }
            r => {
                return Err(bad(format!(
                    "`{}` has two heavily compressed ratios ({} and {r})",
                    key("attention.compress_ratios"),
                    hca_rate.unwrap_or_default()
                )))
            }
        });
    }
    let gating = match opt("expert_gating_func")? {
        None | Some(4) => Gating::SqrtSoftplus,
        Some(1) => Gating::Softmax,
        Some(2) => Gating::Sigmoid,
        Some(other) => {
            return Err(bad(format!(
                "`{}` {other} is not supported (supported: 1 softmax, 2 sigmoid, 4 sqrtsoftplus)",
                key("expert_gating_func")
            )))
        }
    };
    if let Some(s) = opt("expert_shared_count")?.filter(|&s| s != 1) {
        return Err(bad(format!(
            "`{}` {s} is not supported by deepseek4 (one shared expert)",
            key("expert_shared_count")
        )));
    }
    cfg.rope.style = RopeStyle::Interleaved;
    let mut compress = RopeConfig {
        theta: num("attention.compress_rope_freq_base")?,
        ..cfg.rope.clone()
    };
    if let RopeScaling::Yarn { attn_factor, .. } = &mut compress.scaling {
        *attn_factor = 1.0;
    }
    cfg.rope.scaling = RopeScaling::None;
    cfg.v_head_dim = cfg.head_dim;
    let expert_ffn = req("expert_feed_forward_length")?;
    cfg.ffn_dim = expert_ffn;
    cfg.moe = Some(MoeConfig {
        n_experts: req("expert_count")?,
        n_used: req("expert_used_count")?,
        expert_ffn_dim: expert_ffn,
        n_shared: 1,
        shared_ffn_dim: None,
        gating,
        norm_weights: meta.get_bool(&key("expert_weights_norm"))?.unwrap_or(true),
        scale: meta.get_f64(&key("expert_weights_scale"))?.unwrap_or(1.0) as f32,
        n_groups: 1,
        groups_used: 1,
        layers: vec![true; n],
    });
    let hash = opt("hash_layer_count")?.unwrap_or(0);
    let v4 = V4Config {
        layers,
        csa_rate: 4,
        hca_rate: hca_rate.unwrap_or(128),
        window: req("attention.sliding_window")?,
        q_lora_rank: req("attention.q_lora_rank")?,
        compress_rope: compress,
        o_groups: req("attention.output_group_count")?,
        o_lora_rank: req("attention.output_lora_rank")?,
        hc_mult: req("hyper_connection.count")?,
        hc_iters: req("hyper_connection.sinkhorn_iterations")?,
        hc_eps: num("hyper_connection.epsilon")? as f32,
        indexer: IndexerConfig {
            n_heads: req("attention.indexer.head_count")?,
            head_dim: req("attention.indexer.key_length")?,
            top_k: req("attention.indexer.top_k")?,
        },
        hash_layers: (0..n).map(|i| i < hash).collect(),
        swiglu_limit: one_of("swiglu_clamp_exp")? as f32,
    };
    // One clamp serves the routed and the shared experts (transformers' `swiglu_limit`).
    if meta.get(&key("swiglu_clamp_shexp")).is_some()
        && one_of("swiglu_clamp_shexp")? as f32 != v4.swiglu_limit
    {
        return Err(bad(format!(
            "`{}` differs from `{}`: one SwiGLU clamp for routed and shared experts is \
             supported",
            key("swiglu_clamp_shexp"),
            key("swiglu_clamp_exp")
        )));
    }
    check(cfg, &v4).map_err(|e| bad(e.to_string().replace("config.json: ", "")))?;
    cfg.v4 = Some(v4);
    Ok(())
}

/// transformers' `DeepseekV4Config` defaults. (`intermediate_size` is the config's alias of
/// `moe_intermediate_size`; the reader sets it from that.)
fn hf_defaults(_: Arch) -> Value {
    serde_json::json!({
        "vocab_size": 129_280, "hidden_size": 4096, "moe_intermediate_size": 2048,
        "intermediate_size": 2048, "num_hidden_layers": 43, "num_attention_heads": 64,
        "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024,
        "num_experts_per_tok": 6, "n_routed_experts": 256, "n_shared_experts": 1,
        "scoring_func": "sqrtsoftplus", "norm_topk_prob": true, "routed_scaling_factor": 1.5,
        "max_position_embeddings": 1_048_576, "rope_theta": 10_000.0,
        "compress_rope_theta": 160_000.0, "hc_mult": 4, "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6, "swiglu_limit": 10.0, "sliding_window": 128, "o_groups": 8,
        "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
        "rms_norm_eps": 1e-6,
    })
}

/// A per-layer list `key` of config.json, each entry read by `read` (`None`: not one `what`
/// names); `None` where the config has no such list.
fn per_layer<T>(
    config: &Value,
    key: &str,
    n: usize,
    what: &str,
    read: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let bad = |m: String| ModelError::Metadata(format!("config.json: {m}"));
    let Some(v) = config.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .ok_or_else(|| bad(format!("`{key}` should be a list, got {v}")))?;
    if list.len() < n {
        return Err(bad(format!(
            "`{key}` lists {} layers, fewer than the {n} of `num_hidden_layers`",
            list.len()
        )));
    }
    list[..n]
        .iter()
        .map(|e| read(e).ok_or_else(|| bad(format!("{e} in `{key}` is not one of {what}"))))
        .collect::<Result<Vec<T>>>()
        .map(Some)
}

/// The layer kinds from `layer_types`, or from the older `compress_ratios` (0, 4 and 128 per
/// layer), or transformers' default (two HCA layers, then HCA and CSA in turn).
fn layer_kinds(config: &Value, n: usize) -> Result<Vec<V4Attention>> {
    let types = per_layer(
        config,
        "layer_types",
        n,
        "sliding_attention, compressed_sparse_attention, heavily_compressed_attention",
        |t| match t.as_str()? {
            "sliding_attention" => Some(V4Attention::Sliding),
            "compressed_sparse_attention" => Some(V4Attention::Csa),
            "heavily_compressed_attention" => Some(V4Attention::Hca),
            _ => None,
        },
    )?;
    let ratios = || {
        per_layer(
            config,
            "compress_ratios",
            n,
            "0, 4, 128 (use `layer_types` and `compress_rates` for others)",
            |r| match r.as_u64()? {
                0 => Some(V4Attention::Sliding),
                4 => Some(V4Attention::Csa),
                128 => Some(V4Attention::Hca),
                _ => None,
            },
        )
    };
    let default = || {
        (0..n)
            .map(|i| match i {
                2.. if (i - 2) % 2 == 1 => V4Attention::Csa,
                _ => V4Attention::Hca,
            })
            .collect()
    };
    Ok(match types {
        Some(t) => t,
        None => ratios()?.unwrap_or_else(default),
    })
}

/// The hash-routed layers: `mlp_layer_types`, or the first `num_hash_layers` (default 3).
fn hash_layers(config: &Value, n: usize) -> Result<Vec<bool>> {
    let types = per_layer(config, "mlp_layer_types", n, "hash_moe, moe", |t| {
        match t.as_str()? {
            "hash_moe" => Some(true),
            "moe" => Some(false),
            _ => None,
        }
    })?;
    match types {
        Some(t) => Ok(t),
        None => {
            let k = hf_int(config, "num_hash_layers")?.unwrap_or(3);
            Ok((0..n).map(|i| i < k).collect())
        }
    }
}

/// The main and compressed ropes: transformers 5's `rope_parameters` `{main, compress}`, or
/// the older `rope_theta` / `compress_rope_theta` / `rope_scaling` (whose YaRN applies to the
/// compressed layers only). YaRN's magnitude factor is 1 unless the config gives one
/// (`attention_factor`), as transformers sets it for V4.
fn ropes(config: &Value, rope_dim: usize) -> Result<(RopeConfig, RopeConfig)> {
    let params = config.get("rope_parameters").filter(|v| v.is_object());
    let nested = |k: &str| params.and_then(|p| p.get(k)).filter(|v| v.is_object());
    let theta = hf_num(config, "rope_theta")?.unwrap_or(10_000.0);
    let compress_theta = hf_num(config, "compress_rope_theta")?.unwrap_or(160_000.0);
    let (main, compress) = match (nested("main"), nested("compress")) {
        (Some(main), Some(compress)) => (main.clone(), compress.clone()),
        _ => {
            let mut compress = config
                .get("rope_scaling")
                .filter(|v| v.is_object())
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            compress["rope_theta"] = compress_theta.into();
            let yarn = [compress.get("rope_type"), compress.get("type")]
                .into_iter()
                .flatten()
                .any(|t| t.as_str() == Some("yarn"));
            if yarn && compress.get("attention_factor").is_none() {
                compress["attention_factor"] = 1.0.into();
            }
            (
                serde_json::json!({"rope_type": "default", "rope_theta": theta}),
                compress,
            )
        }
    };
    // Read each as a config of its own, so that nothing falls back to the top level.
    let read = |p: &Value, default: f64| -> Result<RopeConfig> {
        let mut own = p.clone();
        if let Some(max) = config.get("max_position_embeddings") {
            own["max_position_embeddings"] = max.clone();
        }
        let (theta, scaling) = hf_rope(&own, Some(p), default)?;
        Ok(RopeConfig {
            theta,
            dim: rope_dim,
            style: RopeStyle::Interleaved,
            scaling,
        })
    };
    let main = read(&main, theta)?;
    let compress = read(&compress, compress_theta)?;
    if matches!(main.scaling, RopeScaling::Yarn { .. }) {
        return Err(ModelError::Metadata(
            "config.json: a scaled `rope_parameters.main` is not supported by deepseek_v4 \
             (transformers scales the compressed layers' rope only)"
                .into(),
        ));
    }
    Ok((main, compress))
}

fn read_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
    let bad = |m: String| ModelError::Metadata(format!("config.json: {m}"));
    let int = |k: &str| hf_int(config, k);
    let req = |k: &str| -> Result<usize> { int(k)?.ok_or_else(|| bad(format!("missing `{k}`"))) };
    let n = cfg.n_layers;
    if cfg.n_kv_heads != 1 {
        return Err(bad(format!(
            "`num_key_value_heads` is {}: deepseek_v4 has one shared key-value head",
            cfg.n_kv_heads
        )));
    }
    if let Some(s) = int("n_shared_experts")?.filter(|&s| s != 1) {
        return Err(bad(format!(
            "`n_shared_experts` {s} is not supported by deepseek_v4 (transformers builds one \
             shared expert)"
        )));
    }
    let rope_dim = match int("qk_rope_head_dim")? {
        Some(d) => d,
        None => {
            let f = hf_num(config, "partial_rotary_factor")?.unwrap_or(64.0 / 512.0);
            (cfg.head_dim as f64 * f) as usize
        }
    };
    let (main, compress) = ropes(config, rope_dim)?;
    cfg.rope = main;
    cfg.v_head_dim = cfg.head_dim;
    let expert_ffn = req("moe_intermediate_size")?;
    cfg.ffn_dim = expert_ffn;
    let gating = match config.get("scoring_func").and_then(Value::as_str) {
        None | Some("sqrtsoftplus") => Gating::SqrtSoftplus,
        Some("softmax") => Gating::Softmax,
        Some("sigmoid") => Gating::Sigmoid,
        Some(other) => {
            return Err(bad(format!(
                "`scoring_func` `{other}` is not supported by deepseek_v4 (supported: \
                 sqrtsoftplus, softmax, sigmoid)"
            )))
        }
    };
    cfg.moe = Some(MoeConfig {
        n_experts: req("n_routed_experts")?,
        n_used: req("num_experts_per_tok")?,
        expert_ffn_dim: expert_ffn,
        n_shared: 1,
        shared_ffn_dim: None,
        gating,
        // transformers' V4 renormalises whatever `norm_topk_prob` says.
        norm_weights: true,
        scale: hf_num(config, "routed_scaling_factor")?.unwrap_or(1.5) as f32,
        n_groups: 1,
        groups_used: 1,
        layers: vec![true; n],
    });
    let _ = hf_bool(config, "norm_topk_prob")?;
    let rates = config.get("compress_rates").filter(|v| !v.is_null());
    let rate = |kind: &str, legacy: &str, default: usize| -> Result<usize> {
        match rates.and_then(|r| r.get(kind)) {
            Some(v) => v.as_u64().map(|u| u as usize).ok_or_else(|| {
                bad(format!(
                    "`compress_rates.{kind}` should be an integer, got {v}"
                ))
            }),
            None => Ok(int(legacy)?.unwrap_or(default)),
        }
    };
    let csa_rate = rate("compressed_sparse_attention", "compress_rate_csa", 4)?;
    let hca_rate = rate("heavily_compressed_attention", "compress_rate_hca", 128)?;
    let v4 = V4Config {
        layers: layer_kinds(config, n)?,
        csa_rate,
        hca_rate,
        window: req("sliding_window")?,
        q_lora_rank: req("q_lora_rank")?,
        compress_rope: compress,
        o_groups: req("o_groups")?,
        o_lora_rank: req("o_lora_rank")?,
        hc_mult: req("hc_mult")?,
        hc_iters: req("hc_sinkhorn_iters")?,
        hc_eps: hf_num(config, "hc_eps")?.unwrap_or(1e-6) as f32,
        indexer: IndexerConfig {
            n_heads: req("index_n_heads")?,
            head_dim: req("index_head_dim")?,
            top_k: req("index_topk")?,
        },
        hash_layers: hash_layers(config, n)?,
        swiglu_limit: hf_num(config, "swiglu_limit")?.unwrap_or(10.0) as f32,
    };
    check(cfg, &v4)?;
    cfg.v4 = Some(v4);
    Ok(())
}

/// What the layers index by: sizes that divide as the attention and its cache need.
fn check(cfg: &ModelConfig, v4: &V4Config) -> Result<()> {
    let bad = |m: String| Err(ModelError::Metadata(format!("config.json: {m}")));
    let (hd, rd) = (cfg.head_dim, cfg.rope.dim);
    let ix = &v4.indexer;
    let positive = [
        ("sliding_window", v4.window),
        ("q_lora_rank", v4.q_lora_rank),
        ("o_groups", v4.o_groups),
        ("o_lora_rank", v4.o_lora_rank),
        ("hc_mult", v4.hc_mult),
        ("hc_sinkhorn_iters", v4.hc_iters),
        ("index_n_heads", ix.n_heads),
        ("index_head_dim", ix.head_dim),
        ("index_topk", ix.top_k),
        ("compress_rates.compressed_sparse_attention", v4.csa_rate),
        ("compress_rates.heavily_compressed_attention", v4.hca_rate),
    ];
    for (k, v) in positive {
        if v == 0 || v > 1 << 24 {
            return bad(format!("`{k}` is {v}, outside 1..=2^24"));
        }
    }
    if rd == 0 || rd % 2 != 0 || rd > hd || rd > ix.head_dim {
        return bad(format!(
            "the rope dim {rd} must be even, non-zero and within `head_dim` {hd} and \
             `index_head_dim` {}",
            ix.head_dim
        ));
    }
    if !(cfg.n_heads * hd).is_multiple_of(v4.o_groups) {
        return bad(format!(
            "`o_groups` {} does not divide the {} values of the heads",
            v4.o_groups,
            cfg.n_heads * hd
        ));
    }
    if !(v4.hc_eps.is_finite() && v4.hc_eps >= 0.0) {
        return bad(format!(
            "`hc_eps` {} is not a finite non-negative number",
            v4.hc_eps
        ));
    }
    if !(v4.swiglu_limit.is_finite() && v4.swiglu_limit > 0.0) {
        return bad(format!(
            "`swiglu_limit` {} is not a finite positive number",
            v4.swiglu_limit
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use supernode_kernels::ops::RopeStyle;

    use crate::arch::Arch;
    use crate::config::tests::fixture_config;
    use crate::config::{Gating, IndexerConfig, RopeScaling, V4Attention};
    use crate::ModelConfig;

    /// The fixture's config.json (transformers 5's layout) gives every V4 setting.
    #[test]
    fn deepseek_v4_hf_config() {
        let cfg = ModelConfig::from_hf(&fixture_config("deepseek_v4", "config.json")).unwrap();
        assert_eq!(cfg.arch, Arch::DeepseekV4);
        assert_eq!((cfg.head_dim, cfg.n_kv_heads, cfg.rope.dim), (32, 1, 8));
        assert_eq!(cfg.rope.style, RopeStyle::Interleaved);
        assert_eq!(cfg.rope.scaling, RopeScaling::None);
        let v4 = cfg.v4.as_ref().unwrap();
        use V4Attention::*;
        assert_eq!(v4.layers, [Sliding, Csa, Hca, Csa]);
        assert_eq!((v4.csa_rate, v4.hca_rate, v4.window), (4, 8, 6));
        assert_eq!(
            (v4.hc_mult, v4.hc_iters, v4.o_groups, v4.o_lora_rank),
            (3, 20, 2, 16)
        );
        assert_eq!(
            v4.indexer,
            IndexerConfig {
                n_heads: 8,
                head_dim: 16,
                top_k: 3
            }
        );
        assert_eq!(v4.hash_layers, [true, true, false, false]);
        assert!(matches!(
            v4.compress_rope.scaling,
            RopeScaling::Yarn { factor, attn_factor, .. } if factor == 4.0 && attn_factor == 1.0
        ));
        assert_eq!(v4.compress_rope.theta, 160_000.0);
        let moe = cfg.moe.as_ref().unwrap();
        assert_eq!(moe.gating, Gating::SqrtSoftplus);
        assert_eq!((moe.n_experts, moe.n_used, moe.n_shared), (8, 2, 1));
        assert!(moe.norm_weights && moe.layers.iter().all(|&l| l));
    }

    /// DeepSeek's own config layout (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`,
    /// `rope_scaling` with `compress_rope_theta`) reads to the same settings where it can say
    /// them.
    #[test]
    fn deepseek_v4_older_config_layout() {
        let mut v = fixture_config("deepseek_v4", "config.json");
        let o = v.as_object_mut().unwrap();
        for k in [
            "layer_types",
            "mlp_layer_types",
            "rope_parameters",
            "partial_rotary_factor",
        ] {
            o.remove(k);
        }
        o.insert("compress_ratios".into(), serde_json::json!([0, 4, 128, 4]));
        o.insert("num_hash_layers".into(), 2.into());
        o.insert("qk_rope_head_dim".into(), 8.into());
        o.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 64}),
        );
        o.insert("compress_rates".into(), serde_json::json!({"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}));
        o.insert("head_dim".into(), 128.into());
        let cfg = ModelConfig::from_hf(&v).unwrap();
        let v4 = cfg.v4.as_ref().unwrap();
        use V4Attention::*;
        assert_eq!(v4.layers, [Sliding, Csa, Hca, Csa]);
        assert_eq!(v4.hash_layers, [true, true, false, false]);
        assert_eq!(cfg.rope.dim, 8);
        assert_eq!(cfg.rope.scaling, RopeScaling::None);
        assert!(matches!(
            v4.compress_rope.scaling,
            RopeScaling::Yarn { attn_factor, .. } if attn_factor == 1.0
        ));
        // Neither list: transformers' default, two HCA layers, then HCA and CSA in turn; the
        // first three layers hash-routed.
        let o = v.as_object_mut().unwrap();
        o.remove("compress_ratios");
        o.remove("num_hash_layers");
        let v4 = ModelConfig::from_hf(&v).unwrap().v4.unwrap();
        assert_eq!(v4.layers, [Hca, Hca, Hca, Csa]);
        assert_eq!(v4.hash_layers, [true, true, true, false]);
    }

    /// What the layers cannot run is an error naming its key.
    #[test]
    fn deepseek_v4_bad_configs() {
        let base = fixture_config("deepseek_v4", "config.json");
        let err = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = base.clone();
            f(&mut v);
            ModelConfig::from_hf(&v).unwrap_err().to_string()
        };
        let e = err(&|v| v["num_key_value_heads"] = 2.into());
        assert!(e.contains("`num_key_value_heads` is 2"), "{e}");
        let e = err(&|v| v["layer_types"][1] = "full_attention".into());
        assert!(
            e.contains("\"full_attention\" in `layer_types` is not one of"),
            "{e}"
        );
        let e = err(&|v| v["layer_types"] = serde_json::json!(["sliding_attention"]));
        assert!(
            e.contains("`layer_types` lists 1 layers, fewer than the 4"),
            "{e}"
        );
        let e = err(&|v| v["mlp_layer_types"][0] = "dense".into());
        assert!(
            e.contains("\"dense\" in `mlp_layer_types` is not one of"),
            "{e}"
        );
        let e = err(&|v| v["compress_rates"]["heavily_compressed_attention"] = 0.into());
        assert!(
            e.contains("`compress_rates.heavily_compressed_attention` is 0"),
            "{e}"
        );
        let e = err(&|v| v["index_topk"] = 0.into());
        assert!(e.contains("`index_topk` is 0"), "{e}");
        let e = err(&|v| v["o_groups"] = 3.into());
        assert!(e.contains("`o_groups` 3 does not divide"), "{e}");
        let e = err(&|v| v["scoring_func"] = "relu".into());
        assert!(e.contains("`scoring_func` `relu` is not supported"), "{e}");
        let e = err(&|v| v["n_shared_experts"] = 2.into());
        assert!(e.contains("`n_shared_experts` 2 is not supported"), "{e}");
        let e = err(&|v| v["swiglu_limit"] = (-1.0).into());
        assert!(e.contains("`swiglu_limit` -1"), "{e}");
    }

    /// The fixture's metadata under the keys llama.cpp's converter writes for `deepseek4`.
    fn deepseek4_meta() -> crate::Metadata {
        use crate::MetaValue;
        let mut m = crate::Metadata::default();
        let mut put = |k: &str, v: MetaValue| {
            m.entries.insert(format!("deepseek4.{k}"), v);
        };
        for (k, v) in [
            ("block_count", 4),
            ("context_length", 16384),
            ("embedding_length", 64),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 1),
            ("attention.key_length", 32),
            ("attention.value_length", 32),
            ("attention.q_lora_rank", 32),
            ("attention.sliding_window", 6),
            ("rope.dimension_count", 8),
            ("rope.scaling.original_context_length", 4096),
            ("expert_count", 8),
            ("expert_used_count", 2),
            ("expert_feed_forward_length", 32),
            ("expert_shared_count", 1),
            ("expert_gating_func", 4),
            ("attention.indexer.head_count", 8),
            ("attention.indexer.key_length", 16),
            ("attention.indexer.top_k", 3),
            ("attention.output_group_count", 2),
            ("attention.output_lora_rank", 16),
            ("hyper_connection.count", 3),
            ("hyper_connection.sinkhorn_iterations", 20),
            ("hash_layer_count", 2),
        ] {
            put(k, MetaValue::U32(v));
        }
        for (k, v) in [
            ("attention.layer_norm_rms_epsilon", 1e-6),
            ("rope.freq_base", 10_000.0),
            ("rope.scaling.factor", 4.0),
            ("attention.compress_rope_freq_base", 160_000.0),
            ("hyper_connection.epsilon", 1e-6),
            ("expert_weights_scale", 1.5),
        ] {
            put(k, MetaValue::F32(v));
        }
        put("rope.scaling.type", MetaValue::String("yarn".into()));
        put("expert_weights_norm", MetaValue::Bool(true));
        put(
            "attention.compress_ratios",
            MetaValue::Array([0u32, 4, 8, 4].map(MetaValue::U32).to_vec()),
        );
        put(
            "swiglu_clamp_exp",
            MetaValue::Array(vec![MetaValue::F32(1.0); 4]),
        );
        m.entries.insert(
            "general.architecture".into(),
            MetaValue::String("deepseek4".into()),
        );
        m
    }

    /// The fixture as a `deepseek4` GGUF (its tensors under their GGUF names, llama.cpp's
    /// converter's keys, the hash tables as I32 as the converter writes them): the config
    /// config.json gives, and the same logits bit for bit; bad metadata is one error naming
    /// its key.
    #[test]
    fn deepseek4_gguf_loads_as_the_safetensors_do() {
        use crate::gguf::GgufWriter;
        use crate::{load_model, LoadOptions, MetaValue};
        use supernode_kernels::DType;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf/deepseek_v4");
        let st = crate::safetensors::read_safetensors_dir(&dir).unwrap();
        let write = |meta: crate::Metadata, path: &std::path::Path| {
            let mut w = GgufWriter::new();
            for (k, v) in meta.entries {
                w.meta(&k, v);
            }
            for t in &st.tensors {
                if t.name.ends_with("ffn_gate_tid2eid.weight") {
                    // (Read from safetensors as f32 numbers; written back as integers.)
                    let ints: Vec<u8> = t
                        .bytes()
                        .chunks_exact(4)
                        .flat_map(|b| {
                            (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i32).to_le_bytes()
                        })
                        .collect();
                    w.raw_tensor(
                        &t.name,
                        26,
                        t.shape.iter().map(|&d| d as u64).collect(),
                        ints,
                    );
                } else {
                    assert_eq!(t.dtype, DType::F32);
                    w.tensor(&t.name, t.dtype, &t.shape, t.bytes().to_vec());
                }
            }
            w.write(path).unwrap();
        };
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("deepseek_v4.gguf");
        write(deepseek4_meta(), &path);
        let file = crate::gguf::read_gguf(&path).unwrap();
        let gguf = ModelConfig::from_gguf(&file.metadata, 256).unwrap();
        let hf = ModelConfig::from_hf(&fixture_config("deepseek_v4", "config.json")).unwrap();
        assert_eq!(gguf.v4, hf.v4);
        assert_eq!(gguf.moe, hf.moe);
        assert_eq!(gguf.rope, hf.rope);
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 256).collect();
        let logits = |p: &std::path::Path| {
            let model = load_model(p, &LoadOptions::default()).unwrap().model;
            let specs = model.kv_specs();
            let mut kv = crate::KvCache::new(&specs, 16, 3).unwrap();
            let positions: Vec<usize> = (0..tokens.len()).collect();
            let table = [0u32, 1, 2];
            let tables = [table.as_slice()];
            let batch = crate::Batch {
                tokens: &tokens,
                positions: &positions,
                seq_of: &[0; 40],
                block_tables: &tables,
                logits_for: &positions,
                state_slots: &[],
                chunked_until: &[],
                drafts: &[],
            };
            let out = model.forward(&batch, &mut kv).unwrap();
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(logits(&path), logits(&dir));
        let mut bad = deepseek4_meta();
        bad.entries.remove("deepseek4.hyper_connection.count");
        let e = ModelConfig::from_gguf(&bad, 256).unwrap_err().to_string();
        assert!(
            e.contains("missing `deepseek4.hyper_connection.count`"),
            "{e}"
        );
        let mut bad = deepseek4_meta();
        bad.entries.insert(
            "deepseek4.swiglu_clamp_exp".into(),
            MetaValue::Array(vec![MetaValue::F32(1.0), MetaValue::F32(2.0)]),
        );
        let e = ModelConfig::from_gguf(&bad, 256).unwrap_err().to_string();
        assert!(
            e.contains("`deepseek4.swiglu_clamp_exp` must give every layer"),
            "{e}"
        );
        let mut bad = deepseek4_meta();
        bad.entries.insert(
            "deepseek4.attention.compress_ratios".into(),
            MetaValue::Array([0u32, 4, 8, 128].map(MetaValue::U32).to_vec()),
        );
        let e = ModelConfig::from_gguf(&bad, 256).unwrap_err().to_string();
        assert!(
            e.contains("two heavily compressed ratios (8 and 128)"),
            "{e}"
        );
        let mut bad = deepseek4_meta();
        bad.entries.insert(
            "deepseek4.swiglu_clamp_shexp".into(),
            MetaValue::Array(vec![MetaValue::F32(2.0); 4]),
        );
        let e = ModelConfig::from_gguf(&bad, 256).unwrap_err().to_string();
        assert!(e.contains("`deepseek4.swiglu_clamp_shexp` differs"), "{e}");
        let mut plain = deepseek4_meta();
        plain.entries.insert(
            "deepseek4.expert_weights_norm".into(),
            MetaValue::Bool(false),
        );
        let cfg = ModelConfig::from_gguf(&plain, 256).unwrap();
        assert!(!cfg.moe.unwrap().norm_weights);
    }
}

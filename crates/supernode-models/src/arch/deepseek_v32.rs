//! DeepSeek-V3.2 (llama.cpp's `deepseek32`): DeepSeek-V3 with DeepSeek Sparse Attention. Each
//! MLA layer has a lightning indexer that scores the cached positions and lets a query attend
//! to its `index_topk` best only; its keys are cached per token beside the latent.
//!
//! The forward pass is the shared [`PreNormDecoder`] with [`Mla`] attention carrying an
//! [`Indexer`](crate::layers::Indexer); this file reads the config (GGUF and config.json) —
//! V3's keys, read by [`deepseek_v3`]'s readers, plus the indexer's — and names the indexer's
//! tensors.
//!
//! Follows transformers' `DeepseekV32ForCausalLM` (MLA rope always in neighbouring pairs, the
//! indexer's in halves; every layer `indexed_attention`) and llama.cpp's `deepseek32` graph.

use serde_json::Value;
use supernode_kernels::ops::RopeStyle;

use crate::arch::{deepseek_v3, llama, Arch, Family, Model};
use crate::config::{hf_int, IndexerConfig};
use crate::names::{only, Row};
use crate::weights::Weights;
use crate::{Metadata, ModelConfig, ModelError, Result};

/// The family's entry points.
pub const FAMILY: Family = Family {
    read_gguf: deepseek32_from_gguf,
    hf_defaults,
    read_hf,
    gguf_tensors: None,
    build,
    keys: deepseek_v3::KEYS,
    hf_names: HF_NAMES,
};

const V32: &[&str] = &["deepseek_v32", "deepseek32"];

/// The indexer's tensors (MLA's and the MoE's are V3's rows).
const HF_NAMES: &[Row] = &[
    only(
        "self_attn.indexer.wq_b.weight",
        "indexer.attn_q_b.weight",
        V32,
    ),
    only("self_attn.indexer.wk.weight", "indexer.attn_k.weight", V32),
    only(
        "self_attn.indexer.k_norm.weight",
        "indexer.k_norm.weight",
        V32,
    ),
    only("self_attn.indexer.k_norm.bias", "indexer.k_norm.bias", V32),
    only(
        "self_attn.indexer.weights_proj.weight",
        "indexer.proj.weight",
        V32,
    ),
];

fn build(cfg: ModelConfig, w: &Weights) -> Result<Box<dyn Model>> {
    Ok(Box::new(deepseek_v3::load(cfg, w)?))
}

/// transformers' `DeepseekV32Config` defaults (MLA, MoE and indexer sizes are read with their
/// defaults).
fn hf_defaults(_: Arch) -> Value {
    serde_json::json!({
        "vocab_size": 129_280, "hidden_size": 7168, "intermediate_size": 18_432,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "max_position_embeddings": 163_840, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
    })
}

/// V3's reading, with the indexer's `attention.indexer.{head_count, key_length, top_k}`. (The
/// multi-token-prediction layers the converter appends to `block_count` are taken off in
/// [`ModelConfig::from_gguf`].)
fn deepseek32_from_gguf(cfg: &mut ModelConfig, meta: &Metadata) -> Result<()> {
    deepseek_v3::deepseek2_from_gguf(cfg, meta)?;
    let key = |k: &str| format!("{}.attention.indexer.{k}", cfg.arch.gguf_name());
    let req = |k: &str| -> Result<usize> {
        meta.get_usize(&key(k))?
            .ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
    };
    let indexer = IndexerConfig {
        n_heads: req("head_count")?,
        head_dim: req("key_length")?,
        top_k: req("top_k")?,
    };
    set_indexer(cfg, indexer)
}

/// V3's keys (MLA, YaRN, routing), then V3.2's: every layer `indexed_attention`, the MLP kinds
/// of `mlp_layer_types` where given, the indexer's `index_n_heads`, `index_head_dim`,
/// `index_topk`. transformers has no `rope_interleave` for V3.2: MLA's rope always pairs
/// neighbours.
fn read_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
    let bad = |m: String| ModelError::Metadata(format!("config.json: {m}"));
    if let Some(types) = config.get("layer_types").filter(|v| !v.is_null()) {
        let ok = types
            .as_array()
            .is_some_and(|t| t.iter().all(|t| t.as_str() == Some("indexed_attention")));
        if !ok {
            return Err(bad(format!(
                "`layer_types` {types} is not supported by deepseek_v32 (supported: \
                 \"indexed_attention\" on every layer)"
            )));
        }
    }
    let mut shared = config.clone();
    if let Some(obj) = shared.as_object_mut() {
        obj.remove("layer_types");
    }
    llama::hf_checks(&shared)?;
    deepseek_v3::deepseek_v3_from_hf(cfg, config)?;
    cfg.rope.style = RopeStyle::Interleaved;
    if let Some(types) = config.get("mlp_layer_types").filter(|v| !v.is_null()) {
        let sparse: Option<Vec<bool>> = types.as_array().and_then(|t| {
            t.iter()
                .map(|t| match t.as_str() {
                    Some("dense") => Some(false),
                    Some("sparse") => Some(true),
                    _ => None,
                })
                .collect()
        });
        match (sparse, cfg.moe.as_mut()) {
            (Some(layers), Some(moe)) if layers.len() == cfg.n_layers => moe.layers = layers,
            _ => {
                return Err(bad(format!(
                    "`mlp_layer_types` {types} should list \"dense\" or \"sparse\" for each of \
                     the {} layers",
                    cfg.n_layers
                )))
            }
        }
    }
    let int = |k: &str| hf_int(config, k);
    let indexer = IndexerConfig {
        n_heads: int("index_n_heads")?.unwrap_or(64),
        head_dim: int("index_head_dim")?.unwrap_or(128),
        top_k: int("index_topk")?.unwrap_or(2048),
    };
    set_indexer(cfg, indexer)
}

fn set_indexer(cfg: &mut ModelConfig, indexer: IndexerConfig) -> Result<()> {
    match cfg.mla.as_mut() {
        Some(mla) => {
            mla.indexer = Some(indexer);
            Ok(())
        }
        None => Err(ModelError::Invalid(
            "DeepSeek-V3.2 needs an MLA configuration".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use supernode_kernels::ops::RopeStyle;

    use crate::arch::Arch;
    use crate::config::tests::fixture_config;
    use crate::config::IndexerConfig;
    use crate::ModelConfig;

    /// The V3.2 fixture in both layouts: V3's MLA and routing, the indexer, the MLP kinds.
    #[test]
    fn deepseek_v32_hf_indexer() {
        for file in ["config.json", "config.transformers5.json"] {
            let cfg = ModelConfig::from_hf(&fixture_config("deepseek_v32", file)).unwrap();
            assert_eq!(cfg.arch, Arch::DeepseekV32);
            assert_eq!((cfg.head_dim, cfg.v_head_dim, cfg.rope.dim), (24, 16, 8));
            assert_eq!(cfg.rope.style, RopeStyle::Interleaved);
            let mla = cfg.mla.as_ref().unwrap();
            assert_eq!(
                mla.indexer,
                Some(IndexerConfig {
                    n_heads: 8,
                    head_dim: 16,
                    top_k: 8
                }),
                "{file}"
            );
            assert_eq!(cfg.moe.as_ref().unwrap().layers, [false, true, true]);
        }
    }

    /// Bad indexer and layer settings are errors naming their keys.
    #[test]
    fn deepseek_v32_bad_configs() {
        let base = fixture_config("deepseek_v32", "config.transformers5.json");
        let err = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = base.clone();
            f(&mut v);
            ModelConfig::from_hf(&v).unwrap_err().to_string()
        };
        let e = err(&|v| v["index_topk"] = 0.into());
        assert!(e.contains("`index_topk` is 0"), "{e}");
        let e = err(&|v| v["index_head_dim"] = 4.into());
        assert!(
            e.contains("`index_head_dim` is 4, less than the 8 roped dims"),
            "{e}"
        );
        let e = err(&|v| v["q_lora_rank"] = serde_json::Value::Null);
        assert!(e.contains("`q_lora_rank` is not set"), "{e}");
        let e = err(&|v| v["layer_types"][1] = "full_attention".into());
        assert!(e.contains("`layer_types`"), "{e}");
        let e = err(&|v| v["mlp_layer_types"] = serde_json::json!(["dense", "sparse"]));
        assert!(e.contains("`mlp_layer_types`"), "{e}");
    }

    /// llama.cpp's converter's file of the fixture (its `deepseek32.*` keys) gives the config
    /// config.json gives; without an indexer key it is an error naming the key.
    #[test]
    fn deepseek32_gguf_matches_hf() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf/deepseek_v32/model.gguf");
        let file = crate::gguf::read_gguf(&path).unwrap();
        let gguf = ModelConfig::from_gguf(&file.metadata, 256).unwrap();
        let hf = ModelConfig::from_hf(&fixture_config("deepseek_v32", "config.json")).unwrap();
        assert_eq!(gguf.arch, Arch::DeepseekV32);
        assert_eq!(gguf.mla, hf.mla);
        assert_eq!(gguf.moe, hf.moe);
        assert_eq!(gguf.rope.style, hf.rope.style);
        assert!((gguf.attn_scale - hf.attn_scale).abs() < 1e-6);
        let mut meta = file.metadata.clone();
        meta.entries.remove("deepseek32.attention.indexer.top_k");
        let e = ModelConfig::from_gguf(&meta, 256).unwrap_err().to_string();
        assert!(
            e.contains("missing `deepseek32.attention.indexer.top_k`"),
            "{e}"
        );
    }
}

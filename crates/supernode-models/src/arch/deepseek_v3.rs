//! DeepSeek-V3 / R1 (and V2, as llama.cpp's `deepseek2`): multi-head latent attention whose
//! cache holds one compressed latent and one roped key per token, and a mixture of experts with
//! a sigmoid router, a selection-only bias, group-limited choice and a shared expert; the first
//! layers keep a dense SwiGLU.
//!
//! The forward pass is the shared [`PreNormDecoder`] with [`Mla`] attention; this file reads
//! the config (GGUF and config.json) into it.
//!
//! Follows transformers' `DeepseekV3ForCausalLM` and llama.cpp's `llm_build_deepseek2` (MLA
//! branch). YaRN's frequencies, cos/sin factor and softmax correction are settled in
//! [`ModelConfig`]; the MLA sizes in [`ModelConfig::mla`], the routing in [`ModelConfig::moe`].

use serde_json::Value;
use supernode_kernels::ops::{Activation, RopeStyle};

use crate::arch::decoder::{DecoderOptions, PreNormDecoder};
use crate::arch::{llama, Arch, Family, Model};
use crate::config::{
    hf_as_num, hf_bool, hf_int, hf_num, hf_rope_field, yarn_mscale, Gating, KeyNames, MlaConfig,
    MoeConfig, RopeScaling,
};
use crate::layers::Mla;
use crate::names::{only, Row};
use crate::weights::Weights;
use crate::{Metadata, ModelConfig, ModelError, Result};

/// The family's entry points.
pub const FAMILY: Family = Family {
    read_gguf: deepseek2_from_gguf,
    hf_defaults,
    read_hf,
    gguf_tensors: None,
    build,
    keys: KEYS,
    hf_names: HF_NAMES,
};

/// The keys DeepSeek's errors name (V3's and V3.2's).
pub const KEYS: KeyNames = KeyNames {
    head_dim: Some((
        "attention.key_length_mla",
        "qk_nope_head_dim` + `qk_rope_head_dim",
    )),
    v_head_dim: ("attention.value_length_mla", "v_head_dim"),
    rope_dim: Some(("rope.dimension_count", "qk_rope_head_dim")),
    attn_scale: (
        Some("rope.scaling.yarn_log_multiplier"),
        Some("rope_scaling.mscale_all_dim"),
    ),
    hf_experts: "n_routed_experts",
};

/// Multi-head latent attention (DeepSeek-V2/V3, and V3.2 with its indexer).
const MLA: &[&str] = &[
    "deepseek_v2",
    "deepseek_v3",
    "deepseek2",
    "deepseek_v32",
    "deepseek32",
];

/// The router's selection bias, the shared experts and the MLA projections and norms (the
/// router and routed experts are in the shared table).
const HF_NAMES: &[Row] = &[
    only("mlp.gate.e_score_correction_bias", "exp_probs_b.bias", MLA),
    only(
        "mlp.shared_experts.gate_proj.weight",
        "ffn_gate_shexp.weight",
        MLA,
    ),
    only(
        "mlp.shared_experts.up_proj.weight",
        "ffn_up_shexp.weight",
        MLA,
    ),
    only(
        "mlp.shared_experts.down_proj.weight",
        "ffn_down_shexp.weight",
        MLA,
    ),
    // Multi-head latent attention.
    only("self_attn.q_a_proj.weight", "attn_q_a.weight", MLA),
    only(
        "self_attn.q_a_layernorm.weight",
        "attn_q_a_norm.weight",
        MLA,
    ),
    only("self_attn.q_b_proj.weight", "attn_q_b.weight", MLA),
    only(
        "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_mqa.weight",
        MLA,
    ),
    only(
        "self_attn.kv_a_layernorm.weight",
        "attn_kv_a_norm.weight",
        MLA,
    ),
    only("self_attn.kv_b_proj.weight", "attn_kv_b.weight", MLA),
];

/// DeepSeek's decoder blocks (V3 and V4 alike): SwiGLU feed-forwards, no post-norms.
pub(crate) const OPTIONS: DecoderOptions = DecoderOptions {
    act: Activation::Silu,
    post_norms: false,
    ffn_norm: "ffn_norm.weight",
};

/// A DeepSeek-V3 / R1 model.
pub type DeepseekV3 = PreNormDecoder<Mla>;

/// Loads a DeepSeek model.
pub fn load(cfg: ModelConfig, w: &Weights) -> Result<DeepseekV3> {
    let mla = cfg
        .mla
        .clone()
        .ok_or_else(|| ModelError::Invalid("a DeepSeek model needs an MLA configuration".into()))?;
    let c = cfg.clone();
    PreNormDecoder::load(cfg, w, OPTIONS, |i| Mla::load(&c, &mla, w, i))
}

fn build(cfg: ModelConfig, w: &Weights) -> Result<Box<dyn Model>> {
    Ok(Box::new(load(cfg, w)?))
}

/// transformers' `DeepseekV3Config` defaults (MLA and MoE sizes are read with their defaults).
fn hf_defaults(_: Arch) -> Value {
    serde_json::json!({
        "vocab_size": 129_280, "hidden_size": 7168, "intermediate_size": 18_432,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
    })
}

/// What the shared decoder cannot run (as for the Llama family), then DeepSeek's own keys.
fn read_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
    llama::hf_checks(config)?;
    deepseek_v3_from_hf(cfg, config)
}

/// DeepSeek-V2/V3 as llama.cpp's converter writes them (`deepseek2`): MLA sizes from
/// `attention.{q,kv}_lora_rank`, per-head sizes from `attention.key_length_mla` /
/// `value_length_mla` (newer files, whose `key_length` is the latent row `kv_lora_rank +
/// rope`) or `key_length` / `value_length` (older ones); the MoE from `expert_*` keys, the
/// first `leading_dense_block_count` layers dense; the YaRN softmax correction from
/// `rope.scaling.yarn_log_multiplier` (`0.1 * mscale_all_dim`).
pub(crate) fn deepseek2_from_gguf(cfg: &mut ModelConfig, meta: &Metadata) -> Result<()> {
    // `deepseek2`, or `deepseek32` for V3.2, whose keys are V3's plus the indexer's.
    let arch = cfg.arch.gguf_name();
    let key = |k: &str| format!("{arch}.{k}");
    let opt = |k: &str| meta.get_usize(&key(k));
    let req = |k: &str| -> Result<usize> {
        opt(k)?.ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
    };
    // DeepSeek's rope dims come in adjacent pairs in the checkpoint itself (transformers'
    // `rope_interleave`), unpermuted by the converter.
    cfg.rope.style = RopeStyle::Interleaved;
    let kv_lora_rank = req("attention.kv_lora_rank")?;
    let rope_dim = cfg.rope.dim;
    match (
        opt("attention.key_length_mla")?,
        opt("attention.value_length_mla")?,
    ) {
        (Some(k), Some(v)) => (cfg.head_dim, cfg.v_head_dim) = (k, v),
        (None, None) => {}
        _ => {
            return Err(ModelError::Metadata(format!(
                "`{}` and `{}` come together",
                key("attention.key_length_mla"),
                key("attention.value_length_mla")
            )))
        }
    }
    cfg.n_kv_heads = cfg.n_heads;
    cfg.mla = Some(MlaConfig {
        q_lora_rank: opt("attention.q_lora_rank")?,
        kv_lora_rank,
        qk_nope_dim: cfg.head_dim.saturating_sub(rope_dim),
        qk_rope_dim: rope_dim,
        indexer: None,
    });
    cfg.attn_scale = 1.0 / (cfg.head_dim as f32).sqrt();
    if let (
        RopeScaling::Yarn {
            factor,
            attn_factor,
            ..
        },
        Some(log_mul),
    ) = (
        &mut cfg.rope.scaling,
        meta.get_f64(&key("rope.scaling.yarn_log_multiplier"))?,
    ) {
        // The converter writes `0.1 * mscale_all_dim` here and means YaRN's magnitude
        // correction to go wholly into the softmax scale (llama.cpp's
        // TAG_DEEPSEEK2_YARN_LOG_MUL_FIX): cos and sin are then left unscaled, as transformers
        // leaves them when `mscale == mscale_all_dim`.
        *attn_factor = 1.0;
        let m = yarn_mscale(*factor, log_mul / 0.1);
        cfg.attn_scale *= (m * m) as f32;
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
    if dense > cfg.n_layers {
        return Err(ModelError::Metadata(format!(
            "`{}` is {dense}, more than the {} layers (`{}`)",
            key("leading_dense_block_count"),
            cfg.n_layers,
            key("block_count")
        )));
    }
    cfg.moe = Some(MoeConfig {
        n_experts: req("expert_count")?,
        n_used: req("expert_used_count")?,
        expert_ffn_dim: req("expert_feed_forward_length")?,
        n_shared: opt("expert_shared_count")?.unwrap_or(0),
        shared_ffn_dim: None,
        gating,
        norm_weights: meta.get_bool(&key("expert_weights_norm"))?.unwrap_or(false),
        scale: meta.get_f64(&key("expert_weights_scale"))?.unwrap_or(1.0) as f32,
        n_groups: opt("expert_group_count")?.unwrap_or(1).max(1),
        groups_used: opt("expert_group_used_count")?.unwrap_or(1).max(1),
        layers: (0..cfg.n_layers).map(|i| i >= dense).collect(),
    });
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
pub(crate) fn deepseek_v3_from_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
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
    cfg.head_dim = nope + rope;
    cfg.v_head_dim = int("v_head_dim")?.unwrap_or(128);
    cfg.n_kv_heads = cfg.n_heads;
    cfg.rope.dim = rope;
    if hf_bool(config, "rope_interleave")? == Some(false) {
        cfg.rope.style = RopeStyle::Halves;
    } else {
        cfg.rope.style = RopeStyle::Interleaved;
    }
    cfg.mla = Some(MlaConfig {
        q_lora_rank: int("q_lora_rank")?,
        kv_lora_rank: int("kv_lora_rank")?.unwrap_or(512),
        qk_nope_dim: nope,
        qk_rope_dim: rope,
        indexer: None,
    });
    cfg.attn_scale = 1.0 / (cfg.head_dim as f32).sqrt();
    if let RopeScaling::Yarn { factor, .. } = cfg.rope.scaling {
        let all_dim = hf_rope_field(config, config.get("rope_parameters"), "mscale_all_dim")
            .map(|v| hf_as_num("rope_scaling.mscale_all_dim", v))
            .transpose()?
            .unwrap_or(0.0);
        if all_dim != 0.0 {
            let m = yarn_mscale(factor, all_dim);
            cfg.attn_scale *= (m * m) as f32;
        }
    }
    let dense = int("first_k_dense_replace")?.unwrap_or(3);
    if dense > cfg.n_layers {
        return Err(bad(format!(
            "`first_k_dense_replace` is {dense}, more than the {} layers \
             (`num_hidden_layers`)",
            cfg.n_layers
        )));
    }
    cfg.moe = Some(MoeConfig {
        n_experts: int("n_routed_experts")?
            .or(int("num_local_experts")?)
            .unwrap_or(256),
        n_used: int("num_experts_per_tok")?.unwrap_or(8),
        expert_ffn_dim: int("moe_intermediate_size")?.unwrap_or(2048),
        n_shared: int("n_shared_experts")?.unwrap_or(1),
        shared_ffn_dim: None,
        gating: Gating::Sigmoid,
        norm_weights: hf_bool(config, "norm_topk_prob")?.unwrap_or(true),
        scale: hf_num(config, "routed_scaling_factor")?.unwrap_or(2.5) as f32,
        n_groups: int("n_group")?.unwrap_or(8),
        groups_used: int("topk_group")?.unwrap_or(4),
        layers: (0..cfg.n_layers).map(|i| i >= dense).collect(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use supernode_kernels::ops::RopeStyle;

    use crate::arch::Arch;
    use crate::config::tests::{close, deepseek2_meta, fixture_config};
    use crate::config::Gating;
    use crate::ModelConfig;

    /// The same checkpoint as a GGUF (the safetensors' tensors under their GGUF names, written
    /// with llama.cpp's `deepseek2` keys and the NextN layer counted in `block_count`, as its
    /// converter does for the DeepSeek models whose MTP layer it keeps): the MTP layer loads
    /// from it and computes the same bits as from safetensors.
    #[test]
    fn the_mtp_layer_loads_from_gguf_as_from_safetensors() {
        use crate::gguf::GgufWriter;
        use crate::{load_model, Batch, KvCache, LoadOptions, MetaValue};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf/deepseek_v3_mtp");
        let st = crate::safetensors::read_safetensors_dir(&dir).unwrap();
        let mut meta = deepseek2_meta();
        meta.entries
            .insert("deepseek2.block_count".into(), MetaValue::U32(4));
        meta.entries
            .insert("deepseek2.nextn_predict_layers".into(), MetaValue::U32(1));
        meta.entries.insert(
            "deepseek2.attention.layer_norm_rms_epsilon".into(),
            MetaValue::F32(1e-6),
        );
        let mut w = GgufWriter::new();
        for (k, v) in meta.entries {
            w.meta(&k, v);
        }
        for t in &st.tensors {
            w.tensor(&t.name, t.dtype, &t.shape, t.bytes().to_vec());
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("deepseek_v3_mtp.gguf");
        w.write(&path).unwrap();
        let opts = LoadOptions {
            mtp: true,
            ..LoadOptions::default()
        };
        let from_st = load_model(&dir, &opts).unwrap().model;
        let from_gguf = load_model(&path, &opts).unwrap().model;
        assert!(from_st.has_nextn() && from_gguf.has_nextn());
        assert_eq!(from_gguf.config().n_layers, 3);
        let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 250) as u32 + 3).collect();
        let positions: Vec<usize> = (0..20).collect();
        let h = from_st.config().hidden;
        let hidden: Vec<f32> = (0..20 * h)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let all: Vec<usize> = (0..20).collect();
        let table = [0u32, 1];
        let tables = [table.as_slice()];
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            seq_of: &[0; 20],
            block_tables: &tables,
            logits_for: &all,
            state_slots: &[],
            chunked_until: &[],
            drafts: &[],
        };
        let run = |m: &dyn crate::Model| {
            let mut kv = KvCache::new(&m.nextn_kv_specs(), 16, 2).unwrap();
            let mut hid = Vec::new();
            let logits = m.forward_nextn(&batch, &hidden, &mut kv, &mut hid).unwrap();
            (logits, hid)
        };
        let (a, b) = (run(from_gguf.as_ref()), run(from_st.as_ref()));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&a.0) == bits(&b.0) && bits(&a.1) == bits(&b.1));
    }

    /// DeepSeek-V3's multi-token-prediction layer (MLA and MoE, its own embedding and head) in
    /// `deepseek_v3_mtp` against the float64 NumPy version of it in
    /// `tools/make_deepseek_mtp_fixture.py`.
    #[test]
    fn the_mtp_layer_matches_its_float64_reference() {
        crate::arch::tests::check_mtp_reference("deepseek_v3_mtp", |cfg, w| {
            Ok(Box::new(super::load(cfg, w)?))
        });
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
}

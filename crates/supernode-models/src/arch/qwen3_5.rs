//! The Qwen3.5 family: `qwen3_5` (dense) and `qwen3_5_moe` text models, and Qwen3-Next — hybrid
//! decoders whose layers are mostly Gated DeltaNet linear attention ([`GatedDeltaNet`], a
//! recurrent state per sequence), with a gated full-attention layer ([`Attention::load_gated`]:
//! an output gate, per-head Q/K norms, partial rotary) every few layers.
//!
//! The forward pass is the shared [`PreNormDecoder`]; a block's "attention" is a [`Mixer`],
//! one of the two. The feed-forward is a SwiGLU (Qwen3.5) or a softmax-routed MoE whose shared
//! expert is scaled by `sigmoid(shared_expert_gate x)` (Qwen3.5-MoE: every layer; Qwen3-Next:
//! the Qwen3-MoE layer rules). Norms are zero-centred `(1 + w)` in HF checkpoints (llama.cpp's
//! converter adds the 1), except the linear attention's gated norm.
//!
//! Names and files:
//! - HF `model_type` `qwen3_5_text`, `qwen3_5_moe_text` and `qwen3_next`; the multimodal
//!   `qwen3_5` / `qwen3_5_moe` checkpoints load their `text_config` and language model only
//!   (the vision tower is not loaded; the loader says so).
//! - GGUF `qwen35`, `qwen35moe` (whose converter reorders the value heads so that value head
//!   `h` reads key head `h % n_k_heads`) and `qwen3next` (grouped order, fused `ssm_ba`).
//! - HF tensors map to llama.cpp's names; `A_log` becomes `ssm_a_log` (GGUF holds
//!   `-exp(A_log)` as `ssm_a`), Qwen3-Next's fused `in_proj_qkvz` is the legacy `ssm_in`.

use serde_json::Value;
use supernode_kernels::ops::Activation;

use crate::arch::decoder::{DecoderOptions, PreNormDecoder};
use crate::arch::{llama, Arch, Family, Model};
use crate::config::{hf_int, hf_num, Gating, KeyNames, LinearAttnConfig, MoeConfig};
use crate::kv_cache::{KvLayerSpec, LayerKv};
use crate::layers::{Attention, BlockAttention, DeltaNetShape, GatedDeltaNet, LayerCtx};
use crate::names::{only, Row};
use crate::weights::Weights;
use crate::{Metadata, ModelConfig, ModelError, Result};

const QWEN35: &[&str] = &[
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen35",
    "qwen35moe",
];
const NEXT: &[&str] = &["qwen3_next", "qwen3next"];
const ALL: &[&str] = &[
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen35",
    "qwen35moe",
    "qwen3_next",
    "qwen3next",
];

/// The family's entry points.
pub const FAMILY: Family = Family {
    read_gguf,
    hf_defaults,
    read_hf,
    gguf_tensors: None,
    build,
    keys: KeyNames::SHARED,
    hf_names: &HF_NAMES,
};

/// HF names (inside `model.layers.{i}.`) → llama.cpp's names.
static HF_NAMES: [Row; 20] = [
    only(
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
        ALL,
    ),
    only("linear_attn.in_proj_qkv.weight", "attn_qkv.weight", QWEN35),
    only("linear_attn.in_proj_z.weight", "attn_gate.weight", QWEN35),
    only("linear_attn.in_proj_b.weight", "ssm_beta.weight", QWEN35),
    only("linear_attn.in_proj_a.weight", "ssm_alpha.weight", QWEN35),
    only("linear_attn.in_proj_qkvz.weight", "ssm_in.weight", NEXT),
    only("linear_attn.in_proj_ba.weight", "ssm_ba.weight", NEXT),
    only("linear_attn.conv1d.weight", "ssm_conv1d.weight", ALL),
    only("linear_attn.dt_bias", "ssm_dt.bias", ALL),
    only("linear_attn.A_log", "ssm_a_log", ALL),
    only("linear_attn.norm.weight", "ssm_norm.weight", ALL),
    only("linear_attn.out_proj.weight", "ssm_out.weight", ALL),
    only("mlp.gate.weight", "ffn_gate_inp.weight", ALL),
    only(
        "mlp.experts.{e}.gate_proj.weight",
        "ffn_gate_exps.weight",
        ALL,
    ),
    only("mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight", ALL),
    only(
        "mlp.experts.{e}.down_proj.weight",
        "ffn_down_exps.weight",
        ALL,
    ),
    only(
        "mlp.shared_expert.gate_proj.weight",
        "ffn_gate_shexp.weight",
        ALL,
    ),
    only(
        "mlp.shared_expert.up_proj.weight",
        "ffn_up_shexp.weight",
        ALL,
    ),
    only(
        "mlp.shared_expert.down_proj.weight",
        "ffn_down_shexp.weight",
        ALL,
    ),
    only(
        "mlp.shared_expert_gate.weight",
        "ffn_gate_inp_shexp.weight",
        ALL,
    ),
];

/// A block's token mixer: gated full attention or Gated DeltaNet.
pub enum Mixer {
    Attention(Box<Attention>),
    Linear(Box<GatedDeltaNet>),
}

impl BlockAttention for Mixer {
    fn forward(&self, x: &[f32], ctx: &mut LayerCtx, kv: &mut LayerKv, out: &mut [f32]) {
        match self {
            Mixer::Attention(a) => a.forward(x, ctx, kv, out),
            Mixer::Linear(l) => l.forward(x, ctx, &mut kv.state, out),
        }
    }

    fn weight_bytes(&self) -> usize {
        match self {
            Mixer::Attention(a) => a.weight_bytes(),
            Mixer::Linear(l) => l.weight_bytes(),
        }
    }

    fn kv_spec(&self) -> KvLayerSpec {
        match self {
            Mixer::Attention(a) => a.kv_spec(),
            Mixer::Linear(_) => KvLayerSpec::NONE,
        }
    }

    fn state_width(&self) -> usize {
        match self {
            Mixer::Attention(_) => 0,
            Mixer::Linear(l) => l.shape.state_len(),
        }
    }

    fn rollback_drafts(&self, kv: &mut LayerKv, slot: usize, accepted: usize) {
        if let Mixer::Linear(l) = self {
            l.rollback_drafts(&mut kv.state, slot, accepted);
        }
    }
}

/// A Qwen3.5-family model.
pub type Qwen35 = PreNormDecoder<Mixer>;

/// Loads a Qwen3.5-family model.
pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Qwen35> {
    let linear = cfg.linear.clone().ok_or_else(|| {
        ModelError::Invalid("a Qwen3.5-family config without linear attention".into())
    })?;
    let shape = DeltaNetShape {
        n_k_heads: linear.n_k_heads,
        n_v_heads: linear.n_v_heads,
        k_dim: linear.k_dim,
        v_dim: linear.v_dim,
        conv_taps: linear.conv_taps,
        tiled_v_heads: linear.tiled_v_heads,
    };
    let opts = DecoderOptions {
        act: Activation::Silu,
        post_norms: false,
        ffn_norm: "post_attention_norm.weight",
    };
    let c = cfg.clone();
    PreNormDecoder::load(cfg, w, opts, |i| {
        // Past the decoder's layers: the NextN layer, a full-attention one.
        Ok(if linear.layers.get(i).copied().unwrap_or(false) {
            let l = GatedDeltaNet::load(w, i, c.hidden, c.rms_eps, shape)?;
            Mixer::Linear(Box::new(l))
        } else {
            Mixer::Attention(Box::new(Attention::load_gated(&c, w, i)?))
        })
    })
}

fn build(cfg: ModelConfig, w: &Weights) -> Result<Box<dyn Model>> {
    Ok(Box::new(load(cfg, w)?))
}

/// The config.json of the text model inside a multimodal Qwen3.5 checkpoint (`model_type`
/// `qwen3_5` or `qwen3_5_moe`); only the text model is loaded (no vision tower).
pub fn hf_text_config(config: &Value) -> Result<Value> {
    let outer = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("qwen3_5");
    let mut text = config
        .get("text_config")
        .filter(|t| t.is_object())
        .cloned()
        .ok_or_else(|| {
            ModelError::Metadata(format!(
                "config.json: a `{outer}` model needs a `text_config` object"
            ))
        })?;
    text["model_type"] = format!("{outer}_text").into();
    if text.get("tie_word_embeddings").is_none() {
        if let Some(tie) = config.get("tie_word_embeddings") {
            text["tie_word_embeddings"] = tie.clone();
        }
    }
    Ok(text)
}

/// The linear-attention and MoE settings of a GGUF file, as llama.cpp's `qwen35`, `qwen35moe`
/// and `qwen3next` read them.
fn read_gguf(cfg: &mut ModelConfig, meta: &Metadata) -> Result<()> {
    let g = cfg.arch.gguf_name();
    let key = |k: &str| format!("{g}.{k}");
    let req = |k: &str| -> Result<usize> {
        meta.get_usize(&key(k))?
            .ok_or_else(|| ModelError::Metadata(format!("missing `{}`", key(k))))
    };
    let n = cfg.n_layers;
    let interval = meta
        .get_usize(&key("full_attention_interval"))?
        .unwrap_or(4);
    let layers = match meta.get_array(&key("attention.recurrent_layers"))? {
        Some(list) => {
            let flags: Vec<bool> = list
                .iter()
                .map(|v| match v {
                    crate::MetaValue::Bool(b) => Ok(*b),
                    _ => Err(ModelError::Metadata(format!(
                        "`{}` should be a list of bools",
                        key("attention.recurrent_layers")
                    ))),
                })
                .collect::<Result<_>>()?;
            flags.into_iter().take(n).collect()
        }
        None => interval_layers(n, interval, &key("full_attention_interval"))?,
    };
    let state = req("ssm.state_size")?;
    let n_v_heads = req("ssm.time_step_rank")?;
    let inner = req("ssm.inner_size")?;
    if n_v_heads == 0 || inner != state * n_v_heads {
        return Err(ModelError::Metadata(format!(
            "`{}` is {inner}; llama.cpp needs it to be `{}` x `{}` ({state} x {n_v_heads})",
            key("ssm.inner_size"),
            key("ssm.state_size"),
            key("ssm.time_step_rank")
        )));
    }
    let linear = LinearAttnConfig {
        n_k_heads: req("ssm.group_count")?,
        n_v_heads,
        k_dim: state,
        v_dim: state,
        conv_taps: req("ssm.conv_kernel")?,
        tiled_v_heads: cfg.arch != Arch::Qwen3Next,
        layers,
    };
    check_linear(&linear, n, |k| format!("`{}`", key(k)))?;
    cfg.linear = Some(linear);
    if cfg.arch != Arch::Qwen35 {
        cfg.moe = Some(MoeConfig {
            n_experts: req("expert_count")?,
            n_used: req("expert_used_count")?,
            expert_ffn_dim: req("expert_feed_forward_length")?,
            n_shared: 1,
            shared_ffn_dim: Some(req("expert_shared_feed_forward_length")?),
            gating: Gating::Softmax,
            // llama.cpp renormalises the chosen experts' weights for both.
            norm_weights: meta.get_bool(&key("expert_weights_norm"))?.unwrap_or(true),
            scale: 1.0,
            n_groups: 1,
            groups_used: 1,
            layers: vec![true; n],
        });
    }
    Ok(())
}

/// `full_attention_interval`: every `interval`-th layer attends fully, the others are linear.
fn interval_layers(n: usize, interval: usize, key: &str) -> Result<Vec<bool>> {
    if interval == 0 {
        return Err(ModelError::Metadata(format!(
            "{key} is 0; it must be at least 1"
        )));
    }
    Ok((0..n).map(|i| (i + 1) % interval != 0).collect())
}

/// Sizes in range, value heads a multiple of the key heads.
fn check_linear(l: &LinearAttnConfig, n_layers: usize, key: impl Fn(&str) -> String) -> Result<()> {
    const MAX: usize = 1 << 16;
    for (k, v) in [
        ("linear_num_key_heads", l.n_k_heads),
        ("linear_num_value_heads", l.n_v_heads),
        ("linear_key_head_dim", l.k_dim),
        ("linear_value_head_dim", l.v_dim),
        ("linear_conv_kernel_dim", l.conv_taps),
    ] {
        if v == 0 || v > MAX {
            return Err(ModelError::Metadata(format!(
                "{} is {v}; it must be between 1 and {MAX}",
                key(k)
            )));
        }
    }
    if !l.n_v_heads.is_multiple_of(l.n_k_heads) {
        return Err(ModelError::Metadata(format!(
            "{} ({}) is not a multiple of {} ({})",
            key("linear_num_value_heads"),
            l.n_v_heads,
            key("linear_num_key_heads"),
            l.n_k_heads
        )));
    }
    if l.layers.len() != n_layers {
        return Err(ModelError::Metadata(format!(
            "{} lists {} layers of {n_layers}",
            key("layer_types"),
            l.layers.len()
        )));
    }
    Ok(())
}

/// The family's config.json keys: partial rotary, layer types, linear attention, experts.
fn read_hf(cfg: &mut ModelConfig, config: &Value) -> Result<()> {
    let bad = |m: String| Err(ModelError::Metadata(format!("config.json: {m}")));
    if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return bad(format!(
                "hidden_act `{act}` is not supported (supported: silu)"
            ));
        }
    }
    // Zero-centred norms: `(1 + w)`.
    cfg.norm_offset = 1.0;
    let factor = match config
        .get("rope_parameters")
        .and_then(|p| p.get("partial_rotary_factor"))
    {
        Some(v) => v.as_f64().ok_or_else(|| {
            ModelError::Metadata(format!(
                "config.json: `partial_rotary_factor` should be a number, got {v}"
            ))
        })?,
        None => hf_num(config, "partial_rotary_factor")?.unwrap_or(0.25),
    };
    if !(factor > 0.0 && factor <= 1.0) {
        return bad(format!(
            "`partial_rotary_factor` is {factor}; it must be in (0, 1]"
        ));
    }
    // transformers: `int(head_dim * partial_rotary_factor)`.
    cfg.rope.dim = (cfg.head_dim as f64 * factor) as usize;
    let n = cfg.n_layers;
    let layers = match config.get("layer_types") {
        None | Some(Value::Null) => interval_layers(
            n,
            hf_int(config, "full_attention_interval")?.unwrap_or(4),
            "`full_attention_interval`",
        )?,
        Some(Value::Array(types)) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("linear_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(ModelError::Metadata(format!(
                    "config.json: `layer_types` has {t}; supported: linear_attention, \
                     full_attention"
                ))),
            })
            .collect::<Result<_>>()?,
        Some(v) => return bad(format!("`layer_types` should be a list, got {v}")),
    };
    let int = |k: &str| -> Result<usize> {
        hf_int(config, k)?
            .ok_or_else(|| ModelError::Metadata(format!("config.json: missing `{k}`")))
    };
    let linear = LinearAttnConfig {
        n_k_heads: int("linear_num_key_heads")?,
        n_v_heads: int("linear_num_value_heads")?,
        k_dim: int("linear_key_head_dim")?,
        v_dim: int("linear_value_head_dim")?,
        conv_taps: int("linear_conv_kernel_dim")?,
        tiled_v_heads: false,
        layers,
    };
    check_linear(&linear, n, |k| format!("`{k}`"))?;
    cfg.linear = Some(linear);
    let shared = int("shared_expert_intermediate_size");
    match cfg.arch {
        Arch::Qwen35 => {}
        Arch::Qwen35Moe => {
            cfg.moe = Some(MoeConfig {
                n_experts: int("num_experts")?,
                n_used: int("num_experts_per_tok")?,
                expert_ffn_dim: int("moe_intermediate_size")?,
                n_shared: 1,
                shared_ffn_dim: Some(shared?),
                gating: Gating::Softmax,
                // `Qwen3_5MoeTopKRouter` always renormalises.
                norm_weights: true,
                scale: 1.0,
                n_groups: 1,
                groups_used: 1,
                layers: vec![true; n],
            });
        }
        _ => {
            // Qwen3-Next: Qwen3-MoE's sparse-layer rules, plus the gated shared expert.
            llama::qwen3_moe_from_hf(cfg, config)?;
            if let Some(moe) = &mut cfg.moe {
                moe.n_shared = 1;
                moe.shared_ffn_dim = Some(shared?);
            }
        }
    }
    Ok(())
}

/// The defaults of `arch`'s transformers config class (`Qwen3_5TextConfig`,
/// `Qwen3_5MoeTextConfig`, `Qwen3NextConfig`).
fn hf_defaults(arch: Arch) -> Value {
    let mut d = serde_json::json!({
        "vocab_size": 248_320, "hidden_size": 4096, "intermediate_size": 12_288,
        "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4,
        "head_dim": 256, "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    });
    match arch {
        Arch::Qwen35Moe => {
            for (k, v) in [
                ("hidden_size", 2048),
                ("num_hidden_layers", 40),
                ("num_key_value_heads", 2),
                // No dense layer: every layer is sparse, the dense size is never used.
                ("intermediate_size", 512),
                ("moe_intermediate_size", 512),
                ("shared_expert_intermediate_size", 512),
                ("num_experts_per_tok", 8),
                ("num_experts", 256),
            ] {
                d[k] = v.into();
            }
        }
        Arch::Qwen3Next => {
            for (k, v) in [
                ("vocab_size", 151_936),
                ("hidden_size", 2048),
                ("intermediate_size", 5632),
                ("num_hidden_layers", 48),
                ("num_key_value_heads", 2),
                ("decoder_sparse_step", 1),
                ("moe_intermediate_size", 512),
                ("shared_expert_intermediate_size", 512),
                ("num_experts_per_tok", 10),
                ("num_experts", 512),
            ] {
                d[k] = v.into();
            }
            d["norm_topk_prob"] = true.into();
        }
        _ => {}
    }
    d
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use supernode_kernels::Precision;

    use crate::arch::{Arch, Model};
    use crate::config::tests::fixture_config;
    use crate::numerics::Numerics;
    use crate::safetensors::read_safetensors_dir;
    use crate::weights::Weights;
    use crate::{Batch, KvCache, ModelConfig};

    /// Two sequences at once (interleaved in each batch), run in steps of several sizes: the
    /// same logits and the same recurrent state in every linear layer.
    /// - All token by token (no `chunked_until`): the same bits however the steps are cut.
    /// - Prompts of 150 and 70 in the chunked form, then generated tokens token by token: the
    ///   same bits for every cut at multiples of the window (as the scheduler cuts); cuts
    ///   anywhere else, and the token-by-token form, agree within rounding.
    ///
    /// A sequence restarted at position 0 in a used slot forgets what the slot held.
    #[test]
    fn state_and_logits_do_not_depend_on_the_steps() {
        use supernode_kernels::ops::DELTA_CHUNK;
        // The forms round differently; over 150 positions and six layers of these random
        // models, whose logits reach ±10, that moves a logit by up to ~1.2e-3.
        const TOL: f32 = 2e-3;
        let (c, w) = (DELTA_CHUNK, DELTA_CHUNK);
        for arch in ["qwen3_5", "qwen3_5_moe", "qwen3_next"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/hf")
                .join(arch);
            let st = read_safetensors_dir(&dir).unwrap();
            let cfg = ModelConfig::from_hf(&st.config).unwrap();
            let w_ = Weights::new(st.tensors, Numerics::new(Precision::Exact));
            let m = super::load(cfg, &w_).unwrap();
            let seqs: [Vec<u32>; 2] = [
                (0..2 * w + 40).map(|i| (i * 37 % 256) as u32).collect(),
                (0..w + 23).map(|i| (i * 11 % 256) as u32 + 1).collect(),
            ];
            let tables: [Vec<u32>; 2] = [(0..12).collect(), (12..18).collect()];
            let table_refs: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
            // Runs the sequences in steps of `chunk` tokens each (both in every step), the
            // second in state slot 2; returns every position's logits per sequence.
            let run = |chunk: usize, until: &[usize], kv: &mut KvCache| {
                let mut logits: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
                let mut done = [0usize; 2];
                while done[0] < seqs[0].len() || done[1] < seqs[1].len() {
                    let (mut tokens, mut positions, mut seq_of) = (vec![], vec![], vec![]);
                    let mut order = vec![];
                    for q in 0..2 {
                        let hi = (done[q] + chunk).min(seqs[q].len());
                        for (p, &t) in seqs[q].iter().enumerate().take(hi).skip(done[q]) {
                            tokens.push(t);
                            positions.push(p);
                            seq_of.push(q);
                            order.push(q);
                        }
                        done[q] = hi;
                    }
                    let rows: Vec<usize> = (0..tokens.len()).collect();
                    let batch = Batch {
                        tokens: &tokens,
                        positions: &positions,
                        seq_of: &seq_of,
                        block_tables: &table_refs,
                        logits_for: &rows,
                        state_slots: &[0, 2],
                        chunked_until: until,
                        drafts: &[],
                    };
                    let out = m.forward(&batch, kv).unwrap();
                    let v = m.config().vocab_size;
                    for (r, &q) in order.iter().enumerate() {
                        logits[q].extend_from_slice(&out[r * v..(r + 1) * v]);
                    }
                }
                logits
            };
            let fresh = || {
                KvCache::new(&m.kv_specs(), 16, 18)
                    .unwrap()
                    .with_state_slots(&m.state_widths(), 3)
                    .unwrap()
            };
            let states = |kv: &KvCache| -> Vec<f32> {
                kv.layers
                    .iter()
                    .flat_map(|l| l.state.data.iter().copied())
                    .collect()
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let far = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max)
            };
            let mut one = fresh();
            let want = run(1000, &[], &mut one);
            for chunk in [1, 3, 16] {
                let mut kv = fresh();
                assert_eq!(run(chunk, &[], &mut kv), want, "{arch}: steps of {chunk}");
                assert_eq!(bits(&states(&kv)), bits(&states(&one)), "{arch}: {chunk}");
            }
            // Slot 0 reused from position 0: the old state is forgotten.
            assert_eq!(run(1000, &[], &mut one), want, "{arch}: a reused slot");

            let until = [2 * w + 10, w + 23];
            let mut whole = fresh();
            let chunked = run(1000, &until, &mut whole);
            for chunk in [c, 2 * c] {
                let mut kv = fresh();
                assert_eq!(
                    run(chunk, &until, &mut kv),
                    chunked,
                    "{arch}: windows {chunk}"
                );
                assert_eq!(bits(&states(&kv)), bits(&states(&whole)), "{arch}: {chunk}");
            }
            for chunk in [1, 5, 16] {
                let mut kv = fresh();
                let got = run(chunk, &until, &mut kv);
                for q in 0..2 {
                    let d = far(&got[q], &chunked[q]);
                    assert!(d < TOL, "{arch}: cut every {chunk}: {d}");
                }
                let d = far(&states(&kv), &states(&whole));
                assert!(d < TOL, "{arch}: cut every {chunk}: state {d}");
            }
            for q in 0..2 {
                let d = far(&chunked[q], &want[q]);
                assert!(d < TOL, "{arch}: chunked against token by token: {d}");
            }
            assert!(far(&states(&whole), &states(&one)) < TOL, "{arch}");
            assert_ne!(
                bits(&chunked[0]),
                bits(&want[0]),
                "{arch}: the forms differ"
            );
            assert!(m.state_widths().iter().filter(|&&w| w > 0).count() >= 3);
        }
    }

    /// A step that verifies drafts, then a rollback to the accepted ones, leaves every linear
    /// layer's state and the later logits bit for bit as if only the accepted tokens had run
    /// one at a time; a sequence beside it in the batch, without drafts, is untouched.
    #[test]
    fn rejected_drafts_roll_back_to_the_bits_of_the_accepted_tokens() {
        for arch in ["qwen3_5", "qwen3_5_moe", "qwen3_next"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/hf")
                .join(arch);
            let st = read_safetensors_dir(&dir).unwrap();
            let cfg = ModelConfig::from_hf(&st.config).unwrap();
            let w = Weights::new(st.tensors, Numerics::new(Precision::Exact));
            let m = super::load(cfg, &w).unwrap();
            let v = m.config().vocab_size;
            let tables: [Vec<u32>; 2] = [(0..8).collect(), (8..16).collect()];
            let table_refs: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
            // One step: per sequence (state slot 0 for the first, 2 for the second) its first
            // position, tokens and trailing drafts; every row's logits.
            let step = |kv: &mut KvCache, parts: [(usize, &[u32], usize); 2]| {
                let (mut tokens, mut positions, mut seq_of) = (vec![], vec![], vec![]);
                for (q, (start, toks, _)) in parts.iter().enumerate() {
                    tokens.extend_from_slice(toks);
                    positions.extend(*start..start + toks.len());
                    seq_of.extend(std::iter::repeat_n(q, toks.len()));
                }
                let rows: Vec<usize> = (0..tokens.len()).collect();
                let drafts = [parts[0].2, parts[1].2];
                let batch = Batch {
                    tokens: &tokens,
                    positions: &positions,
                    seq_of: &seq_of,
                    block_tables: &table_refs,
                    logits_for: &rows,
                    state_slots: &[0, 2],
                    chunked_until: &[70, 70],
                    drafts: &drafts,
                };
                m.forward(&batch, kv).unwrap()
            };
            let fresh = || {
                KvCache::new(&m.kv_specs(), 16, 16)
                    .unwrap()
                    .with_state_slots(&m.state_widths(), 3)
                    .unwrap()
            };
            // The first sequence's state (slot 0) in every linear layer.
            let states = |kv: &KvCache| -> Vec<u32> {
                kv.layers
                    .iter()
                    .flat_map(|l| l.state.data[..l.state.width].iter().map(|x| x.to_bits()))
                    .collect()
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let prompt: Vec<u32> = (0..70).map(|i| (i * 29 % 251) as u32 + 2).collect();
            let other: Vec<u32> = (0..70).map(|i| (i * 13 % 241) as u32 + 1).collect();
            let gen: Vec<u32> = (0..7).map(|i| (i * 53 % 250) as u32 + 3).collect();
            // Without drafts: the prompts, then the generated tokens one at a time (the other
            // sequence decodes its own token beside each); the state after each token.
            let mut kv = fresh();
            step(&mut kv, [(0, &prompt, 0), (0, &other, 0)]);
            let mut want_states = vec![states(&kv)];
            let mut want_logits = vec![];
            for (i, t) in gen.iter().enumerate() {
                let out = step(&mut kv, [(70 + i, &[*t], 0), (70 + i, &[gen[6 - i]], 0)]);
                want_logits.push(bits(&out[..v]));
                want_states.push(states(&kv));
            }
            for accepted in 0..=4 {
                let mut kv = fresh();
                step(&mut kv, [(0, &prompt, 0), (0, &other, 0)]);
                // The first generated token, then 4 drafts: `accepted` right, then wrong ones.
                let mut toks = vec![gen[0]];
                toks.extend((1..5).map(|i| match i <= accepted {
                    true => gen[i],
                    false => gen[i] ^ 1,
                }));
                let out = step(&mut kv, [(70, &toks, 4), (70, &[gen[6]], 0)]);
                for r in 0..=accepted {
                    assert_eq!(bits(&out[r * v..(r + 1) * v]), want_logits[r], "{arch}");
                }
                m.rollback_drafts(&mut kv, 0, accepted);
                assert!(
                    states(&kv) == want_states[accepted + 1],
                    "{arch}: {accepted} accepted"
                );
                // A second rollback does nothing: the journal is used once.
                m.rollback_drafts(&mut kv, 0, 0);
                assert!(states(&kv) == want_states[accepted + 1], "{arch}");
                // Decoding goes on as if the rejected drafts had never run.
                let p = 71 + accepted;
                let out = step(&mut kv, [(p, &[gen[accepted + 1]], 0), (71, &[gen[5]], 0)]);
                assert_eq!(bits(&out[..v]), want_logits[accepted + 1], "{arch}");
            }
            // Drafts not rolled back would have changed the state: the test can fail.
            let mut kv = fresh();
            step(&mut kv, [(0, &prompt, 0), (0, &other, 0)]);
            step(&mut kv, [(70, &[gen[0], 9, 9], 2), (70, &[gen[6]], 0)]);
            m.rollback_drafts(&mut kv, 2, 0);
            assert!(states(&kv) != want_states[1], "{arch}");
        }
    }

    /// The multi-token-prediction layer of `qwen3_5_mtp` against the float64 NumPy version of
    /// it in `tools/make_mtp_fixture.py` ([`crate::arch::tests::check_mtp_reference`]).
    #[test]
    fn the_mtp_layer_matches_its_float64_reference() {
        crate::arch::tests::check_mtp_reference("qwen3_5_mtp", |cfg, w| {
            Ok(Box::new(super::load(cfg, w)?))
        });
    }

    /// Both config layouts of each fixture give the same checked config: layer kinds, linear
    /// attention sizes, partial rotary, zero-centred norms, experts.
    #[test]
    fn hf_configs_of_the_fixtures() {
        for file in ["config.json", "config.transformers5.json"] {
            let c = ModelConfig::from_hf(&fixture_config("qwen3_5", file)).unwrap();
            assert_eq!(c.arch, Arch::Qwen35);
            let l = c.linear.as_ref().unwrap();
            assert_eq!(l.layers, [true, true, false, true, true, false], "{file}");
            assert_eq!(
                (l.n_k_heads, l.n_v_heads, l.k_dim, l.conv_taps),
                (2, 4, 8, 3)
            );
            assert!(!l.tiled_v_heads);
            assert_eq!((c.head_dim, c.rope.dim, c.norm_offset), (16, 8, 1.0));
            assert!(c.moe.is_none());

            let c = ModelConfig::from_hf(&fixture_config("qwen3_5_moe", file)).unwrap();
            assert_eq!(c.arch, Arch::Qwen35Moe);
            assert_eq!(c.linear.as_ref().unwrap().conv_taps, 2);
            let moe = c.moe.as_ref().unwrap();
            assert_eq!(moe.layers, [true; 4]);
            assert_eq!(
                (
                    moe.n_experts,
                    moe.n_used,
                    moe.expert_ffn_dim,
                    moe.shared_ffn_dim
                ),
                (8, 2, 8, Some(24))
            );
            assert!(moe.norm_weights);

            let c = ModelConfig::from_hf(&fixture_config("qwen3_next", file)).unwrap();
            assert_eq!(c.arch, Arch::Qwen3Next);
            let l = c.linear.as_ref().unwrap();
            assert_eq!(l.layers, [true, true, false, true], "{file}");
            assert_eq!((c.head_dim, c.rope.dim), (32, 8));
            let moe = c.moe.as_ref().unwrap();
            assert_eq!((moe.n_shared, moe.shared_ffn_dim), (1, Some(24)));
        }
    }

    /// A multimodal checkpoint's config gives its text model; bad settings are errors naming
    /// the key.
    #[test]
    fn multimodal_wrapper_and_bad_configs() {
        let text = fixture_config("qwen3_5", "config.transformers5.json");
        let wrapper = serde_json::json!({
            "model_type": "qwen3_5", "text_config": text, "vision_config": {"depth": 2},
            "tie_word_embeddings": true,
        });
        let c = ModelConfig::from_hf(&wrapper).unwrap();
        assert_eq!(c.arch, Arch::Qwen35);
        assert_eq!(c.linear.as_ref().unwrap().layers.len(), 6);
        // Its language model's tensors map as the text model's; vision is skipped, MTP takes the
        // layer after the decoder's (llama.cpp's names), and the loader says that only the
        // text model is loaded.
        assert_eq!(
            crate::names::hf_to_gguf("qwen3_5", "model.language_model.layers.3.linear_attn.A_log")
                .as_deref(),
            Some("blk.3.ssm_a_log")
        );
        assert!(crate::names::is_ignorable(
            "model.visual.blocks.0.attn.qkv.weight"
        ));
        let mtp = |name: &str| {
            let hf = crate::names::qwen_mtp_as_layer(name, 6)?;
            crate::names::hf_to_gguf("qwen3_5", &hf)
        };
        assert_eq!(
            mtp("mtp.layers.0.self_attn.q_proj.weight").as_deref(),
            Some("blk.6.attn_q.weight")
        );
        assert_eq!(
            mtp("mtp.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.6.post_attention_norm.weight")
        );
        for (own, gguf) in [
            ("fc", "eh_proj"),
            ("pre_fc_norm_embedding", "enorm"),
            ("pre_fc_norm_hidden", "hnorm"),
            ("norm", "shared_head_norm"),
        ] {
            assert_eq!(
                mtp(&format!("mtp.{own}.weight")),
                Some(format!("blk.6.nextn.{gguf}.weight"))
            );
        }
        assert_eq!(mtp("mtp.other.weight"), None);
        assert_eq!(mtp("model.layers.0.mlp.gate_proj.weight"), None);
        let dir = std::env::temp_dir().join(format!("supernode-qwen35-mm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), wrapper.to_string()).unwrap();
        let note = crate::partial_load_note(&dir).unwrap();
        assert!(
            note.contains("`qwen3_5`") && note.contains("text model only"),
            "{note}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf/qwen3_5");
        assert_eq!(crate::partial_load_note(&fixture), None);
        let err = ModelConfig::from_hf(&serde_json::json!({"model_type": "qwen3_5_moe"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("text_config"), "{err}");

        let bad = |k: &str, v: serde_json::Value| {
            let mut c = fixture_config("qwen3_5", "config.json");
            c[k] = v;
            ModelConfig::from_hf(&c).unwrap_err().to_string()
        };
        let err = bad("linear_num_value_heads", 3.into());
        assert!(
            err.contains("linear_num_value_heads") && err.contains("multiple"),
            "{err}"
        );
        let err = bad("linear_conv_kernel_dim", 0.into());
        assert!(err.contains("linear_conv_kernel_dim"), "{err}");
        let err = bad("layer_types", serde_json::json!(["full_attention"]));
        assert!(err.contains("layer_types"), "{err}");
        let err = bad("layer_types", serde_json::json!(vec!["mamba"; 6]));
        assert!(err.contains("mamba"), "{err}");
        let err = bad("hidden_act", "gelu".into());
        assert!(err.contains("gelu"), "{err}");
        let mut c = fixture_config("qwen3_5", "config.json");
        c["rope_parameters"]["partial_rotary_factor"] = 0.0.into();
        let err = ModelConfig::from_hf(&c).unwrap_err().to_string();
        assert!(err.contains("partial_rotary_factor"), "{err}");
    }
}

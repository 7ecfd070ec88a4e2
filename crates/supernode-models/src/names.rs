//! The tables from HF transformers parameter names to llama.cpp GGUF tensor names: the shared
//! rows here, an architecture's own rows in its file ([`Family::hf_names`]).
//!
//! Model code asks for tensors by their GGUF names whatever file they came from; the
//! safetensors loader renames through [`hf_to_gguf`]. The tables follow llama.cpp's
//! `gguf-py/gguf/tensor_mapping.py` and `constants.py`. Each row maps one HF name pattern
//! to one GGUF name pattern, optionally for some architectures only: `{i}` stands for the
//! layer index (`model.layers.{i}.` ↔ `blk.{i}.`), `{e}` for an expert index. A row whose HF
//! pattern has `{e}` names a tensor that llama.cpp stacks over experts (`ffn_gate_exps`):
//! [`hf_to_gguf`] does not map it, [`hf_expert_to_gguf`] says where it goes.
//!
//! Architectures are HF `model_type` strings (`llama`, `qwen2`, `qwen3_moe`, `gemma3_text`,
//! `deepseek_v3`, ...); GGUF spellings (`qwen3moe`, `deepseek2`) are accepted too. Adding an
//! architecture is adding rows (and, where its names differ, an entry in a family list).
//!
//! [`Family::hf_names`]: crate::arch::Family::hf_names

use crate::arch;

/// Which architectures a row applies to.
#[derive(Clone, Copy, Debug)]
enum Archs {
    Any,
    Only(&'static [&'static str]),
    Except(&'static [&'static str]),
}

impl Archs {
    fn matches(self, arch: &str) -> bool {
        match self {
            Archs::Any => true,
            Archs::Only(list) => list.contains(&arch),
            Archs::Except(list) => !list.contains(&arch),
        }
    }
}

/// Mixture-of-experts architectures with a router named `mlp.gate`.
const MOE: &[&str] = &[
    "qwen2_moe",
    "qwen2moe",
    "qwen3_moe",
    "qwen3moe",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek2",
    "deepseek_v32",
    "deepseek32",
];

/// Architectures whose `post_attention_layernorm` has a name of their own: Gemma's sandwich
/// norm, and llama.cpp's `post_attention_norm` for Qwen3.5 / Qwen3-Next's pre-feed-forward norm.
const OWN_POST_ATTENTION_NORM: &[&str] = &[
    "gemma2",
    "gemma3",
    "gemma3_text",
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen35",
    "qwen35moe",
    "qwen3_next",
    "qwen3next",
];

/// One mapping: HF pattern, GGUF pattern, the architectures it holds for.
pub struct Row {
    hf: &'static str,
    gguf: &'static str,
    archs: Archs,
}

pub(crate) const fn row(hf: &'static str, gguf: &'static str) -> Row {
    Row {
        hf,
        gguf,
        archs: Archs::Any,
    }
}

pub(crate) const fn only(
    hf: &'static str,
    gguf: &'static str,
    archs: &'static [&'static str],
) -> Row {
    Row {
        hf,
        gguf,
        archs: Archs::Only(archs),
    }
}

pub(crate) const fn except(
    hf: &'static str,
    gguf: &'static str,
    archs: &'static [&'static str],
) -> Row {
    Row {
        hf,
        gguf,
        archs: Archs::Except(archs),
    }
}

/// Names outside the decoder layers.
const GLOBAL: &[Row] = &[
    row("model.embed_tokens.weight", "token_embd.weight"),
    row("model.norm.weight", "output_norm.weight"),
    row("lm_head.weight", "output.weight"),
    // DeepSeek-V4 as its checkpoints name things (transformers saves them so too, under
    // `model.`): the head, and the final collapse of the hyper-connection streams.
    only("head.weight", "output.weight", V4),
    only("embed.weight", "token_embd.weight", V4),
    only("norm.weight", "output_norm.weight", V4),
    only("model.hc_head.hc_fn", "output_hc_fn.weight", V4),
    only("model.hc_head.hc_base", "output_hc_base.weight", V4),
    only("model.hc_head.hc_scale", "output_hc_scale.weight", V4),
    only("hc_head_fn", "output_hc_fn.weight", V4),
    only("hc_head_base", "output_hc_base.weight", V4),
    only("hc_head_scale", "output_hc_scale.weight", V4),
];

const V4: &[&str] = crate::arch::deepseek_v4::V4;

/// Names inside decoder layer `{i}`: HF `model.layers.{i}.<hf>` ↔ GGUF `blk.{i}.<gguf>`.
const LAYER: &[Row] = &[
    // Attention.
    row("input_layernorm.weight", "attn_norm.weight"),
    row("self_attn.q_proj.weight", "attn_q.weight"),
    row("self_attn.q_proj.bias", "attn_q.bias"),
    row("self_attn.k_proj.weight", "attn_k.weight"),
    row("self_attn.k_proj.bias", "attn_k.bias"),
    row("self_attn.v_proj.weight", "attn_v.weight"),
    row("self_attn.v_proj.bias", "attn_v.bias"),
    row("self_attn.o_proj.weight", "attn_output.weight"),
    row("self_attn.o_proj.bias", "attn_output.bias"),
    row("self_attn.q_norm.weight", "attn_q_norm.weight"),
    row("self_attn.k_norm.weight", "attn_k_norm.weight"),
    // The norm before the feed-forward (after the attention, in HF's name), except where an
    // architecture names it its own way.
    except(
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
        OWN_POST_ATTENTION_NORM,
    ),
    // Dense feed-forward.
    // A multi-token-prediction (NextN) layer's own tensors (DeepSeek's names; Qwen3.5's `mtp.*`
    // come here through `qwen_mtp_as_layer`).
    row("enorm.weight", "nextn.enorm.weight"),
    row("hnorm.weight", "nextn.hnorm.weight"),
    row("eh_proj.weight", "nextn.eh_proj.weight"),
    row("shared_head.norm.weight", "nextn.shared_head_norm.weight"),
    row("shared_head.head.weight", "nextn.shared_head_head.weight"),
    row("embed_tokens.weight", "nextn.embed_tokens.weight"),
    row("mlp.gate_proj.weight", "ffn_gate.weight"),
    row("mlp.up_proj.weight", "ffn_up.weight"),
    row("mlp.down_proj.weight", "ffn_down.weight"),
    // Mixture of experts: router, routed experts (stacked); Qwen2-MoE's shared expert (known,
    // so that its checkpoints are refused as an unsupported architecture, not unknown names).
    only("mlp.gate.weight", "ffn_gate_inp.weight", MOE),
    only(
        "mlp.experts.{e}.gate_proj.weight",
        "ffn_gate_exps.weight",
        MOE,
    ),
    only("mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight", MOE),
    only(
        "mlp.experts.{e}.down_proj.weight",
        "ffn_down_exps.weight",
        MOE,
    ),
    only(
        "mlp.shared_expert.gate_proj.weight",
        "ffn_gate_shexp.weight",
        &["qwen2_moe", "qwen2moe"],
    ),
    only(
        "mlp.shared_expert.up_proj.weight",
        "ffn_up_shexp.weight",
        &["qwen2_moe", "qwen2moe"],
    ),
    only(
        "mlp.shared_expert.down_proj.weight",
        "ffn_down_shexp.weight",
        &["qwen2_moe", "qwen2moe"],
    ),
    only(
        "mlp.shared_expert_gate.weight",
        "ffn_gate_inp_shexp.weight",
        &["qwen2_moe", "qwen2moe"],
    ),
];

/// HF names that carry no weights a model needs: rope caches recomputed from the config.
const IGNORABLE_SUFFIXES: &[&str] = &["rotary_emb.inv_freq"];

/// Prefixes of multimodal checkpoints (Gemma 3 4B and up) whose text model we serve: the
/// language model's names are rewritten to the plain `model.` / `lm_head.` form first.
const TEXT_MODEL_PREFIXES: &[(&str, &str)] = &[
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
];

/// Parts of multimodal checkpoints that a text-only forward pass does not read (llama.cpp
/// puts them in a separate projector file).
const VISION_PREFIXES: &[&str] = &[
    "vision_tower.",
    "model.vision_tower.",
    "model.visual.",
    "visual.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
];

/// The GGUF name of the HF parameter `hf_name` in a model of architecture `arch`, `None` if
/// the table has no row for it (or it is a per-expert tensor; see [`hf_expert_to_gguf`]).
pub fn hf_to_gguf(arch: &str, hf_name: &str) -> Option<String> {
    match lookup(arch, hf_name)? {
        (name, None) => Some(name),
        (_, Some(_)) => None,
    }
}

/// For a per-expert HF tensor (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`), the
/// stacked GGUF tensor it is a slice of (`blk.{i}.ffn_gate_exps.weight`) and the expert index.
pub fn hf_expert_to_gguf(arch: &str, hf_name: &str) -> Option<(String, usize)> {
    match lookup(arch, hf_name)? {
        (name, Some(e)) => Some((name, e)),
        (_, None) => None,
    }
}

/// A Qwen3.5 / Qwen3-Next multi-token-prediction tensor (`mtp.*`) under the HF name of the layer
/// llama.cpp's converter makes of it: `mtp.layers.{j}.X` is layer `n_layers + j`, and the MTP's
/// own `fc`, `pre_fc_norm_embedding`, `pre_fc_norm_hidden` and `norm` are the NextN
/// `eh_proj`, `enorm`, `hnorm` and `shared_head.norm` of layer `n_layers`. `None` for other
/// names.
pub fn qwen_mtp_as_layer(hf_name: &str, n_layers: usize) -> Option<String> {
    let rest = hf_name
        .strip_prefix("mtp.")
        .or_else(|| hf_name.strip_prefix("model.mtp."))?;
    if let Some(layer) = rest.strip_prefix("layers.") {
        let (j, local) = split_index(layer)?;
        return Some(format!("model.layers.{}.{local}", n_layers + j));
    }
    let (own, tail) = rest.split_once('.')?;
    let nextn = match own {
        "fc" => "eh_proj",
        "pre_fc_norm_embedding" => "enorm",
        "pre_fc_norm_hidden" => "hnorm",
        "norm" => "shared_head.norm",
        _ => return None,
    };
    Some(format!("model.layers.{n_layers}.{nextn}.{tail}"))
}

/// Whether a checkpoint tensor can be skipped without changing what the model computes.
pub fn is_ignorable(hf_name: &str) -> bool {
    IGNORABLE_SUFFIXES.iter().any(|s| hf_name.ends_with(s))
        || VISION_PREFIXES.iter().any(|p| hf_name.starts_with(p))
}

/// The mapped name, and the expert index for stacked-expert rows.
fn lookup(arch: &str, hf_name: &str) -> Option<(String, Option<usize>)> {
    let owned;
    let name = match TEXT_MODEL_PREFIXES
        .iter()
        .find_map(|(from, to)| Some((to, hf_name.strip_prefix(from)?)))
    {
        Some((to, rest)) => {
            owned = format!("{to}{rest}");
            owned.as_str()
        }
        None => hf_name,
    };
    if let Some(r) = GLOBAL
        .iter()
        .find(|r| r.hf == name && r.archs.matches(arch))
    {
        return Some((r.gguf.to_owned(), None));
    }
    // DeepSeek-V4's own checkpoints have no `model.` before their layers.
    let rest = name.strip_prefix("model.layers.").or_else(|| {
        crate::arch::deepseek_v4::V4
            .contains(&arch)
            .then(|| name.strip_prefix("layers."))
            .flatten()
    })?;
    let (layer, local) = split_index(rest)?;
    LAYER
        .iter()
        .chain(arch::families().flat_map(|f| f.hf_names))
        .filter(|r| r.archs.matches(arch))
        .find_map(|r| match_local(r.hf, local).map(|expert| (r, expert)))
        .map(|(r, expert)| (format!("blk.{layer}.{}", r.gguf), expert))
}

/// `"12.rest"` → `(12, "rest")`: a decimal index without leading zeros, then a dot.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (digits, rest) = s.split_once('.')?;
    let canonical = digits == "0" || (!digits.starts_with('0') && !digits.is_empty());
    if !canonical || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, rest))
}

/// Match a layer-local name against a pattern that may hold one `{e}`; `Some(None)` for a
/// plain match, `Some(Some(e))` for an expert match.
fn match_local(pattern: &str, local: &str) -> Option<Option<usize>> {
    match pattern.split_once("{e}") {
        None => (pattern == local).then_some(None),
        Some((before, after)) => {
            let rest = local.strip_prefix(before)?;
            let (e, tail) = split_index(rest)?;
            (format!(".{tail}") == after).then_some(Some(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(arch: &str, name: &str) -> Option<String> {
        hf_to_gguf(arch, name)
    }

    #[test]
    fn llama_names() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "model.layers.7.self_attn.q_proj.weight",
                "blk.7.attn_q.weight",
            ),
            (
                "model.layers.7.self_attn.k_proj.weight",
                "blk.7.attn_k.weight",
            ),
            (
                "model.layers.7.self_attn.v_proj.weight",
                "blk.7.attn_v.weight",
            ),
            (
                "model.layers.7.self_attn.o_proj.weight",
                "blk.7.attn_output.weight",
            ),
            (
                "model.layers.12.post_attention_layernorm.weight",
                "blk.12.ffn_norm.weight",
            ),
            (
                "model.layers.29.mlp.gate_proj.weight",
                "blk.29.ffn_gate.weight",
            ),
            ("model.layers.29.mlp.up_proj.weight", "blk.29.ffn_up.weight"),
            (
                "model.layers.29.mlp.down_proj.weight",
                "blk.29.ffn_down.weight",
            ),
        ];
        for (hf, gguf) in cases {
            assert_eq!(map("llama", hf).as_deref(), Some(gguf), "{hf}");
        }
    }

    #[test]
    fn qwen_biases_and_qk_norms() {
        assert_eq!(
            map("qwen2", "model.layers.3.self_attn.q_proj.bias").unwrap(),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            map("qwen2", "model.layers.3.self_attn.k_proj.bias").unwrap(),
            "blk.3.attn_k.bias"
        );
        assert_eq!(
            map("qwen2", "model.layers.3.self_attn.v_proj.bias").unwrap(),
            "blk.3.attn_v.bias"
        );
        assert_eq!(
            map("qwen3", "model.layers.3.self_attn.q_norm.weight").unwrap(),
            "blk.3.attn_q_norm.weight"
        );
        assert_eq!(
            map("qwen3", "model.layers.3.self_attn.k_norm.weight").unwrap(),
            "blk.3.attn_k_norm.weight"
        );
    }

    #[test]
    fn gemma3_sandwich_norms() {
        for arch in ["gemma3", "gemma3_text"] {
            let l = |s: &str| map(arch, &format!("model.layers.5.{s}"));
            assert_eq!(
                l("input_layernorm.weight").unwrap(),
                "blk.5.attn_norm.weight"
            );
            assert_eq!(
                l("post_attention_layernorm.weight").unwrap(),
                "blk.5.post_attention_norm.weight"
            );
            assert_eq!(
                l("pre_feedforward_layernorm.weight").unwrap(),
                "blk.5.ffn_norm.weight"
            );
            assert_eq!(
                l("post_feedforward_layernorm.weight").unwrap(),
                "blk.5.post_ffw_norm.weight"
            );
            assert_eq!(
                l("self_attn.q_norm.weight").unwrap(),
                "blk.5.attn_q_norm.weight"
            );
        }
        // Not in llama: a pre-feed-forward norm there is a weight we would not use.
        assert_eq!(
            map("llama", "model.layers.5.pre_feedforward_layernorm.weight"),
            None
        );
        // Multimodal Gemma 3 checkpoints: the language model's names, either nesting.
        assert_eq!(
            map("gemma3", "model.language_model.layers.2.mlp.up_proj.weight").unwrap(),
            "blk.2.ffn_up.weight"
        );
        assert_eq!(
            map("gemma3", "language_model.model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert_eq!(
            map("gemma3", "language_model.lm_head.weight").unwrap(),
            "output.weight"
        );
        assert!(is_ignorable(
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
        ));
        assert!(is_ignorable(
            "multi_modal_projector.mm_input_projection_weight"
        ));
    }

    #[test]
    fn moe_and_mla_rows() {
        let a = "deepseek_v3";
        let l = |s: &str| map(a, &format!("model.layers.4.{s}"));
        assert_eq!(
            l("self_attn.q_a_proj.weight").unwrap(),
            "blk.4.attn_q_a.weight"
        );
        assert_eq!(
            l("self_attn.q_a_layernorm.weight").unwrap(),
            "blk.4.attn_q_a_norm.weight"
        );
        assert_eq!(
            l("self_attn.q_b_proj.weight").unwrap(),
            "blk.4.attn_q_b.weight"
        );
        assert_eq!(
            l("self_attn.kv_a_proj_with_mqa.weight").unwrap(),
            "blk.4.attn_kv_a_mqa.weight"
        );
        assert_eq!(
            l("self_attn.kv_a_layernorm.weight").unwrap(),
            "blk.4.attn_kv_a_norm.weight"
        );
        assert_eq!(
            l("self_attn.kv_b_proj.weight").unwrap(),
            "blk.4.attn_kv_b.weight"
        );
        assert_eq!(l("mlp.gate.weight").unwrap(), "blk.4.ffn_gate_inp.weight");
        assert_eq!(
            l("mlp.gate.e_score_correction_bias").unwrap(),
            "blk.4.exp_probs_b.bias"
        );
        assert_eq!(
            l("mlp.shared_experts.down_proj.weight").unwrap(),
            "blk.4.ffn_down_shexp.weight"
        );
        // Per-expert tensors are slices of a stacked tensor, not tensors of their own.
        assert_eq!(l("mlp.experts.17.up_proj.weight"), None);
        assert_eq!(
            hf_expert_to_gguf(a, "model.layers.4.mlp.experts.17.up_proj.weight"),
            Some(("blk.4.ffn_up_exps.weight".to_string(), 17))
        );
        assert_eq!(
            hf_expert_to_gguf("qwen3_moe", "model.layers.0.mlp.experts.0.gate_proj.weight"),
            Some(("blk.0.ffn_gate_exps.weight".to_string(), 0))
        );
        assert_eq!(
            hf_expert_to_gguf("qwen3_moe", "model.layers.0.mlp.gate_proj.weight"),
            None
        );
        assert_eq!(
            map("qwen3_moe", "model.layers.1.mlp.gate.weight").unwrap(),
            "blk.1.ffn_gate_inp.weight"
        );
        assert_eq!(
            map("qwen2_moe", "model.layers.1.mlp.shared_expert_gate.weight").unwrap(),
            "blk.1.ffn_gate_inp_shexp.weight"
        );
        // MoE and MLA names mean nothing in a dense model.
        assert_eq!(map("llama", "model.layers.4.mlp.gate.weight"), None);
        assert_eq!(
            map("qwen3_moe", "model.layers.4.self_attn.kv_b_proj.weight"),
            None
        );
        assert_eq!(
            hf_expert_to_gguf("llama", "model.layers.4.mlp.experts.1.up_proj.weight"),
            None
        );
    }

    #[test]
    fn malformed_and_unknown_names() {
        for bad in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.01.mlp.up_proj.weight",
            "model.layers..mlp.up_proj.weight",
            "model.layers.1",
            "model.layers.1.mlp.up_proj.weight.extra",
            "model.layers.99999999999999999999999.mlp.up_proj.weight",
            "model.embed_tokens",
            "transformer.h.0.attn.c_attn.weight",
            "",
        ] {
            assert_eq!(map("llama", bad), None, "{bad}");
        }
        assert_eq!(
            hf_expert_to_gguf("qwen3_moe", "model.layers.1.mlp.experts.x.up_proj.weight"),
            None
        );
        assert!(is_ignorable("model.layers.0.self_attn.rotary_emb.inv_freq"));
        assert!(!is_ignorable("model.layers.0.self_attn.q_proj.weight"));
    }
}

//! Mutations of GGUF metadata as typed values: what a converter bug or a hostile file can put
//! under the keys that the model config and the tokenizer read (byte edits rarely reach these:
//! a changed type moves every later byte).

#![allow(dead_code)]

use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::select;
use supernode_models::{MetaValue, Metadata};

use super::mutate::INTERESTING;

/// Keys the loaders read, beyond those of the seeds (`{arch}` is replaced by each architecture).
const KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "{arch}.block_count",
    "{arch}.context_length",
    "{arch}.embedding_length",
    "{arch}.feed_forward_length",
    "{arch}.vocab_size",
    "{arch}.attention.head_count",
    "{arch}.attention.head_count_kv",
    "{arch}.attention.key_length",
    "{arch}.attention.value_length",
    "{arch}.attention.layer_norm_rms_epsilon",
    "{arch}.attention.sliding_window",
    "{arch}.attention.q_lora_rank",
    "{arch}.attention.kv_lora_rank",
    "{arch}.attention.key_length_mla",
    "{arch}.attention.value_length_mla",
    "{arch}.rope.freq_base",
    "{arch}.rope.dimension_count",
    "{arch}.rope.scaling.type",
    "{arch}.rope.scaling.factor",
    "{arch}.rope.scaling.attn_factor",
    "{arch}.rope.scaling.original_context_length",
    "{arch}.rope.scaling.yarn_log_multiplier",
    "{arch}.rope.scaling.yarn_beta_fast",
    "{arch}.rope.scaling.yarn_beta_slow",
    "{arch}.expert_count",
    "{arch}.expert_used_count",
    "{arch}.expert_shared_count",
    "{arch}.expert_feed_forward_length",
    "{arch}.expert_weights_norm",
    "{arch}.expert_weights_scale",
    "{arch}.expert_gating_func",
    "{arch}.expert_group_count",
    "{arch}.expert_group_used_count",
    "{arch}.leading_dense_block_count",
    "{arch}.final_logit_softcapping",
    "{arch}.attn_logit_softcapping",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.fim_pre_token_id",
    "tokenizer.ggml.fim_suf_token_id",
    "tokenizer.ggml.fim_mid_token_id",
    "tokenizer.ggml.fim_pad_token_id",
    "tokenizer.ggml.fim_rep_token_id",
    "tokenizer.ggml.fim_sep_token_id",
    "tokenizer.ggml.prefix_token_id",
    "tokenizer.ggml.suffix_token_id",
    "tokenizer.ggml.middle_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
];

const ARCHS: &[&str] = &[
    "llama",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "gemma3",
    "deepseek2",
    "mamba",
    "",
];

/// Strings the loaders compare against, and strings that break naive code.
const STRINGS: &[&str] = &[
    "llama",
    "gpt2",
    "bert",
    "t5",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "gemma3",
    "deepseek2",
    "llama-bpe",
    "default",
    "gpt-4o",
    "tekken",
    "smollm",
    "yarn",
    "linear",
    "none",
    "",
    " ",
    "\u{2581}",
    "\u{0120}",
    "<0x0A>",
    "<0xZZ>",
    "<0x>",
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|tool_response>",
    "[EMPTY_0]",
    "a b",
    "a b c",
    "ab",
    " a",
    "a ",
    "\u{0120} \u{0120}",
    "\u{F8F0}",
    "\u{FFFD}",
    "\u{10FFFF}",
    "\u{0}",
    "unused",
    "<unused0>",
];

/// Every key the loaders read, for each architecture, and the keys of the seeds.
pub fn key_pool(seeds: &[Metadata]) -> Arc<Vec<String>> {
    let mut keys: Vec<String> = KEYS
        .iter()
        .flat_map(|k| ARCHS.iter().map(move |a| k.replace("{arch}", a)))
        .collect();
    keys.extend(seeds.iter().flat_map(|m| m.entries.keys().cloned()));
    keys.sort();
    keys.dedup();
    Arc::new(keys)
}

/// Every value of the seeds (whole arrays included) and every string in them.
pub fn value_pool(seeds: &[Metadata]) -> Arc<Vec<MetaValue>> {
    fn strings(v: &MetaValue, out: &mut Vec<MetaValue>) {
        match v {
            MetaValue::String(_) => out.push(v.clone()),
            MetaValue::Array(a) => a.iter().for_each(|e| strings(e, out)),
            _ => {}
        }
    }
    let mut pool = Vec::new();
    for m in seeds {
        for v in m.entries.values() {
            pool.push(v.clone());
            strings(v, &mut pool);
        }
    }
    Arc::new(pool)
}

/// A value of any type, mostly on a boundary.
pub fn interesting_meta() -> impl Strategy<Value = MetaValue> {
    let int = select(INTERESTING);
    let ints = prop_oneof![
        int.clone().prop_map(|v| MetaValue::U8(v as u8)),
        int.clone().prop_map(|v| MetaValue::I8(v as i8)),
        int.clone().prop_map(|v| MetaValue::U16(v as u16)),
        int.clone().prop_map(|v| MetaValue::I16(v as i16)),
        int.clone().prop_map(|v| MetaValue::U32(v as u32)),
        int.clone().prop_map(|v| MetaValue::I32(v as i32)),
        int.clone().prop_map(MetaValue::U64),
        int.clone().prop_map(|v| MetaValue::I64(v as i64)),
        int.prop_map(|v| MetaValue::I64((v as i64).wrapping_neg())),
    ];
    let floats = select(
        &[
            0.0f64,
            -0.0,
            1.0,
            -1.0,
            0.5,
            1e-45,
            1e-300,
            3.4e38,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ][..],
    );
    let floats = prop_oneof![
        floats.clone().prop_map(|f| MetaValue::F32(f as f32)),
        floats.prop_map(MetaValue::F64),
    ];
    let strings = prop_oneof![
        3 => select(STRINGS).prop_map(|s| MetaValue::String(s.into())),
        1 => "[ -~\u{80}-\u{10FFFF}]{0,24}".prop_map(MetaValue::String),
        1 => (0..5000usize).prop_map(|n| MetaValue::String("x".repeat(n))),
    ];
    let leaf = prop_oneof![
        4 => ints,
        2 => floats,
        1 => any::<bool>().prop_map(MetaValue::Bool),
        3 => strings,
    ];
    prop_oneof![
        6 => leaf.clone(),
        1 => (leaf, 0..40usize).prop_map(|(v, n)| MetaValue::Array(vec![v; n])),
        1 => Just(MetaValue::Array(Vec::new())),
        1 => Just(MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U32(1)])])),
    ]
}

/// One edit of a metadata map. `key` picks from the key pool, `pool` from the value pool.
#[derive(Clone, Debug)]
pub enum MetaOp {
    Set {
        key: usize,
        value: MetaValue,
    },
    /// Set a key to a value of the seeds (another key's, possibly another type).
    Copy {
        key: usize,
        pool: usize,
    },
    Remove {
        key: usize,
    },
    /// Keep only the first `len` elements of an array.
    Truncate {
        key: usize,
        len: usize,
    },
    /// Overwrite one element of an array.
    SetElement {
        key: usize,
        at: usize,
        value: MetaValue,
    },
    /// Overwrite one element of an array with a copy of another (duplicate tokens, merges).
    CopyElement {
        key: usize,
        from: usize,
        to: usize,
    },
    /// Add `delta` to an integer or a float.
    Nudge {
        key: usize,
        delta: i64,
    },
}

pub fn meta_op() -> impl Strategy<Value = MetaOp> {
    let k = any::<usize>;
    prop_oneof![
        4 => (k(), interesting_meta()).prop_map(|(key, value)| MetaOp::Set { key, value }),
        2 => (k(), any::<usize>()).prop_map(|(key, pool)| MetaOp::Copy { key, pool }),
        2 => k().prop_map(|key| MetaOp::Remove { key }),
        1 => (k(), 0..300usize).prop_map(|(key, len)| MetaOp::Truncate { key, len }),
        3 => (k(), any::<usize>(), interesting_meta())
            .prop_map(|(key, at, value)| MetaOp::SetElement { key, at, value }),
        2 => (k(), any::<usize>(), any::<usize>())
            .prop_map(|(key, from, to)| MetaOp::CopyElement { key, from, to }),
        2 => (k(), prop_oneof![-2..3i64, select(&[-1i64 << 31, 1 << 31, 1 << 40][..])])
            .prop_map(|(key, delta)| MetaOp::Nudge { key, delta }),
    ]
}

fn pick<T>(items: &[T], i: usize) -> Option<&T> {
    items.get(i.checked_rem(items.len())?)
}

/// The array under the `i`-th of the keys `present`, if that value is an array.
fn array_at<'a>(
    meta: &'a mut Metadata,
    present: &[String],
    i: usize,
) -> Option<&'a mut Vec<MetaValue>> {
    match meta.entries.get_mut(pick(present, i)?)? {
        MetaValue::Array(a) => Some(a),
        _ => None,
    }
}

/// Applies `ops` in order. Edits of existing values pick among the keys present (pool keys are
/// mostly absent).
pub fn apply_meta(meta: &mut Metadata, ops: &[MetaOp], keys: &[String], pool: &[MetaValue]) {
    for op in ops {
        let present: Vec<String> = meta.entries.keys().cloned().collect();
        let any_key = |i: usize| pick(keys, i).cloned().unwrap_or_default();
        match op {
            MetaOp::Set { key, value } => {
                meta.entries.insert(any_key(*key), value.clone());
            }
            MetaOp::Copy { key, pool: p } => {
                if let Some(v) = pick(pool, *p) {
                    meta.entries.insert(any_key(*key), v.clone());
                }
            }
            MetaOp::Remove { key } => {
                if let Some(k) = pick(&present, *key) {
                    meta.entries.remove(k);
                }
            }
            MetaOp::Truncate { key, len } => {
                if let Some(a) = array_at(meta, &present, *key) {
                    a.truncate(*len);
                }
            }
            MetaOp::SetElement { key, at, value } => {
                if let Some(a) = array_at(meta, &present, *key) {
                    if let Some(i) = at.checked_rem(a.len()) {
                        a[i] = value.clone();
                    }
                }
            }
            MetaOp::CopyElement { key, from, to } => {
                if let Some(a) = array_at(meta, &present, *key) {
                    if let (Some(f), Some(t)) = (from.checked_rem(a.len()), to.checked_rem(a.len()))
                    {
                        a[t] = a[f].clone();
                    }
                }
            }
            MetaOp::Nudge { key, delta } => {
                let Some(v) = pick(&present, *key).and_then(|k| meta.entries.get_mut(k)) else {
                    continue;
                };
                let d = *delta;
                *v = match *v {
                    MetaValue::U8(x) => MetaValue::U8(x.wrapping_add(d as u8)),
                    MetaValue::I8(x) => MetaValue::I8(x.wrapping_add(d as i8)),
                    MetaValue::U16(x) => MetaValue::U16(x.wrapping_add(d as u16)),
                    MetaValue::I16(x) => MetaValue::I16(x.wrapping_add(d as i16)),
                    MetaValue::U32(x) => MetaValue::U32(x.wrapping_add(d as u32)),
                    MetaValue::I32(x) => MetaValue::I32(x.wrapping_add(d as i32)),
                    MetaValue::U64(x) => MetaValue::U64(x.wrapping_add_signed(d)),
                    MetaValue::I64(x) => MetaValue::I64(x.wrapping_add(d)),
                    MetaValue::F32(x) => MetaValue::F32(x + d as f32),
                    MetaValue::F64(x) => MetaValue::F64(x + d as f64),
                    _ => continue,
                };
            }
        }
    }
}

//! Crafted GGUF files: every metadata value a file controls is range-checked at load, so a bad
//! one is a load error naming its key, never a panic in the forward pass. A tiny random Llama
//! (and Gemma 3) is written with one value changed at a time; each either fails to load with
//! an error naming the key, or loads and runs a forward pass without panicking.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use supernode_kernels::DType;
use supernode_models::gguf::GgufWriter;
use supernode_models::{load_model, Batch, KvCache, LoadOptions, MetaValue};

const H: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = H / HEADS;
const FF: usize = 48;
const VOCAB: usize = 40;
const LAYERS: usize = 2;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("supernode-crafted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Deterministic small weights.
fn weights(n: usize, seed: usize) -> Vec<u8> {
    f32s(
        &(0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
            .collect::<Vec<_>>(),
    )
}

/// A tiny `arch` model (`llama` or `gemma3`) with F32 weights: its metadata, then `meta`
/// (unprefixed keys are prefixed with `arch.`; `tokenizer.` keys are taken as they are).
fn tiny(arch: &str, meta: &[(&str, MetaValue)]) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String(arch.into()));
    for (k, v) in [
        ("block_count", LAYERS),
        ("embedding_length", H),
        ("feed_forward_length", FF),
        ("attention.head_count", HEADS),
        ("attention.head_count_kv", KV),
        ("context_length", 64),
    ] {
        w.meta(&format!("{arch}.{k}"), MetaValue::U32(v as u32));
    }
    w.meta(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(1e-5),
    );
    if arch == "gemma3" {
        w.meta(
            &format!("{arch}.attention.sliding_window"),
            MetaValue::U32(4),
        );
    }
    for (k, v) in meta {
        let key = if k.starts_with("tokenizer.") {
            k.to_string()
        } else {
            format!("{arch}.{k}")
        };
        w.meta(&key, v.clone());
    }
    let ones = |n: usize| f32s(&vec![1.0; n]);
    w.tensor(
        "token_embd.weight",
        DType::F32,
        &[H, VOCAB],
        weights(H * VOCAB, 1),
    );
    w.tensor("output_norm.weight", DType::F32, &[H], ones(H));
    for i in 0..LAYERS {
        let p = |n: &str| format!("blk.{i}.{n}");
        let mut norms = vec!["attn_norm.weight", "ffn_norm.weight"];
        if arch == "gemma3" {
            norms.extend(["post_attention_norm.weight", "post_ffw_norm.weight"]);
            w.tensor(&p("attn_q_norm.weight"), DType::F32, &[HD], ones(HD));
            w.tensor(&p("attn_k_norm.weight"), DType::F32, &[HD], ones(HD));
        }
        for n in norms {
            w.tensor(&p(n), DType::F32, &[H], ones(H));
        }
        for (n, cols, rows) in [
            ("attn_q.weight", H, HEADS * HD),
            ("attn_k.weight", H, KV * HD),
            ("attn_v.weight", H, KV * HD),
            ("attn_output.weight", HEADS * HD, H),
            ("ffn_gate.weight", H, FF),
            ("ffn_up.weight", H, FF),
            ("ffn_down.weight", FF, H),
        ] {
            w.tensor(
                &p(n),
                DType::F32,
                &[cols, rows],
                weights(cols * rows, i + 2),
            );
        }
    }
    w
}

fn write(w: &GgufWriter, name: &str) -> PathBuf {
    let path = tmp(name);
    w.write(&path).unwrap();
    path
}

/// Loads `path`; on success runs a forward pass of three tokens (positions 0..3) and returns
/// `Ok`; a panic anywhere fails the test.
fn load_and_run(path: &Path) -> Result<(), String> {
    let m = match load_model(path, &LoadOptions::default()) {
        Ok(m) => m,
        Err(e) => return Err(e.to_string()),
    };
    let model = m.model;
    let ran = catch_unwind(AssertUnwindSafe(|| {
        let mut kv = KvCache::new(&model.kv_specs(), 16, 1).unwrap();
        let table = [0u32];
        let tables = [&table[..]];
        let batch = Batch {
            tokens: &[1, 2, 3],
            positions: &[0, 1, 2],
            seq_of: &[0, 0, 0],
            block_tables: &tables,
            logits_for: &[2],
            state_slots: &[],
            chunked_until: &[],
            drafts: &[],
        };
        model.forward(&batch, &mut kv).map(|l| l.len())
    }));
    match ran {
        Ok(Ok(n)) => {
            assert_eq!(n, model.config().vocab_size);
            Ok(())
        }
        Ok(Err(e)) => panic!(
            "{}: loads, then the forward pass fails: {e}",
            path.display()
        ),
        Err(_) => panic!("{}: loads, then the forward pass panics", path.display()),
    }
}

/// Asserts that `path` fails to load with one error naming every `needle`.
fn assert_load_error(path: &Path, needles: &[&str]) {
    let err = load_and_run(path).expect_err("the crafted file loads");
    assert!(!err.contains('\n'), "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn tiny_models_load_and_run() {
    for arch in ["llama", "gemma3"] {
        let path = write(&tiny(arch, &[]), &format!("{arch}-ok.gguf"));
        load_and_run(&path).unwrap_or_else(|e| panic!("{arch}: {e}"));
    }
}

/// The finding of issue 13: `rope.dimension_count = 0` passed validation, then every forward
/// pass panicked in the rope (and `serve` answered every request with a 500).
#[test]
fn zero_rope_dims_is_a_load_error_naming_the_key() {
    for arch in ["llama", "gemma3"] {
        let w = tiny(arch, &[("rope.dimension_count", MetaValue::U32(0))]);
        let path = write(&w, &format!("{arch}-rope0.gguf"));
        let key = format!("`{arch}.rope.dimension_count`");
        assert_load_error(&path, &[&key, path.to_str().unwrap()]);
    }
}

/// Every numeric key of the tiny models set to values around and outside its range: each file
/// either loads and runs, or fails to load naming the key.
#[test]
fn bad_values_never_reach_the_forward_pass() {
    use MetaValue::{F32, U32, U64};
    let sizes = || {
        vec![
            U32(0),
            U32(1),
            U32(3),
            U32(7),
            U32(64),
            U32(1 << 31),
            U64(u64::MAX),
        ]
    };
    let floats = || {
        vec![
            F32(0.0),
            F32(-1.0),
            F32(f32::NAN),
            F32(f32::INFINITY),
            F32(1e-30),
            F32(1e30),
        ]
    };
    let mut cases: Vec<(&str, &str, Vec<MetaValue>)> = Vec::new();
    for arch in ["llama", "gemma3"] {
        for key in [
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "context_length",
            "vocab_size",
            "rope.dimension_count",
            "rope.scaling.original_context_length",
        ] {
            cases.push((arch, key, sizes()));
        }
        for key in [
            "attention.layer_norm_rms_epsilon",
            "rope.freq_base",
            "rope.scaling.factor",
            "rope.scaling.yarn_beta_fast",
            "rope.scaling.yarn_beta_slow",
            "rope.scaling.attn_factor",
        ] {
            cases.push((arch, key, floats()));
        }
    }
    cases.push(("gemma3", "attention.sliding_window", sizes()));
    cases.push(("gemma3", "final_logit_softcapping", floats()));
    let mut n = 0;
    for (arch, key, values) in cases {
        let scalings: &[&str] = if key.starts_with("rope.scaling.") {
            &["linear", "yarn"]
        } else {
            &["none"]
        };
        for &scaling in scalings {
            for v in &values {
                let w = tiny(
                    arch,
                    &[
                        ("rope.scaling.type", MetaValue::String(scaling.into())),
                        (key, v.clone()),
                    ],
                );
                let path = write(&w, &format!("{arch}-sweep.gguf"));
                if let Err(err) = load_and_run(&path) {
                    let full = format!("`{arch}.{key}`");
                    // A value that breaks another key's rule (a head dim that leaves the
                    // default rope dims too many) may be reported under that key.
                    let related = [
                        "attention.key_length",
                        "rope.dimension_count",
                        "attention.head_count",
                    ]
                    .iter()
                    .any(|k| err.contains(&format!("`{arch}.{k}`")));
                    assert!(
                        err.contains(&full)
                            || related
                            || err.contains("tensor `")
                            || (key == "vocab_size" && err.contains("vocabulary")),
                        "{arch}.{key} = {v:?} (rope scaling {scaling}): {err}"
                    );
                }
                n += 1;
            }
        }
    }
    assert!(n > 250, "{n} files");
}

/// llama.cpp's rule: the vocabulary is the token list, and the embedding and output matrices
/// have exactly one row per token. A 10-token list over a 40-row embedding used to load (ids
/// from 10 on printing as "").
#[test]
fn token_list_and_embedding_rows_must_agree() {
    let tokens = |n: usize| {
        (
            "tokenizer.ggml.tokens",
            MetaValue::Array((0..n).map(|i| MetaValue::String(format!("t{i}"))).collect()),
        )
    };
    let short = write(&tiny("llama", &[tokens(10)]), "short-vocab.gguf");
    assert_load_error(
        &short,
        &["`token_embd.weight`", "`tokenizer.ggml.tokens`", "40 rows"],
    );
    let long = write(&tiny("llama", &[tokens(50)]), "long-vocab.gguf");
    assert_load_error(&long, &["`token_embd.weight`", "`tokenizer.ggml.tokens`"]);
    let disagree = write(
        &tiny(
            "llama",
            &[
                tokens(VOCAB),
                ("vocab_size", MetaValue::U32(VOCAB as u32 + 8)),
            ],
        ),
        "vocab-key.gguf",
    );
    assert_load_error(
        &disagree,
        &["`llama.vocab_size`", "`tokenizer.ggml.tokens`"],
    );
    let by_key = write(
        &tiny("llama", &[("vocab_size", MetaValue::U32(32))]),
        "vocab-key-only.gguf",
    );
    assert_load_error(&by_key, &["`token_embd.weight`", "`llama.vocab_size`"]);
    // An untied output matrix of another height.
    let mut w = tiny("llama", &[tokens(VOCAB)]);
    w.tensor(
        "output.weight",
        DType::F32,
        &[H, VOCAB + 8],
        weights(H * (VOCAB + 8), 9),
    );
    let out = write(&w, "output-rows.gguf");
    assert_load_error(&out, &["`output.weight`", "`tokenizer.ggml.tokens`"]);
    let ok = write(&tiny("llama", &[tokens(VOCAB)]), "vocab-ok.gguf");
    load_and_run(&ok).unwrap();
}

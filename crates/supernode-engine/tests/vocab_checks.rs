//! The tokenizer against the model at load: every id the tokenizer makes has an embedding row.
//! An HF model's config.json `vocab_size` may exceed `tokenizer.json` (padding rows), but a
//! tokenizer with ids beyond it is a load error naming `vocab_size`.

use std::path::{Path, PathBuf};

use serde_json::json;
use supernode_engine::load::load_with_tokenizer;
use supernode_models::LoadOptions;

/// A copy of the tiny HF Llama fixture (vocabulary 256) with a word-level `tokenizer.json`
/// whose highest id is `max_id`.
fn llama_with_tokenizer(tag: &str, max_id: u32) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf/llama");
    let dir = std::env::temp_dir().join(format!("supernode-vocab-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>",
                  "vocab": {"<unk>": 0, "a": 1, "b": max_id}},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

fn load_err(dir: &Path) -> Option<String> {
    load_with_tokenizer(dir, &LoadOptions::default())
        .err()
        .map(|e| e.to_string())
}

#[test]
fn hf_tokenizer_ids_beyond_vocab_size_are_refused() {
    let over = llama_with_tokenizer("over", 256);
    let err = load_err(&over).expect("a tokenizer with id 256 over 256 rows loads");
    for want in ["`vocab_size` is 256", "tokenizer.json", "ids up to 256"] {
        assert!(err.contains(want), "`{want}` not in: {err}");
    }
    // Padding rows: fewer tokenizer ids than embedding rows is allowed.
    let padded = llama_with_tokenizer("padded", 200);
    assert_eq!(load_err(&padded), None);
    let exact = llama_with_tokenizer("exact", 255);
    assert_eq!(load_err(&exact), None);
    for dir in [over, padded, exact] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

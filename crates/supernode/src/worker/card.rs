//! The model card Dynamo's frontend tokenises with: a directory in HF layout (`config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`), given to Dynamo's
//! `Worker` as the model path.
//!
//! A safetensors directory that has its own `tokenizer.json` is its own card. For a GGUF file
//! the card is written from the file's metadata into the cache
//! (`$SUPERNODE_CACHE/dynamo-cards/NAME-HASH/`, one per model file): the vocabulary as
//! `tokenizer.json` ([`Tokenizer::hf_tokenizer_json`], checked against llama.cpp's ids through
//! HF `tokenizers`), the chat template and special tokens as `tokenizer_config.json`, and the
//! end-of-generation ids in `config.json` and `generation_config.json`, so the frontend stops
//! on the tokens the engine stops on.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use supernode_engine::tokenizer::Tokenizer;
use supernode_models::ModelConfig;

/// The card directory of the model at `path`.
pub fn write(
    path: &Path,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    model_id: &str,
) -> Result<PathBuf> {
    if path.is_dir() && path.join("tokenizer.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let meta = supernode_models::gguf::read_gguf(path)
        .with_context(|| format!("reading {}", path.display()))?
        .metadata;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let digest = Sha256::digest(canonical.to_string_lossy().as_bytes());
    let tag: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let name: String = model_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = crate::fetch::cache_dir()?
        .join("dynamo-cards")
        .join(format!("{name}-{tag}"));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the model card directory {}", dir.display()))?;
    let tokenizer_json = tokenizer.hf_tokenizer_json(&meta).map_err(|e| {
        anyhow::anyhow!(
            "cannot write {}'s tokenizer for Dynamo: {e}",
            path.display()
        )
    })?;
    let files = [
        ("tokenizer.json", tokenizer_json),
        ("tokenizer_config.json", tokenizer_config(config, tokenizer)),
        ("config.json", hf_config(config, tokenizer)),
        (
            "generation_config.json",
            json!({
                "bos_token_id": tokenizer.bos_id(),
                "eos_token_id": tokenizer.eog_ids(),
            }),
        ),
    ];
    for (file, value) in files {
        write_atomically(&dir.join(file), &value)?;
    }
    Ok(dir)
}

fn text(tokenizer: &Tokenizer, id: Option<u32>) -> Value {
    id.and_then(|i| tokenizer.token_text(i))
        .map_or(Value::Null, |t| json!(t))
}

fn tokenizer_config(config: &ModelConfig, tokenizer: &Tokenizer) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": tokenizer.chat_template(),
        "bos_token": text(tokenizer, tokenizer.bos_id()),
        "eos_token": text(tokenizer, tokenizer.eos_id()),
        "add_bos_token": tokenizer.adds_bos(),
        "model_max_length": config.context_len,
        "clean_up_tokenization_spaces": false,
    })
}

fn hf_config(config: &ModelConfig, tokenizer: &Tokenizer) -> Value {
    json!({
        "architectures": [],
        "model_type": config.arch.hf_model_type(),
        "bos_token_id": tokenizer.bos_id(),
        "eos_token_id": tokenizer.eog_ids(),
        "max_position_embeddings": config.context_len,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "hidden_size": config.hidden,
        "vocab_size": config.vocab_size,
    })
}

/// Writes `value` to `path` through a temporary file, so that a reader never sees half a file.
fn write_atomically(path: &Path, value: &Value) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(value)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

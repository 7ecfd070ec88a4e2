//! Loading a model with its tokenizer, and checking that the two agree.

use std::path::Path;
use std::sync::Arc;

use supernode_models::gguf::read_gguf;
use supernode_models::{load_model, LoadOptions, LoadedModel, Metadata, Model, ModelSource};

use crate::error::EngineError;
use crate::tokenizer::Tokenizer;

/// The tokenizer of the model files at `path` (a `.gguf` file or a model directory), without
/// building the model: `None` if the files have none.
pub fn load_tokenizer(path: &Path) -> Result<Option<Tokenizer>, EngineError> {
    if path.is_dir() {
        tokenizer_from_dir(path)
    } else {
        tokenizer_from_gguf(&read_gguf(path)?.metadata)
    }
}

fn tokenizer_from_gguf(metadata: &Metadata) -> Result<Option<Tokenizer>, EngineError> {
    if metadata.get("tokenizer.ggml.tokens").is_none() {
        return Ok(None);
    }
    Tokenizer::from_gguf_metadata(metadata).map(Some)
}

fn tokenizer_from_dir(dir: &Path) -> Result<Option<Tokenizer>, EngineError> {
    if !dir.join("tokenizer.json").is_file() {
        return Ok(None);
    }
    Tokenizer::from_hf_dir(dir).map(Some)
}

/// A loaded model and its tokenizer (if its files have one).
pub type ModelWithTokenizer = (Box<dyn Model>, Option<Arc<Tokenizer>>);

/// The model at `path` (a `.gguf` file or a safetensors directory) and its tokenizer, if the
/// files have one.
pub fn load_with_tokenizer(
    path: &Path,
    opts: &LoadOptions,
) -> Result<ModelWithTokenizer, EngineError> {
    let LoadedModel { model, source } = load_model(path, opts)?;
    let tokenizer = match &source {
        ModelSource::Gguf { metadata, .. } => tokenizer_from_gguf(metadata)?,
        ModelSource::HfDir { dir, .. } => tokenizer_from_dir(dir)?,
    };
    if let Some(tok) = &tokenizer {
        check_vocab(tok, model.config().vocab_size, &source)?;
    }
    Ok((model, tokenizer.map(Arc::new)))
}

/// Every id the tokenizer makes must have an embedding row and a logit. A GGUF model's
/// vocabulary is its token list (the loader holds the embedding to it, as llama.cpp does); an
/// HF model's `vocab_size` may exceed `tokenizer.json` (padding rows) but never be smaller than
/// its highest id + 1.
fn check_vocab(tok: &Tokenizer, vocab: usize, source: &ModelSource) -> Result<(), EngineError> {
    let ids = tok.vocab_size();
    if ids <= vocab {
        return Ok(());
    }
    Err(EngineError::Invalid(match source {
        ModelSource::Gguf { path, .. } => format!(
            "{}: `tokenizer.ggml.tokens` lists {ids} tokens, but the model has {vocab} \
             embedding rows",
            path.display()
        ),
        ModelSource::HfDir { dir, .. } => format!(
            "{}: `vocab_size` is {vocab}, but {} has ids up to {} (`vocab_size` must be at \
             least the highest id + 1)",
            dir.join("config.json").display(),
            dir.join("tokenizer.json").display(),
            ids - 1
        ),
    }))
}

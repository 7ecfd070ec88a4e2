//! One model with its tokenizer and a KV cache, running one sequence at a time: the engine
//! behind `supernode run`, `logits` and `tokenize`.
//!
//! The prompt is prefilled in chunks of at most [`PREFILL_CHUNK`] tokens, then tokens are
//! decoded one by one, all through the model's flat-batch forward (one sequence whose block
//! table covers the whole context). Chunked prefill and one-token decode compute identical
//! K/V rows, so the results do not depend on the chunk size.

use std::path::Path;
use std::sync::Arc;

use supernode_models::gguf::read_gguf;
use supernode_models::{
    load_model, Batch, KvCache, LoadOptions, LoadedModel, Metadata, Model, ModelSource,
};

use crate::error::EngineError;
use crate::sampler::{Sampler, SamplingParams};
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

/// Tokens per forward pass while prefilling.
pub const PREFILL_CHUNK: usize = 256;
/// KV slots per cache block.
pub const BLOCK_SIZE: usize = 16;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (not included in the output).
    Stop,
    /// The token limit or the end of the context.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// A loaded model ready to generate.
pub struct Session {
    model: Box<dyn Model>,
    tokenizer: Option<Arc<Tokenizer>>,
    /// Context length this session was opened with (≤ the model's).
    ctx_len: usize,
    kv: KvCache,
    block_table: Vec<u32>,
}

impl Session {
    /// Loads the model at `path` (a `.gguf` file or a safetensors directory) and its tokenizer
    /// if the files have one. `ctx_len` caps the context (default and maximum: the model's).
    pub fn load(
        path: &Path,
        opts: &LoadOptions,
        ctx_len: Option<usize>,
    ) -> Result<Session, EngineError> {
        let (model, tokenizer) = load_with_tokenizer(path, opts)?;
        Session::new(model, tokenizer, ctx_len)
    }

    /// A session over an already-built model.
    pub fn new(
        model: Box<dyn Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        ctx_len: Option<usize>,
    ) -> Result<Session, EngineError> {
        let max = model.config().context_len;
        let ctx_len = match ctx_len {
            Some(0) => {
                return Err(EngineError::Invalid(
                    "context length must be at least 1".into(),
                ))
            }
            Some(c) if c > max => {
                return Err(EngineError::Invalid(format!(
                    "context length {c} exceeds the model's {max}"
                )))
            }
            Some(c) => c,
            None => max,
        };
        let num_blocks = ctx_len.div_ceil(BLOCK_SIZE);
        let kv = KvCache::new(&model.kv_specs(), BLOCK_SIZE, num_blocks)?;
        let block_table = (0..num_blocks as u32).collect();
        Ok(Session {
            model,
            tokenizer,
            ctx_len,
            kv,
            block_table,
        })
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }

    /// The tokenizer, or an error saying the model has none.
    pub fn require_tokenizer(&self) -> Result<&Arc<Tokenizer>, EngineError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            EngineError::Invalid(
                "this model has no tokenizer files; pass token ids with --tokens".into(),
            )
        })
    }

    pub fn ctx_len(&self) -> usize {
        self.ctx_len
    }

    fn check_prompt(&self, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if tokens.len() > self.ctx_len {
            return Err(EngineError::Invalid(format!(
                "the prompt has {} tokens but the context holds {}",
                tokens.len(),
                self.ctx_len
            )));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Invalid(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// Runs `tokens` at positions `start..`, returning the logits of the rows in `want`
    /// (indices into `tokens`).
    fn forward(
        &mut self,
        tokens: &[u32],
        start: usize,
        want: &[usize],
    ) -> Result<Vec<f32>, EngineError> {
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let seq_of = vec![0; tokens.len()];
        let tables = [self.block_table.as_slice()];
        let batch = Batch {
            tokens,
            positions: &positions,
            seq_of: &seq_of,
            block_tables: &tables,
            logits_for: want,
        };
        Ok(self.model.forward(&batch, &mut self.kv)?)
    }

    /// Prefills `tokens` from position 0 in chunks of `chunk`; returns the logits of every
    /// position if `all`, else of the last one only.
    fn prefill(
        &mut self,
        tokens: &[u32],
        chunk_len: usize,
        all: bool,
    ) -> Result<Vec<f32>, EngineError> {
        self.check_prompt(tokens)?;
        if chunk_len == 0 {
            return Err(EngineError::Invalid(
                "the prefill chunk must hold at least one token".into(),
            ));
        }
        let mut out = Vec::new();
        for (c, chunk) in tokens.chunks(chunk_len).enumerate() {
            let start = c * chunk_len;
            let last_chunk = start + chunk.len() == tokens.len();
            let want: Vec<usize> = if all {
                (0..chunk.len()).collect()
            } else if last_chunk {
                vec![chunk.len() - 1]
            } else {
                Vec::new()
            };
            out.extend(self.forward(chunk, start, &want)?);
        }
        Ok(out)
    }

    /// Teacher-forced logits of every position of `tokens` (row `i` predicts token `i + 1`).
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.logits_chunked(tokens, PREFILL_CHUNK)
    }

    /// [`Session::logits`] with prefill chunks of `chunk_len` tokens (1: token by token, as
    /// decoding does). The result does not depend on `chunk_len`.
    pub fn logits_chunked(
        &mut self,
        tokens: &[u32],
        chunk_len: usize,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let vocab = self.model.config().vocab_size;
        let flat = self.prefill(tokens, chunk_len, true)?;
        Ok(flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Generates up to `max_tokens` after `prompt`. `on_token(id, logits)` sees each new token
    /// and the logits it was sampled from, and returns `false` to stop. Stops at the model's
    /// end-of-generation tokens (unless `ignore_eos`) and at the end of the context.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        max_tokens: usize,
        ignore_eos: bool,
        mut on_token: impl FnMut(u32, &[f32]) -> bool,
    ) -> Result<(Vec<u32>, FinishReason), EngineError> {
        params.validate().map_err(EngineError::Invalid)?;
        let eog: Vec<u32> = match (&self.tokenizer, ignore_eos) {
            (Some(t), false) => t.eog_ids().to_vec(),
            _ => Vec::new(),
        };
        let mut sampler = Sampler::new(params.clone());
        let mut history = prompt.to_vec();
        let mut logits = self.prefill(prompt, PREFILL_CHUNK, false)?;
        let mut out = Vec::new();
        loop {
            if out.len() >= max_tokens {
                return Ok((out, FinishReason::Length));
            }
            let tok = sampler.sample(&logits, &history);
            if eog.contains(&tok) {
                return Ok((out, FinishReason::Stop));
            }
            out.push(tok);
            history.push(tok);
            if !on_token(tok, &logits) {
                return Ok((out, FinishReason::Cancelled));
            }
            // The new token's K/V goes at position `pos`, which must lie inside the context.
            let pos = history.len() - 1;
            if out.len() >= max_tokens || pos >= self.ctx_len {
                return Ok((out, FinishReason::Length));
            }
            logits = self.forward(&[tok], pos, &[0])?;
        }
    }
}

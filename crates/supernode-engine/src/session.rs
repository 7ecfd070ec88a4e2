//! One model served to one caller at a time: `supernode run`, `logits` and the tests that
//! compare logits with references. It is a client of the [`Engine`], not a loop of its own,
//! so `run` and `serve` share every rule (chunked prefill, the prefix cache, stop strings,
//! limits) and give the same greedy tokens for the same prompt.
//!
//! The engine's KV cache holds the whole context for the one request; the prompt is
//! prefilled in chunks of [`PREFILL_CHUNK`] tokens. The prefix cache stays on, so a chat's
//! next turn reuses the blocks of the conversation so far.

use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use supernode_models::{LoadOptions, Model};

use crate::engine::{Engine, EngineConfig, Event, Finish, Request, Sink, TokenEvent, BLOCK_SIZE};
use crate::error::EngineError;
use crate::load::load_with_tokenizer;
use crate::sampler::SamplingParams;
use crate::spec::SpecConfig;
use crate::tokenizer::Tokenizer;

/// Tokens per forward pass while prefilling.
pub const PREFILL_CHUNK: usize = 256;

/// What one generation asks for.
#[derive(Clone, Debug, Default)]
pub struct Generate {
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// Generation stops before the first occurrence of any of these texts.
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Keeps this generation's prefix-cache entries apart from other salts'.
    pub cache_salt: Option<String>,
}

/// What one generation gave.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// The text of the tokens (empty without a tokenizer), stop string excluded.
    pub text: String,
    pub finish: Finish,
}

/// A loaded model ready to generate.
pub struct Session {
    engine: Engine,
    /// Context length this session was opened with (≤ the model's).
    ctx_len: usize,
}

/// Forwards events into a channel the session drains after each step.
struct ChannelSink(Sender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
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
        let cfg = EngineConfig {
            max_num_seqs: 1,
            max_num_batched_tokens: PREFILL_CHUNK,
            num_blocks: ctx_len.div_ceil(BLOCK_SIZE),
            ctx_len,
            max_waiting: 1,
            prefix_caching: true,
            prefix_cache_salt: String::new(),
            speculative: None,
            state_slots: 0,
        };
        Ok(Session {
            engine: Engine::new(model, tokenizer, cfg)?,
            ctx_len,
        })
    }

    pub fn model(&self) -> &dyn Model {
        self.engine.model()
    }

    /// Turns speculative decoding on (with this configuration) or off for later generations.
    pub fn set_speculative(&mut self, spec: Option<SpecConfig>) -> Result<(), EngineError> {
        self.engine.set_speculative(spec)
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.engine.tokenizer()
    }

    /// The tokenizer, or an error saying the model has none.
    pub fn require_tokenizer(&self) -> Result<&Arc<Tokenizer>, EngineError> {
        self.tokenizer().ok_or_else(|| {
            EngineError::Invalid(
                "this model has no tokenizer files; pass token ids with --tokens".into(),
            )
        })
    }

    pub fn ctx_len(&self) -> usize {
        self.ctx_len
    }

    /// Runs the request `make` builds around a sink to its end, handing each event before
    /// the last to `on_event` (`false` from it cancels the request); returns the final one.
    fn drive(
        &mut self,
        make: impl FnOnce(Box<dyn Sink>) -> Request,
        mut on_event: impl FnMut(Event) -> bool,
    ) -> Result<Finish, EngineError> {
        let (tx, rx) = mpsc::channel();
        let id = self
            .engine
            .add_request(make(Box::new(ChannelSink(tx))))
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let mut cancelled = false;
        loop {
            self.engine.step();
            for ev in rx.try_iter() {
                match ev {
                    Event::Done(f) => return Ok(f),
                    Event::Error(e) => return Err(EngineError::Invalid(e)),
                    ev => {
                        if !cancelled && !on_event(ev) {
                            cancelled = true;
                            self.engine.cancel(id);
                        }
                    }
                }
            }
            if !self.engine.has_unfinished() && !cancelled {
                return Err(EngineError::Invalid(format!(
                    "the engine dropped request {id} without finishing it"
                )));
            }
        }
    }

    /// Generates after `prompt` as `g` says. `on_token` sees each token as it comes, and
    /// returns `false` to stop (the result then ends with `Cancelled`).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        g: &Generate,
        mut on_token: impl FnMut(&TokenEvent) -> bool,
    ) -> Result<Generated, EngineError> {
        let mut tokens = Vec::new();
        let mut text = String::new();
        let finish = self.drive(
            |sink| Request {
                prompt: prompt.to_vec(),
                params: g.params.clone(),
                max_tokens: g.max_tokens,
                stop: g.stop.clone(),
                ignore_eos: g.ignore_eos,
                min_tokens: 0,
                logprobs: None,
                cache_salt: g.cache_salt.clone(),
                prompt_logits: false,
                prompt_logprobs: None,
                logit_bias: Vec::new(),
                constraint: None,
                sink,
            },
            |ev| match ev {
                Event::Token(t) => {
                    tokens.push(t.id);
                    text.push_str(&t.text);
                    on_token(&t)
                }
                _ => true,
            },
        )?;
        text.push_str(&finish.text);
        Ok(Generated {
            tokens,
            text,
            finish,
        })
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
        if chunk_len == 0 {
            return Err(EngineError::Invalid(
                "the prefill chunk must hold at least one token".into(),
            ));
        }
        let vocab = self.model().config().vocab_size;
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(tokens.len());
        self.engine.set_token_budget(chunk_len);
        let res = self.drive(
            |sink| Request {
                prompt: tokens.to_vec(),
                params: SamplingParams::greedy(),
                max_tokens: 0,
                stop: Vec::new(),
                ignore_eos: true,
                min_tokens: 0,
                logprobs: None,
                cache_salt: None,
                prompt_logits: true,
                prompt_logprobs: None,
                logit_bias: Vec::new(),
                constraint: None,
                sink,
            },
            |ev| {
                if let Event::PromptLogits(p) = ev {
                    debug_assert_eq!(p.start, rows.len());
                    rows.extend(p.logits.chunks_exact(vocab).map(<[f32]>::to_vec));
                }
                true
            },
        );
        self.engine.set_token_budget(PREFILL_CHUNK);
        res?;
        Ok(rows)
    }
}

//! Helpers shared by the engine's integration tests: model paths, an event sink, greedy
//! requests, engines on the fixtures and a loop that runs requests to their end, speculation
//! settings and counters, pseudo-random numbers, byte grammars.

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use supernode_engine::constraint::Grammars;
use supernode_engine::engine::{
    Engine, EngineConfig, EngineStats, Event, Finish, Request, Sink, TokenEvent,
};
use supernode_engine::sampler::SamplingParams;
use supernode_engine::spec::{DraftModel, SpecConfig};
use supernode_models::{load_model, LoadOptions};

/// The tiny random model of `tests/fixtures/hf/<arch>`.
pub fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(arch)
}

/// The cached GGUF of a known model (`$SUPERNODE_CACHE/models`, default
/// `~/.cache/supernode/models`); a missing file fails the test with what to run.
pub fn model_path(name: &str) -> PathBuf {
    let cache = std::env::var_os("SUPERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/supernode")
        });
    let p = cache.join("models").join(format!("{name}.gguf"));
    assert!(
        p.is_file(),
        "{} is missing: run `supernode fetch {name}` first",
        p.display()
    );
    p
}

/// A sink that keeps every event and is never closed.
pub struct Collect(pub Arc<Mutex<Vec<Event>>>);

impl Sink for Collect {
    fn send(&mut self, event: Event) -> bool {
        self.0.lock().unwrap().push(event);
        true
    }
    fn is_closed(&self) -> bool {
        false
    }
}

/// A greedy request for `max_tokens` tokens past any end of generation, nothing else asked.
pub fn greedy(prompt: Vec<u32>, max_tokens: usize, sink: Box<dyn Sink>) -> Request {
    Request {
        prompt,
        params: SamplingParams::greedy(),
        max_tokens,
        stop: Vec::new(),
        ignore_eos: true,
        min_tokens: 0,
        logprobs: None,
        cache_salt: None,
        prompt_logits: false,
        prompt_logprobs: None,
        logit_bias: Vec::new(),
        constraint: None,
        sink,
    }
}

/// The engine configuration of the fixture tests: a context of 256 tokens, up to 1000 waiting
/// requests, prefix caching, no speculation, a state slot per sequence.
pub fn config(
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    num_blocks: usize,
) -> EngineConfig {
    EngineConfig {
        max_num_seqs,
        max_num_batched_tokens,
        num_blocks,
        ctx_len: 256,
        max_waiting: 1000,
        prefix_caching: true,
        prefix_cache_salt: String::new(),
        speculative: None,
        state_slots: 0,
    }
}

/// An engine with [`config`] on the fixture `arch`, stepped by the test.
pub fn engine(
    arch: &str,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    num_blocks: usize,
) -> Engine {
    let m = load_model(&fixture(arch), &LoadOptions::default()).unwrap();
    let cfg = config(max_num_seqs, max_num_batched_tokens, num_blocks);
    Engine::new(m.model, None, cfg).unwrap()
}

/// What one request heard: its tokens and its final event.
pub type Heard = (Vec<TokenEvent>, Finish);

/// Adds a request for every item at once (`request` builds it around its sink), steps until
/// all are done (at most 100,000 steps), and returns what each heard; any event but a token
/// or the final one fails the test.
pub fn drive<T>(
    e: &mut Engine,
    items: &[T],
    mut request: impl FnMut(&T, Box<dyn Sink>) -> Request,
) -> Vec<Heard> {
    let logs: Vec<_> = items
        .iter()
        .map(|item| {
            let log = Arc::new(Mutex::new(Vec::new()));
            e.add_request(request(item, Box::new(Collect(log.clone()))))
                .unwrap();
            log
        })
        .collect();
    let mut steps = 0;
    while e.has_unfinished() {
        e.step();
        steps += 1;
        assert!(steps < 100_000, "the engine does not finish");
    }
    logs.iter()
        .map(|log| {
            let mut toks = Vec::new();
            let mut fin = None;
            for ev in log.lock().unwrap().drain(..) {
                match ev {
                    Event::Token(t) => toks.push(t),
                    Event::Done(f) => fin = Some(f),
                    other => panic!("unexpected event {other:?}"),
                }
            }
            (toks, fin.expect("every request finishes"))
        })
        .collect()
}

/// The token ids a request heard.
pub fn ids(h: &Heard) -> Vec<u32> {
    h.0.iter().map(|t| t.id).collect()
}

/// Prompt lookup drafting up to `k` tokens for every request whatever the batch.
pub fn ngram(k: usize) -> SpecConfig {
    SpecConfig {
        disable_by_batch_size: None,
        ..SpecConfig::ngram(k)
    }
}

/// The draft model `d` drafting up to `k` tokens for every request whatever the batch.
pub fn with_draft(d: DraftModel, k: usize) -> SpecConfig {
    SpecConfig {
        disable_by_batch_size: None,
        ..SpecConfig::draft(d, k)
    }
}

/// The engine's speculation totals: `(drafts, draft tokens, accepted tokens)`.
pub fn spec_totals(st: &EngineStats) -> (u64, u64, u64) {
    (
        st.spec_drafts.load(Ordering::Relaxed),
        st.spec_draft_tokens.load(Ordering::Relaxed),
        st.spec_accepted_tokens.load(Ordering::Relaxed),
    )
}

/// Xorshift64 numbers from `seed` (made odd, so never stuck at 0).
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// The grammars of the llama fixture read as a byte vocabulary: token `b` is byte `b`, token 0
/// the end of generation.
pub fn byte_grammars() -> Arc<Grammars> {
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    words[0] = b"\xFF<|end|>".to_vec();
    Arc::new(Grammars::from_token_bytes(words, &[0]).unwrap())
}

//! Helpers shared by the engine's integration tests: model paths, an event sink, greedy
//! requests and engines on the fixtures.

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use supernode_engine::engine::{Engine, EngineConfig, Event, Request, Sink};
use supernode_engine::sampler::SamplingParams;
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

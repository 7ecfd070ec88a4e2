//! Structured output and `logit_bias` through the engine, on the tiny random Llama of
//! `tests/fixtures/hf/llama` (vocabulary 256) read as a byte vocabulary: token `b` is the byte
//! `b`, token 0 the end of generation. Random weights write no JSON of their own, so every valid
//! document below is the grammar's doing; the `jsonschema` crate judges them.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use supernode_engine::constraint::{Constraint, ConstraintSpec, Grammars};
use supernode_engine::engine::{
    EngineHandle, Event, Finish, FinishReason, Request, Sink, TokenLogprobs,
};
use supernode_engine::sampler::SamplingParams;
use supernode_models::{load_model, LoadOptions};

mod common;
use common::{byte_grammars, config, fixture};

fn engine(max_num_seqs: usize, num_blocks: usize) -> EngineHandle {
    let m = load_model(&fixture("llama"), &LoadOptions::default()).unwrap();
    EngineHandle::start(m.model, None, config(max_num_seqs, 256, num_blocks)).unwrap()
}

struct ChanSink(Sender<Event>);

impl Sink for ChanSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

struct Output {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    finish: Finish,
}

fn wait(rx: Receiver<Event>) -> Output {
    let mut out = Output {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        finish: Finish {
            reason: FinishReason::Cancelled,
            text: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            stop_string: None,
            spec: None,
        },
    };
    loop {
        match rx.recv_timeout(Duration::from_secs(300)).unwrap() {
            Event::Token(t) => {
                out.tokens.push(t.id);
                out.logprobs.extend(t.logprobs);
            }
            Event::Done(f) => {
                out.finish = f;
                return out;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
}

struct Ask {
    params: SamplingParams,
    max_tokens: usize,
    logprobs: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    constraint: Option<Constraint>,
}

fn request(ask: Ask, prompt: Vec<u32>) -> (Request, Receiver<Event>) {
    let (tx, rx) = channel();
    let req = Request {
        prompt,
        params: ask.params,
        max_tokens: ask.max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
        min_tokens: 0,
        logprobs: ask.logprobs,
        cache_salt: None,
        prompt_logits: false,
        prompt_logprobs: None,
        logit_bias: ask.logit_bias,
        constraint: ask.constraint,
        sink: Box::new(ChanSink(tx)),
    };
    (req, rx)
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn text(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
    String::from_utf8(bytes).expect("the grammar keeps the bytes UTF-8")
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
            "kind": {"enum": ["cat", "dog", null]}
        },
        "required": ["name", "age", "member", "kind"],
        "additionalProperties": false
    })
}

#[test]
fn random_weights_write_valid_json_200_times_out_of_200() {
    let schema = person_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let compiled = byte_grammars()
        .compile(&ConstraintSpec::JsonSchema {
            schema: schema.clone(),
            strict: true,
        })
        .unwrap();
    // 16 running requests of up to ~120 tokens in 48 blocks of 16: preemptions happen, and a
    // preempted request's recompute must not advance its grammar again.
    let e = engine(16, 48);
    let mut pending = Vec::new();
    let mut reqs = Vec::new();
    for i in 0..200u64 {
        let prompt: Vec<u32> = (0..3 + i % 7)
            .map(|j| (1 + (i * 31 + j * 7) % 250) as u32)
            .collect();
        let (req, rx) = request(
            Ask {
                params: sampled(i),
                max_tokens: 200,
                logprobs: None,
                logit_bias: Vec::new(),
                constraint: Some(compiled.clone()),
            },
            prompt,
        );
        reqs.push(req);
        pending.push(rx);
    }
    e.submit_all(reqs).unwrap();
    let mut distinct = std::collections::HashSet::new();
    for (i, rx) in pending.into_iter().enumerate() {
        let out = wait(rx);
        assert_eq!(out.finish.reason, FinishReason::Stop, "sample {i}");
        let doc = text(&out.tokens);
        let v: Value = serde_json::from_str(&doc).unwrap_or_else(|e| panic!("{doc:?}: {e}"));
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "sample {i}: {doc} {errors:?}");
        distinct.insert(doc);
    }
    assert!(distinct.len() > 190, "temperature 1 gives varied documents");
    let preempted = e
        .stats()
        .preemptions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(preempted > 0, "the test meant to exercise preemption");
}

#[test]
fn unconstrained_random_weights_write_no_json() {
    // The control for the test above: the same model without a grammar.
    let e = engine(16, 64);
    let mut pending = Vec::new();
    for i in 0..20u64 {
        let (req, rx) = request(
            Ask {
                params: sampled(i),
                max_tokens: 40,
                logprobs: None,
                logit_bias: Vec::new(),
                constraint: None,
            },
            vec![1, 2, 3],
        );
        e.submit(req).unwrap();
        pending.push(rx);
    }
    for rx in pending {
        let out = wait(rx);
        let bytes: Vec<u8> = out.tokens.iter().map(|&t| t as u8).collect();
        assert!(serde_json::from_slice::<Value>(&bytes).is_err());
    }
}

#[test]
fn a_cut_document_finishes_with_length() {
    let e = engine(4, 32);
    let c = byte_grammars()
        .compile(&ConstraintSpec::JsonSchema {
            schema: person_schema(),
            strict: true,
        })
        .unwrap();
    let (req, rx) = request(
        Ask {
            params: sampled(7),
            max_tokens: 10,
            logprobs: None,
            logit_bias: Vec::new(),
            constraint: Some(c),
        },
        vec![5, 6, 7],
    );
    e.submit(req).unwrap();
    let out = wait(rx);
    assert_eq!(out.finish.reason, FinishReason::Length);
    assert_eq!(out.tokens.len(), 10);
    assert!(text(&out.tokens).starts_with("{\"name\": \""));
}

#[test]
fn logprobs_are_those_of_the_masked_distribution() {
    let e = engine(4, 32);
    let c = byte_grammars()
        .compile(&ConstraintSpec::Choice(vec!["yes".into(), "no".into()]))
        .unwrap();
    let (req, rx) = request(
        Ask {
            params: sampled(3),
            max_tokens: 10,
            logprobs: Some(3),
            logit_bias: Vec::new(),
            constraint: Some(c),
        },
        vec![9, 8, 7],
    );
    e.submit(req).unwrap();
    let out = wait(rx);
    let answer = text(&out.tokens);
    assert!(answer == "yes" || answer == "no", "{answer}");
    assert_eq!(out.finish.reason, FinishReason::Stop);
    // The first token is `y` or `n`: their probabilities sum to 1, every other is impossible.
    let first = &out.logprobs[0];
    let p: f32 = first.top[..2].iter().map(|&(_, lp)| lp.exp()).sum();
    assert!((p - 1.0).abs() < 1e-4, "{first:?}");
    let mut ids: Vec<u32> = first.top[..2].iter().map(|&(id, _)| id).collect();
    ids.sort();
    assert_eq!(ids, vec![b'n' as u32, b'y' as u32]);
    assert_eq!(first.top[2].1, f32::NEG_INFINITY);
    // Later tokens are forced: probability 1.
    for lp in &out.logprobs[1..] {
        assert!(lp.logprob.abs() < 1e-6, "{lp:?}");
    }
}

#[test]
fn logit_bias_forces_and_bans_tokens() {
    let e = engine(4, 32);
    let run = |bias: Vec<(u32, f32)>| {
        let (req, rx) = request(
            Ask {
                params: SamplingParams::greedy(),
                max_tokens: 8,
                logprobs: Some(0),
                logit_bias: bias,
                constraint: None,
            },
            vec![3, 1, 4, 1, 5],
        );
        e.submit(req).unwrap();
        wait(rx)
    };
    let plain = run(Vec::new());
    let forced = run(vec![(b'Q' as u32, 100.0)]);
    assert_eq!(forced.tokens, vec![b'Q' as u32; 8]);
    let banned_tok = plain.tokens[0];
    let banned = run(vec![(banned_tok, -100.0)]);
    assert!(!banned.tokens.contains(&banned_tok), "{:?}", banned.tokens);
    // Logprobs are reported under the biased distribution.
    assert!(forced.logprobs.iter().all(|lp| lp.logprob > -1e-3));
    // An id outside the vocabulary is refused at the door.
    let (req, _rx) = request(
        Ask {
            params: SamplingParams::greedy(),
            max_tokens: 1,
            logprobs: None,
            logit_bias: vec![(256, 1.0)],
            constraint: None,
        },
        vec![1],
    );
    let err = e.submit(req).unwrap_err().to_string();
    assert!(err.contains("logit_bias") && err.contains("256"), "{err}");
}

#[test]
fn a_grammar_for_another_vocabulary_is_refused() {
    let e = engine(2, 16);
    let words: Vec<Vec<u8>> = (0..100u8).map(|b| vec![b]).collect();
    let small = Arc::new(Grammars::from_token_bytes(words, &[0]).unwrap());
    let c = small.compile(&ConstraintSpec::JsonObject).unwrap();
    let (req, _rx) = request(
        Ask {
            params: SamplingParams::greedy(),
            max_tokens: 1,
            logprobs: None,
            logit_bias: Vec::new(),
            constraint: Some(c),
        },
        vec![1],
    );
    assert!(e.submit(req).is_err());
}

//! Prompt lookup on the real models (`smollm2-135m`, `gemma3-270m`, `qwen2.5-0.5b` from
//! `$SUPERNODE_CACHE/models`, default `~/.cache/supernode/models`): greedy tokens and stop
//! strings are the same with and without speculation, alone and in a batch of 12. And a draft
//! model on SmolLM2: itself (every draft accepted) and itself in the other precision (drafts
//! that differ now and then are rejected).

use supernode_engine::engine::{Engine, EngineConfig, Finish, Request};
use supernode_engine::load::load_with_tokenizer;
use supernode_engine::spec::DraftModel;
use supernode_kernels::Precision;
use supernode_models::LoadOptions;

mod common;
use common::{greedy, ids, model_path, ngram, spec_totals, with_draft};

const TEXTS: [&str; 6] = [
    "def average(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n# The same function, with `total` renamed to `acc`:\ndef average(values):\n",
    "The city council met on Tuesday to discuss the new transport plan. The plan proposes three new bus lines. In short, the city council",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Once upon a time there was a",
    "<html>\n  <body>\n    <ul>\n      <li>one</li>\n      <li>two</li>\n",
    "Question: What is the capital of France?\nAnswer:",
];

fn engine(name: &str) -> Engine {
    let (model, tok) = load_with_tokenizer(&model_path(name), &LoadOptions::default()).unwrap();
    let cfg = EngineConfig {
        max_num_seqs: 12,
        max_num_batched_tokens: 64,
        num_blocks: 256,
        ctx_len: 1024,
        max_waiting: 100,
        prefix_caching: true,
        prefix_cache_salt: String::new(),
        speculative: None,
        state_slots: 0,
    };
    Engine::new(model, tok, cfg).unwrap()
}

/// Each request's token ids and final event, from one run over all of `reqs` at once: greedy,
/// 24 tokens at most, ending at the end of generation or a stop string.
fn run(e: &mut Engine, reqs: &[(String, Vec<String>)]) -> Vec<(Vec<u32>, Finish)> {
    run_min(e, reqs, 0)
}

/// [`run`] with `min_tokens`.
fn run_min(
    e: &mut Engine,
    reqs: &[(String, Vec<String>)],
    min_tokens: usize,
) -> Vec<(Vec<u32>, Finish)> {
    let tok = e.tokenizer().expect("the model has a tokenizer").clone();
    common::drive(e, reqs, |(text, stop), sink| Request {
        stop: stop.clone(),
        ignore_eos: false,
        min_tokens,
        ..greedy(tok.encode(text, true, false), 24, sink)
    })
    .into_iter()
    .map(|h| (ids(&h), h.1))
    .collect()
}

#[test]
fn greedy_tokens_and_stops_are_the_same_on_the_real_models() {
    // 12 requests: each text plain and with a stop string its output is likely to contain.
    let reqs: Vec<(String, Vec<String>)> = TEXTS
        .iter()
        .flat_map(|t| {
            [
                (t.to_string(), Vec::new()),
                (t.to_string(), vec!["\n\n".to_string(), " the".to_string()]),
            ]
        })
        .collect();
    let spec = ngram(5);
    for name in ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"] {
        // One engine: without speculation, then with it (the prompts now partly from the
        // prefix cache), in a batch of 12 and one request at a time.
        let mut e = engine(name);
        let base = run(&mut e, &reqs);
        e.set_speculative(Some(spec.clone())).unwrap();
        let batched = run(&mut e, &reqs);
        let accepted = spec_totals(e.stats()).2;
        assert!(accepted > 0, "{name}: nothing accepted");
        for (i, (b, s)) in base.iter().zip(&batched).enumerate() {
            assert_eq!(b.0, s.0, "{name}: request {i} in a batch of 12");
            assert_eq!(b.1.text, s.1.text, "{name}: request {i}");
            assert_eq!(b.1.reason, s.1.reason, "{name}: request {i}");
            assert_eq!(b.1.stop_string, s.1.stop_string, "{name}: request {i}");
        }
        assert!(base.iter().any(|b| b.1.stop_string.is_some()));
        for (i, r) in reqs.iter().enumerate().step_by(4) {
            let alone = run(&mut e, std::slice::from_ref(r));
            assert_eq!(base[i].0, alone[0].0, "{name}: request {i} alone");
        }
    }
}

/// `min_tokens` masks the end of generation and holds off stop strings in the rows that verify
/// drafts as in plain decoding: the same tokens, and none of the answers ends early.
#[test]
fn min_tokens_gives_the_same_tokens_with_prompt_lookup() {
    let reqs: Vec<(String, Vec<String>)> = TEXTS
        .iter()
        .map(|t| (t.to_string(), vec!["\n".to_string(), " the".to_string()]))
        .collect();
    let mut e = engine("smollm2-135m");
    let plain = run(&mut e, &reqs);
    assert!(
        plain.iter().any(|p| p.0.len() < 20),
        "no answer ends early without min_tokens"
    );
    let base = run_min(&mut e, &reqs, 20);
    e.set_speculative(Some(ngram(5))).unwrap();
    let spec = run_min(&mut e, &reqs, 20);
    for (i, (b, s)) in base.iter().zip(&spec).enumerate() {
        assert!(
            b.0.len() >= 20,
            "request {i} ended after {} tokens",
            b.0.len()
        );
        assert_eq!(b.0, s.0, "request {i}");
        assert_eq!(b.1.text, s.1.text, "request {i}");
    }
    assert!(spec_totals(e.stats()).2 > 0, "nothing accepted");
}

#[test]
fn greedy_tokens_are_the_same_with_a_draft_model_on_smollm2() {
    let reqs: Vec<(String, Vec<String>)> = TEXTS
        .iter()
        .map(|t| (t.to_string(), vec!["\n\n".to_string()]))
        .collect();
    let path = model_path("smollm2-135m");
    let mut e = engine("smollm2-135m");
    let base = run(&mut e, &reqs);
    let (target, tok) = (e.model(), e.tokenizer().map(|t| t.as_ref()));
    for precision in [Precision::Exact, Precision::Quantized] {
        let opts = LoadOptions {
            precision,
            ..LoadOptions::default()
        };
        let d = DraftModel::load(&path, "smollm2-135m", &opts, target, tok).unwrap();
        let mut e = engine("smollm2-135m");
        e.set_speculative(Some(with_draft(d, 5))).unwrap();
        let got = run(&mut e, &reqs);
        for (i, (b, s)) in base.iter().zip(&got).enumerate() {
            assert_eq!(b.0, s.0, "{precision:?} draft: request {i}");
            assert_eq!(b.1.text, s.1.text, "{precision:?} draft: request {i}");
        }
        let (_, drafted, accepted) = spec_totals(e.stats());
        eprintln!("smollm2-135m drafted by itself ({precision:?}): {accepted} of {drafted}");
        assert!(accepted > 0, "{precision:?}: nothing accepted");
        if precision == Precision::Exact {
            // Every draft is the target's own choice; only those past a request's end (its
            // stop string or end-of-generation token) are not kept, one step per request.
            let ended = got.iter().filter(|g| g.0.len() < 24).count() as u64;
            assert!(
                drafted - accepted <= 5 * ended,
                "drafting for itself: {accepted} of {drafted} accepted, {ended} stopped early"
            );
            assert!(accepted as f64 >= 0.9 * drafted as f64);
        }
    }
}

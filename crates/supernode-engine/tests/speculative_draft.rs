//! Speculative decoding with a draft model, through the engine, on the tiny random models of
//! `tests/fixtures/hf` (vocabulary 256): greedy tokens with the draft proposer are the tokens
//! without speculation, alone and in batches with chunked prefill; a model drafting for itself
//! has (nearly) all its drafts accepted, another model has drafts rejected and rolled back;
//! every request's draft cache is released however the request ends; bad drafts are refused
//! with one clear line. The same on SmolLM2 is in `speculative_models.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::json;
use supernode_engine::engine::{Engine, Event, Finish, RequestId, Sink};
use supernode_engine::load::load_with_tokenizer;
use supernode_engine::spec::{DraftModel, DraftProposer, Proposer, SpecConfig};
use supernode_models::{load_model, LoadOptions};

mod common;
use common::{fixture, greedy, ids, model_path, spec_totals, with_draft, xorshift, Collect};

fn draft(arch: &str) -> DraftModel {
    let m = load_model(&fixture(arch), &LoadOptions::default()).unwrap();
    DraftModel::new(arch, m.model).unwrap()
}

fn engine(arch: &str, max_num_seqs: usize, budget: usize) -> Engine {
    common::engine(arch, max_num_seqs, budget, 160)
}

/// A greedy request for every prompt at once, run to the end; each one's token ids and finish.
fn drive(e: &mut Engine, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<(Vec<u32>, Finish)> {
    common::drive(e, prompts, |p, sink| greedy(p.clone(), max_tokens, sink))
        .into_iter()
        .map(|h| (ids(&h), h.1))
        .collect()
}

/// Deterministic prompts of 1 to ~90 tokens.
fn prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = xorshift(seed);
    let mut next = move || (x() % 255 + 1) as u32;
    (0..n)
        .map(|i| (0..1 + (i * 37) % 90).map(|_| next()).collect())
        .collect()
}

#[test]
fn greedy_tokens_are_the_same_with_a_draft_model() {
    let ps = prompts(8, 0xd4af7);
    for target in ["llama", "qwen3"] {
        let base = drive(&mut engine(target, 8, 48), &ps, 40);
        for drafter in [target, "qwen2"] {
            let own = drafter == target;
            // A batch of 8 with prefill chunks of 48, adaptive k.
            let mut e = engine(target, 8, 48);
            e.set_speculative(Some(with_draft(draft(drafter), 5)))
                .unwrap();
            let got = drive(&mut e, &ps, 40);
            for (i, (b, s)) in base.iter().zip(&got).enumerate() {
                assert_eq!(b.0, s.0, "{target} drafted by {drafter}: request {i}");
                assert_eq!(s.1.completion_tokens, 40);
            }
            let (_, drafted, accepted) = spec_totals(e.stats());
            assert_eq!(e.stats().spec_proposer.get(), Some(&"draft"));
            assert!(drafted > 0, "{target} drafted by {drafter}: no drafts");
            let usage = got.iter().map(|h| h.1.spec.unwrap()).fold((0, 0), |a, u| {
                (a.0 + u.draft_tokens, a.1 + u.accepted_tokens)
            });
            assert_eq!(usage, (drafted as usize, accepted as usize));
            eprintln!("{target} drafted by {drafter}: {accepted} of {drafted} accepted");
            if own {
                // The same model computes the same logits: every draft is the target's choice.
                assert!(
                    accepted as f64 >= 0.95 * drafted as f64,
                    "{target} drafting for itself: {accepted} of {drafted} accepted"
                );
            } else {
                assert!(
                    accepted < drafted,
                    "{target} drafted by {drafter}: no draft was rejected"
                );
            }
            assert_eq!(e.stats().blocks_in_use.load(Ordering::Relaxed), 0);
            // One at a time, a fixed k of 8 and a token budget of 7: the prompt in chunks,
            // drafts cut to what the budget leaves.
            let fixed = SpecConfig {
                adaptive: false,
                ..with_draft(draft(drafter), 8)
            };
            let mut e = engine(target, 1, 7);
            e.set_speculative(Some(fixed)).unwrap();
            for (i, p) in ps.iter().enumerate().step_by(3) {
                let alone = drive(&mut e, std::slice::from_ref(p), 40);
                assert_eq!(
                    base[i].0, alone[0].0,
                    "{target}/{drafter}: request {i} alone"
                );
            }
            assert!(spec_totals(e.stats()).1 > 0);
        }
    }
}

/// A target with linear attention (its recurrent state rolled back after rejected drafts),
/// drafted by a model without: the same greedy tokens, in a batch with prefill chunks of a
/// window (so the prompts are cut at the same places with and without drafts).
#[test]
fn a_target_with_a_recurrent_state_takes_a_draft_model() {
    let ps = prompts(8, 0x4ead);
    for target in ["qwen3_5", "qwen3_next"] {
        let base = drive(&mut engine(target, 8, 64), &ps, 30);
        let mut e = engine(target, 8, 64);
        e.set_speculative(Some(with_draft(draft("llama"), 4)))
            .unwrap();
        let got = drive(&mut e, &ps, 30);
        for (i, (b, s)) in base.iter().zip(&got).enumerate() {
            assert_eq!(b.0, s.0, "{target} drafted by llama: request {i}");
        }
        let (_, drafted, accepted) = spec_totals(e.stats());
        assert!(drafted > 0 && accepted < drafted, "{accepted} of {drafted}");
    }
}

/// A draft proposer the test can look into: what it holds, and which requests it was told
/// were gone.
struct Shared {
    inner: Arc<Mutex<DraftProposer>>,
    proposed: Arc<Mutex<Vec<RequestId>>>,
    released: Arc<Mutex<Vec<RequestId>>>,
}

impl Proposer for Shared {
    fn name(&self) -> &'static str {
        "draft"
    }
    fn propose(&mut self, id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>) {
        self.proposed.lock().unwrap().push(id);
        self.inner.lock().unwrap().propose(id, tokens, k, out);
    }
    fn release(&mut self, id: RequestId) {
        self.released.lock().unwrap().push(id);
        self.inner.lock().unwrap().release(id);
    }
}

#[test]
fn draft_caches_are_released_with_their_requests() {
    let inner = Arc::new(Mutex::new(DraftProposer::new(draft("qwen2"))));
    let proposed = Arc::new(Mutex::new(Vec::new()));
    let released = Arc::new(Mutex::new(Vec::new()));
    let mut e = engine("llama", 8, 48);
    // A fixed k: every decoding request drafts (the adaptive k would soon stop drafting with a
    // draft as slow as the target whose drafts fail).
    let cfg = SpecConfig {
        adaptive: false,
        ..with_draft(draft("qwen2"), 4)
    };
    e.set_proposer(
        cfg,
        Box::new(Shared {
            inner: inner.clone(),
            proposed: proposed.clone(),
            released: released.clone(),
        }),
    )
    .unwrap();
    // Requests that run to their limit.
    drive(&mut e, &prompts(6, 3), 12);
    assert_eq!(inner.lock().unwrap().num_cached(), 0);
    // A request cancelled while it decodes.
    let log = Arc::new(Mutex::new(Vec::new()));
    let id = e
        .add_request(greedy(vec![5, 6, 7, 8], 100, Box::new(Collect(log))))
        .unwrap();
    for _ in 0..4 {
        e.step();
    }
    assert_eq!(inner.lock().unwrap().num_cached(), 1);
    e.cancel(id);
    assert_eq!(inner.lock().unwrap().num_cached(), 0);
    // A request whose client went away.
    struct Gone;
    impl Sink for Gone {
        fn send(&mut self, _: Event) -> bool {
            false
        }
        fn is_closed(&self) -> bool {
            true
        }
    }
    e.add_request(greedy(vec![9, 10, 11], 50, Box::new(Gone)))
        .unwrap();
    while e.has_unfinished() {
        e.step();
    }
    assert_eq!(inner.lock().unwrap().num_cached(), 0);
    let (p, r) = (proposed.lock().unwrap(), released.lock().unwrap());
    assert!(p.len() > 7, "few proposals: {}", p.len());
    for id in p.iter() {
        assert!(r.contains(id), "{id:?} was proposed for and never released");
    }
}

fn load_err(path: &Path, target: &str) -> String {
    let t = load_model(&fixture(target), &LoadOptions::default()).unwrap();
    DraftModel::load(
        path,
        &path.display().to_string(),
        &LoadOptions::default(),
        t.model.as_ref(),
        None,
    )
    .unwrap_err()
    .to_string()
}

/// `err` after checking that it is one line.
fn one_line(err: String) -> String {
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn bad_draft_models_are_refused_with_one_line() {
    // A draft with linear attention (a recurrent state that rejected drafts would enter).
    let m = load_model(&fixture("qwen3_5"), &LoadOptions::default()).unwrap();
    let err = one_line(DraftModel::new("qwen3_5", m.model).unwrap_err().to_string());
    assert!(
        err.contains("the draft model qwen3_5 has linear attention"),
        "{err}"
    );
    let err = one_line(load_err(&fixture("qwen3_next"), "llama"));
    assert!(err.contains("linear attention"), "{err}");
    // Another vocabulary: both sizes are named, by the loader and by the engine.
    let err = one_line(load_err(&model_path("smollm2-135m"), "llama"));
    assert!(
        err.contains("has a vocabulary of 49152 tokens and the target one of 256"),
        "{err}"
    );
    let small = load_model(&model_path("smollm2-135m"), &LoadOptions::default()).unwrap();
    let mut e = engine("llama", 1, 16);
    let spec = SpecConfig::draft(DraftModel::new("smollm2", small.model).unwrap(), 4);
    let err = one_line(e.set_speculative(Some(spec)).unwrap_err().to_string());
    assert!(
        err.contains(
            "the draft model smollm2 has a vocabulary of 49152 tokens and the target one of 256"
        ),
        "{err}"
    );
    // A draft that does not load names its path.
    let err = one_line(load_err(Path::new("/nonexistent/draft.gguf"), "llama"));
    assert!(
        err.starts_with("the draft model /nonexistent/draft.gguf failed to load: "),
        "{err}"
    );
}

/// A copy of the tiny HF Llama fixture with a word-level `tokenizer.json` of these tokens.
fn llama_with_words(tag: &str, words: &[&str]) -> PathBuf {
    let src = fixture("llama");
    let dir = std::env::temp_dir().join(format!("supernode-draft-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>", "vocab": vocab},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

/// With a tokenizer on both sides, the draft's token texts must be the target's, id for id.
#[test]
fn a_draft_with_other_token_texts_is_refused() {
    let target = llama_with_words("target", &["<unk>", "a", "b"]);
    let (model, tok) = load_with_tokenizer(&target, &LoadOptions::default()).unwrap();
    let check = |words: &[&str], tag: &str| {
        let dir = llama_with_words(tag, words);
        let r = DraftModel::load(
            &dir,
            tag,
            &LoadOptions::default(),
            model.as_ref(),
            tok.as_deref(),
        )
        .map(drop)
        .map_err(|e| one_line(e.to_string()));
        let _ = std::fs::remove_dir_all(dir);
        r
    };
    assert_eq!(check(&["<unk>", "a", "b"], "same"), Ok(()));
    let err = check(&["<unk>", "a", "c"], "texts").unwrap_err();
    assert!(
        err.contains(r#"the draft model texts's token 2 is "c" and the target's "b""#),
        "{err}"
    );
    let err = check(&["<unk>", "a"], "fewer").unwrap_err();
    assert!(
        err.contains("the draft model fewer's tokenizer has 2 tokens and the target's 3"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(target);
}

/// The draft model's caches stay within their share of the KV budget: at every step they hold
/// at most `cache_bytes_per_token` (growth included) for each position the engine's pool holds
/// for a running request, plus one block per request for its drafts. A pool too small for the
/// requests makes the engine preempt, and a preempted request's draft cache goes with its
/// blocks (without that, its cache would stay while its blocks are given to others). Prompts
/// share no prefix here: requests sharing cached blocks each keep their own draft cache.
#[test]
fn draft_caches_stay_within_their_share_of_the_budget() {
    let target = load_model(&fixture("llama"), &LoadOptions::default()).unwrap();
    let cfg = SpecConfig {
        adaptive: false,
        ..with_draft(draft("qwen2"), 4)
    };
    let per_token = cfg.cache_bytes_per_token(target.model.as_ref());
    assert!(per_token > 0);
    // 24 blocks for 8 requests of up to ~130 tokens each: preemptions.
    let mut e = common::engine("llama", 8, 48, 24);
    e.set_speculative(Some(cfg)).unwrap();
    let logs: Vec<_> = prompts(8, 11)
        .into_iter()
        .map(|p| {
            let log = Arc::new(Mutex::new(Vec::new()));
            e.add_request(greedy(p, 40, Box::new(Collect(log.clone()))))
                .unwrap();
            log
        })
        .collect();
    let mut peak = 0;
    while e.has_unfinished() {
        e.step();
        let st = e.stats();
        let held = st.spec_cache_bytes.load(Ordering::Relaxed);
        let blocks = st.blocks_in_use.load(Ordering::Relaxed) + st.running.load(Ordering::Relaxed);
        assert!(
            held <= per_token * 16 * blocks,
            "draft caches hold {held} bytes for {blocks} blocks' worth of positions"
        );
        peak = peak.max(held);
    }
    assert!(peak > 0, "nothing was drafted");
    assert!(
        e.stats().preemptions.load(Ordering::Relaxed) > 0,
        "no preemption"
    );
    assert_eq!(e.stats().spec_cache_bytes.load(Ordering::Relaxed), 0);
    for log in logs {
        assert!(matches!(log.lock().unwrap().last(), Some(Event::Done(_))));
    }
}

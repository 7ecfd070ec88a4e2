//! Speculative decoding through the engine on the tiny random models of `tests/fixtures/hf`
//! (vocabulary 256): the tokens with prompt lookup are the tokens without it, greedy and
//! seeded, alone and in batches of 12 with chunked prefill, preemption and the prefix cache,
//! with logprobs, penalties, `logit_bias` and a grammar; and a chi-square test that the drawn
//! tokens follow the target's distribution when drafts are verified by rejection.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use supernode_engine::constraint::{Constraint, ConstraintSpec};
use supernode_engine::engine::{Engine, Event, FinishReason, Request, RequestId};
use supernode_engine::sampler::SamplingParams;
use supernode_engine::spec::{Proposer, SpecConfig, SpecMethod};

mod common;
use common::{byte_grammars, ids, ngram, spec_totals, xorshift, Collect, Heard};

const ARCHS: [&str; 8] = [
    "llama",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma3_text",
    "deepseek_v3",
    "deepseek_v32",
    // Its compressors' rows: a rejected draft that closed a window wrote only its own row,
    // which the accepted token at that position writes again.
    "deepseek_v4",
];

#[derive(Clone)]
struct Ask {
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    logprobs: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    constraint: Option<Constraint>,
    ignore_eos: bool,
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Ask {
    Ask {
        prompt,
        params: SamplingParams::greedy(),
        max_tokens,
        logprobs: None,
        logit_bias: Vec::new(),
        constraint: None,
        ignore_eos: true,
    }
}

#[derive(Clone, Copy)]
struct Limits {
    max_num_seqs: usize,
    budget: usize,
    num_blocks: usize,
}

const ROOMY: Limits = Limits {
    max_num_seqs: 12,
    budget: 48,
    num_blocks: 160,
};

fn engine(arch: &str, lim: &Limits) -> Engine {
    common::engine(arch, lim.max_num_seqs, lim.budget, lim.num_blocks)
}

/// Adds every request at once, steps until all are done, and returns what each heard.
fn drive(e: &mut Engine, asks: &[Ask]) -> Vec<Heard> {
    common::drive(e, asks, |a, sink| Request {
        params: a.params.clone(),
        ignore_eos: a.ignore_eos,
        logprobs: a.logprobs,
        logit_bias: a.logit_bias.clone(),
        constraint: a.constraint.clone(),
        ..common::greedy(a.prompt.clone(), a.max_tokens, sink)
    })
}

fn run(arch: &str, spec: Option<SpecConfig>, lim: &Limits, asks: &[Ask]) -> (Vec<Heard>, Engine) {
    let mut e = engine(arch, lim);
    e.set_speculative(spec).unwrap();
    let heard = drive(&mut e, asks);
    (heard, e)
}

/// Deterministic prompts: some repeat a phrase (lookup finds drafts at once), some do not.
fn prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = xorshift(seed);
    let mut next = move || (x() % 255 + 1) as u32;
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                let phrase: Vec<u32> = (0..4 + i % 5).map(|_| next()).collect();
                let mut p = Vec::new();
                for _ in 0..2 + i % 3 {
                    p.extend_from_slice(&phrase);
                }
                p.extend_from_slice(&phrase[..2]);
                p
            } else {
                (0..1 + (i * 37) % 80).map(|_| next()).collect()
            }
        })
        .collect()
}

#[test]
fn greedy_tokens_are_the_same_with_prompt_lookup_alone_and_in_batches_of_12() {
    for arch in ARCHS {
        let asks: Vec<Ask> = prompts(12, 0x5eed + arch.len() as u64)
            .into_iter()
            .map(|p| greedy(p, 40))
            .collect();
        let (base, _) = run(arch, None, &ROOMY, &asks);
        let (batched, e) = run(arch, Some(ngram(5)), &ROOMY, &asks);
        for (i, (b, s)) in base.iter().zip(&batched).enumerate() {
            assert_eq!(ids(b), ids(s), "{arch}: request {i} in a batch of 12");
            assert_eq!(s.1.reason, FinishReason::Length);
            assert_eq!(s.1.completion_tokens, 40);
            assert!(b.1.spec.is_none());
        }
        let (drafts, drafted, accepted) = spec_totals(e.stats());
        assert!(drafts > 0 && accepted > 0, "{arch}: nothing was accepted");
        assert!(accepted <= drafted);
        // The per-request usage adds up to the engine's totals.
        let usage = batched
            .iter()
            .map(|h| h.1.spec.unwrap())
            .fold((0, 0), |(d, a), u| {
                (d + u.draft_tokens, a + u.accepted_tokens)
            });
        assert_eq!(usage, (drafted as usize, accepted as usize), "{arch}");
        assert_eq!(e.stats().blocks_in_use.load(Ordering::Relaxed), 0);
        // Alone, with a fixed k (no adaptivity) and a token budget of 7 (drafts are cut to
        // what the budget leaves).
        let fixed = SpecConfig {
            adaptive: false,
            ..ngram(8)
        };
        let tight = Limits {
            max_num_seqs: 1,
            budget: 7,
            num_blocks: 32,
        };
        for (i, a) in asks.iter().enumerate().step_by(3) {
            let (alone, _) = run(arch, Some(fixed.clone()), &tight, std::slice::from_ref(a));
            assert_eq!(ids(&base[i]), ids(&alone[0]), "{arch}: request {i} alone");
        }
    }
}

#[test]
fn preemption_and_the_prefix_cache_keep_the_tokens() {
    // 12 requests of up to ~130 tokens in 40 blocks of 16: requests are preempted and
    // recomputed while they speculate; then the same prompts again, from the prefix cache.
    let lim = Limits {
        max_num_seqs: 12,
        budget: 64,
        num_blocks: 40,
    };
    let asks: Vec<Ask> = prompts(12, 77).into_iter().map(|p| greedy(p, 48)).collect();
    let (base, _) = run("llama", None, &lim, &asks);
    let mut e = engine("llama", &lim);
    e.set_speculative(Some(ngram(6))).unwrap();
    let first = drive(&mut e, &asks);
    assert!(e.stats().preemptions.load(Ordering::Relaxed) > 0);
    let again = drive(&mut e, &asks);
    for i in 0..asks.len() {
        assert_eq!(ids(&base[i]), ids(&first[i]), "request {i}");
        assert_eq!(ids(&base[i]), ids(&again[i]), "request {i} again");
    }
    assert!(again.iter().any(|h| h.1.cached_tokens > 0));
    assert!(spec_totals(e.stats()).2 > 0);
    assert_eq!(e.stats().blocks_in_use.load(Ordering::Relaxed), 0);
}

#[test]
fn seeded_sampling_with_logprobs_penalties_and_bias_is_unchanged() {
    // Drafts are checked by drawing from the target with the request's own sampler, one draw
    // per kept token as without speculation: a seed gives the same tokens and logprobs.
    for arch in ["llama", "qwen3", "gemma3_text"] {
        let asks: Vec<Ask> = prompts(12, 3)
            .into_iter()
            .enumerate()
            .map(|(i, p)| Ask {
                prompt: p,
                params: SamplingParams {
                    temperature: [0.3, 0.7, 1.0][i % 3],
                    top_k: [0, 20][i % 2],
                    top_p: [1.0, 0.9][(i / 2) % 2],
                    repetition_penalty: if i % 4 == 0 { 1.3 } else { 1.0 },
                    frequency_penalty: if i % 5 == 0 { 0.5 } else { 0.0 },
                    seed: Some(1000 + i as u64),
                    ..SamplingParams::default()
                },
                max_tokens: 32,
                logprobs: Some(3),
                logit_bias: if i % 3 == 0 {
                    vec![(17, 4.0), (18, -100.0)]
                } else {
                    Vec::new()
                },
                constraint: None,
                ignore_eos: true,
            })
            .collect();
        let (base, _) = run(arch, None, &ROOMY, &asks);
        let (spec, e) = run(arch, Some(ngram(4)), &ROOMY, &asks);
        for (i, (b, s)) in base.iter().zip(&spec).enumerate() {
            assert_eq!(b.0, s.0, "{arch}: request {i} (tokens and logprobs)");
        }
        assert!(spec_totals(e.stats()).1 > 0, "{arch}: nothing was drafted");
    }
}

#[test]
fn a_grammar_is_never_advanced_by_a_rejected_draft() {
    // Drafts from prompt lookup over a prompt full of JSON: many are refused by the grammar or
    // by the draw; the documents stay valid and equal to those without speculation.
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 4}
        },
        "required": ["name", "tags"],
        "additionalProperties": false
    });
    let compiled = byte_grammars()
        .compile(&ConstraintSpec::JsonSchema {
            schema,
            strict: true,
        })
        .unwrap();
    let doc = br#"{"name": "ab", "tags": ["red", "green", "red"]} {"name": "ab", "tags": ["red""#;
    let asks: Vec<Ask> = (0..12u64)
        .map(|i| Ask {
            prompt: doc.iter().map(|&b| b as u32).collect(),
            params: SamplingParams {
                temperature: if i < 4 { 0.0 } else { 1.0 },
                seed: Some(i),
                ..SamplingParams::default()
            },
            max_tokens: 80,
            logprobs: if i % 2 == 0 { Some(2) } else { None },
            logit_bias: Vec::new(),
            constraint: Some(compiled.clone()),
            ignore_eos: false,
        })
        .collect();
    let (base, _) = run("llama", None, &ROOMY, &asks);
    let (spec, e) = run("llama", Some(ngram(6)), &ROOMY, &asks);
    for (i, (b, s)) in base.iter().zip(&spec).enumerate() {
        assert_eq!(b.0, s.0, "request {i}");
        assert_eq!(s.1.reason, FinishReason::Stop, "request {i}");
        let text: Vec<u8> = s.0.iter().map(|t| t.id as u8).collect();
        let v: serde_json::Value = serde_json::from_slice(&text)
            .unwrap_or_else(|err| panic!("{:?}: {err}", String::from_utf8_lossy(&text)));
        assert!(v["tags"].is_array());
    }
    let (_, drafted, accepted) = spec_totals(e.stats());
    assert!(
        accepted > 0 && accepted < drafted,
        "{accepted} of {drafted}"
    );
}

/// Drafts fixed tokens after a fixed history: every request of the chi-square test verifies
/// the same drafts at the same place.
struct Fixed {
    after: Vec<u32>,
    drafts: Vec<u32>,
}

impl Proposer for Fixed {
    fn name(&self) -> &'static str {
        "fixed"
    }
    fn propose(&mut self, _id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>) {
        if tokens == self.after.as_slice() {
            out.extend(self.drafts.iter().take(k));
        }
    }
}

/// Probabilities at temperature 1 among the `top_k` largest logits (the sampler's filter).
fn top_k_probs(row: &[f32], top_k: usize) -> Vec<(u32, f64)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(top_k);
    let max = row[idx[0]] as f64;
    let w: Vec<f64> = idx.iter().map(|&i| (row[i] as f64 - max).exp()).collect();
    let sum: f64 = w.iter().sum();
    idx.iter()
        .zip(&w)
        .map(|(&i, &x)| (i as u32, x / sum))
        .collect()
}

/// Pearson's statistic of `counts` against `probs` (every token outside `probs` must have
/// count 0, else the statistic is infinite).
fn chi_square(counts: &std::collections::HashMap<u32, usize>, probs: &[(u32, f64)]) -> f64 {
    let n: usize = counts.values().sum();
    if counts.keys().any(|t| !probs.iter().any(|p| p.0 == *t)) {
        return f64::INFINITY;
    }
    probs
        .iter()
        .map(|&(t, p)| {
            let e = p * n as f64;
            let o = *counts.get(&t).unwrap_or(&0) as f64;
            (o - e) * (o - e) / e
        })
        .sum()
}

#[test]
fn rejection_sampling_keeps_the_target_distribution() {
    // After a fixed history the proposer drafts the target's two most likely next tokens.
    // Among 8000 requests at temperature 1 (top-k 6), the token drawn after that history (the
    // draft accepted, or a draw from the residual) follows the target's distribution, and so
    // does the token after an accepted draft (drawn from the draft's row in the same step) and
    // the one after a rejected draft (drawn in the next step).
    const TOP_K: usize = 6;
    const N: u64 = 8000;
    let prompt: Vec<u32> = vec![11, 42, 7, 99, 3, 42];
    let mut reference = engine("llama", &ROOMY);
    let logits_after = |e: &mut Engine, toks: &[u32]| -> Vec<f32> {
        let log = Arc::new(Mutex::new(Vec::new()));
        e.add_request(Request {
            prompt_logits: true,
            ..common::greedy(toks.to_vec(), 0, Box::new(Collect(log.clone())))
        })
        .unwrap();
        while e.has_unfinished() {
            e.step();
        }
        let rows: Vec<f32> = log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|ev| match ev {
                Event::PromptLogits(p) => Some(p.logits.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        rows[rows.len() - 256..].to_vec()
    };
    let mut probs_after = |toks: &[u32]| top_k_probs(&logits_after(&mut reference, toks), TOP_K);
    // The first token comes from the prompt's last row (nothing to verify yet); after its most
    // likely value `a` the proposer drafts the two tokens most likely to follow.
    let a = probs_after(&prompt)[0].0;
    let history: Vec<u32> = prompt.iter().copied().chain([a]).collect();
    let p1 = probs_after(&history);
    let (d1, other) = (p1[0].0, p1[1].0);
    let with = |t: u32| history.iter().copied().chain([t]).collect::<Vec<u32>>();
    let p2 = probs_after(&with(d1));
    let d2 = p2[0].0;
    // After the runner-up instead of the draft: the draft was rejected.
    let p3 = probs_after(&with(other));
    assert!(
        p1[0].1 < 0.9 && p1[0].1 > 0.15,
        "the draft should be neither sure nor hopeless: p = {}",
        p1[0].1
    );

    let mut e = engine("llama", &ROOMY);
    let cfg = SpecConfig {
        method: SpecMethod::Ngram { min: 1, max: 1 },
        num_speculative_tokens: 2,
        adaptive: false,
        disable_by_batch_size: None,
    };
    e.set_proposer(
        cfg,
        Box::new(Fixed {
            after: history.clone(),
            drafts: vec![d1, d2],
        }),
    )
    .unwrap();
    let asks: Vec<Ask> = (0..N)
        .map(|i| Ask {
            prompt: prompt.clone(),
            params: SamplingParams {
                temperature: 1.0,
                top_k: TOP_K,
                seed: Some(0xC0FFEE + i),
                ..SamplingParams::default()
            },
            max_tokens: 3,
            logprobs: None,
            logit_bias: Vec::new(),
            constraint: None,
            ignore_eos: true,
        })
        .collect();
    let heard = drive(&mut e, &asks);
    let mut first = std::collections::HashMap::new();
    let mut second = std::collections::HashMap::new();
    let mut after_other = std::collections::HashMap::new();
    for h in &heard {
        let t = ids(h);
        if t[0] != a {
            continue;
        }
        *first.entry(t[1]).or_insert(0usize) += 1;
        if t[1] == d1 {
            *second.entry(t[2]).or_insert(0usize) += 1;
        } else if t[1] == other {
            *after_other.entry(t[2]).or_insert(0usize) += 1;
        }
    }
    // 5 degrees of freedom: the 0.999 quantile is 20.52.
    let x1 = chi_square(&first, &p1);
    let x2 = chi_square(&second, &p2);
    assert!(
        x1 < 20.52,
        "first token: chi-square {x1}, counts {first:?}, p {p1:?}"
    );
    assert!(
        x2 < 20.52,
        "after the draft: chi-square {x2}, counts {second:?}, p {p2:?}"
    );
    let x3 = chi_square(&after_other, &p3);
    assert!(
        x3 < 20.52,
        "after a rejection: chi-square {x3}, counts {after_other:?}"
    );
    eprintln!(
        "chi-square (5 dof): first {x1:.2}, after the draft {x2:.2}, after a rejection {x3:.2}"
    );
    // The test can fail: the same counts against the other step's probabilities.
    assert!(chi_square(&first, &p2) > 100.0);
    let accepted = second.values().sum::<usize>();
    assert!(accepted > 300, "the draft was accepted {accepted} times");
    assert!(after_other.values().sum::<usize>() > 200);
    let (_, drafted, kept) = spec_totals(e.stats());
    assert!(kept > 300 && kept < drafted, "{kept} of {drafted}");
}

#[test]
fn large_batches_turn_speculation_off() {
    // Above `disable_by_batch_size` running requests, nothing is drafted.
    let asks: Vec<Ask> = prompts(12, 9).into_iter().map(|p| greedy(p, 24)).collect();
    let off = SpecConfig {
        disable_by_batch_size: Some(2),
        ..SpecConfig::ngram(4)
    };
    let lim = Limits {
        max_num_seqs: 12,
        budget: 2048,
        num_blocks: 160,
    };
    let (_, e) = run("llama", Some(off.clone()), &lim, &asks);
    assert_eq!(spec_totals(e.stats()).0, 0);
    // Two at a time: they draft.
    let (_, e) = run(
        "llama",
        Some(off),
        &Limits {
            max_num_seqs: 2,
            ..lim
        },
        &asks,
    );
    assert!(spec_totals(e.stats()).0 > 0);
}

/// Drafts a request's known continuation (the tokens it generates without speculation), with
/// one draft made wrong at a place that moves from step to step: every count of accepted
/// drafts, from none to all, occurs.
struct Oracle {
    known: Vec<(Vec<u32>, Vec<u32>)>,
}

impl Proposer for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }
    fn propose(&mut self, _id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>) {
        let Some((prompt, cont)) = self.known.iter().find(|(p, _)| tokens.starts_with(p)) else {
            return;
        };
        let at = tokens.len() - prompt.len();
        let wrong = (at * 7) % (k + 2);
        for (i, &t) in cont.iter().skip(at).take(k).enumerate() {
            out.push(if i == wrong { t ^ 1 } else { t });
        }
    }
}

/// Models with linear attention (a recurrent state that takes in every draft): the tokens with
/// speculation are the tokens without it, greedy and seeded with logprobs, in a batch of 12,
/// under preemption and alone with a tight budget, with every count of drafts accepted (each
/// rejection rolls the state back to the accepted drafts). Budgets of a window or more cut the
/// prompts at window boundaries, so a request's prefill has the same bits whatever rides along.
#[test]
fn models_with_a_recurrent_state_roll_back_rejected_drafts() {
    let lim = Limits {
        max_num_seqs: 12,
        budget: 64,
        num_blocks: 160,
    };
    let crowded = Limits {
        num_blocks: 16,
        ..lim
    };
    for arch in ["qwen3_5", "qwen3_5_moe", "qwen3_next"] {
        let asks: Vec<Ask> = prompts(12, 0x4b1d + arch.len() as u64)
            .into_iter()
            .enumerate()
            .map(|(i, p)| match i % 3 {
                0 => Ask {
                    params: SamplingParams {
                        temperature: 0.8,
                        top_k: 40,
                        seed: Some(7 + i as u64),
                        ..SamplingParams::default()
                    },
                    logprobs: Some(2),
                    ..greedy(p, 40)
                },
                _ => greedy(p, 40),
            })
            .collect();
        let (base, _) = run(arch, None, &lim, &asks);
        let oracle = || Oracle {
            known: asks
                .iter()
                .zip(&base)
                .map(|(a, b)| (a.prompt.clone(), ids(b)))
                .collect(),
        };
        let speculate = |lim: &Limits, proposer: Oracle, asks: &[Ask]| {
            let mut e = engine(arch, lim);
            let cfg = SpecConfig {
                adaptive: false,
                ..ngram(4)
            };
            e.set_proposer(cfg, Box::new(proposer)).unwrap();
            (drive(&mut e, asks), e)
        };
        let (spec, e) = speculate(&lim, oracle(), &asks);
        for (i, (b, s)) in base.iter().zip(&spec).enumerate() {
            assert_eq!(b.0, s.0, "{arch}: request {i} in a batch of 12");
        }
        let (drafts, drafted, accepted) = spec_totals(e.stats());
        assert!(
            drafts > 0 && accepted > drafted / 3,
            "{arch}: {accepted} of {drafted}"
        );
        assert!(accepted < drafted, "{arch}: nothing was rolled back");
        assert_eq!(e.stats().blocks_in_use.load(Ordering::Relaxed), 0);

        let (again, e) = speculate(&crowded, oracle(), &asks);
        assert!(e.stats().preemptions.load(Ordering::Relaxed) > 0, "{arch}");
        for (i, (b, s)) in base.iter().zip(&again).enumerate() {
            assert_eq!(b.0, s.0, "{arch}: request {i} preempted");
        }

        let tight = Limits {
            max_num_seqs: 1,
            budget: 7,
            num_blocks: 32,
        };
        for (i, a) in asks.iter().enumerate().skip(1).step_by(4) {
            let (alone, _) = run(arch, None, &tight, std::slice::from_ref(a));
            let (spec, e) = speculate(&tight, oracle(), std::slice::from_ref(a));
            assert_eq!(alone[0].0, spec[0].0, "{arch}: request {i} alone");
            assert!(spec_totals(e.stats()).2 > 0, "{arch}: request {i} alone");
        }
        // Prompt lookup on them too (few drafts fit these random models).
        let (lookup, _) = run(arch, Some(ngram(5)), &lim, &asks);
        for (i, (b, s)) in base.iter().zip(&lookup).enumerate() {
            assert_eq!(b.0, s.0, "{arch}: request {i} with prompt lookup");
        }
    }
}

/// The target's own multi-token-prediction layer drafts (`qwen3_5_mtp`: the Qwen3.5 fixture
/// with an MTP layer of random weights): the tokens are those without speculation, greedy and
/// seeded with logprobs, in a batch of 12, under preemption and alone with a tight budget;
/// drafts are made and verified from the target's hidden states, and the acceptance reported.
/// A model without the layer loaded is refused with one line.
#[test]
fn the_models_own_mtp_layer_drafts_without_changing_the_tokens() {
    check_mtp_drafting("qwen3_5_mtp");
}

/// The same with DeepSeek-V3's MTP layer (`deepseek_v3_mtp`: MLA and MoE, its own embedding
/// and head), on a model whose prompts are prefix-cached.
#[test]
fn deepseek_mtp_drafts_without_changing_the_tokens() {
    check_mtp_drafting("deepseek_v3_mtp");
}

fn check_mtp_drafting(fixture: &str) {
    use supernode_models::{load_model, LoadOptions};
    let engine_mtp = |lim: &Limits, mtp: bool| {
        let opts = LoadOptions {
            mtp,
            ..LoadOptions::default()
        };
        let m = load_model(&common::fixture(fixture), &opts).unwrap();
        let cfg = common::config(lim.max_num_seqs, lim.budget, lim.num_blocks);
        Engine::new(m.model, None, cfg).unwrap()
    };
    let lim = Limits {
        max_num_seqs: 12,
        budget: 64,
        num_blocks: 160,
    };
    let asks: Vec<Ask> = prompts(12, 0x3b7)
        .into_iter()
        .enumerate()
        .map(|(i, p)| match i % 3 {
            0 => Ask {
                params: SamplingParams {
                    temperature: 0.9,
                    seed: Some(40 + i as u64),
                    ..SamplingParams::default()
                },
                logprobs: Some(2),
                ..greedy(p, 32)
            },
            _ => greedy(p, 32),
        })
        .collect();
    let base = drive(&mut engine_mtp(&lim, false), &asks);
    let mtp = SpecConfig {
        method: SpecMethod::Mtp,
        adaptive: false,
        ..ngram(3)
    };
    for (what, lim) in [
        ("a batch of 12", lim),
        (
            "preempted",
            Limits {
                num_blocks: 16,
                ..lim
            },
        ),
    ] {
        let mut e = engine_mtp(&lim, true);
        e.set_speculative(Some(mtp.clone())).unwrap();
        let got = drive(&mut e, &asks);
        for (i, (b, s)) in base.iter().zip(&got).enumerate() {
            assert_eq!(b.0, s.0, "{fixture}: request {i}, {what}");
        }
        let (drafts, drafted, accepted) = spec_totals(e.stats());
        assert!(drafts > 0 && drafted > 0, "{fixture}, {what}: no drafts");
        assert_eq!(e.stats().spec_proposer.get(), Some(&"mtp"));
        eprintln!("{fixture}, {what}: {accepted} of {drafted} drafts accepted");
        if what == "preempted" {
            assert!(e.stats().preemptions.load(Ordering::Relaxed) > 0);
        }
    }
    let tight = Limits {
        max_num_seqs: 1,
        budget: 7,
        num_blocks: 32,
    };
    // (A budget under a window cuts the prompts elsewhere than above: its own baseline.)
    for (i, a) in asks.iter().enumerate().step_by(5) {
        let base = drive(&mut engine_mtp(&tight, false), std::slice::from_ref(a));
        let mut e = engine_mtp(&tight, true);
        e.set_speculative(Some(mtp.clone())).unwrap();
        let alone = drive(&mut e, std::slice::from_ref(a));
        assert_eq!(base[0].0, alone[0].0, "{fixture}: request {i} alone");
        assert!(
            spec_totals(e.stats()).1 > 0,
            "{fixture}: request {i} alone: no drafts"
        );
    }
    let err = engine_mtp(&lim, false)
        .set_speculative(Some(mtp))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no multi-token-prediction layer"), "{err}");
}

type Seen = std::collections::HashMap<RequestId, (usize, Vec<(Option<Vec<f32>>, usize)>)>;

/// Drafts like [`Oracle`] and records the hidden states the engine hands over.
struct Recorder {
    oracle: Oracle,
    /// Per request: the ask its prompt is, and the states seen per position (the last one
    /// seen, and how many times).
    seen: Arc<Mutex<Seen>>,
    width: usize,
}

impl Proposer for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn propose(&mut self, id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>) {
        let ask = self
            .oracle
            .known
            .iter()
            .position(|(p, _)| tokens.starts_with(p));
        if let (Some(ask), Some(entry)) = (ask, self.seen.lock().unwrap().get_mut(&id)) {
            entry.0 = ask;
        }
        self.oracle.propose(id, tokens, k, out);
    }
    fn wants_hidden(&self) -> bool {
        true
    }
    fn observe(&mut self, id: RequestId, first: usize, hidden: &[f32]) {
        let mut seen = self.seen.lock().unwrap();
        let rows = &mut seen.entry(id).or_insert((usize::MAX, Vec::new())).1;
        for (i, row) in hidden.chunks_exact(self.width).enumerate() {
            if rows.len() <= first + i {
                rows.resize(first + i + 1, (None, 0));
            }
            rows[first + i].0 = Some(row.to_vec());
            rows[first + i].1 += 1;
        }
    }
}

/// What the engine hands a proposer that reads hidden states: for every position a request
/// computed and kept (prompt chunks, the token before the drafts, accepted drafts; never a
/// rejected draft), the target's state after the final norm, bit for bit what one forward pass
/// over the request's final tokens gives; under preemption too.
#[test]
fn proposers_see_the_hidden_states_of_every_kept_position() {
    use supernode_models::{load_model, Batch, KvCache, LoadOptions, Named, Trace};
    let arch = "llama";
    let asks: Vec<Ask> = prompts(12, 0x41d)
        .into_iter()
        .map(|p| greedy(p, 30))
        .collect();
    let (base, _) = run(arch, None, &ROOMY, &asks);
    let m = load_model(&common::fixture(arch), &LoadOptions::default())
        .unwrap()
        .model;
    let width = m.config().hidden;
    for lim in [
        ROOMY,
        Limits {
            num_blocks: 30,
            ..ROOMY
        },
    ] {
        let seen = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let rec = Recorder {
            oracle: Oracle {
                known: asks
                    .iter()
                    .zip(&base)
                    .map(|(a, b)| (a.prompt.clone(), ids(b)))
                    .collect(),
            },
            seen: seen.clone(),
            width,
        };
        let mut e = engine(arch, &lim);
        let cfg = SpecConfig {
            adaptive: false,
            ..ngram(4)
        };
        e.set_proposer(cfg, Box::new(rec)).unwrap();
        let got = drive(&mut e, &asks);
        let (_, drafted, accepted) = spec_totals(e.stats());
        assert!(
            accepted > 0 && accepted < drafted,
            "{accepted} of {drafted}"
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), asks.len());
        for (ask, rows) in seen.values() {
            let (a, h) = (&asks[*ask], &got[*ask]);
            assert_eq!(ids(h), ids(&base[*ask]));
            // The request's tokens but the last one (never computed).
            let mut tokens = a.prompt.clone();
            tokens.extend(ids(h));
            tokens.pop();
            let n = tokens.len();
            assert_eq!(rows.len(), n, "ask {ask}: positions seen");
            let mut kv = KvCache::new(&m.kv_specs(), 16, n.div_ceil(16)).unwrap();
            let table: Vec<u32> = (0..kv.num_blocks as u32).collect();
            let positions: Vec<usize> = (0..n).collect();
            let batch = Batch {
                tokens: &tokens,
                positions: &positions,
                seq_of: &vec![0; n],
                block_tables: &[table.as_slice()],
                logits_for: &[n - 1],
                state_slots: &[],
                chunked_until: &[],
                drafts: &[],
            };
            let mut want = Vec::new();
            let mut keep = |x: &Named<'_>| {
                if x.name == "result_norm" {
                    want = x.values.to_vec();
                }
            };
            m.forward_traced(&batch, &mut kv, &mut Trace::new(&mut keep))
                .unwrap();
            for (p, (row, times)) in rows.iter().enumerate() {
                let row = row
                    .as_ref()
                    .unwrap_or_else(|| panic!("ask {ask}: position {p}"));
                // Once each, unless preemption recomputed it.
                assert!(
                    *times == 1 || lim.num_blocks == 30,
                    "ask {ask}: position {p} seen {times} times"
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(row),
                    bits(&want[p * width..(p + 1) * width]),
                    "ask {ask}: position {p}"
                );
            }
        }
        if lim.num_blocks == 30 {
            assert!(e.stats().preemptions.load(Ordering::Relaxed) > 0);
        }
    }
}

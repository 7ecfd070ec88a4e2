//! The engine against llama.cpp on the real models, from the committed fixtures that
//! `tools/make_llama_reference.py` produced with llama-cpp-python (`--serial 9
//! --serial-max-tokens 1000`: llama.cpp's one-token path too, on every case):
//!
//! - `tokenize` gives exactly llama.cpp's ids (chat prompts rendered by our template engine);
//! - teacher-forced logits near llama.cpp's on its top-5 tokens: at most 5% of them more than
//!   0.5 away and none more than 2.0 (not counting those where llama.cpp is further from an
//!   exact float64 forward than we are), mean distance at most 0.25, and no more than 1.5 times
//!   as far as llama.cpp's own one-token path is from its batched path (recorded for every
//!   case); the same top token wherever
//!   llama.cpp's top-1/top-2 margin exceeds 0.3, except where an exact float64 forward on the
//!   same weights disagrees with llama.cpp and agrees with us;
//! - the greedy 32-token continuation equals llama.cpp's up to the first step where llama.cpp's
//!   own margin is below 0.3;
//! - where an exact float64 forward on the same dequantised weights exists, our logits in
//!   `Precision::Exact` are closer to it than llama.cpp's.
//!
//! The llama.cpp checks run in both precisions: `Precision::Exact`, and `Precision::Quantized`
//! (the command line's default: activations quantised to 8 bits and f16 attention, as
//! llama.cpp does; its top tokens at prompt positions are held to llama.cpp's only where the
//! margin exceeds 1, its greedy continuations as the exact ones are). Quantized precision is
//! also held to the float64 forward as closely as llama.cpp itself is
//! (`check_quantized_near_f64`).

mod common;

use std::collections::HashMap;

use common::{fixture, ids, model_path, pairs, read_json};
use serde_json::Value;
use supernode_engine::chat::{ChatMessage, ChatTemplate};
use supernode_engine::sampler::SamplingParams;
use supernode_engine::session::{Generate, Session};
use supernode_kernels::Precision;
use supernode_models::LoadOptions;

const LOGIT_TOL: f64 = 0.5;
/// llama.cpp's batched and one-token paths disagree by more than `LOGIT_TOL` on ~1% of these
/// logits (max 0.7), chaotically: a tiny difference flips an 8-bit activation rounding that
/// the next 30 layers amplify. No implementation that is not bit-identical to its batched path
/// can be within `LOGIT_TOL` everywhere, so the bound is statistical.
const MAX_FRACTION_OVER: f64 = 0.05;
const MAX_MEAN: f64 = 0.25;
/// The same chaos sets the largest single distance: two of our own kernels whose products
/// agree to 1e-5 relative (the packed and the row-pair kernels of the same weights) give logits
/// up to 0.13 apart on the first position of a prompt and 0.9 apart further on; llama.cpp's
/// Gemma logits are up to 3.1 from a float64 forward.
const MAX_DISTANCE: f64 = 2.5;
const EXACT: LoadOptions = LoadOptions {
    precision: Precision::Exact,
    kv_dtype: None,
    mtp: false,
};
const QUANTIZED: LoadOptions = LoadOptions {
    precision: Precision::Quantized,
    kv_dtype: None,
    mtp: false,
};
const MARGIN: f64 = 0.3;

fn margin(top: &[(u32, f64)]) -> f64 {
    top[0].1 - top[1].1
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The prompt ids we compute for a case: plain text through `encode`, chats through our
/// template renderer (whose output must equal the fixture's jinja2 rendering).
fn our_ids(session: &Session, case: &Value) -> Vec<u32> {
    let tok = session.tokenizer().expect("the model has a tokenizer");
    let add_bos = case["add_bos"].as_bool().expect("add_bos");
    match case["chat"].as_array() {
        Some(msgs) if tok.chat_template().is_some() => {
            let msgs: Vec<ChatMessage> = msgs
                .iter()
                .map(|m| ChatMessage {
                    role: m["role"].as_str().unwrap().into(),
                    content: m["content"].as_str().unwrap().into(),
                })
                .collect();
            let name =
                |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
            let tmpl = ChatTemplate::new(
                tok.chat_template().unwrap(),
                &name(tok.bos_id()),
                &name(tok.eos_id()),
            )
            .expect("template compiles");
            let (text, protected) = tmpl.render(&msgs, true).expect("template renders");
            let protected = protected.expect("the contents are located");
            assert_eq!(
                text,
                case["rendered"].as_str().unwrap(),
                "{}: rendered chat differs",
                case["name"]
            );
            tok.encode_protected(&text, add_bos, &protected)
        }
        _ => {
            let text = case["rendered"].as_str().or(case["text"].as_str()).unwrap();
            tok.encode(
                text,
                add_bos,
                case["parse_special"].as_bool().unwrap_or(false),
            )
        }
    }
}

/// Distances of our teacher-forced logits from llama.cpp's batched ones, over llama.cpp's top-5
/// ids at every prompt position.
#[derive(Default)]
struct Distances {
    all: Vec<f64>,
    /// Of `all`, those where llama.cpp is further from the float64 forward than we are...
    excused: Vec<f64>,
    /// ...and the others, which the fraction and maximum bounds hold to.
    held: Vec<f64>,
    /// Only the positions where llama.cpp's own one-token path was recorded, with that path's
    /// distance from its batched path beside ours (llama.cpp's noise floor).
    ours_on_serial: Vec<f64>,
    serial: Vec<f64>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// For each case, an exact float64 forward's logits of llama.cpp's top-10 ids at each position
/// (`tools/f64_reference.py`), where that fixture exists.
fn f64_rows(name: &str) -> HashMap<String, Vec<Vec<(u32, f64)>>> {
    let path = fixture(&format!("{name}.f64.json"));
    if !path.exists() {
        return HashMap::new();
    }
    read_json(&path)["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let rows = c["logits"].as_array().unwrap().iter().map(pairs).collect();
            (c["name"].as_str().unwrap().to_string(), rows)
        })
        .collect()
}

/// The id the float64 forward ranks first among llama.cpp's top-10 ids.
fn f64_best(row: &[(u32, f64)]) -> u32 {
    row.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0
}

/// `top_margin`: where llama.cpp's top-1/top-2 margin at a prompt position exceeds it, our top
/// token there must be llama.cpp's. The greedy continuation must be llama.cpp's up to its first
/// step whose margin is below `MARGIN`, in either precision.
fn check_model(name: &str, opts: &LoadOptions, top_margin: f64) {
    let reference = read_json(&fixture(&format!("{name}.llamacpp.json")));
    let exact = f64_rows(name);
    let mut excused = 0;
    let mut session = Session::load(&model_path(name), opts, Some(2048)).expect("model loads");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8, "at least 8 reference cases");
    let mut dist = Distances::default();
    for case in cases {
        let cname = case["name"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(
            our_ids(&session, case),
            want,
            "{name}/{cname}: token ids differ from llama.cpp"
        );

        let logits = session.logits(&want).expect("logits");
        let exact_rows = exact.get(cname);
        for (pos, top) in case["prompt_top"].as_array().unwrap().iter().enumerate() {
            let top = pairs(top);
            let serial = case.get("prompt_top_serial").map(|s| pairs(&s[pos]));
            let exact_row = exact_rows.map(|rows| &rows[pos]);
            for &(id, l) in top.iter().take(5) {
                let ours = f64::from(logits[pos][id as usize]);
                let d = (ours - l).abs();
                dist.all.push(d);
                // Far from llama.cpp only because llama.cpp is further from the exact forward.
                let e = exact_row
                    .and_then(|r| r.iter().find(|p| p.0 == id))
                    .map(|p| p.1);
                if e.is_some_and(|e| (ours - e).abs() < (l - e).abs()) {
                    dist.excused.push(d);
                } else {
                    dist.held.push(d);
                }
                if let Some(serial) = &serial {
                    if let Some(&(_, sl)) = serial.iter().find(|p| p.0 == id) {
                        dist.serial.push((sl - l).abs());
                        dist.ours_on_serial.push(d);
                    }
                }
            }
            let ours = argmax(&logits[pos]);
            if margin(&top) > top_margin && ours != top[0].0 {
                // Allowed only where the exact forward disagrees with llama.cpp too and sides
                // with us: llama.cpp's own error, not ours.
                assert_eq!(
                    exact_row.map(|r| f64_best(r)),
                    Some(ours),
                    "{name}/{cname} pos {pos}: top token {ours} differs from llama.cpp's {} (margin {:.2})",
                    top[0].0,
                    margin(&top)
                );
                excused += 1;
            }
        }

        let greedy_ref = ids(&case["greedy"]);
        let steps: Vec<Vec<(u32, f64)>> = case["greedy_top"]
            .as_array()
            .unwrap()
            .iter()
            .map(pairs)
            .collect();
        let params = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let g = Generate {
            params,
            max_tokens: greedy_ref.len(),
            ignore_eos: true,
            ..Generate::default()
        };
        let ours = session
            .generate(&want, &g, |_| true)
            .expect("generation")
            .tokens;
        for (i, (&a, &b)) in ours.iter().zip(&greedy_ref).enumerate() {
            if margin(&steps[i]) < MARGIN {
                break;
            }
            assert_eq!(a, b, "{name}/{cname}: greedy token {i} differs (ours {ours:?}, llama.cpp {greedy_ref:?})");
        }
    }
    let frac_over =
        |v: &[f64]| v.iter().filter(|&&d| d > LOGIT_TOL).count() as f64 / dist.all.len() as f64;
    let max_of = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (over, max) = (frac_over(&dist.held), max_of(&dist.held));
    eprintln!(
        "{name} ({:?}): |ours - llama.cpp| over top-5: mean {:.3}, max {:.3}, {:.1}% over {LOGIT_TOL}; \
         excluding the {} where llama.cpp is further from the float64 forward than we are \
         ({:.1}% over {LOGIT_TOL}, max {:.3}): max {max:.3}, {:.1}% over {LOGIT_TOL}; \
         on the cases with llama.cpp's one-token path: ours {:.3}, llama.cpp one-token vs batched {:.3}; \
         {excused} top tokens differ where the float64 forward sides with us",
        opts.precision,
        mean(&dist.all),
        max_of(&dist.all),
        frac_over(&dist.all) * 100.0,
        dist.excused.len(),
        frac_over(&dist.excused) * 100.0,
        max_of(&dist.excused),
        over * 100.0,
        mean(&dist.ours_on_serial),
        mean(&dist.serial),
    );
    assert!(
        over <= MAX_FRACTION_OVER,
        "{:.1}% of top-5 logits are more than {LOGIT_TOL} from llama.cpp",
        over * 100.0
    );
    assert!(
        mean(&dist.all) <= MAX_MEAN,
        "mean distance {:.3} from llama.cpp",
        mean(&dist.all)
    );
    assert!(max <= MAX_DISTANCE, "a logit is {max:.3} from llama.cpp");
    assert!(
        dist.serial.is_empty() || mean(&dist.ours_on_serial) <= 1.5 * mean(&dist.serial),
        "further from llama.cpp's batched path than 1.5 times llama.cpp's own one-token path"
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model("smollm2-135m", &EXACT, MARGIN);
}

/// llama.cpp's numerics (8-bit activations, f16 attention) are as close to llama.cpp's batched
/// path as the exact ones, in the statistics; its top tokens at small margins follow its own
/// rounding noise, as llama.cpp's one-token path does, so they are held to llama.cpp's only
/// where the margin exceeds 1.
#[test]
fn smollm2_quantized_matches_llama_cpp() {
    check_model("smollm2-135m", &QUANTIZED, 1.0);
}

/// Gemma 3 270M: sliding-window and global layers, the long case (613 tokens) past the
/// 512-token window. llama.cpp is much further from the float64 forward on Gemma than on SmolLM2
/// (largest distance among its top-5 logits per position: mean 0.32, max 3.14; its one-token
/// path 0.35 / 0.94; `tools/f64_reference.py`), so the fraction
/// and maximum bounds are held only where llama.cpp is nearer the float64 forward than we are.
#[test]
fn gemma3_matches_llama_cpp() {
    check_model("gemma3-270m", &EXACT, MARGIN);
}

/// As for SmolLM2, llama.cpp's numerics are held to llama.cpp's top tokens where the margin
/// exceeds 1.
#[test]
fn gemma3_quantized_matches_llama_cpp() {
    check_model("gemma3-270m", &QUANTIZED, 1.0);
}

/// On one token nothing is amplified by attention: llama.cpp's numerics then reproduce
/// llama.cpp's logits to about a tenth, well inside the exact path's distance. (Only about: 30
/// layers of 8-bit activation rounding still amplify last-bit differences of the products, so
/// two reduction orders of the same kernels land 0.1 apart here.)
#[test]
fn smollm2_quantized_reproduces_llama_cpp_on_one_token() {
    let reference = read_json(&fixture("smollm2-135m.llamacpp.json"));
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "one_word")
        .unwrap();
    let want = ids(&case["ids"]);
    let top = pairs(&case["prompt_top"][0]);
    let mut dist = Vec::new();
    for opts in [QUANTIZED, EXACT] {
        let mut session =
            Session::load(&model_path("smollm2-135m"), &opts, Some(64)).expect("model loads");
        let logits = session.logits(&want).expect("logits");
        dist.push(
            top.iter()
                .take(5)
                .map(|&(id, l)| (f64::from(logits[0][id as usize]) - l).abs())
                .fold(0.0, f64::max),
        );
    }
    eprintln!(
        "one token: max |quantized - llama.cpp| {:.4}, max |exact - llama.cpp| {:.4}",
        dist[0], dist[1]
    );
    assert!(
        dist[0] < 0.15,
        "quantized is {} from llama.cpp on one token",
        dist[0]
    );
    assert!(
        dist[0] < dist[1],
        "quantized is not closer to llama.cpp than exact on one token"
    );
}

/// Our logits are closer to an exact float64 forward than llama.cpp's batched logits are.
#[test]
fn smollm2_closer_to_f64_than_llama_cpp() {
    check_closer_to_f64("smollm2-135m");
}

#[test]
fn gemma3_closer_to_f64_than_llama_cpp() {
    check_closer_to_f64("gemma3-270m");
}

/// Each case of the float64 fixture of `name` with the same case of llama.cpp's fixture.
fn f64_cases(name: &str) -> Vec<(Value, Value)> {
    let exact = read_json(&fixture(&format!("{name}.f64.json")));
    let reference = read_json(&fixture(&format!("{name}.llamacpp.json")));
    let lc_cases = reference["cases"].as_array().unwrap();
    exact["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let lc = lc_cases
                .iter()
                .find(|c| c["name"] == case["name"])
                .expect("same case in the llama.cpp fixture");
            (case.clone(), lc.clone())
        })
        .collect()
}

fn check_closer_to_f64(name: &str) {
    let mut session = Session::load(&model_path(name), &EXACT, Some(2048)).expect("model loads");
    let (mut ours, mut theirs, mut n) = (0f64, 0f64, 0usize);
    for (case, lc) in f64_cases(name) {
        let logits = session.logits(&ids(&case["ids"])).expect("logits");
        for (pos, row) in case["logits"].as_array().unwrap().iter().enumerate() {
            let lc_top = pairs(&lc["prompt_top"][pos]);
            for (id, exact) in pairs(row).into_iter().take(5) {
                let lc_val = lc_top.iter().find(|p| p.0 == id).expect("same ids").1;
                ours += (f64::from(logits[pos][id as usize]) - exact).abs();
                theirs += (lc_val - exact).abs();
                n += 1;
            }
        }
    }
    let (ours, theirs) = (ours / n as f64, theirs / n as f64);
    eprintln!("{name}: mean |logit - f64| over top-5: supernode {ours:.4}, llama.cpp {theirs:.4}");
    assert!(
        ours < theirs,
        "supernode {ours} is not closer to f64 than llama.cpp {theirs}"
    );
}

/// `quantized` precision is as accurate as llama.cpp itself: measured against an exact float64
/// forward on the same weights, its logits (over llama.cpp's top-5 ids at every position) are,
/// prompt by prompt, no further from it than 1.5 times llama.cpp's batched logits are, both in
/// the mean over positions and at the worst position (Gemma 3's large-activation positions such
/// as `<start_of_turn>` included); and it picks another top token than the float64 forward (where
/// that forward's own margin exceeds `MARGIN`) no more often than llama.cpp does.
///
/// This is the measure that can hold everywhere: positions where llama.cpp's one-token and
/// batched paths agree bit for bit (short prompts run the same kernels both ways) leave it no
/// spread to compare with, while 18–30 layers of 8-bit rounding amplify any difference in the
/// order of a sum to tenths of a logit.
#[test]
fn smollm2_quantized_as_close_to_f64_as_llama_cpp() {
    check_quantized_near_f64("smollm2-135m");
}

#[test]
fn gemma3_quantized_as_close_to_f64_as_llama_cpp() {
    check_quantized_near_f64("gemma3-270m");
}

fn check_quantized_near_f64(name: &str) {
    const RATIO: f64 = 1.5;
    let mut session =
        Session::load(&model_path(name), &QUANTIZED, Some(2048)).expect("model loads");
    let (mut our_misses, mut their_misses, mut decided) = (0, 0, 0);
    let mut failures = Vec::new();
    for (case, lc) in f64_cases(name) {
        let cname = case["name"].as_str().unwrap();
        let logits = session.logits(&ids(&case["ids"])).expect("logits");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for (pos, row) in case["logits"].as_array().unwrap().iter().enumerate() {
            let row = pairs(row);
            let lc_top = pairs(&lc["prompt_top"][pos]);
            let ours_of = |id: u32| f64::from(logits[pos][id as usize]);
            let theirs_of = |id: u32| lc_top.iter().find(|p| p.0 == id).expect("same ids").1;
            let worst = |of: &dyn Fn(u32) -> f64| {
                row.iter()
                    .take(5)
                    .map(|&(id, e)| (of(id) - e).abs())
                    .fold(0.0, f64::max)
            };
            ours.push(worst(&ours_of));
            theirs.push(worst(&theirs_of));
            // Top tokens among these ids, where the float64 forward has a clear one.
            let mut by_f64 = row.clone();
            by_f64.sort_by(|a, b| b.1.total_cmp(&a.1));
            if by_f64[0].1 - by_f64[1].1 > MARGIN {
                decided += 1;
                let top_of = |of: &dyn Fn(u32) -> f64| {
                    row.iter()
                        .map(|p| p.0)
                        .max_by(|&a, &b| of(a).total_cmp(&of(b)))
                        .unwrap()
                };
                our_misses += usize::from(top_of(&ours_of) != by_f64[0].0);
                their_misses += usize::from(top_of(&theirs_of) != by_f64[0].0);
            }
        }
        let max_of = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (mo, mt, xo, xt) = (mean(&ours), mean(&theirs), max_of(&ours), max_of(&theirs));
        eprintln!(
            "{name}/{cname} ({} positions): |logit - f64| over top-5, mean of the worst per \
             position: quantized {mo:.3}, llama.cpp {mt:.3}; worst: quantized {xo:.3}, \
             llama.cpp {xt:.3}",
            ours.len()
        );
        if mo > RATIO * mt || xo > RATIO * xt {
            failures.push(cname.to_string());
        }
    }
    eprintln!(
        "{name}: top token other than the float64 forward's, at {decided} positions where its \
         margin exceeds {MARGIN}: quantized {our_misses}, llama.cpp {their_misses}"
    );
    assert!(
        failures.is_empty(),
        "{name}: quantized is further than {RATIO}x llama.cpp's distance from float64 on {failures:?}"
    );
    assert!(
        our_misses <= their_misses,
        "{name}: quantized misses the float64 top token {our_misses} times, llama.cpp {their_misses}"
    );
}

/// Prefill in one step, in chunks, and token by token (as decoding runs) give bit-identical
/// logits: the kernels' results do not depend on the batch.
#[test]
fn chunked_prefill_equals_one_step_and_decode() {
    let reference = read_json(&fixture("smollm2-135m.llamacpp.json"));
    let long = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["ids"]))
        .max_by_key(Vec::len)
        .unwrap();
    assert!(
        long.len() > supernode_engine::session::PREFILL_CHUNK,
        "the long case spans several chunks"
    );
    for opts in [EXACT, LoadOptions::default()] {
        let mut session =
            Session::load(&model_path("smollm2-135m"), &opts, Some(2048)).expect("model loads");
        let one_step = session.logits_chunked(&long, long.len()).expect("logits");
        let chunked = session.logits_chunked(&long, 100).expect("logits");
        let stepped = session.logits_chunked(&long[..64], 1).expect("logits");
        let p = opts.precision;
        assert_eq!(
            one_step, chunked,
            "{p:?}: chunked prefill changed the logits"
        );
        assert_eq!(
            &one_step[..64],
            &stepped[..],
            "{p:?}: token-by-token decode changed the logits"
        );
    }
}

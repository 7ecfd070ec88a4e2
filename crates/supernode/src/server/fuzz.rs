//! The fuzz target of the HTTP request bodies: `parse_body`, then `chat_request` and
//! `completion_request` on the same body (a test module: the binary crate's modules are
//! private). Bodies are the requests of `tests/fuzz-corpus/http_body/` edited as JSON trees and
//! as bytes (`tests/fuzz/harness.rs` has the budget and the property). Beyond returning, a
//! request that is accepted must hold what the handlers rely on: parameters in their ranges,
//! and an error must be a 400 whose body is OpenAI's error object.

#[path = "../../../../tests/fuzz/harness.rs"]
mod harness;
#[path = "../../../../tests/fuzz/mutate.rs"]
mod mutate;

use axum::http::StatusCode;
use serde_json::Value;

use super::api::{
    chat_request, completion_request, parse_body, ApiError, GenSpec, MAX_N, MAX_STOP,
    MAX_TOP_LOGPROBS,
};
use harness::Target;
use mutate::{json_plan, json_pool, JsonPlan};

fn check_error(e: &ApiError) -> Result<(), String> {
    if e.status != StatusCode::BAD_REQUEST {
        return Err(format!("a bad body answered {}: {}", e.status, e.message));
    }
    match e.body()["error"]["message"].as_str() {
        Some(m) if !m.is_empty() => Ok(()),
        _ => Err(format!("an error body without a message: {}", e.body())),
    }
}

fn check_spec(s: &GenSpec) -> Result<(), String> {
    let p = &s.params;
    let ok = (0.0..=2.0).contains(&p.temperature)
        && p.top_p > 0.0
        && p.top_p <= 1.0
        && (0.0..=1.0).contains(&p.min_p)
        && (-2.0..=2.0).contains(&p.presence_penalty)
        && (-2.0..=2.0).contains(&p.frequency_penalty)
        && p.repetition_penalty > 0.0
        && p.repetition_penalty <= 10.0
        && (1..=MAX_N as usize).contains(&s.n)
        && s.stop.len() <= MAX_STOP
        && s.max_tokens != Some(0)
        && s.logprobs.is_none_or(|k| k <= MAX_TOP_LOGPROBS as usize);
    match ok {
        true => Ok(()),
        false => Err(format!("an accepted request out of range: {s:?}")),
    }
}

fn check_body(bytes: &[u8]) -> Result<(), String> {
    let body = match parse_body(bytes) {
        Ok(b) => {
            harness::note("parsed");
            b
        }
        Err(e) => return check_error(&e),
    };
    match chat_request(&body) {
        Ok(r) if r.messages.is_empty() => return Err("a chat request without messages".into()),
        Ok(r) => {
            harness::note("chat ok");
            check_spec(&r.spec)?
        }
        Err(e) => check_error(&e)?,
    }
    match completion_request(&body) {
        Ok(r) => {
            harness::note("completion ok");
            check_spec(&r.spec)
        }
        Err(e) => check_error(&e),
    }
}

#[test]
fn fuzz_http_body() {
    let corpus = harness::corpus("http_body");
    let replay: Vec<Vec<u8>> = corpus.iter().map(|(_, f)| f[0].1.clone()).collect();
    let seeds: Vec<Value> = replay
        .iter()
        .map(|b| serde_json::from_slice(b).expect("seed bodies are JSON"))
        .collect();
    let pool = json_pool(&seeds, 300);
    let n = seeds.len();
    let target = Target {
        name: "http_body",
        build: Box::new(move |(seed, plan): &(usize, JsonPlan)| plan.apply(&seeds[*seed], &pool)),
        files: Box::new(|b: &Vec<u8>| vec![("body.json".into(), b.clone())]),
        check: Box::new(|b: &Vec<u8>| check_body(b)),
    };
    harness::fuzz(&target, &replay, (0..n, json_plan(6)));
}

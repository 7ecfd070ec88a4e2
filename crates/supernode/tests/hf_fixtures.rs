//! Every architecture against HF transformers, on the tiny random float32 models of
//! `tests/fixtures/hf/<arch>/` (made by `tools/make_hf_fixtures.py`):
//!
//! - `logits` within 1e-3 of transformers at every position, for inputs of 1, 5 and 33 tokens,
//!   with the checkpoint's `config.json` in the hub layout (`rope_theta`/`rope_scaling`) and
//!   in transformers 5's layout (`rope_parameters`);
//! - greedy generation gives transformers' 16 tokens;
//! - prefill in one step equals prefill in chunks and token-by-token decode, bit for bit.

mod common;

use std::path::{Path, PathBuf};

use common::{ids, read_json};
use supernode_engine::sampler::SamplingParams;
use supernode_engine::session::Session;
use supernode_models::LoadOptions;

const TOL: f32 = 1e-3;

fn fixture_dir(arch: &str) -> PathBuf {
    common::fixture("hf").join(arch)
}

/// A copy of the fixture directory whose `config.json` is `config_file`.
fn with_config(arch: &str, config_file: &str) -> PathBuf {
    let src = fixture_dir(arch);
    let dir = std::env::temp_dir().join(format!(
        "supernode-hf-{arch}-{config_file}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    std::fs::copy(src.join(config_file), dir.join("config.json")).unwrap();
    dir
}

fn open(dir: &Path) -> Session {
    Session::load(dir, &LoadOptions::default(), None)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn check_arch(arch: &str) {
    let expected = read_json(&fixture_dir(arch).join("expected.json"));
    for config_file in ["config.json", "config.transformers5.json"] {
        let dir = with_config(arch, config_file);
        let mut session = open(&dir);
        for input in expected["inputs"].as_array().unwrap() {
            let tokens = ids(&input["tokens"]);
            let ours = session.logits(&tokens).expect("logits");
            let want = input["logits"].as_array().unwrap();
            assert_eq!(ours.len(), want.len());
            for (pos, (row, want_row)) in ours.iter().zip(want).enumerate() {
                let want_row = want_row.as_array().unwrap();
                assert_eq!(row.len(), want_row.len(), "{arch}: vocabulary size");
                let worst = row
                    .iter()
                    .zip(want_row)
                    .map(|(a, b)| (a - b.as_f64().unwrap() as f32).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= TOL,
                    "{arch} ({config_file}), {} tokens, position {pos}: max |logit - transformers| = {worst}",
                    tokens.len()
                );
            }
        }
        let prompt = ids(&expected["greedy"]["prompt"]);
        let want = ids(&expected["greedy"]["tokens"]);
        let params = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let (got, _) = session
            .generate(&prompt, &params, want.len(), true, |_, _| true)
            .expect("generation");
        assert_eq!(
            got, want,
            "{arch} ({config_file}): greedy continuation differs from transformers"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let mut session = open(&fixture_dir(arch));
    let long = ids(&expected["inputs"].as_array().unwrap().last().unwrap()["tokens"]);
    let one_step = session.logits_chunked(&long, long.len()).unwrap();
    assert_eq!(
        one_step,
        session.logits_chunked(&long, 7).unwrap(),
        "{arch}: chunked prefill differs"
    );
    assert_eq!(
        one_step,
        session.logits_chunked(&long, 1).unwrap(),
        "{arch}: token-by-token decode differs"
    );
}

#[test]
fn llama_matches_transformers() {
    check_arch("llama");
}

#[test]
fn gemma3_matches_transformers() {
    check_arch("gemma3_text");
}

#[test]
fn qwen2_matches_transformers() {
    check_arch("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_arch("qwen3");
}

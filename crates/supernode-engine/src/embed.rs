//! Embeddings: the mean over a text's tokens of the model's final hidden states (after the
//! final norm, the `result_norm` activation of [`supernode_models::trace`]), L2-normalised —
//! what llama-server's `/v1/embeddings` gives with mean pooling.
//!
//! The forward pass runs over a scratch KV cache of its own, sized to the input, so that an
//! embedding never takes blocks from (or leaves blocks in) the engine's pool. The input goes
//! through in chunks of `chunk` tokens; a chunked pass computes the same K/V and hidden states
//! as one pass (the engine's batch invariance), so the result does not depend on `chunk` (for
//! a hybrid model, on any `chunk` of at least one linear-attention window; smaller ones agree
//! within rounding).

use std::panic::{catch_unwind, AssertUnwindSafe};

use supernode_kernels::ops::DELTA_CHUNK;
use supernode_models::{Batch, KvCache, Model, Named, Trace};

use crate::engine::BLOCK_SIZE;
use crate::error::EngineError;

/// The L2-normalised mean of the final normed hidden states of `tokens`.
pub fn embed(model: &dyn Model, tokens: &[u32], chunk: usize) -> Result<Vec<f32>, EngineError> {
    let cfg = model.config();
    if tokens.is_empty() {
        return Err(EngineError::Invalid(
            "an embedding input has no tokens".into(),
        ));
    }
    if tokens.len() > cfg.context_len {
        return Err(EngineError::Invalid(format!(
            "an embedding input has {} tokens; the context holds {}",
            tokens.len(),
            cfg.context_len
        )));
    }
    let blocks = tokens.len().div_ceil(BLOCK_SIZE);
    // One recurrent state slot for a model with linear-attention layers.
    let mut kv = KvCache::new(&model.kv_specs(), BLOCK_SIZE, blocks)
        .and_then(|kv| kv.with_state_slots(&model.state_widths(), 1))
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let slots: &[usize] = if kv.num_state_slots > 0 { &[0] } else { &[] };
    // Linear-attention layers take the input in the chunked form, in steps cut at window
    // boundaries as the scheduler cuts prompts (the same bits whatever the budget).
    let until = [tokens.len()];
    let (chunked_until, chunk): (&[usize], usize) = match slots.is_empty() {
        false if chunk >= DELTA_CHUNK => (&until, chunk / DELTA_CHUNK * DELTA_CHUNK),
        false => (&until, chunk),
        true => (&[], chunk),
    };
    let table: Vec<u32> = (0..blocks as u32).collect();
    let tables = [table.as_slice()];
    let hidden = cfg.hidden;
    let mut sum = vec![0f64; hidden];
    let mut seen_rows = 0usize;
    for (c, part) in tokens.chunks(chunk.max(1)).enumerate() {
        let start = c * chunk.max(1);
        let positions: Vec<usize> = (start..start + part.len()).collect();
        let seq_of = vec![0usize; part.len()];
        let batch = Batch {
            tokens: part,
            positions: &positions,
            seq_of: &seq_of,
            block_tables: &tables,
            logits_for: &[],
            state_slots: slots,
            chunked_until,
            drafts: &[],
        };
        let mut hook = |a: &Named<'_>| {
            if a.name == "result_norm" {
                for row in a.values.chunks_exact(hidden) {
                    sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
                    seen_rows += 1;
                }
            }
        };
        let run = catch_unwind(AssertUnwindSafe(|| {
            model.forward_traced(&batch, &mut kv, &mut Trace::new(&mut hook))
        }));
        match run {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(EngineError::Invalid(format!(
                    "the forward pass failed: {e}"
                )))
            }
            Err(_) => return Err(EngineError::Invalid("the forward pass panicked".into())),
        }
    }
    if seen_rows != tokens.len() {
        return Err(EngineError::Invalid(format!(
            "the model showed {seen_rows} final hidden rows for {} tokens",
            tokens.len()
        )));
    }
    let n = tokens.len() as f64;
    let norm = sum.iter().map(|s| (s / n) * (s / n)).sum::<f64>().sqrt();
    // A zero vector stays zero, as llama.cpp's normalisation leaves it.
    let scale = if norm > 0.0 { 1.0 / (n * norm) } else { 0.0 };
    Ok(sum.iter().map(|s| (s * scale) as f32).collect())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use supernode_models::{load_model, LoadOptions};

    use super::*;

    fn model() -> Box<dyn Model> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf/llama");
        load_model(&dir, &LoadOptions::default()).unwrap().model
    }

    #[test]
    fn embeddings_are_normalised_means_and_do_not_depend_on_chunking() {
        let m = model();
        let tokens: Vec<u32> = (1..=37).collect();
        let one = embed(m.as_ref(), &tokens, 1024).unwrap();
        assert_eq!(one.len(), m.config().hidden);
        let len: f64 = one
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        assert!((len - 1.0).abs() < 1e-5, "{len}");
        for chunk in [1, 5, 16] {
            let e = embed(m.as_ref(), &tokens, chunk).unwrap();
            let d = one
                .iter()
                .zip(&e)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "chunk {chunk}: {d}");
        }
        // The mean of the `result_norm` rows of one traced pass, normalised by hand.
        let h = m.config().hidden;
        let mut rows = Vec::new();
        let mut hook = |a: &Named<'_>| {
            if a.name == "result_norm" {
                rows = a.values.to_vec();
            }
        };
        let positions: Vec<usize> = (0..tokens.len()).collect();
        let seq_of = vec![0; tokens.len()];
        let table: Vec<u32> = (0..3).collect();
        let tables = [table.as_slice()];
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            seq_of: &seq_of,
            block_tables: &tables,
            logits_for: &[],
            state_slots: &[],
            chunked_until: &[],
            drafts: &[],
        };
        let mut kv = KvCache::new(&m.kv_specs(), BLOCK_SIZE, 3).unwrap();
        m.forward_traced(&batch, &mut kv, &mut Trace::new(&mut hook))
            .unwrap();
        let mean: Vec<f64> = (0..h)
            .map(|j| {
                rows.iter()
                    .skip(j)
                    .step_by(h)
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / 37.0
            })
            .collect();
        let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (a, b) in one.iter().zip(&mean) {
            assert!((*a as f64 - b / norm).abs() < 1e-5);
        }
        // Different texts give different embeddings.
        let other = embed(m.as_ref(), &[5, 6, 7], 1024).unwrap();
        assert!(one.iter().zip(&other).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = model();
        assert!(embed(m.as_ref(), &[], 16).is_err());
        let vocab = m.config().vocab_size as u32;
        assert!(embed(m.as_ref(), &[vocab], 16).is_err());
        let long = vec![1u32; m.config().context_len + 1];
        assert!(embed(m.as_ref(), &long, 16).is_err());
    }
}

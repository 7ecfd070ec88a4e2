//! The multi-token-prediction proposer (vLLM's `mtp`, llama.cpp's `draft-mtp`): the target's
//! own NextN layer ([`Model::forward_nextn`]) guesses the next tokens from the target's hidden
//! states, and the target verifies them in its own batch (see [`crate::spec`]).
//!
//! The layer's row at position `q` reads the target's hidden state at `q` (after the final
//! norm) and the token at `q + 1`, and its logits guess the token at `q + 2` (vLLM's layout;
//! llama.cpp puts the same row at `q + 1`, which rope makes the same). It attends over its own
//! K/V of the earlier rows, so every position the target computes and keeps is fed to it once:
//! the engine hands the target's hidden states over after each step ([`Proposer::observe`]),
//! and each proposal first runs the rows the layer has not seen yet (a whole prompt, in
//! chunks, on the first one), whose last row gives the first draft. Further drafts feed the
//! layer's own hidden state and draft back (one layer used k times, as vLLM and llama.cpp do
//! with a single MTP layer); their K/V sit past the kept rows and are overwritten later, so
//! rejected drafts need no rollback.
//!
//! Each request has a KV cache of its own ([`OwnCache`]), like the draft model's
//! ([`super::DraftProposer`]); hidden states are kept only until the layer has read them.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use supernode_models::{Batch, Model};

use super::{argmax, OwnCache, Proposer};
use crate::engine::RequestId;
use crate::error::EngineError;

/// Rows per forward pass while the layer catches up with a request (its prompt).
const CHUNK: usize = 256;

/// One request's NextN cache and the target's hidden states not yet fed to it.
struct MtpSeq {
    cache: OwnCache,
    /// The layer has computed (and keeps the K/V of) rows `0..fed` from the target's hidden
    /// states.
    fed: usize,
    /// The target's hidden states of positions `from..from + hidden.len() / width`.
    from: usize,
    hidden: Vec<f32>,
}

/// Drafts with the target's NextN layer.
pub struct MtpProposer {
    model: Arc<dyn Model>,
    width: usize,
    seqs: HashMap<RequestId, MtpSeq>,
}

impl MtpProposer {
    /// A proposer over `model`'s NextN layer; refused if it has none loaded.
    pub fn new(model: Arc<dyn Model>) -> Result<MtpProposer, EngineError> {
        if !model.has_nextn() {
            return Err(EngineError::Invalid(
                "speculative method `mtp`: the model has no multi-token-prediction layer \
                 loaded (its checkpoint has none, or it was loaded without them): use `ngram` \
                 or `draft`"
                    .into(),
            ));
        }
        Ok(MtpProposer {
            width: model.config().hidden,
            model,
            seqs: HashMap::new(),
        })
    }

    /// Requests whose NextN cache is held.
    pub fn num_cached(&self) -> usize {
        self.seqs.len()
    }

    fn seq(&mut self, id: RequestId) -> Option<&mut MtpSeq> {
        if !self.seqs.contains_key(&id) {
            let cache = OwnCache::new(&self.model.nextn_kv_specs()).ok()?;
            self.seqs.insert(
                id,
                MtpSeq {
                    cache,
                    fed: 0,
                    from: 0,
                    hidden: Vec::new(),
                },
            );
        }
        self.seqs.get_mut(&id)
    }

    /// Drafts `k` tokens after `tokens` into `out` from `seq`.
    fn draft(
        model: &dyn Model,
        width: usize,
        seq: &mut MtpSeq,
        tokens: &[u32],
        k: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        let last = tokens.len() - 1;
        // Row `q` pairs the target's state at `q` with the token at `q + 1`: rows up to
        // `last - 1`, the state at `last - 1` given (the target computed that position). The
        // last row is computed again if it was before: its logits give the first draft.
        let start = seq.fed.min(last - 1);
        let have = seq.from + seq.hidden.len() / width;
        if seq.from > start || have < last {
            return Ok(());
        }
        let mut logits = Vec::new();
        let mut h = Vec::new();
        let mut q = start;
        while q < last {
            let end = (q + CHUNK).min(last);
            let rows = seq.hidden[(q - seq.from) * width..(end - seq.from) * width].to_vec();
            logits = forward(model, seq, &tokens[q + 1..end + 1], q, &rows, &mut h)?;
            q = end;
        }
        seq.fed = last;
        // Keep the state at `last - 1` (for that row again) and what comes after it.
        let drop = last - 1 - seq.from;
        seq.hidden.drain(..drop * width);
        seq.from += drop;
        for i in 0..k {
            let t = argmax(&logits);
            out.push(t);
            if i + 1 < k {
                let prev = h[h.len() - width..].to_vec();
                logits = forward(model, seq, &[t], last + i, &prev, &mut h)?;
            }
        }
        Ok(())
    }
}

impl Proposer for MtpProposer {
    fn name(&self) -> &'static str {
        "mtp"
    }

    fn propose(&mut self, id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>) {
        let model = self.model.clone();
        // The last draft fed back sits at position `tokens.len() + k - 3`.
        let k = k.min((model.config().context_len + 2).saturating_sub(tokens.len()));
        if tokens.len() < 2 || k == 0 {
            return;
        }
        let width = self.width;
        let Some(seq) = self.seq(id) else {
            return;
        };
        let from = out.len();
        if Self::draft(model.as_ref(), width, seq, tokens, k, out).is_err() {
            out.truncate(from);
            self.seqs.remove(&id);
        }
    }

    fn release(&mut self, id: RequestId) {
        self.seqs.remove(&id);
    }

    fn cache_bytes(&self) -> usize {
        self.seqs.values().map(|s| s.cache.bytes()).sum()
    }

    fn wants_hidden(&self) -> bool {
        true
    }

    fn first_k(&self, _k: usize) -> usize {
        1
    }

    fn observe(&mut self, id: RequestId, first: usize, hidden: &[f32]) {
        let width = self.width;
        let Some(seq) = self.seq(id) else {
            return;
        };
        let have = seq.from + seq.hidden.len() / width;
        if first < have || first < seq.from {
            // Recomputed from `first` (a preemption): rows past it are read again.
            let keep = first.saturating_sub(seq.from).min(seq.hidden.len() / width);
            seq.hidden.truncate(keep * width);
            if first < seq.from {
                seq.from = first;
                seq.hidden.clear();
            }
            seq.fed = seq.fed.min(first);
        } else if first > have {
            // A gap (states not given): start again from here.
            seq.from = first;
            seq.hidden.clear();
            seq.fed = seq.fed.min(first);
        }
        seq.hidden.extend_from_slice(hidden);
    }
}

/// Runs the layer on `tokens` at positions `start..`, paired with `hidden` (one row each),
/// growing the cache as needed; the logits of the last row, and every row's own hidden state
/// into `h`.
fn forward(
    model: &dyn Model,
    seq: &mut MtpSeq,
    tokens: &[u32],
    start: usize,
    hidden: &[f32],
    h: &mut Vec<f32>,
) -> Result<Vec<f32>, EngineError> {
    let end = start + tokens.len();
    seq.cache.reserve(end)?;
    let positions: Vec<usize> = (start..end).collect();
    let seq_of = vec![0; tokens.len()];
    let tables = [seq.cache.table.as_slice()];
    let batch = Batch {
        tokens,
        positions: &positions,
        seq_of: &seq_of,
        block_tables: &tables,
        logits_for: &[tokens.len() - 1],
        state_slots: &[],
        chunked_until: &[],
        drafts: &[],
    };
    let kv = &mut seq.cache.kv;
    match catch_unwind(AssertUnwindSafe(|| {
        model.forward_nextn(&batch, hidden, kv, h)
    })) {
        Ok(r) => Ok(r?),
        Err(_) => Err(EngineError::Invalid(
            "the multi-token-prediction layer panicked".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use supernode_models::{load_model, KvCache, LoadOptions, Named, Trace};

    use super::*;
    use crate::engine::BLOCK_SIZE;

    fn target() -> Arc<dyn Model> {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf/qwen3_5_mtp");
        let opts = LoadOptions {
            mtp: true,
            ..LoadOptions::default()
        };
        Arc::from(load_model(&dir, &opts).unwrap().model)
    }

    /// One fresh cache of `specs` holding `n` positions, and its block table.
    fn cache(specs: &[supernode_models::KvLayerSpec], n: usize) -> (KvCache, Vec<u32>) {
        let kv = KvCache::new(specs, BLOCK_SIZE, n.div_ceil(BLOCK_SIZE).max(1)).unwrap();
        let table = (0..kv.num_blocks as u32).collect();
        (kv, table)
    }

    /// The target's hidden states (after its final norm) of every position of `tokens`, from
    /// one forward pass.
    fn target_hidden(m: &dyn Model, tokens: &[u32]) -> Vec<f32> {
        let n = tokens.len();
        let (kv, table) = cache(&m.kv_specs(), n);
        let mut kv = kv.with_state_slots(&m.state_widths(), 1).unwrap();
        let positions: Vec<usize> = (0..n).collect();
        let batch = Batch {
            tokens,
            positions: &positions,
            seq_of: &vec![0; n],
            block_tables: &[table.as_slice()],
            logits_for: &[n - 1],
            state_slots: &[0],
            chunked_until: &[],
            drafts: &[],
        };
        let mut out = Vec::new();
        let mut keep = |a: &Named<'_>| {
            if a.name == "result_norm" {
                out = a.values.to_vec();
            }
        };
        m.forward_traced(&batch, &mut kv, &mut Trace::new(&mut keep))
            .unwrap();
        out
    }

    /// The NextN layer's greedy drafts after `tokens`, from a fresh cache: rows `0..last` in
    /// one pass, then its own states fed back.
    fn drafts_from_scratch(m: &dyn Model, tokens: &[u32], k: usize) -> Vec<u32> {
        let (last, w) = (tokens.len() - 1, m.config().hidden);
        let hidden = target_hidden(m, &tokens[..last]);
        let (mut kv, table) = cache(&m.nextn_kv_specs(), last + k);
        let run = |kv: &mut KvCache, toks: &[u32], start: usize, hid: &[f32]| {
            let positions: Vec<usize> = (start..start + toks.len()).collect();
            let batch = Batch {
                tokens: toks,
                positions: &positions,
                seq_of: &vec![0; toks.len()],
                block_tables: &[table.as_slice()],
                logits_for: &[toks.len() - 1],
                state_slots: &[],
                chunked_until: &[],
                drafts: &[],
            };
            let mut h = Vec::new();
            let logits = m.forward_nextn(&batch, hid, kv, &mut h).unwrap();
            (argmax(&logits), h[h.len() - w..].to_vec())
        };
        let (mut t, mut h) = run(&mut kv, &tokens[1..], 0, &hidden);
        let mut out = vec![t];
        for i in 1..k {
            (t, h) = run(&mut kv, &[t], last - 1 + i, &h);
            out.push(t);
        }
        out
    }

    /// Drafts are the NextN layer's greedy continuation computed from scratch, whatever the
    /// cache held: after the prompt, after some drafts were accepted and others rejected, after
    /// all were, after a preemption recomputes the request, for two requests at once.
    #[test]
    fn drafts_are_the_layers_greedy_continuation_whatever_the_cache_held() {
        let m = target();
        let w = m.config().hidden;
        let mut p = MtpProposer::new(m.clone()).unwrap();
        let id = RequestId(3);
        let propose = |p: &mut MtpProposer, id, tokens: &[u32], k| {
            let mut out = Vec::new();
            p.propose(id, tokens, k, &mut out);
            out
        };
        // The prompt (150 tokens) computed in two steps, then the first sampled token.
        let mut tokens: Vec<u32> = (0..151).map(|i| (i * 7 + 3) % 256).collect();
        let h = target_hidden(m.as_ref(), &tokens[..150]);
        p.observe(id, 0, &h[..90 * w]);
        p.observe(id, 90, &h[90 * w..]);
        let first = propose(&mut p, id, &tokens, 4);
        assert_eq!(first, drafts_from_scratch(m.as_ref(), &tokens, 4));
        // The target computes position 150 and the drafts; keeps two and its own third token.
        let step = |p: &mut MtpProposer, tokens: &[u32], from: usize, kept: usize| {
            let h = target_hidden(m.as_ref(), &tokens[..from + kept]);
            p.observe(id, from, &h[from * w..]);
        };
        let from = tokens.len() - 1;
        tokens.extend_from_slice(&first[..2]);
        step(&mut p, &tokens, from, 3);
        tokens.push((first[2] + 1) % 256);
        let next = propose(&mut p, id, &tokens, 5);
        assert_eq!(next, drafts_from_scratch(m.as_ref(), &tokens, 5));
        // All five kept, then the bonus token.
        let from = tokens.len() - 1;
        tokens.extend_from_slice(&next);
        step(&mut p, &tokens, from, 6);
        tokens.push(11);
        assert_eq!(
            propose(&mut p, id, &tokens, 3),
            drafts_from_scratch(m.as_ref(), &tokens, 3)
        );
        // Not scheduled (nothing observed): the same drafts again.
        assert_eq!(
            propose(&mut p, id, &tokens, 3),
            drafts_from_scratch(m.as_ref(), &tokens, 3)
        );
        // Preempted and recomputed from position 0.
        let h = target_hidden(m.as_ref(), &tokens[..tokens.len() - 1]);
        p.observe(id, 0, &h);
        assert_eq!(
            propose(&mut p, id, &tokens, 2),
            drafts_from_scratch(m.as_ref(), &tokens, 2)
        );
        // Another request has a cache of its own; nothing without its states; release drops
        // each.
        let other = RequestId(4);
        assert!(propose(&mut p, other, &[5, 6, 7], 2).is_empty());
        p.observe(other, 0, &target_hidden(m.as_ref(), &[5, 6]));
        assert_eq!(
            propose(&mut p, other, &[5, 6, 7], 2),
            drafts_from_scratch(m.as_ref(), &[5, 6, 7], 2)
        );
        assert_eq!(p.num_cached(), 2);
        p.release(id);
        p.release(other);
        assert_eq!(p.num_cached(), 0);
        assert!(propose(&mut p, id, &[1], 3).is_empty());
    }
}

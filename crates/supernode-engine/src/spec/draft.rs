//! The draft-model proposer (vLLM's `draft_model`, llama.cpp's `--model-draft`): a second,
//! smaller model with the target's vocabulary guesses the next k tokens greedily, and the
//! target verifies them in its own batch (see [`crate::spec`]).
//!
//! The draft model keeps a KV cache of its own per request, outside the engine's block pool
//! ([`OwnCache`]): one KV cache whose block table is the identity, grown as the request's tokens
//! grow and dropped with the request ([`Proposer::release`]), so its memory is
//! that of the tokens it holds. The cache remembers which tokens it holds; each proposal keeps
//! the longest prefix of the request's tokens it already has (so the drafts the target
//! rejected are rolled back by forgetting them: their slots are overwritten later), computes
//! the rest in one forward pass (chunked for a long prompt), then feeds its own argmax token
//! back k - 1 times. A draft's tokens need not be the target's for exactness (the target
//! decides what is kept); a failed draft forward pass proposes nothing and forgets the cache.
//!
//! Draft models with linear attention (a recurrent state) are refused: rolling a state back
//! to a prefix would need a snapshot per position.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use supernode_models::{Batch, LoadOptions, Model};

use super::{argmax, OwnCache, Proposer};
use crate::engine::RequestId;
use crate::error::EngineError;
use crate::load::load_with_tokenizer;
use crate::tokenizer::Tokenizer;

/// Tokens per forward pass while the draft catches up with a request (its prompt).
const CHUNK: usize = 256;

/// A loaded draft model, shared by every engine that speculates with it (cloning is cheap).
#[derive(Clone)]
pub struct DraftModel {
    /// The model as the user named it (a path or a short name), for messages.
    pub name: String,
    model: Arc<dyn Model>,
}

impl std::fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DraftModel({})", self.name)
    }
}

/// Two drafts are the same if they are the same loaded model.
impl PartialEq for DraftModel {
    fn eq(&self, other: &DraftModel) -> bool {
        Arc::ptr_eq(&self.model, &other.model)
    }
}

impl Eq for DraftModel {}

impl DraftModel {
    /// Bytes per token of its KV cache.
    pub fn cache_bytes_per_token(&self) -> usize {
        supernode_models::KvCache::bytes_per_token(&self.model.kv_specs())
    }

    /// `model` as a draft model named `name`; refused if it has a recurrent state.
    pub fn new(name: &str, model: Box<dyn Model>) -> Result<DraftModel, EngineError> {
        if model.state_widths().iter().any(|&w| w > 0) {
            return Err(EngineError::Invalid(format!(
                "the draft model {name} has linear attention (a recurrent state), which \
                 speculative decoding cannot roll back yet: choose a draft model without it"
            )));
        }
        Ok(DraftModel {
            name: name.to_string(),
            model: Arc::from(model),
        })
    }

    /// Loads the model at `path` (named `name` in messages) with the target's load options and
    /// checks it against the target: no recurrent state, and the target's vocabulary (its size,
    /// and where both have a tokenizer, every token's text and the BOS and EOS ids).
    pub fn load(
        path: &Path,
        name: &str,
        opts: &LoadOptions,
        target: &dyn Model,
        target_tokenizer: Option<&Tokenizer>,
    ) -> Result<DraftModel, EngineError> {
        let (model, tokenizer) = load_with_tokenizer(path, opts).map_err(|e| {
            EngineError::Invalid(format!("the draft model {name} failed to load: {e}"))
        })?;
        let draft = DraftModel::new(name, model)?;
        draft.check_vocab_size(target.config().vocab_size)?;
        if let (Some(d), Some(t)) = (tokenizer.as_deref(), target_tokenizer) {
            draft.check_tokenizer(d, t)?;
        }
        Ok(draft)
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The draft's logits must be the target's ids: the same vocabulary size.
    pub fn check_vocab_size(&self, target_vocab: usize) -> Result<(), EngineError> {
        let vocab = self.model.config().vocab_size;
        if vocab != target_vocab {
            return Err(EngineError::Invalid(format!(
                "the draft model {} has a vocabulary of {vocab} tokens and the target one of \
                 {target_vocab}: a draft model must share the target's vocabulary",
                self.name
            )));
        }
        Ok(())
    }

    /// The same token texts under the same ids, and the same BOS and EOS.
    fn check_tokenizer(&self, draft: &Tokenizer, target: &Tokenizer) -> Result<(), EngineError> {
        let name = &self.name;
        if draft.vocab_size() != target.vocab_size() {
            return Err(EngineError::Invalid(format!(
                "the draft model {name}'s tokenizer has {} tokens and the target's {}: a draft \
                 model must share the target's vocabulary",
                draft.vocab_size(),
                target.vocab_size()
            )));
        }
        let differs =
            (0..draft.vocab_size() as u32).find(|&i| draft.token_text(i) != target.token_text(i));
        if let Some(i) = differs {
            return Err(EngineError::Invalid(format!(
                "the draft model {name}'s token {i} is {:?} and the target's {:?}: a draft \
                 model must share the target's vocabulary",
                draft.token_text(i).unwrap_or(""),
                target.token_text(i).unwrap_or("")
            )));
        }
        for (what, d, t) in [
            ("BOS", draft.bos_id(), target.bos_id()),
            ("EOS", draft.eos_id(), target.eos_id()),
        ] {
            if d != t {
                return Err(EngineError::Invalid(format!(
                    "the draft model {name}'s {what} token is {d:?} and the target's {t:?}: a \
                     draft model must share the target's special tokens"
                )));
            }
        }
        Ok(())
    }
}

/// One request's draft cache.
struct DraftSeq {
    cache: OwnCache,
    /// The tokens whose K/V the cache holds, at positions `0..`.
    tokens: Vec<u32>,
}

/// Drafts with a [`DraftModel`]: greedy tokens from the draft's cache of each request.
pub struct DraftProposer {
    draft: DraftModel,
    seqs: HashMap<RequestId, DraftSeq>,
}

impl DraftProposer {
    pub fn new(draft: DraftModel) -> DraftProposer {
        DraftProposer {
            draft,
            seqs: HashMap::new(),
        }
    }

    /// Requests whose draft cache is held.
    pub fn num_cached(&self) -> usize {
        self.seqs.len()
    }

    /// Draft tokens `k` after `tokens` into `out`, from `seq`'s cache.
    fn draft(
        model: &dyn Model,
        seq: &mut DraftSeq,
        tokens: &[u32],
        k: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        // Keep what the cache agrees on, but compute at least the last token again: its logits
        // give the first draft.
        let keep = seq
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len() - 1);
        seq.tokens.truncate(keep);
        let mut logits = Vec::new();
        for part in tokens[keep..].chunks(CHUNK) {
            logits = forward(model, seq, part)?;
        }
        for i in 0..k {
            let t = argmax(&logits);
            out.push(t);
            if i + 1 < k {
                logits = forward(model, seq, &[t])?;
            }
        }
        Ok(())
    }
}

impl Proposer for DraftProposer {
    fn name(&self) -> &'static str {
        "draft"
    }

    fn propose(&mut self, id: RequestId, tokens: &[u32], k: usize, out: &mut Vec<u32>) {
        let model = self.draft.model.as_ref();
        // The last draft fed back sits at position `tokens.len() + k - 2`.
        let k = k.min((model.config().context_len + 1).saturating_sub(tokens.len()));
        if tokens.is_empty() || k == 0 {
            return;
        }
        let seq = match self.seqs.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                match OwnCache::new(&model.kv_specs()) {
                    Ok(cache) => e.insert(DraftSeq {
                        cache,
                        tokens: Vec::new(),
                    }),
                    Err(_) => return,
                }
            }
        };
        let from = out.len();
        if Self::draft(model, seq, tokens, k, out).is_err() {
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

    fn first_k(&self, _k: usize) -> usize {
        1
    }
}

/// Runs `part` after `seq`'s tokens, growing its cache as needed; the logits of its last
/// token.
fn forward(model: &dyn Model, seq: &mut DraftSeq, part: &[u32]) -> Result<Vec<f32>, EngineError> {
    let start = seq.tokens.len();
    let end = start + part.len();
    seq.cache.reserve(end)?;
    let positions: Vec<usize> = (start..end).collect();
    let seq_of = vec![0; part.len()];
    let tables = [seq.cache.table.as_slice()];
    let batch = Batch {
        tokens: part,
        positions: &positions,
        seq_of: &seq_of,
        block_tables: &tables,
        logits_for: &[part.len() - 1],
        state_slots: &[],
        chunked_until: &[],
        drafts: &[],
    };
    let kv = &mut seq.cache.kv;
    let logits = match catch_unwind(AssertUnwindSafe(|| model.forward(&batch, kv))) {
        Ok(r) => r?,
        Err(_) => {
            return Err(EngineError::Invalid(
                "the draft model's forward pass panicked".into(),
            ))
        }
    };
    seq.tokens.extend_from_slice(part);
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use supernode_models::{load_model, KvCache};

    use super::*;
    use crate::engine::BLOCK_SIZE;

    fn draft() -> DraftModel {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf/llama");
        let m = load_model(&dir, &LoadOptions::default()).unwrap().model;
        DraftModel::new("llama", m).unwrap()
    }

    fn propose(p: &mut DraftProposer, id: RequestId, tokens: &[u32], k: usize) -> Vec<u32> {
        let mut out = Vec::new();
        p.propose(id, tokens, k, &mut out);
        out
    }

    /// The greedy continuation of `tokens` by a cache-free forward pass over all of them.
    fn greedy(model: &dyn Model, tokens: &[u32], k: usize) -> Vec<u32> {
        let mut t = tokens.to_vec();
        for _ in 0..k {
            let n = t.len();
            let mut kv =
                KvCache::new(&model.kv_specs(), BLOCK_SIZE, n.div_ceil(BLOCK_SIZE)).unwrap();
            let table: Vec<u32> = (0..kv.num_blocks as u32).collect();
            let positions: Vec<usize> = (0..n).collect();
            let batch = Batch {
                tokens: &t,
                positions: &positions,
                seq_of: &vec![0; n],
                block_tables: &[table.as_slice()],
                logits_for: &[n - 1],
                state_slots: &[],
                chunked_until: &[],
                drafts: &[],
            };
            let logits = model.forward(&batch, &mut kv).unwrap();
            t.push(argmax(&logits));
        }
        t.split_off(tokens.len())
    }

    #[test]
    fn drafts_are_the_greedy_continuation_whatever_the_cache_held() {
        let d = draft();
        let mut p = DraftProposer::new(d.clone());
        let id = RequestId(7);
        let mut tokens: Vec<u32> = (0..150).map(|i| (i * 7 + 3) % 256).collect();
        let first = propose(&mut p, id, &tokens, 4);
        assert_eq!(first, greedy(d.model(), &tokens, 4));
        // The target keeps two drafts and a token of its own: the third draft and what the
        // cache computed after it are rolled back.
        tokens.extend_from_slice(&first[..2]);
        tokens.push(first[2].wrapping_add(1) % 256);
        let next = propose(&mut p, id, &tokens, 5);
        assert_eq!(next, greedy(d.model(), &tokens, 5));
        assert_eq!(
            next,
            propose(&mut DraftProposer::new(d.clone()), id, &tokens, 5)
        );
        // All drafts kept and the bonus token: the last draft was never fed, so it is now.
        tokens.extend_from_slice(&next);
        tokens.push(11);
        assert_eq!(
            propose(&mut p, id, &tokens, 3),
            greedy(d.model(), &tokens, 3)
        );
        // The same tokens again (nothing kept since): the last one is recomputed.
        assert_eq!(
            propose(&mut p, id, &tokens, 3),
            greedy(d.model(), &tokens, 3)
        );
        // Another request has a cache of its own; release drops each.
        let other = RequestId(8);
        assert_eq!(
            propose(&mut p, other, &[1, 2, 3], 2),
            greedy(d.model(), &[1, 2, 3], 2)
        );
        assert_eq!(p.num_cached(), 2);
        p.release(id);
        p.release(other);
        assert_eq!(p.num_cached(), 0);
        // k is bounded by the draft's context; nothing for an empty request.
        let ctx = d.model().config().context_len;
        assert!(propose(&mut p, id, &vec![1; ctx + 1], 3).is_empty());
        assert_eq!(propose(&mut p, id, &vec![1; ctx], 3).len(), 1);
        assert!(propose(&mut p, id, &[], 3).is_empty());
    }
}

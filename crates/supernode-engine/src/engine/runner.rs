//! The model runner: turns a [`Plan`] into the model's flat batch and runs the forward pass.
//!
//! It alone builds positions, the sequence index of each row, the block tables, the recurrent
//! state slots and where each request's prompt ends (the chunked form of linear attention) from
//! the plan, and it alone holds the KV cache, which only the model's attention layers write (one
//! writer), and which it puts back after rejected drafts where a recurrent state took them in. The logits come back as the rows each scheduled request asked for
//! ([`super::scheduler::Scheduled::logits_rows`]), in plan order; when asked, the hidden
//! state of every row (after the final norm, which a multi-token-prediction proposer reads)
//! comes back beside them.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use supernode_models::{Batch, KvCache, Model, Named, Trace};

use super::scheduler::Plan;

/// The model and its KV cache, with the batch buffers reused from step to step.
pub(crate) struct Runner {
    pub model: Arc<dyn Model>,
    kv: KvCache,
    tokens: Vec<u32>,
    positions: Vec<usize>,
    seq_of: Vec<usize>,
    logits_for: Vec<usize>,
    state_slots: Vec<usize>,
    chunked_until: Vec<usize>,
    drafts: Vec<usize>,
}

/// The logits of one step: `rows[k]` are the rows of the plan's `k`-th request, each
/// `vocab` wide, in `logits`. With hidden states asked for, `hidden` has one row of the model's
/// width per token of the batch, the plan's `k`-th request's tokens at rows `tokens[k]`.
pub(crate) struct StepLogits {
    pub logits: Vec<f32>,
    pub rows: Vec<Range<usize>>,
    pub vocab: usize,
    pub hidden: Vec<f32>,
    pub tokens: Vec<Range<usize>>,
}

impl StepLogits {
    /// Row `r` of all rows returned.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.logits[r * self.vocab..(r + 1) * self.vocab]
    }
}

impl Runner {
    /// The KV cache's buffers by address.
    pub fn kv_regions(&mut self) -> Vec<supernode_models::KvRegion> {
        self.kv.regions()
    }

    pub fn new(model: Box<dyn Model>, kv: KvCache) -> Runner {
        Runner {
            model: Arc::from(model),
            kv,
            tokens: Vec::new(),
            positions: Vec::new(),
            seq_of: Vec::new(),
            logits_for: Vec::new(),
            state_slots: Vec::new(),
            chunked_until: Vec::new(),
            drafts: Vec::new(),
        }
    }

    /// Runs the plan's tokens, keeping every row's hidden state when `hidden` asks; an error
    /// names what failed (a panic in the model is caught and reported, so it fails this step's
    /// requests, not the engine).
    pub fn run(&mut self, plan: &Plan, hidden: bool) -> Result<StepLogits, String> {
        self.tokens.clear();
        self.positions.clear();
        self.seq_of.clear();
        self.logits_for.clear();
        self.state_slots.clear();
        self.state_slots
            .extend(plan.scheduled.iter().filter_map(|s| s.state_slot));
        self.chunked_until.clear();
        self.drafts.clear();
        if !self.state_slots.is_empty() {
            self.chunked_until
                .extend(plan.scheduled.iter().map(|s| s.prompt_len));
            self.drafts.extend(plan.scheduled.iter().map(|s| s.drafts));
        }
        let mut rows = Vec::with_capacity(plan.scheduled.len());
        let mut token_rows = Vec::with_capacity(plan.scheduled.len());
        for (k, s) in plan.scheduled.iter().enumerate() {
            let base = self.tokens.len();
            token_rows.push(base..base + s.tokens.len());
            self.tokens.extend_from_slice(&s.tokens);
            self.positions.extend(s.start..s.start + s.tokens.len());
            self.seq_of.extend(std::iter::repeat_n(k, s.tokens.len()));
            let first = self.logits_for.len();
            self.logits_for.extend(s.logits_rows().map(|r| base + r));
            rows.push(first..self.logits_for.len());
        }
        let vocab = self.model.config().vocab_size;
        if self.tokens.is_empty() {
            return Ok(StepLogits {
                logits: Vec::new(),
                rows,
                vocab,
                hidden: Vec::new(),
                tokens: token_rows,
            });
        }
        let tables: Vec<&[u32]> = plan
            .scheduled
            .iter()
            .map(|s| s.block_table.as_slice())
            .collect();
        let batch = Batch {
            tokens: &self.tokens,
            positions: &self.positions,
            seq_of: &self.seq_of,
            block_tables: &tables,
            logits_for: &self.logits_for,
            state_slots: &self.state_slots,
            chunked_until: &self.chunked_until,
            drafts: &self.drafts,
        };
        let (model, kv) = (&self.model, &mut self.kv);
        let mut states = Vec::new();
        let result = catch_unwind(AssertUnwindSafe(|| match hidden {
            false => model.forward(&batch, kv),
            true => {
                let mut keep = |a: &Named<'_>| {
                    if a.name == "result_norm" {
                        states = a.values.to_vec();
                    }
                };
                model.forward_traced(&batch, kv, &mut Trace::new(&mut keep))
            }
        }));
        match result {
            Ok(Ok(logits)) => Ok(StepLogits {
                logits,
                rows,
                vocab,
                hidden: states,
                tokens: token_rows,
            }),
            Ok(Err(e)) => Err(format!("the forward pass failed: {e}")),
            Err(_) => Err("the forward pass panicked".into()),
        }
    }

    /// After a step that verified drafts for the request in state slot `slot`: its recurrent
    /// state back to the end of the first `accepted` drafts (models with linear attention;
    /// nothing for others). A panic is reported as for the forward pass.
    pub fn rollback_drafts(&mut self, slot: usize, accepted: usize) -> Result<(), String> {
        let (model, kv) = (&self.model, &mut self.kv);
        catch_unwind(AssertUnwindSafe(|| {
            model.rollback_drafts(kv, slot, accepted)
        }))
        .map_err(|_| "rolling back rejected drafts panicked".to_string())
    }
}

//! A flat batch: the tokens of one or more sequences, computed in one forward pass.
//!
//! Token `t` belongs to sequence `seq_of[t]` at position `positions[t]`; its K/V is written to
//! the slot `block_table[pos / block_size] * block_size + pos % block_size` of its sequence's
//! block table, and it attends to the positions `0..=pos` (or its sliding window) of that
//! sequence. All tokens' K/V are written before any token attends, so a sequence's tokens
//! may come in any number per batch (a prefill chunk, one decode token, or several).

/// One step's work for the model.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [usize],
    /// For each token, the index of its sequence in `block_tables`.
    pub seq_of: &'a [usize],
    /// For each sequence, the KV cache blocks holding its positions in order.
    pub block_tables: &'a [&'a [u32]],
    /// The token rows whose logits are returned, in this order.
    pub logits_for: &'a [usize],
    /// For each sequence, its recurrent state slot (models with linear-attention layers; empty
    /// for the others). A sequence whose first token here is at position 0 starts a new state
    /// in it, any other continues the state it holds.
    pub state_slots: &'a [usize],
    /// For each sequence (or empty: none), the position before which its linear-attention
    /// layers use the chunked form: the positions below it in windows of
    /// [`supernode_kernels::ops::DELTA_CHUNK`] aligned to multiples of it (each window's
    /// tokens in this batch at once), later ones token by token. The engine gives the prompt's
    /// length, so that a prompt is prefilled in chunks while generated tokens, decoded one at
    /// a time, are recomputed the same way after a preemption.
    pub chunked_until: &'a [usize],
    /// For each sequence (or empty: none), how many of its last tokens here are speculative
    /// drafts that a verification may reject. Its linear-attention layers then keep what
    /// [`crate::Model::rollback_drafts`] needs to put their state back to the end of the
    /// accepted ones (attention layers need nothing: rejected slots are simply not attended).
    pub drafts: &'a [usize],
}

impl<'a> Batch<'a> {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The KV slot of token `t`.
    pub fn slot(&self, t: usize, block_size: usize) -> usize {
        let pos = self.positions[t];
        self.block_tables[self.seq_of[t]][pos / block_size] as usize * block_size + pos % block_size
    }
}

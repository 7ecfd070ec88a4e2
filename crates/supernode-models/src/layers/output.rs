//! The output head: final norm, projection to the vocabulary and optional logit soft-capping,
//! on the batch rows whose logits are wanted.

use supernode_kernels::ops::softcap;
use supernode_kernels::scratch::zeroed;

use super::{Linear, RmsNorm};

pub struct OutputHead {
    /// `[hidden]`
    pub norm: RmsNorm,
    /// `[hidden, vocab]`: the output matrix, or the embedding when tied.
    pub head: Linear,
    /// Final logit soft-capping (Gemma): `cap * tanh(logit / cap)`.
    pub softcap: Option<f32>,
}

impl OutputHead {
    /// Logits (`rows.len() × vocab`) of the rows `rows` of the hidden states `x`.
    pub fn forward(&self, x: &[f32], rows: &[usize]) -> Vec<f32> {
        let h = self.norm.w.len();
        let mut normed = zeroed(rows.len() * h);
        for (&r, out) in rows.iter().zip(normed.chunks_exact_mut(h)) {
            out.copy_from_slice(&x[r * h..(r + 1) * h]);
            self.norm.forward_inplace(out);
        }
        let mut logits = vec![0.0; rows.len() * self.head.rows()];
        self.head.forward(&normed, rows.len(), &mut logits);
        if let Some(cap) = self.softcap {
            logits.iter_mut().for_each(|l| *l = softcap(*l, cap));
        }
        logits
    }
}

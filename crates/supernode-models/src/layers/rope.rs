//! Rotary position embeddings: frequencies from a [`RopeConfig`], tables per batch.

use supernode_kernels::ops::{rope_apply, rope_cos_sin, RopeStyle};
use supernode_kernels::scratch::{zeroed, Scratch};

use crate::config::RopeConfig;

/// A rope variant with its precomputed frequencies.
pub struct Rope {
    inv_freq: Vec<f64>,
    style: RopeStyle,
    mscale: f32,
}

/// Cosines and sines for each token of a batch.
pub struct RopeTable {
    cos: Scratch,
    sin: Scratch,
    pairs: usize,
    style: RopeStyle,
}

impl Rope {
    pub fn new(cfg: &RopeConfig) -> Rope {
        Rope {
            inv_freq: cfg.inv_freq(),
            style: cfg.style,
            mscale: cfg.attn_factor() as f32,
        }
    }

    /// The table for a batch's positions.
    pub fn table(&self, positions: &[usize]) -> RopeTable {
        let pairs = self.inv_freq.len();
        let mut cos = zeroed(positions.len() * pairs);
        let mut sin = zeroed(positions.len() * pairs);
        for ((&p, c), s) in positions
            .iter()
            .zip(cos.chunks_exact_mut(pairs))
            .zip(sin.chunks_exact_mut(pairs))
        {
            rope_cos_sin(p, &self.inv_freq, self.mscale, c, s);
        }
        RopeTable {
            cos,
            sin,
            pairs,
            style: self.style,
        }
    }
}

impl RopeTable {
    /// Rotates all heads (of `head_dim`) in `x`, the row of batch token `t`.
    pub fn apply(&self, t: usize, x: &mut [f32], head_dim: usize) {
        self.apply_as(t, x, head_dim, self.style);
    }

    /// [`RopeTable::apply`] with the dims paired as `style` says, whatever the rope's own
    /// (DeepSeek-V3.2's indexer pairs halves where its MLA pairs neighbours).
    pub fn apply_as(&self, t: usize, x: &mut [f32], head_dim: usize, style: RopeStyle) {
        let r = t * self.pairs..(t + 1) * self.pairs;
        rope_apply(x, head_dim, style, &self.cos[r.clone()], &self.sin[r]);
    }

    /// The inverse rotation of [`RopeTable::apply_as`] (by the negated angles): DeepSeek-V4
    /// takes the rope back out of its attention output, whose values are roped keys.
    pub fn apply_inverse_as(&self, t: usize, x: &mut [f32], head_dim: usize, style: RopeStyle) {
        let r = t * self.pairs..(t + 1) * self.pairs;
        let neg: Vec<f32> = self.sin[r.clone()].iter().map(|s| -s).collect();
        rope_apply(x, head_dim, style, &self.cos[r], &neg);
    }
}

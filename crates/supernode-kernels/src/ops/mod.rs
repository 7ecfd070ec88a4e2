//! Element-wise and row-wise kernels of the transformer block: RMSNorm, rotary embeddings,
//! activations, and causal attention of one query token over a paged KV cache.
//!
//! Every kernel computes one token's row on its own, in an order that depends only on the row
//! length: results are bit-identical whatever else is in the batch (batch invariance).
//!
//! - [`activation`]: SiLU, GELU and the gated unit;
//! - [`attention`]: the paged KV cache's view and the attention kernels;
//! - [`delta_rule`]: Gated DeltaNet's causal convolution and gated delta rule (linear attention);
//! - here: RMSNorm, rotary embeddings, soft-capping and f16 rounding.

pub mod activation;
pub mod attention;
pub mod delta_rule;
#[cfg(test)]
mod tests;

pub use activation::{gelu_f16_table, gelu_tanh, glu_inplace, silu, silu_inplace, Activation};
pub use attention::{
    attention_group, attention_group_at, attention_groups_parallel, attention_head, index_scores,
    top_k_positions, AttnShape, GroupSpan, KvRows, KvView,
};
pub use delta_rule::{
    causal_conv1d_silu, gated_delta_chunk, gated_delta_step, l2_norm_inplace, DELTA_CHUNK,
};

use crate::simd::scale_round;

/// `out = x / rms(x) * (w + w_offset)`; the mean of squares is accumulated in f64.
///
/// `w_offset` is 0 for Llama-style norms and 1 for Gemma's `(1 + w)` norms.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, w_offset: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    debug_assert_eq!(x.len(), out.len());
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + f64::from(eps)).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * (g + w_offset);
    }
}

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32, w_offset: f32) {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + f64::from(eps)).sqrt()) as f32;
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * (g + w_offset);
    }
}

/// LayerNorm in place: `x = (x - mean) / sqrt(var + eps) * w + b`, the mean and the (biased)
/// variance accumulated in f64 (DeepSeek-V3.2's indexer keys).
pub fn layer_norm_inplace(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    debug_assert_eq!(x.len(), b.len());
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let rstd = 1.0 / (var + f64::from(eps)).sqrt();
    for ((v, &g), &c) in x.iter_mut().zip(w).zip(b) {
        *v = ((f64::from(*v) - mean) * rstd) as f32 * g + c;
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: ggml's "normal" mode, used by GGUF llama files (whose
    /// converter permuted the Q/K rows to match) and by DeepSeek's interleaved rope.
    Interleaved,
    /// Halves `(i, i + d/2)`: HF transformers' `rotate_half`, ggml's "neox" mode.
    Halves,
}

/// Cosines and sines of one position's rotation angles, one per dimension pair.
///
/// `inv_freq[i]` is the angular frequency of pair `i`; angles are computed in f64.
/// `mscale` multiplies both (YaRN's attention factor; 1 otherwise).
pub fn rope_cos_sin(pos: usize, inv_freq: &[f64], mscale: f32, cos: &mut [f32], sin: &mut [f32]) {
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let (sn, cs) = (pos as f64 * f).sin_cos();
        *c = cs as f32 * mscale;
        *s = sn as f32 * mscale;
    }
}

/// Rotates the first `2 * cos.len()` dimensions of each of the `x.len() / head_dim` heads in
/// `x`; the remaining dimensions of a head (partial rotary) are left as they are.
pub fn rope_apply(x: &mut [f32], head_dim: usize, style: RopeStyle, cos: &[f32], sin: &[f32]) {
    let pairs = cos.len();
    debug_assert!(2 * pairs <= head_dim);
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..pairs {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + pairs),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// Soft-capping, `cap * tanh(x / cap)`: Gemma's attention scores (Gemma 2) and final logits.
#[inline]
pub fn softcap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

/// `x` rounded to the nearest f16 value.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// [`round_f16`] of every value of `x`, in place: vectorised, the same bits.
pub fn round_slice_f16(x: &mut [f32]) {
    // `x * 1` is `x`, and the rounding is `round_f16`'s (see `scale_round`).
    scale_round(x, 1.0, true);
}

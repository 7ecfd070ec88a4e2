//! The dispatched softmax steps of attention: scale and max, `exp` and its sum, normalise and
//! (optionally) round to f16.
//!
//! Invariant: every path gives the bits of the portable twins in [`crate::cpu::scalar`]: the
//! exponential is [`crate::simd::exp_f32`] lane by lane, and the f64 sum takes the fixed lanes and
//! tree of [`crate::simd::order::fold_sum_lanes`].

use crate::cpu::kernels;

/// `s[i] *= scale` for every `i`; returns the largest result (`-inf` for an empty `s`).
pub fn scale_max(s: &mut [f32], scale: f32) -> f32 {
    // SAFETY: the table is this machine's.
    unsafe { (kernels().scale_max)(s, scale) }
}

/// `s[i] = exp_f32(s[i] - max)` for every `i`; returns their sum in f64, taken in a fixed
/// shape: position `p` is added to lane `p % 16` of 16 f64 accumulators, in position order, and
/// the lanes are folded in the tree `l += l + 8`, `+ 4`, `+ 2`, `+ 1`. The same bits on every
/// path.
pub fn exp_sum(s: &mut [f32], max: f32) -> f64 {
    // SAFETY: the table is this machine's.
    unsafe { (kernels().exp_sum)(s, max) }
}

/// `s[i] *= inv` for every `i`, then rounded to the nearest f16 (ties to even, exactly
/// `half::f16::from_f32`) if `round`.
pub fn scale_round(s: &mut [f32], inv: f32, round: bool) {
    // SAFETY: the table is this machine's.
    unsafe { (kernels().scale_round)(s, inv, round) }
}

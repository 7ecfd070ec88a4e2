//! The kernels of Gated DeltaNet linear attention (Qwen3.5, Qwen3-Next): the short causal
//! depthwise convolution with its carried state, and the gated delta rule recurrence.
//!
//! One head's state `S` is `dv × dk` (row `j` holds what value channel `j` remembers of every
//! key channel). Per token, with the key `k` and query `q` L2-normalised (the query also scaled
//! by `1/sqrt(dk)`), the decay `g = exp(gate)` and the write strength `beta`:
//!
//! ```text
//! S    = g * S
//! d[j] = beta * (v[j] - S[j] · k)          (the delta: what the state gets wrong about v)
//! S[j] = S[j] + d[j] * k
//! o[j] = S[j] · q
//! ```
//!
//! Each row of `S` evolves on its own, so a row is decayed, read, written and read again in one
//! pass while it sits in cache. Dot products use [`dot_f32`]'s fixed order and the rest is
//! element-wise, so a head's outputs and state depend only on its own inputs: the same bits
//! whatever else is in the batch and however the tokens are split into steps.

use crate::simd::dot_f32;

/// One token of the gated delta rule for one head: updates `state` (`v.len()` rows of
/// `k.len()`) in place and writes the head's output (`v.len()` values) to `out`.
pub fn gated_delta_step(
    state: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    decay: f32,
    beta: f32,
    out: &mut [f32],
) {
    let dk = k.len();
    debug_assert_eq!(q.len(), dk);
    debug_assert_eq!(state.len(), v.len() * dk);
    debug_assert_eq!(out.len(), v.len());
    for ((row, &vj), o) in state.chunks_exact_mut(dk).zip(v).zip(out.iter_mut()) {
        row.iter_mut().for_each(|s| *s *= decay);
        let d = beta * (vj - dot_f32(row, k));
        row.iter_mut().zip(k).for_each(|(s, &kk)| *s += d * kk);
        *o = dot_f32(row, q);
    }
}

/// The causal depthwise convolution of `x` (`n` rows of `channels`), each output channel the
/// sum over the `taps` inputs ending at its own token, then SiLU, into `out`.
///
/// `w` is tap-major (`taps` rows of `channels`; tap `taps - 1` multiplies the current token).
/// `state` holds the `taps - 1` rows before `x` (zeros at the start of a sequence) and is left
/// holding the last `taps - 1` rows seen, so the next call continues where this one ended.
/// Each output sums its taps in order from the oldest, whatever `n` is: splitting a sequence
/// into calls gives the same bits.
pub fn causal_conv1d_silu(
    x: &[f32],
    state: &mut [f32],
    w: &[f32],
    channels: usize,
    out: &mut [f32],
) {
    let taps = w.len() / channels;
    debug_assert_eq!(state.len(), (taps - 1) * channels);
    debug_assert_eq!(x.len(), out.len());
    let n = x.len() / channels;
    // Input row `i` of the sequence seen so far, `i` counted from the first row of the state.
    let input = |i: usize| -> &[f32] {
        if i < taps - 1 {
            &state[i * channels..(i + 1) * channels]
        } else {
            &x[(i - (taps - 1)) * channels..(i - (taps - 2)) * channels]
        }
    };
    for (t, o) in out.chunks_exact_mut(channels).enumerate() {
        o.fill(0.0);
        for (tap, wt) in w.chunks_exact(channels).enumerate() {
            let xi = input(t + tap);
            o.iter_mut()
                .zip(wt)
                .zip(xi)
                .for_each(|((o, &w), &x)| *o += w * x);
        }
        o.iter_mut().for_each(|v| *v = super::silu(*v));
    }
    // The last `taps - 1` inputs become the state.
    let keep = taps - 1;
    let mut last = vec![0.0; keep * channels];
    for (r, row) in last.chunks_exact_mut(channels).enumerate() {
        row.copy_from_slice(input(n + r));
    }
    state.copy_from_slice(&last);
}

/// `x / sqrt(sum(x²) + eps)` in place (transformers' `l2norm` of Gated DeltaNet's queries and
/// keys); the sum of squares is accumulated in f64.
pub fn l2_norm_inplace(x: &mut [f32], eps: f32) {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let scale = (1.0 / (ss + f64::from(eps)).sqrt()) as f32;
    x.iter_mut().for_each(|v| *v *= scale);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The step against the definition with the state as a `dk × dv` matrix (transformers'
    /// `torch_recurrent_gated_delta_rule`).
    #[test]
    fn step_matches_the_matrix_form() {
        let (dk, dv) = (5, 3);
        let val = |i: usize| ((i * 37 % 11) as f32 - 5.0) / 7.0;
        let q: Vec<f32> = (0..dk).map(|i| val(i + 1)).collect();
        let k: Vec<f32> = (0..dk).map(|i| val(i + 9)).collect();
        let v: Vec<f32> = (0..dv).map(|i| val(i + 20)).collect();
        let s0: Vec<f32> = (0..dk * dv).map(|i| val(i + 3) * 0.3).collect();
        let (g, beta) = (0.8f32, 0.6f32);
        // Reference: m[a][j] = S[j][a].
        let mut m = vec![vec![0.0f64; dv]; dk];
        for j in 0..dv {
            for a in 0..dk {
                m[a][j] = f64::from(s0[j * dk + a]) * f64::from(g);
            }
        }
        let mut want = vec![0.0f64; dv];
        for j in 0..dv {
            let kv: f64 = (0..dk).map(|a| m[a][j] * f64::from(k[a])).sum();
            let d = (f64::from(v[j]) - kv) * f64::from(beta);
            for a in 0..dk {
                m[a][j] += f64::from(k[a]) * d;
            }
            want[j] = (0..dk).map(|a| m[a][j] * f64::from(q[a])).sum();
        }
        let mut s = s0.clone();
        let mut out = vec![0.0; dv];
        gated_delta_step(&mut s, &q, &k, &v, g, beta, &mut out);
        for j in 0..dv {
            assert!((f64::from(out[j]) - want[j]).abs() < 1e-5, "{j}");
            for a in 0..dk {
                assert!((f64::from(s[j * dk + a]) - m[a][j]).abs() < 1e-5);
            }
        }
    }

    /// The convolution in one call equals it split into calls of any size, bit for bit, and
    /// equals the definition over zero-padded history.
    #[test]
    fn conv_is_causal_and_split_invariant() {
        let (c, taps, n) = (3, 3, 7);
        let x: Vec<f32> = (0..n * c)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0)
            .collect();
        let w: Vec<f32> = (0..taps * c)
            .map(|i| ((i * 5 % 9) as f32 - 4.0) / 5.0)
            .collect();
        let mut state = vec![0.0; (taps - 1) * c];
        let mut whole = vec![0.0; n * c];
        causal_conv1d_silu(&x, &mut state, &w, c, &mut whole);
        for t in 0..n {
            for ch in 0..c {
                let mut acc = 0.0f32;
                for tap in 0..taps {
                    let src = (t + tap) as isize - (taps as isize - 1);
                    if src >= 0 {
                        acc += w[tap * c + ch] * x[src as usize * c + ch];
                    }
                }
                assert!((whole[t * c + ch] - super::super::silu(acc)).abs() < 1e-6);
            }
        }
        for split in [1, 2, 5] {
            let mut st = vec![0.0; (taps - 1) * c];
            let mut parts = vec![0.0; n * c];
            for (xs, os) in x.chunks(split * c).zip(parts.chunks_mut(split * c)) {
                causal_conv1d_silu(xs, &mut st, &w, c, os);
            }
            assert_eq!(parts, whole, "split {split}");
            assert_eq!(st, state, "split {split}");
        }
    }
}

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

use crate::scratch::zeroed;
use crate::simd::{dot_f32, dot_f32_grid, weighted_rows_f32};

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

/// Tokens per chunk of the chunked form ([`gated_delta_chunk`]): prefill computes a prompt in
/// windows of this many positions, aligned to multiples of it.
pub const DELTA_CHUNK: usize = 64;

/// The gated delta rule over `L` consecutive tokens of one head at once (the chunked, "WY"
/// form of `chunk_gated_delta_rule`): the same outputs and final state as `L` calls of
/// [`gated_delta_step`], within float rounding, as small matrix products instead of a token
/// loop. `q`, `k`: `L` rows of `dk` (queries already scaled); `v`: `L` rows of `dv`;
/// `log_decay[i] = ln g_i`; `state`: `dv × dk`, updated in place; `out`: `L` rows of `dv`.
///
/// With `G_i = Σ_{j≤i} ln g_j`, the state after token `i` is
/// `S_i = e^{G_i} S_0 + Σ_{j≤i} e^{G_i − G_j} u_j k_jᵀ`, where the written values `u` solve
/// the unit lower-triangular system `u_i + Σ_{j<i} β_i e^{G_i − G_j} (k_i·k_j) u_j =
/// β_i (v_i − e^{G_i} S_0 k_i)`: with the system's inverse `T` (forward substitution on the
/// `L × L` matrix), `u = T β v − (T β e^G k) S_0ᵀ`. Then
/// `o_i = e^{G_i} S_0 q_i + Σ_{j≤i} e^{G_i − G_j} (q_i·k_j) u_j` and the state is `S_{L−1}`.
/// Every exponent is of a non-positive number. The products are grids of fixed-order dots
/// ([`dot_f32_grid`], over `dk`) and weighted sums of rows ([`weighted_rows_f32`]), so the bits
/// depend only on the inputs: a given split of a sequence into chunks always gives the same
/// bits.
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_chunk(
    state: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    log_decay: &[f32],
    beta: &[f32],
    out: &mut [f32],
) {
    let l = log_decay.len();
    let dv = out.len() / l.max(1);
    let dk = state.len() / dv.max(1);
    assert!(
        l > 0 && q.len() == l * dk && k.len() == l * dk && v.len() == l * dv,
        "gated_delta_chunk: lengths differ"
    );
    assert_eq!(beta.len(), l, "gated_delta_chunk: lengths differ");
    // Cumulative log decays.
    let mut g = vec![0.0f32; l];
    let mut acc = 0.0f32;
    for (gi, &d) in g.iter_mut().zip(log_decay) {
        acc += d;
        *gi = acc;
    }
    // t = (I + A)^-1 with A_ij = β_i e^{G_i − G_j} (k_i·k_j) for j < i, row by row:
    // t_i = e_i − Σ_{j<i} A_ij t_j (row j of t is zero beyond column j).
    let mut kk = zeroed(l * l);
    dot_f32_grid(k, k, dk, &mut kk);
    let mut t = zeroed(l * l);
    for i in 0..l {
        let (done, rest) = t.split_at_mut(i * l);
        let ti = &mut rest[..l];
        ti[i] = 1.0;
        for j in 0..i {
            let c = beta[i] * (g[i] - g[j]).exp() * kk[i * l + j];
            ti[..=j]
                .iter_mut()
                .zip(&done[j * l..j * l + j + 1])
                .for_each(|(x, &y)| *x -= c * y);
        }
    }
    // x = t [β v | β e^G k]: the values to write before the state's share (u0) and the keys'
    // share of the state (w).
    let w = dv + dk;
    let mut rhs = zeroed(l * w);
    for i in 0..l {
        let (row, b, e) = (&mut rhs[i * w..(i + 1) * w], beta[i], g[i].exp());
        row[..dv]
            .iter_mut()
            .zip(&v[i * dv..(i + 1) * dv])
            .for_each(|(x, &v)| *x = b * v);
        row[dv..]
            .iter_mut()
            .zip(&k[i * dk..(i + 1) * dk])
            .for_each(|(x, &k)| *x = b * e * k);
    }
    let bases: Vec<usize> = (0..l).map(|j| j * w).collect();
    let mut x = zeroed(l * w);
    weighted_rows_f32(&t, &rhs, &bases, w, &mut x);
    // Rows [w_0 .. w_{L-1}, e^{G_0} q_0 .. e^{G_{L-1}} q_{L-1}] against S_0's rows.
    let mut lhs = zeroed(2 * l * dk);
    for i in 0..l {
        lhs[i * dk..(i + 1) * dk].copy_from_slice(&x[i * w + dv..(i + 1) * w]);
        let e = g[i].exp();
        lhs[(l + i) * dk..(l + i + 1) * dk]
            .iter_mut()
            .zip(&q[i * dk..(i + 1) * dk])
            .for_each(|(o, &q)| *o = e * q);
    }
    // S_0ᵀ (dk × dv), so that products with it are sums of its rows.
    let mut st = zeroed(dk * dv);
    for (j, row) in state.chunks_exact(dk).enumerate() {
        for (a, &s) in row.iter().enumerate() {
            st[a * dv + j] = s;
        }
    }
    let st_bases: Vec<usize> = (0..dk).map(|a| a * dv).collect();
    let mut prod = zeroed(2 * l * dv);
    weighted_rows_f32(&lhs, &st, &st_bases, dv, &mut prod);
    // u = u0 − w S_0ᵀ.
    let mut u = zeroed(l * dv);
    for i in 0..l {
        u[i * dv..(i + 1) * dv]
            .iter_mut()
            .zip(&x[i * w..i * w + dv])
            .zip(&prod[i * dv..(i + 1) * dv])
            .for_each(|((u, &x), &p)| *u = x - p);
    }
    // o_i = e^{G_i} S_0 q_i + Σ_{j≤i} e^{G_i − G_j} (q_i·k_j) u_j.
    let mut m = zeroed(l * l);
    dot_f32_grid(q, k, dk, &mut m);
    for i in 0..l {
        for j in 0..l {
            let mij = &mut m[i * l + j];
            *mij = if j <= i {
                *mij * (g[i] - g[j]).exp()
            } else {
                0.0
            };
        }
    }
    let u_bases: Vec<usize> = (0..l).map(|j| j * dv).collect();
    weighted_rows_f32(&m, &u, &u_bases, dv, out);
    out.iter_mut()
        .zip(&prod[l * dv..])
        .for_each(|(o, &p)| *o += p);
    // S = e^{G_{L−1}} S_0 + Σ_j e^{G_{L−1} − G_j} u_j k_jᵀ: row r of S gains Σ_j c_rj k_j.
    let last = g[l - 1];
    let mut c = zeroed(dv * l);
    for j in 0..l {
        let e = (last - g[j]).exp();
        for r in 0..dv {
            c[r * l + j] = e * u[j * dv + r];
        }
    }
    let k_bases: Vec<usize> = (0..l).map(|j| j * dk).collect();
    let mut gain = zeroed(dv * dk);
    weighted_rows_f32(&c, k, &k_bases, dk, &mut gain);
    let e = last.exp();
    state
        .iter_mut()
        .zip(gain.iter())
        .for_each(|(s, &d)| *s = e * *s + d);
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
    }
    super::silu_inplace(out);
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

    /// The chunked form gives the token loop's outputs and state, from a non-zero state, for
    /// chunks of one token, a few, and a whole window; strong decays included.
    #[test]
    fn chunk_matches_the_token_loop() {
        let (dk, dv) = (16, 12);
        let mut seed = 7u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 2001) as f32 / 1000.0 - 1.0
        };
        for l in [1, 5, 37, DELTA_CHUNK] {
            let norm = |mut x: Vec<f32>| {
                for h in x.chunks_exact_mut(dk) {
                    l2_norm_inplace(h, 1e-6);
                }
                x
            };
            let q: Vec<f32> = norm((0..l * dk).map(|_| rnd()).collect())
                .iter()
                .map(|x| x / (dk as f32).sqrt())
                .collect();
            let k = norm((0..l * dk).map(|_| rnd()).collect());
            let v: Vec<f32> = (0..l * dv).map(|_| rnd()).collect();
            let log_decay: Vec<f32> = (0..l)
                .map(|i| -2.0 * (rnd() + 1.0) - (i % 3) as f32)
                .collect();
            let beta: Vec<f32> = (0..l).map(|_| 0.5 + 0.5 * rnd()).collect();
            let s0: Vec<f32> = (0..dv * dk).map(|_| rnd()).collect();
            let mut want_s = s0.clone();
            let mut want = vec![0.0; l * dv];
            for i in 0..l {
                gated_delta_step(
                    &mut want_s,
                    &q[i * dk..(i + 1) * dk],
                    &k[i * dk..(i + 1) * dk],
                    &v[i * dv..(i + 1) * dv],
                    log_decay[i].exp(),
                    beta[i],
                    &mut want[i * dv..(i + 1) * dv],
                );
            }
            let mut s = s0.clone();
            let mut got = vec![0.0; l * dv];
            gated_delta_chunk(&mut s, &q, &k, &v, &log_decay, &beta, &mut got);
            let diff = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max)
            };
            assert!(
                diff(&got, &want) < 1e-5,
                "L={l}: outputs {}",
                diff(&got, &want)
            );
            assert!(
                diff(&s, &want_s) < 1e-5,
                "L={l}: state {}",
                diff(&s, &want_s)
            );
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

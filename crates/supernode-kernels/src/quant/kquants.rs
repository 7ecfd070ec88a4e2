//! The k-quant super-block formats Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256 elements per block, split
//! into sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K) elements with their own small
//! integer scales, under one or two f16 super-scales.
//!
//! Byte layouts, in order (`d`, `dmin` are f16):
//!
//! | type | bytes | layout                                         |
//! |------|-------|------------------------------------------------|
//! | Q2_K | 84    | `scales[16], qs[64], d, dmin`                  |
//! | Q3_K | 110   | `hmask[32], qs[64], scales[12], d`             |
//! | Q4_K | 144   | `d, dmin, scales[12], qs[128]`                 |
//! | Q5_K | 176   | `d, dmin, scales[12], qh[32], qs[128]`         |
//! | Q6_K | 210   | `ql[128], qh[64], scales[16] (i8), d`          |
//!
//! Element order, for element `e` of a block:
//!
//! - Q2_K / Q3_K: with `n = e / 128`, `j = e % 128 / 32`, `l = e % 32`, the two low bits are bits
//!   `2j..2j+2` of `qs[32n + l]`; Q3_K's third bit is bit `4n + j` of `hmask[l]` (clear means
//!   "minus 4"). Sub-block (scale) `e / 16`. Q2_K's scale byte holds the scale in its low nibble
//!   and the min in its high nibble; Q3_K's sixteen 6-bit scales (offset by 32) keep their low
//!   nibbles in bytes 0..8 (scales 0..8 low nibble, 8..16 high nibble) and their top two bits in
//!   bytes 8..12 (scale `j` at bits `2 * (j / 4)` of byte `8 + j % 4`).
//! - Q4_K / Q5_K: with `c = e / 64`, elements `64c .. 64c+32` are the low nibbles of
//!   `qs[32c .. 32c+32]` and `64c+32 .. 64c+64` their high nibbles; sub-block `e / 32`, whose 6-bit
//!   scale and min come from [`scale_min_k4`]; Q5_K's fifth bit is bit `2c` (low nibbles) or
//!   `2c + 1` (high nibbles) of `qh[e % 32]`.
//! - Q6_K: with `n = e / 128`, `k = e % 128 / 32`, `l = e % 32`, the four low bits are the low
//!   (k = 0, 1) or high (k = 2, 3) nibble of `ql[64n + l + 32 * (k % 2)]`, the top two bits are
//!   bits `2k..2k+2` of `qh[32n + l]`, minus 32; sub-block (i8 scale) `e / 16`.
//!
//! Values are `d * sc * q - dmin * m` (Q2_K, Q4_K, Q5_K: `(d * sc)` and `(dmin * m)` first),
//! `(d * (sc - 32)) * q` (Q3_K) and `(d * sc) * q` (Q6_K), rounded at each step as written.

use super::{f16_at, nearest_int, put_f16, scale_min_k4};
use crate::dtype::QK_K;

/// Below this, a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

pub(super) fn dequantize_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for n in 0..2 {
        for j in 0..4 {
            for h in 0..2 {
                let sc = scales[8 * n + 2 * j + h];
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    let q = (qs[32 * n + 16 * h + l] >> (2 * j)) & 3;
                    y[128 * n + 32 * j + 16 * h + l] = dl * q as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K's sixteen scales, unpacked from 12 bytes and offset back to signed (-32..32).
#[inline(always)]
pub(crate) fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | high << 4) as i32 - 32
    })
}

pub(super) fn dequantize_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    for n in 0..2 {
        for j in 0..4 {
            for h in 0..2 {
                let dl = d * scales[8 * n + 2 * j + h] as f32;
                for l in 0..16 {
                    let ll = 16 * h + l;
                    let low = ((qs[32 * n + ll] >> (2 * j)) & 3) as i32;
                    let high = (hmask[ll] >> (4 * n + j)) & 1;
                    let q = if high == 1 { low } else { low - 4 };
                    y[128 * n + 32 * j + ll] = dl * q as f32;
                }
            }
        }
    }
}

pub(super) fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            let q = qs[32 * c + l];
            y[64 * c + l] = d1 * (q & 0xF) as f32 - m1;
            y[64 * c + 32 + l] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

pub(super) fn dequantize_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            let q = qs[32 * c + l];
            let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            y[64 * c + l] = d1 * ((q & 0xF) | h1) as f32 - m1;
            y[64 * c + 32 + l] = d2 * ((q >> 4) | h2) as f32 - m2;
        }
    }
}

pub(super) fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let d = f16_at(b, 208);
    let ds: [f32; 16] = std::array::from_fn(|i| d * b[192 + i] as i8 as f32);
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
        for l in 0..32 {
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, q) in q.into_iter().enumerate() {
                let e = 128 * n + 32 * k + l;
                y[e] = ds[e / 16] * (q as i32 - 32) as f32;
            }
        }
    }
}

/// Pack 2-bit values: `qs[32n + l]` holds elements `128n + l + 32j` at bits `2j` (Q2_K, Q3_K).
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for n in 0..2 {
        for i in 0..32 {
            let e = 128 * n + i;
            qs[32 * n + i] = l[e] | (l[e + 32] << 2) | (l[e + 64] << 4) | (l[e + 96] << 6);
        }
    }
}

/// The element of largest magnitude (the first one on ties), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    max
}

/// Weighted least-squares fit of `x ≈ scale * l - min` with `l` in `0..=nmax` and `min >= 0`,
/// searching `nstep + 1` candidate scales around `nmax / (max - min)` (ggml's
/// `make_qkx2_quants`). Writes `l` and returns `(scale, min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let error = |scale: f32, min: f32, l: &[u8]| -> f32 {
        (0..n)
            .map(|i| {
                let diff = scale * l[i] as f32 + min - x[i];
                weights[i] * if use_mad { diff.abs() } else { diff * diff }
            })
            .fold(0.0, |a, b| a + b)
    };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    for i in 0..n {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, nmax) as u8;
    }
    let mut best_error = error(scale, min, l);
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let (w, lf) = (weights[i], li as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, &laux);
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Symmetric 3-bit fit of 16 values, weighted by `x²`, with a few rounds of coordinate descent
/// on the levels (ggml's `make_q3_quants` with `do_rmse`). Writes `l` in `0..2*nmax`.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &xi) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        *li = q as i8;
        let w = xi * xi;
        sumlx += w * xi * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (li, &xi) in l.iter_mut().zip(x) {
            let w = xi * xi;
            let old = *li as f32;
            let mut slx = sumlx - w * xi * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new_l = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *li as i32 {
                    slx += w * xi * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for li in l.iter_mut() {
        *li += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Symmetric fit of 16 values in `-nmax..nmax`, weighted by `x²`, trying 19 scales around
/// `nmax / max` (ggml's `make_qx_quants` with `rmse_type = 1`). Writes `l` in `0..2*nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [u8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let fit = |iscale: f32| -> (f32, f32) {
        x.iter().fold((0f32, 0f32), |(slx, sl2), &xi| {
            let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1) as f32;
            let w = xi * xi;
            (slx + w * xi * q, sl2 + w * q * q)
        })
    };
    let set_levels = |iscale: f32, l: &mut [u8]| {
        for (li, &xi) in l.iter_mut().zip(x) {
            *li = (nmax + nearest_int(iscale * xi).clamp(-nmax, nmax - 1)) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    set_levels(iscale, l);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            set_levels(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

pub(super) fn quantize_q2_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        let ls = &mut l[16 * j..16 * j + 16];
        (scales[j], mins[j]) = make_qkx2_quants(3, xs, &weights, ls, -0.5, 0.1, 15, true);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let (sc, rest) = b.split_at_mut(16);
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (s, v) in sc.iter_mut().zip(scales) {
            *s = nearest_int(iscale * v).clamp(0, 15) as u8;
        }
        put_f16(rest, 64, max_scale / 15.0);
    } else {
        sc.fill(0);
        put_f16(rest, 64, 0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (s, v) in sc.iter_mut().zip(mins) {
            *s |= (nearest_int(iscale * v).clamp(0, 15) as u8) << 4;
        }
        put_f16(rest, 66, max_min / 15.0);
    } else {
        put_f16(rest, 66, 0.0);
    }
    let (d, dmin) = (f16_at(rest, 64), f16_at(rest, 66));
    for (j, &s) in sc.iter().enumerate() {
        let dl = d * (s & 0xF) as f32;
        if dl == 0.0 {
            continue;
        }
        let ml = dmin * (s >> 4) as f32;
        for i in 16 * j..16 * j + 16 {
            l[i] = nearest_int((x[i] + ml) / dl).clamp(0, 3) as u8;
        }
    }
    pack_2bit(&l, &mut rest[0..64]);
}

pub(super) fn quantize_q3_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > max_scale.abs() {
            max_scale = scales[j];
        }
    }
    let packed = &mut b[96..108];
    packed.fill(0);
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let q = (nearest_int(iscale * s).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                packed[j] = q & 0xF;
            } else {
                packed[j - 8] |= (q & 0xF) << 4;
            }
            packed[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
        }
        1.0 / iscale
    } else {
        0.0
    };
    put_f16(b, 108, d);
    let d = f16_at(b, 108);
    for (j, sc) in q3_k_scales(&b[96..108]).into_iter().enumerate() {
        let dl = d * sc as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / dl).clamp(-4, 3) + 4) as i8;
        }
    }
    let mut low = [0u8; QK_K];
    let hmask = &mut b[0..32];
    hmask.fill(0);
    for (e, (&li, lo)) in l.iter().zip(low.iter_mut()).enumerate() {
        let li = li as u8;
        if li > 3 {
            hmask[e % 32] |= 1 << (e / 32);
            *lo = li - 4;
        } else {
            *lo = li;
        }
    }
    pack_2bit(&low, &mut b[32..96]);
}

/// Quantise sub-blocks of 32 to `nmax` levels with 6-bit scales and mins (Q4_K, Q5_K), writing
/// `d`, `dmin` and the 12 scale bytes of `b`; returns the levels.
fn quantize_k4_scales(x: &[f32], b: &mut [u8], nmax: i32, rmin: f32, nstep: i32) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let av_x = (xs.iter().map(|v| v * v).fold(0.0, |a, b| a + b) / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        let ls = &mut l[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, ls, rmin, 0.1, nstep, false);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut b[4..16];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        let lm = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(b, 0, max_scale / 63.0);
    put_f16(b, 2, max_min / 63.0);
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        let dl = d * sc as f32;
        if dl == 0.0 {
            continue;
        }
        let ml = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + ml) / dl).clamp(0, nmax) as u8;
        }
    }
    l
}

pub(super) fn quantize_q4_k(x: &[f32], b: &mut [u8]) {
    let l = quantize_k4_scales(x, b, 15, -1.0, 20);
    for c in 0..4 {
        for i in 0..32 {
            b[16 + 32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

pub(super) fn quantize_q5_k(x: &[f32], b: &mut [u8]) {
    let l = quantize_k4_scales(x, b, 31, -0.5, 15);
    let (qh, qs) = b[16..176].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        for i in 0..32 {
            let (l1, l2) = (l[64 * c + i], l[64 * c + 32 + i]);
            qh[i] |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1));
            qs[32 * c + i] = (l1 & 0xF) | ((l2 & 0xF) << 4);
        }
    }
}

pub(super) fn quantize_q6_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    for j in 0..16 {
        scales[j] = make_qx_quants(32, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > max_scale.abs() {
            max_scale = scales[j];
        }
    }
    if max_scale.abs() < GROUP_MAX_EPS {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(b, 208, 1.0 / iscale);
    for (s, v) in b[192..208].iter_mut().zip(scales) {
        *s = nearest_int(iscale * v).clamp(-128, 127) as i8 as u8;
    }
    let d = f16_at(b, 208);
    for j in 0..16 {
        let dl = d * b[192 + j] as i8 as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / dl).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, qh) = b[0..192].split_at_mut(128);
    for n in 0..2 {
        for i in 0..32 {
            let e = 128 * n + i;
            let (q1, q2, q3, q4) = (l[e], l[e + 32], l[e + 64], l[e + 96]);
            ql[64 * n + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[64 * n + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[32 * n + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::dtype::{DType, QK_K};
    use crate::quant::dequantize_row;

    /// A block of `dtype` whose bytes are `(37 i + 11) mod 256`, with the f16 super-scales at
    /// the given offsets overwritten (so every scale, nibble and bit field is exercised).
    fn patterned(dtype: DType, scales: &[(usize, [u8; 2])]) -> Vec<f32> {
        let mut b: Vec<u8> = (0..dtype.block_bytes())
            .map(|i| (i * 37 + 11) as u8)
            .collect();
        for (off, v) in scales {
            b[*off..*off + 2].copy_from_slice(v);
        }
        let mut y = vec![0f32; QK_K];
        dequantize_row(dtype, &b, &mut y);
        y
    }

    const ONE: [u8; 2] = [0x00, 0x3C];
    const HALF: [u8; 2] = [0x00, 0x38];
    const SPOTS: [usize; 8] = [0, 17, 33, 70, 100, 130, 200, 255];

    /// Compare with values computed by a line-for-line transcription of ggml's
    /// `dequantize_row_*` (pointer-walking loops, Q3_K's kmask unpacking): eight elements, and
    /// a position-weighted checksum that pins all 256.
    fn check(dtype: DType, y: &[f32], spots: [f32; 8], weighted: f64, sum: f64) {
        for (i, want) in SPOTS.iter().zip(spots) {
            assert_eq!(y[*i], want, "{} element {i}", dtype.name());
        }
        let w: f64 = y
            .iter()
            .enumerate()
            .map(|(i, v)| *v as f64 * (i + 1) as f64)
            .sum();
        let s: f64 = y.iter().map(|v| *v as f64).sum();
        assert_eq!((w, s), (weighted, sum), "{}", dtype.name());
    }

    #[test]
    fn q2_k_layout_matches_ggml() {
        let y = patterned(DType::Q2K, &[(80, ONE), (82, HALF)]);
        let spots = [33.0, -1.5, -2.5, 40.5, 20.0, 1.5, 8.0, 4.5];
        check(DType::Q2K, &y, spots, 243130.0, 2059.0);
    }

    #[test]
    fn q3_k_layout_matches_ggml() {
        let y = patterned(DType::Q3K, &[(108, HALF)]);
        let spots = [40.5, 64.0, 22.0, 34.0, 0.0, -1.0, 12.5, 21.0];
        check(DType::Q3K, &y, spots, 88572.5, 479.0);
    }

    #[test]
    fn q4_k_layout_matches_ggml() {
        let y = patterned(DType::Q4K, &[(0, ONE), (2, HALF)]);
        let spots = [315.5, -25.5, 20.0, 338.5, 95.0, 189.0, 138.5, 48.5];
        check(DType::Q4K, &y, spots, 7572840.0, 54440.0);
    }

    #[test]
    fn q5_k_layout_matches_ggml() {
        let y = patterned(DType::Q5K, &[(0, ONE), (2, HALF)]);
        let spots = [811.5, -25.5, -4.0, 338.5, 235.0, 189.0, 138.5, 108.5];
        check(DType::Q5K, &y, spots, 16027448.0, 116216.0);
    }

    #[test]
    fn q6_k_layout_matches_ggml() {
        let y = patterned(DType::Q6K, &[(208, HALF)]);
        let spots = [-715.5, 256.0, -336.0, 665.0, 1261.5, 71.5, 544.5, -30.0];
        check(DType::Q6K, &y, spots, 392210.0, 2306.0);
    }

    #[test]
    fn q3_k_hmask_clear_bit_subtracts_four() {
        // All scales 33 (low nibbles 1, top bits 2; minus the offset 32: +1), d = 1, qs = 0:
        // values are 0 where the hmask bit is set and -4 elsewhere. Set bit 4n + j of hmask[l]
        // for element 128n + 32j + l only.
        let mut b = vec![0u8; DType::Q3K.block_bytes()];
        b[96..104].fill(0x11);
        b[104..108].fill(0b1010_1010);
        b[108..110].copy_from_slice(&ONE);
        let set = [0usize, 31, 32, 77, 128, 255];
        for e in set {
            let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
            b[l] |= 1 << (4 * n + j);
        }
        let mut y = vec![0f32; QK_K];
        dequantize_row(DType::Q3K, &b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let want = if set.contains(&e) { 0.0 } else { -4.0 };
            assert_eq!(*v, want, "element {e}");
        }
    }

    #[test]
    fn q4_k_chosen_six_bit_scales_and_mins() {
        // Sub-block j has scale sc[j] and min mn[j]; every nibble is 1, d = 1, dmin = 0.5.
        let sc = [1u8, 3, 5, 7, 17, 18, 63, 32];
        let mn = [2u8, 4, 6, 8, 33, 34, 0, 48];
        let mut b = vec![0u8; DType::Q4K.block_bytes()];
        b[0..2].copy_from_slice(&ONE);
        b[2..4].copy_from_slice(&HALF);
        b[4..16].copy_from_slice(&[65, 67, 197, 135, 130, 132, 6, 200, 0x11, 0x22, 0x0F, 0x00]);
        b[16..].fill(0x11);
        let mut y = vec![0f32; QK_K];
        dequantize_row(DType::Q4K, &b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let j = e / 32;
            assert_eq!(*v, sc[j] as f32 - 0.5 * mn[j] as f32, "element {e}");
        }
    }

    #[test]
    fn q5_k_high_bits_follow_the_nibble_half() {
        // qh[l] = 0b1000_0001: bit 0 (low nibbles of chunk 0) and bit 7 (high nibbles of chunk
        // 3). All scales 1, mins 0, d = 1, nibbles 0: elements 0..32 and 224..256 are 16.
        let mut b = vec![0u8; DType::Q5K.block_bytes()];
        b[0..2].copy_from_slice(&ONE);
        b[4..8].fill(1);
        b[12..16].fill(1);
        b[16..48].fill(0b1000_0001);
        let mut y = vec![0f32; QK_K];
        dequantize_row(DType::Q5K, &b, &mut y);
        for (e, v) in y.iter().enumerate() {
            let want = if !(32..224).contains(&e) { 16.0 } else { 0.0 };
            assert_eq!(*v, want, "element {e}");
        }
    }
}

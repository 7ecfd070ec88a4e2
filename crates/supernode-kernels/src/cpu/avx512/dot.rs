//! AVX-512 f32 dot products and attention row kernels: four `b` rows or two `a` rows against
//! four at a time, eight K rows per block with a shared fold, and weighted sums that widen each V
//! value once for four heads.
//!
//! Invariants: each dot is exactly [`crate::simd::dot_f32`]'s lanes, fused multiply-adds and
//! tree; the weighted sums multiply then add (never fused) in position order, the same bits as
//! every other path.

use std::arch::x86_64::*;

use half::f16;

use super::{fma32, fold, tail_mask, Acc};
use crate::simd::elem::{with_buffer, KvElem};
use crate::simd::order::{add_tail, LANES};

/// Four dots `a · b[t n .. (t + 1) n]` (`n = a.len()`), each exactly as `dot_f32` computes it.
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; `b.len() == 4 * a.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot4(a: &[f32], b: &[f32]) -> [f32; 4] {
    let n = a.len();
    let main = n / LANES * LANES;
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    for i in (0..main).step_by(LANES) {
        let p = a.as_ptr().add(i);
        let w = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
        for (t, acc) in acc.iter_mut().enumerate() {
            fma32(acc, w, b.as_ptr().add(t * n + i));
        }
    }
    std::array::from_fn(|t| add_tail(fold(acc[t]), &a[main..], &b[t * n + main..(t + 1) * n]))
}

/// `[dot4(a0, b), dot4(a1, b)]`: two `a` rows against the same four `b` rows, each dot exactly
/// as `dot_f32` computes it. Each `b` vector loaded serves both rows, so the loop issues 12 loads
/// per 16 multiply-adds instead of 20: the multiply-adds, not the loads, set its pace.
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; `a1.len() == a0.len()`, `b.len() == 4 * a0.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot2x4(a0: &[f32], a1: &[f32], b: &[f32]) -> [[f32; 4]; 2] {
    let n = a0.len();
    let main = n / LANES * LANES;
    let mut acc = [[[_mm512_setzero_ps(); 2]; 4]; 2];
    for i in (0..main).step_by(LANES) {
        let w = [a0, a1].map(|a| {
            let p = a.as_ptr().add(i);
            [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
        });
        for t in 0..4 {
            let q = b.as_ptr().add(t * n + i);
            let x = [_mm512_loadu_ps(q), _mm512_loadu_ps(q.add(16))];
            for (acc, w) in acc.iter_mut().zip(&w) {
                for k in 0..2 {
                    acc[t][k] = _mm512_fmadd_ps(w[k], x[k], acc[t][k]);
                }
            }
        }
    }
    let row = |acc: &[Acc; 4], a: &[f32]| {
        std::array::from_fn(|t| add_tail(fold(acc[t]), &a[main..], &b[t * n + main..(t + 1) * n]))
    };
    [row(&acc[0], a0), row(&acc[1], a1)]
}

/// Sixteen f16 at `p` widened to f32 (exact), only the lanes of `m` read (the others 0).
///
/// # Safety
/// The lanes of `m` at `p` readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn load16_f16(p: *const f16, m: __mmask16) -> __m512 {
    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast()))
}

/// [`crate::simd::dot_f32_rows`]: eight positions at a time ([`dot_rows`]).
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; the sizes `crate::simd::kv::check_dot_rows` checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_rows_f32(
    q: &[f32],
    n: usize,
    k: &[f32],
    bases: &[usize],
    out: &mut [f32],
) {
    dot_rows(q, n, k, bases, out, |a, b| {
        let lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(a)));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            lo,
            _mm256_castps_pd(_mm256_loadu_ps(b)),
        ))
    });
}

/// [`crate::simd::dot_f16_rows`]: [`dot_rows_f32`] with the K values widened (exactly) as they are
/// copied into the block's buffer.
///
/// # Safety
/// As [`dot_rows_f32`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_rows_f16(
    q: &[f32],
    n: usize,
    k: &[f16],
    bases: &[usize],
    out: &mut [f32],
) {
    dot_rows(q, n, k, bases, out, |a, b| {
        let lo = _mm256_castsi128_si256(_mm_loadu_si128(a.cast()));
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(lo, _mm_loadu_si128(b.cast())))
    });
}

/// The AVX-512 `dot_*_rows` kernel over rows of `T`; `pair(a, b)` reads 8 values at `a` and 8
/// at `b` as one vector of f32 (`a`'s in the low half).
///
/// Positions go eight at a time. Each block's K rows are copied once (for all heads) into a
/// buffer that interleaves them by pairs: per 8-lane group `c` of the 32 lanes, one vector
/// holds group `c` of row `2t` then group `c` of row `2t + 1`. The query is doubled to match
/// (`[q_c, q_c]`). Each accumulator lane then sees exactly the fused multiply-adds of its lane
/// in `dot_f32`, in the same order; the fold starts with plain adds (`l + 16`, `l + 8`, for
/// two rows per vector) and [`fold8`] ends it. The rows' `n % 32` tails are added one by one
/// after, as in `dot_f32`.
///
/// # Safety
/// As [`dot_rows_f32`]; `pair(a, b)` must read no more than `a[..8]` and `b[..8]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows<T: KvElem>(
    q: &[f32],
    n: usize,
    k: &[T],
    bases: &[usize],
    out: &mut [f32],
    pair: impl Fn(*const T, *const T) -> __m512,
) {
    let (g, m) = (q.len() / n, bases.len());
    let main = n / LANES * LANES;
    let tail = n - main;
    let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
    // Each head's query, every 8-lane group twice; then the block's rows (see below).
    with_buffer(g * 2 * main + 8 * n, |scratch| {
        let (qd, buf) = scratch.split_at_mut(g * 2 * main);
        for h in 0..g {
            for c in 0..main / 8 {
                let v = _mm256_loadu_ps(qp.add(h * n + 8 * c));
                let d = qd.as_mut_ptr().add(h * 2 * main + 16 * c);
                _mm256_storeu_ps(d, v);
                _mm256_storeu_ps(d.add(8), v);
            }
        }
        // Four interleaved pairs of rows, then eight tails.
        let (bp, tp) = (buf.as_mut_ptr(), buf.as_mut_ptr().add(8 * main));
        let row_bytes = n * std::mem::size_of::<T>();
        for (j0, block) in bases.chunks(8).enumerate().map(|(i, c)| (8 * i, c)) {
            // The rows are scattered over the paged cache: ask for the next block's meanwhile.
            for &ahead in bases.iter().skip(j0 + 8).take(8) {
                let r = kp.add(ahead).cast::<i8>();
                for line in (0..row_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(r.add(line));
                }
            }
            // A short block repeats its first row; those results are not stored.
            let row = |j: usize| kp.add(block[if j < block.len() { j } else { 0 }]);
            for t in 0..4 {
                let (a, b) = (row(2 * t), row(2 * t + 1));
                for c in 0..main / 8 {
                    _mm512_storeu_ps(
                        bp.add(2 * main * t + 16 * c),
                        pair(a.add(8 * c), b.add(8 * c)),
                    );
                }
            }
            let mut tails: [&[f32]; 8] = [&[]; 8];
            if tail > 0 {
                for (j, t) in tails.iter_mut().enumerate() {
                    let src = std::slice::from_raw_parts(row(j).add(main), tail);
                    *t = T::widen(src, std::slice::from_raw_parts_mut(tp.add(j * tail), tail));
                }
            }
            for h in 0..g {
                let mut r = dot8(qd.as_ptr().add(h * 2 * main), bp, main);
                if tail > 0 {
                    let tail_q = std::slice::from_raw_parts(qp.add(h * n + main), tail);
                    for (r, tail_k) in r.iter_mut().zip(tails) {
                        *r = add_tail(*r, tail_q, tail_k);
                    }
                }
                std::ptr::copy_nonoverlapping(r.as_ptr(), op.add(h * m + j0), block.len());
            }
        }
    })
}

/// The folded main parts of eight dots: the doubled query `qd` against the four interleaved
/// pairs of rows in `buf` (see [`dot_rows`]), `main` elements each.
///
/// # Safety
/// `qd[..2 * main]` and `buf[..8 * main]` readable; `main` a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn dot8(qd: *const f32, buf: *const f32, main: usize) -> [f32; 8] {
    // acc[t][c]: lanes 8c .. 8c + 8 of rows 2t (low half) and 2t + 1 (high half).
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    for i in (0..2 * main).step_by(2 * LANES) {
        for c in 0..4 {
            let w = _mm512_loadu_ps(qd.add(i + 16 * c));
            for (t, a) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_ps(buf.add(2 * main * t + i + 16 * c));
                a[c] = _mm512_fmadd_ps(w, x, a[c]);
            }
        }
    }
    // l + 16 and l + 8, as the AVX2 `fold`: [row 2t (8 lanes) | row 2t + 1 (8 lanes)].
    let v = acc.map(|a| _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3])));
    fold8(v)
}

/// The end of the fixed tree for eight rows, two per vector (`v[t]` holds rows `2t` and
/// `2t + 1`, 8 lanes each, after `l + 16` and `l + 8`): `l + 4` adds the low and high 128 bits
/// of four rows per vector (`vshuff32x4`), `l + 2` and `l + 1` pairs within 128 bits
/// (`vshufps`), each row's sum ending in one lane; the eight in row order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn fold8(v: [__m512; 4]) -> [f32; 8] {
    // l + 4: 128-bit lane j of `w[i]` holds row 4i + j (4 lanes).
    let h = |a, b| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    };
    let w = [h(v[0], v[1]), h(v[2], v[3])];
    // l + 2: 128-bit lane j: [row j (2), row 4 + j (2)].
    let z = _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(w[0], w[1]),
        _mm512_shuffle_ps::<0xEE>(w[0], w[1]),
    );
    // l + 1: 128-bit lane j: [row j, row 4 + j, ..].
    let t = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(z, z),
        _mm512_shuffle_ps::<0xDD>(z, z),
    );
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    let t = _mm512_permutexvar_ps(idx, t);
    let mut r = [0f32; 8];
    _mm256_storeu_ps(r.as_mut_ptr(), _mm512_castps512_ps256(t));
    r
}

/// [`crate::simd::weighted_rows_f32`].
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; the sizes `crate::simd::kv::check_weighted_rows` checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn weighted_rows_f32(
    ws: &[f32],
    v: &[f32],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
) {
    weighted_rows(ws, v, bases, n, out, |p, m| _mm512_maskz_loadu_ps(m, p));
}

/// [`crate::simd::weighted_rows_f16`]: [`weighted_rows_f32`] with each V value widened as it is
/// loaded, once for all the heads of a step.
///
/// # Safety
/// As [`weighted_rows_f32`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn weighted_rows_f16(
    ws: &[f32],
    v: &[f16],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
) {
    weighted_rows(ws, v, bases, n, out, |p, m| load16_f16(p, m));
}

/// The `weighted_rows_*` kernel over rows of `T`, which `load(p, m)` reads 16 at a time as f32
/// (the lanes of `m` only): the heads four at a time, sharing each loaded V vector.
///
/// # Safety
/// As [`weighted_rows_f32`]; `load(p, m)` must read no more than the lanes of `m` at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn weighted_rows<T>(
    ws: &[f32],
    v: &[T],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
    load: impl Fn(*const T, __mmask16) -> __m512 + Copy,
) {
    if n == 0 {
        return;
    }
    let (g, m) = (out.len() / n, bases.len());
    let mut h = 0;
    while h < g {
        let (w, o) = (ws.as_ptr().add(h * m), out.as_mut_ptr().add(h * n));
        h += match g - h {
            1 => weighted_heads::<T, 1>(w, v, bases, n, o, load),
            2 => weighted_heads::<T, 2>(w, v, bases, n, o, load),
            3 => weighted_heads::<T, 3>(w, v, bases, n, o, load),
            _ => weighted_heads::<T, 4>(w, v, bases, n, o, load),
        };
    }
}

/// `H` heads of [`weighted_rows`] (weights at `ws`, `bases.len()` per head; output at `out`,
/// `n` per head): the columns 64 at a time (four V vectors per position: each pass over the
/// positions reads a whole 128-byte pair of f16 cache lines, and the weights are loaded half as
/// often as 32 at a time), then 32, then 16 with the last vector masked. Every column's sum is
/// the same whichever step computed it. Returns `H`.
///
/// # Safety
/// As [`weighted_rows`], for `H` heads from `ws` and `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn weighted_heads<T, const H: usize>(
    ws: *const f32,
    v: &[T],
    bases: &[usize],
    n: usize,
    out: *mut f32,
    load: impl Fn(*const T, __mmask16) -> __m512 + Copy,
) -> usize {
    let mut c = 0;
    while c + 64 <= n {
        weighted_columns::<T, H, 4>(ws, v, bases, c, n, out, !0, load);
        c += 64;
    }
    while c + 32 <= n {
        weighted_columns::<T, H, 2>(ws, v, bases, c, n, out, !0, load);
        c += 32;
    }
    while c < n {
        let mask = if c + 16 <= n { !0 } else { tail_mask(n) };
        weighted_columns::<T, H, 1>(ws, v, bases, c, n, out, mask, load);
        c += 16;
    }
    H
}

/// Columns `c .. c + 16 V` (the last vector's lanes limited to `mask`) of `H` heads: per
/// position, the V values loaded once, then for each head `acc += w * v` (multiply, then add).
///
/// # Safety
/// As [`weighted_heads`]; the columns (and masked lanes) within each row.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn weighted_columns<T, const H: usize, const V: usize>(
    ws: *const f32,
    v: &[T],
    bases: &[usize],
    c: usize,
    n: usize,
    out: *mut f32,
    mask: __mmask16,
    load: impl Fn(*const T, __mmask16) -> __m512,
) {
    let m = bases.len();
    let vp = v.as_ptr().add(c);
    let lane_mask = |k: usize| if k + 1 == V { mask } else { !0 };
    let mut acc = [[_mm512_setzero_ps(); V]; H];
    for (p, &b) in bases.iter().enumerate() {
        // The rows are scattered over the paged cache: ask for one a few positions ahead.
        if let Some(&ahead) = bases.get(p + PREFETCH_ROWS) {
            _mm_prefetch::<_MM_HINT_T0>(vp.add(ahead).cast());
        }
        let x: [__m512; V] = std::array::from_fn(|k| load(vp.add(b + 16 * k), lane_mask(k)));
        for (h, a) in acc.iter_mut().enumerate() {
            let w = _mm512_set1_ps(*ws.add(h * m + p));
            for (a, x) in a.iter_mut().zip(&x) {
                *a = _mm512_add_ps(*a, _mm512_mul_ps(w, *x));
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (k, a) in a.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(h * n + c + 16 * k), lane_mask(k), *a);
        }
    }
}

/// How many positions ahead the weighted sums prefetch their V rows.
const PREFETCH_ROWS: usize = 8;

//! AVX2 f32 dot products and attention row kernels: [`crate::simd::dot_f32`]'s lanes and tree
//! with fused multiply-adds, one row, two rows, or blocks of four K rows folded together.
//!
//! Invariants: each dot is exactly [`dot_f32_avx2`]'s operations on its own lanes; the weighted
//! sums multiply then add (never fused) in position order.

use std::arch::x86_64::*;

use half::f16;

use super::{fma32, fold, load32, load8_f16};
use crate::simd::elem::{with_buffer, KvElem};
use crate::simd::order::{add_tail, LANES};

/// # Safety
/// Requires AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let main = a.len() / LANES * LANES;
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..main).step_by(LANES) {
        fma32(&mut acc, load32(a.as_ptr().add(i)), b.as_ptr().add(i));
    }
    add_tail(fold(acc), &a[main..], &b[main..])
}

/// Two dots `a · b[j n .. (j + 1) n]`, each exactly as [`dot_f32_avx2`] computes it.
///
/// # Safety
/// Requires AVX2 and FMA; `b.len() == 2 * a.len()`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot2_avx2(a: &[f32], b: &[f32]) -> [f32; 2] {
    let n = a.len();
    let main = n / LANES * LANES;
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    for i in (0..main).step_by(LANES) {
        let w = load32(a.as_ptr().add(i));
        fma32(&mut acc0, w, b.as_ptr().add(i));
        fma32(&mut acc1, w, b.as_ptr().add(n + i));
    }
    [
        add_tail(fold(acc0), &a[main..], &b[main..n]),
        add_tail(fold(acc1), &a[main..], &b[n + main..]),
    ]
}

/// [`crate::simd::dot_f32_rows`]: each dot exactly as [`dot_f32_avx2`] computes it, four
/// positions at a time ([`dot4`]).
///
/// # Safety
/// Requires AVX2, FMA and F16C; `q.len() == g * n`, `out.len() == g * bases.len()`, and
/// every `k[bases[p] .. bases[p] + n]` in bounds.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_avx2(
    q: &[f32],
    n: usize,
    k: &[f32],
    bases: &[usize],
    out: &mut [f32],
) {
    let main = n / LANES * LANES;
    dot_rows_blocked(
        q,
        n,
        k,
        bases,
        out,
        |_, _, _| {},
        |q, rows| dot4(q, rows, main),
    );
}

/// [`crate::simd::dot_f16_rows`]: [`dot_rows_avx2`] over each block's K rows widened once (for
/// all heads) into a buffer.
///
/// # Safety
/// As [`dot_rows_avx2`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_f16_avx2(
    q: &[f32],
    n: usize,
    k: &[f16],
    bases: &[usize],
    out: &mut [f32],
) {
    let main = n / LANES * LANES;
    dot_rows_blocked(
        q,
        n,
        k,
        bases,
        out,
        |s, d, n| widen_f16(s, d, n),
        |q, rows| dot4(q, rows, main),
    );
}

/// `dst[..n]` = `src[..n]` widened to f32 (exact).
///
/// # Safety
/// AVX2 and F16C; `src[..n]` readable, `dst[..n]` writable.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn widen_f16(src: *const f16, dst: *mut f32, n: usize) {
    let main = n / 8 * 8;
    for i in (0..main).step_by(8) {
        _mm256_storeu_ps(dst.add(i), load8_f16(src.add(i)));
    }
    for i in main..n {
        *dst.add(i) = (*src.add(i)).to_f32();
    }
}

/// Lanes `8k .. 8k + 8` of the 32 accumulators of `q · rows[j]` over `q[..main]`, for the
/// four rows: the fused multiply-adds of [`dot_f32_avx2`] in the same order per lane.
///
/// # Safety
/// AVX2 and FMA; `q` and every row readable up to `main`, a multiple of 32; `k < 4`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn lanes4(q: *const f32, rows: &[*const f32; 4], main: usize, k: usize) -> [__m256; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (8 * k..main).step_by(LANES) {
        let w = _mm256_loadu_ps(q.add(i));
        for (a, r) in acc.iter_mut().zip(rows) {
            *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(i)), *a);
        }
    }
    acc
}

/// The folded main parts (`q[..main]`) of the dots of `q` with four rows: per row the lanes,
/// fused multiply-adds and tree of [`dot_f32_avx2`] and [`fold`], bit for bit. The lanes go
/// 8 at a time (lanes are independent: few registers live), and the tree runs for the four
/// rows at once: `l + 16` and `l + 8` as in [`fold`], then `l + 4` on two rows per vector
/// (`vperm2f128`), `l + 2` and `l + 1` on pairs of those (`vshufps`).
///
/// # Safety
/// As [`lanes4`].
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot4(q: *const f32, rows: &[*const f32; 4], main: usize) -> [f32; 4] {
    let (l0, l2) = (lanes4(q, rows, main, 0), lanes4(q, rows, main, 2));
    let s02: [__m256; 4] = std::array::from_fn(|j| _mm256_add_ps(l0[j], l2[j]));
    let (l1, l3) = (lanes4(q, rows, main, 1), lanes4(q, rows, main, 3));
    // s[j] lane l: row j's lanes after `l + 16` and `l + 8`, as in `fold`.
    let s: [__m256; 4] =
        std::array::from_fn(|j| _mm256_add_ps(s02[j], _mm256_add_ps(l1[j], l3[j])));
    // l + 4: [row 0 | row 1] and [row 2 | row 3], four lanes each.
    let h = |a, b| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    };
    let (r01, r23) = (h(s[0], s[1]), h(s[2], s[3]));
    // l + 2: [row 0 (2), row 2 (2) | row 1 (2), row 3 (2)].
    let z = _mm256_add_ps(
        _mm256_shuffle_ps::<0x44>(r01, r23),
        _mm256_shuffle_ps::<0xEE>(r01, r23),
    );
    // l + 1: [row 0, row 2, .. | row 1, row 3, ..].
    let t = _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(z, z),
        _mm256_shuffle_ps::<0xDD>(z, z),
    );
    let t = _mm256_permutevar8x32_ps(t, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
    let mut r = [0f32; 4];
    _mm_storeu_ps(r.as_mut_ptr(), _mm256_castps256_ps128(t));
    r
}

/// The driver of the SIMD `dot_*_rows` kernels: positions in blocks of `B`, each block's rows
/// as f32 (read in place, or widened once into a buffer by `widen(src, dst, n)` for all heads),
/// then per head `block(q_h, rows)`, which returns the `B` folded main parts (the first
/// `32 * (n / 32)` elements), and the scalar tails added after, as [`add_tail`] does for
/// `dot_f32`. A short last block repeats its first row in the unused slots and stores only its
/// own results.
///
/// # Safety
/// The sizes `crate::simd::kv::check_dot_rows` checks; `widen(src, dst, n)` must read
/// `src[..n]` and write `dst[..n]` only; `block(q, rows)` must read no more than
/// `q[..32 * (n / 32)]` and the same of each row; both may need the CPU features of their
/// caller.
#[inline(always)]
unsafe fn dot_rows_blocked<T: KvElem, const B: usize>(
    q: &[f32],
    n: usize,
    k: &[T],
    bases: &[usize],
    out: &mut [f32],
    widen: impl Fn(*const T, *mut f32, usize),
    block: impl Fn(*const f32, &[*const f32; B]) -> [f32; B],
) {
    let (g, m) = (q.len() / n, bases.len());
    let main = n / LANES * LANES;
    let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
    let len = if T::as_f32(kp).is_some() { 0 } else { B * n };
    with_buffer(len, |buf| {
        let bp = buf.as_mut_ptr();
        for (j0, block_bases) in bases.chunks(B).enumerate().map(|(i, c)| (i * B, c)) {
            let rows: [*const f32; B] = std::array::from_fn(|j| {
                let b = block_bases[if j < block_bases.len() { j } else { 0 }];
                match T::as_f32(kp.add(b)) {
                    Some(p) => p,
                    None if j < block_bases.len() => {
                        widen(kp.add(b), bp.add(j * n), n);
                        bp.add(j * n)
                    }
                    None => bp,
                }
            });
            for h in 0..g {
                let qh = qp.add(h * n);
                let mut r = block(qh, &rows);
                if main < n {
                    let tail_q = std::slice::from_raw_parts(qh.add(main), n - main);
                    for (r, row) in r.iter_mut().zip(rows) {
                        let tail_k = std::slice::from_raw_parts(row.add(main), n - main);
                        *r = add_tail(*r, tail_q, tail_k);
                    }
                }
                let o = op.add(h * m + j0);
                std::ptr::copy_nonoverlapping(r.as_ptr(), o, block_bases.len());
            }
        }
    })
}

/// [`crate::simd::weighted_rows_f32`], one head at a time.
///
/// # Safety
/// Requires AVX2 and F16C; the sizes `crate::simd::kv::check_weighted_rows` checks.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn weighted_rows_avx2(
    ws: &[f32],
    v: &[f32],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
) {
    weighted_rows(ws, v, bases, n, out, |p| _mm256_loadu_ps(p));
}

/// [`crate::simd::weighted_rows_f16`]: [`weighted_rows_avx2`] with each V value widened as it is
/// loaded.
///
/// # Safety
/// As [`weighted_rows_avx2`].
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn weighted_rows_f16_avx2(
    ws: &[f32],
    v: &[f16],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
) {
    weighted_rows(ws, v, bases, n, out, |p| load8_f16(p));
}

/// Heads one pass of [`weighted_rows`] takes: each V row is read (and widened) once for all of
/// them, and their accumulators are independent chains.
const PASS_HEADS: usize = 4;

/// The `weighted_rows_*` kernel over rows of `T`, which `load8` reads 8 at a time as f32:
/// per output value, the same multiplies and adds in the same order (positions in order)
/// whatever `T` is, and however many heads a pass takes.
///
/// # Safety
/// As [`weighted_rows_avx2`]; `load8(p)` must read no more than `p[0..8]`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn weighted_rows<T: KvElem>(
    ws: &[f32],
    v: &[T],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
    load8: impl Fn(*const T) -> __m256 + Copy,
) {
    if n == 0 {
        return;
    }
    let g = out.len() / n;
    let mut h0 = 0;
    while h0 < g {
        let hs = (g - h0).min(PASS_HEADS);
        match hs {
            1 => weighted_heads::<T, 1>(ws, v, bases, n, out, h0, load8),
            2 => weighted_heads::<T, 2>(ws, v, bases, n, out, h0, load8),
            3 => weighted_heads::<T, 3>(ws, v, bases, n, out, h0, load8),
            _ => weighted_heads::<T, PASS_HEADS>(ws, v, bases, n, out, h0, load8),
        }
        h0 += hs;
    }
}

/// Heads `h0 .. h0 + H` of [`weighted_rows`]: 16 columns at a time, then 8, then the rest one
/// by one.
///
/// # Safety
/// As [`weighted_rows`]; `h0 + H` heads exist.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn weighted_heads<T: KvElem, const H: usize>(
    ws: &[f32],
    v: &[T],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
    h0: usize,
    load8: impl Fn(*const T) -> __m256,
) {
    let m = bases.len();
    let vp = v.as_ptr();
    let wp: [*const f32; H] = std::array::from_fn(|h| ws.as_ptr().add((h0 + h) * m));
    let op: [*mut f32; H] = std::array::from_fn(|h| out.as_mut_ptr().add((h0 + h) * n));
    let mut c = 0;
    while c + 16 <= n {
        let mut acc = [[_mm256_setzero_ps(); 2]; H];
        for (p, &b) in bases.iter().enumerate() {
            let x = vp.add(b + c);
            let (x0, x1) = (load8(x), load8(x.add(8)));
            for (a, w) in acc.iter_mut().zip(wp) {
                let w = _mm256_set1_ps(*w.add(p));
                a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(w, x0));
                a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(w, x1));
            }
        }
        for (a, o) in acc.iter().zip(op) {
            _mm256_storeu_ps(o.add(c), a[0]);
            _mm256_storeu_ps(o.add(c + 8), a[1]);
        }
        c += 16;
    }
    while c + 8 <= n {
        let mut acc = [_mm256_setzero_ps(); H];
        for (p, &b) in bases.iter().enumerate() {
            let x = load8(vp.add(b + c));
            for (a, w) in acc.iter_mut().zip(wp) {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(_mm256_set1_ps(*w.add(p)), x));
            }
        }
        for (a, o) in acc.iter().zip(op) {
            _mm256_storeu_ps(o.add(c), *a);
        }
        c += 8;
    }
    let mut buf = [0f32; 1];
    for (w, o) in wp.into_iter().zip(op) {
        for i in c..n {
            let mut acc = 0f32;
            for (p, &b) in bases.iter().enumerate() {
                let x = T::widen(std::slice::from_raw_parts(vp.add(b + i), 1), &mut buf)[0];
                acc += *w.add(p) * x;
            }
            *o.add(i) = acc;
        }
    }
}

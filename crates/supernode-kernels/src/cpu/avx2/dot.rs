//! AVX2 f32 dot products and attention row kernels: [`crate::simd::dot_f32`]'s lanes and tree
//! with fused multiply-adds, one row, two rows, or blocks of four K rows folded together.
//!
//! Invariants: each dot is exactly [`dot_f32_avx2`]'s operations on its own lanes; the weighted
//! sums multiply then add (never fused) in position order.

use std::arch::x86_64::*;

use half::f16;

use super::{fma32, fold, load32, load8_f16};
use crate::simd::elem::KvElem;
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
/// positions and up to three heads at a time ([`dot_rows`]).
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
    dot_rows(q, n, k, bases, out, |p| _mm256_loadu_ps(p));
}

/// [`crate::simd::dot_f16_rows`]: [`dot_rows_avx2`] with each K value widened as it is loaded.
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
    dot_rows(q, n, k, bases, out, |p| load8_f16(p));
}

/// Most heads one pass of [`dot_rows`] takes: each K vector is loaded (and widened) once for
/// all of them. Three heads of four rows keep twelve accumulators, the query vectors and one
/// K vector in the sixteen registers.
const DOT_PASS_HEADS: usize = 3;

/// The `dot_*_rows` kernel over rows of `T`, which `load8` reads 8 at a time as f32: the `g`
/// heads in as few passes as [`DOT_PASS_HEADS`] allows, of sizes as even as possible (4 heads
/// go as 2 + 2, not 3 + 1), then per pass [`dot_heads`].
///
/// # Safety
/// As [`dot_rows_avx2`]; `load8(p)` must read no more than `p[0..8]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows<T: KvElem>(
    q: &[f32],
    n: usize,
    k: &[T],
    bases: &[usize],
    out: &mut [f32],
    load8: impl Fn(*const T) -> __m256 + Copy,
) {
    if n == 0 || bases.is_empty() {
        return;
    }
    let g = q.len() / n;
    let passes = g.div_ceil(DOT_PASS_HEADS);
    let mut h0 = 0;
    for pass in 0..passes {
        // Heads left over the passes left, rounded up.
        let hs = (g - h0).div_ceil(passes - pass);
        match hs {
            1 => dot_heads::<T, 1>(q, n, k, bases, out, h0, load8),
            2 => dot_heads::<T, 2>(q, n, k, bases, out, h0, load8),
            _ => dot_heads::<T, DOT_PASS_HEADS>(q, n, k, bases, out, h0, load8),
        }
        h0 += hs;
    }
}

/// Heads `h0 .. h0 + H` of [`dot_rows`]: positions in blocks of four (a short last block
/// repeats its first row in the unused slots and stores only its own results), the folded
/// main parts of [`dot_block`], then the scalar tails added after, as [`add_tail`] does for
/// `dot_f32`.
///
/// # Safety
/// As [`dot_rows`]; `h0 + H` heads exist.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_heads<T: KvElem, const H: usize>(
    q: &[f32],
    n: usize,
    k: &[T],
    bases: &[usize],
    out: &mut [f32],
    h0: usize,
    load8: impl Fn(*const T) -> __m256 + Copy,
) {
    let m = bases.len();
    let main = n / LANES * LANES;
    let kp = k.as_ptr();
    let qp: [*const f32; H] = std::array::from_fn(|h| q.as_ptr().add((h0 + h) * n));
    let op: [*mut f32; H] = std::array::from_fn(|h| out.as_mut_ptr().add((h0 + h) * m));
    let mut tail = [0f32; LANES];
    for (j0, block) in bases.chunks(4).enumerate().map(|(i, c)| (4 * i, c)) {
        let rows: [*const T; 4] =
            std::array::from_fn(|j| kp.add(block[if j < block.len() { j } else { 0 }]));
        // Head dims of 64 and 128 with the chunk count known: loops unrolled whole.
        let mut r = match main {
            64 => dot_block::<T, H, 2>(&qp, &rows, main, load8),
            128 => dot_block::<T, H, 4>(&qp, &rows, main, load8),
            _ => dot_block::<T, H, 0>(&qp, &rows, main, load8),
        };
        if main < n {
            for (j, row) in rows.iter().take(block.len()).enumerate() {
                let src = std::slice::from_raw_parts(row.add(main), n - main);
                let tail_k = T::widen(src, &mut tail);
                for (r, qh) in r.iter_mut().zip(qp) {
                    let tail_q = std::slice::from_raw_parts(qh.add(main), n - main);
                    r[j] = add_tail(r[j], tail_q, tail_k);
                }
            }
        }
        for (r, o) in r.iter().zip(op) {
            std::ptr::copy_nonoverlapping(r.as_ptr(), o.add(j0), block.len());
        }
    }
}

/// The folded main parts (`q[..main]`) of the dots of `H` query heads with four rows: per dot
/// the lanes, fused multiply-adds and tree of [`dot_f32_avx2`] and [`fold`], bit for bit. The
/// lanes go 8 at a time (lanes are independent), each K vector loaded once for the `H` heads,
/// and the tree runs per head for its four rows at once ([`tree4`]).
///
/// # Safety
/// AVX2 and FMA; every `q` and row readable up to `main`, a multiple of 32.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_block<T, const H: usize, const C: usize>(
    q: &[*const f32; H],
    rows: &[*const T; 4],
    main: usize,
    load8: impl Fn(*const T) -> __m256,
) -> [[f32; 4]; H] {
    let chunks = if C > 0 { C } else { main / LANES };
    // lanes[h][k][j]: lanes `8k .. 8k + 8` of head h's accumulators for row j.
    let mut lanes = [[[_mm256_setzero_ps(); 4]; 4]; H];
    for k in 0..4 {
        let mut acc = [[_mm256_setzero_ps(); 4]; H];
        for c in 0..chunks {
            let i = 8 * k + LANES * c;
            // Plain loops, not `array::from_fn`: its closures are not inlined here.
            let mut w = [_mm256_setzero_ps(); H];
            for (w, q) in w.iter_mut().zip(q) {
                *w = _mm256_loadu_ps(q.add(i));
            }
            for (j, r) in rows.iter().enumerate() {
                let x = load8(r.add(i));
                for (a, w) in acc.iter_mut().zip(w) {
                    a[j] = _mm256_fmadd_ps(w, x, a[j]);
                }
            }
        }
        for (l, a) in lanes.iter_mut().zip(acc) {
            l[k] = a;
        }
    }
    let mut r = [[0f32; 4]; H];
    for (r, l) in r.iter_mut().zip(&lanes) {
        *r = tree4(l);
    }
    r
}

/// The trees of four dots from their lanes (`l[k][j]`: lanes `8k .. 8k + 8` of dot `j`), each
/// [`fold`]'s bit for bit: `l + 16` and `l + 8` as in [`fold`], then `l + 4` on two dots per
/// vector (`vperm2f128`), `l + 2` and `l + 1` on pairs of those (`vshufps`).
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn tree4(l: &[[__m256; 4]; 4]) -> [f32; 4] {
    // s[j] lane l: dot j's lanes after `l + 16` and `l + 8`, as in `fold`.
    let mut s = [_mm256_setzero_ps(); 4];
    for (j, s) in s.iter_mut().enumerate() {
        *s = _mm256_add_ps(
            _mm256_add_ps(l[0][j], l[2][j]),
            _mm256_add_ps(l[1][j], l[3][j]),
        );
    }
    // l + 4: [dot 0 | dot 1] and [dot 2 | dot 3], four lanes each.
    let h = |a, b| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    };
    let (r01, r23) = (h(s[0], s[1]), h(s[2], s[3]));
    // l + 2: [dot 0 (2), dot 2 (2) | dot 1 (2), dot 3 (2)].
    let z = _mm256_add_ps(
        _mm256_shuffle_ps::<0x44>(r01, r23),
        _mm256_shuffle_ps::<0xEE>(r01, r23),
    );
    // l + 1: [dot 0, dot 2, .. | dot 1, dot 3, ..].
    let t = _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(z, z),
        _mm256_shuffle_ps::<0xDD>(z, z),
    );
    let t = _mm256_permutevar8x32_ps(t, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
    let mut r = [0f32; 4];
    _mm_storeu_ps(r.as_mut_ptr(), _mm256_castps256_ps128(t));
    r
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

//! AVX-512 versions of the fused row kernels for the block types of the real models (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q4_K, Q6_K): the same 32 lanes as the AVX2 kernels, held in two 512-bit accumulators
//! (lanes 0..16 and 16..32) instead of four 256-bit ones. Every lane sees the same values and the
//! same fused multiply-adds in the same order, and the fold adds the same pairs (`l + 16` first,
//! which is `acc[0] + acc[1]` here), so the results equal the AVX2 kernels' bit for bit (and
//! `dot_f32` of the dequantised row: Q5_0 and Q5_1 have no AVX2 kernels). 4- and 5-bit types
//! decode through a 16- or 32-entry table per block (or sub-block) instead of converting and
//! scaling every element: the same values, from the same operations on each possible quant.
//!
//! Every `unsafe fn` needs AVX-512 F/BW/VL (plus AVX2, FMA, F16C); the wrappers handed out by
//! [`row_kernels`] are reachable only once [`super::has_avx512`] confirmed them.

use std::arch::x86_64::*;

use half::f16;

use super::{
    add_tail, fold_sum_lanes, KvElem, RowKernels, EXP_C1, EXP_C2, EXP_HI, EXP_LO, EXP_LOG2E, EXP_P,
    LANES, SUM_LANES,
};
use crate::dtype::{DType, QK_K};
use crate::quant::scale_min_k4;

/// 32 lanes as two vectors: `acc[k]` holds lanes `16k .. 16k + 16`.
type Acc = [__m512; 2];

/// The fixed tree: l += l+16, l += l+8, l += l+4, l += l+2, l += l+1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn fold(acc: Acc) -> f32 {
    let s = _mm512_add_ps(acc[0], acc[1]);
    let lo = _mm512_castps512_ps256(s);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
    let s = _mm256_add_ps(lo, hi);
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
    _mm_cvtss_f32(h)
}

/// Accumulate 32 weights against `x[0..32]`.
///
/// # Safety
/// `x` must point at 32 readable floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn fma32(acc: &mut Acc, w: Acc, x: *const f32) {
    acc[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc[0]);
    acc[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x.add(16)), acc[1]);
}

/// Store 32 values at `y[0..32]`.
///
/// # Safety
/// `y` must point at 32 writable floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn store32(y: *mut f32, w: Acc) {
    _mm512_storeu_ps(y, w[0]);
    _mm512_storeu_ps(y.add(16), w[1]);
}

/// The f16 at `p`, widened (exact). Loaded in assembly, through a general register into a vector
/// register it overwrites whole: left to the compiler, the load becomes `vpinsrw` into a free
/// register, often an accumulator, and every block then waits for the previous one's FMA.
///
/// # Safety
/// `p` must point at 2 readable bytes; F16C.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let v: __m128;
    std::arch::asm!(
        "movzx {t:e}, word ptr [{p}]",
        "vmovd {v}, {t:e}",
        "vcvtph2ps {v}, {v}",
        p = in(reg) p,
        t = out(reg) _,
        v = out(xmm_reg) v,
        options(pure, readonly, nostack, preserves_flags),
    );
    _mm_cvtss_f32(v)
}

/// 16 signed bytes as floats (exact).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn i8_f32(v: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

/// Four dots `a · b[t n .. (t + 1) n]` (`n = a.len()`), each exactly as `dot_f32` computes it.
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; `b.len() == 4 * a.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn dot4(a: &[f32], b: &[f32]) -> [f32; 4] {
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
pub(super) unsafe fn dot2x4(a0: &[f32], a1: &[f32], b: &[f32]) -> [[f32; 4]; 2] {
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

// Attention kernels: the AVX-512 versions of `dot_*_rows`, `weighted_rows_*` and the softmax
// steps, with the same lanes, operations and orders as the AVX2 and portable versions.

/// The lanes of the first `n % 16` elements, for the masked loads and stores of a last,
/// partial vector (`n % 16 == 0` means a whole one).
#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
    match n % 16 {
        0 => !0,
        r => (1 << r) - 1,
    }
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

/// [`super::dot_f32_rows`]: eight positions at a time ([`dot_rows`]).
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; the sizes `super::check_dot_rows` checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_f32(
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

/// [`super::dot_f16_rows`]: [`dot_rows_f32`] with the K values widened (exactly) as they are
/// copied into the block's buffer.
///
/// # Safety
/// As [`dot_rows_f32`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_f16(
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
    super::with_buffer(g * 2 * main + 8 * n, |scratch| {
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

/// [`super::weighted_rows_f32`].
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; the sizes `super::check_weighted_rows` checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn weighted_rows_f32(
    ws: &[f32],
    v: &[f32],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
) {
    weighted_rows(ws, v, bases, n, out, |p, m| _mm512_maskz_loadu_ps(m, p));
}

/// [`super::weighted_rows_f16`]: [`weighted_rows_f32`] with each V value widened as it is
/// loaded, once for all the heads of a step.
///
/// # Safety
/// As [`weighted_rows_f32`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn weighted_rows_f16(
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
/// `n` per head): the columns 32 at a time, then 16 at a time with the last vector masked.
/// Returns `H`.
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

/// `gate[i] = silu(gate[i]) * up[i]` over whole vectors of 16, with `silu(x) = x / (1 +
/// exp_f32(-x))` (each step as the scalar [`crate::ops::silu`] does it); returns how many
/// values it did.
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; `up.len() >= gate.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn glu_silu(gate: &mut [f32], up: &[f32]) -> usize {
    let n = gate.len() / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let x = _mm512_loadu_ps(gate.as_ptr().add(i));
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        let silu = _mm512_div_ps(x, _mm512_add_ps(one, e));
        let u = _mm512_loadu_ps(up.as_ptr().add(i));
        _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(silu, u));
    }
    n
}

/// [`super::exp_f32`] on 16 lanes: the same operations, lane by lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
    let x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
    );
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_C1), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_C2), r);
    let mut p = _mm512_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let ni = _mm512_cvtps_epi32(n);
    let n1 = _mm512_srai_epi32::<1>(ni);
    let pow2 = |e| {
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            e,
            _mm512_set1_epi32(127),
        )))
    };
    _mm512_mul_ps(_mm512_mul_ps(y, pow2(n1)), pow2(_mm512_sub_epi32(ni, n1)))
}

/// [`super::scale_max`], with the last, partial vector masked.
///
/// # Safety
/// AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32 {
    let (sc, p, n) = (_mm512_set1_ps(scale), s.as_mut_ptr(), s.len());
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        let m = if i + 16 <= n { !0 } else { tail_mask(n) };
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sc);
        _mm512_mask_storeu_ps(p.add(i), m, v);
        mx = _mm512_mask_max_ps(mx, m, mx, v);
    }
    _mm512_reduce_max_ps(mx)
}

/// [`super::exp_sum`]: position `p` in lane `p % 16` of two 8-lane f64 accumulators, the last,
/// partial vector masked (its unused lanes add 0, which changes no lane: every sum is `>= +0`).
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn exp_sum(s: &mut [f32], max: f32) -> f64 {
    let (mx, p, n) = (_mm512_set1_ps(max), s.as_mut_ptr(), s.len());
    let mut acc = [_mm512_setzero_pd(); 2];
    for i in (0..n).step_by(SUM_LANES) {
        let m = if i + 16 <= n { !0 } else { tail_mask(n) };
        let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), mx));
        let e = _mm512_maskz_mov_ps(m, e);
        _mm512_mask_storeu_ps(p.add(i), m, e);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
        acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(hi));
    }
    let mut lanes = [0f64; SUM_LANES];
    _mm512_storeu_pd(lanes.as_mut_ptr(), acc[0]);
    _mm512_storeu_pd(lanes.as_mut_ptr().add(8), acc[1]);
    fold_sum_lanes(lanes)
}

/// [`super::scale_round`], with the last, partial vector masked (`vcvtps2ph` rounds to nearest
/// even, as `half` does).
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn scale_round(s: &mut [f32], inv: f32, round: bool) {
    let (iv, p, n) = (_mm512_set1_ps(inv), s.as_mut_ptr(), s.len());
    for i in (0..n).step_by(16) {
        let m = if i + 16 <= n { !0 } else { tail_mask(n) };
        let mut w = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), iv);
        if round {
            w = _mm512_cvtph_ps(_mm512_cvtps_ph::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(w));
        }
        _mm512_mask_storeu_ps(p.add(i), m, w);
    }
}

// Decoders: as in the AVX2 module, each walks a row of whole blocks and hands every run of 32
// values, with the index of its first element, to `f`, computed with exactly the float operations
// of `crate::quant`'s scalar dequantisers.
//
// # Safety (all decoders)
// AVX-512 F/BW/VL, AVX2, FMA and F16C; `row` holds whole blocks.

/// The integers 0..16 as floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn iota16() -> __m512 {
    _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    )
}

/// The 16 nibbles at `p` (16 bytes) as two vectors of lookup indices: elements 0..16 (low
/// nibbles) and 16..32 (high nibbles). Bits above the nibble are left in: `vpermps` ignores them.
///
/// # Safety
/// `p` must point at 16 readable bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn nibble_indices(p: *const u8) -> [__m512i; 2] {
    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
    [idx, _mm512_srli_epi32::<4>(idx)]
}

/// `f(i, blocks, scales)` for every block index `i` of `R` rows of blocks of `size` bytes, taken
/// in lockstep: `blocks[r]` is block `i` of row `r`, and `scales[r]` its first `S` f16 values
/// (its scale at byte 0 and, for `S == 2`, its min at byte 2) widened (exact) and broadcast.
/// The scales of 16 blocks of a row come in one gather and are widened together, and each is
/// then broadcast from memory: widening them one by one through a vector register took three
/// shuffle-port instructions per value, which the shuffle port then had to fit beside the
/// table lookups. Several rows at once give the out-of-order core independent work (each row's
/// sums are a chain of dependent multiply-adds, and each row starts by waiting on its gather).
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; the rows are of equal length, whole blocks of at least
/// 4 bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn for_each_block<const R: usize, const S: usize>(
    rows: [&[u8]; R],
    size: usize,
    mut f: impl FnMut(usize, [*const u8; R], [[__m512; S]; R]),
) {
    let mut wide = [[[0f32; 16]; S]; R];
    let blocks = rows[0].len() / size;
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(size as i32),
    );
    for c0 in (0..blocks).step_by(16) {
        let n = 16.min(blocks - c0);
        for (row, wide) in rows.iter().zip(wide.iter_mut()) {
            // Ask for the blocks [`PREFETCH_BLOCKS`] ahead (past the row's end: the next rows,
            // which follow it in memory; prefetches never fault). The gather below is each
            // chunk's first touch of its bytes, and without this every chunk started by waiting
            // for memory.
            let ahead = row.as_ptr().wrapping_add(size * (c0 + PREFETCH_BLOCKS));
            for line in (0..16 * size).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
            // The first 4 bytes of each of the next `n` blocks: scale in the low half, min above.
            let heads = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                (((1u32 << n) - 1) & 0xFFFF) as u16,
                offsets,
                row.as_ptr().add(size * c0).cast(),
            );
            for (s, wide) in wide.iter_mut().enumerate() {
                let half = if s == 0 {
                    heads
                } else {
                    _mm512_srli_epi32::<16>(heads)
                };
                _mm512_storeu_ps(
                    wide.as_mut_ptr(),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(half)),
                );
            }
        }
        for (j, i) in (c0..c0 + n).enumerate() {
            let scales =
                std::array::from_fn(|r| std::array::from_fn(|s| _mm512_set1_ps(wide[r][s][j])));
            f(i, rows.map(|row| row.as_ptr().add(size * i)), scales);
        }
    }
}

/// How many blocks ahead [`for_each_block`] prefetches.
const PREFETCH_BLOCKS: usize = 64;

// 4-bit types look their values up: a block's 16 possible values are computed once, with the
// scalar dequantiser's operations on the nibble value, and `vpermps` picks each element's.

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_0<const R: usize>(rows: [&[u8]; R], mut f: impl FnMut(usize, [Acc; R])) {
    let values = _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0));
    for_each_block::<R, 1>(rows, 18, |i, b, scales| {
        f(
            32 * i,
            std::array::from_fn(|r| {
                let table = _mm512_mul_ps(values, scales[r][0]);
                let idx = nibble_indices(b[r].add(2));
                idx.map(|i| _mm512_permutexvar_ps(i, table))
            }),
        );
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_1<const R: usize>(rows: [&[u8]; R], mut f: impl FnMut(usize, [Acc; R])) {
    let values = iota16();
    for_each_block::<R, 2>(rows, 20, |i, b, scales| {
        f(
            32 * i,
            std::array::from_fn(|r| {
                let [d, m] = scales[r];
                let table = _mm512_add_ps(_mm512_mul_ps(values, d), m);
                let idx = nibble_indices(b[r].add(4));
                idx.map(|i| _mm512_permutexvar_ps(i, table))
            }),
        );
    });
}

/// The 32 five-bit values of a Q5 block (`qh` at `h`, nibbles at `qs`) as lookup indices:
/// elements 0..16, then 16..32.
///
/// # Safety
/// `h` must point at 4 readable bytes, `qs` at 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn five_bit_indices(h: *const u8, qs: *const u8) -> [__m512i; 2] {
    let qh = h.cast::<u32>().read_unaligned();
    let sixteen = _mm512_set1_epi32(16);
    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast()));
    let lo = _mm512_and_si512(q, _mm512_set1_epi32(0xF));
    let hi = _mm512_srli_epi32::<4>(q);
    [
        _mm512_mask_or_epi32(lo, qh as u16, lo, sixteen),
        _mm512_mask_or_epi32(hi, (qh >> 16) as u16, hi, sixteen),
    ]
}

/// `table[idx]` per lane, from a 32-entry table in two vectors (entries 0..16, 16..32).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lookup32(table: [__m512; 2], idx: __m512i) -> __m512 {
    _mm512_permutex2var_ps(table[0], idx, table[1])
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q5_0<const R: usize>(rows: [&[u8]; R], mut f: impl FnMut(usize, [Acc; R])) {
    let sixteen = _mm512_set1_ps(16.0);
    let values = [
        _mm512_sub_ps(iota16(), sixteen),
        _mm512_sub_ps(_mm512_add_ps(iota16(), sixteen), sixteen),
    ];
    for_each_block::<R, 1>(rows, 22, |i, b, scales| {
        f(
            32 * i,
            std::array::from_fn(|r| {
                let table = values.map(|v| _mm512_mul_ps(v, scales[r][0]));
                let idx = five_bit_indices(b[r].add(2), b[r].add(6));
                idx.map(|i| lookup32(table, i))
            }),
        );
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q5_1<const R: usize>(rows: [&[u8]; R], mut f: impl FnMut(usize, [Acc; R])) {
    let values = [iota16(), _mm512_add_ps(iota16(), _mm512_set1_ps(16.0))];
    for_each_block::<R, 2>(rows, 24, |i, b, scales| {
        f(
            32 * i,
            std::array::from_fn(|r| {
                let [d, m] = scales[r];
                let table = values.map(|v| _mm512_add_ps(_mm512_mul_ps(v, d), m));
                let idx = five_bit_indices(b[r].add(4), b[r].add(8));
                idx.map(|i| lookup32(table, i))
            }),
        );
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q8_0<const R: usize>(rows: [&[u8]; R], mut f: impl FnMut(usize, [Acc; R])) {
    for_each_block::<R, 1>(rows, 34, |i, b, scales| {
        f(
            32 * i,
            std::array::from_fn(|r| {
                let (p, d) = (b[r].add(2), scales[r][0]);
                let q0 = i8_f32(_mm_loadu_si128(p.cast()));
                let q1 = i8_f32(_mm_loadu_si128(p.add(16).cast()));
                [_mm512_mul_ps(q0, d), _mm512_mul_ps(q1, d)]
            }),
        );
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_k(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let values = iota16();
    for (i, b) in row.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16_at(b.as_ptr()), f16_at(b.as_ptr().add(2)));
        let scales = &b[4..16];
        for c in 0..4 {
            // Elements 64c .. 64c + 32 are the low nibbles of these 32 bytes, then the high ones.
            let p = b.as_ptr().add(16 + 32 * c);
            let [lo0, hi0] = nibble_indices(p);
            let [lo1, hi1] = nibble_indices(p.add(16));
            for (h, idx) in [[lo0, lo1], [hi0, hi1]].into_iter().enumerate() {
                let (sc, m) = scale_min_k4(2 * c + h, scales);
                let ds = _mm512_set1_ps(d * sc as f32);
                let dm = _mm512_set1_ps(dmin * m as f32);
                let table = _mm512_sub_ps(_mm512_mul_ps(values, ds), dm);
                f(
                    QK_K * i + 64 * c + 32 * h,
                    idx.map(|i| _mm512_permutexvar_ps(i, table)),
                );
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q6_k(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let k32 = _mm256_set1_epi8(32);
    for (i, b) in row.chunks_exact(210).enumerate() {
        let d = f16_at(b.as_ptr().add(208));
        let p = b.as_ptr();
        for n in 0..2 {
            let q = super::x86::q6_k_unpack(p, n);
            for (k, q) in q.into_iter().enumerate() {
                let s = 192 + 8 * n + 2 * k;
                let ds0 = _mm512_set1_ps(d * b[s] as i8 as f32);
                let ds1 = _mm512_set1_ps(d * b[s + 1] as i8 as f32);
                let v = _mm256_sub_epi8(q, k32);
                let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                f(
                    QK_K * i + 128 * n + 32 * k,
                    [
                        _mm512_mul_ps(i8_f32(lo), ds0),
                        _mm512_mul_ps(i8_f32(hi), ds1),
                    ],
                );
            }
        }
    }
}

/// Generates, for one decoder, a module with `dot`, `dot2` and `dequant` (see the AVX2 module's
/// `block_kernels`), and for decoders of several rows in lockstep (`rows`) also `dot4`: four
/// rows against one token, each row's sums in its own accumulators. `# Safety` for each:
/// AVX-512 F/BW/VL, AVX2, FMA, F16C, matching sizes.
macro_rules! block_kernels {
    ($name:ident, $decode:ident) => {
        mod $name {
            use super::*;

            block_kernels!(@one_row $decode);
        }
    };
    ($name:ident, $decode:ident, rows) => {
        mod $name {
            use super::*;

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
            #[inline]
            unsafe fn one_row(row: &[u8], mut f: impl FnMut(usize, Acc)) {
                $decode([row], |i, [w]| f(i, w));
            }

            block_kernels!(@one_row one_row);

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
            pub(super) unsafe fn dot4(rows: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
                let mut acc = [[_mm512_setzero_ps(); 2]; 4];
                $decode(rows, |i, w| {
                    for (acc, w) in acc.iter_mut().zip(w) {
                        fma32(acc, w, x.as_ptr().add(i));
                    }
                });
                [fold(acc[0]), fold(acc[1]), fold(acc[2]), fold(acc[3])]
            }
        }
    };
    (@one_row $decode:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        pub(super) unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
            let mut acc = [_mm512_setzero_ps(); 2];
            $decode(row, |i, w| fma32(&mut acc, w, x.as_ptr().add(i)));
            fold(acc)
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        pub(super) unsafe fn dot2(row: &[u8], x0: &[f32], x1: &[f32]) -> [f32; 2] {
            let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
            $decode(row, |i, w| {
                fma32(&mut acc0, w, x0.as_ptr().add(i));
                fma32(&mut acc1, w, x1.as_ptr().add(i));
            });
            [fold(acc0), fold(acc1)]
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        pub(super) unsafe fn dequant(row: &[u8], y: &mut [f32]) {
            $decode(row, |i, w| store32(y.as_mut_ptr().add(i), w));
        }
    };
}

block_kernels!(q4_0, decode_q4_0, rows);
block_kernels!(q4_1, decode_q4_1, rows);
block_kernels!(q5_0, decode_q5_0, rows);
block_kernels!(q5_1, decode_q5_1, rows);
block_kernels!(q8_0, decode_q8_0, rows);
block_kernels!(q4_k, decode_q4_k);
block_kernels!(q6_k, decode_q6_k);

/// Checks the sizes the kernels rely on: they read and write through pointers.
#[inline(always)]
fn check(dtype: DType, row: &[u8], n: usize) {
    assert_eq!(dtype.row_bytes(n), Some(row.len()), "row kernel: bad sizes");
}

/// Safe entry points for one dtype's kernels.
macro_rules! entry {
    ($dtype:expr, $name:ident) => {
        RowKernels {
            dot: |r, x| {
                check($dtype, r, x.len());
                // SAFETY: see `row_kernels`; sizes checked.
                unsafe { $name::dot(r, x) }
            },
            dot2: |r, x0, x1| {
                check($dtype, r, x0.len());
                check($dtype, r, x1.len());
                // SAFETY: see `row_kernels`; sizes checked.
                unsafe { $name::dot2(r, x0, x1) }
            },
            dequantize: |r, y| {
                check($dtype, r, y.len());
                // SAFETY: see `row_kernels`; sizes checked.
                unsafe { $name::dequant(r, y) }
            },
            dot4: None,
        }
    };
    ($dtype:expr, $name:ident, rows) => {
        RowKernels {
            dot4: Some(|rows, x| {
                for r in rows {
                    check($dtype, r, x.len());
                }
                // SAFETY: see `row_kernels`; sizes checked.
                unsafe { $name::dot4(rows, x) }
            }),
            ..entry!($dtype, $name)
        }
    };
}

/// The AVX-512 kernels for `dtype`, if there are any. Reachable only through
/// `super::row_kernels_at`, which hands them out only once `has_avx512` confirmed the features.
pub(super) fn row_kernels(dtype: DType) -> Option<RowKernels> {
    Some(match dtype {
        DType::Q4_0 => entry!(DType::Q4_0, q4_0, rows),
        DType::Q4_1 => entry!(DType::Q4_1, q4_1, rows),
        DType::Q5_0 => entry!(DType::Q5_0, q5_0, rows),
        DType::Q5_1 => entry!(DType::Q5_1, q5_1, rows),
        DType::Q8_0 => entry!(DType::Q8_0, q8_0, rows),
        DType::Q4K => entry!(DType::Q4K, q4_k),
        DType::Q6K => entry!(DType::Q6K, q6_k),
        _ => return None,
    })
}

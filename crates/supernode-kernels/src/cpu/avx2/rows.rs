//! AVX2 fused row kernels: a quantised (or f16, bf16, f32) row decoded block by block in
//! registers and dotted, or stored, without materialising it.
//!
//! Invariant: each decoder computes the values with exactly the float operations of
//! [`crate::quant`]'s scalar dequantisers and feeds them to the lanes of
//! [`crate::simd::dot_f32`] in element order, so every kernel equals `dot_f32` of the dequantised
//! row bit for bit.

use std::arch::x86_64::*;

use super::{fma32, fold, load32, prefetch, Acc};
use crate::dtype::{DType, QK_K};
use crate::quant::scale_min_k4;
use crate::simd::order::{add_tail, LANES};
use crate::simd::rows::RowKernels;

/// The two f16 at `p` (a block's scale and min; blocks with one scale take the first), each
/// broadcast to 8 lanes (exact widening): one conversion of the pair, then in-lane
/// duplication, cheaper than two broadcasts and conversions.
///
/// # Safety
/// AVX2 and F16C; `p` must point at 4 readable bytes.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn splat_f16_pair(p: *const u8) -> (__m256, __m256) {
    let pair = _mm256_cvtph_ps(_mm_set1_epi32(p.cast::<i32>().read_unaligned()));
    (_mm256_moveldup_ps(pair), _mm256_movehdup_ps(pair))
}

/// The f16 at `p` as a scalar f32 (exact widening).
///
/// # Safety
/// AVX2 and F16C; `p` must point at 2 readable bytes.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16_scalar(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(
        p.cast::<i16>().read_unaligned(),
    )))
}

/// The 32 bytes of `v`, in order, zero-extended and converted to floats.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn u8x32_to_f32(v: __m256i) -> Acc {
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    [
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo))),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi))),
    ]
}

/// As [`u8x32_to_f32`], sign-extending.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn i8x32_to_f32(v: __m256i) -> Acc {
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))),
    ]
}

/// Elements 0..16 (low nibbles) then 16..32 (high nibbles) of a 16-byte nibble block.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles16(qs: __m128i) -> __m256i {
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(qs, m);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), m);
    _mm256_set_m128i(hi, lo)
}

/// Store 32 values at `y[0..32]`.
///
/// # Safety
/// AVX2; `y` must point at 32 writable floats.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store32(y: *mut f32, w: Acc) {
    _mm256_storeu_ps(y, w[0]);
    _mm256_storeu_ps(y.add(8), w[1]);
    _mm256_storeu_ps(y.add(16), w[2]);
    _mm256_storeu_ps(y.add(24), w[3]);
}

// Decoders: each walks a row and hands every run of 32 consecutive values, with the index
// of its first element, to `f`. The values are computed with exactly the float operations of
// `crate::quant`'s scalar dequantisers. The plain-float decoders cover the first
// `32 * (n / 32)` elements; the caller handles the tail.
//
// # Safety (all decoders)
// AVX2, FMA and F16C; `row` holds whole blocks (plain floats: at least `n` elements).

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_f32(row: &[u8], n: usize, mut f: impl FnMut(usize, Acc)) {
    let p = row.as_ptr().cast::<f32>();
    for i in (0..n / LANES * LANES).step_by(LANES) {
        f(i, load32(p.add(i)));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_f16(row: &[u8], n: usize, mut f: impl FnMut(usize, Acc)) {
    for i in (0..n / LANES * LANES).step_by(LANES) {
        let h = row.as_ptr().add(2 * i);
        f(
            i,
            [
                _mm256_cvtph_ps(_mm_loadu_si128(h.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(h.add(16).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(h.add(32).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(h.add(48).cast())),
            ],
        );
    }
}

/// Eight bf16 at `p` widened to f32 (exact).
///
/// # Safety
/// AVX2; `p` must point at 16 readable bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bf16x8(p: *const u8) -> __m256 {
    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_bf16(row: &[u8], n: usize, mut f: impl FnMut(usize, Acc)) {
    for i in (0..n / LANES * LANES).step_by(LANES) {
        let h = row.as_ptr().add(2 * i);
        f(
            i,
            [
                bf16x8(h),
                bf16x8(h.add(16)),
                bf16x8(h.add(32)),
                bf16x8(h.add(48)),
            ],
        );
    }
}

/// Bytes `p[0..8]` zero-extended to 8 lanes.
///
/// # Safety
/// AVX2; `p` must point at 8 readable bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn u8x8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()))
}

/// As [`u8x8`], sign-extending.
///
/// # Safety
/// AVX2; `p` must point at 8 readable bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn i8x8(p: *const u8) -> __m256i {
    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))
}

/// The 32 nibbles of the 16 bytes at `p` as four vectors of 8 lanes, in element order: the low
/// nibbles of bytes 0..16 (elements 0..16), then the high ones.
///
/// # Safety
/// AVX2; `p` must point at 16 readable bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles32(p: *const u8) -> [__m256i; 4] {
    let (lo, hi) = (u8x8(p), u8x8(p.add(8)));
    let m4 = _mm256_set1_epi32(0xF);
    [
        _mm256_and_si256(lo, m4),
        _mm256_and_si256(hi, m4),
        _mm256_srli_epi32::<4>(lo),
        _mm256_srli_epi32::<4>(hi),
    ]
}

/// `f(i, b)` for every block `b` (index `i`) of `size` bytes of `row`, asking for the bytes
/// ahead of each ([`prefetch`]).
///
/// # Safety
/// AVX2; `row` holds whole blocks.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn for_each_block(row: &[u8], size: usize, mut f: impl FnMut(usize, *const u8)) {
    for (i, b) in row.chunks_exact(size).enumerate() {
        prefetch(b.as_ptr(), size);
        f(i, b.as_ptr());
    }
}

/// The Q4_0 block at `b`.
///
/// # Safety
/// AVX2, FMA and F16C; `b` must point at a whole block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_0_block(b: *const u8) -> Acc {
    let d = splat_f16_pair(b).0;
    let eight = _mm256_set1_epi32(8);
    nibbles32(b.add(2)).map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight)), d))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    for_each_block(row, 18, |i, b| f(32 * i, q4_0_block(b)));
}

/// The Q4_1 block at `b`. `q * d` is exact (a 4-bit integer times an f16), so
/// `fma(q, d, m)` rounds once, as the scalar `q * d + m` does: the same value, signed zeros
/// included.
///
/// # Safety
/// AVX2, FMA and F16C; `b` must point at a whole block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_1_block(b: *const u8) -> Acc {
    let (d, m) = splat_f16_pair(b);
    nibbles32(b.add(4)).map(|q| _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_1(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    for_each_block(row, 20, |i, b| f(32 * i, q4_1_block(b)));
}

/// The five-bit values of a Q5 block: the 16 nibble bytes at `qs` (elements 0..16 low nibbles,
/// 16..32 high) with bit `e` of `qh` as bit 4 of element `e`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q5_values(qh: u32, qs: *const u8) -> __m256i {
    // Byte e of the broadcast word holds bit e of `qh` once masked with 1 << (e % 8).
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    let high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles16(_mm_loadu_si128(qs.cast())), high)
}

/// The Q5_0 block at `b`.
///
/// # Safety
/// AVX2, FMA and F16C; `b` must point at a whole block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q5_0_block(b: *const u8) -> Acc {
    let d = splat_f16_pair(b).0;
    let qh = b.add(2).cast::<u32>().read_unaligned();
    let q = _mm256_sub_epi8(q5_values(qh, b.add(6)), _mm256_set1_epi8(16));
    i8x32_to_f32(q).map(|q| _mm256_mul_ps(q, d))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q5_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    for_each_block(row, 22, |i, b| f(32 * i, q5_0_block(b)));
}

/// The Q5_1 block at `b`: `fma(q, d, m)`, exactly the scalar `q * d + m` (see [`q4_1_block`]; a
/// 5-bit `q` times an f16 is exact too).
///
/// # Safety
/// AVX2, FMA and F16C; `b` must point at a whole block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q5_1_block(b: *const u8) -> Acc {
    let (d, m) = splat_f16_pair(b);
    let qh = b.add(4).cast::<u32>().read_unaligned();
    u8x32_to_f32(q5_values(qh, b.add(8))).map(|q| _mm256_fmadd_ps(q, d, m))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q5_1(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    for_each_block(row, 24, |i, b| f(32 * i, q5_1_block(b)));
}

/// The Q8_0 block at `b`.
///
/// # Safety
/// AVX2, FMA and F16C; `b` must point at a whole block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_0_block(b: *const u8) -> Acc {
    let d = splat_f16_pair(b).0;
    [0, 8, 16, 24].map(|k| _mm256_mul_ps(_mm256_cvtepi32_ps(i8x8(b.add(2 + k))), d))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q8_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    for_each_block(row, 34, |i, b| f(32 * i, q8_0_block(b)));
}

/// The 2-bit fields at bit `2 j` of the 32 bytes `q` (`j` in 0..4), as bytes 0..4.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn two_bits(q: __m256i, j: usize) -> __m256i {
    let q = match j {
        0 => q,
        1 => _mm256_srli_epi16::<2>(q),
        2 => _mm256_srli_epi16::<4>(q),
        _ => _mm256_srli_epi16::<6>(q),
    };
    _mm256_and_si256(q, _mm256_set1_epi8(3))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q2_k(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    for (i, b) in row.chunks_exact(84).enumerate() {
        prefetch(b.as_ptr(), 84);
        let (d, dmin) = (
            f16_scalar(b.as_ptr().add(80)),
            f16_scalar(b.as_ptr().add(82)),
        );
        for n in 0..2 {
            let qs = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * n).cast());
            for j in 0..4 {
                // Elements 0..16 take the first scale byte, 16..32 the second. `q * dl` is
                // exact (2 bits times 4 bits times an f16), so one rounding of `q * dl - ml`
                // gives the scalar value.
                let q = u8x32_to_f32(two_bits(qs, j));
                let (s0, s1) = (b[8 * n + 2 * j], b[8 * n + 2 * j + 1]);
                let dl = |s: u8| _mm256_set1_ps(d * (s & 0xF) as f32);
                let ml = |s: u8| _mm256_set1_ps(dmin * (s >> 4) as f32);
                f(
                    QK_K * i + 128 * n + 32 * j,
                    [
                        _mm256_fmsub_ps(q[0], dl(s0), ml(s0)),
                        _mm256_fmsub_ps(q[1], dl(s0), ml(s0)),
                        _mm256_fmsub_ps(q[2], dl(s1), ml(s1)),
                        _mm256_fmsub_ps(q[3], dl(s1), ml(s1)),
                    ],
                );
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q3_k(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let four = _mm256_set1_epi8(4);
    for (i, b) in row.chunks_exact(110).enumerate() {
        prefetch(b.as_ptr(), 110);
        let scales = crate::quant::q3_k_scales(&b[96..108]);
        let d = f16_scalar(b.as_ptr().add(108));
        let hmask = _mm256_loadu_si256(b.as_ptr().cast());
        for n in 0..2 {
            let qs = _mm256_loadu_si256(b.as_ptr().add(32 + 32 * n).cast());
            for j in 0..4 {
                // low - 4 where the high bit is clear.
                let m = _mm256_set1_epi8((1u8 << (4 * n + j)) as i8);
                let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hmask, m), _mm256_setzero_si256());
                let q = _mm256_sub_epi8(two_bits(qs, j), _mm256_and_si256(clear, four));
                let q = i8x32_to_f32(q);
                let dl = |h: usize| _mm256_set1_ps(d * scales[8 * n + 2 * j + h] as f32);
                f(
                    QK_K * i + 128 * n + 32 * j,
                    [
                        _mm256_mul_ps(q[0], dl(0)),
                        _mm256_mul_ps(q[1], dl(0)),
                        _mm256_mul_ps(q[2], dl(1)),
                        _mm256_mul_ps(q[3], dl(1)),
                    ],
                );
            }
        }
    }
}

/// 0x10 in each byte of `qh` whose bit `bit` is set (the fifth bit of a Q5_K value).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn fifth_bit(qh: __m256i, bit: u32) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << bit) as i8);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Q4_K (`FIVE = false`) or Q5_K (`FIVE = true`: the fifth bits in `qh` at byte 16, the
/// nibbles from byte 48) rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_k<const FIVE: bool>(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let (bytes, qs) = if FIVE { (176, 48) } else { (144, 16) };
    let m4 = _mm256_set1_epi8(0x0F);
    for (i, b) in row.chunks_exact(bytes).enumerate() {
        prefetch(b.as_ptr(), bytes);
        let (d, dmin) = (f16_scalar(b.as_ptr()), f16_scalar(b.as_ptr().add(2)));
        let scales = &b[4..16];
        let qh = match FIVE {
            true => _mm256_loadu_si256(b.as_ptr().add(16).cast()),
            false => _mm256_setzero_si256(),
        };
        for c in 0..4 {
            let q = _mm256_loadu_si256(b.as_ptr().add(qs + 32 * c).cast());
            let mut halves = [
                _mm256_and_si256(q, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
            ];
            if FIVE {
                for (h, half) in halves.iter_mut().enumerate() {
                    *half = _mm256_or_si256(*half, fifth_bit(qh, (2 * c + h) as u32));
                }
            }
            for (h, q) in halves.into_iter().enumerate() {
                let (sc, m) = scale_min_k4(2 * c + h, scales);
                // `q * ds` is exact (a 4- or 5-bit `q` times a 6-bit scale times an f16), so one
                // rounding of `q * ds - dm` gives the scalar value.
                let (ds, dm) = (
                    _mm256_set1_ps(d * sc as f32),
                    _mm256_set1_ps(dmin * m as f32),
                );
                f(
                    QK_K * i + 64 * c + 32 * h,
                    u8x32_to_f32(q).map(|q| _mm256_fmsub_ps(q, ds, dm)),
                );
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_k(row: &[u8], f: impl FnMut(usize, Acc)) {
    decode_k::<false>(row, f)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q5_k(row: &[u8], f: impl FnMut(usize, Acc)) {
    decode_k::<true>(row, f)
}

/// The 6-bit quants of half `n` (0 or 1) of the Q6_K block at `p`, as four vectors of 32
/// unsigned bytes (0..64) in element order: ggml's `ql`/`qh` interleave undone.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn q6_k_unpack(p: *const u8, n: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x30);
    let ql0 = _mm256_loadu_si256(p.add(64 * n).cast());
    let ql1 = _mm256_loadu_si256(p.add(64 * n + 32).cast());
    let qh = _mm256_loadu_si256(p.add(128 + 32 * n).cast());
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, m4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
            _mm256_and_si256(qh, m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
        ),
    ]
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_q6_k(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let k32 = _mm256_set1_epi8(32);
    for (i, b) in row.chunks_exact(210).enumerate() {
        prefetch(b.as_ptr(), 210);
        let d = f16_scalar(b.as_ptr().add(208));
        let p = b.as_ptr();
        for n in 0..2 {
            let q = q6_k_unpack(p, n);
            for (k, q) in q.into_iter().enumerate() {
                let s = 192 + 8 * n + 2 * k;
                let ds0 = _mm256_set1_ps(d * b[s] as i8 as f32);
                let ds1 = _mm256_set1_ps(d * b[s + 1] as i8 as f32);
                let v = i8x32_to_f32(_mm256_sub_epi8(q, k32));
                f(
                    QK_K * i + 128 * n + 32 * k,
                    [
                        _mm256_mul_ps(v[0], ds0),
                        _mm256_mul_ps(v[1], ds0),
                        _mm256_mul_ps(v[2], ds1),
                        _mm256_mul_ps(v[3], ds1),
                    ],
                );
            }
        }
    }
}

/// `[dot(r, x) for r in rows]` for rows of 32-element blocks of `size` bytes, decoded by
/// `block` in lockstep: block `i` of every row, then block `i + 1`, each row's sums in its own
/// accumulators (in the lanes and order of `dot`), each block's activations loaded once.
///
/// # Safety
/// AVX2, FMA and F16C; every row holds `x.len() / 32` whole blocks, and `block` reads one.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows<const R: usize>(
    rows: [&[u8]; R],
    x: &[f32],
    size: usize,
    block: impl Fn(*const u8) -> Acc,
) -> [f32; R] {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for i in 0..x.len() / LANES {
        let xi = x.as_ptr().add(LANES * i);
        for (acc, row) in acc.iter_mut().zip(rows) {
            let b = row.as_ptr().add(size * i);
            prefetch(b, size);
            fma32(acc, block(b), xi);
        }
    }
    acc.map(|a| fold(a))
}

/// Generates, for one decoder, a module with the kernels of [`RowKernels`]: `dot`
/// (`dot_f32(dequantize(row), x)`), `dot2` (two tokens against one decode of the row),
/// `dequant` (into `y`); given the block decoder and size, also `dot4` (four rows against one
/// token, two at a time in lockstep, see [`dot_rows`]). Only Q5_0 has it: its long decode
/// gained 12% in single-token kbench; Q4_0, Q4_1, Q5_1 and Q8_0 lost 3-20% (with two rows'
/// accumulators, decoded values and scales in 16 registers the compiler spills), and four rows
/// in lockstep lost for every type. `# Safety` for each: AVX2, FMA, F16C and matching sizes.
macro_rules! block_kernels {
    ($name:ident, $decode:ident) => {
        mod $name {
            use super::*;

            block_kernels!(@one_row $decode);
        }
    };
    ($name:ident, $decode:ident, $block:ident, $size:expr) => {
        mod $name {
            use super::*;

            block_kernels!(@one_row $decode);

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn dot4(rows: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
                let [a, b, c, d] = rows;
                let [r0, r1] = dot_rows([a, b], x, $size, |p| $block(p));
                let [r2, r3] = dot_rows([c, d], x, $size, |p| $block(p));
                [r0, r1, r2, r3]
            }
        }
    };
    (@one_row $decode:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
            let mut acc = [_mm256_setzero_ps(); 4];
            $decode(row, |i, w| fma32(&mut acc, w, x.as_ptr().add(i)));
            fold(acc)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn dot2(row: &[u8], x0: &[f32], x1: &[f32]) -> [f32; 2] {
            let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            $decode(row, |i, w| {
                fma32(&mut acc0, w, x0.as_ptr().add(i));
                fma32(&mut acc1, w, x1.as_ptr().add(i));
            });
            [fold(acc0), fold(acc1)]
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn dequant(row: &[u8], y: &mut [f32]) {
            $decode(row, |i, w| store32(y.as_mut_ptr().add(i), w));
        }
    };
}

block_kernels!(q4_0, decode_q4_0);
block_kernels!(q4_1, decode_q4_1);
block_kernels!(q5_0, decode_q5_0, q5_0_block, 22);
block_kernels!(q5_1, decode_q5_1);
block_kernels!(q8_0, decode_q8_0);
block_kernels!(q4_k, decode_q4_k);
block_kernels!(q2_k, decode_q2_k);
block_kernels!(q3_k, decode_q3_k);
block_kernels!(q5_k, decode_q5_k);
block_kernels!(q6_k, decode_q6_k);

/// As [`block_kernels`], for plain floats: the tail past the last 32 elements goes through
/// the scalar dequantiser, and `dot` adds it after the tree, as `dot_f32` does.
macro_rules! float_kernels {
    ($name:ident, $dtype:expr, $decode:ident) => {
        mod $name {
            use super::*;

            /// The tail past the last 32 elements of `row`, dequantised.
            fn tail<'a>(row: &[u8], n: usize, buf: &'a mut [f32; LANES]) -> &'a [f32] {
                let main = n / LANES * LANES;
                let tail = &mut buf[..n - main];
                crate::quant::dequantize_row($dtype, &row[main * $dtype.block_bytes()..], tail);
                tail
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
                let mut acc = [_mm256_setzero_ps(); 4];
                $decode(row, x.len(), |i, w| fma32(&mut acc, w, x.as_ptr().add(i)));
                let main = x.len() / LANES * LANES;
                add_tail(fold(acc), tail(row, x.len(), &mut [0.0; LANES]), &x[main..])
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn dot2(row: &[u8], x0: &[f32], x1: &[f32]) -> [f32; 2] {
                let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                $decode(row, x0.len(), |i, w| {
                    fma32(&mut acc0, w, x0.as_ptr().add(i));
                    fma32(&mut acc1, w, x1.as_ptr().add(i));
                });
                let main = x0.len() / LANES * LANES;
                let mut buf = [0.0; LANES];
                let tail = tail(row, x0.len(), &mut buf);
                [
                    add_tail(fold(acc0), tail, &x0[main..]),
                    add_tail(fold(acc1), tail, &x1[main..]),
                ]
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn dequant(row: &[u8], y: &mut [f32]) {
                $decode(row, y.len(), |i, w| store32(y.as_mut_ptr().add(i), w));
                let main = y.len() / LANES * LANES;
                let rest = &row[main * $dtype.block_bytes()..];
                crate::quant::dequantize_row($dtype, rest, &mut y[main..]);
            }
        }
    };
}

float_kernels!(f32_row, DType::F32, decode_f32);
float_kernels!(f16_row, DType::F16, decode_f16);
float_kernels!(bf16_row, DType::BF16, decode_bf16);

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

/// The kernels for `dtype`. Reachable only through the AVX2 and AVX-512 tables, handed out
/// only once `crate::cpu::isa` found AVX2, FMA and F16C: that is what makes the wrappers'
/// calls sound.
pub(crate) fn row_kernels(dtype: DType) -> Option<RowKernels> {
    Some(match dtype {
        DType::F32 => entry!(DType::F32, f32_row),
        DType::F16 => entry!(DType::F16, f16_row),
        DType::BF16 => entry!(DType::BF16, bf16_row),
        DType::Q4_0 => entry!(DType::Q4_0, q4_0),
        DType::Q4_1 => entry!(DType::Q4_1, q4_1),
        DType::Q5_0 => entry!(DType::Q5_0, q5_0, rows),
        DType::Q5_1 => entry!(DType::Q5_1, q5_1),
        DType::Q8_0 => entry!(DType::Q8_0, q8_0),
        DType::Q4K => entry!(DType::Q4K, q4_k),
        DType::Q2K => entry!(DType::Q2K, q2_k),
        DType::Q3K => entry!(DType::Q3K, q3_k),
        DType::Q5K => entry!(DType::Q5K, q5_k),
        DType::Q6K => entry!(DType::Q6K, q6_k),
    })
}

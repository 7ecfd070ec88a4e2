//! AVX-512 VNNI kernels: up to [`DOT_ROWS`] weight rows times up to [`DOT_TOKENS`] tokens per
//! call, each (row, token) result bit-identical to the scalar reference.
//!
//! 32-element types (Q4_0, Q5_0, Q8_0 against Q8_0; Q4_1, Q5_1 against Q8_1) take the rows in
//! pairs: one 512-bit register holds a block of each row, `vpdpbusd` gives the 8 integer lanes of
//! 4 consecutive products of both (the lanes of the scalar reference, exact; signed weights go in
//! with an offset that makes them unsigned, taken off again in integers), and every float lane
//! then does the reference's operations, `acc + (d_w * d_x) * lane` (multiply, multiply, add),
//! block after block. Lanes never mix until the reference's `fold8`, done in scalar code at the
//! end, so the order is the reference's whatever the number of rows or tokens. An odd row is
//! paired with itself and its twin's result dropped.
//!
//! K-quants (Q4_K, Q5_K, Q6_K) go row by row in 256-bit registers (512-bit ones measured slower:
//! they take a vector port away and save no instruction here): `vpmaddubsw` then `vpdpwssd` with
//! the group scales build the exact super-block sum `sumi`; the float part is the reference's two
//! steps per super-block.
//!
//! Every `unsafe fn` needs AVX-512 F/BW/VL/VNNI (and the AVX2, FMA, F16C they imply here) and
//! rows and activations of matching sizes; the safe entries handed out by [`kernel`] check the
//! sizes and are only reachable once `quant_level` found the features.

use std::arch::x86_64::*;

use super::packed::{
    Act, Format, PANEL, Q4K_BYTES, Q4K_DMIN, Q4K_MINS, Q4K_QS, Q4K_SCALES, Q6K_BYTES, Q6K_QH,
    Q6K_QL, Q6K_SCALES,
};
use super::{fold8, BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel, DOT_ROWS, DOT_TOKENS};
use crate::dtype::DType;
use crate::quant::scale_min_k4;

/// Lanes `8 * h .. 8 * h + 8` of `v`, folded as the scalar reference's `fold8`.
#[inline(always)]
fn fold_half(v: &[f32; 16], h: usize) -> f32 {
    let mut lanes = [0f32; 8];
    lanes.copy_from_slice(&v[8 * h..8 * h + 8]);
    fold8(lanes)
}

/// The 16 nibble bytes of each of two blocks as 64 bytes in element order: the low nibbles of
/// `a`, its high nibbles, then the same for `b`.
///
/// # Safety
/// AVX-512 F/BW; `a` and `b` point at 16 readable bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn nibbles2(a: *const u8, b: *const u8) -> __m512i {
    let a = _mm256_broadcastsi128_si256(_mm_loadu_si128(a.cast()));
    let b = _mm256_broadcastsi128_si256(_mm_loadu_si128(b.cast()));
    let ab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
    let shifted = _mm512_srlv_epi64(ab, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    _mm512_and_si512(shifted, _mm512_set1_epi8(0xF))
}

/// The 32-bit words at `a` and `b` as one 64-bit word (`a` low): a byte mask for two blocks'
/// fifth bits, or two blocks' f16 pairs.
///
/// # Safety
/// Both point at 4 readable bytes.
#[inline(always)]
unsafe fn words2(a: *const u8, b: *const u8) -> u64 {
    let lo = a.cast::<u32>().read_unaligned() as u64;
    let hi = b.cast::<u32>().read_unaligned() as u64;
    lo | hi << 32
}

/// The f16 pairs at `a` and `b`, widened: `[a0, a1, b0, b1]`.
///
/// # Safety
/// F16C; both point at 4 readable bytes.
#[target_feature(enable = "avx512f,avx512vl,f16c")]
#[inline]
unsafe fn f16_pairs(a: *const u8, b: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi64_si128(words2(a, b) as i64))
}

/// `v[i]` in lanes 0..8 and `v[j]` in lanes 8..16.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn splat2<const I: i32, const J: i32>(v: __m128) -> __m512 {
    let idx = _mm512_set_epi32(J, J, J, J, J, J, J, J, I, I, I, I, I, I, I, I);
    _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
}

/// The 32 quants of `y` in both 256-bit halves.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn acts2(qs: *const i8) -> __m512i {
    _mm512_broadcast_i64x4(_mm256_loadu_si256(qs.cast()))
}

/// `acc + (dw * dx) * lanes`, the reference's steps on every lane.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn add_scaled(acc: __m512, dw: __m512, dx: &f32, lanes: __m512i) -> __m512 {
    let d = _mm512_mul_ps(dw, _mm512_set1_ps(*dx));
    _mm512_add_ps(acc, _mm512_mul_ps(d, _mm512_cvtepi32_ps(lanes)))
}

/// `P` row pairs of a signed 32-element type against `N` tokens of Q8_0: `values(a, b)` gives
/// the 64 weights of the blocks at `a` and `b` plus `offset` (as unsigned bytes), and each lane
/// is `Σ (w + offset) x - offset Σ x`, exactly `Σ w x`; the second term is computed once per
/// token and block for all the rows. Returns `[pair][row of pair][token]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn tile_q8_0<const P: usize, const N: usize>(
    rows: [[*const u8; 2]; P],
    blocks: usize,
    bytes: usize,
    offset: u8,
    ys: [&[BlockQ8_0]; N],
    values: impl Fn(*const u8, *const u8) -> __m512i,
) -> [[[f32; N]; 2]; P] {
    let zero = _mm512_setzero_si512();
    let offsets = _mm512_set1_epi8(offset as i8);
    let mut acc = [[_mm512_setzero_ps(); N]; P];
    for i in 0..blocks {
        let mut xs = [zero; N];
        let mut base = [zero; N];
        for t in 0..N {
            xs[t] = acts2(ys[t].get_unchecked(i).qs.as_ptr());
            base[t] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offsets, xs[t]));
        }
        for p in 0..P {
            let (a, b) = (rows[p][0].add(i * bytes), rows[p][1].add(i * bytes));
            let w = values(a, b);
            let dw = splat2::<0, 2>(f16_pairs(a, b));
            for t in 0..N {
                let lanes = _mm512_dpbusd_epi32(base[t], w, xs[t]);
                acc[p][t] = add_scaled(acc[p][t], dw, &ys[t].get_unchecked(i).d, lanes);
            }
        }
    }
    let mut out = [[[0f32; N]; 2]; P];
    for p in 0..P {
        for t in 0..N {
            let mut v = [0f32; 16];
            _mm512_storeu_ps(v.as_mut_ptr(), acc[p][t]);
            out[p][0][t] = fold_half(&v, 0);
            out[p][1][t] = fold_half(&v, 1);
        }
    }
    out
}

/// `P` row pairs of an unsigned 32-element type with a min (byte 2) against `N` tokens of Q8_1:
/// `values(a, b)` gives the 64 unsigned bytes. Returns `[pair][row of pair][token]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn tile_q8_1<const P: usize, const N: usize>(
    rows: [[*const u8; 2]; P],
    blocks: usize,
    bytes: usize,
    ys: [&[BlockQ8_1]; N],
    values: impl Fn(*const u8, *const u8) -> __m512i,
) -> [[[f32; N]; 2]; P] {
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); N]; P];
    // Lanes 0 and 1: the two rows' `Σ m_w * s_x`, each accumulated as the reference does.
    let mut summs = [[_mm_setzero_ps(); N]; P];
    for i in 0..blocks {
        for p in 0..P {
            let (a, b) = (rows[p][0].add(i * bytes), rows[p][1].add(i * bytes));
            let w = values(a, b);
            let dm = f16_pairs(a, b);
            let dw = splat2::<0, 2>(dm);
            let mw = _mm_shuffle_ps::<0b1101>(dm, dm);
            for t in 0..N {
                let y = ys[t].get_unchecked(i);
                let lanes = _mm512_dpbusd_epi32(zero, w, acts2(y.qs.as_ptr()));
                acc[p][t] = add_scaled(acc[p][t], dw, &y.d, lanes);
                summs[p][t] = _mm_add_ps(summs[p][t], _mm_mul_ps(mw, _mm_set1_ps(y.s)));
            }
        }
    }
    let mut out = [[[0f32; N]; 2]; P];
    for p in 0..P {
        for t in 0..N {
            let mut v = [0f32; 16];
            _mm512_storeu_ps(v.as_mut_ptr(), acc[p][t]);
            let mut s = [0f32; 4];
            _mm_storeu_ps(s.as_mut_ptr(), summs[p][t]);
            out[p][0][t] = fold_half(&v, 0) + s[0];
            out[p][1][t] = fold_half(&v, 1) + s[1];
        }
    }
    out
}

/// The 32-element kernels: `$tile` with the block size (and weight offset) and the decoder of
/// one type.
macro_rules! tile32 {
    ($name:ident, $tile:ident($($arg:expr),*), $block:ty, |$a:ident, $b:ident| $values:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $name<const P: usize, const N: usize>(
            rows: [[*const u8; 2]; P],
            blocks: usize,
            ys: [&[$block]; N],
        ) -> [[[f32; N]; 2]; P] {
            $tile(rows, blocks, $($arg,)* ys, |$a: *const u8, $b: *const u8| $values)
        }
    };
}

// Q4_0 holds `w + 8`, Q5_0 `w + 16` (nibble and fifth bit); Q8_0's `w + 128` is `w` with its
// sign bit flipped.
tile32!(q4_0, tile_q8_0(18, 8), BlockQ8_0, |a, b| nibbles2(
    a.add(2),
    b.add(2)
));
tile32!(q5_0, tile_q8_0(22, 16), BlockQ8_0, |a, b| {
    let nib = nibbles2(a.add(6), b.add(6));
    _mm512_mask_add_epi8(nib, words2(a.add(2), b.add(2)), nib, _mm512_set1_epi8(16))
});
tile32!(q8_0, tile_q8_0(34, 128), BlockQ8_0, |a, b| {
    let w = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_loadu_si256(a.add(2).cast())),
        _mm256_loadu_si256(b.add(2).cast()),
    );
    _mm512_xor_si512(w, _mm512_set1_epi8(-128))
});
tile32!(q4_1, tile_q8_1(20), BlockQ8_1, |a, b| nibbles2(
    a.add(4),
    b.add(4)
));
tile32!(q5_1, tile_q8_1(24), BlockQ8_1, |a, b| {
    let nib = nibbles2(a.add(8), b.add(8));
    _mm512_mask_add_epi8(nib, words2(a.add(4), b.add(4)), nib, _mm512_set1_epi8(0x10))
});

/// `acc = acc + (d_w * d_x) * sumi`, then `acc = acc - (dmin_w * d_x) * summ`.
#[inline(always)]
fn add_super_block(acc: &mut f32, dw: f32, dminw: f32, dx: f32, sumi: i32, summ: i32) {
    *acc += (dw * dx) * sumi as f32;
    *acc -= (dminw * dx) * summ as f32;
}

/// Q4_K (`FIVE = false`) or Q5_K (`FIVE = true`) row against `N` tokens: the AVX2 kernel's
/// shape, with `vpdpwssd` folding each scale multiply into the accumulation.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn dot_k4<const N: usize, const FIVE: bool>(
    row: *const u8,
    blocks: usize,
    ys: [&[BlockQ8K]; N],
) -> [f32; N] {
    let (bytes, qs) = if FIVE { (176, 48) } else { (144, 16) };
    let m4 = _mm256_set1_epi8(0xF);
    let bit5 = _mm256_set1_epi8(0x10);
    let mut acc = [0f32; N];
    for i in 0..blocks {
        let p = row.add(i * bytes);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
        let (dw, dminw) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
        let sc = std::slice::from_raw_parts(p.add(4), 12);
        let mut scales = [0i16; 8];
        let mut mins = [0i16; 8];
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, sc);
            (scales[j], mins[j]) = (s as i16, m as i16);
        }
        let qh = if FIVE {
            _mm256_loadu_si256(p.add(16).cast())
        } else {
            _mm256_setzero_si256()
        };
        // Two accumulators per token (low and high nibbles), so the chains stay short.
        let mut sumi = [[_mm256_setzero_si256(); 2]; N];
        for c in 0..4 {
            let q = _mm256_loadu_si256(p.add(qs + 32 * c).cast());
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
            if FIVE {
                // Bit 2c of qh[l] tops element 64c + l, bit 2c + 1 element 64c + 32 + l.
                let high = |bit: i32| {
                    let m = _mm256_set1_epi8(1 << bit);
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m), bit5)
                };
                lo = _mm256_or_si256(lo, high(2 * c as i32));
                hi = _mm256_or_si256(hi, high(2 * c as i32 + 1));
            }
            let (s_lo, s_hi) = (
                _mm256_set1_epi16(scales[2 * c]),
                _mm256_set1_epi16(scales[2 * c + 1]),
            );
            for t in 0..N {
                let x = ys[t].get_unchecked(i).qs.as_ptr().add(64 * c);
                let p_lo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x.cast()));
                let p_hi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(32).cast()));
                sumi[t][0] = _mm256_dpwssd_epi32(sumi[t][0], p_lo, s_lo);
                sumi[t][1] = _mm256_dpwssd_epi32(sumi[t][1], p_hi, s_hi);
            }
        }
        let mins = _mm_loadu_si128(mins.as_ptr().cast());
        for t in 0..N {
            let y = ys[t].get_unchecked(i);
            // Mins times the sums of each sub-block's two 16-element halves.
            let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
            let pairs = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            let summ = hsum4(_mm_madd_epi16(pairs, mins));
            let sumi = hsum8(_mm256_add_epi32(sumi[t][0], sumi[t][1]));
            add_super_block(&mut acc[t], dw, dminw, y.d, sumi, summ);
        }
    }
    acc
}

/// Sum of the 4 i32 lanes of `v` (exact).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum4(v: __m128i) -> i32 {
    let s = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
    _mm_cvtsi128_si32(s)
}

/// Sum of the 8 i32 lanes of `v` (exact).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum8(v: __m256i) -> i32 {
    hsum4(_mm_add_epi32(
        _mm256_castsi256_si128(v),
        _mm256_extracti128_si256::<1>(v),
    ))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_k<const N: usize>(row: *const u8, blocks: usize, ys: [&[BlockQ8K]; N]) -> [f32; N] {
    dot_k4::<N, false>(row, blocks, ys)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_k<const N: usize>(row: *const u8, blocks: usize, ys: [&[BlockQ8K]; N]) -> [f32; N] {
    dot_k4::<N, true>(row, blocks, ys)
}

/// Q6_K row against `N` tokens: the AVX2 kernel's shape, with `vpdpwssd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6_k<const N: usize>(row: *const u8, blocks: usize, ys: [&[BlockQ8K]; N]) -> [f32; N] {
    let mut acc = [0f32; N];
    for i in 0..blocks {
        let p = row.add(i * 210);
        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            p.add(208).cast::<u16>().read_unaligned() as i32,
        )));
        let scales = _mm_loadu_si128(p.add(192).cast());
        // sumi = Σ sc (q - 32) x = Σ sc q x - 32 Σ sc bsums: start from the second term.
        let sc16 = _mm256_cvtepi8_epi16(scales);
        let mut sumi = [[_mm256_setzero_si256(); 2]; N];
        for t in 0..N {
            let bs = _mm256_loadu_si256(ys[t].get_unchecked(i).bsums.as_ptr().cast());
            sumi[t][0] = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, sc16));
            sumi[t][0] = _mm256_sub_epi32(_mm256_setzero_si256(), sumi[t][0]);
        }
        for n in 0..2 {
            let q = crate::simd::x86::q6_k_unpack(p, n);
            for (k, q) in q.into_iter().enumerate() {
                // Scales of the two 16-element halves of these 32 elements, as 16 x i16.
                let g = (8 * n + 2 * k) as i64;
                let pick =
                    _mm_set_epi64x((g + 1) * 0x0101_0101_0101_0101, g * 0x0101_0101_0101_0101);
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                for t in 0..N {
                    let x = ys[t].get_unchecked(i).qs.as_ptr().add(128 * n + 32 * k);
                    let prod = _mm256_maddubs_epi16(q, _mm256_loadu_si256(x.cast()));
                    sumi[t][k % 2] = _mm256_dpwssd_epi32(sumi[t][k % 2], prod, sc);
                }
            }
        }
        for t in 0..N {
            let dx = ys[t].get_unchecked(i).d;
            let s = hsum8(_mm256_add_epi32(sumi[t][0], sumi[t][1]));
            add_super_block(&mut acc[t], dw, 0.0, dx, s, 0);
        }
    }
    acc
}

/// Checks a call's sizes: `1..=DOT_ROWS` rows of `blocks * bytes` bytes, `1..=DOT_TOKENS`
/// activation rows of `blocks` blocks, `rows * tokens` outputs. Returns `blocks`.
#[inline(always)]
fn check<A>(rows: &[&[u8]], ys: &[&[A]], out: &[f32], bytes: usize) -> usize {
    assert!(
        (1..=DOT_ROWS).contains(&rows.len()),
        "vec_dot: {} rows (1 to {DOT_ROWS} per call)",
        rows.len()
    );
    assert!(
        (1..=DOT_TOKENS).contains(&ys.len()),
        "vec_dot: {} tokens (1 to {DOT_TOKENS} per call)",
        ys.len()
    );
    let blocks = rows[0].len() / bytes;
    assert!(
        rows.iter().all(|r| r.len() == blocks * bytes),
        "vec_dot: row bytes"
    );
    assert!(
        ys.iter().all(|y| y.len() == blocks),
        "vec_dot: activation blocks"
    );
    assert_eq!(out.len(), rows.len() * ys.len(), "vec_dot: outputs");
    blocks
}

/// Safe entry for a row-pair kernel: takes the rows 8 at a time for one or two tokens, 4 at a time
/// for more (what the registers hold), pairs them (an odd last one with itself) and runs the
/// version for the pair and token counts.
macro_rules! entry32 {
    ($kernel:ident, $block:ty, $bytes:expr) => {
        |rows: &[&[u8]], ys: &[&[$block]], out: &mut [f32]| {
            let blocks = check(rows, ys, out, $bytes);
            let n = ys.len();
            let step = if n <= 2 { 8 } else { 4 };
            for (rows, out) in rows.chunks(step).zip(out.chunks_mut(step * n)) {
                let r = |k: usize| rows[k.min(rows.len() - 1)].as_ptr();
                macro_rules! go {
                    ($p:literal, $n:literal) => {{
                        let pairs: [[*const u8; 2]; $p] =
                            std::array::from_fn(|p| [r(2 * p), r(2 * p + 1)]);
                        let ys: [&[$block]; $n] = std::array::from_fn(|t| ys[t]);
                        // SAFETY: `kernel` is only handed out once `quant_level` found AVX-512
                        // F, BW, VL and VNNI; every row and activation row has `blocks` blocks
                        // (checked).
                        let res = unsafe { $kernel::<$p, $n>(pairs, blocks, ys) };
                        for (k, o) in out.chunks_exact_mut(n).enumerate() {
                            o.copy_from_slice(&res[k / 2][k % 2]);
                        }
                    }};
                }
                match (rows.len().div_ceil(2), n) {
                    (1, 1) => go!(1, 1),
                    (1, 2) => go!(1, 2),
                    (1, 3) => go!(1, 3),
                    (1, 4) => go!(1, 4),
                    (2, 1) => go!(2, 1),
                    (2, 2) => go!(2, 2),
                    (2, 3) => go!(2, 3),
                    (2, 4) => go!(2, 4),
                    (3, 1) => go!(3, 1),
                    (3, 2) => go!(3, 2),
                    (4, 1) => go!(4, 1),
                    (4, 2) => go!(4, 2),
                    shape => unreachable!("row pairs and tokens {shape:?}"),
                }
            }
        }
    };
}

/// Safe entry for a one-row kernel, run row after row.
macro_rules! entry_k {
    ($kernel:ident, $bytes:expr) => {
        |rows: &[&[u8]], ys: &[&[BlockQ8K]], out: &mut [f32]| {
            let blocks = check(rows, ys, out, $bytes);
            for (row, o) in rows.iter().zip(out.chunks_exact_mut(ys.len())) {
                let row = row.as_ptr();
                // SAFETY: as in `entry32`.
                unsafe {
                    match ys.len() {
                        1 => o.copy_from_slice(&$kernel::<1>(row, blocks, [ys[0]])),
                        2 => o.copy_from_slice(&$kernel::<2>(row, blocks, [ys[0], ys[1]])),
                        3 => o.copy_from_slice(&$kernel::<3>(row, blocks, [ys[0], ys[1], ys[2]])),
                        _ => o.copy_from_slice(&$kernel::<4>(
                            row,
                            blocks,
                            [ys[0], ys[1], ys[2], ys[3]],
                        )),
                    }
                }
            }
        }
    };
}

/// The AVX-512 VNNI kernel for `dtype`, if there is one. Reachable only through
/// `super::quant_kernel_at`, which hands it out only when `quant_level` found the features.
pub(super) fn kernel(dtype: DType) -> Option<QuantKernel> {
    Some(match dtype {
        DType::Q4_0 => QuantKernel::Q8_0(entry32!(q4_0, BlockQ8_0, 18)),
        DType::Q5_0 => QuantKernel::Q8_0(entry32!(q5_0, BlockQ8_0, 22)),
        DType::Q8_0 => QuantKernel::Q8_0(entry32!(q8_0, BlockQ8_0, 34)),
        DType::Q4_1 => QuantKernel::Q8_1(entry32!(q4_1, BlockQ8_1, 20)),
        DType::Q5_1 => QuantKernel::Q8_1(entry32!(q5_1, BlockQ8_1, 24)),
        DType::Q4K => QuantKernel::Q8K(entry_k!(q4_k, 144)),
        DType::Q5K => QuantKernel::Q8K(entry_k!(q5_k, 176)),
        DType::Q6K => QuantKernel::Q8K(entry_k!(q6_k, 210)),
        _ => return None,
    })
}

/// The 8 groups of a packed panel-block's stored weights (unsigned bytes; lane `r`, byte `j` of
/// group `g` is element `4g + j` of row `r`), for format `F` (see [`super::packed::Format`]).
///
/// # Safety
/// AVX-512 F/BW; `p` points at a whole panel-block of the format.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn panel_values<const F: u8>(p: *const u8) -> [__m512i; 8] {
    let fmt = format_of::<F>();
    let (_, qh_off, qs_off) = fmt.offsets();
    let q = p.add(qs_off);
    if fmt == Format::Q8_0 {
        return std::array::from_fn(|g| _mm512_loadu_si512(q.add(64 * g).cast()));
    }
    let m4 = _mm512_set1_epi8(0xF);
    let mut w = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        let raw = _mm512_loadu_si512(q.add(64 * k).cast());
        w[k] = _mm512_and_si512(raw, m4);
        w[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4);
    }
    if matches!(fmt, Format::Q5_0 | Format::Q5_1) {
        let bit5 = _mm512_set1_epi8(0x10);
        for (g, v) in w.iter_mut().enumerate() {
            let mask = p.add(qh_off + 8 * g).cast::<u64>().read_unaligned();
            *v = _mm512_mask_add_epi8(*v, mask, *v, bit5);
        }
    }
    w
}

/// The packed format numbered `F` (a const generic stands in for the enum).
#[inline(always)]
const fn format_of<const F: u8>() -> Format {
    match F {
        0 => Format::Q4_0,
        1 => Format::Q4_1,
        2 => Format::Q5_0,
        3 => Format::Q5_1,
        _ => Format::Q8_0,
    }
}

/// How far ahead of the block they are on the panel kernels ask for their weights.
const PREFETCH_BYTES: usize = 4096;

/// Asks for the `bytes` of panel data [`PREFETCH_BYTES`] past `p`. A decode step streams every
/// weight once, and the hardware prefetchers alone left the kernels waiting on memory at each
/// block (single-stream decode ran a third slower without this). Prefetches never fault, so
/// the addresses may run past the matrix.
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8, bytes: usize) {
    let ahead = p.wrapping_add(PREFETCH_BYTES);
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
    }
}

/// `N` tokens against one panel of format `F`: per block, 8 `vpdpbusd` per token give the 16
/// rows' exact block sums, then `acc = acc + (d_w * d_x) * isum` (plus `m_w * s_x` for types
/// with a min) on all 16 rows at once: [`super::packed::dot_row`]'s steps, lane by lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn panel_n<const F: u8, const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [__m512; N] {
    let fmt = format_of::<F>();
    let min = fmt.has_min();
    let (m_off, _, _) = fmt.offsets();
    let block_bytes = PANEL * fmt.block_bytes();
    // Each token's first activation block and (Q8_0) block sums, as plain pointers, so that
    // the loop has no branch on the activation type: `d` at byte 0 of a block, `s` (Q8_1) at
    // byte 4, the quants after.
    let (stride, qs_off) = if min {
        (
            std::mem::size_of::<BlockQ8_1>(),
            std::mem::offset_of!(BlockQ8_1, qs),
        )
    } else {
        (
            std::mem::size_of::<BlockQ8_0>(),
            std::mem::offset_of!(BlockQ8_0, qs),
        )
    };
    let ys: [*const u8; N] = std::array::from_fn(|t| match acts[t] {
        Act::Q8_0(ys, _) => ys.as_ptr().cast(),
        Act::Q8_1(ys) => ys.as_ptr().cast(),
        Act::Q8K(ys, _) => ys.as_ptr().cast(),
    });
    let sums: [*const i32; N] = std::array::from_fn(|t| match acts[t] {
        Act::Q8_0(_, sums) => sums.as_ptr(),
        _ => std::ptr::null(),
    });
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let pb = p.add(b * block_bytes);
        prefetch_ahead(pb, block_bytes);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(pb.cast()));
        let mw = if min {
            _mm512_cvtph_ps(_mm256_loadu_si256(pb.add(m_off).cast()))
        } else {
            _mm512_setzero_ps()
        };
        let w = panel_values::<F>(pb);
        for t in 0..N {
            let y = ys[t].add(b * stride);
            let qs = y.add(qs_off);
            let x = |g: usize| _mm512_set1_epi32(qs.add(4 * g).cast::<i32>().read_unaligned());
            let mut even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], x(0));
            let mut odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], x(1));
            for g in (2..8).step_by(2) {
                even = _mm512_dpbusd_epi32(even, w[g], x(g));
                odd = _mm512_dpbusd_epi32(odd, w[g + 1], x(g + 1));
            }
            let mut isum = _mm512_add_epi32(even, odd);
            if !min {
                let corr = fmt.offset() * *sums[t].add(b);
                isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(corr));
            }
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(y.cast::<f32>().read()));
            let mut term = _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum));
            if min {
                let sx = _mm512_set1_ps(y.add(4).cast::<f32>().read());
                term = _mm512_add_ps(term, _mm512_mul_ps(mw, sx));
            }
            acc[t] = _mm512_add_ps(acc[t], term);
        }
    }
    acc
}

/// Each token's Q8_K blocks and sub-block sums, as plain pointers.
#[inline(always)]
fn k_acts<const N: usize>(acts: [Act<'_>; N]) -> ([*const BlockQ8K; N], [*const i16; N]) {
    let ys = std::array::from_fn(|t| match acts[t] {
        Act::Q8K(ys, _) => ys.as_ptr(),
        _ => unreachable!("K-quants meet Q8_K"),
    });
    let sums = std::array::from_fn(|t| match acts[t] {
        Act::Q8K(_, sums) => sums.as_ptr(),
        _ => unreachable!("K-quants meet Q8_K"),
    });
    (ys, sums)
}

/// 4 activations at `p` broadcast to every 32-bit lane.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// `N` tokens against one Q4_K panel: per super-block, for each pair of sub-blocks (a chunk of
/// the row's nibble bytes) 8 `vpdpbusd` per sub-block give the 16 rows' exact sub-block sums,
/// multiplied by their scales into `sumi`; 4 `vpdpwssd` give `summ` (mins times the activation
/// sub-block sums); then the scalar `vec_dot_q4_k_q8_k`'s two float steps on 16 rows at once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn panel_q4_k<const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [__m512; N] {
    let (ys, sums) = k_acts(acts);
    let m4 = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let pb = p.add(b * Q4K_BYTES);
        prefetch_ahead(pb, Q4K_BYTES);
        let mut sumi = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            let q = pb.add(Q4K_QS + 512 * c);
            let raw: [__m512i; 8] =
                std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k).cast()));
            let lo = raw.map(|r| _mm512_and_si512(r, m4));
            let hi = raw.map(|r| _mm512_and_si512(_mm512_srli_epi16::<4>(r), m4));
            let scale = |j: usize| {
                _mm512_cvtepu8_epi32(_mm_loadu_si128(pb.add(Q4K_SCALES + 16 * j).cast()))
            };
            let (s_lo, s_hi) = (scale(2 * c), scale(2 * c + 1));
            for t in 0..N {
                let x = (*ys[t].add(b)).qs.as_ptr().add(64 * c);
                let mut a = _mm512_setzero_si512();
                let mut h = _mm512_setzero_si512();
                for k in 0..8 {
                    a = _mm512_dpbusd_epi32(a, lo[k], bcast4(x.add(4 * k)));
                    h = _mm512_dpbusd_epi32(h, hi[k], bcast4(x.add(32 + 4 * k)));
                }
                let scaled =
                    _mm512_add_epi32(_mm512_mullo_epi32(a, s_lo), _mm512_mullo_epi32(h, s_hi));
                sumi[t] = _mm512_add_epi32(sumi[t], scaled);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(pb.cast()));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(pb.add(Q4K_DMIN).cast()));
        let mins: [__m512i; 4] = std::array::from_fn(|j| {
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(pb.add(Q4K_MINS + 32 * j).cast()))
        });
        for t in 0..N {
            let s = sums[t].add(8 * b);
            let mut summ = _mm512_setzero_si512();
            for (j, m) in mins.iter().enumerate() {
                let pair = _mm512_set1_epi32(s.add(2 * j).cast::<i32>().read_unaligned());
                summ = _mm512_dpwssd_epi32(summ, *m, pair);
            }
            let dx = _mm512_set1_ps((*ys[t].add(b)).d);
            let term = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(sumi[t]));
            acc[t] = _mm512_add_ps(acc[t], term);
            let term = _mm512_mul_ps(_mm512_mul_ps(dmin, dx), _mm512_cvtepi32_ps(summ));
            acc[t] = _mm512_sub_ps(acc[t], term);
        }
    }
    acc
}

/// `N` tokens against one Q6_K panel: per pair of sub-blocks `s`, `s + 8` (four `ql` vectors and
/// their high bits), 4 `vpdpbusd` each give the 16 rows' sums of the unsigned six-bit values
/// times the activations; `32 Σ x` comes off (the `- 32` of each weight), the signed scale
/// multiplies, all exact in integers; then the scalar `vec_dot_q6_k_q8_k`'s float step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn panel_q6_k<const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [__m512; N] {
    let (ys, _) = k_acts(acts);
    let m4 = _mm512_set1_epi8(0xF);
    let m2 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let pb = p.add(b * Q6K_BYTES);
        prefetch_ahead(pb, Q6K_BYTES);
        let mut sumi = [_mm512_setzero_si512(); N];
        for s in 0..8 {
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for j in 0..4 {
                let v = 4 * s + j;
                let raw = _mm512_loadu_si512(pb.add(Q6K_QL + 64 * v).cast());
                let h = _mm512_loadu_si512(pb.add(Q6K_QH + 64 * (v % 16)).cast());
                // Group `v`'s high bits sit at bits 2i (i = v / 16), group `32 + v`'s at 4 + 2i:
                // both move to bits 4 and 5.
                let (h_lo, h_hi) = if v < 16 {
                    (_mm512_slli_epi16::<4>(h), h)
                } else {
                    (_mm512_slli_epi16::<2>(h), _mm512_srli_epi16::<2>(h))
                };
                lo[j] = _mm512_or_si512(_mm512_and_si512(raw, m4), _mm512_and_si512(h_lo, m2));
                hi[j] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4),
                    _mm512_and_si512(h_hi, m2),
                );
            }
            let scale = |k: usize| {
                _mm512_cvtepi8_epi32(_mm_loadu_si128(pb.add(Q6K_SCALES + 16 * k).cast()))
            };
            let (s_lo, s_hi) = (scale(s), scale(s + 8));
            for t in 0..N {
                let y = &*ys[t].add(b);
                let x = y.qs.as_ptr().add(16 * s);
                let mut a = _mm512_set1_epi32(-32 * i32::from(y.bsums[s]));
                let mut h = _mm512_set1_epi32(-32 * i32::from(y.bsums[s + 8]));
                for j in 0..4 {
                    a = _mm512_dpbusd_epi32(a, lo[j], bcast4(x.add(4 * j)));
                    h = _mm512_dpbusd_epi32(h, hi[j], bcast4(x.add(128 + 4 * j)));
                }
                let scaled =
                    _mm512_add_epi32(_mm512_mullo_epi32(a, s_lo), _mm512_mullo_epi32(h, s_hi));
                sumi[t] = _mm512_add_epi32(sumi[t], scaled);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(pb.cast()));
        for t in 0..N {
            let dx = _mm512_set1_ps((*ys[t].add(b)).d);
            let term = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(sumi[t]));
            acc[t] = _mm512_add_ps(acc[t], term);
        }
    }
    acc
}

/// `acts.len()` (1 to 4) tokens against one panel of `fmt`, into `out[t]`.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `p` holds `blocks` panel-blocks of `fmt`; each token has `blocks`
/// activation blocks of the type `fmt` meets (and, for Q8_0 and Q8_K, their sums).
pub(super) unsafe fn panel(
    fmt: Format,
    p: &[u8],
    blocks: usize,
    acts: &[Act<'_>],
    out: &mut [[f32; PANEL]],
) {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn run<const F: u8>(
        p: *const u8,
        blocks: usize,
        acts: &[Act<'_>],
        out: &mut [[f32; PANEL]],
    ) {
        macro_rules! go {
            ($n:literal) => {{
                let a = std::array::from_fn(|t| acts[t]);
                let res = match F {
                    5 => panel_q4_k::<$n>(p, blocks, a),
                    6 => panel_q6_k::<$n>(p, blocks, a),
                    _ => panel_n::<F, $n>(p, blocks, a),
                };
                for (o, v) in out.iter_mut().zip(res) {
                    _mm512_storeu_ps(o.as_mut_ptr(), v);
                }
            }};
        }
        match acts.len() {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            _ => go!(4),
        }
    }
    let p = p.as_ptr();
    match fmt {
        Format::Q4_0 => run::<0>(p, blocks, acts, out),
        Format::Q4_1 => run::<1>(p, blocks, acts, out),
        Format::Q5_0 => run::<2>(p, blocks, acts, out),
        Format::Q5_1 => run::<3>(p, blocks, acts, out),
        Format::Q8_0 => run::<4>(p, blocks, acts, out),
        Format::Q4K => run::<5>(p, blocks, acts, out),
        Format::Q6K => run::<6>(p, blocks, acts, out),
    }
}

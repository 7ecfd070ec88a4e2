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
//! sizes and are only reachable once `crate::cpu::isa` found the features.

use std::arch::x86_64::*;

use crate::dtype::DType;
use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel, DOT_ROWS, DOT_TOKENS};
use crate::qdot::reference::fold8;
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
pub(crate) unsafe fn words2(a: *const u8, b: *const u8) -> u64 {
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
pub(crate) unsafe fn f16_pairs(a: *const u8, b: *const u8) -> __m128 {
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
pub(crate) fn add_super_block(acc: &mut f32, dw: f32, dminw: f32, dx: f32, sumi: i32, summ: i32) {
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
pub(crate) unsafe fn hsum4(v: __m128i) -> i32 {
    let s = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
    _mm_cvtsi128_si32(s)
}

/// Sum of the 8 i32 lanes of `v` (exact).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn hsum8(v: __m256i) -> i32 {
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
            let q = crate::cpu::avx2::rows::q6_k_unpack(p, n);
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
                        // SAFETY: `kernel` is only handed out once `crate::cpu::isa` found AVX-512
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
/// the VNNI table, handed out only once `crate::cpu::isa` found the features.
pub(crate) fn kernel(dtype: DType) -> Option<QuantKernel> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_the_real_models_formats() {
        for dtype in [
            DType::Q4_1,
            DType::Q8_0,
            DType::Q4K,
            DType::Q6K,
            DType::Q5_0,
        ] {
            assert!(kernel(dtype).is_some(), "{}", dtype.name());
        }
    }
}

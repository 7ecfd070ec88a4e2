//! AVX-512 fused row kernels for the block types of the real models (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0, Q4_K, Q6_K). 4- and 5-bit types decode through a 16- or 32-entry table per block (or
//! sub-block) instead of converting and scaling every element: the same values, from the same
//! operations on each possible quant. The 32-element types read the scales of 16 blocks in one
//! gather, and can take four rows in lockstep against one token (`dot4`, for decode).
//!
//! Invariant: every lane sees the values and fused multiply-adds of the AVX2 kernels in the same
//! order, so each kernel equals [`crate::simd::dot_f32`] of the dequantised row bit for bit (Q5_0
//! and Q5_1 have no AVX2 kernels).

use std::arch::x86_64::*;

use super::{f16_at, fma32, fold, i8_f32, store32, Acc};
use crate::cpu::avx2::rows::q6_k_unpack;
use crate::dtype::{DType, QK_K};
use crate::quant::scale_min_k4;
use crate::simd::rows::RowKernels;

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
            let q = q6_k_unpack(p, n);
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
/// the AVX-512 tables, handed out only once `crate::cpu::isa` found the features.
pub(crate) fn row_kernels(dtype: DType) -> Option<RowKernels> {
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

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

use super::{add_tail, RowKernels, LANES};
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

// 4-bit types look their values up: a block's 16 possible values are computed once, with the
// scalar dequantiser's operations on the nibble value, and `vpermps` picks each element's.

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let values = _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0));
    for (i, b) in row.chunks_exact(18).enumerate() {
        let table = _mm512_mul_ps(values, _mm512_set1_ps(f16_at(b.as_ptr())));
        let idx = nibble_indices(b.as_ptr().add(2));
        f(32 * i, idx.map(|i| _mm512_permutexvar_ps(i, table)));
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q4_1(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let values = iota16();
    for (i, b) in row.chunks_exact(20).enumerate() {
        let d = _mm512_set1_ps(f16_at(b.as_ptr()));
        let m = _mm512_set1_ps(f16_at(b.as_ptr().add(2)));
        let table = _mm512_add_ps(_mm512_mul_ps(values, d), m);
        let idx = nibble_indices(b.as_ptr().add(4));
        f(32 * i, idx.map(|i| _mm512_permutexvar_ps(i, table)));
    }
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
unsafe fn decode_q5_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let sixteen = _mm512_set1_ps(16.0);
    let values = [
        _mm512_sub_ps(iota16(), sixteen),
        _mm512_sub_ps(_mm512_add_ps(iota16(), sixteen), sixteen),
    ];
    for (i, b) in row.chunks_exact(22).enumerate() {
        let d = _mm512_set1_ps(f16_at(b.as_ptr()));
        let table = values.map(|v| _mm512_mul_ps(v, d));
        let idx = five_bit_indices(b.as_ptr().add(2), b.as_ptr().add(6));
        f(32 * i, idx.map(|i| lookup32(table, i)));
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q5_1(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    let values = [iota16(), _mm512_add_ps(iota16(), _mm512_set1_ps(16.0))];
    for (i, b) in row.chunks_exact(24).enumerate() {
        let d = _mm512_set1_ps(f16_at(b.as_ptr()));
        let m = _mm512_set1_ps(f16_at(b.as_ptr().add(2)));
        let table = values.map(|v| _mm512_add_ps(_mm512_mul_ps(v, d), m));
        let idx = five_bit_indices(b.as_ptr().add(4), b.as_ptr().add(8));
        f(32 * i, idx.map(|i| lookup32(table, i)));
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn decode_q8_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
    for (i, b) in row.chunks_exact(34).enumerate() {
        let d = _mm512_set1_ps(f16_at(b.as_ptr()));
        let p = b.as_ptr().add(2);
        let q0 = i8_f32(_mm_loadu_si128(p.cast()));
        let q1 = i8_f32(_mm_loadu_si128(p.add(16).cast()));
        f(32 * i, [_mm512_mul_ps(q0, d), _mm512_mul_ps(q1, d)]);
    }
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
/// `block_kernels`). `# Safety` for each: AVX-512 F/BW/VL, AVX2, FMA, F16C, matching sizes.
macro_rules! block_kernels {
    ($name:ident, $decode:ident) => {
        mod $name {
            use super::*;

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
        }
    };
}

block_kernels!(q4_0, decode_q4_0);
block_kernels!(q4_1, decode_q4_1);
block_kernels!(q5_0, decode_q5_0);
block_kernels!(q5_1, decode_q5_1);
block_kernels!(q8_0, decode_q8_0);
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
        }
    };
}

/// The AVX-512 kernels for `dtype`, if there are any. Reachable only through
/// `super::row_kernels_at`, which hands them out only once `has_avx512` confirmed the features.
pub(super) fn row_kernels(dtype: DType) -> Option<RowKernels> {
    Some(match dtype {
        DType::Q4_0 => entry!(DType::Q4_0, q4_0),
        DType::Q4_1 => entry!(DType::Q4_1, q4_1),
        DType::Q5_0 => entry!(DType::Q5_0, q5_0),
        DType::Q5_1 => entry!(DType::Q5_1, q5_1),
        DType::Q8_0 => entry!(DType::Q8_0, q8_0),
        DType::Q4K => entry!(DType::Q4K, q4_k),
        DType::Q6K => entry!(DType::Q6K, q6_k),
        _ => return None,
    })
}

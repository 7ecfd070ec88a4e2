//! AVX2 integer tile kernels, generic over the number of tokens `N` (1..=4) dotted against one
//! decode of the weight row, for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K.
//!
//! Invariant: the scalar reference's operations ([`crate::qdot::reference`]): exact integer sums
//! per block, then the same float steps in the same order, so every result equals the
//! reference bit for bit. Every `unsafe fn` needs AVX2, FMA and F16C and rows and activations of
//! matching sizes; the safe entries handed out by [`kernel`] check the sizes.

use std::arch::x86_64::*;

use super::rows::q6_k_unpack;
use super::{hsum_i32, hsum_i32x4, prefetch};
use crate::dtype::DType;
use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel, DOT_ROWS};
use crate::quant::scale_min_k4;

// Scales are loaded in assembly, through a general register into a vector register they
// overwrite whole. Left to the compiler, a lone f16 load becomes `vpinsrw` into whatever
// register is free (often an accumulator): the conversion then waits for that register's last
// writer and chains every block behind the previous one (measured 2-3x slower).

/// The f16 at `p`, widened (exact).
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

/// The f16 values at `p` and `p + 2`, widened (exact).
///
/// # Safety
/// `p` must point at 4 readable bytes; F16C.
#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    let v: __m128;
    std::arch::asm!(
        "vmovd {v}, dword ptr [{p}]",
        "vcvtph2ps {v}, {v}",
        p = in(reg) p,
        v = out(xmm_reg) v,
        options(pure, readonly, nostack, preserves_flags),
    );
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The scalar reference's `fold8`, in registers.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn fold8(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h)
}

/// 16 nibble bytes at `p` as 32 bytes in element order (low nibbles, then high nibbles).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p.cast());
    let bytes = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
    _mm256_and_si256(bytes, _mm256_set1_epi8(0xF))
}

/// The 32 bits at `p` spread to 32 bytes: byte `i` is 0xFF if bit `i` is set, else 0.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bits_to_bytes(p: *const u8) -> __m256i {
    let x = p.cast::<i32>().read_unaligned();
    let shuffle = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuffle);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// The 8 lanes of 4 consecutive products of 32 unsigned weight bytes `w` and signed `x`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn lanes_u8(w: __m256i, x: __m256i) -> __m256 {
    let p = _mm256_maddubs_epi16(w, x);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
}

/// `acc + (dw * dx) * lanes` (multiply, multiply, add, as the scalar reference), with `dw`
/// splat once per block and `dx` broadcast straight from memory.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn add_scaled(acc: __m256, dw: __m256, dx: &f32, lanes: __m256) -> __m256 {
    let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(dx));
    _mm256_add_ps(acc, _mm256_mul_ps(d, lanes))
}

/// A signed 32-element weight type against Q8_0: `values(block)` gives the 32 signed bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_q8_0<const N: usize>(
    row: &[u8],
    ys: [&[BlockQ8_0]; N],
    bytes: usize,
    values: impl Fn(*const u8) -> __m256i,
) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    for (i, b) in row.chunks_exact(bytes).enumerate() {
        prefetch(b.as_ptr(), bytes);
        let w = values(b.as_ptr());
        let aw = _mm256_sign_epi8(w, w);
        let dw = _mm256_set1_ps(f16_at(b.as_ptr()));
        for t in 0..N {
            let y = ys[t].get_unchecked(i);
            let x = _mm256_sign_epi8(_mm256_loadu_si256(y.qs.as_ptr().cast()), w);
            acc[t] = add_scaled(acc[t], dw, &y.d, lanes_u8(aw, x));
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = fold8(acc[t]);
    }
    out
}

/// An unsigned 32-element weight type with a min (byte 2) against Q8_1.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_q8_1<const N: usize>(
    row: &[u8],
    ys: [&[BlockQ8_1]; N],
    bytes: usize,
    values: impl Fn(*const u8) -> __m256i,
) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summs = [0f32; N];
    for (i, b) in row.chunks_exact(bytes).enumerate() {
        prefetch(b.as_ptr(), bytes);
        let w = values(b.as_ptr());
        let (dw, mw) = f16_pair(b.as_ptr());
        let dw = _mm256_set1_ps(dw);
        for t in 0..N {
            let y = ys[t].get_unchecked(i);
            let x = _mm256_loadu_si256(y.qs.as_ptr().cast());
            acc[t] = add_scaled(acc[t], dw, &y.d, lanes_u8(w, x));
            summs[t] += mw * y.s;
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = fold8(acc[t]) + summs[t];
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0<const N: usize>(row: &[u8], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
    dot_q8_0(row, ys, 18, |b| {
        _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0<const N: usize>(row: &[u8], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
    dot_q8_0(row, ys, 22, |b| {
        // Clear fifth bit: `q | 0xF0` is `q - 16` as i8; set: `q` is `(q + 16) - 16`.
        let high = _mm256_andnot_si256(bits_to_bytes(b.add(2)), _mm256_set1_epi8(-16));
        _mm256_or_si256(nibbles(b.add(6)), high)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const N: usize>(row: &[u8], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
    dot_q8_0(row, ys, 34, |b| _mm256_loadu_si256(b.add(2).cast()))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1<const N: usize>(row: &[u8], ys: [&[BlockQ8_1]; N]) -> [f32; N] {
    dot_q8_1(row, ys, 20, |b| nibbles(b.add(4)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1<const N: usize>(row: &[u8], ys: [&[BlockQ8_1]; N]) -> [f32; N] {
    dot_q8_1(row, ys, 24, |b| {
        let high = _mm256_and_si256(bits_to_bytes(b.add(4)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles(b.add(8)), high)
    })
}

/// `acc = acc + (d_w * d_x) * sumi`, then `acc = acc - (dmin_w * d_x) * summ`.
#[inline(always)]
fn add_super_block(acc: &mut f32, dw: f32, dminw: f32, dx: f32, sumi: i32, summ: i32) {
    *acc += (dw * dx) * sumi as f32;
    *acc -= (dminw * dx) * summ as f32;
}

/// Q4_K (`FIVE = false`) or Q5_K (`FIVE = true`, fifth bits from `qh` at byte 16) rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_k4<const N: usize, const FIVE: bool>(row: &[u8], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    let (bytes, qs) = if FIVE { (176, 48) } else { (144, 16) };
    let m4 = _mm256_set1_epi8(0xF);
    let bit5 = _mm256_set1_epi8(0x10);
    let mut acc = [0f32; N];
    for (i, b) in row.chunks_exact(bytes).enumerate() {
        let p = b.as_ptr();
        prefetch(p, bytes);
        let (dw, dminw) = f16_pair(p);
        let mut scales = [0i16; 8];
        let mut mins = [0i16; 8];
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &b[4..16]);
            (scales[j], mins[j]) = (s as i16, m as i16);
        }
        let qh = if FIVE {
            _mm256_loadu_si256(p.add(16).cast())
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm256_setzero_si256(); N];
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
                let s =
                    _mm256_add_epi32(_mm256_madd_epi16(p_lo, s_lo), _mm256_madd_epi16(p_hi, s_hi));
                sumi[t] = _mm256_add_epi32(sumi[t], s);
            }
        }
        // Mins times the sums of each sub-block's two 16-element halves.
        let mins = _mm_loadu_si128(mins.as_ptr().cast());
        for t in 0..N {
            let y = ys[t].get_unchecked(i);
            let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
            let pairs = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            let summ = hsum_i32x4(_mm_madd_epi16(pairs, mins));
            add_super_block(&mut acc[t], dw, dminw, y.d, hsum_i32(sumi[t]), summ);
        }
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k<const N: usize>(row: &[u8], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    dot_k4::<N, false>(row, ys)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k<const N: usize>(row: &[u8], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    dot_k4::<N, true>(row, ys)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k<const N: usize>(row: &[u8], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    let mut acc = [0f32; N];
    for (i, b) in row.chunks_exact(210).enumerate() {
        let p = b.as_ptr();
        prefetch(p, 210);
        let dw = f16_at(p.add(208));
        let scales = _mm_loadu_si128(p.add(192).cast());
        // sumi = Σ sc (q - 32) x = Σ sc q x - 32 Σ sc bsums: start from the second term.
        let sc16 = _mm256_cvtepi8_epi16(scales);
        let mut sumi = [_mm256_setzero_si256(); N];
        for t in 0..N {
            let bs = _mm256_loadu_si256(ys[t].get_unchecked(i).bsums.as_ptr().cast());
            sumi[t] =
                _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, sc16)));
        }
        for n in 0..2 {
            let q = q6_k_unpack(p, n);
            for (k, q) in q.into_iter().enumerate() {
                // Scales of the two 16-element halves of these 32 elements, as 16 x i16.
                let g = (8 * n + 2 * k) as i64;
                let pick =
                    _mm_set_epi64x((g + 1) * 0x0101_0101_0101_0101, g * 0x0101_0101_0101_0101);
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                for t in 0..N {
                    let x = ys[t].get_unchecked(i).qs.as_ptr().add(128 * n + 32 * k);
                    let prod = _mm256_maddubs_epi16(q, _mm256_loadu_si256(x.cast()));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(prod, sc));
                }
            }
        }
        for t in 0..N {
            let dx = ys[t].get_unchecked(i).d;
            add_super_block(&mut acc[t], dw, 0.0, dx, hsum_i32(sumi[t]), 0);
        }
    }
    acc
}

/// Safe entry for one kernel: checks sizes, then runs the `N`-token version for `ys.len()`
/// on each row in turn.
macro_rules! entry {
    ($kernel:ident, $block:ty, $bytes:expr) => {
        |rows: &[&[u8]], ys: &[&[$block]], out: &mut [f32]| {
            assert!(
                (1..=DOT_ROWS).contains(&rows.len()),
                "vec_dot: {} rows (1 to {} per call)",
                rows.len(),
                DOT_ROWS
            );
            assert_eq!(rows.len() * ys.len(), out.len(), "vec_dot: outputs");
            for (row, out) in rows.iter().zip(out.chunks_exact_mut(ys.len().max(1))) {
                let blocks = row.len() / $bytes;
                assert_eq!(row.len(), blocks * $bytes, "vec_dot: row bytes");
                assert!(
                    ys.iter().all(|y| y.len() == blocks),
                    "vec_dot: activation blocks"
                );
                // SAFETY: `kernel` is only handed out once `crate::cpu::isa` found AVX2, FMA
                // and F16C; every activation row has one block per weight block (checked).
                unsafe {
                    match ys.len() {
                        1 => out.copy_from_slice(&$kernel::<1>(row, [ys[0]])),
                        2 => out.copy_from_slice(&$kernel::<2>(row, [ys[0], ys[1]])),
                        3 => out.copy_from_slice(&$kernel::<3>(row, [ys[0], ys[1], ys[2]])),
                        4 => out.copy_from_slice(&$kernel::<4>(row, [ys[0], ys[1], ys[2], ys[3]])),
                        n => panic!("vec_dot: {n} tokens (1 to 4 per call)"),
                    }
                }
            }
        }
    };
}

/// The AVX2 kernel for `dtype`, if there is one. Reachable only through the AVX2 and AVX-512
/// tables, handed out only once `crate::cpu::isa` found AVX2, FMA and F16C.
pub(crate) fn kernel(dtype: DType) -> Option<QuantKernel> {
    Some(match dtype {
        DType::Q4_0 => QuantKernel::Q8_0(entry!(q4_0, BlockQ8_0, 18)),
        DType::Q5_0 => QuantKernel::Q8_0(entry!(q5_0, BlockQ8_0, 22)),
        DType::Q8_0 => QuantKernel::Q8_0(entry!(q8_0, BlockQ8_0, 34)),
        DType::Q4_1 => QuantKernel::Q8_1(entry!(q4_1, BlockQ8_1, 20)),
        DType::Q5_1 => QuantKernel::Q8_1(entry!(q5_1, BlockQ8_1, 24)),
        DType::Q4K => QuantKernel::Q8K(entry!(q4_k, BlockQ8K, 144)),
        DType::Q5K => QuantKernel::Q8K(entry!(q5_k, BlockQ8K, 176)),
        DType::Q6K => QuantKernel::Q8K(entry!(q6_k, BlockQ8K, 210)),
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

//! AVX2 activation quantisers: llama.cpp's reference quantisers
//! ([`crate::qdot::reference`]) and the f16 rounding of activations, eight lanes at a time.
//!
//! Invariant: bit for bit the reference's blocks (`roundf` ties away from zero for Q8_0 and Q8_1,
//! ties to even for Q8_K, the same scales).

use std::arch::x86_64::*;

use super::hsum_i32;
use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1};

/// `round_away` on 8 lanes: truncate, then step away from zero where the dropped fraction
/// is at least one half (exact for `|v| < 2^23`).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn round_away8(v: __m256) -> __m256i {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let frac = _mm256_sub_ps(v, t);
    let one = _mm256_set1_ps(1.0);
    let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5)), one);
    let down = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, _mm256_set1_ps(-0.5)), one);
    _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(t, up), down))
}

/// Four vectors of 8 i32 (elements in order) packed to 32 i8 (values in `-128..=127`).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pack_i8(q: [__m256i; 4]) -> __m256i {
    let a = _mm256_packs_epi32(q[0], q[1]);
    let b = _mm256_packs_epi32(q[2], q[3]);
    // The packs work per 128-bit half: dwords come out as 0 4 1 5 2 6 3 7.
    let bytes = _mm256_packs_epi16(a, b);
    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// `v` rounded to f16 (nearest even, as `half`) and widened back.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16_round(v: f32) -> f32 {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
    _mm_cvtss_f32(_mm_cvtph_ps(h))
}

/// `round_row_f16` on the first `8 * (n / 8)` values; returns how many it did.
///
/// # Safety
/// AVX2, F16C; `y.len() == x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn round_f16(x: &[f32], y: &mut [f32]) -> usize {
    let main = x.len() / 8 * 8;
    for i in (0..main).step_by(8) {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    main
}

/// Largest `|x|` of 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hmax(v: __m256) -> f32 {
    let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
}

/// One 32-element block: its quants (as 4 x 8 i32) and the unrounded `d`, as
/// `quantize_q8_0_ref` computes them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_block(x: *const f32) -> ([__m256i; 4], f32) {
    let abs = _mm256_set1_ps(-0.0);
    let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.add(8 * k)));
    let m = v.iter().fold(_mm256_setzero_ps(), |m, v| {
        _mm256_max_ps(m, _mm256_andnot_ps(abs, *v))
    });
    let d = hmax(m) / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    (v.map(|v| round_away8(_mm256_mul_ps(v, id))), d)
}

/// # Safety
/// AVX2, FMA, F16C; `x.len() == 32 * y.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (i, y) in y.iter_mut().enumerate() {
        let (q, d) = q8_block(x.as_ptr().add(32 * i));
        y.d = f16_round(d);
        _mm256_storeu_si256(y.qs.as_mut_ptr().cast(), pack_i8(q));
    }
}

/// # Safety
/// AVX2, FMA, F16C; `x.len() == 32 * y.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (i, y) in y.iter_mut().enumerate() {
        let (q, d) = q8_block(x.as_ptr().add(32 * i));
        y.d = f16_round(d);
        _mm256_storeu_si256(y.qs.as_mut_ptr().cast(), pack_i8(q));
        let sum = hsum_i32(_mm256_add_epi32(
            _mm256_add_epi32(q[0], q[1]),
            _mm256_add_epi32(q[2], q[3]),
        ));
        y.s = f16_round(sum as f32 * d);
    }
}

/// # Safety
/// AVX2, FMA, F16C; `x.len() == 256 * y.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    let abs = _mm256_set1_ps(-0.0);
    for (i, y) in y.iter_mut().enumerate() {
        let x = x.as_ptr().add(256 * i);
        let mut m = _mm256_setzero_ps();
        for k in 0..32 {
            m = _mm256_max_ps(m, _mm256_andnot_ps(abs, _mm256_loadu_ps(x.add(8 * k))));
        }
        let amax = hmax(m);
        if amax == 0.0 {
            *y = BlockQ8K::ZERO;
            continue;
        }
        // The first element of largest magnitude, with its sign.
        let splat = _mm256_set1_ps(amax);
        let mut max = amax;
        for k in 0..32 {
            let a = _mm256_andnot_ps(abs, _mm256_loadu_ps(x.add(8 * k)));
            let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, splat));
            if hits != 0 {
                max = *x.add(8 * k + hits.trailing_zeros() as usize);
                break;
            }
        }
        let iscale = -127.0 / max;
        let scale = _mm256_set1_ps(iscale);
        let top = _mm256_set1_epi32(127);
        for c in 0..8 {
            // Ties to even: the default rounding of `cvtps`, as `nearest_int`.
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                let v = _mm256_mul_ps(scale, _mm256_loadu_ps(x.add(32 * c + 8 * k)));
                _mm256_min_epi32(_mm256_cvtps_epi32(v), top)
            });
            _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * c).cast(), pack_i8(q));
            y.bsums[2 * c] = hsum_i32(_mm256_add_epi32(q[0], q[1])) as i16;
            y.bsums[2 * c + 1] = hsum_i32(_mm256_add_epi32(q[2], q[3])) as i16;
        }
        y.d = 1.0 / iscale;
    }
}

//! AVX-512 element-wise kernels: the softmax steps ([`crate::simd::scale_max`],
//! [`crate::simd::exp_sum`], [`crate::simd::scale_round`]) with a masked last vector, and the
//! gated activations of SiLU and of the table GELU, 16 values at a time.
//!
//! Invariant: the bits of the portable code: the exponential's operations lane by lane, the f64
//! sum in the fixed lanes and tree, each activation as its scalar function computes it.

use std::arch::x86_64::*;

use super::tail_mask;
use crate::simd::order::{
    fold_sum_lanes, EXP_C1, EXP_C2, EXP_HI, EXP_LO, EXP_LOG2E, EXP_P, SUM_LANES,
};

/// `gate[i] = silu(gate[i]) * up[i]` over whole vectors of 16, with `silu(x) = x / (1 +
/// exp_f32(-x))` (each step as the scalar [`crate::ops::silu`] does it); returns how many
/// values it did.
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C; `up.len() >= gate.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn glu_silu(gate: &mut [f32], up: &[f32]) -> usize {
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

/// The table GELU's [`crate::ops::Activation::glu`] over whole vectors of 16 values; returns how
/// many values it did. Per value: `f16(x)` rounded to nearest even (as `half` rounds), the
/// table entry at its bits, then 0 where `x <= -10` and `x` where `x >= 10`, times `up`.
///
/// # Safety
/// AVX-512 F/BW/VL and F16C; `up.len() >= gate.len()`; `table` has 65,536 entries.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn glu_gelu_table(gate: &mut [f32], up: &[f32], table: &[f32]) -> usize {
    assert_eq!(table.len(), 1 << 16);
    let n = gate.len() / 16 * 16;
    let (lo, hi) = (_mm512_set1_ps(-10.0), _mm512_set1_ps(10.0));
    for i in (0..n).step_by(16) {
        let x = _mm512_loadu_ps(gate.as_ptr().add(i));
        let bits = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let idx = _mm512_cvtepu16_epi32(bits);
        let t = _mm512_i32gather_ps::<4>(idx, table.as_ptr().cast());
        let t = _mm512_mask_mov_ps(
            t,
            _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, lo),
            _mm512_setzero_ps(),
        );
        let t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, hi), x);
        let u = _mm512_loadu_ps(up.as_ptr().add(i));
        _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(t, u));
    }
    n
}

/// [`crate::simd::exp_f32`] on 16 lanes: the same operations, lane by lane.
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

/// [`crate::simd::scale_max`], with the last, partial vector masked.
///
/// # Safety
/// AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32 {
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

/// [`crate::simd::exp_sum`]: position `p` in lane `p % 16` of two 8-lane f64 accumulators, the last,
/// partial vector masked (its unused lanes add 0, which changes no lane: every sum is `>= +0`).
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn exp_sum(s: &mut [f32], max: f32) -> f64 {
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

/// [`crate::simd::scale_round`], with the last, partial vector masked (`vcvtps2ph` rounds to nearest
/// even, as `half` does).
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn scale_round(s: &mut [f32], inv: f32, round: bool) {
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

//! AVX2 element-wise kernels: the softmax steps ([`crate::simd::exp_sum`] and
//! [`crate::simd::scale_round`]) and the gated activations of SiLU and of the table GELU, 8
//! values at a time.
//!
//! Invariant: the bits of the portable twins in [`crate::cpu::scalar`] and
//! [`crate::ops::Activation::apply`] (the exponential's operations lane by lane, the f64 sum in
//! the fixed lanes and tree, each activation as its scalar function computes it).

use std::arch::x86_64::*;

use crate::cpu::scalar::scale_round_scalar;
use crate::simd::order::{
    fold_sum_lanes, EXP_C1, EXP_C2, EXP_HI, EXP_LO, EXP_LOG2E, EXP_P, SUM_LANES,
};

/// [`crate::simd::exp_f32`] on 8 lanes: the same operations, lane by lane.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
    let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(EXP_LOG2E),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C1), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C2), r);
    let mut p = _mm256_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let ni = _mm256_cvtps_epi32(n);
    let n1 = _mm256_srai_epi32::<1>(ni);
    let pow2 = |e| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            e,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_mul_ps(_mm256_mul_ps(y, pow2(n1)), pow2(_mm256_sub_epi32(ni, n1)))
}

/// `gate[i] = silu(gate[i]) * up[i]` over whole vectors of 8, with `silu(x) = x / (1 +
/// exp_f32(-x))` (each step as the scalar [`crate::ops::silu`] does it); returns how many
/// values it did.
///
/// # Safety
/// AVX2 and FMA; `up.len() >= gate.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn glu_silu(gate: &mut [f32], up: &[f32]) -> usize {
    let n = gate.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for i in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(gate.as_ptr().add(i));
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
        let u = _mm256_loadu_ps(up.as_ptr().add(i));
        _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(silu, u));
    }
    n
}

/// The table GELU's [`crate::ops::Activation::glu`] over whole vectors of 8 values; returns how
/// many values it did. Per value: `f16(x)` rounded to nearest even (as `half` rounds), the
/// table entry at its bits, then 0 where `x <= -10` and `x` where `x >= 10`, times `up`.
///
/// # Safety
/// AVX2 and F16C; `up.len() >= gate.len()`; `table` has 65,536 entries.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn glu_gelu_table(gate: &mut [f32], up: &[f32], table: &[f32]) -> usize {
    assert_eq!(table.len(), 1 << 16);
    let n = gate.len() / 8 * 8;
    let (lo, hi) = (_mm256_set1_ps(-10.0), _mm256_set1_ps(10.0));
    for i in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(gate.as_ptr().add(i));
        let bits = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
        let idx = _mm256_cvtepu16_epi32(bits);
        let t = _mm256_i32gather_ps::<4>(table.as_ptr(), idx);
        let t = _mm256_blendv_ps(t, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LE_OQ>(x, lo));
        let t = _mm256_blendv_ps(t, x, _mm256_cmp_ps::<_CMP_GE_OQ>(x, hi));
        let u = _mm256_loadu_ps(up.as_ptr().add(i));
        _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(t, u));
    }
    n
}

/// [`crate::simd::exp_sum`]: 16 positions per step into 16 f64 lanes; the last, partial step
/// goes through a padded buffer (whose padding is computed and then dropped).
///
/// # Safety
/// AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum(s: &mut [f32], max: f32) -> f64 {
    let mx = _mm256_set1_ps(max);
    let mut acc = [_mm256_setzero_pd(); 4];
    let step = |acc: &mut [__m256d; 4], p: *mut f32| {
        for (k, a) in acc.chunks_exact_mut(2).enumerate() {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(8 * k)), mx));
            _mm256_storeu_ps(p.add(8 * k), e);
            a[0] = _mm256_add_pd(a[0], _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            a[1] = _mm256_add_pd(a[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        }
    };
    let mut chunks = s.chunks_exact_mut(SUM_LANES);
    for c in &mut chunks {
        step(&mut acc, c.as_mut_ptr());
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [max; SUM_LANES];
        buf[..rest.len()].copy_from_slice(rest);
        let mut sums = [_mm256_setzero_pd(); 4];
        step(&mut sums, buf.as_mut_ptr());
        rest.copy_from_slice(&buf[..rest.len()]);
        buf[rest.len()..].fill(0.0);
        for (k, a) in acc.chunks_exact_mut(2).enumerate() {
            let e = _mm256_loadu_ps(buf.as_ptr().add(8 * k));
            a[0] = _mm256_add_pd(a[0], _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            a[1] = _mm256_add_pd(a[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        }
    }
    let mut lanes = [0f64; SUM_LANES];
    for (k, a) in acc.iter().enumerate() {
        _mm256_storeu_pd(lanes.as_mut_ptr().add(4 * k), *a);
    }
    fold_sum_lanes(lanes)
}

/// [`crate::simd::scale_round`], 8 values at a time (`vcvtps2ph` rounds to nearest even, as
/// `half` does), the rest as the portable code does.
///
/// # Safety
/// AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_round(s: &mut [f32], inv: f32, round: bool) {
    let iv = _mm256_set1_ps(inv);
    let mut chunks = s.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), iv);
        if round {
            w = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(w));
        }
        _mm256_storeu_ps(c.as_mut_ptr(), w);
    }
    scale_round_scalar(chunks.into_remainder(), inv, round);
}

//! AVX2 (with FMA and F16C) kernels and their table, [`KERNELS`].
//!
//! - [`dot`]: f32 dots and the attention row kernels;
//! - [`elementwise`]: the softmax steps and the gated activations;
//! - [`rows`]: fused "dequantise and dot" row kernels;
//! - [`quantize`]: llama.cpp's activation quantisers;
//! - [`qdot`]: integer tile kernels of the quantised weight types.
//!
//! Every `unsafe fn` here requires the CPU features it enables; the table is handed out only
//! once [`crate::cpu::isa`] found AVX2, FMA and F16C. The float kernels keep the 32 lanes of
//! [`crate::simd::order`] in four 256-bit accumulators (`acc[k]` holds lanes `8k .. 8k + 8`).

use std::arch::x86_64::*;

use half::f16;

use super::table::{Gemm, Kernels};
use crate::dtype::DType;
use crate::qdot::blocks::QuantKernel;
use crate::qdot::reference::scalar_kernel;

pub(super) mod dot;
pub(super) mod elementwise;
pub(super) mod gemm;
pub(super) mod panel;
pub(super) mod qdot;
pub(super) mod quantize;
pub(super) mod rows;

/// The blocked exact product: segments of one 256-bit register (the AVX-512 table has its own,
/// with segments of 16, giving the same bits).
pub(crate) const GEMM: Gemm = Gemm {
    seg: gemm::SEG,
    tile: gemm::gemm_tile,
};

/// The [`super::Isa::Avx2`] kernels.
pub(super) const KERNELS: Kernels = Kernels {
    dot_f32: dot::dot_f32_avx2,
    dot2: Some(dot::dot2_avx2),
    dot4: None,
    dot2x4: None,
    gemm: Some(GEMM),
    dot_rows_f32: dot::dot_rows_avx2,
    dot_rows_f16: dot::dot_rows_f16_avx2,
    weighted_rows_f32: dot::weighted_rows_avx2,
    weighted_rows_f16: dot::weighted_rows_f16_avx2,
    scale_max: super::scalar::scale_max_scalar,
    exp_sum: elementwise::exp_sum,
    scale_round: elementwise::scale_round,
    glu_silu: Some(elementwise::glu_silu),
    glu_gelu_table: Some(elementwise::glu_gelu_table),
    row_kernels: rows::row_kernels,
    quantize_q8_0: quantize::quantize_q8_0,
    quantize_q8_1: quantize::quantize_q8_1,
    quantize_q8_k: quantize::quantize_q8_k,
    round_f16: Some(quantize::round_f16),
    quant_kernel,
    panel: Some(panel::panel),
    panel_k_quants: true,
};

/// The AVX2 integer kernel of `dtype`, else the scalar reference (the same bits).
pub(super) fn quant_kernel(dtype: DType) -> Option<QuantKernel> {
    qdot::kernel(dtype).or_else(|| scalar_kernel(dtype))
}

/// How far ahead of the block being decoded the kernels ask for a row's bytes ([`prefetch`]).
pub(crate) const PREFETCH_BYTES: usize = 2048;

/// Asks for the cache lines [`PREFETCH_BYTES`] ahead of the `bytes` at `p` (past a row's end:
/// the next rows, which follow it in memory). Rows streamed from memory otherwise waited on
/// each line; a prefetch never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, bytes: usize) {
    for off in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + off).cast()) };
    }
}

/// 32 lanes as four vectors: `acc[k]` holds lanes `8k .. 8k + 8`.
pub(crate) type Acc = [__m256; 4];

/// Fold the 32 lanes in the fixed tree: l += l+16, l += l+8, l += l+4, l += l+2, l += l+1.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn fold(acc: Acc) -> f32 {
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
    _mm_cvtss_f32(h)
}

/// Accumulate 32 weights `w` (four vectors of 8, in element order) against `x[0..32]`.
///
/// # Safety
/// AVX2 and FMA; `x` must point at 32 readable floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn fma32(acc: &mut Acc, w: Acc, x: *const f32) {
    acc[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[0]);
    acc[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), acc[1]);
    acc[2] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), acc[2]);
    acc[3] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), acc[3]);
}

/// Four vectors of 8 floats from `p[0..32]`.
///
/// # Safety
/// AVX2; `p` must point at 32 readable floats.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn load32(p: *const f32) -> Acc {
    [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ]
}

/// Eight f16 at `p` widened to f32 (exact).
///
/// # Safety
/// AVX2 and F16C; `p` must point at 8 readable f16.
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(crate) unsafe fn load8_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// Sum of 8 i32 lanes (exact).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn hsum_i32(v: __m256i) -> i32 {
    hsum_i32x4(_mm_add_epi32(
        _mm256_castsi256_si128(v),
        _mm256_extracti128_si256::<1>(v),
    ))
}

/// Sum of 4 i32 lanes (exact).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn hsum_i32x4(s: __m128i) -> i32 {
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
    _mm_cvtsi128_si32(s)
}

//! AVX-512 kernels and their tables: [`KERNELS`] (AVX-512 F/BW/VL) and [`KERNELS_VNNI`] (with
//! VNNI, for the integer kernels and the packed panels). Where a level has no kernel of its
//! own, its table takes the AVX2 one, which gives the same bits.
//!
//! - [`dot`]: f32 dots and the attention row kernels;
//! - [`elementwise`]: the softmax steps and the gated activations;
//! - [`rows`]: fused "dequantise and dot" row kernels;
//! - [`gemm`]: the blocked exact product of prefill;
//! - [`qdot`]: VNNI integer tile kernels, rows in pairs;
//! - [`panel`]: VNNI kernels of the packed matrices' 16-row panels.
//!
//! The float kernels keep the 32 lanes of [`crate::simd::order`] in two 512-bit accumulators
//! (lanes `0..16` and `16..32`) instead of AVX2's four 256-bit ones: every lane sees the same
//! values and fused multiply-adds in the same order, and the fold adds the same pairs (`l + 16`
//! first, which is `acc[0] + acc[1]` here), so the results equal the AVX2 kernels' bit for bit.
//! Every `unsafe fn` needs the features it enables; the tables are handed out only once
//! [`crate::cpu::isa`] found them.

use std::arch::x86_64::*;

use super::avx2;
use super::table::{Gemm, Kernels};
use crate::dtype::DType;
use crate::qdot::blocks::QuantKernel;
use crate::simd::rows::RowKernels;

pub(super) mod dot;
pub(super) mod elementwise;
pub(super) mod gemm;
pub(super) mod panel;
pub(super) mod qdot;
pub(super) mod rows;

/// The [`super::Isa::Avx512`] kernels.
pub(super) const KERNELS: Kernels = Kernels {
    dot_f32: avx2::dot::dot_f32_avx2,
    dot2: Some(avx2::dot::dot2_avx2),
    dot4: Some(dot::dot4),
    dot2x4: Some(dot::dot2x4),
    gemm: Some(Gemm {
        seg: gemm::SEG,
        tile: gemm::gemm_tile,
    }),
    dot_rows_f32: dot::dot_rows_f32,
    dot_rows_f16: dot::dot_rows_f16,
    weighted_rows_f32: dot::weighted_rows_f32,
    weighted_rows_f16: dot::weighted_rows_f16,
    scale_max: elementwise::scale_max,
    exp_sum: elementwise::exp_sum,
    scale_round: elementwise::scale_round,
    glu_silu: Some(elementwise::glu_silu),
    glu_gelu_table: Some(elementwise::glu_gelu_table),
    row_kernels,
    quant_kernel: avx2::quant_kernel,
    ..avx2::KERNELS
};

/// The [`super::Isa::Avx512Vnni`] kernels: [`KERNELS`] with the VNNI integer kernels and the
/// packed panels.
pub(super) const KERNELS_VNNI: Kernels = Kernels {
    quant_kernel: vnni_quant_kernel,
    panel: Some(panel::panel),
    ..KERNELS
};

/// The AVX-512 row kernels of `dtype`, else the AVX2 ones (the same bits).
fn row_kernels(dtype: DType) -> Option<RowKernels> {
    rows::row_kernels(dtype).or_else(|| avx2::rows::row_kernels(dtype))
}

/// The VNNI integer kernel of `dtype`, else the AVX2 one or the scalar reference (the same bits).
fn vnni_quant_kernel(dtype: DType) -> Option<QuantKernel> {
    qdot::kernel(dtype).or_else(|| avx2::quant_kernel(dtype))
}

/// 32 lanes as two vectors: `acc[k]` holds lanes `16k .. 16k + 16`.
pub(crate) type Acc = [__m512; 2];

/// The fixed tree: l += l+16, l += l+8, l += l+4, l += l+2, l += l+1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn fold(acc: Acc) -> f32 {
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
pub(crate) unsafe fn fma32(acc: &mut Acc, w: Acc, x: *const f32) {
    acc[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc[0]);
    acc[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x.add(16)), acc[1]);
}

/// Store 32 values at `y[0..32]`.
///
/// # Safety
/// `y` must point at 32 writable floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn store32(y: *mut f32, w: Acc) {
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
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
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
pub(crate) unsafe fn i8_f32(v: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

/// The lanes of the first `n % 16` elements, for the masked loads and stores of a last,
/// partial vector (`n % 16 == 0` means a whole one).
#[inline(always)]
pub(crate) fn tail_mask(n: usize) -> __mmask16 {
    match n % 16 {
        0 => !0,
        r => (1 << r) - 1,
    }
}

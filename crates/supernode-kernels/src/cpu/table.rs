//! The kernel table: one instruction set's kernels as function pointers, filled in by
//! [`super::scalar`], `super::avx2` and `super::avx512`, and chosen once per process by
//! [`super::kernels`]. A leaf: it names the kernels' types and imports no kernel.
//!
//! Safety contract: the `unsafe fn` entries need the CPU features of the level whose table holds
//! them, which [`super::kernels`] guarantees by handing out only the table of the level it
//! detected; each entry's sizes are checked by its safe wrapper (in [`crate::simd`],
//! [`crate::qdot`] and [`crate::ops`]), as the kernels' own `# Safety` sections say. An `Option`
//! entry is `None` where the level has no such kernel and the wrapper does without.

use half::f16;

use crate::dtype::DType;
use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel};
use crate::qdot::packed::layout::{Act, Format, PANEL};
use crate::simd::rows::RowKernels;

/// A panel kernel: 1 to 4 tokens against one panel of a packed matrix.
pub(crate) type PanelDot =
    unsafe fn(fmt: Format, p: &[u8], blocks: usize, acts: &[Act<'_>], out: &mut [[f32; PANEL]]);

/// The kernels of one [`super::Isa`].
pub(crate) struct Kernels {
    /// [`crate::simd::dot_f32`] (`a` and `b` of equal lengths).
    pub dot_f32: unsafe fn(a: &[f32], b: &[f32]) -> f32,
    /// Two `dot_f32(a, b[j n .. (j + 1) n])`, `b.len() == 2 * a.len()`.
    pub dot2: Option<unsafe fn(a: &[f32], b: &[f32]) -> [f32; 2]>,
    /// Four `dot_f32(a, b[j n .. (j + 1) n])`, `b.len() == 4 * a.len()`.
    pub dot4: Option<unsafe fn(a: &[f32], b: &[f32]) -> [f32; 4]>,
    /// `[dot4(a0, b), dot4(a1, b)]`.
    pub dot2x4: Option<unsafe fn(a0: &[f32], a1: &[f32], b: &[f32]) -> [[f32; 4]; 2]>,
    /// [`crate::simd::dot_f32_rows`], sizes checked.
    pub dot_rows_f32: unsafe fn(q: &[f32], n: usize, k: &[f32], bases: &[usize], out: &mut [f32]),
    /// [`crate::simd::dot_f16_rows`], sizes checked.
    pub dot_rows_f16: unsafe fn(q: &[f32], n: usize, k: &[f16], bases: &[usize], out: &mut [f32]),
    /// [`crate::simd::weighted_rows_f32`], sizes checked.
    pub weighted_rows_f32:
        unsafe fn(ws: &[f32], v: &[f32], bases: &[usize], n: usize, out: &mut [f32]),
    /// [`crate::simd::weighted_rows_f16`], sizes checked.
    pub weighted_rows_f16:
        unsafe fn(ws: &[f32], v: &[f16], bases: &[usize], n: usize, out: &mut [f32]),
    /// [`crate::simd::scale_max`].
    pub scale_max: unsafe fn(s: &mut [f32], scale: f32) -> f32,
    /// [`crate::simd::exp_sum`].
    pub exp_sum: unsafe fn(s: &mut [f32], max: f32) -> f64,
    /// [`crate::simd::scale_round`].
    pub scale_round: unsafe fn(s: &mut [f32], inv: f32, round: bool),
    /// The SiLU gated unit over as many leading values as the kernel takes; returns how many.
    pub glu_silu: Option<unsafe fn(gate: &mut [f32], up: &[f32]) -> usize>,
    /// The table GELU's gated unit over as many leading values as the kernel takes (`table` the
    /// 65,536 entries of [`crate::ops::gelu_f16_table`]); returns how many.
    pub glu_gelu_table: Option<unsafe fn(gate: &mut [f32], up: &[f32], table: &[f32]) -> usize>,
    /// The fused row kernels of a dtype, if the level has them.
    pub row_kernels: fn(dtype: DType) -> Option<RowKernels>,
    /// [`crate::qdot::quantize_row_q8_0`], lengths checked.
    pub quantize_q8_0: unsafe fn(x: &[f32], y: &mut [BlockQ8_0]),
    /// [`crate::qdot::quantize_row_q8_1`], lengths checked.
    pub quantize_q8_1: unsafe fn(x: &[f32], y: &mut [BlockQ8_1]),
    /// [`crate::qdot::quantize_row_q8_k`], lengths checked.
    pub quantize_q8_k: unsafe fn(x: &[f32], y: &mut [BlockQ8K]),
    /// [`crate::qdot::round_row_f16`] over as many leading values as the kernel takes; returns
    /// how many.
    pub round_f16: Option<unsafe fn(x: &[f32], y: &mut [f32]) -> usize>,
    /// The integer tile kernel of a block-quantised dtype (the best one of the level), `None`
    /// for plain floats.
    pub quant_kernel: fn(dtype: DType) -> Option<QuantKernel>,
    /// The packed matrices' panel kernel, if the level has one.
    pub panel: Option<PanelDot>,
}

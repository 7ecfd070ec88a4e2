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

use crate::dtype::{DType, QK_K};
use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel};
use crate::qdot::packed::layout::{Act, Format, PANEL};
use crate::simd::rows::RowKernels;

/// `dot_f32(a, b)` (`a` and `b` of equal lengths).
pub(crate) type Dot = unsafe fn(a: &[f32], b: &[f32]) -> f32;
/// `N` dots `dot_f32(a, b[j n .. (j + 1) n])`, `b.len() == N * a.len()`.
pub(crate) type DotN<const N: usize> = unsafe fn(a: &[f32], b: &[f32]) -> [f32; N];
/// Two `a` rows against four `b` rows: `[dot4(a0, b), dot4(a1, b)]`.
pub(crate) type Dot2x4 = unsafe fn(a0: &[f32], a1: &[f32], b: &[f32]) -> [[f32; 4]; 2];
/// The exact products' blocked kernel: `out[r * tokens + t] = dot_f32(row r, token t)` for
/// lane-permuted rows `a` and tokens `b` of `n` floats (see [`Gemm`]).
pub(crate) type GemmTile = unsafe fn(a: &[f32], b: &[f32], n: usize, out: &mut [f32]);

/// A blocked product kernel and the lane segment its operands are permuted with
/// (`crate::simd::order::permute_lanes`).
#[derive(Clone, Copy)]
pub(crate) struct Gemm {
    /// Lanes per segment.
    pub seg: usize,
    /// The kernel of one tile of rows times tokens.
    pub tile: GemmTile,
}
/// Query heads against K rows of `T` (`crate::simd::dot_f32_rows`), sizes checked.
pub(crate) type DotRows<T> =
    unsafe fn(q: &[f32], n: usize, k: &[T], bases: &[usize], out: &mut [f32]);
/// Weighted sums of V rows of `T` (`crate::simd::weighted_rows_f32`), sizes checked.
pub(crate) type WeightedRows<T> =
    unsafe fn(ws: &[f32], v: &[T], bases: &[usize], n: usize, out: &mut [f32]);
/// A gated unit over as many leading values as the kernel takes; returns how many.
pub(crate) type Glu = unsafe fn(gate: &mut [f32], up: &[f32]) -> usize;
/// The table GELU's gated unit (`table` the 65,536 entries of
/// [`crate::ops::gelu_f16_table`]); returns how many values it did.
pub(crate) type GluTable = unsafe fn(gate: &mut [f32], up: &[f32], table: &[f32]) -> usize;
/// An activation quantiser into blocks `B`, lengths checked.
pub(crate) type Quantize<B> = unsafe fn(x: &[f32], y: &mut [B]);
/// The f16 rounding of activations over as many leading values as the kernel takes; returns how
/// many.
pub(crate) type Round = unsafe fn(x: &[f32], y: &mut [f32]) -> usize;
/// A panel kernel: 1 to 4 tokens against one panel of a packed matrix.
pub(crate) type PanelDot =
    unsafe fn(fmt: Format, p: &[u8], blocks: usize, acts: &[Act<'_>], out: &mut [[f32; PANEL]]);

/// The kernels of one [`super::Isa`].
pub(crate) struct Kernels {
    /// [`crate::simd::dot_f32`].
    pub dot_f32: Dot,
    /// Two dots at once.
    pub dot2: Option<DotN<2>>,
    /// Four dots at once.
    pub dot4: Option<DotN<4>>,
    /// Two `a` rows against four `b` rows.
    pub dot2x4: Option<Dot2x4>,
    /// Many rows against many tokens, blocked ([`crate::matmul::matmul`]'s long batches).
    pub gemm: Option<Gemm>,
    /// [`crate::simd::dot_f32_rows`].
    pub dot_rows_f32: DotRows<f32>,
    /// [`crate::simd::dot_f16_rows`].
    pub dot_rows_f16: DotRows<f16>,
    /// [`crate::simd::weighted_rows_f32`].
    pub weighted_rows_f32: WeightedRows<f32>,
    /// [`crate::simd::weighted_rows_f16`].
    pub weighted_rows_f16: WeightedRows<f16>,
    /// [`crate::simd::scale_max`].
    pub scale_max: unsafe fn(s: &mut [f32], scale: f32) -> f32,
    /// [`crate::simd::exp_sum`].
    pub exp_sum: unsafe fn(s: &mut [f32], max: f32) -> f64,
    /// [`crate::simd::scale_round`].
    pub scale_round: unsafe fn(s: &mut [f32], inv: f32, round: bool),
    /// The SiLU gated unit.
    pub glu_silu: Option<Glu>,
    /// The table GELU's gated unit.
    pub glu_gelu_table: Option<GluTable>,
    /// The fused row kernels of a dtype, if the level has them.
    pub row_kernels: fn(dtype: DType) -> Option<RowKernels>,
    /// [`crate::qdot::quantize_row_q8_0`].
    pub quantize_q8_0: Quantize<BlockQ8_0>,
    /// [`crate::qdot::quantize_row_q8_1`].
    pub quantize_q8_1: Quantize<BlockQ8_1>,
    /// [`crate::qdot::quantize_row_q8_k`].
    pub quantize_q8_k: Quantize<BlockQ8K>,
    /// [`crate::qdot::round_row_f16`]'s vector part.
    pub round_f16: Option<Round>,
    /// The integer tile kernel of a block-quantised dtype (the best one of the level), `None`
    /// for plain floats.
    pub quant_kernel: fn(dtype: DType) -> Option<QuantKernel>,
    /// The packed matrices' panel kernel, if the level has one.
    pub panel: Option<PanelDot>,
    /// Whether the panel kernel also takes Q4_K and Q6_K (whose row kernels have the packed
    /// order already, so packing them only changes the speed).
    pub panel_k_quants: bool,
}

impl Kernels {
    /// The panel kernel of `format` at this level, if it has one: the 32-element types at every
    /// level, the K-quants where [`Kernels::panel_k_quants`] says so.
    pub fn panel_for(&self, format: Format) -> Option<PanelDot> {
        self.panel
            .filter(|_| self.panel_k_quants || format.elems() != QK_K)
    }
}

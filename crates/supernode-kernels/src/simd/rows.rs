//! The fused row kernels' table type: one dtype's "dequantise and dot" kernels, as the ISA
//! modules hand them out ([`crate::cpu::Kernels::row_kernels`]). A leaf.
//!
//! Invariant: every kernel equals [`crate::simd::dot_f32`] of the row dequantised by
//! [`crate::quant::dequantize_row`] bit for bit (or, for `dequantize`, that row itself).

/// A row kernel dotting two tokens against one decode of the row.
pub(crate) type RowDot2 = fn(row: &[u8], x0: &[f32], x1: &[f32]) -> [f32; 2];

/// One dtype's SIMD row kernels. Each panics unless the row holds exactly as many elements as
/// each `x` / `y`.
#[derive(Clone, Copy)]
pub(crate) struct RowKernels {
    /// `dot_f32(dequantize(row), x)`, bit for bit, without materialising the row.
    pub dot: fn(row: &[u8], x: &[f32]) -> f32,
    /// `[dot(row, x0), dot(row, x1)]`, bit for bit, decoding the row once.
    pub dot2: RowDot2,
    /// `dequantize_row(row, y)`, bit for bit, faster.
    pub dequantize: fn(row: &[u8], y: &mut [f32]),
    /// `[dot(r, x) for r in rows]`, bit for bit, the four rows decoded in lockstep (more
    /// independent work per block for one token), where there is such a kernel.
    pub dot4: Option<RowDot4>,
}

/// A row kernel dotting four rows against one token.
pub(crate) type RowDot4 = fn(rows: [&[u8]; 4], x: &[f32]) -> [f32; 4];

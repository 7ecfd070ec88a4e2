//! The quantised activation blocks (llama.cpp's Q8_0, Q8_1 and Q8_K, with f32 scales) and the
//! integer tile kernels' types. A leaf, shared by the dispatch, the scalar reference and the
//! ISA-specific kernels.
//!
//! Invariants: Q8_0's and Q8_1's `d` and `s` hold exactly the f16-rounded values ggml stores;
//! Q8_K's `bsums[j]` is the sum of `qs[16j .. 16j + 16]`.

use crate::dtype::QK_K;

/// Elements per legacy block.
pub(crate) const QK: usize = 32;

/// 32 activations quantised to 8 bits with one scale (pairs with Q4_0, Q5_0, Q8_0 weights).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale, f16-rounded.
    pub d: f32,
    /// Quants, `-127..=127`.
    pub qs: [i8; QK],
}

/// 32 activations quantised to 8 bits with a scale and `d * Σ qs` (pairs with Q4_1, Q5_1).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale, f16-rounded.
    pub d: f32,
    /// `d * Σ qs` (with the unrounded `d`), f16-rounded.
    pub s: f32,
    /// Quants, `-127..=127`.
    pub qs: [i8; QK],
}

/// 256 activations quantised to 8 bits with one f32 scale and sums per 16 (pairs with k-quants).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale (negative when the block's largest-magnitude element is positive).
    pub d: f32,
    /// Quants, `-127..=127`.
    pub qs: [i8; QK_K],
    /// `bsums[j] = Σ qs[16j .. 16j + 16]`.
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8_0 {
    /// An all-zero block.
    pub const ZERO: BlockQ8_0 = BlockQ8_0 {
        d: 0.0,
        qs: [0; QK],
    };
}

impl BlockQ8_1 {
    /// An all-zero block.
    pub const ZERO: BlockQ8_1 = BlockQ8_1 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
}

impl BlockQ8K {
    /// An all-zero block.
    pub const ZERO: BlockQ8K = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// Most tokens one [`TileDot`] call takes.
pub(crate) const DOT_TOKENS: usize = 4;

/// Most weight rows one [`TileDot`] call takes.
pub(crate) const DOT_ROWS: usize = 8;

/// A tile kernel: `out[r * ys.len() + t] = vec_dot(rows[r], ys[t])` for 1 to [`DOT_ROWS`] rows
/// and 1 to [`DOT_TOKENS`] tokens, each result bit-identical whichever tile computed it (SIMD
/// kernels decode each row once for all the tokens, and share each token's loads between rows).
pub(crate) type TileDot<A> = fn(rows: &[&[u8]], ys: &[&[A]], out: &mut [f32]);

/// A quantised weight type's tile kernel, tagged with its activation block type.
#[derive(Clone, Copy)]
pub(crate) enum QuantKernel {
    Q8_0(TileDot<BlockQ8_0>),
    Q8_1(TileDot<BlockQ8_1>),
    Q8K(TileDot<BlockQ8K>),
}

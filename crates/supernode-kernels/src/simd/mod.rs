//! Runtime-dispatched SIMD kernels: the f32 dot product and fused "dequantise and dot" row
//! kernels, with one fixed reduction order.
//!
//! Every dot product here sums in the same shape, which depends on nothing but the length:
//! element `i` of the first `32 * (n / 32)` goes to lane `i % 32` of 32 accumulators, in order;
//! the lanes are then folded in a fixed tree (lane `l` += lane `l + 16`, then `+ 8`, `+ 4`, `+ 2`,
//! `+ 1`), and the `n % 32` tail elements are added one by one after that. The AVX2 path (4 × 8
//! lanes) is that shape exactly, with fused multiply-adds; the portable fallback is the same shape
//! without FMA, so the two differ in the last bits and are never mixed: the path is chosen once
//! per process ([`crate::cpu::kernels`]). (An AVX-512 variant of the same shape measured no
//! faster: these products are bound by loads and FMA latency, not by vector width.)
//!
//! The fused row kernels of the real models' block types have AVX-512 versions (in `crate::cpu`),
//! used where the CPU has AVX-512 F/BW/VL: two 16-lane accumulators instead of four 8-lane ones,
//! with the same lanes, operations and fold, so they equal the AVX2 kernels bit for bit (decoding
//! blocks is where the wider registers pay). For the 32-element types they read the scales of
//! 16 blocks in one gather, and can take four rows in lockstep against one token (`dot4`, for
//! decode), each row in its own accumulators: the same bits, more independent work per block.
//!
//! The attention kernels (`dot_*_rows`, `weighted_rows_*`) read K and V rows of f32 or of f16 (an
//! f16 KV cache). f16 values are widened to f32 as they are loaded, which is exact, and then go
//! through the f32 kernel's operations in the same lanes and order: the two agree bit for bit on
//! every path, and the f16 rows cost half the bytes. They have AVX-512 versions too: there the
//! dots go eight positions at a time with a shared fold, and each V value is widened once for
//! all heads, which the wider registers make pay. The softmax steps (`scale_max`, `exp_sum`,
//! `scale_round`, with the deterministic [`exp_f32`]) are vectorised with portable twins that
//! give the same bits.
//!
//! The fused row kernels (`row_kernels`) decode a quantised row block by block in registers,
//! with the same float operations as [`crate::quant::dequantize_row`], and feed the values to the
//! same lanes in the same order: their result is bit-identical to `dot_f32` of the dequantised
//! row. That is what lets [`matmul`](crate::matmul::matmul) pick either path freely without
//! breaking batch invariance.
//!
//! - [`order`]: the shared lanes, folds, tail and exponential (a leaf);
//! - [`elem`]: the K/V element types and their widening buffer (a leaf);
//! - [`rows`]: the fused row kernels' table type (a leaf);
//! - [`dot`], [`kv`], [`softmax`]: the dispatching entry points.

pub(crate) mod dot;
pub(crate) mod elem;
pub(crate) mod kv;
pub(crate) mod order;
pub(crate) mod rows;
pub(crate) mod softmax;
#[cfg(test)]
mod tests;

pub use dot::{dot_f32, dot_f32_grid, dot_f32_many};
pub use kv::{dot_f16_rows, dot_f32_rows, weighted_rows_f16, weighted_rows_f32};
pub use order::exp_f32;
pub(crate) use rows::RowKernels;
pub use softmax::{exp_sum, scale_max, scale_round};

use crate::cpu::kernels;
use crate::dtype::DType;

/// The fused row kernels for `dtype` on this machine, if there are any.
pub(crate) fn row_kernels(dtype: DType) -> Option<RowKernels> {
    (kernels().row_kernels)(dtype)
}

//! llama.cpp's numerics: activations quantised per token to the weight type's "vec_dot type", then
//! integer dot products, block by block.
//!
//! ## Which activations meet which weights
//!
//! | weights                      | activations | kernel here                 |
//! |------------------------------|-------------|-----------------------------|
//! | Q4_0, Q5_0, Q8_0             | Q8_0        | `vec_dot_<w>_q8_0`          |
//! | Q4_1, Q5_1                   | Q8_1        | `vec_dot_<w>_q8_1`          |
//! | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K | Q8_K        | `vec_dot_<w>_q8_k`          |
//! | F16 / BF16                   | f16 / bf16  | [`round_row_f16`] / [`round_row_bf16`], then the exact kernels |
//! | F32                          | f32         | the exact kernels           |
//!
//! Kernels per [`crate::cpu::Isa`], the best one the CPU has chosen once per process: the scalar
//! reference everywhere; AVX2 for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (1 to 4 tokens
//! against one decode of a weight row); AVX-512 VNNI for the same types (`avx512`: 32-element
//! types take rows in pairs, one 512-bit register per block pair, `vpdpbusd` for the integer
//! lanes, up to 8 rows per call; K-quants in 256-bit registers with `vpdpwssd`). Q2_K and Q3_K
//! run the scalar reference (written to auto-vectorise) at every level. At every level the
//! model's matrices of the 32-element types are instead re-laid out at load time into 16-row
//! panels ([`packed`]), whose kernels keep one lane per row and have their own reference order
//! (llama.cpp's scalar one); the row kernels of these types serve the products of matrices
//! that are not a model's (and the tests). Every row kernel is a tile:
//! 1 to [`DOT_ROWS`] weight rows times 1 to [`DOT_TOKENS`] tokens per call, each result the same
//! bits whatever the tile's shape and whatever the level.
//!
//! ## Activation blocks
//!
//! | block        | elements | fields                                  | element `i`     |
//! |--------------|----------|-----------------------------------------|-----------------|
//! | [`BlockQ8_0`] | 32      | `d`, `qs[32]` (i8)                      | `d * qs[i]`     |
//! | [`BlockQ8_1`] | 32      | `d`, `s`, `qs[32]` (i8)                 | `d * qs[i]`     |
//! | [`BlockQ8K`]  | 256     | `d`, `qs[256]` (i8), `bsums[16]` (i16)  | `d * qs[i]`     |
//!
//! ggml stores Q8_0's and Q8_1's `d` and `s` as f16; here they are f32 holding exactly those
//! f16-rounded values (the same numbers, with no conversion left for the kernels). Q8_1's `s`
//! is `f16(d * Σ qs)` with the unrounded `d`; Q8_K's `d` is a plain f32 and `bsums[j]` is the sum
//! of `qs[16j .. 16j + 16]`.
//!
//! The quantisers are llama.cpp's reference ones (`quantize_row_q8_{0,1,K}_ref`), bit for bit:
//! - Q8_0 / Q8_1: `d = amax / 127`, `id = 1 / d` (from the unrounded `d`), `q = roundf(x * id)`
//!   (ties away from zero); `d` is then rounded to f16. (llama.cpp's own x86 build quantises with
//!   its AVX2 routine instead, `id = 127 / amax` and ties to even: a last-bit difference on rare
//!   elements.)
//! - Q8_K: `max` is the element of largest magnitude *with its sign* (the first one on ties),
//!   `iscale = -127 / max`, `q = min(127, nearest_int(iscale * x))` (ties to even), `d = 1 / iscale`:
//!   the largest element always becomes `-127` and `d` carries the opposite sign.
//!
//! ## Dot products, and why they are batch invariant
//!
//! Integer products within a block are summed exactly (no order matters), then scaled in f32 with
//! a fixed sequence of operations, the same in the scalar reference and the AVX2 and AVX-512
//! kernels, which are therefore bit-identical (one level is still chosen per process):
//! - 32-element blocks: the block's 32 products go to 8 integer lanes of 4 consecutive elements
//!   (lane `k`: elements `4k .. 4k + 4`, the shape of `maddubs` + `madd` and of `vpdpbusd`); then
//!   `acc[k] = acc[k] + (d_w * d_x) * lane[k]` (multiply, then add: no FMA), block after block;
//!   the lanes fold as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`. Q4_1 and Q5_1 then
//!   add `Σ m_w * s_x`, accumulated in block order.
//! - 256-element super-blocks: per super-block the scaled integer sum `sumi = Σ_g sc_g Σ q_w q_x`
//!   and, for types with mins, `summ = Σ_g m_g * bsums_g` are exact; then
//!   `acc = acc + (d_w * d_x) * sumi` and `acc = acc - (dmin_w * d_x) * summ`, super-block after
//!   super-block.
//!
//! A token's activations are quantised on their own, so its blocks are the same bytes whatever
//! the batch, and every output is one fixed function of (weight row, quantised token row).
//! Overflow: with `|q_x| <= 127` every integer sum fits easily in i32 (and the 16-bit pair sums
//! of `maddubs` never saturate).

pub(crate) mod blocks;
pub mod packed;
mod quantize;
pub(crate) mod reference;
#[cfg(test)]
mod tests;

pub use blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1};
pub(crate) use blocks::{QuantKernel, TileDot, DOT_ROWS, DOT_TOKENS};
pub(crate) use quantize::ActBlock;
pub use quantize::{
    quantize_row_q8_0, quantize_row_q8_1, quantize_row_q8_k, round_row_bf16, round_row_f16,
};
pub use reference::{
    vec_dot_q2_k_q8_k, vec_dot_q3_k_q8_k, vec_dot_q4_0_q8_0, vec_dot_q4_1_q8_1, vec_dot_q4_k_q8_k,
    vec_dot_q5_0_q8_0, vec_dot_q5_1_q8_1, vec_dot_q5_k_q8_k, vec_dot_q6_k_q8_k, vec_dot_q8_0_q8_0,
};

use crate::cpu::kernels;
use crate::dtype::DType;

/// The tile kernel of a block-quantised `dtype` on this machine (the best level with one: the
/// same bits at every level), `None` for plain floats.
pub(crate) fn quant_kernel(dtype: DType) -> Option<QuantKernel> {
    (kernels().quant_kernel)(dtype)
}

//! The dispatched activation quantisers: each token's activations to the weight type's
//! "vec_dot type" (Q8_0, Q8_1, Q8_K; f16 or bf16 values for F16 and BF16 weights).
//!
//! Invariant: bit for bit llama.cpp's reference quantisers ([`crate::qdot::reference`]) on every
//! path, so a token's blocks are the same bytes whatever the machine's level or the batch.

use super::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QK};
use super::reference::f16_round;
use crate::cpu::kernels;
use crate::dtype::QK_K;

/// An activation block type: how many elements it holds and how a row is quantised into it.
pub(crate) trait ActBlock: Copy + Send + Sync + 'static {
    /// Elements per block.
    const ELEMS: usize;
    /// An all-zero block, to size buffers.
    const ZERO: Self;
    /// Quantise `x` (`ELEMS * y.len()` values) into `y`.
    fn quantize(x: &[f32], y: &mut [Self]);
}

impl ActBlock for BlockQ8_0 {
    const ELEMS: usize = QK;
    const ZERO: Self = BlockQ8_0::ZERO;
    fn quantize(x: &[f32], y: &mut [Self]) {
        quantize_row_q8_0(x, y)
    }
}

impl ActBlock for BlockQ8_1 {
    const ELEMS: usize = QK;
    const ZERO: Self = BlockQ8_1::ZERO;
    fn quantize(x: &[f32], y: &mut [Self]) {
        quantize_row_q8_1(x, y)
    }
}

impl ActBlock for BlockQ8K {
    const ELEMS: usize = QK_K;
    const ZERO: Self = BlockQ8K::ZERO;
    fn quantize(x: &[f32], y: &mut [Self]) {
        quantize_row_q8_k(x, y)
    }
}

/// llama.cpp's `quantize_row_q8_0_ref`, bit for bit: `x` holds `32 * y.len()` values.
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_0: lengths");
    // SAFETY: the table is this machine's; lengths checked.
    unsafe { (kernels().quantize_q8_0)(x, y) }
}

/// llama.cpp's `quantize_row_q8_1_ref`, bit for bit: `x` holds `32 * y.len()` values.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_1: lengths");
    // SAFETY: the table is this machine's; lengths checked.
    unsafe { (kernels().quantize_q8_1)(x, y) }
}

/// llama.cpp's `quantize_row_q8_K_ref`, bit for bit: `x` holds `256 * y.len()` values.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    assert_eq!(x.len(), QK_K * y.len(), "quantize_row_q8_k: lengths");
    // SAFETY: the table is this machine's; lengths checked.
    unsafe { (kernels().quantize_q8_k)(x, y) }
}

/// Activations for F16 weights: every value rounded to the nearest f16 (ties to even, as ggml's
/// `GGML_FP32_TO_FP16`) and kept widened to f32 (exact).
pub fn round_row_f16(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "round_row_f16: lengths");
    // SAFETY: the table is this machine's; lengths checked.
    let done = kernels()
        .round_f16
        .map_or(0, |round| unsafe { round(x, y) });
    for (y, x) in y[done..].iter_mut().zip(&x[done..]) {
        *y = f16_round(*x);
    }
}

/// Activations for BF16 weights: every value rounded to the nearest bf16 (ties to even, as
/// ggml's `GGML_FP32_TO_BF16`; NaN stays NaN) and kept widened to f32 (exact).
pub fn round_row_bf16(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "round_row_bf16: lengths");
    for (y, x) in y.iter_mut().zip(x) {
        let bits = x.to_bits();
        let carry = 0x7fff + ((bits >> 16) & 1);
        let rounded = f32::from_bits(bits.wrapping_add(carry) & 0xffff_0000);
        *y = if x.is_nan() { *x } else { rounded };
    }
}

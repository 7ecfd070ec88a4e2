//! CPU kernels and tensor element types. Knows no model.
//!
//! - [`dtype`]: element types, including GGUF's block-quantised formats;
//! - [`ops`]: norms, rope, activations and attention over a paged KV cache;
//! - [`quant`]: reference (de)quantisers of the GGUF block formats;
//! - [`matmul`](mod@matmul): batch-invariant weight-times-activations products, parallel over rows;
//! - [`qdot`]: llama.cpp's activation quantisers and integer dot products (quantised mode);
//! - [`simd`]: runtime-dispatched dot products with one fixed reduction order;
//! - [`pool`]: the low-overhead thread pool the kernels and layers run their loops on.

pub mod dtype;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod qdot;
pub mod quant;
pub mod simd;

pub use dtype::{DType, ALL_DTYPES, QK_K};
pub use matmul::{matmul, WeightMatrix};
pub use matmul::{matmul_with, Precision};
pub use quant::{dequantize_row, quantize_row};
pub use simd::dot_f32;

//! CPU kernels and tensor element types. Knows no model.
//!
//! - [`dtype`]: element types, including GGUF's block-quantised formats;
//! - [`ops`]: norms, rope, activations and attention over a paged KV cache;
//! - [`quant`]: reference (de)quantisers of the GGUF block formats;
//! - [`matmul`](mod@matmul): batch-invariant weight-times-activations products, parallel over rows;
//! - [`qdot`]: llama.cpp's activation quantisers and integer dot products (quantised mode);
//! - [`simd`]: dispatched float kernels (dot products, attention rows, softmax steps) with one
//!   fixed reduction order;
//! - [`weight`]: [`PreparedWeight`], a matrix prepared for this machine's products (packing is
//!   its business, not the model's);
//! - [`pool`]: the low-overhead thread pool the kernels and layers run their loops on;
//! - [`scratch`]: the per-forward scratch arena (reused activation buffers, per thread);
//! - `cpu`: the instruction set, detected once, and the ISA-specific kernels behind one table.
//!
//! Module graph: the dispatching modules call [`cpu`](crate::cpu)'s table; the ISA-specific
//! modules under `cpu` import only leaf modules (shared orders and types), never the reverse.

mod cpu;
pub mod dtype;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod qdot;
pub mod quant;
pub mod scratch;
pub mod simd;
pub mod weight;

pub use cpu::{check_isa_env, isa_name, ISA_ENV};
pub use dtype::{DType, ALL_DTYPES, QK_K};
pub use matmul::{matmul, WeightMatrix};
pub use matmul::{matmul_with, Precision};
pub use quant::{dequantize_row, quantize_row};
pub use simd::dot_f32;
pub use weight::{PreparedWeight, WeightBytes};

//! CPU kernels and tensor element types. Knows no model.
//!
//! - [`dtype`]: element types, including GGUF's block-quantised formats;

pub mod dtype;

pub use dtype::{DType, ALL_DTYPES, QK_K};

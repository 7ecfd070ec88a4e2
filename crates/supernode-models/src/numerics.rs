//! The numerics of a loaded model, resolved once from the [`Precision`] asked for at load: every
//! choice that precision makes in the forward pass (how products are computed, which GELU, where
//! values are rounded to f16, the KV cache's element type) is a field here, so that no layer or
//! architecture looks at the precision itself.

use supernode_kernels::ops::Activation;
use supernode_kernels::Precision;

use crate::kv_cache::KvDType;

/// How a model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Numerics {
    /// How activations meet weights in every projection (handed to the matmul kernels, which
    /// also decide from it whether to pack the weights for this CPU).
    pub matmul: Precision,
    /// The GELU of GeGLU feed-forwards.
    pub gelu: Activation,
    /// Round queries, keys, values (and softmax weights) to f16, as llama.cpp does.
    pub f16_rounding: bool,
    /// The element type of the KV cache rows ([`KvDType::for_rounding`]).
    pub kv_dtype: KvDType,
}

impl Numerics {
    pub fn new(precision: Precision) -> Numerics {
        let quantized = precision == Precision::Quantized;
        Numerics {
            matmul: precision,
            // llama.cpp's table GELU in its numerics; the formula itself otherwise.
            gelu: match quantized {
                true => Activation::GeluF16Table,
                false => Activation::GeluTanh,
            },
            f16_rounding: quantized,
            kv_dtype: KvDType::for_rounding(quantized),
        }
    }

    /// These numerics with the KV cache's element type `kv_dtype` where one is given. An f16
    /// cache in exact precision rounds each key and value to f16 as it is stored (what
    /// llama.cpp's default cache does): half the bytes per token, at that rounding's cost.
    pub fn with_kv_dtype(self, kv_dtype: Option<KvDType>) -> Numerics {
        Numerics {
            kv_dtype: kv_dtype.unwrap_or(self.kv_dtype),
            ..self
        }
    }
}

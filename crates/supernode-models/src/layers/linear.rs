//! A dense projection `y = W x (+ b)` over a flat batch of token rows.

use supernode_kernels::matmul::{matmul_with, Precision, WeightMatrix};

use crate::Tensor;

/// `rows × cols` weights (any dtype), optional f32 bias of `rows`.
pub struct Linear {
    w: Tensor,
    bias: Option<Vec<f32>>,
    precision: Precision,
}

impl Linear {
    pub(crate) fn new(w: Tensor, bias: Option<Vec<f32>>, precision: Precision) -> Linear {
        Linear { w, bias, precision }
    }

    pub fn rows(&self) -> usize {
        self.w.rows()
    }

    pub fn cols(&self) -> usize {
        self.w.cols()
    }

    /// Bytes of weights read per application (for bandwidth figures).
    pub fn weight_bytes(&self) -> usize {
        self.w.bytes().len()
    }

    /// `x`: `n × cols`; `out`: `n × rows`.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let w = WeightMatrix {
            dtype: self.w.dtype,
            rows: self.rows(),
            cols: self.cols(),
            data: self.w.bytes(),
        };
        matmul_with(&w, x, n, out, self.precision);
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, &bb) in row.iter_mut().zip(b) {
                    *o += bb;
                }
            }
        }
    }
}

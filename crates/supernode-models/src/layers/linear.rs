//! A dense projection `y = W x (+ b)` over a flat batch of token rows.

use supernode_kernels::matmul::{
    matmul_packed, matmul_packed_glu, matmul_packed_many, matmul_with, WeightMatrix,
};
use supernode_kernels::ops::{glu_inplace, Activation};
use supernode_kernels::qdot::packed::PackedMatrix;

use crate::numerics::Numerics;
use crate::Tensor;

/// `rows × cols` weights (any dtype), optional f32 bias of `rows`.
///
/// Where the numerics pack weights, those of the 32-element types are re-laid out once at load
/// time into panels for the integer dot instructions ([`PackedMatrix`]) when this CPU has the packed
/// kernels; the products then always go through them (so each matrix keeps one reduction order
/// whatever the batch).
pub struct Linear {
    w: Tensor,
    packed: Option<PackedMatrix>,
    bias: Option<Vec<f32>>,
    numerics: Numerics,
}

impl Linear {
    pub(crate) fn new(w: Tensor, bias: Option<Vec<f32>>, numerics: Numerics) -> Linear {
        let packed = match numerics.pack_weights {
            true => PackedMatrix::pack(w.dtype, w.rows(), w.cols(), w.bytes()),
            false => None,
        };
        if packed.is_some() {
            // The mapped pages were read once to pack them: let them go from this process's
            // resident set (they come back from the page cache if the same bytes are still
            // needed, e.g. as the embedding table of a tied output head).
            w.release_pages();
        }
        Linear {
            w,
            packed,
            bias,
            numerics,
        }
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
        if let Some(p) = &self.packed {
            matmul_packed(p, x, n, out);
        } else {
            let w = WeightMatrix {
                dtype: self.w.dtype,
                rows: self.rows(),
                cols: self.cols(),
                data: self.w.bytes(),
            };
            matmul_with(&w, x, n, out, self.numerics.matmul);
        }
        self.add_bias(out);
    }

    /// Several projections of the same input (`outs[i]` from `linears[i]`): the same bits as
    /// calling [`Linear::forward`] on each, in one parallel loop when all are packed.
    pub fn forward_many(linears: &[&Linear], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
        let packed: Option<Vec<&PackedMatrix>> =
            linears.iter().map(|l| l.packed.as_ref()).collect();
        match packed {
            Some(ms) if ms.len() > 1 => {
                matmul_packed_many(&ms, x, n, outs);
                for (l, out) in linears.iter().zip(outs.iter_mut()) {
                    l.add_bias(out);
                }
            }
            _ => {
                for (l, out) in linears.iter().zip(outs.iter_mut()) {
                    l.forward(x, n, out);
                }
            }
        }
    }

    /// The gated linear unit `act(gate x) * (up x)` into `out` (`n × rows`): the same bits as
    /// the two products then [`glu_inplace`], fused into one parallel loop when both are packed
    /// (and unbiased).
    pub fn forward_glu(
        gate: &Linear,
        up: &Linear,
        x: &[f32],
        n: usize,
        act: Activation,
        out: &mut [f32],
    ) {
        match (&gate.packed, &up.packed, &gate.bias, &up.bias) {
            (Some(g), Some(u), None, None) => matmul_packed_glu(g, u, x, n, act, out),
            _ => {
                let mut u = vec![0.0; out.len()];
                Linear::forward_many(&[gate, up], x, n, &mut [out, &mut u]);
                glu_inplace(out, &u, act);
            }
        }
    }

    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, &bb) in row.iter_mut().zip(b) {
                    *o += bb;
                }
            }
        }
    }
}

/// `count` matrices of `rows × cols` stacked in one tensor (ggml shape `[cols, rows, count]`):
/// a MoE layer's experts (`ffn_*_exps`) or MLA's per-head projections (`attn_k_b`,
/// `attn_v_b`). Each matrix is applied on its own, without copying it out.
pub struct StackedLinear {
    w: Tensor,
    rows: usize,
    cols: usize,
    /// Bytes of one matrix.
    stride: usize,
    numerics: Numerics,
}

impl StackedLinear {
    /// `w` must have whole-block rows and shape `[cols, rows, count]` (the caller checks).
    pub(crate) fn new(w: Tensor, numerics: Numerics) -> StackedLinear {
        let (cols, rows) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
        let stride = w.dtype.row_bytes(cols).unwrap_or(0) * rows;
        StackedLinear {
            w,
            rows,
            cols,
            stride,
            numerics,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of one matrix (for bandwidth figures).
    pub fn matrix_bytes(&self) -> usize {
        self.stride
    }

    /// Bytes of all matrices.
    pub fn weight_bytes(&self) -> usize {
        self.w.bytes().len()
    }

    /// Matrix `i` applied to `x` (`n × cols`) into `out` (`n × rows`).
    pub fn forward(&self, i: usize, x: &[f32], n: usize, out: &mut [f32]) {
        let w = WeightMatrix {
            dtype: self.w.dtype,
            rows: self.rows,
            cols: self.cols,
            data: &self.w.bytes()[i * self.stride..(i + 1) * self.stride],
        };
        matmul_with(&w, x, n, out, self.numerics.matmul);
    }
}

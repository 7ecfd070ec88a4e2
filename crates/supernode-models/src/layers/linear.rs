//! A dense projection `y = W x (+ b)` over a flat batch of token rows.

use supernode_kernels::matmul::{matmul_packed, matmul_with, Precision, WeightMatrix};
use supernode_kernels::ops::Activation;
use supernode_kernels::qdot::packed::PackedMatrix;
use supernode_kernels::scratch::zeroed;
use supernode_kernels::{PreparedWeight, WeightBytes};

use crate::numerics::Numerics;
use crate::Tensor;

impl WeightBytes for Tensor {
    fn bytes(&self) -> &[u8] {
        Tensor::bytes(self)
    }

    /// Packed weights leave the mapped pages unread: they go from this process's resident set
    /// (they come back from the page cache if the same bytes are needed again, e.g. as the
    /// embedding table of a tied output head).
    fn release_pages(&self) {
        Tensor::release_pages(self)
    }
}

/// `rows × cols` weights (any dtype, prepared for this machine's kernels as the numerics say),
/// optional f32 bias of `rows`.
pub struct Linear {
    w: PreparedWeight<Tensor>,
    bias: Option<Vec<f32>>,
}

impl Linear {
    pub(crate) fn new(w: Tensor, bias: Option<Vec<f32>>, numerics: Numerics) -> Linear {
        let (dtype, rows, cols) = (w.dtype, w.rows(), w.cols());
        Linear {
            w: PreparedWeight::new(w, dtype, rows, cols, numerics.matmul),
            bias,
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
        self.w.weight_bytes()
    }

    /// `x`: `n × cols`; `out`: `n × rows`.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.w.matmul(x, n, out);
        self.add_bias(out);
    }

    /// Several projections of the same input (`outs[i]` from `linears[i]`): the same bits as
    /// calling [`Linear::forward`] on each, in one parallel loop where the kernels can.
    pub fn forward_many(linears: &[&Linear], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
        let ws: Vec<&PreparedWeight<Tensor>> = linears.iter().map(|l| &l.w).collect();
        PreparedWeight::matmul_many(&ws, x, n, outs);
        for (l, out) in linears.iter().zip(outs.iter_mut()) {
            l.add_bias(out);
        }
    }

    /// The gated linear unit `act(gate x) * (up x)` into `out` (`n × rows`): the same bits as
    /// the two products then [`supernode_kernels::ops::glu_inplace`], fused where the kernels
    /// can (and both are unbiased).
    pub fn forward_glu(
        gate: &Linear,
        up: &Linear,
        x: &[f32],
        n: usize,
        act: Activation,
        out: &mut [f32],
    ) {
        if gate.bias.is_none() && up.bias.is_none() {
            PreparedWeight::matmul_glu(&gate.w, &up.w, x, n, act, out);
        } else {
            let mut u = zeroed(out.len());
            Linear::forward_many(&[gate, up], x, n, &mut [out, &mut u]);
            supernode_kernels::ops::glu_inplace(out, &u, act);
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
/// `attn_v_b`). Each matrix is applied on its own, without copying it out, or (experts in
/// quantised precision, where the CPU has the packed kernels) from its packed copy.
pub struct StackedLinear {
    w: Tensor,
    rows: usize,
    cols: usize,
    /// Bytes of one matrix.
    stride: usize,
    numerics: Numerics,
    /// Each matrix packed for the integer dot instructions ([`PackedMatrix`]), when all of them
    /// could be: then every product of this tensor runs on the panels (one reduction order per
    /// matrix, whatever the batch).
    packed: Option<Vec<PackedMatrix>>,
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
            packed: None,
        }
    }

    /// [`StackedLinear::new`], each matrix packed where the precision and the CPU call for it
    /// (as [`Linear`]'s weights are): a mixture of experts' stacked experts. The mapped bytes
    /// are then released.
    pub(crate) fn new_packed(w: Tensor, numerics: Numerics) -> StackedLinear {
        let mut s = StackedLinear::new(w, numerics);
        if numerics.matmul == Precision::Quantized && s.stride > 0 {
            let count = s.w.bytes().len() / s.stride;
            let packed: Option<Vec<PackedMatrix>> =
                s.w.bytes()
                    .chunks_exact(s.stride)
                    .take(count)
                    .map(|m| PackedMatrix::pack(s.w.dtype, s.rows, s.cols, m))
                    .collect();
            if packed.is_some() {
                s.w.release_pages();
            }
            s.packed = packed;
        }
        s
    }

    /// Matrix `i`'s packed copy, if this tensor was packed.
    pub fn packed(&self, i: usize) -> Option<&PackedMatrix> {
        self.packed.as_ref().map(|p| &p[i])
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
        if let Some(p) = self.packed(i) {
            return matmul_packed(p, x, n, out);
        }
        let w = WeightMatrix {
            dtype: self.w.dtype,
            rows: self.rows,
            cols: self.cols,
            data: &self.w.bytes()[i * self.stride..(i + 1) * self.stride],
        };
        matmul_with(&w, x, n, out, self.numerics.matmul);
    }
}

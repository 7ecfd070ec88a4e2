//! Weights prepared for this machine's kernels: the one type a model holds for a matrix, so it
//! never sees a kernel's layout.
//!
//! A [`PreparedWeight`] owns the weight's bytes (any [`WeightBytes`], e.g. a model's mapped
//! tensor) and, where the precision and the CPU call for it, a packed copy laid out for the
//! integer dot instructions ([`crate::qdot::packed::PackedMatrix`], made once at load). Its
//! products pick the path: the packed panels when there are some, else
//! [`crate::matmul::matmul_with`] on the bytes. Each matrix therefore keeps one reduction order
//! whatever the batch (batch invariance), and a second backend (a GPU) would prepare and
//! dispatch its own layouts behind the same methods, with no model file changing.

use crate::dtype::DType;
use crate::matmul::{
    matmul_packed, matmul_packed_glu, matmul_packed_many, matmul_with, Precision, WeightMatrix,
};
use crate::ops::{glu_inplace, Activation};
use crate::qdot::packed::PackedMatrix;

/// Where a weight's bytes live (a mapped file, a buffer).
pub trait WeightBytes {
    /// The row-major bytes of the matrix.
    fn bytes(&self) -> &[u8];
    /// The bytes will not be read again for a while (they were packed): a mapped file may let
    /// its pages go from the resident set.
    fn release_pages(&self) {}
}

impl WeightBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A `rows × cols` weight matrix of `dtype`, ready for this machine's products.
pub struct PreparedWeight<B> {
    src: B,
    dtype: DType,
    rows: usize,
    cols: usize,
    /// Boxed: most weights have none, and a prepared weight stays small.
    packed: Option<Box<PackedMatrix>>,
    precision: Precision,
}

impl<B: WeightBytes> PreparedWeight<B> {
    /// Prepares `src` for products in `precision`: in quantised precision, weights of the
    /// 32-element types are packed into panels (on every machine), and Q4_K and Q6_K ones on
    /// x86-64 CPUs with AVX2 (the bytes are then released).
    pub fn new(src: B, dtype: DType, rows: usize, cols: usize, precision: Precision) -> Self {
        let packed = match precision {
            Precision::Quantized => {
                PackedMatrix::pack(dtype, rows, cols, src.bytes()).map(Box::new)
            }
            Precision::Exact => None,
        };
        if packed.is_some() {
            src.release_pages();
        }
        PreparedWeight {
            src,
            dtype,
            rows,
            cols,
            packed,
            precision,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The weight's own bytes.
    pub fn source(&self) -> &B {
        &self.src
    }

    /// Bytes of weights read per application (for bandwidth figures).
    pub fn weight_bytes(&self) -> usize {
        self.src.bytes().len()
    }

    /// Whether the products run on packed panels.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// `out[t * rows + r] = dot(row r, x_t)`: `x` is `n × cols`, `out` is `n × rows`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        match &self.packed {
            Some(p) => matmul_packed(p, x, n, out),
            None => {
                let w = WeightMatrix {
                    dtype: self.dtype,
                    rows: self.rows,
                    cols: self.cols,
                    data: self.src.bytes(),
                };
                matmul_with(&w, x, n, out, self.precision);
            }
        }
    }

    /// Several matrices on the same activations (`outs[i]` from `ws[i]`): the same bits as
    /// [`PreparedWeight::matmul`] of each, in one parallel loop when all are packed.
    pub fn matmul_many(ws: &[&Self], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
        let packed: Option<Vec<&PackedMatrix>> = ws.iter().map(|w| w.packed.as_deref()).collect();
        match packed {
            Some(ms) if ms.len() > 1 => matmul_packed_many(&ms, x, n, outs),
            _ => {
                for (w, out) in ws.iter().zip(outs.iter_mut()) {
                    w.matmul(x, n, out);
                }
            }
        }
    }

    /// The gated linear unit `act(gate x) * (up x)` into `out` (`n × rows`): the same bits as
    /// the two products then [`glu_inplace`], fused into one parallel loop when both are packed.
    pub fn matmul_glu(
        gate: &Self,
        up: &Self,
        x: &[f32],
        n: usize,
        act: Activation,
        out: &mut [f32],
    ) {
        match (&gate.packed, &up.packed) {
            (Some(g), Some(u)) => matmul_packed_glu(g, u, x, n, act, out),
            _ => {
                let mut u = crate::scratch::zeroed(out.len());
                Self::matmul_many(&[gate, up], x, n, &mut [out, &mut u]);
                glu_inplace(out, &u, act);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;

    fn matrix(dtype: DType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        let mut bytes = Vec::new();
        for _ in 0..rows {
            let row: Vec<f32> = (0..cols)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 2001) as f32 / 1000.0 - 1.0
                })
                .collect();
            let mut q = vec![0u8; dtype.row_bytes(cols).unwrap()];
            quantize_row(dtype, &row, &mut q);
            bytes.extend(q);
        }
        bytes
    }

    /// Every product of a prepared weight is the same bits as the plain kernel on its bytes (on
    /// a machine with the packed kernels, the packed path's own tests pin those to the
    /// reference order), and the fused forms equal the separate ones.
    #[test]
    fn prepared_products_equal_the_plain_kernels() {
        let (rows, cols, n) = (40, 64, 3);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0)
            .collect();
        for dtype in [DType::Q8_0, DType::Q4_0, DType::F32] {
            for precision in [Precision::Exact, Precision::Quantized] {
                let (gb, ub) = (matrix(dtype, rows, cols, 1), matrix(dtype, rows, cols, 2));
                let plain = |b: &[u8]| {
                    let w = WeightMatrix {
                        dtype,
                        rows,
                        cols,
                        data: b,
                    };
                    let mut out = vec![0.0; n * rows];
                    matmul_with(&w, &x, n, &mut out, precision);
                    out
                };
                let g = PreparedWeight::new(gb.clone(), dtype, rows, cols, precision);
                let u = PreparedWeight::new(ub.clone(), dtype, rows, cols, precision);
                let mut out = vec![0.0; n * rows];
                g.matmul(&x, n, &mut out);
                if !g.is_packed() {
                    assert_eq!(out, plain(&gb), "{dtype:?} {precision:?}");
                }
                let (mut a, mut b) = (vec![0.0; n * rows], vec![0.0; n * rows]);
                PreparedWeight::matmul_many(&[&g, &u], &x, n, &mut [&mut a, &mut b]);
                assert_eq!(a, out);
                let mut ub_out = vec![0.0; n * rows];
                u.matmul(&x, n, &mut ub_out);
                assert_eq!(b, ub_out);
                let mut fused = vec![0.0; n * rows];
                PreparedWeight::matmul_glu(&g, &u, &x, n, Activation::Silu, &mut fused);
                glu_inplace(&mut a, &b, Activation::Silu);
                assert_eq!(fused, a, "{dtype:?} {precision:?}");
            }
        }
    }
}

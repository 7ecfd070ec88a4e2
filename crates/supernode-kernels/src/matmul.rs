//! Weight-times-activations products for every weight dtype, parallel over rows, batch invariant.
//!
//! `out[t * rows + r] = dot(row r of W, x_t)`: the weights are row-major (each row
//! `dtype.row_bytes(cols)` bytes, rows consecutive, as GGUF stores them), activations and output
//! token-major. The work is split into tiles of rows (and, for long batches, chunks of tokens)
//! run on the rayon pool, so a single token (decode) uses every thread.
//!
//! Batch invariance: every output element is `dot_f32(dequantize(row r), x_t)` with the fixed
//! reduction order of [`crate::simd`], whatever the batch size or the token's place in it. Two
//! strategies produce it: a fused kernel that decodes the row in registers for each token (short
//! batches), or dequantising each row of a tile once into a per-thread scratch buffer and dotting
//! it with every token (long batches). The fused kernels are bit-identical to the second
//! strategy, so switching between them with the batch size changes no bit.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::dtype::DType;
use crate::quant::dequantize_row;
use crate::simd::{dot_f32_many, row_kernels, RowKernels};

/// A row-major weight matrix: `rows` rows of `cols` elements, each row `dtype.row_bytes(cols)`
/// bytes, rows consecutive.
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> WeightMatrix<'a> {
    /// Bytes of one row. Panics if `cols` is not a whole number of blocks.
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or_else(|| {
            panic!(
                "{} columns is not a whole number of {} blocks",
                self.cols,
                self.dtype.name()
            )
        })
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// Rows per tile: each tile's rows are dequantised together into one scratch buffer.
const TILE_ROWS: usize = 16;

/// Tokens per task in long batches, so that few rows still spread over all threads.
const TOKEN_CHUNK: usize = 64;

/// Tokens dotted together against each dequantised row.
const TOKEN_GROUP: usize = 4;

/// Up to this many tokens the fused kernels decode each row once per token; beyond it, rows are
/// dequantised once per tile and token chunk. Either way the results are the same bits.
const FUSED_MAX_TOKENS: usize = 2;

/// `out[t * rows + r] = dot(row r of w, x[t * cols .. (t + 1) * cols])` for `t` in
/// `0..n_tokens`. Bit-identical per element whatever `n_tokens` is and wherever `t` sits.
pub fn matmul(w: &WeightMatrix, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    let row_bytes = w.row_bytes();
    assert_eq!(w.data.len(), w.rows * row_bytes, "matmul: weight bytes");
    assert_eq!(x.len(), n_tokens * w.cols, "matmul: activations length");
    assert_eq!(out.len(), n_tokens * w.rows, "matmul: output length");
    if w.cols == 0 {
        out.fill(0.0);
        return;
    }
    if out.is_empty() {
        return;
    }
    let kernels = row_kernels(w.dtype);
    let fused = kernels.filter(|_| n_tokens <= FUSED_MAX_TOKENS);
    let dequantize = kernels.map_or(Dequantize::Scalar(w.dtype), |k| {
        Dequantize::Simd(k.dequantize)
    });
    let row_tiles = w.rows.div_ceil(TILE_ROWS);
    let token_chunks = n_tokens.div_ceil(TOKEN_CHUNK);
    let out = SharedOut(out.as_mut_ptr());
    (0..row_tiles * token_chunks)
        .into_par_iter()
        .for_each(|task| {
            let (tile, chunk) = (task % row_tiles, task / row_tiles);
            let rows = tile * TILE_ROWS..((tile + 1) * TILE_ROWS).min(w.rows);
            let tokens = chunk * TOKEN_CHUNK..((chunk + 1) * TOKEN_CHUNK).min(n_tokens);
            let job = Tile {
                w,
                x,
                rows,
                tokens,
                out: &out,
            };
            match fused {
                Some(kernels) => job.run_fused(kernels),
                None => job.run_dequantised(dequantize),
            }
        });
}

/// One task: a range of rows times a range of tokens.
struct Tile<'a, 'w> {
    w: &'a WeightMatrix<'w>,
    x: &'a [f32],
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    out: &'a SharedOut,
}

thread_local! {
    /// Per-thread dequantised rows of the current tile, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Tile<'_, '_> {
    fn token(&self, t: usize) -> &[f32] {
        &self.x[t * self.w.cols..(t + 1) * self.w.cols]
    }

    fn store(&self, t: usize, r: usize, v: f32) {
        // SAFETY: `r` is in this task's row range and `t` in its token range; tasks have
        // disjoint (row, token) ranges, and `t * rows + r < out.len()` by the checks in `matmul`,
        // whose `out` borrow outlives the parallel loop.
        unsafe { self.out.0.add(t * self.w.rows + r).write(v) }
    }

    fn run_fused(&self, kernels: RowKernels) {
        for r in self.rows.clone() {
            let row = self.w.row(r);
            let mut t = self.tokens.start;
            while t + 2 <= self.tokens.end {
                let [a, b] = (kernels.dot2)(row, self.token(t), self.token(t + 1));
                self.store(t, r, a);
                self.store(t + 1, r, b);
                t += 2;
            }
            if t < self.tokens.end {
                self.store(t, r, (kernels.dot)(row, self.token(t)));
            }
        }
    }

    fn run_dequantised(&self, dequantize: Dequantize) {
        let cols = self.w.cols;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(TILE_ROWS * cols, 0.0);
            for (r, dst) in self.rows.clone().zip(scratch.chunks_exact_mut(cols)) {
                dequantize.row(self.w.row(r), dst);
            }
            // A few tokens at a time against every row of the tile: the tokens stay in L1.
            let mut dots = [0f32; TOKEN_GROUP];
            for t0 in self.tokens.clone().step_by(TOKEN_GROUP) {
                let t1 = (t0 + TOKEN_GROUP).min(self.tokens.end);
                let xs = &self.x[t0 * cols..t1 * cols];
                for (i, r) in self.rows.clone().enumerate() {
                    let dots = &mut dots[..t1 - t0];
                    dot_f32_many(&scratch[i * cols..(i + 1) * cols], xs, dots);
                    for (t, v) in (t0..t1).zip(dots.iter()) {
                        self.store(t, r, *v);
                    }
                }
            }
        });
    }
}

/// How a tile's rows are dequantised: SIMD where there is a kernel, else the scalar reference
/// (the same values either way).
#[derive(Clone, Copy)]
enum Dequantize {
    Simd(fn(&[u8], &mut [f32])),
    Scalar(DType),
}

impl Dequantize {
    fn row(self, src: &[u8], dst: &mut [f32]) {
        match self {
            Dequantize::Simd(f) => f(src, dst),
            Dequantize::Scalar(dtype) => dequantize_row(dtype, src, dst),
        }
    }
}

/// The output pointer, shared by tasks that write disjoint elements.
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements through it (see `Tile::store`) and nothing reads them
// until the parallel loop has finished.
unsafe impl Sync for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::ALL_DTYPES;
    use crate::quant::quantize_row;
    use crate::quant::tests::Rng;

    /// A random `rows x cols` matrix of `dtype` (quantised from normal floats).
    fn random_matrix(dtype: DType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
        let mut data = vec![0u8; rows * row_bytes];
        for row in data.chunks_exact_mut(row_bytes) {
            quantize_row(dtype, &rng.vec(cols), row);
        }
        data
    }

    fn cols_for(dtype: DType) -> usize {
        if dtype.block_size() == 1 {
            300
        } else {
            512
        }
    }

    fn run(w: &WeightMatrix, x: &[f32], n_tokens: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n_tokens * w.rows];
        matmul(w, x, n_tokens, &mut out);
        out
    }

    #[test]
    fn matches_naive_f64_over_dequantised_rows() {
        let mut rng = Rng::new(11);
        for dtype in ALL_DTYPES {
            let (rows, cols) = (37, cols_for(dtype));
            let data = random_matrix(dtype, rows, cols, &mut rng);
            let w = WeightMatrix {
                dtype,
                rows,
                cols,
                data: &data,
            };
            for n_tokens in [1, 3, 70] {
                let x = rng.vec(n_tokens * cols);
                let out = run(&w, &x, n_tokens);
                let mut deq = vec![0f32; cols];
                for r in 0..rows {
                    dequantize_row(dtype, w.row(r), &mut deq);
                    for t in 0..n_tokens {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let exact: f64 =
                            deq.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let scale: f64 = deq
                            .iter()
                            .zip(xt)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let got = out[t * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-4 * scale.max(1e-30),
                            "{} r={r} t={t}: {got} vs {exact}",
                            dtype.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn results_are_batch_invariant() {
        let mut rng = Rng::new(12);
        for dtype in ALL_DTYPES {
            let (rows, cols) = (45, cols_for(dtype));
            let data = random_matrix(dtype, rows, cols, &mut rng);
            let w = WeightMatrix {
                dtype,
                rows,
                cols,
                data: &data,
            };
            let n = 150;
            let x = rng.vec(n * cols);
            let full = run(&w, &x, n);
            // Every token alone, in pairs, and in batches of 5 and 33 at shifting offsets.
            for batch in [1, 2, 5, 33] {
                for start in (0..n - batch).step_by(batch + 6) {
                    let xs = &x[start * cols..(start + batch) * cols];
                    let part = run(&w, xs, batch);
                    for t in 0..batch {
                        for r in 0..rows {
                            assert_eq!(
                                part[t * rows + r].to_bits(),
                                full[(start + t) * rows + r].to_bits(),
                                "{} batch={batch} token={} row={r}",
                                dtype.name(),
                                start + t
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_shapes_are_fine() {
        let w = WeightMatrix {
            dtype: DType::Q8_0,
            rows: 0,
            cols: 64,
            data: &[],
        };
        matmul(&w, &[0.0; 64], 1, &mut []);
        let data = random_matrix(DType::Q8_0, 3, 64, &mut Rng::new(1));
        let w = WeightMatrix {
            dtype: DType::Q8_0,
            rows: 3,
            cols: 64,
            data: &data,
        };
        matmul(&w, &[], 0, &mut []);
    }

    #[test]
    #[should_panic(expected = "whole number")]
    fn partial_blocks_are_rejected() {
        let w = WeightMatrix {
            dtype: DType::Q4K,
            rows: 1,
            cols: 100,
            data: &[],
        };
        matmul(&w, &[0.0; 100], 1, &mut [0.0]);
    }
}

//! Weight-times-activations products for every weight dtype, parallel over rows, batch invariant.
//!
//! `out[t * rows + r] = dot(row r of W, x_t)`: the weights are row-major (each row
//! `dtype.row_bytes(cols)` bytes, rows consecutive, as GGUF stores them), activations and output
//! token-major. The work is split into tiles of rows (and, for long batches, chunks of tokens)
//! run on the [`crate::pool`], so a single token (decode) uses every thread.
//!
//! Batch invariance: every output element is `dot_f32(dequantize(row r), x_t)` with the fixed
//! reduction order of [`crate::simd`], whatever the batch size or the token's place in it. Two
//! strategies produce it: a fused kernel that decodes the row in registers for each token (short
//! batches), or dequantising each row of a tile once into a per-thread scratch buffer and dotting
//! it with every token (long batches). The fused kernels are bit-identical to the second
//! strategy, so switching between them with the batch size changes no bit.
//!
//! [`matmul_with`] adds llama.cpp's numerics ([`Precision::Quantized`]): each token's activations
//! are quantised once per call, on their own, to the weight type's vec_dot type (see
//! [`crate::qdot`]), then every output element is one integer-dot kernel of (weight row, quantised
//! token row), so that mode is batch invariant too. Tasks are tiles of rows times chunks of
//! tokens; within a task, groups of up to 4 tokens go through the tile's rows 8 at a time (one
//! kernel call per block of up to 8 x 4 outputs: each row decoded once per token group, each
//! token's blocks loaded once per row group), with the group's quantised rows and the tile's
//! weights kept in L1. The activation buffers are per calling thread and reused: no allocation
//! per call once warm.
//!
//! - here: [`Precision`], [`WeightMatrix`] and the exact product [`matmul`];
//! - [`quantized`](mod@quantized): [`matmul_with`] in quantised precision;
//! - [`packed`](mod@packed): products of [`crate::qdot::packed::PackedMatrix`].

mod packed;
mod quantized;
#[cfg(test)]
mod tests;

pub use packed::{
    matmul_packed, matmul_packed_gathered, matmul_packed_glu, matmul_packed_many, Product,
    TokenRows,
};
pub use quantized::matmul_with;

use std::cell::RefCell;
use std::ops::Range;

use crate::cpu::{self, Gemm};
use crate::dtype::DType;
use crate::pool;
use crate::quant::dequantize_row;
use crate::simd::order::permute_lanes;
use crate::simd::{dot_f32_grid, row_kernels, RowKernels};

/// How activations meet the weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// llama.cpp's numerics: each token's activations are quantised once per matmul to the weight
    /// type's vec_dot type (Q4_0/Q5_0/Q8_0 → Q8_0; Q4_1/Q5_1 → Q8_1; Q2_K..Q6_K → Q8_K; F16 → f16;
    /// BF16 → bf16; F32 → f32) and multiplied with integer dot products. The command line's
    /// default.
    Quantized,
    /// f32 activations against dequantised weights ([`matmul`]): agrees with a float64 forward
    /// on the same weights. The library's default (the reference the tests hold the other to).
    #[default]
    Exact,
}

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
pub(super) const TOKEN_CHUNK: usize = 64;

/// Packed products aim at this many tasks per thread (more balance the load, fewer cost less).
pub(super) const TASKS_PER_THREAD: usize = 8;

/// Tokens dotted together against each dequantised row.
const TOKEN_GROUP: usize = 4;

/// Up to this many tokens the fused kernels decode each row once per pair of tokens; beyond it,
/// rows are dequantised once per tile and token chunk. Either way the results are the same bits.
/// Four keeps the verification of up to three speculative drafts (and decoding of up to four
/// sequences) on the fused kernels: in kbench (two threads), 3 and 4 tokens took 0.5-0.92x the
/// time of the blocked path on SmolLM2's and Gemma 3's shapes (Q4_1, Q4_K, Q5_0); at 6 and 8
/// tokens neither way was faster on every shape.
const FUSED_MAX_TOKENS: usize = 4;

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
    if let (None, Some(gemm)) = (fused, cpu::kernels().gemm) {
        return matmul_blocked(w, x, n_tokens, out, gemm, dequantize);
    }
    let out = SharedOut(out.as_mut_ptr());
    let run = |rows, tokens| {
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
    };
    match fused {
        // A few tokens: each task a run of whole rows long enough for the hardware prefetcher
        // to stream (16-row tiles handed out in turn left each thread a read stream broken
        // every few kilobytes).
        Some(_) => {
            let per_task = w
                .rows
                .div_ceil(TASKS_PER_THREAD * pool::threads())
                .max(TILE_ROWS);
            pool::for_each(w.rows.div_ceil(per_task), |i| {
                run(i * per_task..((i + 1) * per_task).min(w.rows), 0..n_tokens)
            });
        }
        None => for_each_tile(w.rows, n_tokens, run),
    }
}

thread_local! {
    /// The calling thread's lane-permuted activations of [`matmul_blocked`], reused.
    static PERMUTED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`matmul`] for long batches through the level's blocked kernel: the activations are
/// lane-permuted once per call, each tile's rows are dequantised and permuted once per task,
/// and the kernel gives every dot exactly as `dot_f32` would (the same bits as the other
/// strategies).
fn matmul_blocked(
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
    gemm: Gemm,
    dequantize: Dequantize,
) {
    let cols = w.cols;
    PERMUTED.with(|permuted| {
        let mut permuted = permuted.borrow_mut();
        permuted.resize(n_tokens * cols, 0.0);
        pool::for_each_chunk_mut(&mut permuted, cols * TOKEN_GROUP, |i, dst| {
            let src = &x[i * TOKEN_GROUP * cols..][..dst.len()];
            for (s, d) in src.chunks_exact(cols).zip(dst.chunks_exact_mut(cols)) {
                permute_lanes(s, gemm.seg, d);
            }
        });
        let xs = &permuted[..];
        let out = SharedOut(out.as_mut_ptr());
        // Each task dequantises its rows once for as many tokens as the balance allows: all of
        // them where the row tiles alone give every thread enough tasks.
        let row_tiles = w.rows.div_ceil(TILE_ROWS);
        let span = match row_tiles >= TASKS_PER_THREAD * pool::threads() {
            true => n_tokens.div_ceil(TOKEN_CHUNK) * TOKEN_CHUNK,
            false => TOKEN_CHUNK,
        };
        let spans = n_tokens.div_ceil(span);
        pool::for_each(row_tiles * spans, |task| {
            let (tile, span_i) = (task % row_tiles, task / row_tiles);
            let rows = tile * TILE_ROWS..((tile + 1) * TILE_ROWS).min(w.rows);
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(TILE_ROWS * cols + cols + TILE_ROWS * TOKEN_CHUNK, 0.0);
                let (a, rest) = scratch.split_at_mut(TILE_ROWS * cols);
                let (row, dots) = rest.split_at_mut(cols);
                for (r, dst) in rows.clone().zip(a.chunks_exact_mut(cols)) {
                    dequantize.row(w.row(r), row);
                    permute_lanes(row, gemm.seg, dst);
                }
                let a = &a[..rows.len() * cols];
                let first = span_i * span;
                for t0 in (first..(first + span).min(n_tokens)).step_by(TOKEN_CHUNK) {
                    let tokens = t0..(t0 + TOKEN_CHUNK).min(n_tokens);
                    let m = tokens.len();
                    let dots = &mut dots[..rows.len() * m];
                    let b = &xs[tokens.start * cols..tokens.end * cols];
                    // SAFETY: the table is this machine's; `a` holds the tile's rows and `b`
                    // its tokens, `cols` floats each, and `dots` one value per pair.
                    unsafe { (gemm.tile)(a, b, cols, dots) };
                    for (r, row_dots) in rows.clone().zip(dots.chunks_exact(m)) {
                        for (t, v) in tokens.clone().zip(row_dots) {
                            // SAFETY: this task's (row, token) pairs, in bounds (see
                            // `Tile::store`).
                            unsafe { out.write(t * w.rows + r, *v) };
                        }
                    }
                }
            })
        });
    })
}

/// `f(rows, tokens)` in parallel for every tile of [`TILE_ROWS`] rows times [`TOKEN_CHUNK`]
/// tokens (the last of each shorter): the tasks of the row-kernel products.
pub(super) fn for_each_tile(
    rows: usize,
    n_tokens: usize,
    f: impl Fn(Range<usize>, Range<usize>) + Sync,
) {
    let row_tiles = rows.div_ceil(TILE_ROWS);
    let token_chunks = n_tokens.div_ceil(TOKEN_CHUNK);
    pool::for_each(row_tiles * token_chunks, |task| {
        let (tile, chunk) = (task % row_tiles, task / row_tiles);
        f(
            tile * TILE_ROWS..((tile + 1) * TILE_ROWS).min(rows),
            chunk * TOKEN_CHUNK..((chunk + 1) * TOKEN_CHUNK).min(n_tokens),
        )
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
        let mut rows = self.rows.clone();
        if let (Some(dot4), 1) = (kernels.dot4, self.tokens.len()) {
            let t = self.tokens.start;
            while rows.len() >= 4 {
                let r = rows.start;
                let dots = dot4(std::array::from_fn(|i| self.w.row(r + i)), self.token(t));
                for (i, v) in dots.into_iter().enumerate() {
                    self.store(t, r + i, v);
                }
                rows.start += 4;
            }
        }
        for r in rows {
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
            let rows = self.rows.len();
            let mut dots = [0f32; TILE_ROWS * TOKEN_GROUP];
            for t0 in self.tokens.clone().step_by(TOKEN_GROUP) {
                let t1 = (t0 + TOKEN_GROUP).min(self.tokens.end);
                let (xs, m) = (&self.x[t0 * cols..t1 * cols], t1 - t0);
                let dots = &mut dots[..rows * m];
                dot_f32_grid(&scratch[..rows * cols], xs, cols, dots);
                for (r, row_dots) in self.rows.clone().zip(dots.chunks_exact(m)) {
                    for (t, v) in (t0..t1).zip(row_dots) {
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
pub(super) struct SharedOut(pub(super) *mut f32);

impl SharedOut {
    /// Write element `i`.
    ///
    /// # Safety
    /// `i` is in bounds of the output and no other task writes or reads it meanwhile.
    pub(super) unsafe fn write(&self, i: usize, v: f32) {
        self.0.add(i).write(v)
    }

    /// The `len` outputs from `start`, to write.
    ///
    /// # Safety
    /// As for [`SharedOut::write`], for every index of the range.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

// SAFETY: tasks write disjoint elements through it (see `Tile::store`) and nothing reads them
// until the parallel loop has finished.
unsafe impl Sync for SharedOut {}

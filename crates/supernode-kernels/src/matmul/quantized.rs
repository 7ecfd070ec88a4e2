//! [`matmul_with`]: the product in either precision; in [`Precision::Quantized`], each token's
//! activations quantised once per call (or rounded to f16 / bf16) and every output one integer
//! tile kernel of (weight row, quantised token row).
//!
//! Invariant: a token's quantised activations are the same bytes whatever the batch, and each
//! output the same kernel's bits whatever the tile shape, so the products are batch invariant.

use std::cell::Cell;

use super::{for_each_tile, matmul, Precision, SharedOut, WeightMatrix};
use crate::dtype::DType;
use crate::pool;
use crate::qdot::{
    quant_kernel, round_row_bf16, round_row_f16, ActBlock, BlockQ8K, BlockQ8_0, BlockQ8_1,
    QuantKernel, TileDot, DOT_ROWS, DOT_TOKENS,
};

/// As [`matmul`], with the activations meeting the weights as `precision` says. Bit-identical per
/// element whatever `n_tokens` is and wherever a token sits, in both modes.
///
/// F16 and BF16 weights in `Quantized` mode: activations are rounded to f16 / bf16 and go through
/// the exact kernels. A product of two such values is exact in f32, so a fused multiply-add and a
/// multiply then add give the same bits there: the SIMD and portable paths agree exactly.
pub fn matmul_with(
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
    precision: Precision,
) {
    if precision == Precision::Exact {
        return matmul(w, x, n_tokens, out);
    }
    match w.dtype {
        DType::F32 => matmul(w, x, n_tokens, out),
        DType::F16 => matmul_rounded(w, x, n_tokens, out, round_row_f16),
        DType::BF16 => matmul_rounded(w, x, n_tokens, out, round_row_bf16),
        _ => match quant_kernel(w.dtype) {
            Some(QuantKernel::Q8_0(dot)) => {
                matmul_quantized(w, x, n_tokens, out, dot, |s| &mut s.q8_0)
            }
            Some(QuantKernel::Q8_1(dot)) => {
                matmul_quantized(w, x, n_tokens, out, dot, |s| &mut s.q8_1)
            }
            Some(QuantKernel::Q8K(dot)) => {
                matmul_quantized(w, x, n_tokens, out, dot, |s| &mut s.q8_k)
            }
            None => unreachable!("{} has a quantised kernel", w.dtype.name()),
        },
    }
}

/// Per-thread buffers for the quantised activations of one call, reused across calls.
pub(super) struct ActScratch {
    pub(super) q8_0: Vec<BlockQ8_0>,
    pub(super) q8_1: Vec<BlockQ8_1>,
    pub(super) q8_k: Vec<BlockQ8K>,
    /// `Σ qs` of each Q8_0 block (packed kernels).
    pub(super) sums: Vec<i32>,
    /// Sums of each 32-element sub-block of the Q8_K blocks (packed kernels).
    pub(super) k_sums: Vec<i16>,
    pub(super) rounded: Vec<f32>,
}

impl ActScratch {
    const fn new() -> ActScratch {
        ActScratch {
            q8_0: Vec::new(),
            q8_1: Vec::new(),
            q8_k: Vec::new(),
            sums: Vec::new(),
            k_sums: Vec::new(),
            rounded: Vec::new(),
        }
    }
}

impl Default for ActScratch {
    fn default() -> ActScratch {
        ActScratch::new()
    }
}

thread_local! {
    /// The calling thread's activation buffers. Taken out for the length of a call (a nested
    /// call on the same thread finds an empty one)
    /// and put back after.
    pub(super) static ACTS: Cell<ActScratch> = const { Cell::new(ActScratch::new()) };
}

/// From this many tokens on, the activations are quantised in parallel.
const PAR_QUANTIZE_TOKENS: usize = 8;

/// Round every activation with `round` (to f16 or bf16), then the exact product.
fn matmul_rounded(
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
    round: fn(&[f32], &mut [f32]),
) {
    let mut scratch = ACTS.take();
    scratch.rounded.resize(x.len(), 0.0);
    round(x, &mut scratch.rounded);
    matmul(w, &scratch.rounded, n_tokens, out);
    ACTS.set(scratch);
}

/// Quantise each token's activations into `A` blocks once, then every (row, token) through `dot`.
fn matmul_quantized<A: ActBlock>(
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
    dot: TileDot<A>,
    buffer: fn(&mut ActScratch) -> &mut Vec<A>,
) {
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
    let blocks = w.cols / A::ELEMS;
    let mut scratch = ACTS.take();
    let buf = buffer(&mut scratch);
    quantize_tokens(x, w.cols, n_tokens, buf);
    let acts = &buf[..n_tokens * blocks];
    let out = SharedOut(out.as_mut_ptr());
    for_each_tile(w.rows, n_tokens, |rows, tokens| {
        let mut ys: [&[A]; DOT_TOKENS] = [&[]; DOT_TOKENS];
        let mut ws: [&[u8]; DOT_ROWS] = [&[]; DOT_ROWS];
        let mut dots = [0f32; DOT_ROWS * DOT_TOKENS];
        for t0 in tokens.clone().step_by(DOT_TOKENS) {
            let group = (t0 + DOT_TOKENS).min(tokens.end) - t0;
            for (j, y) in ys[..group].iter_mut().enumerate() {
                *y = &acts[(t0 + j) * blocks..(t0 + j + 1) * blocks];
            }
            for r0 in rows.clone().step_by(DOT_ROWS) {
                let n_rows = (r0 + DOT_ROWS).min(rows.end) - r0;
                let group_bytes = &w.data[r0 * row_bytes..(r0 + n_rows) * row_bytes];
                for (row, bytes) in ws.iter_mut().zip(group_bytes.chunks_exact(row_bytes)) {
                    *row = bytes;
                }
                let dots = &mut dots[..n_rows * group];
                dot(&ws[..n_rows], &ys[..group], dots);
                for (i, row_dots) in dots.chunks_exact(group).enumerate() {
                    for (j, v) in row_dots.iter().enumerate() {
                        // SAFETY: as in `Tile::store`: this task's (row, token) range is its
                        // own.
                        unsafe { out.write((t0 + j) * w.rows + r0 + i, *v) }
                    }
                }
            }
        }
    });
    ACTS.set(scratch);
}

/// Each token's `cols` activations quantised on their own into `buf` (resized as needed),
/// in parallel for long batches.
pub(super) fn quantize_tokens<A: ActBlock>(
    x: &[f32],
    cols: usize,
    n_tokens: usize,
    buf: &mut Vec<A>,
) {
    let blocks = cols / A::ELEMS;
    if buf.len() < n_tokens * blocks {
        buf.resize(n_tokens * blocks, A::ZERO);
    }
    let acts = &mut buf[..n_tokens * blocks];
    if n_tokens >= PAR_QUANTIZE_TOKENS {
        pool::for_each_chunk_mut(acts, blocks, |t, y| {
            A::quantize(&x[t * cols..(t + 1) * cols], y)
        });
    } else {
        for (y, x) in acts.chunks_mut(blocks).zip(x.chunks(cols)) {
            A::quantize(x, y);
        }
    }
}

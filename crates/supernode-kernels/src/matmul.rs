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

use std::cell::{Cell, RefCell};
use std::ops::Range;

use crate::dtype::DType;
use crate::ops::Activation;
use crate::pool;
use crate::qdot::packed::{
    block_sums, panel_dot, sub_block_sums, Act, ActKind, PackedMatrix, PANEL,
};
use crate::qdot::{
    quant_kernel, round_row_bf16, round_row_f16, ActBlock, BlockQ8K, BlockQ8_0, BlockQ8_1,
    QuantKernel, TileDot, DOT_ROWS, DOT_TOKENS,
};
use crate::quant::dequantize_row;
use crate::simd::{dot_f32_grid, row_kernels, RowKernels};

/// How activations meet the weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// llama.cpp's numerics: each token's activations are quantised once per matmul to the weight
    /// type's vec_dot type (Q4_0/Q5_0/Q8_0 → Q8_0; Q4_1/Q5_1 → Q8_1; Q2_K..Q6_K → Q8_K; F16 → f16;
    /// BF16 → bf16; F32 → f32) and multiplied with integer dot products.
    Quantized,
    /// f32 activations against dequantised weights ([`matmul`]): agrees with a float64 forward
    /// on the same weights. The default.
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
const TOKEN_CHUNK: usize = 64;

/// Packed products aim at this many tasks per thread (more balance the load, fewer cost less).
const TASKS_PER_THREAD: usize = 8;

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

/// `f(rows, tokens)` in parallel for every tile of [`TILE_ROWS`] rows times [`TOKEN_CHUNK`]
/// tokens (the last of each shorter): the tasks of the row-kernel products.
fn for_each_tile(rows: usize, n_tokens: usize, f: impl Fn(Range<usize>, Range<usize>) + Sync) {
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
struct ActScratch {
    q8_0: Vec<BlockQ8_0>,
    q8_1: Vec<BlockQ8_1>,
    q8_k: Vec<BlockQ8K>,
    /// `Σ qs` of each Q8_0 block (packed kernels).
    sums: Vec<i32>,
    /// Sums of each 32-element sub-block of the Q8_K blocks (packed kernels).
    k_sums: Vec<i16>,
    rounded: Vec<f32>,
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
    static ACTS: Cell<ActScratch> = const { Cell::new(ActScratch::new()) };
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
                for (i, row) in ws[..n_rows].iter_mut().enumerate() {
                    *row = w.row(r0 + i);
                }
                let dots = &mut dots[..n_rows * group];
                dot(&ws[..n_rows], &ys[..group], dots);
                for (k, v) in dots.iter().enumerate() {
                    let (r, t) = (r0 + k / group, t0 + k % group);
                    // SAFETY: as in `Tile::store`: this task's (row, token) range is its own.
                    unsafe { out.write(t * w.rows + r, *v) }
                }
            }
        }
    });
    ACTS.set(scratch);
}

/// `out[t * rows + r] = dot(row r of m, x_t)` for a [`PackedMatrix`], in its reference order
/// (see [`crate::qdot::packed`]): each token's activations are quantised once, on their own, so
/// every output is the same bits whatever the batch.
pub fn matmul_packed(m: &PackedMatrix, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    matmul_packed_many(&[m], x, n_tokens, &mut [out]);
}

/// [`matmul_packed`] of several matrices with the same columns on the same activations (a
/// layer's Q, K and V, or its gate and up projections), `outs[i]` receiving matrix `i`'s
/// products: the activations are quantised once and all the panels run in one parallel loop.
/// Tasks are panels times chunks of tokens; within a task, groups of up to 4 tokens go through
/// the panel, each panel-block decoded once per group.
pub fn matmul_packed_many(
    ms: &[&PackedMatrix],
    x: &[f32],
    n_tokens: usize,
    outs: &mut [&mut [f32]],
) {
    assert_eq!(ms.len(), outs.len(), "matmul: one output per matrix");
    for (m, out) in ms.iter().zip(outs.iter()) {
        assert_eq!(out.len(), n_tokens * m.rows, "matmul: output length");
    }
    let shared: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
    packed_products(ms, x, n_tokens, Sink::Each(&shared));
}

/// The gated linear unit of a feed-forward, fused: `out[t * rows + r] = act(g) * u` with `g`
/// and `u` row `r` of `gate` and `up` against token `t` ([`matmul_packed`] of each). The same
/// bits as the two products followed by [`crate::ops::glu_inplace`], in one parallel loop whose
/// tasks each take a panel of both matrices, so the activation runs on every thread and no
/// separate pass reads the products again.
pub fn matmul_packed_glu(
    gate: &PackedMatrix,
    up: &PackedMatrix,
    x: &[f32],
    n_tokens: usize,
    act: Activation,
    out: &mut [f32],
) {
    assert_eq!(
        gate.rows, up.rows,
        "matmul_packed_glu: gate and up differ in rows"
    );
    assert_eq!(out.len(), n_tokens * gate.rows, "matmul: output length");
    let out = SharedOut(out.as_mut_ptr());
    packed_products(&[gate, up], x, n_tokens, Sink::Glu(act, &out));
}

/// Where packed products go.
#[derive(Clone, Copy)]
enum Sink<'a> {
    /// Matrix `i`'s products to output `i`.
    Each(&'a [SharedOut]),
    /// Two matrices (gate, up) of the same rows: `act(gate) * up` to one output.
    Glu(Activation, &'a SharedOut),
}

/// The products of the packed matrices `ms` (all of the same columns) on `x`, into `sink`
/// (whose outputs the callers checked for length): each token's activations quantised once per
/// kind the matrices meet, then one parallel loop over panels times chunks of tokens.
fn packed_products(ms: &[&PackedMatrix], x: &[f32], n_tokens: usize, sink: Sink) {
    let Some(first) = ms.first() else { return };
    let cols = first.cols;
    assert!(
        ms.iter().all(|m| m.cols == cols),
        "matmul: matrices differ in columns"
    );
    assert_eq!(x.len(), n_tokens * cols, "matmul: activations length");
    if n_tokens == 0 {
        return;
    }
    let kinds = |kind: ActKind| ms.iter().any(|m| m.format.act_kind() == kind);
    let blocks = cols / BlockQ8_0::ELEMS;
    let k_blocks = cols / BlockQ8K::ELEMS;
    let mut scratch = ACTS.take();
    if kinds(ActKind::Q8_1) {
        quantize_tokens(x, cols, n_tokens, &mut scratch.q8_1);
    }
    if kinds(ActKind::Q8_0) {
        quantize_tokens(x, cols, n_tokens, &mut scratch.q8_0);
        scratch.sums.resize(n_tokens * blocks, 0);
        for (s, y) in scratch
            .sums
            .chunks_mut(blocks)
            .zip(scratch.q8_0.chunks(blocks))
        {
            block_sums(y, s);
        }
    }
    if kinds(ActKind::Q8K) {
        quantize_tokens(x, cols, n_tokens, &mut scratch.q8_k);
        scratch.k_sums.resize(n_tokens * k_blocks * 8, 0);
        sub_block_sums(&scratch.q8_k[..n_tokens * k_blocks], &mut scratch.k_sums);
    }
    // Each token's activations, per kind the matrices meet, looked up by the tasks.
    let act = |kind: ActKind, t: usize| {
        let r = t * blocks..(t + 1) * blocks;
        match kind {
            ActKind::Q8_1 => Act::Q8_1(&scratch.q8_1[r]),
            ActKind::Q8_0 => Act::Q8_0(&scratch.q8_0[r.clone()], &scratch.sums[r]),
            ActKind::Q8K => Act::Q8K(
                &scratch.q8_k[t * k_blocks..(t + 1) * k_blocks],
                &scratch.k_sums[t * k_blocks * 8..(t + 1) * k_blocks * 8],
            ),
        }
    };
    let table = |kind: ActKind| -> Vec<Act> {
        if kinds(kind) {
            (0..n_tokens).map(|t| act(kind, t)).collect()
        } else {
            Vec::new()
        }
    };
    let acts = [
        table(ActKind::Q8_0),
        table(ActKind::Q8_1),
        table(ActKind::Q8K),
    ];
    let acts_of = |m: &PackedMatrix| &acts[m.format.act_kind() as usize];
    // The units of work: every panel of every matrix, or (GLU) every panel of the gate with the
    // same panel of the up projection.
    let panels: usize = match sink {
        Sink::Each(_) => ms.iter().map(|m| m.panels()).sum(),
        Sink::Glu(..) => first.panels(),
    };
    let token_chunks = n_tokens.div_ceil(TOKEN_CHUNK);
    // Several panels per task when there are few tokens, so that a decode step's thousands of
    // panels make a few dozen tasks (each task is an atomic increment shared by the threads).
    let per_task = (panels * token_chunks / (TASKS_PER_THREAD * pool::threads())).max(1);
    let groups = panels.div_ceil(per_task);
    pool::for_each(groups * token_chunks, |task| {
        let (group, chunk) = (task % groups, task / groups);
        let tokens = chunk * TOKEN_CHUNK..((chunk + 1) * TOKEN_CHUNK).min(n_tokens);
        let mut res = [[0f32; PANEL]; DOT_TOKENS];
        let mut res_up = [[0f32; PANEL]; DOT_TOKENS];
        for global in group * per_task..((group + 1) * per_task).min(panels) {
            let (mut panel, mut i) = (global, 0);
            while panel >= ms[i].panels() {
                panel -= ms[i].panels();
                i += 1;
            }
            let m = ms[i];
            let r0 = panel * PANEL;
            let valid = PANEL.min(m.rows - r0);
            for t0 in tokens.clone().step_by(DOT_TOKENS) {
                let size = (t0 + DOT_TOKENS).min(tokens.end) - t0;
                panel_dot(m, panel, &acts_of(m)[t0..t0 + size], &mut res[..size]);
                match sink {
                    Sink::Each(outs) => {
                        for (j, r) in res[..size].iter().enumerate() {
                            // SAFETY: this task's (panel rows, token range) of matrix `i` is
                            // its own; the range is in bounds by the callers' length checks.
                            let dst = unsafe { outs[i].slice((t0 + j) * m.rows + r0, valid) };
                            dst.copy_from_slice(&r[..valid]);
                        }
                    }
                    Sink::Glu(f, out) => {
                        let up = ms[1];
                        panel_dot(up, panel, &acts_of(up)[t0..t0 + size], &mut res_up[..size]);
                        for (j, (g, u)) in res[..size].iter_mut().zip(&res_up[..size]).enumerate() {
                            f.glu(g, u);
                            // SAFETY: as above, for the gate's (panel rows, token range).
                            let dst = unsafe { out.slice((t0 + j) * m.rows + r0, valid) };
                            dst.copy_from_slice(&g[..valid]);
                        }
                    }
                }
            }
        }
    });
    ACTS.set(scratch);
}

/// Each token's `cols` activations quantised on their own into `buf` (resized as needed),
/// in parallel for long batches.
fn quantize_tokens<A: ActBlock>(x: &[f32], cols: usize, n_tokens: usize, buf: &mut Vec<A>) {
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
struct SharedOut(*mut f32);

impl SharedOut {
    /// Write element `i`.
    ///
    /// # Safety
    /// `i` is in bounds of the output and no other task writes or reads it meanwhile.
    unsafe fn write(&self, i: usize, v: f32) {
        self.0.add(i).write(v)
    }

    /// The `len` outputs from `start`, to write.
    ///
    /// # Safety
    /// As for [`SharedOut::write`], for every index of the range.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

// SAFETY: tasks write disjoint elements through it (see `Tile::store`) and nothing reads them
// until the parallel loop has finished.
unsafe impl Sync for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::ALL_DTYPES;
    use crate::qdot::ActBlock;
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

    fn run_with(w: &WeightMatrix, x: &[f32], n_tokens: usize, precision: Precision) -> Vec<f32> {
        let mut out = vec![f32::NAN; n_tokens * w.rows];
        matmul_with(w, x, n_tokens, &mut out, precision);
        out
    }

    #[test]
    fn quantized_results_are_batch_invariant() {
        let mut rng = Rng::new(13);
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
            let full = run_with(&w, &x, n, Precision::Quantized);
            for batch in [1, 2, 3, 5, 33] {
                for start in (0..n - batch).step_by(batch + 6) {
                    let xs = &x[start * cols..(start + batch) * cols];
                    let part = run_with(&w, xs, batch, Precision::Quantized);
                    for (i, v) in part.iter().enumerate() {
                        let want = full[start * rows + i];
                        assert_eq!(
                            v.to_bits(),
                            want.to_bits(),
                            "{} batch={batch} token={} row={}",
                            dtype.name(),
                            start + i / rows,
                            i % rows
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_elements_are_the_scalar_reference_dots() {
        let mut rng = Rng::new(14);
        for dtype in ALL_DTYPES.into_iter().filter(|d| d.block_size() > 1) {
            let (rows, cols) = (21, 512);
            let data = random_matrix(dtype, rows, cols, &mut rng);
            let w = WeightMatrix {
                dtype,
                rows,
                cols,
                data: &data,
            };
            let n = 6;
            let x = rng.vec(n * cols);
            let out = run_with(&w, &x, n, Precision::Quantized);
            let mut want = vec![0f32; n * rows];
            macro_rules! reference {
                ($dot:expr, $block:ty) => {{
                    let mut y = vec![<$block as ActBlock>::ZERO; cols / <$block>::ELEMS];
                    for t in 0..n {
                        <$block>::quantize(&x[t * cols..(t + 1) * cols], &mut y);
                        for r in 0..rows {
                            $dot(&[w.row(r)], &[&y[..]], &mut want[t * rows + r..][..1]);
                        }
                    }
                }};
            }
            match crate::qdot::scalar_kernel(dtype) {
                Some(QuantKernel::Q8_0(dot)) => reference!(dot, BlockQ8_0),
                Some(QuantKernel::Q8_1(dot)) => reference!(dot, BlockQ8_1),
                Some(QuantKernel::Q8K(dot)) => reference!(dot, BlockQ8K),
                None => unreachable!("block types have kernels"),
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want), "{}", dtype.name());
        }
    }

    #[test]
    fn quantized_float_weights_meet_rounded_activations() {
        let mut rng = Rng::new(15);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let round = |v: f32| match dtype {
                DType::F16 => half::f16::from_f32(v).to_f32(),
                DType::BF16 => half::bf16::from_f32(v).to_f32(),
                _ => v,
            };
            let (rows, cols) = (19, 300);
            let data = random_matrix(dtype, rows, cols, &mut rng);
            let w = WeightMatrix {
                dtype,
                rows,
                cols,
                data: &data,
            };
            let x = rng.vec(3 * cols);
            let rounded: Vec<f32> = x.iter().map(|&v| round(v)).collect();
            let got = run_with(&w, &x, 3, Precision::Quantized);
            let want = run(&w, &rounded, 3);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}",
                dtype.name()
            );
        }
    }

    #[test]
    fn exact_precision_is_matmul() {
        let mut rng = Rng::new(16);
        let data = random_matrix(DType::Q4K, 17, 512, &mut rng);
        let w = WeightMatrix {
            dtype: DType::Q4K,
            rows: 17,
            cols: 512,
            data: &data,
        };
        let x = rng.vec(5 * 512);
        let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(run_with(&w, &x, 5, Precision::Exact)),
            bits(run(&w, &x, 5))
        );
    }

    #[test]
    fn quantized_stays_close_to_exact() {
        // Only the activations' rounding separates the modes: 8-bit blocks (relative step
        // 1/127 of the block's largest value) or f16/bf16. Bounds are relative to
        // sum |w_i x_i|, about 3x what this data reaches.
        let bound = |d: DType| match d {
            DType::F32 => 0.0,
            DType::F16 => 1e-4,
            DType::BF16 => 1e-3,
            _ => 4e-3,
        };
        let mut rng = Rng::new(17);
        for dtype in ALL_DTYPES {
            let (rows, cols) = (33, cols_for(dtype) * 2);
            let data = random_matrix(dtype, rows, cols, &mut rng);
            let w = WeightMatrix {
                dtype,
                rows,
                cols,
                data: &data,
            };
            let n = 4;
            let x = rng.vec(n * cols);
            let q = run_with(&w, &x, n, Precision::Quantized);
            let e = run_with(&w, &x, n, Precision::Exact);
            let mut deq = vec![0f32; cols];
            let mut worst = 0f64;
            for r in 0..rows {
                dequantize_row(dtype, w.row(r), &mut deq);
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let scale: f64 = deq.iter().zip(xt).map(|(a, b)| (a * b).abs() as f64).sum();
                    let diff = (q[t * rows + r] - e[t * rows + r]).abs() as f64;
                    worst = worst.max(diff / scale);
                }
            }
            assert!(worst <= bound(dtype), "{}: {worst}", dtype.name());
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
        matmul_with(&w, &[], 0, &mut [], Precision::Quantized);
        let w = WeightMatrix {
            rows: 0,
            data: &[],
            ..w
        };
        matmul_with(&w, &[0.0; 64], 1, &mut [], Precision::Quantized);
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

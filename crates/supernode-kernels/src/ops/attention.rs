//! Causal attention of query tokens over a paged KV cache: one head, one group of heads sharing a
//! KV head, or many groups spread over the thread pool.
//!
//! Invariant: every score is the same `dot_f32` of its query head and K row, each head's softmax
//! the same [`softmax`] of its scores in position order, and each output adds `w * v` in position
//! order: the results are bit-identical whichever entry point, grouping or chunking computed them,
//! and whatever else is in the batch.

use std::cell::RefCell;
use std::ops::Range;

use half::f16;

use super::softcap;
use crate::pool;
use crate::simd::{
    dot_f16_rows, dot_f32_rows, exp_sum, scale_max, scale_round, weighted_rows_f16,
    weighted_rows_f32,
};

/// One layer's KV cache, paged: slot `s` (= block * block_size + offset) holds the keys of
/// all KV heads at `k[s * n_kv_heads * k_dim ..]` and the values at `v[s * n_kv_heads * v_dim ..]`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
}

/// The cached keys or values of one layer, in the cache's element type.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    /// Values that are exactly f16 (llama.cpp's f16 cache, which `Precision::Quantized` follows):
    /// half the bytes of f32 for decode to read. Every kernel widens them exactly as it loads
    /// them, so the results equal those of the same values as `F32` rows bit for bit.
    F16(&'a [f16]),
}

impl<'a> KvRows<'a> {
    /// The same rows seen from element `offset` on (for a range of columns).
    fn from(&self, offset: usize) -> KvRows<'a> {
        match *self {
            KvRows::F32(x) => KvRows::F32(&x[offset..]),
            KvRows::F16(x) => KvRows::F16(&x[offset..]),
        }
    }

    /// [`dot_f32_rows`] over these rows.
    fn dot_rows(&self, q: &[f32], n: usize, bases: &[usize], out: &mut [f32]) {
        match *self {
            KvRows::F32(k) => dot_f32_rows(q, n, k, bases, out),
            KvRows::F16(k) => dot_f16_rows(q, n, k, bases, out),
        }
    }

    /// [`weighted_rows_f32`] over these rows.
    fn weighted_rows(&self, ws: &[f32], bases: &[usize], n: usize, out: &mut [f32]) {
        match *self {
            KvRows::F32(v) => weighted_rows_f32(ws, v, bases, n, out),
            KvRows::F16(v) => weighted_rows_f16(ws, v, bases, n, out),
        }
    }
}

/// Scratch space of the attention kernels.
#[derive(Default)]
struct Scratch {
    /// Raw scores in chunks of positions (the parallel path's).
    scores: Vec<f32>,
    /// Scores, then softmax weights, head-major.
    weights: Vec<f32>,
    /// Offsets of each position's K row and V row.
    k_bases: Vec<usize>,
    v_bases: Vec<usize>,
    /// Weighted sums in chunks of columns (the parallel path's).
    values: Vec<f32>,
    /// Where each group's positions start in the bases (the parallel path's).
    starts: Vec<usize>,
}

thread_local! {
    /// One [`Scratch`] per thread, grown to the longest context it has seen and kept: the
    /// attention of a decode step allocates nothing.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Shape and scaling of an attention computation.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    /// Multiplies `q·k` (usually `1/sqrt(k_dim)`).
    pub scale: f32,
    /// Gemma 2 style soft-capping of attention scores: `cap * tanh(s / cap)`.
    pub softcap: Option<f32>,
    /// Round the softmax weights to f16, as llama.cpp's non-flash attention does (the caller
    /// rounds queries, keys and values, as llama.cpp's f16 KV cache does).
    pub f16_rounding: bool,
}

/// Causal attention of one query head `q` (`k_dim` values), which reads KV head `kv_head`,
/// over the cached positions `ctx` of its sequence, whose blocks are `block_table`. Writes
/// `v_dim` values to `out`.
///
/// Softmax in two passes over an exact score buffer ([`softmax`]): deterministic and
/// independent of the batch and of how heads are spread over threads. This is
/// [`attention_group`] for a group of one head: the same kernels, whose results per head do not
/// depend on the group.
pub fn attention_head(
    q: &[f32],
    kv: &KvView,
    kv_head: usize,
    block_table: &[u32],
    ctx: Range<usize>,
    shape: &AttnShape,
    out: &mut [f32],
) {
    assert_eq!(q.len(), shape.k_dim, "attention_head: q is not one head");
    attention_group(q, kv, kv_head, block_table, ctx, shape, out)
}

/// [`attention_head`] for every query head of one KV head at once: `q` holds `g` heads of
/// `k_dim` values (all reading `kv_head`), `out` receives `g` heads of `v_dim` values. Each K
/// and V row is read once for the whole group.
///
/// Bit-identical to calling [`attention_head`] for each head: every score is the same
/// `dot_f32` (of the K row with the query, the same products in the same lanes), scaled and
/// capped alike; each head's softmax is the same [`softmax`] of its scores in position order;
/// each head's output adds `w * v` (multiply, then add) in position order.
///
/// On the calling thread: the scores of all positions in one `dot_*_rows` call, the softmax of
/// each head, the weighted sums of all columns in one `weighted_rows_*` call. Every score and
/// every output value is computed alone, in an order that depends on nothing but its own
/// position or column, which is what lets [`attention_groups_parallel`] chunk the same work and
/// give the same bits.
pub fn attention_group(
    q: &[f32],
    kv: &KvView,
    kv_head: usize,
    block_table: &[u32],
    ctx: Range<usize>,
    shape: &AttnShape,
    out: &mut [f32],
) {
    attend(q, kv, shape, out, |k_bases, v_bases| {
        group_bases(kv, kv_head, block_table, ctx, k_bases, v_bases)
    });
}

/// [`attention_group`] over the listed `positions` of the sequence (ascending, each cached)
/// instead of a causal range: the top-k of DeepSeek Sparse Attention. Only those rows are read,
/// so the work is proportional to `positions.len()`, not to the context. The same kernels as
/// [`attention_group`]: bit-identical to it when `positions` is a whole range.
pub fn attention_group_at(
    q: &[f32],
    kv: &KvView,
    kv_head: usize,
    block_table: &[u32],
    positions: &[usize],
    shape: &AttnShape,
    out: &mut [f32],
) {
    attend(q, kv, shape, out, |k_bases, v_bases| {
        let bs = kv.block_size;
        let rows = positions
            .iter()
            .map(|&p| (block_table[p / bs] as usize * bs + p % bs) * kv.n_kv_heads + kv_head);
        k_bases.extend(rows.clone().map(|row| row * kv.k_dim));
        v_bases.extend(rows.map(|row| row * kv.v_dim));
    });
}

/// Positions one task of [`index_scores`] scores: a long context is split over the threads
/// (a decode step's one query would otherwise score all of it on one).
const INDEX_CHUNK: usize = 512;

/// DeepSeek Sparse Attention's lightning indexer for one query token: the score of each cached
/// position `p` of `ctx`, `Σ_h w[h] · relu(scale · q_h · k_p)`, into `out` (`ctx.len()`
/// values). `q` holds `w.len()` heads of `keys.k_dim` values; `keys` has one key row per token
/// (one KV head). Each score is computed alone, its heads summed in order: the results do not
/// depend on the batch, on how the context was chunked, or on how it is split over threads
/// ([`INDEX_CHUNK`] positions per task).
pub fn index_scores(
    q: &[f32],
    w: &[f32],
    keys: &KvView,
    block_table: &[u32],
    ctx: Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    let (d, g, m) = (keys.k_dim, w.len(), ctx.len());
    assert_eq!(q.len(), g * d, "index_scores: q is not one row per weight");
    assert_eq!(
        out.len(),
        m,
        "index_scores: out is not one score per position"
    );
    if m <= INDEX_CHUNK {
        return index_scores_range(q, w, keys, block_table, ctx, scale, out);
    }
    pool::for_each_chunk_mut(out, INDEX_CHUNK, |task, out| {
        let start = ctx.start + task * INDEX_CHUNK;
        index_scores_range(
            q,
            w,
            keys,
            block_table,
            start..start + out.len(),
            scale,
            out,
        );
    });
}

/// [`index_scores`] on the calling thread (sizes checked by it).
fn index_scores_range(
    q: &[f32],
    w: &[f32],
    keys: &KvView,
    block_table: &[u32],
    ctx: Range<usize>,
    scale: f32,
    out: &mut [f32],
) {
    let (d, g, m) = (keys.k_dim, w.len(), ctx.len());
    SCRATCH.with_borrow_mut(|scratch| {
        let Scratch {
            weights,
            k_bases,
            v_bases,
            ..
        } = scratch;
        k_bases.clear();
        v_bases.clear();
        group_bases(keys, 0, block_table, ctx, k_bases, v_bases);
        weights.resize(g * m, 0.0);
        let raw = &mut weights[..g * m];
        keys.k.dot_rows(q, d, k_bases, raw);
        for (p, o) in out.iter_mut().enumerate() {
            *o = w
                .iter()
                .enumerate()
                .map(|(h, &wh)| wh * (scale * raw[h * m + p]).max(0.0))
                .fold(0.0, |acc, x| acc + x);
        }
    });
}

/// The `k` best-scored positions, ascending: position `start + i` scores `scores[i]`; of equal
/// scores the earlier position wins (a total order, so the choice depends on nothing else); all
/// of them when `k >= scores.len()`. Appended to `out`.
pub fn top_k_positions(scores: &[f32], start: usize, k: usize, out: &mut Vec<usize>) {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k < idx.len() {
        let better = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, better);
        }
        idx.truncate(k);
        idx.sort_unstable();
    }
    out.extend(idx.into_iter().map(|i| start + i));
}

/// The body of [`attention_group`] and [`attention_group_at`]: `bases` lists the K and V row
/// offsets of the positions attended to, in order.
fn attend(
    q: &[f32],
    kv: &KvView,
    shape: &AttnShape,
    out: &mut [f32],
    bases: impl FnOnce(&mut Vec<usize>, &mut Vec<usize>),
) {
    let (k_dim, v_dim) = (shape.k_dim, shape.v_dim);
    let g = q.len() / k_dim;
    assert_eq!(q.len(), g * k_dim, "attention_group: q is not whole heads");
    assert_eq!(
        out.len(),
        g * v_dim,
        "attention_group: out is not whole heads"
    );
    SCRATCH.with_borrow_mut(|scratch| {
        let Scratch {
            weights,
            k_bases,
            v_bases,
            ..
        } = scratch;
        k_bases.clear();
        v_bases.clear();
        bases(k_bases, v_bases);
        let (k_bases, v_bases) = (&*k_bases, &*v_bases);
        let m = k_bases.len();
        if m == 0 {
            out.fill(0.0);
            return;
        }
        // Scores head-major (head `h`, position `p` at `h * m + p`): the same `dot_f32(q_h, k)`
        // per head and position, each K row read once for the group.
        // Every element is overwritten: only growth is zeroed.
        weights.resize(g * m, 0.0);
        let weights = &mut weights[..g * m];
        kv.k.dot_rows(q, k_dim, k_bases, weights);
        for w in weights.chunks_exact_mut(m) {
            softmax(w, shape);
        }
        kv.v.weighted_rows(weights, v_bases, v_dim, out);
    });
}

/// One (token, KV head) group of [`attention_groups_parallel`]: the KV head its query heads
/// read, the blocks of its sequence and its causal context.
#[derive(Clone, Debug)]
pub struct GroupSpan<'a> {
    pub kv_head: usize,
    pub block_table: &'a [u32],
    pub ctx: Range<usize>,
}

/// [`attention_group`] of several groups (`q` and `out` hold them one after the other, each `g`
/// heads), with the work of all of them spread over the thread pool in three parallel loops:
/// the scores in chunks of positions, the softmax of each (group, head), the weighted sums in
/// chunks of value columns. For decode, whose few groups (one KV head: Gemma 3; three on two
/// threads: SmolLM2) would otherwise leave threads idle or pay a fork and join per group and
/// phase. Bit-identical to [`attention_group`] on each group: each score is the same dot
/// product whichever chunk computes it, each head's softmax the same [`softmax`] of the same
/// scores, and each output column adds its weighted values in position order whatever the
/// column chunk.
pub fn attention_groups_parallel(
    q: &[f32],
    kv: &KvView,
    groups: &[GroupSpan],
    shape: &AttnShape,
    out: &mut [f32],
) {
    /// Positions per scoring task; value columns per summing task, the wider where that still
    /// gives every thread two tasks (one pass over the positions per 64 columns rather than
    /// two: Gemma 3's 256-column heads at long context), else the narrower.
    const POSITIONS: usize = 64;
    const COLUMNS: [usize; 2] = [64, 32];
    let (k_dim, v_dim, n) = (shape.k_dim, shape.v_dim, groups.len());
    if n == 0 {
        return;
    }
    let g = q.len() / (n * k_dim);
    assert_eq!(
        q.len(),
        n * g * k_dim,
        "attention_groups: q is not whole groups"
    );
    assert_eq!(
        out.len(),
        n * g * v_dim,
        "attention_groups: out is not whole groups"
    );
    SCRATCH.with_borrow_mut(|scratch| {
        let Scratch {
            scores,
            weights,
            k_bases,
            v_bases,
            values,
            starts,
        } = scratch;
        // Group `j`'s positions are `starts[j] .. starts[j + 1]` of the bases; its scores and
        // weights are `g` times that range (chunk-major for the raw scores, head-major after).
        k_bases.clear();
        v_bases.clear();
        starts.clear();
        starts.push(0);
        for span in groups {
            let ctx = span.ctx.clone();
            group_bases(kv, span.kv_head, span.block_table, ctx, k_bases, v_bases);
            starts.push(k_bases.len());
        }
        let total = k_bases.len();
        scores.resize(g * total, 0.0);
        weights.resize(g * total, 0.0);
        values.resize(n * g * v_dim, 0.0);
        let (k_bases, v_bases, starts) = (&*k_bases, &*v_bases, &*starts);
        let chunks = |j: usize| (starts[j + 1] - starts[j]).div_ceil(POSITIONS);
        let mut first_chunk = Vec::with_capacity(n + 1);
        first_chunk.push(0);
        for j in 0..n {
            first_chunk.push(first_chunk[j] + chunks(j));
        }
        let out_scores = Shared(scores.as_mut_ptr());
        pool::for_each(first_chunk[n], |task| {
            let j = first_chunk.partition_point(|&c| c <= task) - 1;
            let i = task - first_chunk[j];
            let p0 = starts[j] + i * POSITIONS;
            let len = POSITIONS.min(starts[j + 1] - p0);
            // SAFETY: chunk `i` of group `j` is its own `g * len` scores, within `scores`.
            let s = unsafe { out_scores.slice(g * p0, g * len) };
            kv.k.dot_rows(
                &q[j * g * k_dim..(j + 1) * g * k_dim],
                k_dim,
                &k_bases[p0..p0 + len],
                s,
            );
        });
        let (scores, out_weights) = (&*scores, Shared(weights.as_mut_ptr()));
        pool::for_each(n * g, |task| {
            let (j, h) = (task / g, task % g);
            let (start, m) = (starts[j], starts[j + 1] - starts[j]);
            // SAFETY: head `h` of group `j` is its own `m` weights, within `weights`.
            let w = unsafe { out_weights.slice(g * start + h * m, m) };
            for (i, chunk) in scores[g * start..g * (start + m)]
                .chunks(POSITIONS * g)
                .enumerate()
            {
                let len = chunk.len() / g;
                w[i * POSITIONS..][..len].copy_from_slice(&chunk[h * len..(h + 1) * len]);
            }
            softmax(w, shape);
        });
        let weights = &*weights;
        let cols = COLUMNS
            .into_iter()
            .filter(|&c| v_dim.is_multiple_of(c))
            .find(|&c| n * v_dim / c >= 2 * pool::threads())
            .or(COLUMNS.into_iter().rfind(|&c| v_dim.is_multiple_of(c)))
            .unwrap_or(v_dim);
        let per_group = v_dim / cols;
        pool::for_each_chunk_mut(values, g * cols, |task, o| {
            let (j, i) = (task / per_group, task % per_group);
            let (start, end) = (starts[j], starts[j + 1]);
            let w = &weights[g * start..g * end];
            if start == end {
                o.fill(0.0);
            } else {
                kv.v.from(i * cols)
                    .weighted_rows(w, &v_bases[start..end], cols, o);
            }
        });
        // Chunks of columns (head-major within each) into each group's heads.
        for (task, chunk) in values.chunks_exact(g * cols).enumerate() {
            let (j, i) = (task / per_group, task % per_group);
            let group_out = &mut out[j * g * v_dim..(j + 1) * g * v_dim];
            for (o, src) in group_out
                .chunks_exact_mut(v_dim)
                .zip(chunk.chunks_exact(cols))
            {
                o[i * cols..][..cols].copy_from_slice(src);
            }
        }
    });
}

/// A raw pointer that the tasks of one parallel loop share, each writing its own part.
struct Shared(*mut f32);

impl Shared {
    /// The `len` values from `start`.
    ///
    /// # Safety
    /// In bounds of the buffer, and no other task touches them during the loop.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

// SAFETY: tasks write disjoint parts (see `slice`), and nothing reads them until the loop ends.
unsafe impl Sync for Shared {}

/// Offsets of each position's K row and V row of `kv_head`, appended to `k_bases` and
/// `v_bases`, walking the positions block by block (no division per position).
fn group_bases(
    kv: &KvView,
    kv_head: usize,
    block_table: &[u32],
    ctx: Range<usize>,
    k_bases: &mut Vec<usize>,
    v_bases: &mut Vec<usize>,
) {
    let bs = kv.block_size;
    let mut p = ctx.start;
    while p < ctx.end {
        let block = p / bs;
        let end = ctx.end.min((block + 1) * bs);
        let first = block_table[block] as usize * bs + p % bs;
        let rows = (first..first + (end - p)).map(|slot| slot * kv.n_kv_heads + kv_head);
        k_bases.extend(rows.clone().map(|row| row * kv.k_dim));
        v_bases.extend(rows.map(|row| row * kv.v_dim));
        p = end;
    }
}

/// One head's raw scores (in position order) into softmax weights, the same way on every
/// attention path: scaled (and capped); the max; `exp_f32(s - max)` and their f64 sum in the
/// fixed lanes of [`exp_sum`]; then multiplied by `1 / sum` (rounded to f32) and, when the
/// shape says so, rounded to f16. The vectorised steps give the bits of their portable twins, so
/// the weights depend only on the scores.
fn softmax(s: &mut [f32], shape: &AttnShape) {
    let max = match shape.softcap {
        None => scale_max(s, shape.scale),
        Some(cap) => {
            let mut max = f32::NEG_INFINITY;
            for v in s.iter_mut() {
                *v = softcap(*v * shape.scale, cap);
                max = max.max(*v);
            }
            max
        }
    };
    let sum = exp_sum(s, max);
    scale_round(s, (1.0 / sum) as f32, shape.f16_rounding);
}

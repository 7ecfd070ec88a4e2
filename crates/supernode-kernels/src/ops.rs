//! Element-wise and row-wise kernels of the transformer block: RMSNorm, rotary embeddings,
//! activations, and causal attention of one query token over a paged KV cache.
//!
//! Every kernel computes one token's row on its own, in an order that depends only on the row
//! length: results are bit-identical whatever else is in the batch (batch invariance).

use std::cell::RefCell;
use std::ops::Range;

use half::f16;

use crate::pool;
use crate::simd::{
    dot_f16_rows, dot_f32_rows, exp_sum, scale_max, scale_round, weighted_rows_f16,
    weighted_rows_f32,
};

/// `out = x / rms(x) * (w + w_offset)`; the mean of squares is accumulated in f64.
///
/// `w_offset` is 0 for Llama-style norms and 1 for Gemma's `(1 + w)` norms.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, w_offset: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    debug_assert_eq!(x.len(), out.len());
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + f64::from(eps)).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * (g + w_offset);
    }
}

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32, w_offset: f32) {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + f64::from(eps)).sqrt()) as f32;
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * (g + w_offset);
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: ggml's "normal" mode, used by GGUF llama files (whose
    /// converter permuted the Q/K rows to match) and by DeepSeek's interleaved rope.
    Interleaved,
    /// Halves `(i, i + d/2)`: HF transformers' `rotate_half`, ggml's "neox" mode.
    Halves,
}

/// Cosines and sines of one position's rotation angles, one per dimension pair.
///
/// `inv_freq[i]` is the angular frequency of pair `i`; angles are computed in f64.
/// `mscale` multiplies both (YaRN's attention factor; 1 otherwise).
pub fn rope_cos_sin(pos: usize, inv_freq: &[f64], mscale: f32, cos: &mut [f32], sin: &mut [f32]) {
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let (sn, cs) = (pos as f64 * f).sin_cos();
        *c = cs as f32 * mscale;
        *s = sn as f32 * mscale;
    }
}

/// Rotates the first `2 * cos.len()` dimensions of each of the `x.len() / head_dim` heads in
/// `x`; the remaining dimensions of a head (partial rotary) are left as they are.
pub fn rope_apply(x: &mut [f32], head_dim: usize, style: RopeStyle, cos: &[f32], sin: &[f32]) {
    let pairs = cos.len();
    debug_assert!(2 * pairs <= head_dim);
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..pairs {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + pairs),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// SiLU (swish): `x * sigmoid(x)`, as `x / (1 + exp(-x))` with the deterministic
/// [`crate::simd::exp_f32`], so that the vectorised gated unit gives the same bits.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + crate::simd::exp_f32(-x))
}

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// llama.cpp's GELU table: `f16(gelu(v))` for every f16 `v` (by its bits), with
/// `gelu(v) = 0.5 v (1 + tanh(sqrt(2/pi) v (1 + 0.044715 v²)))` in f32.
static GELU_TABLE: std::sync::LazyLock<Box<[f32]>> = std::sync::LazyLock::new(|| {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    (0..=u16::MAX)
        .map(|bits| {
            let v = half::f16::from_bits(bits).to_f32();
            let g = 0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (1.0 + COEF_A * v * v)).tanh());
            half::f16::from_f32(g).to_f32()
        })
        .collect()
});

/// GELU as llama.cpp's CPU backend computes it (`GGML_GELU_FP16`): 0 below -10, `x` above 10,
/// and in between [`GELU_TABLE`] looked up at `f16(x)`. Several times faster than
/// [`gelu_tanh`], and llama.cpp's numerics in quantised precision.
#[inline]
pub fn gelu_f16_table(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        GELU_TABLE[half::f16::from_f32(x).to_bits() as usize]
    }
}

/// The activation of a gated feed-forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// [`silu`] (SwiGLU).
    Silu,
    /// [`gelu_tanh`] (GeGLU, the formula).
    GeluTanh,
    /// [`gelu_f16_table`] (GeGLU, llama.cpp's table).
    GeluF16Table,
}

impl Activation {
    /// The activation of one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => silu(x),
            Activation::GeluTanh => gelu_tanh(x),
            Activation::GeluF16Table => gelu_f16_table(x),
        }
    }

    /// `gate[i] = act(gate[i]) * up[i]`: each value as [`Activation::apply`] then a multiply,
    /// whatever the path (SiLU and the table GELU go 16 values at a time with AVX-512).
    pub fn glu(self, gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len(), "glu: lengths differ");
        let done = match self {
            #[cfg(target_arch = "x86_64")]
            Activation::GeluF16Table if crate::simd::has_avx512() => {
                // SAFETY: AVX-512 F/BW/VL (and F16C) confirmed; the lengths are equal.
                unsafe { x86::glu_gelu_table(gate, up, &GELU_TABLE) }
            }
            Activation::Silu => crate::simd::glu_silu(gate, up),
            _ => 0,
        };
        for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
            *g = self.apply(*g) * u;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The table GELU's [`super::Activation::glu`] over whole vectors of 16 values; returns how
    /// many values it did. Per value: `f16(x)` rounded to nearest even (as `half` rounds), the
    /// table entry at its bits, then 0 where `x <= -10` and `x` where `x >= 10`, times `up`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and F16C; `up.len() >= gate.len()`; `table` has 65,536 entries.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn glu_gelu_table(gate: &mut [f32], up: &[f32], table: &[f32]) -> usize {
        assert_eq!(table.len(), 1 << 16);
        let n = gate.len() / 16 * 16;
        let (lo, hi) = (_mm512_set1_ps(-10.0), _mm512_set1_ps(10.0));
        for i in (0..n).step_by(16) {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let bits = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            let idx = _mm512_cvtepu16_epi32(bits);
            let t = _mm512_i32gather_ps::<4>(idx, table.as_ptr().cast());
            let t = _mm512_mask_mov_ps(
                t,
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, lo),
                _mm512_setzero_ps(),
            );
            let t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, hi), x);
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(t, u));
        }
        n
    }
}

/// Soft-capping, `cap * tanh(x / cap)`: Gemma's attention scores (Gemma 2) and final logits.
#[inline]
pub fn softcap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

/// `gate[i] = act(gate[i]) * up[i]`: the gated linear unit of SwiGLU / GeGLU.
pub fn glu_inplace(gate: &mut [f32], up: &[f32], act: Activation) {
    act.glu(gate, up)
}

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

/// `x` rounded to the nearest f16 value.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// [`round_f16`] of every value of `x`, in place: vectorised, the same bits.
pub fn round_slice_f16(x: &mut [f32]) {
    // `x * 1` is `x`, and the rounding is `round_f16`'s (see `scale_round`).
    scale_round(x, 1.0, true);
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
        group_bases(kv, kv_head, block_table, ctx, k_bases, v_bases);
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
    /// Positions per scoring task, and value columns per summing task.
    const POSITIONS: usize = 64;
    const COLUMNS: usize = 32;
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
        let cols = if v_dim.is_multiple_of(COLUMNS) {
            COLUMNS
        } else {
            v_dim
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, 1.0];
        let mut out = [0.0f32; 4];
        rms_norm(&x, &w, 1e-6, 0.0, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f64 + 1e-6).sqrt();
        for i in 0..4 {
            assert!((f64::from(out[i]) - f64::from(x[i] * w[i]) / rms).abs() < 1e-6);
        }
        let mut y = x;
        rms_norm_inplace(&mut y, &w, 1e-6, 1.0);
        assert!((f64::from(y[1]) - (-2.0 * 1.5) / rms).abs() < 1e-6);
    }

    /// The table GELU is the formula rounded through f16 (input and output) inside ±10 and the
    /// identity / zero outside, as llama.cpp defines it.
    #[test]
    fn table_gelu_is_the_f16_rounded_formula() {
        for &x in &[
            -12.0f32, -10.0, -3.3, -0.5, -1e-3, 0.0, 1e-3, 0.7, 2.5, 9.99, 10.0, 40.0,
        ] {
            let got = gelu_f16_table(x);
            let want = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                let v = round_f16(x);
                let a = 0.797_884_6f32;
                round_f16(0.5 * v * (1.0 + (a * v * (1.0 + 0.044715 * v * v)).tanh()))
            };
            assert_eq!(got.to_bits(), want.to_bits(), "x = {x}");
            assert!(
                (got - gelu_tanh(x)).abs() <= 2e-3 * (1.0 + x.abs()),
                "x = {x}"
            );
        }
    }

    #[test]
    fn rope_pairings_rotate_the_right_dims() {
        let inv = [1.0f64, 0.1];
        let (mut c, mut s) = ([0.0f32; 2], [0.0f32; 2]);
        rope_cos_sin(3, &inv, 1.0, &mut c, &mut s);
        let x0 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut a = x0;
        rope_apply(&mut a, 6, RopeStyle::Interleaved, &c, &s);
        let (c0, s0) = (3.0f32.cos(), 3.0f32.sin());
        assert!((a[0] - (1.0 * c0 - 2.0 * s0)).abs() < 1e-6);
        assert!((a[1] - (1.0 * s0 + 2.0 * c0)).abs() < 1e-6);
        assert_eq!(&a[4..], &x0[4..]);
        let mut b = x0;
        rope_apply(&mut b, 6, RopeStyle::Halves, &c, &s);
        assert!((b[0] - (1.0 * c0 - 3.0 * s0)).abs() < 1e-6);
        assert!((b[2] - (1.0 * s0 + 3.0 * c0)).abs() < 1e-6);
        assert_eq!(&b[4..], &x0[4..]);
    }

    #[test]
    fn attention_matches_naive_softmax() {
        // 2 query heads sharing 1 KV head; 3 positions spread over blocks [2, 0] of size 2.
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            k_dim: 2,
            v_dim: 2,
            scale: 0.5,
            softcap: None,
            f16_rounding: false,
        };
        let mut k = vec![0.0f32; 6 * 2];
        let mut v = vec![0.0f32; 6 * 2];
        let keys = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]];
        let vals = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];
        let table = [2u32, 0];
        for p in 0..3 {
            let slot = table[p / 2] as usize * 2 + p % 2;
            k[slot * 2..slot * 2 + 2].copy_from_slice(&keys[p]);
            v[slot * 2..slot * 2 + 2].copy_from_slice(&vals[p]);
        }
        let kv = KvView {
            k: KvRows::F32(&k),
            v: KvRows::F32(&v),
            block_size: 2,
            n_kv_heads: 1,
            k_dim: 2,
            v_dim: 2,
        };
        let q = [2.0f32, 0.0, 0.0, 2.0];
        let mut out = [0.0f32; 4];
        for h in 0..2 {
            let (qh, oh) = (&q[2 * h..2 * h + 2], &mut out[2 * h..2 * h + 2]);
            attention_head(qh, &kv, 0, &table, 0..3, &shape, oh);
        }
        for h in 0..2 {
            let s: Vec<f64> = keys
                .iter()
                .map(|kk| 0.5 * f64::from(q[2 * h] * kk[0] + q[2 * h + 1] * kk[1]))
                .collect();
            let z: f64 = s.iter().map(|x| x.exp()).sum();
            for d in 0..2 {
                let want: f64 = (0..3).map(|p| s[p].exp() / z * f64::from(vals[p][d])).sum();
                assert!((f64::from(out[2 * h + d]) - want).abs() < 1e-5);
            }
        }
    }

    /// A tiny deterministic generator for the bit-identity test.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// `attention_group`'s output, then `attention_head`'s for each head, concatenated.
    fn group_and_heads(
        q: &[f32],
        kv: &KvView,
        kv_head: usize,
        table: &[u32],
        ctx: Range<usize>,
        shape: &AttnShape,
    ) -> (Vec<u32>, Vec<u32>) {
        let g = q.len() / shape.k_dim;
        let mut group = vec![f32::NAN; g * shape.v_dim];
        attention_group(q, kv, kv_head, table, ctx.clone(), shape, &mut group);
        // The pool-parallel version gives the same bits, for this group alone and among others
        // (the same queries over the full context, an empty one and half of it).
        let half = ctx.start..ctx.start + ctx.len() / 2;
        let empty = ctx.start..ctx.start;
        let spans: Vec<GroupSpan> = [ctx.clone(), empty, half, ctx.clone()]
            .into_iter()
            .map(|ctx| GroupSpan {
                kv_head,
                block_table: table,
                ctx,
            })
            .collect();
        for count in [1, spans.len()] {
            let qs = q.repeat(count);
            let mut parallel = vec![f32::NAN; count * g * shape.v_dim];
            attention_groups_parallel(&qs, kv, &spans[..count], shape, &mut parallel);
            for (span, got) in spans[..count]
                .iter()
                .zip(parallel.chunks_exact(g * shape.v_dim))
            {
                let mut want = vec![f32::NAN; g * shape.v_dim];
                attention_group(q, kv, kv_head, table, span.ctx.clone(), shape, &mut want);
                assert!(
                    want.iter()
                        .zip(got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "attention_groups_parallel differs from attention_group ({count} groups)"
                );
            }
        }
        let mut heads = vec![f32::NAN; g * shape.v_dim];
        for (qh, o) in q
            .chunks_exact(shape.k_dim)
            .zip(heads.chunks_exact_mut(shape.v_dim))
        {
            attention_head(qh, kv, kv_head, table, ctx.clone(), shape, o);
        }
        // The steps written out one position at a time, with the single-row `dot_f32`.
        let mut naive = vec![f32::NAN; g * shape.v_dim];
        for (qh, o) in q
            .chunks_exact(shape.k_dim)
            .zip(naive.chunks_exact_mut(shape.v_dim))
        {
            naive_head(qh, kv, kv_head, table, ctx.clone(), shape, o);
        }
        assert!(
            heads
                .iter()
                .zip(&naive)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "attention_head differs from the step-by-step reference"
        );
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect();
        (bits(group), bits(heads))
    }

    /// One head's attention, position by position: `dot_f32` of the widened K row, scaled
    /// and capped; `exp_f32(s - max)` summed in f64 lane `p % 16`, lanes folded `l + 8`, `+ 4`,
    /// `+ 2`, `+ 1`; weights `e * f32(1 / sum)`, rounded to f16 if asked; `out += w * v` in
    /// position order.
    fn naive_head(
        q: &[f32],
        kv: &KvView,
        kv_head: usize,
        table: &[u32],
        ctx: Range<usize>,
        shape: &AttnShape,
        out: &mut [f32],
    ) {
        let widen = |rows: &KvRows, base: usize, n: usize| -> Vec<f32> {
            match *rows {
                KvRows::F32(x) => x[base..base + n].to_vec(),
                KvRows::F16(x) => x[base..base + n].iter().map(|h| h.to_f32()).collect(),
            }
        };
        let row = |p: usize| {
            let slot = table[p / kv.block_size] as usize * kv.block_size + p % kv.block_size;
            slot * kv.n_kv_heads + kv_head
        };
        let scores: Vec<f32> = ctx
            .clone()
            .map(|p| {
                let s = crate::simd::dot_f32(q, &widen(&kv.k, row(p) * kv.k_dim, shape.k_dim));
                let s = s * shape.scale;
                shape.softcap.map_or(s, |cap| softcap(s, cap))
            })
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let exps: Vec<f32> = scores
            .iter()
            .map(|&s| crate::simd::exp_f32(s - max))
            .collect();
        let mut lanes = [0f64; 16];
        for (i, &e) in exps.iter().enumerate() {
            lanes[i % 16] += f64::from(e);
        }
        for w in [8, 4, 2, 1] {
            for l in 0..w {
                lanes[l] += lanes[l + w];
            }
        }
        let inv = (1.0 / lanes[0]) as f32;
        out.fill(0.0);
        for (&e, p) in exps.iter().zip(ctx) {
            let w = if shape.f16_rounding {
                round_f16(e * inv)
            } else {
                e * inv
            };
            for (o, v) in out
                .iter_mut()
                .zip(widen(&kv.v, row(p) * kv.v_dim, shape.v_dim))
            {
                *o += w * v;
            }
        }
    }

    /// Over f32 rows, `attention_group` equals `attention_head` per head bit for bit; over f16
    /// rows, both also equal what they give on f32 rows of the same (widened) values. Values
    /// stored in the keys (MLA's latent: `v` is the key rows, of which the first `v_dim` are
    /// read) are covered too.
    #[test]
    fn attention_group_equals_attention_head_bit_for_bit() {
        let mut rng = Lcg(7);
        let block_size = 16;
        // (group, n_kv_heads, k_dim, v_dim, values in keys)
        let shapes = [
            (1, 2, 64, 64, false),
            (3, 3, 64, 64, false),
            (4, 2, 128, 128, false),
            (3, 1, 256, 256, false),
            (4, 2, 192, 128, false),
            (3, 2, 72, 40, false),
            (2, 1, 5, 3, false),
            (2, 1, 576, 512, true),
            (3, 1, 37, 21, true),
        ];
        let mut checked = 0;
        for &(group, n_kv, k_dim, v_dim, in_keys) in &shapes {
            let n_heads = group * n_kv;
            // 6 blocks of 16, handed out in a scrambled order.
            let table = [4u32, 1, 5, 0, 3, 2];
            let slots = table.len() * block_size;
            let k: Vec<f32> = (0..slots * n_kv * k_dim)
                .map(|_| rng.next() * 3.0)
                .collect();
            let v: Vec<f32> = (0..slots * n_kv * v_dim).map(|_| rng.next()).collect();
            let q: Vec<f32> = (0..n_heads * k_dim).map(|_| rng.next()).collect();
            let (k16, v16): (Vec<f16>, Vec<f16>) = (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let (kw, vw): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            let view = |k, v| KvView {
                k,
                v: if in_keys { k } else { v },
                block_size,
                n_kv_heads: n_kv,
                k_dim,
                v_dim: if in_keys { k_dim } else { v_dim },
            };
            let f32_view = view(KvRows::F32(&k), KvRows::F32(&v));
            let f16_view = view(KvRows::F16(&k16), KvRows::F16(&v16));
            let widened_view = view(KvRows::F32(&kw), KvRows::F32(&vw));
            for softcap in [None, Some(3.0f32)] {
                for f16_rounding in [false, true] {
                    let shape = AttnShape {
                        n_heads,
                        n_kv_heads: n_kv,
                        k_dim,
                        v_dim,
                        scale: 1.0 / (k_dim as f32).sqrt(),
                        softcap,
                        f16_rounding,
                    };
                    for ctx in [0..1, 0..5, 0..16, 0..17, 0..50, 7..90, 20..96, 95..96] {
                        for kvh in 0..n_kv {
                            let qg = &q[kvh * group * k_dim..(kvh + 1) * group * k_dim];
                            let case = format!(
                                "group {group} kv {n_kv} k {k_dim} v {v_dim} in_keys {in_keys} \
                                 cap {softcap:?} f16 {f16_rounding} ctx {ctx:?}"
                            );
                            let run = |kv: &KvView| {
                                group_and_heads(qg, kv, kvh, &table, ctx.clone(), &shape)
                            };
                            let (group_f32, heads_f32) = run(&f32_view);
                            assert_eq!(group_f32, heads_f32, "{case}");
                            let (group_f16, heads_f16) = run(&f16_view);
                            let (group_w, heads_w) = run(&widened_view);
                            assert_eq!(group_f16, group_w, "{case}");
                            assert_eq!(heads_f16, heads_w, "{case}");
                            assert_eq!(group_f16, heads_f16, "{case}");
                            checked += group;
                        }
                    }
                }
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn activations() {
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        let mut g = [1.0f32, -1.0];
        glu_inplace(&mut g, &[2.0, 3.0], Activation::Silu);
        assert!((g[0] - 2.0 * silu(1.0)).abs() < 1e-6);
    }

    /// SiLU's gated unit (16 at a time where the CPU can) equals the scalar `silu` times `up`,
    /// bit for bit, over a wide range (exp's clamps, ±0, infinities, NaN), with and without a
    /// tail; and `silu` stays within a few ulp of the f64 formula.
    #[test]
    fn glu_of_silu_is_the_scalar_silu() {
        let mut xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0537).collect();
        xs.extend([-200.0, -104.5, 88.9, 95.0, 1e-30, -1e-30, 0.0, -0.0]);
        xs.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
        ]);
        for len in [xs.len(), 33, 16, 3] {
            let x = &xs[..len];
            let up: Vec<f32> = (0..len).map(|i| 1.5 - (i % 7) as f32 * 0.375).collect();
            assert_glu_is_scalar(Activation::Silu, x, &up);
        }
        for &x in &xs[..4000] {
            let want = f64::from(x) / (1.0 + (-f64::from(x)).exp());
            let got = f64::from(silu(x));
            assert!((got - want).abs() <= 4e-7 * want.abs() + 1e-30, "x = {x}");
        }
    }

    /// The table GELU's gated unit (16 at a time where the CPU can) equals the scalar lookup
    /// times `up`, bit for bit: every f16 value, values between them (rounding ties), the
    /// ±10 edges, huge values, infinities and NaN, at lengths with and without a tail.
    #[test]
    fn glu_of_the_table_gelu_is_the_scalar_lookup() {
        let mut xs: Vec<f32> = (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect();
        for b in (0..=u16::MAX).step_by(7) {
            let v = half::f16::from_bits(b).to_f32();
            let next = half::f16::from_bits(b.wrapping_add(1)).to_f32();
            xs.push((v + next) / 2.0);
        }
        xs.extend([
            -10.0, -9.999, 10.0, 9.999, -10.001, 10.001, 1e30, -1e30, 70000.0,
        ]);
        xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
        for len in [xs.len(), 17, 16, 5] {
            let x = &xs[xs.len() - len..];
            let up: Vec<f32> = (0..len).map(|i| 0.5 + (i % 13) as f32 * 0.25).collect();
            assert_glu_is_scalar(Activation::GeluF16Table, x, &up);
        }
    }

    /// `act.glu` of `x` and `up` equals `act.apply(x) * up` value by value, bit for bit (any
    /// NaN for NaN).
    fn assert_glu_is_scalar(act: Activation, x: &[f32], up: &[f32]) {
        let mut got = x.to_vec();
        act.glu(&mut got, up);
        for ((&x, &u), &got) in x.iter().zip(up).zip(&got) {
            let want = act.apply(x) * u;
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{act:?} x = {x}: {got} vs {want}"
            );
        }
    }
}

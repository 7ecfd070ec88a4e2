//! Products of packed matrices ([`crate::qdot::packed::PackedMatrix`]): one, several on the same
//! activations, or a feed-forward's gate and up fused with the activation.
//!
//! Invariant: every output is the packed reference order of (matrix row, the token's quantised
//! activations), computed by the same panel kernel whatever the batch, the task split or the sink.

use super::quantized::{quantize_tokens, ACTS};
use super::{SharedOut, TASKS_PER_THREAD, TOKEN_CHUNK};
use crate::ops::Activation;
use crate::pool;
use crate::qdot::packed::{
    block_sums, panel_dot, sub_block_sums, Act, ActKind, PackedMatrix, PANEL,
};
use crate::qdot::{ActBlock, BlockQ8K, BlockQ8_0, DOT_TOKENS};

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
    let products: Vec<Product> = ms
        .iter()
        .zip(outs.iter_mut())
        .map(|(&m, out)| Product {
            m,
            glu: None,
            tokens: TokenRows::All(n_tokens),
            out,
        })
        .collect();
    packed_products(products, x, n_tokens);
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
    let product = Product {
        m: gate,
        glu: Some((up, act)),
        tokens: TokenRows::All(n_tokens),
        out,
    };
    packed_products(vec![product], x, n_tokens);
}

/// The rows of the activations a [`Product`] reads, in the order of its output rows.
#[derive(Clone, Copy, Debug)]
pub enum TokenRows<'a> {
    /// All `n` rows, in order.
    All(usize),
    /// `len` rows from `start`.
    Range(usize, usize),
    /// These rows (each below the activations' row count).
    List(&'a [usize]),
}

impl TokenRows<'_> {
    pub fn len(&self) -> usize {
        match *self {
            TokenRows::All(n) | TokenRows::Range(_, n) => n,
            TokenRows::List(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The activations' row of output row `j`.
    fn get(&self, j: usize) -> usize {
        match *self {
            TokenRows::All(_) => j,
            TokenRows::Range(start, _) => start + j,
            TokenRows::List(l) => l[j],
        }
    }
}

/// One product of [`matmul_packed_gathered`]: matrix `m` (or, with `glu`, `act(m x) * (up x)`)
/// against the activation rows `tokens`, output row `j` (of `m.rows` values) from row
/// `tokens[j]`.
pub struct Product<'a, 'o> {
    pub m: &'a PackedMatrix,
    pub glu: Option<(&'a PackedMatrix, Activation)>,
    pub tokens: TokenRows<'a>,
    pub out: &'o mut [f32],
}

/// Several products of packed matrices (all of the same columns), each on its own rows of the
/// same activations `x` (`n_tokens × cols`), in one parallel loop: a mixture of experts' chosen
/// experts, each on the tokens routed to it. Each row of `x` is quantised once, whichever
/// products read it, and every output is the bits [`matmul_packed`] (or [`matmul_packed_glu`])
/// of its matrix gives that row: the same kernel on the same quantised activations.
pub fn matmul_packed_gathered(products: Vec<Product>, x: &[f32], n_tokens: usize) {
    packed_products(products, x, n_tokens);
}

/// The body of every packed product (see [`matmul_packed_gathered`]): each token's activations
/// quantised once per kind the matrices meet, then one parallel loop over (product, chunk of its
/// tokens, group of its panels).
fn packed_products(products: Vec<Product>, x: &[f32], n_tokens: usize) {
    let Some(first) = products.first() else {
        return;
    };
    let cols = first.m.cols;
    let matrices = || {
        products
            .iter()
            .flat_map(|p| std::iter::once(p.m).chain(p.glu.map(|(up, _)| up)))
    };
    assert!(
        matrices().all(|m| m.cols == cols),
        "matmul: matrices differ in columns"
    );
    assert_eq!(x.len(), n_tokens * cols, "matmul: activations length");
    for p in &products {
        assert_eq!(
            p.out.len(),
            p.tokens.len() * p.m.rows,
            "matmul: output length"
        );
        if let Some((up, _)) = p.glu {
            assert_eq!(
                up.rows, p.m.rows,
                "matmul_packed_glu: gate and up differ in rows"
            );
        }
        if let TokenRows::Range(start, len) = p.tokens {
            assert!(start + len <= n_tokens, "matmul: token rows out of range");
        }
        if let TokenRows::List(l) = p.tokens {
            assert!(
                l.iter().all(|&t| t < n_tokens),
                "matmul: token rows out of range"
            );
        }
    }
    if n_tokens == 0 {
        return;
    }
    let kinds = |kind: ActKind| matrices().any(|m| m.format.act_kind() == kind);
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
    let acts_of = |m: &PackedMatrix| -> &[Act] { &acts[m.format.act_kind() as usize] };
    // The units of work: each product's panels (a GLU's gate panel with the same panel of its up
    // projection) times chunks of its tokens; several panels per task when there are few
    // tokens, so that a decode step's thousands of panels make a few dozen tasks (each task is
    // an atomic increment shared by the threads).
    let chunks = |p: &Product| p.tokens.len().div_ceil(TOKEN_CHUNK);
    let units: usize = products.iter().map(|p| p.m.panels() * chunks(p)).sum();
    let per_task = (units / (TASKS_PER_THREAD * pool::threads())).max(1);
    // (product, chunk, first panel, end panel) of each task.
    let mut tasks: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (i, p) in products.iter().enumerate() {
        for chunk in 0..chunks(p) {
            for p0 in (0..p.m.panels()).step_by(per_task) {
                tasks.push((i, chunk, p0, (p0 + per_task).min(p.m.panels())));
            }
        }
    }
    let outs: Vec<SharedOut> = products
        .iter()
        .map(|p| SharedOut(p.out.as_ptr().cast_mut()))
        .collect();
    pool::for_each(tasks.len(), |task| {
        let (i, chunk, p0, p1) = tasks[task];
        let Product { m, glu, tokens, .. } = &products[i];
        let (m, end) = (*m, tokens.len());
        let mut res = [[0f32; PANEL]; DOT_TOKENS];
        let mut res_up = [[0f32; PANEL]; DOT_TOKENS];
        for panel in p0..p1 {
            let r0 = panel * PANEL;
            let valid = PANEL.min(m.rows - r0);
            for t0 in
                (chunk * TOKEN_CHUNK..((chunk + 1) * TOKEN_CHUNK).min(end)).step_by(DOT_TOKENS)
            {
                let size = (t0 + DOT_TOKENS).min(end) - t0;
                // The group's activations (the last repeated to fill the array; only `size`
                // are used).
                let group = |m: &PackedMatrix| -> [Act; DOT_TOKENS] {
                    let table = acts_of(m);
                    std::array::from_fn(|j| table[tokens.get(t0 + j.min(size - 1))])
                };
                panel_dot(m, panel, &group(m)[..size], &mut res[..size]);
                if let Some((up, f)) = glu {
                    panel_dot(up, panel, &group(up)[..size], &mut res_up[..size]);
                    for (g, u) in res[..size].iter_mut().zip(&res_up[..size]) {
                        f.glu(g, u);
                    }
                }
                for (j, r) in res[..size].iter().enumerate() {
                    // SAFETY: this task's (panel rows, token range) of product `i` is its own;
                    // the range is in bounds by the length checks above.
                    let dst = unsafe { outs[i].slice((t0 + j) * m.rows + r0, valid) };
                    dst.copy_from_slice(&r[..valid]);
                }
            }
        }
    });
    ACTS.set(scratch);
}

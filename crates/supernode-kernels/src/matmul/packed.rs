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

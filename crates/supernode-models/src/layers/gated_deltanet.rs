//! Gated DeltaNet linear attention (Qwen3.5, Qwen3-Next): a layer whose memory of the past is
//! a fixed-size recurrent state per sequence instead of a growing KV cache.
//!
//! ```text
//! qkv = conv_silu(in_qkv x)            (short causal depthwise conv, its last taps-1 inputs kept)
//! q, k = l2norm(q) / sqrt(dk), l2norm(k)   per key head; value head h reads key head kv(h)
//! g    = a * softplus(alpha x + dt_bias)   (a = -exp(A_log) < 0: the decay is exp(g) < 1)
//! beta = sigmoid(beta x)
//! o    = gated delta rule over the tokens  (chunked in the prompt, then token by token)
//! out  = out_proj(rmsnorm(o) * w * silu(z x))   per value head
//! ```
//!
//! The state of a sequence lives in its slot of the layer's [`RecurrentState`] (the engine
//! gives each request one slot for all of its linear layers): the conv inputs, then one
//! `dv × dk` matrix per value head. A sequence whose first token in the batch is at position 0
//! starts from zeros; otherwise it continues the state its slot holds, which is the state after
//! exactly the positions before that token (the batch checks guarantee the positions of a
//! sequence are consecutive). Every step is per sequence and per head, in the token order, with
//! fixed-order kernels: the outputs and the state do not depend on what else is in the batch.
//!
//! Work is spread over the threads by (sequence, value head): each head's state is its own; the
//! convolution by (sequence, block of channels), each channel being its own sum.
//!
//! **Two forms of the recurrence.** Prompt positions (those below the batch's
//! [`crate::Batch::chunked_until`] for the sequence) are computed in the chunked form
//! ([`gated_delta_chunk`]: the window's tokens at once as small matrix products), in windows
//! of [`DELTA_CHUNK`] positions aligned to multiples of it; every other token, a decoded one,
//! in the token-by-token form ([`gated_delta_step`]). Both give the same outputs and state
//! within float rounding. The bits depend only on how the prompt is cut into windows: the
//! scheduler cuts a hybrid model's prompts only at multiples of [`DELTA_CHUNK`], so a request's
//! prefill is the same computation alone, in any batch and after a preemption (which recomputes
//! its generated tokens token by token, as they were decoded).
//!
//! **Drafts.** A speculative step appends a sequence's drafted tokens after its own
//! ([`crate::Batch::drafts`]); they run token by token like any generated token, and the state
//! takes them in. So that a verification can reject some, the step keeps a [`DeltaJournal`]
//! for the slot: each head's matrix before the first draft, the drafts' normalised queries,
//! keys, values, decays and strengths, and the conv inputs around them.
//! [`GatedDeltaNet::rollback_drafts`] restores the matrices and replays the accepted drafts
//! with the same token-by-token kernel and the same inputs, so the state is bit for bit the
//! one of a step that never saw the rejected drafts.

use std::sync::Mutex;

use supernode_kernels::ops::{
    causal_conv1d_silu, gated_delta_chunk, gated_delta_step, glu_inplace, l2_norm_inplace,
    Activation, DELTA_CHUNK,
};
use supernode_kernels::pool;
use supernode_kernels::scratch::zeroed;

use super::{LayerCtx, Linear, RmsNorm};
use crate::kv_cache::RecurrentState;
use crate::weights::Weights;
use crate::Result;

/// transformers' `l2norm` epsilon (`torch_chunk_gated_delta_rule(use_qk_l2norm_in_kernel)`).
const L2_EPS: f32 = 1e-6;

/// The sizes of a Gated DeltaNet layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaNetShape {
    pub n_k_heads: usize,
    pub n_v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    /// The convolution's kernel size (`linear_conv_kernel_dim`).
    pub conv_taps: usize,
    /// Value head `h` reads key head `h % n_k_heads` (llama.cpp's `qwen35` files, whose
    /// converter reorders the value heads so that a tiled repeat serves), instead of
    /// `h / (n_v_heads / n_k_heads)` (transformers' `repeat_interleave`, `qwen3next` files).
    pub tiled_v_heads: bool,
}

impl DeltaNetShape {
    /// Channels of the convolution: queries, keys, values.
    pub fn conv_dim(&self) -> usize {
        2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim
    }

    /// Floats of the carried conv inputs per sequence.
    pub fn conv_state_len(&self) -> usize {
        (self.conv_taps - 1) * self.conv_dim()
    }

    /// Floats of one sequence's state: the conv inputs and every head's matrix.
    pub fn state_len(&self) -> usize {
        self.conv_state_len() + self.n_v_heads * self.v_dim * self.k_dim
    }

    fn kv_head(&self, h: usize) -> usize {
        if self.tiled_v_heads {
            h % self.n_k_heads
        } else {
            h / (self.n_v_heads / self.n_k_heads)
        }
    }
}

/// What a slot needs to undo the rejected drafts of its last step (see the module docs).
#[derive(Debug, Default)]
pub struct DeltaJournal {
    /// Drafts at the end of the step (0: nothing to roll back).
    pub drafts: usize,
    /// Conv input rows from the one ending the state's carried inputs before the first draft:
    /// after `a` accepted drafts the carried inputs are rows `a..a + taps - 1`.
    pub conv: Vec<f32>,
    /// Each value head's `dv × dk` matrix before the first draft.
    pub heads: Vec<f32>,
    /// Per draft but the last (which a rollback never keeps): its normalised conv output row
    /// (queries, keys, values), then per head ln of its decay, and its write strength.
    pub rows: Vec<f32>,
    pub log_decay: Vec<f32>,
    pub beta: Vec<f32>,
}

pub struct GatedDeltaNet {
    /// `[hidden, conv_dim]`: queries, keys, values before the convolution.
    pub in_qkv: Linear,
    /// `[hidden, n_v_heads * v_dim]`: the output gate z.
    pub in_z: Linear,
    /// `[hidden, n_v_heads]` each.
    pub in_beta: Linear,
    pub in_alpha: Linear,
    /// `taps × conv_dim`, tap-major (the last tap multiplies the current token).
    pub conv: Vec<f32>,
    /// `[n_v_heads]`
    pub dt_bias: Vec<f32>,
    /// `[n_v_heads]`: `-exp(A_log)`.
    pub a: Vec<f32>,
    /// `[v_dim]`: the per-head gated RMSNorm (plain weight).
    pub norm: RmsNorm,
    /// `[n_v_heads * v_dim, hidden]`
    pub out: Linear,
    pub shape: DeltaNetShape,
}

impl GatedDeltaNet {
    /// Layer `layer`'s tensors by their GGUF names (`A_log` of HF checkpoints as `ssm_a_log`).
    ///
    /// The input projections come as `attn_qkv` (queries of all heads, keys, values) and
    /// `attn_gate` (z), or fused as Qwen3-Next checkpoints have them: `ssm_in` holding
    /// `[q, k, v, z]` per key head (llama.cpp's legacy name); and as `ssm_beta` and
    /// `ssm_alpha`, or fused as `ssm_ba` holding `[beta, alpha]` per key head (Qwen3-Next, also
    /// converted). Fused rows are regrouped at load.
    pub fn load(
        w: &Weights,
        layer: usize,
        hidden: usize,
        eps: f32,
        shape: DeltaNetShape,
    ) -> Result<GatedDeltaNet> {
        let p = |n: &str| format!("blk.{layer}.{n}");
        let s = shape;
        let (nk, nv, kd, vdim) = (s.n_k_heads, s.n_v_heads, s.k_dim, s.v_dim);
        let (vd, conv_dim, r) = (nv * vdim, s.conv_dim(), nv / nk);
        let (in_qkv, in_z) = match w.get(&p("ssm_in.weight")) {
            None => (
                w.linear(&p("attn_qkv"), conv_dim, hidden)?,
                w.linear(&p("attn_gate"), vd, hidden)?,
            ),
            Some(_) => {
                // Per key head g: [q (kd), k (kd), v (r vd), z (r vd)].
                let group = 2 * kd + 2 * r * vdim;
                let range =
                    |g: usize, from: usize, len: usize| g * group + from..g * group + from + len;
                let qkv_rows: Vec<usize> = (0..nk)
                    .flat_map(|g| range(g, 0, kd))
                    .chain((0..nk).flat_map(|g| range(g, kd, kd)))
                    .chain((0..nk).flat_map(|g| range(g, 2 * kd, r * vdim)))
                    .collect();
                let z_rows: Vec<usize> = (0..nk)
                    .flat_map(|g| range(g, 2 * kd + r * vdim, r * vdim))
                    .collect();
                let qkvz = p("ssm_in.weight");
                (
                    w.linear_rows(&qkvz, nk * group, hidden, &qkv_rows)?,
                    w.linear_rows(&qkvz, nk * group, hidden, &z_rows)?,
                )
            }
        };
        let (in_beta, in_alpha) = match w.get(&p("ssm_ba.weight")) {
            None => (
                w.linear(&p("ssm_beta"), nv, hidden)?,
                w.linear(&p("ssm_alpha"), nv, hidden)?,
            ),
            Some(_) => {
                let ba = p("ssm_ba.weight");
                let beta: Vec<usize> = (0..nk).flat_map(|g| g * 2 * r..g * 2 * r + r).collect();
                let alpha: Vec<usize> = (0..nk)
                    .flat_map(|g| g * 2 * r + r..g * 2 * r + 2 * r)
                    .collect();
                (
                    w.linear_rows(&ba, 2 * nv, hidden, &beta)?,
                    w.linear_rows(&ba, 2 * nv, hidden, &alpha)?,
                )
            }
        };
        // ggml `[taps, conv_dim]` (converted: squeezed) or `[taps, 1, conv_dim]` (HF).
        let conv_name = p("ssm_conv1d.weight");
        let raw = match w.get(&conv_name).map(|t| t.shape.len()) {
            Some(3) => w.values(&conv_name, &[s.conv_taps, 1, conv_dim])?,
            _ => w.values(&conv_name, &[s.conv_taps, conv_dim])?,
        };
        let mut conv = vec![0.0; raw.len()];
        for c in 0..conv_dim {
            for t in 0..s.conv_taps {
                conv[t * conv_dim + c] = raw[c * s.conv_taps + t];
            }
        }
        let a = match w.get(&p("ssm_a_log")) {
            Some(_) => w
                .vector(&p("ssm_a_log"), nv)?
                .iter()
                .map(|&l| -l.exp())
                .collect(),
            None => w.vector(&p("ssm_a"), nv)?,
        };
        Ok(GatedDeltaNet {
            in_qkv,
            in_z,
            in_beta,
            in_alpha,
            conv,
            dt_bias: w.vector(&p("ssm_dt.bias"), nv)?,
            a,
            norm: w.rms_norm(&p("ssm_norm.weight"), s.v_dim, eps, 0.0)?,
            out: w.linear(&p("ssm_out"), hidden, vd)?,
            shape,
        })
    }

    /// Bytes of projection weights read per token.
    pub fn weight_bytes(&self) -> usize {
        [
            &self.in_qkv,
            &self.in_z,
            &self.in_beta,
            &self.in_alpha,
            &self.out,
        ]
        .iter()
        .map(|l| l.weight_bytes())
        .sum::<usize>()
            + 4 * self.conv.len()
    }

    /// `x`: the normalised `n × hidden` input of the batch; writes `n × hidden` to `out`,
    /// reading and updating each sequence's state slot in `state`.
    pub fn forward(
        &self,
        x: &[f32],
        ctx: &mut LayerCtx,
        state: &mut RecurrentState,
        out: &mut [f32],
    ) {
        let batch = ctx.batch;
        let n = batch.len();
        let s = &self.shape;
        let (nv, nk, kd, vdim) = (s.n_v_heads, s.n_k_heads, s.k_dim, s.v_dim);
        let (conv_dim, vd) = (s.conv_dim(), nv * vdim);
        debug_assert_eq!(state.width, s.state_len(), "checked by the decoder");
        let mut qkv = zeroed(n * conv_dim);
        let mut z = zeroed(n * vd);
        let mut b = zeroed(n * nv);
        let mut a = zeroed(n * nv);
        Linear::forward_many(
            &[&self.in_qkv, &self.in_z, &self.in_beta, &self.in_alpha],
            x,
            n,
            &mut [&mut qkv, &mut z, &mut b, &mut a],
        );
        ctx.cb("linear_attn_qkv_mixed", &qkv);
        ctx.cb("z", &z);

        // The rows of each sequence, in order.
        let mut rows: Vec<Vec<usize>> = vec![Vec::new(); batch.block_tables.len()];
        for t in 0..n {
            rows[batch.seq_of[t]].push(t);
        }
        let seqs: Vec<usize> = (0..rows.len()).filter(|&q| !rows[q].is_empty()).collect();
        // A sequence starting at position 0 starts from an empty state.
        for &q in &seqs {
            if batch.positions[rows[q][0]] == 0 {
                state.slot_mut(batch.state_slots[q]).fill(0.0);
            }
        }
        // Drafts at the end of each sequence (at most all but its first row), and a journal
        // for each slot that has some: the conv inputs from the last carried one before the
        // first draft (the carried inputs, then the step's rows).
        let drafts: Vec<usize> = (0..rows.len())
            .map(|q| {
                let nd = batch.drafts.get(q).copied().unwrap_or(0);
                nd.min(rows[q].len().saturating_sub(1))
            })
            .collect();
        let taps = s.conv_taps;
        for &q in &seqs {
            let slot = batch.state_slots[q];
            if state.journals.len() <= slot {
                state.journals.resize_with(slot + 1, DeltaJournal::default);
            }
            let nd = drafts[q];
            state.journals[slot].drafts = nd;
            if nd == 0 {
                continue;
            }
            let carried = state.data[slot * state.width..][..s.conv_state_len()].to_vec();
            let j = &mut state.journals[slot];
            let before = rows[q].len() - nd;
            let input = |i: usize| match i.checked_sub(taps - 1) {
                None => &carried[i * conv_dim..(i + 1) * conv_dim],
                Some(r) => &qkv[rows[q][r] * conv_dim..(rows[q][r] + 1) * conv_dim],
            };
            j.conv.clear();
            for i in before..before + nd + taps - 2 {
                j.conv.extend_from_slice(input(i));
            }
        }

        // The convolution with its carried inputs: one task per (sequence, block of channels),
        // the blocks only for long runs of tokens (each channel is its own sum, so the split
        // changes no bit).
        let conv_len = s.conv_state_len();
        let blocks = match n * conv_dim >= 1 << 13 {
            true => (conv_dim / 16).clamp(1, 4 * pool::threads()),
            false => 1,
        };
        let width = conv_dim.div_ceil(blocks);
        let cols: Vec<std::ops::Range<usize>> = (0..conv_dim)
            .step_by(width)
            .map(|c0| c0..(c0 + width).min(conv_dim))
            .collect();
        let conv_tasks: Vec<(usize, std::ops::Range<usize>)> = seqs
            .iter()
            .flat_map(|&q| cols.iter().map(move |c| (q, c.clone())))
            .collect();
        // Each task's carried inputs in, and its outputs and new carried inputs out.
        let conv_io: Vec<Mutex<(Vec<f32>, Vec<f32>)>> = conv_tasks
            .iter()
            .map(|(q, c)| {
                let slot = state.slot_mut(batch.state_slots[*q]);
                let carried: Vec<f32> = slot[..conv_len]
                    .chunks_exact(conv_dim)
                    .flat_map(|row| row[c.clone()].iter().copied())
                    .collect();
                Mutex::new((Vec::new(), carried))
            })
            .collect();
        pool::for_each(conv_tasks.len(), |i| {
            let (q, c) = &conv_tasks[i];
            let w = c.len();
            let r = &rows[*q];
            let xs: Vec<f32> = r
                .iter()
                .flat_map(|&t| {
                    qkv[t * conv_dim + c.start..t * conv_dim + c.end]
                        .iter()
                        .copied()
                })
                .collect();
            let ws: Vec<f32> = (0..taps)
                .flat_map(|tap| {
                    self.conv[tap * conv_dim + c.start..tap * conv_dim + c.end]
                        .iter()
                        .copied()
                })
                .collect();
            let mut io = conv_io[i].lock().unwrap_or_else(|e| e.into_inner());
            let (ys, carried) = &mut *io;
            ys.resize(r.len() * w, 0.0);
            causal_conv1d_silu(&xs, carried, &ws, w, ys);
        });
        let mut conv_out = zeroed(n * conv_dim);
        for ((q, c), io) in conv_tasks.iter().zip(conv_io) {
            let (ys, carried) = io.into_inner().unwrap_or_else(|e| e.into_inner());
            let w = c.len();
            for (&t, y) in rows[*q].iter().zip(ys.chunks_exact(w)) {
                conv_out[t * conv_dim + c.start..t * conv_dim + c.end].copy_from_slice(y);
            }
            let slot = state.slot_mut(batch.state_slots[*q]);
            for (row, src) in slot[..conv_len]
                .chunks_exact_mut(conv_dim)
                .zip(carried.chunks_exact(w))
            {
                row[c.clone()].copy_from_slice(src);
            }
        }
        ctx.cb("conv_output_silu", &conv_out);

        // Queries and keys normalised per key head (queries scaled), decays and strengths.
        let q_scale = 1.0 / (kd as f32).sqrt();
        let prepare = |_: usize, row: &mut [f32]| {
            for (i, head) in row[..2 * nk * kd].chunks_exact_mut(kd).enumerate() {
                l2_norm_inplace(head, L2_EPS);
                if i < nk {
                    head.iter_mut().for_each(|v| *v *= q_scale);
                }
            }
        };
        if n >= 8 {
            pool::for_each_chunk_mut(&mut conv_out, conv_dim, prepare);
        } else {
            conv_out
                .chunks_exact_mut(conv_dim)
                .enumerate()
                .for_each(|(t, r)| prepare(t, r));
        }
        // ln of each token's decay, and its write strength.
        let mut log_decay = zeroed(n * nv);
        for (t, (g, bt)) in log_decay
            .chunks_exact_mut(nv)
            .zip(b.chunks_exact_mut(nv))
            .enumerate()
        {
            for h in 0..nv {
                let raw = a[t * nv + h] + self.dt_bias[h];
                // softplus as torch computes it (linear above 20).
                let sp = if raw > 20.0 { raw } else { raw.exp().ln_1p() };
                g[h] = self.a[h] * sp;
                bt[h] = 1.0 / (1.0 + (-bt[h]).exp());
            }
        }

        // Each sequence's rows as runs: a run of prompt positions inside one aligned window
        // (the chunked form), or one token (the recurrence).
        let runs: Vec<Vec<(usize, usize, bool)>> = (0..rows.len())
            .map(|q| {
                let until = batch.chunked_until.get(q).copied().unwrap_or(0);
                let r = &rows[q];
                let first_draft = r.len() - drafts[q];
                let mut out = Vec::new();
                let mut i = 0;
                while i < r.len() {
                    let pos = batch.positions[r[i]];
                    if pos < until && i < first_draft {
                        let end = until.min((pos / DELTA_CHUNK + 1) * DELTA_CHUNK);
                        let len = (end - pos).min(r.len() - i).min(first_draft - i);
                        out.push((i, len, true));
                        i += len;
                    } else {
                        out.push((i, 1, false));
                        i += 1;
                    }
                }
                out
            })
            .collect();

        // One task per (sequence, value head), each with its own state.
        let head_len = vdim * kd;
        let mut heads: Vec<Option<&mut [f32]>> = Vec::new();
        let mut by_slot: Vec<Option<&mut [f32]>> =
            state.data.chunks_exact_mut(state.width).map(Some).collect();
        let mut tasks = Vec::with_capacity(seqs.len() * nv);
        for &q in &seqs {
            let slot = by_slot[batch.state_slots[q]]
                .take()
                .expect("the batch checks give each sequence its own slot");
            for (h, m) in slot[conv_len..].chunks_exact_mut(head_len).enumerate() {
                tasks.push((q, h));
                heads.push(Some(m));
            }
        }
        let heads: Vec<Mutex<&mut [f32]>> = heads.into_iter().flatten().map(Mutex::new).collect();
        // Each task's outputs, and its head's matrix before the first draft (if any).
        let outs: Vec<Mutex<(Vec<f32>, Vec<f32>)>> = tasks
            .iter()
            .map(|_| Mutex::new((Vec::new(), Vec::new())))
            .collect();
        pool::for_each(tasks.len(), |i| {
            let (q, h) = tasks[i];
            let mut m = heads[i].lock().unwrap_or_else(|e| e.into_inner());
            let kh = s.kv_head(h);
            let r = &rows[q];
            let (qo, ko, vo) = (kh * kd, nk * kd + kh * kd, 2 * nk * kd + h * vdim);
            let row = |t: usize| &conv_out[t * conv_dim..(t + 1) * conv_dim];
            let mut o = vec![0.0; r.len() * vdim];
            let (mut qs, mut ks, mut vs, mut ls, mut bs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut before_drafts = Vec::new();
            for &(start, len, chunked) in &runs[q] {
                if drafts[q] > 0 && start == r.len() - drafts[q] {
                    before_drafts = m.to_vec();
                }
                let ts = &r[start..start + len];
                let ot = &mut o[start * vdim..(start + len) * vdim];
                if !chunked {
                    let (t, x) = (ts[0], row(ts[0]));
                    let g = log_decay[t * nv + h].exp();
                    let (qh, khd) = (&x[qo..qo + kd], &x[ko..ko + kd]);
                    gated_delta_step(&mut m, qh, khd, &x[vo..vo + vdim], g, b[t * nv + h], ot);
                    continue;
                }
                qs.clear();
                ks.clear();
                vs.clear();
                ls.clear();
                bs.clear();
                for &t in ts {
                    let x = row(t);
                    qs.extend_from_slice(&x[qo..qo + kd]);
                    ks.extend_from_slice(&x[ko..ko + kd]);
                    vs.extend_from_slice(&x[vo..vo + vdim]);
                    ls.push(log_decay[t * nv + h]);
                    bs.push(b[t * nv + h]);
                }
                gated_delta_chunk(&mut m, &qs, &ks, &vs, &ls, &bs, ot);
            }
            *outs[i].lock().unwrap_or_else(|e| e.into_inner()) = (o, before_drafts);
        });
        let mut o = zeroed(n * vd);
        for &q in &seqs {
            let j = &mut state.journals[batch.state_slots[q]];
            if drafts[q] == 0 {
                continue;
            }
            j.heads.clear();
            // The replayed drafts' inputs: all but the last draft.
            let replayed = &rows[q][rows[q].len() - drafts[q]..rows[q].len() - 1];
            j.rows.clear();
            j.log_decay.clear();
            j.beta.clear();
            for &t in replayed {
                j.rows
                    .extend_from_slice(&conv_out[t * conv_dim..(t + 1) * conv_dim]);
                j.log_decay
                    .extend_from_slice(&log_decay[t * nv..(t + 1) * nv]);
                j.beta.extend_from_slice(&b[t * nv..(t + 1) * nv]);
            }
        }
        for (&(q, h), res) in tasks.iter().zip(&outs) {
            let res = res.lock().unwrap_or_else(|e| e.into_inner());
            for (&t, ot) in rows[q].iter().zip(res.0.chunks_exact(vdim)) {
                o[t * vd + h * vdim..t * vd + (h + 1) * vdim].copy_from_slice(ot);
            }
            if drafts[q] > 0 {
                // Tasks of a sequence come in head order.
                state.journals[batch.state_slots[q]]
                    .heads
                    .extend_from_slice(&res.1);
            }
        }
        ctx.cb("attn_core", &o);
        // The gated norm per value head.
        for oh in o.chunks_exact_mut(vdim) {
            self.norm.forward_inplace(oh);
        }
        // silu(z) * o, the gated unit's bits.
        glu_inplace(&mut z, &o, Activation::Silu);
        ctx.cb("final_output", &z);
        self.out.forward(&z, n, out);
    }

    /// Puts `slot`'s state back to the end of the first `accepted` drafts of the last step
    /// that carried drafts for it: the matrices from the journal, then the accepted drafts
    /// replayed token by token. Nothing when every draft was accepted (the state is already
    /// that) or the slot has no journal; the journal is used once.
    pub fn rollback_drafts(&self, state: &mut RecurrentState, slot: usize, accepted: usize) {
        let RecurrentState {
            width,
            data,
            journals,
            ..
        } = state;
        let Some(j) = journals.get_mut(slot) else {
            return;
        };
        let drafts = std::mem::take(&mut j.drafts);
        if accepted >= drafts {
            return;
        }
        let s = &self.shape;
        let (nv, nk, kd, vdim) = (s.n_v_heads, s.n_k_heads, s.k_dim, s.v_dim);
        let (conv_dim, conv_len, head_len) = (s.conv_dim(), s.conv_state_len(), vdim * kd);
        let values = &mut data[slot * *width..(slot + 1) * *width];
        values[..conv_len].copy_from_slice(&j.conv[accepted * conv_dim..][..conv_len]);
        let heads: Vec<Mutex<&mut [f32]>> = values[conv_len..]
            .chunks_exact_mut(head_len)
            .map(Mutex::new)
            .collect();
        let j = &*j;
        pool::for_each(nv, |h| {
            let mut m = heads[h].lock().unwrap_or_else(|e| e.into_inner());
            m.copy_from_slice(&j.heads[h * head_len..(h + 1) * head_len]);
            let kh = s.kv_head(h);
            let (qo, ko, vo) = (kh * kd, nk * kd + kh * kd, 2 * nk * kd + h * vdim);
            let mut o = vec![0.0; vdim];
            for d in 0..accepted {
                let x = &j.rows[d * conv_dim..(d + 1) * conv_dim];
                let g = j.log_decay[d * nv + h].exp();
                let (q, k, v) = (&x[qo..qo + kd], &x[ko..ko + kd], &x[vo..vo + vdim]);
                gated_delta_step(&mut m, q, k, v, g, j.beta[d * nv + h], &mut o);
            }
        });
    }
}

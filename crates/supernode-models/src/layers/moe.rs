//! The sparse mixture-of-experts feed-forward (Qwen3-MoE, DeepSeek-V3) and the feed-forward
//! enum that lets a block be dense or sparse.
//!
//! Routing follows [`MoeConfig`]: scores from the router (softmax or sigmoid), choice by the
//! scores plus an optional selection bias within the best expert groups, weights from the
//! unbiased scores (optionally renormalised, then scaled). The batch's tokens are then grouped
//! by expert, so each chosen expert's weights are read once per step, for all of its tokens.
//!
//! Batch invariance: a token's output is the sum of its experts' outputs in ascending expert
//! order (transformers' order too), each a batch-invariant matmul row, then the shared expert's
//! — the same bits whatever else is in the batch.

use supernode_kernels::matmul::{matmul_packed_gathered, Product, TokenRows};
use supernode_kernels::ops::{glu_inplace, Activation};
use supernode_kernels::scratch::zeroed;

use super::{Linear, Mlp, StackedLinear};
use crate::config::{Gating, MoeConfig};
use crate::weights::Weights;
use crate::{ModelConfig, Result};

/// A block's feed-forward: dense, or a mixture of experts.
pub enum Ffn {
    Dense(Box<Mlp>),
    Moe(Box<Moe>),
}

impl Ffn {
    /// Layer `layer`'s feed-forward from its GGUF-named tensors: a [`Moe`] where the config
    /// makes the layer sparse, else the dense `ffn_gate`/`ffn_up`/`ffn_down` of `ffn_dim`.
    pub fn load(cfg: &ModelConfig, w: &Weights, layer: usize, act: Activation) -> Result<Ffn> {
        match &cfg.moe {
            // A layer past the decoder's (a NextN layer) is sparse if it has a router.
            Some(moe)
                if moe.layers.get(layer).copied().unwrap_or_else(|| {
                    w.get(&format!("blk.{layer}.ffn_gate_inp.weight")).is_some()
                }) =>
            {
                Ok(Ffn::Moe(Box::new(Moe::load(cfg, moe, w, layer, act)?)))
            }
            _ => {
                let mlp = Mlp::load(w, layer, "", cfg.ffn_dim, cfg.hidden, act)?;
                Ok(Ffn::Dense(Box::new(mlp)))
            }
        }
    }

    /// `x`: `n × hidden` → `out`: `n × hidden`, for the batch's `tokens` (which a hash-routed
    /// MoE routes by).
    pub fn forward(&self, x: &[f32], tokens: &[u32], out: &mut [f32]) {
        match self {
            Ffn::Dense(mlp) => mlp.forward(x, tokens.len(), out),
            Ffn::Moe(moe) => moe.forward(x, tokens, out),
        }
    }

    /// Bytes of weights read per token (a MoE reads its router, its used experts and the
    /// shared expert).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Ffn::Dense(mlp) => mlp.weight_bytes(),
            Ffn::Moe(moe) => moe.weight_bytes(),
        }
    }
}

/// Routed experts (stacked SwiGLUs), their router, and the optional shared expert.
pub struct Moe {
    /// `[hidden, n_experts]`
    pub router: Linear,
    /// Added to the scores for choosing experts only (DeepSeek-V3's `e_score_correction_bias`).
    pub selection_bias: Option<Vec<f32>>,
    /// `[hidden, expert_ffn, n_experts]` each; `down` is `[expert_ffn, hidden, n_experts]`.
    pub gate: StackedLinear,
    pub up: StackedLinear,
    pub down: StackedLinear,
    /// Applied to every token and added to the routed output.
    pub shared: Option<Mlp>,
    /// `[hidden, 1]`: where present, the shared expert's output is scaled by `sigmoid(g x)`
    /// per token (Qwen2-MoE, Qwen3.5-MoE, Qwen3-Next: `shared_expert_gate`).
    pub shared_gate: Option<Linear>,
    pub cfg: MoeConfig,
    /// The experts' activation (SiLU).
    pub act: Activation,
    /// A hash-routed layer's experts per token id (`vocab × n_used`, DeepSeek-V4's `tid2eid`):
    /// these are chosen whatever the scores, which only weight them.
    pub hash: Option<Vec<u32>>,
    /// Clamp the experts' gate to `<= limit` and up projection to `[-limit, limit]` before the
    /// activation (DeepSeek-V4's `swiglu_limit`).
    pub limit: Option<f32>,
}

impl Moe {
    /// Layer `layer`'s experts: router `ffn_gate_inp`, optional selection bias
    /// `exp_probs_b.bias`, stacked `ffn_{gate,up,down}_exps`, and the shared expert
    /// `ffn_{gate,up,down}_shexp` when the config has one.
    pub fn load(
        cfg: &ModelConfig,
        moe: &MoeConfig,
        w: &Weights,
        layer: usize,
        act: Activation,
    ) -> Result<Moe> {
        let p = |n: &str| format!("blk.{layer}.{n}");
        let (h, e, f) = (cfg.hidden, moe.n_experts, moe.expert_ffn_dim);
        let selection_bias = match w.get(&p("exp_probs_b.bias")) {
            Some(_) => Some(w.vector(&p("exp_probs_b.bias"), e)?),
            None => None,
        };
        let limit = cfg.v4.as_ref().map(|v4| v4.swiglu_limit);
        let shared = match (moe.n_shared, moe.shared_ffn_dim) {
            (0, _) => None,
            (_, Some(d)) => Some(Mlp::load(w, layer, "_shexp", d, h, act)?),
            (s, None) => Some(Mlp::load(w, layer, "_shexp", s * f, h, act)?),
        }
        .map(|mlp| Mlp { limit, ..mlp });
        let hash = match cfg.v4.as_ref().and_then(|v4| v4.hash_layers.get(layer)) {
            Some(true) => Some(hash_table(
                w,
                &p("ffn_gate_tid2eid.weight"),
                cfg.vocab_size,
                moe,
            )?),
            _ => None,
        };
        let shared_gate = match shared {
            Some(_) => w.opt_linear(&p("ffn_gate_inp_shexp"), 1, h)?,
            None => None,
        };
        Ok(Moe {
            router: w.linear(&p("ffn_gate_inp"), e, h)?,
            selection_bias,
            gate: w.experts(&p("ffn_gate_exps"), e, f, h)?,
            up: w.experts(&p("ffn_up_exps"), e, f, h)?,
            down: w.experts(&p("ffn_down_exps"), e, h, f)?,
            shared,
            shared_gate,
            cfg: moe.clone(),
            act,
            hash,
            limit,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        let expert = self.gate.matrix_bytes() + self.up.matrix_bytes() + self.down.matrix_bytes();
        self.router.weight_bytes()
            + self.cfg.n_used * expert
            + self.shared.as_ref().map_or(0, Mlp::weight_bytes)
            + self.shared_gate.as_ref().map_or(0, Linear::weight_bytes)
    }

    /// `x`: `n × hidden` → `out`: `n × hidden`, for the batch's `tokens`.
    pub fn forward(&self, x: &[f32], tokens: &[u32], out: &mut [f32]) {
        let n = tokens.len();
        let (h, e) = (self.router.cols(), self.cfg.n_experts);
        let mut logits = zeroed(n * e);
        self.router.forward(x, n, &mut logits);
        // For each expert, its tokens and their weights, tokens ascending.
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        let mut scratch = Routing::default();
        let k = self.cfg.n_used;
        for (t, &token) in tokens.iter().enumerate() {
            // (The table was checked to have a row for every token id of the vocabulary.)
            let fixed = self.hash.as_ref().map(|table| {
                let id = token as usize;
                &table[id * k..(id + 1) * k]
            });
            for &(expert, w) in scratch.route(
                &logits[t * e..(t + 1) * e],
                self.selection_bias.as_deref(),
                fixed,
                &self.cfg,
            ) {
                routed[expert].push((t, w));
            }
        }
        out.fill(0.0);
        if self.limit.is_none() && self.forward_packed(x, n, &routed, out) {
            return self.add_shared(x, n, out);
        }
        let f = self.gate.rows();
        for (expert, tokens) in routed.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            let m = tokens.len();
            let mut xe = zeroed(m * h);
            for (&(t, _), row) in tokens.iter().zip(xe.chunks_exact_mut(h)) {
                row.copy_from_slice(&x[t * h..(t + 1) * h]);
            }
            let mut g = zeroed(m * f);
            let mut u = zeroed(m * f);
            self.gate.forward(expert, &xe, m, &mut g);
            self.up.forward(expert, &xe, m, &mut u);
            if let Some(limit) = self.limit {
                clamp_glu_inputs(&mut g, &mut u, limit);
            }
            glu_inplace(&mut g, &u, self.act);
            let mut y = zeroed(m * h);
            self.down.forward(expert, &g, m, &mut y);
            for (&(t, w), yr) in tokens.iter().zip(y.chunks_exact(h)) {
                for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(yr) {
                    *o += v * w;
                }
            }
        }
        self.add_shared(x, n, out);
    }

    /// The routed experts on packed panels, when all three of their tensors were packed: the
    /// gate and up products with the activation of every chosen expert in one parallel loop
    /// (each on its own tokens of `x`), then every down product in another; each token's
    /// outputs added to `out` in ascending expert order, as the expert-by-expert path does.
    /// The products are the bits of that path's (the same packed kernel per matrix, row and
    /// token), so the output is too; decode pays two fork-joins per layer instead of three per
    /// expert. Returns false, doing nothing, where the experts are not packed.
    fn forward_packed(
        &self,
        x: &[f32],
        n: usize,
        routed: &[Vec<(usize, f32)>],
        out: &mut [f32],
    ) -> bool {
        let chosen: Vec<(usize, Vec<usize>)> = routed
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.is_empty())
            .map(|(e, t)| (e, t.iter().map(|&(t, _)| t).collect()))
            .collect();
        let packed = |e: usize| {
            Some((
                self.gate.packed(e)?,
                self.up.packed(e)?,
                self.down.packed(e)?,
            ))
        };
        let Some(mats) = chosen
            .iter()
            .map(|&(e, _)| packed(e))
            .collect::<Option<Vec<_>>>()
        else {
            return false;
        };
        let (h, f) = (self.router.cols(), self.gate.rows());
        let total: usize = chosen.iter().map(|(_, t)| t.len()).sum();
        // Each chosen expert's hidden rows, one after the other.
        let mut hidden = zeroed(total * f);
        let mut rest = &mut hidden[..];
        let mut products = Vec::with_capacity(chosen.len());
        for ((_, tokens), &(gate, up, _)) in chosen.iter().zip(&mats) {
            let (o, r) = std::mem::take(&mut rest).split_at_mut(tokens.len() * f);
            rest = r;
            products.push(Product {
                m: gate,
                glu: Some((up, self.act)),
                tokens: TokenRows::List(tokens),
                out: o,
            });
        }
        matmul_packed_gathered(products, x, n);
        let mut y = zeroed(total * h);
        let mut rest = &mut y[..];
        let (mut products, mut start) = (Vec::with_capacity(chosen.len()), 0);
        for ((_, tokens), &(_, _, down)) in chosen.iter().zip(&mats) {
            let (o, r) = std::mem::take(&mut rest).split_at_mut(tokens.len() * h);
            rest = r;
            products.push(Product {
                m: down,
                glu: None,
                tokens: TokenRows::Range(start, tokens.len()),
                out: o,
            });
            start += tokens.len();
        }
        matmul_packed_gathered(products, &hidden, total);
        let mut rows = y.chunks_exact(h);
        for (expert, _) in &chosen {
            for (&(t, w), yr) in routed[*expert].iter().zip(rows.by_ref()) {
                for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(yr) {
                    *o += v * w;
                }
            }
        }
        true
    }

    /// The shared expert's output (gated where the model says so), added to `out`.
    fn add_shared(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let h = self.router.cols();
        if let Some(shared) = &self.shared {
            let mut s = zeroed(n * h);
            shared.forward(x, n, &mut s);
            if let Some(gate) = &self.shared_gate {
                let mut g = zeroed(n);
                gate.forward(x, n, &mut g);
                for (row, &g) in s.chunks_exact_mut(h).zip(g.iter()) {
                    let scale = 1.0 / (1.0 + (-g).exp());
                    row.iter_mut().for_each(|v| *v *= scale);
                }
            }
            out.iter_mut().zip(&s).for_each(|(o, v)| *o += v);
        }
    }
}

/// DeepSeek-V4's gate before a clamped SwiGLU: the gate to `<= limit`, the up projection to
/// `[-limit, limit]` (transformers' `clamp(max=limit)` and `clamp(-limit, limit)`).
pub fn clamp_glu_inputs(gate: &mut [f32], up: &mut [f32], limit: f32) {
    gate.iter_mut().for_each(|g| *g = g.min(limit));
    up.iter_mut().for_each(|u| *u = u.clamp(-limit, limit));
}

/// A hash-routed layer's `tid2eid` table (`vocab × n_used` expert ids, stored as numbers):
/// every entry a whole expert id in range, no token given the same expert twice.
fn hash_table(w: &Weights, name: &str, vocab: usize, moe: &MoeConfig) -> Result<Vec<u32>> {
    let k = moe.n_used;
    let values = w.values(name, &[k, vocab])?;
    let bad = |msg: String| crate::ModelError::Tensor {
        name: name.to_string(),
        msg,
    };
    let mut table = Vec::with_capacity(values.len());
    for (id, row) in values.chunks_exact(k).enumerate() {
        let start = table.len();
        for &v in row {
            if v.fract() != 0.0 || v < 0.0 || v >= moe.n_experts as f32 {
                return Err(bad(format!(
                    "gives token {id} expert {v}, which is not one of the {} experts",
                    moe.n_experts
                )));
            }
            let e = v as u32;
            if table[start..].contains(&e) {
                return Err(bad(format!("gives token {id} expert {e} twice")));
            }
            table.push(e);
        }
    }
    Ok(table)
}

/// One token's routing, with its scratch buffers.
#[derive(Default)]
struct Routing {
    scores: Vec<f32>,
    choice: Vec<f32>,
    order: Vec<usize>,
    chosen: Vec<(usize, f32)>,
}

impl Routing {
    /// The chosen `(expert, weight)` pairs of a token with router logits `logits`, experts
    /// ascending.
    /// `fixed`: the experts a hash-routed layer gives the token, chosen whatever the scores.
    fn route(
        &mut self,
        logits: &[f32],
        bias: Option<&[f32]>,
        fixed: Option<&[u32]>,
        cfg: &MoeConfig,
    ) -> &[(usize, f32)] {
        let e = logits.len();
        self.scores.clear();
        match cfg.gating {
            Gating::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                self.scores.extend(logits.iter().map(|&l| (l - max).exp()));
                let sum: f32 = self.scores.iter().sum();
                self.scores.iter_mut().for_each(|s| *s /= sum);
            }
            Gating::Sigmoid => self
                .scores
                .extend(logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp()))),
            Gating::SqrtSoftplus => self.scores.extend(logits.iter().map(|&l| {
                // torch's softplus: `ln(1 + e^l)`, and `l` itself above 20.
                let sp = if l > 20.0 { l } else { l.exp().ln_1p() };
                sp.sqrt()
            })),
        }
        if let Some(fixed) = fixed {
            self.order.clear();
            self.order.extend(fixed.iter().map(|&i| i as usize));
            self.order.sort_unstable();
            return self.weigh(cfg);
        }
        self.choice.clear();
        self.choice.extend_from_slice(&self.scores);
        if let Some(b) = bias {
            self.choice.iter_mut().zip(b).for_each(|(c, b)| *c += b);
        }
        if cfg.n_groups > 1 {
            // Keep the `groups_used` groups whose two best choice scores sum highest.
            let size = e / cfg.n_groups;
            let top2 = |g: &[f32]| {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in g {
                    if v > a {
                        (a, b) = (v, a);
                    } else if v > b {
                        b = v;
                    }
                }
                if size < 2 {
                    a
                } else {
                    a + b
                }
            };
            let group_scores: Vec<f32> = self.choice.chunks_exact(size).map(top2).collect();
            self.order.clear();
            self.order.extend(0..cfg.n_groups);
            self.order
                .sort_by(|&a, &b| group_scores[b].total_cmp(&group_scores[a]).then(a.cmp(&b)));
            for &g in &self.order[cfg.groups_used..] {
                self.choice[g * size..(g + 1) * size].fill(f32::NEG_INFINITY);
            }
        }
        self.order.clear();
        self.order.extend(0..e);
        let choice = &self.choice;
        self.order
            .sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
        self.order.truncate(cfg.n_used);
        self.order.sort_unstable();
        self.weigh(cfg)
    }

    /// The experts in `order` (ascending) with their weights: the unbiased scores, normalised
    /// and scaled as the config says.
    fn weigh(&mut self, cfg: &MoeConfig) -> &[(usize, f32)] {
        self.chosen.clear();
        self.chosen
            .extend(self.order.iter().map(|&i| (i, self.scores[i])));
        if cfg.norm_weights {
            // transformers' DeepSeek-V3 adds 1e-20 to the sum; at f32 it only matters for a sum
            // of 0, which sigmoid and softmax weights never give.
            let sum: f32 = self.chosen.iter().map(|&(_, w)| w).sum();
            self.chosen.iter_mut().for_each(|(_, w)| *w /= sum);
        }
        if cfg.scale != 1.0 {
            self.chosen.iter_mut().for_each(|(_, w)| *w *= cfg.scale);
        }
        &self.chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(gating: Gating, n_groups: usize, groups_used: usize, n_used: usize) -> MoeConfig {
        MoeConfig {
            n_experts: 8,
            n_used,
            expert_ffn_dim: 4,
            n_shared: 0,
            shared_ffn_dim: None,
            gating,
            norm_weights: false,
            scale: 1.0,
            n_groups,
            groups_used,
            layers: vec![true],
        }
    }

    #[test]
    fn softmax_top_k_renormalised() {
        let logits = [0.0f32, 2.0, 1.0, -1.0, 3.0, 0.5, 0.0, 0.0];
        let mut c = cfg(Gating::Softmax, 1, 1, 2);
        let mut r = Routing::default();
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let got = r.route(&logits, None, None, &c).to_vec();
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 4]);
        assert!((got[0].1 - 2f32.exp() / z).abs() < 1e-6);
        c.norm_weights = true;
        let got = r.route(&logits, None, None, &c).to_vec();
        let want = 2f32.exp() / (2f32.exp() + 3f32.exp());
        assert!((got[0].1 - want).abs() < 1e-6 && (got[0].1 + got[1].1 - 1.0).abs() < 1e-6);
    }

    /// Packed experts (Q4_K gate and up, Q6_K down, as in a Q4_K_M file) give the bits of the
    /// expert-by-expert path on the same bytes, with the experts' products gathered into two
    /// parallel loops; and a token's output is the same alone as in a batch.
    #[test]
    fn packed_experts_equal_the_expert_by_expert_path() {
        use std::sync::Arc;
        use supernode_kernels::quant::quantize_row;
        use supernode_kernels::{DType, Precision};

        use crate::numerics::Numerics;
        use crate::{Storage, Tensor};

        let (h, f, e) = (256, 256, 8);
        let mut seed = 17u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 20001) as f32 / 10000.0 - 1.0
        };
        let mut tensor = |dtype: DType, shape: Vec<usize>| {
            let (cols, rows): (usize, usize) = (shape[0], shape[1..].iter().product());
            let row_bytes = dtype.row_bytes(cols).unwrap();
            let mut bytes = vec![0u8; rows * row_bytes];
            for row in bytes.chunks_exact_mut(row_bytes) {
                let values: Vec<f32> = (0..cols).map(|_| next()).collect();
                quantize_row(dtype, &values, row);
            }
            Tensor {
                name: "t".into(),
                dtype,
                shape,
                storage: Storage::Owned(Arc::new(bytes)),
            }
        };
        let numerics = Numerics::new(Precision::Quantized);
        let router = tensor(DType::F32, vec![h, e]);
        let (g, u, d) = (
            tensor(DType::Q4K, vec![h, f, e]),
            tensor(DType::Q4K, vec![h, f, e]),
            tensor(DType::Q6K, vec![f, h, e]),
        );
        let moe = |packed: bool| {
            let stack = |t: &Tensor| match packed {
                true => StackedLinear::new_packed(t.clone(), numerics),
                false => StackedLinear::new(t.clone(), numerics),
            };
            let mut c = cfg(Gating::Softmax, 1, 1, 3);
            c.expert_ffn_dim = f;
            c.norm_weights = true;
            Moe {
                router: Linear::new(router.clone(), None, numerics),
                selection_bias: None,
                gate: stack(&g),
                up: stack(&u),
                down: stack(&d),
                shared: None,
                shared_gate: None,
                cfg: c,
                act: Activation::Silu,
                hash: None,
                limit: None,
            }
        };
        let (packed, plain) = (moe(true), moe(false));
        if packed.gate.packed(0).is_none() {
            eprintln!("skipped: no packed kernels on this machine");
            return;
        }
        assert!(plain.gate.packed(0).is_none());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for n in [1, 5, 40] {
            let x: Vec<f32> = (0..n * h)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let run = |m: &Moe, x: &[f32], n: usize| {
                let mut out = vec![f32::NAN; n * h];
                m.forward(x, &vec![0; n], &mut out);
                out
            };
            let got = run(&packed, &x, n);
            assert_eq!(bits(&got), bits(&run(&plain, &x, n)), "n = {n}");
            let last = run(&packed, &x[(n - 1) * h..], 1);
            assert_eq!(
                bits(&got[(n - 1) * h..]),
                bits(&last),
                "n = {n}: the last token alone"
            );
        }
    }

    /// DeepSeek-V3: the bias moves the choice, not the weights; a group is as good as the sum
    /// of its two best, and experts outside the kept groups are never chosen.
    #[test]
    fn sigmoid_bias_and_groups() {
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        // Groups of 2: {0,1} {2,3} {4,5} {6,7}.
        let logits = [3.0f32, -3.0, 1.0, 1.0, 2.5, -2.0, 0.0, 0.0];
        let mut c = cfg(Gating::Sigmoid, 4, 2, 2);
        c.scale = 2.5;
        let mut r = Routing::default();
        // Group sums: 0.998, 1.462, 1.043, 1.0 -> groups 1 and 2 kept: expert 0 (the best
        // single score) is out; best of {2,3,4,5} are 4 and 2 (tie 2/3 -> lower index).
        let got = r.route(&logits, None, None, &c).to_vec();
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), [2, 4]);
        assert!((got[1].1 - 2.5 * sig(2.5)).abs() < 1e-6);
        // A bias on expert 7 lifts group 3 and picks expert 7; its weight stays unbiased.
        let mut bias = [0.0f32; 8];
        bias[7] = 1.0;
        let got = r.route(&logits, Some(&bias), None, &c).to_vec();
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), [2, 7]);
        assert!((got[1].1 - 2.5 * sig(0.0)).abs() < 1e-6);
    }

    /// A hash-routed layer's table: whole expert ids in range, none twice for a token; anything
    /// else is an error naming the tensor and the token. Routing by it picks exactly the
    /// table's experts, weighted by their renormalised scores.
    #[test]
    fn hash_tables_are_checked_and_route_by_the_token() {
        use std::sync::Arc;

        use crate::numerics::Numerics;
        use crate::{Storage, Tensor};
        use supernode_kernels::{DType, Precision};
        let table = |values: &[f32]| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let t = Tensor {
                name: "t".into(),
                dtype: DType::F32,
                shape: vec![2, values.len() / 2],
                storage: Storage::Owned(Arc::new(bytes)),
            };
            Weights::new(vec![t], Numerics::new(Precision::Exact))
        };
        let mut c = cfg(Gating::SqrtSoftplus, 1, 1, 2);
        c.norm_weights = true;
        let vocab = 3;
        let ok = hash_table(&table(&[0.0, 7.0, 3.0, 1.0, 5.0, 2.0]), "t", vocab, &c).unwrap();
        assert_eq!(ok, [0, 7, 3, 1, 5, 2]);
        let e = hash_table(&table(&[0.0, 8.0, 3.0, 1.0, 5.0, 2.0]), "t", vocab, &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gives token 0 expert 8, which is not one of the 8 experts"),
            "{e}"
        );
        let e = hash_table(&table(&[0.0, 1.0, 3.0, 3.0, 5.0, 2.0]), "t", vocab, &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gives token 1 expert 3 twice"), "{e}");
        let e = hash_table(&table(&[0.0, 1.0, 3.5, 4.0, 5.0, 2.0]), "t", vocab, &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gives token 1 expert 3.5"), "{e}");
        // The token's experts, ascending, with sqrt(softplus) scores renormalised.
        let logits = [0.3, -1.0, 2.0, 0.5, -0.2, 1.0, 0.0, 4.0];
        let mut r = Routing::default();
        let got = r.route(&logits, None, Some(&[7, 3]), &c).to_vec();
        let s = |l: f32| l.exp().ln_1p().sqrt();
        let (a, b) = (s(0.5), s(4.0));
        assert_eq!(got.iter().map(|&(e, _)| e).collect::<Vec<_>>(), [3, 7]);
        assert!((got[0].1 - a / (a + b)).abs() < 1e-6 && (got[1].1 - b / (a + b)).abs() < 1e-6);
    }
}

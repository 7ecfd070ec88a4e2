//! Manifold-constrained hyper-connections (DeepSeek-V4's mHC): the residual is `n` parallel
//! streams of `hidden` per token instead of one. Before a block's attention or feed-forward,
//! a one-layer perceptron over the (unweighted-RMS-normed) streams gives three mixes:
//!
//! ```text
//! [pre | post | comb] = fn · rmsnorm(x_1 .. x_n)             (n, n and n×n values)
//! pre  = sigmoid(pre · s0 + b_pre) + eps                      collapse:  u = Σ_j pre_j x_j
//! post = 2 sigmoid(post · s1 + b_post)                        expand:    x'_k = post_k y + Σ_j comb_jk x_j
//! comb = sinkhorn(softmax_rows(comb · s2 + b_comb) + eps)     (doubly stochastic)
//! ```
//!
//! where `y` is the block's output for `u`. The model's end collapses the streams once more with
//! its own `pre` ([`HyperHead`]) before the final norm. Follows transformers'
//! `DeepseekV4HyperConnection` / `DeepseekV4HyperHead`, in f32 with f64 sums for the
//! perceptron's dot products; every token is computed alone, so the result does not depend on
//! the batch.

use supernode_kernels::scratch::zeroed;

use crate::weights::Weights;
use crate::Result;

/// The mixes before one block (attention or feed-forward).
pub struct HyperConnection {
    /// `[(2 + n) n, n hidden]`, row-major.
    fn_w: Vec<f32>,
    /// `[(2 + n) n]`
    base: Vec<f32>,
    /// The scales of the pre, post and comb logits.
    scale: [f32; 3],
    n: usize,
    hidden: usize,
    iters: usize,
    eps: f32,
    norm_eps: f32,
}

/// One token's mixes for the expansion after the block.
pub struct Mixes {
    post: Vec<f32>,
    /// `comb[j * n + k]`: how much of stream `j` goes into stream `k`.
    comb: Vec<f32>,
}

/// The final collapse of the streams (`output_hc_*`).
pub struct HyperHead {
    /// `[n, n hidden]`
    fn_w: Vec<f32>,
    base: Vec<f32>,
    scale: f32,
    n: usize,
    hidden: usize,
    eps: f32,
    norm_eps: f32,
}

/// `x` (one token's `n hidden` streams) through an RMSNorm without weight.
fn unweighted_norm(x: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len() as f64;
    let r = (1.0 / (ms as f32 + eps).sqrt()).min(f32::MAX);
    x.iter().map(|&v| v * r).collect()
}

/// `w · x` for each row of `w` (rows of `x.len()`), summed in f64.
fn matvec(w: &[f32], x: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len())) {
        *o = row
            .iter()
            .zip(x)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum::<f64>() as f32;
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `Σ_j w_j x_j` over the `n` streams of `x`, into `out` (`hidden`).
fn collapse(w: &[f32], x: &[f32], out: &mut [f32]) {
    let h = out.len();
    out.fill(0.0);
    for (&wj, xj) in w.iter().zip(x.chunks_exact(h)) {
        out.iter_mut().zip(xj).for_each(|(o, &v)| *o += wj * v);
    }
}

impl HyperConnection {
    /// `{prefix}fn.weight`, `{prefix}base.weight`, `{prefix}scale.weight` (GGUF
    /// `blk.{i}.hc_attn_*` / `blk.{i}.hc_ffn_*`).
    pub fn load(
        w: &Weights,
        prefix: &str,
        n: usize,
        hidden: usize,
        iters: usize,
        eps: f32,
        norm_eps: f32,
    ) -> Result<HyperConnection> {
        let m = (2 + n) * n;
        let scale = w.vector(&format!("{prefix}scale.weight"), 3)?;
        Ok(HyperConnection {
            fn_w: w.values(&format!("{prefix}fn.weight"), &[n * hidden, m])?,
            base: w.vector(&format!("{prefix}base.weight"), m)?,
            scale: [scale[0], scale[1], scale[2]],
            n,
            hidden,
            iters,
            eps,
            norm_eps,
        })
    }

    /// One token's streams `x` (`n hidden`): the collapsed block input into `u` (`hidden`),
    /// and the mixes for [`HyperConnection::expand`].
    pub fn collapse(&self, x: &[f32], u: &mut [f32]) -> Mixes {
        let n = self.n;
        let normed = unweighted_norm(x, self.norm_eps);
        let mut logits = vec![0.0; (2 + n) * n];
        matvec(&self.fn_w, &normed, &mut logits);
        let (pre_l, rest) = logits.split_at(n);
        let (post_l, comb_l) = rest.split_at(n);
        let (pre_b, rest) = self.base.split_at(n);
        let (post_b, comb_b) = rest.split_at(n);
        let pre: Vec<f32> = pre_l
            .iter()
            .zip(pre_b)
            .map(|(&l, &b)| sigmoid(l * self.scale[0] + b) + self.eps)
            .collect();
        let post = post_l
            .iter()
            .zip(post_b)
            .map(|(&l, &b)| 2.0 * sigmoid(l * self.scale[1] + b))
            .collect();
        let mut comb: Vec<f32> = comb_l
            .iter()
            .zip(comb_b)
            .map(|(&l, &b)| l * self.scale[2] + b)
            .collect();
        for row in comb.chunks_exact_mut(n) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|v| *v = (*v - max).exp());
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v = *v / sum + self.eps);
        }
        // Sinkhorn-Knopp: columns first, then (rows, columns) `iters - 1` more times.
        let cols = |c: &mut [f32]| {
            for k in 0..n {
                let s: f32 = (0..n).map(|j| c[j * n + k]).sum();
                (0..n).for_each(|j| c[j * n + k] /= s + self.eps);
            }
        };
        let rows = |c: &mut [f32]| {
            for row in c.chunks_exact_mut(n) {
                let s: f32 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= s + self.eps);
            }
        };
        cols(&mut comb);
        for _ in 1..self.iters {
            rows(&mut comb);
            cols(&mut comb);
        }
        collapse(&pre, x, u);
        Mixes { post, comb }
    }

    /// The streams after the block: `x_k ← post_k y + Σ_j comb_jk x_j` (`y`: the block's
    /// output for this token).
    pub fn expand(&self, mixes: &Mixes, y: &[f32], x: &mut [f32]) {
        let (n, h) = (self.n, self.hidden);
        let mut out = zeroed(n * h);
        for (k, ok) in out.chunks_exact_mut(h).enumerate() {
            let p = mixes.post[k];
            ok.iter_mut().zip(y).for_each(|(o, &v)| *o = p * v);
            for (j, xj) in x.chunks_exact(h).enumerate() {
                let c = mixes.comb[j * n + k];
                ok.iter_mut().zip(xj).for_each(|(o, &v)| *o += c * v);
            }
        }
        x.copy_from_slice(&out);
    }
}

impl HyperHead {
    /// `output_hc_fn.weight`, `output_hc_base.weight`, `output_hc_scale.weight`.
    pub fn load(
        w: &Weights,
        n: usize,
        hidden: usize,
        eps: f32,
        norm_eps: f32,
    ) -> Result<HyperHead> {
        Ok(HyperHead {
            fn_w: w.values("output_hc_fn.weight", &[n * hidden, n])?,
            base: w.vector("output_hc_base.weight", n)?,
            scale: w.vector("output_hc_scale.weight", 1)?[0],
            n,
            hidden,
            eps,
            norm_eps,
        })
    }

    /// Every token's streams (`tokens × n hidden`) collapsed into one row of `hidden` of `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let (n, h) = (self.n, self.hidden);
        let mut mix = vec![0.0; n];
        for (xt, ot) in x.chunks_exact(n * h).zip(out.chunks_exact_mut(h)) {
            matvec(&self.fn_w, &unweighted_norm(xt, self.norm_eps), &mut mix);
            let pre: Vec<f32> = mix
                .iter()
                .zip(&self.base)
                .map(|(&l, &b)| sigmoid(l * self.scale + b) + self.eps)
                .collect();
            collapse(&pre, xt, ot);
        }
    }
}

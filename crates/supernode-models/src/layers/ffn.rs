//! The dense gated feed-forward: `down(act(gate(x)) * up(x))`.

use supernode_kernels::ops::{glu_inplace, Activation};
use supernode_kernels::scratch::zeroed;

use super::Linear;
use crate::weights::Weights;
use crate::Result;

pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// SiLU for SwiGLU, GELU-tanh for GeGLU.
    pub act: Activation,
    /// DeepSeek-V4's clamp of the gate and up projections before the activation
    /// ([`super::moe::clamp_glu_inputs`]).
    pub limit: Option<f32>,
}

impl Mlp {
    /// Layer `layer`'s `ffn_{gate,up,down}{suffix}` (`suffix` "" for the dense feed-forward,
    /// "_shexp" for MoE shared experts), of intermediate size `ffn`.
    pub fn load(
        w: &Weights,
        layer: usize,
        suffix: &str,
        ffn: usize,
        hidden: usize,
        act: Activation,
    ) -> Result<Mlp> {
        let p = |n: &str| format!("blk.{layer}.ffn_{n}{suffix}");
        Ok(Mlp {
            gate: w.linear(&p("gate"), ffn, hidden)?,
            up: w.linear(&p("up"), ffn, hidden)?,
            down: w.linear(&p("down"), hidden, ffn)?,
            act,
            limit: None,
        })
    }

    /// Bytes of weights read per token.
    pub fn weight_bytes(&self) -> usize {
        [&self.gate, &self.up, &self.down]
            .iter()
            .map(|l| l.weight_bytes())
            .sum()
    }

    /// `x`: `n × hidden` → `out`: `n × hidden`.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let f = self.gate.rows();
        let mut g = zeroed(n * f);
        match self.limit {
            None => Linear::forward_glu(&self.gate, &self.up, x, n, self.act, &mut g),
            Some(limit) => {
                let mut u = zeroed(n * f);
                self.gate.forward(x, n, &mut g);
                self.up.forward(x, n, &mut u);
                super::moe::clamp_glu_inputs(&mut g, &mut u, limit);
                glu_inplace(&mut g, &u, self.act);
            }
        }
        self.down.forward(&g, n, out);
    }
}

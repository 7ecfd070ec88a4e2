//! Rotary position embedding settings: the scalings (linear, Llama 3, per-pair factors, YaRN)
//! and the frequencies they give.

use supernode_kernels::ops::RopeStyle;

/// How rope frequencies are stretched for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: wavelengths longer than `original_max_pos / low_freq_factor` are stretched
    /// by `factor`, those shorter than `original_max_pos / high_freq_factor` are kept, and
    /// those between are interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_pos: f64,
    },
    /// Each pair's frequency divided by its own factor: GGUF's `rope_freqs.weight`, which is
    /// how llama.cpp's converter stores Llama 3 scaling.
    Factors(Vec<f64>),
    /// YaRN (transformers' `_compute_yarn_parameters`, ggml's `rope_yarn`): pairs below the
    /// correction dim of `beta_fast` rotations over `original_max_pos` keep their frequency,
    /// those above that of `beta_slow` are divided by `factor`, a linear ramp in between; the
    /// cosines and sines are multiplied by `attn_factor`.
    Yarn {
        factor: f64,
        original_max_pos: f64,
        beta_fast: f64,
        beta_slow: f64,
        /// Multiplies cos and sin (transformers' `attention_factor`).
        attn_factor: f64,
        /// Round the correction range outwards to whole pairs (transformers' `truncate`,
        /// default true; ggml always does).
        truncate: bool,
    },
}

/// YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 for `factor <= 1`).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// Rotary position embedding settings of an attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotated dimensions per head (even; ≤ head_dim).
    pub dim: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The factor on every cosine and sine (YaRN's attention factor; 1 otherwise).
    pub fn attn_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn { attn_factor, .. } => attn_factor,
            _ => 1.0,
        }
    }

    /// Angular frequency of each of the `dim / 2` dimension pairs.
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.dim as f64;
        (0..self.dim / 2)
            .map(|i| {
                let f = self.theta.powf(-(2.0 * i as f64) / dim);
                match &self.scaling {
                    &RopeScaling::Yarn {
                        factor,
                        original_max_pos: orig,
                        beta_fast,
                        beta_slow,
                        truncate,
                        ..
                    } => {
                        // The pair index at which a wavelength fits `rot` times in `orig`.
                        let corr = |rot: f64| {
                            dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()
                                / (2.0 * self.theta.ln())
                        };
                        let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
                        if truncate {
                            (low, high) = (low.floor(), high.ceil());
                        }
                        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                        if low == high {
                            high += 0.001;
                        }
                        // 0: keep the frequency (extrapolate), 1: divide it (interpolate).
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * ramp + f * (1.0 - ramp)
                    }
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Factors(factors) => f / factors[i],
                    &RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_pos: orig,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < orig / high {
                            f
                        } else if wavelen > orig / low {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

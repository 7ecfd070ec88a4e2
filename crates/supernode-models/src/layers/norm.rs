//! RMSNorm (and LayerNorm, for DeepSeek-V3.2's indexer keys) over each row of a flat batch.

use supernode_kernels::ops::{layer_norm_inplace, rms_norm, rms_norm_inplace};

/// RMSNorm with weight `w` (scaled by `w + w_offset`: Gemma stores `w - 1`).
pub struct RmsNorm {
    pub w: Vec<f32>,
    pub eps: f32,
    pub w_offset: f32,
}

impl RmsNorm {
    /// Normalises every row of `x` (rows of `w.len()`) into `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let d = self.w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            rms_norm(xr, &self.w, self.eps, self.w_offset, or);
        }
    }

    /// Normalises every row of `x` (rows of `w.len()`) in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        for xr in x.chunks_exact_mut(self.w.len()) {
            rms_norm_inplace(xr, &self.w, self.eps, self.w_offset);
        }
    }
}

/// LayerNorm with weight and bias: `(x - mean) / sqrt(var + eps) * w + b`.
pub struct LayerNorm {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    /// Normalises every row of `x` (rows of `w.len()`) in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        for xr in x.chunks_exact_mut(self.w.len()) {
            layer_norm_inplace(xr, &self.w, &self.b, self.eps);
        }
    }
}

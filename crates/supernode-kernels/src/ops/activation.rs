//! The activations of the feed-forward: SiLU, GELU (the formula and llama.cpp's f16 table) and
//! the gated unit `act(gate) * up`.
//!
//! Invariant: every path of the gated unit gives, per value, the bits of [`Activation::apply`]
//! then a multiply (the vector kernels repeat the scalar steps lane by lane).

use crate::cpu::kernels;

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
pub(crate) static GELU_TABLE: std::sync::LazyLock<Box<[f32]>> = std::sync::LazyLock::new(|| {
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
        let k = kernels();
        let done = match (self, k.glu_gelu_table, k.glu_silu) {
            // SAFETY: the table is this machine's; the lengths are equal.
            (Activation::GeluF16Table, Some(glu), _) => unsafe { glu(gate, up, &GELU_TABLE) },
            // SAFETY: as above.
            (Activation::Silu, _, Some(glu)) => unsafe { glu(gate, up) },
            _ => 0,
        };
        for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
            *g = self.apply(*g) * u;
        }
    }
}

/// `x[i] = silu(x[i])`, bit for bit [`silu`], through the vectorised gated unit (times 1,
/// which is exact): [`silu`] alone, a scalar exp per value, is many times slower.
pub fn silu_inplace(x: &mut [f32]) {
    const ONES: [f32; 256] = [1.0; 256];
    for part in x.chunks_mut(ONES.len()) {
        let n = part.len();
        Activation::Silu.glu(part, &ONES[..n]);
    }
}

/// `gate[i] = act(gate[i]) * up[i]`: the gated linear unit of SwiGLU / GeGLU.
pub fn glu_inplace(gate: &mut [f32], up: &[f32], act: Activation) {
    act.glu(gate, up)
}

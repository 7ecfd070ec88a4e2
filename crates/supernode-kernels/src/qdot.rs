//! llama.cpp's numerics: activations quantised per token to the weight type's "vec_dot type", then
//! integer dot products, block by block.
//!
//! ## Which activations meet which weights
//!
//! | weights                      | activations | kernel here                 |
//! |------------------------------|-------------|-----------------------------|
//! | Q4_0, Q5_0, Q8_0             | Q8_0        | `vec_dot_<w>_q8_0`          |
//! | Q4_1, Q5_1                   | Q8_1        | `vec_dot_<w>_q8_1`          |
//! | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K | Q8_K        | `vec_dot_<w>_q8_k`          |
//! | F16 / BF16                   | f16 / bf16  | [`round_row_f16`] / [`round_row_bf16`], then the exact kernels |
//! | F32                          | f32         | the exact kernels           |
//!
//! Kernels per [`QuantLevel`], the best one the CPU has chosen once per process: the scalar
//! reference everywhere; AVX2 for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (1 to 4 tokens
//! against one decode of a weight row); AVX-512 VNNI for the same types (`avx512`: 32-element
//! types take rows in pairs, one 512-bit register per block pair, `vpdpbusd` for the integer
//! lanes, up to 8 rows per call; K-quants in 256-bit registers with `vpdpwssd`). Q2_K and Q3_K
//! run the scalar reference (written to auto-vectorise) at every level. With AVX-512 VNNI, the
//! model's matrices of the 32-element types are instead re-laid out at load time into 16-row
//! panels ([`packed`]), whose kernel keeps one lane per row and has its own reference order
//! (llama.cpp's scalar one). Every row kernel is a tile:
//! 1 to [`DOT_ROWS`] weight rows times 1 to [`DOT_TOKENS`] tokens per call, each result the same
//! bits whatever the tile's shape and whatever the level.
//!
//! ## Activation blocks
//!
//! | block        | elements | fields                                  | element `i`     |
//! |--------------|----------|-----------------------------------------|-----------------|
//! | [`BlockQ8_0`] | 32      | `d`, `qs[32]` (i8)                      | `d * qs[i]`     |
//! | [`BlockQ8_1`] | 32      | `d`, `s`, `qs[32]` (i8)                 | `d * qs[i]`     |
//! | [`BlockQ8K`]  | 256     | `d`, `qs[256]` (i8), `bsums[16]` (i16)  | `d * qs[i]`     |
//!
//! ggml stores Q8_0's and Q8_1's `d` and `s` as f16; here they are f32 holding exactly those
//! f16-rounded values (the same numbers, with no conversion left for the kernels). Q8_1's `s`
//! is `f16(d * Σ qs)` with the unrounded `d`; Q8_K's `d` is a plain f32 and `bsums[j]` is the sum
//! of `qs[16j .. 16j + 16]`.
//!
//! The quantisers are llama.cpp's reference ones (`quantize_row_q8_{0,1,K}_ref`), bit for bit:
//! - Q8_0 / Q8_1: `d = amax / 127`, `id = 1 / d` (from the unrounded `d`), `q = roundf(x * id)`
//!   (ties away from zero); `d` is then rounded to f16. (llama.cpp's own x86 build quantises with
//!   its AVX2 routine instead, `id = 127 / amax` and ties to even: a last-bit difference on rare
//!   elements.)
//! - Q8_K: `max` is the element of largest magnitude *with its sign* (the first one on ties),
//!   `iscale = -127 / max`, `q = min(127, nearest_int(iscale * x))` (ties to even), `d = 1 / iscale`:
//!   the largest element always becomes `-127` and `d` carries the opposite sign.
//!
//! ## Dot products, and why they are batch invariant
//!
//! Integer products within a block are summed exactly (no order matters), then scaled in f32 with
//! a fixed sequence of operations, the same in the scalar reference and the AVX2 and AVX-512
//! kernels, which are therefore bit-identical (one level is still chosen per process):
//! - 32-element blocks: the block's 32 products go to 8 integer lanes of 4 consecutive elements
//!   (lane `k`: elements `4k .. 4k + 4`, the shape of `maddubs` + `madd` and of `vpdpbusd`); then
//!   `acc[k] = acc[k] + (d_w * d_x) * lane[k]` (multiply, then add: no FMA), block after block;
//!   the lanes fold as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`. Q4_1 and Q5_1 then
//!   add `Σ m_w * s_x`, accumulated in block order.
//! - 256-element super-blocks: per super-block the scaled integer sum `sumi = Σ_g sc_g Σ q_w q_x`
//!   and, for types with mins, `summ = Σ_g m_g * bsums_g` are exact; then
//!   `acc = acc + (d_w * d_x) * sumi` and `acc = acc - (dmin_w * d_x) * summ`, super-block after
//!   super-block.
//!
//! A token's activations are quantised on their own, so its blocks are the same bytes whatever
//! the batch, and every output is one fixed function of (weight row, quantised token row).
//! Overflow: with `|q_x| <= 127` every integer sum fits easily in i32 (and the 16-bit pair sums
//! of `maddubs` never saturate).

use std::sync::OnceLock;

use crate::dtype::{DType, QK_K};
use crate::quant::scale_min_k4;
#[cfg(target_arch = "x86_64")]
use crate::simd::{has_avx512, simd_level, SimdLevel};

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod packed;

/// Elements per legacy block.
const QK: usize = 32;

/// 32 activations quantised to 8 bits with one scale (pairs with Q4_0, Q5_0, Q8_0 weights).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale, f16-rounded.
    pub d: f32,
    /// Quants, `-127..=127`.
    pub qs: [i8; QK],
}

/// 32 activations quantised to 8 bits with a scale and `d * Σ qs` (pairs with Q4_1, Q5_1).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale, f16-rounded.
    pub d: f32,
    /// `d * Σ qs` (with the unrounded `d`), f16-rounded.
    pub s: f32,
    /// Quants, `-127..=127`.
    pub qs: [i8; QK],
}

/// 256 activations quantised to 8 bits with one f32 scale and sums per 16 (pairs with k-quants).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale (negative when the block's largest-magnitude element is positive).
    pub d: f32,
    /// Quants, `-127..=127`.
    pub qs: [i8; QK_K],
    /// `bsums[j] = Σ qs[16j .. 16j + 16]`.
    pub bsums: [i16; QK_K / 16],
}

/// An activation block type: how many elements it holds and how a row is quantised into it.
pub(crate) trait ActBlock: Copy + Send + Sync + 'static {
    /// Elements per block.
    const ELEMS: usize;
    /// An all-zero block, to size buffers.
    const ZERO: Self;
    /// Quantise `x` (`ELEMS * y.len()` values) into `y`.
    fn quantize(x: &[f32], y: &mut [Self]);
}

impl ActBlock for BlockQ8_0 {
    const ELEMS: usize = QK;
    const ZERO: Self = BlockQ8_0 {
        d: 0.0,
        qs: [0; QK],
    };
    fn quantize(x: &[f32], y: &mut [Self]) {
        quantize_row_q8_0(x, y)
    }
}

impl ActBlock for BlockQ8_1 {
    const ELEMS: usize = QK;
    const ZERO: Self = BlockQ8_1 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
    fn quantize(x: &[f32], y: &mut [Self]) {
        quantize_row_q8_1(x, y)
    }
}

impl ActBlock for BlockQ8K {
    const ELEMS: usize = QK_K;
    const ZERO: Self = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    fn quantize(x: &[f32], y: &mut [Self]) {
        quantize_row_q8_k(x, y)
    }
}

/// `v` rounded half away from zero (C's `roundf`), exact for `|v| < 2^23`; fast without SSE4.1.
#[inline(always)]
fn round_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// ggml's `nearest_int`: round to nearest, ties to even, by the magic-number trick (`|v| <= 2^22`).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let val = v + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `v` through an f16 and back (round to nearest even).
#[inline(always)]
fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// `d = amax / 127` and `id = 1 / d` of a 32-element block.
#[inline(always)]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// Whether the AVX2 kernels and quantisers run on this machine (decided once per process).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn use_avx2() -> bool {
    simd_level() == SimdLevel::Avx2
}

/// llama.cpp's `quantize_row_q8_0_ref`, bit for bit: `x` holds `32 * y.len()` values.
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_0: lengths");
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2, FMA and F16C are present; lengths checked.
        return unsafe { x86::quantize_q8_0(x, y) };
    }
    quantize_q8_0_ref(x, y)
}

/// llama.cpp's `quantize_row_q8_1_ref`, bit for bit: `x` holds `32 * y.len()` values.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_1: lengths");
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2, FMA and F16C are present; lengths checked.
        return unsafe { x86::quantize_q8_1(x, y) };
    }
    quantize_q8_1_ref(x, y)
}

/// llama.cpp's `quantize_row_q8_K_ref`, bit for bit: `x` holds `256 * y.len()` values.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    assert_eq!(x.len(), QK_K * y.len(), "quantize_row_q8_k: lengths");
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2, FMA and F16C are present; lengths checked.
        return unsafe { x86::quantize_q8_k(x, y) };
    }
    quantize_q8_k_ref(x, y)
}

/// Activations for F16 weights: every value rounded to the nearest f16 (ties to even, as ggml's
/// `GGML_FP32_TO_FP16`) and kept widened to f32 (exact).
pub fn round_row_f16(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "round_row_f16: lengths");
    #[cfg(target_arch = "x86_64")]
    let done = if use_avx2() {
        // SAFETY: AVX2, FMA and F16C are present; lengths checked.
        unsafe { x86::round_f16(x, y) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (y, x) in y[done..].iter_mut().zip(&x[done..]) {
        *y = f16_round(*x);
    }
}

/// Activations for BF16 weights: every value rounded to the nearest bf16 (ties to even, as
/// ggml's `GGML_FP32_TO_BF16`; NaN stays NaN) and kept widened to f32 (exact).
pub fn round_row_bf16(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "round_row_bf16: lengths");
    for (y, x) in y.iter_mut().zip(x) {
        let bits = x.to_bits();
        let carry = 0x7fff + ((bits >> 16) & 1);
        let rounded = f32::from_bits(bits.wrapping_add(carry) & 0xffff_0000);
        *y = if x.is_nan() { *x } else { rounded };
    }
}

/// The portable `quantize_row_q8_0`.
fn quantize_q8_0_ref(x: &[f32], y: &mut [BlockQ8_0]) {
    for (x, y) in x.chunks_exact(QK).zip(y) {
        let (d, id) = q8_scale(x);
        y.d = f16_round(d);
        for (q, v) in y.qs.iter_mut().zip(x) {
            *q = round_away(v * id) as i8;
        }
    }
}

/// The portable `quantize_row_q8_1`.
fn quantize_q8_1_ref(x: &[f32], y: &mut [BlockQ8_1]) {
    for (x, y) in x.chunks_exact(QK).zip(y) {
        let (d, id) = q8_scale(x);
        y.d = f16_round(d);
        for (q, v) in y.qs.iter_mut().zip(x) {
            *q = round_away(v * id) as i8;
        }
        let sum: i32 = y.qs.iter().map(|&q| q as i32).sum();
        y.s = f16_round(sum as f32 * d);
    }
}

/// The portable `quantize_row_q8_k`.
fn quantize_q8_k_ref(x: &[f32], y: &mut [BlockQ8K]) {
    for (x, y) in x.chunks_exact(QK_K).zip(y) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *y = BlockQ8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, v) in y.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, qs) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
    }
}

/// The half float at byte `off` of `b`, widened (exact).
#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Fold 8 lanes: `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`.
#[inline(always)]
fn fold8(a: [f32; 8]) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// `acc[k] = acc[k] + d * lane[k]`, with lane `k` the exact sum of `w[i] * x[i]` over elements
/// `4k .. 4k + 4` of a 32-element block.
#[inline(always)]
fn add_block_lanes(acc: &mut [f32; 8], d: f32, w: &[i32; QK], x: &[i8; QK]) {
    for (k, a) in acc.iter_mut().enumerate() {
        let lane: i32 = (4 * k..4 * k + 4).map(|i| w[i] * x[i] as i32).sum();
        *a += d * lane as f32;
    }
}

/// Nibble `i` of a 16-byte block: low nibbles are elements 0..16, high nibbles 16..32.
#[inline(always)]
fn nibble(qs: &[u8], i: usize) -> i32 {
    if i < 16 {
        (qs[i] & 0xF) as i32
    } else {
        (qs[i - 16] >> 4) as i32
    }
}

/// The five-bit value of element `i` of a Q5 block (`qh` little-endian u32, 16 `qs` bytes).
#[inline(always)]
fn five_bit(qh: &[u8], qs: &[u8], i: usize) -> i32 {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    nibble(qs, i) | (((h >> i) & 1) << 4) as i32
}

/// A 32-element weight type against Q8_0 activations: `values` gives the block's integers.
#[inline(always)]
fn dot_q8_0_blocks(
    row: &[u8],
    y: &[BlockQ8_0],
    bytes: usize,
    values: impl Fn(&[u8]) -> [i32; QK],
) -> f32 {
    assert_eq!(row.len(), bytes * y.len(), "vec_dot: sizes");
    let mut acc = [0f32; 8];
    for (b, y) in row.chunks_exact(bytes).zip(y) {
        add_block_lanes(&mut acc, f16_at(b, 0) * y.d, &values(b), &y.qs);
    }
    fold8(acc)
}

/// A 32-element weight type with a min (`d` at byte 0, `m` at byte 2) against Q8_1 activations.
#[inline(always)]
fn dot_q8_1_blocks(
    row: &[u8],
    y: &[BlockQ8_1],
    bytes: usize,
    values: impl Fn(&[u8]) -> [i32; QK],
) -> f32 {
    assert_eq!(row.len(), bytes * y.len(), "vec_dot: sizes");
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (b, y) in row.chunks_exact(bytes).zip(y) {
        add_block_lanes(&mut acc, f16_at(b, 0) * y.d, &values(b), &y.qs);
        summs += f16_at(b, 2) * y.s;
    }
    fold8(acc) + summs
}

/// Scalar reference: a Q4_0 row times Q8_0 activations.
pub fn vec_dot_q4_0_q8_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    dot_q8_0_blocks(row, y, 18, |b| {
        std::array::from_fn(|i| nibble(&b[2..18], i) - 8)
    })
}

/// Scalar reference: a Q4_1 row times Q8_1 activations.
pub fn vec_dot_q4_1_q8_1(row: &[u8], y: &[BlockQ8_1]) -> f32 {
    dot_q8_1_blocks(row, y, 20, |b| {
        std::array::from_fn(|i| nibble(&b[4..20], i))
    })
}

/// Scalar reference: a Q5_0 row times Q8_0 activations.
pub fn vec_dot_q5_0_q8_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    dot_q8_0_blocks(row, y, 22, |b| {
        std::array::from_fn(|i| five_bit(&b[2..6], &b[6..22], i) - 16)
    })
}

/// Scalar reference: a Q5_1 row times Q8_1 activations.
pub fn vec_dot_q5_1_q8_1(row: &[u8], y: &[BlockQ8_1]) -> f32 {
    dot_q8_1_blocks(row, y, 24, |b| {
        std::array::from_fn(|i| five_bit(&b[4..8], &b[8..24], i))
    })
}

/// Scalar reference: a Q8_0 row times Q8_0 activations.
pub fn vec_dot_q8_0_q8_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    dot_q8_0_blocks(row, y, 34, |b| {
        std::array::from_fn(|i| b[2 + i] as i8 as i32)
    })
}

/// A k-quant super-block, decoded: its 256 integers, the scale and min of each 16-element group
/// (sub-blocks of 32 repeat theirs; types without mins have zero mins and `dmin`), `d`, `dmin`.
struct SuperBlock {
    q: [i8; QK_K],
    scales: [i32; 16],
    mins: [i32; 16],
    d: f32,
    dmin: f32,
}

/// A k-quant row against Q8_K activations, `decode` unpacking each super-block:
/// `acc = acc + (d * d_x) * sumi`, then `acc = acc - (dmin * d_x) * summ` (subtracting zero
/// changes no bit for types without mins).
#[inline(always)]
fn dot_q8_k_blocks(
    row: &[u8],
    y: &[BlockQ8K],
    bytes: usize,
    decode: impl Fn(&[u8]) -> SuperBlock,
) -> f32 {
    assert_eq!(row.len(), bytes * y.len(), "vec_dot: sizes");
    let mut acc = 0f32;
    for (b, y) in row.chunks_exact(bytes).zip(y) {
        let sb = decode(b);
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for (g, (q, x)) in sb.q.chunks_exact(16).zip(y.qs.chunks_exact(16)).enumerate() {
            let dot: i32 = q.iter().zip(x).map(|(&q, &x)| q as i32 * x as i32).sum();
            sumi += sb.scales[g] * dot;
            summ += sb.mins[g] * y.bsums[g] as i32;
        }
        acc += (sb.d * y.d) * sumi as f32;
        acc -= (sb.dmin * y.d) * summ as f32;
    }
    acc
}

/// The two low bits of a Q2_K/Q3_K super-block: element `128n + 32j + l` is bits `2j .. 2j + 2`
/// of `qs[32n + l]`.
#[inline(always)]
fn two_bits(qs: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for n in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                q[128 * n + 32 * j + l] = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
            }
        }
    }
    q
}

/// Scalar reference: a Q2_K row times Q8_K activations.
pub fn vec_dot_q2_k_q8_k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    dot_q8_k_blocks(row, y, 84, |b| SuperBlock {
        q: two_bits(&b[16..80]),
        scales: std::array::from_fn(|g| (b[g] & 0xF) as i32),
        mins: std::array::from_fn(|g| (b[g] >> 4) as i32),
        d: f16_at(b, 80),
        dmin: f16_at(b, 82),
    })
}

/// Scalar reference: a Q3_K row times Q8_K activations.
pub fn vec_dot_q3_k_q8_k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    dot_q8_k_blocks(row, y, 110, |b| {
        let (hmask, s) = (&b[0..32], &b[96..108]);
        let mut q = two_bits(&b[32..96]);
        for n in 0..2 {
            for j in 0..4 {
                for l in 0..32 {
                    // A clear high bit means "minus 4".
                    let high = ((hmask[l] >> (4 * n + j)) & 1) as i8;
                    q[128 * n + 32 * j + l] -= 4 - 4 * high;
                }
            }
        }
        SuperBlock {
            q,
            scales: std::array::from_fn(|j| {
                let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
                let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
                (low | high << 4) as i32 - 32
            }),
            mins: [0; 16],
            d: f16_at(b, 108),
            dmin: 0.0,
        }
    })
}

/// A Q4_K/Q5_K super-block from its integers: scales and mins of sub-block `g / 2` per group.
fn k4_super_block(b: &[u8], q: [i8; QK_K]) -> SuperBlock {
    let sm: [(u8, u8); 8] = std::array::from_fn(|j| scale_min_k4(j, &b[4..16]));
    SuperBlock {
        q,
        scales: std::array::from_fn(|g| sm[g / 2].0 as i32),
        mins: std::array::from_fn(|g| sm[g / 2].1 as i32),
        d: f16_at(b, 0),
        dmin: f16_at(b, 2),
    }
}

/// The nibbles of a Q4_K/Q5_K `qs[128]`: elements `64c .. 64c + 32` are the low nibbles of
/// `qs[32c .. 32c + 32]`, elements `64c + 32 .. 64c + 64` their high nibbles.
#[inline(always)]
fn k4_nibbles(qs: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            q[64 * c + l] = (qs[32 * c + l] & 0xF) as i8;
            q[64 * c + 32 + l] = (qs[32 * c + l] >> 4) as i8;
        }
    }
    q
}

/// Scalar reference: a Q4_K row times Q8_K activations.
pub fn vec_dot_q4_k_q8_k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    dot_q8_k_blocks(row, y, 144, |b| k4_super_block(b, k4_nibbles(&b[16..144])))
}

/// Scalar reference: a Q5_K row times Q8_K activations.
pub fn vec_dot_q5_k_q8_k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    dot_q8_k_blocks(row, y, 176, |b| {
        let qh = &b[16..48];
        let mut q = k4_nibbles(&b[48..176]);
        for c in 0..4 {
            for l in 0..32 {
                q[64 * c + l] |= (((qh[l] >> (2 * c)) & 1) << 4) as i8;
                q[64 * c + 32 + l] |= (((qh[l] >> (2 * c + 1)) & 1) << 4) as i8;
            }
        }
        k4_super_block(b, q)
    })
}

/// Scalar reference: a Q6_K row times Q8_K activations.
pub fn vec_dot_q6_k_q8_k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    dot_q8_k_blocks(row, y, 210, |b| {
        let (ql, qh) = (&b[0..128], &b[128..192]);
        let mut q = [0i8; QK_K];
        for n in 0..2 {
            let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
            for l in 0..32 {
                let e = 128 * n + l;
                q[e] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                q[e + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                q[e + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                q[e + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        SuperBlock {
            q,
            scales: std::array::from_fn(|g| b[192 + g] as i8 as i32),
            mins: [0; 16],
            d: f16_at(b, 208),
            dmin: 0.0,
        }
    })
}

/// Most tokens one [`TileDot`] call takes.
pub(crate) const DOT_TOKENS: usize = 4;

/// Most weight rows one [`TileDot`] call takes.
pub(crate) const DOT_ROWS: usize = 8;

/// A tile kernel: `out[r * ys.len() + t] = vec_dot(rows[r], ys[t])` for 1 to [`DOT_ROWS`] rows
/// and 1 to [`DOT_TOKENS`] tokens, each result bit-identical whichever tile computed it (SIMD
/// kernels decode each row once for all the tokens, and share each token's loads between rows).
pub(crate) type TileDot<A> = fn(rows: &[&[u8]], ys: &[&[A]], out: &mut [f32]);

/// A quantised weight type's tile kernel, tagged with its activation block type.
#[derive(Clone, Copy)]
pub(crate) enum QuantKernel {
    Q8_0(TileDot<BlockQ8_0>),
    Q8_1(TileDot<BlockQ8_1>),
    Q8K(TileDot<BlockQ8K>),
}

/// The instruction sets the quantised kernels can use, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum QuantLevel {
    /// The portable reference.
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512 F, BW, VL and VNNI, on top of AVX2.
    Avx512Vnni,
}

/// The best [`QuantLevel`] of this machine, detected once per process.
pub(crate) fn quant_level() -> QuantLevel {
    static LEVEL: OnceLock<QuantLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect_quant_level)
}

#[cfg(target_arch = "x86_64")]
fn detect_quant_level() -> QuantLevel {
    if simd_level() != SimdLevel::Avx2 {
        QuantLevel::Scalar
    } else if has_avx512() && is_x86_feature_detected!("avx512vnni") {
        QuantLevel::Avx512Vnni
    } else {
        QuantLevel::Avx2
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_quant_level() -> QuantLevel {
    QuantLevel::Scalar
}

/// A tile kernel calling a one-token scalar reference per (row, token).
macro_rules! scalar_tile {
    ($f:path) => {
        |rows, ys, out| {
            assert_eq!(out.len(), rows.len() * ys.len(), "vec_dot: outputs");
            for (row, out) in rows.iter().zip(out.chunks_exact_mut(ys.len())) {
                for (o, y) in out.iter_mut().zip(ys) {
                    *o = $f(row, y);
                }
            }
        }
    };
}

/// The scalar reference kernel of a block-quantised `dtype`, `None` for plain floats.
pub(crate) fn scalar_kernel(dtype: DType) -> Option<QuantKernel> {
    Some(match dtype {
        DType::F32 | DType::F16 | DType::BF16 => return None,
        DType::Q4_0 => QuantKernel::Q8_0(scalar_tile!(vec_dot_q4_0_q8_0)),
        DType::Q5_0 => QuantKernel::Q8_0(scalar_tile!(vec_dot_q5_0_q8_0)),
        DType::Q8_0 => QuantKernel::Q8_0(scalar_tile!(vec_dot_q8_0_q8_0)),
        DType::Q4_1 => QuantKernel::Q8_1(scalar_tile!(vec_dot_q4_1_q8_1)),
        DType::Q5_1 => QuantKernel::Q8_1(scalar_tile!(vec_dot_q5_1_q8_1)),
        DType::Q2K => QuantKernel::Q8K(scalar_tile!(vec_dot_q2_k_q8_k)),
        DType::Q3K => QuantKernel::Q8K(scalar_tile!(vec_dot_q3_k_q8_k)),
        DType::Q4K => QuantKernel::Q8K(scalar_tile!(vec_dot_q4_k_q8_k)),
        DType::Q5K => QuantKernel::Q8K(scalar_tile!(vec_dot_q5_k_q8_k)),
        DType::Q6K => QuantKernel::Q8K(scalar_tile!(vec_dot_q6_k_q8_k)),
    })
}

/// The tile kernel of a block-quantised `dtype` on this machine (the best level with one: the
/// same bits at every level), `None` for plain floats.
pub(crate) fn quant_kernel(dtype: DType) -> Option<QuantKernel> {
    quant_kernel_at(dtype, quant_level())
}

/// As [`quant_kernel`], using instructions up to `level` only. Panics if `level` is above this
/// machine's: that is what makes handing out the SIMD kernels sound.
pub(crate) fn quant_kernel_at(dtype: DType, level: QuantLevel) -> Option<QuantKernel> {
    assert!(
        level <= quant_level(),
        "{level:?} is not available on this CPU"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if level >= QuantLevel::Avx512Vnni {
            if let Some(k) = avx512::kernel(dtype) {
                return Some(k);
            }
        }
        if level >= QuantLevel::Avx2 {
            if let Some(k) = x86::kernel(dtype) {
                return Some(k);
            }
        }
    }
    scalar_kernel(dtype)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 kernels, generic over the number of tokens `N` (1..=4) dotted against one decode of
    //! the weight row. Every `unsafe fn` needs AVX2, FMA and F16C and rows and activations of
    //! matching sizes; the safe entries handed out by [`kernel`] check the sizes and are only
    //! reachable after `simd_level` confirmed the features.

    use std::arch::x86_64::*;

    use super::{ActBlock, BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel};
    use crate::dtype::DType;
    use crate::quant::scale_min_k4;
    use crate::simd::x86::q6_k_unpack;

    // Scales are loaded in assembly, through a general register into a vector register they
    // overwrite whole. Left to the compiler, a lone f16 load becomes `vpinsrw` into whatever
    // register is free (often an accumulator): the conversion then waits for that register's last
    // writer and chains every block behind the previous one (measured 2-3x slower).

    /// The f16 at `p`, widened (exact).
    ///
    /// # Safety
    /// `p` must point at 2 readable bytes; F16C.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let v: __m128;
        std::arch::asm!(
            "movzx {t:e}, word ptr [{p}]",
            "vmovd {v}, {t:e}",
            "vcvtph2ps {v}, {v}",
            p = in(reg) p,
            t = out(reg) _,
            v = out(xmm_reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
        _mm_cvtss_f32(v)
    }

    /// The f16 values at `p` and `p + 2`, widened (exact).
    ///
    /// # Safety
    /// `p` must point at 4 readable bytes; F16C.
    #[inline(always)]
    unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
        let v: __m128;
        std::arch::asm!(
            "vmovd {v}, dword ptr [{p}]",
            "vcvtph2ps {v}, {v}",
            p = in(reg) p,
            v = out(xmm_reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// The scalar reference's `fold8`, in registers.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn fold8(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }

    /// Sum of 8 i32 lanes (exact).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        hsum_i32x4(_mm_add_epi32(
            _mm256_castsi256_si128(v),
            _mm256_extracti128_si256::<1>(v),
        ))
    }

    /// Sum of 4 i32 lanes (exact).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hsum_i32x4(s: __m128i) -> i32 {
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
        _mm_cvtsi128_si32(s)
    }

    /// 16 nibble bytes at `p` as 32 bytes in element order (low nibbles, then high nibbles).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p.cast());
        let bytes = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
        _mm256_and_si256(bytes, _mm256_set1_epi8(0xF))
    }

    /// The 32 bits at `p` spread to 32 bytes: byte `i` is 0xFF if bit `i` is set, else 0.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn bits_to_bytes(p: *const u8) -> __m256i {
        let x = p.cast::<i32>().read_unaligned();
        let shuffle = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuffle);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// The 8 lanes of 4 consecutive products of 32 unsigned weight bytes `w` and signed `x`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn lanes_u8(w: __m256i, x: __m256i) -> __m256 {
        let p = _mm256_maddubs_epi16(w, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    /// `acc + (dw * dx) * lanes` (multiply, multiply, add, as the scalar reference), with `dw`
    /// splat once per block and `dx` broadcast straight from memory.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn add_scaled(acc: __m256, dw: __m256, dx: &f32, lanes: __m256) -> __m256 {
        let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(dx));
        _mm256_add_ps(acc, _mm256_mul_ps(d, lanes))
    }

    /// A signed 32-element weight type against Q8_0: `values(block)` gives the 32 signed bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_q8_0<const N: usize>(
        row: &[u8],
        ys: [&[BlockQ8_0]; N],
        bytes: usize,
        values: impl Fn(*const u8) -> __m256i,
    ) -> [f32; N] {
        let mut acc = [_mm256_setzero_ps(); N];
        for (i, b) in row.chunks_exact(bytes).enumerate() {
            let w = values(b.as_ptr());
            let aw = _mm256_sign_epi8(w, w);
            let dw = _mm256_set1_ps(f16_at(b.as_ptr()));
            for t in 0..N {
                let y = ys[t].get_unchecked(i);
                let x = _mm256_sign_epi8(_mm256_loadu_si256(y.qs.as_ptr().cast()), w);
                acc[t] = add_scaled(acc[t], dw, &y.d, lanes_u8(aw, x));
            }
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = fold8(acc[t]);
        }
        out
    }

    /// An unsigned 32-element weight type with a min (byte 2) against Q8_1.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_q8_1<const N: usize>(
        row: &[u8],
        ys: [&[BlockQ8_1]; N],
        bytes: usize,
        values: impl Fn(*const u8) -> __m256i,
    ) -> [f32; N] {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut summs = [0f32; N];
        for (i, b) in row.chunks_exact(bytes).enumerate() {
            let w = values(b.as_ptr());
            let (dw, mw) = f16_pair(b.as_ptr());
            let dw = _mm256_set1_ps(dw);
            for t in 0..N {
                let y = ys[t].get_unchecked(i);
                let x = _mm256_loadu_si256(y.qs.as_ptr().cast());
                acc[t] = add_scaled(acc[t], dw, &y.d, lanes_u8(w, x));
                summs[t] += mw * y.s;
            }
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = fold8(acc[t]) + summs[t];
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0<const N: usize>(row: &[u8], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
        dot_q8_0(row, ys, 18, |b| {
            _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8))
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0<const N: usize>(row: &[u8], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
        dot_q8_0(row, ys, 22, |b| {
            // Clear fifth bit: `q | 0xF0` is `q - 16` as i8; set: `q` is `(q + 16) - 16`.
            let high = _mm256_andnot_si256(bits_to_bytes(b.add(2)), _mm256_set1_epi8(-16));
            _mm256_or_si256(nibbles(b.add(6)), high)
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0<const N: usize>(row: &[u8], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
        dot_q8_0(row, ys, 34, |b| _mm256_loadu_si256(b.add(2).cast()))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1<const N: usize>(row: &[u8], ys: [&[BlockQ8_1]; N]) -> [f32; N] {
        dot_q8_1(row, ys, 20, |b| nibbles(b.add(4)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_1<const N: usize>(row: &[u8], ys: [&[BlockQ8_1]; N]) -> [f32; N] {
        dot_q8_1(row, ys, 24, |b| {
            let high = _mm256_and_si256(bits_to_bytes(b.add(4)), _mm256_set1_epi8(0x10));
            _mm256_or_si256(nibbles(b.add(8)), high)
        })
    }

    /// `round_away` on 8 lanes: truncate, then step away from zero where the dropped fraction
    /// is at least one half (exact for `|v| < 2^23`).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn round_away8(v: __m256) -> __m256i {
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let frac = _mm256_sub_ps(v, t);
        let one = _mm256_set1_ps(1.0);
        let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5)), one);
        let down = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, _mm256_set1_ps(-0.5)), one);
        _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(t, up), down))
    }

    /// Four vectors of 8 i32 (elements in order) packed to 32 i8 (values in `-128..=127`).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn pack_i8(q: [__m256i; 4]) -> __m256i {
        let a = _mm256_packs_epi32(q[0], q[1]);
        let b = _mm256_packs_epi32(q[2], q[3]);
        // The packs work per 128-bit half: dwords come out as 0 4 1 5 2 6 3 7.
        let bytes = _mm256_packs_epi16(a, b);
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// `v` rounded to f16 (nearest even, as `half`) and widened back.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn f16_round(v: f32) -> f32 {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
        _mm_cvtss_f32(_mm_cvtph_ps(h))
    }

    /// `round_row_f16` on the first `8 * (n / 8)` values; returns how many it did.
    ///
    /// # Safety
    /// AVX2, F16C; `y.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn round_f16(x: &[f32], y: &mut [f32]) -> usize {
        let main = x.len() / 8 * 8;
        for i in (0..main).step_by(8) {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        main
    }

    /// Largest `|x|` of 8 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hmax(v: __m256) -> f32 {
        let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
    }

    /// One 32-element block: its quants (as 4 x 8 i32) and the unrounded `d`, as
    /// `quantize_q8_0_ref` computes them.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn q8_block(x: *const f32) -> ([__m256i; 4], f32) {
        let abs = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.add(8 * k)));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, v| {
            _mm256_max_ps(m, _mm256_andnot_ps(abs, *v))
        });
        let d = hmax(m) / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        (v.map(|v| round_away8(_mm256_mul_ps(v, id))), d)
    }

    /// # Safety
    /// AVX2, FMA, F16C; `x.len() == 32 * y.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
        for (i, y) in y.iter_mut().enumerate() {
            let (q, d) = q8_block(x.as_ptr().add(32 * i));
            y.d = f16_round(d);
            _mm256_storeu_si256(y.qs.as_mut_ptr().cast(), pack_i8(q));
        }
    }

    /// # Safety
    /// AVX2, FMA, F16C; `x.len() == 32 * y.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
        for (i, y) in y.iter_mut().enumerate() {
            let (q, d) = q8_block(x.as_ptr().add(32 * i));
            y.d = f16_round(d);
            _mm256_storeu_si256(y.qs.as_mut_ptr().cast(), pack_i8(q));
            let sum = hsum_i32(_mm256_add_epi32(
                _mm256_add_epi32(q[0], q[1]),
                _mm256_add_epi32(q[2], q[3]),
            ));
            y.s = f16_round(sum as f32 * d);
        }
    }

    /// # Safety
    /// AVX2, FMA, F16C; `x.len() == 256 * y.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
        let abs = _mm256_set1_ps(-0.0);
        for (i, y) in y.iter_mut().enumerate() {
            let x = x.as_ptr().add(256 * i);
            let mut m = _mm256_setzero_ps();
            for k in 0..32 {
                m = _mm256_max_ps(m, _mm256_andnot_ps(abs, _mm256_loadu_ps(x.add(8 * k))));
            }
            let amax = hmax(m);
            if amax == 0.0 {
                *y = BlockQ8K::ZERO;
                continue;
            }
            // The first element of largest magnitude, with its sign.
            let splat = _mm256_set1_ps(amax);
            let mut max = amax;
            for k in 0..32 {
                let a = _mm256_andnot_ps(abs, _mm256_loadu_ps(x.add(8 * k)));
                let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, splat));
                if hits != 0 {
                    max = *x.add(8 * k + hits.trailing_zeros() as usize);
                    break;
                }
            }
            let iscale = -127.0 / max;
            let scale = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            for c in 0..8 {
                // Ties to even: the default rounding of `cvtps`, as `nearest_int`.
                let q: [__m256i; 4] = std::array::from_fn(|k| {
                    let v = _mm256_mul_ps(scale, _mm256_loadu_ps(x.add(32 * c + 8 * k)));
                    _mm256_min_epi32(_mm256_cvtps_epi32(v), top)
                });
                _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * c).cast(), pack_i8(q));
                y.bsums[2 * c] = hsum_i32(_mm256_add_epi32(q[0], q[1])) as i16;
                y.bsums[2 * c + 1] = hsum_i32(_mm256_add_epi32(q[2], q[3])) as i16;
            }
            y.d = 1.0 / iscale;
        }
    }

    /// `acc = acc + (d_w * d_x) * sumi`, then `acc = acc - (dmin_w * d_x) * summ`.
    #[inline(always)]
    fn add_super_block(acc: &mut f32, dw: f32, dminw: f32, dx: f32, sumi: i32, summ: i32) {
        *acc += (dw * dx) * sumi as f32;
        *acc -= (dminw * dx) * summ as f32;
    }

    /// Q4_K (`FIVE = false`) or Q5_K (`FIVE = true`, fifth bits from `qh` at byte 16) rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_k4<const N: usize, const FIVE: bool>(
        row: &[u8],
        ys: [&[BlockQ8K]; N],
    ) -> [f32; N] {
        let (bytes, qs) = if FIVE { (176, 48) } else { (144, 16) };
        let m4 = _mm256_set1_epi8(0xF);
        let bit5 = _mm256_set1_epi8(0x10);
        let mut acc = [0f32; N];
        for (i, b) in row.chunks_exact(bytes).enumerate() {
            let p = b.as_ptr();
            let (dw, dminw) = f16_pair(p);
            let mut scales = [0i16; 8];
            let mut mins = [0i16; 8];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &b[4..16]);
                (scales[j], mins[j]) = (s as i16, m as i16);
            }
            let qh = if FIVE {
                _mm256_loadu_si256(p.add(16).cast())
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let q = _mm256_loadu_si256(p.add(qs + 32 * c).cast());
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                if FIVE {
                    // Bit 2c of qh[l] tops element 64c + l, bit 2c + 1 element 64c + 32 + l.
                    let high = |bit: i32| {
                        let m = _mm256_set1_epi8(1 << bit);
                        _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m), bit5)
                    };
                    lo = _mm256_or_si256(lo, high(2 * c as i32));
                    hi = _mm256_or_si256(hi, high(2 * c as i32 + 1));
                }
                let (s_lo, s_hi) = (
                    _mm256_set1_epi16(scales[2 * c]),
                    _mm256_set1_epi16(scales[2 * c + 1]),
                );
                for t in 0..N {
                    let x = ys[t].get_unchecked(i).qs.as_ptr().add(64 * c);
                    let p_lo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x.cast()));
                    let p_hi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(32).cast()));
                    let s = _mm256_add_epi32(
                        _mm256_madd_epi16(p_lo, s_lo),
                        _mm256_madd_epi16(p_hi, s_hi),
                    );
                    sumi[t] = _mm256_add_epi32(sumi[t], s);
                }
            }
            // Mins times the sums of each sub-block's two 16-element halves.
            let mins = _mm_loadu_si128(mins.as_ptr().cast());
            for t in 0..N {
                let y = ys[t].get_unchecked(i);
                let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
                let pairs = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bs),
                    _mm256_extracti128_si256::<1>(bs),
                );
                let summ = hsum_i32x4(_mm_madd_epi16(pairs, mins));
                add_super_block(&mut acc[t], dw, dminw, y.d, hsum_i32(sumi[t]), summ);
            }
        }
        acc
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k<const N: usize>(row: &[u8], ys: [&[BlockQ8K]; N]) -> [f32; N] {
        dot_k4::<N, false>(row, ys)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_k<const N: usize>(row: &[u8], ys: [&[BlockQ8K]; N]) -> [f32; N] {
        dot_k4::<N, true>(row, ys)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k<const N: usize>(row: &[u8], ys: [&[BlockQ8K]; N]) -> [f32; N] {
        let mut acc = [0f32; N];
        for (i, b) in row.chunks_exact(210).enumerate() {
            let p = b.as_ptr();
            let dw = f16_at(p.add(208));
            let scales = _mm_loadu_si128(p.add(192).cast());
            // sumi = Σ sc (q - 32) x = Σ sc q x - 32 Σ sc bsums: start from the second term.
            let sc16 = _mm256_cvtepi8_epi16(scales);
            let mut sumi = [_mm256_setzero_si256(); N];
            for t in 0..N {
                let bs = _mm256_loadu_si256(ys[t].get_unchecked(i).bsums.as_ptr().cast());
                sumi[t] =
                    _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, sc16)));
            }
            for n in 0..2 {
                let q = q6_k_unpack(p, n);
                for (k, q) in q.into_iter().enumerate() {
                    // Scales of the two 16-element halves of these 32 elements, as 16 x i16.
                    let g = (8 * n + 2 * k) as i64;
                    let pick =
                        _mm_set_epi64x((g + 1) * 0x0101_0101_0101_0101, g * 0x0101_0101_0101_0101);
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                    for t in 0..N {
                        let x = ys[t].get_unchecked(i).qs.as_ptr().add(128 * n + 32 * k);
                        let prod = _mm256_maddubs_epi16(q, _mm256_loadu_si256(x.cast()));
                        sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(prod, sc));
                    }
                }
            }
            for t in 0..N {
                let dx = ys[t].get_unchecked(i).d;
                add_super_block(&mut acc[t], dw, 0.0, dx, hsum_i32(sumi[t]), 0);
            }
        }
        acc
    }

    /// Safe entry for one kernel: checks sizes, then runs the `N`-token version for `ys.len()`
    /// on each row in turn.
    macro_rules! entry {
        ($kernel:ident, $block:ty, $bytes:expr) => {
            |rows: &[&[u8]], ys: &[&[$block]], out: &mut [f32]| {
                assert!(
                    (1..=super::DOT_ROWS).contains(&rows.len()),
                    "vec_dot: {} rows (1 to {} per call)",
                    rows.len(),
                    super::DOT_ROWS
                );
                assert_eq!(rows.len() * ys.len(), out.len(), "vec_dot: outputs");
                for (row, out) in rows.iter().zip(out.chunks_exact_mut(ys.len().max(1))) {
                    let blocks = row.len() / $bytes;
                    assert_eq!(row.len(), blocks * $bytes, "vec_dot: row bytes");
                    assert!(
                        ys.iter().all(|y| y.len() == blocks),
                        "vec_dot: activation blocks"
                    );
                    // SAFETY: `kernel` is only handed out once `quant_level` found AVX2, FMA
                    // and F16C; every activation row has one block per weight block (checked).
                    unsafe {
                        match ys.len() {
                            1 => out.copy_from_slice(&$kernel::<1>(row, [ys[0]])),
                            2 => out.copy_from_slice(&$kernel::<2>(row, [ys[0], ys[1]])),
                            3 => out.copy_from_slice(&$kernel::<3>(row, [ys[0], ys[1], ys[2]])),
                            4 => out
                                .copy_from_slice(&$kernel::<4>(row, [ys[0], ys[1], ys[2], ys[3]])),
                            n => panic!("vec_dot: {n} tokens (1 to 4 per call)"),
                        }
                    }
                }
            }
        };
    }

    /// The AVX2 kernel for `dtype`, if there is one. Reachable only through
    /// `super::quant_kernel_at`, which hands it out only when `quant_level` found AVX2, FMA and
    /// F16C.
    pub(super) fn kernel(dtype: DType) -> Option<QuantKernel> {
        Some(match dtype {
            DType::Q4_0 => QuantKernel::Q8_0(entry!(q4_0, BlockQ8_0, 18)),
            DType::Q5_0 => QuantKernel::Q8_0(entry!(q5_0, BlockQ8_0, 22)),
            DType::Q8_0 => QuantKernel::Q8_0(entry!(q8_0, BlockQ8_0, 34)),
            DType::Q4_1 => QuantKernel::Q8_1(entry!(q4_1, BlockQ8_1, 20)),
            DType::Q5_1 => QuantKernel::Q8_1(entry!(q5_1, BlockQ8_1, 24)),
            DType::Q4K => QuantKernel::Q8K(entry!(q4_k, BlockQ8K, 144)),
            DType::Q5K => QuantKernel::Q8K(entry!(q5_k, BlockQ8K, 176)),
            DType::Q6K => QuantKernel::Q8K(entry!(q6_k, BlockQ8K, 210)),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::ALL_DTYPES;
    use crate::quant::tests::{edge_rows, Rng};
    use crate::quant::{dequantize_row, quantize_row};

    /// Quantise with the reference and with this machine's path; they must agree exactly.
    macro_rules! quantizer {
        ($name:ident, $block:ty, $reference:ident, $public:ident) => {
            fn $name(x: &[f32]) -> Vec<$block> {
                let mut y = vec![<$block>::ZERO; x.len() / <$block>::ELEMS];
                $reference(x, &mut y);
                let mut fast = vec![<$block>::ZERO; y.len()];
                $public(x, &mut fast);
                assert_eq!(fast, y, "{}", stringify!($public));
                y
            }
        };
    }

    quantizer!(q8_0, BlockQ8_0, quantize_q8_0_ref, quantize_row_q8_0);
    quantizer!(q8_1, BlockQ8_1, quantize_q8_1_ref, quantize_row_q8_1);
    quantizer!(q8_k, BlockQ8K, quantize_q8_k_ref, quantize_row_q8_k);

    #[test]
    fn every_quantiser_path_gives_the_reference_bytes() {
        // Random blocks, blocks of halves and quarters (ties at every scale), spikes, zeros.
        let mut rng = Rng::new(23);
        let mut x = rng.vec(8 * QK_K);
        for (i, v) in x[QK_K..2 * QK_K].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 0.5;
        }
        for (i, v) in x[2 * QK_K..3 * QK_K].iter_mut().enumerate() {
            *v = ((i * 37 % 255) as f32 - 127.0) * 0.25;
        }
        x[3 * QK_K..4 * QK_K].fill(0.0);
        x[4 * QK_K + 77] = 1e4;
        x[5 * QK_K + 3] = -1e-3;
        for v in &mut x[6 * QK_K..7 * QK_K] {
            *v *= 1e-30;
        }
        q8_0(&x);
        q8_1(&x);
        q8_k(&x);
    }

    /// A block whose largest magnitude is 127 (so `d = 1`, `id = 1`), with halves to round.
    fn ties_block() -> [f32; QK] {
        let mut x = [0f32; QK];
        x[..8].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -126.5, 3.25]);
        x
    }

    #[test]
    fn q8_0_rounds_half_away_from_zero() {
        let y = q8_0(&ties_block());
        assert_eq!(y[0].d, 1.0);
        assert_eq!(y[0].qs[..8], [127, 3, -3, 1, -1, 2, -127, 3]);
        assert!(y[0].qs[8..].iter().all(|&q| q == 0));
    }

    #[test]
    fn q8_0_scale_is_f16_rounded_but_quants_use_the_exact_scale() {
        // amax = 1: d = 1/127 is not an f16; the stored d is its f16 rounding, while the quants
        // come from id = 1 / (1/127 in f32).
        let mut x = [0f32; QK];
        x[0] = 1.0;
        x[1] = -0.5;
        let y = q8_0(&x);
        let d = 1.0f32 / 127.0;
        assert_eq!(y[0].d, half::f16::from_f32(d).to_f32());
        assert_ne!(y[0].d, d);
        assert_eq!(y[0].qs[0], 127);
        assert_eq!(y[0].qs[1], round_away(-0.5 * (1.0 / d)) as i8);
    }

    #[test]
    fn q8_1_sum_uses_the_unrounded_scale() {
        let y = q8_1(&ties_block());
        assert_eq!((y[0].d, y[0].s), (1.0, 5.0)); // 127 + 3 - 3 + 1 - 1 + 2 - 127 + 3
        assert_eq!(y[0].qs[..8], [127, 3, -3, 1, -1, 2, -127, 3]);
        let mut x = [0f32; QK];
        x[..3].copy_from_slice(&[1.0, 0.75, 0.5]);
        let y = q8_1(&x);
        let d = 1.0f32 / 127.0;
        let sum: i32 = y[0].qs.iter().map(|&q| q as i32).sum();
        assert_eq!(y[0].s, half::f16::from_f32(sum as f32 * d).to_f32());
        assert_eq!(y[0].d, half::f16::from_f32(d).to_f32());
    }

    #[test]
    fn q8_k_rounds_ties_to_even_and_keeps_the_sign_of_the_max() {
        // max = -127: iscale = 1, d = 1.
        let mut x = [0f32; QK_K];
        x[..6].copy_from_slice(&[2.5, 3.5, -2.5, 0.5, 1.5, -127.0]);
        x[16] = -1.5;
        let y = q8_k(&x);
        assert_eq!(y[0].d, 1.0);
        assert_eq!(y[0].qs[..6], [2, 4, -2, 0, 2, -127]);
        assert_eq!(y[0].qs[16], -2);
        assert_eq!(y[0].bsums[..2], [2 + 4 - 2 + 2 - 127, -2]);
        assert!(y[0].bsums[2..].iter().all(|&s| s == 0));
        // The same block negated: max = 127, iscale = -1, so d flips and the quants stay.
        let neg: Vec<f32> = x.iter().map(|v| -v).collect();
        let z = q8_k(&neg);
        assert_eq!(z[0].d, -1.0);
        assert_eq!(z[0].qs, y[0].qs);
        assert_eq!(z[0].bsums, y[0].bsums);
    }

    #[test]
    fn q8_k_takes_the_first_of_equal_magnitudes() {
        let mut x = [0.25f32; QK_K];
        (x[3], x[10]) = (-5.0, 5.0);
        let y = q8_k(&x);
        assert_eq!((y[0].qs[3], y[0].qs[10]), (-127, 127));
        assert!(y[0].d > 0.0);
        (x[3], x[10]) = (5.0, -5.0);
        let y = q8_k(&x);
        assert_eq!((y[0].qs[3], y[0].qs[10]), (-127, 127));
        assert!(y[0].d < 0.0);
    }

    #[test]
    fn zero_blocks_quantise_to_zero() {
        assert_eq!(q8_0(&[0.0; QK])[0], BlockQ8_0::ZERO);
        assert_eq!(q8_1(&[0.0; QK])[0], BlockQ8_1::ZERO);
        assert_eq!(q8_k(&[0.0; QK_K])[0], BlockQ8K::ZERO);
    }

    #[test]
    fn f16_and_bf16_activations_round_as_half_does() {
        let mut rng = Rng::new(24);
        let mut x: Vec<f32> = (0..1001).map(|_| rng.normal() * 100.0).collect();
        // Exact ties of both formats, both parities, and extremes.
        x.extend([
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -(1.0 + 2f32.powi(-11)),
            65520.0,
            1e-8,
            -0.0,
            f32::MAX,
            f32::INFINITY,
        ]);
        let mut y = vec![0f32; x.len()];
        round_row_f16(&x, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(
                b.to_bits(),
                half::f16::from_f32(*a).to_f32().to_bits(),
                "f16 {a}"
            );
        }
        round_row_bf16(&x, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(
                b.to_bits(),
                half::bf16::from_f32(*a).to_f32().to_bits(),
                "bf16 {a}"
            );
        }
        let nans = [f32::NAN, -f32::NAN, f32::from_bits(0xffff_ffff)];
        round_row_bf16(&nans, &mut y[..3]);
        assert!(y[..3].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn fast_rounding_matches_the_library() {
        let mut rng = Rng::new(3);
        let specials = [
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            126.5,
            -126.5,
            0.49999997,
            -0.49999997,
        ];
        let values = (0..20_000).map(|_| rng.uniform() * 130.0).chain(specials);
        for v in values {
            assert_eq!(round_away(v), v.round() as i32, "{v}");
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    /// One token's activations: quantised for `kernel`'s block type, as the f64 values they
    /// stand for, and the correction that Q8_1's f16-rounded `s` adds per block:
    /// `Σ_b m_b (s_b - d_b Σ qs_b)` with `m_b` the weight block's min.
    enum Acts {
        Q8_0(Vec<BlockQ8_0>),
        Q8_1(Vec<BlockQ8_1>),
        Q8K(Vec<BlockQ8K>),
    }

    impl Acts {
        fn new(kernel: QuantKernel, x: &[f32]) -> Acts {
            match kernel {
                QuantKernel::Q8_0(_) => Acts::Q8_0(q8_0(x)),
                QuantKernel::Q8_1(_) => Acts::Q8_1(q8_1(x)),
                QuantKernel::Q8K(_) => Acts::Q8K(q8_k(x)),
            }
        }

        fn values(&self) -> Vec<f64> {
            fn deq(d: f32, qs: &[i8]) -> impl Iterator<Item = f64> + '_ {
                qs.iter().map(move |&q| d as f64 * q as f64)
            }
            match self {
                Acts::Q8_0(y) => y.iter().flat_map(|b| deq(b.d, &b.qs)).collect(),
                Acts::Q8_1(y) => y.iter().flat_map(|b| deq(b.d, &b.qs)).collect(),
                Acts::Q8K(y) => y.iter().flat_map(|b| deq(b.d, &b.qs)).collect(),
            }
        }

        /// What the stored `s` adds beyond `d Σ qs`, times the min of each weight block.
        fn s_correction(&self, dtype: DType, row: &[u8]) -> f64 {
            let Acts::Q8_1(y) = self else { return 0.0 };
            row.chunks_exact(dtype.block_bytes())
                .zip(y)
                .map(|(b, y)| {
                    let sum: i32 = y.qs.iter().map(|&q| q as i32).sum();
                    f16_at(b, 2) as f64 * (y.s as f64 - y.d as f64 * sum as f64)
                })
                .sum()
        }
    }

    /// `kernel` on `row` and several tokens' activations of the same block type.
    fn run(kernel: QuantKernel, row: &[u8], acts: &[&Acts]) -> Vec<f32> {
        run_tile(kernel, &[row], acts)
    }

    /// `kernel` on several rows and tokens: `out[r * acts.len() + t]`.
    fn run_tile(kernel: QuantKernel, rows: &[&[u8]], acts: &[&Acts]) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows.len() * acts.len()];
        macro_rules! go {
            ($dot:expr, $variant:ident) => {{
                let ys: Vec<_> = acts
                    .iter()
                    .map(|a| match a {
                        Acts::$variant(y) => &y[..],
                        _ => unreachable!("one block type per kernel"),
                    })
                    .collect();
                $dot(rows, &ys, &mut out)
            }};
        }
        match kernel {
            QuantKernel::Q8_0(dot) => go!(dot, Q8_0),
            QuantKernel::Q8_1(dot) => go!(dot, Q8_1),
            QuantKernel::Q8K(dot) => go!(dot, Q8K),
        }
        out
    }

    fn block_dtypes() -> impl Iterator<Item = DType> {
        ALL_DTYPES.into_iter().filter(|d| d.block_size() > 1)
    }

    fn random_row(dtype: DType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut row = vec![0u8; dtype.row_bytes(n).expect("whole blocks")];
        quantize_row(dtype, &rng.vec(n), &mut row);
        row
    }

    #[test]
    fn scalar_dots_equal_f64_over_dequantised_operands() {
        let mut rng = Rng::new(21);
        for dtype in block_dtypes() {
            let kernel = scalar_kernel(dtype).expect("block type");
            for n in [256, 1024, 2816] {
                let row = random_row(dtype, n, &mut rng);
                let mut w = vec![0f32; n];
                dequantize_row(dtype, &row, &mut w);
                // Activations with outliers and a range of block scales.
                let x: Vec<f32> = (0..n)
                    .map(|i| {
                        rng.normal() * (1 + i % 7) as f32 * if i % 97 == 0 { 20.0 } else { 1.0 }
                    })
                    .collect();
                let acts = Acts::new(kernel, &x);
                let xv = acts.values();
                let exact: f64 = w.iter().zip(&xv).map(|(a, b)| *a as f64 * b).sum::<f64>()
                    + acts.s_correction(dtype, &row);
                let scale: f64 = w.iter().zip(&xv).map(|(a, b)| (*a as f64 * b).abs()).sum();
                let got = run(kernel, &row, &[&acts])[0] as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * scale,
                    "{} n={n}: {got} vs {exact} (scale {scale})",
                    dtype.name()
                );
            }
        }
    }

    /// Activations to check kernels on: normal data, data with outliers, and blocks at the
    /// quantisers' extremes (every quant ±127).
    fn test_acts(kernel: QuantKernel, n: usize, rng: &mut Rng) -> Vec<Acts> {
        let spiky: Vec<f32> = (0..n)
            .map(|i| rng.normal() * if i % 37 == 0 { 50.0 } else { 1.0 })
            .collect();
        let extreme: Vec<f32> = (0..n)
            .map(|i| if (i * 7) % 3 == 0 { -3.0 } else { 3.0 })
            .collect();
        vec![
            Acts::new(kernel, &rng.vec(n)),
            Acts::new(kernel, &spiky),
            Acts::new(kernel, &extreme),
            Acts::new(kernel, &rng.vec(n)),
            Acts::new(kernel, &rng.vec(n)),
        ]
    }

    /// Every level this machine has.
    fn levels() -> Vec<QuantLevel> {
        [QuantLevel::Scalar, QuantLevel::Avx2, QuantLevel::Avx512Vnni]
            .into_iter()
            .filter(|&l| l <= quant_level())
            .collect()
    }

    #[test]
    fn every_level_equals_scalar_bit_for_bit_for_every_tile_shape() {
        let mut rng = Rng::new(22);
        for dtype in block_dtypes() {
            let slow = scalar_kernel(dtype).expect("block type");
            for n in [256, 512, 2816] {
                let rows = edge_rows(dtype, n, &mut rng);
                let acts = test_acts(slow, n, &mut rng);
                let want: Vec<Vec<u32>> = rows
                    .iter()
                    .map(|row| {
                        acts.iter()
                            .map(|a| run(slow, row, &[a])[0].to_bits())
                            .collect()
                    })
                    .collect();
                for level in levels() {
                    let fast = quant_kernel_at(dtype, level).expect("block type");
                    for n_rows in 1..=DOT_ROWS {
                        for r0 in 0..=rows.len() - n_rows {
                            let tile_rows: Vec<&[u8]> =
                                rows[r0..r0 + n_rows].iter().map(|r| &r[..]).collect();
                            for group in 1..=DOT_TOKENS {
                                for t0 in 0..=acts.len() - group {
                                    let refs: Vec<&Acts> = acts[t0..t0 + group].iter().collect();
                                    let got = run_tile(fast, &tile_rows, &refs);
                                    for (k, v) in got.iter().enumerate() {
                                        let (r, t) = (r0 + k / group, t0 + k % group);
                                        assert_eq!(
                                            v.to_bits(),
                                            want[r][t],
                                            "{} {level:?} n={n} rows {r0}+{n_rows} tokens \
                                             {t0}+{group}: row {r} token {t}",
                                            dtype.name()
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_machine_level_is_the_best_one_detected() {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni");
            let want = if simd_level() == SimdLevel::Scalar {
                QuantLevel::Scalar
            } else if avx512 {
                QuantLevel::Avx512Vnni
            } else {
                QuantLevel::Avx2
            };
            assert_eq!(quant_level(), want);
        }
    }

    #[test]
    fn simd_covers_the_real_models_formats() {
        #[cfg(target_arch = "x86_64")]
        for dtype in [
            DType::Q4_1,
            DType::Q8_0,
            DType::Q4K,
            DType::Q6K,
            DType::Q5_0,
        ] {
            if quant_level() >= QuantLevel::Avx2 {
                assert!(x86::kernel(dtype).is_some(), "{}", dtype.name());
            }
            if quant_level() >= QuantLevel::Avx512Vnni {
                assert!(avx512::kernel(dtype).is_some(), "{}", dtype.name());
            }
        }
    }

    #[test]
    #[should_panic(expected = "activation blocks")]
    fn mismatched_activations_are_rejected() {
        let Some(QuantKernel::Q8_0(dot)) = quant_kernel(DType::Q8_0) else {
            unreachable!("Q8_0 pairs with Q8_0")
        };
        let row = [0u8; 2 * 34];
        let y = [BlockQ8_0::ZERO; 1];
        dot(&[&row], &[&y[..]], &mut [0.0]);
    }
}

//! llama.cpp's scalar reference of the quantised numerics: the activation quantisers
//! (`quantize_row_q8_{0,1,K}_ref`) and one integer dot product per weight type
//! (`vec_dot_<w>_q8_<x>`), bit for bit. A leaf: the [`crate::cpu::Isa::Scalar`] table runs these,
//! and every SIMD kernel is tested against them.
//!
//! Invariants (see [`crate::qdot`] for the full statement): integer products within a block are
//! summed exactly; 32-element blocks go to 8 lanes of 4 consecutive products, scaled as
//! `acc[k] = acc[k] + (d_w * d_x) * lane[k]` block after block and folded by [`fold8`];
//! super-blocks add `(d_w * d_x) * sumi` then subtract `(dmin_w * d_x) * summ`.

use super::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel, QK};
use crate::dtype::{DType, QK_K};
use crate::quant::scale_min_k4;

/// `v` rounded half away from zero (C's `roundf`), exact for `|v| < 2^23`; fast without SSE4.1.
#[inline(always)]
pub(crate) fn round_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// ggml's `nearest_int`: round to nearest, ties to even, by the magic-number trick (`|v| <= 2^22`).
#[inline(always)]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let val = v + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `v` through an f16 and back (round to nearest even).
#[inline(always)]
pub(crate) fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// `d = amax / 127` and `id = 1 / d` of a 32-element block.
#[inline(always)]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// The portable `quantize_row_q8_0`.
pub(crate) fn quantize_q8_0_ref(x: &[f32], y: &mut [BlockQ8_0]) {
    for (x, y) in x.chunks_exact(QK).zip(y) {
        let (d, id) = q8_scale(x);
        y.d = f16_round(d);
        for (q, v) in y.qs.iter_mut().zip(x) {
            *q = round_away(v * id) as i8;
        }
    }
}

/// The portable `quantize_row_q8_1`.
pub(crate) fn quantize_q8_1_ref(x: &[f32], y: &mut [BlockQ8_1]) {
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
pub(crate) fn quantize_q8_k_ref(x: &[f32], y: &mut [BlockQ8K]) {
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
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Fold 8 lanes: `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`.
#[inline(always)]
pub(crate) fn fold8(a: [f32; 8]) -> f32 {
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
pub(crate) fn nibble(qs: &[u8], i: usize) -> i32 {
    if i < 16 {
        (qs[i] & 0xF) as i32
    } else {
        (qs[i - 16] >> 4) as i32
    }
}

/// The five-bit value of element `i` of a Q5 block (`qh` little-endian u32, 16 `qs` bytes).
#[inline(always)]
pub(crate) fn five_bit(qh: &[u8], qs: &[u8], i: usize) -> i32 {
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

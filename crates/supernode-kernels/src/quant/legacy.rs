//! The 32-element block formats ("legacy" quants): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Byte layouts (`d`, `m` are f16; `qh` is one little-endian u32):
//!
//! | type | bytes | layout                 | element `i` of the block            |
//! |------|-------|------------------------|-------------------------------------|
//! | Q4_0 | 18    | `d, qs[16]`            | `(q_i - 8) * d`                     |
//! | Q4_1 | 20    | `d, m, qs[16]`         | `q_i * d + m`                       |
//! | Q5_0 | 22    | `d, qh[4], qs[16]`     | `((q_i | h_i << 4) - 16) * d`       |
//! | Q5_1 | 24    | `d, m, qh[4], qs[16]`  | `(q_i | h_i << 4) * d + m`          |
//! | Q8_0 | 34    | `d, qs[32] (i8)`       | `qs[i] * d`                         |
//!
//! For the nibble formats, elements 0..16 are the low nibbles of `qs[0..16]` and elements 16..32
//! their high nibbles; `h_i` is bit `i` of `qh`. Float operations are done in exactly this order
//! (int to f32, times `d`, plus `m`), which the fused SIMD kernels reproduce.

use super::{f16_at, put_f16};

const QK: usize = 32;

pub(super) fn dequantize_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..QK / 2 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

pub(super) fn dequantize_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..QK / 2 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The five-bit values of a Q5 block from its `qh` word and 16 `qs` bytes.
#[inline(always)]
fn q5_values(qh: u32, qs: &[u8]) -> [i32; QK] {
    let mut q = [0i32; QK];
    for j in 0..QK / 2 {
        q[j] = ((qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4) as i32;
        q[j + QK / 2] = ((qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32;
    }
    q
}

pub(super) fn dequantize_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (y, q) in y.iter_mut().zip(q5_values(qh, &b[6..22])) {
        *y = (q - 16) as f32 * d;
    }
}

pub(super) fn dequantize_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (y, q) in y.iter_mut().zip(q5_values(qh, &b[8..24])) {
        *y = q as f32 * d + m;
    }
}

pub(super) fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, q) in y.iter_mut().zip(&b[2..34]) {
        *y = *q as i8 as f32 * d;
    }
}

/// The element of largest magnitude (the first one on ties), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Pack two 16-element halves of four-bit values: low nibbles first half, high nibbles second.
fn pack_nibbles(q: &[u8; QK], qs: &mut [u8]) {
    for j in 0..QK / 2 {
        qs[j] = (q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4);
    }
}

/// The fifth bits of `q`, bit `i` for element `i`.
fn high_bits(q: &[u8; QK]) -> u32 {
    q.iter()
        .enumerate()
        .fold(0u32, |h, (i, &v)| h | (((v >> 4) & 1) as u32) << i)
}

pub(super) fn quantize_q4_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    let q: [u8; QK] = std::array::from_fn(|i| ((x[i] * id + 8.5) as i8).clamp(0, 15) as u8);
    pack_nibbles(&q, &mut b[2..18]);
}

pub(super) fn quantize_q4_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let q: [u8; QK] = std::array::from_fn(|i| (((x[i] - min) * id + 0.5) as u8).min(15));
    pack_nibbles(&q, &mut b[4..20]);
}

pub(super) fn quantize_q5_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    let q: [u8; QK] = std::array::from_fn(|i| ((x[i] * id + 16.5) as i8).clamp(0, 31) as u8);
    b[2..6].copy_from_slice(&high_bits(&q).to_le_bytes());
    pack_nibbles(&q, &mut b[6..22]);
}

pub(super) fn quantize_q5_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let q: [u8; QK] = std::array::from_fn(|i| (((x[i] - min) * id + 0.5) as u8).min(31));
    b[4..8].copy_from_slice(&high_bits(&q).to_le_bytes());
    pack_nibbles(&q, &mut b[8..24]);
}

pub(super) fn quantize_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    for (q, v) in b[2..34].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

#[cfg(test)]
mod tests {
    use crate::dtype::DType;
    use crate::quant::dequantize_row;

    const HALF: [u8; 2] = [0x00, 0x38]; // f16 0.5
    const ONE: [u8; 2] = [0x00, 0x3C]; // f16 1.0
    const MINUS_TWO: [u8; 2] = [0x00, 0xC0]; // f16 -2.0

    fn dequant(dtype: DType, block: &[u8]) -> Vec<f32> {
        let mut y = vec![0f32; 32];
        dequantize_row(dtype, block, &mut y);
        y
    }

    /// `qs[j] = (j) | (15 - j) << 4`: element `j` holds `j`, element `16 + j` holds `15 - j`.
    fn ramp_nibbles() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    fn nibble(i: usize) -> f32 {
        if i < 16 {
            i as f32
        } else {
            (31 - i) as f32
        }
    }

    #[test]
    fn q4_0_low_nibbles_first_then_high() {
        let block = [&HALF[..], &ramp_nibbles()].concat();
        let y = dequant(DType::Q4_0, &block);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (nibble(i) - 8.0) * 0.5, "element {i}");
        }
    }

    #[test]
    fn q4_1_adds_the_min() {
        let block = [&HALF[..], &MINUS_TWO, &ramp_nibbles()].concat();
        let y = dequant(DType::Q4_1, &block);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, nibble(i) * 0.5 - 2.0, "element {i}");
        }
    }

    /// qh with bit `i` set for elements 1, 3, 16 and 31.
    const QH: u32 = (1 << 1) | (1 << 3) | (1 << 16) | (1 << 31);

    fn high(i: usize) -> f32 {
        if QH >> i & 1 == 1 {
            16.0
        } else {
            0.0
        }
    }

    #[test]
    fn q5_0_high_bit_i_belongs_to_element_i() {
        let block = [&ONE[..], &QH.to_le_bytes(), &ramp_nibbles()].concat();
        let y = dequant(DType::Q5_0, &block);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, nibble(i) + high(i) - 16.0, "element {i}");
        }
    }

    #[test]
    fn q5_1_high_bits_and_min() {
        let block = [&HALF[..], &MINUS_TWO, &QH.to_le_bytes(), &ramp_nibbles()].concat();
        let y = dequant(DType::Q5_1, &block);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (nibble(i) + high(i)) * 0.5 - 2.0, "element {i}");
        }
    }

    #[test]
    fn q8_0_signed_bytes_in_order() {
        let qs: Vec<u8> = (0..32).map(|i| (i as i8 - 16) as u8).collect();
        let block = [&HALF[..], &qs].concat();
        let y = dequant(DType::Q8_0, &block);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5, "element {i}");
        }
    }
}

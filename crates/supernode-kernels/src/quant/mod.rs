//! GGUF (ggml) weight formats: scalar reference dequantisers and quantisers for every [`DType`].
//!
//! Layouts are ggml's, bit for bit: a row of `n` elements is `n / block_size` consecutive blocks,
//! little-endian, with block scales stored as IEEE half floats. The element order inside each block
//! (which nibble, bit or scale belongs to which element) follows ggml's `dequantize_row_*`; each
//! family's module documents its layouts and the tests pin them with hand-built blocks.
//!
//! - `float`: F32, F16, BF16 (one element per "block");
//! - `legacy`: the 32-element formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0;
//! - `kquants`: the 256-element super-block formats Q2_K .. Q6_K.
//!
//! The dequantisers here are the numeric definition of each format: the fused SIMD kernels in
//! [`crate::simd`] reproduce their values exactly (same operations, same rounding), which is what
//! keeps [`matmul`](crate::matmul::matmul) bit-identical whichever path it takes. The quantisers
//! follow llama.cpp's reference quantisers (`quantize_row_*_ref`); they exist for tests and tools,
//! not for loading.

mod float;
mod kquants;
pub(crate) use kquants::q3_k_scales;
mod legacy;

use crate::dtype::DType;

/// Dequantise `dst.len()` elements (a whole number of blocks) from `src` (exactly
/// `dtype.row_bytes(dst.len())` bytes).
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        dtype.row_bytes(dst.len()),
        Some(src.len()),
        "dequantize_row: {} bytes for {} elements of {}",
        src.len(),
        dst.len(),
        dtype.name()
    );
    let blocks = src
        .chunks_exact(dtype.block_bytes())
        .zip(dst.chunks_exact_mut(dtype.block_size()));
    match dtype {
        DType::F32 => float::dequantize_f32(src, dst),
        DType::F16 => float::dequantize_f16(src, dst),
        DType::BF16 => float::dequantize_bf16(src, dst),
        DType::Q4_0 => blocks.for_each(|(b, y)| legacy::dequantize_q4_0(b, y)),
        DType::Q4_1 => blocks.for_each(|(b, y)| legacy::dequantize_q4_1(b, y)),
        DType::Q5_0 => blocks.for_each(|(b, y)| legacy::dequantize_q5_0(b, y)),
        DType::Q5_1 => blocks.for_each(|(b, y)| legacy::dequantize_q5_1(b, y)),
        DType::Q8_0 => blocks.for_each(|(b, y)| legacy::dequantize_q8_0(b, y)),
        DType::Q2K => blocks.for_each(|(b, y)| kquants::dequantize_q2_k(b, y)),
        DType::Q3K => blocks.for_each(|(b, y)| kquants::dequantize_q3_k(b, y)),
        DType::Q4K => blocks.for_each(|(b, y)| kquants::dequantize_q4_k(b, y)),
        DType::Q5K => blocks.for_each(|(b, y)| kquants::dequantize_q5_k(b, y)),
        DType::Q6K => blocks.for_each(|(b, y)| kquants::dequantize_q6_k(b, y)),
    }
}

/// Reference quantiser: encode `src` (a whole number of blocks) into `dst`
/// (`dtype.row_bytes(src.len())` bytes). Follows llama.cpp's `quantize_row_*_ref`.
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) {
    assert_eq!(
        dtype.row_bytes(src.len()),
        Some(dst.len()),
        "quantize_row: {} bytes for {} elements of {}",
        dst.len(),
        src.len(),
        dtype.name()
    );
    let blocks = src
        .chunks_exact(dtype.block_size())
        .zip(dst.chunks_exact_mut(dtype.block_bytes()));
    match dtype {
        DType::F32 => float::quantize_f32(src, dst),
        DType::F16 => float::quantize_f16(src, dst),
        DType::BF16 => float::quantize_bf16(src, dst),
        DType::Q4_0 => blocks.for_each(|(x, b)| legacy::quantize_q4_0(x, b)),
        DType::Q4_1 => blocks.for_each(|(x, b)| legacy::quantize_q4_1(x, b)),
        DType::Q5_0 => blocks.for_each(|(x, b)| legacy::quantize_q5_0(x, b)),
        DType::Q5_1 => blocks.for_each(|(x, b)| legacy::quantize_q5_1(x, b)),
        DType::Q8_0 => blocks.for_each(|(x, b)| legacy::quantize_q8_0(x, b)),
        DType::Q2K => blocks.for_each(|(x, b)| kquants::quantize_q2_k(x, b)),
        DType::Q3K => blocks.for_each(|(x, b)| kquants::quantize_q3_k(x, b)),
        DType::Q4K => blocks.for_each(|(x, b)| kquants::quantize_q4_k(x, b)),
        DType::Q5K => blocks.for_each(|(x, b)| kquants::quantize_q5_k(x, b)),
        DType::Q6K => blocks.for_each(|(x, b)| kquants::quantize_q6_k(x, b)),
    }
}

/// The half float at byte `off` of `b`, widened to f32 (exact).
#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Store `v` as a half float (round to nearest even) at byte `off` of `b`.
#[inline]
fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// `v` rounded to the nearest integer, ties to even (ggml's `nearest_int`).
#[inline]
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K/Q5_K block: six bits
/// each; sub-blocks 0..4 use the low six bits of bytes `j` (scale) and `j + 4` (min), sub-blocks
/// 4..8 take their low four bits from byte `j + 4` and their top two from the spare bits of
/// bytes `j - 4` and `j` (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dtype::ALL_DTYPES;

    /// A tiny deterministic xorshift generator: no rand crate in the kernels' tests.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform in [-1, 1).
        pub(crate) fn uniform(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        /// Roughly normal (sum of four uniforms), unit-ish variance.
        pub(crate) fn normal(&mut self) -> f32 {
            (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * 0.866
        }

        pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.normal()).collect()
        }
    }

    /// Byte offsets of the f16 scales in a block of `dtype`.
    fn f16_fields(dtype: DType) -> &'static [usize] {
        match dtype {
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
            DType::Q2K => &[80, 82],
            DType::Q3K => &[108],
            DType::Q6K => &[208],
            _ => unreachable!("block types only"),
        }
    }

    /// A row of `n` elements whose every quant and integer scale byte is `fill(rng)`: random
    /// bytes reach every bit pattern (-128 scales, all-ones nibbles and high bits), constant ones
    /// the extremes; the f16 scales are finite, of both signs.
    fn raw_row(dtype: DType, n: usize, rng: &mut Rng, fill: impl Fn(&mut Rng) -> u8) -> Vec<u8> {
        let mut row: Vec<u8> = (0..dtype.row_bytes(n).expect("whole blocks"))
            .map(|_| fill(rng))
            .collect();
        for b in row.chunks_exact_mut(dtype.block_bytes()) {
            for &off in f16_fields(dtype) {
                let v = half::f16::from_f32(rng.normal() * 0.01).to_bits();
                b[off..off + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        row
    }

    /// Rows of a block type to check kernels on: quantised normal data, random bytes, and rows of
    /// 0xFF, 0x80, 0x7F and 0x0F bytes (max nibbles and high bits, -128 and 127 quants and
    /// scales).
    pub(crate) fn edge_rows(dtype: DType, n: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
        let quantised = |rng: &mut Rng| {
            let mut row = vec![0u8; dtype.row_bytes(n).expect("whole blocks")];
            quantize_row(dtype, &rng.vec(n), &mut row);
            row
        };
        let mut rows = vec![quantised(rng), quantised(rng)];
        for _ in 0..3 {
            rows.push(raw_row(dtype, n, rng, |r| {
                (r.uniform() * 128.0 + 128.0) as u8
            }));
        }
        for byte in [0xFF, 0x80, 0x7F, 0x0F] {
            rows.push(raw_row(dtype, n, rng, |_| byte));
        }
        rows
    }

    /// Rows whose quants are all zero or all at the zero offset (0x00 and 0x88 bytes), with f16
    /// scales alternately -0.0 and negative: products that are signed zeros, which a kernel
    /// rounding differently from the scalar dequantiser could turn into +0.0.
    pub(crate) fn zero_rows(dtype: DType, n: usize) -> Vec<Vec<u8>> {
        [0x00, 0x88]
            .map(|byte| {
                let mut row = vec![byte; dtype.row_bytes(n).expect("whole blocks")];
                for (i, b) in row.chunks_exact_mut(dtype.block_bytes()).enumerate() {
                    for (j, &off) in f16_fields(dtype).iter().enumerate() {
                        let v = [-0.0, -0.01][(i + j) % 2];
                        b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    }
                }
                row
            })
            .into()
    }

    /// Quantise then dequantise `x`; the RMS error relative to the RMS of `x`.
    fn round_trip_error(dtype: DType, x: &[f32]) -> f64 {
        let mut q = vec![0u8; dtype.row_bytes(x.len()).expect("whole blocks")];
        quantize_row(dtype, x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row(dtype, &q, &mut y);
        let err: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let sig: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        (err / sig).sqrt()
    }

    #[test]
    fn round_trip_error_is_bounded_per_bit_width() {
        // Bounds are 1.5x what these quantisers reach on this data (normal, 2048 values);
        // llama.cpp's reference quantisers land at the same levels.
        let bound = |d: DType| match d {
            DType::F32 => 0.0,
            DType::F16 => 3.2e-4,
            DType::BF16 => 2.5e-3,
            DType::Q8_0 => 0.008,
            DType::Q6K => 0.026,
            DType::Q5K => 0.054,
            DType::Q5_1 => 0.056,
            DType::Q5_0 => 0.063,
            DType::Q4K => 0.105,
            DType::Q4_1 => 0.115,
            DType::Q4_0 => 0.125,
            DType::Q3K => 0.23,
            DType::Q2K => 0.43,
        };
        let mut rng = Rng::new(7);
        let x = rng.vec(8 * QK);
        for d in ALL_DTYPES {
            let e = round_trip_error(d, &x);
            assert!(e <= bound(d), "{}: relative rms error {e}", d.name());
        }
    }

    const QK: usize = crate::dtype::QK_K;

    #[test]
    fn all_zero_rows_stay_zero() {
        let x = vec![0f32; 2 * QK];
        for d in ALL_DTYPES {
            let mut q = vec![0u8; d.row_bytes(x.len()).expect("whole blocks")];
            quantize_row(d, &x, &mut q);
            let mut y = vec![1f32; x.len()];
            dequantize_row(d, &q, &mut y);
            assert!(y.iter().all(|v| *v == 0.0), "{}", d.name());
        }
    }

    #[test]
    fn constant_and_outlier_rows_round_trip_closely() {
        let mut x = vec![0.25f32; QK];
        x[17] = -3.0;
        x[200] = 2.0;
        for d in ALL_DTYPES {
            let e = round_trip_error(d, &x);
            assert!(e < 0.35, "{}: relative rms error {e}", d.name());
        }
    }

    #[test]
    #[should_panic(expected = "dequantize_row")]
    fn wrong_sizes_are_rejected() {
        dequantize_row(DType::Q4_0, &[0u8; 17], &mut [0f32; 32]);
    }

    #[test]
    fn scale_min_k4_unpacks_six_bit_pairs() {
        // Scales 0..8 = 1, 10, 20, 33, 40, 50, 60, 63; mins = 2, 11, 21, 34, 41, 51, 61, 62.
        let sc = [1u8, 10, 20, 33, 40, 50, 60, 63];
        let mn = [2u8, 11, 21, 34, 41, 51, 61, 62];
        let mut q = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                q[j] = sc[j];
                q[j + 4] = mn[j];
            } else {
                q[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4);
                q[j - 4] |= (sc[j] >> 4) << 6;
                q[j] |= (mn[j] >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], mn[j]), "sub-block {j}");
        }
    }
}

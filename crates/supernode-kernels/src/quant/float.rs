//! Plain float rows: F32, F16 (IEEE half) and BF16 (bfloat16), little-endian, one element per
//! "block". Widening to f32 is exact; narrowing rounds to nearest even (as ggml does).

use half::{bf16, f16};

pub(super) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub(super) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

pub(super) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

pub(super) fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
        b.copy_from_slice(&x.to_le_bytes());
    }
}

pub(super) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
    }
}

pub(super) fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use crate::dtype::DType;
    use crate::quant::dequantize_row;

    #[test]
    fn float_layouts_are_little_endian() {
        let mut y = [0f32; 2];
        dequantize_row(DType::F32, &[0, 0, 0x80, 0x3F, 0, 0, 0x20, 0xC1], &mut y);
        assert_eq!(y, [1.0, -10.0]);
        // f16: 0x3C00 = 1.0, 0xC500 = -5.0.
        dequantize_row(DType::F16, &[0x00, 0x3C, 0x00, 0xC5], &mut y);
        assert_eq!(y, [1.0, -5.0]);
        // bf16: 0x3F80 = 1.0, 0xC0A0 = -5.0.
        dequantize_row(DType::BF16, &[0x80, 0x3F, 0xA0, 0xC0], &mut y);
        assert_eq!(y, [1.0, -5.0]);
    }
}

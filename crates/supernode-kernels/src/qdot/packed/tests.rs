//! Tests of [`crate::qdot::packed`]: packed products against the packed reference order (and, for
//! the K-quants, the scalar `vec_dot`), several matrices and the fused GLU against each alone.

use super::layout::Format;
use super::*;
use crate::matmul::matmul_packed;
use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QK};
use crate::qdot::reference::{f16_at, five_bit, nibble};
use crate::qdot::{quantize_row_q8_0, quantize_row_q8_1, quantize_row_q8_k};

/// The 32 stored unsigned values of an original block (true weight + [`Format::offset`]).
fn values(format: Format, b: &[u8]) -> [i32; QK] {
    std::array::from_fn(|i| match format {
        Format::Q4_0 => nibble(&b[2..18], i),
        Format::Q4_1 => nibble(&b[4..20], i),
        Format::Q5_0 => five_bit(&b[2..6], &b[6..22], i),
        Format::Q5_1 => five_bit(&b[4..8], &b[8..24], i),
        Format::Q8_0 => b[2 + i] as i8 as i32 + 128,
        Format::Q4K | Format::Q6K => unreachable!("32-element types only"),
    })
}

/// The reference of the packed order for one original row of `format` against one token's
/// Q8_0 activations (`ys_0`, with `sums[b] = Σ qs` of each block) or Q8_1 activations (`ys_1`),
/// whichever the format meets.
fn dot_row(format: Format, row: &[u8], act: Act<'_>) -> f32 {
    let bytes = format.block_bytes();
    let offset = format.offset();
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(bytes).enumerate() {
        let w = values(format, blk);
        let (qs, dx) = match act {
            Act::Q8_0(ys, _) => (&ys[b].qs, ys[b].d),
            Act::Q8_1(ys) => (&ys[b].qs, ys[b].d),
            Act::Q8K(..) => unreachable!("K-quants are tested against the scalar vec_dot"),
        };
        let raw: i32 = w.iter().zip(qs).map(|(&w, &x)| w * x as i32).sum();
        let isum = match act {
            Act::Q8_0(_, sums) => raw - offset * sums[b],
            _ => raw,
        };
        let term = (f16_at(blk, 0) * dx) * isum as f32;
        acc += match act {
            Act::Q8_1(ys) => term + f16_at(blk, 2) * ys[b].s,
            _ => term,
        };
    }
    acc
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random original rows of `format`: any quant bytes, finite f16 scales and mins.
fn random_rows(rng: &mut Rng, format: Format, rows: usize, cols: usize) -> Vec<u8> {
    let bytes = format.block_bytes();
    let mut data = vec![0u8; rows * cols / QK * bytes];
    for blk in data.chunks_exact_mut(bytes) {
        for b in blk.iter_mut() {
            *b = rng.next() as u8;
        }
        let d = half::f16::from_f32(rng.f32() * 0.05).to_le_bytes();
        blk[..2].copy_from_slice(&d);
        if format.has_min() {
            let m = half::f16::from_f32(rng.f32() * 0.05).to_le_bytes();
            blk[2..4].copy_from_slice(&m);
        }
    }
    data
}

const FORMATS: [(Format, DType); 5] = [
    (Format::Q4_0, DType::Q4_0),
    (Format::Q4_1, DType::Q4_1),
    (Format::Q5_0, DType::Q5_0),
    (Format::Q5_1, DType::Q5_1),
    (Format::Q8_0, DType::Q8_0),
];

/// One token's activations quantised both ways a 32-element type may meet them, with the Q8_0
/// block sums.
struct Quantized {
    q0: Vec<BlockQ8_0>,
    q1: Vec<BlockQ8_1>,
    sums: Vec<i32>,
}

impl Quantized {
    fn new(x: &[f32]) -> Quantized {
        let blocks = x.len() / QK;
        let mut q0 = vec![
            BlockQ8_0 {
                d: 0.0,
                qs: [0; QK]
            };
            blocks
        ];
        let mut q1 = vec![
            BlockQ8_1 {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            blocks
        ];
        let mut sums = vec![0; blocks];
        quantize_row_q8_0(x, &mut q0);
        quantize_row_q8_1(x, &mut q1);
        block_sums(&q0, &mut sums);
        Quantized { q0, q1, sums }
    }

    /// The activations `format` meets.
    fn act(&self, format: Format) -> Act<'_> {
        if format.has_min() {
            Act::Q8_1(&self.q1)
        } else {
            Act::Q8_0(&self.q0, &self.sums)
        }
    }
}

/// Every output of `matmul_packed`, for row counts around the panel size and token counts
/// that cover partial token groups and several token chunks, equals `dot_row` of the
/// original row and that token alone, bit for bit.
#[test]
fn packed_products_equal_the_row_reference() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for (format, dtype) in FORMATS {
        for (rows, cols) in [(1, 32), (15, 64), (16, 96), (33, 576), (40, 160)] {
            let data = random_rows(&mut rng, format, rows, cols);
            let m = PackedMatrix::pack(dtype, rows, cols, &data).unwrap();
            assert_eq!(
                m.weight_bytes(),
                rows.div_ceil(PANEL) * PANEL * data.len() / rows
            );
            for n in [1, 2, 3, 5, 70] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 3.0).collect();
                let mut out = vec![f32::NAN; n * rows];
                matmul_packed(&m, &x, n, &mut out);
                for t in 0..n {
                    let q = Quantized::new(&x[t * cols..(t + 1) * cols]);
                    let act = q.act(format);
                    for r in 0..rows {
                        let row = &data[r * data.len() / rows..(r + 1) * data.len() / rows];
                        let want = dot_row(format, row, act);
                        let got = out[t * rows + r];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{format:?} {rows}x{cols} n={n} token {t} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Calls each level's panel kernel that takes `m`'s format directly (not only this process's
/// level), for every run of 1 to 4 of the tokens `acts` against every panel, and holds each
/// output to `want(row, token)` bit for bit (the padding rows of the last panel to 0). Returns
/// how many levels ran.
fn check_every_level(
    m: &PackedMatrix,
    acts: &[Act<'_>],
    want: impl Fn(usize, usize) -> f32,
) -> usize {
    use crate::cpu::{kernels_of, Isa};
    let (format, blocks) = (m.format, m.blocks());
    let mut tested = 0;
    for level in Isa::ALL {
        let Some(panel) = kernels_of(level).and_then(|k| k.panel_for(format)) else {
            continue;
        };
        tested += 1;
        for n in 1..=acts.len().min(4) {
            for t0 in 0..=acts.len() - n {
                for p in 0..m.panels() {
                    let pb = &m.bytes()[p * m.panel_bytes()..(p + 1) * m.panel_bytes()];
                    let mut out = vec![[f32::NAN; PANEL]; n];
                    // SAFETY: `kernels_of` hands out only this machine's levels, and this one
                    // takes the format; the panel holds `blocks` panel-blocks, each token
                    // `blocks` activation blocks of the type the format meets, with their sums.
                    unsafe { panel(format, pb, blocks, &acts[t0..t0 + n], &mut out) };
                    for (i, o) in out.iter().enumerate() {
                        for (lane, &got) in o.iter().enumerate() {
                            let r = p * PANEL + lane;
                            let want = if r < m.rows { want(r, t0 + i) } else { 0.0 };
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{format:?} {level:?} tokens {t0}+{n} row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
    tested
}

/// Each level's panel kernel on its own (not only this process's), 1 to 4 tokens against every
/// panel of matrices of each 32-element type, equals `dot_row` bit for bit: the machines with
/// and without AVX-512 VNNI give the same products. Rows are random bytes with the extremes
/// (all quants 0, all 0xFF) mixed in, activations include all-equal and spiky tokens.
#[test]
fn every_level_panel_equals_the_row_reference() {
    let mut rng = Rng(0x5eed_1e7e_15a0_0001);
    for (format, _) in FORMATS {
        let (rows, cols) = (40, 256);
        let blocks = cols / QK;
        let mut data = random_rows(&mut rng, format, rows, cols);
        let bytes = format.block_bytes();
        let (_, q_off) = format.source_offsets();
        for (r, fill) in [(3, 0u8), (17, 0xFF), (33, 0x80)] {
            for blk in data[r * blocks * bytes..(r + 1) * blocks * bytes].chunks_exact_mut(bytes) {
                blk[q_off..].fill(fill);
                if matches!(format, Format::Q5_0 | Format::Q5_1) {
                    blk[q_off - 4..q_off].fill(fill);
                }
            }
        }
        let m = PackedMatrix::pack_format(format, rows, cols, &data);
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|t| match t {
                0 => vec![0.75; cols],
                1 => (0..cols)
                    .map(|i| if i % 37 == 0 { 50.0 } else { rng.f32() })
                    .collect(),
                _ => (0..cols).map(|_| rng.f32() * 3.0).collect(),
            })
            .collect();
        let qs: Vec<Quantized> = xs.iter().map(|x| Quantized::new(x)).collect();
        let acts: Vec<Act<'_>> = qs.iter().map(|q| q.act(format)).collect();
        let tested = check_every_level(&m, &acts, |r, t| {
            dot_row(
                format,
                &data[r * blocks * bytes..(r + 1) * blocks * bytes],
                acts[t],
            )
        });
        assert!(tested >= 1, "the scalar level always has a panel kernel");
    }
}

/// Random Q4_K (`q6` false) or Q6_K rows: any quant, scale and min bytes, finite f16 scales.
fn random_k_rows(rng: &mut Rng, q6: bool, rows: usize, cols: usize) -> Vec<u8> {
    let bytes = if q6 { 210 } else { 144 };
    let mut data = vec![0u8; rows * cols / QK_K * bytes];
    for blk in data.chunks_exact_mut(bytes) {
        for b in blk.iter_mut() {
            *b = rng.next() as u8;
        }
        let d = |rng: &mut Rng| half::f16::from_f32(rng.f32() * 0.01).to_le_bytes();
        if q6 {
            blk[208..210].copy_from_slice(&d(rng));
        } else {
            blk[0..2].copy_from_slice(&d(rng));
            blk[2..4].copy_from_slice(&d(rng));
        }
    }
    data
}

/// Packed Q4_K and Q6_K products equal the scalar `vec_dot_*_q8_k` of the original row and
/// that token's Q8_K activations bit for bit (the row kernels' order): row counts around the
/// panel size, token counts covering partial token groups and several token chunks.
#[test]
fn packed_k_quants_equal_the_scalar_reference() {
    if !available(Format::Q4K) {
        eprintln!("skipped: no AVX-512 VNNI on this machine");
        return;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (q6, dtype) in [(false, DType::Q4K), (true, DType::Q6K)] {
        let reference = if q6 {
            super::super::vec_dot_q6_k_q8_k
        } else {
            super::super::vec_dot_q4_k_q8_k
        };
        for (rows, cols) in [(1, 256), (15, 512), (16, 256), (33, 1024), (40, 768)] {
            let data = random_k_rows(&mut rng, q6, rows, cols);
            let m = PackedMatrix::pack(dtype, rows, cols, &data).unwrap();
            let row_bytes = data.len() / rows;
            for n in [1, 2, 3, 5, 70] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 3.0).collect();
                let mut out = vec![f32::NAN; n * rows];
                matmul_packed(&m, &x, n, &mut out);
                for t in 0..n {
                    let mut y = vec![
                        BlockQ8K {
                            d: 0.0,
                            qs: [0; QK_K],
                            bsums: [0; QK_K / 16]
                        };
                        cols / QK_K
                    ];
                    quantize_row_q8_k(&x[t * cols..(t + 1) * cols], &mut y);
                    for r in 0..rows {
                        let want = reference(&data[r * row_bytes..(r + 1) * row_bytes], &y);
                        let got = out[t * rows + r];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{dtype:?} {rows}x{cols} n={n} token {t} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Several matrices in one loop (mixed activation types) give each matrix's own products.
/// Each level's panel kernel of Q4_K and Q6_K (the levels that pack them), 1 to 4 tokens against
/// every panel, equals the scalar `vec_dot_q4_k_q8_k` / `vec_dot_q6_k_q8_k` bit for bit.
#[test]
fn every_level_k_panel_equals_the_scalar_reference() {
    let mut rng = Rng(0x00dd_5eed_50fc_0ffe);
    let (rows, cols) = (40, 768);
    let blocks = cols / QK_K;
    let ys: Vec<Vec<BlockQ8K>> = (0..4)
        .map(|t| {
            let x: Vec<f32> = (0..cols)
                .map(|i| {
                    if t == 1 && i % 41 == 0 {
                        60.0
                    } else {
                        rng.f32() * 3.0
                    }
                })
                .collect();
            let mut y = vec![
                BlockQ8K {
                    d: 0.0,
                    qs: [0; QK_K],
                    bsums: [0; QK_K / 16]
                };
                blocks
            ];
            quantize_row_q8_k(&x, &mut y);
            y
        })
        .collect();
    let sums: Vec<Vec<i16>> = ys
        .iter()
        .map(|y| {
            let mut s = vec![0i16; 8 * blocks];
            sub_block_sums(y, &mut s);
            s
        })
        .collect();
    let acts: Vec<Act<'_>> = (0..4).map(|t| Act::Q8K(&ys[t], &sums[t])).collect();
    for (q6, format) in [(false, Format::Q4K), (true, Format::Q6K)] {
        let reference = if q6 {
            super::super::vec_dot_q6_k_q8_k
        } else {
            super::super::vec_dot_q4_k_q8_k
        };
        let data = random_k_rows(&mut rng, q6, rows, cols);
        let row_bytes = data.len() / rows;
        let m = PackedMatrix::pack_format(format, rows, cols, &data);
        check_every_level(&m, &acts, |r, t| {
            reference(&data[r * row_bytes..(r + 1) * row_bytes], &ys[t])
        });
    }
}

#[test]
fn many_matrices_equal_each_alone() {
    if !available(Format::Q4K) {
        eprintln!("skipped: no AVX-512 VNNI on this machine");
        return;
    }
    let mut rng = Rng(99);
    let cols = 512;
    let shapes = [
        (Format::Q4_1, DType::Q4_1, 40),
        (Format::Q8_0, DType::Q8_0, 16),
        (Format::Q4K, DType::Q4K, 20),
        (Format::Q5_0, DType::Q5_0, 7),
        (Format::Q6K, DType::Q6K, 17),
    ];
    let ms: Vec<PackedMatrix> = shapes
        .iter()
        .map(|&(f, d, rows)| {
            let data = match f {
                Format::Q4K => random_k_rows(&mut rng, false, rows, cols),
                Format::Q6K => random_k_rows(&mut rng, true, rows, cols),
                _ => random_rows(&mut rng, f, rows, cols),
            };
            PackedMatrix::pack(d, rows, cols, &data).unwrap()
        })
        .collect();
    for n in [1, 6, 67] {
        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
        let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0.0; n * m.rows]).collect();
        let refs: Vec<&PackedMatrix> = ms.iter().collect();
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        crate::matmul::matmul_packed_many(&refs, &x, n, &mut views);
        for (m, got) in ms.iter().zip(&outs) {
            let mut want = vec![0.0; n * m.rows];
            matmul_packed(m, &x, n, &mut want);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n = {n}"
            );
        }
    }
}

/// The fused gated unit equals the two products then `glu_inplace`, bit for bit, for gate
/// and up of different formats (and activation kinds), with SiLU and the table GELU.
#[test]
fn fused_glu_equals_products_then_glu() {
    if !available(Format::Q4K) {
        eprintln!("skipped: no AVX-512 VNNI on this machine");
        return;
    }
    let mut rng = Rng(5);
    let (rows, cols) = (37, 512);
    let gate = PackedMatrix::pack(
        DType::Q4K,
        rows,
        cols,
        &random_k_rows(&mut rng, false, rows, cols),
    )
    .unwrap();
    let up = PackedMatrix::pack(
        DType::Q5_0,
        rows,
        cols,
        &random_rows(&mut rng, Format::Q5_0, rows, cols),
    )
    .unwrap();
    use crate::ops::Activation;
    let acts = [Activation::Silu, Activation::GeluF16Table];
    for act in acts {
        for n in [1, 4, 67] {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 2.0).collect();
            let mut got = vec![f32::NAN; n * rows];
            crate::matmul::matmul_packed_glu(&gate, &up, &x, n, act, &mut got);
            let (mut g, mut u) = (vec![0.0; n * rows], vec![0.0; n * rows]);
            matmul_packed(&gate, &x, n, &mut g);
            matmul_packed(&up, &x, n, &mut u);
            crate::ops::glu_inplace(&mut g, &u, act);
            assert!(
                got.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()),
                "n = {n}"
            );
        }
    }
}

/// Gathered products (a mixture of experts' chosen experts, each on its own rows of the same
/// activations, some with a fused gated unit) equal each matrix alone on its rows copied out, bit
/// for bit: listed rows in any order and repeated, a range, all rows, and a product with none.
#[test]
fn gathered_products_equal_each_alone_on_their_rows() {
    use crate::matmul::{matmul_packed_gathered, Product, TokenRows};
    use crate::ops::Activation;
    if !available(Format::Q4K) {
        eprintln!("skipped: no AVX-512 VNNI on this machine");
        return;
    }
    let mut rng = Rng(41);
    let cols = 512;
    let k = |rng: &mut Rng, q6: bool, rows: usize| {
        PackedMatrix::pack(
            if q6 { DType::Q6K } else { DType::Q4K },
            rows,
            cols,
            &random_k_rows(rng, q6, rows, cols),
        )
        .unwrap()
    };
    let (gate, up, down) = (
        k(&mut rng, false, 48),
        k(&mut rng, false, 48),
        k(&mut rng, true, 33),
    );
    let q8 = PackedMatrix::pack(
        DType::Q8_0,
        20,
        cols,
        &random_rows(&mut rng, Format::Q8_0, 20, cols),
    )
    .unwrap();
    for n in [1, 5, 70, 150] {
        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 2.0).collect();
        let listed: Vec<usize> = (0..n).rev().step_by(2).chain([0, n - 1]).collect();
        let range = TokenRows::Range(n / 3, n - n / 3);
        let rows_of = |t: TokenRows| -> Vec<usize> {
            match t {
                TokenRows::All(n) => (0..n).collect(),
                TokenRows::Range(s, l) => (s..s + l).collect(),
                TokenRows::List(l) => l.to_vec(),
            }
        };
        let cases: Vec<(&PackedMatrix, Option<&PackedMatrix>, TokenRows)> = vec![
            (&gate, Some(&up), TokenRows::List(&listed)),
            (&down, None, range),
            (&q8, None, TokenRows::All(n)),
            (&gate, Some(&up), TokenRows::List(&[])),
            (&down, None, TokenRows::List(&listed)),
        ];
        let mut outs: Vec<Vec<f32>> = cases
            .iter()
            .map(|(m, _, t)| vec![f32::NAN; t.len() * m.rows])
            .collect();
        let products = cases
            .iter()
            .zip(outs.iter_mut())
            .map(|(&(m, up, tokens), out)| Product {
                m,
                glu: up.map(|u| (u, Activation::Silu)),
                tokens,
                out,
            })
            .collect();
        matmul_packed_gathered(products, &x, n);
        for ((m, up, tokens), got) in cases.iter().zip(&outs) {
            let rows = rows_of(*tokens);
            let xs: Vec<f32> = rows
                .iter()
                .flat_map(|&t| x[t * cols..(t + 1) * cols].iter().copied())
                .collect();
            let mut want = vec![0.0; rows.len() * m.rows];
            matmul_packed(m, &xs, rows.len(), &mut want);
            if let Some(up) = up {
                let mut u = vec![0.0; rows.len() * m.rows];
                matmul_packed(up, &xs, rows.len(), &mut u);
                crate::ops::glu_inplace(&mut want, &u, Activation::Silu);
            }
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n = {n}, {tokens:?}"
            );
        }
    }
}

/// The reference order is close to the float64 product of the dequantised row with the
/// quantised activations (a check of the reference itself, independent of the packing).
#[test]
fn row_reference_matches_dequantised_product() {
    let mut rng = Rng(77);
    for (format, dtype) in FORMATS {
        let cols = 256;
        let row = random_rows(&mut rng, format, 1, cols);
        let mut w = vec![0f32; cols];
        crate::quant::dequantize_row(dtype, &row, &mut w);
        let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
        let mut q0 = vec![
            BlockQ8_0 {
                d: 0.0,
                qs: [0; QK]
            };
            cols / QK
        ];
        let mut q1 = vec![
            BlockQ8_1 {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            cols / QK
        ];
        let mut sums = vec![0; cols / QK];
        quantize_row_q8_0(&x, &mut q0);
        quantize_row_q8_1(&x, &mut q1);
        block_sums(&q0, &mut sums);
        let (act, xq): (Act, Vec<f64>) = if format.has_min() {
            (
                Act::Q8_1(&q1),
                (0..cols)
                    .map(|i| f64::from(q1[i / QK].d) * f64::from(q1[i / QK].qs[i % QK]))
                    .collect(),
            )
        } else {
            (
                Act::Q8_0(&q0, &sums),
                (0..cols)
                    .map(|i| f64::from(q0[i / QK].d) * f64::from(q0[i / QK].qs[i % QK]))
                    .collect(),
            )
        };
        let want: f64 = w.iter().zip(&xq).map(|(&w, &x)| f64::from(w) * x).sum();
        let got = f64::from(dot_row(format, &row, act));
        // Q8_1's `s` is f16-rounded, so types with a min are off by up to ~1e-3 relative there.
        assert!(
            (got - want).abs() < 2e-3 * (1.0 + want.abs()),
            "{format:?}: {got} vs {want}"
        );
    }
}

//! Tests of [`crate::qdot`]: every quantiser path against llama.cpp's reference bytes, the scalar
//! dots against f64, and every level this machine has against the scalar reference, bit for bit,
//! for every tile shape.

use super::blocks::QK;
use super::reference::{
    f16_at, nearest_int, quantize_q8_0_ref, quantize_q8_1_ref, quantize_q8_k_ref, round_away,
    scalar_kernel,
};
use super::*;
use crate::cpu::{kernels_of, Isa, Kernels};
use crate::dtype::{ALL_DTYPES, QK_K};
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
                .map(|i| rng.normal() * (1 + i % 7) as f32 * if i % 97 == 0 { 20.0 } else { 1.0 })
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

/// Every level this machine has, with its kernels.
fn levels() -> Vec<(Isa, &'static Kernels)> {
    Isa::ALL
        .into_iter()
        .filter_map(|l| kernels_of(l).map(|k| (l, k)))
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
            for (level, kernels) in levels() {
                let fast = (kernels.quant_kernel)(dtype).expect("block type");
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
#[should_panic(expected = "activation blocks")]
fn mismatched_activations_are_rejected() {
    let Some(QuantKernel::Q8_0(dot)) = quant_kernel(DType::Q8_0) else {
        unreachable!("Q8_0 pairs with Q8_0")
    };
    let row = [0u8; 2 * 34];
    let y = [BlockQ8_0::ZERO; 1];
    dot(&[&row], &[&y[..]], &mut [0.0]);
}

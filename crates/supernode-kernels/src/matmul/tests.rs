//! Tests of [`crate::matmul`]: both precisions against the scalar reference and f64, batch
//! invariance bit for bit, and the shapes at the edges.

use super::*;
use crate::dtype::ALL_DTYPES;
use crate::qdot::ActBlock;
use crate::qdot::{BlockQ8K, BlockQ8_0, BlockQ8_1, QuantKernel};
use crate::quant::quantize_row;
use crate::quant::tests::Rng;

/// A random `rows x cols` matrix of `dtype` (quantised from normal floats).
fn random_matrix(dtype: DType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
    let mut data = vec![0u8; rows * row_bytes];
    for row in data.chunks_exact_mut(row_bytes) {
        quantize_row(dtype, &rng.vec(cols), row);
    }
    data
}

fn cols_for(dtype: DType) -> usize {
    if dtype.block_size() == 1 {
        300
    } else {
        512
    }
}

fn run(w: &WeightMatrix, x: &[f32], n_tokens: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n_tokens * w.rows];
    matmul(w, x, n_tokens, &mut out);
    out
}

#[test]
fn matches_naive_f64_over_dequantised_rows() {
    let mut rng = Rng::new(11);
    for dtype in ALL_DTYPES {
        let (rows, cols) = (37, cols_for(dtype));
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        for n_tokens in [1, 3, 70] {
            let x = rng.vec(n_tokens * cols);
            let out = run(&w, &x, n_tokens);
            let mut deq = vec![0f32; cols];
            for r in 0..rows {
                dequantize_row(dtype, w.row(r), &mut deq);
                for t in 0..n_tokens {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let exact: f64 = deq.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let scale: f64 = deq
                        .iter()
                        .zip(xt)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let got = out[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-4 * scale.max(1e-30),
                        "{} r={r} t={t}: {got} vs {exact}",
                        dtype.name()
                    );
                }
            }
        }
    }
}

#[test]
fn results_are_batch_invariant() {
    let mut rng = Rng::new(12);
    for dtype in ALL_DTYPES {
        let (rows, cols) = (45, cols_for(dtype));
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        let n = 150;
        let x = rng.vec(n * cols);
        let full = run(&w, &x, n);
        // Every token alone, in pairs, and in batches of 5 and 33 at shifting offsets.
        for batch in [1, 2, 5, 33] {
            for start in (0..n - batch).step_by(batch + 6) {
                let xs = &x[start * cols..(start + batch) * cols];
                let part = run(&w, xs, batch);
                for t in 0..batch {
                    for r in 0..rows {
                        assert_eq!(
                            part[t * rows + r].to_bits(),
                            full[(start + t) * rows + r].to_bits(),
                            "{} batch={batch} token={} row={r}",
                            dtype.name(),
                            start + t
                        );
                    }
                }
            }
        }
    }
}

/// Enough rows that each task of a long batch takes every token (the blocked product's widest
/// tasks), against each token alone (the fused kernels), for rows of every kind of tail.
#[test]
fn long_batches_over_many_rows_equal_single_tokens() {
    let mut rng = Rng::new(14);
    for (dtype, rows, cols) in [
        (DType::F32, 300, 20),
        (DType::F16, 290, 300),
        (DType::Q5_0, 300, 640),
        (DType::Q4K, 260, 1024),
    ] {
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        let n = 150;
        let x = rng.vec(n * cols);
        let full = run(&w, &x, n);
        for t in [0, 1, 63, 64, 65, 149] {
            let one = run(&w, &x[t * cols..(t + 1) * cols], 1);
            for r in 0..rows {
                assert_eq!(
                    one[r].to_bits(),
                    full[t * rows + r].to_bits(),
                    "{} token={t} row={r}",
                    dtype.name()
                );
            }
        }
    }
}

fn run_with(w: &WeightMatrix, x: &[f32], n_tokens: usize, precision: Precision) -> Vec<f32> {
    let mut out = vec![f32::NAN; n_tokens * w.rows];
    matmul_with(w, x, n_tokens, &mut out, precision);
    out
}

#[test]
fn quantized_results_are_batch_invariant() {
    let mut rng = Rng::new(13);
    for dtype in ALL_DTYPES {
        let (rows, cols) = (45, cols_for(dtype));
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        let n = 150;
        let x = rng.vec(n * cols);
        let full = run_with(&w, &x, n, Precision::Quantized);
        for batch in [1, 2, 3, 5, 33] {
            for start in (0..n - batch).step_by(batch + 6) {
                let xs = &x[start * cols..(start + batch) * cols];
                let part = run_with(&w, xs, batch, Precision::Quantized);
                for (i, v) in part.iter().enumerate() {
                    let want = full[start * rows + i];
                    assert_eq!(
                        v.to_bits(),
                        want.to_bits(),
                        "{} batch={batch} token={} row={}",
                        dtype.name(),
                        start + i / rows,
                        i % rows
                    );
                }
            }
        }
    }
}

#[test]
fn quantized_elements_are_the_scalar_reference_dots() {
    let mut rng = Rng::new(14);
    for dtype in ALL_DTYPES.into_iter().filter(|d| d.block_size() > 1) {
        let (rows, cols) = (21, 512);
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        let n = 6;
        let x = rng.vec(n * cols);
        let out = run_with(&w, &x, n, Precision::Quantized);
        let mut want = vec![0f32; n * rows];
        macro_rules! reference {
            ($dot:expr, $block:ty) => {{
                let mut y = vec![<$block as ActBlock>::ZERO; cols / <$block>::ELEMS];
                for t in 0..n {
                    <$block>::quantize(&x[t * cols..(t + 1) * cols], &mut y);
                    for r in 0..rows {
                        $dot(&[w.row(r)], &[&y[..]], &mut want[t * rows + r..][..1]);
                    }
                }
            }};
        }
        match crate::qdot::reference::scalar_kernel(dtype) {
            Some(QuantKernel::Q8_0(dot)) => reference!(dot, BlockQ8_0),
            Some(QuantKernel::Q8_1(dot)) => reference!(dot, BlockQ8_1),
            Some(QuantKernel::Q8K(dot)) => reference!(dot, BlockQ8K),
            None => unreachable!("block types have kernels"),
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&want), "{}", dtype.name());
    }
}

#[test]
fn quantized_float_weights_meet_rounded_activations() {
    let mut rng = Rng::new(15);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let round = |v: f32| match dtype {
            DType::F16 => half::f16::from_f32(v).to_f32(),
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
            _ => v,
        };
        let (rows, cols) = (19, 300);
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        let x = rng.vec(3 * cols);
        let rounded: Vec<f32> = x.iter().map(|&v| round(v)).collect();
        let got = run_with(&w, &x, 3, Precision::Quantized);
        let want = run(&w, &rounded, 3);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{}",
            dtype.name()
        );
    }
}

#[test]
fn exact_precision_is_matmul() {
    let mut rng = Rng::new(16);
    let data = random_matrix(DType::Q4K, 17, 512, &mut rng);
    let w = WeightMatrix {
        dtype: DType::Q4K,
        rows: 17,
        cols: 512,
        data: &data,
    };
    let x = rng.vec(5 * 512);
    let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(run_with(&w, &x, 5, Precision::Exact)),
        bits(run(&w, &x, 5))
    );
}

#[test]
fn quantized_stays_close_to_exact() {
    // Only the activations' rounding separates the modes: 8-bit blocks (relative step
    // 1/127 of the block's largest value) or f16/bf16. Bounds are relative to
    // sum |w_i x_i|, about 3x what this data reaches.
    let bound = |d: DType| match d {
        DType::F32 => 0.0,
        DType::F16 => 1e-4,
        DType::BF16 => 1e-3,
        _ => 4e-3,
    };
    let mut rng = Rng::new(17);
    for dtype in ALL_DTYPES {
        let (rows, cols) = (33, cols_for(dtype) * 2);
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data: &data,
        };
        let n = 4;
        let x = rng.vec(n * cols);
        let q = run_with(&w, &x, n, Precision::Quantized);
        let e = run_with(&w, &x, n, Precision::Exact);
        let mut deq = vec![0f32; cols];
        let mut worst = 0f64;
        for r in 0..rows {
            dequantize_row(dtype, w.row(r), &mut deq);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let scale: f64 = deq.iter().zip(xt).map(|(a, b)| (a * b).abs() as f64).sum();
                let diff = (q[t * rows + r] - e[t * rows + r]).abs() as f64;
                worst = worst.max(diff / scale);
            }
        }
        assert!(worst <= bound(dtype), "{}: {worst}", dtype.name());
    }
}

#[test]
fn empty_shapes_are_fine() {
    let w = WeightMatrix {
        dtype: DType::Q8_0,
        rows: 0,
        cols: 64,
        data: &[],
    };
    matmul(&w, &[0.0; 64], 1, &mut []);
    let data = random_matrix(DType::Q8_0, 3, 64, &mut Rng::new(1));
    let w = WeightMatrix {
        dtype: DType::Q8_0,
        rows: 3,
        cols: 64,
        data: &data,
    };
    matmul(&w, &[], 0, &mut []);
    matmul_with(&w, &[], 0, &mut [], Precision::Quantized);
    let w = WeightMatrix {
        rows: 0,
        data: &[],
        ..w
    };
    matmul_with(&w, &[0.0; 64], 1, &mut [], Precision::Quantized);
}

#[test]
#[should_panic(expected = "whole number")]
fn partial_blocks_are_rejected() {
    let w = WeightMatrix {
        dtype: DType::Q4K,
        rows: 1,
        cols: 100,
        data: &[],
    };
    matmul(&w, &[0.0; 100], 1, &mut [0.0]);
}

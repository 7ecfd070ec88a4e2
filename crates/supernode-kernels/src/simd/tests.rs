//! Tests of [`crate::simd`]: the portable order written out by hand, and every path this machine
//! has against it or against `dot_f32`, bit for bit; the exponential against f64.

use half::f16;

use super::order::SUM_LANES;
use super::*;
use crate::cpu::scalar::{
    dot_f32_scalar, dot_rows_scalar, exp_sum_scalar, scale_round_scalar, weighted_rows_scalar,
};
use crate::cpu::{isa, kernels_of, Isa, Kernels};
use crate::dtype::ALL_DTYPES;
use crate::quant::tests::{edge_rows, zero_rows, Rng};
use crate::quant::{dequantize_row, quantize_row};

/// Every level this machine has, with its kernels.
fn levels() -> impl Iterator<Item = (Isa, &'static Kernels)> {
    Isa::ALL
        .into_iter()
        .filter_map(|l| kernels_of(l).map(|k| (l, k)))
}

const LENGTHS: [usize; 10] = [0, 1, 7, 31, 32, 33, 64, 100, 576, 1539];

fn close(a: f32, b: f32, scale: f32) -> bool {
    (a - b).abs() <= 1e-5 * scale.max(1e-30)
}

/// `sum |a_i b_i|`: the natural scale of a dot product's rounding error.
fn abs_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum()
}

#[test]
fn scalar_dot_matches_f64_reference() {
    let mut rng = Rng::new(1);
    for n in LENGTHS {
        let (a, b) = (rng.vec(n), rng.vec(n));
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let got = dot_f32_scalar(&a, &b);
        assert!(
            close(got, exact as f32, abs_dot(&a, &b)),
            "n={n}: {got} vs {exact}"
        );
    }
}

#[test]
fn scalar_dot_follows_the_lane_tree() {
    // The lanes and tree written out by hand, on data where other orders round differently.
    let mut rng = Rng::new(5);
    let (a, b) = (rng.vec(64 + 3), rng.vec(64 + 3));
    let mut lanes = [0f32; 32];
    for i in 0..64 {
        lanes[i % 32] += a[i] * b[i];
    }
    for w in [16, 8, 4, 2, 1] {
        for l in 0..w {
            lanes[l] += lanes[l + w];
        }
    }
    let want = lanes[0] + a[64] * b[64] + a[65] * b[65] + a[66] * b[66];
    assert_eq!(dot_f32_scalar(&a, &b).to_bits(), want.to_bits());
}

#[test]
fn simd_dot_agrees_with_scalar() {
    let mut rng = Rng::new(2);
    for n in LENGTHS {
        let (a, b) = (rng.vec(n), rng.vec(n));
        let (fast, slow) = (dot_f32(&a, &b), dot_f32_scalar(&a, &b));
        assert!(
            close(fast, slow, abs_dot(&a, &b)),
            "n={n}: {fast} vs {slow}"
        );
    }
}

#[test]
fn permuted_lanes_are_the_accumulators_sequences() {
    let src: Vec<f32> = (0..70).map(|i| i as f32).collect();
    let mut dst = vec![f32::NAN; 70];
    order::permute_lanes(&src, 8, &mut dst);
    // Segment j of 8 lanes: elements 32 i + 8 j .. + 8 for i = 0, 1; then the tail 64..70.
    let mut want = Vec::new();
    for j in 0..4 {
        for i in 0..2 {
            want.extend((32 * i + 8 * j..32 * i + 8 * j + 8).map(|e| e as f32));
        }
    }
    want.extend((64..70).map(|e| e as f32));
    assert_eq!(dst, want);
    order::permute_lanes(&src, 16, &mut dst);
    assert_eq!(&dst[..4], &[0.0, 1.0, 2.0, 3.0]);
    assert_eq!(&dst[16..20], &[32.0, 33.0, 34.0, 35.0]);
    assert_eq!(&dst[32..34], &[16.0, 17.0]);
}

#[test]
fn blocked_product_equals_one_dot_per_pair_bit_for_bit() {
    let mut rng = Rng::new(19);
    for (isa, k) in levels() {
        let Some(gemm) = k.gemm else { continue };
        for n in LENGTHS.into_iter().filter(|&n| n > 0).chain([2080]) {
            for (rows, m) in [(1, 1), (3, 4), (2, 9), (7, 5), (16, 64), (4, 3)] {
                let (a, b) = (rng.vec(n * rows), rng.vec(n * m));
                let permute = |v: &[f32]| {
                    let mut p = vec![f32::NAN; v.len()];
                    for (s, d) in v.chunks_exact(n).zip(p.chunks_exact_mut(n)) {
                        order::permute_lanes(s, gemm.seg, d);
                    }
                    p
                };
                let mut out = vec![f32::NAN; rows * m];
                // SAFETY: this machine's table; whole rows and tokens of `n`, one output each.
                unsafe { (gemm.tile)(&permute(&a), &permute(&b), n, &mut out) };
                for r in 0..rows {
                    for t in 0..m {
                        let (ar, bt) = (&a[r * n..(r + 1) * n], &b[t * n..(t + 1) * n]);
                        // SAFETY: this machine's table; equal lengths.
                        let want = unsafe { (k.dot_f32)(ar, bt) };
                        let got = out[r * m + t];
                        assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} n={n} r={r} t={t}");
                    }
                }
            }
        }
    }
}

#[test]
fn dot_grid_equals_one_dot_per_pair_bit_for_bit() {
    let mut rng = Rng::new(16);
    for n in LENGTHS {
        for (rows, m) in [
            (1, 4),
            (2, 4),
            (3, 4),
            (5, 4),
            (16, 4),
            (4, 1),
            (3, 3),
            (2, 5),
        ] {
            let (a, bs) = (rng.vec(n * rows), rng.vec(n * m));
            let mut out = vec![f32::NAN; rows * m];
            dot_f32_grid(&a, &bs, n, &mut out);
            for r in 0..rows {
                for j in 0..m {
                    let want = dot_f32(&a[r * n..(r + 1) * n], &bs[j * n..(j + 1) * n]);
                    let got = out[r * m + j];
                    assert_eq!(got.to_bits(), want.to_bits(), "n={n} r={r} j={j}");
                }
            }
        }
    }
}

#[test]
fn dot_many_equals_one_dot_per_row_bit_for_bit() {
    let mut rng = Rng::new(6);
    for n in LENGTHS {
        for rows in [1, 2, 3, 4, 5, 9] {
            let (a, bs) = (rng.vec(n), rng.vec(n * rows));
            let mut out = vec![f32::NAN; rows];
            dot_f32_many(&a, &bs, &mut out);
            for (j, o) in out.iter().enumerate() {
                let want = dot_f32(&a, &bs[j * n..(j + 1) * n]);
                assert_eq!(o.to_bits(), want.to_bits(), "n={n} rows={rows} j={j}");
            }
        }
    }
}

/// Row lengths of the attention kernels: real head sizes (64, 128, 256, MLA's 576) and odd
/// ones around the 32-lane and 8-lane steps.
const HEAD_DIMS: [usize; 14] = [1, 3, 7, 8, 13, 31, 32, 33, 40, 64, 100, 128, 256, 576];

/// `len` random f16 values, with zeros of both signs, subnormals and the largest finite f16
/// among them, and the same values widened to f32.
fn f16_rows(rng: &mut Rng, len: usize) -> (Vec<f16>, Vec<f32>) {
    let special = [0.0, -0.0, 6.0e-8, -3.0e-6, 65504.0, -0.25];
    let h: Vec<f16> = (0..len)
        .map(|i| {
            let x = if i % 17 == 5 {
                special[i / 17 % special.len()]
            } else {
                rng.normal() * 4.0
            };
            f16::from_f32(x)
        })
        .collect();
    let w = h.iter().map(|x| x.to_f32()).collect();
    (h, w)
}

/// Bases of `rows` rows of `n` in storage of `len`: scrambled, unaligned, some repeated.
fn row_bases(rng: &mut Rng, rows: usize, n: usize, len: usize) -> Vec<usize> {
    (0..rows)
        .map(|_| ((rng.uniform() * 0.5 + 0.5) * (len - n + 1) as f32) as usize % (len - n + 1))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn dot_f16_rows_equal_dot_f32_rows_of_the_widened_rows_bit_for_bit() {
    let mut rng = Rng::new(8);
    for n in HEAD_DIMS {
        for g in [1, 2, 3, 5] {
            let len = 9 * n + 5;
            let (k16, kw) = f16_rows(&mut rng, len);
            let bases = row_bases(&mut rng, 9, n, len);
            let m = bases.len();
            let q = rng.vec(g * n);
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut out = vec![f32::NAN; g * m];
                f(&mut out);
                bits(&out)
            };
            let case = format!("n={n} g={g}");
            // The dispatched kernels.
            let want = run(&|o| dot_f32_rows(&q, n, &kw, &bases, o));
            assert_eq!(
                run(&|o| dot_f16_rows(&q, n, &k16, &bases, o)),
                want,
                "{case}"
            );
            // The portable path, which is also the f32 one's.
            let scalar = run(&|o| dot_rows_scalar(&q, n, &kw, &bases, o));
            assert_eq!(run(&|o| dot_rows_scalar(&q, n, &k16, &bases, o)), scalar);
            let one_by_one = |dot: fn(&[f32], &[f32]) -> f32| {
                run(&|o| {
                    for (j, &b) in bases.iter().enumerate() {
                        for (h, qh) in q.chunks_exact(n).enumerate() {
                            o[h * m + j] = dot(qh, &kw[b..b + n]);
                        }
                    }
                })
            };
            assert_eq!(scalar, one_by_one(dot_f32_scalar), "{case}");
            // Every dispatched path equals `dot_f32` per head and row.
            assert_eq!(want, one_by_one(dot_f32), "{case}");
        }
    }
}

/// Every multi-row dot kernel of this machine against one `dot_f32` per head and row (the
/// single-row kernel of the same path; the portable one, without FMA, only on the portable
/// path), bit for bit, over f32 and f16 rows and position counts around the block sizes.
#[test]
fn multi_row_dot_kernels_equal_single_dots_bit_for_bit() {
    let mut rng = Rng::new(10);
    for n in [1, 7, 32, 64, 100, 256] {
        for rows in [0, 1, 5, 8, 9, 17, 64] {
            for g in [1, 2, 3, 4, 5, 7] {
                let len = rows.max(1) * n + 7;
                let (k16, kw) = f16_rows(&mut rng, len);
                let bases = row_bases(&mut rng, rows, n, len);
                let q: Vec<f32> = rng.vec(g * n);
                let run = |f: &dyn Fn(&mut [f32])| {
                    let mut out = vec![f32::NAN; g * rows];
                    f(&mut out);
                    bits(&out)
                };
                let single = |dot: fn(&[f32], &[f32]) -> f32| {
                    run(&|o| {
                        for (h, qh) in q.chunks_exact(n).enumerate() {
                            for (j, &b) in bases.iter().enumerate() {
                                o[h * rows + j] = dot(qh, &kw[b..b + n]);
                            }
                        }
                    })
                };
                let case = format!("n={n} rows={rows} g={g}");
                let scalar = single(dot_f32_scalar);
                assert_eq!(
                    run(&|o| dot_rows_scalar(&q, n, &kw, &bases, o)),
                    scalar,
                    "{case}"
                );
                assert_eq!(
                    run(&|o| dot_rows_scalar(&q, n, &k16, &bases, o)),
                    scalar,
                    "{case}"
                );
                let want = single(dot_f32);
                assert_eq!(run(&|o| dot_f32_rows(&q, n, &kw, &bases, o)), want);
                assert_eq!(run(&|o| dot_f16_rows(&q, n, &k16, &bases, o)), want);
                for (level, k) in levels().filter(|&(l, _)| l > Isa::Scalar) {
                    // SAFETY: the table is this machine's; the rows are in bounds.
                    let got = run(&|o| unsafe { (k.dot_rows_f32)(&q, n, &kw, &bases, o) });
                    assert_eq!(got, want, "{level:?} {case}");
                    // SAFETY: as above.
                    let got = run(&|o| unsafe { (k.dot_rows_f16)(&q, n, &k16, &bases, o) });
                    assert_eq!(got, want, "{level:?} f16 {case}");
                }
                if isa() == Isa::Scalar {
                    assert_eq!(want, scalar, "{case}");
                }
            }
        }
    }
}

#[test]
fn weighted_f16_rows_equal_weighted_f32_rows_of_the_widened_rows_bit_for_bit() {
    let mut rng = Rng::new(9);
    for n in HEAD_DIMS.into_iter().chain([16, 48, 17]) {
        for (rows, g) in [(0, 1), (1, 1), (5, 1), (9, 3), (40, 2), (17, 4), (6, 9)] {
            let len = rows.max(1) * n + 11;
            let (v16, vw) = f16_rows(&mut rng, len);
            let bases = row_bases(&mut rng, rows, n, len);
            let ws: Vec<f32> = rng.vec(rows * g).iter().map(|x| x.abs()).collect();
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut out = vec![f32::NAN; g * n];
                f(&mut out);
                bits(&out)
            };
            let case = format!("n={n} rows={rows} g={g}");
            // Multiply then add in position order: the same bits on every path.
            let reference = run(&|o| {
                o.fill(0.0);
                for (h, oh) in o.chunks_exact_mut(n).enumerate() {
                    for (p, &b) in bases.iter().enumerate() {
                        for (o, &x) in oh.iter_mut().zip(&vw[b..b + n]) {
                            *o += ws[h * rows + p] * x;
                        }
                    }
                }
            });
            let want = run(&|o| weighted_rows_f32(&ws, &vw, &bases, n, o));
            assert_eq!(want, reference, "{case}");
            let got = run(&|o| weighted_rows_f16(&ws, &v16, &bases, n, o));
            assert_eq!(got, reference, "{case}");
            let scalar = run(&|o| weighted_rows_scalar(&ws, &v16, &bases, n, o));
            assert_eq!(scalar, reference, "{case}");
            let scalar = run(&|o| weighted_rows_scalar(&ws, &vw, &bases, n, o));
            assert_eq!(scalar, reference, "{case}");
            for (level, k) in levels() {
                // SAFETY: the table is this machine's; the rows and weights are in bounds.
                let got = run(&|o| unsafe { (k.weighted_rows_f16)(&ws, &v16, &bases, n, o) });
                assert_eq!(got, reference, "{level:?} {case}");
                // SAFETY: as above.
                let got = run(&|o| unsafe { (k.weighted_rows_f32)(&ws, &vw, &bases, n, o) });
                assert_eq!(got, reference, "{level:?} {case}");
            }
        }
    }
}

/// Inputs for the exponential: a dense sweep of `[-110, 90]`, the edges of the clamps and of
/// the subnormal range, zeros, infinities, and random softmax-like values.
fn exp_inputs() -> Vec<f32> {
    let mut xs: Vec<f32> = (0..400_000).map(|i| -110.0 + i as f32 * 0.0005).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        f32::MIN_POSITIVE,
        -87.33,
        -87.34,
        -103.27,
        -103.97,
        -104.0,
        -104.01,
        -1e10,
        88.72,
        88.73,
        89.0,
        1e10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
    ]);
    let mut rng = Rng::new(11);
    xs.extend((0..10_000).map(|_| -(rng.normal() * 8.0).abs()));
    xs
}

#[test]
fn exp_is_within_two_ulp_of_the_exact_value() {
    for x in exp_inputs() {
        let got = exp_f32(x);
        let want = f64::from(x).exp();
        if want > f64::from(f32::MAX) {
            assert_eq!(got, f32::INFINITY, "x={x}");
            continue;
        }
        // One ulp of the exact value (the subnormals' ulp below the normal range).
        let ulp = (want.max(f64::from(f32::MIN_POSITIVE)) * f64::from(f32::EPSILON))
            .max(f64::from(f32::from_bits(1)));
        let err = (f64::from(got) - want).abs() / ulp;
        assert!(err <= 2.0, "x={x}: {got} vs {want} ({err} ulp)");
    }
    assert_eq!(exp_f32(0.0), 1.0);
    assert_eq!(exp_f32(-0.0), 1.0);
    assert_eq!(exp_f32(-104.5), 0.0);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert!(exp_f32(f32::NAN).is_nan());
}

#[test]
fn vector_softmax_steps_equal_their_portable_twins_bit_for_bit() {
    let xs = exp_inputs();
    // exp_sum over every length around the 16 lanes, and over the whole input (`max` = 0:
    // `x - 0` is `x`, so each value is `exp_f32(x)`).
    for len in (0..40).chain([xs.len()]) {
        let mut fast = xs[xs.len() - len..].to_vec();
        let mut slow = fast.clone();
        let sum = exp_sum(&mut fast, 0.0);
        let want = exp_sum_scalar(&mut slow, 0.0);
        assert_eq!(bits(&fast), bits(&slow), "len={len}");
        assert_eq!(sum.to_bits(), want.to_bits(), "len={len}");
        for (level, k) in levels() {
            let mut path = xs[xs.len() - len..].to_vec();
            // SAFETY: the table is this machine's.
            let s = unsafe { (k.exp_sum)(&mut path, 0.0) };
            assert_eq!(bits(&path), bits(&slow), "{level:?} len={len}");
            assert_eq!(s.to_bits(), want.to_bits(), "{level:?} len={len}");
        }
    }
    let exps: Vec<f32> = xs.iter().map(|&x| exp_f32(x)).collect();
    let mut slow = xs.clone();
    exp_sum_scalar(&mut slow, 0.0);
    assert_eq!(bits(&slow), bits(&exps));
    // The sum's lanes and tree, written out.
    let mut lanes = [0f64; SUM_LANES];
    for (i, e) in exps.iter().enumerate() {
        lanes[i % SUM_LANES] += f64::from(*e);
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            lanes[l] += lanes[l + w];
        }
    }
    let mut again = xs.clone();
    assert_eq!(exp_sum(&mut again, 0.0).to_bits(), lanes[0].to_bits());
    // scale_max.
    let mut rng = Rng::new(12);
    for len in [0, 1, 15, 16, 17, 100] {
        let s = rng.vec(len);
        let (mut fast, mut slow) = (s.clone(), s.clone());
        let got = scale_max(&mut fast, 0.125);
        let mut want = f32::NEG_INFINITY;
        for v in slow.iter_mut() {
            *v *= 0.125;
            want = want.max(*v);
        }
        assert_eq!(bits(&fast), bits(&slow), "len={len}");
        assert_eq!(got.to_bits(), want.to_bits(), "len={len}");
    }
}

/// `scale_round` rounds exactly as `half::f16::from_f32` (nearest, ties to even) on every
/// path: normal, subnormal, halfway and out-of-range values, infinities; NaN stays NaN.
#[test]
fn scale_round_equals_half_rounding_bit_for_bit() {
    let mut xs: Vec<f32> = Vec::new();
    // Every f16 and the halfway points and their neighbours between consecutive ones.
    for h in 0..=u16::MAX {
        let (a, b) = (f16::from_bits(h), f16::from_bits(h.wrapping_add(1)));
        let (a, b) = (a.to_f32(), b.to_f32());
        xs.push(a);
        if a.is_finite() && b.is_finite() && a.signum() == b.signum() {
            let mid = ((f64::from(a) + f64::from(b)) / 2.0) as f32;
            xs.extend([mid, f32::from_bits(mid.to_bits() + 1)]);
            xs.push(f32::from_bits(mid.to_bits() - 1));
        }
    }
    xs.extend([
        1e-10,
        -1e-10,
        65520.0,
        65519.99,
        1e6,
        f32::INFINITY,
        f32::MIN_POSITIVE,
    ]);
    let mut rng = Rng::new(13);
    xs.extend((0..10_000).map(|_| rng.uniform() * 1e-3));
    for round in [false, true] {
        for inv in [1.0, 0.37] {
            let mut fast = xs.clone();
            scale_round(&mut fast, inv, round);
            let mut slow = xs.clone();
            scale_round_scalar(&mut slow, inv, round);
            let want: Vec<f32> = xs
                .iter()
                .map(|&x| {
                    let w = x * inv;
                    if round {
                        f16::from_f32(w).to_f32()
                    } else {
                        w
                    }
                })
                .collect();
            assert_eq!(bits(&slow), bits(&want), "round={round} inv={inv}");
            assert_eq!(bits(&fast), bits(&want), "round={round} inv={inv}");
            for (level, k) in levels() {
                let mut path = xs.clone();
                // SAFETY: the table is this machine's.
                unsafe { (k.scale_round)(&mut path, inv, round) };
                assert_eq!(
                    bits(&path),
                    bits(&want),
                    "{level:?} round={round} inv={inv}"
                );
            }
        }
    }
    let mut nan = [f32::NAN; 19];
    scale_round(&mut nan, 1.0, true);
    assert!(nan.iter().all(|x| x.is_nan()));
}

#[test]
fn row_kernels_equal_scalar_dequantise_then_dot_bit_for_bit() {
    let mut rng = Rng::new(4);
    for dtype in ALL_DTYPES {
        let Some(kernels) = row_kernels(dtype) else {
            continue;
        };
        for n in [256, 512, 608, 1024 + 256]
            .into_iter()
            .filter(|n| n % dtype.block_size() == 0)
        {
            let n = n + if dtype.block_size() == 1 { 13 } else { 0 };
            let w = rng.vec(n);
            let x = rng.vec(n);
            let mut row = vec![0u8; dtype.row_bytes(n).expect("whole blocks")];
            quantize_row(dtype, &w, &mut row);
            let mut deq = vec![0f32; n];
            dequantize_row(dtype, &row, &mut deq);
            let mut fast = vec![f32::NAN; n];
            (kernels.dequantize)(&row, &mut fast);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&deq), "{} n={n}", dtype.name());
            let (got, want) = ((kernels.dot)(&row, &x), dot_f32(&deq, &x));
            assert_eq!(got.to_bits(), want.to_bits(), "{} n={n}", dtype.name());
            let x1 = rng.vec(n);
            let pair = (kernels.dot2)(&row, &x, &x1);
            let want1 = dot_f32(&deq, &x1);
            assert_eq!(pair.map(f32::to_bits), [want.to_bits(), want1.to_bits()]);
            assert!(close(got, dot_f32_scalar(&deq, &x), abs_dot(&deq, &x)));
            if let Some(dot4) = kernels.dot4 {
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|_| {
                        let mut r = row.clone();
                        quantize_row(dtype, &rng.vec(n), &mut r);
                        r
                    })
                    .collect();
                let got = dot4(std::array::from_fn(|i| &rows[i][..]), &x);
                for (r, g) in rows.iter().zip(got) {
                    dequantize_row(dtype, r, &mut deq);
                    let want = dot_f32(&deq, &x);
                    assert_eq!(g.to_bits(), want.to_bits(), "{} n={n} dot4", dtype.name());
                }
            }
        }
    }
}

#[test]
fn avx512_row_kernels_equal_scalar_dequantise_then_dot_on_edge_rows() {
    let Some(avx512) = kernels_of(Isa::Avx512) else {
        return;
    };
    let mut rng = Rng::new(7);
    for dtype in ALL_DTYPES.into_iter().filter(|d| d.block_size() > 1) {
        let Some(wide) = (avx512.row_kernels)(dtype) else {
            continue;
        };
        for n in [256, 512, 608, 1024 + 256]
            .into_iter()
            .filter(|n| n % dtype.block_size() == 0)
        {
            for row in edge_rows(dtype, n, &mut rng) {
                let (x0, x1) = (rng.vec(n), rng.vec(n));
                let (mut got, mut deq) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                (wide.dequantize)(&row, &mut got);
                dequantize_row(dtype, &row, &mut deq);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&deq), "{} n={n}", dtype.name());
                let want = [dot_f32(&deq, &x0), dot_f32(&deq, &x1)].map(f32::to_bits);
                let got = (wide.dot)(&row, &x0).to_bits();
                assert_eq!(got, want[0], "{} n={n}", dtype.name());
                let got = (wide.dot2)(&row, &x0, &x1).map(f32::to_bits);
                assert_eq!(got, want, "{} n={n}", dtype.name());
                if let Some(dot4) = wide.dot4 {
                    let got = dot4([&row, &row, &row, &row], &x0).map(f32::to_bits);
                    assert_eq!(got, [want[0]; 4], "{} n={n} dot4", dtype.name());
                }
            }
        }
    }
}

#[test]
fn every_levels_row_kernels_equal_scalar_dequantise_then_dot_on_edge_rows() {
    let mut rng = Rng::new(8);
    // Tiny activations: products that underflow to signed zeros make the sums' zero signs
    // depend on the weights' (a kernel that rounds a weight to +0.0 instead of -0.0 shows).
    let tiny = |rng: &mut Rng, n| {
        let ulp = f32::from_bits(1);
        (0..n)
            .map(|_| if rng.uniform() < 0.5 { -ulp } else { ulp })
            .collect::<Vec<f32>>()
    };
    for (level, k) in levels() {
        for dtype in ALL_DTYPES.into_iter().filter(|d| d.block_size() > 1) {
            let Some(kernels) = (k.row_kernels)(dtype) else {
                continue;
            };
            for n in [256, 608]
                .into_iter()
                .filter(|n| n % dtype.block_size() == 0)
            {
                let rows: Vec<Vec<u8>> = edge_rows(dtype, n, &mut rng)
                    .into_iter()
                    .chain(zero_rows(dtype, n))
                    .collect();
                for x in [rng.vec(n), tiny(&mut rng, n)] {
                    let deq: Vec<Vec<f32>> = rows
                        .iter()
                        .map(|row| {
                            let mut deq = vec![f32::NAN; n];
                            dequantize_row(dtype, row, &mut deq);
                            deq
                        })
                        .collect();
                    let want: Vec<u32> = deq.iter().map(|d| dot_f32(d, &x).to_bits()).collect();
                    let what = format!("{level:?} {} n={n}", dtype.name());
                    for ((row, deq), want) in rows.iter().zip(&deq).zip(&want) {
                        let mut got = vec![f32::NAN; n];
                        (kernels.dequantize)(row, &mut got);
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(deq), "{what}");
                        assert_eq!((kernels.dot)(row, &x).to_bits(), *want, "{what}");
                        let pair = (kernels.dot2)(row, &x, &x).map(f32::to_bits);
                        assert_eq!(pair, [*want; 2], "{what}");
                    }
                    if let Some(dot4) = kernels.dot4 {
                        // Every window of four rows, so each row takes every lockstep place.
                        for (r, win) in rows.windows(4).enumerate() {
                            let got = dot4(std::array::from_fn(|i| &win[i][..]), &x);
                            assert_eq!(got.map(f32::to_bits)[..], want[r..r + 4], "{what} dot4");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fused_kernels_cover_every_weight_format() {
    if isa() == Isa::Scalar {
        return;
    }
    for dtype in ALL_DTYPES {
        assert!(row_kernels(dtype).is_some(), "{}", dtype.name());
    }
}

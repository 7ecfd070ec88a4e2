//! The exact products' blocked kernel: many rows against many tokens, each dot bit-identical to
//! [`super::dot::dot_f32_avx2`].
//!
//! The 32 lanes of [`crate::simd::order`] are four independent 8-lane accumulators: lane group
//! `j` sums the elements `32 i + 8 j .. 32 i + 8 j + 8` for `i = 0, 1, ...` in order. So the
//! operands come in *lane-permuted* form ([`crate::simd::order::permute_lanes`] with segments of
//! 8): segment `j` of a vector is those elements, contiguous, then the `n % 32` tail. A dot is
//! then four plain 8-wide dots, one per segment, folded in the fixed tree, plus the tail added
//! one by one — the same operations on the same values in the same order as `dot_f32_avx2`.
//!
//! That turns the product into an ordinary blocked GEMM: a micro-kernel keeps 3 rows × 4 tokens
//! of one segment in 12 registers (3 + 4 loads per 12 FMAs), the segment is cut into blocks of
//! [`KB`] floats so that a tile's rows and a micro-panel of tokens stay in L1, and the partial
//! sums of each block carry over to the next through a small per-thread buffer (continuing an
//! FMA chain through memory changes no bit).

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::fold;
use crate::simd::order::{add_tail, LANES};

/// Width of one lane segment: one 256-bit register.
pub(crate) const SEG: usize = 8;

/// Floats of a segment per k-block: a 16-row tile's block (16 KiB) and a 4-token micro-panel
/// (4 KiB) fit in a 32 KiB L1 together.
const KB: usize = 256;

/// Rows and tokens of the micro-kernel.
const MR: usize = 3;
const NT: usize = 4;

thread_local! {
    /// Per-thread partial sums: `(segment, row, token)` → 8 lanes.
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[r * tokens + t] = dot_f32(row r, token t)` for lane-permuted rows `a` (`rows × n`) and
/// tokens `b` (`tokens × n`), each exactly as [`super::dot::dot_f32_avx2`] computes it on the
/// unpermuted vectors.
///
/// # Safety
/// Requires AVX2 and FMA; `a.len()` and `b.len()` are multiples of `n > 0` and
/// `out.len() == (a.len() / n) * (b.len() / n)`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemm_tile(a: &[f32], b: &[f32], n: usize, out: &mut [f32]) {
    let (rows, tokens) = (a.len() / n, b.len() / n);
    debug_assert_eq!(out.len(), rows * tokens);
    let main = n / LANES * LANES;
    let seg = main / 4;
    ACC.with(|acc| {
        let mut acc = acc.borrow_mut();
        // No zeroing: each segment's first block starts its sums from zero.
        acc.resize(4 * rows * tokens * SEG, 0.0);
        let c = acc.as_mut_ptr();
        let c_row = tokens * SEG;
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for j in 0..4 {
            let mut k0 = 0;
            while k0 < seg {
                let len = KB.min(seg - k0);
                let off = j * seg + k0;
                let mut t = 0;
                while t < tokens {
                    let nt = (tokens - t).min(NT);
                    let mut r = 0;
                    while r < rows {
                        let mr = (rows - r).min(MR);
                        let cp = c.add(((j * rows + r) * tokens + t) * SEG);
                        let (a0, b0) = (ap.add(r * n + off), bp.add(t * n + off));
                        match (mr, nt) {
                            (3, 4) => micro::<3, 4>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (3, 3) => micro::<3, 3>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (3, 2) => micro::<3, 2>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (3, _) => micro::<3, 1>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (2, 4) => micro::<2, 4>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (2, 3) => micro::<2, 3>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (2, 2) => micro::<2, 2>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (2, _) => micro::<2, 1>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (_, 4) => micro::<1, 4>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (_, 3) => micro::<1, 3>(a0, b0, n, len, cp, c_row, k0 == 0),
                            (_, 2) => micro::<1, 2>(a0, b0, n, len, cp, c_row, k0 == 0),
                            _ => micro::<1, 1>(a0, b0, n, len, cp, c_row, k0 == 0),
                        }
                        r += mr;
                    }
                    t += nt;
                }
                k0 += len;
            }
        }
        let lanes = |r: usize, t: usize, j: usize| {
            _mm256_loadu_ps(c.add(((j * rows + r) * tokens + t) * SEG))
        };
        for r in 0..rows {
            let a_tail = &a[r * n + main..(r + 1) * n];
            for t in 0..tokens {
                // Under 32 floats there is no block (and nothing written): the sum is zero.
                let s = match seg {
                    0 => fold([_mm256_setzero_ps(); 4]),
                    _ => fold([
                        lanes(r, t, 0),
                        lanes(r, t, 1),
                        lanes(r, t, 2),
                        lanes(r, t, 3),
                    ]),
                };
                out[r * tokens + t] = add_tail(s, a_tail, &b[t * n + main..(t + 1) * n]);
            }
        }
    })
}

/// `R` rows × `T` tokens of one segment block: `len` floats (a multiple of 8) from `a` (rows
/// `n` apart) and `b` (tokens `n` apart), accumulated onto the partial sums at `c` (rows `c_row`
/// apart, tokens 8 apart), or onto zero for a segment's `first` block.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro<const R: usize, const T: usize>(
    a: *const f32,
    b: *const f32,
    n: usize,
    len: usize,
    c: *mut f32,
    c_row: usize,
    first: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    if !first {
        for (r, row) in acc.iter_mut().enumerate() {
            for (t, v) in row.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(c.add(r * c_row + t * SEG));
            }
        }
    }
    let mut k = 0;
    while k < len {
        let mut av = [_mm256_setzero_ps(); R];
        for (r, v) in av.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(a.add(r * n + k));
        }
        // Token by token, each token's vector loaded once for the R rows.
        #[allow(clippy::needless_range_loop)]
        for t in 0..T {
            let bv = _mm256_loadu_ps(b.add(t * n + k));
            for r in 0..R {
                acc[r][t] = _mm256_fmadd_ps(av[r], bv, acc[r][t]);
            }
        }
        k += SEG;
    }
    for (r, row) in acc.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * c_row + t * SEG), *v);
        }
    }
}

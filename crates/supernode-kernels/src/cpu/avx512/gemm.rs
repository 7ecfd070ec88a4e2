//! The exact products' blocked kernel with 512-bit registers: many rows against many tokens,
//! each dot bit-identical to [`crate::cpu::avx2::dot::dot_f32_avx2`] (which the AVX-512
//! table's `dot_f32` is).
//!
//! The same scheme as the AVX2 kernel ([`crate::cpu::avx2::gemm`]), with segments of 16 lanes:
//! the operands are lane-permuted with segments of 16 ([`crate::simd::order::permute_lanes`]),
//! so segment `j` of a vector holds the elements `32 i + 16 j .. 32 i + 16 j + 16` for
//! `i = 0, 1, ...`, and one 512-bit accumulator sums two of the AVX2 kernel's 8-lane groups at
//! once: every lane sees the same values and fused multiply-adds in the same order. The fold
//! hands the four 8-lane halves to the AVX2 fold, which adds the same pairs in the same tree.
//!
//! A micro-kernel keeps 4 rows × 6 tokens of one segment in 24 registers (4 + 6 loads per 24
//! FMAs, twice the AVX2 kernel's width and a better load ratio); the segment is cut into blocks
//! of [`KB`] floats so that a tile's rows and a micro-panel of tokens stay in L1, and the
//! partial sums of each block carry over to the next through a small per-thread buffer.

use std::arch::x86_64::*;
use std::cell::RefCell;

use crate::cpu::avx2::fold;
use crate::simd::order::{add_tail, LANES};

/// Width of one lane segment: one 512-bit register.
pub(crate) const SEG: usize = 16;

/// Floats of a segment per k-block: a 16-row tile's block (16 KiB) and a 6-token micro-panel
/// (6 KiB) fit in L1 together.
const KB: usize = 256;

/// Rows and tokens of the micro-kernel.
const MR: usize = 4;
const NT: usize = 6;

thread_local! {
    /// Per-thread partial sums: `(segment, row, token)` → 16 lanes.
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[r * tokens + t] = dot_f32(row r, token t)` for lane-permuted rows `a` (`rows × n`) and
/// tokens `b` (`tokens × n`), each exactly as `dot_f32_avx2` computes it on the unpermuted
/// vectors.
///
/// # Safety
/// Requires AVX-512 F and AVX2 with FMA; `a.len()` and `b.len()` are multiples of `n > 0` and
/// `out.len() == (a.len() / n) * (b.len() / n)`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn gemm_tile(a: &[f32], b: &[f32], n: usize, out: &mut [f32]) {
    let (rows, tokens) = (a.len() / n, b.len() / n);
    debug_assert_eq!(out.len(), rows * tokens);
    let main = n / LANES * LANES;
    let seg = main / 2;
    ACC.with(|acc| {
        let mut acc = acc.borrow_mut();
        // No zeroing: each segment's first block starts its sums from zero.
        acc.resize(2 * rows * tokens * SEG, 0.0);
        let c = acc.as_mut_ptr();
        let c_row = tokens * SEG;
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for j in 0..2 {
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
                        let first = k0 == 0;
                        macro_rules! tile {
                            ($($m:literal, $t:literal);*) => {
                                match (mr, nt) {
                                    $(($m, $t) => micro::<$m, $t>(a0, b0, n, len, cp, c_row, first),)*
                                    _ => unreachable!("mr <= {MR}, nt <= {NT}"),
                                }
                            };
                        }
                        tile!(4, 6; 4, 5; 4, 4; 4, 3; 4, 2; 4, 1;
                              3, 6; 3, 5; 3, 4; 3, 3; 3, 2; 3, 1;
                              2, 6; 2, 5; 2, 4; 2, 3; 2, 2; 2, 1;
                              1, 6; 1, 5; 1, 4; 1, 3; 1, 2; 1, 1);
                        r += mr;
                    }
                    t += nt;
                }
                k0 += len;
            }
        }
        for r in 0..rows {
            let a_tail = &a[r * n + main..(r + 1) * n];
            for t in 0..tokens {
                // Under 32 floats there is no block (and nothing written): the sum is zero.
                let s = match seg {
                    0 => fold([_mm256_setzero_ps(); 4]),
                    _ => {
                        let s0 = _mm512_loadu_ps(c.add(((r) * tokens + t) * SEG));
                        let s1 = _mm512_loadu_ps(c.add(((rows + r) * tokens + t) * SEG));
                        fold([
                            _mm512_castps512_ps256(s0),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s0))),
                            _mm512_castps512_ps256(s1),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s1))),
                        ])
                    }
                };
                out[r * tokens + t] = add_tail(s, a_tail, &b[t * n + main..(t + 1) * n]);
            }
        }
    })
}

/// `R` rows × `T` tokens of one segment block: `len` floats (a multiple of 16) from `a` (rows
/// `n` apart) and `b` (tokens `n` apart), accumulated onto the partial sums at `c` (rows `c_row`
/// apart, tokens 16 apart), or onto zero for a segment's `first` block.
#[target_feature(enable = "avx512f")]
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
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    if !first {
        for (r, row) in acc.iter_mut().enumerate() {
            for (t, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(c.add(r * c_row + t * SEG));
            }
        }
    }
    let mut k = 0;
    while k < len {
        let mut av = [_mm512_setzero_ps(); R];
        for (r, v) in av.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(a.add(r * n + k));
        }
        // Token by token, each token's vector loaded once for the R rows.
        #[allow(clippy::needless_range_loop)]
        for t in 0..T {
            let bv = _mm512_loadu_ps(b.add(t * n + k));
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(av[r], bv, acc[r][t]);
            }
        }
        k += SEG;
    }
    for (r, row) in acc.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * c_row + t * SEG), *v);
        }
    }
}

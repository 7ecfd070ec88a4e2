//! The dispatched attention row kernels: dots of query heads with K rows, and weighted sums of
//! V rows, over rows of f32 or of f16 (an f16 KV cache) scattered through a paged cache.
//!
//! Invariants: each score equals [`crate::simd::dot_f32`] of its query head and K row bit for
//! bit, on every path and for both element types; each weighted sum adds `w * v` (a multiply,
//! then an add, never fused) in position order, the same bits on every path.

use half::f16;

use crate::cpu::kernels;

/// `out[h * m + p] = dot_f32(q[h * n .. (h + 1) * n], k[bases[p] .. bases[p] + n])` for every
/// position `p < m = bases.len()` and head `h < g = q.len() / n`, bit for bit: several query
/// heads against each K row, one call for all positions, head-major output.
///
/// The SIMD paths take the positions in blocks (8 with AVX-512, 4 with AVX2) and fold the
/// blocks' accumulators together: a transpose network that adds exactly the pairs of the fixed
/// tree (lane `l` + `l + 16`, `+ 8`, `+ 4`, `+ 2`, `+ 1`) for every position at once, so that
/// each result still equals its own `dot_f32` bit for bit while the fold costs a fraction.
pub fn dot_f32_rows(q: &[f32], n: usize, k: &[f32], bases: &[usize], out: &mut [f32]) {
    if check_dot_rows(q, n, k.len(), bases, out) == 0 {
        return;
    }
    // SAFETY: the table is this machine's; every row was checked above.
    unsafe { (kernels().dot_rows_f32)(q, n, k, bases, out) }
}

/// [`dot_f32_rows`] over f16 K rows (an f16 KV cache), reading half the bytes: bit for bit
/// `dot_f32_rows` of the rows widened to f32, since widening is exact and every path then does
/// the f32 path's operations in the same lanes and order.
pub fn dot_f16_rows(q: &[f32], n: usize, k: &[f16], bases: &[usize], out: &mut [f32]) {
    if check_dot_rows(q, n, k.len(), bases, out) == 0 {
        return;
    }
    // SAFETY: the table is this machine's; every row was checked above.
    unsafe { (kernels().dot_rows_f16)(q, n, k, bases, out) }
}

/// Whether every row `[b, b + n)` with `b` in `bases` lies within `len` elements.
fn rows_in_bounds(bases: &[usize], n: usize, len: usize) -> bool {
    // A branch-free max in eight independent chains rather than a short-circuiting scan: this
    // runs on every call, over every position.
    let mut maxes = [0usize; 8];
    let mut chunks = bases.chunks_exact(8);
    for c in &mut chunks {
        for (m, &b) in maxes.iter_mut().zip(c) {
            *m = (*m).max(b);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxes)
        .fold(0, |m, &b| m.max(b));
    bases.is_empty() || (n <= len && max <= len - n)
}

/// Checks the sizes of a `dot_*_rows` call (the SIMD kernels read through pointers) and
/// returns the number of query heads `g`.
fn check_dot_rows(q: &[f32], n: usize, k_len: usize, bases: &[usize], out: &[f32]) -> usize {
    let g = q.len().checked_div(n).unwrap_or(0);
    assert_eq!(q.len(), g * n, "dot_rows: q is not whole rows");
    assert_eq!(out.len(), g * bases.len(), "dot_rows: lengths differ");
    assert!(
        rows_in_bounds(bases, n, k_len),
        "dot_rows: row out of range"
    );
    g
}

/// `out[h * n + i] = Σ_p ws[h * m + p] * v[bases[p] + i]` for every column `i < n`, head
/// `h < g = out.len() / n` and position `p < m = bases.len()` (weights and output head-major),
/// summed as the scalar `o = 0; for p { o += w_p * v_p }` does, in position order with a
/// multiply then an add (never fused): bit-identical on every path. Accumulates in registers
/// across positions; the SIMD paths widen each V value once for all heads (AVX-512) and
/// process the columns 32 at a time, with masked loads for any rest.
pub fn weighted_rows_f32(ws: &[f32], v: &[f32], bases: &[usize], n: usize, out: &mut [f32]) {
    check_weighted_rows(ws, v.len(), bases, n, out.len());
    // SAFETY: the table is this machine's; every row and weight index was checked above.
    unsafe { (kernels().weighted_rows_f32)(ws, v, bases, n, out) }
}

/// [`weighted_rows_f32`] over f16 V rows (an f16 KV cache), reading half the bytes: bit for bit
/// `weighted_rows_f32` of the rows widened to f32 (exactly), on every path.
pub fn weighted_rows_f16(ws: &[f32], v: &[f16], bases: &[usize], n: usize, out: &mut [f32]) {
    check_weighted_rows(ws, v.len(), bases, n, out.len());
    // SAFETY: the table is this machine's; every row and weight index was checked above.
    unsafe { (kernels().weighted_rows_f16)(ws, v, bases, n, out) }
}

/// Checks the sizes of a `weighted_rows_*` call (the SIMD kernels read through pointers).
fn check_weighted_rows(ws: &[f32], v_len: usize, bases: &[usize], n: usize, out_len: usize) {
    let g = out_len.checked_div(n).unwrap_or(0);
    assert_eq!(out_len, g * n, "weighted_rows: out is not whole rows");
    assert_eq!(ws.len(), g * bases.len(), "weighted_rows: weights differ");
    assert!(
        rows_in_bounds(bases, n, v_len),
        "weighted_rows: row out of range"
    );
}

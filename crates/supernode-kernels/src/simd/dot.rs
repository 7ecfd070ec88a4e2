//! The dispatched f32 dot products: one, several `b` rows, and a grid of `a` rows times `b`
//! rows, each result bit for bit the [`dot_f32`] of its pair.
//!
//! Invariant: every dot sums in the fixed shape of [`crate::simd::order`], whichever kernel of the
//! process's table ([`crate::cpu::kernels`]) computes it and however many it computes at once.

use crate::cpu::kernels;

/// `sum(a[i] * b[i])` in the fixed reduction order described in [`crate::simd`].
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    // SAFETY: the table is this machine's; the lengths are equal.
    unsafe { (kernels().dot_f32)(a, b) }
}

/// `out[j] = dot_f32(a, bs[j * n .. (j + 1) * n])` with `n = a.len()`, bit for bit, for every
/// `j < out.len()`; several `b` rows at once (4 with AVX-512, 2 with AVX2), which keeps more
/// multiply-adds in flight and loads `a` once for all.
pub fn dot_f32_many(a: &[f32], bs: &[f32], out: &mut [f32]) {
    let n = a.len();
    assert_eq!(bs.len(), n * out.len(), "dot_f32_many: lengths differ");
    if n == 0 {
        out.fill(0.0);
        return;
    }
    let k = kernels();
    let mut done = 0;
    if let Some(dot4) = k.dot4 {
        for (b, o) in bs.chunks_exact(4 * n).zip(out.chunks_exact_mut(4)) {
            // SAFETY: the table is this machine's; `b` holds four rows of `n`.
            o.copy_from_slice(&unsafe { dot4(a, b) });
            done += 4;
        }
    }
    if let Some(dot2) = k.dot2 {
        let start = done;
        for (b, o) in bs[start * n..]
            .chunks_exact(2 * n)
            .zip(out[start..].chunks_exact_mut(2))
        {
            // SAFETY: the table is this machine's; `b` holds two rows of `n`.
            o.copy_from_slice(&unsafe { dot2(a, b) });
            done += 2;
        }
    }
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        *o = dot_f32(a, &bs[j * n..(j + 1) * n]);
    }
}

/// `out[r * m + j] = dot_f32(a[r * n ..][..n], bs[j * n ..][..n])`, bit for bit, for every row
/// `r` of `a` and `j < m = bs.len() / n`: [`dot_f32_many`] for several `a` rows, two at a time
/// against four `b` rows with AVX-512 (each `b` vector loaded once for both).
pub fn dot_f32_grid(a: &[f32], bs: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        out.fill(0.0);
        return;
    }
    let (rows, m) = (a.len() / n, bs.len() / n);
    assert!(
        a.len() == rows * n && bs.len() == m * n && out.len() == rows * m,
        "dot_f32_grid: lengths differ"
    );
    let mut done = 0;
    if let (4, Some(dot2x4)) = (m, kernels().dot2x4) {
        for (pair, o) in a.chunks_exact(2 * n).zip(out.chunks_exact_mut(8)) {
            let (a0, a1) = pair.split_at(n);
            // SAFETY: the table is this machine's; the lengths are checked above.
            let [d0, d1] = unsafe { dot2x4(a0, a1, bs) };
            o[..4].copy_from_slice(&d0);
            o[4..].copy_from_slice(&d1);
            done += 2;
        }
    }
    for (r, o) in out.chunks_exact_mut(m).enumerate().skip(done) {
        dot_f32_many(&a[r * n..(r + 1) * n], bs, o);
    }
}

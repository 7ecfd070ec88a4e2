//! The fixed shapes every float kernel path follows, and the deterministic exponential: the
//! leaf that the portable kernels ([`crate::cpu::scalar`]), the ISA-specific ones
//! ([`crate::cpu`]'s `avx2` and `avx512`) and the dispatch ([`crate::simd`]) share. It imports no
//! kernel.
//!
//! Invariants: a dot product's first `32 * (n / 32)` products go to lane `i % 32` of [`LANES`]
//! accumulators, folded by [`fold_lanes`], then the tail is added one by one ([`add_tail`]);
//! the softmax's f64 sum goes to lane `p % 16` of [`SUM_LANES`], folded by [`fold_sum_lanes`];
//! [`exp_f32`] is the one exponential whose operations every vector path repeats lane by lane.

/// Accumulator lanes of the fixed reduction.
pub(crate) const LANES: usize = 32;

/// The fixed tree over the 32 lanes.
pub(crate) fn fold_lanes(acc: [f32; LANES]) -> f32 {
    fold_tree(acc)
}

/// Lanes folded in halves: `l += l + N/2`, then `+ N/4`, down to `+ 1` (`N` a power of two).
fn fold_tree<T: Copy + std::ops::AddAssign, const N: usize>(mut acc: [T; N]) -> T {
    let mut width = N / 2;
    while width > 0 {
        for l in 0..width {
            let v = acc[l + width];
            acc[l] += v;
        }
        width /= 2;
    }
    acc[0]
}

/// The scalar tail, added element by element after the tree (shared by every path).
#[inline(always)]
pub(crate) fn add_tail(mut s: f32, a: &[f32], b: &[f32]) -> f32 {
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// The lane-permuted form of `src` for lane segments of `seg` lanes (a divisor of [`LANES`]):
/// segment `j` (of `LANES / seg`) holds the elements `32 i + seg j .. 32 i + seg j + seg` for
/// `i = 0, 1, ...` in order, the segments follow one another, and the `n % 32` tail comes last,
/// unchanged. Each segment is the sequence one register of `seg` lanes accumulates in a dot
/// product, so dots of permuted vectors can run as plain blocked products (`crate::matmul`).
pub(crate) fn permute_lanes(src: &[f32], seg: usize, dst: &mut [f32]) {
    assert!(src.len() == dst.len(), "permute_lanes: lengths differ");
    match seg {
        8 => permute_segments::<8>(src, dst),
        16 => permute_segments::<16>(src, dst),
        _ => panic!("permute_lanes: segments of {seg} lanes"),
    }
}

/// [`permute_lanes`] for segments of `S` lanes (fixed-size copies the compiler keeps inline).
fn permute_segments<const S: usize>(src: &[f32], dst: &mut [f32]) {
    let main = src.len() / LANES * LANES;
    let seg_len = main / LANES * S;
    let (src_main, src_tail) = src.split_at(main);
    let (dst_main, dst_tail) = dst.split_at_mut(main);
    for (j, segment) in dst_main.chunks_exact_mut(seg_len.max(1)).enumerate() {
        let parts = src_main.chunks_exact(LANES).map(|c| &c[j * S..(j + 1) * S]);
        for (d, s) in segment.chunks_exact_mut(S).zip(parts) {
            let s: &[f32; S] = s.try_into().expect("S floats");
            let d: &mut [f32; S] = d.try_into().expect("S floats");
            *d = *s;
        }
    }
    dst_tail.copy_from_slice(src_tail);
}

/// Lanes of the softmax's f64 sum: position `p` goes to lane `p % 16`.
pub(crate) const SUM_LANES: usize = 16;

/// The tree of [`exp_sum`] over its 16 lanes.
pub(crate) fn fold_sum_lanes(acc: [f64; SUM_LANES]) -> f64 {
    fold_tree(acc)
}

/// `exp(x)` computed the same way, bit for bit, on every path: the portable reference of the
/// vectorised softmax kernels (which use the same operations lane by lane, FMAs included).
///
/// Cody–Waite range reduction `x = n ln 2 + r` with `n = round_ties_even(x log2 e)` and
/// `ln 2` split in two (the high part has 9 significant bits, so `n * C1` is exact), then
/// Cephes' degree-7 polynomial for `exp(r)` on `|r| <= ln 2 / 2`, and the scaling by `2^n` as
/// two exact multiplications by `2^(n >> 1)` and `2^(n - (n >> 1))` (each a normal power of
/// two), so results down in the subnormals round once. Inputs are clamped to `[-104, 89]`:
/// below, the result rounds to 0 anyway; above, it overflows to infinity. NaN stays NaN.
/// Within 2 ulp of the exact value (tested against f64 over the whole range).
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    // Written as the vector code is (`max(lo, x)` keeps a NaN `x`, as `vmaxps lo, x` does).
    let x = if EXP_LO > x { EXP_LO } else { x };
    let x = if EXP_HI < x { EXP_HI } else { x };
    let n = (x * EXP_LOG2E).round_ties_even();
    let r = n.mul_add(-EXP_C1, x);
    let r = n.mul_add(-EXP_C2, r);
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    let ni = n as i32;
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    y * exp2i(n1) * exp2i(n2)
}

/// `2^e` for `-126 <= e <= 127`.
#[inline(always)]
fn exp2i(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Constants of [`exp_f32`].
pub(crate) const EXP_LO: f32 = -104.0;
pub(crate) const EXP_HI: f32 = 89.0;
pub(crate) const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
pub(crate) const EXP_C1: f32 = 0.693_359_4;
pub(crate) const EXP_C2: f32 = -2.121_944_4e-4;
pub(crate) const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

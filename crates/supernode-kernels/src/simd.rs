//! Runtime-dispatched SIMD kernels: the f32 dot product and fused "dequantise and dot" row
//! kernels, with one fixed reduction order.
//!
//! Every dot product here sums in the same shape, which depends on nothing but the length:
//! element `i` of the first `32 * (n / 32)` goes to lane `i % 32` of 32 accumulators, in order;
//! the lanes are then folded in a fixed tree (lane `l` += lane `l + 16`, then `+ 8`, `+ 4`, `+ 2`,
//! `+ 1`), and the `n % 32` tail elements are added one by one after that. The AVX2 path (4 × 8
//! lanes) is that shape exactly, with fused multiply-adds; the portable fallback is the same shape
//! without FMA, so the two differ in the last bits and are never mixed: the path is chosen once
//! per process. (An AVX-512 variant of the same shape measured no faster: these products are
//! bound by loads and FMA latency, not by vector width.)
//!
//! The fused row kernels of the real models' block types have AVX-512 versions (`avx512`), used
//! where the CPU has AVX-512 F/BW/VL: two 16-lane accumulators instead of four 8-lane ones, with
//! the same lanes, operations and fold, so they equal the AVX2 kernels bit for bit (decoding
//! blocks is where the wider registers pay). For the 32-element types they read the scales of
//! 16 blocks in one gather, and can take four rows in lockstep against one token (`dot4`, for
//! decode), each row in its own accumulators: the same bits, more independent work per block.
//!
//! The attention kernels (`dot_*_rows`, `weighted_rows_*`) read K and V rows of f32 or of f16 (an
//! f16 KV cache). f16 values are widened to f32 as they are loaded, which is exact, and then go
//! through the f32 kernel's operations in the same lanes and order: the two agree bit for bit on
//! every path, and the f16 rows cost half the bytes. They have AVX-512 versions too: there the
//! dots go eight positions at a time with a shared fold, and each V value is widened once for
//! all heads, which the wider registers make pay. The softmax steps (`scale_max`, `exp_sum`,
//! `scale_round`, with the deterministic [`exp_f32`]) are vectorised with portable twins that
//! give the same bits.
//!
//! The fused row kernels (`row_kernels`) decode a quantised row block by block in registers,
//! with the same float operations as [`crate::quant::dequantize_row`], and feed the values to the
//! same lanes in the same order: their result is bit-identical to `dot_f32` of the dequantised
//! row. That is what lets [`matmul`](crate::matmul::matmul) pick either path freely without
//! breaking batch invariance.

use std::sync::OnceLock;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::dtype::DType;

/// The instruction set the kernels use on this machine, detected once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// Portable code, no FMA.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
}

/// The SIMD level of this machine (detected on first use, then fixed for the process).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

/// Whether this machine has AVX-512 F, BW and VL on top of [`SimdLevel::Avx2`] (detected once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        simd_level() == SimdLevel::Avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}

/// Accumulator lanes of the fixed reduction.
const LANES: usize = 32;

/// `sum(a[i] * b[i])` in the fixed reduction order described in the module header.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    match simd_level() {
        // SAFETY: the level is only reported when the CPU has AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot_f32_avx2(a, b) },
        _ => dot_f32_scalar(a, b),
    }
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
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        if has_avx512() {
            for (b, o) in bs.chunks_exact(4 * n).zip(out.chunks_exact_mut(4)) {
                // SAFETY: `has_avx512` confirmed AVX-512 F/BW/VL besides AVX2, FMA and F16C.
                o.copy_from_slice(&unsafe { avx512::dot4(a, b) });
                done += 4;
            }
        }
        let start = done;
        for (b, o) in bs[start * n..]
            .chunks_exact(2 * n)
            .zip(out[start..].chunks_exact_mut(2))
        {
            // SAFETY: the level is only reported when the CPU has AVX2, FMA and F16C.
            o.copy_from_slice(&unsafe { x86::dot2_avx2(a, b) });
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
    #[cfg(target_arch = "x86_64")]
    if m == 4 && simd_level() == SimdLevel::Avx2 && has_avx512() {
        for (pair, o) in a.chunks_exact(2 * n).zip(out.chunks_exact_mut(8)) {
            let (a0, a1) = pair.split_at(n);
            // SAFETY: `has_avx512` confirmed AVX-512 F/BW/VL besides AVX2, FMA and F16C; the
            // lengths are checked above.
            let [d0, d1] = unsafe { avx512::dot2x4(a0, a1, bs) };
            o[..4].copy_from_slice(&d0);
            o[4..].copy_from_slice(&d1);
            done += 2;
        }
    }
    for (r, o) in out.chunks_exact_mut(m).enumerate().skip(done) {
        dot_f32_many(&a[r * n..(r + 1) * n], bs, o);
    }
}

/// An element type of the K/V rows the attention kernels read: f32, or f16 (an f16 KV cache).
/// Every path widens f16 to f32, which is exact, before the same f32 operations, so the results
/// do not depend on the element type the values were stored in.
trait KvElem: Copy {
    /// `src` as f32: itself, or widened into `buf[..src.len()]`.
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// `p` itself if the elements already are f32 (the SIMD kernels then read rows in place
    /// instead of widening them into a buffer first).
    fn as_f32(p: *const Self) -> Option<*const f32>;
}

impl KvElem for f32 {
    #[inline(always)]
    fn widen<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }

    #[inline(always)]
    fn as_f32(p: *const f32) -> Option<*const f32> {
        Some(p)
    }
}

impl KvElem for f16 {
    #[inline]
    fn widen<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf);
        buf
    }

    #[inline(always)]
    fn as_f32(_p: *const f16) -> Option<*const f32> {
        None
    }
}

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
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        if has_avx512() {
            // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C confirmed; every row checked above.
            unsafe { avx512::dot_rows_f32(q, n, k, bases, out) };
        } else {
            // SAFETY: AVX2, FMA and F16C confirmed; every row was checked above.
            unsafe { x86::dot_rows_avx2(q, n, k, bases, out) };
        }
        return;
    }
    dot_rows_scalar(q, n, k, bases, out);
}

/// [`dot_f32_rows`] over f16 K rows (an f16 KV cache), reading half the bytes: bit for bit
/// `dot_f32_rows` of the rows widened to f32, since widening is exact and every path then does
/// the f32 path's operations in the same lanes and order.
pub fn dot_f16_rows(q: &[f32], n: usize, k: &[f16], bases: &[usize], out: &mut [f32]) {
    if check_dot_rows(q, n, k.len(), bases, out) == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        if has_avx512() {
            // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C confirmed; every row checked above.
            unsafe { avx512::dot_rows_f16(q, n, k, bases, out) };
        } else {
            // SAFETY: AVX2, FMA and F16C confirmed; every row was checked above.
            unsafe { x86::dot_rows_f16_avx2(q, n, k, bases, out) };
        }
        return;
    }
    dot_rows_scalar(q, n, k, bases, out);
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

/// The portable `dot_*_rows`: [`dot_f32_scalar`] per head and row.
fn dot_rows_scalar<T: KvElem>(q: &[f32], n: usize, k: &[T], bases: &[usize], out: &mut [f32]) {
    let m = bases.len();
    for (oh, qh) in out.chunks_exact_mut(m.max(1)).zip(q.chunks_exact(n)) {
        for (o, &b) in oh.iter_mut().zip(bases) {
            *o = dot_f32_scalar(qh, &k[b..b + n]);
        }
    }
}

/// The driver of the SIMD `dot_*_rows` kernels: positions in blocks of `B`, each block's rows
/// as f32 (read in place, or widened once into a buffer by `widen(src, dst, n)` for all heads),
/// then per head `block(q_h, rows)`, which returns the `B` folded main parts (the first
/// `32 * (n / 32)` elements), and the scalar tails added after, as [`add_tail`] does for
/// `dot_f32`. A short last block repeats its first row in the unused slots and stores only its
/// own results.
///
/// # Safety
/// The sizes [`check_dot_rows`] checks; `widen(src, dst, n)` must read `src[..n]` and write
/// `dst[..n]` only; `block(q, rows)` must read no more than `q[..32 * (n / 32)]` and the same
/// of each row; both may need the CPU features of their caller.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_rows_blocked<T: KvElem, const B: usize>(
    q: &[f32],
    n: usize,
    k: &[T],
    bases: &[usize],
    out: &mut [f32],
    widen: impl Fn(*const T, *mut f32, usize),
    block: impl Fn(*const f32, &[*const f32; B]) -> [f32; B],
) {
    let (g, m) = (q.len() / n, bases.len());
    let main = n / LANES * LANES;
    let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
    let len = if T::as_f32(kp).is_some() { 0 } else { B * n };
    with_buffer(len, |buf| {
        let bp = buf.as_mut_ptr();
        for (j0, block_bases) in bases.chunks(B).enumerate().map(|(i, c)| (i * B, c)) {
            let rows: [*const f32; B] = std::array::from_fn(|j| {
                let b = block_bases[if j < block_bases.len() { j } else { 0 }];
                match T::as_f32(kp.add(b)) {
                    Some(p) => p,
                    None if j < block_bases.len() => {
                        widen(kp.add(b), bp.add(j * n), n);
                        bp.add(j * n)
                    }
                    None => bp,
                }
            });
            for h in 0..g {
                let qh = qp.add(h * n);
                let mut r = block(qh, &rows);
                if main < n {
                    let tail_q = std::slice::from_raw_parts(qh.add(main), n - main);
                    for (r, row) in r.iter_mut().zip(rows) {
                        let tail_k = std::slice::from_raw_parts(row.add(main), n - main);
                        *r = add_tail(*r, tail_q, tail_k);
                    }
                }
                let o = op.add(h * m + j0);
                std::ptr::copy_nonoverlapping(r.as_ptr(), o, block_bases.len());
            }
        }
    })
}

thread_local! {
    /// The calling thread's buffer for [`with_buffer`].
    static BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `f` of a per-thread buffer of `len` values, kept between calls (so the attention kernels
/// of a decode step allocate nothing). Its contents are whatever the last user left: `f` must
/// write before it reads. A nested call gets a buffer of its own.
fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = BUFFER.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    BUFFER.set(buf);
    r
}

/// `out[h * n + i] = Σ_p ws[h * m + p] * v[bases[p] + i]` for every column `i < n`, head
/// `h < g = out.len() / n` and position `p < m = bases.len()` (weights and output head-major),
/// summed as the scalar `o = 0; for p { o += w_p * v_p }` does, in position order with a
/// multiply then an add (never fused): bit-identical on every path. Accumulates in registers
/// across positions; the SIMD paths widen each V value once for all heads (AVX-512) and
/// process the columns 32 at a time, with masked loads for any rest.
pub fn weighted_rows_f32(ws: &[f32], v: &[f32], bases: &[usize], n: usize, out: &mut [f32]) {
    check_weighted_rows(ws, v.len(), bases, n, out.len());
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        if has_avx512() {
            // SAFETY: AVX-512 F/BW/VL, AVX2 and F16C confirmed; sizes checked above.
            unsafe { avx512::weighted_rows_f32(ws, v, bases, n, out) };
        } else {
            // SAFETY: AVX2 and F16C confirmed; every row and weight index was checked above.
            unsafe { x86::weighted_rows_avx2(ws, v, bases, n, out) };
        }
        return;
    }
    weighted_rows_scalar(ws, v, bases, n, out);
}

/// [`weighted_rows_f32`] over f16 V rows (an f16 KV cache), reading half the bytes: bit for bit
/// `weighted_rows_f32` of the rows widened to f32 (exactly), on every path.
pub fn weighted_rows_f16(ws: &[f32], v: &[f16], bases: &[usize], n: usize, out: &mut [f32]) {
    check_weighted_rows(ws, v.len(), bases, n, out.len());
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        if has_avx512() {
            // SAFETY: AVX-512 F/BW/VL, AVX2 and F16C confirmed; sizes checked above.
            unsafe { avx512::weighted_rows_f16(ws, v, bases, n, out) };
        } else {
            // SAFETY: AVX2 and F16C confirmed; every row and weight index was checked above.
            unsafe { x86::weighted_rows_f16_avx2(ws, v, bases, n, out) };
        }
        return;
    }
    weighted_rows_scalar(ws, v, bases, n, out);
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

/// The portable `weighted_rows_*`, widening each row 32 values at a time.
fn weighted_rows_scalar<T: KvElem>(
    ws: &[f32],
    v: &[T],
    bases: &[usize],
    n: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    if n == 0 {
        return;
    }
    let m = bases.len();
    let mut buf = [0f32; LANES];
    for (oh, wh) in out.chunks_exact_mut(n).zip(ws.chunks_exact(m.max(1))) {
        for (&w, &b) in wh.iter().zip(bases) {
            for (oc, vc) in oh.chunks_mut(LANES).zip(v[b..b + n].chunks(LANES)) {
                for (o, &x) in oc.iter_mut().zip(T::widen(vc, &mut buf)) {
                    *o += w * x;
                }
            }
        }
    }
}

/// Lanes of the softmax's f64 sum: position `p` goes to lane `p % 16`.
const SUM_LANES: usize = 16;

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

/// The SiLU gated unit ([`crate::ops::Activation::glu`]) over as many leading values as the
/// vector kernel takes (whole vectors of 16, with AVX-512); returns how many it did. The same
/// bits as the scalar steps.
pub(crate) fn glu_silu(gate: &mut [f32], up: &[f32]) -> usize {
    assert!(up.len() >= gate.len(), "glu_silu: lengths");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && simd_level() == SimdLevel::Avx2 {
        // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C confirmed; lengths checked.
        return unsafe { avx512::glu_silu(gate, up) };
    }
    0
}

/// `2^e` for `-126 <= e <= 127`.
#[inline(always)]
fn exp2i(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Constants of [`exp_f32`].
const EXP_LO: f32 = -104.0;
const EXP_HI: f32 = 89.0;
const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
const EXP_C1: f32 = 0.693_359_4;
const EXP_C2: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `s[i] *= scale` for every `i`; returns the largest result (`-inf` for an empty `s`).
pub fn scale_max(s: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512 F/BW/VL confirmed.
        return unsafe { avx512::scale_max(s, scale) };
    }
    let mut max = f32::NEG_INFINITY;
    for v in s.iter_mut() {
        *v *= scale;
        max = max.max(*v);
    }
    max
}

/// `s[i] = exp_f32(s[i] - max)` for every `i`; returns their sum in f64, taken in a fixed
/// shape: position `p` is added to lane `p % 16` of 16 f64 accumulators, in position order, and
/// the lanes are folded in the tree `l += l + 8`, `+ 4`, `+ 2`, `+ 1`. The same bits on every
/// path.
pub fn exp_sum(s: &mut [f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        return if has_avx512() {
            // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C confirmed.
            unsafe { avx512::exp_sum(s, max) }
        } else {
            // SAFETY: AVX2, FMA and F16C confirmed.
            unsafe { x86::exp_sum(s, max) }
        };
    }
    exp_sum_scalar(s, max)
}

/// The portable [`exp_sum`].
fn exp_sum_scalar(s: &mut [f32], max: f32) -> f64 {
    let mut acc = [0f64; SUM_LANES];
    for (i, v) in s.iter_mut().enumerate() {
        *v = exp_f32(*v - max);
        acc[i % SUM_LANES] += f64::from(*v);
    }
    fold_sum_lanes(acc)
}

/// The tree of [`exp_sum`] over its 16 lanes.
fn fold_sum_lanes(acc: [f64; SUM_LANES]) -> f64 {
    fold_tree(acc)
}

/// `s[i] *= inv` for every `i`, then rounded to the nearest f16 (ties to even, exactly
/// `half::f16::from_f32`) if `round`.
pub fn scale_round(s: &mut [f32], inv: f32, round: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        if has_avx512() {
            // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C confirmed.
            unsafe { avx512::scale_round(s, inv, round) };
        } else {
            // SAFETY: AVX2, FMA and F16C confirmed.
            unsafe { x86::scale_round(s, inv, round) };
        }
        return;
    }
    scale_round_scalar(s, inv, round);
}

/// The portable [`scale_round`].
fn scale_round_scalar(s: &mut [f32], inv: f32, round: bool) {
    for v in s.iter_mut() {
        *v *= inv;
        if round {
            *v = f16::from_f32(*v).to_f32();
        }
    }
}
/// The portable dot product: the same lanes and tree as the SIMD paths, separate multiply and
/// add. An f16 `b` is widened 32 values at a time.
fn dot_f32_scalar<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut buf = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        let cb = T::widen(cb, &mut buf);
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    add_tail(fold_lanes(acc), a_tail, T::widen(b_tail, &mut buf))
}

/// The fixed tree over the 32 lanes.
fn fold_lanes(acc: [f32; LANES]) -> f32 {
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
fn add_tail(mut s: f32, a: &[f32], b: &[f32]) -> f32 {
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// A row kernel dotting two tokens against one decode of the row.
pub(crate) type RowDot2 = fn(row: &[u8], x0: &[f32], x1: &[f32]) -> [f32; 2];

/// One dtype's SIMD row kernels. Each panics unless the row holds exactly as many elements as
/// each `x` / `y`.
#[derive(Clone, Copy)]
pub(crate) struct RowKernels {
    /// `dot_f32(dequantize(row), x)`, bit for bit, without materialising the row.
    pub dot: fn(row: &[u8], x: &[f32]) -> f32,
    /// `[dot(row, x0), dot(row, x1)]`, bit for bit, decoding the row once.
    pub dot2: RowDot2,
    /// `dequantize_row(row, y)`, bit for bit, faster.
    pub dequantize: fn(row: &[u8], y: &mut [f32]),
    /// `[dot(r, x) for r in rows]`, bit for bit, the four rows decoded in lockstep (more
    /// independent work per block for one token), where there is such a kernel.
    pub dot4: Option<RowDot4>,
}

/// A row kernel dotting four rows against one token.
pub(crate) type RowDot4 = fn(rows: [&[u8]; 4], x: &[f32]) -> [f32; 4];

/// The SIMD row kernels for `dtype` on this machine, if there are any.
#[cfg(target_arch = "x86_64")]
pub(crate) fn row_kernels(dtype: DType) -> Option<RowKernels> {
    row_kernels_at(dtype, has_avx512())
}

/// As [`row_kernels`], taking the AVX-512 versions only if `avx512` (which panics unless this
/// machine has it: that is what makes handing them out sound). The same bits either way.
#[cfg(target_arch = "x86_64")]
pub(crate) fn row_kernels_at(dtype: DType, avx512: bool) -> Option<RowKernels> {
    assert!(
        !avx512 || has_avx512(),
        "AVX-512 is not available on this CPU"
    );
    match simd_level() {
        SimdLevel::Avx2 => avx512
            .then(|| avx512::row_kernels(dtype))
            .flatten()
            .or_else(|| x86::row_kernels(dtype)),
        SimdLevel::Scalar => None,
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

/// The SIMD row kernels for `dtype` on this machine, if there are any.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn row_kernels(_dtype: DType) -> Option<RowKernels> {
    None
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX2 kernels. Every `unsafe fn` here requires the CPU features it enables;
    //! the safe wrappers handed out by [`row_kernels`] are reachable only after
    //! [`super::simd_level`] confirmed AVX2, FMA and F16C.

    use std::arch::x86_64::*;

    use half::f16;

    use super::{
        add_tail, fold_sum_lanes, scale_round_scalar, KvElem, RowKernels, EXP_C1, EXP_C2, EXP_HI,
        EXP_LO, EXP_LOG2E, EXP_P, LANES, SUM_LANES,
    };
    use crate::dtype::{DType, QK_K};
    use crate::quant::scale_min_k4;

    /// 32 lanes as four vectors: `acc[k]` holds lanes `8k .. 8k + 8`.
    type Acc = [__m256; 4];

    /// Fold the 32 lanes in the fixed tree: l += l+16, l += l+8, l += l+4, l += l+2, l += l+1.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fold(acc: Acc) -> f32 {
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
        _mm_cvtss_f32(h)
    }

    /// Accumulate 32 weights `w` (four vectors of 8, in element order) against `x[0..32]`.
    ///
    /// # Safety
    /// AVX2 and FMA; `x` must point at 32 readable floats.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma32(acc: &mut Acc, w: Acc, x: *const f32) {
        acc[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[0]);
        acc[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), acc[1]);
        acc[2] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), acc[2]);
        acc[3] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), acc[3]);
    }

    /// Four vectors of 8 floats from `p[0..32]`.
    ///
    /// # Safety
    /// AVX2; `p` must point at 32 readable floats.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load32(p: *const f32) -> Acc {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }

    /// `w * d` per vector.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scale32(w: Acc, d: __m256) -> Acc {
        [
            _mm256_mul_ps(w[0], d),
            _mm256_mul_ps(w[1], d),
            _mm256_mul_ps(w[2], d),
            _mm256_mul_ps(w[3], d),
        ]
    }

    /// # Safety
    /// Requires AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let main = a.len() / LANES * LANES;
        let mut acc = [_mm256_setzero_ps(); 4];
        for i in (0..main).step_by(LANES) {
            fma32(&mut acc, load32(a.as_ptr().add(i)), b.as_ptr().add(i));
        }
        add_tail(fold(acc), &a[main..], &b[main..])
    }

    /// Eight f16 at `p` widened to f32 (exact).
    ///
    /// # Safety
    /// AVX2 and F16C; `p` must point at 8 readable f16.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// [`super::dot_f32_rows`]: each dot exactly as [`dot_f32_avx2`] computes it, four
    /// positions at a time ([`dot4`]).
    ///
    /// # Safety
    /// Requires AVX2, FMA and F16C; `q.len() == g * n`, `out.len() == g * bases.len()`, and
    /// every `k[bases[p] .. bases[p] + n]` in bounds.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows_avx2(
        q: &[f32],
        n: usize,
        k: &[f32],
        bases: &[usize],
        out: &mut [f32],
    ) {
        let main = n / LANES * LANES;
        super::dot_rows_blocked(
            q,
            n,
            k,
            bases,
            out,
            |_, _, _| {},
            |q, rows| dot4(q, rows, main),
        );
    }

    /// [`super::dot_f16_rows`]: [`dot_rows_avx2`] over each block's K rows widened once (for
    /// all heads) into a buffer.
    ///
    /// # Safety
    /// As [`dot_rows_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows_f16_avx2(
        q: &[f32],
        n: usize,
        k: &[f16],
        bases: &[usize],
        out: &mut [f32],
    ) {
        let main = n / LANES * LANES;
        super::dot_rows_blocked(
            q,
            n,
            k,
            bases,
            out,
            |s, d, n| widen_f16(s, d, n),
            |q, rows| dot4(q, rows, main),
        );
    }

    /// `dst[..n]` = `src[..n]` widened to f32 (exact).
    ///
    /// # Safety
    /// AVX2 and F16C; `src[..n]` readable, `dst[..n]` writable.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn widen_f16(src: *const f16, dst: *mut f32, n: usize) {
        let main = n / 8 * 8;
        for i in (0..main).step_by(8) {
            _mm256_storeu_ps(dst.add(i), load8_f16(src.add(i)));
        }
        for i in main..n {
            *dst.add(i) = (*src.add(i)).to_f32();
        }
    }

    /// Lanes `8k .. 8k + 8` of the 32 accumulators of `q · rows[j]` over `q[..main]`, for the
    /// four rows: the fused multiply-adds of [`dot_f32_avx2`] in the same order per lane.
    ///
    /// # Safety
    /// AVX2 and FMA; `q` and every row readable up to `main`, a multiple of 32; `k < 4`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn lanes4(q: *const f32, rows: &[*const f32; 4], main: usize, k: usize) -> [__m256; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for i in (8 * k..main).step_by(LANES) {
            let w = _mm256_loadu_ps(q.add(i));
            for (a, r) in acc.iter_mut().zip(rows) {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(i)), *a);
            }
        }
        acc
    }

    /// The folded main parts (`q[..main]`) of the dots of `q` with four rows: per row the lanes,
    /// fused multiply-adds and tree of [`dot_f32_avx2`] and [`fold`], bit for bit. The lanes go
    /// 8 at a time (lanes are independent: few registers live), and the tree runs for the four
    /// rows at once: `l + 16` and `l + 8` as in [`fold`], then `l + 4` on two rows per vector
    /// (`vperm2f128`), `l + 2` and `l + 1` on pairs of those (`vshufps`).
    ///
    /// # Safety
    /// As [`lanes4`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot4(q: *const f32, rows: &[*const f32; 4], main: usize) -> [f32; 4] {
        let (l0, l2) = (lanes4(q, rows, main, 0), lanes4(q, rows, main, 2));
        let s02: [__m256; 4] = std::array::from_fn(|j| _mm256_add_ps(l0[j], l2[j]));
        let (l1, l3) = (lanes4(q, rows, main, 1), lanes4(q, rows, main, 3));
        // s[j] lane l: row j's lanes after `l + 16` and `l + 8`, as in `fold`.
        let s: [__m256; 4] =
            std::array::from_fn(|j| _mm256_add_ps(s02[j], _mm256_add_ps(l1[j], l3[j])));
        // l + 4: [row 0 | row 1] and [row 2 | row 3], four lanes each.
        let h = |a, b| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        };
        let (r01, r23) = (h(s[0], s[1]), h(s[2], s[3]));
        // l + 2: [row 0 (2), row 2 (2) | row 1 (2), row 3 (2)].
        let z = _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(r01, r23),
            _mm256_shuffle_ps::<0xEE>(r01, r23),
        );
        // l + 1: [row 0, row 2, .. | row 1, row 3, ..].
        let t = _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(z, z),
            _mm256_shuffle_ps::<0xDD>(z, z),
        );
        let t = _mm256_permutevar8x32_ps(t, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
        let mut r = [0f32; 4];
        _mm_storeu_ps(r.as_mut_ptr(), _mm256_castps256_ps128(t));
        r
    }

    /// [`super::weighted_rows_f32`], one head at a time.
    ///
    /// # Safety
    /// Requires AVX2 and F16C; the sizes `super::check_weighted_rows` checks.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn weighted_rows_avx2(
        ws: &[f32],
        v: &[f32],
        bases: &[usize],
        n: usize,
        out: &mut [f32],
    ) {
        weighted_rows(ws, v, bases, n, out, |p| _mm256_loadu_ps(p));
    }

    /// [`super::weighted_rows_f16`]: [`weighted_rows_avx2`] with each V value widened as it is
    /// loaded.
    ///
    /// # Safety
    /// As [`weighted_rows_avx2`].
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn weighted_rows_f16_avx2(
        ws: &[f32],
        v: &[f16],
        bases: &[usize],
        n: usize,
        out: &mut [f32],
    ) {
        weighted_rows(ws, v, bases, n, out, |p| load8_f16(p));
    }

    /// The `weighted_rows_*` kernel over rows of `T`, which `load8` reads 8 at a time as f32:
    /// per output value, the same multiplies and adds in the same order whatever `T` is.
    ///
    /// # Safety
    /// As [`weighted_rows_avx2`]; `load8(p)` must read no more than `p[0..8]`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn weighted_rows<T: KvElem>(
        ws: &[f32],
        v: &[T],
        bases: &[usize],
        n: usize,
        out: &mut [f32],
        load8: impl Fn(*const T) -> __m256,
    ) {
        if n == 0 {
            return;
        }
        let m = bases.len();
        let vp = v.as_ptr();
        for (h, oh) in out.chunks_exact_mut(n).enumerate() {
            let (wp, op) = (ws.as_ptr().add(h * m), oh.as_mut_ptr());
            let mut c = 0;
            while c + 32 <= n {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (p, &b) in bases.iter().enumerate() {
                    let w = _mm256_set1_ps(*wp.add(p));
                    let x = vp.add(b + c);
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(w, load8(x.add(8 * k))));
                    }
                }
                for (k, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(op.add(c + 8 * k), *a);
                }
                c += 32;
            }
            while c + 8 <= n {
                let mut acc = _mm256_setzero_ps();
                for (p, &b) in bases.iter().enumerate() {
                    let w = _mm256_set1_ps(*wp.add(p));
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(w, load8(vp.add(b + c))));
                }
                _mm256_storeu_ps(op.add(c), acc);
                c += 8;
            }
            let mut buf = [0f32; 1];
            for i in c..n {
                let mut o = 0f32;
                for (p, &b) in bases.iter().enumerate() {
                    let x = T::widen(std::slice::from_raw_parts(vp.add(b + i), 1), &mut buf)[0];
                    o += *wp.add(p) * x;
                }
                *op.add(i) = o;
            }
        }
    }

    /// [`super::exp_f32`] on 8 lanes: the same operations, lane by lane.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C1), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C2), r);
        let mut p = _mm256_set1_ps(EXP_P[0]);
        for &c in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let pow2 = |e| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                e,
                _mm256_set1_epi32(127),
            )))
        };
        _mm256_mul_ps(_mm256_mul_ps(y, pow2(n1)), pow2(_mm256_sub_epi32(ni, n1)))
    }

    /// [`super::exp_sum`]: 16 positions per step into 16 f64 lanes; the last, partial step
    /// goes through a padded buffer (whose padding is computed and then dropped).
    ///
    /// # Safety
    /// AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp_sum(s: &mut [f32], max: f32) -> f64 {
        let mx = _mm256_set1_ps(max);
        let mut acc = [_mm256_setzero_pd(); 4];
        let step = |acc: &mut [__m256d; 4], p: *mut f32| {
            for (k, a) in acc.chunks_exact_mut(2).enumerate() {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(8 * k)), mx));
                _mm256_storeu_ps(p.add(8 * k), e);
                a[0] = _mm256_add_pd(a[0], _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
                a[1] = _mm256_add_pd(a[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            }
        };
        let mut chunks = s.chunks_exact_mut(SUM_LANES);
        for c in &mut chunks {
            step(&mut acc, c.as_mut_ptr());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = [max; SUM_LANES];
            buf[..rest.len()].copy_from_slice(rest);
            let mut sums = [_mm256_setzero_pd(); 4];
            step(&mut sums, buf.as_mut_ptr());
            rest.copy_from_slice(&buf[..rest.len()]);
            buf[rest.len()..].fill(0.0);
            for (k, a) in acc.chunks_exact_mut(2).enumerate() {
                let e = _mm256_loadu_ps(buf.as_ptr().add(8 * k));
                a[0] = _mm256_add_pd(a[0], _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
                a[1] = _mm256_add_pd(a[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            }
        }
        let mut lanes = [0f64; SUM_LANES];
        for (k, a) in acc.iter().enumerate() {
            _mm256_storeu_pd(lanes.as_mut_ptr().add(4 * k), *a);
        }
        fold_sum_lanes(lanes)
    }

    /// [`super::scale_round`], 8 values at a time (`vcvtps2ph` rounds to nearest even, as
    /// `half` does), the rest as the portable code does.
    ///
    /// # Safety
    /// AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_round(s: &mut [f32], inv: f32, round: bool) {
        let iv = _mm256_set1_ps(inv);
        let mut chunks = s.chunks_exact_mut(8);
        for c in &mut chunks {
            let mut w = _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), iv);
            if round {
                w = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(w));
            }
            _mm256_storeu_ps(c.as_mut_ptr(), w);
        }
        scale_round_scalar(chunks.into_remainder(), inv, round);
    }

    /// Two dots `a · b[j n .. (j + 1) n]`, each exactly as [`dot_f32_avx2`] computes it.
    ///
    /// # Safety
    /// Requires AVX2 and FMA; `b.len() == 2 * a.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot2_avx2(a: &[f32], b: &[f32]) -> [f32; 2] {
        let n = a.len();
        let main = n / LANES * LANES;
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
        for i in (0..main).step_by(LANES) {
            let w = load32(a.as_ptr().add(i));
            fma32(&mut acc0, w, b.as_ptr().add(i));
            fma32(&mut acc1, w, b.as_ptr().add(n + i));
        }
        [
            add_tail(fold(acc0), &a[main..], &b[main..n]),
            add_tail(fold(acc1), &a[main..], &b[n + main..]),
        ]
    }

    /// The f16 at `p`, broadcast to 8 lanes (exact widening).
    ///
    /// # Safety
    /// AVX2 and F16C; `p` must point at 2 readable bytes.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn splat_f16(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned()))
    }

    /// The f16 at `p` as a scalar f32 (exact widening).
    ///
    /// # Safety
    /// AVX2 and F16C; `p` must point at 2 readable bytes.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn f16_scalar(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(
            p.cast::<i16>().read_unaligned(),
        )))
    }

    /// The 32 bytes of `v`, in order, zero-extended and converted to floats.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn u8x32_to_f32(v: __m256i) -> Acc {
        let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        [
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi))),
        ]
    }

    /// As [`u8x32_to_f32`], sign-extending.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn i8x32_to_f32(v: __m256i) -> Acc {
        let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        [
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))),
        ]
    }

    /// Elements 0..16 (low nibbles) then 16..32 (high nibbles) of a 16-byte nibble block.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn nibbles16(qs: __m128i) -> __m256i {
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(qs, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), m);
        _mm256_set_m128i(hi, lo)
    }

    /// Store 32 values at `y[0..32]`.
    ///
    /// # Safety
    /// AVX2; `y` must point at 32 writable floats.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store32(y: *mut f32, w: Acc) {
        _mm256_storeu_ps(y, w[0]);
        _mm256_storeu_ps(y.add(8), w[1]);
        _mm256_storeu_ps(y.add(16), w[2]);
        _mm256_storeu_ps(y.add(24), w[3]);
    }

    // Decoders: each walks a row and hands every run of 32 consecutive values, with the index
    // of its first element, to `f`. The values are computed with exactly the float operations of
    // `crate::quant`'s scalar dequantisers. The plain-float decoders cover the first
    // `32 * (n / 32)` elements; the caller handles the tail.
    //
    // # Safety (all decoders)
    // AVX2, FMA and F16C; `row` holds whole blocks (plain floats: at least `n` elements).

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_f32(row: &[u8], n: usize, mut f: impl FnMut(usize, Acc)) {
        let p = row.as_ptr().cast::<f32>();
        for i in (0..n / LANES * LANES).step_by(LANES) {
            f(i, load32(p.add(i)));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_f16(row: &[u8], n: usize, mut f: impl FnMut(usize, Acc)) {
        for i in (0..n / LANES * LANES).step_by(LANES) {
            let h = row.as_ptr().add(2 * i);
            f(
                i,
                [
                    _mm256_cvtph_ps(_mm_loadu_si128(h.cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(h.add(16).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(h.add(32).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(h.add(48).cast())),
                ],
            );
        }
    }

    /// Eight bf16 at `p` widened to f32 (exact).
    ///
    /// # Safety
    /// AVX2; `p` must point at 16 readable bytes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn bf16x8(p: *const u8) -> __m256 {
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_bf16(row: &[u8], n: usize, mut f: impl FnMut(usize, Acc)) {
        for i in (0..n / LANES * LANES).step_by(LANES) {
            let h = row.as_ptr().add(2 * i);
            f(
                i,
                [
                    bf16x8(h),
                    bf16x8(h.add(16)),
                    bf16x8(h.add(32)),
                    bf16x8(h.add(48)),
                ],
            );
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_q4_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
        let eight = _mm256_set1_epi8(8);
        for (i, b) in row.chunks_exact(18).enumerate() {
            let d = splat_f16(b.as_ptr());
            let q = nibbles16(_mm_loadu_si128(b.as_ptr().add(2).cast()));
            f(32 * i, scale32(i8x32_to_f32(_mm256_sub_epi8(q, eight)), d));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_q4_1(row: &[u8], mut f: impl FnMut(usize, Acc)) {
        for (i, b) in row.chunks_exact(20).enumerate() {
            let (d, m) = (splat_f16(b.as_ptr()), splat_f16(b.as_ptr().add(2)));
            let q = u8x32_to_f32(nibbles16(_mm_loadu_si128(b.as_ptr().add(4).cast())));
            let q = scale32(q, d);
            f(
                32 * i,
                [
                    _mm256_add_ps(q[0], m),
                    _mm256_add_ps(q[1], m),
                    _mm256_add_ps(q[2], m),
                    _mm256_add_ps(q[3], m),
                ],
            );
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_q8_0(row: &[u8], mut f: impl FnMut(usize, Acc)) {
        for (i, b) in row.chunks_exact(34).enumerate() {
            let d = splat_f16(b.as_ptr());
            let q = i8x32_to_f32(_mm256_loadu_si256(b.as_ptr().add(2).cast()));
            f(32 * i, scale32(q, d));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_q4_k(row: &[u8], mut f: impl FnMut(usize, Acc)) {
        let m4 = _mm256_set1_epi8(0x0F);
        for (i, b) in row.chunks_exact(144).enumerate() {
            let (d, dmin) = (f16_scalar(b.as_ptr()), f16_scalar(b.as_ptr().add(2)));
            let scales = &b[4..16];
            for c in 0..4 {
                let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c).cast());
                let halves = [
                    _mm256_and_si256(q, m4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
                ];
                for (h, q) in halves.into_iter().enumerate() {
                    let (sc, m) = scale_min_k4(2 * c + h, scales);
                    let q = scale32(u8x32_to_f32(q), _mm256_set1_ps(d * sc as f32));
                    let dm = _mm256_set1_ps(dmin * m as f32);
                    f(
                        QK_K * i + 64 * c + 32 * h,
                        [
                            _mm256_sub_ps(q[0], dm),
                            _mm256_sub_ps(q[1], dm),
                            _mm256_sub_ps(q[2], dm),
                            _mm256_sub_ps(q[3], dm),
                        ],
                    );
                }
            }
        }
    }

    /// The 6-bit quants of half `n` (0 or 1) of the Q6_K block at `p`, as four vectors of 32
    /// unsigned bytes (0..64) in element order: ggml's `ql`/`qh` interleave undone.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn q6_k_unpack(p: *const u8, n: usize) -> [__m256i; 4] {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x30);
        let ql0 = _mm256_loadu_si256(p.add(64 * n).cast());
        let ql1 = _mm256_loadu_si256(p.add(64 * n + 32).cast());
        let qh = _mm256_loadu_si256(p.add(128 + 32 * n).cast());
        [
            _mm256_or_si256(
                _mm256_and_si256(ql0, m4),
                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
            ),
            _mm256_or_si256(
                _mm256_and_si256(ql1, m4),
                _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                _mm256_and_si256(qh, m2),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
            ),
        ]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_q6_k(row: &[u8], mut f: impl FnMut(usize, Acc)) {
        let k32 = _mm256_set1_epi8(32);
        for (i, b) in row.chunks_exact(210).enumerate() {
            let d = f16_scalar(b.as_ptr().add(208));
            let p = b.as_ptr();
            for n in 0..2 {
                let q = q6_k_unpack(p, n);
                for (k, q) in q.into_iter().enumerate() {
                    let s = 192 + 8 * n + 2 * k;
                    let ds0 = _mm256_set1_ps(d * b[s] as i8 as f32);
                    let ds1 = _mm256_set1_ps(d * b[s + 1] as i8 as f32);
                    let v = i8x32_to_f32(_mm256_sub_epi8(q, k32));
                    f(
                        QK_K * i + 128 * n + 32 * k,
                        [
                            _mm256_mul_ps(v[0], ds0),
                            _mm256_mul_ps(v[1], ds0),
                            _mm256_mul_ps(v[2], ds1),
                            _mm256_mul_ps(v[3], ds1),
                        ],
                    );
                }
            }
        }
    }

    /// Generates, for one decoder, a module with the kernels of [`RowKernels`]: `dot`
    /// (`dot_f32(dequantize(row), x)`), `dot2` (two tokens against one decode of the row) and
    /// `dequant` (into `y`). `# Safety` for each: AVX2, FMA, F16C and matching sizes.
    macro_rules! block_kernels {
        ($name:ident, $decode:ident) => {
            mod $name {
                use super::*;

                #[target_feature(enable = "avx2,fma,f16c")]
                pub(super) unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    $decode(row, |i, w| fma32(&mut acc, w, x.as_ptr().add(i)));
                    fold(acc)
                }

                #[target_feature(enable = "avx2,fma,f16c")]
                pub(super) unsafe fn dot2(row: &[u8], x0: &[f32], x1: &[f32]) -> [f32; 2] {
                    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                    $decode(row, |i, w| {
                        fma32(&mut acc0, w, x0.as_ptr().add(i));
                        fma32(&mut acc1, w, x1.as_ptr().add(i));
                    });
                    [fold(acc0), fold(acc1)]
                }

                #[target_feature(enable = "avx2,fma,f16c")]
                pub(super) unsafe fn dequant(row: &[u8], y: &mut [f32]) {
                    $decode(row, |i, w| store32(y.as_mut_ptr().add(i), w));
                }
            }
        };
    }

    block_kernels!(q4_0, decode_q4_0);
    block_kernels!(q4_1, decode_q4_1);
    block_kernels!(q8_0, decode_q8_0);
    block_kernels!(q4_k, decode_q4_k);
    block_kernels!(q6_k, decode_q6_k);

    /// As [`block_kernels`], for plain floats: the tail past the last 32 elements goes through
    /// the scalar dequantiser, and `dot` adds it after the tree, as `dot_f32` does.
    macro_rules! float_kernels {
        ($name:ident, $dtype:expr, $decode:ident) => {
            mod $name {
                use super::*;

                /// The tail past the last 32 elements of `row`, dequantised.
                fn tail<'a>(row: &[u8], n: usize, buf: &'a mut [f32; LANES]) -> &'a [f32] {
                    let main = n / LANES * LANES;
                    let tail = &mut buf[..n - main];
                    crate::quant::dequantize_row($dtype, &row[main * $dtype.block_bytes()..], tail);
                    tail
                }

                #[target_feature(enable = "avx2,fma,f16c")]
                pub(super) unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    $decode(row, x.len(), |i, w| fma32(&mut acc, w, x.as_ptr().add(i)));
                    let main = x.len() / LANES * LANES;
                    add_tail(fold(acc), tail(row, x.len(), &mut [0.0; LANES]), &x[main..])
                }

                #[target_feature(enable = "avx2,fma,f16c")]
                pub(super) unsafe fn dot2(row: &[u8], x0: &[f32], x1: &[f32]) -> [f32; 2] {
                    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                    $decode(row, x0.len(), |i, w| {
                        fma32(&mut acc0, w, x0.as_ptr().add(i));
                        fma32(&mut acc1, w, x1.as_ptr().add(i));
                    });
                    let main = x0.len() / LANES * LANES;
                    let mut buf = [0.0; LANES];
                    let tail = tail(row, x0.len(), &mut buf);
                    [
                        add_tail(fold(acc0), tail, &x0[main..]),
                        add_tail(fold(acc1), tail, &x1[main..]),
                    ]
                }

                #[target_feature(enable = "avx2,fma,f16c")]
                pub(super) unsafe fn dequant(row: &[u8], y: &mut [f32]) {
                    $decode(row, y.len(), |i, w| store32(y.as_mut_ptr().add(i), w));
                    let main = y.len() / LANES * LANES;
                    let rest = &row[main * $dtype.block_bytes()..];
                    crate::quant::dequantize_row($dtype, rest, &mut y[main..]);
                }
            }
        };
    }

    float_kernels!(f32_row, DType::F32, decode_f32);
    float_kernels!(f16_row, DType::F16, decode_f16);
    float_kernels!(bf16_row, DType::BF16, decode_bf16);

    /// Checks the sizes the kernels rely on: they read and write through pointers.
    #[inline(always)]
    fn check(dtype: DType, row: &[u8], n: usize) {
        assert_eq!(dtype.row_bytes(n), Some(row.len()), "row kernel: bad sizes");
    }

    /// Safe entry points for one dtype's kernels.
    macro_rules! entry {
        ($dtype:expr, $name:ident) => {
            RowKernels {
                dot: |r, x| {
                    check($dtype, r, x.len());
                    // SAFETY: see `row_kernels`; sizes checked.
                    unsafe { $name::dot(r, x) }
                },
                dot2: |r, x0, x1| {
                    check($dtype, r, x0.len());
                    check($dtype, r, x1.len());
                    // SAFETY: see `row_kernels`; sizes checked.
                    unsafe { $name::dot2(r, x0, x1) }
                },
                dequantize: |r, y| {
                    check($dtype, r, y.len());
                    // SAFETY: see `row_kernels`; sizes checked.
                    unsafe { $name::dequant(r, y) }
                },
                dot4: None,
            }
        };
    }

    /// The kernels for `dtype`. Reachable only through `super::row_kernels`, which asks for
    /// them only after `simd_level` found AVX2, FMA and F16C: that is what makes the wrappers'
    /// calls sound.
    pub(super) fn row_kernels(dtype: DType) -> Option<RowKernels> {
        Some(match dtype {
            DType::F32 => entry!(DType::F32, f32_row),
            DType::F16 => entry!(DType::F16, f16_row),
            DType::BF16 => entry!(DType::BF16, bf16_row),
            DType::Q4_0 => entry!(DType::Q4_0, q4_0),
            DType::Q4_1 => entry!(DType::Q4_1, q4_1),
            DType::Q8_0 => entry!(DType::Q8_0, q8_0),
            DType::Q4K => entry!(DType::Q4K, q4_k),
            DType::Q6K => entry!(DType::Q6K, q6_k),
            DType::Q5_0 | DType::Q5_1 | DType::Q2K | DType::Q3K | DType::Q5K => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::ALL_DTYPES;
    use crate::quant::tests::{edge_rows, Rng};
    use crate::quant::{dequantize_row, quantize_row};

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
                for g in [1, 3, 4] {
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
                    #[cfg(target_arch = "x86_64")]
                    if simd_level() == SimdLevel::Avx2 {
                        // SAFETY: AVX2, FMA and F16C confirmed; the rows are in bounds.
                        let avx2 = run(&|o| unsafe { x86::dot_rows_avx2(&q, n, &kw, &bases, o) });
                        assert_eq!(avx2, want, "avx2 {case}");
                        let avx2 =
                            run(&|o| unsafe { x86::dot_rows_f16_avx2(&q, n, &k16, &bases, o) });
                        assert_eq!(avx2, want, "avx2 f16 {case}");
                        if has_avx512() {
                            // SAFETY: AVX-512 F/BW/VL confirmed besides; rows in bounds.
                            let wide =
                                run(&|o| unsafe { avx512::dot_rows_f32(&q, n, &kw, &bases, o) });
                            assert_eq!(wide, want, "avx512 {case}");
                            let wide =
                                run(&|o| unsafe { avx512::dot_rows_f16(&q, n, &k16, &bases, o) });
                            assert_eq!(wide, want, "avx512 f16 {case}");
                        }
                    }
                    if simd_level() == SimdLevel::Scalar {
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
                #[cfg(target_arch = "x86_64")]
                if simd_level() == SimdLevel::Avx2 {
                    // SAFETY: AVX2 and F16C confirmed; the rows and weights are in bounds.
                    let avx2 =
                        run(&|o| unsafe { x86::weighted_rows_f16_avx2(&ws, &v16, &bases, n, o) });
                    assert_eq!(avx2, reference, "{case}");
                    let avx2 = run(&|o| unsafe { x86::weighted_rows_avx2(&ws, &vw, &bases, n, o) });
                    assert_eq!(avx2, reference, "{case}");
                    if has_avx512() {
                        // SAFETY: AVX-512 F/BW/VL confirmed besides; sizes in bounds.
                        let wide =
                            run(&|o| unsafe { avx512::weighted_rows_f16(&ws, &v16, &bases, n, o) });
                        assert_eq!(wide, reference, "avx512 {case}");
                        let wide =
                            run(&|o| unsafe { avx512::weighted_rows_f32(&ws, &vw, &bases, n, o) });
                        assert_eq!(wide, reference, "avx512 {case}");
                    }
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
            #[cfg(target_arch = "x86_64")]
            if simd_level() == SimdLevel::Avx2 {
                let mut avx2 = xs[xs.len() - len..].to_vec();
                // SAFETY: AVX2, FMA and F16C confirmed.
                let s = unsafe { x86::exp_sum(&mut avx2, 0.0) };
                assert_eq!(bits(&avx2), bits(&slow), "len={len}");
                assert_eq!(s.to_bits(), want.to_bits(), "len={len}");
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
                #[cfg(target_arch = "x86_64")]
                if simd_level() == SimdLevel::Avx2 {
                    let mut avx2 = xs.clone();
                    // SAFETY: AVX2, FMA and F16C confirmed.
                    unsafe { x86::scale_round(&mut avx2, inv, round) };
                    assert_eq!(bits(&avx2), bits(&want), "round={round} inv={inv}");
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
    #[cfg(target_arch = "x86_64")]
    fn avx512_row_kernels_equal_scalar_dequantise_then_dot_on_edge_rows() {
        if !has_avx512() {
            return;
        }
        let mut rng = Rng::new(7);
        for dtype in ALL_DTYPES.into_iter().filter(|d| d.block_size() > 1) {
            let Some(wide) = avx512::row_kernels(dtype) else {
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
    fn fused_kernels_cover_the_real_models_formats() {
        if simd_level() == SimdLevel::Scalar {
            return;
        }
        for dtype in [DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q6K, DType::F16] {
            assert!(row_kernels(dtype).is_some(), "{}", dtype.name());
        }
    }
}

//! The portable kernels: the float kernels' reference shapes computed with a separate multiply
//! and add (no FMA), and the table of the [`super::Isa::Scalar`] level, which also takes the
//! scalar references of the quantised numerics ([`crate::qdot::reference`]).
//!
//! Invariants: the same lanes, trees and orders as the vector paths; the dot products differ from
//! the FMA paths in the last bits, which is why one table is chosen per process. The softmax steps
//! and the weighted sums have no FMA on any path and give the same bits everywhere.

use half::f16;

use super::table::Kernels;
use crate::dtype::DType;
use crate::qdot::packed::layout::{Act, Format, PANEL};
use crate::qdot::reference::{
    f16_at, quantize_q8_0_ref, quantize_q8_1_ref, quantize_q8_k_ref, scalar_kernel,
};
use crate::simd::elem::KvElem;
use crate::simd::order::{add_tail, exp_f32, fold_lanes, fold_sum_lanes, LANES, SUM_LANES};
use crate::simd::rows::RowKernels;

/// The [`super::Isa::Scalar`] kernels.
pub(super) const KERNELS: Kernels = Kernels {
    dot_f32: dot_f32_scalar::<f32>,
    dot2: None,
    dot4: None,
    dot2x4: None,
    gemm: None,
    dot_rows_f32: dot_rows_scalar::<f32>,
    dot_rows_f16: dot_rows_scalar::<f16>,
    weighted_rows_f32: weighted_rows_scalar::<f32>,
    weighted_rows_f16: weighted_rows_scalar::<f16>,
    scale_max: scale_max_scalar,
    exp_sum: exp_sum_scalar,
    scale_round: scale_round_scalar,
    glu_silu: None,
    glu_gelu_table: None,
    row_kernels: no_row_kernels,
    quantize_q8_0: quantize_q8_0_ref,
    quantize_q8_1: quantize_q8_1_ref,
    quantize_q8_k: quantize_q8_k_ref,
    round_f16: None,
    quant_kernel: scalar_kernel,
    panel: Some(panel_scalar),
    panel_k_quants: false,
};

/// The portable panel kernel of the 32-element types: each token against the 16 rows of one
/// panel in the packed reference order ([`crate::qdot::packed`]'s module docs), the products of
/// a group of 4 elements summed for all 16 rows from one contiguous run of 64 bytes.
fn panel_scalar(fmt: Format, p: &[u8], blocks: usize, acts: &[Act<'_>], out: &mut [[f32; PANEL]]) {
    let block_bytes = PANEL * fmt.block_bytes();
    let (m_off, qh_off, qs_off) = fmt.offsets();
    let q5 = matches!(fmt, Format::Q5_0 | Format::Q5_1);
    for (act, out) in acts.iter().zip(out.iter_mut()) {
        let mut acc = [0f32; PANEL];
        for (b, pb) in p.chunks_exact(block_bytes).take(blocks).enumerate() {
            let (qs, dx, min_x, xsum) = match *act {
                Act::Q8_0(ys, sums) => (&ys[b].qs, ys[b].d, None, sums[b]),
                Act::Q8_1(ys) => (&ys[b].qs, ys[b].d, Some(ys[b].s), 0),
                Act::Q8K(..) => unreachable!("the portable level does not pack K-quants"),
            };
            let mut isum = [0i32; PANEL];
            for g in 0..8 {
                let (line, shift) = match fmt {
                    Format::Q8_0 => (&pb[qs_off + 64 * g..][..64], 0),
                    _ => (&pb[qs_off + 64 * (g % 4)..][..64], 4 * (g / 4)),
                };
                let mask = if q5 {
                    u64::from_le_bytes(pb[qh_off + 8 * g..][..8].try_into().unwrap())
                } else {
                    0
                };
                for (i, &byte) in line.iter().enumerate() {
                    let mut v = if fmt == Format::Q8_0 {
                        byte as i32
                    } else {
                        (byte >> shift & 0xF) as i32
                    };
                    v |= ((mask >> i & 1) << 4) as i32;
                    isum[i / 4] += v * qs[4 * g + i % 4] as i32;
                }
            }
            for r in 0..PANEL {
                let isum = isum[r] - fmt.offset() * xsum;
                let mut term = (f16_at(pb, 2 * r) * dx) * isum as f32;
                if let Some(sx) = min_x {
                    term += f16_at(pb, m_off + 2 * r) * sx;
                }
                acc[r] += term;
            }
        }
        *out = acc;
    }
}

/// No fused row kernels: the portable path dequantises rows, then dots them.
fn no_row_kernels(_dtype: DType) -> Option<RowKernels> {
    None
}

/// The portable dot product: the same lanes and tree as the SIMD paths, separate multiply and
/// add. An f16 `b` is widened 32 values at a time.
pub(crate) fn dot_f32_scalar<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
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

/// The portable `dot_*_rows`: [`dot_f32_scalar`] per head and row.
pub(crate) fn dot_rows_scalar<T: KvElem>(
    q: &[f32],
    n: usize,
    k: &[T],
    bases: &[usize],
    out: &mut [f32],
) {
    let m = bases.len();
    for (oh, qh) in out.chunks_exact_mut(m.max(1)).zip(q.chunks_exact(n)) {
        for (o, &b) in oh.iter_mut().zip(bases) {
            *o = dot_f32_scalar(qh, &k[b..b + n]);
        }
    }
}

/// The portable `weighted_rows_*`, widening each row 32 values at a time.
pub(crate) fn weighted_rows_scalar<T: KvElem>(
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

/// The portable `scale_max`.
pub(crate) fn scale_max_scalar(s: &mut [f32], scale: f32) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for v in s.iter_mut() {
        *v *= scale;
        max = max.max(*v);
    }
    max
}

/// The portable [`crate::simd::exp_sum`].
pub(crate) fn exp_sum_scalar(s: &mut [f32], max: f32) -> f64 {
    let mut acc = [0f64; SUM_LANES];
    for (i, v) in s.iter_mut().enumerate() {
        *v = exp_f32(*v - max);
        acc[i % SUM_LANES] += f64::from(*v);
    }
    fold_sum_lanes(acc)
}

/// The portable [`crate::simd::scale_round`].
pub(crate) fn scale_round_scalar(s: &mut [f32], inv: f32, round: bool) {
    for v in s.iter_mut() {
        *v *= inv;
        if round {
            *v = f16::from_f32(*v).to_f32();
        }
    }
}

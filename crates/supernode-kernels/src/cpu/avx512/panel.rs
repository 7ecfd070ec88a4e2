//! AVX-512 VNNI kernels of the packed matrices ([`crate::qdot::packed`]): 1 to 4 tokens against
//! one 16-row panel, one 32-bit lane per row, so the float steps run for 16 rows in one register
//! with no horizontal reduction.
//!
//! Invariant: per row, the packed reference order ([`crate::qdot::packed`]'s module docs) for the
//! 32-element types, and the scalar `vec_dot_q4_k_q8_k` / `vec_dot_q6_k_q8_k` order for Q4_K
//! and Q6_K, lane by lane.

use std::arch::x86_64::*;

use crate::cpu::avx2::panel::{format_of, k_acts, prefetch_ahead};
use crate::qdot::blocks::{BlockQ8_0, BlockQ8_1};
use crate::qdot::packed::layout::{
    Act, Format, PANEL, Q4K_BYTES, Q4K_DMIN, Q4K_MINS, Q4K_QS, Q4K_SCALES, Q6K_BYTES, Q6K_QH,
    Q6K_QL, Q6K_SCALES,
};

/// The 8 groups of a packed panel-block's stored weights (unsigned bytes; lane `r`, byte `j` of
/// group `g` is element `4g + j` of row `r`), for format `F` (see [`Format`]).
///
/// # Safety
/// AVX-512 F/BW; `p` points at a whole panel-block of the format.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn panel_values<const F: u8>(p: *const u8) -> [__m512i; 8] {
    let fmt = format_of::<F>();
    let (_, qh_off, qs_off) = fmt.offsets();
    let q = p.add(qs_off);
    if fmt == Format::Q8_0 {
        return std::array::from_fn(|g| _mm512_loadu_si512(q.add(64 * g).cast()));
    }
    let m4 = _mm512_set1_epi8(0xF);
    let mut w = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        let raw = _mm512_loadu_si512(q.add(64 * k).cast());
        w[k] = _mm512_and_si512(raw, m4);
        w[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4);
    }
    if matches!(fmt, Format::Q5_0 | Format::Q5_1) {
        let bit5 = _mm512_set1_epi8(0x10);
        for (g, v) in w.iter_mut().enumerate() {
            let mask = p.add(qh_off + 8 * g).cast::<u64>().read_unaligned();
            *v = _mm512_mask_add_epi8(*v, mask, *v, bit5);
        }
    }
    w
}

/// `N` tokens against one panel of format `F`: per block, 8 `vpdpbusd` per token give the 16
/// rows' exact block sums, then `acc = acc + (d_w * d_x) * isum` (plus `m_w * s_x` for types
/// with a min) on all 16 rows at once: the packed reference order's steps, lane by lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn panel_n<const F: u8, const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [__m512; N] {
    let fmt = format_of::<F>();
    let min = fmt.has_min();
    let (m_off, _, _) = fmt.offsets();
    let block_bytes = PANEL * fmt.block_bytes();
    // Each token's first activation block and (Q8_0) block sums, as plain pointers, so that
    // the loop has no branch on the activation type: `d` at byte 0 of a block, `s` (Q8_1) at
    // byte 4, the quants after.
    let (stride, qs_off) = if min {
        (
            std::mem::size_of::<BlockQ8_1>(),
            std::mem::offset_of!(BlockQ8_1, qs),
        )
    } else {
        (
            std::mem::size_of::<BlockQ8_0>(),
            std::mem::offset_of!(BlockQ8_0, qs),
        )
    };
    let ys: [*const u8; N] = std::array::from_fn(|t| match acts[t] {
        Act::Q8_0(ys, _) => ys.as_ptr().cast(),
        Act::Q8_1(ys) => ys.as_ptr().cast(),
        Act::Q8K(ys, _) => ys.as_ptr().cast(),
    });
    let sums: [*const i32; N] = std::array::from_fn(|t| match acts[t] {
        Act::Q8_0(_, sums) => sums.as_ptr(),
        _ => std::ptr::null(),
    });
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let pb = p.add(b * block_bytes);
        prefetch_ahead(pb, block_bytes);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(pb.cast()));
        let mw = if min {
            _mm512_cvtph_ps(_mm256_loadu_si256(pb.add(m_off).cast()))
        } else {
            _mm512_setzero_ps()
        };
        let w = panel_values::<F>(pb);
        for t in 0..N {
            let y = ys[t].add(b * stride);
            let qs = y.add(qs_off);
            let x = |g: usize| _mm512_set1_epi32(qs.add(4 * g).cast::<i32>().read_unaligned());
            let mut even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], x(0));
            let mut odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], x(1));
            for g in (2..8).step_by(2) {
                even = _mm512_dpbusd_epi32(even, w[g], x(g));
                odd = _mm512_dpbusd_epi32(odd, w[g + 1], x(g + 1));
            }
            let mut isum = _mm512_add_epi32(even, odd);
            if !min {
                let corr = fmt.offset() * *sums[t].add(b);
                isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(corr));
            }
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(y.cast::<f32>().read()));
            let mut term = _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum));
            if min {
                let sx = _mm512_set1_ps(y.add(4).cast::<f32>().read());
                term = _mm512_add_ps(term, _mm512_mul_ps(mw, sx));
            }
            acc[t] = _mm512_add_ps(acc[t], term);
        }
    }
    acc
}

/// 4 activations at `p` broadcast to every 32-bit lane.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// `N` tokens against one Q4_K panel: per super-block, for each pair of sub-blocks (a chunk of
/// the row's nibble bytes) 8 `vpdpbusd` per sub-block give the 16 rows' exact sub-block sums,
/// multiplied by their scales into `sumi`; 4 `vpdpwssd` give `summ` (mins times the activation
/// sub-block sums); then the scalar `vec_dot_q4_k_q8_k`'s two float steps on 16 rows at once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn panel_q4_k<const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [__m512; N] {
    let (ys, sums) = k_acts(acts);
    let m4 = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let pb = p.add(b * Q4K_BYTES);
        prefetch_ahead(pb, Q4K_BYTES);
        let mut sumi = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            let q = pb.add(Q4K_QS + 512 * c);
            let raw: [__m512i; 8] =
                std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k).cast()));
            let lo = raw.map(|r| _mm512_and_si512(r, m4));
            let hi = raw.map(|r| _mm512_and_si512(_mm512_srli_epi16::<4>(r), m4));
            let scale = |j: usize| {
                _mm512_cvtepu8_epi32(_mm_loadu_si128(pb.add(Q4K_SCALES + 16 * j).cast()))
            };
            let (s_lo, s_hi) = (scale(2 * c), scale(2 * c + 1));
            for t in 0..N {
                let x = (*ys[t].add(b)).qs.as_ptr().add(64 * c);
                let mut a = _mm512_setzero_si512();
                let mut h = _mm512_setzero_si512();
                for k in 0..8 {
                    a = _mm512_dpbusd_epi32(a, lo[k], bcast4(x.add(4 * k)));
                    h = _mm512_dpbusd_epi32(h, hi[k], bcast4(x.add(32 + 4 * k)));
                }
                let scaled =
                    _mm512_add_epi32(_mm512_mullo_epi32(a, s_lo), _mm512_mullo_epi32(h, s_hi));
                sumi[t] = _mm512_add_epi32(sumi[t], scaled);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(pb.cast()));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(pb.add(Q4K_DMIN).cast()));
        let mins: [__m512i; 4] = std::array::from_fn(|j| {
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(pb.add(Q4K_MINS + 32 * j).cast()))
        });
        for t in 0..N {
            let s = sums[t].add(8 * b);
            let mut summ = _mm512_setzero_si512();
            for (j, m) in mins.iter().enumerate() {
                let pair = _mm512_set1_epi32(s.add(2 * j).cast::<i32>().read_unaligned());
                summ = _mm512_dpwssd_epi32(summ, *m, pair);
            }
            let dx = _mm512_set1_ps((*ys[t].add(b)).d);
            let term = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(sumi[t]));
            acc[t] = _mm512_add_ps(acc[t], term);
            let term = _mm512_mul_ps(_mm512_mul_ps(dmin, dx), _mm512_cvtepi32_ps(summ));
            acc[t] = _mm512_sub_ps(acc[t], term);
        }
    }
    acc
}

/// `N` tokens against one Q6_K panel: per pair of sub-blocks `s`, `s + 8` (four `ql` vectors and
/// their high bits), 4 `vpdpbusd` each give the 16 rows' sums of the unsigned six-bit values
/// times the activations; `32 Σ x` comes off (the `- 32` of each weight), the signed scale
/// multiplies, all exact in integers; then the scalar `vec_dot_q6_k_q8_k`'s float step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn panel_q6_k<const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [__m512; N] {
    let (ys, _) = k_acts(acts);
    let m4 = _mm512_set1_epi8(0xF);
    let m2 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let pb = p.add(b * Q6K_BYTES);
        prefetch_ahead(pb, Q6K_BYTES);
        let mut sumi = [_mm512_setzero_si512(); N];
        for s in 0..8 {
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for j in 0..4 {
                let v = 4 * s + j;
                let raw = _mm512_loadu_si512(pb.add(Q6K_QL + 64 * v).cast());
                let h = _mm512_loadu_si512(pb.add(Q6K_QH + 64 * (v % 16)).cast());
                // Group `v`'s high bits sit at bits 2i (i = v / 16), group `32 + v`'s at 4 + 2i:
                // both move to bits 4 and 5.
                let (h_lo, h_hi) = if v < 16 {
                    (_mm512_slli_epi16::<4>(h), h)
                } else {
                    (_mm512_slli_epi16::<2>(h), _mm512_srli_epi16::<2>(h))
                };
                lo[j] = _mm512_or_si512(_mm512_and_si512(raw, m4), _mm512_and_si512(h_lo, m2));
                hi[j] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4),
                    _mm512_and_si512(h_hi, m2),
                );
            }
            let scale = |k: usize| {
                _mm512_cvtepi8_epi32(_mm_loadu_si128(pb.add(Q6K_SCALES + 16 * k).cast()))
            };
            let (s_lo, s_hi) = (scale(s), scale(s + 8));
            for t in 0..N {
                let y = &*ys[t].add(b);
                let x = y.qs.as_ptr().add(16 * s);
                let mut a = _mm512_set1_epi32(-32 * i32::from(y.bsums[s]));
                let mut h = _mm512_set1_epi32(-32 * i32::from(y.bsums[s + 8]));
                for j in 0..4 {
                    a = _mm512_dpbusd_epi32(a, lo[j], bcast4(x.add(4 * j)));
                    h = _mm512_dpbusd_epi32(h, hi[j], bcast4(x.add(128 + 4 * j)));
                }
                let scaled =
                    _mm512_add_epi32(_mm512_mullo_epi32(a, s_lo), _mm512_mullo_epi32(h, s_hi));
                sumi[t] = _mm512_add_epi32(sumi[t], scaled);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(pb.cast()));
        for t in 0..N {
            let dx = _mm512_set1_ps((*ys[t].add(b)).d);
            let term = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(sumi[t]));
            acc[t] = _mm512_add_ps(acc[t], term);
        }
    }
    acc
}

/// `acts.len()` (1 to 4) tokens against one panel of `fmt`, into `out[t]`.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `p` holds `blocks` panel-blocks of `fmt`; each token has `blocks`
/// activation blocks of the type `fmt` meets (and, for Q8_0 and Q8_K, their sums).
pub(crate) unsafe fn panel(
    fmt: Format,
    p: &[u8],
    blocks: usize,
    acts: &[Act<'_>],
    out: &mut [[f32; PANEL]],
) {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn run<const F: u8>(
        p: *const u8,
        blocks: usize,
        acts: &[Act<'_>],
        out: &mut [[f32; PANEL]],
    ) {
        macro_rules! go {
            ($n:literal) => {{
                let a = std::array::from_fn(|t| acts[t]);
                let res = match F {
                    5 => panel_q4_k::<$n>(p, blocks, a),
                    6 => panel_q6_k::<$n>(p, blocks, a),
                    _ => panel_n::<F, $n>(p, blocks, a),
                };
                for (o, v) in out.iter_mut().zip(res) {
                    _mm512_storeu_ps(o.as_mut_ptr(), v);
                }
            }};
        }
        match acts.len() {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            _ => go!(4),
        }
    }
    let p = p.as_ptr();
    match fmt {
        Format::Q4_0 => run::<0>(p, blocks, acts, out),
        Format::Q4_1 => run::<1>(p, blocks, acts, out),
        Format::Q5_0 => run::<2>(p, blocks, acts, out),
        Format::Q5_1 => run::<3>(p, blocks, acts, out),
        Format::Q8_0 => run::<4>(p, blocks, acts, out),
        Format::Q4K => run::<5>(p, blocks, acts, out),
        Format::Q6K => run::<6>(p, blocks, acts, out),
    }
}

//! AVX2 kernels of the packed matrices ([`crate::qdot::packed`]): 1 to 4 tokens against one
//! 16-row panel, as two halves of 8 rows, one 32-bit lane per row. Without `vpdpbusd` each group
//! of 4 products is `vpmaddubsw` then `vpmaddwd`; the block sums are exact all the same, so the
//! results are the AVX-512 VNNI kernels' bits (and the machines without VNNI run every model
//! matrix in the same order as the ones with it).
//!
//! Invariant: per row, the packed reference order ([`crate::qdot::packed`]'s module docs) for the
//! 32-element types, and the scalar `vec_dot_q4_k_q8_k` / `vec_dot_q6_k_q8_k` order for Q4_K
//! and Q6_K, lane by lane.

use std::arch::x86_64::*;

use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1};
use crate::qdot::packed::layout::{
    Act, Format, PANEL, Q4K_BYTES, Q4K_DMIN, Q4K_MINS, Q4K_QS, Q4K_SCALES, Q6K_BYTES, Q6K_QH,
    Q6K_QL, Q6K_SCALES,
};

/// How far ahead of the block they are on the panel kernels ask for their weights.
const PREFETCH_BYTES: usize = 4096;

/// Asks for the `bytes` of panel data [`PREFETCH_BYTES`] past `p`. A decode step streams every
/// weight once, and the hardware prefetchers alone left the kernels waiting on memory at each
/// block (single-stream decode ran a third slower without this). The hint is T1 (into L2, not
/// L1): on a Zen 4 EPYC it streamed a 151,936 x 512 Q6_K head at 20-30 GB/s against 16-17
/// with T0, and expert-sized 256 x 512 Q4_K matrices at 14 against 10-11; the weights are read
/// once per step, so they gain nothing from L1 beyond what the loads themselves bring in.
/// Prefetches never fault, so the addresses may run past the matrix.
#[inline(always)]
pub(crate) unsafe fn prefetch_ahead(p: *const u8, bytes: usize) {
    let ahead = p.wrapping_add(PREFETCH_BYTES);
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line).cast());
    }
}

/// The packed format numbered `F` (a const generic stands in for the enum).
#[inline(always)]
pub(crate) const fn format_of<const F: u8>() -> Format {
    match F {
        0 => Format::Q4_0,
        1 => Format::Q4_1,
        2 => Format::Q5_0,
        3 => Format::Q5_1,
        _ => Format::Q8_0,
    }
}

/// The 8 groups of half `h` (rows `8h .. 8h + 8`) of a panel-block's weights: lane `r`, byte `j`
/// of group `g` is element `4g + j` of the half's row `r`. Q4 and Q5 give the stored unsigned
/// values; Q8_0 gives the true signed weights (the stored byte minus 128).
///
/// # Safety
/// AVX2; `p` points at a whole panel-block of the format.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half_values<const F: u8>(p: *const u8, h: usize) -> [__m256i; 8] {
    let fmt = format_of::<F>();
    let (_, qh_off, qs_off) = fmt.offsets();
    let q = p.add(qs_off + 32 * h);
    if fmt == Format::Q8_0 {
        let flip = _mm256_set1_epi8(-128);
        return std::array::from_fn(|g| {
            _mm256_xor_si256(_mm256_loadu_si256(q.add(64 * g).cast()), flip)
        });
    }
    let m4 = _mm256_set1_epi8(0xF);
    let mut w = [_mm256_setzero_si256(); 8];
    for k in 0..4 {
        let raw = _mm256_loadu_si256(q.add(64 * k).cast());
        w[k] = _mm256_and_si256(raw, m4);
        w[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
    }
    if matches!(fmt, Format::Q5_0 | Format::Q5_1) {
        // Byte `i` of the half takes bit `i` of the half's 32 mask bits.
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let bit5 = _mm256_set1_epi8(0x10);
        for (g, v) in w.iter_mut().enumerate() {
            let mask = p.add(qh_off + 8 * g + 4 * h).cast::<i32>().read_unaligned();
            let sel = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(mask), spread), bits);
            let set = _mm256_cmpeq_epi8(sel, bits);
            *v = _mm256_or_si256(*v, _mm256_and_si256(set, bit5));
        }
    }
    w
}

/// The exact sums of the 4 products in each 32-bit lane of two groups, `a · x` and `b · y`
/// (`a`, `b` unsigned bytes below 32, so no 16-bit sum saturates).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn sum_pair(a: __m256i, x: __m256i, b: __m256i, y: __m256i) -> __m256i {
    let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a, x), _mm256_maddubs_epi16(b, y));
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// The exact sums of the 4 products in each 32-bit lane of signed `w` and `x` (`|x| <= 127`):
/// `|w|` times `x` with `w`'s sign, which no 16-bit pair sum can saturate.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn sum_signed(w: __m256i, x: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// `N` tokens against one panel of format `F`: per block and half, the 8 rows' exact block sums,
/// then `acc = acc + (d_w * d_x) * isum` (plus `m_w * s_x` for types with a min): the packed
/// reference order's steps, lane by lane. `acc[h][t]` holds token `t`'s rows `8h .. 8h + 8`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_n<const F: u8, const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [[__m256; N]; 2] {
    let fmt = format_of::<F>();
    let min = fmt.has_min();
    let (m_off, _, _) = fmt.offsets();
    let block_bytes = PANEL * fmt.block_bytes();
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
        Act::Q8K(..) => unreachable!("32-element types meet Q8_0 or Q8_1"),
    });
    let sums: [*const i32; N] = std::array::from_fn(|t| match acts[t] {
        Act::Q8_0(_, sums) => sums.as_ptr(),
        _ => std::ptr::null(),
    });
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..blocks {
        let pb = p.add(b * block_bytes);
        prefetch_ahead(pb, block_bytes);
        for (h, acc) in acc.iter_mut().enumerate() {
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(16 * h).cast()));
            let mw = if min {
                _mm256_cvtph_ps(_mm_loadu_si128(pb.add(m_off + 16 * h).cast()))
            } else {
                _mm256_setzero_ps()
            };
            let w = half_values::<F>(pb, h);
            for t in 0..N {
                let y = ys[t].add(b * stride);
                let qs = y.add(qs_off);
                let x = |g: usize| _mm256_set1_epi32(qs.add(4 * g).cast::<i32>().read_unaligned());
                let mut isum = if fmt == Format::Q8_0 {
                    // True weights: no offset to take off.
                    let mut s = sum_signed(w[0], x(0));
                    for (g, &wg) in w.iter().enumerate().skip(1) {
                        s = _mm256_add_epi32(s, sum_signed(wg, x(g)));
                    }
                    s
                } else {
                    let mut s = sum_pair(w[0], x(0), w[1], x(1));
                    for g in (2..8).step_by(2) {
                        s = _mm256_add_epi32(s, sum_pair(w[g], x(g), w[g + 1], x(g + 1)));
                    }
                    s
                };
                if !min && fmt != Format::Q8_0 {
                    let corr = fmt.offset() * *sums[t].add(b);
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(corr));
                }
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(y.cast::<f32>().read()));
                let mut term = _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum));
                if min {
                    let sx = _mm256_set1_ps(y.add(4).cast::<f32>().read());
                    term = _mm256_add_ps(term, _mm256_mul_ps(mw, sx));
                }
                acc[t] = _mm256_add_ps(acc[t], term);
            }
        }
    }
    acc
}

/// Each token's Q8_K blocks and sub-block sums, as plain pointers.
#[inline(always)]
pub(crate) fn k_acts<const N: usize>(
    acts: [Act<'_>; N],
) -> ([*const BlockQ8K; N], [*const i16; N]) {
    let ys = std::array::from_fn(|t| match acts[t] {
        Act::Q8K(ys, _) => ys.as_ptr(),
        _ => unreachable!("K-quants meet Q8_K"),
    });
    let sums = std::array::from_fn(|t| match acts[t] {
        Act::Q8K(_, sums) => sums.as_ptr(),
        _ => unreachable!("K-quants meet Q8_K"),
    });
    (ys, sums)
}

/// 4 activations at `p` broadcast to every 32-bit lane.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// 8 bytes at `p` widened to 32-bit lanes, unsigned (`SIGNED` false) or signed.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn widen8<const SIGNED: bool>(p: *const u8) -> __m256i {
    let v = _mm_loadl_epi64(p.cast());
    if SIGNED {
        _mm256_cvtepi8_epi32(v)
    } else {
        _mm256_cvtepu8_epi32(v)
    }
}

/// `N` tokens against one Q4_K panel: per super-block and half, for each pair of sub-blocks (a
/// chunk of the row's nibble bytes) the 8 rows' exact sub-block sums, multiplied by their scales
/// into `sumi`; `summ` (mins times the activation sub-block sums) with `vpmaddwd`; then the
/// scalar `vec_dot_q4_k_q8_k`'s two float steps on 8 rows at once. `acc[h][t]` as in
/// [`panel_n`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q4_k<const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [[__m256; N]; 2] {
    let (ys, sums) = k_acts(acts);
    let m4 = _mm256_set1_epi8(0xF);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..blocks {
        let pb = p.add(b * Q4K_BYTES);
        prefetch_ahead(pb, Q4K_BYTES);
        for (h, acc) in acc.iter_mut().enumerate() {
            let mut sumi = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let q = pb.add(Q4K_QS + 512 * c + 32 * h);
                let raw: [__m256i; 8] =
                    std::array::from_fn(|k| _mm256_loadu_si256(q.add(64 * k).cast()));
                let lo = raw.map(|r| _mm256_and_si256(r, m4));
                let hi = raw.map(|r| _mm256_and_si256(_mm256_srli_epi16::<4>(r), m4));
                let s_lo = widen8::<false>(pb.add(Q4K_SCALES + 16 * (2 * c) + 8 * h));
                let s_hi = widen8::<false>(pb.add(Q4K_SCALES + 16 * (2 * c + 1) + 8 * h));
                for t in 0..N {
                    let x = (*ys[t].add(b)).qs.as_ptr().add(64 * c);
                    let mut a = _mm256_setzero_si256();
                    let mut e = _mm256_setzero_si256();
                    for k in (0..8).step_by(2) {
                        let pair = |w: &[__m256i; 8], off: usize| {
                            _mm256_madd_epi16(
                                _mm256_add_epi16(
                                    _mm256_maddubs_epi16(w[k], bcast4(x.add(off + 4 * k))),
                                    _mm256_maddubs_epi16(w[k + 1], bcast4(x.add(off + 4 * k + 4))),
                                ),
                                ones,
                            )
                        };
                        a = _mm256_add_epi32(a, pair(&lo, 0));
                        e = _mm256_add_epi32(e, pair(&hi, 32));
                    }
                    let scaled =
                        _mm256_add_epi32(_mm256_mullo_epi32(a, s_lo), _mm256_mullo_epi32(e, s_hi));
                    sumi[t] = _mm256_add_epi32(sumi[t], scaled);
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(16 * h).cast()));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(Q4K_DMIN + 16 * h).cast()));
            let mins: [__m256i; 4] = std::array::from_fn(|j| {
                _mm256_cvtepu8_epi16(_mm_loadu_si128(pb.add(Q4K_MINS + 32 * j + 16 * h).cast()))
            });
            for t in 0..N {
                let s = sums[t].add(8 * b);
                let mut summ = _mm256_setzero_si256();
                for (j, m) in mins.iter().enumerate() {
                    let pair = _mm256_set1_epi32(s.add(2 * j).cast::<i32>().read_unaligned());
                    summ = _mm256_add_epi32(summ, _mm256_madd_epi16(*m, pair));
                }
                let dx = _mm256_set1_ps((*ys[t].add(b)).d);
                let term = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sumi[t]));
                acc[t] = _mm256_add_ps(acc[t], term);
                let term = _mm256_mul_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(summ));
                acc[t] = _mm256_sub_ps(acc[t], term);
            }
        }
    }
    acc
}

/// `N` tokens against one Q6_K panel: per super-block, half and pair of sub-blocks `s`, `s + 8`
/// (four `ql` vectors and their high bits), the 8 rows' sums of the unsigned six-bit values
/// times the activations; `32 Σ x` comes off (the `- 32` of each weight), the signed scale
/// multiplies, all exact in integers; then the scalar `vec_dot_q6_k_q8_k`'s float step.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q6_k<const N: usize>(
    p: *const u8,
    blocks: usize,
    acts: [Act<'_>; N],
) -> [[__m256; N]; 2] {
    let (ys, _) = k_acts(acts);
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(0x30);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..blocks {
        let pb = p.add(b * Q6K_BYTES);
        prefetch_ahead(pb, Q6K_BYTES);
        for (h, acc) in acc.iter_mut().enumerate() {
            let mut sumi = [_mm256_setzero_si256(); N];
            for s in 0..8 {
                let mut lo = [_mm256_setzero_si256(); 4];
                let mut hi = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let v = 4 * s + j;
                    let raw = _mm256_loadu_si256(pb.add(Q6K_QL + 64 * v + 32 * h).cast());
                    let bits = _mm256_loadu_si256(pb.add(Q6K_QH + 64 * (v % 16) + 32 * h).cast());
                    // Group `v`'s high bits sit at bits 2i (i = v / 16), group `32 + v`'s at
                    // 4 + 2i: both move to bits 4 and 5.
                    let (h_lo, h_hi) = if v < 16 {
                        (_mm256_slli_epi16::<4>(bits), bits)
                    } else {
                        (_mm256_slli_epi16::<2>(bits), _mm256_srli_epi16::<2>(bits))
                    };
                    lo[j] = _mm256_or_si256(_mm256_and_si256(raw, m4), _mm256_and_si256(h_lo, m2));
                    hi[j] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4),
                        _mm256_and_si256(h_hi, m2),
                    );
                }
                let s_lo = widen8::<true>(pb.add(Q6K_SCALES + 16 * s + 8 * h));
                let s_hi = widen8::<true>(pb.add(Q6K_SCALES + 16 * (s + 8) + 8 * h));
                for t in 0..N {
                    let y = &*ys[t].add(b);
                    let x = y.qs.as_ptr().add(16 * s);
                    let mut a = _mm256_set1_epi32(-32 * i32::from(y.bsums[s]));
                    let mut e = _mm256_set1_epi32(-32 * i32::from(y.bsums[s + 8]));
                    for j in 0..4 {
                        // Six-bit values (at most 63) times activations: no 16-bit pair sum
                        // saturates.
                        let sum = |w: __m256i, off: usize| {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(w, bcast4(x.add(off))), ones)
                        };
                        a = _mm256_add_epi32(a, sum(lo[j], 4 * j));
                        e = _mm256_add_epi32(e, sum(hi[j], 128 + 4 * j));
                    }
                    let scaled =
                        _mm256_add_epi32(_mm256_mullo_epi32(a, s_lo), _mm256_mullo_epi32(e, s_hi));
                    sumi[t] = _mm256_add_epi32(sumi[t], scaled);
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(16 * h).cast()));
            for t in 0..N {
                let dx = _mm256_set1_ps((*ys[t].add(b)).d);
                let term = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sumi[t]));
                acc[t] = _mm256_add_ps(acc[t], term);
            }
        }
    }
    acc
}

/// `acts.len()` (1 to 4) tokens against one panel of `fmt`, into `out[t]`.
///
/// # Safety
/// AVX2, FMA, F16C; `p` holds `blocks` panel-blocks of `fmt`; each token has `blocks`
/// activation blocks of the type `fmt` meets (and, for Q8_0 and Q8_K, their sums).
pub(crate) unsafe fn panel(
    fmt: Format,
    p: &[u8],
    blocks: usize,
    acts: &[Act<'_>],
    out: &mut [[f32; PANEL]],
) {
    #[target_feature(enable = "avx2,fma,f16c")]
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
                for (t, o) in out.iter_mut().enumerate().take($n) {
                    _mm256_storeu_ps(o.as_mut_ptr(), res[0][t]);
                    _mm256_storeu_ps(o.as_mut_ptr().add(8), res[1][t]);
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

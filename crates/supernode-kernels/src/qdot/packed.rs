//! Weights re-laid out at load time for the integer dot instructions: panels of 16 rows whose
//! blocks are interleaved so that one `vpdpbusd` multiplies 4 consecutive weights of each of the
//! 16 rows by the same 4 activations. A block's 32 products of a row then sum into one 32-bit
//! lane, and the float step (scale, accumulate) is done for 16 rows in one register, with no
//! horizontal reduction anywhere. That is several times fewer instructions per weight byte than
//! the row-pair kernels of `avx512`, which keep 8 lanes per row: decode becomes bound by memory
//! instead of by the vector ports.
//!
//! Used for the 32-element types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and for Q4_K and Q6_K in
//! quantised precision, when the CPU has AVX-512 VNNI. Other types and machines keep the row
//! kernels of [`super`].
//!
//! ## Numerics (the reference order of packed matrices)
//!
//! Per row, block after block, with `isum` the exact integer sum of the block's 32 products:
//! - Q4_0, Q5_0, Q8_0 (against Q8_0 activations): `acc = acc + (d_w * d_x) * isum`;
//! - Q4_1, Q5_1 (against Q8_1): `acc = acc + ((d_w * d_x) * isum + m_w * s_x)`;
//!
//! each a multiply then an add (no FMA), starting from `acc = 0`. This is llama.cpp's scalar
//! `ggml_vec_dot_q*_q8_*` order, and `dot_row` (in the tests) computes it from the original row as the
//! reference the SIMD kernel is tested against. It is not the 8-lane order of the row kernels,
//! so a packed matrix's outputs differ from an unpacked one's in the last bits: every matrix is
//! either always packed or never (the choice depends only on the matrix and the CPU), so the
//! results stay batch invariant.
//!
//! Q4_K and Q6_K (against Q8_K) keep the row kernels' order exactly, that of the scalar
//! `vec_dot_q4_k_q8_k` / `vec_dot_q6_k_q8_k`: per super-block the exact integer sums `sumi`
//! (scales times sub-block sums) and `summ` (mins times activation sums), then
//! `acc = acc + (d_w * d_x) * sumi` and, for Q4_K, `acc = acc - (dmin_w * d_x) * summ`. So
//! packing these changes no bit.
//!
//! ## Layout
//!
//! Rows go in panels of [`PANEL`]; the last panel is padded with zero rows. A panel holds its
//! blocks in column order, each panel-block being (for rows `r = 0..16`, all little endian):
//!
//! | part | bytes | contents |
//! |---|---|---|
//! | `d` | 32 | the 16 rows' f16 scales |
//! | `m` (Q4_1, Q5_1) | 32 | the 16 rows' f16 mins |
//! | `qh` (Q5_0, Q5_1) | 64 | for each group `g` of 4 elements (0..8) a u64 mask, bit `4r + j` = fifth bit of element `4g + j` of row `r` |
//! | `qs` | 256 (Q4, Q5) or 512 (Q8_0) | 64 bytes per group: for Q4/Q5, group `k` (0..4) holds in lane `r` the row's nibble bytes `4k .. 4k + 4` (low nibbles: elements `4k + j`, high: `16 + 4k + j`); for Q8_0, group `g` (0..8) holds in lane `r` elements `4g .. 4g + 4` plus 128, as unsigned bytes |
//!
//! A panel-block is exactly 16 original blocks' bytes, so a packed matrix is as large as the
//! original (plus the padding rows).
//!
//! The K-quant panel-blocks (256 elements of 16 rows) hold their 6-bit scales and mins unpacked
//! to bytes:
//!
//! | format | part | bytes | contents |
//! |---|---|---|---|
//! | Q4_K | `d`, `dmin` | 32 + 32 | the 16 rows' f16 scales, then mins |
//! | | `scales` | 128 | for each sub-block `j` (0..8) of 32 elements, 16 bytes: row `r`'s scale |
//! | | `mins` | 128 | for each pair `p` (0..4) of sub-blocks, 32 bytes: row `r`'s mins of sub-blocks `2p`, `2p + 1` at `2r`, `2r + 1` |
//! | | `qs` | 2048 | for chunk `c` (0..4) and group `k` (0..8), 64 bytes: lane `r` holds the row's `qs[32c + 4k .. 32c + 4k + 4]` (low nibbles: elements `64c + 4k + j` of sub-block `2c`; high: the same of sub-block `2c + 1`) |
//! | Q6_K | `d` | 32 | the 16 rows' f16 scales |
//! | | `scales` | 256 | for each sub-block `s` (0..16) of 16 elements, 16 bytes: row `r`'s signed scale |
//! | | `ql` | 2048 | vector `v` (0..32), 64 bytes: lane `r` byte `j` holds the low 4 bits of element `4v + j` (low nibble) and of element `128 + 4v + j` (high nibble) |
//! | | `qh` | 1024 | vector `u` (0..16), 64 bytes: lane `r` byte `j` holds at bits `2i, 2i + 1` (`i` in 0..4) the high 2 bits of element `4(u + 16i) + j` |
//!
//! Q4_K's panel-blocks are 64 bytes larger than 16 original blocks (2.8%); Q6_K's are the same
//! size.

use crate::dtype::{DType, QK_K};
use crate::quant::scale_min_k4;

#[cfg(test)]
use super::{f16_at, five_bit, nibble};
use super::{BlockQ8K, BlockQ8_0, BlockQ8_1, QK};

/// Rows per panel: one 32-bit lane of a 512-bit register per row.
pub const PANEL: usize = 16;

/// One cache line, the unit of a packed matrix's storage (so panels start 64-byte aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// The packed formats: the 32-element types, Q4_K and Q6_K.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
}

/// The activation blocks a format meets (numbered from 0, to index tables by).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActKind {
    Q8_0 = 0,
    Q8_1 = 1,
    Q8K = 2,
}

/// Byte offsets within a Q4_K panel-block: `dmin`, `scales`, `mins`, `qs`; and its size.
pub(crate) const Q4K_DMIN: usize = 32;
pub(crate) const Q4K_SCALES: usize = 64;
pub(crate) const Q4K_MINS: usize = 192;
pub(crate) const Q4K_QS: usize = 320;
pub(crate) const Q4K_BYTES: usize = Q4K_QS + 2048;

/// Byte offsets within a Q6_K panel-block: `scales`, `ql`, `qh`; and its size.
pub(crate) const Q6K_SCALES: usize = 32;
pub(crate) const Q6K_QL: usize = 288;
pub(crate) const Q6K_QH: usize = Q6K_QL + 2048;
pub(crate) const Q6K_BYTES: usize = Q6K_QH + 1024;

impl Format {
    fn of(dtype: DType) -> Option<Format> {
        Some(match dtype {
            DType::Q4_0 => Format::Q4_0,
            DType::Q4_1 => Format::Q4_1,
            DType::Q5_0 => Format::Q5_0,
            DType::Q5_1 => Format::Q5_1,
            DType::Q8_0 => Format::Q8_0,
            DType::Q4K => Format::Q4K,
            DType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// Elements of one block.
    pub(crate) fn elems(self) -> usize {
        match self {
            Format::Q4K | Format::Q6K => QK_K,
            _ => QK,
        }
    }

    /// Bytes of one original block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q8_0 => 34,
            Format::Q4K => 144,
            Format::Q6K => 210,
        }
    }

    /// Bytes of one panel-block (16 rows' blocks).
    pub(crate) fn panel_block_bytes(self) -> usize {
        match self {
            Format::Q4K => Q4K_BYTES,
            Format::Q6K => Q6K_BYTES,
            _ => PANEL * self.block_bytes(),
        }
    }

    /// Whether the type has a min (a 32-element type with one meets Q8_1 activations).
    pub(crate) fn has_min(self) -> bool {
        matches!(self, Format::Q4_1 | Format::Q5_1 | Format::Q4K)
    }

    /// The activation blocks the format meets.
    pub(crate) fn act_kind(self) -> ActKind {
        match self {
            Format::Q4K | Format::Q6K => ActKind::Q8K,
            Format::Q4_1 | Format::Q5_1 => ActKind::Q8_1,
            _ => ActKind::Q8_0,
        }
    }

    /// Byte offsets within a panel-block of the mins, the fifth-bit masks and the quants.
    pub(crate) fn offsets(self) -> (usize, usize, usize) {
        let m = 32;
        let qh = if self.has_min() { 64 } else { 32 };
        let qs = match self {
            Format::Q5_0 | Format::Q5_1 => qh + 64,
            _ => qh,
        };
        (m, qh, qs)
    }

    /// What the stored unsigned values exceed the true weights by (subtracted as
    /// `offset * Σ x` per block).
    pub(crate) fn offset(self) -> i32 {
        match self {
            Format::Q4_0 => 8,
            Format::Q5_0 => 16,
            Format::Q8_0 => 128,
            Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q6K => 0,
        }
    }

    /// Byte offset of the scale (and of the min) within an original block, and of its quants
    /// (32-element types).
    fn source_offsets(self) -> (usize, usize) {
        match self {
            Format::Q4_0 | Format::Q8_0 => (0, 2),
            Format::Q5_0 => (0, 6),
            Format::Q4_1 => (0, 4),
            Format::Q5_1 => (0, 8),
            Format::Q4K | Format::Q6K => unreachable!("K-quants pack on their own"),
        }
    }

    /// The 32 stored unsigned values of an original block (true weight + [`Format::offset`]).
    #[cfg(test)]
    fn values(self, b: &[u8]) -> [i32; QK] {
        std::array::from_fn(|i| match self {
            Format::Q4_0 => nibble(&b[2..18], i),
            Format::Q4_1 => nibble(&b[4..20], i),
            Format::Q5_0 => five_bit(&b[2..6], &b[6..22], i),
            Format::Q5_1 => five_bit(&b[4..8], &b[8..24], i),
            Format::Q8_0 => b[2 + i] as i8 as i32 + 128,
            Format::Q4K | Format::Q6K => unreachable!("32-element types only"),
        })
    }
}

/// The 256 six-bit values (0..64, true weight + 32) of a Q6_K block, in element order.
fn q6_k_values(b: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let mut q = [0u8; QK_K];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
        for l in 0..32 {
            let e = 128 * n + l;
            q[e] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            q[e + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            q[e + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[e + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// One block of a 32-element type (`src`) into lane `lane` of a panel-block (`dst`).
fn pack_32(format: Format, src: &[u8], lane: usize, dst: &mut [u8]) {
    let (m_off, qh_off, qs_off) = format.offsets();
    let (d_src, qs_src) = format.source_offsets();
    dst[2 * lane..2 * lane + 2].copy_from_slice(&src[d_src..d_src + 2]);
    if format.has_min() {
        dst[m_off + 2 * lane..m_off + 2 * lane + 2].copy_from_slice(&src[2..4]);
    }
    match format {
        Format::Q8_0 => {
            for g in 0..8 {
                for j in 0..4 {
                    dst[qs_off + 64 * g + 4 * lane + j] = src[qs_src + 4 * g + j] ^ 0x80;
                }
            }
        }
        _ => {
            for k in 0..4 {
                let at = qs_off + 64 * k + 4 * lane;
                dst[at..at + 4].copy_from_slice(&src[qs_src + 4 * k..qs_src + 4 * k + 4]);
            }
        }
    }
    if matches!(format, Format::Q5_0 | Format::Q5_1) {
        let qh = u32::from_le_bytes(src[qs_src - 4..qs_src].try_into().unwrap());
        for g in 0..8 {
            let at = qh_off + 8 * g;
            let mut mask = u64::from_le_bytes(dst[at..at + 8].try_into().unwrap());
            mask |= u64::from((qh >> (4 * g)) & 0xF) << (4 * lane);
            dst[at..at + 8].copy_from_slice(&mask.to_le_bytes());
        }
    }
}

/// One Q4_K block (`src`) into lane `lane` of a panel-block (`dst`).
fn pack_q4_k(src: &[u8], lane: usize, dst: &mut [u8]) {
    dst[2 * lane..2 * lane + 2].copy_from_slice(&src[0..2]);
    dst[Q4K_DMIN + 2 * lane..Q4K_DMIN + 2 * lane + 2].copy_from_slice(&src[2..4]);
    for j in 0..8 {
        let (scale, min) = scale_min_k4(j, &src[4..16]);
        dst[Q4K_SCALES + 16 * j + lane] = scale;
        dst[Q4K_MINS + 32 * (j / 2) + 2 * lane + j % 2] = min;
    }
    for c in 0..4 {
        for k in 0..8 {
            let at = Q4K_QS + 512 * c + 64 * k + 4 * lane;
            dst[at..at + 4].copy_from_slice(&src[16 + 32 * c + 4 * k..16 + 32 * c + 4 * k + 4]);
        }
    }
}

/// One Q6_K block (`src`) into lane `lane` of a panel-block (`dst`).
fn pack_q6_k(src: &[u8], lane: usize, dst: &mut [u8]) {
    dst[2 * lane..2 * lane + 2].copy_from_slice(&src[208..210]);
    for s in 0..16 {
        dst[Q6K_SCALES + 16 * s + lane] = src[192 + s];
    }
    let q = q6_k_values(src);
    for v in 0..32 {
        for j in 0..4 {
            let (lo, hi) = (q[4 * v + j], q[128 + 4 * v + j]);
            dst[Q6K_QL + 64 * v + 4 * lane + j] = (lo & 0xF) | (hi & 0xF) << 4;
        }
    }
    for u in 0..16 {
        for j in 0..4 {
            let mut byte = 0u8;
            for i in 0..4 {
                byte |= (q[4 * (u + 16 * i) + j] >> 4) << (2 * i);
            }
            dst[Q6K_QH + 64 * u + 4 * lane + j] = byte;
        }
    }
}

/// A weight matrix in the packed layout (see the module docs).
pub struct PackedMatrix {
    pub(crate) format: Format,
    pub rows: usize,
    pub cols: usize,
    data: Vec<Line>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl PackedMatrix {
    /// `rows` rows of `cols` elements of `dtype` (`data` row-major, as GGUF stores them) in the
    /// packed layout, or `None` when this machine has no packed kernel for the type (or `cols`
    /// is not whole blocks).
    pub fn pack(dtype: DType, rows: usize, cols: usize, data: &[u8]) -> Option<PackedMatrix> {
        let format = Format::of(dtype)?;
        if !available() || cols == 0 || !cols.is_multiple_of(format.elems()) || rows == 0 {
            return None;
        }
        Some(Self::pack_format(format, rows, cols, data))
    }

    pub(crate) fn pack_format(
        format: Format,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> PackedMatrix {
        let blocks = cols / format.elems();
        let src_block = format.block_bytes();
        assert_eq!(data.len(), rows * blocks * src_block, "pack: weight bytes");
        let panel_block = format.panel_block_bytes();
        let panel_bytes = blocks * panel_block;
        let panels = rows.div_ceil(PANEL);
        let mut lines = vec![Line([0; 64]); (panels * panel_bytes).div_ceil(64)];
        // SAFETY: `Line` is 64 plain bytes; the slice covers exactly the vector's storage.
        let out = unsafe {
            std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), lines.len() * 64)
        };
        for r in 0..rows {
            let (panel, lane) = (r / PANEL, r % PANEL);
            for b in 0..blocks {
                let src = &data[(r * blocks + b) * src_block..][..src_block];
                let dst = &mut out[panel * panel_bytes + b * panel_block..][..panel_block];
                match format {
                    Format::Q4K => pack_q4_k(src, lane, dst),
                    Format::Q6K => pack_q6_k(src, lane, dst),
                    _ => pack_32(format, src, lane, dst),
                }
            }
        }
        PackedMatrix {
            format,
            rows,
            cols,
            data: lines,
        }
    }

    /// The packed bytes (whole panels).
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.data.len() * 64) }
    }

    /// Bytes of one panel.
    pub(crate) fn panel_bytes(&self) -> usize {
        self.blocks() * self.format.panel_block_bytes()
    }

    /// Blocks per row.
    pub(crate) fn blocks(&self) -> usize {
        self.cols / self.format.elems()
    }

    /// Number of panels.
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Bytes of weights read per product (for bandwidth figures).
    pub fn weight_bytes(&self) -> usize {
        self.panels() * self.panel_bytes()
    }
}

/// Whether this machine runs the packed kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::quant_level() >= super::QuantLevel::Avx512Vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The reference of the packed order for one original row of `format` against one token's
/// Q8_0 activations (`ys_0`, with `sums[b] = Σ qs` of each block) or Q8_1 activations (`ys_1`),
/// whichever the format meets.
#[cfg(test)]
pub(crate) fn dot_row(format: Format, row: &[u8], act: Act<'_>) -> f32 {
    let bytes = format.block_bytes();
    let offset = format.offset();
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(bytes).enumerate() {
        let w = format.values(blk);
        let (qs, dx) = match act {
            Act::Q8_0(ys, _) => (&ys[b].qs, ys[b].d),
            Act::Q8_1(ys) => (&ys[b].qs, ys[b].d),
            Act::Q8K(..) => unreachable!("K-quants are tested against the scalar vec_dot"),
        };
        let raw: i32 = w.iter().zip(qs).map(|(&w, &x)| w * x as i32).sum();
        let isum = match act {
            Act::Q8_0(_, sums) => raw - offset * sums[b],
            _ => raw,
        };
        let term = (f16_at(blk, 0) * dx) * isum as f32;
        acc += match act {
            Act::Q8_1(ys) => term + f16_at(blk, 2) * ys[b].s,
            _ => term,
        };
    }
    acc
}

/// One token's quantised activations, as a packed kernel takes them.
#[derive(Clone, Copy)]
pub(crate) enum Act<'a> {
    /// Q8_0 blocks and each block's `Σ qs`.
    Q8_0(&'a [BlockQ8_0], &'a [i32]),
    Q8_1(&'a [BlockQ8_1]),
    /// Q8_K blocks and, 8 per block, the sums of each 32-element sub-block's `qs`
    /// ([`sub_block_sums`]).
    Q8K(&'a [BlockQ8K], &'a [i16]),
}

impl Act<'_> {
    /// The activation blocks this is.
    pub(crate) fn kind(&self) -> ActKind {
        match self {
            Act::Q8_0(..) => ActKind::Q8_0,
            Act::Q8_1(_) => ActKind::Q8_1,
            Act::Q8K(..) => ActKind::Q8K,
        }
    }

    /// Blocks per token, checking that the side data matches.
    fn blocks(&self) -> usize {
        match *self {
            Act::Q8_0(ys, sums) => {
                assert_eq!(ys.len(), sums.len(), "packed activations: sums");
                ys.len()
            }
            Act::Q8_1(ys) => ys.len(),
            Act::Q8K(ys, sums) => {
                assert_eq!(8 * ys.len(), sums.len(), "packed activations: sums");
                ys.len()
            }
        }
    }
}

/// `Σ qs` of each Q8_0 block of `ys` into `sums`.
pub(crate) fn block_sums(ys: &[BlockQ8_0], sums: &mut [i32]) {
    for (s, y) in sums.iter_mut().zip(ys) {
        *s = y.qs.iter().map(|&q| q as i32).sum();
    }
}

/// The sums of each 32-element sub-block of `ys` (8 per block, from its 16-element `bsums`; at
/// most 32 × 127 in magnitude, so they fit) into `sums`: what Q4_K's mins multiply.
pub(crate) fn sub_block_sums(ys: &[BlockQ8K], sums: &mut [i16]) {
    for (s, y) in sums.chunks_exact_mut(8).zip(ys) {
        for (j, s) in s.iter_mut().enumerate() {
            *s = y.bsums[2 * j] + y.bsums[2 * j + 1];
        }
    }
}

/// Up to 4 tokens against one panel: `out[t][r]` for the panel's 16 rows. Panics unless the
/// machine has the kernels ([`available`]) and the activations match the matrix.
pub(crate) fn panel_dot(
    m: &PackedMatrix,
    panel: usize,
    acts: &[Act<'_>],
    out: &mut [[f32; PANEL]],
) {
    assert!(available(), "packed kernels need AVX-512 VNNI");
    let blocks = m.blocks();
    assert!(
        (1..=4).contains(&acts.len()) && out.len() == acts.len(),
        "panel_dot: tokens"
    );
    for a in acts {
        assert!(
            a.kind() == m.format.act_kind(),
            "panel_dot: activation type"
        );
        assert_eq!(a.blocks(), blocks, "panel_dot: blocks");
    }
    assert!(panel < m.panels(), "panel_dot: panel");
    #[cfg(target_arch = "x86_64")]
    {
        let p = &m.bytes()[panel * m.panel_bytes()..(panel + 1) * m.panel_bytes()];
        // SAFETY: `available` confirmed AVX-512 F/BW/VL/VNNI; the panel holds `blocks`
        // panel-blocks and every token `blocks` activation blocks of the format's type, with
        // their sums (checked above).
        unsafe { super::avx512::panel(m.format, p, blocks, acts, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no packed kernels off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::matmul_packed;
    use crate::qdot::{quantize_row_q8_0, quantize_row_q8_1, quantize_row_q8_k};

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// Random original rows of `format`: any quant bytes, finite f16 scales and mins.
    fn random_rows(rng: &mut Rng, format: Format, rows: usize, cols: usize) -> Vec<u8> {
        let bytes = format.block_bytes();
        let mut data = vec![0u8; rows * cols / QK * bytes];
        for blk in data.chunks_exact_mut(bytes) {
            for b in blk.iter_mut() {
                *b = rng.next() as u8;
            }
            let d = half::f16::from_f32(rng.f32() * 0.05).to_le_bytes();
            blk[..2].copy_from_slice(&d);
            if format.has_min() {
                let m = half::f16::from_f32(rng.f32() * 0.05).to_le_bytes();
                blk[2..4].copy_from_slice(&m);
            }
        }
        data
    }

    const FORMATS: [(Format, DType); 5] = [
        (Format::Q4_0, DType::Q4_0),
        (Format::Q4_1, DType::Q4_1),
        (Format::Q5_0, DType::Q5_0),
        (Format::Q5_1, DType::Q5_1),
        (Format::Q8_0, DType::Q8_0),
    ];

    /// Every output of `matmul_packed`, for row counts around the panel size and token counts
    /// that cover partial token groups and several token chunks, equals `dot_row` of the
    /// original row and that token alone, bit for bit.
    #[test]
    fn packed_products_equal_the_row_reference() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this machine");
            return;
        }
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for (format, dtype) in FORMATS {
            for (rows, cols) in [(1, 32), (15, 64), (16, 96), (33, 576), (40, 160)] {
                let data = random_rows(&mut rng, format, rows, cols);
                let m = PackedMatrix::pack(dtype, rows, cols, &data).unwrap();
                assert_eq!(
                    m.weight_bytes(),
                    rows.div_ceil(PANEL) * PANEL * data.len() / rows
                );
                for n in [1, 2, 3, 5, 70] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 3.0).collect();
                    let mut out = vec![f32::NAN; n * rows];
                    matmul_packed(&m, &x, n, &mut out);
                    let blocks = cols / QK;
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let mut q0 = vec![
                            BlockQ8_0 {
                                d: 0.0,
                                qs: [0; QK]
                            };
                            blocks
                        ];
                        let mut q1 = vec![
                            BlockQ8_1 {
                                d: 0.0,
                                s: 0.0,
                                qs: [0; QK]
                            };
                            blocks
                        ];
                        let mut sums = vec![0; blocks];
                        quantize_row_q8_0(xt, &mut q0);
                        quantize_row_q8_1(xt, &mut q1);
                        block_sums(&q0, &mut sums);
                        let act = if format.has_min() {
                            Act::Q8_1(&q1)
                        } else {
                            Act::Q8_0(&q0, &sums)
                        };
                        for r in 0..rows {
                            let row = &data[r * data.len() / rows..(r + 1) * data.len() / rows];
                            let want = dot_row(format, row, act);
                            let got = out[t * rows + r];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{format:?} {rows}x{cols} n={n} token {t} row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Random Q4_K (`q6` false) or Q6_K rows: any quant, scale and min bytes, finite f16 scales.
    fn random_k_rows(rng: &mut Rng, q6: bool, rows: usize, cols: usize) -> Vec<u8> {
        let bytes = if q6 { 210 } else { 144 };
        let mut data = vec![0u8; rows * cols / QK_K * bytes];
        for blk in data.chunks_exact_mut(bytes) {
            for b in blk.iter_mut() {
                *b = rng.next() as u8;
            }
            let d = |rng: &mut Rng| half::f16::from_f32(rng.f32() * 0.01).to_le_bytes();
            if q6 {
                blk[208..210].copy_from_slice(&d(rng));
            } else {
                blk[0..2].copy_from_slice(&d(rng));
                blk[2..4].copy_from_slice(&d(rng));
            }
        }
        data
    }

    /// Packed Q4_K and Q6_K products equal the scalar `vec_dot_*_q8_k` of the original row and
    /// that token's Q8_K activations bit for bit (the row kernels' order): row counts around the
    /// panel size, token counts covering partial token groups and several token chunks.
    #[test]
    fn packed_k_quants_equal_the_scalar_reference() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this machine");
            return;
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (q6, dtype) in [(false, DType::Q4K), (true, DType::Q6K)] {
            let reference = if q6 {
                super::super::vec_dot_q6_k_q8_k
            } else {
                super::super::vec_dot_q4_k_q8_k
            };
            for (rows, cols) in [(1, 256), (15, 512), (16, 256), (33, 1024), (40, 768)] {
                let data = random_k_rows(&mut rng, q6, rows, cols);
                let m = PackedMatrix::pack(dtype, rows, cols, &data).unwrap();
                let row_bytes = data.len() / rows;
                for n in [1, 2, 3, 5, 70] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 3.0).collect();
                    let mut out = vec![f32::NAN; n * rows];
                    matmul_packed(&m, &x, n, &mut out);
                    for t in 0..n {
                        let mut y = vec![
                            BlockQ8K {
                                d: 0.0,
                                qs: [0; QK_K],
                                bsums: [0; QK_K / 16]
                            };
                            cols / QK_K
                        ];
                        quantize_row_q8_k(&x[t * cols..(t + 1) * cols], &mut y);
                        for r in 0..rows {
                            let want = reference(&data[r * row_bytes..(r + 1) * row_bytes], &y);
                            let got = out[t * rows + r];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{dtype:?} {rows}x{cols} n={n} token {t} row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Several matrices in one loop (mixed activation types) give each matrix's own products.
    #[test]
    fn many_matrices_equal_each_alone() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this machine");
            return;
        }
        let mut rng = Rng(99);
        let cols = 512;
        let shapes = [
            (Format::Q4_1, DType::Q4_1, 40),
            (Format::Q8_0, DType::Q8_0, 16),
            (Format::Q4K, DType::Q4K, 20),
            (Format::Q5_0, DType::Q5_0, 7),
            (Format::Q6K, DType::Q6K, 17),
        ];
        let ms: Vec<PackedMatrix> = shapes
            .iter()
            .map(|&(f, d, rows)| {
                let data = match f {
                    Format::Q4K => random_k_rows(&mut rng, false, rows, cols),
                    Format::Q6K => random_k_rows(&mut rng, true, rows, cols),
                    _ => random_rows(&mut rng, f, rows, cols),
                };
                PackedMatrix::pack(d, rows, cols, &data).unwrap()
            })
            .collect();
        for n in [1, 6, 67] {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
            let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0.0; n * m.rows]).collect();
            let refs: Vec<&PackedMatrix> = ms.iter().collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            crate::matmul::matmul_packed_many(&refs, &x, n, &mut views);
            for (m, got) in ms.iter().zip(&outs) {
                let mut want = vec![0.0; n * m.rows];
                matmul_packed(m, &x, n, &mut want);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "n = {n}"
                );
            }
        }
    }

    /// The fused gated unit equals the two products then `glu_inplace`, bit for bit, for gate
    /// and up of different formats (and activation kinds), with SiLU and the table GELU.
    #[test]
    fn fused_glu_equals_products_then_glu() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI on this machine");
            return;
        }
        let mut rng = Rng(5);
        let (rows, cols) = (37, 512);
        let gate = PackedMatrix::pack(
            DType::Q4K,
            rows,
            cols,
            &random_k_rows(&mut rng, false, rows, cols),
        )
        .unwrap();
        let up = PackedMatrix::pack(
            DType::Q5_0,
            rows,
            cols,
            &random_rows(&mut rng, Format::Q5_0, rows, cols),
        )
        .unwrap();
        use crate::ops::Activation;
        let acts = [Activation::Silu, Activation::GeluF16Table];
        for act in acts {
            for n in [1, 4, 67] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32() * 2.0).collect();
                let mut got = vec![f32::NAN; n * rows];
                crate::matmul::matmul_packed_glu(&gate, &up, &x, n, act, &mut got);
                let (mut g, mut u) = (vec![0.0; n * rows], vec![0.0; n * rows]);
                matmul_packed(&gate, &x, n, &mut g);
                matmul_packed(&up, &x, n, &mut u);
                crate::ops::glu_inplace(&mut g, &u, act);
                assert!(
                    got.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "n = {n}"
                );
            }
        }
    }

    /// The reference order is close to the float64 product of the dequantised row with the
    /// quantised activations (a check of the reference itself, independent of the packing).
    #[test]
    fn row_reference_matches_dequantised_product() {
        let mut rng = Rng(77);
        for (format, dtype) in FORMATS {
            let cols = 256;
            let row = random_rows(&mut rng, format, 1, cols);
            let mut w = vec![0f32; cols];
            crate::quant::dequantize_row(dtype, &row, &mut w);
            let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
            let mut q0 = vec![
                BlockQ8_0 {
                    d: 0.0,
                    qs: [0; QK]
                };
                cols / QK
            ];
            let mut q1 = vec![
                BlockQ8_1 {
                    d: 0.0,
                    s: 0.0,
                    qs: [0; QK]
                };
                cols / QK
            ];
            let mut sums = vec![0; cols / QK];
            quantize_row_q8_0(&x, &mut q0);
            quantize_row_q8_1(&x, &mut q1);
            block_sums(&q0, &mut sums);
            let (act, xq): (Act, Vec<f64>) = if format.has_min() {
                (
                    Act::Q8_1(&q1),
                    (0..cols)
                        .map(|i| f64::from(q1[i / QK].d) * f64::from(q1[i / QK].qs[i % QK]))
                        .collect(),
                )
            } else {
                (
                    Act::Q8_0(&q0, &sums),
                    (0..cols)
                        .map(|i| f64::from(q0[i / QK].d) * f64::from(q0[i / QK].qs[i % QK]))
                        .collect(),
                )
            };
            let want: f64 = w.iter().zip(&xq).map(|(&w, &x)| f64::from(w) * x).sum();
            let got = f64::from(dot_row(format, &row, act));
            // Q8_1's `s` is f16-rounded, so types with a min are off by up to ~1e-3 relative there.
            assert!(
                (got - want).abs() < 2e-3 * (1.0 + want.abs()),
                "{format:?}: {got} vs {want}"
            );
        }
    }
}

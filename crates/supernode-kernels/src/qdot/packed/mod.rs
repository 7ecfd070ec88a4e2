//! Weights re-laid out at load time for the integer dot instructions: panels of 16 rows whose
//! blocks are interleaved so that one `vpdpbusd` multiplies 4 consecutive weights of each of the
//! 16 rows by the same 4 activations. A block's 32 products of a row then sum into one 32-bit
//! lane, and the float step (scale, accumulate) is done for 16 rows in one register, with no
//! horizontal reduction anywhere. That is several times fewer instructions per weight byte than
//! the row-pair kernels of `avx512`, which keep 8 lanes per row: decode becomes bound by memory
//! instead of by the vector ports.
//!
//! Used in quantised precision for the 32-element types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) on every
//! machine (AVX-512 VNNI, AVX2 with `vpmaddubsw` + `vpmaddwd`, and a portable kernel), and for
//! Q4_K and Q6_K on every x86-64 CPU with AVX2. Other types keep the row kernels of [`super`].
//!
//! ## Numerics (the reference order of packed matrices)
//!
//! Per row, block after block, with `isum` the exact integer sum of the block's 32 products:
//! - Q4_0, Q5_0, Q8_0 (against Q8_0 activations): `acc = acc + (d_w * d_x) * isum`;
//! - Q4_1, Q5_1 (against Q8_1): `acc = acc + ((d_w * d_x) * isum + m_w * s_x)`;
//!
//! each a multiply then an add (no FMA), starting from `acc = 0`. This is llama.cpp's scalar
//! `ggml_vec_dot_q*_q8_*` order, and `dot_row` (in the tests) computes it from the original row as the
//! reference every level's panel kernel is tested against. It is not the 8-lane order of the row
//! kernels, so a packed matrix's outputs differ from an unpacked one's in the last bits: every
//! matrix of these types is always packed, whatever the batch and whatever the machine (every
//! level has their panel kernel), so the results are batch invariant and the same bits on every
//! machine. (Until the AVX2 and portable panel kernels came, only AVX-512 VNNI packed them, and
//! a machine without it gave logits up to 2 apart at some positions of the real models.)
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

pub(crate) mod layout;
#[cfg(test)]
mod tests;

pub use layout::PANEL;
pub(crate) use layout::{block_sums, sub_block_sums, Act, ActKind};

use crate::cpu::kernels;
use crate::dtype::{DType, QK_K};
use crate::quant::scale_min_k4;
use layout::{Format, Q4K_DMIN, Q4K_MINS, Q4K_QS, Q4K_SCALES, Q6K_QH, Q6K_QL, Q6K_SCALES};

/// One cache line, the unit of a packed matrix's storage (so panels start 64-byte aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

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
    /// is not whole blocks). Whether a matrix of a 32-element type is packed depends only on the
    /// matrix, never on the machine: every level has their panel kernel, so their products take
    /// the packed order everywhere.
    pub fn pack(dtype: DType, rows: usize, cols: usize, data: &[u8]) -> Option<PackedMatrix> {
        let format = Format::of(dtype)?;
        if !available(format) || cols == 0 || !cols.is_multiple_of(format.elems()) || rows == 0 {
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

/// Whether this machine runs the packed kernels of `format` (the 32-element types at every
/// level, the K-quants from AVX2 up).
pub(crate) fn available(format: Format) -> bool {
    kernels().panel_for(format).is_some()
}

/// Up to 4 tokens against one panel: `out[t][r]` for the panel's 16 rows. Panics unless the
/// machine has the kernels ([`available`]) and the activations match the matrix.
pub(crate) fn panel_dot(
    m: &PackedMatrix,
    panel: usize,
    acts: &[Act<'_>],
    out: &mut [[f32; PANEL]],
) {
    let kernel = kernels()
        .panel_for(m.format)
        .expect("a packed matrix has its level's panel kernel");
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
    let p = &m.bytes()[panel * m.panel_bytes()..(panel + 1) * m.panel_bytes()];
    // SAFETY: the table is this machine's; the panel holds `blocks` panel-blocks and every token
    // `blocks` activation blocks of the format's type, with their sums (checked above).
    unsafe { kernel(m.format, p, blocks, acts, out) }
}

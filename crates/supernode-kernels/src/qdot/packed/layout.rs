//! The packed layout's formats and constants, and the activations its kernels take. A leaf,
//! shared by [`crate::qdot::packed`] (which packs and dispatches) and the panel kernels of
//! `crate::cpu::avx512::panel`. The layout itself is described in [`crate::qdot::packed`].

use crate::dtype::{DType, QK_K};
use crate::qdot::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QK};

/// Rows per panel: one 32-bit lane of a 512-bit register per row.
pub const PANEL: usize = 16;

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
    pub(crate) fn of(dtype: DType) -> Option<Format> {
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
    pub(crate) fn source_offsets(self) -> (usize, usize) {
        match self {
            Format::Q4_0 | Format::Q8_0 => (0, 2),
            Format::Q5_0 => (0, 6),
            Format::Q4_1 => (0, 4),
            Format::Q5_1 => (0, 8),
            Format::Q4K | Format::Q6K => unreachable!("K-quants pack on their own"),
        }
    }
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
    pub(crate) fn blocks(&self) -> usize {
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

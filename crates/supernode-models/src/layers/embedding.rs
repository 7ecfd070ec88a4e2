//! Token embedding lookup (rows dequantised on demand).

use supernode_kernels::quant::dequantize_row;

use crate::Tensor;

/// A `vocab × dim` table in any dtype.
pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub(crate) fn new(table: Tensor) -> Embedding {
        Embedding { table }
    }

    /// The table, e.g. to share it as a tied output head.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// Writes the rows of `tokens` into `out` (`tokens.len() × dim`), each scaled by `scale`.
    pub fn forward(&self, tokens: &[u32], scale: f32, out: &mut [f32]) {
        let dim = self.table.cols();
        let row_bytes = self.table.dtype.row_bytes(dim).unwrap_or(0);
        let bytes = self.table.bytes();
        for (&tok, row) in tokens.iter().zip(out.chunks_exact_mut(dim)) {
            let start = tok as usize * row_bytes;
            dequantize_row(self.table.dtype, &bytes[start..start + row_bytes], row);
            if scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
    }
}

//! A weight tensor as the model code sees it, whatever file it came from.
//!
//! Shapes are in ggml order: `shape[0]` is the contiguous (innermost) dimension, so a matrix
//! with `rows` output features of `cols` inputs each has `shape == [cols, rows]`. Safetensors
//! shapes (row-major, outermost first) are reversed by the loader. Bytes live either in a
//! shared memory map or, when the loader had to convert them, in an owned buffer.

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;
use supernode_kernels::DType;

/// Where a tensor's bytes live.
#[derive(Clone, Debug)]
pub enum Storage {
    /// A byte range of a memory-mapped file (checked against the file size at load).
    Mapped(Arc<Mmap>, Range<usize>),
    /// Bytes the loader produced (a converted or re-laid-out tensor).
    Owned(Arc<Vec<u8>>),
}

/// One named weight tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    /// ggml order: innermost dimension first.
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl Tensor {
    /// The raw bytes, `dtype`-encoded, rows consecutive.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped(map, range) => &map[range.clone()],
            Storage::Owned(v) => v,
        }
    }

    /// Drops a mapped tensor's pages from this process's resident set (a hint: later reads
    /// fault them back in from the page cache). Nothing for owned bytes.
    pub fn release_pages(&self) {
        if let Storage::Mapped(map, range) = &self.storage {
            // Whole pages inside the range only, so neighbouring tensors keep theirs.
            let page = 4096;
            let start = range.start.next_multiple_of(page);
            let end = range.end / page * page;
            if end > start {
                // SAFETY: the map is read-only and private to this process's view of the file;
                // dropping clean pages only makes later reads fault them in again.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// Elements in the innermost dimension.
    pub fn cols(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of every dimension but the innermost.
    pub fn rows(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Total elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

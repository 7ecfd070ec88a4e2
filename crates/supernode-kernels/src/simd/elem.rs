//! The element types of the K/V rows the attention kernels read (f32, or f16 for an f16 KV
//! cache), and the per-thread buffer they are widened into. A leaf shared by the portable and the
//! ISA-specific kernels.
//!
//! Invariant: f16 values are widened to f32 exactly before any arithmetic, so no result depends
//! on the element type the values were stored in.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// An element type of the K/V rows the attention kernels read: f32, or f16 (an f16 KV cache).
/// Every path widens f16 to f32, which is exact, before the same f32 operations, so the results
/// do not depend on the element type the values were stored in.
pub(crate) trait KvElem: Copy {
    /// `src` as f32: itself, or widened into `buf[..src.len()]`.
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElem for f32 {
    #[inline(always)]
    fn widen<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for f16 {
    #[inline]
    fn widen<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf);
        buf
    }
}

thread_local! {
    /// The calling thread's buffer for [`with_buffer`].
    static BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `f` of a per-thread buffer of `len` values, kept between calls (so the attention kernels
/// of a decode step allocate nothing). Its contents are whatever the last user left: `f` must
/// write before it reads. A nested call gets a buffer of its own.
pub(crate) fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = BUFFER.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    BUFFER.set(buf);
    r
}

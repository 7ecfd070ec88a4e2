//! The per-forward scratch arena: activation buffers that live for one layer or one forward
//! pass, taken from a per-thread pool and given back when dropped, so a steady stream of
//! forward passes allocates nothing after the first few.
//!
//! [`zeroed`] is the drop-in for `vec![0.0; len]`: the buffer it returns holds `len` zeros,
//! whatever an earlier user left in it, so code that relied on a fresh vector's zeros computes
//! the same bits. Why it matters beyond the allocator's cost: a forward pass frees buffers of a
//! few hundred KiB to a few MiB many times a second; glibc's allocator then raises its mmap
//! threshold and serves them from the heap, whose fragmentation made a long-running server's
//! resident memory creep upward. Buffers that are kept do not fragment.
//!
//! The pool keeps at most [`POOL_BUFFERS`] buffers a thread; a buffer is taken best-fit (the
//! smallest that holds `len`, else the largest, which then grows), so its memory is bounded by
//! the largest set of buffers one forward pass holds at once.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// The most buffers a thread's pool keeps; more given back at once are freed.
pub const POOL_BUFFERS: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of the scratch arena; derefs to its `len` values and goes back to the pool of the
/// thread that drops it.
pub struct Scratch(Vec<f32>);

/// A scratch buffer of `len` zeros.
pub fn zeroed(len: usize) -> Scratch {
    let mut buf = POOL
        .try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let fit = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .or_else(|| pool.iter().enumerate().max_by_key(|(_, b)| b.capacity()))
                .map(|(i, _)| i);
            fit.map(|i| pool.swap_remove(i))
        })
        .ok()
        .flatten()
        .unwrap_or_default();
    buf.clear();
    buf.resize(len, 0.0);
    Scratch(buf)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() == 0 {
            return;
        }
        // (During thread teardown the pool may be gone; the buffer is then simply freed.)
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_BUFFERS {
                pool.push(buf);
            }
        });
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a Scratch {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a mut Scratch {
    type Item = &'a mut f32;
    type IntoIter = std::slice::IterMut<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter_mut()
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Scratch").field(&self.0.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled() -> Vec<usize> {
        POOL.with(|p| p.borrow().iter().map(Vec::capacity).collect())
    }

    /// A reused buffer is zeroed again, buffers are taken best-fit, and the pool is bounded.
    #[test]
    fn buffers_come_back_zeroed_best_fit_and_bounded() {
        POOL.with(|p| p.borrow_mut().clear());
        {
            let mut a = zeroed(100);
            a.iter_mut().for_each(|v| *v = 7.0);
            let _b = zeroed(1000);
        }
        assert_eq!(pooled().len(), 2);
        let a = zeroed(50);
        assert!(a.iter().all(|&v| v == 0.0) && a.len() == 50);
        // The 100-value buffer fits best and was taken; the 1000-value one is still pooled.
        assert_eq!(pooled(), vec![1000]);
        drop(a);
        // Nothing fits 5000: the largest is taken and grown.
        let big = zeroed(5000);
        assert_eq!(pooled(), vec![100]);
        assert!(big.iter().all(|&v| v == 0.0));
        drop(big);
        let held: Vec<Scratch> = (0..POOL_BUFFERS + 5).map(|_| zeroed(8)).collect();
        drop(held);
        assert_eq!(pooled().len(), POOL_BUFFERS);
        assert!(zeroed(0).is_empty());
    }
}

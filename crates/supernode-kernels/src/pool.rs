//! The thread pool of the forward pass: a fixed set of workers that spin briefly between jobs,
//! so that the hundreds of small parallel loops of one decode step (a few matrix products per
//! layer, each tens of microseconds) start and finish in well under a microsecond each, instead
//! of paying a general work-stealing pool's wake-ups, yields and futex waits every time.
//!
//! A job is `f(0) .. f(n - 1)`: the calling thread offers it to every worker through the
//! worker's own slot, then takes tasks itself from a shared counter, as the workers do. Which
//! thread runs which task is left to chance, so tasks must not depend on it (every kernel here
//! computes each output the same way whichever thread does it). When the caller runs out of
//! tasks it takes back the offers no worker picked up and waits for the workers that did.
//!
//! A worker that finds nothing for a while ([`SPIN`] polls, some tens of microseconds) parks,
//! and the next offer wakes it. Loops started from inside a task, or while another thread is
//! using the pool, run on the calling thread alone: same results, no deadlock.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

/// Polls of its slot a worker makes before parking.
const SPIN: u32 = 1 << 14;

/// One parallel loop, on the caller's stack for its duration.
struct Job {
    /// The loop body. Its true lifetime is the caller's `for_each` call, which does not return
    /// before every worker that took the job has finished with it.
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    /// Workers that took the job and have finished with it.
    finished: AtomicUsize,
    panicked: AtomicBool,
}

impl Job {
    /// Runs tasks until none is left. A panicking task is recorded, and the rest still run.
    fn run(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: see `f`: the closure outlives every task's run.
            let f = unsafe { &*self.f };
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
        }
    }
}

struct Worker {
    /// The job offered to this worker, or null.
    offered: AtomicPtr<Job>,
    sleeping: AtomicBool,
    thread: OnceLock<Thread>,
}

struct Pool {
    workers: Vec<&'static Worker>,
    /// Held by the thread whose job the workers are running.
    busy: Mutex<()>,
}

static POOL: OnceLock<Pool> = OnceLock::new();

thread_local! {
    /// Whether this thread is running a task of a job (nested loops then run inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Sets the number of threads (the caller plus `n - 1` workers) before the first parallel
/// loop. Returns false, changing nothing, if the pool already runs with another count.
pub fn set_threads(n: usize) -> bool {
    pool_with(n.max(1)).workers.len() + 1 == n.max(1)
}

/// Threads that run a parallel loop, the caller included.
pub fn threads() -> usize {
    pool().workers.len() + 1
}

fn pool() -> &'static Pool {
    POOL.get()
        .unwrap_or_else(|| pool_with(std::thread::available_parallelism().map_or(1, |n| n.get())))
}

fn pool_with(n: usize) -> &'static Pool {
    POOL.get_or_init(|| {
        let workers = (1..n)
            .map(|i| {
                let w: &'static Worker = Box::leak(Box::new(Worker {
                    offered: AtomicPtr::new(null_mut()),
                    sleeping: AtomicBool::new(false),
                    thread: OnceLock::new(),
                }));
                let handle = std::thread::Builder::new()
                    .name(format!("supernode-worker-{i}"))
                    .spawn(move || work(w))
                    .expect("cannot start a worker thread");
                let _ = w.thread.set(handle.thread().clone());
                w
            })
            .collect();
        Pool {
            workers,
            busy: Mutex::new(()),
        }
    })
}

/// A worker's life: wait for an offer (spinning, then parked), run the job's tasks, repeat.
fn work(w: &'static Worker) {
    IN_TASK.set(true);
    loop {
        let mut polls = 0;
        let job = loop {
            if !w.offered.load(Ordering::Relaxed).is_null() {
                let j = w.offered.swap(null_mut(), Ordering::Acquire);
                if !j.is_null() {
                    break j;
                }
            }
            if polls < SPIN {
                polls += 1;
                std::hint::spin_loop();
                continue;
            }
            w.sleeping.store(true, Ordering::SeqCst);
            if w.offered.load(Ordering::SeqCst).is_null() {
                std::thread::park();
            }
            w.sleeping.store(false, Ordering::SeqCst);
            polls = 0;
        };
        // SAFETY: the offering caller waits for `finished` to count this worker before its
        // job leaves the stack; this is the worker's last use of it.
        let job = unsafe { &*job };
        job.run();
        job.finished.fetch_add(1, Ordering::Release);
    }
}

/// Runs `f(i)` for every `i` in `0..n` on the pool's threads and returns when all are done.
/// Panics (after every task has finished) if a task panicked.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    let pool = pool();
    let inline = || (0..n).for_each(&f);
    if n == 1 || pool.workers.is_empty() || IN_TASK.get() {
        return inline();
    }
    let Ok(_busy) = pool.busy.try_lock() else {
        return inline();
    };
    let body: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: only the lifetime is erased; see `Job::f`.
    let body: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(body) };
    let job = Job {
        f: body,
        n,
        next: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    };
    let helpers = &pool.workers[..pool.workers.len().min(n - 1)];
    let ptr = &job as *const Job as *mut Job;
    for w in helpers {
        w.offered.store(ptr, Ordering::SeqCst);
        if w.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = w.thread.get() {
                t.unpark();
            }
        }
    }
    IN_TASK.set(true);
    job.run();
    IN_TASK.set(false);
    // Offers still in their slots were never taken: withdraw them. Wait for the others.
    let taken = helpers
        .iter()
        .filter(|w| w.offered.swap(null_mut(), Ordering::AcqRel).is_null())
        .count();
    while job.finished.load(Ordering::Acquire) < taken {
        std::hint::spin_loop();
    }
    if job.panicked.load(Ordering::Relaxed) {
        panic!("a parallel task panicked");
    }
}

/// `f(i, chunk)` for every `chunk`-long piece of `data` (the last may be shorter), in parallel.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(chunk > 0, "for_each_chunk_mut: zero chunk");
    let len = data.len();
    let base = SendPtr(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: chunks are disjoint and within `data`, which is borrowed mutably for the
        // whole loop; each index `i` runs exactly once.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, piece)
    });
}

/// A raw pointer that tasks may share (they touch disjoint parts of what it points at).
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: used only for disjoint accesses, as documented at each use.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once() {
        for n in [1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn nested_and_concurrent_loops_complete() {
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for_each(8, |_| {
                            for_each(4, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * 32);
    }

    #[test]
    fn chunks_cover_the_slice() {
        let mut v = vec![0usize; 1003];
        for_each_chunk_mut(&mut v, 10, |i, c| {
            for (j, x) in c.iter_mut().enumerate() {
                *x = i * 10 + j;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_survives() {
        let r = catch_unwind(|| {
            for_each(64, |i| {
                if i == 40 {
                    panic!("task 40");
                }
            })
        });
        assert!(r.is_err());
        let count = AtomicU64::new(0);
        for_each(64, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 64);
    }
}

//! The fuzzing harness shared by the fuzz targets of every crate (`crates/*/tests/fuzz.rs` and
//! the server's `src/server/fuzz.rs` include this file with `#[path]`).
//!
//! A target is a property over inputs grown from seeds: proptest generates a *plan* (a seed and
//! a list of structure-aware mutations, `mutate.rs`), the target builds the input from it and
//! runs the code under test. A failing plan is shrunk by proptest to a shortest list of
//! mutations, and the minimal input is written under `target/fuzz-failures/<target>/` so that it
//! can be committed to the corpus as a regression.
//!
//! Every target first replays its committed corpus (`tests/fuzz-corpus/<target>/`: the seeds and
//! the inputs of past crashes) unchanged, then runs mutated inputs for a budget:
//! - `SUPERNODE_FUZZ_SECS`: seconds per target (default 2);
//! - `SUPERNODE_FUZZ_CASES`: a number of mutated inputs per target instead of a time (rounded up
//!   to a whole batch);
//! - `SUPERNODE_FUZZ_SEED`: the seed of the input sequence (default 0: every run tries the same
//!   inputs; any other number explores new ones).
//!
//! The property is the same for every target: the code under test returns, Ok or a clean error.
//! It must not panic (caught, shrunk), take longer than [`SLOW`] on one input (shrunk), hang (a
//! watchdog writes the input and aborts the process after [`HANG`]), or allocate more than
//! [`ALLOC_LIMIT`] at once or [`LIVE_LIMIT`] in all (checked by [`LimitAlloc`] where a test binary
//! installs it as its global allocator; it writes the input and aborts, since an allocation
//! failure cannot unwind).

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// One input as files: a name and the bytes (what is written out when it fails).
pub type Files = Vec<(String, Vec<u8>)>;

/// One input that takes longer than this fails (and is shrunk).
pub const SLOW: Duration = Duration::from_secs(5);
/// One input that runs this long is a hang: the watchdog writes it out and aborts.
pub const HANG: Duration = Duration::from_secs(60);
/// The largest single allocation any input may cause (the inputs are kilobytes).
pub const ALLOC_LIMIT: usize = 256 << 20;
/// The most memory the whole test binary may hold at once.
pub const LIVE_LIMIT: usize = 2 << 30;
/// Mutated inputs per proptest run; the budget is checked between runs.
const BATCH: u32 = 16;

/// The repository root (every crate sits two levels below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed corpus of `target`, sorted by name: each file of `tests/fuzz-corpus/<target>/`
/// is one input, and so is each subdirectory (its files, for targets that read several). A
/// missing directory is an empty corpus.
pub fn corpus(target: &str) -> Vec<(String, Files)> {
    let dir = repo_root().join("tests/fuzz-corpus").join(target);
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let read = |p: &PathBuf| -> (String, Vec<u8>) {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (name(p), bytes)
    };
    let entries = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| p.file_name().is_some_and(|n| n != "README.md"))
            .collect();
        v.sort();
        v
    };
    entries(&dir)
        .iter()
        .map(|p| match p.is_dir() {
            true => (name(p), entries(p).iter().map(read).collect()),
            false => (name(p), vec![read(p)]),
        })
        .collect()
}

/// A scratch directory for one target's files, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(target: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("supernode-fuzz-{}-{target}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// Writes `files` into the directory (removing what an earlier input left) and returns it.
    pub fn write(&self, files: &Files) -> &Path {
        for e in std::fs::read_dir(&self.0).expect("scratch dir").flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        for (name, bytes) in files {
            std::fs::write(self.0.join(name), bytes).expect("scratch file");
        }
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The budget of one target, from the environment.
struct Budget {
    cases: Option<u64>,
    time: Duration,
    seed: u64,
}

impl Budget {
    fn from_env() -> Budget {
        fn var<T: std::str::FromStr>(k: &str) -> Option<T> {
            let v = std::env::var(k).ok()?;
            let parsed = v.trim().parse();
            Some(parsed.unwrap_or_else(|_| panic!("{k}={v} is not a number")))
        }
        Budget {
            cases: var("SUPERNODE_FUZZ_CASES"),
            time: Duration::from_secs_f64(var("SUPERNODE_FUZZ_SECS").unwrap_or(2.0)),
            seed: var("SUPERNODE_FUZZ_SEED").unwrap_or(0),
        }
    }

    fn done(&self, ran: u64, started: Instant) -> bool {
        match self.cases {
            Some(n) => ran >= n,
            None => started.elapsed() >= self.time,
        }
    }
}

/// The property a target checks beyond "returns": `Err` names a broken invariant.
pub type Check<I> = Box<dyn Fn(&I) -> Result<(), String>>;

/// What one target is: how a plan becomes an input, the input's files, and the check.
pub struct Target<P, I> {
    pub name: &'static str,
    pub build: Box<dyn Fn(&P) -> I>,
    pub files: Box<dyn Fn(&I) -> Files>,
    pub check: Check<I>,
}

/// Runs `target`: the corpus `replay` unchanged, then plans drawn from `plans` for the budget
/// (checked every [`BATCH`] inputs). Panics with the minimal failing input.
pub fn fuzz<P, I>(target: &Target<P, I>, replay: &[I], plans: impl Strategy<Value = P>)
where
    P: Debug + Clone,
{
    assert!(
        !replay.is_empty(),
        "fuzz target `{}` has no seeds",
        target.name
    );
    TARGET.with(|t| t.set(target.name));
    start_watchdog();
    for (i, input) in replay.iter().enumerate() {
        if let Err(e) = run_one(target, input) {
            let dir = write_failure(target.name, &(target.files)(input));
            panic!(
                "fuzz target `{}`: corpus input #{i} fails: {e}\ninput written to {}",
                target.name,
                dir.display()
            );
        }
    }
    let budget = Budget::from_env();
    let started = Instant::now();
    let mut ran = 0u64;
    let mut batch = 0u64;
    while !budget.done(ran, started) {
        let mut h = DefaultHasher::new();
        (target.name, budget.seed, batch).hash(&mut h);
        let config = Config {
            cases: BATCH,
            rng_seed: RngSeed::Fixed(h.finish()),
            failure_persistence: None,
            max_shrink_iters: 2048,
            max_shrink_time: 120_000,
            ..Config::default()
        };
        let count = AtomicUsize::new(0);
        let result = TestRunner::new(config).run(&plans, |plan| {
            count.fetch_add(1, Ordering::Relaxed);
            let input = (target.build)(&plan);
            run_one(target, &input).map_err(TestCaseError::fail)
        });
        ran += count.load(Ordering::Relaxed) as u64;
        batch += 1;
        match result {
            Ok(()) => {}
            Err(TestError::Fail(reason, plan)) => {
                let dir = write_failure(target.name, &(target.files)(&(target.build)(&plan)));
                panic!(
                    "fuzz target `{}` fails after {ran} inputs (SUPERNODE_FUZZ_SEED={}): \
                     {reason}\nminimal plan: {plan:#?}\ninput written to {}",
                    target.name,
                    budget.seed,
                    dir.display()
                );
            }
            Err(TestError::Abort(reason)) => panic!("fuzz target `{}`: {reason}", target.name),
        }
    }
    eprintln!(
        "fuzz target `{}`: {} corpus inputs and {ran} mutated inputs in {:.1} s ({})",
        target.name,
        replay.len(),
        started.elapsed().as_secs_f64(),
        notes_of(target.name)
    );
}

/// How many inputs of each target reached each named stage (see [`note`]).
static NOTES: Mutex<Vec<(&'static str, &'static str, u64)>> = Mutex::new(Vec::new());

thread_local! {
    /// The target this thread is fuzzing, for [`note`].
    static TARGET: Cell<&'static str> = const { Cell::new("") };
}

/// Counts the input being run as having reached `stage` (e.g. "loaded"): the summary of a run
/// shows how far the mutated inputs get past the first checks.
pub fn note(stage: &'static str) {
    let target = TARGET.with(Cell::get);
    let mut notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    match notes.iter_mut().find(|n| n.0 == target && n.1 == stage) {
        Some(n) => n.2 += 1,
        None => notes.push((target, stage, 1)),
    }
}

fn notes_of(target: &str) -> String {
    let notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    notes
        .iter()
        .filter(|n| n.0 == target)
        .map(|n| format!("{} {}", n.2, n.1))
        .collect::<Vec<_>>()
        .join(", ")
}

thread_local! {
    /// Set while this thread runs a fuzz input: its panics are reported with the input, not
    /// printed as they happen (code under test may also catch panics of its own).
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

static QUIET_HOOK: Once = Once::new();

fn quiet_panics() {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs the check on one input under the watchdog: `Err` for a panic, a broken invariant or a
/// slow input.
fn run_one<P, I>(target: &Target<P, I>, input: &I) -> Result<(), String> {
    quiet_panics();
    watch(Some((target.name, (target.files)(input))));
    let t = Instant::now();
    QUIET.with(|q| q.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| (target.check)(input)));
    QUIET.with(|q| q.set(false));
    let took = t.elapsed();
    watch(None);
    match result {
        Ok(Ok(())) if took > SLOW => Err(format!("one input took {took:?} (limit {SLOW:?})")),
        Ok(r) => r,
        Err(p) => Err(format!("panic: {}", panic_message(&*p))),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a string)".into())
}

/// Writes `files` under `target/fuzz-failures/<target>/<hash>/` and returns that directory.
pub fn write_failure(target: &str, files: &Files) -> PathBuf {
    let mut h = DefaultHasher::new();
    files.hash(&mut h);
    let dir = repo_root()
        .join("target/fuzz-failures")
        .join(target)
        .join(format!("{:016x}", h.finish()));
    let _ = std::fs::create_dir_all(&dir);
    for (name, bytes) in files {
        let _ = std::fs::write(dir.join(name), bytes);
    }
    dir
}

/// The input each fuzzing thread is running, for the watchdog and the allocator.
struct Running {
    thread: ThreadId,
    target: &'static str,
    since: Instant,
    files: Files,
}

static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());
static WATCHDOG: Once = Once::new();

fn watch(now: Option<(&'static str, Files)>) {
    let thread = std::thread::current().id();
    let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    running.retain(|r| r.thread != thread);
    if let Some((target, files)) = now {
        running.push(Running {
            thread,
            target,
            since: Instant::now(),
            files,
        });
    }
}

fn start_watchdog() {
    WATCHDOG.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = running.iter().find(|r| r.since.elapsed() > HANG) {
                let dir = write_failure(r.target, &r.files);
                eprintln!(
                    "fuzz target `{}`: one input has run for {:?} (a hang); input written to {}",
                    r.target,
                    r.since.elapsed(),
                    dir.display()
                );
                std::process::abort();
            }
        });
    });
}

/// A global allocator that refuses what no kilobyte-sized input may cause: one allocation over
/// [`ALLOC_LIMIT`], or more than [`LIVE_LIMIT`] held at once. It writes the input the allocating
/// thread is running (if it can tell) and aborts.
pub struct LimitAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static REPORTING: AtomicBool = AtomicBool::new(false);

impl LimitAlloc {
    /// Accounts for `grow` more bytes held, in an allocation of `size` bytes.
    fn admit(&self, size: usize, grow: usize) {
        let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
        if (size > ALLOC_LIMIT || live > LIVE_LIMIT) && !REPORTING.swap(true, Ordering::SeqCst) {
            report_allocation(size, live);
        }
    }
}

#[cold]
fn report_allocation(size: usize, live: usize) -> ! {
    let thread = std::thread::current().id();
    let found = RUNNING.try_lock().ok().and_then(|running| {
        let r = running.iter().find(|r| r.thread == thread)?;
        Some((r.target, write_failure(r.target, &r.files)))
    });
    eprintln!(
        "fuzz: an allocation of {size} bytes with {live} bytes live (limits: {ALLOC_LIMIT} at \
         once, {LIVE_LIMIT} live)"
    );
    match found {
        Some((target, dir)) => {
            eprintln!("fuzz target `{target}`: input written to {}", dir.display())
        }
        None => eprintln!("fuzz: the allocating thread was not running a fuzz input"),
    }
    eprintln!("{}", std::backtrace::Backtrace::force_capture());
    std::process::abort();
}

// SAFETY: every call is forwarded to `System` unchanged; the accounting only reads sizes.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.admit(layout.size(), layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.admit(layout.size(), layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            self.admit(new_size, new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

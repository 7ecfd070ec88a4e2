//! Helpers shared by the engine's integration tests: model paths and an event sink.

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use supernode_engine::engine::{Event, Sink};

/// The tiny random model of `tests/fixtures/hf/<arch>`.
pub fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(arch)
}

/// The cached GGUF of a known model (`$SUPERNODE_CACHE/models`, default
/// `~/.cache/supernode/models`); a missing file fails the test with what to run.
pub fn model_path(name: &str) -> PathBuf {
    let cache = std::env::var_os("SUPERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/supernode")
        });
    let p = cache.join("models").join(format!("{name}.gguf"));
    assert!(
        p.is_file(),
        "{} is missing: run `supernode fetch {name}` first",
        p.display()
    );
    p
}

/// A sink that keeps every event and is never closed.
pub struct Collect(pub Arc<Mutex<Vec<Event>>>);

impl Sink for Collect {
    fn send(&mut self, event: Event) -> bool {
        self.0.lock().unwrap().push(event);
        true
    }
    fn is_closed(&self) -> bool {
        false
    }
}

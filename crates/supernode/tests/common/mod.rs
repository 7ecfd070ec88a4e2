//! Helpers shared by the integration tests: locating cached models and fixtures.

#![allow(dead_code)]

use std::path::PathBuf;

/// The cached GGUF of a known model; a missing file fails the test with what to run.
pub fn model_path(name: &str) -> PathBuf {
    let cache = std::env::var_os("SUPERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/supernode")
        });
    let p = cache.join("models").join(format!("{name}.gguf"));
    assert!(
        p.is_file(),
        "{} is missing: run `supernode fetch {name}` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A file under the repository's `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn read_json(path: &PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `[[id, logit], ...]` pairs of a JSON row.
pub fn pairs(v: &serde_json::Value) -> Vec<(u32, f64)> {
    v.as_array()
        .expect("array of pairs")
        .iter()
        .map(|p| {
            (
                p[0].as_u64().expect("id") as u32,
                p[1].as_f64().expect("logit"),
            )
        })
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

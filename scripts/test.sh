#!/usr/bin/env bash
# The test suite: build once, fetch the real models into ~/.cache/supernode (first run only),
# then run every test in release mode (the real-model tests are too slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin supernode
for model in smollm2-135m gemma3-270m; do
    ./target/release/supernode fetch "$model" >/dev/null
done
cargo test --release --locked --workspace

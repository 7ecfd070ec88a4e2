#!/usr/bin/env bash
# The test suite: build once, fetch the real models into ~/.cache/supernode (first run only),
# then run every test in release mode (the real-model tests are too slow unoptimised), and
# close with the totals over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin supernode
for model in smollm2-135m gemma3-270m qwen2.5-0.5b; do
    ./target/release/supernode fetch "$model" >/dev/null
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --locked --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# The end-to-end tests of `supernode serve` through the OpenAI Python client; their closing
# `test result:` line is counted in the summary below.
bash scripts/python-tests.sh 2>&1 | tee -a "$log" || status=$?
echo
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

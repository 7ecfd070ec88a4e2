#!/usr/bin/env bash
# End-to-end tests of `supernode serve` with the official OpenAI Python client (tests/python).
# Creates once, and caches, a venv with the pinned tools of tests/python/requirements.txt under
# ${SUPERNODE_CACHE:-~/.cache/supernode}/venv-server-tests (rebuilt when that file changes), then
# runs pytest against $SUPERNODE_BIN (default: target/release/supernode, built beforehand).
# Extra arguments go to pytest (e.g. `-k stream -x`). Closes with a line
# `test result: ok|FAILED. N passed; M failed; ...` that scripts/test.sh adds to its summary.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${SUPERNODE_CACHE:-$HOME/.cache/supernode}
venv=$cache/venv-server-tests
req=tests/python/requirements.txt
bin=${SUPERNODE_BIN:-$PWD/target/release/supernode}
python=${PYTHON:-python3}

counts_line() { # passed failed skipped
    local verdict=ok
    [ "$2" -eq 0 ] || verdict=FAILED
    echo "test result: $verdict. $1 passed; $2 failed; $3 ignored (python server tests, tests/python)"
}

if [ ! -x "$bin" ]; then
    echo "python-tests: no server binary at $bin: run 'cargo build --release' or set SUPERNODE_BIN" >&2
    counts_line 0 1 0
    exit 1
fi

# The chat page's test drives Debian's Chromium; install it when it is missing and this can.
if ! command -v chromium >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "python-tests: installing chromium (apt-get)"
    apt-get install -y -q chromium >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } ||
        echo "python-tests: could not install chromium; test_ui.py will fail" >&2
fi

want=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" != "$want" ] || [ ! -x "$venv/bin/python" ]; then
    echo "python-tests: creating $venv"
    rm -rf "$venv"
    mkdir -p "$cache"
    if ! { "$python" -m venv "$venv" &&
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"; }; then
        echo "python-tests: cannot create the venv at $venv" >&2
        rm -rf "$venv"
        counts_line 0 1 0
        exit 1
    fi
    echo "$want" >"$venv/.requirements.sha256"
fi

# The models the tests serve (a no-op when they are cached already); qwen2.5-0.5b's template
# renders tools, so the tool-calling tests run on it.
for model in smollm2-135m qwen2.5-0.5b; do
    if ! "$bin" fetch "$model" >/dev/null; then
        echo "python-tests: cannot fetch the model $model" >&2
        counts_line 0 1 0
        exit 1
    fi
done

counts=$(mktemp)
trap 'rm -f "$counts"' EXIT
status=0
SUPERNODE_BIN=$bin SUPERNODE_PYTEST_COUNTS=$counts PYTHONDONTWRITEBYTECODE=1 \
    "$venv/bin/python" -m pytest tests/python "$@" || status=$?
if [ -s "$counts" ]; then
    read -r passed failed skipped <"$counts"
else
    passed=0 failed=1 skipped=0 # pytest died before its summary
fi
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1 # e.g. no test collected (exit 5) or an internal error
fi
counts_line "$passed" "$failed" "$skipped"
exit "$status"

#!/usr/bin/env bash
# End-to-end tests of `supernode serve` with the official OpenAI Python client (tests/python).
# Creates once, and caches, a venv with the pinned tools of tests/python/requirements.txt under
# ${SUPERNODE_CACHE:-~/.cache/supernode}/venv-server-tests (rebuilt when that file changes), then
# runs pytest against $SUPERNODE_BIN (default: target/release/supernode, built beforehand);
# then tests/python/test_instructor.py and test_lm_eval.py in a second cached venv,
# venv-extra-tests, with tests/python/requirements-extra.txt (which says why they are apart).
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

# ensure_venv DIR REQUIREMENTS [PIP-OPTIONS...]: a venv at DIR with those pinned tools, rebuilt
# when the file changes.
ensure_venv() {
    local dir=$1 req=$2 want
    shift 2
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ "$(cat "$dir/.requirements.sha256" 2>/dev/null || true)" = "$want" ] && [ -x "$dir/bin/python" ]; then
        return 0
    fi
    echo "python-tests: creating $dir"
    rm -rf "$dir"
    mkdir -p "$cache"
    if ! { "$python" -m venv "$dir" &&
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" -r "$req"; }; then
        echo "python-tests: cannot create the venv at $dir" >&2
        rm -rf "$dir"
        return 1
    fi
    echo "$want" >"$dir/.requirements.sha256"
}

if ! ensure_venv "$venv" "$req"; then
    counts_line 0 1 0
    exit 1
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
# run_pytest VENV ARGS...: runs pytest there and adds its counts to passed/failed/skipped.
passed=0 failed=0 skipped=0 status=0 user_args=$#
run_pytest() {
    local dir=$1 code=0 p f s
    shift
    : >"$counts"
    SUPERNODE_BIN=$bin SUPERNODE_PYTEST_COUNTS=$counts PYTHONDONTWRITEBYTECODE=1 \
        "$dir/bin/python" -m pytest "$@" || code=$?
    if [ -s "$counts" ]; then
        read -r p f s <"$counts"
    else
        p=0 f=1 s=0 # pytest died before its summary
    fi
    # Exit 5 (no test collected) is a failure unless arguments given to this script (say
    # `-k stream`) deselected everything.
    if [ "$code" -eq 5 ] && [ "$user_args" -gt 0 ]; then
        code=0
    fi
    if [ "$code" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1 # no test collected, or an internal error
    fi
    passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
    if [ "$code" -ne 0 ]; then status=$code; fi
}

# `supernode worker` behind Dynamo's frontend (tests/python/test_dynamo.py), when the worker is
# built (scripts/build-dynamo.sh; SUPERNODE_DYNAMO_BIN, default its cached build): the frontend
# runs from a third cached venv, venv-dynamo, with tests/python/requirements-dynamo.txt.
dyn_bin=${SUPERNODE_DYNAMO_BIN:-$cache/target-dynamo/release/supernode}
if [ -x "$dyn_bin" ]; then
    # Its etcd discovery test runs Debian's etcd; install it when it is missing and this can.
    if ! command -v etcd >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q etcd-server >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q etcd-server >/dev/null 2>&1; } ||
            echo "python-tests: could not install etcd-server; the etcd test is skipped" >&2
    fi
    if ensure_venv "$cache/venv-dynamo" tests/python/requirements-dynamo.txt --no-deps; then
        export SUPERNODE_DYNAMO_BIN=$dyn_bin SUPERNODE_DYNAMO_PYTHON=$cache/venv-dynamo/bin/python
    else
        echo "python-tests: cannot create venv-dynamo; test_dynamo.py is skipped" >&2
        failed=$((failed + 1)) status=1
    fi
    # NIXL's libraries for the prefill/decode tests (the worker loads libnixl_capi.so).
    if ensure_venv "$cache/venv-nixl" tests/python/requirements-nixl.txt --no-deps; then
        nixl_lib=$(echo "$cache"/venv-nixl/lib/python3*/site-packages/.nixl_cu12.mesonpy.libs)
        export SUPERNODE_NIXL_LIB=$nixl_lib
    else
        echo "python-tests: cannot create venv-nixl; the prefill/decode tests are skipped" >&2
        failed=$((failed + 1)) status=1
    fi
fi

extra_tests=(tests/python/test_instructor.py tests/python/test_lm_eval.py)
run_pytest "$venv" tests/python "${extra_tests[@]/#/--ignore=}" "$@"
# instructor and lm-eval, in the second venv (tests/python/requirements-extra.txt says why).
extra_venv=$cache/venv-extra-tests
if ensure_venv "$extra_venv" tests/python/requirements-extra.txt; then
    SUPERNODE_EXTRA_VENV=1 run_pytest "$extra_venv" "${extra_tests[@]}" "$@"
else
    failed=$((failed + 1)) status=1
fi
counts_line "$passed" "$failed" "$skipped"
exit "$status"

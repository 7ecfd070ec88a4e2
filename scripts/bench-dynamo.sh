#!/usr/bin/env bash
# Serving layouts behind NVIDIA Dynamo's frontend, on this machine: one `supernode worker`, two
# replicas (KV-aware routing), and one prefill plus one decode worker (KV blocks through NIXL),
# each worker pinned to one core with one thread. For each, `supernode bench --serve` against the
# frontend at each concurrency: aggregate output tok/s, TTFT and ITL percentiles. For the
# prefill/decode pair, also the KV transfers the decode worker made (bytes, time per request),
# and, when `ucx_perftest` is installed (Debian's ucx-utils), UCX's own GET bandwidth for a
# message of the mean transfer's size, between two processes, over the same transport.
#
#   bash scripts/bench-dynamo.sh [MODEL] [CONCURRENCY] [REQUESTS] [MAX_TOKENS]
#
# Needs the worker built with `dynamo` (scripts/build-dynamo.sh), Dynamo's frontend and NIXL as
# scripts/python-tests.sh installs them (venv-dynamo, venv-nixl), and two cores or more. A
# benchmark, not a test: it prints, it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

model=${1:-smollm2-135m}
conc=${2:-8,32}
requests=${3:-64}
max_tokens=${4:-64}
cache=${SUPERNODE_CACHE:-$HOME/.cache/supernode}
bin=${SUPERNODE_DYNAMO_BIN:-$cache/target-dynamo/release/supernode}
py=${SUPERNODE_DYNAMO_PYTHON:-$cache/venv-dynamo/bin/python}
nixl=${SUPERNODE_NIXL_LIB:-$(echo "$cache"/venv-nixl/lib/python3*/site-packages/.nixl_cu12.mesonpy.libs)}
client=${SUPERNODE_BIN:-target/release/supernode}
transport=${UCX_TLS:-tcp}

for f in "$bin" "$py" "$client" "$nixl/libnixl_capi.so"; do
    [ -e "$f" ] || { echo "bench-dynamo: $f is missing (see this script's header)" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "bench-dynamo: needs two cores" >&2; exit 1; }

out=$(mktemp -d)
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
trap 'stop_all; rm -rf "$out"' EXIT

export DYN_REQUEST_PLANE=tcp DYN_EVENT_PLANE=zmq DYN_DISCOVERY_BACKEND=file
export LD_LIBRARY_PATH=$nixl NIXL_PLUGIN_DIR=$nixl/plugins UCX_TLS=$transport

# layout NAME ROLE... : workers with these roles (agg, prefill, decode) on cores 0, 1, ...; the
# frontend unpinned; the benchmark's JSON in $out/NAME.json.
layout() {
    local name=$1 port=$((21000 + RANDOM % 5000)) i=0 role
    shift
    export DYN_FILE_KV=$out/$name-discovery
    local sys=()
    for role in "$@"; do
        local sp=$((port + 1 + i))
        sys+=("$sp")
        DYN_SYSTEM_PORT=$sp taskset -c "$i" "$bin" worker --model "$model" --threads 1 \
            --disaggregation-mode "$role" >"$out/$name-$i.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    "$py" -m dynamo.frontend --http-host 127.0.0.1 --http-port "$port" --router-mode kv \
        >"$out/$name-frontend.log" 2>&1 &
    pids+=($!)
    echo "bench-dynamo: $name ($*): waiting for the workers" >&2
    local t=0
    until curl -sf "http://127.0.0.1:$port/v1/models" | grep -q "\"$model\"" &&
        for sp in "${sys[@]}"; do curl -sf "http://127.0.0.1:$sp/health" >/dev/null || exit 1; done; do
        sleep 1
        t=$((t + 1))
        if [ $t -gt 300 ]; then
            tail -5 "$out"/"$name"-*.log >&2
            echo "bench-dynamo: $name did not come up" >&2
            exit 1
        fi
    done
    # One request first, so that no layout pays its first compile or connection in the figures.
    curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
        -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":4}" >/dev/null
    echo "bench-dynamo: $name: measuring at concurrency $conc" >&2
    "$client" bench --model "$model" --serve --url "http://127.0.0.1:$port" --concurrency "$conc" \
        --requests "$requests" --max-tokens "$max_tokens" --json >"$out/$name.json"
    if [ "$name" = "1P+1D" ]; then
        curl -sf "http://127.0.0.1:${sys[1]}/metrics" | grep '^supernode_kv_transfer' >"$out/transfers.txt"
    fi
    stop_all
}

layout "1 worker" agg
layout "2 replicas" agg agg
layout "1P+1D" prefill decode

"$py" - "$out" "$transport" <<'EOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
print(f"\nlayout      conc  out tok/s  TTFT p50/p95 ms  ITL p50/p95 ms  errors")
for name in ("1 worker", "2 replicas", "1P+1D"):
    for r in json.loads((out / f"{name}.json").read_text())["runs"]:
        ms = lambda key, p: f"{r[key][p] * 1e3:.0f}"
        print(f"{name:<11} {r['concurrency']:>4}  {r['output_tok_s']:>9.1f}  "
              f"{ms('ttft_s', 'p50'):>6}/{ms('ttft_s', 'p95'):<6}   {ms('inter_chunk_s', 'p50'):>5}/{ms('inter_chunk_s', 'p95'):<5}   {r['errors']}")
t = {}
for line in (out / "transfers.txt").read_text().splitlines():
    k, v = line.rsplit(" ", 1)
    t[k] = float(v)
n = t.get('supernode_kv_transfer_requests_total{outcome="pulled"}', 0)
b = t.get("supernode_kv_transfer_bytes_total", 0)
us = t.get("supernode_kv_transfer_microseconds_total", 0)
fb = t.get('supernode_kv_transfer_requests_total{outcome="fallback"}', 0)
if n and us:
    print(f"\nKV transfers (UCX_TLS={sys.argv[2]}): {n:.0f} pulled, {fb:.0f} fell back; "
          f"{b / n / 1e6:.2f} MB and {us / n / 1e3:.2f} ms per request, {b / us:.0f} MB/s")
    (out / "mean_bytes").write_text(str(int(b / n)))
EOF

# UCX's own GET bandwidth for one message of the mean transfer's size, two processes, same
# transport (over loopback: UCX_TCP_... let it pick the interface).
if command -v ucx_perftest >/dev/null && [ -f "$out/mean_bytes" ]; then
    size=$(cat "$out/mean_bytes")
    port=$((26000 + RANDOM % 4000))
    env -u LD_LIBRARY_PATH ucx_perftest -p "$port" >/dev/null 2>&1 &
    srv=$!
    sleep 1
    echo "raw UCX (ucx_perftest ucp_get, $size bytes, UCX_TLS=$transport):"
    env -u LD_LIBRARY_PATH ucx_perftest -p "$port" -t ucp_get -s "$size" -n 50 -w 5 127.0.0.1 2>&1 | tail -n 3 || true
    kill "$srv" 2>/dev/null || true
fi

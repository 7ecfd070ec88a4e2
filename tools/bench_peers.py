#!/usr/bin/env python3
"""supernode beside llama.cpp and ik_llama.cpp, on the same machine, GGUF files and thread count.

Builds each peer's `llama-bench` and `llama-server` once (CPU only, Release, this CPU's SIMD
extensions but not AMX, no downloads at configure time), records how long that took, then runs
the engines alternately within each round, so that machine noise hits them alike:

- single stream, R rounds, medians and ratios against both peers:
  - prefill of a P-token prompt: `llama-bench -p P`; supernode's `bench --prompt-tokens P`;
  - decode of N tokens from an empty context: `llama-bench -n N`; supernode's
    `bench --prompt-tokens 1`;
  - decode of N tokens after D tokens of context, for D = P and each of --depths: llama.cpp's
    `llama-bench -p 0 -n N -d D`, ik_llama.cpp's `llama-bench -gp D,N` (its llama-bench has no
    `-d`; `-gp` times only the N decode steps after a D-token prompt); supernode's
    `bench --prompt-tokens D --gen-tokens N --ctx D+N` (it decodes after its prompt). A depth
    beyond a model's trained context is skipped and said so;
  - llama.cpp with flash attention (`-fa 1`); ik_llama.cpp with `-fa 1 -rtr 1 -fmoe 1` (run-time
    repacking, fused MoE); supernode in both precisions (`quantized`, the default since 2026-12-07, and `exact`);
  - decode's share of the measured memory bandwidth: decode tok/s x (weight bytes + KV bytes
    read per token) / the read bandwidth `supernode bench` measures (`memory_read_gb_s`);
- serving (with --serve): llama.cpp's and ik_llama.cpp's `llama-server` (C parallel slots,
  continuous batching) against `supernode serve`, all driven by the same client
  (`supernode bench --serve --url ...`): aggregate output tok/s, TTFT and inter-token
  percentiles, ratios against both peers.

Usage:
    python3 tools/bench_peers.py [--models smollm2-135m,gemma3-270m,qwen2.5-0.5b] [--threads 2]
        [--rounds 3] [--prompt-tokens 512] [--gen-tokens 128] [--depths 4096,16384]
        [--serve] [--concurrency 16[,64]] [--requests 200] [--max-tokens 64]
        [--skip-llamacpp] [--skip-ik] [--json OUT.json] [--markdown OUT.md]

Everything built lives under ~/.cache/supernode (or $SUPERNODE_CACHE).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SUPERNODE_CACHE", Path.home() / ".cache" / "supernode"))
IK_GIT_DIR = os.environ.get("IK_LLAMA_GIT_DIR", "/work/.mirror/ikawrakow+ik_llama.cpp/repo")
# ggml's AMX code dies with SIGILL on VMs that advertise AMX without enabling it.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PEERS = ("llama.cpp", "ik_llama.cpp")


class BenchError(Exception):
    """A failure worth one line to the user (what failed and what to do)."""


def say(msg):
    print(f"[bench_peers] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    say("$ " + " ".join(map(str, cmd)))
    try:
        return subprocess.run(cmd, check=True, **kw)
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or "").strip().splitlines()[-3:] if isinstance(e.stderr, str) else []
        raise BenchError(f"`{Path(str(cmd[0])).name}` exited with {e.returncode}"
                         + (": " + " | ".join(tail) if tail else "")) from None
    except FileNotFoundError:
        raise BenchError(f"`{cmd[0]}` not found") from None


# ---------------------------------------------------------------------------------------------
# Builds
# ---------------------------------------------------------------------------------------------

def cmake():
    """A cmake: the one on PATH, else one installed with pip into a venv of its own."""
    found = shutil.which("cmake")
    if found:
        return found
    venv = CACHE / "venv-llamacpp-build"
    if not (venv / "bin" / "cmake").exists():
        say("no cmake on PATH: installing one with pip into " + str(venv))
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "cmake"])
    return str(venv / "bin" / "cmake")


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def llamacpp_isa_flags():
    """Every SIMD extension this CPU has, switched on one by one (what GGML_NATIVE would pick),
    except AMX (see NO_AMX; the workaround, --no-repack, would also turn off weight repacking)."""
    flags = cpu_flags()
    if "avx2" not in flags:
        return ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    wanted = {
        "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
        "GGML_BMI2": "bmi2", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f",
        "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
        "GGML_AVX512_BF16": "avx512_bf16",
    }
    return ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v in flags else 'OFF'}" for k, v in wanted.items()]


def build(name, src, build_dir, configure, serve):
    """Configures and builds `llama-bench` (and `llama-server` when `serve`) from `src` into
    `build_dir` unless they exist; returns their paths and the build record (flags, seconds,
    date) kept beside them."""
    bindir = build_dir / "bin"
    bench, server = bindir / "llama-bench", bindir / "llama-server"
    record = build_dir / "bench_peers_build.json"
    targets = ["llama-bench", "llama-server"] if serve else ["llama-bench"]
    if all((bindir / t).exists() for t in targets):
        info = json.loads(record.read_text()) if record.exists() else {"seconds": None}
        say(f"{name}: using the build in {build_dir}")
        return bench, server, info
    cm = cmake()
    say(f"{name}: building {' and '.join(targets)} in {build_dir} (-j2; tens of minutes on 2 busy cores)")
    t0 = time.time()
    log = build_dir.parent / f"{build_dir.name}.log"
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        for step in ([cm, "-S", str(src), "-B", str(build_dir), *configure],
                     [cm, "--build", str(build_dir), "--target", *targets, "-j", "2"]):
            say("$ " + " ".join(step))
            p = subprocess.Popen(step, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            last = 0.0
            for line in p.stdout:
                out.write(line)
                if line.startswith("[") and time.time() - last > 30:
                    say(f"{name}: {line.strip()[:100]}")
                    last = time.time()
            if p.wait() != 0:
                raise BenchError(f"{name}: build step failed (exit {p.returncode}); see {log}")
    info = {"seconds": round(time.time() - t0), "configure": configure,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "jobs": 2, "targets": targets}
    record.write_text(json.dumps(info, indent=2))
    say(f"{name}: built in {info['seconds']} s")
    return bench, server, info


def ensure_llamacpp(serve):
    """llama.cpp as vendored in the llama-cpp-python sdist (fetched with pip download once)."""
    sdists = CACHE / "sdists"
    sdist = sdists / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    src_top = CACHE / "llama.cpp-src"
    src = src_top / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        if not sdist.exists():
            run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                 "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(sdists)])
        say(f"llama.cpp: unpacking {sdist.name}")
        unpack = CACHE / "llama.cpp-unpack"
        with tarfile.open(sdist) as t:
            t.extractall(unpack, filter="data")
        shutil.rmtree(src_top, ignore_errors=True)
        shutil.move(str(next(unpack.iterdir())), str(src_top))
        shutil.rmtree(unpack)
    configure = ["-DCMAKE_BUILD_TYPE=Release", *llamacpp_isa_flags(), "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
    bench, server, info = build("llama.cpp", src, CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}-noamx" / "build",
                                configure, serve)
    return {"bench": bench, "server": server, "build": info,
            "version": f"llama-cpp-python {LLAMA_CPP_PYTHON} (vendored llama.cpp)"}


def export_tree(git_dir, dest):
    """HEAD's files under `dest`. `git archive` first; where the repository lacks some blobs (a
    partial mirror), file by file through `git cat-file --batch`, writing an empty file for each
    missing blob. Returns the paths that were missing."""
    dest.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "--format=tar", "HEAD"],
                          capture_output=True)
    if arch.returncode == 0:
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
        return []
    say("ik_llama.cpp: git archive failed (" + arch.stderr.decode(errors="replace").strip().splitlines()[0]
        + "); exporting file by file")
    tree = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "-z", "HEAD"],
                          check=True, capture_output=True).stdout
    cat = subprocess.Popen(["git", f"--git-dir={git_dir}", "cat-file", "--batch"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    missing = []
    for rec in filter(None, tree.split(b"\0")):
        meta, path = rec.split(b"\t", 1)
        mode, kind, sha = meta.decode().split()
        if kind != "blob":  # submodules
            continue
        cat.stdin.write(sha.encode() + b"\n")
        cat.stdin.flush()
        header = cat.stdout.readline().split()
        data = b""
        if header[1] == b"missing":
            missing.append(path.decode())
        else:
            data = cat.stdout.read(int(header[2]))
            cat.stdout.read(1)
        out = dest / path.decode()
        out.parent.mkdir(parents=True, exist_ok=True)
        if mode == "120000" and data:
            if out.is_symlink() or out.exists():
                out.unlink()
            os.symlink(data.decode(), out)
        else:
            out.write_bytes(data)
            if mode == "100755":
                out.chmod(0o755)
    cat.stdin.close()
    cat.wait()
    return missing


def ensure_ik(git_dir, serve):
    """ik_llama.cpp at the HEAD of a local clone or mirror, under ik_llama.cpp-<commit12>."""
    if not Path(git_dir).exists():
        raise BenchError(f"ik_llama.cpp: no git directory at {git_dir}; clone ik_llama.cpp "
                         "(a bare or mirror clone is enough) and pass --ik-git-dir, or use --skip-ik")
    commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    base = CACHE / f"ik_llama.cpp-{commit[:12]}"
    src = base / "src"
    if not (src / "CMakeLists.txt").exists():
        say(f"ik_llama.cpp: exporting {commit[:12]} from {git_dir}")
        missing = export_tree(git_dir, src)
        if missing:
            say(f"ik_llama.cpp: {len(missing)} blobs missing from the mirror, written empty: "
                + ", ".join(missing))
    # -march=native minus AMX. FA_ALL_QUANTS only adds flash-attention kernels for q4_0 / q4_1 /
    # iq4_nl KV caches (the f16 cache used here does not need them) and halves the build.
    configure = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}",
                 f"-DCMAKE_CXX_FLAGS={NO_AMX}", "-DLLAMA_CURL=OFF", "-DGGML_CURL=OFF",
                 "-DLLAMA_SERVER_SSL=OFF", "-DLLAMA_SERVER_SQLITE3=OFF", "-DGGML_CCACHE=OFF",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_IQK_FA_ALL_QUANTS=OFF"]
    bench, server, info = build("ik_llama.cpp", src, base / "build", configure, serve)
    help_text = subprocess.run([str(bench), "--help"], capture_output=True, text=True).stdout
    for flag in ("-rtr", "-fmoe", "-gp"):
        if flag not in help_text:
            raise BenchError(f"ik_llama.cpp {commit[:12]}: its llama-bench has no {flag}")
    return {"bench": bench, "server": server, "build": info, "version": f"ik_llama.cpp {commit[:12]}"}


def supernode_bin(path):
    if path:
        b = Path(path)
        if not b.exists():
            raise BenchError(f"--supernode {path}: no such file")
        return b
    b = ROOT / "target" / "release" / "supernode"
    if not b.exists():
        run(["cargo", "build", "--release", "-p", "supernode"], cwd=ROOT)
    return b


# ---------------------------------------------------------------------------------------------
# Models: paths and the geometry the bandwidth share needs
# ---------------------------------------------------------------------------------------------

def model_path(name):
    if name.endswith(".gguf"):
        p = Path(name)
    else:
        p = CACHE / "models" / f"{name}.gguf"
    if not p.exists():
        raise BenchError(f"model {name}: no {p}; fetch it with `supernode fetch {name}` "
                         "(short names: smollm2-135m, gemma3-270m, qwen2.5-0.5b) or give a .gguf path")
    return p


def gguf_metadata(path):
    """The key-value metadata of a GGUF file (arrays of strings skipped as None)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
              11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        def value(t):
            if t in scalar:
                return read(scalar[t])
            if t == 8:
                return string()
            if t == 9:
                et, n = read("<I"), read("<Q")
                if et == 8:
                    for _ in range(n):
                        f.seek(read("<Q"), 1)
                    return None
                if et in scalar:
                    size = struct.calcsize(scalar[et])
                    if n > 4096:
                        f.seek(n * size, 1)
                        return None
                    return list(struct.unpack(f"<{n}{scalar[et][1]}", f.read(n * size)))
                return [value(et) for _ in range(n)]
            raise BenchError(f"{path}: unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise BenchError(f"{path}: not a GGUF file")
        read("<I")
        read("<Q")
        meta = {}
        for _ in range(read("<Q")):
            k = string()
            meta[k] = value(read("<I"))
        return meta


def kv_geometry(path):
    """Per layer (KV values per token, sliding window or None), and the trained context."""
    m = gguf_metadata(path)
    arch = m["general.architecture"]
    g = lambda k, d=None: m.get(f"{arch}.{k}", d)  # noqa: E731
    n_layer = g("block_count")
    n_head = g("attention.head_count")
    n_kv = g("attention.head_count_kv", n_head)
    head = g("embedding_length") // (n_head if isinstance(n_head, int) else max(n_head))
    k_len, v_len = g("attention.key_length", head), g("attention.value_length", head)
    window = g("attention.sliding_window")
    layers = []
    for il in range(n_layer):
        kv = n_kv[il] if isinstance(n_kv, list) else n_kv
        # Gemma 3: five sliding-window layers, then one global (llama.cpp's swa pattern 6).
        swa = window if (arch == "gemma3" and window and (il + 1) % 6 != 0) else None
        layers.append((kv * (k_len + v_len), swa))
    return layers, g("context_length")


def kv_bytes_per_token(layers, context, elem_bytes):
    """KV bytes one decode step reads at `context` tokens of context."""
    return sum(vals * elem_bytes * min(context, swa or context) for vals, swa in layers)


# ---------------------------------------------------------------------------------------------
# Single stream
# ---------------------------------------------------------------------------------------------

def llama_bench_rows(cmd):
    out = run(cmd, capture_output=True, text=True).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise BenchError(f"`{cmd[0]}` printed no JSON: {out[:200]!r}") from None


def peer_figures(name, peer, gguf, a, depths):
    """{metric: tok/s} from one llama-bench run of each kind (-r 1 after its warm-up)."""
    common = [str(peer["bench"]), "-m", str(gguf), "-t", str(a.threads), "-fa", "1", "-r", "1",
              "-o", "json"]
    P, N = a.prompt_tokens, a.gen_tokens
    figs = {}
    if name == "llama.cpp":
        rows = llama_bench_rows(common + ["-p", str(P), "-n", str(N)])
        rows += llama_bench_rows(common + ["-p", "0", "-n", str(N), "-d", ",".join(map(str, depths))])
        for r in rows:
            d = r.get("n_depth", 0)
            if r["n_prompt"] == P and r["n_gen"] == 0 and d == 0:
                figs["prefill"] = r["avg_ts"]
            elif r["n_prompt"] == 0 and r["n_gen"] == N:
                figs[f"decode@{d}"] = r["avg_ts"]
    else:
        cmd = common + ["-rtr", "1", "-fmoe", "1", "-p", str(P), "-n", str(N)]
        for d in depths:
            cmd += ["-gp", f"{d},{N}"]
        for r in llama_bench_rows(cmd):
            if r["n_prompt"] == P and r["n_gen"] == 0:
                figs["prefill"] = r["avg_ts"]
            elif r["n_prompt"] == 0 and r["n_gen"] == N:
                figs["decode@0"] = r["avg_ts"]
            elif r["n_gen"] == N:
                figs[f"decode@{r['n_prompt']}"] = r["avg_ts"]
    return figs


def supernode_bench(sn, gguf, a, precision, prompt_tokens):
    out = run([str(sn), "bench", "--model", str(gguf), "--threads", str(a.threads),
               "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(a.gen_tokens),
               "--reps", "1", "--json", "--precision", precision,
               "--ctx", str(max(2048, prompt_tokens + a.gen_tokens))],
              capture_output=True, text=True)
    return json.loads(out.stdout)


def supernode_figures(sn, gguf, a, precision, depths):
    """Prefill of the P-token prompt, decode after each depth (P among them), and decode from a
    one-token prompt (positions 1 .. N; llama-bench's plain tgN decodes at 0 .. N - 1)."""
    figs, info = {}, {}
    for d in depths:
        j = supernode_bench(sn, gguf, a, precision, d)
        figs[f"decode@{d}"] = j["decode_tok_s"]
        if d == a.prompt_tokens:
            figs["prefill"] = j["prefill_tok_s"]
        info = j
    j = supernode_bench(sn, gguf, a, precision, 1)
    figs["decode@0"] = j["decode_tok_s"]
    return figs, info


def single_stream(peers, sn, name, gguf, a):
    layers, n_ctx = kv_geometry(gguf)
    depths = [a.prompt_tokens]
    skipped = []
    for d in a.depths:
        if d + a.gen_tokens > n_ctx:
            skipped.append(d)
            say(f"{name}: depth {d} + {a.gen_tokens} exceeds its trained context of {n_ctx}: skipped")
        elif d not in depths:
            depths.append(d)
    metrics = ["prefill", "decode@0"] + [f"decode@{d}" for d in depths]
    engines = list(peers) + [f"supernode-{p}" for p in a.precisions]
    res = {k: {m: [] for m in metrics} for k in engines}
    extra = {"weight_bytes_per_token": {}, "memory_read_gb_s": []}
    for r in range(a.rounds):
        # The order turns each round, so that no engine always runs first (or after the slowest).
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        say(f"{name}: round {r + 1}/{a.rounds} ({', '.join(order)})")
        for k in order:
            if k in peers:
                figs = peer_figures(k, peers[k], gguf, a, depths)
            else:
                precision = k.split("-", 1)[1]
                figs, j = supernode_figures(sn, gguf, a, precision, depths)
                extra["weight_bytes_per_token"][precision] = j["weight_bytes_per_token"]
                extra["memory_read_gb_s"].append(j["memory_read_gb_s"])
            for m in metrics:
                if m not in figs:
                    raise BenchError(f"{k} on {name}: no {m} figure in its output")
                res[k][m].append(figs[m])
    med = {k: {m: statistics.median(v) for m, v in ms.items()} for k, ms in res.items()}
    bw = statistics.median(extra["memory_read_gb_s"]) * 1e9
    # Bytes each decode step reads: the weights (what supernode counts for the file; the peers
    # read the same tensors) plus the KV cache at the mean context of the N steps: f16 for the
    # peers and for supernode quantized, f32 for supernode exact. Both precisions count the
    # file's weight bytes alike, so whichever ran gives them.
    wq = next(iter(extra["weight_bytes_per_token"].values()))
    elem = {"supernode-exact": 4}
    table = {}
    for k, v in med.items():
        row = {"tok_s": v, "ratio": {}, "bandwidth_share": {}, "bytes_per_token": {}}
        for p in peers:
            row["ratio"][p] = {m: v[m] / med[p][m] for m in metrics}
        wb = extra["weight_bytes_per_token"].get(k.removeprefix("supernode-"), wq)
        for m in metrics[1:]:
            depth = int(m.split("@")[1])
            b = wb + kv_bytes_per_token(layers, depth + a.gen_tokens / 2, elem.get(k, 2))
            row["bytes_per_token"][m] = b
            row["bandwidth_share"][m] = v[m] * b / bw
        table[k] = row
    return {"model": name, "file": str(gguf), "trained_context": n_ctx, "depths": depths,
            "skipped_depths": skipped, "metrics": metrics, "runs": res, "median": table,
            "weight_bytes_per_token": extra["weight_bytes_per_token"],
            "memory_read_gb_s": bw / 1e9, "memory_read_gb_s_runs": extra["memory_read_gb_s"]}


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url, log, timeout=300):
    """Waits until `url`/health answers 200 (the model loaded), or the server exits."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before it was ready; see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise BenchError(f"server at {url} not ready after {timeout} s; see {log}")


# Models served through /v1/completions rather than chat: Gemma 3 270M's GGUF is the base model
# and has no chat template (supernode refuses chat requests to it; llama-server would apply a
# fallback template of its own).
COMPLETIONS = {"gemma3-270m"}


def load(sn, url, a, conc, name):
    extra = ["--completions"] if name in COMPLETIONS else []
    out = run([str(sn), "bench", "--serve", "--url", url, "--model", "unused",
               "--concurrency", str(conc), "--requests", str(a.requests),
               "--max-tokens", str(a.max_tokens), "--json", *extra], capture_output=True, text=True)
    return json.loads(out.stdout)["runs"][0]


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_one(cmd, url, log, sn, a, conc, name):
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        try:
            wait_healthy(p, url, log)
            time.sleep(1)
            return load(sn, url, a, conc, name)
        finally:
            stop(p)


def serving(peers, sn, name, gguf, a, conc):
    ctx_per_slot = 1024
    res = {}
    logdir = Path(a.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    for peer, info in peers.items():
        port = free_port()
        say(f"{name}: {peer}'s llama-server with {conc} slots on port {port}")
        cmd = [str(info["server"]), "-m", str(gguf), "-t", str(a.threads), "-np", str(conc),
               "-c", str(conc * ctx_per_slot), "-fa", "on", "--cont-batching",
               # Its default HTTP pool serves only a few streams at a time.
               "--threads-http", str(conc + 4), "--host", "127.0.0.1", "--port", str(port)]
        if peer == "ik_llama.cpp":
            cmd.append("-rtr")  # fused MoE is on by default in its server
        res[f"{peer} server"] = serve_one(cmd, f"http://127.0.0.1:{port}",
                                          logdir / f"{peer}-{name}-{conc}.log", sn, a, conc, name)
    for precision in a.precisions:
        port = free_port()
        say(f"{name}: supernode serve ({precision}) on port {port}")
        cmd = [str(sn), "serve", "--model", str(gguf), "--threads", str(a.threads),
               "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(conc),
               "--precision", precision, "--ctx", str(ctx_per_slot)]
        res[f"supernode-{precision}"] = serve_one(cmd, f"http://127.0.0.1:{port}",
                                                  logdir / f"supernode-{precision}-{name}-{conc}.log",
                                                  sn, a, conc, name)
    for v in res.values():
        v["output_tok_s_ratio"] = {}
        for peer in peers:
            base = res[f"{peer} server"]["output_tok_s"]
            v["output_tok_s_ratio"][peer] = v["output_tok_s"] / base if base else None
    return {"model": name, "concurrency": conc, "runs": res}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def fmt(v, digits=1):
    """`v` with `digits` decimals, or "-" when there is none (a run whose requests all failed
    has no latencies)."""
    return "-" if v is None else f"{v:,.{digits}f}"


def single_markdown(results, a, peers):
    lines = []
    for s in results["single"]:
        ms = s["metrics"]
        head = ["engine"]
        for m in ms:
            label = f"pp{a.prompt_tokens}" if m == "prefill" else f"tg{a.gen_tokens}@{m.split('@')[1]}"
            head += [f"{label} tok/s"] + [f"x {p}" for p in peers]
        lines.append(f"\n**{s['model']}** (trained context {s['trained_context']:,}"
                     + (f"; depths {', '.join(map(str, s['skipped_depths']))} skipped: beyond it"
                        if s["skipped_depths"] else "") + ")\n")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for k, row in s["median"].items():
            cells = [k]
            for m in ms:
                cells.append(fmt(row["tok_s"][m]))
                cells += [fmt(row["ratio"][p][m], 2) for p in peers]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nDecode's share of the measured read bandwidth (tok/s x (weights + KV bytes "
                 f"read per token) / bandwidth; KV at the mean context of the {a.gen_tokens} steps):\n")
    head = ["model", "bandwidth GB/s", "engine"]
    ms_all = results["single"][0]["metrics"][1:] if results["single"] else []
    head += [f"tg{a.gen_tokens}@{m.split('@')[1]}: MB/token, share" for m in ms_all]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in results["single"]:
        for i, (k, row) in enumerate(s["median"].items()):
            cells = [s["model"] if i == 0 else "", fmt(s["memory_read_gb_s"]) if i == 0 else "", k]
            for m in ms_all:
                if m in row["bandwidth_share"]:
                    cells.append(f"{row['bytes_per_token'][m] / 1e6:.1f}, {row['bandwidth_share'][m]:.0%}")
                else:
                    cells.append("-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def serving_markdown(results, a, peers):
    lines = []
    for s in results["serving"]:
        api = "/v1/completions" if s["model"] in COMPLETIONS else "/v1/chat/completions"
        lines.append(f"\n**{s['model']}**: {s['concurrency']} concurrent streams, {a.requests} "
                     f"requests of {a.max_tokens} tokens to {api}\n")
        head = ["engine", "output tok/s"] + [f"x {p} server" for p in peers] + [
            "TTFT p50 (s)", "ITL p50 (s)", "ITL p95 (s)", "errors"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for k, v in s["runs"].items():
            cells = [k, fmt(v["output_tok_s"])] + [fmt(v["output_tok_s_ratio"][p], 2) for p in peers]
            cells += [fmt(v["ttft_s"]["p50"], 2), fmt(v["inter_chunk_s"]["p50"], 3),
                      fmt(v["inter_chunk_s"]["p95"], 3), str(v["errors"])]
            lines.append("| " + " | ".join(cells) + " |")
            if v.get("first_errors"):
                lines.append(f"\n{k}: first error: {v['first_errors'][0][:160]}\n")
    return "\n".join(lines)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine():
    flags = cpu_flags()
    simd = [f for f in ("avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512_vnni",
                        "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": cpu_name(), "simd": simd, "cores": os.cpu_count(),
            "loadavg_start": os.getloadavg()}


def supernode_commit(sn):
    """The commit of the checkout the binary was built in (its target/ inside the work tree),
    with "+dirty" when that tree has changes; "unknown" for a binary built elsewhere."""
    git = ["git", "-C", str(Path(sn).resolve().parent)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b",
                    help="short names in ~/.cache/supernode/models, or .gguf paths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--depths", default="",
                    help="extra context depths for decode, e.g. 4096,16384 (each beyond a model's "
                         "context is skipped)")
    ap.add_argument("--precisions", default="quantized,exact",
                    help="supernode's precisions, comma-separated (default: both)")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--no-single", action="store_true", help="skip the single-stream runs")
    ap.add_argument("--concurrency", default="16", help="serving streams, comma-separated: 16,64")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-llamacpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--skip-ik", action="store_true", help="leave ik_llama.cpp out")
    ap.add_argument("--ik-git-dir", default=IK_GIT_DIR,
                    help="a git directory (clone or mirror) of ik_llama.cpp; its HEAD is built "
                         "(default: $IK_LLAMA_GIT_DIR or %(default)s)")
    ap.add_argument("--supernode", help="the supernode binary (default: target/release/supernode)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--markdown", help="also write the markdown tables here")
    ap.add_argument("--log-dir", default=str(CACHE / "bench-logs"), help="servers' logs")
    a = ap.parse_args()
    try:
        a.depths = [int(d) for d in a.depths.split(",") if d.strip()]
        concurrencies = [int(c) for c in a.concurrency.split(",") if c.strip()]
    except ValueError:
        raise SystemExit("bench_peers: --depths and --concurrency take comma-separated integers")
    a.precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    if not a.precisions or any(p not in ("quantized", "exact") for p in a.precisions):
        raise SystemExit("bench_peers: --precisions takes quantized and/or exact, comma-separated")
    try:
        run_all(a, concurrencies)
    except BenchError as e:
        raise SystemExit(f"bench_peers: {e}")


def run_all(a, concurrencies):
    models = {name: model_path(name) for name in a.models.split(",")}
    peers = {}
    if not a.skip_llamacpp:
        peers["llama.cpp"] = ensure_llamacpp(a.serve)
    if not a.skip_ik:
        peers["ik_llama.cpp"] = ensure_ik(a.ik_git_dir, a.serve)
    sn = supernode_bin(a.supernode)
    load0 = os.getloadavg()
    if load0[0] > 3:
        say(f"load average {load0[0]:.1f}: the machine is busy, figures will be noisy")
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "threads": a.threads, "rounds": a.rounds,
               "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
               "supernode": {"binary": str(sn), "commit": supernode_commit(sn)},
               "peers": {k: {"version": v["version"], "build": v["build"]} for k, v in peers.items()},
               "single": [], "serving": []}
    for name, gguf in models.items():
        if not a.no_single:
            results["single"].append(single_stream(peers, sn, name, gguf, a))
        if a.serve:
            for conc in concurrencies:
                results["serving"].append(serving(peers, sn, name, gguf, a, conc))
    results["machine"]["loadavg_end"] = os.getloadavg()
    md = [f"{results['date']}, {results['machine']['cpu']} ({', '.join(results['machine']['simd'])}), "
          f"{a.threads} threads, "
          + (f"single stream: medians of {a.rounds} rounds; " if results["single"] else "")
          + ("serving: one run per engine; " if results["serving"] else "")
          + f"supernode {results['supernode']['commit']}"
          f" ({sn}); load average {load0[0]:.2f} at the start, {results['machine']['loadavg_end'][0]:.2f} at the end"]
    if results["single"]:
        md.append(single_markdown(results, a, peers))
    if results["serving"]:
        md.append(serving_markdown(results, a, peers))
    text = "\n".join(md) + "\n"
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""supernode beside llama.cpp at its fastest, on the same machine, GGUF files and thread count.

Builds llama.cpp's own `llama-bench` and `llama-server` once from the source inside the
`llama-cpp-python` package of the Python registry (native CPU flags, no downloads at configure
time), then runs, alternating so that machine noise hits both alike:

- single stream: `llama-bench -p P -n N -fa 1 -t T` and `llama-bench -p 0 -n N -d P` against
  `supernode bench` (prefill tok/s of a P-token prompt; decode tok/s of N tokens after P tokens of
  context, and from an empty one), R rounds each, medians and ratios; supernode in both
  precisions;
- serving (with --serve): `llama-server` with C parallel slots and continuous batching against
  `supernode serve`, both driven by the same client (`supernode bench --serve --url ...`, chat
  requests, or text completions for a base model without a chat template): aggregate output
  tok/s, TTFT and inter-token percentiles, ratios.

Usage:
    python3 tools/bench_llamacpp.py [--models smollm2-135m,gemma3-270m] [--threads 2]
        [--rounds 3] [--prompt-tokens 512] [--gen-tokens 128] [--serve] [--concurrency 16]
        [--requests 200] [--max-tokens 64] [--json OUT.json]

Everything built or downloaded lives under ~/.cache/supernode (or $SUPERNODE_CACHE).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SUPERNODE_CACHE", Path.home() / ".cache" / "supernode"))


def say(msg):
    print(f"[bench_llamacpp] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    say("$ " + " ".join(map(str, cmd)))
    return subprocess.run(cmd, check=True, **kw)


def ensure_llamacpp():
    """Paths of llama-bench and llama-server, building them on first use (~6 min on 2 cores)."""
    base = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}-noamx"
    bindir = base / "build" / "bin"
    bench, server = bindir / "llama-bench", bindir / "llama-server"
    if bench.exists() and server.exists():
        return bench, server
    base.mkdir(parents=True, exist_ok=True)
    venv = CACHE / "venv-llamacpp-build"
    py = venv / "bin" / "python"
    if not py.exists():
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(py), "-m", "pip", "install", "-q", "cmake"])
    cmake = venv / "bin" / "cmake"
    sdists = CACHE / "sdists"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not (sdists / name).exists():
        run([str(py), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(sdists)])
    src = base / "src"
    if not src.exists():
        with tarfile.open(sdists / name) as t:
            t.extractall(base / "unpack", filter="data")
        top = next((base / "unpack").iterdir())
        shutil.move(str(top), str(src))
    llama = src / "vendor" / "llama.cpp"
    build = base / "build"
    run([str(cmake), "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         *isa_flags(), "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
         "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"],
        stdout=subprocess.DEVNULL)
    run([str(cmake), "--build", str(build), "--target", "llama-bench", "llama-server",
         "-j", str(os.cpu_count() or 2)], stdout=subprocess.DEVNULL)
    return bench, server


def isa_flags():
    """Every SIMD extension this CPU has, switched on one by one (what GGML_NATIVE would pick),
    except AMX: on VMs that advertise AMX without enabling it, ggml's AMX buffers die with SIGILL,
    and the workaround (--no-repack) would also turn off llama.cpp's weight repacking."""
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return ["-DGGML_NATIVE=ON"]
    if "avx2" not in flags:
        return ["-DGGML_NATIVE=ON"]
    wanted = {
        "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
        "GGML_BMI2": "bmi2", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f",
        "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
        "GGML_AVX512_BF16": "avx512_bf16",
    }
    return ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v in flags else 'OFF'}" for k, v in wanted.items()]


def supernode_bin():
    b = ROOT / "target" / "release" / "supernode"
    if not b.exists():
        run(["cargo", "build", "--release", "-p", "supernode"], cwd=ROOT)
    return b


def model_path(sn, name):
    out = run([str(sn), "fetch", name], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def llama_bench(bench, gguf, a):
    """llama-bench's prefill of a P-token prompt (from an empty cache), and its decode of N tokens
    both from an empty cache (its usual `tgN`) and after P tokens of context (`-d P`), which is
    where `supernode bench` decodes: after its prompt."""
    common = [str(bench), "-m", gguf, "-t", str(a.threads), "-fa", "1", "-r", "1", "-o", "json"]
    rows = json.loads(run(common + ["-p", str(a.prompt_tokens), "-n", str(a.gen_tokens)],
                          capture_output=True, text=True).stdout)
    rows += json.loads(run(common + ["-p", "0", "-n", str(a.gen_tokens), "-d", str(a.prompt_tokens)],
                           capture_output=True, text=True).stdout)

    def speed(n_prompt, n_gen, depth):
        return next(r for r in rows if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen
                    and r.get("n_depth", 0) == depth)["avg_ts"]

    return {
        "prefill": speed(a.prompt_tokens, 0, 0),
        "decode_d0": speed(0, a.gen_tokens, 0),
        "decode": speed(0, a.gen_tokens, a.prompt_tokens),
    }


def supernode_bench(sn, gguf, a, precision, prompt_tokens):
    out = run([str(sn), "bench", "--model", gguf, "--threads", str(a.threads),
               "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(a.gen_tokens),
               "--reps", "1", "--json", "--precision", precision, "--ctx", "2048"],
              capture_output=True, text=True)
    return json.loads(out.stdout)


# The single-stream figures: prefill of the P-token prompt; decode of N tokens after it (context
# P .. P + N, the figure the ratios and roofline share are about); decode of N tokens from an
# (almost) empty context, as llama-bench's plain `tgN` (supernode's one-token prompt puts its
# decode at positions 1 .. N, llama-bench's at 0 .. N - 1).
METRICS = ("prefill", "decode", "decode_d0")


def supernode_figures(sn, gguf, a, precision):
    j = supernode_bench(sn, gguf, a, precision, a.prompt_tokens)
    short = supernode_bench(sn, gguf, a, precision, 1)
    return {"prefill": j["prefill_tok_s"], "decode": j["decode_tok_s"],
            "decode_d0": short["decode_tok_s"]}, j


def single_stream(bench, sn, name, gguf, a):
    engines = ["llama.cpp", "supernode-exact", "supernode-quantized"]
    res = {k: {m: [] for m in METRICS} for k in engines}
    extra = {}
    for r in range(a.rounds):
        say(f"{name}: round {r + 1}/{a.rounds}")
        for m, v in llama_bench(bench, gguf, a).items():
            res["llama.cpp"][m].append(v)
        for p in ("exact", "quantized"):
            figs, j = supernode_figures(sn, gguf, a, p)
            for m, v in figs.items():
                res[f"supernode-{p}"][m].append(v)
            extra = {k: j[k] for k in ("weight_bytes_per_token", "memory_read_gb_s")}
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in res.items()}
    bw = extra["memory_read_gb_s"] * 1e9
    wb = extra["weight_bytes_per_token"]
    table = {}
    for k, v in med.items():
        row = {f"{m}_tok_s": v[m] for m in METRICS}
        row.update({f"{m}_ratio": v[m] / med["llama.cpp"][m] for m in METRICS})
        # The conservative cross figure: decode after the prompt against llama.cpp's from empty.
        row["decode_vs_llamacpp_d0_ratio"] = v["decode"] / med["llama.cpp"]["decode_d0"]
        row["decode_roofline_share"] = v["decode"] * wb / bw
        row["decode_d0_roofline_share"] = v["decode_d0"] * wb / bw
        table[k] = row
    return {"model": name, "runs": res, "median": table, **extra}


def wait_listening(proc, pattern, timeout=120):
    t0 = time.time()
    lines = []
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(lines))
            continue
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise RuntimeError("server did not start:\n" + "".join(lines))


def drain(proc):
    import threading
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()


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


def serving(server, sn, name, gguf, a):
    conc = a.concurrency
    ctx_per_slot = 1024
    res = {}
    say(f"{name}: llama-server with {conc} slots")
    p = subprocess.Popen([str(server), "-m", gguf, "-t", str(a.threads), "-np", str(conc),
                          "-c", str(conc * ctx_per_slot), "-fa", "on", "--cont-batching",
                          # Its default HTTP pool serves only a few streams at a time.
                          "--threads-http", str(conc + 4),
                          "--host", "127.0.0.1", "--port", "0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        m = wait_listening(p, r"listening on (http://[\d.:]+)|server is listening on (http://\S+)")
        url = (m.group(1) or m.group(2)).rstrip(" -")
        drain(p)
        time.sleep(1)
        res["llama-server"] = load(sn, url, a, conc, name)
    finally:
        stop(p)
    for precision in ("exact", "quantized"):
        say(f"{name}: supernode serve ({precision})")
        p = subprocess.Popen([str(sn), "serve", "--model", gguf, "--threads", str(a.threads),
                              "--port", "0", "--max-num-seqs", str(conc), "--precision", precision,
                              "--ctx", str(ctx_per_slot)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            m = wait_listening(p, r"listening on (http://\S+)")
            drain(p)
            res[f"supernode-{precision}"] = load(sn, m.group(1), a, conc, name)
        finally:
            stop(p)
    base = res["llama-server"]["output_tok_s"]
    for k, v in res.items():
        v["output_tok_s_ratio"] = v["output_tok_s"] / base if base else None
    return {"model": name, "concurrency": conc, "runs": res}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--no-single", action="store_true", help="skip the single-stream runs")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    bench, server = ensure_llamacpp()
    sn = supernode_bin()
    results = {"machine": {"cpu": cpu_name(), "threads": a.threads}, "single": [], "serving": []}
    for name in a.models.split(","):
        gguf = model_path(sn, name)
        if not a.no_single:
            s = single_stream(bench, sn, name, gguf, a)
            results["single"].append(s)
            print(f"\n{name}: single stream, {a.threads} threads, medians of {a.rounds}; decode of "
                  f"{a.gen_tokens} tokens after the {a.prompt_tokens}-token prompt (@{a.prompt_tokens}: "
                  f"llama-bench -d {a.prompt_tokens}) and from an empty context (@0)")
            print(f"{'engine':20} {'prefill':>8} {'ratio':>6} {'decode@' + str(a.prompt_tokens):>11} "
                  f"{'ratio':>6} {'roofline':>8} {'decode@0':>9} {'ratio':>6} {'roofline':>8}")
            for k, v in s["median"].items():
                print(f"{k:20} {v['prefill_tok_s']:8.1f} {v['prefill_ratio']:6.2f} "
                      f"{v['decode_tok_s']:11.1f} {v['decode_ratio']:6.2f} {v['decode_roofline_share']:8.0%} "
                      f"{v['decode_d0_tok_s']:9.1f} {v['decode_d0_ratio']:6.2f} {v['decode_d0_roofline_share']:8.0%}")
            print(f"{'':20} (decode@{a.prompt_tokens} against llama.cpp's decode@0, the conservative "
                  f"cross ratio: " + ", ".join(f"{k} {v['decode_vs_llamacpp_d0_ratio']:.2f}"
                                              for k, v in s["median"].items() if k != "llama.cpp") + ")")
        if a.serve:
            s = serving(server, sn, name, gguf, a)
            results["serving"].append(s)
            api = "/v1/completions" if name in COMPLETIONS else "/v1/chat/completions"
            print(f"\n{name}: serving, {a.concurrency} concurrent streams, {a.requests} requests "
                  f"of {a.max_tokens} tokens to {api}")
            print(f"{'engine':22} {'out tok/s':>10} {'ratio':>6} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p95':>8} {'errors':>6}")
            for k, v in s["runs"].items():
                print(f"{k:22} {fmt(v['output_tok_s'], 10, 1)} {fmt(v['output_tok_s_ratio'], 6, 2)} "
                      f"{fmt(v['ttft_s']['p50'], 9, 2)} {fmt(v['inter_chunk_s']['p50'], 8, 3)} "
                      f"{fmt(v['inter_chunk_s']['p95'], 8, 3)} {v['errors']:6d}")
                if v.get("first_errors"):
                    print(f"{'':22} first error: {v['first_errors'][0][:160]}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def fmt(v, width, digits):
    """`v` right-aligned in `width` with `digits` decimals, or "-" when there is none (a run
    whose requests all failed has no latencies)."""
    return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()

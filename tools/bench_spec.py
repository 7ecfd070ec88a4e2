#!/usr/bin/env python3
"""Single-stream decode with prompt-lookup speculation, beside llama.cpp's own (`llama-lookup`).

For each model and prompt (tools/spec_prompts/*.txt, raw text, greedy, 128 tokens), every round
runs, one after the other on the same machine:
  - supernode `bench --prompt-file P --gen-tokens N --json`, without and with `--speculative
    ngram`, in each precision asked for;
  - llama.cpp's `llama-lookup -f P -n N --temp 0` with `--spec-draft-n-max 0` (no drafts) and
    with `--spec-draft-n-max K` (its n-gram cache lookup).
It prints the median decode tok/s of each over the rounds, the ratio with/without speculation
for each engine, supernode's speculative speed over llama.cpp's, and the acceptance rates.
Every run decodes all its tokens (`--ignore-eos` on both engines: a model that ends its answer
early would otherwise time a few tokens).

With --mtp-gguf F (a GGUF with a multi-token-prediction layer, e.g. tools/make_shaped_gguf.py
--mtp), it also times, on a prompt of F's own placeholder tokens, supernode without and with
`--speculative mtp`, and llama.cpp's `llama-lookup --spec-draft-n-max 0` (no drafts) against
`llama-speculative-simple --spec-type draft-mtp` (its MTP drafts, k = 3, its default).

llama.cpp comes from the llama-cpp-python sdist as `tools/bench_peers.py` builds it (its
`llama-lookup` target is built here if missing). Usage:
  python3 tools/bench_spec.py --supernode target/release/supernode [--rounds 3] [--models ...]
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "spec_prompts"


def say(msg):
    print(f"[bench_spec {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llama_lookup():
    """The `llama-lookup` of the llama.cpp build bench_peers makes (built if missing)."""
    info = bench_peers.ensure_llamacpp(False)
    bindir = Path(info["bench"]).parent
    exe = bindir / "llama-lookup"
    if not exe.exists():
        say("building llama.cpp's llama-lookup")
        build = bindir.parent
        subprocess.run([bench_peers.cmake(), "--build", str(build), "--target", "llama-lookup",
                        "-j", "2"], check=True)
    return exe


def supernode(exe, model, prompt, gen, threads, precision, spec, method="ngram"):
    cmd = [exe, "bench", "-m", model, "--prompt-file", str(prompt), "--gen-tokens", str(gen),
           "--reps", "1", "--json", "-t", str(threads), "--precision", precision, "--ignore-eos"]
    if spec:
        cmd += ["--speculative", method, "--num-speculative-tokens", str(spec)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    d = json.loads(out)
    if d["generated_tokens"] < gen:
        raise SystemExit(f"{' '.join(map(str, cmd))}: {d['generated_tokens']} tokens, not {gen}")
    s = d.get("speculative") or {}
    return d["decode_tok_s"], s.get("acceptance_rate")


def decoded_speed(what, out):
    """The decode tok/s and acceptance llama.cpp's examples print (acceptance None without)."""
    text = out.stdout + out.stderr
    m = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", text)
    if out.returncode != 0 or not m:
        raise SystemExit(f"{what} failed ({out.returncode}): {text[-800:]}")
    acc = re.search(r"accept\s+=\s+([\d.]+)%", text)
    return float(m.group(1)), (float(acc.group(1)) / 100 if acc else None)


def llama_mtp(bindir, model, prompt, gen, threads):
    """llama.cpp's MTP drafting (`llama-speculative-simple --spec-type draft-mtp`)."""
    exe = bindir / "llama-speculative-simple"
    if not exe.exists():
        say("building llama.cpp's llama-speculative-simple")
        subprocess.run([bench_peers.cmake(), "--build", str(bindir.parent), "--target",
                        "llama-speculative-simple", "-j", "2"], check=True)
    cmd = [str(exe), "-m", model, "-f", str(prompt), "-n", str(gen), "--temp", "0", "-t",
           str(threads), "-c", "4096", "--spec-type", "draft-mtp", "--ignore-eos"]
    return decoded_speed("llama-speculative-simple",
                         subprocess.run(cmd, capture_output=True, text=True))


def lookup(exe, model, prompt, gen, threads, k):
    cmd = [str(exe), "-m", model, "-f", str(prompt), "-n", str(gen), "--temp", "0", "-t",
           str(threads), "--spec-draft-n-max", str(k), "-c", "4096", "--ignore-eos"]
    speed, acc = decoded_speed("llama-lookup", subprocess.run(cmd, capture_output=True, text=True))
    return speed, (acc if k else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supernode", required=True, help="the supernode binary")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"])
    ap.add_argument("--prompts", nargs="+",
                    default=["code_edit", "summary", "fresh_text", "counting"])
    ap.add_argument("--precisions", nargs="+", default=["exact", "quantized"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--k", type=int, default=5, help="drafts per step at most, both engines")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mtp-gguf", help="also time MTP drafting on this GGUF")
    a = ap.parse_args()
    try:
        exe = llama_lookup()
    except bench_peers.BenchError as e:
        raise SystemExit(f"bench_spec: {e}")
    models = {m: str(bench_peers.model_path(m)) for m in a.models}
    rows = []
    for name, path in models.items():
        for p in a.prompts:
            prompt = PROMPTS / f"{p}.txt"
            runs = {}
            for r in range(a.rounds):
                say(f"{name} {p}: round {r + 1} of {a.rounds}")
                for prec in a.precisions:
                    for spec in (0, a.k):
                        key = (f"supernode {prec}", spec)
                        runs.setdefault(key, []).append(
                            supernode(a.supernode, path, prompt, a.gen, a.threads, prec, spec))
                for spec in (0, a.k):
                    runs.setdefault(("llama.cpp", spec), []).append(
                        lookup(exe, path, prompt, a.gen, a.threads, spec))
            for engine in [f"supernode {x}" for x in a.precisions] + ["llama.cpp"]:
                base = statistics.median(t for t, _ in runs[(engine, 0)])
                spec = statistics.median(t for t, _ in runs[(engine, a.k)])
                acc = statistics.median(x for _, x in runs[(engine, a.k)])
                rows.append((name, p, engine, base, spec, acc))
    if a.mtp_gguf:
        import tempfile
        prompt = Path(tempfile.mkdtemp()) / "ab.txt"
        prompt.write_text("ab" * 60)  # 60 tokens of the placeholder vocabulary's one merge
        runs = {}
        for r in range(a.rounds):
            say(f"mtp {a.mtp_gguf}: round {r + 1} of {a.rounds}")
            for prec in a.precisions:
                for spec in (0, a.k):
                    runs.setdefault((f"supernode {prec}", spec), []).append(supernode(
                        a.supernode, a.mtp_gguf, prompt, a.gen, a.threads, prec, spec, "mtp"))
            runs.setdefault(("llama.cpp", 0), []).append(
                lookup(exe, a.mtp_gguf, prompt, a.gen, a.threads, 0))
            runs.setdefault(("llama.cpp", a.k), []).append(
                llama_mtp(exe.parent, a.mtp_gguf, prompt, a.gen, a.threads))
        for engine in [f"supernode {x}" for x in a.precisions] + ["llama.cpp"]:
            base = statistics.median(t for t, _ in runs[(engine, 0)])
            spec = statistics.median(t for t, _ in runs[(engine, a.k)])
            acc = statistics.median(x for _, x in runs[(engine, a.k)])
            rows.append((Path(a.mtp_gguf).name, "mtp (ab x 60)", engine, base, spec, acc))
    llama = {(m, p): s for m, p, e, _, s, _ in rows if e == "llama.cpp"}
    print(f"\nSingle-stream greedy decode, {a.gen} tokens, k = {a.k}, {a.threads} threads, "
          f"medians of {a.rounds} rounds (tok/s)\n")
    print("| model | prompt | engine | without | with drafts | ratio | acceptance "
          "| x llama.cpp with drafts |")
    print("|---|---|---|---|---|---|---|---|")
    for m, p, e, base, spec, acc in rows:
        vs = "" if e == "llama.cpp" else f"{spec / llama[(m, p)]:.2f}"
        print(f"| {m} | {p} | {e} | {base:.1f} | {spec:.1f} | {spec / base:.2f} | "
              f"{acc:.0%} | {vs} |")


if __name__ == "__main__":
    main()

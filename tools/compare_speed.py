#!/usr/bin/env python3
"""Prefill and decode speed of supernode beside llama.cpp (through llama-cpp-python), same machine,
same GGUF, same thread count, alternating runs, medians.

Usage (a Python with llama-cpp-python and numpy):

    python tools/compare_speed.py MODEL.gguf [--threads 2] [--prompt-tokens 512] [--gen-tokens 128]
                                  [--reps 5] [--supernode target/release/supernode]

The prompt is the first PROMPT_TOKENS ids of a fixed English text repeated. llama.cpp runs with
its default CPU settings except that extra weight buffer types (AMX) are off where they crash;
decode is greedy, one token per eval. supernode runs `run --tokens ... --temperature 0
--ignore-eos --verbose` in both precisions (exact, quantized) and reports its own timings. This is a quick side-by-side for one
stream; the thorough comparison against llama-bench lives with the benchmark work.
"""

import argparse
import re
import statistics
import subprocess
import time

import numpy as np
import llama_cpp.llama_cpp as lib
from llama_cpp import Llama

TEXT = (
    "The history of navigation is, in many ways, the history of human curiosity. Sailors watched "
    "the stars, the sun and the colour of the water, and slowly learned to cross oceans. "
)


def last_logits(llm):
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def llama_cpp_run(llm, prompt, gen):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(last_logits(llm)))
    for _ in range(gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(last_logits(llm)))
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (gen - 1) / (t2 - t1)


LINE = re.compile(r"prompt (\d+) tokens in ([\d.]+)s \(([\d.]+) tok/s\); generated (\d+) tokens at ([\d.]+) tok/s")


def supernode_run(binary, model, prompt, gen, threads, precision):
    out = subprocess.run(
        [binary, "run", "--model", model, "--tokens", ",".join(map(str, prompt)), "-n", str(gen),
         "--temperature", "0", "--ignore-eos", "--verbose", "--threads", str(threads), "--ctx", "2048",
         "--precision", precision],
        capture_output=True, text=True, check=True,
    )
    m = LINE.search(out.stderr)
    if not m:
        raise SystemExit(f"no timing line in supernode's output:\n{out.stderr}")
    return float(m.group(3)), float(m.group(5))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--supernode", default="target/release/supernode")
    args = ap.parse_args()

    default_params = lib.llama_model_default_params

    def no_extra_bufts():
        p = default_params()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = no_extra_bufts
    llm = Llama(model_path=args.model, n_ctx=2048, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=False, verbose=False)
    ids = llm.tokenize((TEXT * 40).encode(), add_bos=False)
    prompt = ids[: args.prompt_tokens]
    res = {"llama.cpp": [], "sn exact": [], "sn quantized": []}
    for rep in range(args.reps):
        res["llama.cpp"].append(llama_cpp_run(llm, prompt, args.gen_tokens))
        for prec in ("exact", "quantized"):
            res[f"sn {prec}"].append(
                supernode_run(args.supernode, args.model, prompt, args.gen_tokens, args.threads, prec))
        print(f"rep {rep + 1}: " + "  ".join(f"{k} {v[-1][0]:.1f}/{v[-1][1]:.1f}" for k, v in res.items())
              + " (prefill/decode tok/s)")
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in res.items()}
    print(f"\n{args.model}, {args.threads} threads, {len(prompt)}-token prompt, {args.gen_tokens} generated, "
          f"median of {args.reps}")
    print(f"{'':14s}{'prefill tok/s':>15s}{'decode tok/s':>15s}")
    base = med["llama.cpp"]
    for k, (p, d) in med.items():
        print(f"{k:14s}{p:15.1f}{d:15.1f}   ratio to llama.cpp {p / base[0]:.2f} / {d / base[1]:.2f}")


if __name__ == "__main__":
    main()

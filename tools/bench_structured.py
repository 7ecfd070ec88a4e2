#!/usr/bin/env python3
"""Decode speed with and without an output constraint, one stream at a time.

Usage: bench_structured.py URL [--rounds 5] [--tokens 200] [--model smollm2-135m]

Against a running `supernode serve`, streams the same chat request under each constraint and
times the tokens after the first text (decode only, no prefill; usage gives the count). Every mode runs to `--tokens`
tokens: without a constraint `ignore_eos` holds the answer open; the constrained ones cannot end
sooner (a JSON string of at least 2000 characters, a regex of exactly 2000). Prints each mode's median tok/s
over the rounds, and its ratio to the unconstrained speed. Needs httpx.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

STORY = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
    "additionalProperties": False,
}

MODES = {
    "none": {"ignore_eos": True},
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": STORY, "strict": True}}
    },
    "regex_text": {"structured_outputs": {"regex": r"[A-Za-z ,.]{2000}"}},
}


def one(client: httpx.Client, model: str, tokens: int, extra: dict) -> tuple[int, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    stamps = []
    generated = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    # Tokens after the first text, over the time from the first text to the last.
    return generated, stamps[-1] - stamps[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    with httpx.Client(base_url=a.url, timeout=600) as client:
        one(client, a.model, 16, {})  # warm-up
        speeds: dict[str, list[float]] = {m: [] for m in MODES}
        chunks: dict[str, int] = {}
        for _ in range(a.rounds):
            for mode, extra in MODES.items():
                n, dt = one(client, a.model, a.tokens, extra)
                chunks[mode] = n
                speeds[mode].append((n - 1) / dt)
    base = statistics.median(speeds["none"])
    for mode, s in speeds.items():
        med = statistics.median(s)
        print(
            f"{mode:12s} median {med:7.1f} tok/s over {a.rounds} rounds of {chunks[mode]} tokens "
            f"(x{med / base:.3f}; all: {', '.join(f'{x:.1f}' for x in s)})"
        )


if __name__ == "__main__":
    main()

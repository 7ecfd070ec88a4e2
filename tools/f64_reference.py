#!/usr/bin/env python3
"""An exact float64 forward pass of a llama- or gemma3-architecture GGUF (SmolLM2, Gemma 3), on the dequantised
weights.

Usage (with a Python that has numpy and gguf):

    python tools/f64_reference.py MODEL.gguf LLAMACPP_FIXTURE.json OUT.json [CASE ...]

The model is the plain llama recipe, every step in float64: embedding lookup; per layer RMSNorm, Q/K/V
projections, RoPE in llama.cpp's NORM mode (adjacent pairs (2i, 2i+1); the GGUF converter permuted the Q/K
rows so that this mode is right), causal GQA attention with scale 1/sqrt(head_dim), output projection,
residual; RMSNorm, SwiGLU feed-forward down(silu(gate(x)) * up(x)), residual; final RMSNorm; output head
(`output.weight`, else the tied `token_embd.weight`). The only approximation left is the weights'
quantisation itself, which every implementation shares; activations are never quantised or rounded.

The gemma3 recipe (llama.cpp's `llm_build_gemma3`): embeddings scaled by sqrt(hidden); per layer RMSNorm,
Q/K/V projections, per-head RMSNorm of Q and K, RoPE in NEOX mode (halves (i, i + d/2)) with base 10 000 on
the sliding-window layers (every layer but each 6th, `il % 6 < 5`, attending to the last
`attention.sliding_window` positions) and `rope.freq_base` on the global ones, attention with scale
1/sqrt(head_dim), output projection, post-attention RMSNorm, residual; RMSNorm, GeGLU feed-forward
down(gelu_tanh(gate(x)) * up(x)), post-feed-forward RMSNorm, residual; final RMSNorm; tied output head. The
GGUF norm weights already hold Gemma's (1 + w).

It first checks itself against llama.cpp's fixture (tools/make_llama_reference.py) on every case, printing
top-1 agreement and the distance of llama.cpp's batched (and, where recorded, serial) logits from float64 over
the top-5 ids, then writes, for the chosen cases (default: every case), the float64 logits of the same
top-10 ids llama.cpp recorded at each prompt position:

    {"model": ..., "cases": [{"name": ..., "ids": [...], "logits": [[[id, f64 logit] x10] per position]}]}
"""

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key):
    return reader.fields[key].contents()


class Llama64:
    def __init__(self, path):
        r = GGUFReader(path)
        arch = field(r, "general.architecture")
        assert arch == "llama", f"expected a llama GGUF, got {arch}"
        self.n_layer = int(field(r, "llama.block_count"))
        self.n_head = int(field(r, "llama.attention.head_count"))
        self.n_kv = int(field(r, "llama.attention.head_count_kv"))
        self.d_model = int(field(r, "llama.embedding_length"))
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(field(r, "llama.rope.freq_base"))
        self.head_dim = self.d_model // self.n_head
        key = "llama.rope.dimension_count"
        self.rope_dims = int(field(r, key)) if key in r.fields else self.head_dim
        self.w = {}
        for t in r.tensors:
            # numpy shape is GGUF's ne reversed: [out, in] for a matrix, so y = W @ x.
            self.w[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
                [int(n) for n in reversed(t.shape)]
            )
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])

    def rms_norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        """NORM-mode RoPE on x [T, heads, head_dim]: pairs (2i, 2i+1), theta = pos * base^(-2i/dims)."""
        half = self.rope_dims // 2
        inv = self.rope_base ** (-2.0 * np.arange(half, dtype=np.float64) / self.rope_dims)
        ang = pos[:, None].astype(np.float64) * inv[None, :]  # [T, half]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x = x.copy()
        x0 = x[..., 0 : self.rope_dims : 2].copy()
        x1 = x[..., 1 : self.rope_dims : 2].copy()
        x[..., 0 : self.rope_dims : 2] = x0 * cos - x1 * sin
        x[..., 1 : self.rope_dims : 2] = x0 * sin + x1 * cos
        return x

    def forward(self, ids):
        """Logits [T, vocab] of a whole prompt (causal), float64."""
        T = len(ids)
        pos = np.arange(T)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv
        group = nh // nkv
        x = self.w["token_embd.weight"][np.asarray(ids)]
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        for l in range(self.n_layer):
            w = lambda n: self.w[f"blk.{l}.{n}.weight"]
            h = self.rms_norm(x, w("attn_norm"))
            q = self.rope((h @ w("attn_q").T).reshape(T, nh, hd), pos)
            k = self.rope((h @ w("attn_k").T).reshape(T, nkv, hd), pos)
            v = (h @ w("attn_v").T).reshape(T, nkv, hd)
            att = np.empty((T, nh, hd))
            for hh in range(nh):
                kv = hh // group
                s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                att[:, hh, :] = s @ v[:, kv, :]
            x = x + att.reshape(T, nh * hd) @ w("attn_output").T
            h = self.rms_norm(x, w("ffn_norm"))
            g = h @ w("ffn_gate").T
            u = h @ w("ffn_up").T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ w("ffn_down").T
        x = self.rms_norm(x, self.w["output_norm.weight"])
        return x @ self.out.T


class Gemma3_64(Llama64):
    def __init__(self, path):
        r = GGUFReader(path)
        g = lambda k: field(r, f"gemma3.{k}")
        self.n_layer = int(g("block_count"))
        self.n_head = int(g("attention.head_count"))
        self.n_kv = int(g("attention.head_count_kv"))
        self.d_model = int(g("embedding_length"))
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(g("rope.freq_base"))
        self.window = int(g("attention.sliding_window"))
        self.head_dim = int(g("attention.key_length"))
        self.w = {}
        for t in r.tensors:
            self.w[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
                [int(n) for n in reversed(t.shape)]
            )
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])

    def rope_neox(self, x, pos, base):
        """NEOX-mode RoPE on x [T, heads, head_dim]: pairs (i, i + head_dim/2)."""
        half = self.head_dim // 2
        inv = base ** (-2.0 * np.arange(half, dtype=np.float64) / self.head_dim)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)

    def forward(self, ids):
        T = len(ids)
        pos = np.arange(T)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv
        group = nh // nkv
        x = self.w["token_embd.weight"][np.asarray(ids)] * np.sqrt(self.d_model)
        full = np.triu(np.full((T, T), -np.inf), k=1)
        local = np.where(pos[:, None] - pos[None, :] >= self.window, -np.inf, full)
        gelu = lambda v: 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))
        for l in range(self.n_layer):
            w = lambda n: self.w[f"blk.{l}.{n}.weight"]
            is_local = l % 6 < 5
            base = 10_000.0 if is_local else self.rope_base
            h = self.rms_norm(x, w("attn_norm"))
            q = self.rms_norm((h @ w("attn_q").T).reshape(T, nh, hd), w("attn_q_norm"))
            k = self.rms_norm((h @ w("attn_k").T).reshape(T, nkv, hd), w("attn_k_norm"))
            q, k = self.rope_neox(q, pos, base), self.rope_neox(k, pos, base)
            v = (h @ w("attn_v").T).reshape(T, nkv, hd)
            att = np.empty((T, nh, hd))
            for hh in range(nh):
                kv = hh // group
                s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(hd) + (local if is_local else full)
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                att[:, hh, :] = s @ v[:, kv, :]
            x = x + self.rms_norm(att.reshape(T, nh * hd) @ w("attn_output").T, w("post_attention_norm"))
            h = self.rms_norm(x, w("ffn_norm"))
            y = (gelu(h @ w("ffn_gate").T) * (h @ w("ffn_up").T)) @ w("ffn_down").T
            x = x + self.rms_norm(y, w("post_ffw_norm"))
        x = self.rms_norm(x, self.w["output_norm.weight"])
        return x @ self.out.T


def load(path):
    arch = field(GGUFReader(path), "general.architecture")
    return {"llama": Llama64, "gemma3": Gemma3_64}[arch](path)


def compare(top_rows, logits64):
    """Per-position max |llama.cpp - f64| over the top-5 ids of llama.cpp's rows."""
    return [max(abs(l - logits64[p, i]) for i, l in row[:5]) for p, row in enumerate(top_rows)]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    model_path, fixture_path, out_path = sys.argv[1:4]
    ref = json.load(open(fixture_path, encoding="utf-8"))
    chosen = sys.argv[4:] or [c["name"] for c in ref["cases"]]
    m = load(model_path)

    out = {"model": ref["model"], "reference": "float64 forward on dequantised GGUF weights", "cases": []}
    all_b, all_s = [], []
    for case in ref["cases"]:
        ids = case["ids"]
        logits = m.forward(ids)
        d_b = compare(case["prompt_top"], logits)
        all_b += d_b
        # Top-1 agreement where llama.cpp's margin between its first two ids is large (> 1 logit).
        agree = total = 0
        for p, row in enumerate(case["prompt_top"]):
            if row[0][1] - row[1][1] > 1.0:
                total += 1
                agree += int(np.argmax(logits[p]) == row[0][0])
        line = (
            f"{case['name']:12} {len(ids):4} pos  batched-f64 top5 |d| mean {np.mean(d_b):.4f} max {np.max(d_b):.4f}"
            f"  top1 agree (margin>1) {agree}/{total}"
        )
        if "prompt_top_serial" in case:
            d_s = compare(case["prompt_top_serial"], logits)
            all_s += d_s
            line += f"  | serial-f64 mean {np.mean(d_s):.4f} max {np.max(d_s):.4f}"
        print(line, file=sys.stderr)
        if case["name"] in chosen:
            out["cases"].append(
                {
                    "name": case["name"],
                    "ids": ids,
                    "logits": [
                        [[i, round(float(logits[p, i]), 5)] for i, _ in row] for p, row in enumerate(case["prompt_top"])
                    ],
                }
            )
    print(
        f"ALL: llama.cpp batched vs f64 over top-5: mean {np.mean(all_b):.4f} max {np.max(all_b):.4f}"
        + (f"; serial vs f64: mean {np.mean(all_s):.4f} max {np.max(all_s):.4f}" if all_s else ""),
        file=sys.stderr,
    )
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A Qwen3.5 fixture with a multi-token-prediction (MTP) layer, and a float64 NumPy reference of
that layer's forward pass.

transformers 5.23 has no code for Qwen3.5's MTP layer (`Qwen3_5ForCausalLM` skips `mtp.*` at
load), so the reference is this script's own float64 NumPy version of it, written from the
layer's definition as vLLM (`Qwen3NextMultiTokenPredictor`) and llama.cpp (`qwen35` `graph_mtp`)
compute it:

    e = pre_fc_norm_embedding(embed(token_p))        every norm: x / rms(x) * (1 + w)
    h = pre_fc_norm_hidden(hidden_{p-1})             (the target's state after its final norm)
    x = fc([e ; h])                                   [2H] -> [H]
    x = x + attn(input_layernorm(x))                 Qwen3.5 gated full attention at position p
    x = x + mlp(post_attention_layernorm(x))         SwiGLU
    hidden_p = norm(x);  logits = hidden_p @ embed^T  (tied head)

Gated attention: `q_proj` gives, per head, head_dim query values then head_dim gate values; q
and k get per-head (1 + w) RMS norms; rotary on the first `partial_rotary_factor * head_dim`
dims in rotate-half pairs (text positions make the mrope sections plain rope); causal softmax
of q.k / sqrt(head_dim) with key/value head h // (heads / kv_heads); the output times
sigmoid(gate), then `o_proj`.

It writes tests/fixtures/hf/qwen3_5_mtp/: the `qwen3_5` fixture's config with
`mtp_num_hidden_layers: 1`, its weights plus seeded random `mtp.*` tensors, and `mtp.json`:
inputs (tokens, positions, hidden rows) and the reference logits and hidden states of every row,
the rows forming one sequence whose K/V the layer attends to causally.

Usage: python3 tools/make_mtp_fixture.py   (needs numpy)
"""
import json
import os
import struct

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
SRC = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen3_5")
DST = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen3_5_mtp")
ROWS = 20
FIRST_POS = 0


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", (name, meta["dtype"])
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(meta["shape"]).copy()
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        b = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_fixture(dst, cfg, w, rng, first_pos, forward, script):
    """Writes the fixture into `dst`: `config.json`, `model.safetensors` (the model's tensors and
    the MTP layer's), and `mtp.json`, the reference of `forward` on ROWS rows of random tokens
    and hidden states at positions `first_pos..` drawn from `rng`."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(dst, "model.safetensors"), w)
    tokens = rng.integers(0, cfg["vocab_size"], ROWS)
    positions = np.arange(first_pos, first_pos + ROWS)
    hidden = rng.standard_normal((ROWS, cfg["hidden_size"])).astype(np.float32)
    logits, hid = forward(cfg, w, tokens, positions, hidden.astype(np.float64))
    ref = {
        "note": f"made by tools/{script}: the MTP layer's float64 NumPy forward pass",
        "tokens": tokens.tolist(),
        "positions": positions.tolist(),
        "hidden": hidden.astype(np.float64).tolist(),
        "logits": np.round(logits, 7).tolist(),
        "hidden_out": np.round(hid, 7).tolist(),
    }
    with open(os.path.join(dst, "mtp.json"), "w") as f:
        json.dump(ref, f)


def rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w.astype(np.float64))


def rope(x, positions, rot, theta):
    """Rotate-half rope on the first `rot` dims of x [T, heads, head_dim]."""
    inv = 1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
    r, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = np.concatenate([-r[..., half:], r[..., :half]], axis=-1)
    return np.concatenate([r * cos + rotated * sin, rest], axis=-1)


def mtp_forward(cfg, w, tokens, positions, hidden):
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    rp = cfg["rope_parameters"]
    rot = int(hd * rp["partial_rotary_factor"])
    f64 = {k: v.astype(np.float64) for k, v in w.items()}
    p = "mtp.layers.0."
    e = rms_norm(f64["model.embed_tokens.weight"][tokens], f64["mtp.pre_fc_norm_embedding.weight"], eps)
    h = rms_norm(hidden, f64["mtp.pre_fc_norm_hidden.weight"], eps)
    x = np.concatenate([e, h], axis=-1) @ f64["mtp.fc.weight"].T
    T = len(tokens)
    # attention
    xn = rms_norm(x, f64[p + "input_layernorm.weight"], eps)
    qg = (xn @ f64[p + "self_attn.q_proj.weight"].T).reshape(T, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(T, nh * hd)
    k = (xn @ f64[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)
    v = (xn @ f64[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
    q = rope(rms_norm(q, f64[p + "self_attn.q_norm.weight"], eps), positions, rot, rp["rope_theta"])
    k = rope(rms_norm(k, f64[p + "self_attn.k_norm.weight"], eps), positions, rot, rp["rope_theta"])
    out = np.zeros((T, nh, hd))
    for head in range(nh):
        kv = head // (nh // nkv)
        s = q[:, head, :] @ k[:, kv, :].T / np.sqrt(hd)
        s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        out[:, head, :] = s @ v[:, kv, :]
    attn = (out.reshape(T, nh * hd) * (1.0 / (1.0 + np.exp(-gate)))) @ f64[p + "self_attn.o_proj.weight"].T
    x = x + attn
    xn = rms_norm(x, f64[p + "post_attention_layernorm.weight"], eps)
    g = xn @ f64[p + "mlp.gate_proj.weight"].T
    u = xn @ f64[p + "mlp.up_proj.weight"].T
    x = x + (g / (1.0 + np.exp(-g)) * u) @ f64[p + "mlp.down_proj.weight"].T
    hid = rms_norm(x, f64["mtp.norm.weight"], eps)
    return hid @ f64["model.embed_tokens.weight"].T, hid


def main():
    cfg = json.load(open(os.path.join(SRC, "config.json")))
    w = read_safetensors(os.path.join(SRC, "model.safetensors"))
    rng = np.random.default_rng(0x3a7)
    H, nh, nkv, hd, ff = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                          cfg["head_dim"], cfg["intermediate_size"])

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm_w(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    p = "mtp.layers.0."
    mtp = {
        "mtp.fc.weight": mat(H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": norm_w(H),
        "mtp.pre_fc_norm_hidden.weight": norm_w(H),
        "mtp.norm.weight": norm_w(H),
        p + "input_layernorm.weight": norm_w(H),
        p + "post_attention_layernorm.weight": norm_w(H),
        p + "self_attn.q_proj.weight": mat(nh * hd * 2, H),
        p + "self_attn.k_proj.weight": mat(nkv * hd, H),
        p + "self_attn.v_proj.weight": mat(nkv * hd, H),
        p + "self_attn.o_proj.weight": mat(H, nh * hd),
        p + "self_attn.q_norm.weight": norm_w(hd),
        p + "self_attn.k_norm.weight": norm_w(hd),
        p + "mlp.gate_proj.weight": mat(ff, H),
        p + "mlp.up_proj.weight": mat(ff, H),
        p + "mlp.down_proj.weight": mat(H, ff),
    }
    w.update(mtp)
    cfg["mtp_num_hidden_layers"] = 1
    write_fixture(DST, cfg, w, rng, FIRST_POS, mtp_forward, "make_mtp_fixture.py")
    print(f"wrote {DST}: {len(mtp)} mtp tensors, {ROWS} reference rows")

if __name__ == "__main__":
    main()

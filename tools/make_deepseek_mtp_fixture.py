#!/usr/bin/env python3
"""A DeepSeek-V3 fixture with a multi-token-prediction (MTP) layer, and a float64 NumPy reference of
that layer's forward pass.

transformers 5.23 has no code for DeepSeek-V3's MTP layer (`DeepseekV3ForCausalLM` drops the
layers past `num_hidden_layers`), so the reference is this script's own float64 NumPy version of
it, written from the layer's definition as DeepSeek-V3's paper (section 2.2) and vLLM
(`DeepSeekMultiTokenPredictorLayer`) compute it, with transformers' DeepSeek-V3 decoder layer
(`DeepseekV3DecoderLayer`: MLA attention, MoE feed-forward) as its block:

    e = enorm(embed_mtp(token_p))                every norm: x / rms(x) * w
    h = hnorm(hidden_{p-1})                      (the target's state after its final norm)
    x = eh_proj([e ; h])                         [2H] -> [H]
    x = x + mla(input_layernorm(x))              at position p, over the layer's own K/V
    x = x + moe(post_attention_layernorm(x))
    hidden_p = shared_head.norm(x);  logits = shared_head.head(hidden_p)

MLA (transformers' `DeepseekV3Attention`): q = q_b(q_a_layernorm(q_a(x))) split per head into
qk_nope_head_dim and qk_rope_head_dim values; [c ; k_pe] = kv_a_proj_with_mqa(x), c normed by
kv_a_layernorm and expanded by kv_b_proj into each head's k_nope and v; q_pe and the one shared
k_pe rotated in interleaved pairs (rope_interleave) with YaRN's frequencies and cos/sin factor;
causal softmax of q.k times qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2; o_proj.

MoE (transformers' `DeepseekV3MoE`, `noaux_tc`): scores = sigmoid(x @ gate^T); choice scores add
e_score_correction_bias; groups ranked by the sum of their two best choice scores, the best
topk_group kept (the rest masked to 0); the top num_experts_per_tok experts by choice score, each
weighted by its plain score, normalised (norm_topk_prob), times routed_scaling_factor; experts and
the shared expert are SwiGLU down(silu(gate(x)) * up(x)).

The MTP layer has its own embedding and head here (DeepSeek-V3's checkpoint stores both), drawn
apart from the model's, so that a test catches an implementation that uses the model's instead.

It writes tests/fixtures/hf/deepseek_v3_mtp/: the `deepseek_v3` fixture's config with
`num_nextn_predict_layers: 1`, its weights plus seeded random `model.layers.{n}.*` MTP tensors, and
`mtp.json`: inputs (tokens, positions, hidden rows) and the reference logits and hidden states of
every row, the rows forming one sequence whose K/V the layer attends to causally.

Usage: python3 tools/make_deepseek_mtp_fixture.py   (needs numpy)
"""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from make_mtp_fixture import ROWS, read_safetensors, write_fixture  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
SRC = os.path.join(ROOT, "tests", "fixtures", "hf", "deepseek_v3")
DST = os.path.join(ROOT, "tests", "fixtures", "hf", "deepseek_v3_mtp")


def rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def yarn_mscale(scale, m):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn(cfg):
    """YaRN's inverse frequencies and cos/sin factor, as transformers computes them."""
    rs = cfg["rope_scaling"]
    dim, base = cfg["qk_rope_head_dim"], cfg["rope_theta"]
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention_factor = yarn_mscale(factor, 1.0)

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.get("beta_fast", 32))), 0)
    high = min(math.ceil(correction_dim(rs.get("beta_slow", 1))), dim - 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rope_interleaved(x, positions, inv_freq, factor):
    """Rotates pairs (2i, 2i+1) of x [T, heads, d] by position * inv_freq[i]; cos and sin scaled by
    `factor`. (transformers de-interleaves q_pe and k_pe alike first, then rotates halves: the
    same dot products.)"""
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = (np.cos(ang) * factor)[:, None, :], (np.sin(ang) * factor)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def swiglu(x, gate, up, down):
    g = x @ gate.T
    return (g / (1.0 + np.exp(-g)) * (x @ up.T)) @ down.T


def mla(cfg, w, p, x, positions):
    T = x.shape[0]
    nh, nope, rdim, vdim = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                            cfg["v_head_dim"])
    rank, eps = cfg["kv_lora_rank"], cfg["rms_norm_eps"]
    q = rms_norm(x @ w[p + "self_attn.q_a_proj.weight"].T, w[p + "self_attn.q_a_layernorm.weight"], eps)
    q = (q @ w[p + "self_attn.q_b_proj.weight"].T).reshape(T, nh, nope + rdim)
    kv = x @ w[p + "self_attn.kv_a_proj_with_mqa.weight"].T
    c, k_pe = kv[:, :rank], kv[:, rank:].reshape(T, 1, rdim)
    c = rms_norm(c, w[p + "self_attn.kv_a_layernorm.weight"], eps)
    kvb = (c @ w[p + "self_attn.kv_b_proj.weight"].T).reshape(T, nh, nope + vdim)
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    inv_freq, factor = yarn(cfg)
    q_pe = rope_interleaved(q[..., nope:], positions, inv_freq, factor)
    k_pe = rope_interleaved(k_pe, positions, inv_freq, factor)
    rs = cfg["rope_scaling"]
    scale = (nope + rdim) ** -0.5
    if rs.get("mscale_all_dim"):
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    out = np.zeros((T, nh, vdim))
    causal = np.tril(np.ones((T, T), dtype=bool))
    for h in range(nh):
        s = (q[:, h, :nope] @ k_nope[:, h, :].T + q_pe[:, h, :] @ k_pe[:, 0, :].T) * scale
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        out[:, h, :] = s @ v[:, h, :]
    return out.reshape(T, nh * vdim) @ w[p + "self_attn.o_proj.weight"].T


def moe(cfg, w, p, x):
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    groups, keep_groups = cfg["n_group"], cfg["topk_group"]
    scores = 1.0 / (1.0 + np.exp(-(x @ w[p + "mlp.gate.weight"].T)))
    choice = scores + w[p + "mlp.gate.e_score_correction_bias"][None, :]
    out = swiglu(x, w[p + "mlp.shared_experts.gate_proj.weight"], w[p + "mlp.shared_experts.up_proj.weight"],
                 w[p + "mlp.shared_experts.down_proj.weight"])
    for t in range(x.shape[0]):
        per_group = choice[t].reshape(groups, E // groups)
        group_score = np.sort(per_group, axis=-1)[:, -2:].sum(axis=-1)
        kept = np.argsort(-group_score, kind="stable")[:keep_groups]
        mask = np.zeros(groups, dtype=bool)
        mask[kept] = True
        masked = np.where(np.repeat(mask, E // groups), choice[t], 0.0)
        chosen = np.argsort(-masked, kind="stable")[:k]
        weights = scores[t, chosen]
        if cfg.get("norm_topk_prob", True):
            weights = weights / (weights.sum() + 1e-20)
        weights = weights * cfg["routed_scaling_factor"]
        for e, wt in zip(chosen, weights):
            q = f"{p}mlp.experts.{e}."
            out[t] += wt * swiglu(x[t:t + 1], w[q + "gate_proj.weight"], w[q + "up_proj.weight"],
                                  w[q + "down_proj.weight"])[0]
    return out


def mtp_forward(cfg, w, tokens, positions, hidden):
    n, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    p = f"model.layers.{n}."
    f64 = {k: v.astype(np.float64) for k, v in w.items() if k.startswith(p)}
    e = rms_norm(f64[p + "embed_tokens.weight"][tokens], f64[p + "enorm.weight"], eps)
    h = rms_norm(hidden, f64[p + "hnorm.weight"], eps)
    x = np.concatenate([e, h], axis=-1) @ f64[p + "eh_proj.weight"].T
    x = x + mla(cfg, f64, p, rms_norm(x, f64[p + "input_layernorm.weight"], eps), positions)
    x = x + moe(cfg, f64, p, rms_norm(x, f64[p + "post_attention_layernorm.weight"], eps))
    hid = rms_norm(x, f64[p + "shared_head.norm.weight"], eps)
    return hid @ f64[p + "shared_head.head.weight"].T, hid


def main():
    cfg = json.load(open(os.path.join(SRC, "config.json")))
    w = read_safetensors(os.path.join(SRC, "model.safetensors"))
    rng = np.random.default_rng(0xd5e3)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, nope, rdim, vdim = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                            cfg["v_head_dim"])
    qr, kvr, E, ff = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    shared_ff = ff * cfg["n_shared_experts"]

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm_w(d):
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    p = f"model.layers.{cfg['num_hidden_layers']}."
    mtp = {
        p + "embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32),
        p + "enorm.weight": norm_w(H),
        p + "hnorm.weight": norm_w(H),
        p + "eh_proj.weight": mat(H, 2 * H),
        p + "shared_head.norm.weight": norm_w(H),
        p + "shared_head.head.weight": mat(V, H),
        p + "input_layernorm.weight": norm_w(H),
        p + "post_attention_layernorm.weight": norm_w(H),
        p + "self_attn.q_a_proj.weight": mat(qr, H),
        p + "self_attn.q_a_layernorm.weight": norm_w(qr),
        p + "self_attn.q_b_proj.weight": mat(nh * (nope + rdim), qr),
        p + "self_attn.kv_a_proj_with_mqa.weight": mat(kvr + rdim, H),
        p + "self_attn.kv_a_layernorm.weight": norm_w(kvr),
        p + "self_attn.kv_b_proj.weight": mat(nh * (nope + vdim), kvr),
        p + "self_attn.o_proj.weight": mat(H, nh * vdim),
        # Scores large enough to tell the experts apart; a small positive bias (the choice
        # scores stay positive, where transformers' masking of dropped groups to 0 is exact).
        p + "mlp.gate.weight": (2.0 * mat(E, H)),
        p + "mlp.gate.e_score_correction_bias": (0.05 * rng.random(E)).astype(np.float32),
        p + "mlp.shared_experts.gate_proj.weight": mat(shared_ff, H),
        p + "mlp.shared_experts.up_proj.weight": mat(shared_ff, H),
        p + "mlp.shared_experts.down_proj.weight": mat(H, shared_ff),
    }
    for e in range(E):
        q = f"{p}mlp.experts.{e}."
        mtp[q + "gate_proj.weight"] = mat(ff, H)
        mtp[q + "up_proj.weight"] = mat(ff, H)
        mtp[q + "down_proj.weight"] = mat(H, ff)
    w.update(mtp)
    cfg["num_nextn_predict_layers"] = 1
    write_fixture(DST, cfg, w, rng, 0, mtp_forward, "make_deepseek_mtp_fixture.py")
    print(f"wrote {DST}: {len(mtp)} mtp tensors, {ROWS} reference rows")

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The tiny random DeepSeek-V4 of tests/fixtures/hf/deepseek_v4, with what transformers computes.

Built with transformers' own `DeepseekV4ForCausalLM` (eager attention, float32) so that every path
runs: a sliding layer, two compressed sparse (CSA) layers whose indexer keeps 3 entries per query
(a query at position p sees (p + 1) // 4 closed windows, so the sparsity binds past 15
tokens), a heavily compressed (HCA) layer with windows of 8, a
sliding window of 6 (shorter than every input but the shortest), a YaRN-scaled rope on the
compressed layers, 3 hyper-connection streams, two hash-routed and two learned-routed MoE layers
with a clamped SwiGLU that binds. `config.json` is what `save_pretrained` writes (transformers 5's
layout; the tensors are saved under DeepSeek's own names). `expected.json` has the schema of the
other fixtures (tools/make_hf_fixtures.py): the logits of every position of inputs of 1, 5, 33 and
130 tokens (one forward pass without cache), and a 24-token greedy continuation of a 5-token
prompt (`generate`, with the cache: transformers' decode path) that equals the argmax of a
cache-free forward.

Usage (venv with torch, transformers 5.23, safetensors, numpy):
    python tools/make_deepseek_v4_fixture.py [--out tests/fixtures/hf]
"""
import argparse
import json
import os
import shutil
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdl

sys.path.insert(0, os.path.dirname(__file__))
from make_hf_fixtures import greedy, is_norm, logits_of, margins, name_patterns, round6  # noqa: E402

SEED = 4321
LENGTHS = (1, 5, 33, 130)
PROMPT_LEN = 5
NEW = 24
CANDIDATES = 24
# The smallest gap at a top-k boundary a fixture may have: float32 summation order moves a score
# by ~1e-6, so a closer pair could be picked in either order.
MIN_GAP = 1e-4

CONFIG = dict(
    vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
    partial_rotary_factor=0.25, num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1,
    scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
    max_position_embeddings=16384, rope_theta=10000.0, compress_rope_theta=160000.0,
    # original 4096, factor 4: of the compressed rope's 4 frequencies (wavelengths 6.3, 126,
    # 2513 and 50265 positions) the first two are kept, the third smoothed (half way) and the
    # last divided by 4.
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    layer_types=["sliding_attention", "compressed_sparse_attention",
                 "heavily_compressed_attention", "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    hc_mult=3, hc_sinkhorn_iters=20, hc_eps=1e-6,
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], swiglu_limit=1.0,
    sliding_window=6, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16,
    index_topk=3, num_nextn_predict_layers=0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)


def randomize(model, gen):
    """Every parameter non-trivial: matrices and vectors N(0, 0.2) (sinks, the compressors'
    position biases, the hyper-connections' weights, biases and scales included), norms
    1 + 0.1 N; the learned routers' selection bias N(0, 0.5); each token's hash-routed experts
    two distinct random ones."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if is_norm(name) else 0.2 * noise)
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen, dtype=torch.float32))
            elif name.endswith("tid2eid"):
                k, e = CONFIG["num_experts_per_tok"], CONFIG["n_routed_experts"]
                rows = [torch.randperm(e, generator=gen)[:k] for _ in range(b.shape[0])]
                b.copy_(torch.stack(rows))


def boundary_gaps(model, tokens):
    """The smallest gap at the indexer's top-k boundary (over every CSA layer and every query with
    more valid entries than index_topk) and at the learned routers' top-k boundary (scores plus
    selection bias), over a cache-free forward of `tokens`."""
    k_ix, k_moe = CONFIG["index_topk"], CONFIG["num_experts_per_tok"]
    rate = CONFIG["compress_rates"]["compressed_sparse_attention"]
    ix_gaps, moe_gaps = [], []

    def scorer_hook(_mod, _args, out):
        scores = out[0]
        for pos in range(scores.shape[0]):
            valid = (pos + 1) // rate
            if valid > k_ix:
                top = torch.sort(scores[pos, :valid], descending=True).values
                ix_gaps.append((top[k_ix - 1] - top[k_ix]).item())

    def router_hook(mod, _args, out):
        logits = out[0]
        choice = mod.score_fn(logits) + mod.e_score_correction_bias
        top = torch.sort(choice, dim=-1, descending=True).values
        moe_gaps.extend((top[:, k_moe - 1] - top[:, k_moe]).tolist())

    hooks = [m.register_forward_hook(scorer_hook) for m in model.modules()
             if isinstance(m, mdl.DeepseekV4IndexerScorer)]
    hooks += [m.register_forward_hook(router_hook) for m in model.modules()
              if isinstance(m, mdl.DeepseekV4TopKRouter)]
    logits_of(model, tokens)
    for h in hooks:
        h.remove()
    return min(ix_gaps, default=1.0), min(moe_gaps, default=1.0)


def routing_stats(model, tokens):
    """Over a cache-free forward of `tokens`: in how many token-layer routings of the learned routers
    the selection bias changes the chosen experts, and what fraction of the routed experts' gate and
    up values the SwiGLU clamp cuts."""
    k = CONFIG["num_experts_per_tok"]
    st = {"changed": 0, "routings": 0, "gate": 0, "up": 0, "values": 0}

    def router_hook(mod, _args, out):
        scores = mod.score_fn(out[0])
        biased = torch.topk(scores + mod.e_score_correction_bias, k, dim=-1).indices.sort(-1).values
        plain = torch.topk(scores, k, dim=-1).indices.sort(-1).values
        st["changed"] += (biased != plain).any(-1).sum().item()
        st["routings"] += scores.shape[0]

    apply_gate = mdl.DeepseekV4Experts._apply_gate

    def counting_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        st["gate"] += (gate > self.limit).sum().item()
        st["up"] += (up.abs() > self.limit).sum().item()
        st["values"] += gate.numel()
        return apply_gate(self, gate_up)

    hooks = [m.register_forward_hook(router_hook) for m in model.modules()
             if isinstance(m, mdl.DeepseekV4TopKRouter)]
    mdl.DeepseekV4Experts._apply_gate = counting_gate
    try:
        logits_of(model, tokens)
    finally:
        mdl.DeepseekV4Experts._apply_gate = apply_gate
        for h in hooks:
            h.remove()
    return st


def reloaded(d, **config):
    cfg = DeepseekV4Config.from_pretrained(d, **config)
    m = AutoModelForCausalLM.from_pretrained(d, config=cfg, attn_implementation="eager",
                                             dtype=torch.float32)
    return m.eval()


def trap_checks(d, tokens, want):
    """How much each trap moves the logits of `tokens`: a setting or weight put back to its plain
    value must change them, or the fixture does not test it."""
    out = {}
    for label, config in (("index_topk past the input (dense CSA)", {"index_topk": 1000}),
                          ("swiglu_limit 1e6 (no clamp)", {"swiglu_limit": 1e6}),
                          ("sliding_window 1000 (no window)", {"sliding_window": 1000}),
                          ("no YaRN on the compressed rope",
                           {"rope_parameters": {
                               "main": {"rope_type": "default", "rope_theta": 10000.0,
                                        "partial_rotary_factor": 0.25},
                               "compress": {"rope_type": "default", "rope_theta": 160000.0,
                                            "partial_rotary_factor": 0.25}}}),
                          ("hc_sinkhorn_iters 1", {"hc_sinkhorn_iters": 1})):
        m = reloaded(d, **config)
        out[label] = (logits_of(m, tokens) - want).abs().max().item()
    # (label, name suffix, what to do to every tensor whose name ends with it: set to a value, or
    # scale). The plain values are transformers' own initialisation (zeros, ones, std 0.02).
    for label, suffix, op, v in (
            ("sinks 0", "sinks", "set", 0.0),
            ("position_bias 0", "position_bias", "set", 0.0),
            ("compressors' position_bias 0 (CSA and HCA)", "compressor.position_bias", "set", 0.0),
            ("indexers' position_bias 0", "indexer.position_bias", "set", 0.0),
            ("e_score_correction_bias 0", "e_score_correction_bias", "set", 0.0),
            ("hyper-connection base 0", "attn_hc.base", "set", 0.0),
            ("ffn hyper-connection base 0", "ffn_hc.base", "set", 0.0),
            ("hyper-connection fn 0", "attn_hc.fn", "set", 0.0),
            ("ffn hyper-connection fn 0", "ffn_hc.fn", "set", 0.0),
            ("hyper-connection scale 1", "attn_hc.scale", "set", 1.0),
            ("ffn hyper-connection scale 1", "ffn_hc.scale", "set", 1.0),
            ("hc_head fn 0", "hc_head.hc_fn", "set", 0.0),
            ("hc_head base 0", "hc_head.hc_base", "set", 0.0),
            ("hc_head scale 1", "hc_head.hc_scale", "set", 1.0),
            ("q_a_norm weight 1", "q_a_norm.weight", "set", 1.0),
            ("attention kv_norm weight 1", "self_attn.kv_norm.weight", "set", 1.0),
            ("compressors' kv_norm weight 1", "compressor.kv_norm.weight", "set", 1.0),
            ("indexers' kv_norm weight 1", "indexer.kv_norm.weight", "set", 1.0),
            ("input_layernorm weight 1", "input_layernorm.weight", "set", 1.0),
            ("post_attention_layernorm weight 1", "post_attention_layernorm.weight", "set", 1.0),
            ("final norm weight 1", "model.norm.weight", "set", 1.0),
            ("routed experts' gate_up x0.1 (std 0.02)", "experts.gate_up_proj", "scale", 0.1),
            ("shared experts' gate x0.1 (std 0.02)", "shared_experts.gate_proj.weight", "scale", 0.1)):
        m = reloaded(d)
        with torch.no_grad():
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                if name.endswith(suffix):
                    t.fill_(v) if op == "set" else t.mul_(v)
        out[label] = (logits_of(m, tokens) - want).abs().max().item()
    m = reloaded(d)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.roll(b, 1, dims=0))
    out["tid2eid shifted by one token"] = (logits_of(m, tokens) - want).abs().max().item()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    config = DeepseekV4Config(**CONFIG)
    config.architectures = ["DeepseekV4ForCausalLM"]
    model = DeepseekV4ForCausalLM._from_config(config, attn_implementation="eager",
                                               dtype=torch.float32).eval()
    randomize(model, gen)
    d = os.path.join(os.path.normpath(a.out), "deepseek_v4")
    if os.path.isdir(d):
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    gc_path = os.path.join(d, "generation_config.json")
    if os.path.exists(gc_path):
        os.remove(gc_path)
    # The expected outputs are the saved model's, as it loads back; it must compute what the model
    # that was saved computes (checked on the longest input below).
    built, model = model, reloaded(d)

    inputs, ref = [], {}
    for n in LENGTHS:
        # An input whose top-k selections (indexer and routers) are all clear of ties.
        for _ in range(CANDIDATES):
            toks = torch.randint(0, CONFIG["vocab_size"], (n,), generator=gen).tolist()
            gaps = boundary_gaps(model, toks) if n > 1 else (1.0, 1.0)
            if min(gaps) >= MIN_GAP:
                break
        else:
            raise RuntimeError(f"no {n}-token input clear of top-k ties")
        lg = logits_of(model, toks)
        ref[n] = (toks, lg, gaps)
        inputs.append({"tokens": toks, "logits": [[round6(v) for v in row] for row in lg.tolist()]})

    model.generation_config.eos_token_id = None
    best = None
    for _ in range(CANDIDATES):
        prompt = torch.randint(0, CONFIG["vocab_size"], (PROMPT_LEN,), generator=gen).tolist()
        new = greedy(model, prompt, NEW)
        full = logits_of(model, prompt + new)
        decide = full[PROMPT_LEN - 1: PROMPT_LEN - 1 + NEW]
        m = min(margins(decide))
        gaps = boundary_gaps(model, prompt + new)
        if decide.argmax(-1).tolist() != new or min(gaps) < MIN_GAP:
            m = -1.0  # cached decode disagrees with a full forward, or a top-k tie: reject
        score = (min(len(set(new)), 8), m)
        if best is None or score > best[3]:
            best = (prompt, new, m, score, gaps)
    prompt, new, min_margin, _, greedy_gaps = best
    if min_margin <= 0:
        raise RuntimeError("no greedy prompt whose cached decode equals a cache-free forward")

    expected = {
        "model_type": "deepseek_v4",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "inputs": inputs,
        "greedy": {"prompt": prompt, "tokens": new, "min_top2_margin": round6(min_margin)},
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")

    toks, lg, gaps = ref[max(LENGTHS)]
    reload_diff = (logits_of(built, toks) - lg).abs().max().item()
    if reload_diff != 0.0:
        raise RuntimeError(f"the reloaded model differs from the saved one: max |dlogit| {reload_diff}")
    rope = model.model.rotary_emb
    print(f"transformers {transformers.__version__}  torch {torch.__version__}")
    print(f"files: {', '.join(f'{fn} {os.path.getsize(os.path.join(d, fn))}' for fn in sorted(os.listdir(d)))}")
    print(f"reload: max |dlogit| {reload_diff} (saved model vs loaded back, {len(toks)} tokens)")
    print(f"inv_freq main {rope.main_inv_freq.tolist()}  compress {rope.compress_inv_freq.tolist()} "
          f"(without YaRN {rope.compute_default_rope_parameters(model.config, layer_type='compress')[0].tolist()})")
    print(f"|logit| max {max(r[1].abs().max().item() for r in ref.values()):.3f}; greedy min top-2 "
          f"margin {min_margin:.4f}")
    print(f"smallest top-k gaps (indexer, routers): 130 tokens {gaps}; greedy {greedy_gaps}")
    st = routing_stats(model, toks)
    print(f"selection bias changes the chosen experts in {st['changed']} of {st['routings']} routings; "
          f"the clamp cuts {st['gate'] / st['values']:.1%} of the routed gates and "
          f"{st['up'] / st['values']:.1%} of the ups ({len(toks)} tokens)")
    for k, v in trap_checks(d, toks, lg).items():
        print(f"trap: {k}: max |dlogit| {v:.4g}" + ("   <-- DOES NOT BITE" if v < 1e-4 else ""))
    for pat, (shape, dtype, n) in name_patterns(os.path.join(d, "model.safetensors")).items():
        print(f"   {pat:60s} {dtype} {shape} x{n}")


if __name__ == "__main__":
    main()

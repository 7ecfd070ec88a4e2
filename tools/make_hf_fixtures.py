#!/usr/bin/env python3
"""Tiny random HF-transformers models of every target architecture, with expected outputs.

For each architecture this builds a tiny randomly initialised float32 model with transformers' own
classes, gives it non-trivial weights, saves it with save_pretrained into tests/fixtures/hf/<arch>/ and
records expected.json (logits of every position for inputs of length 1, 5 and 33, and a 16-token greedy
continuation). See tests/fixtures/hf/README.md.

config.json is written in the *hub* ("legacy", transformers 4.x) layout that real checkpoints use
(rope_theta / rope_scaling / rope_local_base_freq / sliding_window_pattern / num_experts ...), and the
layout transformers >= 5 writes itself (rope_parameters, layer_types, num_local_experts ...) is kept next
to it as config.transformers5.json. Both are checked: reloading the saved directory with
AutoModelForCausalLM.from_pretrained (with either config) must reproduce the logits exactly.

Usage (venv with torch, transformers, safetensors, numpy):
    /tmp/hfvenv/bin/python tools/make_hf_fixtures.py [--out tests/fixtures/hf] [arch ...]
"""
import argparse
import json
import math
import os
import shutil
import sys
import traceback

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

SEED = 1234
LENGTHS = (1, 5, 33)
GREEDY_PROMPT_LEN = 5
GREEDY_NEW = 16
GREEDY_CANDIDATES = 24

COMMON = {"bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True}

# Hub-style (legacy layout) configs. Keys that transformers 5 renames are written as real checkpoints have them.
ARCHS = {
    # 1. Llama-3 style rope scaling. head_dim 16, theta 1e4, original ctx 32: wavelengths 6.3 (< 8: kept),
    #    19.9 (between 8 and 32: smoothed), >= 62.8 (> 32: divided by factor 8) -> all three regimes bite.
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    },
    # 2. Qwen2: QKV bias, tied embeddings. sliding_window is set but use_sliding_window is false, as in real
    #    Qwen2.5 configs: it must be ignored.
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 1000000.0,
        "use_sliding_window": False, "sliding_window": 4, "max_window_layers": 1,
    },
    # 3. Qwen3: q/k RMSNorm (per head), head_dim 24 != hidden/heads = 16, tied embeddings.
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 1000000.0,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 3,
    },
    # 4. Qwen3-MoE: 6 layers, decoder_sparse_step 2 -> layers 1, 3, 5 candidates, mlp_only_layers [5]
    #    -> sparse layers {1, 3}, dense layers {0, 2, 4, 5} (both rules matter). Softmax router, top-2 of 8,
    #    renormalised (norm_topk_prob). head_dim 24 != hidden/heads.
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "rope_theta": 1000000.0, "attention_bias": False,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "decoder_sparse_step": 2, "mlp_only_layers": [5], "router_aux_loss_coef": 0.001,
        "output_router_logits": False, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 6,
    },
    # 5. Gemma 3 text: (1+w) RMSNorms (4 per layer + q/k norms), embeddings scaled by sqrt(hidden),
    #    head_dim 32 != hidden/heads, query_pre_attn_scalar 24 (attention scale 24^-0.5, not head_dim^-0.5),
    #    sliding window 4 on local layers with rope theta 1e4, global layers theta 1e6 with linear rope
    #    scaling x2 (rope_scaling applies to global layers only), final logit softcapping 10,
    #    gelu_pytorch_tanh, tied embeddings. Pattern: every 3rd layer global -> [L, L, G, L, L, G].
    "gemma3_text": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 24,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "attention_bias": False,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "sliding_window": 4, "sliding_window_pattern": 3,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "final_logit_softcapping": 10.0, "attn_logit_softcapping": None,
        "pad_token_id": 0,
    },
    # 6. DeepSeek-V3: MLA (q_lora 32, kv_lora 16, nope 16, rope 8, v 16), interleaved rope on the rope part,
    #    YaRN (factor 4, original ctx 1024, beta 32/1, mscale = mscale_all_dim = 1): the ramp gives extrapolation
    #    weights [1, 2/3, 1/3, 0] over the 4 frequencies and the softmax scale is qk_head_dim^-0.5 * mscale^2
    #    with mscale = 0.1 ln 4 + 1. MoE: sigmoid router + e_score_correction_bias (selection only), 4 groups
    #    (group score = sum of top-2 in group), top-2 groups, top-2 experts, renormalised, x2.5, one shared
    #    expert; layer 0 dense (first_k_dense_replace 1).
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
    },
    # 7. Qwen3-MoE, the other router settings: every layer sparse (decoder_sparse_step 1, no mlp_only_layers),
    #    top-3 of 8 without renormalisation (norm_topk_prob false, the transformers default).
    "qwen3_moe_unnormed": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "rope_theta": 1000000.0, "attention_bias": False,
        "num_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
        "output_router_logits": False, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 3,
    },
    # 8. DeepSeek-V3, the other settings: no query LoRA (plain q_proj, as V2-Lite), YaRN with mscale 0.8 !=
    #    mscale_all_dim 1.2 (cos/sin scaled by mscale(4, 0.8) / mscale(4, 1.2) and the softmax by
    #    mscale(4, 1.2)^2), weights not renormalised (norm_topk_prob false), 2 groups of which 1 is kept, top-3,
    #    routed_scaling_factor 1.5, two shared experts (one SwiGLU of 2 x 32), no leading dense layer.
    "deepseek_v3_noqlora": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 12, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.2},
        "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 1.5, "n_shared_experts": 2, "first_k_dense_replace": 0,
        "norm_topk_prob": False, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
    },
    # 9. DeepSeek-V3.2: deepseek_v3's MLA, YaRN and MoE plus the DSA lightning indexer: 8 heads of 16 dims
    #    (the first 8 roped in halves, not interleaved like MLA's; LayerNorm with bias on its key), scores
    #    sum_h w_h relu(q_h.k / 4) / sqrt(8), and each query attends to its index_topk = 8 best positions
    #    only: the 130-token input and the greedy continuation (5 + 16 tokens) go past 8, so the sparsity binds.
    "deepseek_v32": {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "index_n_heads": 8, "index_head_dim": 16, "index_topk": 8,
        "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
    },
    # 10. Qwen3.5 (text model): hybrid Gated DeltaNet linear attention. Layers [lin, lin, full] x2
    #    (full_attention_interval 3: two linear layers between the attention layers), conv kernel 3 (not 4),
    #    2 key heads / 4 value heads (each key head serves two value heads: repeat_interleave), gated full
    #    attention (q_proj gives query and gate per head), zero-centred (1 + w) norms, partial rotary 0.5 of
    #    head_dim 16 with the interleaved-mrope sections of real configs, tied embeddings.
    "qwen3_5": {
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        "layer_types": ["linear_attention", "linear_attention", "full_attention"] * 2,
        "linear_conv_kernel_dim": 3, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    },
    # 11. Qwen3.5-MoE (text model): [lin, lin, lin, full] (interval 4), conv kernel 2, every layer sparse:
    #    softmax router top-2 of 8, always renormalised, a shared expert of 24 (!= the experts' 8) scaled by
    #    sigmoid(shared_expert_gate x); untied head; partial rotary 0.5 of head_dim 16.
    "qwen3_5_moe": {
        "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
        "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "linear_conv_kernel_dim": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 24, "router_aux_loss_coef": 0.001, "output_router_logits": False,
    },
    # 12. Qwen3-Next: fused in_proj_qkvz / in_proj_ba grouped per key head ([q, k, v, z] and [b, a] for each
    #    key head), [lin, lin, full] + [lin] (full_attention_interval 3), conv kernel 5, 2 key / 4 value heads,
    #    every layer sparse, top-2 of 4 renormalised, gated shared expert of 24; head_dim 32 with partial rotary
    #    0.25; untied. (Dense layers and norm_topk_prob false are what transformers allows but llama.cpp's
    #    qwen3next cannot run, so the GGUF comparison keeps to the released models' settings; the unnormalised
    #    router is qwen3_moe_unnormed's trap.)
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "full_attention_interval": 3,
        "linear_conv_kernel_dim": 5, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "num_experts": 4, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 24,
        "router_aux_loss_coef": 0.001, "output_router_logits": False,
    },
}



# Reload checks that are not bit-exact: transformers regroups Qwen3-Next's fused in_proj_qkvz/in_proj_ba on
# load, and the reloaded model's logits differ in the last bits (max 8e-6 seen).
RELOAD_TOL = {"qwen3_next": 1e-4}

# Input lengths per architecture where they differ from LENGTHS (the hybrid models' long input crosses
# several conv windows and attention layers: 60+ tokens).
HYBRID = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
LENGTHS_OF = {**{a: (1, 5, 64) for a in HYBRID},
              # DeepSeek-V3.2: the longest input goes well past index_topk (8).
              "deepseek_v32": (1, 5, 130)}


# Variants that must change the logits of the 33-token input: evidence that each trap is exercised.
# (label, changes to the hub config, buffer to zero)
TRAPS = {
    "llama": [("no llama3 rope scaling", {"rope_scaling": None}, None)],
    "qwen2": [("sliding window honoured (it must not be)", {"use_sliding_window": True}, None)],
    "qwen3": [("rms_norm_eps 1e-2 instead of 1e-6", {"rms_norm_eps": 1e-2}, None)],
    "qwen3_moe": [("norm_topk_prob false", {"norm_topk_prob": False}, None)],
    "qwen3_moe_unnormed": [("norm_topk_prob true", {"norm_topk_prob": True}, None)],
    "deepseek_v3_noqlora": [
        ("e_score_correction_bias zero", {}, "e_score_correction_bias"),
        ("no group limit (topk_group = n_group)", {"topk_group": 2}, None),
        ("norm_topk_prob true", {"norm_topk_prob": True}, None),
        ("mscale = mscale_all_dim (cos/sin unscaled)", {"rope_scaling": {"type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1, "mscale": 1.2,
            "mscale_all_dim": 1.2}}, None),
    ],
    "gemma3_text": [
        ("no sliding window", {"sliding_window": 4096}, None),
        ("no final softcap", {"final_logit_softcapping": None}, None),
        ("no linear rope scaling on global layers", {"rope_scaling": None}, None),
        ("local layers with global theta", {"rope_local_base_freq": 1000000.0}, None),
        ("attention scale head_dim^-0.5", {"query_pre_attn_scalar": 32}, None),
    ],
    "qwen3_5": [
        ("partial_rotary_factor 1", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
            "partial_rotary_factor": 1.0}}, None),
        ("rms_norm_eps 1e-2 instead of 1e-6", {"rms_norm_eps": 1e-2}, None),
    ],
    "qwen3_5_moe": [
        ("partial_rotary_factor 0.25", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
            "partial_rotary_factor": 0.25}}, None),
    ],
    "qwen3_next": [
        ("norm_topk_prob false", {"norm_topk_prob": False}, None),
        ("partial_rotary_factor 1", {"partial_rotary_factor": 1.0}, None),
    ],
    "deepseek_v3": [
        ("e_score_correction_bias zero", {}, "e_score_correction_bias"),
        ("no group limit (topk_group = n_group)", {"topk_group": 4}, None),
        ("routed_scaling_factor 1", {"routed_scaling_factor": 1.0}, None),
        ("no yarn", {"rope_scaling": None}, None),
        ("yarn without mscale_all_dim", {"rope_scaling": {"type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1}}, None),
        ("rope not interleaved", {"rope_interleave": False}, None),
    ],
    "deepseek_v32": [
        ("dense attention (index_topk 4096)", {"index_topk": 4096}, None),
        ("index_topk 16", {"index_topk": 16}, None),
        ("e_score_correction_bias zero", {}, "e_score_correction_bias"),
        ("no yarn", {"rope_scaling": None}, None),
    ],
}


def trap_checks(arch, d, toks, lg):
    out = {}
    for label, changes, zero_buf in TRAPS.get(arch, []):
        with open(os.path.join(d, "config.json")) as f:
            cfg_dict = json.load(f)
        cfg_dict.update(changes)
        cfg_dict = {k: v for k, v in cfg_dict.items() if v is not None or k not in changes}
        mt = cfg_dict.pop("model_type")
        for k in ("transformers_version",):
            cfg_dict.pop(k, None)
        cfg = AutoConfig.for_model(mt, **cfg_dict)
        m = AutoModelForCausalLM.from_pretrained(d, config=cfg, attn_implementation="eager", dtype=torch.float32)
        m.eval()
        if zero_buf:
            with torch.no_grad():
                for name, b in m.named_buffers():
                    if name.endswith(zero_buf):
                        b.zero_()
        out[label] = (logits_of(m, toks) - lg).abs().max().item()
        del m
    return out


def indexer_topk_gap(model, tokens):
    """The smallest gap, over every layer and every query with more than index_topk positions before it,
    between the index_topk-th best indexer score and the next one: how far the selection is from a tie
    (float32 summation order moves a score by ~1e-6). Recomputed from the indexer's inputs as
    DeepseekV32Indexer.forward computes them."""
    gaps = []

    def hook(mod, args, kwargs, _out):
        hs, q_resid, (cos, sin), mask = args[:4]
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
        b, s, _ = hs.shape
        q = mod.wq_b(q_resid).view(b, s, mod.n_heads, mod.head_dim)
        k = mod.k_norm(mod.wk(hs)).unsqueeze(2)
        r = mod.qk_rope_head_dim
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q[..., r:]], -1)
        k = torch.cat([k_rot, k[..., r:]], -1).squeeze(2)
        sc = torch.relu(torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)) * mod.softmax_scale)
        w = mod.weights_proj(hs) * mod.n_heads ** -0.5
        idx = torch.matmul(w.unsqueeze(-2), sc).squeeze(-2)[0]
        for i in range(mod.index_topk, s):
            top = torch.sort(idx[i, : i + 1], descending=True).values
            gaps.append((top[mod.index_topk - 1] - top[mod.index_topk]).item())

    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
             if type(m).__name__ == "DeepseekV32Indexer"]
    logits_of(model, tokens)
    for h in hooks:
        h.remove()
    return min(gaps)


def is_norm(name):
    leaf = name.rsplit(".", 2)
    return name.endswith(".weight") and ("norm" in leaf[-2])


def randomize(model, arch, gen):
    """Non-trivial deterministic weights: matrices N(0, 0.2), norms ~1 (Gemma: (1+w) with w ~ 0.1 N),
    biases 0.1 N, DeepSeek e_score_correction_bias N(0, 0.5)."""
    gemma = arch.startswith("gemma")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if is_norm(name):
                p.copy_(0.1 * noise if gemma else 1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen, dtype=torch.float32))


def round6(x):
    return float(f"{x:.6g}")


def logits_of(model, tokens):
    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float64)


# Candidate inputs per length of the hybrid models, and how far transformers' chunked and recurrent logits may
# differ on the one kept.
HYBRID_CANDIDATES = 16
HYBRID_SPREAD = 5e-4


def recurrent_logits(model, tokens):
    """Logits of every position computed token by token with the cache (the recurrent gated delta rule)."""
    rows = []
    with torch.no_grad():
        out = model(torch.tensor([tokens[:1]], dtype=torch.long), use_cache=True)
        rows.append(out.logits[0, -1])
        for t in tokens[1:]:
            out = model(torch.tensor([[t]], dtype=torch.long), past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[0, -1])
    return torch.stack(rows).to(torch.float64)


def greedy(model, prompt, new=GREEDY_NEW):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], dtype=torch.long),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=new, min_new_tokens=new,
            eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None,
        )
    return out[0, len(prompt):].tolist()


def margins(logits):
    top2 = torch.topk(logits, 2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def name_patterns(path):
    pats = {}
    with safe_open(path, "pt") as f:
        for k in f.keys():
            parts = k.split(".")
            parts = ["{L}" if parts[i - 1] == "layers" and s.isdigit() else
                     "{E}" if parts[i - 1] == "experts" and s.isdigit() else s for i, s in enumerate(parts)]
            pat = ".".join(parts)
            shape = list(f.get_slice(k).get_shape())
            dtype = f.get_slice(k).get_dtype()
            pats.setdefault(pat, (shape, dtype, 0))
            s, d, n = pats[pat]
            pats[pat] = (s, d, n + 1)
    return pats


def build(arch, out_dir):
    hub_cfg = ARCHS[arch]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + sum(map(ord, arch)))

    cfg_kwargs = {**COMMON, **{k: v for k, v in hub_cfg.items() if k not in ("architectures", "model_type")}}
    config = AutoConfig.for_model(hub_cfg["model_type"], **json.loads(json.dumps(cfg_kwargs)))
    config.architectures = hub_cfg["architectures"]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    randomize(model, arch, gen)

    d = os.path.join(out_dir, arch)
    if os.path.isdir(d):
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    gc_path = os.path.join(d, "generation_config.json")
    if os.path.exists(gc_path):
        os.remove(gc_path)
    # transformers-5 layout kept aside; config.json gets the hub (legacy) layout.
    os.replace(os.path.join(d, "config.json"), os.path.join(d, "config.transformers5.json"))
    legacy = {"architectures": hub_cfg["architectures"], "model_type": hub_cfg["model_type"], **COMMON,
              **{k: v for k, v in hub_cfg.items() if k not in ("architectures", "model_type")},
              "torch_dtype": "float32", "transformers_version": transformers.__version__}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(legacy, f, indent=2)
        f.write("\n")
    # The expected outputs are those of the saved model as it loads back: for deepseek_v32 the model built
    # in memory differs from its reloaded self in the last float32 bits (~5e-6 on the logits).
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    model.eval()

    # inputs
    vocab = hub_cfg["vocab_size"]
    inputs = []
    ref = {}
    for n in LENGTHS_OF.get(arch, LENGTHS):
        toks = torch.randint(0, vocab, (n,), generator=gen).tolist()
        lg = logits_of(model, toks)
        # Hybrid models: transformers' own chunked (one forward) and recurrent (token by token) forms of the
        # gated delta rule must agree on the input (a random model can be ill-conditioned at a position, where
        # the two differ by ~1e-3 and no implementation can match both); else draw another input.
        for _ in range(HYBRID_CANDIDATES if arch in HYBRID else 0):
            spread = (recurrent_logits(model, toks) - lg).abs().max().item()
            if spread <= HYBRID_SPREAD:
                break
            print(f"   {arch}: {n}-token input rejected (chunked vs recurrent spread {spread:.2e})")
            toks = torch.randint(0, vocab, (n,), generator=gen).tolist()
            lg = logits_of(model, toks)
        else:
            if arch in HYBRID:
                raise RuntimeError(f"{arch}: no {n}-token input whose chunked and recurrent logits agree")
        ref[n] = (toks, lg)
        inputs.append({"tokens": toks, "logits": [[round6(v) for v in row] for row in lg.tolist()]})

    # greedy: among a few random prompts prefer continuations that do not collapse into a repeated token
    # (at least 8 distinct ids), then the one whose decisions are least tie-prone (largest min top-2 margin)
    model.generation_config.eos_token_id = None
    best = None
    for _ in range(GREEDY_CANDIDATES):
        prompt = torch.randint(0, vocab, (GREEDY_PROMPT_LEN,), generator=gen).tolist()
        new = greedy(model, prompt)
        full = logits_of(model, prompt + new)
        decide = full[GREEDY_PROMPT_LEN - 1: GREEDY_PROMPT_LEN - 1 + GREEDY_NEW]
        argmax = decide.argmax(-1).tolist()
        m = min(margins(decide))
        if argmax != new:
            m = -1.0  # cached decode disagrees with a full forward: reject this prompt
        score = (min(len(set(new)), 8), m)
        if best is None or score > best[3]:
            best = (prompt, new, m, score)
    prompt, new, min_margin, _ = best

    expected = {
        "model_type": hub_cfg["model_type"],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "inputs": inputs,
        "greedy": {"prompt": prompt, "tokens": new, "min_top2_margin": round6(min_margin)},
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")

    # --- checks: reload with the hub-layout config.json and with the transformers-5 one ---
    report = {"arch": arch}
    for label, cfg_file in (("config.json", "config.json"), ("config.transformers5.json", "config.transformers5.json")):
        cfg = AutoConfig.from_pretrained(os.path.join(d, cfg_file)) if cfg_file != "config.json" else None
        kw = {"config": cfg} if cfg is not None else {}
        m2 = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32, **kw)
        m2.eval()
        worst = 0.0
        for n, (toks, lg) in ref.items():
            worst = max(worst, (logits_of(m2, toks) - lg).abs().max().item())
        g2 = greedy(m2, prompt) if label == "config.json" else None
        if worst > RELOAD_TOL.get(arch, 0.0) or (g2 is not None and g2 != new):
            raise RuntimeError(f"{arch}: reload with {label} differs: max |dlogit| = {worst}, greedy {g2} vs {new}")
        report[f"reload_{label}"] = worst
        del m2
    # rounded logits vs exact
    report["logit_absmax"] = max(lg.abs().max().item() for _, lg in ref.values())
    report["min_margin"] = min_margin
    report["files"] = {fn: os.path.getsize(os.path.join(d, fn)) for fn in sorted(os.listdir(d))}
    report["patterns"] = name_patterns(os.path.join(d, "model.safetensors"))
    longest = max(LENGTHS_OF.get(arch, LENGTHS))
    report["traps"] = trap_checks(arch, d, *ref[longest])
    if hub_cfg.get("index_topk"):
        report["topk_gap"] = indexer_topk_gap(model, ref[longest][0])
    report["params"] = sum(p.numel() for p in model.parameters())
    return report, config


def describe(arch, config):
    keys = ["layer_types", "rope_parameters", "sliding_window", "mlp_only_layers", "decoder_sparse_step",
            "num_local_experts", "n_routed_experts", "head_dim", "query_pre_attn_scalar",
            "final_logit_softcapping", "tie_word_embeddings", "first_k_dense_replace", "rope_interleave"]
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    ap.add_argument("archs", nargs="*", default=list(ARCHS))
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = os.path.normpath(a.out)
    os.makedirs(out, exist_ok=True)
    print(f"transformers {transformers.__version__}  torch {torch.__version__}")
    failures = {}
    for arch in a.archs:
        try:
            rep, config = build(arch, out)
        except Exception as e:  # record and continue with the others
            failures[arch] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        total = sum(rep["files"].values())
        print(f"\n== {arch}: {rep['params']} params, {total / 1e6:.3f} MB total "
              f"({', '.join(f'{k} {v}' for k, v in rep['files'].items())})")
        print(f"   reload diffs: {rep['reload_config.json']} / {rep['reload_config.transformers5.json']}; "
              f"|logit| max {rep['logit_absmax']:.3f}; greedy min top-2 margin {rep['min_margin']:.4f}")
        if "topk_gap" in rep:
            print(f"   indexer: smallest gap at the top-k boundary {rep['topk_gap']:.4g}")
        for k, v in rep["traps"].items():
            print(f"   trap check: {k}: max |dlogit| {v:.4g}" + ("   <-- DOES NOT BITE" if v < 1e-4 else ""))
        print(f"   transformers view: {describe(arch, config)}")
        for pat, (shape, dtype, n) in rep["patterns"].items():
            print(f"   {pat:60s} {dtype} {shape} x{n}")
    if failures:
        print("\nFAILED:")
        for k, v in failures.items():
            print(f"  {k}: {v}")
        sys.exit(1)


if __name__ == "__main__":
    main()

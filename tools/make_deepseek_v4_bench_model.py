#!/usr/bin/env python3
"""A random DeepSeek-V4 with the attention's real proportions, to time decode with and without
its sparsity (the weights' values do not change the cost).

16 heads of 128 over one shared key-value head (rope on 16 dims), windows of 128 tokens, two
compressed sparse (CSA, windows of 4) layers around a heavily compressed one (HCA, windows of
128), an indexer of 8 heads of 64; 4 hyper-connection streams, 8 experts (top 2, the first layer
hash-routed). `TOPK` is the indexer's `index_topk`: 64 makes CSA sparse past 256 tokens of
context, a number beyond the context makes every entry attended (the dense comparison).

Usage (venv with torch and transformers 5.23):
    python tools/make_deepseek_v4_bench_model.py OUT_DIR TOPK
    supernode bench -m OUT_DIR --precision exact --prompt-tokens 4096 --gen-tokens 32 -t 2
"""
import sys

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def main():
    out, topk = sys.argv[1], int(sys.argv[2])
    cfg = DeepseekV4Config(
        vocab_size=256, hidden_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=16, num_key_value_heads=1, head_dim=128, q_lora_rank=64,
        partial_rotary_factor=0.125, num_experts_per_tok=2, n_routed_experts=8,
        max_position_embeddings=65536,
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        hc_mult=4, mlp_layer_types=["hash_moe", "moe", "moe"], sliding_window=128, o_groups=4,
        o_lora_rank=64, index_n_heads=8, index_head_dim=64, index_topk=topk,
        num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "factor": 16.0,
                         "original_max_position_embeddings": 4096})
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "tid2eid" in name:
                buf.copy_(torch.stack([torch.randperm(8)[:2] for _ in range(cfg.vocab_size)]))
    model.save_pretrained(out)


if __name__ == "__main__":
    main()

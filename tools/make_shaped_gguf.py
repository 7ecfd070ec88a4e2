#!/usr/bin/env python3
"""A random-weight GGUF with the shape of a real model, for speed comparisons against llama.cpp.

--arch qwen35 (the default): a hybrid model.

No checkpoint of Qwen3.5 can be fetched here, and speed depends on the shapes, not on the values. This writes
llama.cpp's `qwen35` layout (the tensor and metadata names of its converter, as in
tests/fixtures/gguf/qwen3_5.gguf) at the sizes of Qwen3.5-0.8B's text model:

    hidden 1024, 24 layers (3 Gated DeltaNet layers, then one gated full-attention layer, repeated),
    FFN 3584, linear attention 16 key heads and 16 value heads of 128, conv kernel 4,
    full attention 8 query heads, 2 KV heads of 256 (rotary on 64 of them), vocabulary 248,320, tied head.

With --mtp, a multi-token-prediction layer follows the decoder's, as llama.cpp's converter writes
Qwen3.5's `mtp.*`: `block_count` counts it, `qwen35.nextn_predict_layers` is 1, and block `layers` holds a
gated full-attention layer with `nextn.eh_proj`, `nextn.enorm`, `nextn.hnorm` and
`nextn.shared_head_norm`. Its random weights make its drafts (almost) never right: the file measures
what failed drafts cost.

Matrices are written as Q8_0 (or --type f16/f32), norms and the other vectors as f32. Values are small random
normals (seeded), the decays and norms in the ranges trained models have, so the numbers stay finite. The
vocabulary is placeholder tokens: benchmarks feed token ids.

--arch qwen3moe: Qwen3-30B-A3B's layout (llama.cpp's `qwen3moe`: 128 experts, 8 used per token, their
gate/up/down stacked in `ffn_{gate,up,down}_exps`, an f32 router `ffn_gate_inp`, per-head Q/K norms, head
dim 128, untied output) scaled down to about 2.6B weights: 48 layers (--layers), hidden 512, experts of 256,
8 query and 2 KV heads, vocabulary 151,936. About 0.3B of them are used per token. Written as f16 (the
default for this arch), it is what llama.cpp's quantiser takes:
`llama-quantize OUT.f16.gguf OUT.q4_k_m.gguf Q4_K_M`.

Usage:
    python tools/make_shaped_gguf.py OUT.gguf [--arch qwen35|qwen3moe] [--type q8_0|f16|f32] [--layers N]
                                     [--seed 0] [--mtp]
Needs the `gguf` and `numpy` Python packages.
"""
import argparse
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--arch", default="qwen35", choices=["qwen35", "qwen3moe"])
    ap.add_argument("--type", choices=["q8_0", "f16", "f32"],
                    help="matrices' type (default: q8_0 for qwen35, f16 for qwen3moe)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 24 for qwen35, 48 for qwen3moe)")
    ap.add_argument("--vocab", type=int, help="default: 248,320 for qwen35, 151,936 for qwen3moe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mtp", action="store_true", help="add a multi-token-prediction layer (qwen35)")
    a = ap.parse_args()
    moe = a.arch == "qwen3moe"
    if moe and a.mtp:
        sys.exit("make_shaped_gguf: --mtp is for --arch qwen35")
    a.type = a.type or ("f16" if moe else "q8_0")
    a.layers = a.layers or (48 if moe else 24)
    a.vocab = a.vocab or (151936 if moe else 248320)
    import gguf

    rng = np.random.default_rng(a.seed)
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16,
             "f32": gguf.GGMLQuantizationType.F32}[a.type]
    w = gguf.GGUFWriter(a.out, a.arch)
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "f32": gguf.LlamaFileType.ALL_F32}[a.type]

    def matrix(name, cols, rows, experts=None):
        """A `rows x cols` weight (ggml shape [cols, rows]), or `experts` of them stacked (ggml
        [cols, rows, experts]), std 1/sqrt(cols)."""
        shape = (rows, cols) if experts is None else (experts, rows, cols)
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= 1.0 / np.sqrt(cols)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    def vector(name, x):
        w.add_tensor(name, np.asarray(x, dtype=np.float32))

    ones = lambda n: 1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)

    def vocabulary(pre):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        # Placeholder tokens; one merge, since a BPE vocabulary needs merges.
        w.add_token_list(["a", "b"] + [f"<t{i}>" for i in range(2, a.vocab - 1)] + ["<|endoftext|>"])
        w.add_token_types([1] * (a.vocab - 1) + [3])
        w.add_token_merges(["a b"])
        w.add_bos_token_id(a.vocab - 1)
        w.add_eos_token_id(a.vocab - 1)

    def finish():
        print(f"writing {a.out}", file=sys.stderr, flush=True)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()

    if moe:
        return qwen3moe(a, gguf, w, rng, file_type, matrix, vector, ones, vocabulary, finish)
    blocks = a.layers + int(a.mtp)

    hidden, ffn, interval = 1024, 3584, 4
    nk, nv, dk, dv, taps = 16, 16, 128, 128, 4
    n_head, n_kv, hd, rot = 8, 2, 256, 64
    conv_dim = 2 * nk * dk + nv * dv
    w.add_name("Qwen3.5-0.8B-shaped (random weights)")
    w.add_block_count(blocks)
    if a.mtp:
        w.add_uint32("qwen35.nextn_predict_layers", 1)
    w.add_context_length(32768)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_rope_freq_base(10_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(file_type)
    w.add_ssm_conv_kernel(taps)
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(nk)
    w.add_ssm_time_step_rank(nv)
    w.add_ssm_inner_size(nv * dv)
    recurrent = [i < a.layers and (i + 1) % interval != 0 for i in range(blocks)]
    w.add_array("qwen35.attention.recurrent_layers", recurrent)
    w.add_full_attention_interval(interval)
    w.add_rope_dimension_count(rot)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocabulary("qwen2")
    matrix("token_embd.weight", hidden, a.vocab)
    for i in range(blocks):
        p = f"blk.{i}."
        print(f"layer {i + 1}/{blocks} ({'linear' if recurrent[i] else 'full'} attention)",
              file=sys.stderr, flush=True)
        vector(p + "attn_norm.weight", ones(hidden))
        if recurrent[i]:
            vector(p + "ssm_a", -np.exp(rng.uniform(0.0, np.log(16.0), nv)))
            vector(p + "ssm_conv1d.weight", 0.3 * rng.standard_normal((conv_dim, taps), dtype=np.float32))
            vector(p + "ssm_dt.bias", rng.uniform(-4.0, 0.0, nv))
            matrix(p + "ssm_alpha.weight", hidden, nv)
            matrix(p + "ssm_beta.weight", hidden, nv)
            matrix(p + "attn_qkv.weight", hidden, conv_dim)
            matrix(p + "attn_gate.weight", hidden, nv * dv)
            vector(p + "ssm_norm.weight", ones(dv))
            matrix(p + "ssm_out.weight", nv * dv, hidden)
        else:
            vector(p + "attn_q_norm.weight", ones(hd))
            vector(p + "attn_k_norm.weight", ones(hd))
            matrix(p + "attn_q.weight", hidden, 2 * n_head * hd)
            matrix(p + "attn_k.weight", hidden, n_kv * hd)
            matrix(p + "attn_v.weight", hidden, n_kv * hd)
            matrix(p + "attn_output.weight", n_head * hd, hidden)
        vector(p + "post_attention_norm.weight", ones(hidden))
        matrix(p + "ffn_gate.weight", hidden, ffn)
        matrix(p + "ffn_up.weight", hidden, ffn)
        matrix(p + "ffn_down.weight", ffn, hidden)
        if i == a.layers:
            matrix(p + "nextn.eh_proj.weight", 2 * hidden, hidden)
            for n in ("enorm", "hnorm", "shared_head_norm"):
                vector(p + f"nextn.{n}.weight", ones(hidden))
    vector("output_norm.weight", ones(hidden))
    finish()


def qwen3moe(a, gguf, w, rng, file_type, matrix, vector, ones, vocabulary, finish):
    """The `qwen3moe` layout at the sizes in the module's docstring."""
    hidden, expert_ffn, experts, used = 512, 256, 128, 8
    n_head, n_kv, hd = 8, 2, 128
    w.add_name("Qwen3-MoE-shaped 2.6B (random weights)")
    w.add_block_count(a.layers)
    w.add_context_length(32768)
    w.add_embedding_length(hidden)
    # The converter writes the config's dense `intermediate_size` too; Qwen3-30B-A3B's is 6144.
    w.add_feed_forward_length(6 * hidden)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    w.add_expert_feed_forward_length(expert_ffn)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocabulary("qwen2")
    matrix("token_embd.weight", hidden, a.vocab)
    for i in range(a.layers):
        p = f"blk.{i}."
        print(f"layer {i + 1}/{a.layers}", file=sys.stderr, flush=True)
        vector(p + "attn_norm.weight", ones(hidden))
        vector(p + "attn_q_norm.weight", ones(hd))
        vector(p + "attn_k_norm.weight", ones(hd))
        matrix(p + "attn_q.weight", hidden, n_head * hd)
        matrix(p + "attn_k.weight", hidden, n_kv * hd)
        matrix(p + "attn_v.weight", hidden, n_kv * hd)
        matrix(p + "attn_output.weight", n_head * hd, hidden)
        vector(p + "ffn_norm.weight", ones(hidden))
        # The router stays f32, as the converter and llama.cpp's quantiser leave it.
        vector(p + "ffn_gate_inp.weight",
               rng.standard_normal((experts, hidden), dtype=np.float32) / np.sqrt(hidden))
        matrix(p + "ffn_gate_exps.weight", hidden, expert_ffn, experts)
        matrix(p + "ffn_up_exps.weight", hidden, expert_ffn, experts)
        matrix(p + "ffn_down_exps.weight", expert_ffn, hidden, experts)
    vector("output_norm.weight", ones(hidden))
    matrix("output.weight", hidden, a.vocab)
    finish()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""An HF fixture converted by llama.cpp's own converter, with what llama.cpp computes for it.

For tests/fixtures/hf/<arch>/ (made by make_hf_fixtures.py) this writes, into the same directory:

- model.gguf: the output of llama.cpp's convert_hf_to_gguf.py (--outtype f32) on the fixture. The tiny
  models have no tokenizer; the converter's set_vocab is replaced by a byte-level GPT-2 vocabulary of
  the model's 256 ids (one merge whose result is not a token; BOS 1, EOS 2), which the tests never use: they feed token ids.
  Everything else (tensor names, the kv_b split, metadata keys) is the converter's own.
- llamacpp.json: llama.cpp (llama-cpp-python, CPU) on that file:
  {"llama_cpp", "inputs": [{"tokens", "logits", "spread"}], "greedy": {"prompt", "tokens", "margins"}}
  `inputs` are expected.json's token sequences; `logits` the batched pass (every position, 5 significant
  digits); `spread` per position the largest |batched - one-token| over the vocabulary, where the
  one-token path feeds the same tokens one llama_decode at a time: llama.cpp's disagreement with itself,
  which the Rust test uses as its tolerance. `greedy` is llama.cpp's one-token-at-a-time greedy
  continuation of expected.json's prompt, with each step's top-1/top-2 margin.

llama.cpp 0.3.36 runs a DeepSeek lightning indexer only with a Hadamard rotation of its keys whose size is a
multiple of 64 (llama_kv_cache::build_input_k_rot), and aborts on a GGML_ASSERT in ggml_mul_mat otherwise; the
deepseek_v32 fixture's index_head_dim is 16 (a 64-dim indexer with fewer heads ties at the top-k boundary and
does not fit in 1 MB), so for it only --convert-only applies and the script refuses the reference run.

Usage (the venv with torch, transformers, gguf and llama-cpp-python; --convert-only without the last):
    PYTHONPATH=$LLAMA/gguf-py python tools/make_gguf_fixture.py --llama-cpp $LLAMA [--convert-only] deepseek_v32
where $LLAMA is the llama.cpp source tree of the installed llama-cpp-python (vendor/llama.cpp of its sdist).
"""
import argparse
import json
import os
import sys

import numpy as np


def byte_vocab(self):
    """A GPT-2 style byte-level vocabulary of `vocab_size` ids (the fixtures' 256)."""
    import gguf
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = dict(zip(bs, map(chr, cs)))
    vocab = self.hparams["vocab_size"]
    tokens = [byte_to_char[i] if i < 256 else f"[PAD{i}]" for i in range(vocab)]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list(tokens)
    self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    # One merge, as GGUF readers want the key (gguf-py drops an empty list); "!!" is not a token.
    self.gguf_writer.add_token_merges(["! !"])
    self.gguf_writer.add_bos_token_id(1)
    self.gguf_writer.add_eos_token_id(2)
    self.gguf_writer.add_add_bos_token(False)


def convert(llama_dir, src, out):
    sys.path.insert(0, llama_dir)
    sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
    import convert_hf_to_gguf
    from conversion import base
    base.TextModel.set_vocab = byte_vocab
    from conversion import deepseek
    for cls in (deepseek.DeepseekV2Model, deepseek.DeepseekV32Model):
        cls.set_vocab = byte_vocab
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", src, "--outfile", out, "--outtype", "f32"]
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = argv


def round5(x):
    return float(f"{x:.5g}")


def reference(path, expected):
    import llama_cpp
    from llama_cpp import Llama

    def model(n_batch):
        return Llama(model_path=path, n_ctx=512, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                     n_threads=2, seed=0, verbose=False)

    batched, single = model(512), model(1)

    def logits(m, tokens):
        m.reset()
        m.eval(tokens)
        return np.array(m.scores[: len(tokens)], dtype=np.float64)

    inputs = []
    for inp in expected["inputs"]:
        toks = inp["tokens"]
        b, s = logits(batched, toks), logits(single, toks)
        inputs.append({"tokens": toks, "logits": [[round5(v) for v in row] for row in b.tolist()],
                       "spread": [round5(v) for v in np.abs(b - s).max(-1).tolist()]})
    prompt = expected["greedy"]["prompt"]
    n_new = len(expected["greedy"]["tokens"])
    single.reset()
    single.eval(prompt)
    new, margins = [], []
    for _ in range(n_new):
        row = np.array(single.scores[single.n_tokens - 1], dtype=np.float64)
        top = np.argsort(-row)[:2]
        new.append(int(top[0]))
        margins.append(round5(row[top[0]] - row[top[1]]))
        single.eval([int(top[0])])
    return {"llama_cpp": llama_cpp.__version__, "inputs": inputs,
            "greedy": {"prompt": prompt, "tokens": new, "margins": margins}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (with convert_hf_to_gguf.py)")
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    ap.add_argument("--convert-only", action="store_true", help="write model.gguf only (no llama-cpp-python)")
    ap.add_argument("arch")
    a = ap.parse_args()
    d = os.path.normpath(os.path.join(a.fixtures, a.arch))
    out = os.path.join(d, "model.gguf")
    convert(os.path.abspath(a.llama_cpp), d, out)
    if a.convert_only:
        print(f"{a.arch}: model.gguf {os.path.getsize(out)} bytes")
        return
    with open(os.path.join(d, "config.json")) as f:
        index_dim = json.load(f).get("index_head_dim")
    if index_dim is not None and index_dim % 64 != 0:
        sys.exit(f"{a.arch}: index_head_dim {index_dim} is not a multiple of 64, which llama.cpp's indexer "
                 "needs (its Hadamard rotation); model.gguf is written, llamacpp.json is not")
    with open(os.path.join(d, "expected.json")) as f:
        expected = json.load(f)
    ref = reference(out, expected)
    with open(os.path.join(d, "llamacpp.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    ours = expected["greedy"]["tokens"]
    print(f"{a.arch}: model.gguf {os.path.getsize(out)} bytes; llama.cpp greedy {ref['greedy']['tokens']}"
          f" (transformers {ours}); largest spread "
          f"{max(max(i['spread']) for i in ref['inputs']):.4g}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The hybrid-attention HF fixtures (qwen3_5, qwen3_5_moe, qwen3_next) as GGUF files made by llama.cpp's own
converter, and llama.cpp's logits and greedy tokens for them.

For each architecture:
1. the fixture directory (tests/fixtures/hf/<arch>/) is copied aside with a byte-level BPE tokenizer of its 256
   ids (the fixtures have none; the converter needs one; it does not touch the weights), and
   `convert_hf_to_gguf.py --outtype f32 --no-mtp` (the fixtures have no multi-token-prediction layers) writes tests/fixtures/gguf/<arch>.gguf (llama.cpp's `qwen35`,
   `qwen35moe`, `qwen3next`: its tensor names, its V-head reordering, `-exp(A_log)`, `1 + w` norms);
   the tokenizer's pre-tokenizer hash is unknown to the converter, so its `get_vocab_base_pre` is told
   "qwen2" (only the `tokenizer.ggml.pre` string depends on it);
2. with llama-cpp-python, llama.cpp runs the GGUF on the inputs of the fixture's expected.json: the logits of
   every position from one batched evaluation (`logits_all`), the same from a token-by-token evaluation (to
   document llama.cpp's own batched-vs-serial spread), and the 16-token greedy continuation of the fixture's
   greedy prompt; written to tests/fixtures/gguf/<arch>.llamacpp.json.

Usage:
    PYTHONPATH=<llama.cpp>/gguf-py:<llama.cpp> python tools/make_hybrid_gguf.py --llama-cpp <llama.cpp> [arch ...]
(step 2 is skipped with a message when llama_cpp cannot be imported).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ARCHS = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
GREEDY_NEW = 16


def byte_tokenizer(d):
    """tokenizer.json + tokenizer_config.json: byte-level BPE of 256 ids: 254 byte tokens, one merge (a GGUF
    BPE vocabulary needs merges) and `<|endoftext|>` (which the Qwen tokenizer classes add); the tests feed
    token ids, so the missing bytes do not matter."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(chars[:254])}
    vocab[chars[0] + chars[1]] = 254
    vocab["<|endoftext|>"] = 255
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(chars[0], chars[1])]))
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256}, f)


CONVERT = """
import sys
sys.argv = sys.argv[1:]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def convert(arch, llama_cpp, out):
    src = os.path.join(ROOT, "tests", "fixtures", "hf", arch)
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, arch)
        os.makedirs(d)
        for fn in ("model.safetensors", "config.json"):
            shutil.copy(os.path.join(src, fn), d)
        byte_tokenizer(d)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(llama_cpp, "gguf-py"), llama_cpp]))
        subprocess.run([sys.executable, "-c", CONVERT, "convert", d, "--outtype", "f32", "--no-mtp", "--outfile", out],
                       check=True, env=env)


def llama_reference(arch, gguf_path, out):
    import llama_cpp
    from llama_cpp import Llama

    expected = json.load(open(os.path.join(ROOT, "tests", "fixtures", "hf", arch, "expected.json")))

    def new():
        return Llama(model_path=gguf_path, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True,
                     n_threads=2, verbose=False, seed=0)

    def batched(toks):
        m = new()
        m.reset()
        m.eval(toks)
        return [[float(v) for v in m.scores[i]] for i in range(len(toks))]

    def serial(toks):
        m = new()
        m.reset()
        rows = []
        for t in toks:
            m.eval([t])
            rows.append([float(v) for v in m.scores[m.n_tokens - 1]])
        return rows

    inputs = []
    spread = 0.0
    for inp in expected["inputs"]:
        toks = inp["tokens"]
        b, s = batched(toks), serial(toks)
        spread = max(spread, max(abs(x - y) for rb, rs in zip(b, s) for x, y in zip(rb, rs)))
        inputs.append({"tokens": toks, "logits": [[round(v, 5) for v in row] for row in b]})
    m = new()
    m.reset()
    prompt = expected["greedy"]["prompt"]
    m.eval(prompt)
    greedy = []
    for _ in range(GREEDY_NEW):
        row = m.scores[m.n_tokens - 1]
        t = int(max(range(len(row)), key=lambda i: row[i]))
        greedy.append(t)
        m.eval([t])
    ref = {
        "llama_cpp_python": llama_cpp.__version__,
        "inputs": inputs,
        "serial_vs_batched_max_abs": spread,
        "greedy": {"prompt": prompt, "tokens": greedy},
    }
    with open(out, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    print(f"{arch}: batched vs serial max |dlogit| {spread:.3g}; greedy {greedy}; "
          f"transformers greedy {expected['greedy']['tokens']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("archs", nargs="*", default=list(ARCHS))
    a = ap.parse_args()
    out_dir = os.path.join(ROOT, "tests", "fixtures", "gguf")
    os.makedirs(out_dir, exist_ok=True)
    for arch in a.archs:
        path = os.path.join(out_dir, f"{arch}.gguf")
        convert(arch, a.llama_cpp, path)
        print(f"{arch}: {path} ({os.path.getsize(path)} bytes)")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print(f"{arch}: llama_cpp is not importable: no llama.cpp reference written")
            continue
        llama_reference(arch, path, os.path.join(out_dir, f"{arch}.llamacpp.json"))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Records llama.cpp's tokenisation of the two real models as the fixture
tests/fixtures/tokenizer_llamacpp.json, read by crates/supernode-engine/tests/tokenizer_llamacpp.rs.

Usage (under a venv with llama-cpp-python and jinja2):
    python tools/make_tokenizer_reference.py SMOLLM2_GGUF GEMMA3_GGUF [OUT_JSON]

For each model and each text: the ids of llama.cpp's `llama_tokenize` (add_special and
parse_special as recorded) and `llama_detokenize(ids, remove_special=False, unparse_special=False
/ True)`; the model's BOS/EOS and its end-of-generation ids. For models with a chat template: the
template rendered the way HF transformers renders it (Jinja2 sandbox, trim_blocks, lstrip_blocks)
and llama.cpp's ids of the rendered text with special tokens parsed.
"""

import ctypes
import json
import os
import sys
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
import llama_cpp
from llama_cpp import Llama

TEXTS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    " leading space and trailing space ",
    "  two leading spaces",
    "multiple   spaces\tand\ttabs\n\nand blank lines\n\n\n",
    "I'm sure they're here; we'll see. Don't you think it's fine?",
    "Numbers: 12345678 3.14159 -42 1,000,000 0x1F 2024-02-29",
    "中文测试：你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다.",
    "Emoji: 🙂😀🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷 and ❤️",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn -x  # comment\n",
    '{"key": [1, 2, {"nested": null}], "s": "a\\"b"}',
    "Ünïcödé àccents: café naïve résumé Ångström",
    "e\u0301 combining and NFD: cafe\u0301",
    "Arabic: مرحبا بالعالم and Hindi: नमस्ते दुनिया",
    "Math ∑ ∫ √ ≤ ≥ ≠ ∞ and symbols © ® ™ € £ ¥",
    "Non-breaking\u00a0space, ideographic\u3000space, and en\u2002space",
    "Windows\r\nline endings\r\n",
    "URL: https://example.com/path?query=1&x=y#frag",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHello</s><end_of_turn>\n<start_of_turn>model\n",
    "Some <bos> text with <eos> and <pad> inside",
    "!!!??? ... --- *** ### $$$",
    "",
    " ",
    "\n",
    "The quick brown fox jumps over the lazy dog. " * 8,
]

CHATS = [
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3? Answer in 中文 please 🙂"},
    ],
    [
        {"role": "user", "content": "Hello! Say <|im_start|> back to me."},
    ],
]


def detokenize(vocab, ids, unparse_special):
    n = len(ids)
    arr = (llama_cpp.llama_token * max(n, 1))(*ids)
    size = 64 * n + 64
    buf = ctypes.create_string_buffer(size)
    k = llama_cpp.llama_detokenize(vocab, arr, n, buf, size, False, unparse_special)
    if k < 0:
        raise RuntimeError("detokenize buffer too small")
    return buf.raw[:k].decode("utf-8", "replace")


def hf_render(template, messages, bos, eos):
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def model_record(path):
    m = Llama(model_path=path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(m.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    bos = llama_cpp.llama_vocab_bos(vocab)
    eos = llama_cpp.llama_vocab_eos(vocab)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))

    cases = []
    for i, text in enumerate(TEXTS):
        flags = [(True, False), (True, True)]
        if i % 5 == 0:
            flags.append((False, False))
        for add_special, parse_special in flags:
            ids = m.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
            cases.append({
                "text": text,
                "add_special": add_special,
                "parse_special": parse_special,
                "ids": ids,
                "decoded": detokenize(vocab, ids, False),
                "decoded_special": detokenize(vocab, ids, True),
            })

    record = {
        "file": os.path.basename(path),
        "vocab_size": n_vocab,
        "bos": bos,
        "eos": eos,
        "add_bos": add_bos,
        "eog": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "cases": cases,
        "chats": [],
    }

    template = m.metadata.get("tokenizer.chat_template")
    if template:
        bos_text = detokenize(vocab, [bos], True) if bos >= 0 else ""
        eos_text = detokenize(vocab, [eos], True) if eos >= 0 else ""
        for messages in CHATS:
            rendered = hf_render(template, messages, bos_text, eos_text)
            ids = m.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)
            record["chats"].append({
                "messages": messages,
                "bos_token": bos_text,
                "eos_token": eos_text,
                "rendered": rendered,
                "ids": ids,
            })
    return record


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
        "tokenizer_llamacpp.json")
    fixture = {
        "generator": "tools/make_tokenizer_reference.py",
        "llama_cpp_python": llama_cpp.__version__,
        "models": {
            "smollm2-135m": model_record(sys.argv[1]),
            "gemma3-270m": model_record(sys.argv[2]),
        },
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

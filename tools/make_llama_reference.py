#!/usr/bin/env python3
"""Record llama.cpp's tokens and logits for a GGUF model: the reference our engine is tested against.

Usage (with a Python that has llama-cpp-python and jinja2):

    python tools/make_llama_reference.py MODEL.gguf OUT.json SHORT_NAME [--serial N [--serial-max-tokens M]]

For each of a fixed set of varied prompts it records llama.cpp's tokenization, the top-10 logits at every
prompt position from ONE batched evaluation of the whole prompt (logits_all), and a 32-token greedy
continuation evaluated one token at a time, with the top-10 logits each greedy token was picked from
(greedy_top[0] is the last prompt position). Greedy does not stop at EOS: it is a reference for the math.

`--serial N` also records, for the first N cases of at most `--serial-max-tokens` (64) tokens, the logits of the same top-10 ids from a
one-token-at-a-time evaluation of the prompt (`prompt_top_serial`), to document how far llama.cpp's own
batched and serial evaluations disagree; the maximum absolute difference over the top-5 is printed and stored
as `serial_vs_batched_max_abs_top5`. (Measured with 0.3.36: without flash attention the two disagree by up to
~1 logit, most likely because each quantized matmul first rounds its activations to 8 bits and any tiny difference in
accumulation order flips some of those roundings; with --flash-attn the two paths are bit-identical.)

Chat cases: when the GGUF carries `tokenizer.chat_template`, the messages are rendered with it through
jinja2's ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True), add_generation_prompt=True, and
the vocabulary's bos/eos token texts; without a template (base models such as Gemma 3 270M) a hand-written
Gemma turn format is used. Rendered text is tokenized with special tokens parsed.
"""

import argparse
import json
import sys

import numpy as np

import llama_cpp
from llama_cpp import Llama

N_CTX = 2048
N_GREEDY = 32
TOP = 10

ENGLISH = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt "
    "and wind. Every evening the keeper climbed the spiral stairs, trimmed the wick, and watched the beam "
    "sweep across the dark water. Ships passing in the night never saw him, but they trusted the light, "
    "and that trust was the whole of his work. When the automatic lamp finally arrived, he"
)

CHINESE = "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。这座城市有三千多年的历史，"

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
'''

NUMBERS = "Question: What is 17 * 23?\nAnswer: 17 * 23 = 391.\nQuestion: What is 1234 + 5678?\nAnswer: 1234 + 5678 ="

EMOJI = "I love 🍕 and 🎉! Ça va? Привет, мир. こんにちは世界 👋🏽 naïve café — ½ + ¼ = ¾ ✓"

REPEATED = "red green blue, " * 12 + "red"

ONE_WORD = "Hello"

CHAT = [
    {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France, and what river runs through it?"},
]

# About 700 Gemma tokens (> its 512-token sliding window) and well over 400 SmolLM2 tokens: distinct
# paragraphs, so the model has real context to use rather than a loop.
LONG = """The history of navigation is, in many ways, the history of human curiosity. Long before the invention of the magnetic compass, Polynesian sailors crossed thousands of kilometres of open ocean by reading the swells, the flight paths of birds, and the positions of rising and setting stars. They memorised star compasses, mental maps that divided the horizon into houses where particular stars appeared and disappeared, and they passed this knowledge down through chants and stories rather than written charts.

In the Mediterranean, early sailors mostly kept within sight of land. Coastal piloting relied on landmarks, depth soundings, and an intimate knowledge of local winds. The Greeks and Phoenicians compiled periplus texts, practical guides listing ports, distances, and hazards along the coast. A captain who knew the periplus of a region could move cargo of wine, olive oil, and pottery with reasonable confidence, but venturing far from shore remained dangerous.

The magnetic compass, which appeared in China during the Song dynasty and reached Europe by the twelfth century, changed this balance. Sailors could now hold a heading under overcast skies, and dead reckoning became far more reliable. Combined with improved ship designs such as the carrack and the caravel, the compass helped make the long oceanic voyages of the fifteenth and sixteenth centuries possible. Portuguese expeditions pushed south along the African coast, and within a few decades ships had rounded the Cape of Good Hope and reached India.

Latitude could be measured fairly well by observing the height of the sun at noon or the altitude of the pole star, using instruments such as the astrolabe, the quadrant, and later the sextant. Longitude was much harder. Because the Earth turns fifteen degrees every hour, finding longitude amounts to knowing the time at a reference place while observing local time at sea. Pendulum clocks failed on a rolling deck, and for centuries navigators could only estimate their east-west position, sometimes with disastrous results. In 1707 a British fleet ran aground on the Isles of Scilly, and nearly two thousand sailors drowned.

The British Parliament responded in 1714 with the Longitude Act, offering a large prize for a practical method. Astronomers favoured the lunar distance method, which compared the position of the moon against background stars using published tables. A self-taught clockmaker named John Harrison took another path and spent decades building marine chronometers that kept accurate time despite changes in temperature and the motion of the ship. His fourth timekeeper, a large watch, lost only a few seconds on a voyage to Jamaica.

In the twentieth century radio navigation systems such as LORAN allowed ships and aircraft to fix their positions from the timing of signals sent by shore stations. Today satellites broadcast precise time signals, and a receiver small enough to fit inside a telephone can compute its position within a few metres. Yet many sailors still learn to use a sextant and paper charts, because electronics fail, batteries run flat, and the sky, as the Polynesian navigators knew, is always there. The lesson of this long history is that"""


def cases_for():
    """The prompts, as (name, text, chat) triples; chat prompts have text None."""
    return [
        ("english", ENGLISH, None),
        ("chinese", CHINESE, None),
        ("code", CODE, None),
        ("numbers", NUMBERS, None),
        ("chat", None, CHAT),
        ("long", LONG, None),
        ("one_word", ONE_WORD, None),
        ("emoji_mixed", EMOJI, None),
        ("repeated", REPEATED, None),
    ]


def render_chat(llm, messages, template):
    """The chat prompt text: the GGUF's template when it has one, else Gemma's turn format by hand."""
    if template is None:
        # Gemma 3 base model (no template): system text folds into the first user turn, as Gemma's
        # own template does.
        out = ""
        system = ""
        for m in messages:
            if m["role"] == "system":
                system = m["content"] + "\n\n"
                continue
            role = "model" if m["role"] == "assistant" else m["role"]
            out += f"<start_of_turn>{role}\n{system}{m['content']}<end_of_turn>\n"
            system = ""
        return out + "<start_of_turn>model\n"
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    vocab = llm._model
    bos = vocab.token_get_text(vocab.token_bos())
    eos = vocab.token_get_text(vocab.token_eos())
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def top_pairs(row, k=TOP):
    """Top-k (id, logit) of one logits row, highest first, ties by lower id."""
    row = np.asarray(row, dtype=np.float32)
    idx = np.argpartition(-row, k)[: k * 4] if row.size > 4 * k else np.arange(row.size)
    idx = sorted(idx.tolist(), key=lambda i: (-float(row[i]), i))[:k]
    return [[int(i), round(float(row[i]), 5)] for i in idx]


def eval_batched(llm, ids):
    llm.reset()
    llm.eval(ids)
    # A view, not a copy: a 262k-vocab prompt of 700 tokens is already 700 MB of logits.
    return llm.scores[: len(ids)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("name")
    ap.add_argument("--serial", type=int, default=0, help="cases to also evaluate one token at a time")
    ap.add_argument(
        "--serial-max-tokens",
        type=int,
        default=64,
        help="only cases of at most this many tokens count for --serial (default 64)",
    )
    ap.add_argument(
        "--extra-bufts",
        action="store_true",
        help="let llama.cpp use its extra weight buffer types (AMX, repacked layouts); off by default",
    )
    ap.add_argument(
        "--flash-attn",
        action="store_true",
        help="enable flash attention (llama-cpp-python's default is off; llama.cpp's own CLI defaults to auto)",
    )
    args = ap.parse_args()

    # The portable CPU path: no AMX tiles and no repacked weight layouts, only ggml's plain quantized
    # dot products (and llamafile's sgemm where it applies). AMX also traps (SIGILL) on some VMs whose
    # CPUID advertises it.
    if not args.extra_bufts:
        import llama_cpp.llama_cpp as lib

        default_model_params = lib.llama_model_default_params

        def model_params_without_extra_bufts():
            p = default_model_params()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = model_params_without_extra_bufts

    llm = Llama(
        model_path=args.model,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        logits_all=True,
        n_threads=2,
        n_threads_batch=2,
        seed=0,
        flash_attn=args.flash_attn,
        verbose=False,
    )
    cp = llm.context_params
    template = llm.metadata.get("tokenizer.chat_template")
    vocab = llm._model
    eos = vocab.token_eos()
    bos = vocab.token_bos()

    out = {
        "model": args.name,
        "llama_cpp_python": llama_cpp.__version__,
        "n_ctx": N_CTX,
        "n_batch": N_CTX,
        "n_ubatch": N_CTX,
        "n_threads": 2,
        "flash_attn": {-1: "auto", 0: "disabled", 1: "enabled"}[int(cp.flash_attn_type)],
        "type_k": int(cp.type_k),
        "type_v": int(cp.type_v),
        "kv_type_note": "ggml_type ids (llama.cpp defaults): 0 = F32, 1 = F16",
        "swa_full": bool(getattr(cp, "swa_full", False)),
        "use_extra_bufts": bool(llm.model_params.use_extra_bufts),
        "bos_id": bos,
        "eos_id": eos,
        "greedy_stops_at_eos": False,
        "cases": [],
    }
    serial_figures = []
    for name, text, chat in cases_for():
        rendered = None
        parse_special = False
        if chat is not None:
            rendered = render_chat(llm, chat, template)
            parse_special = True
            src = rendered
        else:
            src = text
        ids = llm.tokenize(src.encode("utf-8"), add_bos=True, special=parse_special)
        plain = llm.tokenize(src.encode("utf-8"), add_bos=False, special=parse_special)
        add_bos = len(ids) == len(plain) + 1 and ids[0] == bos
        if name == "long":
            need = 600 if "gemma" in args.name else 400
            assert len(ids) >= need, f"long prompt has only {len(ids)} tokens, need {need}"

        scores = eval_batched(llm, ids)
        prompt_top = [top_pairs(r) for r in scores]

        greedy, greedy_top = [], []
        row = scores[-1]
        for step in range(N_GREEDY):
            greedy_top.append(top_pairs(row))
            tok = int(np.argmax(row))
            greedy.append(tok)
            if step + 1 < N_GREEDY:
                llm.eval([tok])
                row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

        case = {
            "name": name,
            "text": text,
            "chat": chat,
            "rendered": rendered,
            "add_bos": add_bos,
            "parse_special": parse_special,
            "ids": [int(i) for i in ids],
            "prompt_top": prompt_top,
            "greedy": greedy,
            "greedy_top": greedy_top,
        }

        if len(serial_figures) < args.serial and len(ids) <= args.serial_max_tokens:
            llm.reset()
            rows = []
            for t in ids:
                llm.eval([t])
                rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
            serial = []
            worst = 0.0
            for pos, r in enumerate(rows):
                serial.append([[i, round(float(r[i]), 5)] for i, _ in prompt_top[pos]])
                for (i, lb), (_, ls) in zip(prompt_top[pos][:5], serial[-1][:5]):
                    worst = max(worst, abs(lb - ls))
            case["prompt_top_serial"] = serial
            case["serial_vs_batched_max_abs_top5"] = round(worst, 5)
            serial_figures.append((name, worst))

        out["cases"].append(case)
        print(
            f"{name:12} {len(ids):4} tokens  add_bos={add_bos}  greedy: "
            + repr(llm.detokenize(greedy).decode("utf-8", errors="replace")[:60]),
            file=sys.stderr,
        )

    for name, worst in serial_figures:
        print(f"serial vs batched ({name}): max |diff| over top-5 = {worst:.5f}", file=sys.stderr)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()

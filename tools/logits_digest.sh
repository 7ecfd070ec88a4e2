#!/usr/bin/env bash
# Prints one sha256 per (model, precision, token sequence) of `supernode logits` output, for
# checking that a refactor leaves every logit bit-identical (the JSON holds each f32 in its
# shortest round-trip form, so equal text means equal bits).
#
#   tools/logits_digest.sh path/to/supernode > before.txt   # on the old build
#   tools/logits_digest.sh path/to/supernode > after.txt    # on the new build
#   diff before.txt after.txt
set -euo pipefail
bin=${1:?usage: logits_digest.sh SUPERNODE_BINARY}
root=$(cd "$(dirname "$0")/.." && pwd)
models=()
for m in smollm2-135m gemma3-270m; do
  f="$HOME/.cache/supernode/models/$m.gguf"
  [ -f "$f" ] && models+=("$f")
done
for d in "$root"/tests/fixtures/hf/*/; do models+=("${d%/}"); done
# A short sequence and one longer than a prefill chunk (256) would be slow on real models, so
# use 40 tokens: it spans three KV blocks.
seq40=$(seq -s, 1 40)
for m in "${models[@]}"; do
  for p in exact quantized; do
    for toks in "1,2,3" "$seq40"; do
      d=$("$bin" logits -m "$m" --precision "$p" -t 2 --tokens "$toks" 2>/dev/null | sha256sum | cut -c1-16) || d=ERROR
      echo "$(basename "$m") $p ${#toks} $d"
    done
  done
done

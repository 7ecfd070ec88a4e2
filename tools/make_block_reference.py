#!/usr/bin/env python3
"""Known values of real quantised blocks, decoded by an implementation we did not write.

For every tensor type present in the given GGUF files, takes the first tensor of that type and
records the dequantised values of its first row (up to 512 elements), using the `gguf` Python
package's numpy dequantisers. The Rust kernels' tests hold `dequantize_row` to these values.

Usage: python tools/make_block_reference.py OUT.json MODEL.gguf [MODEL.gguf ...]
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main() -> None:
    out_path, models = sys.argv[1], sys.argv[2:]
    cases = []
    for model in models:
        reader = GGUFReader(model)
        seen = set()
        for t in reader.tensors:
            qtype = t.tensor_type
            if qtype.name in seen:
                continue
            seen.add(qtype.name)
            row = dequantize(t.data, qtype).reshape(-1, int(t.shape[0]))[0]
            n = min(len(row), 512)
            cases.append({
                "model": os.path.basename(model),
                "tensor": t.name,
                "type": qtype.name,
                "values": [float(v) for v in np.asarray(row[:n], dtype=np.float64)],
            })
            print(f"{os.path.basename(model)}: {t.name} {qtype.name} ({n} values)")
    with open(out_path, "w") as f:
        json.dump({"source": "gguf-py dequantize", "cases": cases}, f)


if __name__ == "__main__":
    main()

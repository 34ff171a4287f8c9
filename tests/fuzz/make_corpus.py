#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus: small valid `moe layer` inputs
(f32 and bf16, out_in and in_out layouts, with and without grad_output,
metadata variants) and a few plain safetensors files (every dtype, empty
and strided-looking shapes). Standard library only.

usage: make_corpus.py OUTDIR
"""
import json
import os
import random
import struct
import sys

SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "F64": 8}


def encode(tensors, meta=None, pad=True):
    """tensors: list of (name, dtype, shape); data is random bytes."""
    header, blobs, at = {}, [], 0
    rnd = random.Random(len(tensors) * 7919 + sum(len(n) for n, _, _ in tensors))
    for name, dt, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        if dt in ("F32", "BF16"):
            # small finite values: bf16 is the high half of an f32
            vals = [rnd.uniform(-1, 1) for _ in range(n)]
            raw = struct.pack("<%df" % n, *vals)
            if dt == "BF16":
                raw = b"".join(raw[4 * i + 2:4 * i + 4] for i in range(n))
        else:
            raw = bytes(rnd.getrandbits(8) for _ in range(n * SIZES[dt]))
        header[name] = {"dtype": dt, "shape": list(shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def layer(T, E, H, I, k, dt, layout, grad, meta_extra=None):
    gu = (E, 2 * I, H) if layout == "out_in" else (E, H, 2 * I)
    dn = (E, H, I) if layout == "out_in" else (E, I, H)
    t = [("hidden_states", dt, (T, H)), ("gate.weight", dt, (E, H)),
         ("experts.gate_up_proj", dt, gu), ("experts.down_proj", dt, dn)]
    if grad:
        t.append(("grad_output", dt, (T, H)))
    meta = {"top_k": str(k), "norm_topk_prob": "true"}
    if H in (I, 2 * I):
        meta["gate_up_layout"] = layout
        meta["down_layout"] = layout
    meta.update(meta_extra or {})
    return encode(t, meta)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    files = {
        "layer_f32_oi": layer(3, 4, 8, 3, 2, "F32", "out_in", True),
        "layer_bf16_io": layer(5, 3, 6, 5, 1, "BF16", "in_out", True),
        "layer_f32_io_nograd": layer(2, 2, 4, 2, 2, "F32", "in_out", False,
                                     {"norm_topk_prob": "false"}),
        "layer_f32_ambiguous": layer(1, 2, 4, 2, 1, "F32", "out_in", True),
        "layer_i1": layer(3, 3, 5, 1, 2, "F32", "in_out", True),
        "layer_t0": layer(0, 2, 4, 3, 1, "F32", "out_in", True),
        "plain_dtypes": encode([(d.lower(), d, (2, 3)) for d in SIZES]),
        "plain_empty": encode([("e", "F32", (0, 4)), ("s", "I64", (1,))],
                              {"format": "pt"}),
        "plain_unpadded": encode([("x", "BF16", (3,))], pad=False),
        "plain_nothing": encode([]),
    }
    for name, data in files.items():
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(data)
    print("wrote %d seed files to %s" % (len(files), out))


if __name__ == "__main__":
    main()

"""Minimal safetensors reader/writer for the CLI tests: json + NumPy only.

bf16 travels as uint16 bit patterns; f32 -> bf16 rounds to nearest even.
The writer can also emit deliberately malformed files (raw header bytes,
lying lengths, gaps that misalign tensors) for the error tests.
"""
import json
import struct

import numpy as np

# safetensors dtype name -> (NumPy storage dtype, element size)
_DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
}


def f32_to_bf16_bits(x):
    """float array -> uint16 bf16 bit patterns, round to nearest even."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = 0x7FC0
    return r


def bf16_bits_to_f32(u):
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_round(x):
    """Rounds to bf16 and returns float64 (the exact bf16 values)."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x)).astype(np.float64)


def to_storage(x, dtype):
    """Array of logical values -> bytes of safetensors `dtype`."""
    if dtype == "BF16":
        return f32_to_bf16_bits(x).tobytes()
    return np.ascontiguousarray(x, dtype=_DTYPES[dtype][0]).tobytes()


def encode(tensors, metadata=None, pad=0, header_override=None):
    """Builds a safetensors file.

    tensors: list of (name, dtype, array) or (name, dtype, shape, raw bytes).
    pad: bytes of gap before each tensor (a gap of 1 misaligns every view).
    header_override: callable(header dict) -> dict or bytes, to corrupt it.
    """
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for t in tensors:
        if len(t) == 3:
            name, dt, arr = t
            shape, raw = list(np.shape(arr)), to_storage(arr, dt)
        else:
            name, dt, shape, raw = t
        blobs.append(b"\0" * pad + raw)
        off += pad
        header[name] = {"dtype": dt, "shape": list(shape),
                        "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    if header_override is not None:
        header = header_override(header)
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    if not isinstance(header, bytes):
        hb += b" " * ((8 - len(hb) % 8) % 8)  # data starts 8-aligned
    return struct.pack("<Q", len(hb)) + hb + b"".join(blobs)


def write(path, tensors, metadata=None, **kw):
    data = encode(tensors, metadata, **kw)
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    """Returns ({name: (dtype, array)}, metadata). BF16 arrays come back as
    float32 holding the exact bf16 values; other dtypes in their own type."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n].decode())
    data = buf[8 + n:]
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        dt, shape = e["dtype"], tuple(e["shape"])
        b, end = e["data_offsets"]
        npdt, es = _DTYPES[dt]
        if end - b != int(np.prod(shape)) * es or end > len(data):
            raise ValueError("%s: tensor %s: bad data_offsets" % (path, name))
        a = np.frombuffer(data[b:end], dtype=npdt).reshape(shape)
        if dt == "BF16":
            a = bf16_bits_to_f32(a).reshape(shape)
        out[name] = (dt, a.copy())
    return out, meta

"""Checkpoint tensors shared by the policy decoder and the retrieval encoder: memory-mapped safetensors
reading and writing (header parsed here, so bf16 works through ml_dtypes without torch) and the
parameter initialiser of a randomly built model.

Kept apart from both models so the retrieval server can load BERT weights without the decoder's code.
"""

from __future__ import annotations

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


def init_param(kind: str, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """ "ones", "zeros", or "normal" (std 0.02, as HF's initializer_range) parameter values."""
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ---------------------------------------------------------------------------- safetensors


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFolder:
    """Lazy, memory-mapped access to every tensor of a `model.safetensors` or sharded checkpoint."""

    def __init__(self, path: str):
        single, index = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: missing 'weight_map'")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = [SAFETENSORS_FILE]
        else:
            raise FileNotFoundError(f"no weights in {path}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index} lists {name}, which is missing from {path}")
            header, offset = _read_header(file)
            for key, info in header.items():
                self._entries[key] = (file, info, offset)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][1]["shape"])

    def get(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint")
        file, info, offset = self._entries[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {key!r} in {file}: unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = (end - start) // dtype.itemsize
        return np.memmap(file, dtype=dtype, mode="r", offset=offset + start, shape=(count,)).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file (any numpy dtype incl. ml_dtypes bf16), atomically."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[key] = {
            "dtype": _DTYPE_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)

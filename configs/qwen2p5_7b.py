"""REX-RAG on Qwen2.5-7B (base): the 3B recipe (the authors ship no 7B script; their 7B evaluation used
keep_ratio 0.12, which we adopt: docs/algorithm.md#reference-code-quirks, item 14). Same flags to set as
configs/qwen2p5_3b.py, and the same `:SLICE` suffix (v5p-8, v5p-16, v5p-32, v6e-8, v6e-16) for a TPU
slice's mesh and batch sizes."""

import ml_collections

from rexrag_jax.config import default_config, model_arch
from rexrag_jax.planning.slices import apply_recipe

MODEL = "qwen2.5-7b"


def get_config(slice_name: str = "") -> ml_collections.ConfigDict:
    c = default_config()
    c.model.arch = model_arch(MODEL)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.probes.keep_ratio = 0.12
    if slice_name:
        apply_recipe(c, MODEL, slice_name)
    return c

"""The paper's run (docs/algorithm.md#constants): REX-RAG on Qwen2.5-3B (base), NQ + HotpotQA, 1005 steps.

Set `--config.model.path` (a local HF Qwen2.5-3B directory), `--config.data.train_file` and one retrieval
source (`--config.retrieval.url=http://host:8000` for a `rexrag-retrieve serve` of the e5 wiki-18 index).
`configs/qwen2p5_3b.py:SLICE` (v5p-8, v5p-16, v5p-32, v6e-8, v6e-16) sets the mesh, micro-batch and rollout
session size of that TPU slice (`rexrag_jax/planning/slices.py`, with its per-device memory estimate); without
a slice every chip is on FSDP.
"""

import ml_collections

from rexrag_jax.config import default_config, model_arch
from rexrag_jax.planning.slices import apply_recipe

MODEL = "qwen2.5-3b"


def get_config(slice_name: str = "") -> ml_collections.ConfigDict:
    c = default_config()
    c.model.arch = model_arch(MODEL)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    if slice_name:
        apply_recipe(c, MODEL, slice_name)
    return c

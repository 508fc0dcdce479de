"""The paper's run (spec §5): REX-RAG on Qwen2.5-3B (base), NQ + HotpotQA, 1005 steps.

Set `--config.model.path` (a local HF Qwen2.5-3B directory), `--config.data.train_file` and one retrieval
source (`--config.retrieval.url=http://host:8000` for a `rexrag-retrieve serve` of the e5 wiki-18 index).
The mesh puts every chip on FSDP; on a v5p-8 / v6e-8 slice that is 4 / 8 ways.
"""

import ml_collections

from rexrag_jax.rl.config import default_config, model_arch


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model.arch = model_arch("qwen2.5-3b")
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c

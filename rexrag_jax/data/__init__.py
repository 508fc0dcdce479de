"""Training and evaluation data: QA examples and their readers, TFDS builds, the agent's prompt, and
resumable batch iterators.

`build_dataset`, `load_split` (TFDS) and `TrainBatches` (grain) are imported on first use, so importing this
package stays cheap.
"""

from rexrag_jax.data.prompts import build_prompt, normalize_question, prompt_ids
from rexrag_jax.data.questions import QAExample
from rexrag_jax.data.readers import (QADataError, ReadReport, read_flashrag_jsonl, read_qa_file,
                                     read_search_r1_parquet)

_LAZY = {
    "TrainBatches": "rexrag_jax.data.pipeline",
    "EVAL_DATASETS": "rexrag_jax.data.tfds_builders",
    "TRAIN_MIX": "rexrag_jax.data.tfds_builders",
    "QASource": "rexrag_jax.data.tfds_builders",
    "build_dataset": "rexrag_jax.data.tfds_builders",
    "built_splits": "rexrag_jax.data.tfds_builders",
    "flashrag_split_file": "rexrag_jax.data.tfds_builders",
    "flashrag_train_files": "rexrag_jax.data.tfds_builders",
    "load_split": "rexrag_jax.data.tfds_builders",
}

__all__ = ["QADataError", "QAExample", "ReadReport", "build_prompt", "normalize_question",
           "prompt_ids", "read_flashrag_jsonl", "read_qa_file", "read_search_r1_parquet",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

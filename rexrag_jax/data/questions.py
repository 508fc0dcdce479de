"""The QA example: one question with its golden answers, as every reader, builder and pipeline passes it.

Files are read by `rexrag_jax.data.readers` (FlashRAG JSONL, Search-R1 parquet), built into TFDS datasets
by `tfds_builders` and batched per host by `pipeline.TrainBatches`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    golden_answers: tuple[str, ...]
    source: str = ""  # the dataset the row came from ("nq", "hotpotqa", ...); "" when unknown

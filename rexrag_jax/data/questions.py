"""QA examples from FlashRAG-style JSONL and a seeded, resumable iterator over batches of them.

Rows are `{"id", "question", "golden_answers": [...]}` (other fields ignored). The iterator's state is
two integers (epoch, position), saved in every checkpoint, so a restarted run sees the same batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    golden_answers: tuple[str, ...]


def _bad(path: str, line: int, why: str) -> ValueError:
    return ValueError(f"{path}:{line}: {why}")


def read_qa_jsonl(path: str) -> list[QAExample]:
    """Every row of a QA JSONL file; a malformed row raises naming the file and line."""
    out: list[QAExample] = []
    seen: dict[str, int] = {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FileNotFoundError(f"QA file {path}: {e.strerror}") from e
    with f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise _bad(path, line_no, f"not UTF-8 ({e.reason} at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise _bad(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise _bad(path, line_no, f"expected a JSON object, got {type(row).__name__}")
            missing = [k for k in ("id", "question", "golden_answers") if k not in row]
            if missing:
                raise _bad(path, line_no, f"missing field(s) {missing}")
            golds = row["golden_answers"]
            if isinstance(golds, str):
                golds = [golds]
            if not isinstance(golds, list) or not golds or not all(isinstance(g, str) and g.strip() for g in golds):
                raise _bad(path, line_no, f"golden_answers must be a non-empty list of non-empty strings, got {golds!r}")
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise _bad(path, line_no, "question must be a non-empty string")
            qid = str(row["id"])
            if qid in seen:
                raise _bad(path, line_no, f"duplicate id {qid!r} (first at line {seen[qid]})")
            seen[qid] = line_no
            out.append(QAExample(qid, row["question"], tuple(golds)))
    if not out:
        raise ValueError(f"QA file {path} has no rows")
    return out


class QuestionBatches:
    """Batches of `batch_size` example indices, reshuffled every epoch with `seed` (a batch never spans
    two epochs: the tail of an epoch that does not fill a batch is dropped)."""

    def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or batch_size > num_examples:
            raise ValueError(f"batch_size {batch_size} must be in [1, {num_examples}] (the number of examples)")
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        if self.position + self.batch_size > self.num_examples:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order(self.epoch)[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return [int(i) for i in batch]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": self.num_examples}

    def set_state(self, state: dict) -> None:
        if state.get("num_examples", self.num_examples) != self.num_examples:
            raise ValueError(f"data iterator state is for {state['num_examples']} examples, this dataset has "
                             f"{self.num_examples}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

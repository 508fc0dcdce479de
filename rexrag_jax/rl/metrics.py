"""Per-step metrics as JSONL and TensorBoard event files, written by process 0 only.

On resume, JSONL rows past the restored step (written before a crash, then recomputed) are dropped,
so the file holds each step once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _jsonable(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, (bool, int)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """`write(step, metrics)` appends one JSON line and TensorBoard scalars under `workdir`."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def _truncate_after(self, step: int | None) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip()]
        keep = []
        for line in rows:
            try:
                row_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a crash
            if step is not None and row_step <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

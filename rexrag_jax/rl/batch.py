"""Trajectories -> padded `[N, T]` arrays for the jitted log-prob and update kernels (host side).

Rows are right-padded to a length bucket (a multiple of `length_multiple`) and their count to a multiple
of the micro-batch, so a run compiles a handful of shapes. Everything the loss needs per token comes from
the rollout's segment labels: the loss mask (model tokens and probe prompts), the probe-prompt mask and
the trie conditionals U recorded when a probe's prompt was inserted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from rexrag_jax.rollout import protocol as P


@dataclass
class PackedBatch:
    """Per-token `[N, T]` and per-row `[N]` arrays of a list of trajectories (padding rows are all-False)."""

    tokens: np.ndarray  # int32 [N, T]
    valid: np.ndarray  # bool: real token (prompt or response)
    loss_mask: np.ndarray  # bool: segments MODEL and PROBE_PROMPT
    prompt_mask: np.ndarray  # bool: segment PROBE_PROMPT (the inserted exploratory prompt)
    conditionals: np.ndarray  # float32: trie conditional U on prompt-mask tokens, 1 elsewhere
    response_start: np.ndarray  # int32 [N]: first token after the prompt
    probe_start: np.ndarray  # int32 [N]: first probe-prompt token (= response_start for originals)
    is_probe: np.ndarray  # bool [N]
    group_ids: np.ndarray  # int32 [N]
    num_rows: int  # real rows; the rest is padding

    def rows(self, start: int, stop: int) -> "PackedBatch":
        """Rows [start, stop) (padding included when past `num_rows`)."""
        arrays = {f.name: getattr(self, f.name)[start:stop] for f in fields(self) if f.name != "num_rows"}
        return PackedBatch(**arrays, num_rows=max(0, min(stop, self.num_rows) - start))

    def select(self, indices: Sequence[int], row_multiple: int = 1) -> "PackedBatch":
        """The given rows, in order, padded with empty rows to a multiple of `row_multiple`."""
        indices = np.asarray(indices, np.int64)
        n = round_up(len(indices), row_multiple)
        out = {}
        for name, x in self.arrays().items():
            pad = np.zeros((n - len(indices), *x.shape[1:]), x.dtype)
            if name == "conditionals":
                pad[...] = 1.0
            elif name == "group_ids":
                pad[...] = -1
            out[name] = np.concatenate([x[indices], pad])
        return PackedBatch(**out, num_rows=len(indices))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "num_rows"}


def round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


PROMPT_PROBABILITIES = ("trie", "first_token")


def pack_trajectories(trajectories: Sequence, *, length_multiple: int = 128, row_multiple: int = 1,
                      min_rows: int = 0, prompt_probability: str = "trie") -> PackedBatch:
    """Pack `rollout.Trajectory` objects (tokens, segments, prompt_length, is_probe, probe_start,
    probe_conditionals, prompt_index) into padded arrays.

    `prompt_probability` is the probe policy's law of an exploratory prompt's tokens
    (docs/algorithm.md#probe-policy-probability): "trie" (the authors' active code: each token's trie
    conditional U) or "first_token" (their commented-out alternative: the prompt's whole probability on its
    first token, 1 after it). Same product per prompt, different per-token ratios and clipping."""
    if prompt_probability not in PROMPT_PROBABILITIES:
        raise ValueError(f"prompt_probability={prompt_probability!r}; expected one of {PROMPT_PROBABILITIES}")
    n = round_up(max(len(trajectories), min_rows), row_multiple)
    t = round_up(max((len(tr.tokens) for tr in trajectories), default=1), length_multiple)
    tokens = np.zeros((n, t), np.int32)
    segments = np.full((n, t), -1, np.int8)
    conditionals = np.ones((n, t), np.float32)
    response_start = np.zeros(n, np.int32)
    probe_start = np.zeros(n, np.int32)
    is_probe = np.zeros(n, bool)
    group_ids = np.full(n, -1, np.int32)
    for i, tr in enumerate(trajectories):
        length = len(tr.tokens)
        if len(tr.segments) != length:
            raise ValueError(f"trajectory {i}: {len(tr.segments)} segment labels for {length} tokens")
        tokens[i, :length] = tr.tokens
        segments[i, :length] = tr.segments
        response_start[i] = probe_start[i] = tr.prompt_length
        group_ids[i] = tr.prompt_index
        if tr.is_probe:
            is_probe[i] = True
            probe_start[i] = tr.probe_start
            u = np.asarray(tr.probe_conditionals, np.float64)
            if prompt_probability == "first_token" and len(u):
                u = np.concatenate([[np.prod(u)], np.ones(len(u) - 1)])
            conditionals[i, tr.probe_start: tr.probe_start + len(u)] = u
            inserted = int(np.sum(segments[i] == P.PROBE_PROMPT))
            if inserted != len(u):
                raise ValueError(f"trajectory {i}: {inserted} probe-prompt tokens but {len(u)} conditionals")
    return PackedBatch(
        tokens=tokens, valid=segments >= 0, loss_mask=np.isin(segments, P.LOSS_SEGMENTS),
        prompt_mask=segments == P.PROBE_PROMPT, conditionals=conditionals, response_start=response_start,
        probe_start=probe_start, is_probe=is_probe, group_ids=group_ids, num_rows=len(trajectories))

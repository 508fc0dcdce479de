"""The typed train batch, and trajectories -> padded `[N, T]` arrays for the log-prob and update kernels.

Rows are right-padded to a length bucket (a multiple of `length_multiple`) and their count to a multiple
of the micro-batch, so a run compiles a handful of shapes. Everything the loss needs per token comes from
the rollout's segment labels: the loss mask (model tokens and probe prompts), the probe-prompt mask and
the trie conditionals U recorded when a probe's prompt was inserted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import numpy as np

from rexrag_jax import protocol as P
from rexrag_jax.config import choices


@flax.struct.dataclass
class TrainBatch:
    """The training batch as one pytree: per-token `[N, T]` and per-row `[N]` arrays (host numpy until the
    kernels put them on the mesh). Padding rows are all-False with conditionals 1 and group id -1.

    `pack_trajectories` fills what the rollout knows; the trainer adds the old and reference log-probs and
    the advantages (`replace`). An SFT batch needs only tokens, valid and loss_mask.
    """

    tokens: Any  # int32 [N, T]
    valid: Any  # bool: real token (prompt or response)
    loss_mask: Any  # bool: tokens the loss covers (RL: segments MODEL and PROBE_PROMPT)
    prompt_mask: Any = None  # bool: segment PROBE_PROMPT (the inserted exploratory prompt)
    conditionals: Any = None  # float32: trie conditional U on prompt-mask tokens, 1 elsewhere
    response_start: Any = None  # int32 [N]: first token after the prompt
    probe_start: Any = None  # int32 [N]: first probe-prompt token (= response_start for originals)
    is_probe: Any = None  # bool [N]
    group_ids: Any = None  # int32 [N]: the prompt a row answers (probes share their source's)
    old_logprobs: Any = None  # float32 [N, T]: the rollout policy's log-probs (PPO "old")
    ref_logprobs: Any = None  # float32 [N, T]: the frozen reference policy's (KL penalty)
    advantages: Any = None  # float32 [N]
    num_rows: int = flax.struct.field(pytree_node=False, default=0)  # real rows; the rest is padding

    def rows(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop) (padding included when past `num_rows`)."""
        return jax.tree.map(lambda x: x[start:stop], self).replace(num_rows=max(0, min(stop, self.num_rows) - start))

    def take(self, indices: Sequence[int]) -> TrainBatch:
        """Rows at `indices` (repeats allowed), counted as real."""
        indices = np.asarray(indices, np.int64)
        return jax.tree.map(lambda x: x[indices], self).replace(num_rows=len(indices))

    def select(self, indices: Sequence[int], row_multiple: int = 1) -> TrainBatch:
        """The given rows, in order, padded with empty rows to a multiple of `row_multiple`."""
        indices = np.asarray(indices, np.int64)
        n = round_up(len(indices), row_multiple)
        padding = {"conditionals": 1.0, "group_ids": -1}

        def pad(path, x):
            fill = np.full((n - len(indices), *x.shape[1:]), padding.get(path[0].name, 0), x.dtype)
            return np.concatenate([x[indices], fill])

        return jax.tree_util.tree_map_with_path(pad, self).replace(num_rows=len(indices))


def round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


PROMPT_PROBABILITIES = choices("probes.prompt_probability")


def pack_trajectories(
    trajectories: Sequence,
    *,
    length_multiple: int = 128,
    row_multiple: int = 1,
    min_rows: int = 0,
    prompt_probability: str = "trie",
) -> TrainBatch:
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
            conditionals[i, tr.probe_start : tr.probe_start + len(u)] = u
            inserted = int(np.sum(segments[i] == P.PROBE_PROMPT))
            if inserted != len(u):
                raise ValueError(f"trajectory {i}: {inserted} probe-prompt tokens but {len(u)} conditionals")
    return TrainBatch(
        tokens=tokens,
        valid=segments >= 0,
        loss_mask=np.isin(segments, P.LOSS_SEGMENTS),
        prompt_mask=segments == P.PROBE_PROMPT,
        conditionals=conditionals,
        response_start=response_start,
        probe_start=probe_start,
        is_probe=is_probe,
        group_ids=group_ids,
        num_rows=len(trajectories),
    )

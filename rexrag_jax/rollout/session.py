"""Host mirror of a `DecodeState`: the thin stateful layer between the kernels and the protocol.

The host owns the truth: every row's full context as a token list. The device cache holds a prefix of
it (`cached[b]` tokens) and the context's last token is `pending`. Editing a context (appending an
observation, replacing a turn's sampled tokens by their re-encoding, rolling a probe back to before a
turn) is a list edit plus `truncate`; `commit` then writes only what the cache lacks, so the KV of
the unchanged prefix is reused and nothing is re-read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rexrag_jax.distributed import tree_to_host
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rollout import kernels
from rexrag_jax.rollout.stops import StopTable


def pow2_bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at `maximum`."""
    b = max(minimum, 1)
    while b < n:
        b *= 2
    return b if maximum is None else min(b, maximum)


def geometric_buckets(smallest: int, largest: int, factor: int = 4) -> tuple[int, ...]:
    """`smallest * factor**i` below `largest`, then `largest`: few shapes, at most `factor`x padding."""
    out, b = [], smallest
    while b < largest:
        out.append(b)
        b *= factor
    return (*out, largest)


def bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, caller: str) -> None:
    """Every prompt non-empty, every id a valid row of the embedding table; errors name prompt and ids."""
    for i, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"{caller}: prompt {i} is empty")
        bad = [int(t) for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{caller}: prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


@dataclass
class ChunkResult:
    """What one `decode` call produced for one row."""

    tokens: list[int]
    logprobs: list[float]
    ended: bool  # the row's turn is over (stop matched or budget spent)
    stop: int  # index into the StopTable that matched, or kernels.NO_STOP


class DecodeSession:
    """`num_rows` rows of at most `max_length` context tokens each, decoded with `stops`."""

    def __init__(
        self,
        model: Decoder,
        num_rows: int,
        max_length: int,
        stops: StopTable,
        *,
        chunk: int = 32,
        prefill_chunk: int = 512,
        prefill_rows: int = 8,
        seed: int = 0,
        cache_dtype: str | None = None,
        params=None,
    ):
        """`params`: the parameters to decode with (default: the model's own); `model` gives graph and mesh."""
        self.model = model
        graphdef, own = nnx.split(model)
        self.graph = (graphdef, own if params is None else params)
        self.num_rows, self.max_length = num_rows, max_length
        self.prefill_chunk = pow2_bucket(prefill_chunk)
        # The only shapes the kernels ever see, so compiles are bounded and all happen in `warmup`. Prefill
        # takes at most `prefill_rows` x `prefill_chunk` tokens per call (its attention scores are
        # rows x heads x tokens x window); both kernels attend only to a prefix (window) of the cache long
        # enough for the longest row involved, since reading the cache is what bounds decoding.
        self.prefill_rows = min(prefill_rows, num_rows)
        self.row_buckets = geometric_buckets(1, self.prefill_rows)
        self.token_buckets = geometric_buckets(min(16, self.prefill_chunk), self.prefill_chunk)
        self.prefill_windows = geometric_buckets(min(256, max_length), max_length, factor=4)
        self.windows = geometric_buckets(min(256, max_length), max_length, factor=2)
        self.active = np.zeros(num_rows, bool)
        mesh = model.mesh
        self.state = kernels.init_state(
            model, num_rows, max_length, stops.num_stops, chunk=chunk, seed=seed, mesh=mesh, cache_dtype=cache_dtype
        )
        replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self.stop_table = jax.device_put(np.asarray(stops.table), replicated)
        self.stop_accept = jax.device_put(np.asarray(stops.accept), replicated)
        self.context: list[list[int]] = [[] for _ in range(num_rows)]
        self.cached = np.zeros(num_rows, np.int64)
        self.prefilled_tokens = 0  # tokens written by commit (prefill work), for benchmarks

    # ------------------------------------------------------------------ host-side edits

    def set_sampling(self, temperature, top_p=1.0, top_k=0) -> None:
        """Scalars or per-row sequences."""
        self.state = kernels.set_sampling(self.state, temperature, top_p, top_k)

    def truncate(self, row: int, length: int) -> None:
        """Cut row's context to its first `length` tokens; the cache keeps what is still valid."""
        del self.context[row][length:]
        self.cached[row] = min(self.cached[row], length)

    def copy_row(self, srcs: Sequence[int], dsts: Sequence[int]) -> None:
        """Copy contexts and cache rows (used to fan a prefilled prompt out to its group)."""
        if not dsts:
            return
        size = pow2_bucket(len(dsts), maximum=self.num_rows)  # one size per group configuration
        src = np.zeros(size, np.int32)
        dst = np.full(size, self.num_rows, np.int32)
        src[: len(srcs)], dst[: len(dsts)] = srcs, dsts
        self.state = kernels.copy_rows(self.state, src, dst)
        for s, d in zip(srcs, dsts):
            self.context[d] = list(self.context[s])
            self.cached[d] = self.cached[s]

    # ------------------------------------------------------------------ device work

    def commit(self, rows: Sequence[int], budgets: Sequence[int], activate: Sequence[bool]) -> None:
        """Write each row's uncached context (except its last token, which becomes pending) and start a
        turn with `budgets[i]` tokens. Rows go in groups of at most `prefill_rows` (similar lengths
        together), each in bucketed chunks of at most `prefill_chunk` tokens."""
        if not rows:
            return
        starts, remaining, settings = {}, {}, {}
        for r, budget, act in zip(rows, budgets, activate):
            ctx = self.context[r]
            if not ctx:
                raise ValueError(f"row {r}: cannot start a turn with an empty context")
            if len(ctx) - 1 + budget > self.max_length:
                raise ValueError(f"row {r}: context {len(ctx)} + budget {budget} exceeds max_length {self.max_length}")
            starts[r] = min(int(self.cached[r]), len(ctx) - 1)
            remaining[r] = ctx[starts[r] : -1]
            settings[r] = (budget, act)
        order = sorted(settings, key=lambda r: -len(remaining[r]))
        for g in range(0, len(order), self.prefill_rows):
            todo = order[g : g + self.prefill_rows]
            while todo:
                self._write(todo, starts, remaining, settings)
                todo = [r for r in todo if remaining[r]]
        for r, (_, act) in settings.items():
            self.cached[r] = len(self.context[r]) - 1
            self.active[r] = act

    def _write(self, todo: list[int], starts: dict, remaining: dict, settings: dict) -> None:
        """One `write_rows` call: the next chunk of each row in `todo` (advances `starts`/`remaining`)."""
        width = bucket(max(len(remaining[r]) for r in todo), self.token_buckets)
        size = bucket(len(todo), self.row_buckets)
        idx = np.full(size, self.num_rows, np.int32)
        tokens = np.zeros((size, width), np.int32)
        count, start, pending, budget = (np.zeros(size, np.int32) for _ in range(4))
        active = np.zeros(size, bool)
        for i, r in enumerate(todo):
            piece = remaining[r][:width]
            idx[i], count[i], start[i] = r, len(piece), starts[r]
            tokens[i, : len(piece)] = piece
            pending[i] = self.context[r][-1]
            budget[i], active[i] = settings[r]
            starts[r] += len(piece)
            remaining[r] = remaining[r][width:]
        window = bucket(int((start + count).max()), self.prefill_windows)
        self.state = kernels.write_rows(
            self.model, self.state, idx, tokens, count, start, pending, budget, active, window=window, graph=self.graph
        )
        self.prefilled_tokens += int(count.sum())

    def warmup(self) -> None:
        """Compile every prefill bucket and the decode loop now (padding rows only: nothing changes), so a
        rollout never stops to compile halfway."""
        for size in self.row_buckets:
            for width in self.token_buckets:
                for window in self.prefill_windows:
                    idx = np.full(size, self.num_rows, np.int32)
                    zeros = np.zeros(size, np.int32)
                    self.state = kernels.write_rows(
                        self.model,
                        self.state,
                        idx,
                        np.zeros((size, width), np.int32),
                        zeros,
                        zeros,
                        zeros,
                        zeros,
                        zeros.astype(bool),
                        window=window,
                        graph=self.graph,
                    )
        for window in self.windows:
            self.state = kernels.decode_chunk(
                self.model, self.state, self.stop_table, self.stop_accept, window=window, graph=self.graph
            )

    def decode(self) -> dict[int, ChunkResult]:
        """One `decode_chunk` call; appends the sampled tokens to the contexts and returns them per row."""
        longest = int(self.cached[self.active].max(initial=0)) + self.state.chunk
        self.state = kernels.decode_chunk(
            self.model,
            self.state,
            self.stop_table,
            self.stop_accept,
            window=bucket(longest, self.windows),
            graph=self.graph,
        )
        s = self.state
        tokens, logprobs, count, hit, active = tree_to_host(  # every process reads all rows (multi-host)
            (s.out_tokens, s.out_logprobs, s.out_count, s.stop_hit, s.active)
        )
        results = {}
        for r in np.flatnonzero(count):
            n = int(count[r])
            new = tokens[r, :n].tolist()
            self.context[r].extend(new)
            self.cached[r] += n
            results[int(r)] = ChunkResult(new, logprobs[r, :n].tolist(), not bool(active[r]), int(hit[r]))
        self.active &= active
        return results

    def any_active(self) -> bool:
        return bool(self.active.any())

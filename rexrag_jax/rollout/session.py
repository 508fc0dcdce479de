"""Host mirror of a `DecodeState`: the thin stateful layer between the kernels and the protocol.

The host owns the truth: every row's full context as a token list. The device cache holds a prefix of
it (`cached[b]` tokens) and the context's last token is `pending`. Editing a context (appending an
observation, replacing a turn's sampled tokens by their re-encoding, rolling a probe back to before a
turn) is a list edit plus `truncate`; `commit` then writes only what the cache lacks, so the KV of
the unchanged prefix is reused and nothing is re-read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rexrag_jax.distributed import tree_to_host
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rollout import kernels
from rexrag_jax.rollout.pages import PagesExhausted, ShardedPages
from rexrag_jax.rollout.stops import StopTable
from rexrag_jax.sharding import batch_shards


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
    """`num_rows` rows of at most `max_length` context tokens each, decoded with `stops`.

    The KV cache is paged (`models/kv_cache.py`): `page_size` tokens per page (default `max_length`: one
    contiguous page per row) and `num_pages` pages in all (default: every row's full length, so nothing ever
    waits). With fewer pages a row holds only what it fills: `commit` returns the rows that found no pages
    (they wait, unchanged), and `decode` pauses rows that cannot get pages for their next chunk; rows give
    pages back with `release`."""

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
        page_size: int | None = None,
        num_pages: int | None = None,
    ):
        """`params`: the parameters to decode with (default: the model's own); `model` gives graph and mesh."""
        self.model = model
        graphdef, own = nnx.split(model)
        self.graph = (graphdef, own if params is None else params)
        self.num_rows, self.max_length = num_rows, max_length
        self.prefill_chunk = pow2_bucket(prefill_chunk)
        mesh = model.mesh
        shards = batch_shards(mesh)
        page_size = min(int(page_size or max_length), max_length)
        max_pages = -(-max_length // page_size)
        per_shard = num_rows // shards * max_pages if num_pages is None else -(-int(num_pages) // shards)
        self.pages = ShardedPages(num_rows, shards, per_shard, page_size, max_pages)
        # The only shapes the kernels ever see, so compiles are bounded and all happen in `warmup`. Prefill
        # takes at most `prefill_rows` x `prefill_chunk` tokens per call (its attention scores are
        # rows x heads x tokens x window), the rows spread over the row shards; both kernels attend only to a
        # prefix (window) of the cache long enough for the longest row involved, since reading the cache is
        # what bounds decoding.
        self.prefill_rows = max(1, min(prefill_rows, num_rows) // shards)  # per shard and call
        self.row_buckets = geometric_buckets(1, self.prefill_rows)
        self.token_buckets = geometric_buckets(min(16, self.prefill_chunk), self.prefill_chunk)
        self.prefill_windows = geometric_buckets(min(256, max_length), max_length, factor=4)
        self.windows = geometric_buckets(min(256, max_length), max_length, factor=2)
        self.active = np.zeros(num_rows, bool)
        self.budget = np.zeros(num_rows, np.int64)  # tokens each row may still sample in its turn
        self.state = kernels.init_state(
            model,
            num_rows,
            max_length,
            stops.num_stops,
            chunk=chunk,
            seed=seed,
            mesh=mesh,
            cache_dtype=cache_dtype,
            page_size=page_size,
            pages_per_shard=per_shard,
        )
        self._table_changed = True
        replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self.stop_table = jax.device_put(np.asarray(stops.table), replicated)
        self.stop_accept = jax.device_put(np.asarray(stops.accept), replicated)
        self.context: list[list[int]] = [[] for _ in range(num_rows)]
        self.cached = np.zeros(num_rows, np.int64)
        self.prefilled_tokens = 0  # tokens written by commit (prefill work), for benchmarks
        self.page_copies = 0  # pages copied on write, for benchmarks
        self.waiting: list[int] = []  # active rows the last `decode` paused for want of free pages

    # ------------------------------------------------------------------ host-side edits

    def set_sampling(self, temperature, top_p=1.0, top_k=0) -> None:
        """Scalars or per-row sequences."""
        self.state = kernels.set_sampling(self.state, temperature, top_p, top_k)

    def truncate(self, row: int, length: int) -> None:
        """Cut row's context to its first `length` tokens; the cache keeps what is still valid."""
        del self.context[row][length:]
        self.cached[row] = min(self.cached[row], length)

    def shard_of(self, row: int) -> int:
        return self.pages.shard_of(row)

    def copy_row(self, srcs: Sequence[int], dsts: Sequence[int]) -> None:
        """Row `dsts[i]` continues from row `srcs[i]`: it gets the context and, in the same row shard, shares
        the cached prefix's KV pages until it writes into one (a prompt prefilled once fans out to its
        group). Pages never cross devices: a row in another shard is prefilled again by its `commit`."""
        for s, d in zip(srcs, dsts):
            if self.shard_of(s) == self.shard_of(d):
                self.pages.share(s, [d], int(self.cached[s]))
                self.cached[d] = self.cached[s]
            else:
                self.pages.release(d)
                self.cached[d] = 0
            self.context[d] = list(self.context[s])
        self._table_changed = True

    def release(self, row: int) -> None:
        """A finished row gives its KV pages back; its context stays readable, its cache is gone."""
        self.pages.release(row)
        self.cached[row] = 0
        self.active[row] = False
        self._table_changed = True

    # ------------------------------------------------------------------ pages

    def _reserve(self, rows, length_of, rollback: bool) -> list[int]:
        """Give each row pages for `length_of(row)` tokens, first rolling it back to its cached length (what
        lies past it is stale) with `rollback`; apply the copy-on-write copies. Returns the rows that did
        not fit (they keep the pages of their cached tokens)."""
        copies, failed = [], []
        for r in rows:
            if rollback:
                self.pages.extend(r, int(self.cached[r]))
            elif self.pages.length(r) >= length_of(r):
                continue
            try:
                copies += self.pages.extend(r, length_of(r))
            except PagesExhausted:
                failed.append(r)
            self._table_changed = True
        if copies:
            shards = len(self.pages.tables)
            width = pow2_bucket(max(Counter(s for s, _, _ in copies).values()))
            src = np.zeros((shards, width), np.int32)
            dst = np.full((shards, width), self.pages.tables[0].num_pages, np.int32)  # padding: skipped
            filled = np.zeros(shards, int)
            for s, a, b in copies:
                src[s, filled[s]], dst[s, filled[s]] = a, b
                filled[s] += 1
            self.state = kernels.copy_pages(self.state, src, dst)
            self.page_copies += len(copies)
        return failed

    def _sync_table(self) -> None:
        if self._table_changed:
            self.state = kernels.set_table(self.state, self.pages.table())
            self._table_changed = False

    # ------------------------------------------------------------------ device work

    def commit(self, rows: Sequence[int], budgets: Sequence[int], activate: Sequence[bool]) -> list[int]:
        """Write each row's uncached context (except its last token, which becomes pending) and start a
        turn with `budgets[i]` tokens. Rows go in groups of at most `prefill_rows` per row shard (similar
        lengths together), each in bucketed chunks of at most `prefill_chunk` tokens. Returns the rows that
        found no free KV pages: they are unchanged (commit them again once other rows `release`)."""
        if not rows:
            return []
        starts, remaining, settings = {}, {}, {}
        for r, budget, act in zip(rows, budgets, activate):
            ctx = self.context[r]
            if not ctx:
                raise ValueError(f"row {r}: cannot start a turn with an empty context")
            if len(ctx) - 1 + budget > self.max_length:
                raise ValueError(f"row {r}: context {len(ctx)} + budget {budget} exceeds max_length {self.max_length}")
            self.cached[r] = min(int(self.cached[r]), len(ctx) - 1)
            starts[r] = int(self.cached[r])
            remaining[r] = ctx[starts[r] : -1]
            settings[r] = (budget, act)
        failed = self._reserve(list(settings), lambda r: len(self.context[r]) - 1, rollback=True)
        for r in failed:
            del settings[r]
        self._sync_table()
        queues = [[] for _ in self.pages.tables]
        for r in sorted(settings, key=lambda r: -len(remaining[r])):
            queues[self.shard_of(r)].append(r)
        while any(queues):
            todo = [q[: self.prefill_rows] for q in queues]
            self._write(todo, starts, remaining, settings)
            queues = [[r for r in b if remaining[r]] + q[len(b) :] for b, q in zip(todo, queues)]
        for r, (budget, act) in settings.items():
            self.cached[r] = len(self.context[r]) - 1
            self.active[r], self.budget[r] = act, budget
        return failed

    def _write(self, todo: list[list[int]], starts: dict, remaining: dict, settings: dict) -> None:
        """One `write_rows` call: the next chunk of each row in `todo[shard]` (advances `starts`/`remaining`)."""
        busy = [r for rows in todo for r in rows]
        width = bucket(max(len(remaining[r]) for r in busy), self.token_buckets)
        size = bucket(max(len(rows) for rows in todo), self.row_buckets)
        shards = len(todo)
        idx = np.full((shards, size), self.pages.rows_per_shard, np.int32)
        tokens = np.zeros((shards * size, width), np.int32)
        count, start, pending, budget = (np.zeros(shards * size, np.int32) for _ in range(4))
        active = np.zeros(shards * size, bool)
        for s, rows in enumerate(todo):
            for j, r in enumerate(rows):
                i = s * size + j
                piece = remaining[r][:width]
                idx[s, j], count[i], start[i] = r % self.pages.rows_per_shard, len(piece), starts[r]
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
        self._sync_table()
        shards = len(self.pages.tables)
        for size in self.row_buckets:
            for width in self.token_buckets:
                for window in self.prefill_windows:
                    idx = np.full((shards, size), self.pages.rows_per_shard, np.int32)
                    zeros = np.zeros(shards * size, np.int32)
                    self.state = kernels.write_rows(
                        self.model,
                        self.state,
                        idx,
                        np.zeros((shards * size, width), np.int32),
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
        """One `decode_chunk` call; appends the sampled tokens to the contexts and returns them per row. An
        active row without free pages for its next chunk pauses (it gets nothing this call); `waiting`
        then lists such rows."""
        chunk = self.state.chunk
        rows = np.flatnonzero(self.active)
        self.waiting = self._reserve(rows, lambda r: int(self.cached[r] + min(chunk, self.budget[r])), rollback=False)
        allow = self.active.copy()
        allow[self.waiting] = False
        if not allow.any():
            return {}
        self._sync_table()
        longest = int(self.cached[allow].max(initial=0)) + chunk
        self.state = kernels.decode_chunk(
            self.model,
            self.state,
            self.stop_table,
            self.stop_accept,
            allow,
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
            self.budget[r] -= n
            results[int(r)] = ChunkResult(new, logprobs[r, :n].tolist(), not bool(active[r]), int(hit[r]))
        self.active &= active
        return results

    def any_active(self) -> bool:
        return bool(self.active.any())

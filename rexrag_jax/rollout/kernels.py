"""The rollout's device kernels: module-level jitted functions over a donated `DecodeState`.

Invariant (kept by the host mirror in `session.py`): row b's cache holds its context minus the last
token, which waits in `pending[b]`. So appending text, rolling back and decoding are all "write some
tokens after position `lengths[b]` and set a new pending token"; the LM head runs only when decoding.

- `write_rows`: the bucketed prefill. For a chosen set of rows, roll the cache back to `start`, append a
  chunk of tokens, set the pending token and the row's turn settings (budget, active, fresh stop
  automata). The same kernel serves prompts, `<information>` blocks, feedback and probe prompts.
- `copy_pages`: copies KV pages (the copy of copy-on-write, when a row writes into a shared page).
- `decode_chunk`: up to `C` steps of a `lax.while_loop` (C = `out_tokens.shape[1]`) over the active rows
  the host allows (a row waiting for free KV pages pauses). It exits early when no row is active, so the
  host regains control to retrieve for rows that stopped on `</search>` while the others go on decoding.

The KV pages, and which rows own them, are the host's business (`rollout/pages.py`): kernels read and
write through `state.cache.table`. Rows are addressed within their row shard (`[shards, rows_per_call]`
local indices), so a kernel touches only the rows and pages of its own device: no communication.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rexrag_jax.models import kv_cache
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.models.kv_cache import init_cache, shard_local_dims
from rexrag_jax.rollout.sampling import row_keys, sample_from_head, split_keys
from rexrag_jax.rollout.stops import step_stops

NO_STOP = -1  # `stop_hit` of a row that ended on its budget (or has not ended)


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries, per row (`[B, ...]`); donated to every kernel."""

    cache: kv_cache.KVCache
    pending: jax.Array  # [B] int32: last context token, not yet in the cache
    keys: jax.Array  # [B] PRNG keys
    active: jax.Array  # [B] bool: decoding in the current turn
    budget: jax.Array  # [B] int32: tokens this row may still sample in the current turn
    stop_state: jax.Array  # [B, S] int32 automaton states
    temperature: jax.Array  # [B] f32 (0 = greedy)
    top_p: jax.Array  # [B] f32
    top_k: jax.Array  # [B] int32 (<= 0: off)
    out_tokens: jax.Array  # [B, C] int32: tokens sampled by the last decode_chunk call
    out_logprobs: jax.Array  # [B, C] f32
    out_count: jax.Array  # [B] int32
    stop_hit: jax.Array  # [B] int32: stop index that ended the row in the last call, else NO_STOP

    @property
    def num_rows(self) -> int:
        return self.pending.shape[0]

    @property
    def chunk(self) -> int:
        return self.out_tokens.shape[1]


def init_state(
    model: Decoder,
    num_rows: int,
    max_length: int,
    num_stops: int,
    *,
    chunk: int = 32,
    seed: int = 0,
    mesh: Mesh | None = None,
    cache_dtype: str | None = None,
    page_size: int | None = None,
    pages_per_shard: int | None = None,
) -> DecodeState:
    """An empty state: rows sharded over the data axes, KV heads over the tensor axis (see `init_cache`
    for the pages)."""
    cache = init_cache(
        model.config,
        num_rows,
        max_length,
        mesh=mesh,
        dtype=cache_dtype,
        page_size=page_size,
        pages_per_shard=pages_per_shard,
    )

    def rows(fill, dtype, *shape: int) -> jax.Array:
        return kv_cache.rows_to_device(np.full((num_rows, *shape), fill, dtype), mesh)

    keys = row_keys(seed, num_rows)
    key_data = kv_cache.rows_to_device(np.asarray(jax.random.key_data(keys)), mesh)
    return DecodeState(
        cache=cache,
        pending=rows(0, np.int32),
        keys=jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(keys)),
        active=rows(False, bool),
        budget=rows(0, np.int32),
        stop_state=rows(0, np.int32, num_stops),
        temperature=rows(0.0, np.float32),
        top_p=rows(1.0, np.float32),
        top_k=rows(0, np.int32),
        out_tokens=rows(0, np.int32, chunk),
        out_logprobs=rows(0.0, np.float32, chunk),
        out_count=rows(0, np.int32),
        stop_hit=rows(NO_STOP, np.int32),
    )


def take_rows(x: jax.Array, local: jax.Array) -> jax.Array:
    """Rows `local[s, i]` of each shard s of a row-sharded `x [B, ...]`, as `[shards * n, ...]` (shard-major)."""
    shards = local.shape[0]
    xs = x.reshape(shards, -1, *x.shape[1:])
    local = jnp.clip(local, 0, xs.shape[1] - 1)[..., None]
    out = jax.lax.gather(xs, local, shard_local_dims(xs.ndim, 1, gather=True), (1, 1, *x.shape[1:]), mode="clip")
    return out.reshape(-1, *x.shape[1:])


def put_rows(x: jax.Array, local: jax.Array, values: jax.Array) -> jax.Array:
    """`take_rows` reversed: row `local[s, i]` of shard s gets `values[s * n + i]`; local ids out of range
    (padding) are dropped."""
    shards = local.shape[0]
    xs = x.reshape(shards, -1, *x.shape[1:])
    values = values.astype(x.dtype).reshape(*local.shape, *x.shape[1:])
    out = jax.lax.scatter(xs, local[..., None], values, shard_local_dims(xs.ndim, 1, gather=False), mode="drop")
    return out.reshape(x.shape)


@functools.partial(jax.jit, static_argnums=(0, 10), donate_argnums=2)
def _write_rows(graphdef, params, state: DecodeState, rows, tokens, num_new, start, pending, budget, activate, window):
    model = nnx.merge(graphdef, params)
    cache = state.cache
    sub = cache.replace(table=take_rows(cache.table, rows), lengths=start)
    _, sub = model.extend(sub, tokens, num_new, window)
    fresh = jnp.zeros((tokens.shape[0], state.stop_state.shape[1]), jnp.int32)
    return state.replace(
        cache=cache.replace(k=sub.k, v=sub.v, lengths=put_rows(cache.lengths, rows, sub.lengths)),
        pending=put_rows(state.pending, rows, pending),
        active=put_rows(state.active, rows, activate),
        budget=put_rows(state.budget, rows, budget),
        stop_state=put_rows(state.stop_state, rows, fresh),
    )


def write_rows(
    model: Decoder,
    state: DecodeState,
    rows,
    tokens,
    num_new,
    start,
    pending,
    budget,
    activate,
    *,
    window: int | None = None,
    graph=None,
) -> DecodeState:
    """For each row `rows[s, j]` of shard s (a local index; >= rows per shard: padding), with `i = s * n + j`
    indexing the other arguments: set the cache length to `start[i]`, append `tokens[i, :num_new[i]]` through
    the row's page table (its pages must be allocated), set `pending[i]`, the turn `budget[i]`,
    `activate[i]` and reset the stop automata. `start[i] + num_new[i]` must not exceed the static attention
    `window` (default: the cache length)."""
    graphdef, params = graph if graph is not None else nnx.split(model)
    as_i32 = lambda x: np.asarray(x, np.int32)
    return _write_rows(
        graphdef,
        params,
        state,
        as_i32(rows),
        as_i32(tokens),
        as_i32(num_new),
        as_i32(start),
        as_i32(pending),
        as_i32(budget),
        np.asarray(activate, bool),
        window,
    )


@functools.partial(jax.jit, donate_argnums=0)
def copy_pages(state: DecodeState, src: jax.Array, dst: jax.Array) -> DecodeState:
    """KV page `dst[s, i]` of shard s becomes a copy of page `src[s, i]` (dst out of range: skipped)."""
    cache = state.cache
    k, v = (kv_cache.copy_pages(x, src, dst) for x in (cache.k, cache.v))
    return state.replace(cache=cache.replace(k=k, v=v))


def set_table(state: DecodeState, table: np.ndarray) -> DecodeState:
    """The host's page table `[rows, max_pages]` (page ids within each row's shard) on device."""
    table = jax.device_put(np.array(table, np.int32), state.cache.table.sharding, may_alias=False)
    return state.replace(cache=state.cache.replace(table=table))


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=2)
def _decode_chunk(graphdef, params, state: DecodeState, stop_table, stop_accept, allow, window):
    model = nnx.merge(graphdef, params)
    chunk = state.out_tokens.shape[1]

    def body(carry):
        step, s = carry
        hidden, cache = model.extend(s.cache, s.pending[:, None], s.active.astype(jnp.int32), window)
        keys, use = split_keys(s.keys)
        tokens, logprobs = sample_from_head(model.head_weight(), hidden[:, 0], use, s.temperature, s.top_p, s.top_k)
        active = s.active
        # A row's key advances only when it samples: its draws do not depend on how long it waited for
        # retrieval or on chunk boundaries, so a rollout is reproducible from its seed.
        keys = _where_keys(active, keys, s.keys)
        # Row b's token goes to column out_count[b] (inactive rows write nowhere): an elementwise select,
        # not a scatter, so rows sharded over the mesh need no communication to write their own outputs.
        write = active[:, None] & (jnp.arange(chunk)[None] == s.out_count[:, None])
        stop_state, hit = step_stops(stop_table, stop_accept, s.stop_state, tokens)
        budget = s.budget - active
        ended = active & ((hit >= 0) | (budget <= 0))
        s = s.replace(
            cache=cache,
            keys=keys,
            pending=jnp.where(active, tokens, s.pending),
            out_tokens=jnp.where(write, tokens[:, None], s.out_tokens),
            out_logprobs=jnp.where(write, logprobs[:, None], s.out_logprobs),
            out_count=s.out_count + active,
            stop_state=jnp.where(active[:, None], stop_state, s.stop_state),
            stop_hit=jnp.where(active, hit, s.stop_hit),
            budget=budget,
            active=active & ~ended,
        )
        return step + 1, s

    def cond(carry):
        step, s = carry
        return (step < chunk) & jnp.any(s.active)

    paused = state.active & ~allow  # waiting for KV pages: keeps its turn (budget, stop automata) for later
    state = state.replace(
        active=state.active & allow,
        out_count=jnp.zeros_like(state.out_count),
        stop_hit=jnp.full_like(state.stop_hit, NO_STOP),
    )
    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state.replace(active=state.active | paused)


def _where_keys(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """Per-row select between typed PRNG key arrays `[B]`."""
    data = jnp.where(mask[:, None], jax.random.key_data(new), jax.random.key_data(old))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))


def decode_chunk(
    model: Decoder,
    state: DecodeState,
    stop_table,
    stop_accept,
    allow=None,
    *,
    window: int | None = None,
    graph=None,
) -> DecodeState:
    """Run up to `state.chunk` decode steps for the active rows that `allow` (`[rows]` bool, default all;
    each needs KV pages for its next `chunk` tokens). With a static `window`, attention reads only the
    first `window` cache slots: every active row must stay within it for the whole call
    (`lengths + chunk <= window`)."""
    graphdef, params = graph if graph is not None else nnx.split(model)
    if allow is None:
        allow = np.ones(state.num_rows, bool)
    allow = jax.device_put(np.asarray(allow, bool), state.active.sharding)
    return _decode_chunk(graphdef, params, state, stop_table, stop_accept, allow, window)


def set_sampling(state: DecodeState, temperature, top_p, top_k) -> DecodeState:
    """Per-row sampling knobs (traced values: changing them does not recompile)."""

    def like(old, new, dtype):
        # may_alias=False: on CPU a device_put may share the numpy buffer, and these fields are donated
        host = np.broadcast_to(np.asarray(new, dtype), old.shape)
        return jax.device_put(np.array(host), old.sharding, may_alias=False)

    return state.replace(
        temperature=like(state.temperature, temperature, np.float32),
        top_p=like(state.top_p, top_p, np.float32),
        top_k=like(state.top_k, top_k, np.int32),
    )

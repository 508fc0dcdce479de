"""The rollout's device kernels: module-level jitted functions over a donated `DecodeState`.

Invariant (kept by the host mirror in `session.py`): row b's cache holds its context minus the last
token, which waits in `pending[b]`. So appending text, rolling back and decoding are all "write some
tokens after position `lengths[b]` and set a new pending token"; the LM head runs only when decoding.

- `write_rows`: the bucketed prefill. For a chosen set of rows, roll the cache back to `start`, append a
  chunk of tokens, set the pending token and the row's turn settings (budget, active, fresh stop
  automata). The same kernel serves prompts, `<information>` blocks, feedback and probe prompts.
- `copy_rows`: copies whole cache rows (a prompt prefilled once fills its G group rows).
- `decode_chunk`: up to `C` steps of a `lax.while_loop` (C = `out_tokens.shape[1]`) over all rows;
  inactive rows are not written. It exits early when no row is active, so the host regains control to
  retrieve for rows that stopped on `</search>` while the others go on decoding in the next call.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rexrag_jax.models.decoder import Decoder, KVCache, init_cache
from rexrag_jax.rollout.sampling import row_keys, sample_from_head, split_keys
from rexrag_jax.rollout.stops import step_stops
from rexrag_jax.sharding import named_sharding

NO_STOP = -1  # `stop_hit` of a row that ended on its budget (or has not ended)


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries, per row (`[B, ...]`); donated to every kernel."""

    cache: KVCache
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
) -> DecodeState:
    """An empty state: rows sharded over the data axes, KV heads over the tensor axis."""
    cache = init_cache(model.config, num_rows, max_length, mesh=mesh, dtype=cache_dtype)

    def put(x: np.ndarray) -> jax.Array:
        """A host array as a fresh device buffer, rows over the data axes. The state is donated, so no
        buffer may be shared with another leaf or with host memory (on CPU a device_put may alias the
        numpy array: may_alias=False copies). From numpy, not a jax array: every process puts its
        identical copy onto a mesh that may span several processes."""
        if mesh is None:
            return jnp.array(x)
        return jax.device_put(x, named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape), may_alias=False)

    def rows(fill, dtype, *shape: int) -> jax.Array:
        return put(np.full((num_rows, *shape), fill, dtype))

    keys = row_keys(seed, num_rows)
    key_data = put(np.asarray(jax.random.key_data(keys)))
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


def _take_rows(x: jax.Array, rows: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.take(x, rows, axis=axis, mode="clip")


def _put_rows(x: jax.Array, rows: jax.Array, values: jax.Array, axis: int = 0) -> jax.Array:
    """Scatter `values` into `x` at `rows` along `axis`; row index == num_rows (padding) is dropped."""
    index = (slice(None),) * axis + (rows,)
    return x.at[index].set(values.astype(x.dtype), mode="drop")


@functools.partial(jax.jit, static_argnums=(0, 10), donate_argnums=2)
def _write_rows(graphdef, params, state: DecodeState, rows, tokens, num_new, start, pending, budget, activate, window):
    model = nnx.merge(graphdef, params)
    sub = KVCache(_take_rows(state.cache.k, rows, 1), _take_rows(state.cache.v, rows, 1), start)
    _, sub = model.extend(sub, tokens, num_new, window)
    cache = KVCache(
        _put_rows(state.cache.k, rows, sub.k, 1),
        _put_rows(state.cache.v, rows, sub.v, 1),
        _put_rows(state.cache.lengths, rows, sub.lengths),
    )
    fresh = jnp.zeros((rows.shape[0], state.stop_state.shape[1]), jnp.int32)
    return state.replace(
        cache=cache,
        pending=_put_rows(state.pending, rows, pending),
        active=_put_rows(state.active, rows, activate),
        budget=_put_rows(state.budget, rows, budget),
        stop_state=_put_rows(state.stop_state, rows, fresh),
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
    """For each `rows[i]` (== num_rows: padding): set the cache length to `start[i]`, append
    `tokens[i, :num_new[i]]`, set `pending[i]`, the turn `budget[i]`, `activate[i]` and reset the stop
    automata. `start[i] + num_new[i]` must not exceed the static attention `window` (default: the cache
    length)."""
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
def copy_rows(state: DecodeState, src: jax.Array, dst: jax.Array) -> DecodeState:
    """Copy cache rows, lengths and pending tokens from `src[i]` to `dst[i]` (dst == num_rows: skipped)."""
    cache = state.cache
    new_cache = KVCache(
        _put_rows(cache.k, dst, _take_rows(cache.k, src, 1), 1),
        _put_rows(cache.v, dst, _take_rows(cache.v, src, 1), 1),
        _put_rows(cache.lengths, dst, _take_rows(cache.lengths, src)),
    )
    return state.replace(cache=new_cache, pending=_put_rows(state.pending, dst, _take_rows(state.pending, src)))


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=2)
def _decode_chunk(graphdef, params, state: DecodeState, stop_table, stop_accept, window):
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

    state = state.replace(out_count=jnp.zeros_like(state.out_count), stop_hit=jnp.full_like(state.stop_hit, NO_STOP))
    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


def _where_keys(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """Per-row select between typed PRNG key arrays `[B]`."""
    data = jnp.where(mask[:, None], jax.random.key_data(new), jax.random.key_data(old))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))


def decode_chunk(
    model: Decoder, state: DecodeState, stop_table, stop_accept, *, window: int | None = None, graph=None
) -> DecodeState:
    """Run up to `state.chunk` decode steps for the active rows (see the module docstring). With a static
    `window`, attention reads only the first `window` cache slots: every active row must stay within it
    for the whole call (`lengths + chunk <= window`)."""
    graphdef, params = graph if graph is not None else nnx.split(model)
    return _decode_chunk(graphdef, params, state, stop_table, stop_accept, window)


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

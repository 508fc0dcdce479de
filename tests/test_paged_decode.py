"""Decode attention with JAX's Pallas paged-attention kernels (TPU and GPU, interpret mode on CPU) reading
the paged KV cache in place, against the XLA path that gathers the pages through the table: one
attention call over scrambled pages, released rows and ragged lengths, on and off a mesh; and a
multi-turn session (ragged prompts, appends after host edits, a probe-like rollback) whose greedy tokens
and log-probs equal the XLA path's. The TPU kernel reads K/V as bfloat16, so its cache is bfloat16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rexrag_jax.models import ModelConfig, init_model
from rexrag_jax.models import attention as attention_module
from rexrag_jax.models.attention import (
    cached_attention,
    decode_kernel_available,
    paged_decode_attention,
    resolve_decode_attention,
)
from rexrag_jax.models.kv_cache import NO_PAGE, read_layer
from rexrag_jax.rollout import DecodeSession, build_stop_table
from rexrag_jax.sharding import make_mesh


@pytest.mark.parametrize(
    "kernel, mesh_shape, dtype",
    [("tpu", (2, 2, 2), jnp.bfloat16), ("gpu", (1, 2, 4), jnp.float32)],
)
def test_paged_kernels_equal_the_xla_read(devices, kernel, mesh_shape, dtype):
    """8 query heads on 2 KV heads (split over a tensor axis of 2, replicated over one of 4), 4-token pages
    in scrambled order, a released row (NO_PAGE entries), lengths from 1 to a full table."""
    rng = np.random.default_rng(0)
    mesh = make_mesh(mesh_shape) if mesh_shape else None
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    rows, kv, layers, per_shard, page, dim, heads = 4 * shards // 2, 2, 3, 12, 4, 16, 8
    shape = (shards, kv, layers, per_shard, page, dim)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
    table = np.concatenate([rng.permutation(per_shard)[:5].reshape(1, 5) for _ in range(rows)]).astype(np.int32)
    table[1, 2:] = NO_PAGE
    lengths = rng.integers(1, 21, rows).astype(np.int32)
    lengths[0], lengths[1], lengths[-1] = 20, 8, 1
    q = jnp.asarray(rng.normal(size=(rows, 1, heads, dim)), jnp.float32)
    layer = jnp.int32(2)
    keys, values = (read_layer(p, layer, jnp.asarray(table), 20).astype(jnp.float32) for p in (k_pages, v_pages))
    want = cached_attention(q, keys, values, jnp.arange(20)[None, None] < jnp.asarray(lengths)[:, None, None])

    def run(q, k_pages, v_pages, table, lengths):
        return paged_decode_attention(q, k_pages, v_pages, table, lengths, layer, kernel=kernel, mesh=mesh)

    got = jax.jit(run)(q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_choice_of_decode_kernel():
    f32, bf16 = (jax.ShapeDtypeStruct((1, 1, 2, 8), d) for d in (jnp.float32, jnp.bfloat16))
    assert resolve_decode_attention("auto", bf16) == resolve_decode_attention("xla", bf16) == "xla"  # on CPU
    assert resolve_decode_attention("splash", f32) == "tpu" and resolve_decode_attention("cudnn", f32) == "gpu"
    assert decode_kernel_available("tpu") and decode_kernel_available("gpu")  # in every jax we support


def test_a_jax_without_the_kernel_decodes_with_xla_on_auto_and_refuses_an_explicit_choice(monkeypatch):
    """jax 0.11 deprecates the GPU kernel: once a release drops it, "auto" on a GPU decodes with XLA and an
    explicit "cudnn" names the missing module."""
    bf16 = jax.ShapeDtypeStruct((1, 1, 2, 8), jnp.bfloat16)
    monkeypatch.setattr(attention_module, "decode_kernel_available", lambda kernel: kernel != "gpu")
    monkeypatch.setattr(attention_module, "resolve_attention", lambda choice, q: "cudnn")  # as on a GPU
    assert resolve_decode_attention("auto", bf16) == "xla"
    with pytest.raises(ValueError, match=r"gpu\.paged_attention, which jax .* does not ship; use 'auto'"):
        resolve_decode_attention("cudnn", bf16)
    assert resolve_decode_attention("splash", bf16) == "tpu"


@pytest.mark.parametrize("attention, mesh_shape", [("cudnn", (2, 2, 2)), ("splash", None)])
def test_kernel_decoding_equals_xla_over_a_multi_turn_session(devices, attention, mesh_shape):
    """Greedy tokens and their log-probs through a kernel equal the XLA path's: ragged prompts, a first
    turn, then one row rolled back into its turn and given new text (as a probe is), another given an
    observation, and a second turn; 8-token pages. The GPU kernel runs on a (data, fsdp, tensor) mesh, the
    TPU kernel on one device (its interpret mode takes seconds per step on 8 fake devices)."""
    config = ModelConfig("llama", 320, 64, 128, 2, 8, 2, 16, tie_word_embeddings=True)
    model = init_model(config, seed=3, mesh=make_mesh(mesh_shape) if mesh_shape else None)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (11, 5, 17, 8)]
    observation = rng.integers(3, config.vocab_size, 12).tolist()

    def run(attention):
        graphdef, state = nnx.split(model)
        other = nnx.merge(graphdef, state)
        other.config = dataclasses.replace(config, attention=attention)
        stops = build_stop_table(config.vocab_size)
        session = DecodeSession(other, 4, 64, stops, chunk=4, page_size=8, cache_dtype="bfloat16")
        session.set_sampling(0.0)
        for r, p in enumerate(prompts):
            session.context[r] = list(p)
        first = turn(session, {0: 2, 1: 1, 2: 2, 3: 1})
        session.truncate(2, len(prompts[2]) + 1)  # back into its turn, then other text (a probe)
        session.context[2].extend(observation[:5])
        session.context[1].extend(observation)
        return first, turn(session, {1: 1, 2: 2, 3: 1})

    for want, got in zip(run("xla"), run(attention)):
        assert want.keys() == got.keys()
        for r in want:
            assert got[r][0] == want[r][0], r
            np.testing.assert_allclose(got[r][1], want[r][1], rtol=1e-4, atol=1e-4)


def turn(session: DecodeSession, budgets: dict[int, int]) -> dict[int, tuple[list[int], list[float]]]:
    """Start a turn of `budgets[row]` tokens for the rows, decode it; each row's (tokens, log-probs)."""
    session.commit(list(budgets), list(budgets.values()), [True] * len(budgets))
    out = {r: ([], []) for r in budgets}
    while session.any_active():
        for r, res in session.decode().items():
            out[r][0].extend(res.tokens)
            out[r][1].extend(res.logprobs)
    return out

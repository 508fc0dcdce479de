"""Decoder parity with transformers' PyTorch Qwen2/Llama, export round trip, sharding and the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hf_fixtures import CONFIGS, build_reference, padded_batch, reference_logits
from rexrag_jax.models import Decoder, ModelConfig, extend, forward, init_cache, init_model, load_hf, save_hf
from rexrag_jax.sharding import make_mesh

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (torch reference, HF directory), built once per module."""
    out = {}
    for name in CONFIGS:
        ref = build_reference(name)
        path = str(tmp_path_factory.mktemp(name))
        ref.save_pretrained(path)
        out[name] = (ref, path)
    return out


def _valid_max_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_on_padded_batch(checkpoints, name):
    ref, path = checkpoints[name]
    model, config = load_hf(path)
    assert config.architecture == CONFIGS[name][0]
    assert config.tie_word_embeddings == ref.config.tie_word_embeddings
    ids, mask = padded_batch(config.vocab_size)
    ours = forward(model, ids, mask)
    assert ours.shape == (*ids.shape, config.vocab_size) and ours.dtype == jnp.float32
    assert _valid_max_diff(ours, reference_logits(ref, ids, mask), mask) <= TOL


@pytest.mark.parametrize("name", ["qwen2p5_7b_ratio_untied", "smollm2_like_tied"])
def test_export_round_trip(checkpoints, tmp_path, name):
    ref, path = checkpoints[name]
    model, config = load_hf(path)
    save_hf(model, config, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = padded_batch(config.vocab_size, seed=1)
    assert _valid_max_diff(forward(model, ids, mask), reference_logits(reloaded, ids, mask), mask) <= TOL
    # The reference and the re-export agree with each other bit for bit (same weights, same code).
    np.testing.assert_array_equal(reference_logits(reloaded, ids, mask), reference_logits(ref, ids, mask))
    ours_again, config_again = load_hf(str(tmp_path))
    assert config_again == config
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(ours_again))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_sharded_safetensors_index_round_trip(checkpoints, tmp_path):
    _, path = checkpoints["qwen2p5_3b_ratio_tied"]
    model, config = load_hf(path)
    save_hf(model, config, str(tmp_path), max_shard_bytes=64 << 10)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    again, _ = load_hf(str(tmp_path))
    ids, mask = padded_batch(config.vocab_size)
    np.testing.assert_array_equal(np.asarray(forward(model, ids, mask)), np.asarray(forward(again, ids, mask)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert _valid_max_diff(forward(model, ids, mask), reference_logits(hf, ids, mask), mask) <= TOL


def test_sharded_forward_equals_unsharded_and_follows_rules(checkpoints, devices):
    _, path = checkpoints["qwen2p5_7b_ratio_untied"]
    mesh = make_mesh((2, 2, 2))
    sharded, config = load_hf(path, mesh=mesh)
    single, _ = load_hf(path)
    # Parameters land where the rules table says, each device holding only its slice.
    layers = sharded.layers
    assert layers.q[...].sharding.spec == P(None, "fsdp", "tensor")
    assert layers.k[...].sharding.spec == P(None, "fsdp", "tensor")
    assert layers.o[...].sharding.spec == P(None, "tensor", None, "fsdp")
    assert layers.down[...].sharding.spec == P(None, "tensor", "fsdp")
    assert layers.q_bias[...].sharding.spec == P(None, "tensor")
    assert sharded.embed[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.lm_head[...].sharding.spec == P("tensor", "fsdp")
    shard_shapes = {s.data.shape for s in layers.gate[...].addressable_shards}
    assert shard_shapes == {(config.num_layers, config.hidden_size // 2, config.intermediate_size // 2)}
    ids, mask = padded_batch(config.vocab_size, lengths=(12, 7, 3, 9))
    out = forward(sharded, ids, mask)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(out), np.asarray(forward(single, ids, mask)), atol=1e-5, rtol=1e-5)


def test_indivisible_dims_are_replicated(devices):
    # Qwen2.5-3B has 2 KV heads: on a tensor axis of 4 the KV heads cannot be split and stay replicated.
    config = ModelConfig(
        architecture="qwen2",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=True,
    )
    model = init_model(config, mesh=make_mesh((1, 2, 4)))
    assert model.layers.k[...].sharding.spec == P(None, "fsdp")
    assert model.layers.q[...].sharding.spec == P(None, "fsdp", "tensor")


@pytest.mark.parametrize("name, page_size", [("qwen2p5_3b_ratio_tied", None), ("llama3_scaled_untied", 4)])
def test_kv_cache_chunks_match_full_forward(checkpoints, devices, name, page_size):
    """Rows advance by different chunk sizes at their own offsets; every step's logits equal the full forward,
    with a contiguous cache and with 4-token pages in scrambled order (rows of one shard interleaved)."""
    _, path = checkpoints[name]
    mesh = make_mesh((2, 1, 2), devices=jax.devices()[:4])
    model, config = load_hf(path, mesh=mesh)
    rng = np.random.default_rng(0)
    seqs = rng.integers(3, config.vocab_size, size=(4, 20)).astype(np.int32)
    full = np.asarray(forward(model, seqs))
    cache = init_cache(config, 4, 24, mesh=mesh, page_size=page_size)
    if page_size:  # 2 rows x 6 pages per shard: any permutation of the shard's 12 pages
        table = np.concatenate([rng.permutation(12).reshape(2, 6) for _ in range(2)]).astype(np.int32)
        cache = cache.replace(table=jax.device_put(table, cache.table.sharding))
    done = np.zeros(4, int)
    chunk_plan = [[5, 3, 0, 1], [1, 4, 6, 1], [0, 1, 2, 8], [1, 1, 1, 1]]  # per step, tokens appended per row
    for plan in chunk_plan:
        plan = np.asarray(plan)
        width = max(plan.max(), 1)
        tokens = np.zeros((4, width), np.int32)
        for b in range(4):
            tokens[b, : plan[b]] = seqs[b, done[b] : done[b] + plan[b]]
        logits, cache = extend(model, cache, tokens, plan)
        done += plan
        np.testing.assert_array_equal(np.asarray(cache.lengths), done)
        for b in np.nonzero(plan)[0]:
            np.testing.assert_allclose(np.asarray(logits[b]), full[b, done[b] - 1], atol=TOL, rtol=1e-4)
    assert cache.k.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "tensor")), 6)


def test_extend_leaves_idle_rows_untouched(checkpoints):
    _, path = checkpoints["smollm2_like_tied"]
    model, config = load_hf(path)
    cache = init_cache(config, 2, 8)
    logits, cache = extend(model, cache, np.array([[5, 6, 7], [8, 9, 10]]), np.array([3, 2]))
    before = np.asarray(cache.k).copy()
    _, cache = extend(model, cache, np.array([[11, 0], [12, 13]]), np.array([0, 2]))
    after = np.asarray(cache.k)
    np.testing.assert_array_equal(after[0, :, :, 0], before[0, :, :, 0])  # row 0 holds page 0
    assert np.abs(after[0, :, :, 1, 2:4]).sum() > 0
    np.testing.assert_array_equal(np.asarray(cache.lengths), [3, 4])


def test_remat_policies_agree_and_depth_does_not_grow_the_program():
    base = ModelConfig(
        architecture="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    ids, mask = (
        jnp.asarray(padded_batch(128, lengths=(6, 4))[0]),
        jnp.asarray(padded_batch(128, lengths=(6, 4))[1], bool),
    )
    state = nnx.state(init_model(base, seed=3))

    def grad_fn(config):
        graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))[0]
        return jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(ids, mask) ** 2))

    ref = jax.tree.leaves(jax.jit(grad_fn(base.replace(remat="none")))(state))
    for policy in ("full", "dots_no_batch"):
        got = jax.tree.leaves(jax.jit(grad_fn(base.replace(remat=policy)))(state))
        for a, b in zip(ref, got):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    deep = base.replace(num_layers=12)
    deep_state = nnx.state(nnx.eval_shape(lambda: Decoder(deep, rngs=nnx.Rngs(0))))
    shallow_eqns = len(jax.make_jaxpr(grad_fn(base))(state).eqns)
    assert len(jax.make_jaxpr(grad_fn(deep))(deep_state).eqns) == shallow_eqns  # scanned, not unrolled


def test_bfloat16_load(checkpoints):
    ref, path = checkpoints["qwen2p5_3b_ratio_tied"]
    model, config = load_hf(path, dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    assert model.layers.q[...].dtype == jnp.bfloat16
    ids, mask = padded_batch(config.vocab_size)
    got = np.asarray(forward(model, ids, mask))
    want = reference_logits(ref, ids, mask)
    assert np.isfinite(got).all()
    assert _valid_max_diff(got, want, mask) < 0.1  # bf16 rounding only


def test_fp32_params_with_bf16_compute(checkpoints):
    ref, path = checkpoints["llama3_scaled_untied"]
    model32, config = load_hf(path)
    model = nnx.merge(
        nnx.split(nnx.eval_shape(lambda: Decoder(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))))[0],
        nnx.state(model32),
    )
    assert model.layers.q[...].dtype == jnp.float32 and model.config.compute_dtype == jnp.bfloat16
    ids, mask = padded_batch(config.vocab_size)
    got = forward(model, ids, mask)
    assert got.dtype == jnp.float32
    assert _valid_max_diff(got, reference_logits(ref, ids, mask), mask) < 0.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fully_padded_row_gives_finite_logits(dtype):
    config = ModelConfig(
        architecture="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=True,
        dtype=dtype,
    )
    logits = forward(init_model(config), np.ones((2, 5), np.int32), np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("length", [12, 13])
def test_fused_attention_path_is_exact_for_right_padded_rows(monkeypatch, length):
    """The GPU path (causal mask only, odd lengths padded by one position) gives the masked path's hidden
    states at every real token of right-padded rows. cuDNN itself needs a GPU: here its stand-in is the
    XLA kernel with the same `is_causal` contract, so what is checked is the masking argument."""
    from rexrag_jax.models import attention

    cfg = ModelConfig(
        architecture="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=True,
    )
    model = init_model(cfg, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, length)), jnp.int32)
    valid = jnp.asarray(np.arange(length)[None] < np.array([[length], [5], [9]]))
    masked = np.asarray(model.hidden_states(tokens, valid))
    calls = []
    real_attention = jax.nn.dot_product_attention

    def stand_in(q, k, v, *args, implementation=None, **kwargs):
        calls.append((q.shape[1], implementation, kwargs.get("is_causal")))
        return real_attention(q, k, v, *args, implementation="xla", **kwargs)

    monkeypatch.setattr(attention, "fused_attention_ok", lambda q: True)
    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    fused = np.asarray(model.hidden_states(tokens, valid))
    assert calls and all(c == (length + length % 2, "cudnn", True) for c in calls)
    real = np.asarray(valid)
    np.testing.assert_allclose(fused[real], masked[real], rtol=1e-5, atol=1e-5)
    assert not np.allclose(fused[~real], masked[~real], atol=1e-3)  # padding positions differ, unread


def test_paged_cache_writes_reads_and_copies_through_the_table():
    """Writes land at (table[b, slot // page], slot % page) of the row's shard, dropping slots past the table
    or on NO_PAGE; reads return each row's slots in order; a page copy moves all layers of one page."""
    from rexrag_jax.models.kv_cache import NO_PAGE, copy_pages, read_layer, write_layer

    rng = np.random.default_rng(0)
    layers, shards, heads, per_shard, page, dim = 3, 2, 2, 5, 4, 8
    pages = rng.normal(size=(shards, heads, layers, per_shard, page, dim)).astype(np.float32)
    table = np.stack([rng.permutation(per_shard)[:3] for _ in range(4)]).astype(np.int32)  # 4 rows, 12 slots
    table[3, 2] = NO_PAGE
    slots = np.stack([rng.choice(14, 5, replace=False) for _ in range(4)]).astype(np.int32)  # some >= 12
    new = rng.normal(size=(4, 5, heads, dim)).astype(np.float32)
    want = pages.copy()
    for b in range(4):
        for t in range(5):
            s = slots[b, t]
            if s < 12 and table[b, s // page] != NO_PAGE:
                want[b // 2, :, 1, table[b, s // page], s % page] = new[b, t]
    got = np.asarray(write_layer(jnp.asarray(pages), jnp.int32(1), jnp.asarray(table), jnp.asarray(slots), new))
    np.testing.assert_array_equal(got, want)
    read = np.asarray(read_layer(jnp.asarray(got), jnp.int32(1), jnp.asarray(table[:, :2]), 6))  # 2 pages
    for b in range(4):
        dense = np.concatenate([want[b // 2, :, 1, table[b, j]] for j in range(2)], axis=1)  # [K, 8, D]
        np.testing.assert_array_equal(read[b], dense)
    copied = np.asarray(copy_pages(jnp.asarray(got), jnp.asarray([[0, 1], [2, 3]]), jnp.asarray([[4, 5], [1, 5]])))
    want[0, :, :, 4], want[1, :, :, 1] = want[0, :, :, 0], want[1, :, :, 2]  # dst 5 is padding: skipped
    np.testing.assert_array_equal(copied, want)

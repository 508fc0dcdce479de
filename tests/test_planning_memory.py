"""The per-device memory estimate (planning/memory.py) against hand-computed numbers and our real sharding rules."""

import math
from types import SimpleNamespace

import pytest
from flax import nnx

from rexrag_jax.config import QWEN25_ARCHS
from rexrag_jax.models.config import ModelConfig
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.planning.memory import (
    DEFAULT_SETUPS,
    GIB,
    RULES,
    TPU_HBM_GIB,
    estimate_training_memory,
    memory_table,
    num_params,
    param_shapes,
    shard_factor,
)
from rexrag_jax.sharding import LOGICAL_RULES, logical_to_spec

TOY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)
MESH_2X2 = {"data": 1, "fsdp": 2, "tensor": 2}


def model_config(arch: dict) -> ModelConfig:
    return ModelConfig(architecture="qwen2", attention_bias=True, **arch)


def estimate(arch, mesh, **kw):
    args = dict(micro_batch_rows=8, seq_len=512, rollout_rows=16, rollout_context=1024)
    return estimate_training_memory(arch, mesh, **{**args, **kw})


@pytest.mark.parametrize("name, billions", [("qwen2.5-3b", 3.09), ("qwen2.5-7b", 7.62), ("qwen2.5-0.5b", 0.494)])
def test_param_count_matches_model_config_and_published_size(name, billions):
    arch = QWEN25_ARCHS[name]
    assert num_params(arch) == model_config(arch).num_params()
    assert num_params(arch) / 1e9 == pytest.approx(billions, abs=0.005)


def test_param_shapes_are_the_decoders():
    """Names, shapes and logical axes equal those of the real (abstract) Decoder, tied and untied."""
    for tied in (False, True):
        cfg = model_config({**TOY, "tie_word_embeddings": tied})
        state = nnx.state(nnx.eval_shape(lambda cfg=cfg: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        real = {
            path[-1]: (tuple(v.get_value().shape), tuple(v.get_metadata()["logical_axes"]))
            for path, v in nnx.to_flat_state(state)
        }
        assert {n: (s, ax) for n, s, ax in param_shapes({**TOY, "tie_word_embeddings": tied})} == real


def test_rules_are_the_sharding_rules():
    norm = {k: (v,) if isinstance(v, str) else tuple(v or ()) for k, v in LOGICAL_RULES.items()}
    assert RULES == norm


@pytest.mark.parametrize(
    "mesh",
    [
        MESH_2X2,
        {"data": 1, "fsdp": 4, "tensor": 4},
        {"data": 2, "fsdp": 8, "tensor": 1},
        {"data": 1, "fsdp": 3, "tensor": 8},
    ],
)
@pytest.mark.parametrize("name", ["qwen2.5-3b", "qwen2.5-7b"])
def test_shard_factors_follow_logical_to_spec(mesh, name):
    fake = SimpleNamespace(shape=mesh)
    for _, shape, axes in param_shapes(QWEN25_ARCHS[name]):
        spec = logical_to_spec(axes, shape, fake)
        expected = math.prod(
            mesh[a] for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)
        )
        assert shard_factor(shape, axes, mesh) == expected, (shape, axes, spec)


def test_toy_fp32_state_divides_exactly_on_2x2():
    # every sharded dimension of TOY divides by 2; only norms (2 * 2 * 64 + 64 floats) stay replicated
    e = estimate(TOY, MESH_2X2)
    n = num_params(TOY)
    norms = (2 * TOY["num_layers"] + 1) * TOY["hidden_size"]
    biases = TOY["num_layers"] * (4 + 2 + 2) * 16  # q/k/v biases: split over tensor only
    expected = 4 * ((n - norms - biases) / 4 + biases / 2 + norms)
    assert e["policy_params"] == e["reference_params"] == e["grad_accumulator"] == expected
    assert e["adam_moments"] == 2 * expected
    assert e["persistent"] == 4 * expected
    single = estimate(TOY, {"data": 1, "fsdp": 1, "tensor": 1})
    assert single["policy_params"] == 4 * n


def test_paged_kv_estimate_is_the_pool_a_device_holds(devices):
    """The estimate of a paged cache is what `init_cache` allocates per device (2 KV heads over tensor 2)."""
    import jax

    from rexrag_jax.models import init_cache
    from rexrag_jax.sharding import make_mesh

    config = ModelConfig("qwen2", 64, 32, 64, 3, 4, 2, 8, dtype="bfloat16")
    mesh = make_mesh((2, 2, 2))
    cache = init_cache(config, 8, 64, mesh=mesh, page_size=4, pages_per_shard=10)
    e = estimate_training_memory(
        config,
        {"data": 2, "fsdp": 2, "tensor": 2},
        micro_batch_rows=8,
        seq_len=64,
        rollout_rows=8,
        rollout_context=64,
        kv_pages=40,
        kv_page_size=4,
    )
    per_device = sum(x.addressable_shards[0].data.nbytes for x in (cache.k, cache.v))
    assert e["kv_cache"] == per_device and jax.device_count() == 8


def test_kv_heads_not_divisible_by_tensor_stay_whole():
    arch = QWEN25_ARCHS["qwen2.5-3b"]  # 2 KV heads
    kw = dict(micro_batch_rows=4, seq_len=4096, rollout_rows=8, rollout_context=4096)
    t1, t2, t4 = (estimate_training_memory(arch, {"fsdp": 4, "tensor": t}, **kw)["kv_cache"] for t in (1, 2, 4))
    per_row = 36 * 4096 * 2 * 128 * 2 * 2  # layers x context x kv heads x head_dim x (k, v) x bf16
    assert t1 == 2 * per_row  # 8 rows over fsdp 4
    assert t2 == t1 / 2 and t4 == t1  # tensor 2 splits the 2 heads, tensor 4 cannot
    k_weight = next((s, ax) for n, s, ax in param_shapes(arch) if n == "k")
    assert shard_factor(*k_weight, {"fsdp": 4, "tensor": 4}) == 4  # fsdp only
    q_weight = next((s, ax) for n, s, ax in param_shapes(arch) if n == "q")
    assert shard_factor(*q_weight, {"fsdp": 4, "tensor": 4}) == 16


def test_paper_rollout_kv_cache_hand_value():
    # Qwen2.5-3B, 512 prompts x 5, context 4096 on 4 chips: 640 rows x 36 KiB/token x 4096 = 90 GiB
    paper = dict(micro_batch_rows=8, seq_len=4096, rollout_rows=2560, rollout_context=4096)
    arch, mesh = QWEN25_ARCHS["qwen2.5-3b"], {"fsdp": 4}
    e = estimate_training_memory(arch, mesh, **paper)
    assert e["kv_cache"] == 640 * 36 * 1024 * 4096 == 90 * GIB
    assert e["total"] == e["persistent"] + max(e["update_peak"], e["rollout_peak"])
    paged = estimate_training_memory(arch, mesh, **paper, kv_pages=300_000, kv_page_size=16)
    assert paged["kv_cache"] == 75_000 * 16 * 36 * 1024  # pages per chip x tokens x 36 KiB/token
    full = estimate_training_memory(arch, mesh, **paper, remat="none")
    assert full["activations"] > 5 * e["activations"]  # remat buys its keep at 4096 tokens


def test_table_has_a_row_per_setup_and_flags_misfits():
    text, rows = memory_table()
    assert len(rows) == len(DEFAULT_SETUPS)
    assert len([line for line in text.splitlines() if line.startswith("| qwen")]) == len(DEFAULT_SETUPS)
    by = {(r["model"], r["slice"], r["mesh"]["tensor"]): r for r in rows}
    assert by[("qwen2.5-7b", "v6e-8", 1)]["fits"] == "no"  # 14 GiB of state + 70 GiB of KV cache > 32 GiB
    assert by[("qwen2.5-3b", "v5p-32", 1)]["fits"] == "yes"
    for r in rows:
        assert r["hbm_gib"] == TPU_HBM_GIB[r["slice"].split("-")[0]]
        assert (r["fits"] == "yes") == (r["total"] <= r["hbm_gib"])
        assert (r["max_rollout_rows"] >= 2560) == (r["fits"] == "yes")


def test_rejects_unknown_remat():
    with pytest.raises(ValueError, match="remat"):
        estimate(TOY, MESH_2X2, remat="dots")

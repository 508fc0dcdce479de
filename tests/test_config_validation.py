"""Numeric config values outside their meaningful range fail before a run starts, naming the override the
user would type (`--config.optim.learning_rate=-0.001: must be > 0`), instead of training on with them."""

import json
import math

import pytest

from rexrag_jax.config import default_config, flatten, ranges
from rexrag_jax.config import validate as validate_config

EVAL_RANGES, ALL_RANGES = ranges(for_eval=True), ranges()


def valid_config():
    c = default_config()
    c.model.init, c.data.train_file, c.retrieval.corpus = "random", "train.jsonl", "corpus.jsonl"
    return c


# (key, a value outside its range, the message's range). Each key's first row is the nearest bad value.
REFUSED = [
    ("seed", -1, ">= 0"),
    ("steps", 0, ">= 1"),
    ("cpu_devices", -1, ">= 0"),
    ("data.batch_size", 0, ">= 1"),
    ("optim.learning_rate", -1e-3, "> 0"),
    ("optim.learning_rate", 0.0, "> 0"),
    ("optim.learning_rate", math.nan, "> 0"),
    ("optim.learning_rate", math.inf, "> 0"),
    ("optim.eps", 0.0, "> 0"),
    ("optim.b1", 1.0, "in [0, 1)"),
    ("optim.b1", -0.1, "in [0, 1)"),
    ("optim.b2", 1.0, "in [0, 1)"),
    ("optim.weight_decay", -0.01, ">= 0"),
    ("optim.max_grad_norm", 0.0, "> 0"),
    ("optim.warmup_steps", -1, ">= 0"),
    ("rollout.temperature", 0.0, "> 0"),
    ("rollout.top_p", 0.0, "in (0, 1]"),
    ("rollout.top_p", 1.5, "in (0, 1]"),
    ("rollout.top_k", -1, ">= 0"),
    ("rollout.probe_prob", 1.5, "in [0, 1]"),
    ("rollout.probe_prob", -0.1, "in [0, 1]"),
    ("rollout.group_size", 0, ">= 1"),
    ("rollout.max_turns", -1, ">= 0"),
    ("rollout.max_response_length", 0, ">= 1"),
    ("rollout.max_obs_length", 0, ">= 1"),
    ("rollout.max_start_length", 0, ">= 1"),
    ("rollout.max_context_length", 0, ">= 1"),
    ("rollout.topk", 0, ">= 1"),
    ("rollout.decode_chunk", 0, ">= 1"),
    ("rollout.prefill_chunk", 0, ">= 1"),
    ("rollout.prefill_rows", 0, ">= 1"),
    ("rollout.session_prompts", -1, ">= 0"),
    ("rollout.kv_page_size", -16, ">= 0"),
    ("rollout.kv_pages", -1, ">= 0"),
    ("train.mini_batch_size", 0, ">= 1"),
    ("train.micro_batch_size", 0, ">= 1"),
    ("train.length_multiple", 0, ">= 1"),
    ("train.logprob_chunk", 0, ">= 1"),
    ("loss.clip_low", -0.1, "in [0, 1)"),
    ("loss.clip_low", 1.0, "in [0, 1)"),
    ("loss.clip_high", -0.1, ">= 0"),
    ("loss.kl_coef", -0.001, ">= 0"),
    ("probes.keep_ratio", -0.1, "in [0, 1]"),
    ("probes.keep_ratio", 1.5, "in [0, 1]"),
    ("probes.ewma_weight", 0.0, "in (0, 1]"),
    ("probes.ewma_weight", 1.5, "in (0, 1]"),
    ("probes.keep_multiple", 0, ">= 1"),
    ("checkpoint.every", 0, ">= 1"),
    ("checkpoint.keep", 0, ">= 1"),
    ("eval.batch_size", 0, ">= 1"),
    ("distributed.num_processes", -1, ">= 0"),
    ("distributed.process_id", -2, ">= -1"),
    *[
        (f"model.arch.{k}", 0, ">= 1")
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
    ],
    ("model.arch.rope_theta", 0.0, "> 0"),
    ("model.arch.rms_norm_eps", 0.0, "> 0"),
]
# Edges of the ranges that are meaningful and must stay accepted.
ACCEPTED = [
    ("seed", 0),
    ("optim.warmup_steps", 0),
    ("optim.b1", 0.0),
    ("optim.weight_decay", 0.0),
    ("loss.clip_low", 0.0),
    ("loss.clip_high", 0.0),
    ("loss.kl_coef", 0.0),
    ("probes.keep_ratio", 0.0),
    ("probes.keep_ratio", 1.0),
    ("probes.ewma_weight", 1.0),
    ("rollout.top_p", 1.0),
    ("rollout.top_k", 0),
    ("rollout.probe_prob", 0.0),
    ("rollout.probe_prob", 1.0),
    ("rollout.max_turns", 0),
    ("rollout.session_prompts", 0),
    ("rollout.kv_page_size", 0),
    ("rollout.kv_pages", 0),
    ("cpu_devices", 0),
    ("distributed.process_id", -1),
    ("optim.learning_rate", 1e-9),
]


def set_key(c, key, value):
    *parents, leaf = key.split(".")
    for part in parents:
        c = c[part]
    c[leaf] = value


@pytest.mark.parametrize("key,value,allowed", REFUSED, ids=[f"{k}={v}" for k, v, _ in REFUSED])
def test_out_of_range_value_is_refused_naming_the_override(key, value, allowed):
    c = valid_config()
    set_key(c, key, value)
    with pytest.raises(ValueError) as e:
        validate_config(c)
    assert str(e.value) == f"--config.{key}={value!r}: must be {allowed}"


@pytest.mark.parametrize("key,value", ACCEPTED, ids=[f"{k}={v}" for k, v in ACCEPTED])
def test_range_edges_are_accepted(key, value):
    c = valid_config()
    set_key(c, key, value)
    validate_config(c)


def test_every_numeric_key_has_a_range():
    """A numeric key added to default_config() without a range would escape validation."""
    values = flatten(json.loads(default_config().to_json_best_effort()))
    numeric = {k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric - set(ALL_RANGES) == {"mesh.data", "mesh.fsdp", "mesh.tensor"}
    assert {k for k, _, _ in REFUSED} == set(ALL_RANGES)  # the table above covers them all


@pytest.mark.parametrize("size", [0, -2])
def test_mesh_axis_sizes(size):
    c = valid_config()
    c.mesh.tensor = size
    with pytest.raises(ValueError, match=rf"^--config.mesh.tensor={size}: must be -1 \(the devices left\) or >= 1$"):
        validate_config(c)


def test_all_bad_values_are_reported_at_once():
    c = valid_config()
    c.optim.learning_rate, c.rollout.top_p = -0.001, 0.0
    with pytest.raises(
        ValueError,
        match=r"--config.rollout.top_p=0.0: must be in \(0, 1\]; "
        r"--config.optim.learning_rate=-0.001: must be > 0",
    ):
        validate_config(c)


def test_evaluation_checks_only_what_it_uses():
    c = valid_config()
    c.rollout.temperature, c.optim.learning_rate = 0.0, -1.0  # evaluation decodes greedily and trains nothing
    validate_config(c, for_eval=True)
    c.rollout.max_response_length = 0
    with pytest.raises(ValueError, match=r"^--config.rollout.max_response_length=0: must be >= 1$"):
        validate_config(c, for_eval=True)

"""The typed configuration tree: one home for every default, doc and allowed value; the ConfigDict edge of
configs/*.py and `--config.x=y`; and the package layering it sits at the bottom of."""

import dataclasses
import importlib
import json
import subprocess
import sys

import ml_collections
import pytest

from rexrag_jax import config as C

TRAINING_CONFIGS = ["tiny_cpu", "qwen2p5_3b", "qwen2p5_7b", "embedded"]


def test_config_dict_round_trip_keeps_every_key_and_value():
    cd = C.default_config()
    assert C.from_config_dict(cd) == C.Config()
    assert C.to_config_dict(C.from_config_dict(cd)).to_dict() == cd.to_dict()
    # what a run's config.json records (resume compares it key by key)
    assert set(C.config_values(cd)) == {k for k, _, _ in C._walk(C.Config())}


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_config_file_converts_to_the_typed_tree(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    c = c.rl if name == "embedded" else c
    typed = C.from_config_dict(c)
    assert json.loads(ml_collections.ConfigDict(dataclasses.asdict(typed)).to_json_best_effort()) == json.loads(
        c.to_json_best_effort()
    )
    hash(typed)  # every section is a jit static argument


def test_unknown_keys_and_misplaced_sections_are_refused_by_name():
    cd = C.default_config()
    cd.loss.temperature = 0.7  # a key the tree does not have (temperature is rollout.temperature)
    with pytest.raises(ValueError, match=r"^config: unknown key\(s\) loss.temperature$"):
        C.from_config_dict(cd)
    with pytest.raises(ValueError, match="config optim must be a section"):
        C.from_config_dict({"optim": 1e-3})


def test_every_setting_is_documented_and_numeric_ones_have_a_range():
    for key, value, meta in C._walk(C.Config()):
        assert meta.get("doc"), key
        allowed = meta.get("allowed")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("mesh."):
            assert isinstance(allowed, C.Range), key
        if isinstance(allowed, tuple):
            assert value in allowed, key  # the default is one of the choices


def test_choices_have_one_home():
    from rexrag_jax import distributed
    from rexrag_jax.models import config as model_config
    from rexrag_jax.rl import batch

    assert model_config.REMAT_POLICIES is C.choices("model.remat")
    assert distributed.MODES is C.choices("distributed.mode")
    assert batch.PROMPT_PROBABILITIES is C.choices("probes.prompt_probability")


def test_training_and_greedy_rollouts():
    cfg = C.Config()
    assert C.training_rollout(cfg) is cfg.rollout
    assert C.training_rollout(cfg.replace(algorithm="grpo")).probe_prob == 0.0
    greedy = C.greedy_rollout(cfg.rollout)
    assert (greedy.group_size, greedy.temperature, greedy.probe_prob) == (1, 0.0, 0.0)
    assert greedy.max_turns == cfg.rollout.max_turns


def test_library_validation_leaves_the_inputs_to_the_caller():
    cfg = C.Config()  # no train_file, no retrieval source, model.init="hf" without a path
    with pytest.raises(ValueError, match="retrieval"):
        C.validate(cfg)
    assert C.validate(cfg, inputs=False) is cfg
    with pytest.raises(ValueError, match=r"^--config.rollout.temperature=0.0: must be > 0$"):
        C.validate(cfg.replace(rollout=dataclasses.replace(cfg.rollout, temperature=0.0)), inputs=False)


def test_packages_import_nothing_heavy():
    """`import rexrag_jax.data` must not start jax or the decode stack; the retrieval encoder must not load
    the policy decoder."""
    code = (
        "import sys\n"
        "import rexrag_jax, rexrag_jax.config, rexrag_jax.protocol, rexrag_jax.scoring, rexrag_jax.data, "
        "rexrag_jax.models, rexrag_jax.rollout, rexrag_jax.retrieval, rexrag_jax.eval, rexrag_jax.rl, "
        "rexrag_jax.planning, rexrag_jax.embedded, rexrag_jax.data.prompts\n"
        "heavy = [m for m in ('jax', 'flax', 'tensorflow_datasets', 'grain', 'transformers') if m in sys.modules]\n"
        "import rexrag_jax.retrieval.bert\n"
        "print(heavy, 'rexrag_jax.models.decoder' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]

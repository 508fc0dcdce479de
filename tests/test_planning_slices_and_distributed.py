"""TPU slice recipes (mesh, batch sizes, memory fit), the distributed helpers on one process, and
checkpoint paths that must survive as URLs."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from rexrag_jax import distributed
from rexrag_jax.planning.slices import HEADROOM, RECIPES, SLICE_CHIPS, recipe_memory, recipes_table
from rexrag_jax.rl.checkpoint import checkpoint_directory
from rexrag_jax.sharding import LOGICAL_RULES

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_config_file(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model,slice_name", sorted(RECIPES))
def test_recipe_fits_its_slice_and_loads_as_config(model, slice_name):
    r = RECIPES[(model, slice_name)]
    assert np.prod(r.mesh) == SLICE_CHIPS[slice_name]
    m = recipe_memory(model, slice_name)
    assert m["fits"] and m["total"] <= HEADROOM * m["hbm"]
    assert r.micro_batch_size % (r.mesh[0] * r.mesh[1]) == 0  # rows split over data x fsdp
    assert r.session_prompts == 0 or 512 % r.session_prompts == 0
    name = "qwen2p5_3b" if model == "qwen2.5-3b" else "qwen2p5_7b"
    cfg = load_config_file(name).get_config(slice_name)
    assert tuple(cfg.mesh[a] for a in ("data", "fsdp", "tensor")) == r.mesh
    assert cfg.train.micro_batch_size == r.micro_batch_size and cfg.rollout.session_prompts == r.session_prompts
    assert (cfg.rollout.kv_page_size, cfg.rollout.kv_pages) == (r.kv_page_size, r.kv_pages)
    assert cfg.data.batch_size == 512 and cfg.train.mini_batch_size % cfg.train.micro_batch_size == 0


def test_unknown_slice_names_the_known_ones():
    from rexrag_jax.planning.slices import recipe

    with pytest.raises(ValueError, match=r"no recipe for qwen2.5-3b on 'v4-8'; known slices: \['v5p-16'"):
        recipe("qwen2.5-3b", "v4-8")
    assert recipes_table().count("\n") == len(RECIPES) + 1


def test_batch_rule_is_what_recipes_assume():
    assert LOGICAL_RULES["batch"] == ("data", "fsdp")


def test_single_process_helpers_are_identities(devices):
    assert distributed.allgather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.shared_map(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]
    x = jax.device_put(
        np.arange(8.0), jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)), jax.sharding.PartitionSpec("d"))
    )
    np.testing.assert_array_equal(distributed.to_host(x), np.arange(8.0))
    distributed.sync("noop")


def test_initialize_validates_and_stays_off_on_one_host(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="distributed.mode='sometimes'"):
        distributed.initialize(mode="sometimes")
    with pytest.raises(ValueError, match="needs distributed.num_processes"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="needs distributed.process_id"):
        distributed.initialize("127.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match="process_id=2 must be < num_processes=2"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    assert distributed.initialize() is False  # no coordinator, not a TPU VM: a single-process run
    assert distributed.initialize("127.0.0.1:1234", 2, 0, mode="off") is False
    assert not distributed.on_tpu_vm()


def test_checkpoint_directories_keep_urls():
    assert checkpoint_directory("gs://bucket/run1/checkpoints") == "gs://bucket/run1/checkpoints"
    assert checkpoint_directory("runs/x") == os.path.abspath("runs/x")


def test_train_refuses_a_url_workdir():
    from rexrag_jax.cli.components import check_local_workdir

    with pytest.raises(ValueError, match="local directory on each host.*checkpoint.directory=gs://"):
        check_local_workdir("gs://bucket/run1")
    check_local_workdir("runs/run1")

"""Bad checkpoints fail with errors that name the problem (file, tensor, shapes, key)."""

import json
import shutil

import numpy as np
import pytest

from hf_fixtures import build_reference
from rexrag_jax.models import ModelConfig, load_hf
from rexrag_jax.models.weights import SafetensorsFolder, write_safetensors


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    build_reference("qwen2p5_3b_ratio_tied").save_pretrained(str(path))
    return path


def _copy(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files(tmp_path, good_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
    d = _copy(good_dir, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(str(d))


def test_unknown_architecture(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "m")
    _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unknown architecture.*gpt2"):
        load_hf(str(d))


def test_unsupported_rope_scaling(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "m")
    _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        load_hf(str(d))
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_hf(
            {
                **json.loads((good_dir / "config.json").read_text()),
                "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4},
            }
        )


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "m")
    _edit_config(d, intermediate_size=200)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(128, 192\).*\(128, 200\)"):
        load_hf(str(d))


def test_missing_tensor_and_layer_count(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "m")
    weights = SafetensorsFolder(str(d))
    tensors = {k: np.array(weights.get(k)) for k in weights.keys() if "layers.1.mlp.up_proj" not in k}
    write_safetensors(str(d / "model.safetensors"), tensors)
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(str(d))
    d2 = _copy(good_dir, tmp_path / "m2")
    _edit_config(d2, num_hidden_layers=1)
    with pytest.raises(ValueError, match="layer 1.*num_hidden_layers=1"):
        load_hf(str(d2))


def test_corrupt_files(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_hf(str(d))
    d2 = _copy(good_dir, tmp_path / "m2")
    (d2 / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_hf(str(d2))
    d3 = _copy(good_dir, tmp_path / "m3")
    (d3 / "model.safetensors").unlink()
    (d3 / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_hf(str(d3))


def test_config_validation():
    base = json.loads(
        json.dumps(
            {
                "model_type": "qwen2",
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 3,
                "num_key_value_heads": 2,
            }
        )
    )
    with pytest.raises(ValueError, match="num_heads=3 is not a multiple of num_kv_heads=2"):
        ModelConfig.from_hf(base)
    with pytest.raises(ValueError, match="missing required key 'vocab_size'"):
        ModelConfig.from_hf({k: v for k, v in base.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf({**base, "num_key_value_heads": 1, "use_sliding_window": True})
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf({**base, "num_key_value_heads": 1, "hidden_act": "gelu"})

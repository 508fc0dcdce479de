"""Evaluating a HF model directory: configs/eval_hf.py, the checkpoint's own tokenizer by default, an up-front
tokenizer / model vocabulary check, and `--help` of the absl CLIs."""

import json
import os
import subprocess
import sys

import pytest

import configs.eval_hf as eval_hf
from rexrag_jax.cli.components import check_tokenizer_fits, load_config_tokenizer, tokenizer_dir
from rexrag_jax.config import validate as validate_config
from rexrag_jax.models import ModelConfig
from rexrag_jax.models.tokenizer import check_vocab_fits, has_tokenizer_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|im_end|>"


def write_tokenizer(folder, n_words: int = 20) -> None:
    """A tiny word-level tokenizer with ChatML specials (ids n_words + 1..3), saved like a HF model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, n_words + 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        eos_token=EOS,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.save_pretrained(str(folder))


def write_hf_config(folder, vocab_size: int) -> None:
    config = ModelConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        eos_token_id=(1,),
    )
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f)


def test_eval_hf_config_loads_and_validates():
    cfg = eval_hf.get_config()
    with pytest.raises(ValueError, match=r"retrieval: set exactly one of url, index, corpus \(got none\)"):
        validate_config(cfg, for_eval=True)  # the retriever is named on the command line
    cfg.retrieval.corpus = "configs/data/tiny_corpus.jsonl"
    validate_config(cfg, for_eval=True)
    assert cfg.model.init == "hf" and cfg.tokenizer == ""
    assert cfg.cpu_devices == 1 and dict(cfg.mesh) == {"data": 1, "fsdp": 1, "tensor": 1}
    r = cfg.rollout
    assert (r.max_turns, r.max_response_length, r.max_obs_length, r.max_start_length, r.max_context_length, r.topk) == (
        5,
        500,
        500,
        2048,
        4096,
        3,
    )
    assert (r.group_size, r.temperature, r.probe_prob) == (1, 0.0, 0.0)
    # the files it names exist (relative to the checkout, or the installed configs from elsewhere)
    assert os.path.isfile(os.path.join(ROOT, cfg.retrieval.corpus))
    assert os.path.isdir(os.path.join(ROOT, cfg.eval.data_dir))


def test_the_checkpoints_own_tokenizer_is_the_default(tmp_path):
    model = tmp_path / "model"
    write_hf_config(model, vocab_size=32)
    cfg = eval_hf.get_config()
    assert not has_tokenizer_files(model) and tokenizer_dir(cfg, str(model)) is None  # -> Qwen2.5's
    write_tokenizer(model)
    assert has_tokenizer_files(model) and tokenizer_dir(cfg, str(model)) == str(model)
    tok = load_config_tokenizer(cfg, str(tmp_path / "work"), str(model))
    assert len(tok) == 24 and tok.convert_tokens_to_ids(EOS) == 21
    assert not (tmp_path / "work").exists()  # no Qwen2.5 tokenizer was built
    check_tokenizer_fits(cfg, tok, str(model))  # 24 ids <= 32 rows: fine (a padded embedding is normal)
    # model.path of a training config is the default model directory; --config.tokenizer wins over both
    cfg.model.path = str(model)
    assert tokenizer_dir(cfg) == str(model)
    other = tmp_path / "other_tokenizer"
    write_tokenizer(other, n_words=5)
    cfg.tokenizer = str(other)
    assert tokenizer_dir(cfg, str(model)) == str(other)


def test_a_tokenizer_larger_than_the_model_fails_up_front(tmp_path):
    model, tok_dir = tmp_path / "model", tmp_path / "tok"
    write_hf_config(model, vocab_size=21)  # the specials (ids 21-23) have no embedding row
    write_tokenizer(tok_dir)
    cfg = eval_hf.get_config()
    cfg.tokenizer = str(tok_dir)
    tok = load_config_tokenizer(cfg, str(tmp_path), str(model))
    with pytest.raises(ValueError) as e:
        check_tokenizer_fits(cfg, tok, str(model))
    message = str(e.value)
    assert f"tokenizer {tok_dir} (24 tokens incl. special/added, largest id 23)" in message
    assert f"model {model} (vocab_size 21)" in message and "3 token ids are >= 21" in message
    assert "'<|im_end|>'=21" in message and "--config.tokenizer=DIR" in message
    check_vocab_fits(tok, 24)  # exactly the tokenizer's size fits


def test_cli_names_both_vocabularies_before_loading_weights(tmp_path):
    """The newcomer's run: a SmolLM2-sized model directory without tokenizer files gets Qwen2.5's tokenizer;
    that used to fail minutes later ("stop sequence [151645] has token ids outside [0, 49152)")."""
    model = tmp_path / "smol"
    write_hf_config(model, vocab_size=49152)  # no weights: the check comes first
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [
        sys.executable,
        "-m",
        "rexrag_jax.cli.eval",
        "--config",
        "configs/eval_hf.py",
        "--checkpoint",
        str(model),
        "--datasets",
        "nq",
        "--output",
        str(tmp_path / "out"),
        "--config.retrieval.url=http://localhost:1",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(
        f"error: tokenizer {tmp_path / 'out' / 'tokenizer'} (Qwen2.5's, the default: model "
        f"{model} has no tokenizer files) (151665 tokens"
    ), error
    assert f"model {model} (vocab_size 49152)" in error and "'<|im_end|>'=151645" in error


@pytest.mark.parametrize(
    "module, flags",
    [
        ("eval", ("--checkpoint", "--datasets", "--limit", "--output", "--config", "--config.KEY=VALUE")),
        ("train", ("--config", "--workdir", "--[no]allow-config-change", "--config.KEY=VALUE")),
        ("demo", ("--config", "--workdir", "--pool_file")),
    ],
)
def test_help_lists_the_tools_own_flags(module, flags):
    """As a console script (`rexrag-eval --help`), absl printed only a usage line."""
    code = f"import sys; sys.argv[0] = 'rexrag-{module}'; from rexrag_jax.cli.{module} import cli; cli()"
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in flags:
        assert f"  {flag}" in out.stdout, (flag, out.stdout)
    assert f"`rexrag-{module}" in out.stdout  # the usage line of the module's docstring
    assert "Required." in out.stdout or module == "demo"

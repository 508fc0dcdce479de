"""The evaluator: greedy search agent over datasets, EM/F1 in the paper's layout, resume after a crash."""

import json
import os
import subprocess
import sys

import pytest

from rexrag_jax.data import QAExample, prompt_ids
from rexrag_jax.eval import evaluate, results_table
from rexrag_jax.models import ModelConfig, init_model
from rexrag_jax.rollout import RolloutConfig
from rexrag_jax.sharding import make_mesh
from rollout_fakes import FakeRetriever, ScriptedEngine


def policy(row: int, text: str) -> str:
    """Searches once, then answers "Paris" to every question: right for the capital-of-France ones."""
    tail = text[text.rfind("<|im_start|>assistant") :]
    if "<information>" not in tail:
        return "<think> look it up </think><search> capital </search>"
    return "<think> found </think><answer> Paris </answer>"


class Counting(ScriptedEngine):
    def rollout(self, params, prompts, **kw):
        self.calls = getattr(self, "calls", 0) + len(prompts)
        return super().rollout(params, prompts, **kw)


@pytest.fixture(scope="module")
def engine(qwen25_tokenizer, devices):
    tok = qwen25_tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = init_model(
        ModelConfig(
            architecture="qwen2",
            vocab_size=151936,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=8,
            tie_word_embeddings=True,
            eos_token_id=(eos,),
        ),
        mesh=make_mesh((2, 2, 2)),
    )
    config = RolloutConfig(
        group_size=1,
        temperature=0.0,
        probe_prob=0.0,
        max_turns=2,
        max_response_length=24,
        max_context_length=512,
        precompile=False,
    )
    return Counting(model, tok, FakeRetriever(), config, policy=policy)


def datasets():
    nq = [
        QAExample(f"nq{i}", q, golds)
        for i, (q, golds) in enumerate(
            [
                ("What is the capital of France", ("Paris",)),
                ("Capital city of France?", ("paris", "Paris, France")),
                ("Who wrote Hamlet", ("Shakespeare",)),
            ]
        )
    ]
    hotpot = [QAExample("h0", "Where is the Louvre", ("Paris",)), QAExample("h1", "Largest planet", ("Jupiter",))]
    return {"hotpotqa": hotpot, "nq": nq}


def test_scores_table_and_trajectories(engine, qwen25_tokenizer, tmp_path):
    engine.calls = 0
    results = evaluate(
        engine,
        None,
        qwen25_tokenizer,
        datasets(),
        str(tmp_path),
        batch_size=2,
        progress=False,
        encode_prompt=lambda q: prompt_ids(qwen25_tokenizer, q),
    )
    assert results["nq"] == {"n": 3, "em": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3)}
    assert results["hotpotqa"]["em"] == 50.0 and engine.calls == 5
    assert json.load(open(tmp_path / "results.json")) == results
    table = open(tmp_path / "results.md").read()
    assert table.splitlines()[0] == "| metric | NQ | HotpotQA | Avg |"  # the paper's column order
    assert "| EM | 66.7 | 50.0 | 58.3 |" in table
    rows = [json.loads(line) for line in open(tmp_path / "trajectories" / "nq.jsonl")]
    assert [r["id"] for r in rows] == ["nq0", "nq1", "nq2"]
    assert rows[2]["prediction"] == "Paris" and rows[2]["em"] == 0.0 and rows[0]["searches"] == 1
    assert "<information>" in rows[0]["response"] and rows[0]["finish"] == "answer"


def test_resume_skips_finished_questions_and_repairs_a_cut_line(engine, qwen25_tokenizer, tmp_path):
    encode = lambda q: prompt_ids(qwen25_tokenizer, q)
    evaluate(
        engine,
        None,
        qwen25_tokenizer,
        {"nq": datasets()["nq"][:2]},
        str(tmp_path),
        batch_size=2,
        progress=False,
        encode_prompt=encode,
    )
    path = tmp_path / "trajectories" / "nq.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "nq2", "pred')  # the process died mid-line
    engine.calls = 0
    results = evaluate(
        engine,
        None,
        qwen25_tokenizer,
        {"nq": datasets()["nq"]},
        str(tmp_path),
        batch_size=2,
        progress=False,
        encode_prompt=encode,
    )
    assert engine.calls == 1 and results["nq"]["n"] == 3
    assert [json.loads(line)["id"] for line in open(path)] == ["nq0", "nq1", "nq2"]
    subset = evaluate(
        engine,
        None,
        qwen25_tokenizer,
        {"nq": datasets()["nq"][:1]},
        str(tmp_path),
        progress=False,
        encode_prompt=encode,
    )
    assert subset["nq"]["n"] == 1  # scores cover the examples asked for, not every row of the folder
    with open(path, "r+") as f:  # damage that is not a cut-off last line is an error, not silently dropped
        lines = f.readlines()
        lines[0] = "garbage\n"
        f.seek(0)
        f.writelines(lines)
    with pytest.raises(ValueError, match=r"nq.jsonl:1: not JSON"):
        evaluate(
            engine,
            None,
            qwen25_tokenizer,
            {"nq": datasets()["nq"]},
            str(tmp_path),
            progress=False,
            encode_prompt=encode,
        )


def test_evaluation_must_be_greedy(engine, qwen25_tokenizer, tmp_path):
    from dataclasses import replace

    engine_cfg = engine.config
    engine.config = replace(engine_cfg, temperature=1.0)
    try:
        with pytest.raises(ValueError, match="greedily"):
            evaluate(engine, None, qwen25_tokenizer, datasets(), str(tmp_path), encode_prompt=lambda q: [1])
    finally:
        engine.config = engine_cfg


def test_results_table_layout():
    table = results_table(
        {
            "bamboogle": {"n": 2, "em": 50.0, "f1": 75.0},
            "nq": {"n": 1, "em": 0.0, "f1": 10.0},
            "custom": {"n": 1, "em": 100.0, "f1": 100.0},
        }
    )
    assert table.splitlines()[0] == "| metric | NQ | Bamboogle | custom | Avg |"
    assert "| F1 | 10.0 | 75.0 | 100.0 | 61.7 |" in table


def test_cli_missing_checkpoint_is_reported_and_not_created(tmp_path):
    """A mistyped --checkpoint used to be created (<path>/eval/tokenizer/...) and then blamed for not being
    a checkpoint; now it is named as missing, with nothing written."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)

    def evaluate(checkpoint):
        cmd = [
            sys.executable,
            "-m",
            "rexrag_jax.cli.eval",
            "--config",
            "configs/tiny_cpu.py",
            "--checkpoint",
            str(checkpoint),
            "--datasets",
            "nq",
        ]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    missing = tmp_path / "nockpt"
    out = evaluate(missing)
    assert out.returncode == 2 and f"error: checkpoint {missing} does not exist" in out.stderr
    assert not missing.exists()
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    out = evaluate(empty)
    assert out.returncode == 2 and "neither a training checkpoint" in out.stderr
    assert os.listdir(empty) == []

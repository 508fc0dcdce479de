"""`rexrag-train` as users run it: real processes, the tiny CPU config end to end (real retriever and
engine), bad overrides, a SIGKILL mid-run whose restart reproduces the uninterrupted run, a resume that
changes the number of steps, and one from a corrupt latest checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rexrag_jax.rl.metrics import read_metrics
from test_resume_guard import corrupt_all_but_the_largest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config cut down further: 2 questions x 2 rollouts, one search turn, a checkpoint every step, on
# one CPU device (XLA:CPU runs the 8-device programs ~3x slower on 2 cores; sharding has its own tests).
ONE_DEVICE = ["--config.cpu_devices=1", "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
SMALL = [
    "--config.steps=3",
    "--config.data.batch_size=2",
    "--config.rollout.group_size=2",
    "--config.rollout.max_turns=1",
    "--config.rollout.max_response_length=12",
    "--config.checkpoint.every=1",
    "--config.progress=False",
    *ONE_DEVICE,
]
TIMING = ("time_", "tokens_per_s")


def command(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "rexrag_jax.cli.train",
        "--config",
        "configs/tiny_cpu.py",
        "--workdir",
        str(workdir),
        *SMALL,
        *extra,
    ]


@pytest.fixture(scope="module")
def env(cli_env):
    return cli_env  # the runs compile the same programs: the shared cache makes all but the first start fast


def run(cmd, env, timeout=900):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_unknown_or_bad_override_fails_clearly(tmp_path, env):
    out = run(command(tmp_path, "--config.rollout.max_turnz=3"), env, timeout=120)
    assert out.returncode == 2
    assert "unknown config key" in out.stderr and "max_turnz" in out.stderr and 'Did you mean "max_turns"' in out.stderr
    out = run(command(tmp_path, "--config.algorithm=ppo"), env, timeout=300)
    assert out.returncode == 2 and "algorithm='ppo'" in out.stderr
    out = run(command(tmp_path, "--config.optim.learning_rate=-1e-3"), env, timeout=300)
    assert out.returncode == 2 and "error: --config.optim.learning_rate=-0.001: must be > 0" in out.stderr
    assert os.listdir(tmp_path) == []  # refused before anything was written


def comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, env):
    """One uninterrupted 3-step run of the tiny config (shared by the restart and evaluation tests)."""
    workdir = tmp_path_factory.mktemp("whole")
    out = run(command(workdir), env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["last_step"] == 3
    return workdir


def test_training_run_outputs(whole_run):
    rows = read_metrics(str(whole_run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["trajectories"] == 4 and r["skipped_updates"] == 0 for r in rows)
    assert sorted(os.listdir(whole_run / "checkpoints")) == ["2", "3"]  # saved every step, keep 2
    assert "nq_hotpotqa" in os.listdir(whole_run / "tfds" / "rexrag_qa")  # the training file, built once
    assert os.listdir(whole_run / "tensorboard") and os.path.exists(whole_run / "config.json")


@pytest.mark.slow
def test_sigkill_and_restart_reproduce_the_uninterrupted_run(whole_run, tmp_path, env):
    expected = read_metrics(str(whole_run / "metrics.jsonl"))
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = workdir / "checkpoints" / "2"
    deadline = time.time() + 900
    while not committed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert committed.exists(), "the run never committed checkpoint 2"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps[-1] == 2, f"killed too late: checkpoints {steps}"

    resumed = run(command(workdir), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step 2" in resumed.stdout
    got = read_metrics(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3]  # each step once, step 3 recomputed after the restart
    for a, b in zip(got, expected):
        assert comparable(a) == comparable(b)


def test_resume_from_a_corrupt_checkpoint_with_an_allowed_change(whole_run, tmp_path, env):
    """One restart checks both: a corrupt newest step costs one warning line (was ~8,000 lines of orbax /
    asyncio tracebacks), and an allowed config change is applied and recorded."""
    workdir = tmp_path / "resumed"
    shutil.copytree(whole_run, workdir)
    corrupt_all_but_the_largest(str(workdir / "checkpoints" / "3"))
    out = run(command(workdir, "--config.steps=4", "--allow-config-change"), env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert text.count("is unreadable or corrupt") == 1 and "falling back to step 2" in out.stdout
    assert "resumed from checkpoint step 2" in out.stdout
    assert "Event loop is closed" not in text and "Exception ignored" not in text
    assert len(text.splitlines()) <= 16, text[-3000:]
    assert "resumed from step 2; changed: steps 3 -> 4" in out.stdout
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl"))] == [1, 2, 3, 4]  # step 3 redone
    assert json.loads((workdir / "config.json").read_text())["steps"] == 4  # the allowed change is recorded
    [event] = read_metrics(str(workdir / "resume.jsonl"))
    assert event["step"] == 2 and event["changed"] == {"steps": [3, 4]}


def test_evaluate_a_training_checkpoint_and_resume(whole_run, tmp_path, env):
    def evaluate(limit):
        cmd = [
            sys.executable,
            "-m",
            "rexrag_jax.cli.eval",
            "--config",
            "configs/tiny_cpu.py",
            "--checkpoint",
            str(whole_run),
            "--datasets",
            "nq,hotpotqa",
            "--limit",
            str(limit),
            "--output",
            str(tmp_path / "eval"),
            "--config.rollout.max_turns=1",
            "--config.rollout.max_response_length=12",
            "--config.progress=False",
            *ONE_DEVICE,
        ]
        return run(cmd, env)

    first = evaluate(2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "evaluating step 3 of" in first.stdout and "nq (2), hotpotqa (2)" in first.stdout
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert {k: v["n"] for k, v in results.items()} == {"nq": 2, "hotpotqa": 2}
    nq = tmp_path / "eval" / "trajectories" / "nq.jsonl"
    before = open(nq).read().splitlines()
    second = evaluate(4)  # resumes: the first two questions are not run again
    assert second.returncode == 0, second.stderr[-3000:]
    after = open(nq).read().splitlines()
    assert after[:2] == before and len(after) == 4
    assert [json.loads(x)["id"] for x in after] == ["test_0", "test_1", "test_2", "test_3"]
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert results["nq"]["n"] == 4 and results["hotpotqa"]["n"] == 3  # hotpotqa/dev has 3 questions
    table = open(tmp_path / "eval" / "results.md").read()
    assert table.startswith("| metric | NQ | HotpotQA | Avg |")
    bad = run(
        [
            sys.executable,
            "-m",
            "rexrag_jax.cli.eval",
            "--config",
            "configs/tiny_cpu.py",
            "--checkpoint",
            str(whole_run),
            "--datasets",
            "nq,musique",
            *ONE_DEVICE,
        ],
        env,
        timeout=300,
    )
    assert bad.returncode == 2 and "musique" in bad.stderr

"""`rexrag-train` as users run it: real processes, the tiny CPU config end to end (real retriever and
engine), bad overrides, and a SIGKILL mid-run whose restart reproduces the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rexrag_jax.rl.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config cut down further: 2 questions x 2 rollouts, one search turn, a checkpoint every step.
SMALL = ["--config.steps=3", "--config.data.batch_size=2", "--config.rollout.group_size=2",
         "--config.rollout.max_turns=1", "--config.rollout.max_response_length=12", "--config.checkpoint.every=1",
         "--config.progress=False"]
TIMING = ("time_", "tokens_per_s")


def command(workdir, *extra):
    return [sys.executable, "-m", "rexrag_jax.cli.train", "--config", "configs/tiny_cpu.py", "--workdir",
            str(workdir), *SMALL, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the config asks for its 8 CPU devices itself
    # The three runs compile the same programs; a persistent cache makes the second and third start fast.
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run(cmd, env, timeout=900):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_unknown_or_bad_override_fails_clearly(tmp_path, env):
    out = run(command(tmp_path, "--config.rollout.max_turnz=3"), env, timeout=120)
    assert out.returncode == 2
    assert "unknown config key" in out.stderr and "max_turnz" in out.stderr and 'Did you mean "max_turns"' in out.stderr
    out = run(command(tmp_path, "--config.algorithm=ppo"), env, timeout=300)
    assert out.returncode == 2 and "algorithm='ppo'" in out.stderr


def comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


@pytest.mark.slow
def test_sigkill_and_restart_reproduce_the_uninterrupted_run(tmp_path, env):
    whole = run(command(tmp_path / "whole"), env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = read_metrics(str(tmp_path / "whole" / "metrics.jsonl"))
    assert [r["step"] for r in expected] == [1, 2, 3]
    assert all(r["trajectories"] == 4 and r["skipped_updates"] == 0 for r in expected)
    assert json.loads(whole.stdout.strip().splitlines()[-1])["last_step"] == 3
    assert sorted(os.listdir(tmp_path / "whole" / "checkpoints")) == ["2", "3"]  # saved every step, keep 2

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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

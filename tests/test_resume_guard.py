"""A resumed training run stays the run its checkpoints belong to: `rexrag-train` refuses a workdir's
checkpoints under another config (naming the keys, changing nothing), `--allow-config-change` lets only
steps, checkpoint cadence, eval and progress settings change; and a corrupt latest checkpoint costs one
warning line, not thousands of lines of orbax/asyncio tracebacks.

The resumes that really train are in test_train_cli.py (they share its tiny run)."""

import glob
import importlib
import os
import re
import subprocess
import sys

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rexrag_jax.config import ABSENT, RESUMABLE_CHANGES, config_values, resume_changes
from rexrag_jax.rl.checkpoint import Checkpointer, abstract_like, committed_steps
from rexrag_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = importlib.import_module("configs.tiny_cpu")


# --------------------------------------------------------------------------- the policy, as a pure function

OLD = {
    "steps": 10,
    "optim.learning_rate": 0.001,
    "rollout.group_size": 5,
    "algorithm": "rexrag",
    "checkpoint.every": 2,
    "progress": True,
}


def test_an_unchanged_config_resumes():
    assert resume_changes(OLD, dict(OLD), allow_change=False, workdir="W") == {}


def test_a_changed_config_is_refused_naming_each_key():
    new = {**OLD, "optim.learning_rate": 0.002, "rollout.group_size": 6}
    with pytest.raises(
        ValueError,
        match=r"^workdir W was started with a different config: "
        r"optim.learning_rate 0.001 -> 0.002, rollout.group_size 5 -> 6; ",
    ):
        resume_changes(OLD, new, allow_change=False, workdir="W")
    with pytest.raises(
        ValueError,
        match="optim.learning_rate 0.001 -> 0.002, rollout.group_size 5 -> 6; these keys "
        "cannot change on resume, even with --allow-config-change",
    ):
        resume_changes(OLD, new, allow_change=True, workdir="W")


def test_safe_keys_change_only_with_the_flag():
    new = {**OLD, "steps": 20, "checkpoint.every": 5, "progress": False}
    with pytest.raises(
        ValueError,
        match=r"checkpoint.every 2 -> 5, progress true -> false, steps 10 -> 20; "
        r"pass --allow-config-change",
    ):
        resume_changes(OLD, new, allow_change=False, workdir="W")
    assert resume_changes(OLD, new, allow_change=True, workdir="W") == {
        "checkpoint.every": (2, 5),
        "progress": (True, False),
        "steps": (10, 20),
    }


def test_the_flag_does_not_let_other_keys_through():
    new = {**OLD, "steps": 20, "algorithm": "grpo"}
    with pytest.raises(ValueError) as e:
        resume_changes(OLD, new, allow_change=True, workdir="W")
    assert 'algorithm "rexrag" -> "grpo"' in str(e.value) and "steps 10" not in str(e.value)


def test_a_key_only_one_config_has_is_a_change():
    with pytest.raises(ValueError, match=re.escape(f"loss.new_knob {ABSENT} -> 1")):
        resume_changes(OLD, {**OLD, "loss.new_knob": 1}, allow_change=True, workdir="W")


def test_resumable_keys_exist():
    assert set(RESUMABLE_CHANGES) <= set(config_values(TINY.get_config()))


# --------------------------------------------------------------------------- the CLI refuses before writing


def train(workdir, *extra, timeout=300):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "rexrag_jax.cli.train",
        "--config",
        "configs/tiny_cpu.py",
        "--workdir",
        str(workdir),
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(root):
    return {
        os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, dirs, files in os.walk(root)
        for f in files + dirs
    }


@pytest.fixture
def started(tmp_path):
    """A workdir as a run of configs/tiny_cpu.py leaves it after its step-4 checkpoint (no arrays are read:
    the refusal comes first)."""
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "config.json").write_text(TINY.get_config().to_json_best_effort(indent=2))
    return tmp_path


def test_cli_refuses_another_config_and_changes_nothing(started):
    before, config = snapshot(started), (started / "config.json").read_text()
    out = train(started, "--config.optim.learning_rate=0.002", "--config.rollout.group_size=6")
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        f"error: workdir {started} was started with a different config: optim.learning_rate 0.0001 -> 0.002, "
        "rollout.group_size 3 -> 6; "
    ) in out.stderr
    out = train(started, "--config.optim.learning_rate=0.002", "--config.steps=8", "--allow-config-change")
    assert out.returncode == 2 and "optim.learning_rate 0.0001 -> 0.002; these keys cannot change" in out.stderr
    assert snapshot(started) == before and (started / "config.json").read_text() == config


def test_cli_without_checkpoints_is_a_fresh_start(started):
    """A run that stopped before its first checkpoint (here: a mistyped data file) resumes nothing, so the
    next start may use another config; it records that config."""
    os.rmdir(started / "checkpoints" / "4")
    out = train(started, "--config.optim.learning_rate=0.002", "--config.data.train_file=missing.jsonl")
    assert out.returncode == 2 and "data.train_file: 'missing.jsonl' does not exist" in out.stderr
    assert '"learning_rate": 0.002' in (started / "config.json").read_text()
    assert committed_steps(str(started / "checkpoints")) == []


# --------------------------------------------------------------------------- a corrupt latest checkpoint


def corrupt_all_but_the_largest(step_dir) -> None:
    """Bit rot every 512 bytes of each OCDBT data file but the largest (and the tiny index nodes), so some
    array reads fail while others, in the largest file, are still in flight (orbax lays files out
    differently from run to run)."""
    files = sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
    for path in files[:-1]:
        size = os.path.getsize(path)
        if size > 1024:
            with open(path, "r+b") as f:
                for offset in range(0, size - 32, 512):
                    f.seek(offset)
                    f.write(os.urandom(32))


def restore_after_corruption(directory: str) -> None:
    """Save steps 1 and 2 of a small sharded state, corrupt step 2, restore (in a process of its own, so
    that everything orbax prints, up to the interpreter's exit, is seen)."""
    sharding = NamedSharding(make_mesh((2, 2, 2)), PartitionSpec(("data", "fsdp"), "tensor"))
    state = {f"w{i}": jax.device_put(jax.random.normal(jax.random.key(i), (64, 64)), sharding) for i in range(8)}
    state["big"] = jax.device_put(jax.random.normal(jax.random.key(99), (8192, 2048)), sharding)
    ckpt = Checkpointer(directory, async_save=False)
    for step in (1, 2):
        ckpt.save(step, state, {"rho": 0.1}, force=True)
    ckpt.close()
    corrupt_all_but_the_largest(os.path.join(directory, "2"))
    ckpt = Checkpointer(directory, async_save=False)
    step, _, meta = ckpt.restore(abstract_like(state))
    ckpt.close()
    print(f"restored step {step}, rho {meta['rho']}", flush=True)


def test_corrupt_latest_checkpoint_falls_back_with_one_warning(tmp_path):
    """Orbax 0.12 left the reads of a failed restore pending on a closed event loop: each printed an "Event
    loop is closed" traceback, then an "Exception ignored in <coroutine>" one when collected (230 of them
    in 8,000 lines for the tiny config; 600 to 5,000 lines here). A big array keeps reads in flight when
    another read fails."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # keep what the caller added
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=path)
    out = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "restored step 1, rho 0.1" in out.stdout
    assert text.count(f"WARNING: checkpoint {tmp_path}/2 is unreadable or corrupt (ValueError: ") == 1
    assert "falling back to step 1 (set aside as 2.unreadable-0)" in text
    assert "Event loop is closed" not in text and "Exception ignored" not in text
    assert len(text.splitlines()) <= 4, text[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["1", "2.unreadable-0"]


if __name__ == "__main__":
    restore_after_corruption(sys.argv[1])

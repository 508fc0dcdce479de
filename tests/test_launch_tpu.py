"""launch/tpu.py: TPU slice arithmetic, input checks and the exact gcloud commands (no gcloud needed)."""

import importlib.util
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

REAL_RUN = subprocess.run  # the autouse fixture below replaces subprocess.run itself

REPO = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("launch_tpu", REPO / "launch" / "tpu.py")
tpu = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tpu)

SLICE = ["--name", "rex", "--zone", "us-east5-a", "--project", "my-proj"]
RUN = ["run", *SLICE, "--config", "configs/qwen2p5_3b.py", "--workdir", "runs/run1"]


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    """Nothing here may start a process unless a test allows it."""

    def refuse(*a, **k):
        raise AssertionError(f"subprocess.run called: {a}")

    monkeypatch.setattr(tpu.subprocess, "run", refuse)


def dry(capsys, *argv):
    """Run `tpu.py ARGV --dry-run`; the printed commands as argv lists."""
    assert (
        tpu.main(
            [*argv, "--dry-run"]
            if "--" not in argv
            else [*argv[: argv.index("--")], "--dry-run", *argv[argv.index("--") :]]
        )
        == 0
    )
    out = capsys.readouterr().out
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def remote(cmd):
    (command,) = [a for a in cmd if a.startswith("--command=")]
    return command[len("--command=") :]


@pytest.mark.parametrize(
    "name, generation, gcloud_type, chips, hosts, runtime",
    [
        ("v4-8", "v4", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
        ("v4-32", "v4", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
        ("v5e-8", "v5e", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", "v5e", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
        ("v5e-16", "v5e", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v5p", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
        ("v5p-16", "v5p", "v5p-16", 8, 2, "v2-alpha-tpuv5"),
        ("v5p-32", "v5p", "v5p-32", 16, 4, "v2-alpha-tpuv5"),
        ("v6e-8", "v6e", "v6e-8", 8, 1, "v2-alpha-tpuv6e"),
        ("v6e-16", "v6e", "v6e-16", 16, 4, "v2-alpha-tpuv6e"),
        ("V6E-4", "v6e", "v6e-4", 4, 1, "v2-alpha-tpuv6e"),
    ],
)
def test_slice_info(name, generation, gcloud_type, chips, hosts, runtime):
    info = tpu.slice_info(name)
    assert (info["generation"], info["gcloud_type"], info["chips"], info["hosts"], info["runtime"]) == (
        generation,
        gcloud_type,
        chips,
        hosts,
        runtime,
    )
    assert info["chips_per_host"] * info["hosts"] == info["chips"]


@pytest.mark.parametrize("bad", ["v3-8", "v5p-12", "v4-4", "v5e-2", "v6e-512", "tpu", "v5p-", "v4-8x"])
def test_slice_info_rejects(bad):
    with pytest.raises(tpu.UsageError, match="valid:"):
        tpu.slice_info(bad)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["create", "--name", "rex", "--zone", "us-east5-a", "--type", "v3-8"], "'v3-8'"),
        (["create", "--name", "rex", "--zone", "us-east5-a", "--type", "v5p-12"], "'v5p-12'"),
        (["create", "--name", "Rex", "--zone", "us-east5-a", "--type", "v5p-8"], "'Rex'"),
        (["create", "--name", "1rex", "--zone", "us-east5-a", "--type", "v5p-8"], "'1rex'"),
        (["create", "--name", "rex_1", "--zone", "us-east5-a", "--type", "v5p-8"], "'rex_1'"),
        (["create", "--name", "r" * 64, "--zone", "us-east5-a", "--type", "v5p-8"], "r" * 64),
        (["create", "--name", "rex", "--zone", "us east", "--type", "v5p-8"], "'us east'"),
        (["create", "--name", "rex", "--zone", "us-east5-a"], "--type"),
        (["delete", "--zone", "us-east5-a"], "--name"),
        (["run", *SLICE, "--config", "configs/nope.py", "--workdir", "w"], "configs/nope.py"),
        (["run", *SLICE, "--config", "configs/qwen2p5_3b.py", "--workdir", "w", "--entry", "serve"], "serve"),
        (["delete", *SLICE, "--", "--config.steps=1"], "--config.steps=1"),
        (["collect", *SLICE, "--dest", "out", "--dry-run"], "--type or --hosts"),
        (["collect", *SLICE, "--dest", "out", "--hosts", "1", "--workdir", "gs://b/run1"], "'gs://b/run1'"),
        (["collect", *SLICE, "--dest", "out", "--hosts", "1", "--workdir", "../run1"], "'../run1'"),
        (["bogus"], "bogus"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, named):
    assert tpu.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err


def test_create(capsys):
    (cmd,) = dry(capsys, "create", *SLICE, "--type", "v5e-16", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rex"]
    for piece in (
        "--zone=us-east5-a",
        "--project=my-proj",
        "--accelerator-type=v5litepod-16",
        "--version=v2-alpha-tpuv5-lite",
        "--spot",
    ):
        assert piece in cmd
    (cmd,) = dry(
        capsys,
        "create",
        "--name",
        "rex",
        "--zone",
        "us-central2-b",
        "--type",
        "v4-32",
        "--version",
        "my-runtime",
        "--reserved",
    )
    assert "--accelerator-type=v4-32" in cmd and "--version=my-runtime" in cmd and "--reserved" in cmd
    assert not any(a.startswith("--project") for a in cmd)


def test_spot_and_reserved_exclude_each_other(capsys):
    assert tpu.main(["create", *SLICE, "--type", "v5p-8", "--spot", "--reserved", "--dry-run"]) == 2
    assert "not allowed" in capsys.readouterr().err


def test_delete_and_describe(capsys):
    assert dry(capsys, "delete", *SLICE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rex", "--quiet", "--zone=us-east5-a", "--project=my-proj"]
    ]
    for verb in ("status", "describe"):
        assert dry(capsys, verb, *SLICE) == [
            ["gcloud", "compute", "tpus", "tpu-vm", "describe", "rex", "--zone=us-east5-a", "--project=my-proj"]
        ]


def test_install(capsys):
    check, archive, scp, ssh = dry(capsys, "install", *SLICE)
    assert check == ["git", "-C", str(tpu.REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]
    tarball = tpu.local_tarball("rex")
    assert archive == ["git", "-C", str(tpu.REPO_ROOT), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert tarball in scp and "rex:rexrag_jax-src.tar.gz" in scp and "--worker=all" in scp
    assert "--project=my-proj" in scp and "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    assert remote(ssh) == (
        "mkdir -p rexrag_jax && tar xzf rexrag_jax-src.tar.gz -C rexrag_jax && "
        "rm -f rexrag_jax-src.tar.gz && bash rexrag_jax/launch/install_worker.sh"
    )
    archive, scp, ssh = dry(capsys, "install", *SLICE, "--allow-dirty", "--repo-dir", "~/src/rex")
    assert archive[:2] == ["sh", "-c"] and "git stash create" in archive[2] and archive[-1] == tarball
    assert "bash src/rex/launch/install_worker.sh" in remote(ssh)


def test_install_refuses_a_dirty_tree(capsys, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return types.SimpleNamespace(returncode=0, stdout=" M rexrag_jax/cli/train.py\n", stderr="")

    monkeypatch.setattr(tpu.subprocess, "run", fake_run)
    assert tpu.main(["install", *SLICE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: uncommitted changes") and "rexrag_jax/cli/train.py" in err and "--allow-dirty" in err
    assert calls == [tpu.dirty_check_command()]  # nothing shipped


def test_run(capsys):
    (cmd,) = dry(capsys, *RUN, "--", "--config.steps=10")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rex"]
    assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd and "--project=my-proj" in cmd
    line = remote(cmd)
    assert line.startswith("cd rexrag_jax && ")
    assert (
        ".venv/bin/python -m rexrag_jax.cli.train --config configs/qwen2p5_3b.py --workdir runs/run1 "
        "--config.steps=10" in line
    )
    assert line.endswith("2>&1 | tee logs/train-run1.$(hostname).log") and "pipefail" in line

    (cmd,) = dry(capsys, *RUN, "--detach", "--entry", "eval", "--run", "ev1")
    line = remote(cmd)
    assert (
        "nohup .venv/bin/python -m rexrag_jax.cli.eval --config configs/qwen2p5_3b.py --checkpoint runs/run1 "
        "> logs/ev1.$(hostname).log 2>&1 < /dev/null &" in line
    )


@pytest.mark.parametrize("entry", ["train", "demo"])
def test_run_refuses_a_url_workdir_for_train_and_demo(capsys, entry):
    assert tpu.main([*RUN[:-1], "gs://b/run1", "--entry", entry, "--dry-run", "--", "--config.steps=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "error: --workdir gs://b/run1 is a directory on each worker; put checkpoints in a bucket with "
        "-- --config.checkpoint.directory=gs://...\n"
    )


def test_run_checkpoints_in_a_bucket_and_eval_of_a_gs_checkpoint(capsys):
    (cmd,) = dry(capsys, *RUN, "--detach", "--", "--config.checkpoint.directory=gs://b/run1/checkpoints")
    assert (
        "-m rexrag_jax.cli.train --config configs/qwen2p5_3b.py --workdir runs/run1 "
        "--config.checkpoint.directory=gs://b/run1/checkpoints > logs/train-run1.$(hostname).log" in remote(cmd)
    )
    (cmd,) = dry(capsys, *RUN[:-1], "gs://b/run1/checkpoints", "--entry", "eval")
    assert (
        "-m rexrag_jax.cli.eval --config configs/qwen2p5_3b.py --checkpoint gs://b/run1/checkpoints "
        "2>&1 | tee logs/eval-checkpoints.$(hostname).log" in remote(cmd)
    )


def test_run_config_path_is_made_relative_to_the_checkout(capsys, monkeypatch):
    monkeypatch.chdir(REPO / "configs")
    (cmd,) = dry(capsys, *RUN[:-4], "--config", "qwen2p5_7b.py", "--workdir", "/tmp/w", "--entry", "demo")
    assert "-m rexrag_jax.cli.demo --config configs/qwen2p5_7b.py --workdir /tmp/w" in remote(cmd)
    assert "logs/demo-w.$(hostname).log" in remote(cmd)


def test_logs(capsys):
    (cmd,) = dry(capsys, "logs", *SLICE, "--worker", "3", "--run", "train-run1", "--follow")
    assert "--worker=3" in cmd and remote(cmd) == "cd rexrag_jax && tail -n 100 -F logs/train-run1.$(hostname).log"
    (cmd,) = dry(capsys, "logs", *SLICE)
    assert "--worker=0" in cmd and "ls -t logs/*.log" in remote(cmd)


def test_collect(capsys):
    cmds = dry(capsys, "collect", *SLICE, "--type", "v5p-32", "--dest", "runs/r1", "--run", "train-run1")
    assert len(cmds) == 8  # mkdir + scp for each of 4 workers
    for i in range(4):
        mkdir, scp = cmds[2 * i : 2 * i + 2]
        assert mkdir == ["mkdir", "-p", f"runs/r1/worker{i}"]
        assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
        assert scp[5:8] == ["rex:rexrag_jax/logs/train-run1.*.log", f"runs/r1/worker{i}/", f"--worker={i}"]
    assert len(dry(capsys, "collect", *SLICE, "--hosts", "2", "--dest", "d")) == 4


def test_collect_workdir_fetches_worker0_metrics(capsys):
    cmds = dry(
        capsys, "collect", *SLICE, "--hosts", "2", "--dest", "out", "--run", "train-run1", "--workdir", "runs/run1/"
    )
    assert cmds == [
        ["mkdir", "-p", "out/worker0"],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "rex:rexrag_jax/logs/train-run1.*.log",
            "out/worker0/",
            "--worker=0",
            "--zone=us-east5-a",
            "--project=my-proj",
        ],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "rex:rexrag_jax/runs/run1/metrics.jsonl",
            "rex:rexrag_jax/runs/run1/config.json",
            "out/worker0/",
            "--worker=0",
            "--zone=us-east5-a",
            "--project=my-proj",
        ],
        ["mkdir", "-p", "out/worker1"],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "rex:rexrag_jax/logs/train-run1.*.log",
            "out/worker1/",
            "--worker=1",
            "--zone=us-east5-a",
            "--project=my-proj",
        ],
    ]
    # an absolute workdir stays absolute; sweep run names ('=' and ',') are fine
    cmds = dry(
        capsys,
        "collect",
        *SLICE,
        "--hosts",
        "1",
        "--dest",
        "d",
        "--repo-dir",
        "src/rex",
        "--workdir",
        "/data/runs/00-a=1,b=2",
    )
    assert cmds[-1][5:8] == [
        "rex:/data/runs/00-a=1,b=2/metrics.jsonl",
        "rex:/data/runs/00-a=1,b=2/config.json",
        "d/worker0/",
    ]


def test_collect_asks_gcloud_for_the_worker_count(capsys, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        stdout = '{"networkEndpoints": [{}, {}, {}]}' if "describe" in cmd else ""
        return types.SimpleNamespace(returncode=0, stdout=stdout, stderr="")

    monkeypatch.setattr(tpu.subprocess, "run", fake_run)
    assert tpu.main(["collect", *SLICE, "--dest", "d"]) == 0
    assert "describe" in calls[0] and "--format=json" in calls[0]
    assert [c[7] for c in calls if "scp" in c] == ["--worker=0", "--worker=1", "--worker=2"]


def test_failing_command_is_named_and_status_is_nonzero(capsys, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return types.SimpleNamespace(returncode=1, stdout="", stderr="")

    monkeypatch.setattr(tpu.subprocess, "run", fake_run)
    assert tpu.main(["collect", *SLICE, "--hosts", "2", "--dest", "d"]) == 1
    err = capsys.readouterr().err
    assert len(calls) == 1  # stopped at the first failure
    assert err.startswith("error: command failed with exit status 1: mkdir -p d/worker0")
    assert tpu.main(["delete", *SLICE]) == 1
    assert "exit status 1: gcloud compute tpus tpu-vm delete rex --quiet" in capsys.readouterr().err


def test_missing_gcloud(capsys, monkeypatch):
    def fake_run(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(tpu.subprocess, "run", fake_run)
    assert tpu.main(["delete", *SLICE]) == 1
    assert "gcloud not found on PATH" in capsys.readouterr().err


def test_runs_as_a_script():
    done = REAL_RUN(
        [
            sys.executable,
            "launch/tpu.py",
            "create",
            "--name",
            "rex",
            "--type",
            "v6e-16",
            "--zone",
            "europe-west4-a",
            "--dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "+ gcloud compute tpus tpu-vm create rex --accelerator-type=v6e-16 --version=v2-alpha-tpuv6e "
        "--zone=europe-west4-a" in done.stdout
    )
    assert "16 chips on 4 worker(s)" in done.stdout
    bad = REAL_RUN(
        [sys.executable, "launch/tpu.py", "create", "--name", "rex", "--type", "v3-8", "--zone", "europe-west4-a"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "'v3-8'" in bad.stderr

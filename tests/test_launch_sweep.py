"""`launch/sweep.py`: expansion, names, value rendering, key checks before anything runs, dry-run and TPU
commands, summaries (fake results, a failed run), resuming; and one real two-run sweep of the tiny config."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("launch_sweep", os.path.join(ROOT, "launch", "sweep.py"))
sweep_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sweep_mod  # dataclasses look their module up there
_spec.loader.exec_module(sweep_mod)


def write_sweep(tmp_path, body: dict, name="test_sweep") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(f"def get_sweep():\n    return {body!r}\n")
    return str(path)


BASE = {
    "config": "configs/tiny_cpu.py",
    "entry": "train",
    "grid": {"algorithm": ["grpo", "rexrag"], "optim.learning_rate": [1e-5, 0.001]},
    "fixed": {"steps": 2},
}


@pytest.fixture
def no_subprocess(monkeypatch):
    def boom(*a, **k):
        raise AssertionError(f"a run was started: {a}")

    monkeypatch.setattr(sweep_mod.subprocess, "run", boom)


def test_expand_product_order_fixed_and_names(tmp_path):
    sweep = sweep_mod.load_sweep(write_sweep(tmp_path, BASE))
    assert sweep.name == "test_sweep" and sweep.config == "configs/tiny_cpu.py"
    runs = sweep_mod.expand(sweep, "/r")
    assert [(r.swept["algorithm"], r.swept["optim.learning_rate"]) for r in runs] == [
        ("grpo", 1e-5),
        ("grpo", 0.001),
        ("rexrag", 1e-5),
        ("rexrag", 0.001),
    ]  # first key slowest
    assert runs[0].name == "00-algorithm=grpo,optim.learning_rate=1e-05"
    assert list(runs[0].overrides) == ["steps", "algorithm", "optim.learning_rate"]  # fixed first
    assert all(r.overrides["steps"] == 2 for r in runs)
    assert len({r.name for r in runs}) == 4 and all(re.fullmatch(r"[A-Za-z0-9._=,+-]+", r.name) for r in runs)
    assert runs[3].workdir == os.path.join("/r", "test_sweep", runs[3].name)
    assert "checkpoint.directory" not in runs[0].overrides
    with_ckpt = sweep_mod.expand(sweep, "runs/sweeps", checkpoint_root="gs://b/ck/")
    assert with_ckpt[1].workdir == os.path.join("runs/sweeps", "test_sweep", runs[1].name)
    ckpt = f"gs://b/ck/test_sweep/{runs[1].name}"
    assert with_ckpt[1].overrides == {**runs[1].overrides, "checkpoint.directory": ckpt}
    assert list(with_ckpt[1].overrides)[-1] == "checkpoint.directory" and with_ckpt[1].swept == runs[1].swept
    sweep_mod.check(sweep, with_ckpt)  # a key of the train config
    assert sweep.metrics == sweep_mod.DEFAULT_METRICS["train"]


def test_explicit_runs_alone_and_times_a_grid(tmp_path):
    pairs = [
        {"optim.learning_rate": 1e-4, "optim.warmup_steps": 1},
        {"optim.learning_rate": 1e-3, "optim.warmup_steps": 2},
    ]
    alone = sweep_mod.expand(sweep_mod.load_sweep(write_sweep(tmp_path, {**BASE, "grid": {}, "runs": pairs})))
    assert [r.swept for r in alone] == pairs  # zip-like: one run per dict
    both = sweep_mod.load_sweep(write_sweep(tmp_path, {**BASE, "grid": {"seed": [0, 1]}, "runs": pairs}, "both"))
    runs = sweep_mod.expand(both)
    assert [r.swept for r in runs] == [{"seed": s, **p} for s in (0, 1) for p in pairs]
    # awkward values still give distinct, filesystem-safe names; no swept key gives 'base'
    odd = {**BASE, "grid": {"tokenizer": ["a/b c", "a b/c", "ü"], "seed": [1]}}
    names = [r.name for r in sweep_mod.expand(sweep_mod.load_sweep(write_sweep(tmp_path, odd, "odd")))]
    assert len(set(names)) == 3 and all(re.fullmatch(r"[A-Za-z0-9._=,+-]+", n) for n in names)
    single = {**BASE, "grid": {}}
    assert [r.name for r in sweep_mod.expand(sweep_mod.load_sweep(write_sweep(tmp_path, single, "one")))] == ["00-base"]


def test_render_values_parse_back_through_config_flags(tmp_path):
    from absl import flags
    from ml_collections import config_flags

    render = sweep_mod.render
    assert [render(v) for v in (True, False, 3, 1e-05, 0.1, "grpo", (0, 1), (0,), ("a", 2.5))] == [
        "True",
        "False",
        "3",
        "1e-05",
        "0.1",
        "grpo",
        "(0,1)",
        "(0,)",
        "('a',2.5)",
    ]
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        textwrap.dedent("""
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict(dict(b=True, f=1.0, i=1, t=(9,), s="x", n=dict(g=0.5)))
    """)
    )
    values = {"b": False, "f": 1e-05, "i": 7, "t": (0, 1), "s": "a b=c", "n.g": 2}
    argv = ["prog", f"--config={cfg}"] + [f"--config.{k}={render(v)}" for k, v in values.items()]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    c = fv.config
    assert (c.b, c.f, c.i, c.t, c.s, c.n.g) == (False, 1e-05, 7, (0, 1), "a b=c", 2.0)


def test_unknown_key_is_reported_before_any_run(tmp_path, capsys, no_subprocess):
    path = write_sweep(
        tmp_path,
        {
            "config": "configs/embedded.py",
            "entry": "demo",
            "grid": {"rl.probes.keep_ratio": [0.1, 0.2]},
            "fixed": {"rl.stpes": 3},
        },
        "bad",
    )
    assert sweep_mod.main([path, "--root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep bad: run 00-rl.probes.keep_ratio=0.1: unknown config key 'rl.stpes'")
    assert "did you mean 'rl.steps'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "root").exists()
    typed = write_sweep(tmp_path, {**BASE, "grid": {"steps": [1, 2.5]}, "fixed": {}}, "typed")
    assert sweep_mod.main([typed, "--root", str(tmp_path / "root")]) == 2
    assert "run 01-steps=2.5: steps=2.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "body,message",
    [
        ({**BASE, "entry": "trian"}, "entry 'trian' is not one of ['demo', 'pilot', 'train']"),
        ({**BASE, "gird": {}}, "unknown field(s) ['gird']"),
        ({**BASE, "config": "configs/nope.py"}, "config file 'configs/nope.py' does not exist"),
        ({**BASE, "grid": {"seed": [[1, 2]]}}, "value [1, 2] is a list; expected a scalar or tuple (use a tuple)"),
        ({**BASE, "grid": {"seed": []}}, "grid: seed needs a non-empty list of values"),
        ({**BASE, "grid": {"bad key": [1]}}, "'bad key' does not look like a config key"),
        ({**BASE, "fixed": {"algorithm": "grpo"}}, "['algorithm'] set twice"),
        ({**BASE, "name": "a/b"}, "must be a filesystem-safe string"),
    ],
)
def test_bad_sweeps_are_one_line_errors(tmp_path, capsys, no_subprocess, body, message):
    assert sweep_mod.main([write_sweep(tmp_path, body), "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_bad_files_and_flags(tmp_path, capsys, no_subprocess):
    (tmp_path / "none.py").write_text("x = 1\n")
    (tmp_path / "raises.py").write_text("def get_sweep():\n    return 1 / 0\n")
    cases = [
        ([str(tmp_path / "missing.py")], "does not exist"),
        ([str(tmp_path / "none.py")], "get_sweep()"),
        ([str(tmp_path / "raises.py")], "ZeroDivisionError"),
        ([write_sweep(tmp_path, BASE), "--tpu", "v5"], "--tpu needs --zone"),
        ([write_sweep(tmp_path, BASE), "--root", "gs://b/r"], "--root gs://b/r: workdirs are directories"),
        (
            [write_sweep(tmp_path, BASE), "--root", "gs://b/r", "--tpu", "v5", "--zone", "z", "--dry-run"],
            "put checkpoints in a bucket with --checkpoint-root",
        ),
        ([write_sweep(tmp_path, BASE), "--only", "nope"], "--only 'nope' matches no run"),
    ]
    for argv, message in cases:
        assert sweep_mod.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        sweep_mod.main([write_sweep(tmp_path, BASE), "--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: unrecognized arguments")


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys, no_subprocess):
    root = tmp_path / "root"
    assert sweep_mod.main([write_sweep(tmp_path, BASE), "--root", str(root), "--dry-run", "--only", "*rexrag*"]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if not line.startswith("#")]
    assert len(commands) == 2 and not root.exists()
    assert commands[0].startswith(
        f"{sys.executable} -m rexrag_jax.cli.train --config configs/tiny_cpu.py --workdir "
        f"{root}/test_sweep/02-algorithm=rexrag,optim.learning_rate=1e-05 "
    )
    assert commands[0].endswith("--config.steps=2 --config.algorithm=rexrag --config.optim.learning_rate=1e-05")


def test_tpu_commands(tmp_path, capsys, no_subprocess):
    sweep = sweep_mod.load_sweep(write_sweep(tmp_path, BASE))
    run = sweep_mod.expand(sweep, "runs/sweeps")[1]
    cmd = sweep_mod.run_command(sweep, run, sweep_mod.Tpu("v5", "us-west4-a", "proj"))
    assert cmd == [
        sys.executable,
        "launch/tpu.py",
        "run",
        "--name",
        "v5",
        "--zone",
        "us-west4-a",
        "--project",
        "proj",
        "--config",
        "configs/tiny_cpu.py",
        "--workdir",
        f"runs/sweeps/test_sweep/{run.name}",
        "--entry",
        "train",
        "--",
        "--config.steps=2",
        "--config.algorithm=grpo",
        "--config.optim.learning_rate=0.001",
    ]
    assert "--project" not in sweep_mod.run_command(sweep, run, sweep_mod.Tpu("v5", "z"))
    # the default root with --tpu: runs/sweeps, relative to the repo dir on each worker
    assert sweep_mod.main([sweep.path, "--tpu", "v5", "--zone", "z", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("launch/tpu.py run --name v5 --zone z --config configs/tiny_cpu.py --workdir runs/sweeps/test_sweep/")
        == 4
    )
    assert "checkpoint.directory" not in out


def test_checkpoint_root_adds_an_override_per_run(tmp_path, capsys, no_subprocess):
    path = write_sweep(tmp_path, BASE)
    names = [r.name for r in sweep_mod.expand(sweep_mod.load_sweep(path))]
    assert (
        sweep_mod.main(
            [path, "--tpu", "v5", "--zone", "z", "--root", "runs/s", "--checkpoint-root", "gs://b/ck/", "--dry-run"]
        )
        == 0
    )
    commands = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(commands) == 4
    for name, command in zip(names, commands):
        assert f"--workdir runs/s/test_sweep/{name} --entry train -- " in command
        assert command.endswith(f" --config.checkpoint.directory=gs://b/ck/test_sweep/{name}")
    # local runs: a local checkpoint root is made absolute (the runs start in the repository)
    assert (
        sweep_mod.main([path, "--root", str(tmp_path / "r"), "--checkpoint-root", "ck", "--dry-run", "--only", "0"])
        == 0
    )
    (command,) = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert f"--config.checkpoint.directory={os.path.abspath('ck')}/test_sweep/{names[0]}" in command
    assert not (tmp_path / "r").exists()


def test_checkpoint_root_is_refused_for_demo_sweeps_and_clashes(tmp_path, capsys, no_subprocess):
    demo = write_sweep(
        tmp_path,
        {"config": "configs/embedded.py", "entry": "demo", "grid": {"rl.probes.keep_ratio": [0.1, 0.2]}},
        "demo",
    )
    assert sweep_mod.main([demo, "--tpu", "v5", "--zone", "z", "--checkpoint-root", "gs://b/ck", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint-root: sweep demo runs entry demo") and err.count("\n") == 1
    assert "only train sweeps take checkpoint.directory" in err
    clash = write_sweep(tmp_path, {**BASE, "fixed": {"checkpoint.directory": "/x"}}, "clash")
    assert sweep_mod.main([clash, "--checkpoint-root", "gs://b/ck", "--dry-run"]) == 2
    assert "sets checkpoint.directory itself" in capsys.readouterr().err


def fake_runner(calls, fail=lambda cmd: False):
    """Stands in for subprocess.run: records the command, writes a metrics.jsonl as `rexrag-train` would."""

    def run(cmd, cwd=None, stdout=None, stderr=None, stdin=None):
        calls.append(cmd)
        if fail(cmd):
            stdout.write("Traceback ...\nerror: something broke\n")
            return subprocess.CompletedProcess(cmd, 3)
        if "launch/tpu.py" not in cmd:
            workdir = cmd[cmd.index("--workdir") + 1]
            lr = float(next(a for a in cmd if a.startswith("--config.optim.learning_rate=")).split("=")[1])
            with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
                for step in (1, 2):
                    f.write(
                        json.dumps(
                            {"step": step, "reward": step * lr * 1000, "em": 0.5, "kl": 0.01, "probes_kept": step}
                        )
                        + "\n"
                    )
                f.write('{"step": 3, "rew')  # a row cut short by a crash is ignored
        return subprocess.CompletedProcess(cmd, 0)

    return run


def table_rows(md: str) -> dict:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return {
        cells[0]: dict(zip(header, cells))
        for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[1:])
    }


def test_local_sweep_summary_failure_and_resume(tmp_path, capsys, monkeypatch):
    calls = []
    failing = lambda cmd: "--config.algorithm=rexrag" in cmd and "--config.optim.learning_rate=0.001" in cmd
    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_runner(calls, failing))
    path, root = write_sweep(tmp_path, BASE), tmp_path / "root"
    assert sweep_mod.main([path, "--root", str(root)]) == 1  # one run failed, the others went on
    assert len(calls) == 4
    state = root / "test_sweep"
    rows = table_rows((state / "summary.md").read_text())
    assert list(rows) == [r.name for r in sweep_mod.expand(sweep_mod.load_sweep(path))]
    ok = rows["00-algorithm=grpo,optim.learning_rate=1e-05"]
    assert ok["status"] == "ok" and ok["algorithm"] == "grpo" and ok["optim.learning_rate"] == "1e-05"
    assert (ok["step"], ok["reward"], ok["em"], ok["probes_kept"]) == ("2", "0.02", "0.5", "2")  # last full row
    bad = rows["03-algorithm=rexrag,optim.learning_rate=0.001"]
    assert bad["status"] == "failed (exit 3)" and bad["reward"] == "-"
    out = capsys.readouterr().out
    assert "03-algorithm=rexrag,optim.learning_rate=0.001: failed" in out and "something broke" in out
    record = json.loads((state / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["ok", "ok", "ok", "failed"]
    assert "something broke" in record["runs"][3]["log_tail"] and record["runs"][0]["command"] == calls[0]
    summary = json.loads((state / "summary.json").read_text())
    assert summary[1]["metrics"]["reward"] == pytest.approx(2.0) and summary[3]["status"] == "failed (exit 3)"
    assert summary[0]["swept"] == {"algorithm": "grpo", "optim.learning_rate": 1e-05}
    assert (state / rows["00-algorithm=grpo,optim.learning_rate=1e-05"]["run"] / "sweep_done.json").exists()
    assert "$ " in (state / "03-algorithm=rexrag,optim.learning_rate=0.001" / "run.log").read_text()

    calls.clear()  # resume: only the failed run runs again, now successfully
    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_runner(calls))
    assert sweep_mod.main([path, "--root", str(root)]) == 0
    assert len(calls) == 1 and "--config.algorithm=rexrag" in calls[0]
    rows = table_rows((state / "summary.md").read_text())
    assert [r["status"] for r in rows.values()] == ["done", "done", "done", "ok"]
    calls.clear()  # --rerun --only: just that run
    assert sweep_mod.main([path, "--root", str(root), "--rerun", "--only", "1", "--parallel", "2"]) == 0
    assert len(calls) == 1 and "--config.optim.learning_rate=0.001" in calls[0]


def test_parallel_and_unselected_runs_stay_pending(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_runner(calls))
    path, root = write_sweep(tmp_path, BASE), tmp_path / "root"
    assert sweep_mod.main([path, "--root", str(root), "--parallel", "2", "--only", "0", "--only", "*=rexrag,*"]) == 0
    assert len(calls) == 3
    rows = table_rows((root / "test_sweep" / "summary.md").read_text())
    assert [r["status"] for r in rows.values()] == ["ok", "pending", "ok", "ok"]


def test_tpu_mode_is_launched_until_collected(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_runner(calls))
    monkeypatch.chdir(tmp_path)  # the local bookkeeping of a TPU sweep goes to ./ROOT (default runs/sweeps)
    path = write_sweep(tmp_path, BASE)
    assert sweep_mod.main([path, "--tpu", "v5", "--zone", "z", "--only", "0", "--checkpoint-root", "gs://b/ck"]) == 0
    name = "00-algorithm=grpo,optim.learning_rate=1e-05"
    assert calls[0][:3] == [sys.executable, "launch/tpu.py", "run"] and "--" in calls[0]
    assert (
        f"runs/sweeps/test_sweep/{name}" in calls[0]
        and calls[0][-1] == f"--config.checkpoint.directory=gs://b/ck/test_sweep/{name}"
    )
    state = tmp_path / "runs" / "sweeps" / "test_sweep"
    rows = table_rows((state / "summary.md").read_text())
    assert rows[name]["status"] == "launched" and rows[name]["reward"] == "-"
    assert (state / name / "launch.log").exists()
    record = json.loads((state / "sweep.json").read_text())
    assert record["root"] == "runs/sweeps" and record["runs"][0]["workdir"] == f"runs/sweeps/test_sweep/{name}"
    assert record["runs"][0]["overrides"]["checkpoint.directory"] == f"gs://b/ck/test_sweep/{name}"
    out = capsys.readouterr().out
    assert "not read here" in out and "gs://" not in out.split("summary:")[0]
    collect = [
        sys.executable,
        "launch/tpu.py",
        "collect",
        "--name",
        "v5",
        "--zone",
        "z",
        "--dest",
        str(state / name),
        "--workdir",
        f"runs/sweeps/test_sweep/{name}",
    ]
    assert shlex.join(collect) in out.splitlines()

    # what `launch/tpu.py collect --workdir` fetches: worker 0's metrics; the next call reads them
    (state / name / "worker0").mkdir()
    (state / name / "worker0" / "metrics.jsonl").write_text(json.dumps({"step": 2, "reward": 0.5}) + "\n")
    calls.clear()
    assert sweep_mod.main([path, "--tpu", "v5", "--zone", "z", "--only", "0", "--checkpoint-root", "gs://b/ck"]) == 0
    assert calls == []
    rows = table_rows((state / "summary.md").read_text())
    assert (rows[name]["status"], rows[name]["step"], rows[name]["reward"]) == ("done", "2", "0.5")
    assert "not read here" not in capsys.readouterr().out


def test_demo_summary_reads_the_report(tmp_path):
    sweep = sweep_mod.load_sweep(
        write_sweep(
            tmp_path, {"config": "configs/embedded.py", "entry": "demo", "grid": {"rl.probes.keep_ratio": [0.04, 0.2]}}
        )
    )
    runs = sweep_mod.expand(sweep, str(tmp_path / "root"))
    sweep_mod.check(sweep, runs)
    final = lambda m: {"single": 0.8, "multi": m, "overall": (0.8 + m) / 2}
    results = {
        "warm_start": final(0.1),
        "runs": [
            {"algorithm": "grpo", "seed": 0, "final": final(0.2)},
            {"algorithm": "rexrag", "seed": 0, "final": final(0.3)},
            {"algorithm": "rexrag", "seed": 1, "final": final(0.5)},
        ],
    }
    os.makedirs(os.path.join(runs[0].workdir, "report"))
    with open(os.path.join(runs[0].workdir, "report", "results.json"), "w") as f:
        json.dump(results, f)
    rows, md = sweep_mod.summarize(sweep, runs, {runs[0].name: {"status": "ok"}})
    assert rows[0]["metrics"] == pytest.approx(
        {"warm_start.multi": 0.1, "grpo.multi": 0.2, "rexrag.multi": 0.4, "grpo.overall": 0.5, "rexrag.overall": 0.6}
    )
    assert table_rows(md)[runs[1].name]["status"] == "pending"


def test_shipped_sweeps_are_valid():
    tiny = sweep_mod.load_sweep(os.path.join(ROOT, "configs", "sweeps", "tiny_lr.py"))
    runs = sweep_mod.expand(tiny)
    sweep_mod.check(tiny, runs)
    assert tiny.entry == "train" and len(runs) == 4 and runs[0].overrides["steps"] == 2
    embedded = sweep_mod.load_sweep(os.path.join(ROOT, "configs", "sweeps", "embedded_keep_ratio.py"))
    runs = sweep_mod.expand(embedded)
    sweep_mod.check(embedded, runs)
    assert embedded.entry == "demo" and [r.swept for r in runs] == [
        {"rl.probes.keep_ratio": v} for v in (0.04, 0.08, 0.2)
    ]
    study = sweep_mod.load_sweep(os.path.join(ROOT, "configs", "sweeps", "dead_end_study.py"))
    runs = sweep_mod.expand(study)
    sweep_mod.check(study, runs)
    assert [r.swept for r in runs] == [{"demos.complete_share": v} for v in (0.3, 0.17, 0.0)]
    fixed = study.fixed
    assert fixed["arms"] == ("grpo", "grpo_g6", "rexrag", "rexrag_dd") and len(fixed["seeds"]) >= 12
    assert fixed["world.test_fraction"] == 0.4 and fixed["demos.pool_reflections"] is False


def test_pilot_summary_reads_pilot_json(tmp_path):
    sweep = sweep_mod.load_sweep(
        write_sweep(
            tmp_path, {"config": "configs/embedded.py", "entry": "pilot", "grid": {"demos.complete_share": [0.0, 0.3]}}
        )
    )
    runs = sweep_mod.expand(sweep, str(tmp_path / "root"))
    sweep_mod.check(sweep, runs)
    assert sweep_mod.run_command(sweep, runs[0])[2] == "rexrag_jax.cli.pilot"
    os.makedirs(runs[0].workdir)
    with open(os.path.join(runs[0].workdir, "pilot.json"), "w") as f:
        json.dump(
            {"dead_end_rate_multi": 0.9, "rescue_rate_multi": 0.4, "accuracy_multi": 0.05, "dead_end_rate": 0.5}, f
        )
    rows, _ = sweep_mod.summarize(sweep, runs, {runs[0].name: {"status": "ok"}})
    assert rows[0]["metrics"] == {
        "dead_end_rate_multi": 0.9,
        "rescue_rate_multi": 0.4,
        "accuracy_multi": 0.05,
        "dead_end_rate": 0.5,
    }


def test_real_sweep_of_the_tiny_config(tmp_path, cli_env):
    """A real `rexrag-train` run (1 step, one CPU device) started, tracked and summarised by the sweep; the
    grid's expansion into several runs is tested above without training."""
    path = write_sweep(
        tmp_path,
        {
            "config": "configs/tiny_cpu.py",
            "entry": "train",
            "name": "e2e",
            # the study's options: rexrag-train accepts them on its configs
            "grid": {"loss.correction": ["decoupled"]},
            "fixed": {
                "loss.advantage_baseline": "originals",
                "probes.priority": "dead_end_groups",
                "steps": 1,
                "data.batch_size": 2,
                "rollout.group_size": 2,
                "rollout.max_turns": 1,
                "rollout.max_response_length": 12,
                "progress": False,
                "cpu_devices": 1,
                "mesh.data": 1,
                "mesh.fsdp": 1,
                "mesh.tensor": 1,
                "train.micro_batch_size": 4,
            },
        },
    )
    env = cli_env  # the run asks for its one CPU device itself
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "launch/sweep.py", path, "--root", str(tmp_path / "root")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    state = tmp_path / "root" / "e2e"
    rows = table_rows((state / "summary.md").read_text())
    assert list(rows) == ["00-loss.correction=decoupled"]
    for name, row in rows.items():
        metrics = json.loads((state / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0 <= metrics["dead_end_rate"] <= 1 and 0 <= metrics["rescue_rate"] <= 1
        assert row["status"] == "ok" and row["step"] == "1" and re.fullmatch(r"[0-9.e+-]+", row["reward"]), row
        assert (state / name / "metrics.jsonl").exists() and (state / name / "sweep_done.json").exists()
        assert "last_step" in (state / name / "run.log").read_text()
    print(f"real sweep: {time.time() - t0:.0f} s")

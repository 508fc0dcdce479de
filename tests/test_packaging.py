"""Installing like a library: version ranges (setup.py) vs the tested lock (constraints.txt), the jax / flax
check at import, the config files shipped as package data and found from any directory, and the CLI
helpers every tool shares (fake CPU devices, one-line errors)."""

import ast
import importlib
import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import rexrag_jax
from rexrag_jax.cli import command, components, devices

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_requirements() -> dict[str, list[Requirement]]:
    """setup.py's install_requires and extras, evaluated without running setup()."""
    source = (ROOT / "setup.py").read_text(encoding="utf-8").split("\nsetup(\n")[0]
    scope = {"__file__": str(ROOT / "setup.py")}
    exec(compile(source, "setup.py", "exec"), scope)
    groups = {"install": scope["INSTALL_REQUIRES"], **scope["EXTRAS"]}
    return {name: [Requirement(r) for r in reqs] for name, reqs in groups.items()}


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


def test_setup_uses_ranges_and_accepts_the_h200_image_versions():
    reqs = {r.name: r for r in setup_requirements()["install"]}
    for name in ("jax", "jaxlib", "flax"):
        assert not any(s.operator == "==" for s in reqs[name].specifier), reqs[name]
    assert reqs["jax"].specifier.contains("0.11.2") and reqs["jax"].specifier.contains("0.10.2")
    assert reqs["flax"].specifier.contains("0.12.10") and reqs["flax"].specifier.contains("0.12.8")
    assert not reqs["jax"].specifier.contains("0.12.0") and not reqs["flax"].specifier.contains("0.13.0")
    # the rest of that image's stack that we use (docs/install.md: the suite passed on it)
    for name, version in {"transformers": "5.17.0", "tokenizers": "0.23.2", "numpy": "2.5.2"}.items():
        assert reqs[name].specifier.contains(version), (name, version)
    # the ranges come from the table the import-time check uses
    for name, (low, high) in rexrag_jax.SUPPORTED_VERSIONS.items():
        assert str(reqs[name].specifier) == f"<{high},>={low}"
    # torch stays pinned exactly: a range (or bare torch) resolves to a multi-GB CUDA build
    assert [str(r) for r in setup_requirements()["test"] if r.name == "torch"] == ["torch==2.13.0"]


def test_constraints_lock_a_set_the_ranges_accept():
    pins = constraints()
    assert pins["jax"] == Version("0.10.2") and pins["flax"] == Version("0.12.8")
    assert "rexrag-jax" not in pins and pins["torch"] == Version("2.13.0")
    for group, reqs in setup_requirements().items():
        for req in reqs:
            name = req.name.lower().replace("_", "-")
            if req.marker is not None and not req.marker.evaluate():
                continue
            assert name in pins, f"{name} ({group}) is not locked in constraints.txt"
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req}"


def test_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = [
        line
        for line in makefile.splitlines()
        if ("pip install" in line or "$(PIP_INSTALL)" in line) and "-U pip" not in line
    ]
    assert len(installs) >= 5 and all("$(PIP_INSTALL)" in line or "-c constraints.txt" in line for line in installs)
    [definition] = [line for line in makefile.splitlines() if line.startswith("PIP_INSTALL :=")]
    assert definition.startswith("PIP_INSTALL := $(PY) -m pip install") and "-c constraints.txt" in definition
    assert makefile.index("$(PIP_INSTALL) torch==2.13.0") < makefile.index('$(PIP_INSTALL) -e ".[test,demo]"')


@pytest.mark.parametrize(
    "versions, ok",
    [
        ({"jax": "0.10.2", "flax": "0.12.8"}, True),
        ({"jax": "0.11.2", "flax": "0.12.10"}, True),
        ({"jax": "0.11.9.dev20261201+cuda12", "flax": "0.12.12"}, True),
        ({"jax": "0.10.1", "flax": "0.12.8"}, False),
        ({"jax": "0.12.0", "flax": "0.12.8"}, False),
        ({"jax": "0.10.2", "flax": "0.13.0rc1"}, False),
        ({"jax": "0.10.2", "flax": None}, False),
    ],
)
def test_version_check(versions, ok):
    assert (rexrag_jax.version_problems(versions) == []) is ok


def test_import_fails_clearly_outside_the_supported_range(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.delenv(rexrag_jax.SKIP_CHECK_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.13.1" if name == "flax" else real(name))
    try:
        with pytest.raises(ImportError) as e:
            importlib.reload(rexrag_jax)
        message = str(e.value)
        assert "flax 0.13.1 is installed, but rexrag_jax supports flax>=0.12.8,<0.13" in message
        assert "pip install 'jax>=0.10.2,<0.12' 'flax>=0.12.8,<0.13'" in message and "constraints.txt" in message
        assert not message.startswith("jax") and "; jax" not in message  # the installed jax is fine
        monkeypatch.setenv(rexrag_jax.SKIP_CHECK_ENV, "1")  # the escape hatch
        importlib.reload(rexrag_jax)
    finally:
        monkeypatch.undo()
        importlib.reload(rexrag_jax)


def test_package_import_is_cheap():
    heavy = ("jax", "flax", "numpy", "transformers")
    code = f"import sys, rexrag_jax; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ configs as package data, any cwd


def test_setup_ships_every_file_the_configs_name():
    source = (ROOT / "setup.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    assert ast.literal_eval(kw["package_dir"]) == {"rexrag_jax._configs": "configs"}
    globs = ast.literal_eval(kw["package_data"])["rexrag_jax._configs"]
    shipped = {p.relative_to(ROOT / "configs").as_posix() for g in globs for p in (ROOT / "configs").glob(g)}
    for needed in (
        "exploration_prompts.txt",
        "data/tiny_train.jsonl",
        "data/tiny_corpus.jsonl",
        "data/tiny_eval/nq/test.jsonl",
        "data/tiny_eval/hotpotqa/dev.jsonl",
    ):
        assert needed in shipped, needed


def test_relative_paths_try_the_working_directory_then_the_installed_configs(tmp_path, monkeypatch):
    installed = tmp_path / "site" / "_configs"
    (installed / "data").mkdir(parents=True)
    (installed / "data" / "x.jsonl").write_text("{}\n")
    (installed / "tiny.py").write_text("")
    monkeypatch.setattr(components, "configs_dir", lambda: installed)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert components.resolve_path("configs/data/x.jsonl", "data.train_file") == str(installed / "data" / "x.jsonl")
    (work / "configs" / "data").mkdir(parents=True)
    (work / "configs" / "data" / "x.jsonl").write_text("{}\n")  # the working directory's copy wins
    assert components.resolve_path("configs/data/x.jsonl", "data.train_file") == "configs/data/x.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        components.resolve_path("configs/data/y.jsonl", "data.train_file")
    assert str(e.value).startswith("--config.data.train_file: 'configs/data/y.jsonl' does not exist")
    assert str(work / "configs/data/y.jsonl") in str(e.value) and str(installed / "data/y.jsonl") in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"--pool_file: 'prompts.txt' does not exist \(looked in /"):
        components.resolve_path("prompts.txt", "--pool_file")
    # --config FILE on the command line: found the same way, config_flags' ":arg" suffix kept
    argv = ["--config", "configs/tiny.py", "--config.steps=1", "--config=configs/tiny.py:x", "--workdir", "w"]
    assert components.resolve_config_argv(argv) == [
        "--config",
        str(installed / "tiny.py"),
        "--config.steps=1",
        f"--config={installed / 'tiny.py'}:x",
        "--workdir",
        "w",
    ]
    with pytest.raises(SystemExit) as exit_:
        components.resolve_config_argv(["--config", "configs/nope.py"])
    assert exit_.value.code == 2


def test_default_pool_file_and_tiny_data_are_found_from_another_directory(tmp_path, monkeypatch):
    import configs.tiny_cpu as tiny

    cfg = tiny.get_config()
    monkeypatch.chdir(tmp_path)
    for key, path in (
        ("rollout.pool_file", cfg.rollout.pool_file),
        ("data.train_file", cfg.data.train_file),
        ("retrieval.corpus", cfg.retrieval.corpus),
        ("eval.data_dir", cfg.eval.data_dir),
    ):
        assert os.path.exists(components.resolve_path(path, key)), key
    assert os.path.isfile(components.resolve_path("configs/tiny_cpu.py", "--config"))


# ------------------------------------------------------------------ shared CLI helpers


def test_fake_cpu_devices_sets_one_flag_and_keeps_the_others():
    env = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}
    devices.fake_cpu_devices(2, env)
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    devices.fake_cpu_devices(0, env)  # 0: leave the platform as it is
    assert env["XLA_FLAGS"].endswith("=2")
    empty: dict = {}
    devices.fake_cpu_devices(4, empty)
    assert empty == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def test_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e, command.one_line_errors():
        raise FileNotFoundError("data.jsonl does not exist")
    assert e.value.code == 2 and capsys.readouterr().err == "error: data.jsonl does not exist\n"
    with pytest.raises(KeyError), command.one_line_errors():  # not an expected failure: a traceback
        raise KeyError("bug")
    with pytest.raises(SystemExit) as e:
        command.fail("bad --limit")
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad --limit\n"


def test_a_bad_corpus_line_hint_names_what_a_cli_user_can_do(tmp_path, monkeypatch):
    """rexrag-train / -eval index `retrieval.corpus` themselves and have no skip flag for it: the hint says
    how to index it ahead with `rexrag-index build --skip-bad-lines` instead of naming a Python argument."""
    import ml_collections

    import rexrag_jax.retrieval as retrieval
    from rexrag_jax.retrieval import CorpusError
    from rexrag_jax.retrieval.corpus import SKIP_HINT

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("{}\n")

    def build_index(path, *args, **kwargs):
        raise CorpusError(f"{path}:1: missing 'id'" + SKIP_HINT)  # rexrag-index's hint

    monkeypatch.setattr(retrieval, "build_index", build_index)
    monkeypatch.setattr("rexrag_jax.retrieval.encoder.minilm_dir", lambda: "minilm")
    cfg = ml_collections.ConfigDict({"retrieval": {"url": "", "index": "", "corpus": str(corpus), "encoder": ""}})
    with pytest.raises(CorpusError) as e, components.open_retriever(cfg, str(tmp_path)):
        pass
    assert str(e.value) == (
        f"{corpus}:1: missing 'id' (to skip bad lines: index the corpus ahead with `rexrag-index "
        f"build --corpus {corpus} --encoder DIR --out INDEX --skip-bad-lines`, then pass "
        "--config.retrieval.index=INDEX --config.retrieval.corpus=)"
    )


def test_accelerator_carry_list_is_pinned_and_leaves_the_image_stack():
    """benchmarks/accelerator_prepare.sh carries, at constraints.txt versions, only what an accelerator image
    lacks: never jax / flax / numpy, whose image versions are what the run measures."""
    script = ROOT / "benchmarks" / "accelerator_prepare.sh"
    carried = [n.lower().replace("_", "-") for n in script.read_text().split('CARRIED="')[1].split('"')[0].split()]
    pins = constraints()
    assert carried and [n for n in carried if n not in pins] == []
    assert not {"jax", "jaxlib", "flax", "numpy", "ml-dtypes"} & set(carried)
    for name in ("accelerator_prepare.sh", "accelerator_device.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / name)], check=True)

"""`python launch/sweep.py configs/sweeps/NAME.py [--root DIR] [--dry-run] [--tpu NAME --zone Z]`: a sweep.

A sweep file defines `get_sweep()` returning a dict (or ConfigDict): `config` (base config file), `entry`
(`train` or `demo`), `grid` (key -> values, a Cartesian product, first key slowest) and/or `runs` (a list of
override dicts; with a grid, every grid point is combined with every run), `fixed` (overrides of every run),
`name` (default: the file's stem), `metrics` (summary columns), `description`. Each run gets its own workdir
`ROOT/NAME/RUN`; every override key is checked against the base config before anything starts. Runs go
locally (one process each, output in `WORKDIR/run.log`) or through `launch/tpu.py run` on a TPU VM slice.
A workdir is always a directory, never a gs:// URL: with `--tpu` it is one on each worker, relative to the
repo dir there (ROOT defaults to `runs/sweeps`), and the bookkeeping stays here in `./ROOT/NAME`.
`--checkpoint-root URL` (train sweeps) sends each run's checkpoints to `URL/NAME/RUN` through
`--config.checkpoint.directory`, which is where a multi-host slice's checkpoints must go (a bucket).
A run that succeeded leaves `sweep_done.json` and is skipped next time (`--rerun` runs it again); a
failed run is recorded and the others go on. The end is a table: `summary.md` and `summary.json`.
A TPU run's results stay on its workers ('launched' in the table) until `launch/tpu.py collect --workdir`
fetches worker 0's metrics into `./ROOT/NAME/RUN/worker0/` (the sweep prints those commands).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import dataclasses
import difflib
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = {"train": "rexrag_jax.cli.train", "demo": "rexrag_jax.cli.demo", "pilot": "rexrag_jax.cli.pilot"}
DEFAULT_METRICS = {
    "train": ("step", "reward", "em", "kl", "probes_kept"),
    "pilot": ("dead_end_rate_multi", "rescue_rate_multi", "accuracy_multi", "dead_end_rate"),
    "demo": ("warm_start.multi", "grpo.multi", "rexrag.multi", "grpo.overall", "rexrag.overall"),
}
SWEEP_KEYS = {"config", "entry", "grid", "runs", "fixed", "name", "metrics", "description"}
DONE = "sweep_done.json"
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
DEFAULT_ROOT = os.path.join("workdir", "sweeps")
TPU_ROOT = "runs/sweeps"  # with --tpu: relative to the repo dir on each worker (and to . for the bookkeeping)
CHECKPOINT_KEY = "checkpoint.directory"


class SweepError(ValueError):
    """Bad input, reported as one `error: ...` line with exit status 2."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: str  # the sweep file
    config: str  # base config file (relative to the repository when inside it), optionally `FILE:ARG`
    entry: str
    grid: dict[str, list]
    runs: list[dict]
    fixed: dict[str, Any]
    metrics: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str
    swept: dict[str, Any]  # what distinguishes this run (the table's columns)
    overrides: dict[str, Any]  # fixed + swept, in command-line order
    workdir: str


Tpu = collections.namedtuple("Tpu", "name zone project", defaults=("",))  # `launch/tpu.py run`'s target slice


def _check_value(where: str, value: Any) -> None:
    """Only what renders unambiguously on a command line: bool/int/float/str and tuples of them."""
    if isinstance(value, tuple):
        for v in value:
            _check_value(where, v)
    elif not isinstance(value, (bool, int, float, str)):
        hint = " (use a tuple)" if isinstance(value, list) else ""
        raise SweepError(f"{where}: value {value!r} is a {type(value).__name__}; expected a scalar or tuple{hint}")


def _overrides(name: str, what: str, d: Any, grid: bool = False) -> dict[str, Any]:
    """`d` checked: config-key-like keys; scalar/tuple values (for a grid: non-empty lists of them)."""
    d = d.to_dict() if hasattr(d, "to_dict") else d
    if not isinstance(d, Mapping):
        raise SweepError(f"sweep {name}: {what} must be a dict of config key -> value, got {type(d).__name__}")
    for key, value in d.items():
        if not isinstance(key, str) or not KEY.match(key):
            raise SweepError(f"sweep {name}: {what}: {key!r} does not look like a config key (e.g. 'rl.steps')")
        if grid and (not isinstance(value, (list, tuple)) or not value):
            raise SweepError(f"sweep {name}: grid: {key} needs a non-empty list of values, got {value!r}")
        for v in value if grid else [value]:
            _check_value(f"sweep {name}: {what}: {key}", v)
    return {k: list(v) for k, v in d.items()} if grid else dict(d)


def _resolve_config(spec: str, name: str) -> str:
    """The base config as given (if it exists here) or relative to the repository; repo-relative if inside."""
    path, sep, arg = spec.partition(":")
    for candidate in (path, os.path.join(REPO, path)):
        if os.path.isfile(candidate):
            rel = os.path.relpath(os.path.abspath(candidate), REPO)
            return (os.path.abspath(candidate) if rel.startswith("..") else rel) + sep + arg
    raise SweepError(f"sweep {name}: config file {path!r} does not exist")


def load_sweep(path: str) -> Sweep:
    """Import the sweep file, call `get_sweep()` and check its shape (config keys are checked by `check`)."""
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise SweepError(f"sweep file {path!r} does not exist (expected a .py file defining get_sweep())")
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        spec = importlib.util.spec_from_file_location(f"_sweep_{stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        d = module.get_sweep() if callable(getattr(module, "get_sweep", None)) else None
    except Exception as e:
        raise SweepError(f"sweep file {path}: {type(e).__name__}: {e}") from None
    d = d.to_dict() if hasattr(d, "to_dict") else d
    if not isinstance(d, Mapping):
        raise SweepError(f"sweep file {path}: needs get_sweep() returning a dict, got {type(d).__name__}")
    name = d.get("name", stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SweepError(f"sweep file {path}: name {name!r} must be a filesystem-safe string ([A-Za-z0-9._-])")
    if set(d) - SWEEP_KEYS:
        raise SweepError(
            f"sweep {name}: unknown field(s) {sorted(set(d) - SWEEP_KEYS)}; expected some of {sorted(SWEEP_KEYS)}"
        )
    if d.get("entry") not in ENTRIES:
        raise SweepError(f"sweep {name}: entry {d.get('entry')!r} is not one of {sorted(ENTRIES)}")
    if not isinstance(d.get("config"), str) or not d["config"]:
        raise SweepError(f"sweep {name}: no config (the base config file, e.g. 'configs/tiny_cpu.py')")
    grid = _overrides(name, "grid", d.get("grid") or {}, grid=True)
    runs = d.get("runs") or []
    if not isinstance(runs, (list, tuple)):
        raise SweepError(f"sweep {name}: runs must be a list of override dicts")
    runs = [_overrides(name, f"runs[{i}]", r) for i, r in enumerate(runs)]
    fixed = _overrides(name, "fixed", d.get("fixed") or {})
    in_runs = {k for r in runs for k in r}
    clash = sorted(set(grid) & (in_runs | set(fixed)) | in_runs & set(fixed))
    if clash:
        raise SweepError(f"sweep {name}: {clash} set twice (in two of grid, runs, fixed)")
    metrics = d.get("metrics", DEFAULT_METRICS[d["entry"]])
    if isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
        raise SweepError(f"sweep {name}: metrics must be a list of metric names")
    return Sweep(
        name=name,
        path=path,
        config=_resolve_config(d["config"], name),
        entry=d["entry"],
        grid=grid,
        runs=runs,
        fixed=fixed,
        metrics=tuple(metrics),
    )


def render(value: Any) -> str:
    """A value as config_flags parses it back: bools True/False, floats by repr, tuples as literals."""
    if isinstance(value, tuple):
        items = [render(v) if isinstance(v, tuple) else repr(v) for v in value]
        return "(" + ",".join(items) + ("," if len(items) == 1 else "") + ")"
    return value if isinstance(value, str) else repr(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("_.")[:100]


def join_root(root: str, *parts: str) -> str:
    """`os.path.join`, except that URLs (gs://...) are joined with '/' on any OS."""
    return "/".join([root.rstrip("/"), *parts]) if is_remote(root) else os.path.join(root, *parts)


def is_remote(path: str) -> bool:
    return "://" in path


def expand(sweep: Sweep, root: str = DEFAULT_ROOT, checkpoint_root: str = "") -> list[Run]:
    """Grid points (first key slowest) x explicit runs, each with fixed overrides, a name and a workdir;
    with `checkpoint_root`, also `checkpoint.directory=CHECKPOINT_ROOT/NAME/RUN` (train sweeps only)."""
    if checkpoint_root and sweep.entry != "train":
        raise SweepError(
            f"--checkpoint-root: sweep {sweep.name} runs entry {sweep.entry}, which keeps its "
            f"checkpoints in its workdir; only train sweeps take {CHECKPOINT_KEY}"
        )
    if checkpoint_root and any(CHECKPOINT_KEY in d for d in (sweep.grid, sweep.fixed, *sweep.runs)):
        raise SweepError(f"--checkpoint-root: sweep {sweep.name} sets {CHECKPOINT_KEY} itself; drop one of the two")
    keys = list(sweep.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))]
    swept = [{**p, **r} for p in points or [{}] for r in sweep.runs or [{}]]
    width = max(2, len(str(len(swept) - 1)))
    out = []
    for i, s in enumerate(swept):
        name = f"{i:0{width}d}-" + (_slug(",".join(f"{k}={render(v)}" for k, v in s.items())) or "base")
        checkpoints = {CHECKPOINT_KEY: join_root(checkpoint_root, sweep.name, name)} if checkpoint_root else {}
        out.append(
            Run(
                index=i,
                name=name,
                swept=s,
                overrides={**sweep.fixed, **s, **checkpoints},
                workdir=join_root(root, sweep.name, name),
            )
        )
    return out


def load_config(spec: str) -> Any:
    """The base config, as `--config FILE[:ARG]` loads it: import the file, call get_config([ARG])."""
    path, _, arg = spec.partition(":")
    full = path if os.path.isabs(path) else os.path.join(REPO, path)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)  # configs import rexrag_jax
    try:
        spec_ = importlib.util.spec_from_file_location("_sweep_base_config", full)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise SweepError(f"config {path}: {type(e).__name__}: {e}") from None


def _flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _flat_keys(v, prefix + k + ".")
    return out


def check(sweep: Sweep, runs: Sequence[Run], cfg: Any = None) -> None:
    """Every override names a key of the base config and has a type it accepts (before any run starts)."""
    cfg = load_config(sweep.config) if cfg is None else cfg
    for run in runs:
        trial = copy.deepcopy(cfg)
        for key, value in run.overrides.items():
            parts = key.split(".")
            node = trial
            for i, part in enumerate(parts):
                if not hasattr(node, "keys") or part not in node:
                    close = difflib.get_close_matches(key, _flat_keys(cfg), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise SweepError(f"sweep {sweep.name}: run {run.name}: unknown config key '{key}'{hint}")
                if i < len(parts) - 1:
                    node = node[part]
            try:
                setattr(node, parts[-1], value)
            except (TypeError, ValueError) as e:
                raise SweepError(f"sweep {sweep.name}: run {run.name}: {key}={value!r}: {e}") from None


def run_command(sweep: Sweep, run: Run, tpu: Tpu | None = None) -> list[str]:
    """The argv of one run: the entry module locally, or `launch/tpu.py run` on a TPU VM slice."""
    overrides = [f"--config.{k}={render(v)}" for k, v in run.overrides.items()]
    if tpu is None:
        return [
            sys.executable,
            "-m",
            ENTRIES[sweep.entry],
            "--config",
            sweep.config,
            "--workdir",
            run.workdir,
            *overrides,
        ]
    project = ["--project", tpu.project] if tpu.project else []
    return [
        sys.executable,
        os.path.join("launch", "tpu.py"),
        "run",
        "--name",
        tpu.name,
        "--zone",
        tpu.zone,
        *project,
        "--config",
        sweep.config,
        "--workdir",
        run.workdir,
        "--entry",
        sweep.entry,
        "--",
        *overrides,
    ]


def demo_metrics(results: Mapping) -> dict[str, float]:
    """Test EM of the embedded report's results: the warm start, and each arm's mean over seeds."""
    out = {f"warm_start.{k}": v for k, v in (results.get("warm_start") or {}).items() if isinstance(v, (int, float))}
    by_alg: dict[str, list[dict]] = {}
    for r in results.get("runs", []):
        by_alg.setdefault(r.get("arm") or r.get("algorithm"), []).append(r.get("final") or {})
    for alg, finals in by_alg.items():
        for k in ("single", "multi", "overall"):
            vals = [f[k] for f in finals if isinstance(f.get(k), (int, float))]
            if vals:
                out[f"{alg}.{k}"] = sum(vals) / len(vals)
        out[f"{alg}.seeds"] = len(finals)
    return out


def read_results(entry: str, workdir: str) -> dict | None:
    """The run's final numbers: the last row of metrics.jsonl (train), the report's test EM (demo) or the
    dead-end pilot's rates (pilot)."""
    try:
        if entry == "demo":
            with open(os.path.join(workdir, "report", "results.json"), encoding="utf-8") as f:
                return demo_metrics(json.load(f))
        if entry == "pilot":
            with open(os.path.join(workdir, "pilot.json"), encoding="utf-8") as f:
                return json.load(f)
        rows = []
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
        return rows[-1] if rows else None
    except (OSError, ValueError, AttributeError):
        return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return (render(value) if isinstance(value, tuple) else str(value)).replace("|", "\\|")


def summarize(
    sweep: Sweep, runs: Sequence[Run], records: Mapping[str, dict], results_dirs: Mapping[str, str] | None = None
) -> tuple[list[dict], str]:
    """Rows (name, swept values, status, metrics) and the markdown table; reads each run's results (from
    its workdir, or from `results_dirs[name]`: where `launch/tpu.py collect` put a TPU run's)."""
    swept_keys = list(dict.fromkeys(k for r in runs for k in r.swept))
    rows = []
    for run in runs:
        rec = records.get(run.name, {})
        results = read_results(sweep.entry, (results_dirs or {}).get(run.name, run.workdir))
        status = rec.get("status", "pending")
        if status in ("ok", "done") and results is None and rec.get("mode") == "tpu":
            status = "launched"  # the results are on the TPU VM until `launch/tpu.py collect` fetches them
        if status == "failed":
            status = f"failed (exit {rec.get('returncode')})"
        rows.append(
            {
                "name": run.name,
                "swept": {k: run.swept.get(k) for k in swept_keys},
                "status": status,
                "metrics": {m: (results or {}).get(m) for m in sweep.metrics},
                "workdir": run.workdir,
            }
        )
    header = ["run", *swept_keys, "status", *sweep.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["name"], *row["swept"].values(), row["status"], *row["metrics"].values()]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    table = "\n".join(lines)
    if any(row["status"] == "launched" for row in rows):
        table += (
            "\n\n'launched': the results are in the run's workdir on the TPU VM's workers; not read here "
            "until `launch/tpu.py collect --workdir` copies worker 0's metrics (train) into the run's "
            "folder here."
        )
    return rows, table


def collect_command(tpu: Tpu, run: Run, dest: str) -> list[str]:
    """`launch/tpu.py collect`: a TPU run's logs and worker 0's metrics into DEST/workerI/ (the summary
    reads DEST/worker0/)."""
    project = ["--project", tpu.project] if tpu.project else []
    return [
        sys.executable,
        os.path.join("launch", "tpu.py"),
        "collect",
        "--name",
        tpu.name,
        "--zone",
        tpu.zone,
        *project,
        "--dest",
        dest,
        "--workdir",
        run.workdir,
    ]


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def execute(command: list[str], log_path: str, done_path: str, mode: str) -> dict:
    """Run one command (output appended to `log_path`); on success leave the done marker."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if os.path.exists(done_path):  # --rerun: a failure must not leave the old marker behind
        os.remove(done_path)
    t0 = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        try:
            rc = subprocess.run(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            ).returncode
        except OSError as e:
            log.write(f"error: {e}\n")
            rc = 127
    rec = {
        "status": "ok" if rc == 0 else "failed",
        "returncode": rc,
        "seconds": round(time.time() - t0, 1),
        "log": log_path,
        "mode": mode,
    }
    if rc == 0:
        _write_json(done_path, {**rec, "command": command, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    else:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            rec["log_tail"] = "".join(f.readlines()[-20:])
    return rec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """`--only` patterns match a run's name, its index, or its name without the index (globs allowed)."""
    picked = []
    for pattern in only or []:
        hits = [
            r
            for r in runs
            if pattern in (r.name, str(r.index))
            or fnmatch.fnmatch(r.name, pattern)
            or fnmatch.fnmatch(r.name.split("-", 1)[1], pattern)
        ]
        if not hits:
            raise SweepError(f"--only {pattern!r} matches no run; runs: {', '.join(r.name for r in runs)}")
        picked += hits
    return [r for r in runs if r in picked] if only else list(runs)


def _records(runs: list[Run], selected: list[Run], dirs: dict[str, str], state: str, rerun: bool):
    """What is known before running: done markers, earlier statuses (sweep.json); and the runs to do."""
    try:
        with open(os.path.join(state, "sweep.json"), encoding="utf-8") as f:
            previous = {r["name"]: r for r in json.load(f)["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        previous = {}
    records, todo = {}, []
    for r in runs:
        done = os.path.join(dirs[r.name], DONE)
        if os.path.exists(done) and not (rerun and r in selected):
            with open(done, encoding="utf-8") as f:
                records[r.name] = {**json.load(f), "status": "done"}
        elif r in selected:
            records[r.name] = {"status": "pending"}
            todo.append(r)
        else:
            keep = ("status", "returncode", "seconds", "log", "mode", "log_tail")
            records[r.name] = {k: v for k, v in previous.get(r.name, {}).items() if k in keep} or {"status": "pending"}
    return records, todo


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="sweep file (configs/sweeps/NAME.py)")
    p.add_argument(
        "--root",
        help=f"workdirs go to ROOT/SWEEP/RUN (default {DEFAULT_ROOT}; with --tpu, a directory "
        f"on each worker relative to its repo dir, default {TPU_ROOT})",
    )
    p.add_argument(
        "--checkpoint-root",
        default="",
        metavar="URL",
        help="train sweeps: checkpoints to URL/SWEEP/RUN via --config.checkpoint.directory "
        "(a gs:// bucket for multi-host slices; a local path works too)",
    )
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.add_argument("--only", action="append", help="run only this run (name, index or glob); repeatable")
    p.add_argument("--rerun", action="store_true", help="run completed runs again")
    p.add_argument("--parallel", type=int, default=1, help="local runs at once")
    p.add_argument("--tpu", default="", help="TPU VM name: launch each run with launch/tpu.py run")
    p.add_argument("--zone", default="")
    p.add_argument("--project", default="")
    args = p.parse_args(argv)
    tpu = Tpu(args.tpu, args.zone, args.project) if args.tpu else None
    try:
        problems = [
            (args.parallel < 1, "--parallel must be >= 1"),
            ((args.zone or args.project) and not tpu, "--zone/--project need --tpu NAME"),
            (tpu and not args.zone, "--tpu needs --zone"),
            (tpu and args.parallel > 1, "--parallel > 1 would run several jobs on one TPU slice"),
            (
                is_remote(args.root or ""),
                f"--root {args.root}: workdirs are directories (with --tpu, on "
                "each worker); put checkpoints in a bucket with --checkpoint-root",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise SweepError(message)
        sweep = load_sweep(args.sweep)
        root = (args.root or TPU_ROOT) if tpu else os.path.abspath(args.root or DEFAULT_ROOT)
        ckpt = args.checkpoint_root  # local runs start in the repository: a local path made absolute
        ckpt = os.path.abspath(ckpt) if ckpt and not tpu and not is_remote(ckpt) else ckpt
        runs = expand(sweep, root, ckpt)
        check(sweep, runs)
        selected = _select(runs, args.only)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    commands = {r.name: run_command(sweep, r, tpu) for r in runs}
    if args.dry_run:
        for r in selected:
            print(f"# {r.name}\n{shlex.join(commands[r.name])}")
        return 0

    # Bookkeeping (sweep.json, logs, done markers, summary) stays local: beside the workdirs, or (with --tpu)
    # under the same ROOT here.
    state = os.path.abspath(os.path.join(root, sweep.name))
    dirs = {r.name: os.path.join(state, r.name) for r in runs}
    mode, log_name = ("tpu", "launch.log") if tpu else ("local", "run.log")
    records, todo = _records(runs, selected, dirs, state, args.rerun)
    os.makedirs(state, exist_ok=True)
    lock = threading.Lock()

    def save() -> None:
        with lock:
            _write_json(
                os.path.join(state, "sweep.json"),
                {
                    "name": sweep.name,
                    "sweep_file": sweep.path,
                    "config": sweep.config,
                    "entry": sweep.entry,
                    "root": root,
                    "mode": mode,
                    "tpu": tpu._asdict() if tpu else None,
                    "runs": [
                        {
                            "index": r.index,
                            "name": r.name,
                            "swept": r.swept,
                            "overrides": r.overrides,
                            "workdir": r.workdir,
                            "command": commands[r.name],
                            **records[r.name],
                        }
                        for r in runs
                    ],
                },
            )

    def one(r: Run) -> dict:
        return execute(commands[r.name], os.path.join(dirs[r.name], log_name), os.path.join(dirs[r.name], DONE), mode)

    save()
    print(
        f"sweep {sweep.name}: {len(runs)} runs, {len(todo)} to run, "
        f"{sum(rec['status'] == 'done' for rec in records.values())} done earlier; state in {state}",
        flush=True,
    )
    from tqdm import tqdm

    failed = 0
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel)
    try:
        with tqdm(total=len(todo), unit="run", desc=sweep.name, file=sys.stderr) as bar:
            futures = {pool.submit(one, r): r for r in todo}
            for fut in concurrent.futures.as_completed(futures):
                r, rec = futures[fut], fut.result()
                records[r.name] = rec
                bad = rec["status"] == "failed"
                failed += bad
                save()
                why = f" (exit {rec['returncode']}; {rec['log']}):\n{rec['log_tail'].rstrip()}" if bad else ""
                bar.write(f"{r.name}: {rec['status']} in {rec['seconds']:.0f} s{why}")
                bar.update(1)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)  # runs not started yet stay pending
        save()
        print("interrupted: finished runs are recorded; rerun the same command to continue", file=sys.stderr)
        return 130
    pool.shutdown()
    collected = {r.name: os.path.join(dirs[r.name], "worker0") for r in runs} if tpu else None
    rows, table = summarize(sweep, runs, records, collected)
    with open(os.path.join(state, "summary.md"), "w", encoding="utf-8") as f:
        f.write(f"# Sweep {sweep.name}\n\n{table}\n")
    _write_json(os.path.join(state, "summary.json"), rows)
    print(f"\n{table}\n\nsummary: {os.path.join(state, 'summary.md')}")
    launched = [r for r, row in zip(runs, rows) if row["status"] == "launched"]
    if launched and sweep.entry == "train":
        print(
            "fetch the launched runs' metrics, then run this sweep again for the table:\n"
            + "\n".join(shlex.join(collect_command(tpu, r, dirs[r.name])) for r in launched)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`rexrag-train --config configs/NAME.py --workdir DIR [--config.key=value ...]`: REX-RAG / GRPO training.

Thin: builds the mesh, tokenizer, policy, retriever and data from the (locked) config, then runs the
`Trainer`, which resumes from the newest checkpoint in the workdir. A mistyped override key fails.

A workdir holds one run: resuming it with a config other than its `config.json` is refused, naming the
keys, before anything in the workdir changes. `--allow-config-change` lets a resume change only
`config.RESUMABLE_CHANGES` (steps, checkpoint cadence, eval and progress settings); every resume is
recorded in `resume.jsonl`, and a change also in the log and in `config.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from rexrag_jax.cli.command import one_line_errors
from rexrag_jax.cli.components import (
    build_model,
    check_local_workdir,
    check_tokenizer_fits,
    load_config_tokenizer,
    open_retriever,
    prepare_process,
    resolve_path,
    run_config_app,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Required. Training config file, e.g. configs/tiny_cpu.py (a CPU toy run) or "
    "configs/qwen2p5_3b.py. Keys are overridden with --config.KEY=VALUE.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Required. Checkpoints, metrics, TensorBoard logs, the built "
    "data and config.json go here; rerunning resumes the run in it.",
)
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow-config-change",
    False,
    "Resume the workdir's run with other steps, "
    "checkpoint cadence, eval or progress settings; any other change is refused.",
)


def training_examples(cfg, workdir: str):
    """The training questions: `data.train_file`'s files built (once) into a TFDS dataset. With several
    processes each builds its own copy (`.../process<i>`: the files are on every host, a shared
    directory would see concurrent writers) and reads its share of every batch from it."""
    import jax

    from rexrag_jax.data.tfds_builders import TRAIN_MIX, build_dataset, load_split

    files = [resolve_path(f.strip(), "data.train_file") for f in cfg.data.train_file.split(",") if f.strip()]
    data_dir = cfg.data.tfds_dir or os.path.join(workdir, "tfds")
    if jax.process_count() > 1:
        data_dir = os.path.join(data_dir, f"process{jax.process_index()}")
    report = build_dataset(TRAIN_MIX, {"train": files}, data_dir, skip_bad=cfg.data.skip_bad)
    if jax.process_index() == 0:
        split = report["splits"]["train"]
        print(
            f"training data: {split['examples']} questions ({split['sources']}) from {len(files)} file(s), "
            f"{report['skipped']} bad rows skipped" + ("" if not report["rebuilt"] else "; built into " + data_dir),
            flush=True,
        )
        for problem in report["problems"][:5]:
            print(f"  skipped: {problem}", flush=True)
    return load_split(TRAIN_MIX, "train", data_dir)


def checkpoints_dir(workdir: str, directory: str) -> str:
    """Where a run with `checkpoint.directory = directory` keeps its checkpoints."""
    return directory or os.path.join(workdir, "checkpoints")


def check_resume(cfg, workdir: str, allow_change: bool) -> dict | None:
    """None for a fresh start; for a resume (checkpoints of the run recorded in `config.json` exist) the
    config changes it makes, or a ValueError naming the keys (`config.resume_changes`). Process 0
    decides (its workdir holds `config.json`) and every process follows, so all stop or go together."""
    import jax

    from rexrag_jax.config import config_values, flatten, resume_changes
    from rexrag_jax.distributed import allgather_objects
    from rexrag_jax.jsonfile import read_json
    from rexrag_jax.rl.checkpoint import committed_steps

    outcome: tuple[str, object] = ("fresh", None)
    path = os.path.join(workdir, "config.json")
    if jax.process_index() == 0 and os.path.exists(path):
        try:
            old, new = flatten(read_json(path)), config_values(cfg)
            dirs = (old.get("checkpoint.directory", ""), cfg.checkpoint.directory)  # the run's and this start's
            if any(committed_steps(checkpoints_dir(workdir, d)) for d in dirs):
                outcome = ("resume", resume_changes(old, new, allow_change=allow_change, workdir=workdir))
        except ValueError as e:
            outcome = ("error", str(e))
    kind, value = allgather_objects(outcome)[0]
    if kind == "error":
        raise ValueError(value)
    return value if kind == "resume" else None


def record_resume(workdir: str, step: int, changes: dict) -> None:
    """A `resume.jsonl` row for every resume (time, step, changed keys), and a log line for a change."""
    from rexrag_jax.config import describe_diff

    if changes:
        print(f"resumed from step {step}; changed: {describe_diff(changes)}", flush=True)
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "changed": {k: list(v) for k, v in changes.items()},
    }
    with open(os.path.join(workdir, "resume.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def train(cfg, workdir: str, allow_config_change: bool = False) -> list[dict]:
    import jax

    from rexrag_jax.config import validate
    from rexrag_jax.data import prompt_ids
    from rexrag_jax.jsonfile import write_bytes_atomic
    from rexrag_jax.rl.trainer import Trainer
    from rexrag_jax.rollout import ExplorationPool
    from rexrag_jax.sharding import make_mesh

    validate(cfg)
    check_local_workdir(workdir)
    changes = check_resume(cfg, workdir, allow_config_change)  # refuses before anything is written
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0 and (changes is None or changes):
        write_bytes_atomic(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2).encode("utf-8"))
    mesh = make_mesh(dict(cfg.mesh))
    tokenizer = load_config_tokenizer(cfg, workdir)
    check_tokenizer_fits(cfg, tokenizer)  # before the data is built and any weights load
    examples = training_examples(cfg, workdir)
    model = build_model(cfg, mesh, tokenizer)
    pool = None
    if cfg.algorithm == "rexrag":
        pool = ExplorationPool.from_file(resolve_path(cfg.rollout.pool_file, "rollout.pool_file"), tokenizer)
    with open_retriever(cfg, workdir) as retriever:
        trainer = Trainer(
            cfg,
            workdir,
            model=model,
            tokenizer=tokenizer,
            retriever=retriever,
            examples=examples,
            encode_prompt=lambda q: prompt_ids(tokenizer, q),
            pool=pool,
        )
        if trainer.step and jax.process_index() == 0:
            record_resume(workdir, trainer.step, changes or {})
        return trainer.run()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None or _WORKDIR.value is None:
        raise app.UsageError("both --config and --workdir are required")
    prepare_process(cfg)
    with one_line_errors():
        rows = train(cfg, _WORKDIR.value, _ALLOW_CHANGE.value)
    if rows:
        print(json.dumps({"last_step": rows[-1]["step"], "reward": rows[-1]["reward"]}))


def cli() -> None:
    """console_scripts entry point."""
    run_config_app(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()

"""`rexrag-train --config configs/NAME.py --workdir DIR [--config.key=value ...]`: REX-RAG / GRPO training.

Thin: builds the mesh, tokenizer, policy, retriever and data from the (locked) config, then runs the
`Trainer`, which resumes from the newest checkpoint in the workdir. A mistyped override key fails.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from rexrag_jax.cli.components import (build_model, check_local_workdir, load_config_tokenizer, open_retriever,
                                       prepare_process, resolve_path, run_config_app)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard logs go here.")


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
        print(f"training data: {split['examples']} questions ({split['sources']}) from {len(files)} file(s), "
              f"{report['skipped']} bad rows skipped" + ("" if not report["rebuilt"] else "; built into " + data_dir),
              flush=True)
        for problem in report["problems"][:5]:
            print(f"  skipped: {problem}", flush=True)
    return load_split(TRAIN_MIX, "train", data_dir)


def train(cfg, workdir: str) -> list[dict]:
    import jax

    from rexrag_jax.data import prompt_ids
    from rexrag_jax.rl.config import validate_config
    from rexrag_jax.rl.trainer import Trainer
    from rexrag_jax.rollout import ExplorationPool
    from rexrag_jax.sharding import make_mesh

    validate_config(cfg)
    check_local_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    mesh = make_mesh(dict(cfg.mesh))
    tokenizer = load_config_tokenizer(cfg, workdir)
    examples = training_examples(cfg, workdir)
    model = build_model(cfg, mesh, tokenizer)
    pool = None
    if cfg.algorithm == "rexrag":
        pool = ExplorationPool.from_file(resolve_path(cfg.rollout.pool_file, "rollout.pool_file"), tokenizer)
    with open_retriever(cfg, workdir) as retriever:
        trainer = Trainer(cfg, workdir, model=model, tokenizer=tokenizer, retriever=retriever, examples=examples,
                          encode_prompt=lambda q: prompt_ids(tokenizer, q), pool=pool)
        return trainer.run()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None or _WORKDIR.value is None:
        raise app.UsageError("both --config and --workdir are required")
    prepare_process(cfg)
    try:
        rows = train(cfg, _WORKDIR.value)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if rows:
        print(json.dumps({"last_step": rows[-1]["step"], "reward": rows[-1]["reward"]}))


def cli() -> None:
    """console_scripts entry point."""
    run_config_app(main)


if __name__ == "__main__":
    cli()

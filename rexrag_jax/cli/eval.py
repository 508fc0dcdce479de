"""`rexrag-eval --config configs/NAME.py --checkpoint DIR --datasets nq,hotpotqa,... [--limit N]`.

Runs the search agent with greedy decoding (one trajectory per question, no probes), sharded over the
config's mesh, on FlashRAG-format datasets under `eval.data_dir` (test split, else dev) or the rows of
one `data_source` each from a Search-R1 test parquet (`eval.data_dir=.../test.parquet`), and writes EM/F1
in the paper's table layout plus every trajectory. `--checkpoint` is a training workdir (its newest
step), a checkpoints folder, one step folder, or a HF model directory. Rerunning continues where an
interrupted run stopped.

A HF model (its own tokenizer is used when the directory has one; docs/evaluating_hf_models.md):
`rexrag-eval --config configs/eval_hf.py --checkpoint MODEL_DIR --datasets nq,hotpotqa --limit 10`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from rexrag_jax.cli.command import one_line_errors
from rexrag_jax.cli.components import (
    check_tokenizer_fits,
    load_config_tokenizer,
    model_config,
    open_retriever,
    prepare_process,
    resolve_path,
    run_config_app,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Required. Config file: configs/eval_hf.py for a HF model directory "
    "(docs/evaluating_hf_models.md), or the config a training run used. Keys are overridden with "
    "--config.KEY=VALUE.",
    lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Required. What to evaluate: a HF model directory (config.json + *.safetensors, and "
    "its tokenizer files, used unless --config.tokenizer is set), a training workdir (its newest step), "
    "its checkpoints folder or one step folder.",
)
_DATASETS = flags.DEFINE_list(
    "datasets",
    None,
    "Required. Comma-separated dataset names: folders <name>/{test,dev}.jsonl under "
    "eval.data_dir (e.g. nq,hotpotqa), or data_source values of a Search-R1 test parquet.",
)
_LIMIT = flags.DEFINE_integer(
    "limit", None, "Evaluate only the first N questions of each dataset (default: all).", lower_bound=1
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Folder for scores and trajectories (default: "
    "<checkpoint>/eval[/step_<k>]); a rerun continues an interrupted run there.",
)


def checkpoint_steps_dir(path: str) -> tuple[str, int | None] | None:
    """(orbax checkpoints folder, step or None for the newest) for a training checkpoint path, else None.
    A local path or a gs:// URL (through etils.epath, as orbax reads it)."""
    from etils import epath

    p = epath.Path(path if "://" in path else os.path.abspath(path))
    if (p / "checkpoints").is_dir():
        return str(p / "checkpoints"), None
    if p.name.isdigit() and (p / "state").is_dir():
        return str(p.parent), int(p.name)
    if any(child.name.isdigit() for child in p.iterdir()):
        return str(p), None
    return None


def locate_checkpoint(checkpoint: str) -> tuple[str, int | None] | None:
    """What `--checkpoint` names, checked before anything is written (the default output folder is inside
    it, so a mistyped path would otherwise be created): (checkpoints folder, step or None) of a training
    checkpoint, None for a HF model directory; FileNotFoundError for anything else."""
    from etils import epath

    path = epath.Path(checkpoint if "://" in checkpoint else os.path.abspath(checkpoint))
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} does not exist (--checkpoint: a training workdir, its "
            "checkpoints folder, one step folder or a HF model directory)"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint} is not a directory")
    found = checkpoint_steps_dir(checkpoint)
    if found is None and ("://" in checkpoint or not os.path.isfile(os.path.join(checkpoint, "config.json"))):
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: neither a training checkpoint (checkpoints/<step>) "
            "nor a HF model directory (config.json + safetensors)"
        )
    return found


def load_policy(cfg, checkpoint: str, found: tuple[str, int | None] | None, mesh, tokenizer):
    """(model, step or None, description) from a training checkpoint (`found`, see `locate_checkpoint`) or
    a HF directory."""
    from flax import nnx

    from rexrag_jax.models import load_hf
    from rexrag_jax.models.decoder import abstract_model
    from rexrag_jax.rl.checkpoint import Checkpointer

    if found is None:
        model, config = load_hf(checkpoint, dtype="float32", mesh=mesh)
        model.config = config.replace(dtype=cfg.model.dtype)
        return model, None, f"HF model {checkpoint}"
    directory, step = found
    graphdef, target = abstract_model(model_config(cfg, tokenizer), mesh)
    try:
        step, params = Checkpointer(directory, read_only=True).restore_params(target, step)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"checkpoint {directory} does not match the config's model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]})"
        ) from e
    return nnx.merge(graphdef, params), step, f"step {step} of {directory}"


def run(cfg, checkpoint: str, names: list[str], limit: int | None, output: str | None) -> dict:
    from flax import nnx

    from rexrag_jax.config import as_config, greedy_rollout, validate
    from rexrag_jax.data import prompt_ids
    from rexrag_jax.data.tfds_builders import build_dataset, flashrag_split_file, load_split
    from rexrag_jax.eval import evaluate
    from rexrag_jax.rollout import RolloutEngine
    from rexrag_jax.sharding import make_mesh

    validate(cfg, for_eval=True)
    if "://" in checkpoint and output is None:
        raise ValueError(f"--checkpoint {checkpoint!r} is a URL: give --output, a local directory for the results")
    found = locate_checkpoint(checkpoint)
    if found is not None and cfg.model.init == "hf" and not cfg.model.path:
        raise ValueError(
            "config model.init='hf' needs model.path (the HF directory the run started from) to "
            "know the architecture of a training checkpoint: --config.model.path=DIR"
        )
    model_dir = checkpoint if found is None else None  # a HF directory: its architecture and tokenizer
    if not cfg.eval.data_dir:
        raise ValueError(
            "config eval.data_dir is empty: a folder with FlashRAG datasets (<name>/test.jsonl) "
            "or a Search-R1 test parquet"
        )
    data_dir = resolve_path(cfg.eval.data_dir, "eval.data_dir")
    mesh = make_mesh(dict(cfg.mesh))
    tokenizer = load_config_tokenizer(cfg, os.path.join(checkpoint, "eval") if output is None else output, model_dir)
    check_tokenizer_fits(cfg, tokenizer, model_dir)  # before any weights load
    model, step, what = load_policy(cfg, checkpoint, found, mesh, tokenizer)
    out_dir = output or os.path.join(checkpoint, "eval", f"step_{step}" if step is not None else "")
    os.makedirs(out_dir, exist_ok=True)
    datasets = {}
    for name in names:
        # a FlashRAG folder (<name>/test.jsonl, else dev), or one Search-R1 test parquet holding every set
        split, path = ("test", data_dir) if data_dir.endswith(".parquet") else flashrag_split_file(data_dir, name)
        report = build_dataset(name, {split: path}, os.path.join(out_dir, "tfds"), skip_bad=cfg.data.skip_bad)
        if report["skipped"]:
            print(f"{name}: skipped {report['skipped']} bad rows of {path}, e.g. {report['problems'][:3]}", flush=True)
        source = load_split(name, split, os.path.join(out_dir, "tfds"))
        n = len(source) if limit is None else min(limit, len(source))
        datasets[name] = [source[i] for i in range(n)]  # the first n rows of the file
    settings = greedy_rollout(as_config(cfg).rollout)
    with open_retriever(cfg, out_dir) as retriever:
        engine = RolloutEngine(model, tokenizer, retriever, settings)
        print(
            f"evaluating {what} on {', '.join(f'{k} ({len(v)})' for k, v in datasets.items())} -> {out_dir}", flush=True
        )
        results = evaluate(
            engine,
            nnx.state(model),
            tokenizer,
            datasets,
            out_dir,
            encode_prompt=lambda q: prompt_ids(tokenizer, q),
            batch_size=cfg.eval.batch_size,
            progress=cfg.progress,
        )
    return results


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None or _CHECKPOINT.value is None or not _DATASETS.value:
        raise app.UsageError("--config, --checkpoint and --datasets are required")
    prepare_process(cfg)
    with one_line_errors():
        results = run(cfg, _CHECKPOINT.value, _DATASETS.value, _LIMIT.value, _OUTPUT.value)
    print(json.dumps(results))


def cli() -> None:
    """console_scripts entry point."""
    run_config_app(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()

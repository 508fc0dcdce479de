"""`rexrag-train --config configs/NAME.py --workdir DIR [--config.key=value ...]`: REX-RAG / GRPO training.

Thin: builds the mesh, tokenizer, policy, retriever and data from the (locked) config, then runs the
`Trainer`, which resumes from the newest checkpoint in the workdir. A mistyped override key fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard logs go here.")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def resolve_path(path: str, what: str) -> str:
    """A path as given, or relative to the repository root (configs name files there); errors name `what`."""
    for candidate in (pathlib.Path(path), REPO_ROOT / path):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"config {what}: {path!r} does not exist")


def build_model(cfg, mesh, tokenizer):
    from rexrag_jax.models import ModelConfig, init_model, load_hf

    if cfg.model.init == "random":
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        eos = eos if isinstance(eos, int) and eos >= 0 else tokenizer.eos_token_id
        arch = {**cfg.model.arch.to_dict(), "dtype": cfg.model.dtype, "remat": cfg.model.remat}
        return init_model(ModelConfig(**arch, eos_token_id=(eos,)), seed=cfg.seed, mesh=mesh)
    model, config = load_hf(cfg.model.path, dtype="float32", mesh=mesh)  # fp32 master weights
    model.config = config.replace(dtype=cfg.model.dtype, remat=cfg.model.remat)
    return model


@contextlib.contextmanager
def open_retriever(cfg, workdir: str):
    """The configured retriever: an HTTP server, an index directory, or a corpus indexed into the workdir."""
    from rexrag_jax.retrieval import RetrievalClient, build_index, load_index
    from rexrag_jax.retrieval.encoder import minilm_dir

    r = cfg.retrieval
    if r.url:
        yield RetrievalClient(r.url)
        return
    path = resolve_path(r.index, "retrieval.index") if r.index else os.path.join(workdir, "index")
    if r.corpus:
        build_index(resolve_path(r.corpus, "retrieval.corpus"), r.encoder or minilm_dir(), path, resume=True)
    with load_index(path) as index:
        yield index


def train(cfg, workdir: str) -> list[dict]:
    import jax

    from rexrag_jax.data import prompt_ids, read_qa_jsonl
    from rexrag_jax.models import load_tokenizer, make_qwen25_tokenizer_dir
    from rexrag_jax.rl.config import validate_config
    from rexrag_jax.rl.trainer import Trainer
    from rexrag_jax.rollout import ExplorationPool
    from rexrag_jax.sharding import make_mesh

    validate_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    mesh = make_mesh(dict(cfg.mesh))
    tok_dir = cfg.tokenizer or str(make_qwen25_tokenizer_dir(os.path.join(workdir, "tokenizer")))
    tokenizer = load_tokenizer(tok_dir)
    examples = read_qa_jsonl(resolve_path(cfg.data.train_file, "data.train_file"))
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
    if cfg.cpu_devices:  # read when jax's backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={cfg.cpu_devices}").strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint phase at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        rows = train(cfg, _WORKDIR.value)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if rows:
        print(json.dumps({"last_step": rows[-1]["step"], "reward": rows[-1]["reward"]}))


def cli() -> None:
    """console_scripts entry point. An override of a key the locked config lacks fails while flags are
    parsed (config_flags raises AttributeError/KeyError there); report it as one line, exit 2."""
    started = []

    def run(argv):
        started.append(True)
        main(argv)

    try:
        app.run(run)
    except (AttributeError, KeyError) as e:
        if started:
            raise
        detail = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\", "").replace("'", "")
        detail = " ".join(detail.split())
        overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
        print(f"error: unknown config key among {overrides}: {detail}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()

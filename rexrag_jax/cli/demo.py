"""`rexrag-demo --config configs/embedded.py --workdir DIR [--config.key=value ...]`: the embedded default.

Generates the synthetic world, trains the tokenizer, indexes the corpus with MiniLM, warm-starts a tiny
Qwen2 on demonstrations, runs GRPO and REX-RAG from it for each seed, and writes the report
(`DIR/report/report.md`, `curves.png`, `trajectories.html`). Rerunning continues an interrupted run.

`rexrag-pilot` (same flags) trains nothing: it builds the warm start and reports its dead-end pilot, the
share of training groups whose G samples are all wrong and how often a probe rescues one (`DIR/pilot.json`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from rexrag_jax.cli.command import one_line_errors
from rexrag_jax.cli.components import prepare_process, resolve_path, run_config_app

# No default file: with one, config_flags parses overrides at import, outside run_config_app's clear errors.
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Required. The embedded run's config file: configs/embedded.py. Keys are overridden with "
    "--config.KEY=VALUE (e.g. --config.pilot=False).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "workdir/embedded", "Everything the run makes goes here; rerunning continues an interrupted run."
)
_POOL = flags.DEFINE_string(
    "pool_file",
    "configs/exploration_prompts.txt",
    "REX-RAG's exploratory prompts, one per line (the default is installed with rexrag_jax, found from any directory).",
)


def main(argv, pilot_only: bool = False) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required (the embedded default: --config configs/embedded.py)")
    prepare_process(cfg)
    from rexrag_jax.embedded.experiment import run_experiment
    from rexrag_jax.embedded.report import pilot_markdown, results_table

    with one_line_errors():
        results = run_experiment(
            cfg, _WORKDIR.value, pool_file=resolve_path(_POOL.value, "--pool_file"), pilot_only=pilot_only
        )
    if pilot_only:
        print("\n" + pilot_markdown(results))
        print(f"pilot: {os.path.join(_WORKDIR.value, 'pilot.json')}")
        return
    print("\n" + results_table(results))
    print(f"report: {os.path.join(_WORKDIR.value, 'report', 'report.md')}")


def cli() -> None:
    """console_scripts entry point."""
    run_config_app(main, sys.modules[__name__])


def pilot_cli() -> None:
    """console_scripts entry point of `rexrag-pilot`."""
    run_config_app(lambda argv: main(argv, pilot_only=True), sys.modules[__name__])


if __name__ == "__main__":
    cli()

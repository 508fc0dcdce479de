"""`rexrag-index build`: embed a FlashRAG/Search-R1 JSONL corpus with a Flax encoder and write an index.

A thin wrapper over `rexrag_jax.retrieval.index.build_index`. Expected failures (a missing file, a
malformed corpus line, a bad option) print one `error: ...` line and exit 2, without a traceback, so the
message that names the file and line is the last thing on the screen.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from rexrag_jax.cli.command import positive_int, run_command
from rexrag_jax.untrusted import DEFAULT_LIMITS

CHECKPOINT_ROWS = 2048  # rexrag_jax.retrieval.index.CHECKPOINT_ROWS (not imported: it would load jax for --help)

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexrag-index", description="Build and manage retrieval indexes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser(
        "build",
        help="embed a JSONL corpus and write an index directory",
        description='Embed a FlashRAG/Search-R1 JSONL corpus ({"id", "contents"} '
        "per line) and write a searchable index directory.",
    )
    build.add_argument("--corpus", required=True, metavar="FILE", help="JSONL corpus file")
    build.add_argument("--encoder", required=True, metavar="DIR", help="encoder directory (HF format)")
    build.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    build.add_argument(
        "--backend",
        choices=("auto", "scann", "exact"),
        default="auto",
        help="search backend (default: auto = ScaNN where installed, else exact)",
    )
    build.add_argument(
        "--batch-size", type=positive_int, default=256, metavar="N", help="passages per encoder batch (default: 256)"
    )
    build.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed corpus lines (counted in the summary) instead of stopping",
    )
    build.add_argument(
        "--no-resume", action="store_true", help="re-embed from scratch instead of resuming an interrupted build"
    )
    build.add_argument(
        "--checkpoint-rows",
        type=positive_int,
        default=CHECKPOINT_ROWS,
        metavar="N",
        help="rows encoded between build checkpoints; a kill loses at most this many "
        f"(default: {CHECKPOINT_ROWS}, about a minute of MiniLM encoding on 2 CPU cores)",
    )
    build.add_argument(
        "--max-line-bytes",
        type=positive_int,
        default=DEFAULT_LIMITS.max_line_bytes,
        metavar="N",
        help=f"longest corpus line accepted; longer ones are bad lines (default: {DEFAULT_LIMITS.max_line_bytes})",
    )
    return parser


def _summary(manifest: dict, out: str, seconds: float) -> str:
    counts = manifest["counts"]
    return (
        f"indexed {counts['rows']} passages into {out} ({counts['skipped']} bad lines skipped): "
        f"dim {manifest['dim']}, backend {manifest['backend']}, {seconds:.1f} s"
    )


def _build(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.corpus):
        raise FileNotFoundError(f"corpus file not found: {args.corpus}")
    if not os.path.isdir(args.encoder):
        raise FileNotFoundError(f"encoder directory not found: {args.encoder}")
    from rexrag_jax.retrieval.encoder import load_encoder  # lazy: jax is slow to import
    from rexrag_jax.retrieval.index import build_index

    started = time.perf_counter()
    encoder = load_encoder(args.encoder)
    manifest = build_index(
        args.corpus,
        encoder,
        args.out,
        backend=args.backend,
        batch_size=args.batch_size,
        skip_bad=args.skip_bad_lines,
        resume=not args.no_resume,
        chunk_rows=args.checkpoint_rows,
        limits=dataclasses.replace(DEFAULT_LIMITS, max_line_bytes=args.max_line_bytes),
    )
    print(_summary(manifest, args.out, time.perf_counter() - started))
    return 0


def _interrupted() -> int:
    print("interrupted: run the same command again to resume", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run `rexrag-index`; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    return run_command(build_parser(), _build, argv, on_interrupt=_interrupted)


def cli() -> None:
    """console_scripts entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()

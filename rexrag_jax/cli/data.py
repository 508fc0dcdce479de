"""`rexrag-data build`: build TFDS (array_record) datasets from local QA files, ahead of a run.

`rexrag-train` and `rexrag-eval` build what they need on first use; this command does it up front (and on
one host before a multi-host launch), prints what was built and how many bad rows were skipped.
Expected failures (a missing file, a malformed row) print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from rexrag_jax.cli.command import positive_int, run_command
from rexrag_jax.untrusted import DEFAULT_LIMITS


def build_parser() -> argparse.ArgumentParser:
    from rexrag_jax.data.tfds_builders import DATASET_NAMES

    parser = argparse.ArgumentParser(prog="rexrag-data", description="Build QA datasets for training and evaluation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser(
        "build",
        help="build datasets from FlashRAG JSONL / Search-R1 parquet files",
        description="Build TFDS array_record datasets. Either --flashrag ROOT (every evaluation set found "
        "under ROOT/<name>/{test,dev}.jsonl, and the nq_hotpotqa training mix from "
        "ROOT/{nq,hotpotqa}/train.jsonl when both exist), or --dataset NAME with --file FILE...",
    )
    build.add_argument("--out", required=True, metavar="DIR", help="TFDS data directory to write")
    build.add_argument("--flashrag", metavar="ROOT", help="a FlashRAG_datasets folder")
    build.add_argument("--dataset", choices=DATASET_NAMES, help="one dataset to build from --file")
    build.add_argument("--file", nargs="+", metavar="FILE", help="JSONL / parquet files of --dataset")
    build.add_argument("--split", default="train", help="split name for --file (default: train)")
    build.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows instead of stopping")
    build.add_argument(
        "--max-line-bytes",
        type=positive_int,
        default=DEFAULT_LIMITS.max_line_bytes,
        metavar="N",
        help=f"longest JSONL line accepted; longer ones are bad rows (default: {DEFAULT_LIMITS.max_line_bytes})",
    )
    return parser


def _build(args: argparse.Namespace) -> int:
    from rexrag_jax.data.tfds_builders import EVAL_DATASETS, TRAIN_MIX, build_dataset, flashrag_split_file

    if bool(args.flashrag) == bool(args.dataset):
        raise ValueError("give either --flashrag ROOT or --dataset NAME --file FILE...")
    jobs: list[tuple[str, dict]] = []
    if args.dataset:
        if not args.file:
            raise ValueError("--dataset needs --file")
        jobs.append((args.dataset, {args.split: args.file}))
    else:
        if not os.path.isdir(args.flashrag):
            raise FileNotFoundError(f"--flashrag {args.flashrag} is not a directory")
        for name in EVAL_DATASETS:
            if os.path.isdir(os.path.join(args.flashrag, name)):
                split, path = flashrag_split_file(args.flashrag, name)
                jobs.append((name, {split: path}))
        train = [os.path.join(args.flashrag, n, "train.jsonl") for n in ("nq", "hotpotqa")]
        if all(os.path.isfile(p) for p in train):
            jobs.append((TRAIN_MIX, {"train": train}))
        if not jobs:
            raise FileNotFoundError(f"no FlashRAG datasets under {args.flashrag} (expected <name>/test.jsonl)")
    for name, files in jobs:
        report = build_dataset(
            name,
            files,
            args.out,
            skip_bad=args.skip_bad,
            limits=dataclasses.replace(DEFAULT_LIMITS, max_line_bytes=args.max_line_bytes),
        )
        counts = ", ".join(f"{split} {info['examples']}" for split, info in report["splits"].items())
        state = "built" if report["rebuilt"] else "up to date"
        print(f"{name}: {state} ({counts}; {report['skipped']} bad rows skipped)")
        for problem in report["problems"][:3]:
            print(f"  skipped: {problem}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _build, argv, on_interrupt=lambda: 130)


def cli() -> None:
    """console_scripts entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()

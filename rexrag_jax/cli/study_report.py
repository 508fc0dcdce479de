"""`python -m rexrag_jax.cli.study_report --root DIR [--out OUT] [--baseline grpo]`: the dead-end study's report.

Reads the level directories under DIR (each with embedded_config.json, warm_start_eval.json, pilot.json and
runs/<arm>-seed<k>/result.json), writes study.md, study.json and study.png into OUT (default DIR/report),
prints the markdown and the paths. Bad input: one `error: ...` line naming the file, exit status 2.
No jax import: the report can be regenerated anywhere, also while runs are still going.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rexrag_jax.cli.study_report", description="Paired per-seed statistics of the dead-end study."
    )
    parser.add_argument("--root", required=True, help="the study directory (levels are it or its subdirectories)")
    parser.add_argument("--out", default=None, help="where the report goes (default: ROOT/report)")
    parser.add_argument("--baseline", default="grpo", help="the arm every other arm is paired with (default grpo)")
    args = parser.parse_args(argv)
    from rexrag_jax.embedded.study import load_study, write_study_report

    out = args.out or os.path.join(args.root, "report")
    try:
        study = load_study(args.root)
        if not any(r["arm"] == args.baseline for lv in study["levels"] for r in lv["runs"]):
            print(
                f"warning: no finished runs of the baseline arm {args.baseline!r}: nothing is paired", file=sys.stderr
            )
        paths = write_study_report(study, out, baseline=args.baseline)
        with open(paths["markdown"], encoding="utf-8") as f:
            markdown = f.read()
    except (ValueError, OSError) as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 2
    print(markdown)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

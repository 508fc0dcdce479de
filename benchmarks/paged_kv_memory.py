"""KV-cache memory of the paper's rollout (512 prompts x G=5 at 4096 context) with a paged cache, against
the contiguous `rows x max_context` cache the engine allocates today.

Input: the trajectory layouts that `benchmarks/multiturn_rollout.py --trajectories FILE` writes (a real
multi-turn rollout with probes: each trajectory's segments in order). Its turns are capped at
`--measured-turn-cap` tokens (64 there, to keep that run short); here every model turn is scaled to the
authors' cap (`--turn-tokens`, 500; with `--turns-at-cap` every turn uses all of it), prompts,
information blocks, feedback and probe prompts keep their measured lengths, and a trajectory is cut at
the context limit.

A session of `--prompts` groups is drawn from the measured groups with replacement and laid out in
`rollout.pages.PageTable` as a paged engine would: the group's prompt prefilled once into row 0's pages
and shared by its G rows, each row then written to its final length (its copy of the prompt's partly
filled last page made on first write), and a probe taking over its source row: rolled back to where it
branched, then grown to its own length. The peak counted is every row at its final length at once: the
upper bound of a session in which no row finishes early. Repeated over `--resamples` draws: mean and a
95% interval.

Run:  .venv/bin/python benchmarks/paged_kv_memory.py --trajectories layouts.jsonl [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np

from rexrag_jax.config import QWEN25_ARCHS
from rexrag_jax.planning.memory import GIB, TPU_HBM_GIB
from rexrag_jax.protocol import MODEL, PROBE_PROMPT, PROMPT
from rexrag_jax.rollout.pages import PageTable, pages_for


@dataclass
class Row:
    prompt: int  # prompt tokens (the group's shared prefix)
    length: int  # final context length of the original trajectory
    probe: tuple[int, int] | None = None  # (branch point, final length) of a probe that took the row over


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trajectories", required=True, help="JSON lines from multiturn_rollout.py --trajectories")
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--turn-tokens", type=int, default=500, help="the authors' per-turn cap")
    p.add_argument("--measured-turn-cap", type=int, default=64, help="the cap of the measured rollout")
    p.add_argument(
        "--turns-at-cap", action="store_true", help="the worst case: every model turn uses all --turn-tokens"
    )
    p.add_argument("--page-sizes", default="16,128")
    p.add_argument("--model", default="qwen2.5-3b", choices=sorted(QWEN25_ARCHS))
    p.add_argument("--chips", type=int, default=4, help="devices the rows are spread over (v5p-8: 4 chips)")
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    return p.parse_args()


def read_layouts(path: str) -> list[dict]:
    layouts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                item = json.loads(line)
                item["segments"] = [(int(label), int(length)) for label, length in item["segments"]]
                layouts.append(item)
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: not a trajectory layout ({e})") from None
    if not layouts:
        raise SystemExit(f"{path}: no trajectories")
    return layouts


def scaled_length(segments, factor: float, cap: int, context: int) -> tuple[int, int]:
    """(prompt tokens, context length) with every model turn scaled by `factor` (at most `cap` tokens)."""
    prompt = sum(n for label, n in segments[:1] if label == PROMPT)
    total = sum(min(cap, round(n * factor)) if label == MODEL else n for label, n in segments)
    return prompt, min(total, context)


def measured_groups(layouts: list[dict], factor: float, cap: int, context: int) -> list[list[Row]]:
    """Per measured group, its rows (originals in order, each with the probe that took it over, if any)."""
    originals = [t for t in layouts if not t["probe"]]
    rows = {}
    for index, t in enumerate(originals):
        prompt, length = scaled_length(t["segments"], factor, cap, context)
        rows[index] = Row(prompt, length)
    for n, t in enumerate(layouts, 1):
        if t["probe"]:
            labels = [label for label, _ in t["segments"]]
            if t["source"] not in rows or PROBE_PROMPT not in labels:
                raise SystemExit(f"trajectory {n}: a probe needs the index of an original (source) and a probe prompt")
            source = rows[t["source"]]
            _, length = scaled_length(t["segments"], factor, cap, context)
            # The probe shares the source's context up to its probe prompt (the re-opened turn without its
            # answer block: a few tokens more than the exact common prefix, so sharing is slightly overstated).
            before = next(i for i, (label, _) in enumerate(t["segments"]) if label == PROBE_PROMPT)
            _, branch = scaled_length(t["segments"][:before], factor, cap, context)
            source.probe = (min(branch, source.length), length)
    groups: dict[int, list[Row]] = {}
    for index, t in enumerate(originals):
        groups.setdefault(t["group"], []).append(rows[index])
    return list(groups.values())


def peak_pages(groups: list[list[Row]], page_size: int, context: int) -> int:
    """Pages in use with every row at its final length, for one session laid out as a paged engine
    would; `PageTable.check` verifies the allocator's invariants at the end."""
    rows = sum(len(g) for g in groups)
    max_pages = pages_for(context, page_size)
    table = PageTable(num_pages=rows * max_pages, page_size=page_size, rows=rows, max_pages=max_pages)
    first = 0
    for group in groups:
        members = list(range(first, first + len(group)))
        table.extend(members[0], group[0].prompt)  # the prompt, prefilled once
        table.share(members[0], members[1:])
        for r, row in zip(members, group):
            table.extend(r, row.length)
            if row.probe is not None:
                branch, length = row.probe
                table.extend(r, branch)  # the probe rolls the row back to its branch point ...
                table.extend(r, max(length, branch))  # ... and grows it to its own length
        first += len(group)
    table.check()
    return table.num_pages - table.free_pages


def main() -> None:
    args = parse_args()
    arch = QWEN25_ARCHS[args.model]
    token_bytes = arch["num_layers"] * 2 * arch["num_kv_heads"] * arch["head_dim"] * 2  # k and v, bf16
    factor = args.turn_tokens if args.turns_at_cap else args.turn_tokens / args.measured_turn_cap
    groups = measured_groups(read_layouts(args.trajectories), factor, args.turn_tokens, args.context)
    rng = np.random.default_rng(args.seed)
    draws = [rng.integers(len(groups), size=args.prompts) for _ in range(args.resamples)]
    per_chip = lambda tokens: tokens * token_bytes / args.chips / GIB

    lengths = [row.length for g in groups for row in g]
    result = {
        "model": args.model,
        "prompts": args.prompts,
        "context": args.context,
        "chips": args.chips,
        "measured_groups": len(groups),
        "turns_at_cap": args.turns_at_cap,
        "scaled_mean_context": float(np.mean(lengths)),
        "contiguous_gib_per_chip": per_chip(args.prompts * len(groups[0]) * args.context),
        "hbm_gib_per_chip": TPU_HBM_GIB["v5p"],
        "paged": {},
    }
    for page_size in (int(s) for s in args.page_sizes.split(",")):
        gib = []
        for draw in draws:
            pages = peak_pages([groups[i] for i in draw], page_size, args.context)
            gib.append(per_chip(pages * page_size))
        lo, hi = np.percentile(gib, [2.5, 97.5])
        result["paged"][page_size] = {"mean_gib_per_chip": float(np.mean(gib)), "ci95": [float(lo), float(hi)]}
    print(json.dumps(result, indent=1))
    rows = args.prompts * len(groups[0])
    print(
        f"\n{args.model}, {args.prompts} prompts x G (={rows} rows) at {args.context} context, bf16 KV, "
        f"rows over {args.chips} chips: contiguous {result['contiguous_gib_per_chip']:.1f} GiB per chip"
    )
    for page_size, r in result["paged"].items():
        lo, hi = r["ci95"]
        print(f"  paged ({page_size}-token pages): {r['mean_gib_per_chip']:.1f} GiB per chip (95% {lo:.1f}-{hi:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

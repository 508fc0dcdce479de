"""The dead-end study: seed-paired comparisons of RL arms with a baseline arm, per level (warm start).

The statistics were fixed before the study ran, so they are small pure functions here (last-two EM average,
pairing by seed, percentile bootstrap, Wilcoxon); `load_study` reads what the experiment wrote, `summarize`
makes the numbers, `write_study_report` writes study.md / study.json / study.png. No jax: the report must be
cheap to regenerate, also while runs are still going.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from rexrag_jax.embedded.arms import ARMS as ARM_SPECS
from rexrag_jax.jsonfile import read_json, write_bytes_atomic, write_json_atomic

ARMS = {key: arm.name for key, arm in ARM_SPECS.items()}  # key -> display name, in table/plot order
DEFAULT_BASELINE = "grpo"
PRIMARY = "multi"
METRICS = ("multi", "single", "overall", "hops.2", "hops.3")  # last-two averages computed per run
SHOWN = (("multi", "Multi-hop"), ("single", "Single-hop"), ("hops.2", "2-hop"), ("hops.3", "3-hop"))
N_BOOT, BOOT_SEED, CI_LEVEL = 10_000, 0, 0.95
CONFIG_FILE, RESULT_FILE = "embedded_config.json", "result.json"
PRIMARY_DEFINITION = (
    "multi-hop test EM of a run, averaged over its last two evaluations "
    "(the two with the highest step; the only one if a run has a single evaluation)"
)
_DASH = "—"


def display_name(arm: str) -> str:
    """The arm's name in tables and plots; unknown keys are shown as they are."""
    return ARMS.get(arm, arm)


def arm_order(arms: Sequence[str]) -> list[str]:
    """Known arms in ARMS order, then unknown ones sorted, so every table lists arms the same way."""
    present = set(arms)
    return [a for a in ARMS if a in present] + sorted(present - set(ARMS))


# ---------------------------------------------------------------- statistics (pure)


def _isnum(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value(ev: dict, key: str) -> float | None:
    d: object = ev
    for part in key.split("."):
        if not isinstance(d, dict) or d.get(part) is None:
            return None
        d = d[part]
    return float(d)  # type: ignore[arg-type]


def last_two(evals: Sequence[dict], key: str) -> float | None:
    """Mean of `key` over the two evaluations with the highest step (the only one if just one): less noisy
    than the final evaluation alone, without reaching back into early training. `key`: "multi", "single",
    "overall" or "hops.N" (bare "N" too). An evaluation lacking the key is left out; None if both lack it."""
    key = f"hops.{key}" if key.isdigit() else key
    top = sorted(evals, key=lambda e: float(e["step"]))[-2:]
    vals = [v for v in (_value(e, key) for e in top) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _by_seed(runs: Sequence[dict], arm: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in runs:
        if r["arm"] == arm:
            if r["seed"] in out:
                raise ValueError(f"two {arm!r} runs with seed {r['seed']}: {out[r['seed']].get('dir')}, {r.get('dir')}")
            out[r["seed"]] = r
    return out


def paired(level_runs: Sequence[dict], arm: str, baseline: str = DEFAULT_BASELINE, metric: str = PRIMARY) -> dict:
    """{"seeds": [...], "diffs": [...]}: arm − baseline of `metric`'s last-two average, seed by seed, within one
    level. Pairing cancels what a seed shares across arms; seeds missing either run (or the metric) are left out."""
    a, b = _by_seed(level_runs, arm), _by_seed(level_runs, baseline)
    seeds, diffs = [], []
    for s in sorted(set(a) & set(b)):
        va, vb = last_two(a[s]["evals"], metric), last_two(b[s]["evals"], metric)
        if va is not None and vb is not None:
            seeds.append(s)
            diffs.append(va - vb)
    return {"seeds": seeds, "diffs": diffs}


def bootstrap_ci(
    values: Sequence[float], n: int = N_BOOT, seed: int = BOOT_SEED, level: float = CI_LEVEL
) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap over the values (seeds), with a fixed numpy Generator seed so
    the report is reproducible. Equal values give the degenerate interval lo == hi == mean."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci needs values and a level in (0, 1), got {x.size} values, level {level}")
    if np.all(x == x[0]):
        v = float(x[0])
        return v, v, v
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(n, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2, (1.0 + level) / 2])
    return float(x.mean()), float(lo), float(hi)


def wilcoxon_p(diffs: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p (zero_method="wilcox": zero differences are dropped). Differences are
    rounded to 1e-12 first so float noise neither makes a zero non-zero nor splits a tie. None when fewer than
    2 differences are non-zero (all zero included): the test has nothing to say there."""
    d = np.round(np.asarray(diffs, dtype=float), 12)
    if np.count_nonzero(d) < 2:
        return None
    from scipy.stats import wilcoxon

    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


# ---------------------------------------------------------------- reading the study


def _read(path: str) -> dict:
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None


def _fraction(v: object, where: str) -> None:
    if v is not None and not (_isnum(v) and math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"{where} = {v!r} is not an EM fraction in [0, 1]")


def _check_eval(ev: object, where: str) -> None:
    if not isinstance(ev, dict) or not _isnum(ev.get("step")):
        raise ValueError(f"{where}: not an evaluation with a numeric 'step'")
    for k in ("overall", "single", "multi"):
        _fraction(ev.get(k), f"{where}.{k}")
    hops = ev.get("hops") or {}
    if not isinstance(hops, dict):
        raise ValueError(f"{where}.hops is not an object")
    for h, v in hops.items():
        _fraction(v, f"{where}.hops.{h}")


def _load_run(path: str, name: str) -> dict:
    """One finished run; older files without "arm" fall back to "algorithm", without "seed" to the dir."""
    r = _read(path)
    arm = r.get("arm") or r.get("algorithm")
    if not isinstance(arm, str):
        raise ValueError(f"{path}: no 'arm' or 'algorithm' string")
    seed = r.get("seed")
    if seed is None and (m := re.search(r"-seed(\d+)$", name)):
        seed = int(m.group(1))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{path}: 'seed' is not an integer: {seed!r}")
    evals, history = r.get("evals"), r.get("history") or []
    if not isinstance(evals, list) or not evals:
        raise ValueError(f"{path}: 'evals' is not a non-empty list")
    for i, ev in enumerate(evals):
        _check_eval(ev, f"{path}: evals[{i}]")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError(f"{path}: 'history' is not a list of objects")
    trajs = r.get("trajectories")
    if trajs is not None and not _isnum(trajs):
        raise ValueError(f"{path}: 'trajectories' is not a number: {trajs!r}")
    return {
        "arm": arm,
        "seed": seed,
        "dir": name,
        "path": path,
        "evals": evals,
        "history": history,
        "trajectories": trajs,
        "time_s": r.get("time_s"),
    }


def _load_level(d: str) -> dict:
    """One level: its knob, pilot and warm-start numbers, finished runs, and names of unfinished run dirs."""
    cfg_path = os.path.join(d, CONFIG_FILE)
    demos = _read(cfg_path).get("demos")
    share = demos.get("complete_share") if isinstance(demos, dict) else None
    if share is not None and not _isnum(share):
        raise ValueError(f"{cfg_path}: demos.complete_share is not a number: {share!r}")
    runs_dir, runs, unfinished, seen = os.path.join(d, "runs"), [], [], {}
    for sub in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        result = os.path.join(runs_dir, sub, RESULT_FILE)
        if os.path.isfile(result):
            runs.append(run := _load_run(result, sub))
            if (other := seen.setdefault((run["arm"], run["seed"]), result)) != result:
                raise ValueError(f"{result}: a second {run['arm']} run with seed {run['seed']} (also {other})")
        elif os.path.isdir(os.path.join(runs_dir, sub)):
            unfinished.append(sub)
    name, opt = os.path.basename(os.path.abspath(d)), ("pilot.json", "warm_start_eval.json")
    pilot, warm = (_read(f) if os.path.exists(f) else None for f in (os.path.join(d, o) for o in opt))
    return {
        "name": name,
        "dir": os.path.abspath(d),
        "complete_share": share,
        "label": name if share is None else f"complete {share:g}",
        "pilot": pilot,
        "warm_start": warm,
        "runs": runs,
        "unfinished": unfinished,
    }


def load_study(root: str) -> dict:
    """{"root": ..., "levels": [level, ...]} sorted by complete_share. A level is ROOT itself or an
    immediate subdirectory holding embedded_config.json. Raises ValueError naming the bad file."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a directory")
    cands = [root] + [os.path.join(root, n) for n in sorted(os.listdir(root))]
    dirs = [d for d in cands if os.path.isfile(os.path.join(d, CONFIG_FILE))]
    if not dirs:
        raise ValueError(f"{root}: no level directories (no {CONFIG_FILE} in it or its immediate subdirectories)")
    levels = [_load_level(d) for d in dirs]
    levels.sort(key=lambda lv: (lv["complete_share"] is None, lv["complete_share"] or 0.0, lv["name"]))
    return {"root": os.path.abspath(root), "levels": levels}


# ---------------------------------------------------------------- summaries


def _stat(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    m, lo, hi = bootstrap_ci(values)
    return {"n": len(values), "mean": m, "lo": lo, "hi": hi}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _steps(history: Sequence[dict], key: str) -> list[float]:
    return [float(h[key]) for h in history if _isnum(h.get(key))]


def run_row(run: dict) -> dict:
    """One run's numbers: last-two averages, per-step mean rates, total trajectories and decode tokens."""
    tokens, trajs = _steps(run["history"], "decode_tokens"), _steps(run["history"], "trajectories")
    return {
        "arm": run["arm"],
        "seed": run["seed"],
        "dir": run["dir"],
        **{k: last_two(run["evals"], k) for k in METRICS},
        "dead_end_rate": _mean(_steps(run["history"], "dead_end_rate")),
        "rescue_rate": _mean(_steps(run["history"], "rescue_rate")),
        "trajectories": run["trajectories"] if run["trajectories"] is not None else (sum(trajs) if trajs else None),
        "decode_tokens": sum(tokens) if tokens else None,
        "time_s": run.get("time_s"),
    }


def _arm_summary(rows: list[dict], arm: str) -> dict:
    mine = [r for r in rows if r["arm"] == arm]
    out = {"arm": arm, "name": display_name(arm), "seeds": sorted(r["seed"] for r in mine)}
    out.update({k: _stat([r[k] for r in mine if r[k] is not None]) for k in METRICS})
    out.update(
        {k: _mean([r[k] for r in mine]) for k in ("dead_end_rate", "rescue_rate", "trajectories", "decode_tokens")}
    )
    return out


def _diff_summary(runs: list[dict], arm: str, baseline: str) -> dict:
    out: dict = {"arm": arm, "name": display_name(arm)}
    for k in METRICS:
        p = paired(runs, arm, baseline, k)
        out[k] = {**p, **_stat(p["diffs"])}
    out["n"], out["p"] = out[PRIMARY]["n"], wilcoxon_p(out[PRIMARY]["diffs"])
    return out


def summarize(study: dict, baseline: str = DEFAULT_BASELINE) -> dict:
    """Every number of the report (the content of study.json); EM values are fractions in [0, 1]."""
    levels = []
    for lv in study["levels"]:
        rows = [run_row(r) for r in lv["runs"]]
        arms = arm_order([r["arm"] for r in rows])
        levels.append(
            {k: lv[k] for k in ("name", "label", "complete_share", "pilot", "warm_start", "unfinished")}
            | {
                "arms": [_arm_summary(rows, a) for a in arms],
                "paired": [_diff_summary(lv["runs"], a, baseline) for a in arms if a != baseline],
                "runs": rows,
            }
        )
    return {
        "root": study["root"],
        "baseline": baseline,
        "baseline_name": display_name(baseline),
        "primary_metric": PRIMARY_DEFINITION,
        "metrics": list(METRICS),
        "bootstrap": {
            "method": "percentile, resampling seeds",
            "resamples": N_BOOT,
            "seed": BOOT_SEED,
            "level": CI_LEVEL,
        },
        "wilcoxon": "two-sided signed-rank, zero_method='wilcox'; null when < 2 non-zero differences",
        "levels": levels,
    }


# ---------------------------------------------------------------- report


def _pts(v: float | None, signed: bool = False) -> str:
    return _DASH if v is None else f"{100 * v:{'+' if signed else ''}.1f}"


def _ci(s: dict, signed: bool = False) -> str:
    lo, hi = _pts(s["lo"], signed), _pts(s["hi"], signed)
    return _DASH if s["mean"] is None else f"{_pts(s['mean'], signed)} [{lo}, {hi}]"


def _num(v: float | None, fmt: str) -> str:
    return _DASH if v is None else format(v, fmt)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in lines)


def _levels_table(summary: dict) -> str:
    rows = []
    for lv in summary["levels"]:
        pilot, warm = lv["pilot"] or {}, lv["warm_start"] or {}
        rates = ("dead_end_rate", "dead_end_rate_multi", "rescue_rate", "rescue_rate_multi")
        rows.append(
            [
                lv["label"],
                f"`{lv['name']}`",
                *(_pts(pilot.get(k)) for k in rates),
                _pts(warm.get("multi")),
                str(sum(len(a["seeds"]) for a in lv["arms"])),
                str(len(lv["unfinished"])),
            ]
        )
    return _md_table(
        [
            "Level",
            "Directory",
            "Pilot dead-end %",
            "(multi-hop)",
            "Pilot rescue %",
            "(multi-hop)",
            "Warm-start multi-hop EM",
            "Finished runs",
            "Unfinished",
        ],
        rows,
    )


def _level_md(lv: dict, baseline_name: str) -> str:
    names = [n for _, n in SHOWN[1:]]
    arms = [
        [
            a["name"],
            str(len(a["seeds"])),
            _ci(a[PRIMARY]),
            *(_pts(a[k]["mean"]) for k, _ in SHOWN[1:]),
            _pts(a["dead_end_rate"]),
            _pts(a["rescue_rate"]),
            _num(a["trajectories"], ".0f"),
            _num(a["decode_tokens"], ",.0f"),
        ]
        for a in lv["arms"]
    ]
    diffs = [
        [d["name"], str(d["n"]), _ci(d[PRIMARY], True), _num(d["p"], ".3f"), *(_ci(d[k], True) for k, _ in SHOWN[1:])]
        for d in lv["paired"]
    ]
    arms_md = (
        _md_table(
            [
                "Arm",
                "Seeds",
                "Multi-hop EM [95% CI]",
                *names,
                "Dead-end %",
                "Rescue %",
                "Trajectories",
                "Decode tokens",
            ],
            arms,
        )
        if arms
        else "No finished runs."
    )
    diffs_md = (
        _md_table(["Arm", "n", "Δ multi-hop [95% CI]", "Wilcoxon p", *(f"Δ {n}" for n in names)], diffs)
        if diffs
        else "No arm to compare."
    )
    unfinished = ", ".join(f"`{u}`" for u in lv["unfinished"]) or "none"
    return (
        f"## {lv['label']} (`{lv['name']}`)\n\n### Arms (EM points, mean over seeds)\n\n{arms_md}\n\n"
        f"### Paired differences vs {baseline_name} (arm − baseline, EM points)\n\n{diffs_md}\n\n"
        f"Unfinished runs: {unfinished}\n"
    )


def study_markdown(summary: dict) -> str:
    """study.md: what was compared and how, the levels, then per level the arm and paired-difference tables."""
    arms = arm_order({a["arm"] for lv in summary["levels"] for a in lv["arms"]} - {summary["baseline"]})
    b, base = summary["bootstrap"], summary["baseline_name"]
    return (
        f"# Dead-end study: {', '.join(map(display_name, arms)) or 'no arms'} vs {base}\n\n"
        f"Results under `{summary['root']}`. Primary metric: {summary['primary_metric']}. Baseline arm: {base} "
        f"(`{summary['baseline']}`); the other arms are paired with it by seed within a level (seeds where both "
        f"finished). 95% CIs: {b['method']} ({b['resamples']} resamples, numpy seed {b['seed']}). "
        f"p: {summary['wilcoxon']}. EM and rates in points (×100).\n\n"
        f"## Levels\n\n{_levels_table(summary)}\n\n![paired differences](study.png)\n\n"
        + "\n".join(_level_md(lv, base) for lv in summary["levels"])
    )


def _diff_panel(ax, lv: dict, arm: str) -> None:
    """Per-seed paired differences of the primary metric, their mean with its CI, and zero."""
    s = next((d[PRIMARY] for d in lv["paired"] if d["arm"] == arm), None)
    ax.axhline(0.0, color="grey", linewidth=1)
    if s and s["n"]:
        xs = np.linspace(-0.15, 0.15, s["n"]) if s["n"] > 1 else [0.0]
        ax.scatter(xs, [100 * v for v in s["diffs"]], s=18, color="#1f77b4")
        err = [[100 * (s["mean"] - s["lo"])], [100 * (s["hi"] - s["mean"])]]
        ax.errorbar([1.0], [100 * s["mean"]], yerr=err, fmt="o", color="#d62728", capsize=4)
    else:
        ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xlim(-0.6, 1.6)
    ax.set_xticks([0, 1], ["seeds", "mean [95% CI]"])
    ax.set_title(f"{lv['label']}: {display_name(arm)}", fontsize=8)


def _means_panel(ax, levels: list[dict]) -> None:
    """Each arm's primary-metric mean [CI] per level, side by side."""
    for k, arm in enumerate(arm_order({a["arm"] for lv in levels for a in lv["arms"]})):
        pts = [(i, a[PRIMARY]) for i, lv in enumerate(levels) for a in lv["arms"] if a["arm"] == arm]
        pts = [(i + 0.08 * (k - 1.5), s) for i, s in pts if s["n"]]
        if pts:
            err = [[100 * (s["mean"] - s["lo"]) for _, s in pts], [100 * (s["hi"] - s["mean"]) for _, s in pts]]
            ax.errorbar(
                [x for x, _ in pts],
                [100 * s["mean"] for _, s in pts],
                yerr=err,
                fmt="o-",
                capsize=3,
                label=display_name(arm),
            )
    ax.set_xticks(range(len(levels)), [lv["label"] for lv in levels], rotation=30, fontsize=7)
    ax.set_title("(b) multi-hop EM, mean [95% CI]", fontsize=8)
    ax.set_ylabel("EM (points)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def _plot(summary: dict) -> bytes:
    """study.png: (a) a row per level, a column per non-baseline arm of paired differences; (b) arm means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = summary["levels"]
    others = arm_order({d["arm"] for lv in levels for d in lv["paired"]})
    nr, nc = max(1, len(levels)), len(others) + 1
    fig = plt.figure(figsize=(3.2 * nc + 1, 2.6 * nr + 0.6), dpi=100)
    grid, first = fig.add_gridspec(nr, nc), None
    for i, lv in enumerate(levels):
        for j, arm in enumerate(others):
            ax = fig.add_subplot(grid[i, j], sharey=first)
            first = first or ax
            _diff_panel(ax, lv, arm)
            if j == 0:
                ax.set_ylabel("Δ multi-hop EM (points)")
    _means_panel(fig.add_subplot(grid[:, -1]), levels)
    fig.suptitle(f"(a) paired differences (arm − {summary['baseline_name']}) of multi-hop EM, per seed", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_study_report(study: dict, out_dir: str, baseline: str = DEFAULT_BASELINE) -> dict[str, str]:
    """Write study.md, study.json and study.png into out_dir, each atomically and only once all three are
    built, so a failure leaves the previous report whole. Returns {"markdown", "json", "plot"} -> path."""
    summary = summarize(study, baseline)
    markdown, plot = study_markdown(summary).encode(), _plot(summary)
    os.makedirs(out_dir, exist_ok=True)
    names = {"markdown": "study.md", "json": "study.json", "plot": "study.png"}
    paths = {k: os.path.join(os.path.abspath(out_dir), n) for k, n in names.items()}
    write_bytes_atomic(paths["markdown"], markdown)
    write_json_atomic(paths["json"], summary)
    write_bytes_atomic(paths["plot"], plot)
    return paths

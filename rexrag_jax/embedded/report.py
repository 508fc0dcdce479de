"""The embedded default's report: results of the GRPO vs REX-RAG runs, as files a person can read.

The embedded experiment ends with a dict of numbers (warm start, per-run histories, test EM, sample
trajectories). This module turns it into `report.md` (setup, mean ± std table, per-run table),
`curves.png` (training reward and test EM over steps) and `trajectories.html` (sample trajectories with
every segment coloured by who wrote it), so the outcome can be judged without re-running anything.
"""

from __future__ import annotations

import html
import io
import math
import os

from rexrag_jax.embedded.arms import ARMS
from rexrag_jax.jsonfile import write_bytes_atomic

ALGORITHMS = {k: a.name for k, a in ARMS.items()}  # arm key -> display name, in table/plot order
COLOURS = {k: a.colour for k, a in ARMS.items()}
SEGMENT_KINDS = ("prompt", "model", "information", "probe", "feedback")
DEFAULT_TITLE = "REX-RAG vs GRPO on a synthetic multi-hop world"
_DASH = "—"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) of `values`; a single value has std 0."""
    if not values:
        raise ValueError("mean_std of an empty list")
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def _em(d: dict, key: str, where: str) -> float | None:
    """The EM fraction `d[key]` checked to lie in [0, 1]; None when absent."""
    if key not in d or d[key] is None:
        return None
    try:
        v = float(d[key])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key!r} is not a number: {d[key]!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{where}: {key!r} = {v} is not an EM fraction in [0, 1]")
    return v


def _check(results: dict) -> None:
    """Raise a ValueError naming the first structural problem of `results`."""
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    if not isinstance(results.get("warm_start"), dict):
        raise ValueError("results has no 'warm_start' dict")
    runs = results.get("runs", [])
    if not isinstance(runs, list):
        raise ValueError("results['runs'] must be a list")
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or _arm(run) not in ALGORITHMS:
            alg = _arm(run) if isinstance(run, dict) else run
            raise ValueError(f"runs[{i}]: arm {alg!r} is none of {sorted(ALGORITHMS)}")
        if not isinstance(run.get("final"), dict):
            raise ValueError(f"runs[{i}] ({_arm(run)} seed {run.get('seed')}): no 'final' dict")


def _arm(run: dict):
    """A run's arm (records before arms existed name only the algorithm, which was then the arm)."""
    return run.get("arm") or run.get("algorithm")


def _by_algorithm(results: dict) -> dict[str, list[dict]]:
    runs = results.get("runs", [])
    return {a: [r for r in runs if _arm(r) == a] for a in ALGORITHMS if any(_arm(r) == a for r in runs)}


def _hops(results: dict) -> list[str]:
    finals = [results["warm_start"]] + [r["final"] for r in results.get("runs", [])]
    keys = {str(k) for f in finals for k in (f.get("hops") or {})}
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def _cell(values: list[float | None], single: bool = False) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return _DASH
    m, s = mean_std(vals)
    return f"{100 * m:.1f}" if single else f"{100 * m:.1f} ± {100 * s:.1f}"


def _row(finals: list[dict], hops: list[str], where: str, single: bool) -> list[str]:
    cols = [[_em(f, k, where) for f in finals] for k in ("single", "multi")]
    cols += [[_em(f.get("hops") or {}, h, where + " hops") for f in finals] for h in hops]
    cols.append([_em(f, "overall", where) for f in finals])
    return [_cell(c, single) for c in cols]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def results_table(results: dict) -> str:
    """Markdown table: warm start and each algorithm present (mean ± std over seeds), then the multi-hop gain."""
    _check(results)
    hops = _hops(results)
    header = ["Model", "Single-hop EM", "Multi-hop EM"] + [f"{h}-hop" for h in hops] + ["Overall EM", "n seeds"]
    rows = [["Warm start"] + _row([results["warm_start"]], hops, "warm_start", True) + [_DASH]]
    changes = []
    warm_multi = _em(results["warm_start"], "multi", "warm_start")
    for alg, runs in _by_algorithm(results).items():
        finals = [r["final"] for r in runs]
        rows.append([ALGORITHMS[alg]] + _row(finals, hops, f"{alg} final", False) + [str(len(runs))])
        multi = [v for v in (_em(f, "multi", f"{alg} final") for f in finals) if v is not None]
        if multi and warm_multi is not None:
            changes.append(f"{ALGORITHMS[alg]} {100 * (mean_std(multi)[0] - warm_multi):+.1f}")
    text = _md_table(header, rows)
    if changes:
        text += f"\n\nMulti-hop EM change over the warm start: {', '.join(changes)} points (mean over seeds)."
    return text


def _runs_table(results: dict) -> str:
    rows = []
    for r in results.get("runs", []):
        f, where = r["final"], f"{_arm(r)} seed {r.get('seed')}"
        ems = [_em(f, k, where) for k in ("single", "multi", "overall")]
        probes = sum(int(h.get("probes_kept", 0) or 0) for h in r.get("history", []))
        t = r.get("time_s")
        rows.append(
            [ALGORITHMS[_arm(r)], str(r.get("seed", _DASH))]
            + [_DASH if v is None else f"{100 * v:.1f}" for v in ems]
            + [str(r.get("trajectories", _DASH)), str(probes), _DASH if t is None else f"{float(t):.1f}"]
        )
    header = [
        "Algorithm",
        "Seed",
        "Single-hop EM",
        "Multi-hop EM",
        "Overall EM",
        "Trajectories",
        "Probes kept",
        "Time (s)",
    ]
    return _md_table(header, rows) if rows else "No RL runs."


def _series(runs: list[dict], list_key: str, value_key: str) -> tuple[list, list, list, list]:
    """Steps and per-step mean, min, max of `value_key` over the runs' `list_key` entries."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for e in r.get(list_key, []):
            if e.get(value_key) is not None and e.get("step") is not None:
                by_step.setdefault(int(e["step"]), []).append(float(e[value_key]))
    steps = sorted(by_step)
    return (
        steps,
        [mean_std(by_step[s])[0] for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def _plot(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    groups = _by_algorithm(results)
    panels = [
        ("history", "reward", "(a) training reward", "train EM (reward)"),
        ("evals", "multi", "(b) test multi-hop EM", "EM"),
        ("evals", "single", "(c) test single-hop EM", "EM"),
    ]
    for ax, (list_key, key, title, ylabel) in zip(axes, panels):
        for alg, runs in groups.items():
            steps, mean, lo, hi = _series(runs, list_key, key)
            if not steps:
                continue
            c, label = COLOURS[alg], f"{ALGORITHMS[alg]} ({len(runs)} seed{'s' if len(runs) != 1 else ''})"
            ax.fill_between(steps, lo, hi, color=c, alpha=0.15, linewidth=0)
            if list_key == "history" and len(steps) >= 10:  # noisy per-step reward: faint raw + moving average
                ax.plot(steps, mean, color=c, alpha=0.3, linewidth=0.8)
                w = 5
                mean = [sum(mean[max(0, i - w + 1) : i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(mean))]
            ax.plot(steps, mean, color=c, label=label, marker="o" if list_key == "evals" else None, markersize=3)
        if list_key == "evals":
            ws = _em(results["warm_start"], key, "warm_start")
            if ws is not None:
                ax.axhline(ws, color="grey", linestyle="--", linewidth=1, label="warm start")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


_CSS = """body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}
.card{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1.5em 0}
.card h2{font-size:1.1em;margin:0 0 .5em}.ok{color:#1a7f37}.bad{color:#c62828}
pre.traj{white-space:pre-wrap;word-wrap:break-word;background:#fff;border:1px solid #ddd;padding:.8em;font-size:.85em}
.seg-prompt{color:#888}.seg-model{color:#111;background:#fff}.seg-information{background:#dff3e0}
.seg-probe{background:#ffd8a8}.seg-feedback{color:#c62828}.seg-other{color:#555;background:#f2f2f2}
.legend span{padding:.1em .4em;margin-right:.5em;border:1px solid #ddd}"""


def _html(results: dict) -> str:
    e = html.escape
    title = e(str(results.get("title") or DEFAULT_TITLE))
    legend = "".join(f'<span class="seg-{k}">{k}</span>' for k in SEGMENT_KINDS)
    cards = []
    for i, s in enumerate(results.get("samples") or []):
        if not isinstance(s, dict):
            raise ValueError(f"samples[{i}] must be a dict")
        spans = []
        for j, seg in enumerate(s.get("segments") or []):
            if not isinstance(seg, (list, tuple)) or len(seg) != 2:
                raise ValueError(f"samples[{i}].segments[{j}] must be a [kind, text] pair")
            kind = seg[0] if seg[0] in SEGMENT_KINDS else "other"
            spans.append(f'<span class="seg-{kind}">{e(str(seg[1]))}</span>')
        golden = s.get("golden") or []
        golden = ", ".join(map(str, golden)) if isinstance(golden, (list, tuple)) else str(golden)
        mark = ""
        if "correct" in s:
            mark = ' <span class="ok">✓</span>' if s["correct"] else ' <span class="bad">✗</span>'
        cards.append(
            f'<div class="card"><h2>{e(str(s.get("title", f"sample {i + 1}")))}</h2>\n'
            f"<p><b>Question:</b> {e(str(s.get('question', '')))}<br>\n<b>Golden:</b> {e(golden)}<br>\n"
            f"<b>Prediction:</b> {e(str(s.get('prediction', '')))}{mark}</p>\n"
            f'<pre class="traj">{"".join(spans)}</pre></div>'
        )
    body = "\n".join(cards) if cards else "<p>No sample trajectories.</p>"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}: trajectories</title>\n'
        f"<style>{_CSS}</style></head><body>\n<h1>{title}: sample trajectories</h1>\n"
        f'<p class="legend">Segments: {legend}</p>\n{body}\n</body></html>\n'
    )


def _markdown(results: dict) -> str:
    setup = results.get("setup") or {}
    if not isinstance(setup, dict):
        raise ValueError("results['setup'] must be a dict")
    fmt = lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    rows = [[str(k), fmt(v)] for k, v in setup.items()]
    setup_md = _md_table(["Setting", "Value"], rows) if rows else "(none given)"
    return (
        f"# {results.get('title') or DEFAULT_TITLE}\n\n## Setup\n\n{setup_md}\n\n{pilot_markdown(results)}"
        f"## Results (test EM, %)\n\n{results_table(results)}\n\n![training curves](curves.png)\n\n"
        f"{_errors_md(results)}"
        f"Sample trajectories: [trajectories.html](trajectories.html)\n\n## Runs\n\n{_runs_table(results)}\n"
    )


def pilot_markdown(results: dict) -> str:
    """The warm start's dead-end pilot (no training): how many groups are dead ends, how many a probe rescues."""
    p = results.get("pilot")
    if not isinstance(p, dict):
        return ""
    rows = [
        [
            part or "all",
            *(
                f"{100 * p[k + part]:.1f}" if isinstance(p.get(k + part), (int, float)) else _DASH
                for k in ("accuracy", "dead_end_rate", "rescue_rate", "probe_accuracy")
            ),
        ]
        for part in ("", "_single", "_multi")
    ]
    rows = [[r[0].lstrip("_")] + r[1:] for r in rows]
    header = ["Questions", "Sampled EM", "Dead-end groups", "Rescued by a probe", "Probe EM"]
    return (
        "## Dead-end pilot (warm start, no training)\n\n"
        f"G = {p.get('group_size')} samples per training question at T = {p.get('temperature')}; a dead end is a "
        "group whose originals are all wrong; rescued = at least one of its probes answers correctly (%).\n\n"
        f"{_md_table(header, rows)}\n\n"
    )


def _errors_md(results: dict) -> str:
    """Why final multi-hop test answers are wrong (share of multi-hop questions, mean over seeds)."""
    cats = ("no_answer", "too_few_hops", "too_many_hops", "wrong_entity")
    finals = [("Warm start", [results["warm_start"]])] + [
        (ALGORITHMS[a], [r["final"] for r in runs]) for a, runs in _by_algorithm(results).items()
    ]
    rows = []
    for name, fs in finals:
        errs = [f["errors"]["multi"] for f in fs if isinstance(f.get("errors"), dict) and "multi" in f["errors"]]
        if errs:
            rows.append([name] + [f"{100 * sum(e.get(c, 0.0) for e in errs) / len(errs):.1f}" for c in cats])
    if not rows:
        return ""
    header = ["Model", "No answer", "Too few hops", "Too many hops", "Wrong entity"]
    return f"## Multi-hop errors (% of multi-hop test questions)\n\n{_md_table(header, rows)}\n\n"


def write_report(out_dir: str, results: dict) -> dict[str, str]:
    """Writes report.md, curves.png and trajectories.html into out_dir.

    Returns {"markdown": path, "plot": path, "html": path}.
    """
    _check(results)
    contents = {"markdown": _markdown(results).encode(), "html": _html(results).encode(), "plot": _plot(results)}
    os.makedirs(out_dir, exist_ok=True)
    names = {"markdown": "report.md", "plot": "curves.png", "html": "trajectories.html"}
    paths = {k: os.path.join(out_dir, n) for k, n in names.items()}
    for k, data in contents.items():
        write_bytes_atomic(paths[k], data)
    return paths

"""The dead-end study's statistics and report on a tiny hand-made study (fixed numbers, no jax, no training).

EM values are multiples of 1/32 so every last-two average and paired mean is exact in floating point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import scipy.stats

from rexrag_jax.embedded import study as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 1 / 32  # step-15 and step-20 values sit D below / above the wanted last-two average

# level -> arm -> per-seed last-two multi-hop EM (grpo) or difference to grpo (other arms)
LEVEL_A = {
    "grpo": [0.25, 0.3125, 0.375, 0.25, 0.5],
    "rexrag": [0.0625, 0.125, 0.0625, 0.125, -0.0625],  # mean 0.0625
    "rexrag_dd": [0.125, 0.25, 0.125, 0.125, 0.0],
}  # mean 0.125
LEVEL_B = {"grpo": [0.5] * 4, "rexrag": [0.0625, 0.0, -0.0625, 0.125], "rexrag_dd": [0.0625] * 4}


def _evals(multi: float, single: float) -> list[dict]:
    """Five evaluations, out of step order; early ones are far off so using them would show."""

    def ev(step: int, off: float | None) -> dict:
        if off is None:
            return {"step": step, "overall": 0.0, "single": 0.0, "multi": 0.0, "hops": {"1": 0.0, "2": 0.0}}
        m = multi + off
        return {
            "step": step,
            "overall": (single + off + m) / 2,
            "single": single + off,
            "multi": m,
            "hops": {"1": single + off, "2": m, "3": m - 0.125},
            "errors": {},
        }

    return [ev(20, D), ev(0, None), ev(15, -D), ev(5, None), ev(10, None)]


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _level(root, name: str, share: float, table: dict, pilot: dict | None = None) -> str:
    d = os.path.join(root, name)
    _write(os.path.join(d, "embedded_config.json"), {"demos": {"complete_share": share}, "seeds": [0, 1]})
    _write(os.path.join(d, "warm_start_eval.json"), {"overall": 0.3, "single": 0.5, "multi": 0.125, "hops": {}})
    if pilot:
        _write(os.path.join(d, "pilot.json"), pilot)
    base = table["grpo"]
    for arm, values in table.items():
        for seed, v in enumerate(values):
            multi = v if arm == "grpo" else base[seed] + v
            single = 0.5 - (0.0625 if arm == "rexrag_dd" else 0.0)
            history = [
                {"step": 1, "dead_end_rate": 0.5 if arm == "grpo" else 0.25, "trajectories": 20},
                {"step": 2, "dead_end_rate": 0.3 if arm == "grpo" else 0.25, "trajectories": 20},
            ]
            if arm != "grpo":
                history[0].update(rescue_rate=0.5, decode_tokens=100)
                history[1].update(rescue_rate=0.0, decode_tokens=200)
            _write(
                os.path.join(d, "runs", f"{arm}-seed{seed}", "result.json"),
                {
                    "arm": arm,
                    "algorithm": arm.split("_")[0],
                    "seed": seed,
                    "evals": _evals(multi, single),
                    "history": history,
                    "trajectories": 40,
                    "time_s": 1.0,
                },
            )
    return d


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "study"
    a = _level(
        root,
        "01-demos.complete_share=0.05",
        0.05,
        LEVEL_A,
        pilot={
            "dead_end_rate": 0.75,
            "dead_end_rate_multi": 0.875,
            "rescue_rate": 0.25,
            "rescue_rate_multi": 0.125,
            "probe_accuracy": 0.5,
        },
    )
    b = _level(root, "00-demos.complete_share=0.5", 0.5, LEVEL_B)
    # an unpaired seed (no grpo seed 5) with a value that would move the mean, and an unfinished run
    _write(
        os.path.join(a, "runs", "rexrag-seed5", "result.json"),
        {"arm": "rexrag", "seed": 5, "evals": _evals(0.9375, 0.5), "history": []},
    )
    os.makedirs(os.path.join(a, "runs", "rexrag_dd-seed5"))
    # an older result file: no "arm", history without dead_end_rate
    old = os.path.join(b, "runs", "grpo-seed0", "result.json")
    with open(old, encoding="utf-8") as f:
        r = json.load(f)
    del r["arm"]
    r["history"] = [{"step": 1, "reward": 0.5}]
    _write(old, r)
    return str(root)


def test_last_two():
    evals = _evals(0.25, 0.5)
    assert S.last_two(evals, "multi") == 0.25
    assert S.last_two(evals, "single") == 0.5
    assert S.last_two(evals, "hops.2") == S.last_two(evals, "2") == 0.25
    assert S.last_two(evals, "hops.3") == 0.125
    assert S.last_two([{"step": 0, "multi": 0.375}], "multi") == 0.375
    assert (
        S.last_two([{"step": 0, "multi": 0.375}, {"step": 5, "multi": 0.125}, {"step": 1, "multi": 0.5}], "multi")
        == 0.3125
    )  # steps 5 and 1
    assert S.last_two([{"step": 0, "hops": {}}, {"step": 5, "hops": {"3": 0.5}}], "3") == 0.5  # absent: left out
    assert S.last_two([{"step": 0}], "multi") is None


def test_paired_excludes_unpaired_seeds(tree):
    study = S.load_study(tree)
    runs = study["levels"][0]["runs"]
    p = S.paired(runs, "rexrag", "grpo", "multi")
    assert p["seeds"] == [0, 1, 2, 3, 4]  # seed 5 has no grpo partner
    assert p["diffs"] == LEVEL_A["rexrag"]
    assert sum(p["diffs"]) / len(p["diffs"]) == 0.0625
    assert S.paired(runs, "rexrag_dd", "grpo", "single")["diffs"] == [-0.0625] * 5
    assert S.paired(runs, "rexrag", "nope", "multi") == {"seeds": [], "diffs": []}


def test_bootstrap_ci():
    values = [0.0625, 0.125, 0.0625, 0.125, -0.0625]
    m, lo, hi = S.bootstrap_ci(values)
    assert m == pytest.approx(0.0625) and lo <= m <= hi and lo < hi
    assert S.bootstrap_ci(values) == (m, lo, hi)  # fixed seed: reproducible
    assert S.bootstrap_ci([0.1] * 6) == (0.1, 0.1, 0.1)  # degenerate
    assert S.bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError):
        S.bootstrap_ci([])


def test_wilcoxon_p():
    v = [0.5, -0.25, 1.0, 0.75, 0.125, 2.0, -0.0625, 0.0]
    assert S.wilcoxon_p(v) == pytest.approx(scipy.stats.wilcoxon(v, zero_method="wilcox").pvalue)
    assert S.wilcoxon_p([0.1, 0.0, 0.0]) is None
    assert S.wilcoxon_p([0.0, 0.0, 0.0]) is None
    assert S.wilcoxon_p([]) is None
    assert S.wilcoxon_p([1e-17, -1e-17, 0.5]) is None  # float noise counts as zero


def test_load_study(tree):
    study = S.load_study(tree)
    a, b = study["levels"]
    assert (a["label"], b["label"]) == ("complete 0.05", "complete 0.5")  # sorted by share, not by name
    assert a["unfinished"] == ["rexrag_dd-seed5"] and b["unfinished"] == []
    assert a["pilot"]["dead_end_rate"] == 0.75 and b["pilot"] is None
    assert [r["arm"] for r in b["runs"] if r["seed"] == 0] == ["grpo", "rexrag", "rexrag_dd"]  # "algorithm"


def test_write_report(tree, tmp_path):
    paths = S.write_study_report(S.load_study(tree), str(tmp_path / "out"))
    assert all(os.path.getsize(paths[k]) > 0 for k in ("markdown", "json", "plot"))
    assert [os.path.basename(paths[k]) for k in ("markdown", "json", "plot")] == ["study.md", "study.json", "study.png"]
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]
    md = open(paths["markdown"], encoding="utf-8").read()
    names = ("GRPO (G=5)", "REX-RAG", "REX-RAG decoupled + dead-end-first")
    for text in ("complete 0.05", "complete 0.5", "`rexrag_dd-seed5`", *names):
        assert text in md
    assert "+6.2 [" in md and "+12.5 [" in md  # paired means in EM points
    summary = json.load(open(paths["json"], encoding="utf-8"))
    la, lb = summary["levels"]
    d = {x["arm"]: x for x in la["paired"]}
    assert d["rexrag"]["n"] == 5 and d["rexrag"]["multi"]["mean"] == pytest.approx(0.0625)
    assert d["rexrag_dd"]["multi"]["mean"] == pytest.approx(0.125)
    assert d["rexrag"]["p"] == pytest.approx(S.wilcoxon_p(LEVEL_A["rexrag"]))
    assert d["rexrag"]["single"]["mean"] == d["rexrag"]["single"]["lo"] == d["rexrag"]["single"]["hi"] == 0.0
    assert d["rexrag"]["hops.3"]["mean"] == pytest.approx(0.0625)
    dd = {x["arm"]: x for x in lb["paired"]}["rexrag_dd"]["multi"]
    assert dd["mean"] == dd["lo"] == dd["hi"] == 0.0625
    arms = {x["arm"]: x for x in la["arms"]}
    assert [x["arm"] for x in la["arms"]] == ["grpo", "rexrag", "rexrag_dd"]
    assert arms["rexrag"]["seeds"] == [0, 1, 2, 3, 4, 5]
    assert arms["grpo"]["multi"]["mean"] == pytest.approx(sum(LEVEL_A["grpo"]) / 5)
    assert arms["grpo"]["dead_end_rate"] == pytest.approx(0.4) and arms["grpo"]["rescue_rate"] is None
    assert arms["rexrag"]["rescue_rate"] == 0.25 and arms["rexrag"]["decode_tokens"] == 300
    assert arms["rexrag"]["trajectories"] == 40
    assert {x["arm"]: x for x in lb["arms"]}["grpo"]["dead_end_rate"] == pytest.approx(0.4)  # absent, not 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rexrag_jax.cli.study_report", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli(tree):
    r = _cli("--root", tree)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "complete 0.05" in r.stdout and os.path.join(tree, "report", "study.png") in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
    assert "numpy" in imported and "jax" not in imported


def test_cli_bad_input(tree, tmp_path):
    bad = os.path.join(tree, "00-demos.complete_share=0.5", "runs", "rexrag-seed1", "result.json")
    with open(bad, "w", encoding="utf-8") as f:
        f.write('{"arm": "rexrag", "seed": 1,')
    r = _cli("--root", tree)
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time")]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: ") and bad in errors[0]
    r = _cli("--root", str(tmp_path / "empty"))
    assert r.returncode == 2 and "error: " in r.stderr

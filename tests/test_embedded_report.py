"""The embedded report: table numbers computed by hand, a real PNG, escaped HTML, clear errors."""

import copy
import os

import pytest

from rexrag_jax.embedded.report import mean_std, results_table, write_report


def _run(alg, seed, single, multi, probes):
    history = [
        {"step": s, "reward": 0.1 * s, "reward_probe": 0.0, "probes_kept": probes, "trajectories": 40}
        for s in range(1, 13)
    ]
    evals = [
        {"step": 0, "single": 0.6, "multi": 0.1, "overall": 0.35},
        {"step": 10, "single": single, "multi": multi, "overall": (single + multi) / 2},
    ]
    final = {
        "single": single,
        "multi": multi,
        "hops": {"1": single, "2": multi, "3": multi / 2},
        "overall": (single + multi) / 2,
    }
    return {
        "algorithm": alg,
        "seed": seed,
        "history": history,
        "evals": evals,
        "final": final,
        "trajectories": 480 + 12 * probes,
        "time_s": 12.5,
    }


@pytest.fixture
def results():
    segs = [
        ["prompt", "Answer the question."],
        ["model", "<search> Talvar </search>"],
        ["information", "<information>Doc 1</information>"],
        ["probe", "<think> Wait, <b>& again"],
        ["feedback", "My action is invalid."],
        ["mystery", "unknown kind"],
    ]
    return {
        "setup": {"seeds": [0, 1], "steps": 12, "group_size": 5},
        "warm_start": {"single": 0.62, "multi": 0.11, "hops": {"1": 0.62, "2": 0.15, "3": 0.05}, "overall": 0.3},
        "runs": [
            _run("grpo", 0, 0.6, 0.2, 0),
            _run("grpo", 1, 0.7, 0.4, 0),
            _run("rexrag", 0, 0.65, 0.5, 2),
            _run("rexrag", 1, 0.65, 0.5, 3),
        ],
        "samples": [
            {
                "title": "rexrag seed 0, 2-hop",
                "question": "Where was the teacher of Talvar born?",
                "golden": ["Brackwater"],
                "prediction": "Brackwater",
                "correct": True,
                "segments": segs,
            },
            {
                "title": "grpo seed 1, 1-hop",
                "question": "Q?",
                "golden": ["A"],
                "prediction": "B",
                "correct": False,
                "segments": [["model", "<answer> B </answer>"]],
            },
        ],
    }


def test_mean_std():
    assert mean_std([0.2, 0.4]) == pytest.approx((0.3, 0.1))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_table_cells_and_change_line(results):
    table = results_table(results)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in table.splitlines()
        if line.startswith("| ") and "Model" not in line
    }
    header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert header == ["Model", "Single-hop EM", "Multi-hop EM", "1-hop", "2-hop", "3-hop", "Overall EM", "n seeds"]
    assert rows["Warm start"] == ["62.0", "11.0", "62.0", "15.0", "5.0", "30.0", "—"]
    # GRPO: single 0.6/0.7, multi 0.2/0.4, 3-hop 0.1/0.2, overall 0.4/0.55
    assert rows["GRPO (G=5)"] == [
        "65.0 ± 5.0",
        "30.0 ± 10.0",
        "65.0 ± 5.0",
        "30.0 ± 10.0",
        "15.0 ± 5.0",
        "47.5 ± 7.5",
        "2",
    ]
    assert rows["REX-RAG"][1] == "50.0 ± 0.0"
    assert "Multi-hop EM change over the warm start: GRPO (G=5) +19.0, REX-RAG +39.0 points (mean over seeds)." in table


def test_absent_algorithm_and_hops(results):
    results["runs"] = [r for r in results["runs"] if r["algorithm"] == "rexrag"][:1]
    for f in [results["warm_start"]] + [r["final"] for r in results["runs"]]:
        f["hops"] = {"2": 0.5}
    table = results_table(results)
    assert "GRPO" not in table and "| REX-RAG |" in table
    assert "1-hop" not in table and "2-hop" in table and "3-hop" not in table
    results["runs"] = []
    table = results_table(results)
    assert "REX-RAG" not in table and "Warm start" in table and "change" not in table


def test_write_report(results, tmp_path):
    out = str(tmp_path / "new" / "run")
    paths = write_report(out, results)
    assert set(paths) == {"markdown", "plot", "html"}
    assert sorted(os.listdir(out)) == ["curves.png", "report.md", "trajectories.html"]  # no temp files left

    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(paths["plot"]).shape[:2] == (418, 1430)  # (3.8, 13) in at 110 dpi

    md = open(paths["markdown"], encoding="utf-8").read()
    assert md.startswith("# REX-RAG vs GRPO on a synthetic multi-hop world")
    assert "![training curves](curves.png)" in md and "(trajectories.html)" in md
    assert "| seeds | 0, 1 |" in md and "30.0 ± 10.0" in md
    assert "| REX-RAG | 1 | 65.0 | 50.0 | 57.5 | 516 | 36 | 12.5 |" in md  # 12 steps x 3 probes kept

    page = open(paths["html"], encoding="utf-8").read()
    traj = page[page.index('<div class="card">') :]
    assert "&lt;b&gt;&amp;" in traj and "<b>&" not in traj and "<search>" not in traj
    assert traj.count('<div class="card">') == 2
    assert '<span class="seg-probe">' in traj and '<span class="seg-other">unknown kind</span>' in traj
    assert "✓" in traj and "✗" in traj
    assert "<script" not in page and "http" not in page


def test_write_report_minimal(tmp_path):
    paths = write_report(str(tmp_path), {"warm_start": {"single": 0.5, "multi": 0.1, "overall": 0.3}})
    assert "Warm start" in open(paths["markdown"], encoding="utf-8").read()
    assert "No sample trajectories" in open(paths["html"], encoding="utf-8").read()


def test_errors(results, tmp_path):
    bad = copy.deepcopy(results)
    bad["runs"][0]["algorithm"] = "ppo"
    with pytest.raises(ValueError, match="arm 'ppo' is none of"):
        write_report(str(tmp_path), bad)
    with pytest.raises(ValueError, match="warm_start"):
        results_table({"runs": []})
    bad = copy.deepcopy(results)
    bad["runs"][1]["final"]["multi"] = 40.0  # a percentage, not a fraction
    with pytest.raises(ValueError, match="not an EM fraction"):
        results_table(bad)
    assert not os.listdir(tmp_path)

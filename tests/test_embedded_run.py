"""The embedded default end to end at CI size, and its pure pieces (SFT loss, EM by hop count)."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from configs import embedded
from rexrag_jax.embedded import world as W
from rexrag_jax.embedded.errors import CATEGORIES
from rexrag_jax.embedded.experiment import em_by_hops, run_experiment
from rexrag_jax.embedded.study import load_study, summarize, write_study_report
from rexrag_jax.embedded.warm_start import WarmStartConfig, pad_batch, train_warm_start
from rexrag_jax.models.config import ModelConfig
from rexrag_jax.models.decoder import init_model
from rexrag_jax.rl.objective import SEGMENTS, sft_loss
from rexrag_jax.sharding import make_mesh

POOL = "configs/exploration_prompts.txt"


def test_sft_loss_is_the_masked_negative_log_likelihood():
    logp = jnp.log(jnp.asarray([[1.0, 0.5, 0.25, 0.5]]))
    total, count = sft_loss(logp, jnp.asarray([[False, True, True, False]]))
    assert float(count) == 2 and float(total) == pytest.approx(np.log(2) + np.log(4))


def test_pad_batch_and_warm_start_fits_a_repeated_sequence():
    tokens, valid, mask = pad_batch([([1, 2, 3], [False, True, True]), ([4, 5], [False, True])], 8, 0)
    assert tokens.shape == (2, 8) and valid.sum() == 5 and mask.sum() == 3 and tokens[1, 2] == 0
    cfg = ModelConfig("qwen2", 32, 32, 64, 1, 2, 1, 16, tie_word_embeddings=True, remat="none")
    model = init_model(cfg, seed=0, mesh=make_mesh({"data": 8, "fsdp": 1, "tensor": 1}))
    rows = [([1, 7, 9, 11, 13, 15], [False] + [True] * 5)] * 8
    history = train_warm_start(
        model,
        rows,
        WarmStartConfig(steps=60, batch_size=8, learning_rate=1e-2, warmup_steps=2, length_multiple=8, logprob_chunk=8),
        pad_id=0,
        progress=False,
    )
    assert history[0]["loss"] > 2.5 and history[-1]["loss"] < 0.2  # ln(32) = 3.47 at the start
    assert history[-1]["tokens"] == 40


def test_em_by_hops():
    qs = [W.WorldQuestion(str(i), "q", ("a",), path=("x",) * h) for i, h in enumerate([1, 1, 2, 3, 3])]
    em = em_by_hops(qs, [1, 0, 1, 1, 0])
    assert em == {"overall": 0.6, "single": 0.5, "multi": pytest.approx(2 / 3), "hops": {"1": 0.5, "2": 1.0, "3": 0.5}}


def ci_config():
    """The embedded default, shrunk to run in CI in about two minutes (8 fake CPU devices, (8,1,1) mesh)."""
    c = embedded.get_config()
    c.seeds = (0,)
    c.mesh.update(data=8, fsdp=1, tensor=1)
    c.world.update(people=24, towns=8, countries=5, companies=6, test_fraction=0.15)
    c.vocab_size = 512
    c.model.update(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32)
    c.demos.per_question = 1
    c.warm_start.update(steps=40, batch_size=16)  # enough to learn the first search turn
    c.rl.steps = 2
    c.rl.data.batch_size = 8
    c.rl.rollout.update(group_size=2, max_turns=3, max_response_length=32)
    c.rl.train.update(mini_batch_size=16, micro_batch_size=8)
    c.rl.probes.update(keep_ratio=0.5)
    c.rl.checkpoint.every = 1
    c.eval_every = 2  # the warm start (step 0) and the last step: each evaluation costs seconds
    c.eval_batch_size = 16
    # the dead-end study's machinery: a level knob, novel probe prompts, the study's REX-RAG arm
    c.arms = ("grpo", "rexrag_dd")
    c.demos.update(complete_share=0.2, pool_reflections=False)
    return c


def test_embedded_run_end_to_end_resumes_and_refuses_another_config(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = ci_config()
    results = run_experiment(cfg, workdir, pool_file=POOL, progress=False)
    report = os.path.join(workdir, "report")
    for name in ("report.md", "curves.png", "trajectories.html", "results.json"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    assert [(r["arm"], r["algorithm"], r["seed"]) for r in results["runs"]] == [
        ("grpo", "grpo", 0),
        ("rexrag_dd", "rexrag", 0),
    ]
    pilot = results["pilot"]  # the warm start's dead-end pilot, before any training
    assert pilot["questions"] > 0 and pilot["group_size"] == 2
    assert 0 <= pilot["dead_end_rate_multi"] <= 1 and 0 <= pilot["rescue_rate"] <= 1
    assert os.path.exists(os.path.join(workdir, "pilot.json"))
    for run in results["runs"]:
        assert [e["step"] for e in run["evals"]] == [0, 2]
        assert run["evals"][0] == {"step": 0, **results["warm_start"]}  # both runs start from the warm start
        assert [h["step"] for h in run["history"]] == [1, 2]
        assert 0 <= run["final"]["multi"] <= 1 and set(run["final"]["hops"]) == {"1", "2", "3"}
    grpo, rexrag = results["runs"]
    assert all(h["probes"] == 0 for h in grpo["history"])
    for h in grpo["history"] + rexrag["history"]:  # the diagnostics of every step
        assert 0 <= h["dead_end_rate"] <= 1 and 0 <= h["rescue_rate"] <= 1 and h["decode_tokens"] > 0
        assert all(f"clip_fraction_{s}" in h and f"ratio_mean_{s}" in h for s in SEGMENTS)
    assert set(rexrag["final"]["errors"]["multi"]) == set(CATEGORIES)
    assert sum(rexrag["final"]["errors"]["multi"].values()) == pytest.approx(1.0)
    assert grpo["trajectories"] == 2 * 8 * 2 and rexrag["trajectories"] >= grpo["trajectories"]
    with open(os.path.join(report, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| Warm start |" in md and "| GRPO (G=5) |" in md and "| REX-RAG decoupled + dead-end-first |" in md
    assert "## Dead-end pilot" in md and "## Multi-hop errors" in md

    # The study report reads this workdir as one level with one paired seed.
    study = load_study(str(tmp_path))
    assert [lv["complete_share"] for lv in study["levels"]] == [0.2]
    paths = write_study_report(study, str(tmp_path / "study"))
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    assert summarize(study)["levels"][0]["paired"][0]["multi"]["n"] == 1
    assert sum(h["searches_per_traj"] for r in results["runs"] for h in r["history"]) > 0  # retrieval was used
    kinds = {k for s in results["samples"] for k, _ in s["segments"]}
    assert {"prompt", "model"} <= kinds
    with open(os.path.join(report, "trajectories.html"), encoding="utf-8") as f:
        page = f.read()
    assert all(f'class="seg-{k}"' in page for k in kinds)

    # A rerun finds every stage done and returns the same numbers without training again.
    again = run_experiment(cfg, workdir, pool_file=POOL, progress=False)
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(results["runs"], sort_keys=True)
    # Another sitting: an unfinished run whose checkpoints were not kept (the study commits no checkpoints)
    # trains again from its first step, and its evaluations from before are not counted twice.
    run_dir = os.path.join(workdir, "runs", "rexrag_dd-seed0")
    os.remove(os.path.join(run_dir, "result.json"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    again = run_experiment(cfg, workdir, pool_file=POOL, progress=False)
    assert [e["step"] for e in again["runs"][1]["evals"]] == [0, 2]
    assert [h["step"] for h in again["runs"][1]["history"]] == [1, 2]

    # More or fewer seeds and arms are the same study: accepted, finished runs reused.
    cfg3 = ci_config()
    cfg3.arms = ("rexrag_dd",)
    subset = run_experiment(cfg3, workdir, pool_file=POOL, progress=False)
    assert json.dumps(subset["runs"], sort_keys=True) == json.dumps(again["runs"][1:], sort_keys=True)
    cfg2 = ci_config()
    cfg2.rl.steps = 3
    with pytest.raises(ValueError, match=r"different config .*rl"):
        run_experiment(cfg2, workdir, pool_file=POOL, progress=False)

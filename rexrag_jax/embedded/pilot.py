"""The dead-end pilot: how often a warm start's groups are all wrong, and how often a probe rescues one.

It trains nothing: from the warm start, REX-RAG's sampler (G originals per question, a probe after a wrong
answer with the configured probability) runs once over every training question. A level of the dead-end
study is chosen by these numbers before any RL run, and the demo's report shows them next to the result.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rexrag_jax.config import training_rollout
from rexrag_jax.jsonfile import read_json, write_json_atomic
from rexrag_jax.rl import correction as C
from rexrag_jax.rollout.engine import RolloutEngine
from rexrag_jax.scoring import exact_match


def group_rates(rewards, group_ids, is_probe, hops_of_group) -> dict:
    """Dead-end and rescue rates (every probe counts: no budget), overall and for single/multi-hop groups."""
    rewards, group_ids, is_probe = (np.asarray(x) for x in (rewards, group_ids, is_probe))
    out = {}
    for part, sel_hops in (("", None), ("_single", 1), ("_multi", 2)):
        rows = np.ones(len(rewards), bool)
        if sel_hops is not None:
            hops = np.asarray([hops_of_group[g] for g in group_ids])
            rows = hops == 1 if sel_hops == 1 else hops > 1
        if not rows.any():
            continue
        stats = C.dead_end_stats(rewards[rows], group_ids[rows], is_probe[rows], np.ones(rows.sum(), bool))
        out[f"dead_end_rate{part}"] = float(stats["dead_end_rate"])
        out[f"rescue_rate{part}"] = float(stats["rescue_rate"])
        orig, probes = rows & ~is_probe, rows & is_probe
        out[f"accuracy{part}"] = float(rewards[orig].mean())
        out[f"probes{part}"] = int(probes.sum())
        out[f"probe_accuracy{part}"] = float(rewards[probes].mean()) if probes.any() else 0.0
    return out


def run_pilot(exp, model, retriever, *, batch_prompts: int | None = None) -> dict:
    """The pilot's numbers for `exp`'s warm start `model` (cached in `WORKDIR/pilot.json`)."""
    path = os.path.join(exp.workdir, "pilot.json")
    if os.path.exists(path):
        return read_json(path)
    cfg = exp.run_config("rexrag", exp.cfg.seed)
    engine = RolloutEngine(model, exp.tokenizer, retriever, training_rollout(cfg), exp.pool)
    params = nnx.state(model)
    questions = list(exp.train_qs)
    per = batch_prompts or exp.cfg.eval_batch_size
    rewards, groups, probes = [], [], []
    for start in tqdm(range(0, len(questions), per), desc="pilot", unit="batch", disable=not exp.progress):
        part = questions[start : start + per]
        golds = [q.golden_answers for q in part]
        trajs, _ = engine.rollout(
            params,
            [exp.encode_prompt(q.question) for q in part],
            seed=int(exp.cfg.seed) + start,
            reward_fn=lambda p, a, golds=golds: exact_match(a, golds[p]),
        )
        for t in trajs:
            rewards.append(exact_match(exp.answer(t), golds[t.prompt_index]))
            groups.append(start + t.prompt_index)
            probes.append(t.is_probe)
    result = {
        **group_rates(rewards, groups, probes, {i: q.hops for i, q in enumerate(questions)}),
        "questions": len(questions),
        "group_size": cfg.rollout.group_size,
        "temperature": cfg.rollout.temperature,
        "probe_prob": cfg.rollout.probe_prob,
    }
    write_json_atomic(path, result)
    return result

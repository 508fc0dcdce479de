"""The dead-end study's pieces on the embedded side: the complete-share knob, arms, the error breakdown,
the pilot's group rates."""

import ml_collections
import numpy as np
import pytest

from configs import embedded
from rexrag_jax.embedded import world as W
from rexrag_jax.embedded.arms import ARMS, apply_arm
from rexrag_jax.embedded.demonstrations import with_complete_share
from rexrag_jax.embedded.errors import beyond, classify, error_breakdown
from rexrag_jax.embedded.pilot import group_rates

MIX = {
    "single": {"complete": 0.8, "guess": 0.2},
    "multi": {"complete": 0.3, "premature": 0.45, "reflect": 0.15, "guess": 0.1},
}


def test_complete_share_rescales_the_other_behaviours():
    out = with_complete_share(MIX, 0.1)
    assert out["single"] == MIX["single"]
    assert out["multi"]["complete"] == 0.1
    np.testing.assert_allclose(
        [out["multi"][b] for b in ("premature", "reflect", "guess")],
        [0.9 * 0.45 / 0.7, 0.9 * 0.15 / 0.7, 0.9 * 0.1 / 0.7],
    )
    assert sum(out["multi"].values()) == pytest.approx(1.0)
    assert with_complete_share(MIX, -1.0) == MIX
    assert with_complete_share(MIX, 1.0)["multi"]["premature"] == 0.0
    with pytest.raises(ValueError, match="complete_share=1.5"):
        with_complete_share(MIX, 1.5)
    with pytest.raises(ValueError, match="another multi-hop behaviour"):
        with_complete_share({"single": {}, "multi": {"complete": 1.0}}, 0.5)


def test_arms_override_the_rl_config():
    rl = ml_collections.ConfigDict(embedded.get_config().rl.to_dict())
    apply_arm(rl, "grpo_g6")
    assert (rl.algorithm, rl.rollout.group_size) == ("grpo", 6)
    apply_arm(rl, "rexrag_dd")
    assert (rl.algorithm, rl.loss.correction, rl.probes.priority) == ("rexrag", "decoupled", "dead_end_groups")
    assert {a.algorithm for a in ARMS.values()} == {"grpo", "rexrag"}
    with pytest.raises(ValueError, match="unknown arm 'ppo'"):
        apply_arm(rl, "ppo")


def test_error_categories():
    world = W.make_world(0, W.WorldSizes(12, 5, 3, 4))
    qs = {q.hops: q for q in W.make_questions(world, 0) if q.path[-1] == "born_in"}
    q = qs[2]  # e.g. "Where was the teacher of X born?": chain X -> teacher -> town
    subject, teacher, town = q.chain
    country = world.facts[(town, "country")]
    assert country in beyond(world, town)
    assert classify(q, town.upper() + "!", world) == "correct"  # EM's normalisation
    assert classify(q, None, world) == "no_answer" and classify(q, " ", world) == "no_answer"
    assert classify(q, teacher, world) == "too_few_hops" and classify(q, subject, world) == "too_few_hops"
    assert classify(q, country, world) == "too_many_hops"
    assert classify(q, "Zzyzx", world) == "wrong_entity"
    out = error_breakdown([qs[1], q, q, q], [qs[1].chain[-1], teacher, country, None], world)
    assert out["single"]["correct"] == 1.0
    assert out["multi"] == pytest.approx(
        {"correct": 0.0, "no_answer": 1 / 3, "too_few_hops": 1 / 3, "too_many_hops": 1 / 3, "wrong_entity": 0.0}
    )


def test_pilot_group_rates():
    # question 0 single-hop (solved), 1 and 2 multi-hop dead ends; 1 rescued by its probe
    groups = [0, 0, 1, 1, 2, 2, 1, 2]
    rewards = [1, 0, 0, 0, 0, 0, 1, 0]
    probe = [False] * 6 + [True, True]
    out = group_rates(rewards, groups, probe, {0: 1, 1: 2, 2: 3})
    assert out["dead_end_rate"] == pytest.approx(2 / 3) and out["rescue_rate"] == 0.5
    assert out["dead_end_rate_single"] == 0.0 and out["dead_end_rate_multi"] == 1.0
    assert out["rescue_rate_multi"] == 0.5 and out["probe_accuracy_multi"] == 0.5 and out["probes"] == 2
    assert out["accuracy"] == pytest.approx(1 / 6) and out["accuracy_single"] == 0.5

"""The study options and diagnostics: decoupled PPO, the originals-only advantage baseline, the dead-end-first
probe budget, dead-end / rescue rates and per-segment clip statistics - each against hand values."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rexrag_jax.config import LossConfig
from rexrag_jax.rl.batch import TrainBatch
from rexrag_jax.rl.correction import dead_end_rows, dead_end_stats, select_probes
from rexrag_jax.rl.losses import clipped_surrogate, decoupled_surrogate, grpo_advantages
from rexrag_jax.rl.objective import SEGMENTS, loss_terms, segment_masks
from test_rl_correction import make_batch

# ------------------------------------------------------------------------------ decoupled PPO


def test_decoupled_hand_values():
    # pi_old 0.5, q 0.4 -> w = 1.25; pi 0.65 -> r = 1.3
    lp, old, q = (jnp.log(jnp.float32(x)) * jnp.ones(2) for x in (0.65, 0.5, 0.4))
    loss, ratio, clipped = decoupled_surrogate(lp, old, q, jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(ratio, [1.3, 1.3], rtol=1e-6)
    np.testing.assert_allclose(loss, [-1.25 * 1.2, 1.25 * 1.3], rtol=1e-6)  # A>0: clipped at 1.2; A<0: not
    assert clipped.tolist() == [True, False]


def _batch(b, alpha_probe_adv=(1.0, -0.7, 0.4)):
    n, t = b["labels"].shape
    return TrainBatch(
        tokens=jnp.zeros((n, t), jnp.int32),
        old_logprobs=jnp.asarray(b["old"]),
        ref_logprobs=jnp.asarray(b["old"]),
        loss_mask=jnp.asarray(b["loss_mask"]),
        valid=jnp.asarray(b["attn"]),
        prompt_mask=jnp.asarray(b["prompt_mask"]),
        conditionals=jnp.asarray(b["conditionals"]),
        advantages=jnp.asarray(alpha_probe_adv, jnp.float32),
        is_probe=jnp.asarray(b["is_probe"]),
        response_start=jnp.asarray(b["response_start"]),
        probe_start=jnp.asarray(b["probe_start"]),
        num_rows=n,
    )


@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_decoupled_gradient_at_theta_old_equals_token_mode_where_unclipped(alpha):
    b = make_batch()
    batch = _batch(b)
    scalars = {"alpha": jnp.float32(alpha), "error_rate": jnp.float32(0.4), "total_tokens": jnp.float32(10.0)}

    def grad(correction):
        cfg = LossConfig(correction=correction, kl_coef=0.0)
        return np.asarray(jax.grad(lambda lp: loss_terms(lp, batch, scalars, cfg)[0])(batch.old_logprobs))

    token, decoupled = grad("token"), grad("decoupled")
    _, ratio, clipped = clipped_surrogate(batch.old_logprobs, _behaviour(batch, alpha), batch.advantages[:, None])
    clipped = np.asarray(clipped) & b["loss_mask"]
    unclipped = b["loss_mask"] & ~clipped
    np.testing.assert_allclose(decoupled[unclipped], token[unclipped], rtol=1e-5, atol=1e-9)
    assert (decoupled[b["loss_mask"]] != 0).all()  # at r = 1 the decoupled loss never clips
    assert (token[clipped] == 0).all()
    if alpha == 0.3:  # originals at 1/(1-alpha) = 1.43 > 1.2: token mode clips them (A > 0), decoupled does not
        assert clipped[0].any()


def _behaviour(batch, alpha):
    from rexrag_jax.rl.objective import behaviour

    return behaviour(batch, jnp.float32(alpha), jnp.float32(0.4), "token")


@pytest.mark.parametrize(
    "r, adv, zero_decoupled", [(1.1, 1.0, False), (1.25, 1.0, True), (0.85, -1.0, False), (0.75, -1.0, True)]
)
def test_decoupled_trust_region_is_symmetric_around_pi_old_for_originals(r, adv, zero_decoupled):
    """After the first update of a step pi != pi_old. An original's behaviour q = (1 - alpha) pi_old: token
    mode clips pi / q, i.e. pi / pi_old in [0.8 (1 - alpha), 1.2 (1 - alpha)]; decoupled clips pi / pi_old
    in [0.8, 1.2] whatever alpha."""
    alpha, old = 0.3, jnp.log(jnp.float32(0.5))
    q = jnp.log1p(-alpha) + old

    def grads(lp):
        d = jax.grad(lambda x: decoupled_surrogate(x, old, q, adv)[0])(lp)
        t = jax.grad(lambda x: clipped_surrogate(x, q, adv)[0])(lp)
        return float(d), float(t)

    d, t = grads(old + jnp.log(jnp.float32(r)))
    assert (d == 0.0) == zero_decoupled
    token_ratio = r / (1 - alpha)  # 1.57, 1.79, 1.21, 1.07
    assert (t == 0.0) == ((adv > 0 and token_ratio > 1.2) or (adv < 0 and token_ratio < 0.8))
    if not zero_decoupled:
        assert d == pytest.approx(-adv * r / (1 - alpha), rel=1e-5)  # w = pi_old / q = 1 / (1 - alpha)


def test_decoupled_without_probes_is_plain_ppo():
    b = make_batch()
    batch = _batch(b).replace(is_probe=jnp.zeros(3, bool))
    scalars = {"alpha": jnp.float32(0.0), "error_rate": jnp.float32(0.4), "total_tokens": jnp.float32(10.0)}
    lp = batch.old_logprobs + 0.3 * jnp.asarray(np.random.default_rng(0).normal(size=b["old"].shape), jnp.float32)
    a = loss_terms(lp, batch, scalars, LossConfig(correction="token"))
    d = loss_terms(lp, batch, scalars, LossConfig(correction="decoupled"))
    assert float(a[0]) == float(d[0])
    for key in a[1]:
        assert float(a[1][key]) == float(d[1][key]), key


# ----------------------------------------------------------------------- advantage baseline


def test_originals_baseline_hand_values():
    rewards = np.array([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], np.float32)
    groups = np.array([0] * 6 + [1] * 6)
    probe = np.array([False] * 5 + [True] + [False] * 5 + [True])
    adv = np.asarray(grpo_advantages(rewards, groups, baseline=~probe))
    s = np.sqrt(0.2)  # originals of group 0: one of five correct, unbiased std
    np.testing.assert_allclose(adv[:6], [0.8 / s, -0.2 / s, -0.2 / s, -0.2 / s, -0.2 / s, 0.8 / s], rtol=1e-5)
    # group 1 is a dead end: its originals agree (std 0 -> 1), they get 0 and the correct probe r - mean = 1
    np.testing.assert_allclose(adv[6:], [0, 0, 0, 0, 0, 1 / (1 + 1e-6)], rtol=1e-6)
    group = np.asarray(grpo_advantages(rewards, groups))  # the authors': the probe moves its group's statistics
    assert group[0] < adv[0] and group[11] > 1.5


def test_originals_baseline_is_jittable_and_default_unchanged():
    rng = np.random.default_rng(0)
    rewards, groups = rng.integers(0, 2, 20).astype(np.float32), rng.integers(0, 4, 20)
    every = np.ones(20, bool)
    np.testing.assert_array_equal(grpo_advantages(rewards, groups), grpo_advantages(rewards, groups, baseline=every))
    probe = rng.random(20) < 0.3
    np.testing.assert_allclose(
        jax.jit(grpo_advantages)(rewards, groups, baseline=~probe),
        grpo_advantages(rewards, groups, baseline=~probe),
        rtol=1e-6,
    )


# ------------------------------------------------------------------- dead ends and budget


def test_dead_end_rows_and_stats():
    # groups: 7 (a correct original), 3 (dead end, a correct probe), 9 (dead end, probes wrong), 4 (dead, no probe)
    groups = np.array([7, 7, 3, 3, 9, 9, 4, 4, 3, 9, 7])
    rewards = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1], np.float32)
    probe = np.array([False] * 8 + [True] * 3)
    dead = np.asarray(dead_end_rows(rewards, groups, probe))
    assert dead.tolist() == [False, False, True, True, True, True, True, True, True, True, False]
    kept = np.ones(11, bool)
    s = {k: float(v) for k, v in dead_end_stats(rewards, groups, probe, kept).items()}
    assert s == {
        "dead_end_rate": 0.75,
        "rescue_rate": pytest.approx(1 / 3),
        "dead_end_groups": 3.0,
        "probes_kept_dead_end": 2.0,
    }
    kept[8] = False  # the rescuing probe dropped by the budget: nothing rescued
    assert float(dead_end_stats(rewards, groups, probe, kept)["rescue_rate"]) == 0.0
    # a correct probe in a group with a correct original does not make it a dead end
    assert float(jax.jit(dead_end_stats)(rewards, groups, np.zeros(11, bool), kept)["dead_end_rate"]) == 0.5


def test_dead_end_first_budget():
    probe = np.array([False, False, True, True, True, True])
    scores = np.array([0.0, 0.0, -1.0, -5.0, -2.0, -0.5])
    first = np.array([False, False, False, True, True, False])
    assert select_probes(probe, scores, 2).tolist() == [True, True, True, False, False, True]  # by score
    assert select_probes(probe, scores, 2, first).tolist() == [True, True, False, True, True, False]
    assert select_probes(probe, scores, 3, first).tolist() == [True, True, False, True, True, True]
    assert select_probes(probe, scores, 1, first).tolist() == [True, True, False, False, True, False]


# ----------------------------------------------------------------------- segment statistics


def test_segment_masks_and_sums():
    b = make_batch()
    masks = {k: np.asarray(v) for k, v in segment_masks(_batch(b)).items()}
    assert list(masks) == list(SEGMENTS)
    assert np.flatnonzero(masks["original"][0]).tolist() == [2, 3, 4, 6, 7, 8, 9, 10]
    assert np.flatnonzero(masks["probe_prefix"][1]).tolist() == [2, 3, 5]  # 4 is information
    assert np.flatnonzero(masks["probe_prompt"][1]).tolist() == [6, 7, 8]
    assert np.flatnonzero(masks["probe_continuation"][1]).tolist() == [9, 10]
    assert not masks["original"][1:].any() and not masks["probe_prefix"][0].any()
    np.testing.assert_array_equal(sum(m.astype(int) for m in masks.values()), b["loss_mask"].astype(int))
    scalars = {"alpha": jnp.float32(0.3), "error_rate": jnp.float32(0.4), "total_tokens": jnp.float32(10.0)}
    _, sums = loss_terms(jnp.asarray(b["old"]), _batch(b), scalars, LossConfig())
    assert sum(float(sums[f"tokens_{s}"]) for s in SEGMENTS) == float(sums["tokens"])
    assert sum(float(sums[f"clipped_{s}"]) for s in SEGMENTS) == pytest.approx(float(sums["clipped"]))
    # at theta_old in token mode the originals' ratio is 1 / (1 - alpha) and all of them clip for A > 0
    assert float(sums["ratio_original"]) / float(sums["tokens_original"]) == pytest.approx(1 / 0.7, rel=1e-5)
    assert float(sums["clipped_original"]) == float(sums["tokens_original"]) == 8


# --------------------------------------------------------------------------- config keys


@pytest.mark.parametrize("name", ["tiny_cpu", "qwen2p5_3b", "qwen2p5_7b", "embedded"])
def test_every_config_accepts_the_study_options(name):
    from rexrag_jax.config import validate as validate_config

    c = importlib.import_module(f"configs.{name}").get_config()
    c = c.rl if name == "embedded" else c
    c = ml_collections.ConfigDict(c.to_dict())
    c.lock()  # as the CLI: a key that does not exist would raise
    assert (c.loss.correction, c.loss.advantage_baseline, c.probes.priority) == ("token", "group", "prompt_logprob")
    c.loss.correction, c.loss.advantage_baseline, c.probes.priority = "decoupled", "originals", "dead_end_groups"
    c.retrieval.update(url="", index="", corpus="x.jsonl")
    c.model.update(init="random")
    c.data.train_file = "x.jsonl"
    validate_config(c)
    c.probes.priority = "random"
    with pytest.raises(ValueError, match="probes.priority='random'"):
        validate_config(c)

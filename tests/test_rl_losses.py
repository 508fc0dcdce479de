"""GRPO advantages, k3 KL and the clipped policy loss, against hand values (docs/algorithm.md#grpo-advantages,
#surrogate-loss-and-kl, #invariants 6-8)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexrag_jax.rl.losses import clipped_surrogate, grpo_advantages, k3_kl, masked_sum, policy_loss

EPS = 1e-6
grpo = jax.jit(grpo_advantages)  # one compile per shape instead of one per eager op (eager: test_grpo_jit_equals_eager)


def reference_grpo(rewards, group_ids, eps=EPS):
    """numpy float64: per group mean and unbiased std; a group of one keeps its raw score."""
    rewards = np.asarray(rewards, np.float64)
    group_ids = np.asarray(group_ids)
    out = np.empty_like(rewards)
    for g in np.unique(group_ids):
        idx = group_ids == g
        if idx.sum() == 1:
            out[idx] = rewards[idx] / (1.0 + eps)
        else:
            out[idx] = (rewards[idx] - rewards[idx].mean()) / (rewards[idx].std(ddof=1) + eps)
    return out


# ------------------------------------------------------------------------------------------ GRPO


def test_grpo_one_correct_of_five():
    adv = np.asarray(grpo([0.0, 1.0, 0.0, 0.0, 0.0], [7] * 5))
    # mean 0.2, unbiased var (0.8^2 + 4 * 0.2^2) / 4 = 0.2
    hi = (1 - 0.2) / (math.sqrt(0.2) + 1e-6)
    lo = (0 - 0.2) / (math.sqrt(0.2) + 1e-6)
    assert hi == pytest.approx(1.78885, abs=1e-5)
    assert lo == pytest.approx(-0.447213, abs=1e-6)
    np.testing.assert_allclose(adv, [lo, hi, lo, lo, lo], rtol=1e-6)
    assert adv.dtype == np.float32


def test_grpo_all_equal_group_is_zero():
    for value in (0.0, 1.0, 0.37):
        np.testing.assert_array_equal(np.asarray(grpo([value] * 5, [3] * 5)), np.zeros(5))


def test_grpo_singleton_keeps_raw_score():
    adv = np.asarray(grpo([1.0, 0.0, 0.5], [10, 11, 12]))
    np.testing.assert_allclose(adv, [1.0 / (1 + 1e-6), 0.0, 0.5 / (1 + 1e-6)], rtol=1e-7)


def test_grpo_non_contiguous_shuffled_groups():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.3, 1.0, 0.0, 0.0, 1.0]
    groups = [42, 3, 42, 3, 1000, 42, -5, 3, -5]  # interleaved, unsorted, negative, a singleton
    adv = np.asarray(grpo(rewards, groups))
    np.testing.assert_allclose(adv, reference_grpo(rewards, groups), rtol=1e-6, atol=1e-7)
    # permuting the rows permutes the advantages
    perm = np.random.default_rng(0).permutation(len(rewards))
    adv_p = np.asarray(grpo(np.asarray(rewards)[perm], np.asarray(groups)[perm]))
    np.testing.assert_allclose(adv_p, adv[perm], rtol=1e-6, atol=1e-7)


def test_grpo_probes_join_their_source_group():
    # group 3: five failed originals alone -> all zero; a correct probe with uid 3 changes the group stats
    originals = [0.0] * 5
    np.testing.assert_array_equal(np.asarray(grpo(originals, [3] * 5)), np.zeros(5))
    adv = np.asarray(grpo(originals + [0.0, 1.0] + [1.0], [3] * 5 + [9, 9] + [3]))
    # group 3 = [0, 0, 0, 0, 0, 1]: mean 1/6, unbiased var (5/36 + 25/36) / 5 = 1/6
    std = math.sqrt(1 / 6)
    lo, hi = (-1 / 6) / (std + EPS), (5 / 6) / (std + EPS)
    assert hi == pytest.approx(2.041241, abs=1e-5)
    np.testing.assert_allclose(adv[[0, 1, 2, 3, 4, 7]], [lo] * 5 + [hi], rtol=1e-6)
    # group 9 = [0, 1]: mean 0.5, std sqrt(0.5)
    np.testing.assert_allclose(adv[5:7], np.array([-0.5, 0.5]) / (math.sqrt(0.5) + EPS), rtol=1e-6)


def test_grpo_jit_equals_eager():
    rng = np.random.default_rng(1)
    rewards = rng.integers(0, 2, 23).astype(np.float32)
    groups = rng.integers(0, 6, 23) * 17 - 40
    eager = np.asarray(grpo_advantages(rewards, groups))
    jitted = np.asarray(jax.jit(grpo_advantages)(rewards, groups))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(eager, reference_grpo(rewards, groups), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- k3 KL


def test_k3_hand_values():
    logp = jnp.array([0.0, 0.0, -1.0, -2.0])
    ref = jnp.array([math.log(2.0), -1.0, -1.0, -1.5])
    d = np.array([math.log(2.0), -1.0, 0.0, 0.5])
    expected = np.exp(d) - d - 1  # [1 - ln 2, e^-1, 0, e^0.5 - 1.5]
    np.testing.assert_allclose(np.asarray(k3_kl(logp, ref)), expected, rtol=1e-6, atol=1e-7)
    assert float(k3_kl(0.0, math.log(2.0))) == pytest.approx(1 - math.log(2.0), rel=1e-6)
    # d/dlogp (e^d - d - 1) with d = ref - logp: 1 - e^d
    grad = jax.grad(lambda x: k3_kl(x, ref).sum())(logp)
    np.testing.assert_allclose(np.asarray(grad), 1 - np.exp(d), rtol=1e-6, atol=1e-7)


def test_k3_nonnegative_and_zero_iff_equal():
    rng = np.random.default_rng(2)
    logp = rng.normal(-3, 2, 4096).astype(np.float32)
    d = np.concatenate([np.geomspace(1e-6, 5, 2048), -np.geomspace(1e-6, 5, 2048)]).astype(np.float32)
    kl = np.asarray(k3_kl(logp, logp + d))
    assert (kl >= 0).all()
    assert (kl[np.abs(logp + d - logp) > 1e-4] > 0).all()
    np.testing.assert_array_equal(np.asarray(k3_kl(logp, logp)), np.zeros_like(logp))
    # small log-ratios: close to d^2 / 2 (no cancellation to 0 or below)
    small = np.array([1e-4, -1e-4, 3e-3, -3e-3], np.float32)
    np.testing.assert_allclose(
        np.asarray(k3_kl(jnp.zeros(4), small)), np.expm1(small.astype(np.float64)) - small, rtol=1e-2
    )


def test_k3_clamps():
    # output clamp at 10: e^d - d - 1 > 10 for d > 2.62 and d < -11
    np.testing.assert_array_equal(np.asarray(k3_kl(jnp.zeros(4), jnp.array([3.0, 25.0, -12.0, -25.0]))), [10.0] * 4)
    assert float(k3_kl(0.0, 2.0)) == pytest.approx(math.exp(2.0) - 3.0, rel=1e-6)  # 4.389, unclamped
    # the log-ratio clamp at +-20 keeps infinite inputs finite (e^inf - inf would be nan)
    out = np.asarray(k3_kl(jnp.array([-jnp.inf, 0.0, 0.0, 1e30]), jnp.array([0.0, -jnp.inf, 1e30, 0.0])))
    np.testing.assert_array_equal(out, [10.0] * 4)
    grad = jax.grad(lambda x: k3_kl(x, 0.0).sum())(jnp.array([-jnp.inf, -25.0, 25.0, 1e30]))
    np.testing.assert_array_equal(np.asarray(grad), np.zeros(4))
    # d = 30 is clamped to d = 20, whose k3 is in turn clamped to 10
    assert float(k3_kl(0.0, 20.0)) == float(k3_kl(0.0, 30.0)) == 10.0


# ---------------------------------------------------------------------------------- policy loss


def _case():
    # log-ratios chosen so r = [[1.1, 1.5, 0.5], [0.7, 1.0, 2.0]]
    ratios = np.array([[1.1, 1.5, 0.5], [0.7, 1.0, 2.0]])
    behaviour = np.array([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.2]], np.float32)
    logprobs = (behaviour + np.log(ratios)).astype(np.float32)
    advantages = np.array([1.0, -0.5], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    return logprobs, behaviour, advantages, mask


def test_policy_loss_hand_values():
    logprobs, behaviour, advantages, mask = _case()
    loss, stats = policy_loss(logprobs, behaviour, advantages, mask)
    # row 0, A = 1:    r 1.1 -> -1.1; r 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r 0.5 -> max(-0.5, -0.8) = -0.5
    # row 1, A = -0.5: r 0.7 -> max(0.35, 0.4) = 0.4 (clipped); r 1.0 -> 0.5; r 2.0 masked out
    total = -1.1 - 1.2 - 0.5 + 0.4 + 0.5
    assert float(stats["sum"]) == pytest.approx(total, rel=1e-5)
    assert float(stats["count"]) == 5.0
    assert float(loss) == pytest.approx(total / 5, rel=1e-5)
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 5)
    assert float(stats["ratio_mean"]) == pytest.approx((1.1 + 1.5 + 0.5 + 0.7 + 1.0) / 5, rel=1e-5)

    elementwise, ratio, clipped = clipped_surrogate(logprobs, behaviour, advantages[:, None])
    np.testing.assert_allclose(np.asarray(ratio), [[1.1, 1.5, 0.5], [0.7, 1.0, 2.0]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(elementwise), [[-1.1, -1.2, -0.5], [0.4, 0.5, 1.0]], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(clipped), [[False, True, False], [True, False, False]])


def test_policy_loss_token_mean_over_mask():
    rng = np.random.default_rng(3)
    logprobs = rng.normal(-2, 0.3, (3, 6)).astype(np.float32)
    behaviour = (logprobs + rng.normal(0, 0.3, (3, 6))).astype(np.float32)
    advantages = np.array([0.5, -1.0, 2.0], np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.float32)
    loss, stats = policy_loss(logprobs, behaviour, advantages, mask)
    elementwise = np.asarray(clipped_surrogate(logprobs, behaviour, advantages[:, None])[0])
    assert float(loss) == pytest.approx(elementwise[mask > 0].mean(), rel=1e-6)  # token mean, not row mean
    assert float(stats["count"]) == 8
    # garbage outside the mask changes nothing
    noisy = np.where(mask > 0, logprobs, 1e3).astype(np.float32)
    assert float(policy_loss(noisy, behaviour, advantages, mask)[0]) == float(loss)
    # an empty mask gives 0, not nan
    empty_loss, empty = policy_loss(logprobs, behaviour, advantages, np.zeros_like(mask))
    assert float(empty_loss) == 0.0 and float(empty["count"]) == 0.0 and float(empty["clip_fraction"]) == 0.0


def _token_grad(ratio, advantage):
    """d loss / d logprob of one token with behaviour log-prob 0 and logprob log(ratio)."""
    lp = jnp.array([[math.log(ratio)]], jnp.float32)
    f = lambda x: policy_loss(x, jnp.zeros((1, 1)), jnp.array([advantage]), jnp.ones((1, 1)))[0]
    return float(jax.grad(f)(lp)[0, 0])


@pytest.mark.parametrize(
    "ratio, advantage, zero",
    [
        (1.3, 1.0, True),
        (2.0, 0.7, True),  # A > 0 and r > 1.2: clipped
        (0.7, -1.0, True),
        (0.1, -2.0, True),  # A < 0 and r < 0.8: clipped
        (1.0, 1.0, False),
        (1.1, -1.0, False),
        (0.9, 2.0, False),
        (1.19, 1.0, False),
        (0.81, -1.0, False),
        (0.5, 1.0, False),  # A > 0, r < 0.8: the unclipped term is the max
        (3.0, -1.0, False),
        (50.0, -1.0, False),  # A < 0, r > 1.2: no dual clip
    ],
)
def test_clip_gradient_regions(ratio, advantage, zero):
    grad = _token_grad(ratio, advantage)
    if zero:
        assert grad == 0.0
    else:
        assert grad == pytest.approx(-advantage * ratio, rel=1e-5)  # d(-A r)/dlogp = -A r


@pytest.mark.parametrize("ratio", [3.0, 10.0, 100.0, 1e4])
def test_no_dual_clip(ratio):
    advantage = -0.5
    loss, _ = policy_loss(jnp.array([[math.log(ratio)]]), jnp.zeros((1, 1)), jnp.array([advantage]), jnp.ones((1, 1)))
    assert float(loss) == pytest.approx(-advantage * ratio, rel=1e-5)  # grows without bound (dual clip c=3 is off)


def test_masked_sum():
    values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1, 0, 1], [0, 0, 1]])
    total, count = masked_sum(values, mask)
    assert float(total) == 10.0 and float(count) == 3.0
    total, count = masked_sum(values, mask.astype(bool))
    assert float(total) == 10.0 and float(count) == 3.0


def test_split_batch_accumulates_exactly():
    rng = np.random.default_rng(4)
    n, t = 6, 7
    logprobs = rng.normal(-2, 0.5, (n, t)).astype(np.float32)
    behaviour = (logprobs + rng.normal(0, 0.4, (n, t))).astype(np.float32)
    advantages = rng.normal(0, 1, n).astype(np.float32)
    lengths = np.array([7, 1, 3, 6, 2, 5])  # halves hold 11 and 13 tokens: a mean of means would be wrong
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)

    def whole(lp):
        return policy_loss(lp, behaviour, advantages, mask)[0]

    def split(lp):
        _, a = policy_loss(lp[:3], behaviour[:3], advantages[:3], mask[:3])
        _, b = policy_loss(lp[3:], behaviour[3:], advantages[3:], mask[3:])
        return (a["sum"] + b["sum"]) / (a["count"] + b["count"])

    split_vg, whole_vg = jax.jit(jax.value_and_grad(split)), jax.jit(jax.value_and_grad(whole))
    (split_loss, split_grad), (whole_loss, whole_grad) = split_vg(logprobs), whole_vg(logprobs)
    np.testing.assert_allclose(float(split_loss), float(whole_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(split_grad), np.asarray(whole_grad), rtol=1e-6, atol=1e-8)
    loss = jax.jit(lambda *a: policy_loss(*a)[0])
    mean_of_means = 0.5 * (
        float(loss(logprobs[:3], behaviour[:3], advantages[:3], mask[:3]))
        + float(loss(logprobs[3:], behaviour[3:], advantages[3:], mask[3:]))
    )
    assert abs(mean_of_means - float(whole_loss)) > 1e-4


# ------------------------------------------------------------------------------ chunked log-probs


def _full_logprobs(hidden, weight, targets, temperature):
    logits = jnp.einsum("btd,vd->btv", hidden, weight) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


@pytest.mark.parametrize("chunk", [1, 3, 16])  # T = 7: 3 leaves a padded last chunk, 16 > T is one chunk
def test_chunked_logprobs_match_full_softmax(chunk):
    from rexrag_jax.rl.logprobs import chunked_logprobs

    rng = np.random.default_rng(5)
    b, t, h, v, temperature = 2, 7, 5, 11, 0.7
    hidden = jnp.asarray(rng.normal(0, 1, (b, t, h)), jnp.float32)
    weight = jnp.asarray(rng.normal(0, 1, (v, h)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    want_lp, want_ent = jax.jit(_full_logprobs, static_argnums=3)(hidden, weight, targets, temperature)

    run = jax.jit(chunked_logprobs, static_argnames=("chunk", "temperature", "with_entropy"))
    lp, ent = run(hidden, weight, targets, chunk=chunk, temperature=temperature, with_entropy=True)
    assert lp.shape == ent.shape == (b, t) and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), np.asarray(want_lp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(want_ent), rtol=1e-5, atol=1e-5)
    lp_only, zeros = run(hidden, weight, targets, chunk=chunk, temperature=temperature)
    np.testing.assert_allclose(np.asarray(lp_only), np.asarray(lp), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(zeros), 0.0)

    w_lp = jnp.asarray(rng.normal(0, 1, (b, t)), jnp.float32)
    w_ent = jnp.asarray(rng.normal(0, 1, (b, t)), jnp.float32)

    def objective(fn):
        def f(hid, wt):
            a, e = fn(hid, wt)
            return jnp.sum(a * w_lp) + jnp.sum(e * w_ent)

        return f

    chunked = objective(
        lambda hid, wt: chunked_logprobs(hid, wt, targets, chunk=chunk, temperature=temperature, with_entropy=True)
    )
    full = objective(lambda hid, wt: _full_logprobs(hid, wt, targets, temperature))
    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, weight)
    want = jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, weight)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)

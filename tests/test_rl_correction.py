"""REX-RAG's policy correction and probe budget against numpy references (docs/algorithm.md#mixed-sampling,
#policy-correction, #invariants 1-5 and 11)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexrag_jax.protocol import FEEDBACK, INFORMATION, LOSS_SEGMENTS, MODEL, PROBE_PROMPT, PROMPT
from rexrag_jax.rl.correction import (
    behaviour_logprobs,
    mean_prompt_logprob,
    mixture_stats,
    probe_keep_count,
    probe_mu,
    select_probes,
    sequence_behaviour_logprobs,
    update_keep_ratio,
)
from rexrag_jax.rl.logprobs import chunked_logprobs
from rexrag_jax.rl.losses import grpo_advantages, k3_kl, masked_sum, policy_loss
from rexrag_jax.rollout.pool import ExplorationPool, trie_conditionals

PAD = -1
P, M, F, I, X = PROMPT, MODEL, FEEDBACK, INFORMATION, PROBE_PROMPT  # noqa: E741 (the labels' initials)


def make_batch():
    """Three rows of 12 tokens: an original, a probe whose prefix holds an info token (j = 4), a probe with j = 2."""
    labels = np.array(
        [
            [P, P, M, M, M, F, M, M, M, M, M, PAD],  # original, response from 2
            [P, P, M, M, I, M, X, X, X, M, M, PAD],  # probe: response from 2, prompt 6..8 -> j = 4
            [P, P, P, M, M, X, X, M, M, M, M, M],  # probe: response from 3, prompt 5..6 -> j = 2
        ]
    )
    is_probe = np.array([False, True, True])
    response_start = np.array([2, 2, 3])
    probe_start = np.array([2, 6, 5])  # an original's is unused
    prompt_mask = labels == X
    conditionals = np.zeros(labels.shape, np.float32)
    conditionals[1, 6:9] = [1.0, 0.5, 0.25]
    conditionals[2, 5:7] = [1.0, 1 / 3]
    rng = np.random.default_rng(0)
    old = rng.uniform(-3.0, -0.1, labels.shape).astype(np.float32)
    old[prompt_mask] = rng.uniform(-14.0, -8.0, prompt_mask.sum())  # prompt tokens are unlikely under pi
    attn = labels != PAD
    loss_mask = np.isin(labels, LOSS_SEGMENTS)
    return dict(
        labels=labels,
        is_probe=is_probe,
        response_start=response_start,
        probe_start=probe_start,
        prompt_mask=prompt_mask,
        conditionals=conditionals,
        old=old,
        attn=attn,
        loss_mask=loss_mask,
    )


def mu_of(b, eps):
    return probe_mu(
        b["old"], b["is_probe"], b["prompt_mask"], b["conditionals"], b["response_start"], b["probe_start"], eps
    )


def reference_token_ratio(b, alpha, eps):
    """float64 r = pi_old / q per token at theta = theta_old (code mode), from the spec's case list."""
    pi = np.exp(b["old"].astype(np.float64))
    t = np.arange(pi.shape[1])[None]
    j = (b["probe_start"] - b["response_start"])[:, None]
    prefix = (t >= b["response_start"][:, None]) & (t < b["probe_start"][:, None])
    mu = np.where(prefix, pi * eps ** (-1.0 / np.maximum(j, 1)), pi)
    mu = np.where(b["prompt_mask"], b["conditionals"], mu)
    mu = np.where(b["is_probe"][:, None], mu, 0.0)
    q = (1 - alpha) * pi + alpha * mu
    return np.where(b["attn"], pi / q, 1.0), mu


# ------------------------------------------------------------------------------- (a) alpha = 0


def test_alpha_zero_is_plain_grpo():
    b = make_batch()
    mu = mu_of(b, 0.4)
    for beh in (
        behaviour_logprobs(b["old"], mu, b["attn"], 0.0),
        sequence_behaviour_logprobs(b["old"], mu, b["is_probe"], b["loss_mask"], 0.0),
    ):
        beh = np.asarray(beh)
        assert beh.dtype == np.float32
        np.testing.assert_array_equal(beh.view(np.int32), b["old"].view(np.int32))  # bitwise

    rng = np.random.default_rng(1)
    logprobs = jnp.asarray(b["old"] + rng.normal(0, 0.3, b["old"].shape).astype(np.float32))
    ref = jnp.asarray(b["old"] + rng.normal(0, 0.3, b["old"].shape).astype(np.float32))
    adv = grpo_advantages(np.array([1.0, 0.0, 0.0]), np.array([5, 5, 5]))
    beh = behaviour_logprobs(b["old"], mu, b["attn"], 0.0)

    def full_loss(lp, behaviour):
        pg, stats = policy_loss(lp, behaviour, adv, b["loss_mask"])
        kl_sum, kl_count = masked_sum(k3_kl(lp, ref), b["loss_mask"])
        return pg + 0.001 * kl_sum / kl_count, stats

    value_and_grad = jax.jit(jax.value_and_grad(full_loss, has_aux=True))
    (loss_c, stats_c), grad_c = value_and_grad(logprobs, beh)
    (loss_g, stats_g), grad_g = value_and_grad(logprobs, jnp.asarray(b["old"]))
    assert float(loss_c) == float(loss_g)
    assert float(stats_c["clip_fraction"]) == float(stats_g["clip_fraction"])
    np.testing.assert_array_equal(np.asarray(grad_c), np.asarray(grad_g))


# ------------------------------------------------------------------------- (b) ratios at theta_old


@pytest.mark.parametrize("alpha", [0.05, 0.3])
@pytest.mark.parametrize("eps", [0.6, 0.15])
def test_token_mode_ratios_at_theta_old(alpha, eps):
    b = make_batch()
    mu = np.asarray(mu_of(b, eps))
    beh = np.asarray(behaviour_logprobs(b["old"], mu, b["attn"], alpha))
    r = np.exp(b["old"].astype(np.float64) - beh)
    expected_r, expected_mu = reference_token_ratio(b, alpha, eps)
    np.testing.assert_allclose(r, expected_r, rtol=2e-5)
    np.testing.assert_allclose(mu, expected_mu, rtol=2e-5)

    orig = ~b["is_probe"][:, None] & b["attn"]
    np.testing.assert_array_equal(mu[~b["is_probe"]], 0.0)  # mu = 0 for originals
    np.testing.assert_allclose(r[orig], 1 / (1 - alpha), rtol=1e-5)
    after = b["is_probe"][:, None] & b["attn"] & (np.arange(12)[None] > np.array([[0], [8], [6]]))
    np.testing.assert_allclose(r[after], 1.0, rtol=1e-5)  # probe continuation: q = pi_old
    pi = np.exp(b["old"].astype(np.float64))
    prompt = b["prompt_mask"]
    np.testing.assert_allclose(
        r[prompt], pi[prompt] / ((1 - alpha) * pi[prompt] + alpha * b["conditionals"][prompt]), rtol=2e-5
    )
    assert (r[prompt] <= 1 / (1 - alpha) * (1 + 1e-6)).all()
    assert (r[prompt] < 0.05).all()  # pi <= e^-8, q >= alpha U: far below 1
    np.testing.assert_array_equal(beh[~b["attn"]], b["old"][~b["attn"]])  # pads keep old
    # probe prefix tokens: q = pi ((1 - alpha) + alpha eps^(-1/j))
    for row, (lo, hi, j) in {1: (2, 6, 4), 2: (3, 5, 2)}.items():
        np.testing.assert_allclose(r[row, lo:hi], 1 / ((1 - alpha) + alpha * eps ** (-1 / j)), rtol=2e-5)


@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_sequence_mode_ratios_at_theta_old(alpha):
    b, eps = make_batch(), 0.3
    mu = np.asarray(mu_of(b, eps))
    mask = b["loss_mask"]
    beh = np.asarray(sequence_behaviour_logprobs(b["old"], mu, b["is_probe"], mask, alpha))
    r = np.exp(b["old"].astype(np.float64) - beh)
    np.testing.assert_array_equal(beh[0], b["old"][0])  # originals: r = 1 exactly
    np.testing.assert_array_equal(beh[~mask], b["old"][~mask])  # unmasked tokens untouched
    pi = np.exp(b["old"].astype(np.float64))
    for row in (1, 2):
        m = mask[row]
        log_pi_seq = np.log(pi[row, m]).sum()
        log_mu_seq = np.log(mu[row, m].astype(np.float64)).sum()
        log_q_seq = np.logaddexp(np.log1p(-alpha) + log_pi_seq, np.log(alpha) + log_mu_seq)
        np.testing.assert_allclose(r[row, m], r[row, m][0], rtol=1e-6)  # spread evenly
        np.testing.assert_allclose(np.log(r[row, m]).sum(), log_pi_seq - log_q_seq, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_everything_finite_at_the_limits(alpha, eps):
    b = make_batch()
    b["old"][1, 9] = -200.0  # exp underflows to 0 in float32
    mu = mu_of(b, eps)
    assert np.isfinite(np.asarray(mu)).all()
    adv = jnp.array([1.0, -1.0, 0.5])
    logprobs = jnp.asarray(b["old"]) + 0.1
    for beh in (
        behaviour_logprobs(b["old"], mu, b["attn"], alpha),
        sequence_behaviour_logprobs(b["old"], mu, b["is_probe"], b["loss_mask"], alpha),
    ):
        assert np.isfinite(np.asarray(beh)).all()
        assert np.isfinite(np.exp(b["old"] - np.asarray(beh))).all()
        loss, grad = jax.value_and_grad(lambda lp, beh=beh: policy_loss(lp, beh, adv, b["loss_mask"])[0])(logprobs)
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    if alpha == 1.0:
        # q = mu: originals (mu = 0) fall back to pi_old; probe prompt tokens get q = U
        beh = np.asarray(behaviour_logprobs(b["old"], mu, b["attn"], alpha))
        np.testing.assert_array_equal(beh[0], b["old"][0])
        np.testing.assert_allclose(np.exp(beh[b["prompt_mask"]]), b["conditionals"][b["prompt_mask"]], rtol=1e-6)


def test_behaviour_logprobs_jit():
    b = make_batch()
    mu = mu_of(b, 0.3)
    eager = behaviour_logprobs(b["old"], mu, b["attn"], 0.2)
    jitted = jax.jit(behaviour_logprobs)(b["old"], mu, b["attn"], 0.2)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
    # alpha traced and 0: still exactly old
    zero = jax.jit(behaviour_logprobs)(b["old"], mu, b["attn"], 0.0)
    np.testing.assert_array_equal(np.asarray(zero), b["old"])


# ------------------------------------------------------------------------------ (c) prefix factor


def _one_probe(response_start, probe_start, prompt_len=2, t=10, seed=2):
    old = np.random.default_rng(seed).uniform(-2.0, -0.2, (1, t)).astype(np.float32)
    prompt_mask = np.zeros((1, t), bool)
    prompt_mask[0, probe_start : probe_start + prompt_len] = True
    conditionals = np.where(prompt_mask, 0.5, 0.0).astype(np.float32)
    conditionals[0, probe_start] = 1.0
    return old, prompt_mask, conditionals


@pytest.mark.parametrize("eps, expected", [(0.25, 4.0), (0.8, 1.25), (1.0, 1.0), (0.0, 1e6)])
def test_prefix_factor(eps, expected):
    rs, ps = 3, 7  # j = 4, counted from response_start
    old, prompt_mask, cond = _one_probe(rs, ps)
    mu = np.asarray(probe_mu(old, [True], prompt_mask, cond, [rs], [ps], eps), np.float64)
    pi = np.exp(old.astype(np.float64))
    np.testing.assert_allclose(np.prod(mu[0, rs:ps] / pi[0, rs:ps]), expected, rtol=1e-4)
    np.testing.assert_allclose(mu[0, rs:ps] / pi[0, rs:ps], expected**0.25, rtol=1e-5)  # geometric spread
    pi32 = np.asarray(jnp.exp(old))
    np.testing.assert_array_equal(mu[0, :rs], pi32[0, :rs])  # chat prompt before the response untouched
    np.testing.assert_array_equal(mu[0, ps : ps + 2], [1.0, 0.5])
    np.testing.assert_array_equal(mu[0, ps + 2 :], pi32[0, ps + 2 :])


def test_prefix_factor_j_zero_is_noop():
    rs = ps = 3
    old, prompt_mask, cond = _one_probe(rs, ps)
    mu = np.asarray(probe_mu(old, [True], prompt_mask, cond, [rs], [ps], 0.1))
    np.testing.assert_array_equal(mu[~prompt_mask], np.asarray(jnp.exp(old))[~prompt_mask])
    np.testing.assert_array_equal(mu[prompt_mask], [1.0, 0.5])


# ------------------------------------------------------------------------------------------ (d) trie


POOL = [
    (7, 1, 2),
    (7, 1, 3, 9),
    (7, 1, 3, 9),  # a duplicate
    (7, 4, 5),
    (7, 4, 6, 6),
    (7, 8),
]


def test_trie_hand_values():
    cond = trie_conditionals(POOL)
    expected = [
        [1, 3 / 6, 1 / 3],
        [1, 3 / 6, 2 / 3, 1],
        [1, 3 / 6, 2 / 3, 1],
        [1, 2 / 6, 1 / 2],
        [1, 2 / 6, 1 / 2, 1],
        [1, 1 / 6],
    ]
    assert len(cond) == len(POOL)
    for got, want in zip(cond, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_trie_properties():
    pool = POOL + [(7, 1, 5, 5), (7, 3), (7, 3), (7, 4, 6, 2)]  # no prompt is a strict prefix of another
    cond = trie_conditionals(pool)
    children: dict[tuple, dict[int, float]] = {}
    for seq, c in zip(pool, cond):
        assert len(c) == len(seq) and c[0] == 1.0  # U = 1 at t = j
        for t in range(1, len(seq)):
            node = children.setdefault(tuple(seq[:t]), {})
            assert node.setdefault(seq[t], c[t]) == c[t]  # one value per trie edge
    for node, kids in children.items():
        assert math.isclose(sum(kids.values()), 1.0), node
    for seq, c in zip(pool, cond):
        assert math.isclose(math.prod(c), pool.count(seq) / len(pool)), seq


def test_trie_conditionals_drive_probe_mu():
    cond = trie_conditionals(POOL)
    seq, u = POOL[1], cond[1]
    t, ps = 12, 4
    old = np.full((1, t), -1.0, np.float32)
    prompt_mask = np.zeros((1, t), bool)
    prompt_mask[0, ps : ps + len(seq)] = True
    conditionals = np.zeros((1, t), np.float32)
    conditionals[0, ps : ps + len(seq)] = u
    mu = np.asarray(probe_mu(old, [True], prompt_mask, conditionals, [1], [ps], 0.5))
    assert mu[0, ps] == 1.0
    assert math.isclose(float(np.prod(mu[prompt_mask].astype(np.float64))), 2 / 6, rel_tol=1e-6)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_exploration_pool_from_texts():
    pool = ExplorationPool.from_texts(["<ab", "<ac", "<ac", "<d"], _CharTokenizer())
    assert len(pool) == 4
    assert pool.token_ids[0] == (60, 97, 98)
    assert pool.conditionals == ((1.0, 0.75, 1 / 3), (1.0, 0.75, 2 / 3), (1.0, 0.75, 2 / 3), (1.0, 0.25))
    with pytest.raises(ValueError, match="tokenise to nothing"):
        ExplorationPool.from_texts(["<a", ""], _CharTokenizer())


# ------------------------------------------------------------------------------- (e) probe budget


def ewm_adjust_false(xs, alpha):
    """pandas Series(xs).ewm(alpha=alpha, adjust=False).mean(), by hand."""
    out = [xs[0]]
    for x in xs[1:]:
        out.append((1 - alpha) * out[-1] + alpha * x)
    return out


def test_update_keep_ratio_is_ewma():
    accs = [0.5, 0.0, 1.0, 0.25, 0.1]
    rhos = [0.08]
    for acc in accs:
        rhos.append(update_keep_ratio(rhos[-1], acc))
    np.testing.assert_allclose(rhos, ewm_adjust_false([0.08] + accs, 0.1), rtol=1e-12)
    np.testing.assert_allclose(rhos[:5], [0.08, 0.122, 0.1098, 0.19882, 0.203938], rtol=1e-12)
    assert update_keep_ratio(0.08, 0.5, weight=0.5) == pytest.approx(0.29)
    # works on traced values too
    assert float(jax.jit(update_keep_ratio)(jnp.float32(0.08), jnp.float32(0.5))) == pytest.approx(0.122, rel=1e-6)


@pytest.mark.parametrize(
    "args, expected",
    [
        ((512, 5, 0.08), 200),  # int(204.8) = 204 -> 200
        ((512, 5, 0.122), 312),  # int(312.32) = 312, already a multiple of 8
        ((512, 5, 0.07), 176),  # int(179.2) = 179 -> 176
        ((512, 5, 0.0), 0),
        ((10, 5, 0.1), 0),  # 5 -> 0
        ((10, 5, 0.1, 1), 5),  # no rounding with multiple = 1
        ((4, 5, 0.5, 4), 8),  # 10 -> 8
        ((512, 5, 1.0), 2560),
    ],
)
def test_probe_keep_count(args, expected):
    got = probe_keep_count(*args)
    assert got == expected and isinstance(got, int)


def test_mean_prompt_logprob():
    old = np.array([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0], [-0.5, -8.0, -9.0, -13.0]], np.float32)
    mask = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], bool)
    np.testing.assert_allclose(np.asarray(mean_prompt_logprob(old, mask)), [-2.5, 0.0, -10.0], rtol=1e-6)


def test_select_probes():
    is_probe = np.array([False, True, True, False, True, True, False])
    scores = np.array([99.0, -1.0, -0.5, -99.0, -0.5, -2.0, 0.0], np.float32)  # originals' scores are ignored
    cases = {0: [], 1: [2], 2: [2, 4], 3: [2, 4, 1], 4: [1, 2, 4, 5], 10: [1, 2, 4, 5]}
    jitted = jax.jit(select_probes)
    for keep_num, probes in cases.items():
        expected = ~is_probe
        expected[np.array(probes, int)] = True
        np.testing.assert_array_equal(np.asarray(select_probes(is_probe, scores, keep_num)), expected)
        np.testing.assert_array_equal(np.asarray(jitted(is_probe, scores, jnp.int32(keep_num))), expected)


def test_select_probes_non_finite_scores():
    is_probe = np.array([False, False, True, True, True])
    scores = np.array([0.0, 0.0, -np.inf, -1.0, np.nan], np.float32)
    # -inf ranks after every finite score but is still a probe: with room for it, it is kept
    np.testing.assert_array_equal(np.asarray(select_probes(is_probe, scores, 2)), [True, True, True, True, False])
    np.testing.assert_array_equal(np.asarray(select_probes(is_probe, scores, 1)), [True, True, False, True, False])
    np.testing.assert_array_equal(np.asarray(select_probes(is_probe, scores, 3)), [True] * 5)


def test_select_probes_by_mean_prompt_logprob():
    b = make_batch()
    scores = mean_prompt_logprob(b["old"], b["prompt_mask"])
    better = 1 if float(scores[1]) > float(scores[2]) else 2
    keep = np.asarray(select_probes(b["is_probe"], scores, 1))
    np.testing.assert_array_equal(keep, [True, better == 1, better == 2])


def test_mixture_stats():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.2, 0.99])
    is_probe = np.array([False, False, False, True, True, True, True, True])
    kept = np.array([True, True, True, True, False, True, False, True])
    stats = mixture_stats(rewards, is_probe, kept)
    # kept probes {3, 5, 7}, kept originals {0, 1, 2}
    assert float(stats["alpha"]) == pytest.approx(3 / 6)
    assert float(stats["error_rate"]) == pytest.approx(2 / 3)
    assert float(stats["probe_accuracy"]) == pytest.approx(1 / 3)  # 0.99 is not correct

    none = mixture_stats(rewards[:3], is_probe[:3], kept[:3])
    assert float(none["alpha"]) == 0.0 and float(none["probe_accuracy"]) == 0.0
    assert float(none["error_rate"]) == pytest.approx(2 / 3)
    dropped = mixture_stats(rewards, is_probe, ~is_probe)  # all probes filtered out
    assert float(dropped["alpha"]) == 0.0 and float(dropped["probe_accuracy"]) == 0.0
    all_right = mixture_stats(np.ones(4), np.array([False, False, True, True]), np.ones(4, bool))
    assert float(all_right["error_rate"]) == 0.0 and float(all_right["probe_accuracy"]) == 1.0
    assert float(all_right["alpha"]) == 0.5
    jitted = jax.jit(mixture_stats)(rewards, is_probe, kept)
    for k in stats:
        assert float(jitted[k]) == pytest.approx(float(stats[k]))


# ------------------------------------------------------------- masks (docs/algorithm.md#invariants 5)


def test_gradient_only_on_loss_segments():
    b = make_batch()
    n, t = b["labels"].shape
    h, v = 4, 9
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(0, 1, (n, t, h)), jnp.float32)
    weight = jnp.asarray(rng.normal(0, 1, (v, h)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (n, t)))
    lp0, _ = chunked_logprobs(hidden, weight, targets)
    ref = lp0 + jnp.asarray(rng.normal(0, 0.3, (n, t)), jnp.float32)  # no k3 clamp: every KL token has a gradient
    mu = mu_of(b, 0.4)
    beh = behaviour_logprobs(b["old"], mu, b["attn"], 0.25)
    adv = jnp.array([1.0, -0.7, 0.4])

    def loss(hid, kl_coef=0.001, pg=True):
        lp, _ = chunked_logprobs(hid, weight, targets, chunk=5)
        kl_sum, count = masked_sum(k3_kl(lp, ref), b["loss_mask"])
        out = kl_coef * kl_sum / count
        return out + policy_loss(lp, beh, adv, b["loss_mask"])[0] if pg else out

    for kwargs in ({}, {"kl_coef": 1.0, "pg": False}):
        grad = np.abs(np.asarray(jax.jit(jax.grad(functools.partial(loss, **kwargs)))(hidden))).sum(-1)
        outside = ~np.isin(b["labels"], LOSS_SEGMENTS)
        assert outside[b["labels"] == PROMPT].all() and outside[b["labels"] == INFORMATION].all()
        assert outside[b["labels"] == FEEDBACK].all() and outside[b["labels"] == PAD].all()
        np.testing.assert_array_equal(grad[outside], 0.0)
        assert (grad[b["labels"] == PROBE_PROMPT] > 0).all()
        assert (grad[b["labels"] == MODEL] > 0).all()


def test_sequence_mode_prefix_factor_counts_information_tokens():
    """The eps^(-1/j) factor spreads over all j response tokens before the prompt, information included, so
    the sequence weight carries the full 1/eps even though information tokens are outside the loss."""
    import jax.numpy as jnp

    from rexrag_jax.rl.correction import probe_mu, sequence_behaviour_logprobs

    old = jnp.asarray([[0.0, -1.0, -2.0, -0.5, -1.5, -3.0, -2.5, -0.7]])
    valid = jnp.ones((1, 8), bool)
    loss_mask = jnp.asarray([[0, 1, 0, 0, 1, 1, 1, 1]], bool)  # tokens 2-3 are an information block
    prompt_mask = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 0]], bool)
    cond = jnp.asarray([[1, 1, 1, 1, 1, 1.0, 0.5, 1]])
    alpha, eps = 0.2, 0.25
    mu = probe_mu(old, jnp.asarray([True]), prompt_mask, cond, jnp.asarray([1]), jnp.asarray([5]), eps)
    response = valid & (jnp.arange(8)[None] >= 1)
    got = sequence_behaviour_logprobs(old, mu, jnp.asarray([True]), loss_mask, alpha, response)
    log_ratio = -np.log(eps) + (np.log(1.0) - (-3.0)) + (np.log(0.5) - (-2.5))  # mu(y) / pi(y)
    shift = np.log((1 - alpha) + alpha * np.exp(log_ratio)) / 5  # spread over the 5 loss tokens
    expected = np.where(np.asarray(loss_mask), np.asarray(old) + shift, np.asarray(old))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)

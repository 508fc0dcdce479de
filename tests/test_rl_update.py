"""The jitted pieces of a training step: packing, batched log-probs, the accumulated sharded update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rexrag_jax import protocol as P
from rexrag_jax.config import LossConfig, OptimConfig
from rexrag_jax.models import ModelConfig, forward, init_model
from rexrag_jax.rl.batch import pack_trajectories
from rexrag_jax.rl.objective import RLObjective
from rexrag_jax.rl.update import batch_logprobs, init_optimizer, learning_rate, update
from rexrag_jax.rollout.engine import Trajectory
from rexrag_jax.sharding import make_mesh

CFG = ModelConfig(
    architecture="qwen2",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
    attention_bias=True,
    remat="full",
)


def trajectories(rng, n=6):
    out = []
    for i in range(n):
        plen, rlen = int(rng.integers(3, 8)), int(rng.integers(4, 20))
        tokens = rng.integers(1, CFG.vocab_size, plen + rlen).tolist()
        segments = [P.PROMPT] * plen + [P.MODEL] * rlen
        if rlen > 12:  # an information block in the middle
            segments[plen + 5 : plen + 9] = [P.INFORMATION] * 4
        tr = Trajectory(i // 2, tokens, segments, [float("nan")] * len(tokens), plen)
        if i == n - 1:  # a probe: three exploratory-prompt tokens after the response's first 4
            tr.is_probe, tr.probe_start, tr.probe_conditionals = True, plen + 4, (1.0, 0.5, 0.25)
            tr.segments[plen + 4 : plen + 7] = [P.PROBE_PROMPT] * 3
        out.append(tr)
    return out


def test_pack_trajectories_masks_and_conditionals():
    trajs = trajectories(np.random.default_rng(0))
    b = pack_trajectories(trajs, length_multiple=16, row_multiple=4)
    assert b.tokens.shape == (8, 32) and b.num_rows == 6
    for i, tr in enumerate(trajs):
        n = len(tr.tokens)
        assert b.tokens[i, :n].tolist() == tr.tokens and not b.valid[i, n:].any() and b.valid[i, :n].all()
        assert b.loss_mask[i].tolist() == [s in (P.MODEL, P.PROBE_PROMPT) for s in tr.segments] + [False] * (32 - n)
        assert b.response_start[i] == tr.prompt_length and b.group_ids[i] == tr.prompt_index
    probe = len(trajs) - 1
    s = trajs[probe].probe_start
    assert b.is_probe.tolist() == [False] * 5 + [True, False, False]
    assert b.probe_start[probe] == s and b.conditionals[probe, s : s + 3].tolist() == [1.0, 0.5, 0.25]
    assert (b.conditionals[:probe] == 1).all() and b.prompt_mask[probe].sum() == 3
    assert not b.valid[6:].any() and (b.group_ids[6:] == -1).all()
    sub = b.select([5, 0], row_multiple=4)
    assert sub.num_rows == 2 and sub.tokens.shape == (4, 32) and sub.is_probe.tolist() == [True, False, False, False]
    assert (sub.conditionals[2:] == 1).all() and not sub.valid[2:].any()
    trajs[0].segments.pop()
    with pytest.raises(ValueError, match="trajectory 0: .* segment labels"):
        pack_trajectories(trajs)


def test_first_token_prompt_probability_keeps_the_product():
    trajs = trajectories(np.random.default_rng(0))
    trie = pack_trajectories(trajs, length_multiple=16)
    first = pack_trajectories(trajs, length_multiple=16, prompt_probability="first_token")
    probe, s = len(trajs) - 1, trajs[-1].probe_start
    assert first.conditionals[probe, s : s + 3].tolist() == [0.125, 1.0, 1.0]
    assert np.prod(first.conditionals[probe]) == np.prod(trie.conditionals[probe]) == 0.125
    with pytest.raises(ValueError, match="prompt_probability='uniform'"):
        pack_trajectories(trajs, prompt_probability="uniform")


def test_learning_rate_schedule():
    cfg = OptimConfig(learning_rate=1e-6, warmup_steps=286)
    assert float(learning_rate(cfg, 0)) == 0.0
    np.testing.assert_allclose(float(learning_rate(cfg, 143)), 0.5e-6, rtol=1e-6)
    assert float(learning_rate(cfg, 286)) == pytest.approx(1e-6) and float(learning_rate(cfg, 1000)) == pytest.approx(
        1e-6
    )
    assert float(learning_rate(OptimConfig(learning_rate=3e-4, warmup_steps=0), 0)) == pytest.approx(3e-4)


@pytest.fixture(scope="module")
def setup(devices):
    mesh = make_mesh((2, 2, 2))
    model = init_model(CFG, seed=0, mesh=mesh)
    batch = pack_trajectories(trajectories(np.random.default_rng(1), 8), length_multiple=16, row_multiple=4)
    return mesh, model, batch


def test_batch_logprobs_match_full_forward(setup):
    mesh, model, batch = setup
    graphdef, params = nnx.split(model)
    logp, ent = batch_logprobs(graphdef, params, batch, rows=4, mesh=mesh, chunk=8, temperature=0.7, with_entropy=True)
    full = jax.nn.log_softmax(np.asarray(forward(model, batch.tokens, batch.valid)) / 0.7, axis=-1)
    expected = np.take_along_axis(full[:, :-1], batch.tokens[:, 1:, None], -1)[..., 0]
    valid = batch.valid[:, 1:]
    np.testing.assert_allclose(logp[:, 1:][valid], expected[valid], atol=1e-5)
    entropy = -(np.exp(full) * full).sum(-1)[:, :-1]
    np.testing.assert_allclose(ent[:, 1:][valid], entropy[valid], atol=1e-4)
    assert (logp[:, 0] == 0).all()


def _arrays(batch, rng):
    n, t = batch.tokens.shape
    old = np.where(batch.valid, -rng.uniform(0.5, 6, (n, t)), 0).astype(np.float32)
    return batch.replace(
        old_logprobs=old,
        ref_logprobs=old + rng.normal(0, 0.1, (n, t)).astype(np.float32),
        advantages=rng.normal(0, 1, n).astype(np.float32),
    )


def _run(model, mesh, batch, micro_rows, steps=1, **kw):
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0)
    opt = init_optimizer(optim, params)
    metrics = []
    for _ in range(steps):
        params, opt, m = update(
            graphdef,
            params,
            opt,
            batch,
            micro_rows=micro_rows,
            alpha=kw.get("alpha", 0.2),
            error_rate=0.6,
            lr=1e-2,
            mesh=mesh,
            objective=RLObjective(LossConfig()),
            optim_cfg=optim,
            chunk=8,
        )
        metrics.append(jax.device_get(m))
    return params, opt, metrics


def test_gradient_accumulation_is_exact_and_sharding_kept(setup):
    mesh, model, batch = setup
    arrays = _arrays(batch, np.random.default_rng(2))
    one, opt1, m1 = _run(model, mesh, arrays, micro_rows=8)
    two, opt2, m2 = _run(model, mesh, arrays, micro_rows=4)
    # What accumulation must preserve is the gradient: after one step Adam's moments are (1-b1) g and
    # (1-b2) g^2 of the clipped gradient. The parameters are not compared: Adam's first step moves each by
    # ~lr * sign(g), so a gradient entry near 0 flips with reduction-order noise (2e-6 seen under load).
    for moment in ("mu", "nu"):
        a, b = (getattr(o[1], moment) for o in (opt1, opt2))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x), np.asarray(y)
            scale = max(float(np.abs(x).max()), 1e-30)
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale, err_msg=moment)
    for key in ("loss", "kl", "clip_fraction", "grad_norm", "tokens"):
        np.testing.assert_allclose(m1[0][key], m2[0][key], rtol=1e-5)
    assert m1[0]["tokens"] == batch.loss_mask.sum() and m1[0]["skipped"] == 0
    _, params = nnx.split(model)
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(two)):
        assert after.sharding == before.sharding  # the rollout engine keeps reading the same layout
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(two))]
    assert max(moved) > 1e-4


def test_padding_rows_and_unmasked_tokens_do_not_change_the_update(setup):
    mesh, model, batch = setup
    arrays = _arrays(batch, np.random.default_rng(3))
    outside = ~arrays.loss_mask  # behaviour / reference values outside the loss mask are unused
    noisy = arrays.replace(
        old_logprobs=np.where(outside, -50.0, arrays.old_logprobs).astype(np.float32),
        ref_logprobs=np.where(outside, 3.0, arrays.ref_logprobs).astype(np.float32),
    )
    a, _, ma = _run(model, mesh, arrays, micro_rows=4)
    b, _, mb = _run(model, mesh, noisy, micro_rows=4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7)


def test_non_finite_gradient_skips_the_update(setup):
    mesh, model, batch = setup
    arrays = _arrays(batch, np.random.default_rng(4))
    arrays.advantages[0] = np.nan
    graphdef, params = nnx.split(model)
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    after, opt, m = _run(model, mesh, arrays, micro_rows=4, steps=2)
    assert [x["skipped"] for x in m] == [1.0, 1.0] and not np.isfinite(m[0]["grad_norm"])
    for x, y in zip(before, jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(opt))

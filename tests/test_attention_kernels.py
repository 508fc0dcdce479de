"""Pallas splash attention (interpret mode on CPU) against the XLA path: the model's logits and gradients
on right-padded batches of odd and multi-tile lengths, over a (data, fsdp, tensor) mesh of 8 devices with
GQA (KV heads split with the query heads, or copied when the tensor axis does not divide them), and the
REX-RAG loss's gradients; the choice of implementation and its errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rexrag_jax.config import LossConfig
from rexrag_jax.models import init_model, load_hf
from rexrag_jax.models.attention import causal_self_attention, resolve_attention
from rexrag_jax.rl.batch import pack_trajectories
from rexrag_jax.rl.logprobs import sequence_logprobs
from rexrag_jax.rl.objective import RLObjective
from rexrag_jax.sharding import make_mesh
from test_rl_update import CFG as RL_CFG

CFG = RL_CFG.replace(remat="none")  # the tiny GQA model of the update tests (4 query heads, 2 KV heads)


def with_attention(model, attention):
    """The same parameters, another attention implementation (the config is static: a new program)."""
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, state)
    other.config = dataclasses.replace(model.config, attention=attention)
    return other


def padded(rng, lengths, width):
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (len(lengths), width)), jnp.int32)
    valid = jnp.asarray(np.arange(width)[None] < np.asarray(lengths)[:, None])
    return tokens, valid


def logits_and_grads(model, tokens, valid, loss_of_logprobs, chunk=64):
    """(logits, loss, gradients) in one program."""
    graphdef, params = nnx.split(model)

    def loss(p):
        m = nnx.merge(graphdef, p)
        logp, _ = sequence_logprobs(m, tokens, valid, chunk=chunk)
        return loss_of_logprobs(logp), m(tokens, valid)

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, value, grads


def assert_same(got, ref, grad_atol=5e-5):
    (logits, loss, grads), (logits_ref, loss_ref, grads_ref) = got, ref
    # every position, padding included: both paths give a query the valid keys up to it
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), rtol=1e-4, atol=1e-4)
    assert logits.sharding.spec == logits_ref.sharding.spec
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-5, abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=grad_atol)


def test_splash_logits_and_rexrag_loss_gradients_equal_xla(devices):
    """The whole policy loss (mixture behaviour, clipped surrogate, KL) through the splash kernel, on a
    (2, 2, 2) mesh whose tensor axis splits the 2 KV heads with the 4 query heads; rows of unequal length
    with a probe, an odd attention length."""
    from test_rl_update import _arrays, trajectories

    mesh = make_mesh((2, 2, 2))
    model = init_model(CFG.replace(attention="xla"), seed=0, mesh=mesh)
    rng = np.random.default_rng(1)
    batch = _arrays(pack_trajectories(trajectories(rng, 8), length_multiple=8, row_multiple=4), rng)
    scalars = {"alpha": 0.2, "error_rate": 0.6, "total_tokens": jnp.maximum(batch.loss_mask.sum(), 1)}
    lengths = batch.valid.sum(1)
    assert batch.is_probe.any() and len(set(lengths.tolist())) > 2 and batch.tokens.shape[1] % 2 == 0

    def rexrag_loss(logp):
        return RLObjective(LossConfig()).terms(logp, batch, scalars)[0]

    ref, got = (
        logits_and_grads(with_attention(model, a), batch.tokens, batch.valid, rexrag_loss, chunk=8)
        for a in ("xla", "splash")
    )
    assert_same(got, ref)


def test_splash_over_several_tiles_with_copied_kv_heads_equals_xla(devices):
    """Lengths over three of the kernel's 128-token tiles, on a (4, 1, 2) mesh: the one KV head does not
    split over 2 tensor shards, so each query head gets a copy."""
    mesh = make_mesh((4, 1, 2))
    model = init_model(CFG.replace(num_kv_heads=1, attention="xla"), seed=1, mesh=mesh)
    tokens, valid = padded(np.random.default_rng(0), [301, 64, 300, 7], 301)

    def nll(logp):
        return -jnp.sum(jnp.where(valid, logp, 0.0)) / jnp.sum(valid)

    ref, got = (logits_and_grads(with_attention(model, a), tokens, valid, nll) for a in ("xla", "splash"))
    assert_same(got, ref)


def test_splash_without_a_mesh_equals_xla():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 20, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(20)[None] < np.array([[20], [11]]))
    ref = causal_self_attention(q, k, v, valid, implementation="xla")
    got = jax.jit(lambda *a: causal_self_attention(*a, implementation="splash"))(q, k, v, valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_choice_of_implementation():
    f32, bf16 = jnp.zeros((1, 4, 2, 8), jnp.float32), jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    assert jax.default_backend() == "cpu"
    assert resolve_attention("auto", f32) == resolve_attention("auto", bf16) == "xla"  # splash: TPU only
    assert resolve_attention("splash", f32) == "splash" and resolve_attention("xla", bf16) == "xla"
    with pytest.raises(ValueError, match="attention='cudnn' needs a GPU.*backend 'cpu'"):
        resolve_attention("cudnn", bf16)
    with pytest.raises(ValueError, match="attention='flash'; expected one of"):
        resolve_attention("flash", f32)
    with pytest.raises(ValueError, match="attention='flash'; expected one of"):
        CFG.replace(attention="flash")


def test_load_hf_and_the_config_tree_set_the_implementation(tmp_path):
    from rexrag_jax.cli.components import model_config
    from rexrag_jax.config import as_config, default_config
    from rexrag_jax.models import save_hf

    save_hf(init_model(CFG, seed=0), CFG, str(tmp_path))
    model, config = load_hf(str(tmp_path), attention="splash")
    assert config.attention == model.config.attention == "splash"
    assert load_hf(str(tmp_path))[1].attention == "auto"  # the default; config.json has no such key
    cfg = as_config(default_config())
    assert cfg.model.attention == "auto"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tmp_path), attention="xla"))
    assert model_config(cfg, tokenizer=None).attention == "xla"

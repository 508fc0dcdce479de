"""Decoding kernels against transformers' PyTorch models: greedy parity, cache edits, stops, sampling,
sharding and compilation counts."""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_fixtures import build_reference
from rexrag_jax import protocol as P
from rexrag_jax.models import ModelConfig, forward, init_model, load_hf
from rexrag_jax.rollout import DecodeSession, RolloutConfig, RolloutEngine, build_stop_table
from rexrag_jax.rollout.generate import generate
from rexrag_jax.rollout.pages import PagesExhausted
from rexrag_jax.rollout.sampling import filter_logits, inverse_cdf_sample, row_keys, sample_tokens
from rexrag_jax.rollout.stops import tokenizer_bytes
from rexrag_jax.sharding import make_mesh
from rollout_fakes import FakeRetriever


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (torch model, our model on a (2, 2, 2) mesh)."""
    mesh = make_mesh((2, 2, 2))
    out = {}
    for name in ("qwen2p5_3b_ratio_tied", "llama3_scaled_untied"):
        ref = build_reference(name, vocab_size=384, seed=1)
        path = str(tmp_path_factory.mktemp(name))
        ref.save_pretrained(path)
        out[name] = (ref, load_hf(path, mesh=mesh)[0])
    return out


@contextlib.contextmanager
def count_compiles():
    counts = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _prompts(lengths, vocab=384, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _hf_logprobs(ref, ids):
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1).numpy()


@pytest.mark.parametrize("name", ["qwen2p5_3b_ratio_tied", "llama3_scaled_untied"])
def test_greedy_equals_transformers_generate(reference, name):
    ref, model = reference[name]
    prompts = _prompts((5, 13, 2, 9, 1))
    out = generate(model, prompts, max_new_tokens=24)
    for p, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
        hf = ref.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        assert tokens == hf
        lp = _hf_logprobs(ref, p + tokens)
        expected = [lp[len(p) - 1 + i, t] for i, t in enumerate(tokens)]
        np.testing.assert_allclose(logprobs, expected, atol=1e-4)


def test_eos_and_stop_sequences_end_rows(reference):
    ref, model = reference["qwen2p5_3b_ratio_tied"]
    prompts = _prompts((6, 10))
    free = generate(model, prompts, max_new_tokens=16).tokens
    # A two-token stop taken from row 0's output ends row 0 right after it; row 1 decodes its budget.
    stop = free[0][3:5]
    cut = generate(model, prompts, max_new_tokens=16, stop=[stop]).tokens
    first = next(i for i in range(1, len(free[0])) if free[0][i - 1 : i + 1] == stop)
    assert cut[0] == free[0][: first + 1]
    assert cut[1] == free[1] or any(cut[1][i - 1 : i + 1] == stop for i in range(1, len(cut[1])))
    # EOS from the model config (HF `generate` stops on it too and includes it).
    eos_model = model.__class__.__new__(model.__class__)
    eos_model.__dict__.update(model.__dict__)
    eos_model.config = ModelConfig(**{**model.config.__dict__, "eos_token_id": (free[1][2],)})
    ended = generate(eos_model, prompts, max_new_tokens=16).tokens
    assert ended[1] == free[1][: free[1].index(free[1][2]) + 1]


def test_stop_automata_match_across_token_boundaries(qwen25_tokenizer):
    tok = qwen25_tokenizer
    table = build_stop_table(151936, [[7, 7, 8]], ["</search>", "</answer>"], tokenizer_bytes(tok, 151936))

    def first_match(token_ids):
        state = np.zeros(table.num_stops, np.int64)
        for i, t in enumerate(token_ids):
            state = table.table[np.arange(table.num_stops), state, t].astype(np.int64)
            if (state == table.accept).any():
                return i, table.names[int(np.argmax(state == table.accept))]
        return None

    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    assert first_match(ids("x </search>\n\n")) == (len(ids("x </search>\n\n")) - 1, "</search>")  # inside `>\n\n`
    assert first_match(ids("<answer> a </answer>")) == (len(ids("<answer> a </answer>")) - 1, "</answer>")
    spelled = [tok.convert_tokens_to_ids(c) for c in "</search>"]  # one character per token
    assert first_match(spelled) == (8, "</search>")
    assert first_match(ids("</searc h> </answe r> <search>")) is None
    assert first_match([7, 7, 7, 8, 9]) == (3, "tokens:7,7,8")  # KMP: the overlap is not lost
    assert first_match(ids("<|im_end|>")) is None  # special tokens contribute no text


def test_append_after_host_edit_equals_one_prefill(reference):
    ref, model = reference["qwen2p5_3b_ratio_tied"]
    stops = build_stop_table(384)
    session = DecodeSession(model, 8, 1024, stops, chunk=4, prefill_chunk=16)  # attends a 256-slot window
    a, b = _prompts((9, 23), seed=5)
    session.context[3] = list(a)
    session.commit([3], [6], [True])
    while session.decode().get(3, None) is None or session.any_active():
        pass
    assert len(session.context[3]) == 9 + 6
    session.truncate(3, 12)  # roll back 3 sampled tokens, then append an observation (2 prefill chunks)
    session.context[3].extend(b)
    session.commit([3], [5], [True])
    got = []
    while session.any_active():
        got += session.decode()[3].logprobs
    context = session.context[3]
    lp = _hf_logprobs(ref, context)
    n = len(context)
    np.testing.assert_allclose(got, [lp[i - 1, context[i]] for i in range(n - 5, n)], atol=1e-4)
    ours = np.asarray(jax.nn.log_softmax(forward(model, np.asarray([context[:-1]]))[0], -1))
    np.testing.assert_allclose(ours[-5:], lp[n - 6 : n - 1], atol=1e-4)  # full-prefill logits, same positions
    fresh = generate(model, [context[: n - 5]], max_new_tokens=5)
    assert fresh.tokens[0] == context[n - 5 :]


def test_attention_windows_follow_the_longest_active_row(reference):
    ref, model = reference["llama3_scaled_untied"]
    session = DecodeSession(model, 8, 1024, build_stop_table(384), chunk=8, prefill_chunk=128)
    assert session.windows == (256, 512, 1024)
    short, long = _prompts((5, 300), seed=7)
    session.context[0], session.context[1] = list(short), list(long)
    session.commit([0, 1], [24, 8], [True, True])  # the long row ends first: then only 256 slots are read
    while session.any_active():
        session.decode()
    for row, prompt, n in ((0, short, 24), (1, long, 8)):
        hf = ref.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :]
        assert session.context[row][len(prompt) :] == hf.tolist()


def test_group_shares_pages_in_its_shard_and_rows_are_sharded(reference):
    """Row 1 (row 0's shard) shares the prompt's pages, one of them copied on write; rows
    5-7 (other shards: pages never cross devices) prefill the prompt again. All decode like `generate`."""
    ref, model = reference["llama3_scaled_untied"]
    session = DecodeSession(model, 8, 64, build_stop_table(384), chunk=8, page_size=4)
    assert session.pages.rows_per_shard == 2
    prompt = _prompts((11,))[0]
    session.context[0] = list(prompt)
    session.commit([0], [10], [True])
    session.copy_row([0] * 4, [1, 5, 6, 7])
    session.commit([1, 5, 6, 7], [10] * 4, [True] * 4)
    assert session.prefilled_tokens == 10 * 4
    spec = session.state.cache.k.sharding.spec
    assert spec[0] == ("data", "fsdp") and spec[1] == "tensor"
    shared = session.pages.tables[0].table[:2, :2]
    assert (shared[0] == shared[1]).all()  # 8 prompt tokens in 2 full pages, one copy for both rows
    while session.any_active():
        session.decode()
    assert session.page_copies == 1  # the shared page of tokens 8-9: copied by its first writer, kept by the other
    assert session.context[0] == session.context[1] == session.context[5] == session.context[6] == session.context[7]
    assert session.context[0][11:] == generate(model, [prompt], max_new_tokens=10).tokens[0]
    session.pages.check()


def test_rows_wait_for_pages_and_resume_uncorrupted(reference):
    """Two rows of one shard share 6 pages of 4 tokens: the second pauses until the first finishes and gives
    its pages back, then decodes exactly what it would have; a commit without pages changes nothing.
    (Rows take pages greedily, so a too small pool can stall: the engine then raises, see below.)"""
    ref, model = reference["llama3_scaled_untied"]
    session = DecodeSession(model, 8, 64, build_stop_table(384), chunk=4, page_size=4, num_pages=4 * 6)
    prompts = _prompts((11, 9))
    for r, prompt in enumerate(prompts):
        session.context[r] = list(prompt)
    assert session.commit([0, 1], [4, 10], [True, True]) == []  # 10 + 8 cached tokens: 3 + 2 pages
    session.decode()  # row 0 takes a 4th page and ends its 4 tokens; row 1 finds no 3rd page
    assert session.waiting == [1] and session.cached[1] == 8 and not session.active[0]
    session.release(0)
    while session.any_active():
        session.decode()
    want = generate(model, prompts, max_new_tokens=10).tokens
    assert session.context[1][9:] == want[1] and session.context[0][11:] == want[0][:4]
    session.pages.check()

    small = DecodeSession(model, 8, 64, build_stop_table(384), chunk=4, page_size=4, num_pages=4 * 2)
    small.context[0] = list(prompts[0])
    assert small.commit([0], [10], [True]) == [0]  # 10 cached tokens need 3 pages
    assert small.cached[0] == 0 and not small.active[0] and small.pages.length(0) == 0


def test_engine_out_of_pages_is_a_clear_error(tiny_qwen, qwen25_tokenizer):
    """Pages too few for even the prompts: nothing can ever free one, so the rollout stops and says why."""
    tok = qwen25_tokenizer
    cfg = RolloutConfig(group_size=2, probe_prob=0.0, max_context_length=64, kv_page_size=4, kv_pages=4)
    engine = RolloutEngine(tiny_qwen, tok, FakeRetriever(), cfg)
    prompt = tok("A question that takes more than four tokens to ask?", add_special_tokens=False)["input_ids"]
    with pytest.raises(PagesExhausted, match=r"rollout.kv_pages=4 gives 1 pages of 4 tokens per row shard"):
        engine.rollout(nnx.state(tiny_qwen), [prompt], seed=0)


def test_filter_logits_top_p_top_k():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4))
    out = filter_logits(logits, jnp.asarray([1.0, 0.7, 0.85, 1.0]), jnp.asarray([0, 0, 0, 2]))
    kept = np.isfinite(np.asarray(out))
    np.testing.assert_array_equal(kept, [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])


def test_sampling_per_row_settings():
    logits = jnp.tile(jnp.log(jnp.asarray([0.6, 0.3, 0.1, 1e-9])), (4, 1))
    temperature = jnp.asarray([0.0, 1.0, 1.0, 1.0])
    top_k = jnp.asarray([0, 1, 0, 0])
    top_p = jnp.asarray([1.0, 1.0, 0.5, 1.0])
    draws = []
    step = jax.jit(sample_tokens)
    keys = row_keys(0, 4)
    for i in range(4000):
        tokens, logprobs = step(
            logits, jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys), temperature, top_p, top_k
        )
        draws.append(np.asarray(tokens))
    draws = np.stack(draws)
    assert (draws[:, 0] == 0).all() and (draws[:, 1] == 0).all() and (draws[:, 2] == 0).all()
    freq = np.bincount(draws[:, 3], minlength=4) / len(draws)
    np.testing.assert_allclose(freq[:3], [0.6, 0.3, 0.1], atol=0.03)
    # logprobs are under the temperature-scaled, unfiltered distribution (T = 1 here, 1 for greedy)
    np.testing.assert_allclose(logprobs, np.asarray(jax.nn.log_softmax(logits)[jnp.arange(4), tokens]), atol=1e-6)


@pytest.mark.parametrize("vocab", [2048, 2021])  # 2048: free block reshape; 2021: padded tail block
def test_two_level_inverse_cdf_sampling_follows_the_distribution(vocab):
    probs = np.zeros(vocab)
    probs[[3, 4, 1000, 1023, 1024, vocab - 1]] = [0.1, 0.2, 0.05, 0.15, 0.3, 0.2]  # mass on block edges
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(8, 0)
    draw = jax.jit(lambda i: inverse_cdf_sample(jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys(2, 8)), logits))
    tokens = np.concatenate([np.asarray(draw(i)) for i in range(2500)])
    freq = np.bincount(tokens, minlength=vocab) / len(tokens)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))  # zero-probability tokens never drawn
    np.testing.assert_allclose(freq, probs, atol=0.01)


def test_no_recompilation_for_new_prompts_and_sampling_knobs(reference):
    _, model = reference["qwen2p5_3b_ratio_tied"]
    generate(model, _prompts((5, 7, 3)), max_new_tokens=12, temperature=0.0)
    with count_compiles() as compiles:
        generate(model, _prompts((6, 4, 7), seed=9), max_new_tokens=12, temperature=0.7, top_p=0.9, seed=4)
        generate(model, _prompts((2, 8, 5), seed=3), max_new_tokens=12, temperature=1.3, seed=5)
    assert compiles == []


@pytest.fixture(scope="module")
def tiny_qwen():
    config = ModelConfig(
        architecture="qwen2",
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=True,
        tie_word_embeddings=True,
        eos_token_id=(151645,),
    )
    return init_model(config, seed=0, mesh=make_mesh((2, 2, 2)))


def test_engine_on_a_real_model_keeps_cache_and_logprobs_consistent(tiny_qwen, qwen25_tokenizer):
    """Sampled logprobs of every kept model token, after feedback appends and re-encoding across turns,
    equal the log-softmax of one full forward pass over the final trajectory."""
    tok = qwen25_tokenizer
    cfg = RolloutConfig(
        group_size=2,
        max_turns=2,
        max_response_length=12,
        probe_prob=0.0,
        decode_chunk=8,
        prefill_chunk=64,
        max_context_length=256,
        precompile=False,
    )
    engine = RolloutEngine(tiny_qwen, tok, FakeRetriever(), cfg)
    prompts = [tok(q, add_special_tokens=False)["input_ids"] for q in ("Where is the mill?", "Who is Ada?")]
    trajs, stats = engine.rollout(nnx.state(tiny_qwen), prompts, seed=0)
    assert len(trajs) == 4 and stats.decode_tokens > 0
    checked = 0
    for traj in trajs:
        assert len(traj.tokens) == len(traj.segments) == len(traj.logprobs) <= 256
        assert traj.turns == 3 and traj.finish == "final_turn"  # a random model never emits an action
        assert traj.segments.count(P.FEEDBACK) > 0
        lp = np.asarray(jax.nn.log_softmax(forward(tiny_qwen, np.asarray([traj.tokens]))[0], -1))
        for i, (t, s, got) in enumerate(zip(traj.tokens, traj.segments, traj.logprobs)):
            if not math.isnan(got):
                assert s == P.MODEL
                assert abs(got - lp[i - 1, t]) < 1e-4
                checked += 1
    assert checked > 40
    with count_compiles() as compiles:
        engine.rollout(nnx.state(tiny_qwen), prompts, seed=1)
    assert compiles == []


def test_sampled_rollouts_do_not_depend_on_chunking_timing_or_pages(tiny_qwen, qwen25_tokenizer):
    """Keys advance only when a row samples: the same seed gives the same trajectories whatever the
    decode chunk (and so whatever the interleaving of rows) and the KV layout (a contiguous cache, or
    16-token pages too few for every row, so that rows wait for others to free theirs); another seed
    gives others."""
    tok = qwen25_tokenizer
    questions = ("Where is the mill?", "Who is Ada Lovelace?", "Name a river.")
    prompts = [tok(q, add_special_tokens=False)["input_ids"] for q in questions]

    engines = {}  # one per chunk size: an engine keeps no state between calls, only its compiled shapes

    def run(chunk, seed, kv_pages=0):  # 3 prompts x G=4 (3 rows per row shard): 9 rows start from a copy
        if (chunk, kv_pages) not in engines:
            cfg = RolloutConfig(
                group_size=4,
                max_turns=1,
                max_response_length=10,
                probe_prob=0.0,
                decode_chunk=chunk,
                max_context_length=128,
                prefill_chunk=16,  # the prompts are shorter: one token bucket to compile
                precompile=False,
                kv_page_size=8 if kv_pages else 0,
                kv_pages=kv_pages,
            )
            engines[chunk, kv_pages] = RolloutEngine(tiny_qwen, tok, FakeRetriever(), cfg)
        trajs, stats = engines[chunk, kv_pages].rollout(nnx.state(tiny_qwen), prompts, seed=seed)
        return [t.tokens for t in trajs], stats.page_waits

    contiguous, waits = run(4, seed=3)
    assert waits == 0
    paged, waits = run(16, seed=3, kv_pages=4 * 12)  # per shard 12 pages of 8 tokens for 3 rows of ~35
    assert waits > 0, "expected rows to wait for pages"
    assert paged == contiguous != run(4, seed=4)[0]


def test_one_device_mesh_state_has_a_buffer_per_field():
    """On a one-device mesh `device_put` would alias the reused zeros (donating the state then fails)."""
    from rexrag_jax.rollout import kernels

    cfg = ModelConfig("qwen2", 64, 32, 64, 1, 2, 1, 16)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = init_model(cfg, mesh=mesh)
    state = kernels.init_state(model, 4, 32, 2, mesh=mesh)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(pointers)) == len(pointers)
    session = DecodeSession(model, 4, 32, build_stop_table(64, [[1]], (), [b""] * 64), chunk=4, prefill_chunk=8)
    session.context[0] = [3, 4, 5]
    session.commit([0], [4], [True])
    session.set_sampling(0.0)
    assert len(session.decode()[0].tokens) == 4


def test_decode_and_prefill_have_no_cross_row_collectives():
    """Sharded rows read and write their own KV pages and outputs: no collective of the compiled decode loop
    or prefill comes from a gather or scatter (indexed by global row or page ids, the cache accesses
    gathered indices and updates, or the whole pool, across the row shards; entered in different orders by
    different devices, such collectives deadlocked XLA:CPU, and on accelerators they are traffic every
    layer of every step). What remains are the weights' FSDP gathers, the tensor-parallel reductions and
    the vocab-sharded sampling's."""
    import re

    from rexrag_jax.rollout import kernels

    cfg = ModelConfig("qwen2", 256, 32, 64, 2, 4, 2, 8)
    model = init_model(cfg, mesh=make_mesh((2, 2, 2)))
    stops = build_stop_table(256, [[1]], (), [b""] * 256)
    pages = dict(page_size=8, pages_per_shard=9)
    state = kernels.init_state(model, 16, 64, stops.num_stops, chunk=4, mesh=model.mesh, **pages)
    graphdef, params = nnx.split(model)
    table, accept = np.asarray(stops.table), np.asarray(stops.accept)
    allow = np.ones(16, bool)
    decode = kernels._decode_chunk.lower(graphdef, params, state, table, accept, allow, 64).compile().as_text()
    rows, tokens = np.zeros((4, 2), np.int32), np.zeros((8, 16), np.int32)
    flat = np.zeros(8, np.int32)
    args = (rows, tokens, flat, flat, flat, flat, flat.astype(bool), 64)
    prefill = kernels._write_rows.lower(graphdef, params, state, *args).compile().as_text()
    kinds = ("all-gather", "all-reduce", "collective-permute", "all-to-all")
    for hlo in (decode, prefill):
        collectives = re.findall(r"= \S+ (all-gather|all-reduce|collective-permute|all-to-all)(?:-start)?\(.*", hlo)
        assert collectives, "expected the sharded weights' collectives"
        lines = [line for line in hlo.splitlines() if any(k in line for k in kinds)]
        # (sampling's take_along_axis over the vocab-sharded logits reduces over the tensor axis: legitimate)
        from_indexing = [
            line for line in lines if ("/scatter" in line or "/gather" in line) and "take_along_axis" not in line
        ]
        assert not from_indexing, from_indexing[:2]

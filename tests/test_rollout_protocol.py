"""The search agent's host loop with a scripted policy and the real Qwen2.5 tokenizer
(docs/algorithm.md#rollout-protocol, #mixed-sampling, #invariants 9)."""

import math
import threading
import time

import numpy as np
import pytest

from rexrag_jax import protocol as P
from rexrag_jax.models import ModelConfig
from rexrag_jax.rollout import ExplorationPool, RolloutConfig, RolloutStats
from rexrag_jax.rollout.pool import read_pool_file, trie_conditionals
from rollout_fakes import EOS, FakeRetriever, ScriptedEngine

SEARCH = "<think> I need facts. </think>\n<search> river of the mill </search>"
ANSWER = "<think> Found it. </think>\n<answer> Ostra </answer>"
POOL_FILE = "configs/exploration_prompts.txt"


class _Model:
    """Just what the engine reads from a Decoder before its session is replaced."""

    def __init__(self):
        self.config = ModelConfig(
            architecture="qwen2",
            vocab_size=151936,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=8,
            eos_token_id=(151645,),
        )
        self.mesh = None


@pytest.fixture(scope="module")
def pool(qwen25_tokenizer):
    return ExplorationPool.from_file(POOL_FILE, qwen25_tokenizer)


def _engine(tok, policy, pool=None, retriever=None, **cfg):
    cfg.setdefault("probe_prob", 0.0)
    cfg.setdefault("group_size", 1)
    return ScriptedEngine(_Model(), tok, retriever or FakeRetriever(), RolloutConfig(**cfg), pool=pool, policy=policy)


def _prompt(tok, question="Which river runs past the mill?"):
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def _segments_text(tok, traj, label):
    """Decoded text of each maximal run of `label` tokens."""
    runs, cur = [], []
    for t, s in zip(traj.tokens, traj.segments):
        if s == label:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_search_information_answer(qwen25_tokenizer):
    tok = qwen25_tokenizer
    retriever = FakeRetriever()
    engine = _engine(tok, lambda r, ctx: ANSWER if "<information>" in ctx else SEARCH, retriever=retriever)
    prompt = _prompt(tok)
    [traj], stats = engine.rollout(None, [prompt])
    assert retriever.calls == [(["river of the mill"], 3)]
    assert traj.finish == "answer" and traj.answer == "Ostra" and traj.turns == 2 and traj.searches == 1
    assert traj.tokens[: len(prompt)] == prompt and set(traj.segments[: len(prompt)]) == {P.PROMPT}
    assert _segments_text(tok, traj, P.MODEL) == [SEARCH, ANSWER]
    hits = retriever.search(["river of the mill"], 3)[0][:3]
    assert _segments_text(tok, traj, P.INFORMATION) == [P.information_block(hits)]
    assert 'Doc 1(Title: "Title 0 river of the mill") body 0\nDoc 2' in tok.decode(traj.tokens)
    assert "Doc 4" not in tok.decode(traj.tokens)  # top-k 3
    assert len(traj.tokens) == len(traj.segments) == len(traj.logprobs)
    np.testing.assert_array_equal(traj.loss_mask, np.asarray(traj.segments) == P.MODEL)
    assert stats.searches == 1 and stats.probes == 0
    assert traj.turn_starts == [len(prompt), len(traj.tokens) - len(tok(ANSWER, add_special_tokens=False)["input_ids"])]


def test_cut_after_first_action_and_reencode(qwen25_tokenizer):
    """`>\\n\\n` is one Qwen token: the stop fires inside it and the cut drops the trailing newlines."""
    tok = qwen25_tokenizer
    turn = "<search> a </search>\n\n<search> b </search>"
    engine = _engine(tok, lambda r, ctx: ANSWER if "<information>" in ctx else turn)
    [traj], _ = engine.rollout(None, [_prompt(tok)])
    assert _segments_text(tok, traj, P.MODEL)[0] == "<search> a </search>"
    last = traj.segments.index(P.INFORMATION) - 1
    assert math.isnan(traj.logprobs[last]) and not math.isnan(traj.logprobs[last - 1])  # only `>` re-encoded


def test_invalid_action_feedback_is_masked(qwen25_tokenizer):
    tok = qwen25_tokenizer
    engine = _engine(tok, lambda r, ctx: ANSWER if "invalid" in ctx else "I will just guess." + EOS)
    [traj], _ = engine.rollout(None, [_prompt(tok)])
    assert _segments_text(tok, traj, P.FEEDBACK) == [P.INVALID_ACTION_FEEDBACK]
    assert _segments_text(tok, traj, P.MODEL) == ["I will just guess.", ANSWER]  # EOS dropped by the re-encode
    assert traj.finish == "answer" and traj.turns == 2
    assert not traj.loss_mask[np.asarray(traj.segments) == P.FEEDBACK].any()


def test_max_turns_then_final_turn_without_retrieval(qwen25_tokenizer):
    tok = qwen25_tokenizer
    retriever = FakeRetriever()
    engine = _engine(tok, lambda r, ctx: SEARCH, retriever=retriever, max_turns=3)
    [traj], _ = engine.rollout(None, [_prompt(tok)])
    assert len(retriever.calls) == 3 and traj.searches == 3
    assert traj.turns == 4 and traj.finish == "final_turn"
    assert _segments_text(tok, traj, P.MODEL) == [SEARCH] * 4
    assert len(_segments_text(tok, traj, P.INFORMATION)) == 3  # nothing appended after the final turn


def test_response_observation_and_context_caps(qwen25_tokenizer):
    tok = qwen25_tokenizer
    chatter = " ".join(["word"] * 80)
    engine = _engine(tok, lambda r, ctx: chatter, max_response_length=20, max_turns=1)
    [traj], _ = engine.rollout(None, [_prompt(tok)])
    runs = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in _segments_text(tok, traj, P.MODEL)]
    assert runs == [20, 20] and traj.finish == "final_turn"

    retriever = FakeRetriever(text=" ".join(["long"] * 700))
    engine = _engine(
        tok, lambda r, ctx: ANSWER if "<information>" in ctx else SEARCH, retriever=retriever, max_obs_length=50
    )
    [traj], _ = engine.rollout(None, [_prompt(tok)])
    assert (np.asarray(traj.segments) == P.INFORMATION).sum() == 50
    assert P.INFO_CLOSE not in _segments_text(tok, traj, P.INFORMATION)[0]

    prompt = _prompt(tok)
    engine = _engine(tok, lambda r, ctx: chatter, max_context_length=len(prompt) + 60, max_response_length=25)
    [traj], _ = engine.rollout(None, [prompt])
    assert traj.finish == "context" and len(traj.tokens) == len(prompt) + 60

    long_prompt = list(range(1000, 1100))
    engine = _engine(tok, lambda r, ctx: ANSWER, max_start_length=40)
    [traj], _ = engine.rollout(None, [long_prompt])
    assert traj.prompt_length == 40 and traj.tokens[:40] == long_prompt[-40:]


def test_groups_share_one_prefill(qwen25_tokenizer):
    tok = qwen25_tokenizer
    engine = _engine(tok, lambda r, ctx: ANSWER, group_size=3)
    prompts = [_prompt(tok, "Who built the mill?"), _prompt(tok, "Where is the lake?")]
    trajs, stats = engine.rollout(None, prompts)
    assert [t.prompt_index for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert all(t.tokens[: t.prompt_length] == prompts[t.prompt_index] for t in trajs)
    assert engine.session.commits[0] == [0, 3]  # one prefill per prompt, then the copies
    assert stats.prefill_tokens == sum(len(p) - 1 for p in prompts)


def _probe_policy(r, ctx):
    if "<information>" in ctx:
        return "<think> Second look. </think>\n<answer> Ostra </answer>"
    if ctx.count("<think>") >= 2:  # the exploratory prompt opened a thought: continue it and search
        return " I should search again. </think>\n<search> mill river name </search>"
    return "<think> I recall it. </think>\n<answer> Keel </answer>"


def test_probe_construction(qwen25_tokenizer, pool):
    tok = qwen25_tokenizer
    engine = _engine(tok, _probe_policy, pool=pool, probe_prob=1.0, group_size=2)
    prompt = _prompt(tok)
    trajs, stats = engine.rollout(None, [prompt], reward_fn=lambda i, a: float(a == "Ostra"), seed=3)
    originals, probes = trajs[:2], trajs[2:]
    assert stats.probes == 2 and len(probes) == 2
    for k, probe in enumerate(probes):
        src = originals[probe.source]
        assert probe.source == k and probe.is_probe and not src.is_probe and probe.prompt_index == src.prompt_index
        assert src.answer == "Keel" and src.finish == "answer"
        kept = tok("<think> I recall it. </think>\n", add_special_tokens=False)["input_ids"]
        pool_ids = list(pool.token_ids[probe.probe_prompt_id])
        j = probe.probe_start
        assert probe.tokens[:j] == prompt + kept and probe.tokens[j : j + len(pool_ids)] == pool_ids
        assert probe.segments[j : j + len(pool_ids)] == [P.PROBE_PROMPT] * len(pool_ids)
        assert probe.segments[len(prompt) : j] == [P.MODEL] * len(kept)
        assert probe.probe_conditionals == pool.conditionals[probe.probe_prompt_id]
        assert probe.loss_mask[j : j + len(pool_ids)].all()
        assert probe.answer == "Ostra" and probe.searches == 1 and probe.turns == 3
        assert probe.turn_starts[0] == len(prompt) and probe.turn_starts[1] == j + len(pool_ids)


def test_probes_only_in_search_turns_and_never_from_probes(qwen25_tokenizer, pool):
    tok = qwen25_tokenizer
    wrong = "<answer> Keel </answer>"
    # The probe also answers wrongly: it must not spawn a probe of its own.
    engine = _engine(tok, lambda r, ctx: wrong, pool=pool, probe_prob=1.0, max_turns=2)
    settings = set(vars(engine))
    trajs, _ = engine.rollout(None, [_prompt(tok)], reward_fn=lambda i, a: 0.0)
    assert [t.is_probe for t in trajs] == [False, True]
    # The probe reused its source's cache row, yet each trajectory owns its tokens, and the call left
    # nothing of itself on the engine (only what the scripted fake records).
    assert trajs[0].tokens is not trajs[1].tokens and trajs[0].answer == "Keel"
    assert "<answer> Keel </answer>" in tok.decode(trajs[0].tokens[trajs[0].prompt_length :])  # kept after the probe
    assert set(vars(engine)) - settings <= {"session", "params_seen"}
    # An answer in the final (no-search) turn is never probed.
    engine = _engine(
        tok,
        lambda r, ctx: wrong if ctx.count("invalid") == 2 else "no tags" + EOS,
        pool=pool,
        probe_prob=1.0,
        max_turns=2,
    )
    trajs, _ = engine.rollout(None, [_prompt(tok)], reward_fn=lambda i, a: 0.0)
    assert len(trajs) == 1 and trajs[0].turns == 3 and trajs[0].answer == "Keel"
    # Correct answers are never probed, and probe_prob 0 never probes.
    engine = _engine(tok, lambda r, ctx: wrong, pool=pool, probe_prob=1.0)
    assert len(engine.rollout(None, [_prompt(tok)], reward_fn=lambda i, a: 1.0)[0]) == 1
    engine = _engine(tok, lambda r, ctx: wrong, pool=pool, probe_prob=0.0)
    assert len(engine.rollout(None, [_prompt(tok)], reward_fn=lambda i, a: 0.0)[0]) == 1


def test_probe_probability(qwen25_tokenizer, pool):
    tok = qwen25_tokenizer
    engine = _engine(tok, lambda r, ctx: "<answer> Keel </answer>", pool=pool, probe_prob=20 / 101, group_size=50)
    trajs, _ = engine.rollout(None, [_prompt(tok)] * 4, reward_fn=lambda i, a: 0.0, seed=0)
    share = sum(t.is_probe for t in trajs) / 200
    assert abs(share - 20 / 101) < 4 * math.sqrt(0.2 * 0.8 / 200)


def test_pool_file_and_trie(qwen25_tokenizer, pool, tmp_path):
    texts = read_pool_file(POOL_FILE)
    assert len(texts) == 30 and len(set(texts)) == 30
    assert all(t.startswith("<think> ") and "</think>" not in t for t in texts)
    lengths = [len(ids) for ids in pool.token_ids]
    assert min(lengths) >= 10
    for cond in pool.conditionals:  # ∏U = 1/30 over each prompt, U = 1 at the first token
        assert cond[0] == 1.0 and math.isclose(math.prod(cond), 1 / 30)
    # Conditionals at every trie node sum to 1 over the children.
    seqs = [(1, 2, 3), (1, 2, 4), (1, 5), (6,)]
    conds = trie_conditionals(seqs)
    assert conds[0] == [1.0, 2 / 3, 1 / 2] and conds[2] == [1.0, 1 / 3] and conds[3] == [1.0]
    bad = tmp_path / "pool.txt"
    bad.write_text("# only comments\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_pool_file(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_pool_file(str(tmp_path / "missing.txt"))


def test_protocol_text_helpers():
    assert P.cut_response("x <answer> a </answer> y <search> b </search>") == "x <answer> a </answer>"
    assert P.cut_response("no action") == "no action"
    assert P.parse_action("<search>\n q </search>").content == "q"
    assert P.parse_action("<answer> a </search>").kind is None
    assert P.remove_answer_block("<think> t </think>\n<answer> a </answer>") == "<think> t </think>\n"
    with pytest.raises(ValueError, match="no answer block"):
        P.remove_answer_block("<search> q </search>")
    hits = [{"document": {"id": "1", "contents": '"Mill"\nOld mill.\nSecond line.'}}, {"contents": '"Lake"\nCold.'}]
    assert P.format_passages(hits) == 'Doc 1(Title: "Mill") Old mill.\nSecond line.\nDoc 2(Title: "Lake") Cold.\n'
    assert P.information_block(hits).startswith("\n\n<information>Doc 1") and P.information_block(hits).endswith(
        "Cold.</information>\n\n"
    )


class _SlowRetriever(FakeRetriever):
    def __init__(self, delay):
        super().__init__()
        self.delay, self.returned_at = delay, None

    def search(self, queries, k):
        time.sleep(self.delay)
        self.returned_at = time.perf_counter()
        return super().search(queries, k)


def test_rows_keep_decoding_while_others_wait_for_retrieval(qwen25_tokenizer):
    tok = qwen25_tokenizer
    calls = {0: [], 1: []}
    lock = threading.Lock()

    def policy(r, ctx):
        with lock:
            calls[r].append(time.perf_counter())
        if r == 0:
            return ANSWER if "<information>" in ctx else SEARCH
        return ANSWER if ctx.count("invalid") >= 2 else "no tags" + EOS

    retriever = _SlowRetriever(delay=1.0)
    engine = _engine(tok, policy, retriever=retriever, group_size=2)
    trajs, stats = engine.rollout(None, [_prompt(tok)])
    assert len(calls[1]) == 3 and all(t < retriever.returned_at for t in calls[1])  # row 1 finished meanwhile
    assert calls[0][1] > retriever.returned_at and trajs[0].answer == "Ostra" and trajs[1].answer == "Ostra"
    assert 0.5 < stats.time_retrieval_wait <= stats.time_retrieval + 0.1


def test_retriever_and_setup_errors_surface(qwen25_tokenizer, pool):
    class Broken:
        def search(self, queries, k):
            raise ConnectionError("retrieval server at http://127.0.0.1:1 refused the connection")

    engine = _engine(qwen25_tokenizer, lambda r, ctx: SEARCH, retriever=Broken())
    with pytest.raises(ConnectionError, match="refused"):
        engine.rollout(None, [_prompt(qwen25_tokenizer)])
    with pytest.raises(ValueError, match="exploration prompt pool"):
        _engine(qwen25_tokenizer, lambda r, ctx: SEARCH, pool=None, probe_prob=0.5)
    with pytest.raises(ValueError, match="reward_fn"):
        _engine(qwen25_tokenizer, lambda r, ctx: SEARCH, pool=pool, probe_prob=0.5).rollout(
            None, [_prompt(qwen25_tokenizer)]
        )


@pytest.mark.parametrize("bad", [dict(group_size=0), dict(max_turns=-1), dict(probe_prob=1.5), dict(top_p=0.0)])
def test_rollout_config_is_validated_by_the_engine(qwen25_tokenizer, bad):
    ((key, value),) = bad.items()
    with pytest.raises(ValueError, match=rf"^--config.rollout.{key}={value!r}: must be"):
        _engine(qwen25_tokenizer, lambda r, ctx: ANSWER, pool=None, **{"probe_prob": 0.0, **bad})


def test_empty_batches_and_bad_prompts(qwen25_tokenizer):
    engine = _engine(qwen25_tokenizer, lambda r, ctx: ANSWER)
    assert engine.rollout(None, []) == ([], RolloutStats())
    with pytest.raises(ValueError, match=r"rollout: prompt 1 has token ids outside \[0, 151936\): \[151936\]"):
        engine.rollout(None, [[5, 6], [7, 151936]])
    with pytest.raises(ValueError, match="rollout: prompt 0 is empty"):
        engine.rollout(None, [[]])

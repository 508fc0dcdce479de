"""The embedded default's synthetic world, tokenizer and demonstrations."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from rexrag_jax import protocol as P
from rexrag_jax.data.readers import read_flashrag_jsonl
from rexrag_jax.embedded import demonstrations as D
from rexrag_jax.embedded import world as W
from rexrag_jax.embedded.vocab import TAGS, load_tokenizer_dir, train_tokenizer
from rexrag_jax.retrieval.corpus import read_corpus
from rexrag_jax.retrieval.types import Hit
from rexrag_jax.rollout.pool import read_pool_file

SIZES = W.WorldSizes(people=20, towns=6, countries=4, companies=5)


@pytest.fixture(scope="module")
def world():
    return W.make_world(3, SIZES)


class TitleRetriever:
    """Returns the passage whose title is the query (the real index does this for entity names)."""

    def __init__(self, world):
        self.by_title = {row["contents"].split("\n")[0]: row for row in W.corpus_rows(world)}

    def search(self, queries, k):
        return [[Hit(self.by_title[q]["id"], self.by_title[q]["contents"], 1.0)] for q in queries]


def test_world_is_a_function_of_its_seed(world):
    again = W.make_world(3, SIZES)
    assert again.facts == world.facts and again.entities == world.entities
    assert W.make_world(4, SIZES).facts != world.facts
    names = [n for kind in world.entities.values() for n in kind]
    assert len(names) == len(set(names)) == 35


def test_every_question_is_answered_by_its_chain_of_passages(world):
    questions = W.make_questions(world, 0)
    assert {q.hops for q in questions} == {1, 2, 3}
    for q in questions:
        assert q.golden_answers == (q.chain[-1],) and len(q.chain) == q.hops + 1
        for subject, rel, obj in zip(q.chain, q.path, q.chain[1:]):
            assert f"{subject} {W.RELATIONS[rel][3]} {obj}." in world.passage(subject)


def test_split_holds_out_each_hop_count_and_files_read_back(world, tmp_path):
    questions = W.make_questions(world, 0)
    train, test = W.split_questions(questions, 0.25, 0)
    assert not {q.id for q in train} & {q.id for q in test}
    assert len(train) + len(test) == len(questions)
    per_hops = collections.Counter(q.hops for q in questions)
    got = collections.Counter(q.hops for q in test)
    assert all(got[h] == round(0.25 * n) for h, n in per_hops.items())
    W.write_jsonl(str(tmp_path / "test.jsonl"), W.question_rows(test))
    W.write_jsonl(str(tmp_path / "corpus.jsonl"), W.corpus_rows(world))
    report = read_flashrag_jsonl(str(tmp_path / "test.jsonl"))
    assert [e.id for e in report.examples] == [q.id for q in test] and not report.skipped
    passages = [p for _, p in read_corpus(str(tmp_path / "corpus.jsonl"))]
    assert len(passages) == 35 and passages[0].contents.split("\n")[0] == world.entities["person"][0]


def test_tokenizer_keeps_tags_whole_and_round_trips(world, tmp_path):
    texts = [world.passage(n) for n in world.kind_of] * 3
    tok = train_tokenizer(texts, 400, str(tmp_path / "tok"))
    for tag in TAGS:
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    text = (
        f"<think> x </think>\n<search> {world.entities['person'][0]} </search>\n\n"
        "<information>Doc 1(Title: a) b</information>"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    pool = read_pool_file("configs/exploration_prompts.txt")
    assert tok.decode(tok(pool[0], add_special_tokens=False)["input_ids"]) == pool[0]  # byte-level: any text
    assert load_tokenizer_dir(str(tmp_path / "tok")).eos_token == "<|im_end|>"


def _actions(demo):
    return [P.parse_action(text) for label, text in demo.segments if label == P.MODEL]


def test_demonstration_behaviours(world):
    hits = {row["contents"].split("\n")[0]: [Hit(row["id"], row["contents"], 1.0)] for row in W.corpus_rows(world)}
    q = next(q for q in W.make_questions(world, 0) if q.hops == 3)
    rng = np.random.default_rng(0)
    complete = D.demonstrate(q, "complete", world, hits, rng)
    assert [a.content for a in _actions(complete)] == [*q.chain[:-1], q.chain[-1]]
    assert [a.kind for a in _actions(complete)] == ["search"] * 3 + ["answer"]
    assert complete.answer == q.chain[-1]
    info = [text for label, text in complete.segments if label == P.INFORMATION]
    assert info[1] == P.information_block(hits[q.chain[1]])
    for _ in range(10):
        premature = D.demonstrate(q, "premature", world, hits, rng)
        searches = [a.content for a in _actions(premature) if a.kind == "search"]
        assert 1 <= len(searches) < 3 and premature.answer == q.chain[len(searches)] != q.chain[-1]
        reflect = D.demonstrate(q, "reflect", world, hits, rng, reflections=("Odd.",))
        assert reflect.answer == q.chain[-1] and "Odd." in "".join(t for _, t in reflect.segments)
    guess = D.demonstrate(q, "guess", world, hits, rng)
    assert [a.kind for a in _actions(guess)] == ["answer"] and guess.answer in world.entities["country"]
    single = next(q for q in W.make_questions(world, 0) if q.hops == 1)
    with pytest.raises(ValueError, match="multi-hop"):
        D.demonstrate(single, "premature", world, hits, rng)
    with pytest.raises(ValueError, match="unknown behaviour"):
        D.demonstrate(single, "cheat", world, hits, rng)


def test_make_demonstrations_mix_and_encoding(world, tmp_path):
    questions = W.make_questions(world, 0)
    mix = {"single": {"complete": 1.0}, "multi": {"premature": 0.5, "complete": 0.5}}
    demos = D.make_demonstrations(questions, world, TitleRetriever(world), per_question=2, mix=mix, topk=1, seed=0)
    assert len(demos) == 2 * len(questions)
    assert all(d.behaviour == "complete" for d in demos if d.question.hops == 1)
    share = np.mean([d.behaviour == "premature" for d in demos if d.question.hops > 1])
    assert 0.35 < share < 0.65
    with pytest.raises(ValueError, match="unknown behaviours"):
        D.make_demonstrations(
            questions,
            world,
            TitleRetriever(world),
            per_question=1,
            mix={"single": {"copmlete": 1.0}, "multi": {}},
            topk=1,
            seed=0,
        )
    tok = train_tokenizer([world.passage(n) for n in world.kind_of] * 3, 400, str(tmp_path / "tok"))
    tokens, mask = D.encode_demonstration(tok, [5, 6], demos[0])
    assert len(tokens) == len(mask) and mask[:2] == [False, False]
    model_ids = [
        i for seg in demos[0].segments if seg[0] == P.MODEL for i in tok(seg[1], add_special_tokens=False)["input_ids"]
    ]
    assert [t for t, m in zip(tokens, mask) if m] == model_ids
    assert sum(mask) < len(tokens) - 2  # the information block is not trained on

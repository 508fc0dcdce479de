"""Outcome rewards (docs/algorithm.md#rewards, #invariants 10): SQuAD normalisation, the last `<answer>`
block, EM and token F1."""

import pytest

from rexrag_jax.scoring import exact_match, extract_answer, f1_score, normalize_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Beatles!", "beatles"),
        ("  A  quick,\tbrown\n fox. ", "quick brown fox"),
        ("an apple", "apple"),
        ("Theater", "theater"),  # articles only at word boundaries
        ("the-end", "theend"),  # punctuation goes first, so this is no longer an article
        ("Beijing, China", "beijing china"),
        ("U.S.A.", "usa"),
        ("the a an", ""),
        ("", ""),
        ("rock \u2019n\u2019 roll", "rock \u2019n\u2019 roll"),  # only ASCII punctuation is removed
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_extract_answer_takes_last_block_stripped():
    response = "<think>x</think><answer> first </answer> more text <answer>\n  second one \n</answer> tail"
    assert extract_answer(response) == "second one"


def test_extract_answer_none_without_a_complete_block():
    assert extract_answer("no answer here") is None
    assert extract_answer("<answer> unclosed") is None
    assert extract_answer("</answer> backwards <answer>") is None
    assert extract_answer("") is None


def test_extract_answer_dotall_and_non_greedy():
    assert extract_answer("<answer>New\nYork\n</answer>") == "New\nYork"
    # non-greedy: two blocks are two matches, not one spanning both
    assert extract_answer("<answer>a</answer> x <answer>b</answer>") == "b"
    assert extract_answer("<answer>   </answer>") == ""


def test_exact_match_spec_examples():
    assert exact_match("The Beatles!", ["beatles"]) == 1.0
    assert exact_match("Beijing, China", ["Beijing"]) == 0.0
    assert exact_match(None, ["anything"]) == 0.0
    assert exact_match(None, "anything") == 0.0


def test_exact_match_any_of_several_golds():
    golds = ["Paris", "City of Light", "the French capital"]
    assert exact_match("city of light.", golds) == 1.0
    assert exact_match("French Capital", golds) == 1.0
    assert exact_match("Lyon", golds) == 0.0
    assert exact_match("Paris", []) == 0.0


def test_exact_match_bare_string_gold_is_one_answer():
    assert exact_match("beijing", "Beijing") == 1.0
    # a string must not be iterated as a list of characters
    assert exact_match("b", "Beijing") == 0.0
    assert f1_score("b", "b c") == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_exact_match_returns_float():
    assert isinstance(exact_match("x", ["x"]), float)
    assert isinstance(exact_match("x", ["y"]), float)


def test_f1_hand_values():
    # pred [cat, sat, down], ref [cat, sat, on, mat]: common 2, P 2/3, R 1/2 -> F1 4/7
    assert f1_score("cat sat down", ["the cat sat on the mat"]) == pytest.approx(4 / 7)
    # repeated tokens count with multiplicity: {x:2, y:1} & {x:1, y:2} = 2 -> P = R = 2/3
    assert f1_score("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert f1_score("The Beatles!", ["beatles"]) == 1.0
    assert f1_score("nothing shared", ["totally different"]) == 0.0
    assert f1_score(None, ["x"]) == 0.0
    assert f1_score("the", ["the"]) == 0.0  # normalises to nothing


def test_f1_takes_best_gold():
    # vs "new york city": P 2/2, R 2/3 -> 0.8; vs "york": P 1/2, R 1 -> 2/3
    assert f1_score("New York", ["york", "New York City"]) == pytest.approx(0.8)
    assert f1_score("New York", ["new york city", "New York"]) == 1.0

"""Answer scoring, shared by training rewards and evaluation (docs/algorithm.md#rewards): the answer,
SQuAD-normalised exact match, token F1.

The authors decode prompt + response and need two `<answer>` blocks, because their prompt carries one
example; on the response alone that is "at least one block", which is what `extract_answer` takes.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from rexrag_jax.protocol import ANSWER_CLOSE, ANSWER_OPEN

ANSWER_BLOCK_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD)."""
    s = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", s).split())


def extract_answer(response: str) -> str | None:
    """The stripped content of the last `<answer>…</answer>` block of the response, or None."""
    matches = ANSWER_BLOCK_RE.findall(response)
    return matches[-1].strip() if matches else None


def _golds(golden_answers: Sequence[str] | str) -> list[str]:
    if isinstance(golden_answers, str):  # a bare string is one answer, not a list of characters
        return [golden_answers]
    return [str(g) for g in golden_answers]


def exact_match(prediction: str | None, golden_answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised golden answer; a missing answer scores 0."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(golden_answers)))


def f1_score(prediction: str | None, golden_answers: list[str]) -> float:
    """Best SQuAD token-level F1 over the golden answers (for reporting; training uses EM)."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in _golds(golden_answers):
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


class Score(NamedTuple):
    prediction: str | None  # the last <answer> block's content
    em: float
    f1: float


def score(response: str, golden_answers: Sequence[str]) -> Score:
    """The answer of a response (text after the prompt) and its EM and F1 against the golden answers."""
    prediction = extract_answer(response)
    return Score(prediction, exact_match(prediction, golden_answers), f1_score(prediction, golden_answers))

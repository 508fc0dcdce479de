"""Why a test answer in the synthetic world is wrong: the error breakdown of the embedded evaluation.

The world knows every question's entity chain, so a wrong answer can be placed: an entity met earlier on
the chain (too few hops, the dead end REX-RAG targets), one reached by following relations past the
answer (too many hops), no answer at all, or anything else (a wrong or misspelled entity copied).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rexrag_jax.embedded.world import World, WorldQuestion
from rexrag_jax.scoring import exact_match, normalize_answer

CATEGORIES = ("correct", "no_answer", "too_few_hops", "too_many_hops", "wrong_entity")


def beyond(world: World, entity: str, depth: int = 2) -> set[str]:
    """Entities reached from `entity` by following 1..`depth` more relations."""
    frontier, seen = {entity}, set()
    for _ in range(depth):
        frontier = {o for (s, _rel), o in world.facts.items() if s in frontier}
        seen |= frontier
    return seen


def classify(question: WorldQuestion, prediction: str | None, world: World) -> str:
    """One of CATEGORIES for a prediction (the extracted answer text, None when there is none)."""
    if exact_match(prediction, list(question.golden_answers)):
        return "correct"
    if prediction is None or not normalize_answer(prediction):
        return "no_answer"
    pred = normalize_answer(prediction)
    if any(pred == normalize_answer(e) for e in question.chain[:-1]):
        return "too_few_hops"
    if any(pred == normalize_answer(e) for e in beyond(world, question.chain[-1])):
        return "too_many_hops"
    return "wrong_entity"


def error_breakdown(questions: Sequence[WorldQuestion], predictions: Sequence[str | None], world: World) -> dict:
    """Share of each category among single-hop and multi-hop questions (fractions; each part sums to 1)."""
    labels = np.asarray([classify(q, p, world) for q, p in zip(questions, predictions)])
    hops = np.asarray([q.hops for q in questions])
    out = {}
    for part, sel in (("single", hops == 1), ("multi", hops > 1)):
        n = max(int(sel.sum()), 1)
        out[part] = {c: float(np.sum(labels[sel] == c)) / n for c in CATEGORIES}
    return out

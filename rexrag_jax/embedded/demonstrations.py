"""Demonstration trajectories for the warm start, in the rollout's exact protocol and segment layout.

A scripted teacher that knows the world answers each question by searching entity names through the
real retriever, one hop at a time. Like a real LLM it is imperfect, with a mix of behaviours:
- `complete`: follows every hop, then answers;
- `premature`: on a multi-hop question, answers with the entity found after too few hops (a dead end);
- `reflect`: an early conclusion (a guess, or too few hops), then a thought of self-doubt and the missing
  hops: the reflection a pretrained LLM brings and REX-RAG's exploratory prompts tap into. The doubts
  are drawn from `reflections` (ours plus, standing in for pretraining text of the same style, the
  exploratory prompt pool's sentences);
- `guess`: answers without searching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rexrag_jax import protocol as P
from rexrag_jax.embedded.world import RELATIONS, World, WorldQuestion

BEHAVIOURS = ("complete", "premature", "reflect", "guess")

# Our own wording, distinct from the exploratory prompts in configs/exploration_prompts.txt.
REFLECTIONS = (
    "Hmm, that only answers part of the question.",
    "Wait, the question asks for more than that.",
    "Let me read the question again before I answer.",
    "Actually, I have not finished the chain yet.",
    "On second thought, that is only the first link.",
    "Hold on, this is not what the question asks for.",
    "I should check whether one more step is needed.",
    "That was too quick; there is another fact to find.",
    "But the question is about someone or something else.",
    "No, I still have to follow one more relation.",
    "Let me think again about what is being asked.",
    "I jumped to a conclusion there.",
)


@dataclass(frozen=True)
class Demonstration:
    """Text segments `(label, text)` after the prompt, labels as in `protocol` (MODEL, INFORMATION)."""

    question: WorldQuestion
    behaviour: str
    segments: tuple[tuple[int, str], ...]

    @property
    def answer(self) -> str | None:
        action = P.parse_action(self.segments[-1][1])
        return action.content if action.kind == "answer" else None


def _phrase(rel: str) -> str:
    return RELATIONS[rel][2]


def _search(need: str, entity: str) -> str:
    return f"<think> {need} </think>\n{P.SEARCH_OPEN} {entity} {P.SEARCH_CLOSE}"


def _answer(thought: str, answer: str) -> str:
    return f"<think> {thought} </think>\n{P.ANSWER_OPEN} {answer} {P.ANSWER_CLOSE}"


def demonstrate(
    question: WorldQuestion,
    behaviour: str,
    world: World,
    hits: Mapping[str, Sequence],
    rng: np.random.Generator,
    reflections: Sequence[str] = REFLECTIONS,
) -> Demonstration:
    """One trajectory of `behaviour` for `question`; `hits[name]` are the retriever's results for a
    search of `name` (the teacher reads what the retriever returns, as the policy will)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; expected one of {BEHAVIOURS}")
    path, chain = question.path, question.chain
    segs: list[tuple[int, str]] = []
    guess = str(rng.choice(world.entities[RELATIONS[path[-1]][1]]))
    if behaviour == "guess":
        segs.append((P.MODEL, _answer(f"I think the answer is {guess}.", guess)))
        return Demonstration(question, behaviour, tuple(segs))
    stop = len(path)
    if behaviour == "premature" and len(path) < 2:
        raise ValueError(f"'premature' needs a multi-hop question, got {question.question!r}")
    if behaviour in ("premature", "reflect"):
        stop = int(rng.integers(1 if behaviour == "premature" else 0, len(path)))  # hops before concluding
    need = f"I need the {_phrase(path[0])} of {chain[0]}."
    if stop == 0:  # reflect on a guess made without searching
        doubt = str(rng.choice(reflections))
        guessed = f"<think> I think the answer is {guess}. </think>\n"
        segs.append((P.MODEL, guessed + _search(f"{doubt} {need}", chain[0])))
    else:
        segs.append((P.MODEL, _search(need, chain[0])))
    for hop in range(len(path)):
        segs.append((P.INFORMATION, P.information_block(hits[chain[hop]])))
        found = f"The {_phrase(path[hop])} of {chain[hop]} is {chain[hop + 1]}."
        if hop + 1 == len(path):
            segs.append((P.MODEL, _answer(found, chain[-1])))
        elif hop + 1 == stop and behaviour == "premature":
            segs.append((P.MODEL, _answer(found, chain[hop + 1])))
            break
        elif hop + 1 == stop:  # reflect: the early conclusion, a doubt, then the remaining hops
            doubt = str(rng.choice(reflections))
            nxt = f"Next I need the {_phrase(path[hop + 1])} of {chain[hop + 1]}."
            segs.append((P.MODEL, f"<think> {found} </think>\n" + _search(f"{doubt} {nxt}", chain[hop + 1])))
        else:
            nxt = f"{found} Next I need the {_phrase(path[hop + 1])} of {chain[hop + 1]}."
            segs.append((P.MODEL, _search(nxt, chain[hop + 1])))
    return Demonstration(question, behaviour, tuple(segs))


def sample_behaviour(question: WorldQuestion, mix: Mapping[str, Mapping[str, float]], rng: np.random.Generator) -> str:
    """Draw a behaviour from `mix["single"]` or `mix["multi"]` (behaviour -> probability)."""
    probs = mix["single" if question.hops == 1 else "multi"]
    names = [b for b in BEHAVIOURS if probs.get(b, 0) > 0]
    p = np.asarray([probs[b] for b in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def with_complete_share(mix: Mapping[str, Mapping[str, float]], share: float) -> dict:
    """`mix` with multi-hop `complete` set to `share` of the total and the other multi-hop behaviours scaled
    to keep their proportions: the dead-end knob of the warm start. `share < 0` keeps `mix` as it is."""
    out = {part: dict(probs) for part, probs in mix.items()}
    if share < 0:
        return out
    if share > 1:
        raise ValueError(f"demos.complete_share={share}; expected a share in [0, 1] (or < 0: use demos.multi as is)")
    multi = out["multi"]
    rest = {b: p for b, p in multi.items() if b != "complete" and p > 0}
    if share < 1 and not rest:
        raise ValueError(f"demos.complete_share={share} < 1 needs another multi-hop behaviour with weight > 0")
    total = sum(rest.values())
    out["multi"] = {"complete": float(share), **{b: (1 - share) * p / total for b, p in rest.items()}}
    return out


def check_mix(mix: Mapping[str, Mapping[str, float]]) -> None:
    """A clear error for a mix that names unknown behaviours, has no positive weight, or asks for
    'premature' single-hop demonstrations."""
    for part in ("single", "multi"):
        probs = dict(mix.get(part, {}))
        unknown = set(probs) - set(BEHAVIOURS)
        if unknown:
            raise ValueError(
                f"demonstration mix {part!r} has unknown behaviours {sorted(unknown)}; expected {BEHAVIOURS}"
            )
        if any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
            raise ValueError(f"demonstration mix {part!r} needs non-negative weights with a positive sum, got {probs}")
    if mix["single"].get("premature", 0) > 0:
        raise ValueError("demonstration mix: 'premature' needs multi-hop questions (remove it from 'single')")


def make_demonstrations(
    questions: Sequence[WorldQuestion],
    world: World,
    retriever,
    *,
    per_question: int,
    mix: Mapping[str, Mapping[str, float]],
    topk: int,
    seed: int,
    reflections: Sequence[str] = REFLECTIONS,
) -> list[Demonstration]:
    """`per_question` demonstrations of each question, behaviours drawn from `mix`; one batched search
    of every entity the teacher may look up."""
    check_mix(mix)
    names = sorted({e for q in questions for e in q.chain[:-1]})
    hits = dict(zip(names, retriever.search(names, topk)))
    rng = np.random.default_rng([seed, 4])
    return [
        demonstrate(q, sample_behaviour(q, mix, rng), world, hits, rng, reflections)
        for q in questions
        for _ in range(per_question)
    ]


def encode_demonstration(tokenizer, prompt_ids: Sequence[int], demo: Demonstration) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + segments (each encoded on its own, as the rollout engine does) and the
    loss mask (model text only)."""
    tokens, mask = list(prompt_ids), [False] * len(prompt_ids)
    for label, text in demo.segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        mask += [label in P.LOSS_SEGMENTS] * len(ids)
    return tokens, mask

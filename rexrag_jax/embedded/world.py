"""A synthetic multi-hop world: fictional people, towns, countries and companies, generated from a seed.

Every name is invented, so no answer can be guessed without retrieval; every fact lives in exactly one
passage (the subject's), so a k-hop question needs k searches. Passages use the Search-R1 corpus format
(`{"id", "contents": "Title\\ntext"}`), questions the FlashRAG one (`{"id", "question", "golden_answers"}`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rexrag_jax.data.questions import QAExample

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m")
_KIND_SUFFIX = {
    "person": ("",),
    "town": ("ford", "holm", "dale", "wick", "mere", "gate"),
    "country": ("ia", "ara", "esh", "ovia"),
    "company": (" Works", " Guild", " Foundry", " Trading"),
}

# relation -> (subject kind, object kind, phrase used in questions, phrase used in passages)
RELATIONS = {
    "born_in": ("person", "town", "birthplace", "was born in"),
    "teacher": ("person", "person", "teacher", "was taught by"),
    "employer": ("person", "company", "employer", "works for"),
    "country": ("town", "country", "country", "is a town in"),
    "founder": ("company", "person", "founder", "was founded by"),
    "based_in": ("company", "town", "home town", "is based in"),
}

# Question templates: a relation path from the subject, and the wording ({} = subject name).
TEMPLATES = {
    ("born_in",): "Where was {} born?",
    ("teacher",): "Who taught {}?",
    ("employer",): "Which company does {} work for?",
    ("country",): "In which country is {}?",
    ("founder",): "Who founded {}?",
    ("based_in",): "Where is {} based?",
    ("teacher", "born_in"): "Where was the teacher of {} born?",
    ("born_in", "country"): "In which country was {} born?",
    ("founder", "born_in"): "Where was the founder of {} born?",
    ("based_in", "country"): "In which country is {} based?",
    ("employer", "founder"): "Who founded the company that {} works for?",
    ("teacher", "born_in", "country"): "In which country was the teacher of {} born?",
    ("founder", "born_in", "country"): "In which country was the founder of {} born?",
    ("employer", "founder", "born_in"): "Where was the founder of the company that {} works for born?",
}


@dataclass(frozen=True)
class WorldSizes:
    people: int = 90
    towns: int = 24
    countries: int = 10
    companies: int = 18


@dataclass
class World:
    """Entities by kind and the facts `(subject, relation) -> object`."""

    entities: dict[str, list[str]]
    facts: dict[tuple[str, str], str]
    kind_of: dict[str, str] = field(default_factory=dict)

    def passage(self, name: str) -> str:
        """The subject's passage: its name as the title line, then one sentence per fact."""
        sentences = [
            f"{name} {RELATIONS[rel][3]} {self.facts[(name, rel)]}."
            for rel, (kind, *_rest) in RELATIONS.items()
            if kind == self.kind_of[name]
        ]
        if self.kind_of[name] == "country":
            sentences = [f"{name} is a country."]
        return f"{name}\n" + " ".join(sentences)

    def follow(self, subject: str, path: Sequence[str]) -> list[str]:
        """The chain of entities `[subject, hop1, ..., answer]` along a relation path."""
        chain = [subject]
        for rel in path:
            chain.append(self.facts[(chain[-1], rel)])
        return chain


@dataclass(frozen=True)
class WorldQuestion(QAExample):
    """A QA example that also knows its relation path and entity chain (for demonstrations and reports)."""

    path: tuple[str, ...] = ()
    chain: tuple[str, ...] = ()

    @property
    def hops(self) -> int:
        return len(self.path)


def _names(rng: np.random.Generator, count: int, kind: str, taken: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(int(rng.integers(2, 4)))]
        stem = "".join(syllables) + rng.choice(_CODAS)
        name = stem.capitalize() + rng.choice(_KIND_SUFFIX[kind])
        key = stem.lower()
        if key not in taken and 4 <= len(stem) <= 9:
            taken.add(key)
            names.append(name)
    return names


def make_world(seed: int, sizes: WorldSizes = WorldSizes()) -> World:
    """A world drawn from `seed` alone (same seed, same world, on any machine)."""
    rng = np.random.default_rng([seed, 1])
    taken: set[str] = set()
    ents = {
        "person": _names(rng, sizes.people, "person", taken),
        "town": _names(rng, sizes.towns, "town", taken),
        "country": _names(rng, sizes.countries, "country", taken),
        "company": _names(rng, sizes.companies, "company", taken),
    }
    facts: dict[tuple[str, str], str] = {}
    for rel, (subj, obj, *_rest) in RELATIONS.items():
        for name in ents[subj]:
            choices = [o for o in ents[obj] if o != name]
            facts[(name, rel)] = str(rng.choice(choices))
    kind_of = {name: kind for kind, names in ents.items() for name in names}
    return World(ents, facts, kind_of)


def corpus_rows(world: World) -> list[dict]:
    """One passage per entity, in a fixed order (Search-R1 corpus rows)."""
    names = [n for kind in ("person", "town", "company", "country") for n in world.entities[kind]]
    return [{"id": str(i), "contents": world.passage(n)} for i, n in enumerate(names)]


def make_questions(world: World, seed: int) -> list[WorldQuestion]:
    """Every (template, subject) question of the world, shuffled by `seed`; ids `h<hops>-<n>`."""
    out = []
    for path, text in TEMPLATES.items():
        for subject in world.entities[RELATIONS[path[0]][0]]:
            chain = world.follow(subject, path)
            out.append((path, text.format(subject), tuple(chain)))
    order = np.random.default_rng([seed, 2]).permutation(len(out))
    questions = []
    for n, i in enumerate(order):
        path, text, chain = out[i]
        questions.append(
            WorldQuestion(f"h{len(path)}-{n}", text, (chain[-1],), source=f"{len(path)}-hop", path=path, chain=chain)
        )
    return questions


def split_questions(
    questions: Sequence[WorldQuestion], test_fraction: float, seed: int
) -> tuple[list[WorldQuestion], list[WorldQuestion]]:
    """(train, test): `test_fraction` of the questions of each hop count, held out. Test questions are
    never asked in training (their entities are: a tiny model cannot copy a name it never saw used)."""
    rng = np.random.default_rng([seed, 3])
    test_ids = set()
    for hops in sorted({q.hops for q in questions}):
        ids = [q.id for q in questions if q.hops == hops]
        test_ids.update(rng.choice(ids, size=max(1, round(test_fraction * len(ids))), replace=False).tolist())
    return [q for q in questions if q.id not in test_ids], [q for q in questions if q.id in test_ids]


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Write rows as JSONL atomically (a temp file renamed over `path`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def question_rows(questions: Sequence[WorldQuestion]) -> list[dict]:
    """FlashRAG rows, plus the relation path and chain (readers ignore extra fields)."""
    return [
        {
            "id": q.id,
            "question": q.question,
            "golden_answers": list(q.golden_answers),
            "hops": q.hops,
            "path": list(q.path),
            "chain": list(q.chain),
        }
        for q in questions
    ]

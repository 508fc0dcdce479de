"""The exploration-prompt pool of REX-RAG's probes, tokenised, with each token's trie conditional.

The policy correction (docs/algorithm.md#probe-policy-probability) needs the probe policy's probability
of every inserted prompt token: U(tok_t | tok_j..t-1) = (#pool prompts starting with prefix + tok) /
(#pool prompts continuing past prefix), with U = 1 on the first token. It is computed here once per pool
and stored with each probe at insertion time, so nothing downstream has to re-tokenise or look anything up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def read_pool_file(path: str) -> list[str]:
    """One prompt per line; blank lines and `#` comments are skipped. A prompt's trailing space is kept
    out (the model writes what follows)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"exploration prompt pool {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"exploration prompt pool {path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    prompts = [line.rstrip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"exploration prompt pool {path}: no prompts (one per line, '#' for comments)")
    return prompts


def trie_conditionals(sequences: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per sequence, the conditional probability of each token given the earlier ones under a uniform
    choice of sequence; the first token gets 1 (docs/algorithm.md#exploration-pool)."""
    prefixes = Counter()
    for seq in sequences:
        for t in range(len(seq) + 1):
            prefixes[tuple(seq[:t])] += 1
    ends = Counter(tuple(seq) for seq in sequences)
    out = []
    for seq in sequences:
        cond = [1.0]
        for t in range(1, len(seq)):
            prefix = tuple(seq[:t])
            continuing = prefixes[prefix] - ends[prefix]
            cond.append(prefixes[tuple(seq[: t + 1])] / continuing)
        out.append(cond)
    return out


@dataclass(frozen=True)
class ExplorationPool:
    """Prompt texts, their token ids (`add_special_tokens=False`) and per-token conditionals."""

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    conditionals: tuple[tuple[float, ...], ...]

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer) -> ExplorationPool:
        ids = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        empty = [i for i, seq in enumerate(ids) if not seq]
        if empty:
            raise ValueError(f"exploration prompts {empty} tokenise to nothing")
        conds = trie_conditionals(ids)
        return cls(tuple(texts), tuple(ids), tuple(tuple(c) for c in conds))

    @classmethod
    def from_file(cls, path: str, tokenizer) -> ExplorationPool:
        return cls.from_texts(read_pool_file(path), tokenizer)

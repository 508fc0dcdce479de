"""Plain records shared by the corpus reader, the index, the server and the client."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Passage:
    """One corpus row in the FlashRAG / Search-R1 format: `contents` is `"Title"\\ntext`."""

    id: str
    contents: str


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result. `score` is the inner product of L2-normalised embeddings (cosine)."""

    id: str
    contents: str
    score: float

    def to_search_r1(self, with_score: bool = True) -> dict:
        """The Search-R1 `/retrieve` result item: `{"document": doc, "score": s}`, or the bare doc without scores."""
        doc = {"id": self.id, "contents": self.contents}
        return {"document": doc, "score": self.score} if with_score else doc

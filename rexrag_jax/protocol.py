"""The Search-R1 / REX-RAG agent protocol at the text level (docs/algorithm.md#rollout-protocol): tags,
parsing, observations.

The one home of these strings and regexes, so the rollout, the rewards and the evaluator agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
TURN_STOPS = (SEARCH_CLOSE, ANSWER_CLOSE)  # string stops of every generation turn

ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
INVALID_ACTION_FEEDBACK = "\nMy action is invalid. "

# Per-token segment labels of a trajectory (docs/algorithm.md#segment-labels-and-the-loss-mask); the loss
# covers model tokens and probe prompts.
PROMPT, MODEL, FEEDBACK, INFORMATION, PROBE_PROMPT = 0, 1, 3, 4, 5
LOSS_SEGMENTS = (MODEL, PROBE_PROMPT)


@dataclass(frozen=True)
class Action:
    """The first complete `<search>`/`<answer>` block of a turn; `kind` None means invalid."""

    kind: str | None
    content: str = ""
    block: str = ""  # the whole matched block, tags included


def cut_response(text: str) -> str:
    """The turn text through the first complete action block (the whole text if there is none)."""
    match = ACTION_RE.search(text)
    return text[: match.end()] if match else text


def parse_action(text: str) -> Action:
    match = ACTION_RE.search(text)
    if match is None:
        return Action(None)
    return Action(match.group(1), match.group(2).strip(), match.group(0))


def remove_answer_block(turn_text: str) -> str:
    """The turn text with its answer block deleted (what a probe keeps of the turn it branches from)."""
    action = parse_action(turn_text)
    if action.kind != "answer":
        raise ValueError(f"turn has no answer block to remove: {turn_text[-200:]!r}")
    return turn_text.replace(action.block, "")


def _contents(hit: Any) -> str:
    if isinstance(hit, dict):
        hit = hit.get("document", hit)
        return str(hit["contents"])
    return str(hit.contents)


def format_passages(hits: Sequence[Any]) -> str:
    """`Doc i(Title: <first line>) <rest>` per hit (i from 1). Hits are `Hit`s or Search-R1 result dicts."""
    lines = []
    for i, hit in enumerate(hits, start=1):
        title, _, text = _contents(hit).partition("\n")
        lines.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(lines)


def information_block(hits: Sequence[Any]) -> str:
    """The observation appended after a search: `\\n\\n<information>…</information>\\n\\n`."""
    return f"\n\n{INFO_OPEN}{format_passages(hits).strip()}{INFO_CLOSE}\n\n"

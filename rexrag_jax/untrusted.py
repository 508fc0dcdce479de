"""One gate for untrusted text: every reader (corpus, FlashRAG JSONL, parquet, server request) uses it.

Valid JSON is not always valid text. `"\\ud800"` parses to a lone surrogate that no UTF-8 writer (TFDS,
the doc store, an HTTP response) can encode; a line of 100,000 `[` makes `json.loads` recurse out of stack;
a 50 MB line costs gigabytes once tokenised. So a line is read with a byte cap (the rest of an over-long line
is skipped without being held), parsed, and then checked for depth, string length and encodability. A
reader turns a `BadInput` into its own `InputError` subclass with a `path:line:` location, or counts a skip.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

# A JSON escape that may decode to a surrogate; only then is the parsed value scanned for lone ones.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(ValueError):
    """Bad input from a file or request; the message starts with where it is (`path:line:`, `path: row N:`)."""


class BadInput(ValueError):
    """Why one record is unusable, without a location (the reader adds it)."""


class NumberTooLong(BadInput):
    """An integer literal longer than Python will parse (`sys.get_int_max_str_digits()`, 4300 by default)."""


@dataclasses.dataclass(frozen=True)
class TextLimits:
    """Bounds on one record. Defaults fit any real corpus or QA row with room to spare (a Wikipedia passage
    is ~1 KB) and keep one bad line from costing more than a few MB of memory."""

    max_line_bytes: int = 1 << 20
    max_string_chars: int = 1 << 18
    max_depth: int = 32

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"TextLimits.{field.name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = TextLimits()


def read_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """`(line, bytes consumed)` for each line of a binary file; `line` is None for a line longer than
    `max_bytes` (newline excluded), whose rest is skipped in bounded chunks instead of being held."""
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        if len(raw) <= max_bytes or raw.endswith(b"\n") and len(raw) == max_bytes + 1:
            yield raw, len(raw)
            continue
        consumed = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
            if not raw:
                break
            consumed += len(raw)
        yield None, consumed


def too_long(nbytes: int, limits: TextLimits) -> str:
    return f"line is {nbytes} bytes, over the {limits.max_line_bytes}-byte limit (raise max_line_bytes to allow it)"


def check_text(value: str, field: str, limits: TextLimits = DEFAULT_LIMITS) -> str:
    """`value` if it is a string UTF-8 can encode and within `max_string_chars`; else raises `BadInput`."""
    if len(value) > limits.max_string_chars:
        raise BadInput(f"{field} has {len(value)} characters, over the {limits.max_string_chars}-character limit")
    match = _LONE_SURROGATE.search(value)
    if match:
        raise BadInput(
            f"{field} is not valid text: lone surrogate U+{ord(match.group()):04X} at character "
            f"{match.start()} (cannot be encoded as UTF-8)"
        )
    return value


def check_value(obj: Any, limits: TextLimits = DEFAULT_LIMITS, *, surrogates: bool = True) -> Any:
    """`obj` if every string in it (keys included) passes `check_text` and it nests at most `max_depth`
    deep; else raises `BadInput` naming the field (`a.b[2]`). Iterative, so no input can exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(obj, "value", 1)]
    while stack:
        value, name, depth = stack.pop()
        if isinstance(value, str):
            if surrogates or len(value) > limits.max_string_chars:
                check_text(value, repr(name) if name != "value" else "the value", limits)
        elif isinstance(value, (dict, list)):
            if depth > limits.max_depth:
                raise BadInput(f"nested more than {limits.max_depth} levels deep (at {name})")
            if isinstance(value, dict):
                for key, item in value.items():
                    child = key if name == "value" else f"{name}.{key}"
                    if surrogates:
                        check_text(key, f"key {child!r}", limits)
                    stack.append((item, child, depth + 1))
            else:
                stack.extend((item, f"{name}[{i}]", depth + 1) for i, item in enumerate(value))
    return obj


def parse_json(data: bytes | str, limits: TextLimits = DEFAULT_LIMITS) -> Any:
    """Parse one JSON document and `check_value` it; every failure is a `BadInput` with a reason."""
    if len(data) > limits.max_line_bytes:
        raise BadInput(too_long(len(data), limits))
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"invalid UTF-8 at byte {e.start}") from None
        escapes = _SURROGATE_ESCAPE.search(data) is not None
    else:
        text = data
        escapes = True
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadInput(f"nested more than {limits.max_depth} levels deep") from None
    except ValueError as e:  # int() refused an over-long literal in the middle of the parse
        raise NumberTooLong(f"a number too long to parse ({str(e).split(':')[0]})") from None
    return check_value(obj, limits, surrogates=escapes)

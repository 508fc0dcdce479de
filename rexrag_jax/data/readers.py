"""Readers for the two QA formats REX-RAG's data comes in (docs/algorithm.md#data-and-evaluation), with
one bad-input policy.

Formats
-------
* FlashRAG JSONL (`RUC-NLPIR/FlashRAG_datasets`): one `{"id", "question", "golden_answers": [...]}` object
  per line; any other field (`metadata`, ...) is ignored. Integer ids are turned into strings. Blank lines are
  not rows and are ignored; a UTF-8 byte-order mark at the start of the file is dropped.
* Search-R1 parquet (`dataset/{train,test}.parquet`): rows
  `{data_source, prompt: [{role, content}], ability, reward_model: {style, ground_truth: {target: [...]}},
  extra_info: {split, index}}`. The question is the text after the last `Question:` in the (last) user
  message; the id is `f"{data_source}-{split}-{index}"` (`index` restarts at 0 for every source, so this is
  unique across sources); `source` is `data_source`.

Every question goes through `prompts.normalize_question` (strip, end with `?`, docs/algorithm.md#prompt).
Golden answers are stripped; blank ones are dropped.

Bad-input policy
----------------
A row is bad when it is not valid UTF-8 or not valid JSON, is not valid text (a lone surrogate escape such
as `"\\ud800"`, which no UTF-8 writer can store), is longer or nests deeper than `TextLimits` allow (see
`rexrag_jax.untrusted`), is not an object, misses a field, has a field of the wrong type (an id that is
neither a non-blank string nor an integer, a question that is not a non-blank string, golden answers that
are not a list of strings, a prompt without a user message containing `Question:`...), has no golden answer
left once blank ones are dropped (an empty list included), or repeats an id an earlier row already has.

* By default a bad row raises `QADataError` naming the file and the row: `path:LINE: reason` for JSONL (lines
  count from 1, blank lines included) and `path: row N: reason` for parquet (rows count from 0, as pandas
  shows them).
* With `skip_bad=True` the row is skipped instead: `ReadReport.skipped` counts it and the first
  `MAX_PROBLEMS` messages (same text as the error) are kept in `ReadReport.problems`. Of rows sharing an
  id, the first one is kept.
* A file that yields no valid row at all is an error even with `skip_bad=True`; so is a file that cannot be
  opened (`FileNotFoundError` when it does not exist), a parquet file without one of the required columns,
  and an unknown file extension.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

from rexrag_jax.data.prompts import normalize_question
from rexrag_jax.data.questions import QAExample
from rexrag_jax.untrusted import (
    DEFAULT_LIMITS,
    BadInput,
    InputError,
    TextLimits,
    check_value,
    parse_json,
    read_lines,
    too_long,
)

MAX_PROBLEMS = 20
# How to skip bad rows, as the user types it (the skip_bad=True argument in Python).
SKIP_HINT = (
    " (to skip bad rows: --skip-bad with rexrag-data, --config.data.skip_bad=True with rexrag-train / rexrag-eval)"
)
QUESTION_MARKER = "Question:"
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SEARCH_R1_COLUMNS = ("data_source", "prompt", "reward_model", "extra_info")
_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
    bytes: "bytes",
}


class QADataError(InputError):
    """A QA file or row that cannot be used; the message names the file (and the line or row)."""


@dataclasses.dataclass
class ReadReport:
    """What a reader produced: the valid examples, how many rows it skipped, and why (the first few)."""

    examples: list[QAExample]
    skipped: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def _kind(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


class _Collector:
    """Applies the policy: keeps good rows, raises on bad ones or (skip_bad) counts them."""

    def __init__(self, path: str, skip_bad: bool):
        self.path, self.skip_bad = path, skip_bad
        self.report = ReadReport(examples=[])
        self.first_seen: dict[str, str] = {}

    def bad(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if not self.skip_bad:
            raise QADataError(message + SKIP_HINT)
        self.report.skipped += 1
        if len(self.report.problems) < MAX_PROBLEMS:
            self.report.problems.append(message)

    def add(self, where: str, row_name: str, example: QAExample | str) -> None:
        if isinstance(example, str):
            self.bad(where, example)
            return
        first = self.first_seen.get(example.id)
        if first is not None:
            self.bad(where, f"duplicate id {example.id!r} (first at {first})")
            return
        self.first_seen[example.id] = row_name
        self.report.examples.append(example)

    def finish(self) -> ReadReport:
        if not self.report.examples:
            detail = (
                f"; {self.report.skipped} bad row(s) skipped, first: {self.report.problems[0]}"
                if self.report.skipped
                else ""
            )
            raise QADataError(f"{self.path}: no valid QA rows{detail}")
        return self.report


def _golden_answers(golds, field: str = "golden_answers") -> tuple[str, ...] | str:
    """The stripped, non-blank answers, or why there are none / the value is malformed."""
    if not isinstance(golds, list):
        return f"{field!r} must be a list of strings, got {_kind(golds)}"
    out = []
    for k, g in enumerate(golds):
        if isinstance(g, bytes):
            try:
                g = g.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{field}[{k}] is not valid UTF-8 (byte {e.start})"
        if not isinstance(g, str):
            return f"{field}[{k}] must be a string, got {_kind(g)}"
        if g.strip():
            out.append(g.strip())
    if not out:
        return f"{field!r} has no non-blank answer (got {json.dumps(golds)[:80]})"
    return tuple(out)


def _flashrag_row(obj, source: str) -> QAExample | str:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_kind(obj)}"
    missing = [k for k in ("id", "question", "golden_answers") if k not in obj]
    if missing:
        return f"missing field(s) {', '.join(repr(k) for k in missing)}"
    qid = obj["id"]
    if isinstance(qid, int) and not isinstance(qid, bool):
        qid = str(qid)
    if not isinstance(qid, str) or not qid.strip():
        return f"'id' must be a non-blank string or an integer, got {json.dumps(qid)[:40]}"
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        return f"'question' must be a non-blank string, got {json.dumps(question)[:40]}"
    golds = _golden_answers(obj["golden_answers"])
    if isinstance(golds, str):
        return golds
    return QAExample(qid, normalize_question(question), golds, source)


def read_flashrag_jsonl(
    path: str, *, source: str = "", skip_bad: bool = False, limits: TextLimits = DEFAULT_LIMITS
) -> ReadReport:
    """The QA rows of a FlashRAG JSONL file, each tagged with `source` (see the module docstring for the
    policy on bad rows)."""
    collect = _Collector(path, skip_bad)
    try:
        f = open(path, "rb")  # closed below
    except FileNotFoundError:
        raise FileNotFoundError(f"QA file {path} does not exist") from None
    except OSError as e:
        raise QADataError(f"cannot read QA file {path}: {e.strerror}") from e
    with f:
        for line_no, (raw, nbytes) in enumerate(read_lines(f, limits.max_line_bytes), start=1):
            where = f"{path}:{line_no}"
            if raw is None:
                collect.bad(where, too_long(nbytes, limits))
                continue
            line = raw[3:] if line_no == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            if not line.strip():
                continue
            try:
                obj = parse_json(line, limits)
            except BadInput as e:
                hint = (
                    " (the file looks like one JSON array; expected JSON Lines, one object per line)"
                    if line_no == 1 and line.lstrip().startswith(b"[") and str(e).startswith("invalid JSON")
                    else ""
                )
                collect.bad(where, f"{e}{hint}")
                continue
            collect.add(where, f"line {line_no}", _flashrag_row(obj, source))
    return collect.finish()


def _decoded(value):
    """`value` with any bytes (a binary parquet column) decoded as UTF-8; raises UnicodeDecodeError."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _search_r1_row(row: dict) -> QAExample | str:
    try:
        data_source = _decoded(row.get("data_source"))
    except UnicodeDecodeError as e:
        return f"'data_source' is not valid UTF-8 (byte {e.start})"
    if not isinstance(data_source, str) or not data_source.strip():
        return f"'data_source' must be a non-blank string, got {_kind(data_source)}"
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        return f"'prompt' must be a list of chat messages, got {_kind(prompt)}"
    users = [m for m in prompt if m.get("role") in ("user", b"user")]
    if not users:
        return "'prompt' has no user message"
    try:
        content = _decoded(users[-1].get("content"))
    except UnicodeDecodeError as e:
        return f"the user message is not valid UTF-8 (byte {e.start})"
    if not isinstance(content, str):
        return f"the user message's 'content' must be a string, got {_kind(content)}"
    at = content.rfind(QUESTION_MARKER)
    if at < 0:
        return f"the user message has no {QUESTION_MARKER!r}"
    question = content[at + len(QUESTION_MARKER) :]
    if not question.strip():
        return f"the user message has nothing after the last {QUESTION_MARKER!r}"
    reward = row.get("reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    if not isinstance(truth, dict) or "target" not in truth:
        return "missing 'reward_model.ground_truth.target'"
    golds = _golden_answers(truth["target"], "reward_model.ground_truth.target")
    if isinstance(golds, str):
        return golds
    extra = row.get("extra_info")
    if not isinstance(extra, dict):
        return f"'extra_info' must be a struct with 'split' and 'index', got {_kind(extra)}"
    try:
        split = _decoded(extra.get("split"))
    except UnicodeDecodeError as e:
        return f"'extra_info.split' is not valid UTF-8 (byte {e.start})"
    index = extra.get("index")
    if not isinstance(split, str) or not split.strip():
        return f"'extra_info.split' must be a non-blank string, got {_kind(split)}"
    if not isinstance(index, int) or isinstance(index, bool):
        return f"'extra_info.index' must be an integer, got {_kind(index)}"
    return QAExample(f"{data_source}-{split}-{index}", normalize_question(question), golds, data_source)


def _checked_search_r1_row(row: dict | str, limits: TextLimits) -> QAExample | str:
    """The example in a decoded row, or why there is none (undecodable, too long or deep, malformed)."""
    if isinstance(row, str):
        return row
    try:
        check_value(row, limits)
    except BadInput as e:
        return str(e)
    return _search_r1_row(row)


def _parquet_rows(path: str, pf, columns: list[str], batch_rows: int = 4096) -> Iterator[tuple[int, dict | str]]:
    """(row number, row as Python objects or why it cannot be decoded) for every row."""
    row_no = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            rows = []
            for i in range(batch.num_rows):  # find the undecodable row(s) one at a time
                try:
                    rows.append(batch.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError as e:
                    rows.append(f"invalid UTF-8 in a string field (byte {e.start} of the value)")
        for row in rows:
            yield row_no, row
            row_no += 1


def read_search_r1_parquet(path: str, *, skip_bad: bool = False, limits: TextLimits = DEFAULT_LIMITS) -> ReadReport:
    """The QA rows of a Search-R1 / REX-RAG parquet file (see the module docstring for ids and bad rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    collect = _Collector(path, skip_bad)
    if not os.path.exists(path):
        raise FileNotFoundError(f"QA file {path} does not exist")
    if not os.path.isfile(path):
        raise QADataError(f"cannot read QA file {path}: not a file")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise QADataError(f"{path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    missing = [c for c in SEARCH_R1_COLUMNS if c not in names]
    if missing:
        raise QADataError(f"{path}: not a Search-R1 parquet file: no column(s) {missing} (it has {names})")
    try:
        for row_no, row in _parquet_rows(path, pf, list(SEARCH_R1_COLUMNS)):
            collect.add(f"{path}: row {row_no}", f"row {row_no}", _checked_search_r1_row(row, limits))
    except (pa.ArrowException, OSError) as e:  # a corrupt page surfaces as a bare OSError from Arrow
        raise QADataError(
            f"{path}: parquet data could not be read after {len(collect.report.examples)} good "
            f"row(s) ({type(e).__name__}: {e})"
        ) from e
    return collect.finish()


def read_qa_file(
    path: str, *, source: str = "", skip_bad: bool = False, limits: TextLimits = DEFAULT_LIMITS
) -> ReadReport:
    """Read a `.jsonl` / `.json` (JSON Lines, FlashRAG) or `.parquet` (Search-R1) QA file. `source` tags
    JSONL rows; parquet rows carry their own `data_source`."""
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return read_flashrag_jsonl(path, source=source, skip_bad=skip_bad, limits=limits)
    if lower.endswith(PARQUET_SUFFIXES):
        return read_search_r1_parquet(path, skip_bad=skip_bad, limits=limits)
    raise QADataError(f"{path}: unknown QA file type; expected one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")

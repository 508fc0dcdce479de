"""The FlashRAG / Search-R1 corpus format, read as a stream, and the doc store an index serves hits from.

A corpus is JSONL, one `{"id": "12", "contents": "\\"Title\\"\\ntext"}` per line (integer ids are accepted and
turned into strings; extra fields are ignored). The 21M-row Wikipedia dump is ~14 GB, so the reader streams
line by line and yields each row's byte offset, which is what an interrupted index build resumes from.

Duplicate ids are found with a set of 64-bit BLAKE2b hashes of the ids: ~90 bytes per id, so ~1.8 GB for
21M ids. The hash is deterministic (unlike `hash()`), so a resumed build makes the same decisions; two
distinct ids collide with probability ~1e-5 at 21M rows, which would be reported as a duplicate.

The doc store is a copy of the accepted rows (`docs.jsonl`) plus their int64 start offsets with an end
sentinel (`docs.offsets.npy`). Rows are fetched with `os.pread`, so contents stay on disk and any number of
threads can read at once without sharing a file position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO, ClassVar

import numpy as np
from tqdm.auto import tqdm

from rexrag_jax.retrieval.types import Passage
from rexrag_jax.untrusted import DEFAULT_LIMITS, BadInput, InputError, TextLimits, parse_json, read_lines, too_long

DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "docs.offsets.npy"
_STARTS_FILE = "docs.starts.i64"  # raw row starts while a build is running; becomes OFFSETS_FILE at the end
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


# How to skip bad lines, as a user of `rexrag-index` types it (the CLIs that index a corpus themselves
# replace it with their own).
SKIP_HINT = " (to skip bad lines: rexrag-index build --skip-bad-lines)"


class CorpusError(InputError):
    """A corpus line that is not a valid row; the message starts with `path:line_number:`."""


@dataclasses.dataclass
class CorpusStats:
    """What a reader has consumed so far. `skipped` counts every bad line dropped (duplicates included)."""

    MAX_ERRORS: ClassVar[int] = 20

    offset: int = 0  # bytes consumed: the end of the last line read
    lines: int = 0  # lines consumed, blank and bad ones included
    rows: int = 0  # rows yielded
    skipped: int = 0
    duplicates: int = 0
    blank: int = 0
    first_errors: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CorpusReader(Iterator[tuple[int, Passage]]):
    """Iterates `(byte offset of the line, Passage)` over a corpus file; `.stats` is filled in as it goes."""

    def __init__(
        self,
        path: str,
        *,
        skip_bad: bool = False,
        start_offset: int = 0,
        start_line: int = 1,
        limits: TextLimits = DEFAULT_LIMITS,
    ):
        self.path = path
        self.skip_bad = skip_bad
        self.limits = limits
        self.stats = CorpusStats(offset=start_offset, lines=start_line - 1)
        self._seen: set[int] = set()
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        if not 0 <= start_offset <= size:
            self.close()
            raise CorpusError(f"{path}: start_offset {start_offset} is outside the file (size {size})")
        if start_offset:
            self._file.seek(start_offset - 1)
            if self._file.read(1) != b"\n":
                self.close()
                raise CorpusError(f"{path}: start_offset {start_offset} is not at the start of a line")
        self._lines = read_lines(self._file, limits.max_line_bytes)

    def __next__(self) -> tuple[int, Passage]:
        stats = self.stats
        for raw, nbytes in self._lines:
            offset = stats.offset
            stats.offset += nbytes
            stats.lines += 1
            if raw is None:
                self._bad(too_long(nbytes, self.limits))
                continue
            line = raw[3:] if offset == 0 and raw.startswith(b"\xef\xbb\xbf") else raw  # UTF-8 BOM
            if not line.strip():
                stats.blank += 1
                continue
            passage = _parse_line(line, self.limits)
            if isinstance(passage, Passage):
                key = int.from_bytes(hashlib.blake2b(passage.id.encode(), digest_size=8).digest())
                if key not in self._seen:
                    self._seen.add(key)
                    stats.rows += 1
                    return offset, passage
                stats.duplicates += 1
                passage = f"duplicate id {passage.id!r} (an earlier line has the same id)"
            self._bad(passage)
        self.close()
        raise StopIteration

    def _bad(self, reason: str) -> None:
        message = f"{self.path}:{self.stats.lines}: {reason}"
        if not self.skip_bad:
            self.close()
            raise CorpusError(message + SKIP_HINT)
        self.stats.skipped += 1
        if len(self.stats.first_errors) < CorpusStats.MAX_ERRORS:
            self.stats.first_errors.append(message)

    def close(self) -> None:
        self._file.close()
        self._lines = iter(())


def read_corpus(
    path: str,
    *,
    skip_bad: bool = False,
    start_offset: int = 0,
    start_line: int = 1,
    limits: TextLimits = DEFAULT_LIMITS,
) -> CorpusReader:
    """Stream a corpus in constant memory (beyond the duplicate-id set). Blank lines are skipped and counted.

    A bad line (see `rexrag_jax.untrusted`: not UTF-8 text, not JSON, too long, too deep, a lone surrogate,
    or not a row) raises `CorpusError("path:line: reason")`; with `skip_bad=True` it is skipped and counted
    in `reader.stats` instead (of rows sharing an id, the first is kept). `start_offset` must be the start of
    a line (a yielded offset); `start_line` is that line's number, used in messages.
    """
    return CorpusReader(path, skip_bad=skip_bad, start_offset=start_offset, start_line=start_line, limits=limits)


def _parse_line(line: bytes, limits: TextLimits = DEFAULT_LIMITS) -> Passage | str:
    """The row on one line, or why it is not one."""
    try:
        obj = parse_json(line, limits)
    except BadInput as e:
        return str(e)
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}"
    if "id" not in obj:
        return "missing 'id'"
    doc_id = obj["id"]
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id:
        return f"'id' must be a non-empty string or an integer, got {json.dumps(doc_id)[:40]}"
    if "contents" not in obj:
        return "missing 'contents'"
    contents = obj["contents"]
    if not isinstance(contents, str):
        return f"'contents' must be a string, got {_JSON_TYPES.get(type(contents), type(contents).__name__)}"
    return Passage(id=doc_id, contents=contents)


def open_for_append(path: str, length: int) -> BinaryIO:
    """Open a build output for appending after cutting it back to `length` bytes (its last checkpoint)."""
    f = open(path, "r+b" if os.path.exists(path) else "w+b")
    size = os.fstat(f.fileno()).st_size
    if size < length:
        f.close()
        raise ValueError(
            f"{path} has {size} bytes but the build checkpoint recorded {length}: the file was "
            "damaged since; start the build over (resume=False / --no-resume)"
        )
    f.truncate(length)
    f.seek(length)
    return f


class PrefixHasher:
    """sha256 of a file's prefix, advanced on demand through its own handle. A build hashes the corpus up
    to where it has read after each chunk (from the page cache), so the checksum costs no extra pass."""

    def __init__(self, path: str):
        self.path, self.done, self._sha = path, 0, hashlib.sha256()

    def to(self, end: int) -> str:
        """The hex digest of the first `end` bytes (`end` never goes backwards)."""
        with open(self.path, "rb") as f:
            f.seek(self.done)
            while self.done < end:
                block = f.read(min(1 << 23, end - self.done))
                if not block:
                    raise ValueError(f"{self.path} shrank while it was being read")
                self._sha.update(block)
                self.done += len(block)
        return self._sha.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a whole (possibly 14 GB) file, with a progress bar."""
    hasher, size, step = PrefixHasher(path), os.path.getsize(path), 1 << 28
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {os.path.basename(path)}", disable=None) as bar:
        for end in range(step, size + step, step):
            hasher.to(min(end, size))
            bar.update(hasher.done - bar.n)
    return hasher.to(size)


class DocStoreWriter:
    """Appends rows to `docs.jsonl` during a build; `finish()` writes the offsets file the store reads."""

    def __init__(self, directory: str, *, rows: int = 0, nbytes: int = 0):
        self.directory = directory
        self.rows, self.nbytes = rows, nbytes
        self._docs = open_for_append(os.path.join(directory, DOCS_FILE), nbytes)
        self._starts = open_for_append(os.path.join(directory, _STARTS_FILE), rows * 8)

    def append(self, passages: Sequence[Passage]) -> None:
        lines = [
            (json.dumps({"id": p.id, "contents": p.contents}, ensure_ascii=False) + "\n").encode() for p in passages
        ]
        lengths = np.fromiter((len(x) for x in lines), dtype=np.int64, count=len(lines))
        starts = self.nbytes + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._docs.write(b"".join(lines))
        self._starts.write(starts.astype("<i8").tobytes())
        self.rows += len(lines)
        self.nbytes += int(lengths.sum())

    def sync(self) -> None:
        """Make everything appended so far durable (called before a checkpoint records it)."""
        for f in (self._docs, self._starts):
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """Write `docs.offsets.npy` (row starts + end sentinel). The raw starts stay until `cleanup`, so a
        build interrupted after this can still reopen the writer."""
        self.sync()
        self.close()
        starts = np.fromfile(os.path.join(self.directory, _STARTS_FILE), dtype="<i8")
        np.save(os.path.join(self.directory, OFFSETS_FILE), np.append(starts, np.int64(self.nbytes)))

    @staticmethod
    def cleanup(directory: str) -> None:
        """Drop the build-time starts file once the index is complete."""
        path = os.path.join(directory, _STARTS_FILE)
        if os.path.exists(path):
            os.remove(path)

    def close(self) -> None:
        self._docs.close()
        self._starts.close()


class DocStore:
    """Random access to the rows of an index by row number; thread-safe, contents stay on disk."""

    def __init__(self, directory: str):
        docs_path = os.path.join(directory, DOCS_FILE)
        offsets_path = os.path.join(directory, OFFSETS_FILE)
        self.offsets = np.load(offsets_path, mmap_mode="r")
        if self.offsets.ndim != 1 or self.offsets.dtype != np.int64 or len(self.offsets) < 1:
            raise ValueError(
                f"{offsets_path}: expected a 1-D int64 array, got {self.offsets.dtype} {self.offsets.shape}"
            )
        self._fd = os.open(docs_path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != size or np.any(np.diff(self.offsets) <= 0):
            os.close(self._fd)
            raise ValueError(
                f"{offsets_path} does not match {docs_path} ({size} bytes): offsets must rise "
                "from 0 to the file size; rebuild the index"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> Passage:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is out of range for a doc store of {len(self)} rows")
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        obj = json.loads(os.pread(self._fd, end - start, start))
        return Passage(id=obj["id"], contents=obj["contents"])

    def get_many(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        return [self.get(int(r)) for r in rows]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DocStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

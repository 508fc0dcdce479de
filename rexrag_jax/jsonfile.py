"""Reading and writing the small files every component keeps (configs, manifests, build state, reports),
and putting finished build folders in place.

Reads name the file and line of a syntax error; writes are atomic (temp file, fsync, rename), so a crash
never leaves a half-written file where a complete one is expected; a folder is built aside and swapped in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any


def read_json(path: str, *, hint: str = "", expect: type = dict) -> Any:
    """The JSON value in `path`, of type `expect` (an object by default); errors say `path: invalid JSON at
    line N: ...` (+ `hint`)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}{hint}") from e
    if not isinstance(obj, expect):
        kind = "a JSON object" if expect is dict else f"JSON {expect.__name__}"
        raise ValueError(f"{path}: expected {kind}, got {type(obj).__name__}{hint}")
    return obj


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (a temp file beside it, fsync, rename; removed on failure)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_bytes_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8"))


def is_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (symlinks resolved): an output there may destroy it."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def replace_dir(built: str, out: str) -> None:
    """Put the finished folder `built` at `out` (same filesystem): an existing `out` is renamed aside first,
    then removed, so `out` never holds a mix of old and new files."""
    if os.path.exists(out):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(os.path.abspath(out)))
        os.replace(out, os.path.join(trash, "old"))
        os.replace(built, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(built, out)

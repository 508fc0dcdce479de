"""Corpus reader (format, every kind of bad line, skip counts, resume, duplicates) and the doc store."""

import json
import os
import random
import threading

import numpy as np
import pytest

from rexrag_jax.retrieval.corpus import (
    CorpusError,
    CorpusStats,
    DocStore,
    DocStoreWriter,
    open_for_append,
    read_corpus,
)
from rexrag_jax.retrieval.types import Passage


def write_lines(path, lines: list) -> str:
    """Write lines (dicts become JSON, str/bytes go in verbatim) one per line."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def row(i, text=None) -> dict:
    return {"id": str(i), "contents": f'"Title {i}"\n{text or f"text of passage {i}"}'}


def test_reads_rows_with_offsets(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [row(0), {"id": 7, "contents": '"T"\nü 中文', "title": "x"}, row(2)])
    reader = read_corpus(path)
    got = list(reader)
    assert [p for _, p in got] == [
        Passage("0", '"Title 0"\ntext of passage 0'),
        Passage("7", '"T"\nü 中文'),
        Passage("2", '"Title 2"\ntext of passage 2'),
    ]
    with open(path, "rb") as f:  # each offset is where that row's line starts
        for offset, passage in got:
            f.seek(offset)
            assert str(json.loads(f.readline())["id"]) == passage.id
    assert reader.stats.rows == 3 and reader.stats.lines == 3 and reader.stats.skipped == 0
    assert reader.stats.offset == os.path.getsize(path)


def test_tolerates_bom_crlf_blank_lines_and_no_final_newline(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row(0)).encode() + b"\r\n\n   \n" + json.dumps(row(1)).encode())
    reader = read_corpus(str(path))
    assert [p.id for _, p in reader] == ["0", "1"]
    assert reader.stats.blank == 2 and reader.stats.skipped == 0 and reader.stats.lines == 4


BAD_LINES = [
    ('{"id": "x", "contents": ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"just a string"', "expected a JSON object, got a string"),
    ('{"contents": "c"}', "missing 'id'"),
    ('{"id": 1.5, "contents": "c"}', "'id' must be a non-empty string or an integer"),
    ('{"id": true, "contents": "c"}', "'id' must be a non-empty string or an integer"),
    ('{"id": "", "contents": "c"}', "'id' must be a non-empty string or an integer"),
    ('{"id": "x"}', "missing 'contents'"),
    ('{"id": "x", "contents": null}', "'contents' must be a string, got null"),
    ('{"id": "x", "contents": ["a"]}', "'contents' must be a string, got an array"),
    (b'{"id": "x", "contents": "\xff\xfe"}', "invalid UTF-8"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    path = write_lines(tmp_path / "c.jsonl", [row(0), "", line, row(3)])
    reader = read_corpus(path)
    with pytest.raises(CorpusError) as e:
        list(reader)
    assert str(e.value).startswith(f"{path}:3: {reason}")
    assert "--skip-bad-lines" in str(e.value)  # how to skip it, as typed
    assert isinstance(e.value, ValueError)


def test_skip_bad_counts_every_skipped_line(tmp_path):
    lines = [row(0)] + [line for line, _ in BAD_LINES] + [row(1), "", row(0), row(2)]
    path = write_lines(tmp_path / "c.jsonl", lines)
    reader = read_corpus(path, skip_bad=True)
    assert [p.id for _, p in reader] == ["0", "1", "2"]
    stats = reader.stats
    assert (stats.rows, stats.skipped, stats.duplicates, stats.blank) == (3, len(BAD_LINES) + 1, 1, 1)
    assert stats.lines == len(lines)
    assert len(stats.first_errors) == stats.skipped
    for i, (_, reason) in enumerate(BAD_LINES):
        assert stats.first_errors[i].startswith(f"{path}:{i + 2}: {reason}")
    assert stats.first_errors[-1].startswith(f"{path}:{len(lines) - 1}: duplicate id '0'")


def test_first_errors_are_capped(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", ["nope"] * (CorpusStats.MAX_ERRORS + 5) + [row(1)])
    reader = read_corpus(path, skip_bad=True)
    assert len(list(reader)) == 1
    assert reader.stats.skipped == CorpusStats.MAX_ERRORS + 5
    assert len(reader.stats.first_errors) == CorpusStats.MAX_ERRORS


def test_duplicate_ids_error_by_default_and_int_equals_str(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"id": 5, "contents": "a"}, row(1), {"id": "5", "contents": "b"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:3: duplicate id '5'"):
        list(read_corpus(path))
    reader = read_corpus(path, skip_bad=True)
    assert [p for _, p in reader][0] == Passage("5", "a")  # the first one is kept
    assert reader.stats.duplicates == 1


def test_resume_from_offset_continues_rows_and_line_numbers(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [row(i) for i in range(6)] + ["bad", row(6)])
    full = list(read_corpus(path, skip_bad=True))
    offset = full[3][0]
    reader = read_corpus(path, skip_bad=True, start_offset=offset, start_line=4)
    assert list(reader) == full[3:]
    assert reader.stats.first_errors == [f"{path}:7: invalid JSON: Expecting value at column 1"]
    with pytest.raises(CorpusError, match="not at the start of a line"):
        read_corpus(path, start_offset=offset + 1)
    with pytest.raises(CorpusError, match="outside the file"):
        read_corpus(path, start_offset=10**9)


def write_store(directory, passages, splits=(2,)) -> None:
    writer = DocStoreWriter(str(directory))
    start = 0
    for end in list(splits) + [len(passages)]:
        writer.append(passages[start:end])
        start = end
    writer.finish()
    DocStoreWriter.cleanup(str(directory))


def test_doc_store_random_access(tmp_path):
    passages = [Passage(str(i), f'"T{i}"\n' + "ünïcode " * (i % 7)) for i in range(50)]
    write_store(tmp_path, passages, splits=(1, 20))
    with DocStore(str(tmp_path)) as store:
        assert len(store) == 50
        assert store.get(0) == passages[0] and store.get(49) == passages[49]
        assert store.get_many(np.array([3, 3, 40, 0])) == [passages[3], passages[3], passages[40], passages[0]]
        with pytest.raises(IndexError, match="row 50 is out of range"):
            store.get(50)
    # the store is itself a valid corpus
    assert [p for _, p in read_corpus(str(tmp_path / "docs.jsonl"))] == passages


def test_doc_store_many_threads(tmp_path):
    passages = [Passage(f"id{i}", f"passage {i} " + "x" * (i % 97)) for i in range(2000)]
    write_store(tmp_path, passages, splits=(500, 1000))
    errors = []
    with DocStore(str(tmp_path)) as store:

        def work(seed):
            rng = random.Random(seed)
            for _ in range(500):
                rows = [rng.randrange(len(passages)) for _ in range(4)]
                if store.get_many(rows) != [passages[r] for r in rows]:
                    errors.append(rows)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_writer_resumes_from_checkpoint_lengths(tmp_path):
    passages = [Passage(str(i), f"p{i}") for i in range(6)]
    writer = DocStoreWriter(str(tmp_path))
    writer.append(passages[:3])
    writer.sync()
    checkpoint = (writer.rows, writer.nbytes)
    writer.append([Passage("junk", "written after the checkpoint")])
    writer.close()
    writer = DocStoreWriter(str(tmp_path), rows=checkpoint[0], nbytes=checkpoint[1])
    writer.append(passages[3:])
    writer.finish()
    with DocStore(str(tmp_path)) as store:
        assert store.get_many(range(6)) == passages
    with pytest.raises(ValueError, match="start the build over"):
        DocStoreWriter(str(tmp_path), rows=6, nbytes=10**6)


def test_doc_store_rejects_mismatched_offsets(tmp_path):
    write_store(tmp_path, [Passage("a", "x"), Passage("b", "y"), Passage("c", "z")])
    with open_for_append(str(tmp_path / "docs.jsonl"), os.path.getsize(tmp_path / "docs.jsonl")) as f:
        f.write(b"extra\n")
    with pytest.raises(ValueError, match="does not match"):
        DocStore(str(tmp_path))

"""Untrusted text: every reader turns a bad line into a located error or a counted skip, never a traceback.

Regressions from the reliability issue (lone surrogates, deep nesting, huge lines, a corrupt parquet page,
a failed data build deleting the good one), plus property tests that throw random JSON and bytes at each
reader.
"""

import io
import json
import os
import re
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexrag_jax.data.readers import QADataError, read_flashrag_jsonl, read_search_r1_parquet
from rexrag_jax.retrieval.corpus import CorpusError, read_corpus
from rexrag_jax.untrusted import BadInput, InputError, TextLimits, parse_json, read_lines

SURROGATE = '"\\ud800"'  # valid JSON, not valid text
GOOD_QA = '{"id": "q1", "question": "who?", "golden_answers": ["a"]}'
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path, lines) -> str:
    with open(path, "wb") as f:
        f.write(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return str(path)


# --- the gate itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,reason",
    [
        (b'{"a": "\\ud800"}', "'a' is not valid text: lone surrogate U+D800"),
        (b'{"a": ["x", "\\udfff"]}', "'a[1]' is not valid text: lone surrogate U+DFFF"),
        (b'{"k\\udc00": 1}', "is not valid text: lone surrogate U+DC00"),
        (b"[" * 100_000, "nested more than 32 levels deep"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested more than 32 levels deep"),
        (b"\xff{}", "invalid UTF-8 at byte 0"),
        (b'{"a": 1', "invalid JSON"),
        (b'{"id": ' + b"9" * 5000 + b"}", "a number too long to parse"),
        (b'{"a": "' + b"x" * 300 + b'"}', "'a' has 300 characters, over the 200-character limit"),
    ],
)
def test_parse_json_names_why_a_value_is_not_usable(data, reason):
    with pytest.raises(BadInput, match=re.escape(reason)):
        parse_json(data, TextLimits(max_string_chars=200))


def test_a_surrogate_pair_escape_is_ordinary_text():
    assert parse_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}


def test_read_lines_skips_an_overlong_line_without_holding_it():
    lines = list(read_lines(io.BytesIO(b"abcd\n" + b"x" * 50 + b"\nab"), max_bytes=4))
    assert lines == [(b"abcd\n", 5), (None, 51), (b"ab", 2)]
    big = io.BytesIO(b'{"id": "1", "contents": "' + b"y" * (20 << 20) + b'"}\n{"id": "2"}\n')
    tracemalloc.start()
    try:
        out = list(read_lines(big, max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [line for line, _ in out] == [None, b'{"id": "2"}\n']
    assert peak < 6 << 20, f"reading a 20 MB line held {peak} bytes"


@pytest.mark.parametrize("field,value", [("max_line_bytes", 0), ("max_depth", -1), ("max_string_chars", 1.5)])
def test_limits_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=f"TextLimits.{field} must be a positive integer"):
        TextLimits(**{field: value})


# --- corpus ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"id": "1", "contents": ' + SURROGATE + "}", "'contents' is not valid text"),
        ('{"id": ' + SURROGATE + ', "contents": "x"}', "'id' is not valid text"),
        ("[" * 50_000, "nested more than 32 levels deep"),
        ('{"id": ' + "9" * 5000 + ', "contents": "x"}', "a number too long to parse"),  # was a ValueError traceback
    ],
)
def test_corpus_lines_that_are_not_text_are_located_errors_or_skips(tmp_path, line, reason):
    path = _write(tmp_path / "c.jsonl", ['{"id": "0", "contents": "ok"}', line, '{"id": "2", "contents": "ok"}'])
    with pytest.raises(CorpusError, match=rf"c\.jsonl:2: {reason}"):
        list(read_corpus(path))
    reader = read_corpus(path, skip_bad=True)
    assert [p.id for _, p in reader] == ["0", "2"]
    assert reader.stats.skipped == 1 and reason in reader.stats.first_errors[0]


def test_an_overlong_corpus_line_is_skipped_and_offsets_stay_exact(tmp_path):
    path = _write(
        tmp_path / "c.jsonl",
        [
            '{"id": "0", "contents": "ok"}',
            '{"id": "1", "contents": "' + "z" * 5000 + '"}',
            '{"id": "2", "contents": "ok"}',
        ],
    )
    limits = TextLimits(max_line_bytes=1000)
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: line is 5028 bytes, over the 1000-byte limit"):
        list(read_corpus(path, limits=limits))
    reader = read_corpus(path, skip_bad=True, limits=limits)
    rows = list(reader)
    assert [p.id for _, p in rows] == ["0", "2"]
    with open(path, "rb") as f:
        f.seek(rows[1][0])
        assert f.readline().startswith(b'{"id": "2"')
    assert reader.stats.offset == os.path.getsize(path)


# --- FlashRAG JSONL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,reason",
    [
        ('{"id": "q2", "question": ' + SURROGATE + ', "golden_answers": ["a"]}', "'question' is not valid text"),
        ('{"id": "q2", "question": "q", "golden_answers": [' + SURROGATE + "]}", r"'golden_answers\[0\]' is not valid"),
        ('{"id": ' + SURROGATE + ', "question": "q", "golden_answers": ["a"]}', "'id' is not valid text"),
        (
            '{"id": "q2", "question": "q", "golden_answers": ["a"], "metadata": ' + "[" * 40 + "]" * 40 + "}",
            "nested more than 32 levels deep",
        ),
    ],
)
def test_flashrag_rows_that_are_not_text_are_located_errors_or_skips(tmp_path, row, reason):
    path = _write(tmp_path / "qa.jsonl", [GOOD_QA, row])
    with pytest.raises(QADataError, match=rf"qa\.jsonl:2: {reason}"):
        read_flashrag_jsonl(path)
    report = read_flashrag_jsonl(path, skip_bad=True)
    assert [ex.id for ex in report.examples] == ["q1"] and report.skipped == 1


def test_a_corrupt_parquet_page_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": "nq",
            "prompt": [{"role": "user", "content": f"Question: who {i}?"}],
            "reward_model": {"style": "rule", "ground_truth": {"target": ["a"]}},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(3000)
    ]
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=500, compression="NONE")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3 : len(data) // 3 + 200] = b"\xab" * 200
    open(path, "wb").write(bytes(data))
    with pytest.raises(QADataError, match=rf"{path}: parquet data could not be read"):
        read_search_r1_parquet(path, skip_bad=True)


# --- atomic writes ----------------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    from rexrag_jax import jsonfile

    path = str(tmp_path / "state.json")
    jsonfile.write_json_atomic(path, {"rows": 1})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(jsonfile.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        jsonfile.write_json_atomic(path, {"rows": 2})
    assert jsonfile.read_json(path) == {"rows": 1} and os.listdir(tmp_path) == ["state.json"]


# --- the TFDS data build -----------------------------------------------------------------------------------


def test_a_bad_or_failed_data_build_never_deletes_the_good_one(tmp_path, monkeypatch):
    from rexrag_jax.cli import data as data_cli
    from rexrag_jax.data import tfds_builders
    from rexrag_jax.data.tfds_builders import load_split

    out = str(tmp_path / "tfds")
    good = _write(tmp_path / "good.jsonl", [GOOD_QA])
    assert data_cli.main(["build", "--out", out, "--dataset", "nq", "--file", good, "--split", "test"]) == 0
    # Was: TFDS raised UnicodeEncodeError on the surrogate after the old build had been deleted.
    bad = _write(
        tmp_path / "bad.jsonl",
        [GOOD_QA.replace("q1", "q0"), '{"id": "q2", "question": ' + SURROGATE + ', "golden_answers": ["a"]}'],
    )
    assert data_cli.main(["build", "--out", out, "--dataset", "nq", "--file", bad, "--split", "test"]) == 2
    assert [ex.id for ex in load_split("nq", "test", out)] == ["q1"]
    assert (
        data_cli.main(["build", "--out", out, "--dataset", "nq", "--file", bad, "--split", "test", "--skip-bad"]) == 0
    )
    assert [ex.id for ex in load_split("nq", "test", out)] == ["q0"]

    def crash(self, rows):
        yield 0, {"id": "x", "question": "x?", "golden_answers": ["x"], "source": "nq"}
        raise RuntimeError("disk full")

    monkeypatch.setattr(tfds_builders.RexragQa, "_generate_examples", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tfds_builders.build_dataset("nq", {"test": good}, out)
    assert [ex.id for ex in load_split("nq", "test", out)] == ["q0"]
    assert sorted(os.listdir(out)) == ["rexrag_qa"], "a failed build left files behind"
    assert sorted(os.listdir(os.path.join(out, "rexrag_qa", "nq"))) == [str(tfds_builders.RexragQa.VERSION)]


def test_a_qa_file_inside_the_build_output_is_refused(tmp_path):
    from rexrag_jax.data.tfds_builders import build_dataset

    out = tmp_path / "tfds"
    inside = out / "rexrag_qa" / "nq" / "1.0.0"
    inside.mkdir(parents=True)
    path = _write(inside / "test.jsonl", [GOOD_QA])
    with pytest.raises(ValueError, match="lies inside the build output"):
        build_dataset("nq", {"test": path}, str(out))
    assert open(path).read() == GOOD_QA + "\n"


# --- property tests: random input, only three outcomes -----------------------------------------------------

texts = st.text(st.characters(codec=None) | st.sampled_from("\ud800\udbff\udc00\udfff"))  # lone surrogates
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
row_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values | texts,
        "contents": json_values | texts,
        "question": json_values | texts,
        "golden_answers": json_values | st.lists(texts, max_size=3),
    },
)
lines = st.lists(
    st.one_of(json_values.map(json.dumps), row_like.map(json.dumps), st.binary(max_size=40), st.just("[" * 3000)),
    min_size=1,
    max_size=6,
)


def _encoded(line) -> bytes:
    return (line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")).replace(b"\n", b" ")


@PROPERTY
@given(lines=lines, skip_bad=st.booleans())
def test_property_corpus_reader(tmp_path, lines, skip_bad):
    path = _write(tmp_path / "c.jsonl", [_encoded(x) for x in lines])
    reader = read_corpus(path, skip_bad=skip_bad, limits=TextLimits(max_line_bytes=2000))
    try:
        rows = [p for _, p in reader]
    except CorpusError as e:
        assert str(e).startswith(f"{path}:") and not skip_bad
        return
    for p in rows:
        json.dumps(p.contents, ensure_ascii=False).encode("utf-8")  # every yielded row is writable text
    assert reader.stats.rows + reader.stats.skipped + reader.stats.blank == reader.stats.lines
    assert len(reader.stats.first_errors) == min(reader.stats.skipped, 20)


@PROPERTY
@given(lines=lines, skip_bad=st.booleans())
def test_property_flashrag_reader(tmp_path, lines, skip_bad):
    path = _write(tmp_path / "qa.jsonl", [_encoded(x) for x in lines])
    try:
        report = read_flashrag_jsonl(path, skip_bad=skip_bad, limits=TextLimits(max_line_bytes=2000))
    except QADataError as e:
        assert str(e).startswith(f"{path}")
        return
    for ex in report.examples:
        (ex.id + ex.question + "".join(ex.golden_answers)).encode("utf-8")
    assert all(p.startswith(f"{path}:") for p in report.problems)


@PROPERTY
@given(data=st.binary(max_size=400), prefix=st.sampled_from([b"", b"PAR1"]))
def test_property_parquet_reader_on_random_bytes(tmp_path, data, prefix):
    path = tmp_path / "x.parquet"
    path.write_bytes(prefix + data + prefix)
    with pytest.raises(InputError, match=f"^{path}: "):
        read_search_r1_parquet(str(path), skip_bad=True)

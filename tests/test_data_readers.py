"""QA file readers (FlashRAG JSONL, Search-R1 parquet), their bad-row policy, and the TFDS builds over them.

Every fixture is generated here, in a tmp dir, in the real formats (docs/algorithm.md#data-and-evaluation),
including malformed rows.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rexrag_jax.data import QADataError, QAExample, read_flashrag_jsonl, read_qa_file, read_search_r1_parquet
from rexrag_jax.data.prompts import build_prompt

# ----------------------------------------------------------------------------------------------- fixtures


def write_lines(path, lines) -> str:
    """Write raw lines (bytes, str, or JSON-able objects) as a JSONL file."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line)
            elif isinstance(line, str):
                f.write(line.encode("utf-8"))
            else:
                f.write(json.dumps(line).encode("utf-8"))
            f.write(b"\n")
    return str(path)


def flashrag_rows(prefix: str, n: int, split: str = "test") -> list[dict]:
    return [
        {
            "id": f"{split}_{i}",
            "question": f"{prefix} question {i}",
            "golden_answers": [f"{prefix} ans {i}"],
            "metadata": {"type": "fixture"},
        }
        for i in range(n)
    ]


SR1_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        (
            "reward_model",
            pa.struct([("ground_truth", pa.struct([("target", pa.list_(pa.string()))])), ("style", pa.string())]),
        ),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)


def sr1_row(source: str, split: str, index: int, question: str, targets: list[str]) -> dict:
    return {
        "data_source": source,
        "prompt": [{"content": build_prompt(question), "role": "user"}],
        "ability": "fact-reasoning",
        "reward_model": {"ground_truth": {"target": targets}, "style": "rule"},
        "extra_info": {"index": index, "split": split},
    }


def write_parquet(path, rows: list[dict], *, bad_utf8_row: int | None = None) -> str:
    table = pa.Table.from_pylist(rows, schema=SR1_SCHEMA)
    if bad_utf8_row is not None:  # a string column whose bytes are not UTF-8 (pyarrow does not check on read)
        sources = [r["data_source"].encode() for r in rows]
        sources[bad_utf8_row] = b"\xffnq"
        column = pa.array(sources, pa.binary()).view(pa.string())
        table = table.set_column(0, "data_source", column)
    pq.write_table(table, str(path))
    return str(path)


def sr1_rows(source: str, split: str, n: int) -> list[dict]:
    return [sr1_row(source, split, i, f"{source} question {i}", [f"{source} ans {i}"]) for i in range(n)]


# ------------------------------------------------------------------------------------------ FlashRAG JSONL


def test_flashrag_valid_rows(tmp_path):
    path = write_lines(
        tmp_path / "nq.jsonl",
        [
            {
                "id": "test_0",
                "question": "  who wrote hamlet ",
                "golden_answers": ["Shakespeare", " W. Shakespeare "],
                "metadata": {"x": 1},
                "extra": [1, 2],
            },
            "",
            {"id": 7, "question": "capital of France?", "golden_answers": ["Paris", "  ", ""]},
        ],
    )
    report = read_flashrag_jsonl(path, source="nq")
    assert report.skipped == 0 and report.problems == []
    assert report.examples == [
        QAExample("test_0", "who wrote hamlet?", ("Shakespeare", "W. Shakespeare"), "nq"),
        QAExample("7", "capital of France?", ("Paris",), "nq"),
    ]
    assert read_qa_file(path, source="nq").examples == report.examples


def test_flashrag_bom_is_dropped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "question": "q", "golden_answers": ["x"]}).encode())
    assert read_flashrag_jsonl(str(path)).examples == [QAExample("a", "q?", ("x",))]


GOOD = {"id": "ok", "question": "fine", "golden_answers": ["yes"]}
BAD_LINES = [
    pytest.param(b'{"id": "x", "question": "q", "golden_answers": ["a"]', "invalid JSON", id="malformed-json"),
    pytest.param(b'{"id": "x", "question": "caf\xe9", "golden_answers": ["a"]}', "invalid UTF-8", id="not-utf8"),
    pytest.param({"id": "x", "question": "q"}, "missing field(s) 'golden_answers'", id="missing-golden"),
    pytest.param({"question": "q", "golden_answers": ["a"]}, "missing field(s) 'id'", id="missing-id"),
    pytest.param(
        {"id": "x", "question": "q", "golden_answers": []}, "'golden_answers' has no non-blank answer", id="empty-list"
    ),
    pytest.param(
        {"id": "x", "question": "q", "golden_answers": [" ", ""]},
        "'golden_answers' has no non-blank answer",
        id="blank",
    ),
    pytest.param(
        {"id": "x", "question": "q", "golden_answers": "a"},
        "'golden_answers' must be a list of strings, got a string",
        id="golden-is-string",
    ),
    pytest.param(
        {"id": "x", "question": "q", "golden_answers": ["a", 3]}, "golden_answers[1] must be a string", id="golden-int"
    ),
    pytest.param({"id": ["x"], "question": "q", "golden_answers": ["a"]}, "'id' must be", id="id-list"),
    pytest.param({"id": True, "question": "q", "golden_answers": ["a"]}, "'id' must be", id="id-bool"),
    pytest.param({"id": "x", "question": 12, "golden_answers": ["a"]}, "'question' must be", id="question-int"),
    pytest.param({"id": "x", "question": "   ", "golden_answers": ["a"]}, "'question' must be", id="question-blank"),
    pytest.param(["x", "q", ["a"]], "expected a JSON object, got a list", id="not-object"),
    pytest.param(
        {"id": "ok", "question": "again", "golden_answers": ["a"]},
        "duplicate id 'ok' (first at line 1)",
        id="duplicate-id",
    ),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_flashrag_bad_row_names_file_and_line(tmp_path, bad, reason):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", bad])
    with pytest.raises(QADataError, match=re.escape(f"{path}:3: {reason}")):
        read_flashrag_jsonl(path)
    report = read_flashrag_jsonl(path, skip_bad=True)
    assert report.examples == [QAExample("ok", "fine?", ("yes",))]
    assert report.skipped == 1 and len(report.problems) == 1 and report.problems[0].startswith(f"{path}:3: ")


def test_flashrag_skip_bad_counts_and_keeps_first_duplicate(tmp_path):
    lines = [{"id": "a", "question": "first", "golden_answers": ["1"]}]
    lines += [b"{broken"] * 25
    lines += [
        {"id": "a", "question": "second", "golden_answers": ["2"]},
        {"id": "b", "question": "third", "golden_answers": ["3"]},
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    report = read_flashrag_jsonl(path, skip_bad=True)
    assert [(e.id, e.question) for e in report.examples] == [("a", "first?"), ("b", "third?")]
    assert report.skipped == 26
    assert len(report.problems) == 20  # only the first ones are kept
    assert report.problems[0].startswith(f"{path}:2: invalid JSON")


def test_flashrag_file_level_errors(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [b"{nope", {"id": "x", "question": "q", "golden_answers": []}])
    with pytest.raises(QADataError, match=r"no valid QA rows; 2 bad row\(s\) skipped"):
        read_flashrag_jsonl(path, skip_bad=True)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(QADataError, match=f"{re.escape(empty)}: no valid QA rows$"):
        read_flashrag_jsonl(empty, skip_bad=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_flashrag_jsonl(str(tmp_path / "missing.jsonl"))
    array = tmp_path / "array.json"
    array.write_text('[\n{"id": "a", "question": "q", "golden_answers": ["x"]}\n]\n')
    with pytest.raises(QADataError, match="looks like one JSON array"):
        read_qa_file(str(array))
    with pytest.raises(QADataError, match="unknown QA file type"):
        read_qa_file(str(tmp_path / "x.csv"))


# ------------------------------------------------------------------------------------------ Search-R1 parquet


def test_search_r1_parquet_rows(tmp_path):
    rows = sr1_rows("nq", "train", 3) + sr1_rows("hotpotqa", "train", 2)
    rows[1]["reward_model"]["ground_truth"]["target"] = ["  a ", "", "b"]
    rows[2]["prompt"] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Question: ignore me. Question:   what is it  \n"},
    ]
    path = write_parquet(tmp_path / "train.parquet", rows)
    report = read_search_r1_parquet(path)
    assert report.skipped == 0
    assert [e.id for e in report.examples] == [
        "nq-train-0",
        "nq-train-1",
        "nq-train-2",
        "hotpotqa-train-0",
        "hotpotqa-train-1",
    ]
    assert report.examples[0] == QAExample("nq-train-0", "nq question 0?", ("nq ans 0",), "nq")
    assert report.examples[1].golden_answers == ("a", "b")
    assert report.examples[2].question == "what is it?"
    assert report.examples[3].source == "hotpotqa"
    assert read_qa_file(path, source="ignored").examples == report.examples


TARGET = "'reward_model.ground_truth.target'"


@pytest.mark.parametrize(
    "mutate,reason",
    [
        pytest.param(
            lambda r: r["reward_model"]["ground_truth"].update(target=[]),
            f"{TARGET} has no non-blank answer",
            id="empty",
        ),
        pytest.param(
            lambda r: r["reward_model"]["ground_truth"].update(target=None), f"{TARGET} must be a list", id="null"
        ),
        pytest.param(
            lambda r: r.update(prompt=[{"role": "user", "content": "no marker here"}]),
            "the user message has no 'Question:'",
            id="no-marker",
        ),
        pytest.param(
            lambda r: r.update(prompt=[{"role": "assistant", "content": "Question: q"}]),
            "'prompt' has no user message",
            id="no-user",
        ),
        pytest.param(lambda r: r.update(extra_info=None), "'extra_info' must be", id="no-extra-info"),
        pytest.param(
            lambda r: r["extra_info"].update(index=None), "'extra_info.index' must be an integer", id="no-index"
        ),
        pytest.param(lambda r: r.update(data_source=None), "'data_source' must be", id="no-source"),
        pytest.param(
            lambda r: r["extra_info"].update(index=0), "duplicate id 'nq-test-0' (first at row 0)", id="duplicate"
        ),
    ],
)
def test_search_r1_bad_row(tmp_path, mutate, reason):
    rows = sr1_rows("nq", "test", 4)
    mutate(rows[2])
    path = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.raises(QADataError, match=re.escape(f"{path}: row 2: {reason}")):
        read_search_r1_parquet(path)
    report = read_search_r1_parquet(path, skip_bad=True)
    assert [e.id for e in report.examples] == ["nq-test-0", "nq-test-1", "nq-test-3"]
    assert report.skipped == 1 and report.problems[0].startswith(f"{path}: row 2: ")


def test_search_r1_non_utf8_and_file_errors(tmp_path):
    path = write_parquet(tmp_path / "u.parquet", sr1_rows("nq", "test", 5), bad_utf8_row=3)
    with pytest.raises(QADataError, match=re.escape(f"{path}: row 3: invalid UTF-8")):
        read_search_r1_parquet(path)
    report = read_search_r1_parquet(path, skip_bad=True)
    assert [e.id for e in report.examples] == ["nq-test-0", "nq-test-1", "nq-test-2", "nq-test-4"]
    assert report.skipped == 1

    no_col = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"data_source": ["nq"], "prompt": ["x"]}), str(no_col))
    with pytest.raises(QADataError, match=r"not a Search-R1 parquet file: no column\(s\) \['reward_model'"):
        read_search_r1_parquet(str(no_col))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(QADataError, match="not a readable parquet file"):
        read_search_r1_parquet(str(junk))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_qa_file(str(tmp_path / "missing.parquet"))
    all_bad = [sr1_row("nq", "test", 0, "q", [])]
    with pytest.raises(QADataError, match="no valid QA rows"):
        read_search_r1_parquet(write_parquet(tmp_path / "allbad.parquet", all_bad), skip_bad=True)


# ------------------------------------------------------------------------------------- FlashRAG folder layout


def test_flashrag_split_file(tmp_path):
    from rexrag_jax.data.tfds_builders import flashrag_split_file, flashrag_train_files

    root = tmp_path / "flashrag"
    for name, files in {"nq": ["train", "dev", "test"], "hotpotqa": ["train", "dev"], "popqa": ["train"]}.items():
        (root / name).mkdir(parents=True)
        for split in files:
            write_lines(root / name / f"{split}.jsonl", flashrag_rows(name, 1, split))
    assert flashrag_split_file(str(root), "nq") == ("test", str(root / "nq" / "test.jsonl"))
    assert flashrag_split_file(str(root), "hotpotqa") == ("dev", str(root / "hotpotqa" / "dev.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"neither test.jsonl nor dev.jsonl \(it has \['train.jsonl'\]\)"):
        flashrag_split_file(str(root), "popqa")
    with pytest.raises(FileNotFoundError, match=r"has \['hotpotqa', 'nq', 'popqa'\]"):
        flashrag_split_file(str(root), "musique")
    assert flashrag_train_files(str(root)) == [str(root / "nq" / "train.jsonl"), str(root / "hotpotqa" / "train.jsonl")]


# ------------------------------------------------------------------------------------------------ TFDS builds


@pytest.fixture(scope="module")
def flashrag_root(tmp_path_factory):
    """A tiny FlashRAG tree: every eval set with test or dev, NQ and HotpotQA with train."""
    root = tmp_path_factory.mktemp("flashrag")
    sizes = {"nq": 5, "triviaqa": 4, "popqa": 3, "hotpotqa": 6, "2wikimultihopqa": 3, "musique": 2, "bamboogle": 2}
    for name, n in sizes.items():
        (root / name).mkdir()
        split = "dev" if name in ("hotpotqa", "2wikimultihopqa", "musique") else "test"
        write_lines(root / name / f"{split}.jsonl", flashrag_rows(name, n, split))
    for name in ("nq", "hotpotqa"):
        write_lines(root / name / "train.jsonl", flashrag_rows(name, 7, "train"))
    return str(root)


@pytest.fixture(scope="module")
def built(flashrag_root, tmp_path_factory):
    """All 7 eval sets and the training mix, built once for the module."""
    from rexrag_jax.data.tfds_builders import (
        EVAL_DATASETS,
        TRAIN_MIX,
        build_dataset,
        flashrag_split_file,
        flashrag_train_files,
    )

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    reports = {}
    for name in EVAL_DATASETS:
        split, path = flashrag_split_file(flashrag_root, name)
        reports[name] = build_dataset(name, {split: path}, data_dir)
    reports[TRAIN_MIX] = build_dataset(TRAIN_MIX, {"train": flashrag_train_files(flashrag_root)}, data_dir)
    return data_dir, reports


def test_build_all_and_read_back(built, flashrag_root):
    from rexrag_jax.data.tfds_builders import EVAL_DATASETS, TRAIN_MIX, flashrag_split_file, load_split

    data_dir, reports = built
    for name in EVAL_DATASETS:
        split, path = flashrag_split_file(flashrag_root, name)
        expected = read_flashrag_jsonl(path, source=name).examples
        assert reports[name]["rebuilt"] and reports[name]["splits"][split]["examples"] == len(expected)
        assert reports[name]["source_files"][split][0]["path"] == path
        src = load_split(name, split, data_dir)
        assert len(src) == len(expected)
        assert [src[i] for i in range(len(src))] == expected  # file order, decoded to str
        assert list(src) == expected and src[-1] == expected[-1]
        with pytest.raises(IndexError):
            src[len(src)]
    mix = load_split(TRAIN_MIX, "train", data_dir)
    assert len(mix) == 14
    assert mix[0] == QAExample("nq-train_0", "nq question 0?", ("nq ans 0",), "nq")
    assert mix[7] == QAExample("hotpotqa-train_0", "hotpotqa question 0?", ("hotpotqa ans 0",), "hotpotqa")
    assert len({ex.id for ex in mix}) == 14
    assert reports[TRAIN_MIX]["splits"]["train"]["sources"] == {"hotpotqa": 7, "nq": 7}
    assert "tensorflow" not in sys.modules
    json.dumps(reports)  # the reports are plain JSON


def test_load_split_errors(built, tmp_path):
    from rexrag_jax.data.tfds_builders import build_dataset, load_split

    data_dir, _ = built
    with pytest.raises(KeyError, match=r"no split 'dev'; it has \['test'\]"):
        load_split("nq", "dev", data_dir)
    with pytest.raises(FileNotFoundError, match="is not built"):
        load_split("nq", "test", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'squad'"):
        build_dataset("squad", {"test": "x.jsonl"}, str(tmp_path))


def test_rebuild_only_when_inputs_change(tmp_path):
    from rexrag_jax.data.tfds_builders import build_dataset, load_split

    path = write_lines(tmp_path / "test.jsonl", flashrag_rows("bamboogle", 3))
    data_dir = str(tmp_path / "tfds")
    first = build_dataset("bamboogle", {"test": path}, data_dir)
    assert first["rebuilt"] and first["splits"]["test"]["examples"] == 3
    again = build_dataset("bamboogle", {"test": path}, data_dir)
    assert not again["rebuilt"] and {**again, "rebuilt": True} == first

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: sha256 says unchanged
    assert not build_dataset("bamboogle", {"test": path}, data_dir)["rebuilt"]

    rows = flashrag_rows("bamboogle", 3)
    rows[1]["question"] = rows[1]["question"].replace("question", "qu3stion")  # same size, new content
    write_lines(path, rows)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert os.path.getsize(path) == st.st_size
    changed = build_dataset("bamboogle", {"test": path}, data_dir)
    assert changed["rebuilt"]
    assert load_split("bamboogle", "test", data_dir)[1].question == "bamboogle qu3stion 1?"

    write_lines(path, flashrag_rows("bamboogle", 4))  # new size
    assert build_dataset("bamboogle", {"test": path}, data_dir)["splits"]["test"]["examples"] == 4
    assert len(load_split("bamboogle", "test", data_dir)) == 4
    assert build_dataset("bamboogle", {"test": path}, data_dir, skip_bad=True)["rebuilt"]  # other options


def test_build_bad_rows_and_parquet_sources(tmp_path):
    from rexrag_jax.data.tfds_builders import TRAIN_MIX, build_dataset, load_split

    data_dir = str(tmp_path / "tfds")
    bad = write_lines(
        tmp_path / "test.jsonl",
        flashrag_rows("nq", 3) + [b"\xff\xfe", {"id": "test_0", "question": "dup", "golden_answers": ["x"]}],
    )
    with pytest.raises(QADataError, match=re.escape(f"{bad}:4: invalid UTF-8")):
        build_dataset("nq", {"test": bad}, data_dir)
    report = build_dataset("nq", {"test": bad}, data_dir, skip_bad=True)
    assert report["skipped"] == 2 and report["splits"]["test"]["examples"] == 3 and len(report["problems"]) == 2

    # REX-RAG's test.parquet holds every eval set: a build for one set keeps its rows only
    test_pq = write_parquet(tmp_path / "test.parquet", sr1_rows("nq", "test", 3) + sr1_rows("popqa", "test", 2))
    popqa = build_dataset("popqa", {"test": test_pq}, data_dir)
    assert popqa["splits"]["test"]["examples"] == 2 and popqa["splits"]["test"]["other_sources"] == 3
    assert [e.id for e in load_split("popqa", "test", data_dir)] == ["popqa-test-0", "popqa-test-1"]
    with pytest.raises(QADataError, match="no rows with data_source 'musique'"):
        build_dataset("musique", {"test": test_pq}, data_dir)

    # the mix from parquet + JSONL; ids stay unique, a repeated id across files is a duplicate
    train_pq = write_parquet(tmp_path / "train.parquet", sr1_rows("nq", "train", 4))
    (tmp_path / "hotpotqa").mkdir()
    hotpot = write_lines(tmp_path / "hotpotqa" / "train.jsonl", flashrag_rows("hotpotqa", 3, "train"))
    mix = build_dataset(TRAIN_MIX, {"train": [train_pq, hotpot]}, data_dir)
    assert mix["splits"]["train"]["sources"] == {"hotpotqa": 3, "nq": 4}
    ids = [e.id for e in load_split(TRAIN_MIX, "train", data_dir)]
    assert ids == [f"nq-train-{i}" for i in range(4)] + [f"hotpotqa-train_{i}" for i in range(3)]
    clash = write_parquet(tmp_path / "clash.parquet", sr1_rows("nq", "train", 2))
    with pytest.raises(QADataError, match=re.escape(f"{clash}: duplicate id 'nq-train-0' (already in {train_pq})")):
        build_dataset(TRAIN_MIX, {"train": [train_pq, clash]}, data_dir)
    skipped = build_dataset(TRAIN_MIX, {"train": [train_pq, clash, hotpot]}, data_dir, skip_bad=True)
    assert skipped["skipped"] == 2 and skipped["splits"]["train"]["examples"] == 7
    assert "tensorflow" not in sys.modules

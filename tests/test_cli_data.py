"""`rexrag-data build`: a FlashRAG folder or named files into TFDS datasets; bad rows as errors or skipped."""

import json
import os

from rexrag_jax.cli.data import main
from rexrag_jax.data.tfds_builders import load_split


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def row(i, q="q", a=("a",)):
    return {"id": f"r{i}", "question": f"{q} {i}", "golden_answers": list(a)}


def test_build_a_flashrag_folder(tmp_path, capsys):
    root = tmp_path / "flashrag"
    write(str(root / "nq" / "test.jsonl"), [row(0), row(1)])
    write(str(root / "nq" / "train.jsonl"), [row(0), row(1), row(2)])
    write(str(root / "hotpotqa" / "dev.jsonl"), [row(0)])
    write(str(root / "hotpotqa" / "train.jsonl"), [row(5)])
    out = str(tmp_path / "tfds")
    assert main(["build", "--flashrag", str(root), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "nq: built (test 2; 0 bad rows skipped)" in printed and "hotpotqa: built (dev 1;" in printed
    assert "nq_hotpotqa: built (train 4;" in printed
    assert len(load_split("nq_hotpotqa", "train", out)) == 4 and load_split("hotpotqa", "dev", out)[0].question == "q 0?"
    assert main(["build", "--flashrag", str(root), "--out", out]) == 0
    assert "nq: up to date" in capsys.readouterr().out


def test_bad_rows_stop_or_are_skipped(tmp_path, capsys):
    path = str(tmp_path / "train.jsonl")
    write(path, [row(0), "{not json", row(2)])
    out = str(tmp_path / "tfds")
    assert main(["build", "--dataset", "nq", "--file", path, "--out", out]) == 2
    assert f"{path}:2:" in capsys.readouterr().err
    assert main(["build", "--dataset", "nq", "--file", path, "--out", out, "--skip-bad"]) == 0
    assert "nq: built (train 2; 1 bad rows skipped)" in capsys.readouterr().out
    assert main(["build", "--out", out]) == 2 and "either --flashrag" in capsys.readouterr().err

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
    assert len(load_split("nq_hotpotqa", "train", out)) == 4
    assert load_split("hotpotqa", "dev", out)[0].question == "q 0?"
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


def test_bad_row_errors_name_the_flags_users_type(tmp_path, capsys):
    """The skip hint names `--skip-bad` (rexrag-data) and `--config.data.skip_bad=True` (rexrag-train /
    -eval), never the Python argument `skip_bad=True` alone; also for an id repeated across files."""
    bad, a, b = (str(tmp_path / name) for name in ("bad.jsonl", "a.jsonl", "b.jsonl"))
    write(bad, [row(0), "{not json"])
    write(a, [row(0)])
    write(b, [row(0)])  # the same id in a second file of the split
    for files in ([bad], [a, b]):
        assert main(["build", "--dataset", "nq", "--file", *files, "--out", str(tmp_path / "tfds")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        assert "--skip-bad with rexrag-data" in err and "--config.data.skip_bad=True with rexrag-train" in err, err
        assert "pass skip_bad" not in err


def test_a_local_build_prints_no_tfds_download_messages(tmp_path, capsys):
    """tfds announced "Downloading and preparing dataset Unknown size ..." (nothing is downloaded) and the
    staging directory it built in; rexrag-data's own summary line is all that is printed."""
    path = str(tmp_path / "test.jsonl")
    write(path, [row(0), row(1)])
    assert main(["build", "--dataset", "nq", "--split", "test", "--file", path, "--out", str(tmp_path / "tfds")]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    for noise in ("Downloading", "Unknown size", "downloaded and prepared", "Generating", "Shuffling"):
        assert noise not in printed, printed
    assert captured.out.strip() == "nq: built (test 2; 0 bad rows skipped)"

"""`rexrag-index` and `rexrag-retrieve`: parsing, --help, clear errors with exit 2, and the wiring to the library."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import types
import zlib

import numpy as np
import pytest

import rexrag_jax.retrieval.server as server_module
from rexrag_jax.cli import index as index_cli
from rexrag_jax.cli import serve as serve_cli
from rexrag_jax.retrieval.client import RetrievalClient
from rexrag_jax.retrieval.types import Hit
from rexrag_jax.untrusted import TextLimits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_traceback(text):
    return "Traceback" not in text


# --- parsing and --help -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "main,argv,expected",
    [
        (index_cli.main, ["--help"], "build"),
        (index_cli.main, ["build", "--help"], "--skip-bad-lines"),
        (serve_cli.main, ["--help"], "serve"),
        (serve_cli.main, ["serve", "--help"], "--max-topk"),
    ],
)
def test_help(capsys, main, argv, expected):
    assert main(argv) == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize(
    "main,argv,message",
    [
        (index_cli.main, [], "required: COMMAND"),
        (index_cli.main, ["frobnicate"], "invalid choice"),
        (index_cli.main, ["build", "--corpus", "c.jsonl"], "--encoder, --out"),
        (
            index_cli.main,
            ["build", "--corpus", "c", "--encoder", "e", "--out", "o", "--batch-size", "0"],
            "must be >= 1",
        ),
        (index_cli.main, ["build", "--corpus", "c", "--encoder", "e", "--out", "o", "--backend", "faiss"], "faiss"),
        (serve_cli.main, ["serve"], "--index"),
        (serve_cli.main, ["serve", "--index", "i", "--port", "70000"], "must be in 0..65535"),
        (serve_cli.main, ["serve", "--index", "i", "--max-queries", "x"], "not an integer: 'x'"),
    ],
)
def test_usage_errors_exit_2(capsys, main, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_inputs_exit_2_with_clear_message(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    argv = ["build", "--corpus", str(corpus), "--encoder", str(tmp_path), "--out", str(tmp_path / "idx")]
    assert index_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: corpus file not found: {corpus}\n"
    corpus.write_text('{"id": "1", "contents": "x"}\n')
    argv[4] = str(tmp_path / "no-encoder")
    assert index_cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: encoder directory not found: {tmp_path / 'no-encoder'}\n"
    assert serve_cli.main(["serve", "--index", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: index directory not found: {tmp_path / 'nope'}\n"
    assert serve_cli.main(["serve", "--index", str(tmp_path), "--default-topk", "5", "--max-topk", "4"]) == 2
    assert "--default-topk (5) exceeds --max-topk (4)" in capsys.readouterr().err


def test_console_entry_points_in_subprocesses(tmp_path):
    """`cli()` exits with main()'s status; errors are one line on stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = [sys.executable, "-c", "import sys; from rexrag_jax.cli.{0} import cli; sys.argv[0] = 'x'; cli()"]
    proc = subprocess.run(
        [
            run[0],
            run[1],
            run[2].format("index"),
            "build",
            "--corpus",
            str(tmp_path / "c.jsonl"),
            "--encoder",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: corpus file not found") and proc.stdout == ""
    proc = subprocess.run(
        [run[0], run[1], run[2].format("serve"), "serve", "--index", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2 and "index directory not found" in proc.stderr and _no_traceback(proc.stderr)


# --- wiring, with the library replaced by fakes ----------------------------------------------------
class FakeIndex:
    num_docs = 10

    def __init__(self):
        self.closed = False

    def search(self, queries, k):
        return [[Hit(f"{q}#{r}", q, 1.0) for r in range(k)] for q in queries]

    def close(self):
        self.closed = True


def test_build_passes_options_and_prints_summary(tmp_path, monkeypatch, capsys):
    (tmp_path / "corpus.jsonl").write_text('{"id": "1", "contents": "x"}\n')
    (tmp_path / "enc").mkdir()
    calls = {}

    def build_index(corpus, encoder, out, **kwargs):
        calls.update(corpus=corpus, encoder=encoder, out=out, **kwargs)
        return {"counts": {"rows": 1, "skipped": 2}, "dim": 8, "backend": "exact"}

    monkeypatch.setitem(
        sys.modules,
        "rexrag_jax.retrieval.encoder",
        types.SimpleNamespace(load_encoder=lambda path: f"encoder at {path}"),
    )
    monkeypatch.setitem(sys.modules, "rexrag_jax.retrieval.index", types.SimpleNamespace(build_index=build_index))
    argv = [
        "build",
        "--corpus",
        str(tmp_path / "corpus.jsonl"),
        "--encoder",
        str(tmp_path / "enc"),
        "--out",
        str(tmp_path / "idx"),
        "--backend",
        "exact",
        "--batch-size",
        "16",
        "--skip-bad-lines",
        "--no-resume",
        "--checkpoint-rows",
        "100",
        "--max-line-bytes",
        "5000",
    ]
    assert index_cli.main(argv) == 0
    assert calls == {
        "corpus": str(tmp_path / "corpus.jsonl"),
        "encoder": f"encoder at {tmp_path / 'enc'}",
        "out": str(tmp_path / "idx"),
        "backend": "exact",
        "batch_size": 16,
        "skip_bad": True,
        "resume": False,
        "chunk_rows": 100,
        "limits": TextLimits(max_line_bytes=5000),
    }
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"indexed 1 passages into {re.escape(str(tmp_path / 'idx'))} \(2 bad lines skipped\): "
        r"dim 8, backend exact, \d+\.\d s\n",
        out,
    )

    def failing_build(*args, **kwargs):
        raise ValueError(f"{tmp_path / 'corpus.jsonl'}:1: 'contents' must be a string")

    monkeypatch.setitem(sys.modules, "rexrag_jax.retrieval.index", types.SimpleNamespace(build_index=failing_build))
    assert index_cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'corpus.jsonl'}:1: 'contents' must be a string\n"


def test_serve_loads_the_index_and_closes_it(tmp_path, monkeypatch):
    index = FakeIndex()
    seen = {}

    def load_index(path, *, encoder=None, backend=None):
        seen.update(path=path, encoder=encoder, backend=backend)
        return index

    def fake_serve(searcher, host, port, **limits):
        seen.update(searcher=searcher, host=host, port=port, limits=limits)

    monkeypatch.setitem(sys.modules, "rexrag_jax.retrieval.index", types.SimpleNamespace(load_index=load_index))
    monkeypatch.setattr(server_module, "serve", fake_serve)
    argv = [
        "serve",
        "--index",
        str(tmp_path),
        "--port",
        "0",
        "--max-queries",
        "7",
        "--max-topk",
        "9",
        "--backend",
        "exact",
    ]
    assert serve_cli.main(argv) == 0
    assert seen == {
        "path": str(tmp_path),
        "encoder": None,
        "backend": "exact",
        "searcher": index,
        "host": "127.0.0.1",
        "port": 0,
        "limits": {"max_queries": 7, "max_topk": 9, "default_topk": 3},
    }
    assert index.closed


def test_serve_reports_a_busy_port(tmp_path, monkeypatch, capsys):
    index = FakeIndex()
    monkeypatch.setitem(
        sys.modules, "rexrag_jax.retrieval.index", types.SimpleNamespace(load_index=lambda path, **kw: index)
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve_cli.main(["serve", "--index", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and _no_traceback(err)
    assert index.closed


# --- end to end with the real index and a tiny deterministic encoder ------------------------------
class HashEncoder:
    """Bag of hashed words, L2-normalised: exact-match words decide the ranking, no model needed."""

    dim = 64

    def describe(self):
        return {"name": "hash-bow", "dim": self.dim}

    def encode(self, texts, kind="query", *, batch_size=64, progress=False):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


CORPUS = [
    {"id": "0", "contents": '"Paris"\nParis is the capital of France.'},
    {"id": "1", "contents": '"Berlin"\nBerlin is the capital of Germany.'},
    {"id": "2", "contents": '"Jupiter"\nJupiter is the largest planet.'},
    {"id": "3", "contents": '"Nile"\nThe Nile is a river in Africa.'},
]


def test_build_then_serve_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("rexrag_jax.retrieval.index")
    encoder_module = pytest.importorskip("rexrag_jax.retrieval.encoder")
    monkeypatch.setattr(encoder_module, "load_encoder", lambda path, *a, **kw: HashEncoder())
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "idx"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in CORPUS) + "not json\n")
    (tmp_path / "enc").mkdir()
    argv = [
        "build",
        "--corpus",
        str(corpus),
        "--encoder",
        str(tmp_path / "enc"),
        "--out",
        str(out),
        "--backend",
        "exact",
    ]
    assert index_cli.main(argv) == 2  # the bad last line stops the build, naming file and line
    err = capsys.readouterr().err
    assert err.startswith(f"error: {corpus}:5") and _no_traceback(err)
    assert index_cli.main(argv + ["--skip-bad-lines", "--no-resume"]) == 0
    assert f"indexed 4 passages into {out} (1 bad lines skipped): dim 64, backend exact" in capsys.readouterr().out

    answers = {}

    def serve_once(searcher, host, port, **limits):  # the real server, stopped after one client round trip
        server = server_module.make_server(searcher, host, port, **limits)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            answers["hits"] = RetrievalClient(server.url).search(["capital of Germany", "largest planet"], k=2)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)

    monkeypatch.setattr(server_module, "serve", serve_once)
    assert serve_cli.main(["serve", "--index", str(out), "--port", "0", "--encoder", str(tmp_path / "enc")]) == 0
    hits = answers["hits"]
    assert [h.id for h in hits[0]][0] == "1" and [h.id for h in hits[1]][0] == "2"
    assert all(len(row) == 2 and row[0].score >= row[1].score for row in hits)


def test_checkpoint_rows_default_matches_the_library():
    from rexrag_jax.retrieval.index import CHECKPOINT_ROWS

    assert index_cli.CHECKPOINT_ROWS == CHECKPOINT_ROWS
    assert (
        f"default: {CHECKPOINT_ROWS}"
        in index_cli.build_parser()._subparsers._group_actions[0].choices["build"].format_help()
    )

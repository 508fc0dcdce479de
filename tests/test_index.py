"""Searchers (exact vs numpy, ScaNN recall), build -> load -> search, interrupted + resumed builds, threads."""

import hashlib
import json
import os
import random
import re
import threading

import numpy as np
import pytest

from rexrag_jax.retrieval import searchers as searchers_mod
from rexrag_jax.retrieval.corpus import CorpusError
from rexrag_jax.retrieval.index import ExactSearcher, ScannSearcher, build_index, load_index, scann_params

needs_scann = pytest.mark.skipif(not searchers_mod.scann_available(), reason="scann is not importable here")


class FakeEncoder:
    """Deterministic stand-in for the real encoder: hashed bag of words -> fixed random projection -> L2."""

    def __init__(self, dim: int = 48, buckets: int = 4096, seed: int = 0, fail_after: int | None = None):
        self.dim, self.buckets, self.fail_after, self.passage_calls = dim, buckets, fail_after, 0
        self.proj = np.random.default_rng(seed).standard_normal((buckets, dim)).astype(np.float32)

    def describe(self) -> dict:
        return {"path": "fake-encoder", "name": "fake", "dim": self.dim}

    def encode(self, texts, kind="query", *, batch_size=64, progress=False):
        if kind == "passage":
            self.passage_calls += 1
            if self.fail_after is not None and self.passage_calls > self.fail_after:
                raise RuntimeError("simulated crash")
        bow = np.zeros((len(texts), self.buckets), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                bow[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.buckets] += 1
        x = bow @ self.proj
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def make_corpus(path, n: int, *, bad: bool = False, seed: int = 0) -> list[str]:
    """n rows of random words (ints as ids); with `bad`, also junk lines, blank lines and duplicate ids."""
    rng = random.Random(seed)
    words = [f"word{i}" for i in range(3000)]
    lines, texts = [], []
    for i in range(n):
        text = f'"Title {i}"\n' + " ".join(rng.choices(words, k=10))
        texts.append(text)
        lines.append(json.dumps({"id": i, "contents": text}))
        if bad and i % 37 == 5:
            lines += ["{not json", "", json.dumps({"id": i, "contents": "a duplicate"})]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return texts


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: ties keep the lower row first
    return np.take_along_axis(scores, rows, axis=1), rows


@pytest.mark.parametrize("k", [1, 10, 200, 1000])
def test_exact_matches_numpy_with_ties_and_padding(k):
    rng = np.random.default_rng(k)
    x = rng.integers(-1, 2, (1000, 16)).astype(np.float32)  # small integers: exact scores, many ties
    q = rng.integers(-1, 2, (40, 16)).astype(np.float32)
    searcher = ExactSearcher(x, chunk_rows=128, max_query_batch=16)  # 1000 rows: last chunk is padded
    for n_queries in (1, 13, 40):
        scores, rows = searcher.search(q[:n_queries], k)
        want_scores, want_rows = numpy_topk(x, q[:n_queries], k)
        assert rows.dtype == np.int64 and rows.shape == (n_queries, k)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(scores, want_scores)


def test_exact_matches_numpy_on_float_data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((777, 24)).astype(np.float32)
    q = rng.standard_normal((5, 24)).astype(np.float32)
    scores, rows = ExactSearcher(x, chunk_rows=100).search(q, 25)
    want_scores, want_rows = numpy_topk(x, q, 25)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def clustered(n: int, dim: int, centres: int, rng) -> np.ndarray:
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@needs_scann
def test_scann_recall_at_10_vs_exact(tmp_path):
    rng = np.random.default_rng(0)
    x = clustered(20_000, 64, 200, rng)
    q = x[rng.integers(0, len(x), 300)] + 0.1 * rng.standard_normal((300, 64)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    params = scann_params(len(x))
    assert not params["brute_force"] and params["num_leaves"] == 141
    built = ScannSearcher.build(x, params)
    built.save(str(tmp_path))
    searcher = ScannSearcher.load(str(tmp_path), params)  # the serialized searcher is the one measured
    _, exact = ExactSearcher(x, chunk_rows=8192).search(q, 10)
    _, approx = searcher.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall >= 0.95, recall
    # a k beyond what the searched leaves hold still gets k real neighbours (ScaNN would pad with NaN)
    scores, rows = searcher.search(q[:2], 5000)
    assert np.isfinite(scores).all() and all(len(set(r)) == 5000 for r in rows)


@needs_scann
def test_scann_brute_force_below_threshold_is_exact():
    rng = np.random.default_rng(2)
    x = clustered(500, 32, 10, rng)
    params = scann_params(len(x))
    assert params == {"brute_force": True}
    scores, rows = ScannSearcher.build(x, params).search(x[:20], 5)
    want_scores, want_rows = numpy_topk(x, x[:20], 5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(20))
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


BACKENDS = ["exact", pytest.param("scann", marks=needs_scann)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_load_search_end_to_end(tmp_path, backend, capsys):
    texts = make_corpus(tmp_path / "c.jsonl", 300, bad=True)
    encoder = FakeEncoder()
    manifest = build_index(
        str(tmp_path / "c.jsonl"), encoder, str(tmp_path / "idx"), backend=backend, skip_bad=True, chunk_rows=64
    )
    assert "skipped 16 bad lines (8 duplicate ids), 8 blank lines" in capsys.readouterr().out
    assert manifest["counts"] == {"rows": 300, "skipped": 16, "duplicates": 8, "blank": 8, "lines": 324}
    assert manifest["backend"] == backend and manifest["dim"] == 48 and manifest["encoder"] == encoder.describe()
    assert manifest["corpus"]["sha256"] == hashlib.sha256((tmp_path / "c.jsonl").read_bytes()).hexdigest()
    assert manifest["first_errors"][0].endswith(
        "c.jsonl:7: invalid JSON: Expecting property name enclosed in double quotes at column 2"
    )
    files = ["manifest.json", "embeddings.f32", "docs.jsonl", "docs.offsets.npy"]
    assert sorted(os.listdir(tmp_path / "idx")) == sorted(files + (["scann"] if backend == "scann" else []))

    with load_index(str(tmp_path / "idx"), encoder=encoder) as index:
        assert index.num_docs == 300 and index.dim == 48
        queries = [texts[i] for i in (0, 17, 299)]
        results = index.search(queries, 3)
        assert [hits[0].id for hits in results] == ["0", "17", "299"]
        assert [hits[0].contents for hits in results] == queries
        assert all(len(hits) == 3 and hits[0].score == pytest.approx(1.0, abs=1e-5) for hits in results)
        assert all(hits[0].score >= hits[1].score >= hits[2].score for hits in results)
        assert results[0][0].to_search_r1() == {
            "document": {"id": "0", "contents": texts[0]},
            "score": results[0][0].score,
        }
        assert index.search([], 3) == []
        for bad_k in (0, 301, 2.0, True):
            with pytest.raises(ValueError, match="k must be an integer in 1..300"):
                index.search(["x"], bad_k)
        with pytest.raises(ValueError, match=r"queries\[1\] must be a string"):
            index.search(["x", 3], 1)
        with pytest.raises(ValueError, match="must have shape"):
            index.search_embeddings(np.zeros((2, 7), np.float32), 1)


def test_interrupted_build_resumes_byte_identical(tmp_path, capsys):
    corpus = str(tmp_path / "c.jsonl")
    make_corpus(corpus, 230, bad=True)
    reference = build_index(corpus, FakeEncoder(), str(tmp_path / "ref"), backend="exact", skip_bad=True, chunk_rows=50)

    out = str(tmp_path / "idx")
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(corpus, FakeEncoder(fail_after=2), out, backend="exact", skip_bad=True, chunk_rows=50)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(FileNotFoundError, match=f"index at {re.escape(out)} is incomplete: build was interrupted"):
        load_index(out, encoder=FakeEncoder())
    state = json.loads(open(os.path.join(out, "build_state.json")).read())
    assert state["rows"] == 100 and not state["encoded"]
    for name in ("embeddings.f32", "docs.jsonl"):  # a crash mid-write leaves bytes past the checkpoint
        with open(os.path.join(out, name), "ab") as f:
            f.write(b"torn write")

    encoder = FakeEncoder()
    capsys.readouterr()
    manifest = build_index(corpus, encoder, out, backend="exact", skip_bad=True, chunk_rows=50)
    assert "resuming the build" in capsys.readouterr().out
    assert encoder.passage_calls == 3  # rows 100..229: three chunks, nothing re-encoded
    for name in ("embeddings.f32", "docs.jsonl", "docs.offsets.npy"):
        assert (tmp_path / "idx" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert {k: v for k, v in manifest.items() if k != "created"} == {
        k: v for k, v in reference.items() if k != "created"
    }
    assert sorted(os.listdir(out)) == ["docs.jsonl", "docs.offsets.npy", "embeddings.f32", "manifest.json"]


def test_resume_after_a_bad_line_with_skip_bad(tmp_path):
    corpus = tmp_path / "c.jsonl"
    make_corpus(corpus, 150)
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[:120] + ["{broken\n"] + lines[120:]))
    out = str(tmp_path / "idx")
    with pytest.raises(CorpusError, match=r"c\.jsonl:121: invalid JSON"):
        build_index(str(corpus), FakeEncoder(), out, backend="exact", chunk_rows=50)
    encoder = FakeEncoder()
    manifest = build_index(str(corpus), encoder, out, backend="exact", chunk_rows=50, skip_bad=True)
    assert encoder.passage_calls == 1 and manifest["counts"]["rows"] == 150 and manifest["counts"]["skipped"] == 1
    reference = build_index(
        str(corpus), FakeEncoder(), str(tmp_path / "ref"), backend="exact", chunk_rows=50, skip_bad=True
    )
    assert (tmp_path / "idx" / "docs.jsonl").read_bytes() == (tmp_path / "ref" / "docs.jsonl").read_bytes()
    assert manifest["counts"] == reference["counts"] and manifest["first_errors"] == reference["first_errors"]


def test_resume_refuses_a_changed_corpus_and_no_resume_starts_over(tmp_path):
    corpus = str(tmp_path / "c.jsonl")
    make_corpus(corpus, 120)
    out = str(tmp_path / "idx")
    with pytest.raises(RuntimeError):
        build_index(corpus, FakeEncoder(fail_after=1), out, backend="exact", chunk_rows=50)
    data = open(corpus, "rb").read()
    open(corpus, "wb").write(data.replace(b"Title 3", b"Title X", 1))  # same size, different first rows
    with pytest.raises(ValueError, match="changed since the interrupted build"):
        build_index(corpus, FakeEncoder(), out, backend="exact", chunk_rows=50)
    with pytest.raises(ValueError, match="different encoder"):
        build_index(corpus, FakeEncoder(dim=16), out, backend="exact", chunk_rows=50)
    manifest = build_index(corpus, FakeEncoder(), out, backend="exact", chunk_rows=50, resume=False)
    assert manifest["counts"]["rows"] == 120


def test_complete_index_is_never_overwritten(tmp_path, capsys):
    corpus = str(tmp_path / "c.jsonl")
    make_corpus(corpus, 40)
    out = str(tmp_path / "idx")
    first = build_index(corpus, FakeEncoder(), out, backend="exact")
    assert build_index(corpus, FakeEncoder(), out, backend="exact") == first  # same inputs: a no-op
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="different encoder"):
        build_index(corpus, FakeEncoder(dim=16), out, backend="exact")
    make_corpus(corpus, 41)
    with pytest.raises(FileExistsError, match="different corpus"):
        build_index(corpus, FakeEncoder(), out, backend="exact")


def test_bad_corpus_fails_the_build_with_its_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    make_corpus(corpus, 10, bad=True)
    with pytest.raises(CorpusError, match=r"c\.jsonl:7: invalid JSON"):
        build_index(str(corpus), FakeEncoder(), str(tmp_path / "idx"), backend="exact")
    corpus.write_text("\n{oops\n")
    with pytest.raises(ValueError, match="no valid rows"):
        build_index(str(corpus), FakeEncoder(), str(tmp_path / "idx2"), backend="exact", skip_bad=True)


def test_load_index_errors(tmp_path):
    corpus = str(tmp_path / "c.jsonl")
    make_corpus(corpus, 30)
    out = tmp_path / "idx"
    build_index(corpus, FakeEncoder(), str(out), backend="exact")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_index(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not an index"):
        load_index(str(tmp_path))
    with pytest.raises(ValueError, match="encoder dim 16 does not match the index dim 48"):
        load_index(str(out), encoder=FakeEncoder(dim=16))
    with pytest.raises(ValueError, match="built without a ScaNN searcher"):
        load_index(str(out), encoder=FakeEncoder(), backend="scann")
    with open(out / "docs.jsonl", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="damaged: docs.jsonl has"):
        load_index(str(out), encoder=FakeEncoder())


def test_missing_scann(tmp_path, monkeypatch, capsys):
    def no_scann():
        raise ImportError("No module named 'scann'")

    monkeypatch.setattr(searchers_mod, "import_scann", no_scann)
    corpus = str(tmp_path / "c.jsonl")
    make_corpus(corpus, 20)
    with pytest.raises(RuntimeError, match=r"pip install scann==1\.4\.2.*backend 'exact'"):
        build_index(corpus, FakeEncoder(), str(tmp_path / "a"), backend="scann")
    assert build_index(corpus, FakeEncoder(), str(tmp_path / "b"))["backend"] == "exact"
    assert "scann is not importable" in capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_searches_match_sequential(tmp_path, backend):
    texts = make_corpus(tmp_path / "c.jsonl", 400)
    build_index(str(tmp_path / "c.jsonl"), FakeEncoder(), str(tmp_path / "idx"), backend=backend)
    with load_index(str(tmp_path / "idx"), encoder=FakeEncoder()) as index:
        batches = [[texts[(7 * t + j) % 400][:40] for j in range(1 + t % 5)] for t in range(24)]
        sequential = [index.search(b, 5) for b in batches]
        results = [None] * len(batches)

        def work(t):
            results[t] = index.search(batches[t], 5)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == sequential


def test_a_corpus_inside_the_output_directory_is_refused_untouched(tmp_path):
    # Was: `--corpus dd/docs.jsonl --out dd` truncated the corpus (the doc store's own name) before reading it.
    out = tmp_path / "dd"
    out.mkdir()
    corpus = out / "docs.jsonl"
    make_corpus(corpus, 20)
    before = corpus.read_bytes()
    with pytest.raises(ValueError, match="lies inside the output directory"):
        build_index(str(corpus), FakeEncoder(), str(out), backend="exact")
    assert corpus.read_bytes() == before and os.listdir(out) == ["docs.jsonl"]


def test_not_text_lines_are_skipped_by_a_build_with_skip_bad(tmp_path):
    # Was: a lone surrogate escape passed every check and crashed the doc store's UTF-8 write (a traceback).
    corpus = tmp_path / "c.jsonl"
    make_corpus(corpus, 30)
    lines = corpus.read_text().splitlines(keepends=True)
    deep = "[" * 5000 + "]" * 5000  # closed: Python 3.11 stops it in the parser, 3.12+ in the depth check
    corpus.write_text("".join(lines[:10] + ['{"id": "s", "contents": "\\ud800"}\n', deep + "\n"] + lines[10:]))
    with pytest.raises(CorpusError, match=r"c\.jsonl:11: 'contents' is not valid text: lone surrogate"):
        build_index(str(corpus), FakeEncoder(), str(tmp_path / "a"), backend="exact")
    manifest = build_index(str(corpus), FakeEncoder(), str(tmp_path / "b"), backend="exact", skip_bad=True)
    assert manifest["counts"]["rows"] == 30 and manifest["counts"]["skipped"] == 2
    assert "c.jsonl:12: nested more than 32 levels deep" in manifest["first_errors"][1]


def test_a_kill_loses_at_most_checkpoint_rows(tmp_path):
    corpus = str(tmp_path / "c.jsonl")
    make_corpus(corpus, 100)
    out = str(tmp_path / "idx")
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies while encoding the 4th chunk
        build_index(corpus, FakeEncoder(fail_after=3), out, backend="exact", chunk_rows=16)
    assert json.loads(open(os.path.join(out, "build_state.json")).read())["rows"] == 48
    with pytest.raises(ValueError, match="chunk_rows .* must be a positive integer"):
        build_index(corpus, FakeEncoder(), out, backend="exact", chunk_rows=0)

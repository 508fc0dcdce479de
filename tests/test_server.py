"""The Search-R1-compatible retrieval server and its client, against fake searchers on 127.0.0.1."""

import http.client
import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import rexrag_jax.retrieval.client as client_module
from rexrag_jax.retrieval.client import RetrievalClient, RetrievalError, parse_response
from rexrag_jax.retrieval.server import Limits, make_server
from rexrag_jax.retrieval.types import Hit


class FakeSearcher:
    """Deterministic hits (`"<query>#<rank>"`, scores 1.0, 0.75, ...); can fail or stall on demand."""

    num_docs = 50

    def __init__(self):
        self.fail = False
        self.wrong_shape = False
        self.delay = 0.0
        self.lock = threading.Lock()
        self.active = self.max_active = self.calls = 0

    def search(self, queries, k):
        with self.lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.fail:
                raise RuntimeError("index shard 3 is gone")
            time.sleep(self.delay)
            hits = [
                [Hit(f"{q}#{r}", f'"{q}"\nrank {r}', np.float32(1.0 - 0.25 * r)) for r in range(k)] for q in queries
            ]
            return hits[:-1] if self.wrong_shape else hits
        finally:
            with self.lock:
                self.active -= 1


def _start(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def running():
    searcher = FakeSearcher()
    server = make_server(searcher, "127.0.0.1", 0, max_queries=8, max_topk=10, max_body_bytes=4096, max_query_chars=100)
    thread = _start(server)
    yield server, searcher
    _stop(server, thread)


def _call(server, body=b"", method="POST", path="/retrieve", headers=None, conn=None):
    """One raw HTTP exchange; returns (status, headers, parsed JSON body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    try:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        conn.request(method, path, body=data if method == "POST" else None, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else None
    finally:
        if own:
            conn.close()


def _doc(q, r):
    return {"id": f"{q}#{r}", "contents": f'"{q}"\nrank {r}'}


# --- the Search-R1 schema --------------------------------------------------------------------------
def test_retrieve_with_scores_exact_json(running):
    server, _ = running
    status, headers, body = _call(server, {"queries": ["a", "b c"], "topk": 2, "return_scores": True})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == {
        "result": [
            [{"document": _doc("a", 0), "score": 1.0}, {"document": _doc("a", 1), "score": 0.75}],
            [{"document": _doc("b c", 0), "score": 1.0}, {"document": _doc("b c", 1), "score": 0.75}],
        ]
    }


def test_retrieve_without_scores_returns_bare_docs(running):
    server, _ = running
    status, _, body = _call(server, {"queries": ["a"], "topk": 2, "return_scores": False})
    assert status == 200 and body == {"result": [[_doc("a", 0), _doc("a", 1)]]}
    # Search-R1 defaults: return_scores false, topk = server default (3); an explicit null topk too.
    for request in ({"queries": ["a"]}, {"queries": ["a"], "topk": None}):
        assert _call(server, request)[2] == {"result": [[_doc("a", 0), _doc("a", 1), _doc("a", 2)]]}


def test_content_type_is_tolerated_and_health(running):
    server, _ = running
    status, _, body = _call(server, {"queries": ["x"], "topk": 1}, headers={"Content-Type": "text/plain"})
    assert status == 200 and body == {"result": [[_doc("x", 0)]]}
    status, _, body = _call(server, method="GET", path="/health")
    assert status == 200 and body == {"status": "ok", "num_docs": 50}


# --- validation -------------------------------------------------------------------------------------
BAD_REQUESTS = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({}, "missing required field 'queries'"),
    ({"queries": "who?"}, "'queries' must be a list"),
    ({"queries": []}, "'queries' is empty"),
    ({"queries": ["q"] * 9}, "at most 8"),
    ({"queries": ["ok", 3]}, "'queries[1]' must be a string"),
    ({"queries": ["ok", "ok", "  \n"]}, "'queries[2]' is empty"),
    ({"queries": ["x" * 101]}, "'queries[0]' has 101 characters"),
    ({"queries": ["q"], "topk": "3"}, "'topk' must be an integer"),
    ({"queries": ["q"], "topk": True}, "'topk' must be an integer, got bool"),
    ({"queries": ["q"], "topk": 2.0}, "'topk' must be an integer"),
    ({"queries": ["q"], "topk": 0}, "'topk' must be in 1..10"),
    ({"queries": ["q"], "topk": 11}, "'topk' must be in 1..10"),
    ({"queries": ["q"], "return_scores": "yes"}, "'return_scores' must be a boolean"),
    ({"queries": ["q"], "return_scores": 1}, "'return_scores' must be a boolean"),
    ({"queries": ["q"], "top_k": 3}, "unknown field(s) 'top_k'"),
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_are_400_naming_the_field(running, body, message):
    server, searcher = running
    status, _, reply = _call(server, body)
    assert status == 400, reply
    assert message in reply["error"]
    assert searcher.calls == 0


def test_topk_is_capped_by_num_docs():
    searcher = FakeSearcher()
    searcher.num_docs = 4
    server = make_server(searcher, "127.0.0.1", 0)
    thread = _start(server)
    try:
        status, _, reply = _call(server, {"queries": ["q"], "topk": 5})
        assert status == 400 and "'topk' must be in 1..4, got 5" in reply["error"]
        assert _call(server, {"queries": ["q"], "topk": 4})[0] == 200
    finally:
        _stop(server, thread)


def test_bad_request_keeps_the_connection_usable(running):
    server, _ = running
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    try:
        assert _call(server, b"nope", conn=conn)[0] == 400
        assert _call(server, {"queries": ["q"], "topk": 1}, conn=conn)[2] == {"result": [[_doc("q", 0)]]}
    finally:
        conn.close()


def _raw_post(server, headers, body=b""):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    try:
        conn.putrequest("POST", "/retrieve")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_length_required_and_body_too_large(running):
    server, searcher = running
    status, reply = _raw_post(server, {})
    assert status == 411 and "Content-Length" in reply["error"]
    # The server must answer 413 from the header alone, without waiting for a gigabyte that never comes.
    started = time.perf_counter()
    status, reply = _raw_post(server, {"Content-Length": str(10**9)}, b'{"queries": ["q"]')
    assert status == 413 and "1000000000 bytes; at most 4096" in reply["error"]
    assert time.perf_counter() - started < 2
    status, reply = _raw_post(server, {"Content-Length": "-5"})
    assert status == 400 and "Content-Length" in reply["error"]
    assert searcher.calls == 0


def _raw_exchange(server, raw):
    """Send raw bytes, half-close, and read everything the server answers."""
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        for _ in range(100):  # bounded: the server closes after answering
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


def test_truncated_body_and_broken_request_lines_get_json_errors(running):
    server, searcher = running
    status_line, reply = _raw_exchange(server, b'POST /retrieve HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"queries"')
    assert " 400 " in status_line and "ended after 10 of 100 bytes" in reply["error"]
    status_line, reply = _raw_exchange(server, b"FOO /retrieve HTTP/1.1\r\n\r\n")
    assert " 501 " in status_line and "FOO" in reply["error"]
    assert searcher.calls == 0
    assert _call(server, {"queries": ["q"], "topk": 1})[0] == 200


def test_wrong_path_and_method(running):
    server, _ = running
    status, _, reply = _call(server, {"queries": ["q"]}, path="/search")
    assert status == 404 and "/search" in reply["error"]
    status, headers, reply = _call(server, method="GET", path="/retrieve")
    assert status == 405 and headers["Allow"] == "POST" and "POST" in reply["error"]
    status, headers, _ = _call(server, {"queries": ["q"]}, path="/health")
    assert status == 405 and headers["Allow"] == "GET"
    assert _call(server, method="DELETE", path="/retrieve")[0] == 405


def test_searcher_failure_is_500_and_server_keeps_serving(running):
    server, searcher = running
    searcher.fail = True
    status, _, reply = _call(server, {"queries": ["q"]})
    assert status == 500 and "RuntimeError: index shard 3 is gone" in reply["error"]
    searcher.fail, searcher.wrong_shape = False, True
    status, _, reply = _call(server, {"queries": ["q", "r"]})
    assert status == 500 and "1 result lists for 2 queries" in reply["error"]
    searcher.wrong_shape = False
    assert _call(server, {"queries": ["q"], "topk": 1})[2] == {"result": [[_doc("q", 0)]]}


def test_32_concurrent_clients_get_their_own_results(running):
    server, searcher = running
    searcher.delay = 0.05
    client = RetrievalClient(server.url, timeout=10, retries=0)

    def one(i):
        return client.search([f"q{i}", f"p{i}"], k=1 + i % 5)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, hits in enumerate(results):
        assert [[h.id for h in row] for row in hits] == [[f"{p}{i}#{r}" for r in range(1 + i % 5)] for p in "qp"]
    assert searcher.calls == 32 and searcher.max_active > 1  # requests really overlapped


def test_make_server_rejects_bad_arguments():
    with pytest.raises(TypeError, match="search"):
        make_server(object(), "127.0.0.1", 0)
    with pytest.raises(ValueError, match="host is empty"):
        make_server(FakeSearcher(), "", 0)
    with pytest.raises(ValueError, match="port"):
        make_server(FakeSearcher(), "127.0.0.1", 70000)
    with pytest.raises(ValueError, match="max_topk"):
        Limits(max_topk=0)
    with pytest.raises(ValueError, match="default_topk"):
        Limits(default_topk=20, max_topk=10)


# --- client -----------------------------------------------------------------------------------------
def test_client_against_our_server(running):
    server, _ = running
    for url in (server.url, server.url + "/", server.url + "/retrieve", server.url + "/retrieve/"):
        client = RetrievalClient(url)
        assert client.url == server.url + "/retrieve"
        assert client.search(["a"], k=2) == [[Hit("a#0", '"a"\nrank 0', 1.0), Hit("a#1", '"a"\nrank 1', 0.75)]]
    assert client.health() == {"status": "ok", "num_docs": 50}
    assert client.search([], k=2) == []


def test_client_reports_server_rejections_without_retrying(running):
    server, searcher = running
    client = RetrievalClient(server.url, retries=3, backoff=0)
    with pytest.raises(RetrievalError, match=r"HTTP 400\): 'topk' must be in 1\.\.10, got 11"):
        client.search(["q"], k=11)
    with pytest.raises(RetrievalError, match=r"HTTP 413\): request body is \d+ bytes; at most 4096"):
        client.search(["x" * 5000])
    assert searcher.calls == 0


def test_client_splits_large_batches(running):
    server, searcher = running
    queries = [f"q{i}" for i in range(20)]  # the server takes at most 8 per request
    hits = RetrievalClient(server.url, batch_size=8).search(queries, k=1)
    assert [row[0].id for row in hits] == [f"{q}#0" for q in queries] and searcher.calls == 3


def test_client_rejects_bad_arguments():
    for url in ("localhost:8000", "ftp://host/retrieve", ""):
        with pytest.raises(ValueError, match="url must look like"):
            RetrievalClient(url)
    client = RetrievalClient("http://127.0.0.1:9")
    with pytest.raises(TypeError, match="list of strings"):
        client.search("a single string")
    with pytest.raises(TypeError, match=r"queries\[1\]"):
        client.search(["ok", None])
    with pytest.raises(ValueError, match="k must be"):
        client.search(["ok"], k=0)


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_client_unreachable_retries_with_backoff_then_explains(monkeypatch):
    sleeps = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(RetrievalError) as info:
        RetrievalClient(url, retries=2, backoff=0.1).search(["q"])
    message = str(info.value)
    assert url + "/retrieve" in message and "after 3 attempt(s)" in message
    assert "connection refused: is `rexrag-retrieve serve` running?" in message
    assert sleeps == [0.1, 0.2]


class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers the i-th request with `server.script[i]` = (status, JSON payload or raw bytes, delay)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.path, body))
            status, payload, delay = self.server.script[min(len(self.server.requests), len(self.server.script)) - 1]
        time.sleep(delay)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client timed out and left

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    server.daemon_threads = True
    server.requests, server.lock = [], threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = _start(server)
    yield server
    _stop(server, thread)


def test_client_does_not_retry_4xx(scripted):
    scripted.script = [(400, {"error": "'topk' must be in 1..10, got 50"}, 0)]
    with pytest.raises(RetrievalError, match=r"HTTP 400\): 'topk' must be in 1\.\.10, got 50"):
        RetrievalClient(scripted.url, retries=3, backoff=0).search(["q"], k=50)
    assert len(scripted.requests) == 1
    # FastAPI (the original Search-R1 server) puts its validation errors under "detail".
    scripted.requests.clear()
    scripted.script = [(422, {"detail": [{"loc": ["body", "queries"], "msg": "field required"}]}, 0)]
    with pytest.raises(RetrievalError, match="HTTP 422.*field required"):
        RetrievalClient(scripted.url, backoff=0).search(["q"])


def test_client_retries_5xx_then_succeeds(scripted):
    ok = {"result": [[{"document": {"id": "1", "contents": "c"}, "score": 0.5}]]}
    scripted.script = [(503, {"error": "warming up"}, 0), (500, b"oops", 0), (200, ok, 0)]
    assert RetrievalClient(scripted.url, backoff=0).search(["q"], k=1) == [[Hit("1", "c", 0.5)]]
    assert len(scripted.requests) == 3
    assert scripted.requests[0] == ("/retrieve", {"queries": ["q"], "topk": 1, "return_scores": True})
    scripted.requests.clear()
    scripted.script = [(500, {"error": "disk on fire"}, 0)]
    with pytest.raises(RetrievalError, match="after 2 attempt.*HTTP 500: disk on fire"):
        RetrievalClient(scripted.url, retries=1, backoff=0).search(["q"])


def test_client_parses_original_search_r1_responses(scripted):
    """Bare docs (no scores), extra fields, int or missing ids: what a stock Search-R1 server may send."""
    scripted.script = [
        (
            200,
            {
                "result": [
                    [{"id": 7, "contents": '"T"\nx', "title": "T", "text": "x"}, {"contents": "no id"}],
                    [{"document": {"id": "0", "contents": "y", "extra": [1]}, "score": 3}],
                ]
            },
            0,
        )
    ]
    hits = RetrievalClient(scripted.url + "/retrieve").search(["a", "b"], k=2)
    assert [[(h.id, h.contents) for h in row] for row in hits] == [[("7", '"T"\nx'), ("", "no id")], [("0", "y")]]
    assert math.isnan(hits[0][0].score) and hits[1][0].score == 3.0 and isinstance(hits[1][0].score, float)


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"<html>502</html>", "not JSON"),
        ({"results": []}, "'result' field"),
        ({"result": [[]]}, "one list per query (2), got 1 lists"),
        ({"result": [[], {"id": "1"}]}, "'result[1]' must be a list"),
        ({"result": [[], [{"id": "1"}]]}, "'result[1][0]' document needs a string 'contents'"),
        ({"result": [[], [{"document": {"contents": "c"}, "score": "high"}]]}, "'score' must be a number"),
        ({"result": [[], [{"id": [1], "contents": "c"}]]}, "'id' must be a string or an integer"),
    ],
)
def test_client_rejects_malformed_responses(scripted, payload, message):
    scripted.script = [(200, payload, 0)]
    with pytest.raises(RetrievalError, match="malformed response") as info:
        RetrievalClient(scripted.url, backoff=0).search(["a", "b"])
    assert message in str(info.value)
    assert len(scripted.requests) == 1


def test_client_timeout_is_retried_then_reported(scripted):
    ok = {"result": [[{"id": "1", "contents": "c"}]]}
    scripted.script = [(200, ok, 0.6), (200, ok, 0)]
    assert RetrievalClient(scripted.url, timeout=0.2, backoff=0).search(["q"])[0][0].id == "1"
    assert len(scripted.requests) == 2
    scripted.requests.clear()
    scripted.script = [(200, ok, 0.6)]
    with pytest.raises(RetrievalError, match=r"after 2 attempt\(s\); last error: timed out after 0.2 s"):
        RetrievalClient(scripted.url, timeout=0.2, retries=1, backoff=0).search(["q"])


def test_parse_response_round_trips_hits():
    hits = [[Hit("1", "c", 0.5), Hit("2", "d", 0.25)], []]
    payload = json.loads(json.dumps({"result": [[h.to_search_r1() for h in row] for row in hits]}))
    assert parse_response(payload, 2) == hits

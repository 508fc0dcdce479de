"""The retrieval server's limits: hostile bodies are 4xx (never 500), a slow client cannot hold a thread past
the whole-request deadline, and connections over the cap get an immediate 503 + Retry-After."""

import http.client
import json
import select
import socket
import sys
import threading
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rexrag_jax.cli.serve as serve_cli
import rexrag_jax.retrieval.server as server_module
from rexrag_jax.retrieval.client import RetrievalClient, RetrievalError
from rexrag_jax.retrieval.server import ALLOWED_FIELDS, Limits, RequestError, make_server, parse_retrieve_request
from test_server import FakeSearcher, _call, _start, _stop

WAIT_S = 15  # generous bound for anything that should take about a second, on a loaded 2-core machine


@pytest.fixture
def serving():
    """Start servers with the given limits; all are stopped at the end of the test."""
    started = []

    def start(searcher=None, **limits):
        searcher = searcher or FakeSearcher()
        server = make_server(searcher, "127.0.0.1", 0, **limits)
        started.append((server, _start(server)))
        return server, searcher

    yield start
    for server, thread in started:
        _stop(server, thread)


# --- hostile bodies: 400 naming the field, never a 500 ----------------------------------------------
def test_topk_with_5000_digits_is_400_naming_topk(serving):
    """It was a 500: int() refuses over 4300 digits with a ValueError inside json.loads."""
    server, searcher = serving()
    for sign in ("", "-"):
        body = b'{"queries": ["q"], "topk": ' + sign.encode() + b"7" * 5000 + b"}"
        status, _, reply = _call(server, body)
        assert status == 400, reply
        assert "'topk' must be in 1..50, got an integer of 5000 digits" in reply["error"]
    assert searcher.calls == 0
    assert _call(server, {"queries": ["q"], "topk": 1})[0] == 200


def test_lone_surrogate_query_is_400_naming_it(serving):
    """It was a 500: `"\\ud800"` is valid JSON but no UTF-8 text, so the searcher or the response broke."""
    server, searcher = serving()
    status, _, reply = _call(server, b'{"queries": ["\\ud800"]}')
    assert status == 400 and "'queries[0]' is not valid text: lone surrogate U+D800" in reply["error"]
    status, _, reply = _call(server, {"queries": ["fine", "bad \udfff"]})  # json.dumps escapes it
    assert status == 400 and "'queries[1]'" in reply["error"]
    status, _, reply = _call(server, b'{"queries": ["q"], "\\udc00": 1}')  # the message must stay encodable
    assert status == 400 and "lone surrogate U+DC00" in reply["error"]
    assert searcher.calls == 0
    status, _, reply = _call(server, {"queries": ["smile \U0001f600"], "topk": 1})  # a proper pair is text
    assert status == 200 and reply["result"][0][0]["id"] == "smile \U0001f600#0"


@pytest.mark.parametrize(
    "body,message",
    [
        (b'{"queries": [' + b"9" * 5000 + b"]}", "'queries[0]' must be a string, got int"),
        (b'{"queries": ["q"], "return_scores": ' + b"1" * 4301 + b"}", "'return_scores' must be a boolean, got int"),
        (b'{"queries": ["q"], "topk": ' + b"1" * 5000, "not valid JSON"),  # huge int, then truncated
        (b'{"queries": ["q"], "topk": 1' + b"0" * 5000 + b", ]}", "not valid JSON"),
        (b'{"queries": ' + b"[" * 100 + b"]" * 100 + b"}", "nested more than 32 levels deep"),
        (b'{"queries": ["\xc3\x28"]}', "not valid JSON: invalid UTF-8 at byte 14"),
        (b"x" * 5000, "request body is 5000 bytes; at most 4096"),
    ],
)
def test_gate_failures_are_request_errors(body, message):
    limits = Limits(max_topk=10, max_body_bytes=4096 if body.startswith(b"x") else 1 << 20)
    with pytest.raises(RequestError) as info:
        parse_retrieve_request(body, limits)
    assert 400 <= info.value.status < 500 and message in info.value.message


# --- property: any body is a valid request or a 4xx RequestError --------------------------------------
TEXT = (
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12)  # surrogates included, but rare
    | st.sampled_from(["q", "who?", " ", "\ud800", "a\udfffb", "\udc00\ud800", "smile \U0001f600"])
)
HUGE_INTS = st.builds(
    lambda digits, sign: sign * (10**digits - 1), st.integers(4290, 4310), st.sampled_from((1, -1))
)  # around int()'s 4300-digit limit
SCALARS = st.none() | st.booleans() | st.integers() | HUGE_INTS | st.floats() | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(TEXT | st.sampled_from(ALLOWED_FIELDS), children, max_size=4),
    max_leaves=20,
)
REQUESTS = st.fixed_dictionaries(  # request-shaped, so the checks past the JSON gate are reached too
    {"queries": st.lists(TEXT, min_size=1, max_size=5) | JSON_VALUES},
    optional={"topk": st.integers(-3, 12) | HUGE_INTS | JSON_VALUES, "return_scores": st.booleans() | SCALARS},
)
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = Limits(max_queries=4, max_topk=10, max_query_chars=20, max_body_bytes=1 << 16)


def _dumps(value, ensure_ascii: bool) -> bytes:
    """JSON bytes even for >4300-digit ints (str(int) refuses them too) and lone surrogates (ensure_ascii
    off: they become invalid UTF-8 bytes rather than `\\udXXX` escapes)."""
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    finally:
        sys.set_int_max_str_digits(previous)


def _assert_request_or_4xx(body: bytes, num_docs=None) -> None:
    try:
        queries, topk, return_scores = parse_retrieve_request(body, LIMITS, num_docs)
    except RequestError as e:  # anything else propagates and fails the test
        assert 400 <= e.status < 500, (e.status, e.message)
        e.message.encode("utf-8")  # the error reply must be sendable
        return
    assert type(queries) is list and 1 <= len(queries) <= LIMITS.max_queries
    for query in queries:
        assert type(query) is str and query.strip() and len(query) <= LIMITS.max_query_chars
        query.encode("utf-8")  # no lone surrogate reaches the searcher
    assert type(topk) is int and 1 <= topk <= min(LIMITS.max_topk, num_docs or LIMITS.max_topk)
    assert type(return_scores) is bool


@PROPERTY
@given(value=JSON_VALUES | REQUESTS, ensure_ascii=st.booleans(), num_docs=st.sampled_from([None, 1, 5]))
def test_any_json_body_is_a_request_or_a_4xx(value, ensure_ascii, num_docs):
    _assert_request_or_4xx(_dumps(value, ensure_ascii), num_docs)


@PROPERTY
@given(
    body=st.binary(max_size=200)
    | REQUESTS.map(lambda r: _dumps(r, True)).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))
)  # random bytes, and valid bodies cut short
def test_any_bytes_are_a_request_or_a_4xx(body):
    _assert_request_or_4xx(body)


# --- the whole-request deadline -----------------------------------------------------------------------
def _drip(server, head: bytes, drip: bytes):
    """Send `head`, then one byte of `drip` every 0.2 s (cycling) until the server answers or closes;
    returns (everything received, seconds taken). Before the fix this dripped forever."""
    started = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=WAIT_S) as sock:
        sock.sendall(head)
        i = 0
        while time.monotonic() - started < WAIT_S:
            if select.select([sock], [], [], 0.2)[0]:  # the server answered or closed: stop sending
                break
            try:
                sock.sendall(drip[i % len(drip) : i % len(drip) + 1])
            except OSError:
                break
            i += 1
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    return received, time.monotonic() - started


@pytest.mark.parametrize(
    "head,drip",
    [
        (b"POST /retrieve HTTP/1.1\r\nContent-Length: 1", b"0"),  # the headers never end
        (b"POST /retrieve HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", b" "),  # the body never ends
        (b"POST /retr", b"i"),  # the request line never ends
    ],
)
def test_slow_drip_client_is_cut_off_at_the_deadline(serving, head, drip):
    server, searcher = serving(request_timeout_s=1.0)
    received, took = _drip(server, head, drip)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b"request not received within 1 s" in received
    assert took < WAIT_S - 1 and searcher.calls == 0
    assert _call(server, {"queries": ["q"], "topk": 1})[0] == 200


def test_idle_connection_is_closed_without_an_answer(serving):
    server, _ = serving(request_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=WAIT_S) as sock:
        assert sock.recv(100) == b""  # closed, not left waiting for a request that never comes
    assert time.monotonic() - started < WAIT_S - 1


# --- the connection cap -------------------------------------------------------------------------------
class GatedSearcher(FakeSearcher):
    """Holds every search until `gate` opens, so a test can keep connections busy for as long as it needs."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.waiting = 0

    def search(self, queries, k):
        with self.lock:
            self.waiting += 1
        self.gate.wait(WAIT_S)
        return super().search(queries, k)


def _slow_call(server, body, results):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=WAIT_S)
    try:
        results.append(_call(server, body, conn=conn))
    finally:
        conn.close()


def test_over_the_connection_cap_gets_503_retry_after_then_serves_again(serving):
    searcher = GatedSearcher()
    server, _ = serving(searcher, max_connections=2, request_timeout_s=WAIT_S)
    held = []
    busy = [
        threading.Thread(target=_slow_call, args=(server, {"queries": ["held"], "topk": 1}, held)) for _ in range(2)
    ]
    for thread in busy:
        thread.start()
    deadline = time.monotonic() + WAIT_S
    while searcher.waiting < 2 and time.monotonic() < deadline:  # both slots taken, inside search
        time.sleep(0.01)
    assert searcher.waiting == 2
    try:
        for _ in range(3):  # a request with a body, sent by a stock client: it must read the 503, not a reset
            started = time.monotonic()
            status, headers, reply = _call(server, {"queries": ["one too many"]})
            assert status == 503 and headers["Retry-After"] == "1", (status, headers)
            assert "all 2 connections in use" in reply["error"] and headers["Connection"] == "close"
            assert time.monotonic() - started < 5  # answered at once, not queued behind the busy ones
        with pytest.raises(RetrievalError, match="HTTP 503"):
            RetrievalClient(server.url, retries=0).search(["q"])
    finally:
        searcher.gate.set()
        for thread in busy:
            thread.join(WAIT_S)
    assert [status for status, _, _ in held] == [200, 200]
    deadline = time.monotonic() + WAIT_S  # slots free once the held connections close, just after
    while (status := _call(server, {"queries": ["after"], "topk": 1})[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200
    # Retries: the server frees a slot just after its reply is read, so the call above may still hold one.
    assert RetrievalClient(server.url, retries=5).search(["q"], k=1)[0][0].id == "q#0"


# --- configuration ------------------------------------------------------------------------------------
def test_new_limits_are_validated():
    assert Limits(request_timeout_s=0.5, max_connections=1).request_timeout_s == 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="request_timeout_s must be a positive number of seconds"):
            Limits(request_timeout_s=bad)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="max_connections must be a positive int"):
            Limits(max_connections=bad)
    with pytest.raises(ValueError, match="max_connections"):
        make_server(FakeSearcher(), "127.0.0.1", 0, max_connections=0)


def test_serve_cli_passes_the_new_limits(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setitem(
        sys.modules, "rexrag_jax.retrieval.index", types.SimpleNamespace(load_index=lambda path, **kw: FakeSearcher())
    )
    monkeypatch.setattr(server_module, "serve", lambda searcher, host, port, **limits: seen.update(limits))
    argv = ["serve", "--index", str(tmp_path), "--request-timeout", "2.5", "--max-connections", "8"]
    assert serve_cli.main(argv) == 0
    assert seen["request_timeout_s"] == 2.5 and seen["max_connections"] == 8
    for flag, value in (("--request-timeout", "0"), ("--request-timeout", "nan"), ("--max-connections", "0")):
        assert serve_cli.main(["serve", "--index", str(tmp_path), flag, value]) == 2
        assert flag in capsys.readouterr().err

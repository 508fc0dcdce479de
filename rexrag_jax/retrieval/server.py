"""A Search-R1-compatible retrieval server on the standard library.

Search-R1's rollout code POSTs `{"queries": [...], "topk": k, "return_scores": bool}` to `/retrieve` and
reads `{"result": [[item, ...], ...]}` back, where an item is `{"document": {"id", "contents"}, "score": s}`
with scores and the bare document without. Serving that exact schema lets the original Search-R1 / REX-RAG
trainers use our JAX/ScaNN index unchanged. The standard library is enough for this (one JSON endpoint),
so the server adds no web framework to the dependencies.

Every malformed request gets a 4xx JSON `{"error": "..."}` naming the offending field; a failing searcher
gets a 500 with a message, and the server keeps serving either way. The bounds (`Limits`) and their answers:

- body: invalid UTF-8 or JSON, lone surrogates (`"\\ud800"`), nesting over 32 levels, integers over Python's
  4300-digit parse limit, unknown fields, bad types or counts: 400 naming the field (the body goes through
  `rexrag_jax.untrusted.parse_json`, the project's one gate for untrusted text); no Content-Length: 411;
  a Content-Length over `max_body_bytes` (1 MiB): 413 at once, without reading the body.
- time: the request line, headers and body must all arrive within `request_timeout_s` (60 s) of the server
  starting to wait for them, however slowly they trickle in; past it a partly sent request gets 408 and the
  connection closes (an idle keep-alive connection just closes). Writing a response has the same bound.
- connections: at most `max_connections` (64) are served at once, each on its own thread (an open keep-alive
  connection counts). One more is answered 503 with `Retry-After: 1` and a JSON error straight from the accept
  loop, never queued; its socket is closed once the client hangs up, or after `LINGER_S` (2 s).

The time and connection bounds are HTTP machinery, not Search-R1 logic: they live in `http_limits`.
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import logging
import math
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol

from rexrag_jax.retrieval.http_limits import LINGER_S as LINGER_S  # re-exported, public here before the split
from rexrag_jax.retrieval.http_limits import RETRY_AFTER_S as RETRY_AFTER_S
from rexrag_jax.retrieval.http_limits import ConnectionCappedServer, DeadlineReader
from rexrag_jax.retrieval.types import Hit
from rexrag_jax.untrusted import BadInput, NumberTooLong, TextLimits, check_value, parse_json

log = logging.getLogger(__name__)

RETRIEVE_PATH = "/retrieve"
HEALTH_PATH = "/health"
ALLOWED_FIELDS = ("queries", "topk", "return_scores")


class Searcher(Protocol):
    """What the server needs: batched, thread-safe search. A `num_docs` attribute is optional."""

    def search(self, queries: list[str], k: int) -> list[list[Hit]]: ...


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request and per-server bounds: one client must not monopolise memory, threads or the searcher."""

    max_queries: int = 512
    max_topk: int = 100
    max_body_bytes: int = 1 << 20
    max_query_chars: int = 8192
    default_topk: int = 3
    request_timeout_s: float = 60.0  # whole request line + headers + body, not per socket read
    max_connections: int = 64  # connections served at once; each holds one thread

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "request_timeout_s":
                if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
                    raise ValueError(f"{field.name} must be a positive number of seconds, got {value!r}")
            elif type(value) is not int or value < 1:
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"default_topk ({self.default_topk}) exceeds max_topk ({self.max_topk})")


class RequestError(Exception):
    """A client error: HTTP status plus a message naming what was wrong."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message)


class _HugeInt:
    """An integer literal longer than `int()` will parse (4300 digits): kept so the error can name its field."""

    def __init__(self, literal: str) -> None:
        self.digits = len(literal.lstrip("-"))


def _parse_int(literal: str) -> int | _HugeInt:
    try:
        return int(literal)
    except ValueError:
        return _HugeInt(literal)


def _kind(value: Any) -> str:
    return "int" if isinstance(value, _HugeInt) else type(value).__name__


def _rejected(e: BadInput) -> RequestError:
    reason = str(e)  # "invalid UTF-8 ...", "invalid JSON: ...", or a field-naming reason from check_value
    if reason.startswith("invalid "):
        return _bad(f"request body is not valid JSON: {reason.removeprefix('invalid JSON: ')}")
    return _bad(f"request body rejected: {reason}")


def _load_body(body: bytes, limits: Limits) -> Any:
    """The body through the project's untrusted-text gate; every failure is a `RequestError`."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body is {len(body)} bytes; at most {limits.max_body_bytes}"
        )
    # Per-field lengths are checked below with their own messages; the gate checks text, depth and syntax.
    text_limits = TextLimits(max_line_bytes=limits.max_body_bytes, max_string_chars=limits.max_body_bytes)
    try:
        return parse_json(body, text_limits)
    except NumberTooLong:  # parse again, keeping the literal, so the field check below can name its field
        pass
    except BadInput as e:
        raise _rejected(e) from None
    try:  # parse_json decoded the body already, so it is valid UTF-8
        return check_value(json.loads(body.decode("utf-8"), parse_int=_parse_int), text_limits)
    except BadInput as e:
        raise _rejected(e) from None
    except (ValueError, RecursionError) as e:
        raise _bad(f"request body is not valid JSON: {e}") from None


def parse_retrieve_request(body: bytes, limits: Limits, num_docs: int | None = None) -> tuple[list[str], int, bool]:
    """Validate a `/retrieve` body; returns `(queries, topk, return_scores)` or raises `RequestError` (only)."""
    request = _load_body(body, limits)
    if not isinstance(request, dict):
        raise _bad(f"request body must be a JSON object, got {_kind(request)}")
    unknown = sorted(set(request) - set(ALLOWED_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(ALLOWED_FIELDS)}")

    if "queries" not in request:
        raise _bad("missing required field 'queries' (a list of strings)")
    queries = request["queries"]
    if not isinstance(queries, list):
        raise _bad(f"'queries' must be a list of strings, got {_kind(queries)}")
    if not queries:
        raise _bad("'queries' is empty")
    if len(queries) > limits.max_queries:
        raise _bad(f"'queries' has {len(queries)} items; at most {limits.max_queries} per request")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise _bad(f"'queries[{i}]' must be a string, got {_kind(query)}")
        if not query.strip():
            raise _bad(f"'queries[{i}]' is empty or whitespace-only")
        if len(query) > limits.max_query_chars:
            raise _bad(f"'queries[{i}]' has {len(query)} characters; at most {limits.max_query_chars}")

    # Search-R1 declares `topk: Optional[int] = None`, so an explicit null means "the server default".
    topk = request.get("topk")
    if topk is None:
        topk = limits.default_topk
    if type(topk) is not int and not isinstance(topk, _HugeInt):  # bool is an int: `true` must not mean 1
        raise _bad(f"'topk' must be an integer, got {_kind(topk)}")
    upper = limits.max_topk if num_docs is None else min(limits.max_topk, num_docs)
    if upper < 1:
        raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the index is empty: nothing to retrieve")
    if isinstance(topk, _HugeInt):
        raise _bad(f"'topk' must be in 1..{upper}, got an integer of {topk.digits} digits")
    if not 1 <= topk <= upper:
        raise _bad(f"'topk' must be in 1..{upper}, got {topk}")

    return_scores = request.get("return_scores", False)
    if type(return_scores) is not bool:
        raise _bad(f"'return_scores' must be a boolean, got {_kind(return_scores)}")
    return queries, topk, return_scores


def render_results(results: list[list[Hit]], n_queries: int, return_scores: bool) -> dict:
    """The Search-R1 response body. A searcher answering the wrong shape is a server bug (raises)."""
    if not isinstance(results, list) or len(results) != n_queries:
        got = len(results) if isinstance(results, list) else type(results).__name__
        raise RuntimeError(f"searcher returned {got} result lists for {n_queries} queries")
    rendered = []
    for hits in results:
        items = []
        for hit in hits:
            item = hit.to_search_r1(with_score=return_scores)
            if return_scores:  # numpy scalars are not JSON-serialisable
                item["score"] = float(item["score"])
            items.append(item)
        rendered.append(items)
    return {"result": rendered}


class RetrievalHandler(BaseHTTPRequestHandler):
    """Routes `POST /retrieve` and `GET /health`; everything else is a 404 or 405 JSON error."""

    protocol_version = "HTTP/1.1"  # keep-alive for clients that pool connections
    server_version = "rexrag-retrieve"
    server: RetrievalServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader whose reads share the request deadline
        self._reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """One request within `request_timeout_s`; a partly received one that runs out of time gets a 408."""
        self._reader.start(self.server.limits.request_timeout_s)
        self._answered = False
        self.command, self.request_version = "", self.protocol_version  # in case the request line never ends
        super().handle_one_request()  # a timeout in the request line or headers: it closes without answering
        if self._reader.expired and self._reader.received and not self._answered:
            self.close_connection = True
            self._send_json(HTTPStatus.REQUEST_TIMEOUT, {"error": self._timeout_message()})

    def _timeout_message(self) -> str:
        return f"request not received within {self.server.limits.request_timeout_s:g} s"

    # --- routing -------------------------------------------------------------------------------
    def _route(self) -> None:
        method = self.command
        started = time.perf_counter()
        path = self.path.split("?", 1)[0]
        routes = {RETRIEVE_PATH: ("POST", self._retrieve), HEALTH_PATH: ("GET", self._health)}
        try:
            if path not in routes:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such path {path!r}; use POST {RETRIEVE_PATH}")
            allowed, action = routes[path]
            if method != allowed and not (method == "HEAD" and allowed == "GET"):
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {allowed} only, not {method}")
            status, payload = action()
        except RequestError as e:
            status, payload = e.status, {"error": e.message}
        except Exception as e:  # the searcher failed: report it, keep serving
            log.exception("%s %s failed", method, path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"search failed: {type(e).__name__}: {e}"}
        self._send_json(status, payload, allow=routes[path][0] if path in routes else None)
        log.debug(
            "%s %s %s %d %.1f ms", self.address_string(), method, path, status, 1e3 * (time.perf_counter() - started)
        )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route

    # --- endpoints -----------------------------------------------------------------------------
    def _retrieve(self) -> tuple[HTTPStatus, dict]:
        body = self._read_body()
        searcher = self.server.searcher
        queries, topk, return_scores = parse_retrieve_request(body, self.server.limits, _num_docs(searcher))
        results = searcher.search(queries, topk)
        return HTTPStatus.OK, render_results(results, len(queries), return_scores)

    def _health(self) -> tuple[HTTPStatus, dict]:
        return HTTPStatus.OK, {"status": "ok", "num_docs": _num_docs(self.server.searcher)}

    # --- plumbing ------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        """Read exactly Content-Length bytes, refusing oversized bodies before reading them."""
        header = self.headers.get("Content-Length")
        if header is None:
            self.close_connection = True  # there may be an unread (e.g. chunked) body on the socket
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required")
        try:
            length = int(header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"Content-Length header is not a valid length: {header!r}"
            ) from None
        limit = self.server.limits.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body stays unread; this connection cannot be reused
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body is {length} bytes; at most {limit}")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT, self._timeout_message()) from None
        if len(body) != length:
            self.close_connection = True
            raise _bad(f"request body ended after {len(body)} of {length} bytes (Content-Length)")
        return body

    def _send_json(self, status: HTTPStatus, payload: dict, allow: str | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._answered = True
        try:
            self.connection.settimeout(self.server.limits.request_timeout_s)  # a client that never reads
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.METHOD_NOT_ALLOWED and allow:
                self.send_header("Allow", allow)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client went away or stopped reading; nothing more to do
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, oversized headers) also answer in JSON."""
        self.close_connection = True
        self._send_json(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # `_route` logs one line per request, with the latency


def _num_docs(searcher: Searcher) -> int | None:
    n = getattr(searcher, "num_docs", None)
    return int(n) if n is not None else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RetrievalServer(ConnectionCappedServer):
    """A connection-capped threading server carrying the searcher and the limits for its handlers."""

    daemon_threads = True  # a hung client never blocks shutdown
    request_queue_size = 1024  # socketserver's default backlog of 5 resets bursts of rollout workers
    logger = log  # refusals log under this module's name, so `serve -v` and log filters still see them

    def __init__(self, address: tuple[str, int], searcher: Searcher, limits: Limits):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.searcher = searcher
        self.limits = limits
        super().__init__(address, RetrievalHandler, limits.max_connections)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, **limits: Any) -> RetrievalServer:
    """Bind (but do not start) a retrieval server; `port=0` picks a free port (see `server.url`). Keyword
    arguments are `Limits` fields (`max_topk=10`, `request_timeout_s=5.0`, ...); the rest keep their defaults.

    Loopback is the default; listening on other interfaces needs an explicit `host` and logs a warning,
    since the server has no authentication.
    """
    if not callable(getattr(searcher, "search", None)):
        raise TypeError(f"searcher must have a search(queries, k) method, got {type(searcher).__name__}")
    if not isinstance(host, str) or not host:
        raise ValueError("host is empty: pass 127.0.0.1 for local use, or 0.0.0.0 to listen on all interfaces")
    if type(port) is not int or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    bounds = Limits(**limits)
    if not _is_loopback(host):
        log.warning("listening on %s: reachable from other machines, with no authentication", host)
    return RetrievalServer((host, port), searcher, bounds)


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, **limits: Any) -> None:
    """Serve until Ctrl-C (or `shutdown()` from another thread), then close the socket cleanly."""
    server = make_server(searcher, host, port, **limits)
    n = _num_docs(searcher)
    log.info("serving %s docs at %s%s (Ctrl-C to stop)", "?" if n is None else n, server.url, RETRIEVE_PATH)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("interrupted: stopping the server")
    finally:
        server.server_close()

"""A Search-R1-compatible retrieval server on the standard library.

Search-R1's rollout code POSTs `{"queries": [...], "topk": k, "return_scores": bool}` to `/retrieve` and
reads `{"result": [[item, ...], ...]}` back, where an item is `{"document": {"id", "contents"}, "score": s}`
with scores and the bare document without. Serving that exact schema lets the original Search-R1 / REX-RAG
trainers use our JAX/ScaNN index unchanged. The standard library is enough for this (one JSON endpoint),
so the server adds no web framework to the dependencies.

Every malformed request gets a 4xx JSON `{"error": "..."}` naming the offending field; a failing searcher
gets a 500 with a message, and the server keeps serving either way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from rexrag_jax.retrieval.types import Hit

log = logging.getLogger(__name__)

RETRIEVE_PATH = "/retrieve"
HEALTH_PATH = "/health"
ALLOWED_FIELDS = ("queries", "topk", "return_scores")


class Searcher(Protocol):
    """What the server needs: batched, thread-safe search. A `num_docs` attribute is optional."""

    def search(self, queries: list[str], k: int) -> list[list[Hit]]: ...


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request bounds: they keep one client from monopolising memory or the searcher."""

    max_queries: int = 512
    max_topk: int = 100
    max_body_bytes: int = 1 << 20
    max_query_chars: int = 8192
    default_topk: int = 3

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
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


def parse_retrieve_request(body: bytes, limits: Limits, num_docs: int | None = None) -> tuple[list[str], int, bool]:
    """Validate a `/retrieve` body; returns `(queries, topk, return_scores)` or raises `RequestError`."""
    try:
        request = json.loads(body)
    except json.JSONDecodeError as e:
        raise _bad(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise _bad(f"request body is not valid JSON: {type(e).__name__}") from None
    if not isinstance(request, dict):
        raise _bad(f"request body must be a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - set(ALLOWED_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(ALLOWED_FIELDS)}")

    if "queries" not in request:
        raise _bad("missing required field 'queries' (a list of strings)")
    queries = request["queries"]
    if not isinstance(queries, list):
        raise _bad(f"'queries' must be a list of strings, got {type(queries).__name__}")
    if not queries:
        raise _bad("'queries' is empty")
    if len(queries) > limits.max_queries:
        raise _bad(f"'queries' has {len(queries)} items; at most {limits.max_queries} per request")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise _bad(f"'queries[{i}]' must be a string, got {type(query).__name__}")
        if not query.strip():
            raise _bad(f"'queries[{i}]' is empty or whitespace-only")
        if len(query) > limits.max_query_chars:
            raise _bad(f"'queries[{i}]' has {len(query)} characters; at most {limits.max_query_chars}")

    # Search-R1 declares `topk: Optional[int] = None`, so an explicit null means "the server default".
    topk = request.get("topk")
    if topk is None:
        topk = limits.default_topk
    if type(topk) is not int:  # bool is an int subclass: `true` must not mean topk=1
        raise _bad(f"'topk' must be an integer, got {type(topk).__name__}")
    upper = limits.max_topk if num_docs is None else min(limits.max_topk, num_docs)
    if upper < 1:
        raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the index is empty: nothing to retrieve")
    if not 1 <= topk <= upper:
        raise _bad(f"'topk' must be in 1..{upper}, got {topk}")

    return_scores = request.get("return_scores", False)
    if type(return_scores) is not bool:
        raise _bad(f"'return_scores' must be a boolean, got {type(return_scores).__name__}")
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
    timeout = 60  # a client that stalls mid-body releases its thread instead of holding it forever
    server: "RetrievalServer"

    # --- routing -------------------------------------------------------------------------------
    def do_POST(self) -> None:
        self._route("POST")

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_OPTIONS(self) -> None:
        self._route("OPTIONS")

    def _route(self, method: str) -> None:
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
        log.debug("%s %s %s %d %.1f ms", self.address_string(), method, path, status,
                  1e3 * (time.perf_counter() - started))

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
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length header is not a valid length: {header!r}")
        limit = self.server.limits.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body stays unread; this connection cannot be reused
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"request body is {length} bytes; at most {limit}")
        try:
            body = self.rfile.read(length)
        except (TimeoutError, socket.timeout):
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT, "timed out reading the request body")
        if len(body) != length:
            self.close_connection = True
            raise _bad(f"request body ended after {len(body)} of {length} bytes (Content-Length)")
        return body

    def _send_json(self, status: HTTPStatus, payload: dict, allow: str | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
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
        except (BrokenPipeError, ConnectionResetError):  # the client went away; nothing to answer
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


class RetrievalServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer carrying the searcher and the limits for its handlers."""

    daemon_threads = True  # a hung client never blocks shutdown
    request_queue_size = 1024  # socketserver's default backlog of 5 resets bursts of rollout workers

    def __init__(self, address: tuple[str, int], searcher: Searcher, limits: Limits):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.searcher = searcher
        self.limits = limits
        super().__init__(address, RetrievalHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, *, max_queries: int = 512,
                max_topk: int = 100, max_body_bytes: int = 1 << 20, default_topk: int = 3,
                max_query_chars: int = 8192) -> RetrievalServer:
    """Bind (but do not start) a retrieval server; `port=0` picks a free port (see `server.url`).

    Loopback is the default; listening on other interfaces needs an explicit `host` and logs a warning,
    since the server has no authentication.
    """
    if not callable(getattr(searcher, "search", None)):
        raise TypeError(f"searcher must have a search(queries, k) method, got {type(searcher).__name__}")
    if not isinstance(host, str) or not host:
        raise ValueError("host is empty: pass 127.0.0.1 for local use, or 0.0.0.0 to listen on all interfaces")
    if type(port) is not int or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    limits = Limits(max_queries=max_queries, max_topk=max_topk, max_body_bytes=max_body_bytes,
                    max_query_chars=max_query_chars, default_topk=default_topk)
    if not _is_loopback(host):
        log.warning("listening on %s: reachable from other machines, with no authentication", host)
    return RetrievalServer((host, port), searcher, limits)


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, **limits: int) -> None:
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

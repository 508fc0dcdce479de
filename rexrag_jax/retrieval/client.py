"""Client for a Search-R1-compatible `/retrieve` endpoint: ours (`rexrag-retrieve serve`) or the original.

Rollout workers call the retriever thousands of times per step, so transient failures (a restarting server,
a timeout under load, a 5xx) are retried with exponential backoff, while a rejected request (4xx) fails at
once with the server's own message: retrying a bad request only hides the bug. Each call opens its own
connection, so one client can be shared by any number of threads.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from rexrag_jax.retrieval.types import Hit

RETRYABLE_STATUS = (408, 429)  # plus every 5xx


class RetrievalError(RuntimeError):
    """Retrieval failed: server unreachable, request rejected, or a response we cannot read."""


class RetrievalClient:
    """`search(queries, k)` against `url` (the server's base URL or its full `/retrieve` URL).

    `retries` is the number of extra attempts after the first; the wait before retry i (1-based) is
    `backoff * 2**(i-1)` seconds. Batches larger than `batch_size` are split into several requests,
    so a trainer batch never trips the server's per-request query limit.
    """

    def __init__(
        self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5, batch_size: int = 512
    ):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if type(retries) is not int or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.base_url, self.url = _endpoints(url)
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"RetrievalClient({self.url!r}, timeout={self.timeout}, retries={self.retries})"

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        """Top-`k` hits per query, best first. Scores are floats (NaN if the server sent none)."""
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"queries must be a list of strings, got {type(queries).__name__}")
        for i, query in enumerate(queries):
            if not isinstance(query, str):
                raise TypeError(f"queries[{i}] must be a string, got {type(query).__name__}")
        if type(k) is not int or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        hits: list[list[Hit]] = []
        for start in range(0, len(queries), self.batch_size):
            chunk = list(queries[start : start + self.batch_size])
            body = json.dumps({"queries": chunk, "topk": k, "return_scores": True}).encode("utf-8")
            hits.extend(parse_response(self._request(self.url, body), len(chunk), self.url))
        return hits

    def health(self) -> dict:
        """`GET /health` of our server: `{"status": "ok", "num_docs": N}`."""
        payload = self._request(self.base_url + "/health", None)
        if not isinstance(payload, dict):
            raise RetrievalError(f"malformed response from {self.base_url}/health: expected a JSON object")
        return payload

    def _request(self, url: str, body: bytes | None) -> Any:
        """One JSON round trip, retried on connection errors, timeouts, 408/429 and 5xx."""
        last_error = "no attempt made"
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                url,
                data=body,
                method="GET" if body is None else "POST",
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code in RETRYABLE_STATUS or e.code >= 500:
                    last_error = f"HTTP {e.code}: {message}"
                    continue
                raise RetrievalError(f"{url} rejected the request (HTTP {e.code}): {message}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                last_error = self._describe(e)
                continue
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RetrievalError(f"malformed response from {url}: not JSON ({e}): {raw[:200]!r}") from None
        raise RetrievalError(f"retrieval server at {url} failed after {attempts} attempt(s); last error: {last_error}")

    def _describe(self, error: BaseException) -> str:
        """A one-line reason that tells the user what to do."""
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused: is `rexrag-retrieve serve` running?"
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"timed out after {self.timeout:g} s"
        if isinstance(reason, socket.gaierror):
            return f"cannot resolve host {urllib.parse.urlsplit(self.url).hostname!r}: {reason}"
        if isinstance(reason, http.client.RemoteDisconnected):
            return "the server closed the connection without answering"
        return f"{type(reason).__name__}: {reason}"


def _endpoints(url: str) -> tuple[str, str]:
    """(base URL, /retrieve URL) from either form."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a string, got {type(url).__name__}")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must look like http://HOST:PORT or http://HOST:PORT/retrieve, got {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/retrieve"):
        path = path[: -len("/retrieve")]
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return base, base + "/retrieve"


def _server_message(error: urllib.error.HTTPError) -> str:
    """The server's explanation: our `{"error": ...}`, FastAPI's `{"detail": ...}`, or the raw text."""
    try:
        raw = error.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    finally:
        error.close()
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict):
        for key in ("error", "detail"):
            if key in payload:
                detail = payload[key]
                return detail if isinstance(detail, str) else json.dumps(detail)
    text = raw.decode("utf-8", "replace").strip()
    return text[:500] or error.reason or "no message"


def parse_response(payload: Any, n_queries: int, url: str = "the server") -> list[list[Hit]]:
    """Hits from a Search-R1 `{"result": [[item, ...], ...]}` body, with or without scores."""

    def bad(where: str, what: str) -> RetrievalError:
        return RetrievalError(f"malformed response from {url}: {where} {what}")

    if not isinstance(payload, dict) or "result" not in payload:
        raise bad("body", f"must be a JSON object with a 'result' field, got {_preview(payload)}")
    result = payload["result"]
    if not isinstance(result, list) or len(result) != n_queries:
        got = f"{len(result)} lists" if isinstance(result, list) else type(result).__name__
        raise bad("'result'", f"must hold one list per query ({n_queries}), got {got}")
    hits = []
    for i, items in enumerate(result):
        if not isinstance(items, list):
            raise bad(f"'result[{i}]'", f"must be a list, got {type(items).__name__}")
        hits.append([_parse_item(item, f"'result[{i}][{j}]'", bad) for j, item in enumerate(items)])
    return hits


def _parse_item(item: Any, where: str, bad) -> Hit:
    """`{"document": doc, "score": s}` or a bare doc. Extra fields are ignored; ids may be int or absent."""
    if isinstance(item, dict) and "document" in item:
        doc, score = item["document"], item.get("score")
    else:
        doc, score = item, None
    if not isinstance(doc, dict):
        raise bad(where, f"must be a document object, got {_preview(doc)}")
    contents = doc.get("contents")
    if not isinstance(contents, str):
        raise bad(where, f"document needs a string 'contents', got {_preview(contents)}")
    doc_id = doc.get("id")
    if doc_id is None:
        doc_id = ""
    elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise bad(where, f"document 'id' must be a string or an integer, got {_preview(doc_id)}")
    if score is None:
        score = math.nan
    elif isinstance(score, bool) or not isinstance(score, (int, float)):
        raise bad(where, f"'score' must be a number, got {_preview(score)}")
    return Hit(id=str(doc_id), contents=contents, score=float(score))


def _preview(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return f"{type(value).__name__} {text[:80]}"

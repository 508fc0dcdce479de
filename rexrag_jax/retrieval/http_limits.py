"""Connection-level bounds for a standard-library HTTP server, apart from what it serves.

`http.server` gives a slow client unlimited time (a per-read timeout resets on every byte) and a flood of
clients unlimited threads. `DeadlineReader` makes every read of one request share a single deadline, and
`ConnectionCappedServer` serves at most `max_connections` at once, answering one more with 503 +
`Retry-After` straight from the accept loop. Both know sockets and HTTP framing only, nothing of Search-R1,
so `server.py` keeps just the request/response logic.
"""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a refused client is told to wait: a slot frees as soon as any request finishes
LINGER_S = 2.0  # how long a refused connection stays open for its client to finish sending and read the 503


class DeadlineReader(io.RawIOBase):
    """Socket reads sharing one deadline: a per-read timeout lets a client that sends a byte now and then
    hold its thread forever, so each read gets only the time left of the whole request's budget."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf
        self.received = 0  # bytes read since `start`: none means an idle keep-alive connection, not a request
        self.expired = False

    def start(self, seconds: float) -> None:
        self.deadline, self.received, self.expired = time.monotonic() + seconds, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            self.expired = True
            raise
        self.received += n
        return n


def _hung_up(sock: socket.socket) -> bool:
    """Read (and drop) what a refused client sent; True once it has closed its side or the socket failed."""
    try:
        for _ in range(16):  # at most 1 MiB per call, so one fast sender cannot stall the accept loop
            if not sock.recv(1 << 16):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


class ConnectionCappedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with at most `max_connections` handler threads: unbounded threads let a flood
    of clients exhaust the process. Subclasses set `logger` to log refusals under their own name."""

    logger = log

    def __init__(self, address: tuple[str, int], handler_class: Any, max_connections: int):
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lingering: list[tuple[float, socket.socket]] = []  # refused sockets: (close at, socket)
        super().__init__(address, handler_class)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Runs in the accept loop: start a handler thread if a slot is free, else refuse at once."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start, so it will not release its slot
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, sock: socket.socket) -> None:
        """503 + Retry-After without reading the request or blocking: the socket is non-blocking and a
        fresh one's send buffer holds the few hundred bytes. It is closed later, by `service_actions`."""
        data = json.dumps(
            {"error": f"server busy: all {self.max_connections} connections in use; retry in {RETRY_AFTER_S} s"}
        ).encode()
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
        )
        self.logger.info("refused a connection with 503: all %d in use", self.max_connections)
        try:
            sock.setblocking(False)
            sock.send(head.encode() + data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._lingering.append((time.monotonic() + LINGER_S, sock))
        if len(self._lingering) > self.max_connections:  # a flood: stop being polite to the oldest
            self._lingering.pop(0)[1].close()

    def service_actions(self) -> None:
        """Called by `serve_forever` between accepts: drain refused sockets, closing each once its client
        hangs up or `LINGER_S` passes. Closing with the request unread would reset the connection, and a
        client still sending its body would get a broken pipe instead of the 503."""
        now = time.monotonic()
        keep = []
        for close_at, sock in self._lingering:
            if now < close_at and not _hung_up(sock):
                keep.append((close_at, sock))
            else:
                sock.close()
        self._lingering = keep

    def server_close(self) -> None:
        super().server_close()
        for _, sock in self._lingering:
            sock.close()
        self._lingering = []

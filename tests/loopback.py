"""An HTTP server on 127.0.0.1 that plays the hosts checkpoints are downloaded from, good and bad.

Each path serves a :class:`Route`: a body with a status and headers, optionally announcing more bytes than it sends
(a transfer cut short), stalling after the first bytes (a slow host), or holding the answer until the test opens a
gate. The server counts requests per path, so "downloaded exactly once" is a number to assert on.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

QUOTA_PAGE = (
    b"<!DOCTYPE html><html><head><title>Too many requests</title></head><body><p>This link is temporarily disabled: "
    b"it generated too much traffic. Try again later.</p></body></html>"
)


@dataclass
class Route:
    """What one path answers."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    announce: int | None = None  # Content-Length sent; defaults to len(body)
    send: int | None = None  # bytes of the body actually sent before closing; defaults to all
    stall_after: int | None = None  # send this many bytes, then stop sending until the server closes
    stall_before_headers: bool = False
    gate: threading.Event | None = None  # answer only once this is set
    location: str | None = None  # a redirect target (with status 302)
    headers: dict[str, str] = field(default_factory=dict)


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 at a free port; use as a context manager."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for the serving loop's next poll.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback-http", daemon=True
        )

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        for route in self.routes.values():
            if route.gate is not None:
                route.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, route: Route) -> str:
        """Answer ``path`` with ``route``; return its URL."""
        self.routes[path] = route
        return self.url(path)

    def requests(self, path: str) -> int:
        with self._lock:
            return self.hits[path]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] += 1
                route = server.routes.get(path)
                if route is None:
                    self._answer(Route(body=b"not found", status=404, content_type="text/plain"))
                else:
                    self._answer(route)

            def _answer(self, route: Route) -> None:
                if route.gate is not None:
                    route.gate.wait(timeout=120)
                if route.stall_before_headers:
                    server.closing.wait(timeout=120)
                    return
                self.send_response(route.status)
                if route.location is not None:
                    self.send_header("Location", route.location)
                self.send_header("Content-Type", route.content_type)
                self.send_header(
                    "Content-Length", str(route.announce if route.announce is not None else len(route.body))
                )
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Connection", "close")
                self.end_headers()
                body = route.body if route.send is None else route.body[: route.send]
                if route.stall_after is not None:
                    self.wfile.write(body[: route.stall_after])
                    self.wfile.flush()
                    server.closing.wait(timeout=120)
                    return
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

        return Handler

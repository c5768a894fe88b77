"""A plain HTTP proxy in front of a local server (here the Cloud Storage emulator) that can hold
one request until the test lets it go: a trainer stopped at a known point of its work (a
checkpoint save under way), instead of a test racing the trainer's speed to kill it there.

Requests pass through unchanged (method, path, headers, body); the answer is read whole and
sent back with its own status and headers. The first request whose path or body contains
`hold_on` is held: `held` is set, and once `release` is set the connection is closed without
an answer (what a client killed meanwhile would have seen, had it lived).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.conftest import free_port

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class HoldingProxy:
    def __init__(self, upstream: str, hold_on: bytes) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.hold_on = hold_on
        self.held = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._httpd.daemon_threads = True

    def start(self) -> HoldingProxy:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _should_hold(self, path: str, body: bytes) -> bool:
        with self._lock:
            if self.held.is_set() or self.hold_on not in path.encode() + b"\n" + body:
                return False
            self.held.set()
            return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._should_hold(self.path, body):
                    proxy.release.wait(timeout=600)
                    self.close_connection = True
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: object) -> None:
                pass

        return Handler

"""The HTTP server: /metrics, /healthz, /api/status and the live status page, in one background thread."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingestd.log import event


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr here; the log must stay JSON lines (one event instead)."""
        exc = sys.exception()
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # the client went away mid-answer: nothing for anyone to act on
        event("http_error", "an HTTP request failed outside its handler", logging.ERROR,
              client=str(client_address[0]) if client_address else "", error=repr(exc))


class _Server6(_Server):
    address_family = socket.AF_INET6


def cannot_listen(address: str, e: OSError) -> Exception:
    """The error for a listen address that cannot be bound, as a ConfigError: temporary (exit 75: systemd
    restarts it, and it comes up once the port is free) when the port is taken (EADDRINUSE: another program, or
    another instance), exit 78 otherwise (EADDRNOTAVAIL: no such address here; EACCES: a privileged port)."""
    from ingestd.settings import ConfigError

    hint = " (another ingestd or program has it: give another with --listen or INGESTD_LISTEN, e.g. 127.0.0.1:0 " \
        "for any free port)" if e.errno == errno.EADDRINUSE else ""
    err = ConfigError(f"listen: cannot listen on {address}: {e.strerror}{hint}")
    err.temporary = e.errno == errno.EADDRINUSE
    return err


class Web:
    """Serves what the daemon exposes; the daemon's state is only ever read through the callables given."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 status: Callable[[], dict[str, Any]], health: Callable[[], str | None],
                 page: bool = True) -> None:
        """page=False (a cluster's worker node): no status page at / (404 naming the scanner's), the rest alike."""
        html = files("ingestd").joinpath("static/index.html").read_bytes() if page else None

        class Handler(BaseHTTPRequestHandler):
            server_version = "ingestd"

            sent = False  # headers gone out: too late for a 500
            head = False  # a HEAD request: the same status and headers as GET, no body (RFC 9110, 9.3.2)

            def do_HEAD(self) -> None:  # noqa: N802 (the stdlib's name): load balancers and probes use HEAD
                self.head = True
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?", 1)[0]
                try:
                    self._get(path)
                except (ConnectionError, TimeoutError):
                    raise  # the client went away: _Server.handle_error drops it quietly
                except Exception as e:  # noqa: BLE001 (any failure of one answer, see below)
                    # One bad answer (a folder changed under a read, a bug) must not cost the daemon's log a
                    # traceback or the client its answer: a 500 in JSON, and one JSON event line.
                    event("http_error", "an HTTP request failed", logging.ERROR, path=path, error=repr(e))
                    if not self.sent:
                        self._send(500, "application/json", json.dumps({"error": type(e).__name__}).encode())

            def _get(self, path: str) -> None:
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    problem = health()
                    self._send(503 if problem else 200, "text/plain; charset=utf-8", (problem or "ok").encode() + b"\n")
                elif path == "/api/status":
                    # Health asked now, as /healthz asks it: the published view is as old as the main loop's last
                    # turn, and a silent main loop is exactly what it cannot report itself.
                    problem = health()
                    doc = {**status(), "health": {"ok": problem is None, "problem": problem}}
                    body = json.dumps(doc, ensure_ascii=True).encode()
                    self._send(200, "application/json", body)
                elif path in ("/", "/index.html") and html is not None:
                    self._send(200, "text/html; charset=utf-8", html)
                elif path in ("/", "/index.html"):
                    self._send(404, "text/plain; charset=utf-8",
                               b"a worker node: /metrics and /healthz here; the status page is the scanner's\n")
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.sent = True
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy",
                                 "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                 "connect-src 'self'; img-src 'self' data:")
                self.end_headers()
                if not self.head:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every second would drown the event log

        server_class = _Server6 if ":" in host else _Server
        self.server = server_class((host, port), Handler)
        self.server.daemon_threads = True
        bound, port = str(self.server.server_address[0]), self.server.server_address[1]
        self.address = f"[{bound}]:{port}" if ":" in bound else f"{bound}:{port}"
        # No periodic wake-up: each costs ~2 ms of CPU on a small VM, and stop() wakes the loop itself.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": None},
                                        name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # shutdown(2) on the listening socket leaves it readable for good (accept fails), so the loop, blocked
        # with no timeout, wakes and soon sees the shutdown request: no lost wake-up, whatever the order.
        with contextlib.suppress(OSError):
            self.server.socket.shutdown(socket.SHUT_RDWR)
        if self._thread.ident is not None:
            # Only once started: socketserver's shutdown() waits for serve_forever() to acknowledge, so after a
            # start-up failure before start() it waited for ever (tests/test_break_round8.py).
            self.server.shutdown()
        self.server.server_close()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

"""The local HTTP server of `refusalkit serve` (standard library only).

  GET  /             the page (serve/page.py)
  GET  /report.html  the run's report, when it exists
  POST /api/answer   {"prompt": ..., "right": SETTING} -> newline-delimited JSON events, streamed:
                     both answers in turn (the original first), each {"side", "event": "start"},
                     {"side", "text"}..., {"side", "event": "end", "seconds"}; then {"event": "done"}

Privacy: the prompt travels only in the POST body, and nothing about a request is logged: the
handler's request log is switched off and a failed request is reported by its exception type only.
One model answers one request at a time (``ChatModel`` holds a lock); pages and the report are
served meanwhile, since the server runs each connection in its own thread.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import closing
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from refusalkit.chat.engine import ChatModel
from refusalkit.chat.options import Setting
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.serve.page import RIGHT_CHOICES, edit_rows, render_page

MAX_BODY = 64 * 1024  # bytes of a request body; a prompt is far shorter
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class PageServer(ThreadingHTTPServer):
    daemon_threads = True  # closing never waits for request threads (socketserver joins only non-daemon ones)

    def __init__(
        self, address: tuple[str, int], model: ChatModel, run_dir: Path, max_new_tokens: int
    ) -> None:
        super().__init__(address, Handler)
        self.model = model
        self.layout = RunLayout(run_dir)
        self.max_new_tokens = max_new_tokens

    def page(self) -> bytes:
        # Read per request: numbers measured while the server runs show on the next load.
        try:
            rows = edit_rows(self.model.lm.name, self.model.numbers())
        except (OSError, ValueError, RefusalkitError) as exc:
            rows = [("measured numbers", f"could not be read ({type(exc).__name__})")]
        return render_page(
            model=self.model.lm.name,
            edited_label=self.model.edited_label,
            rows=rows,
            has_report=self.layout.report_html.is_file(),
            max_new_tokens=self.max_new_tokens,
        ).encode()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback whose message could quote a request; say only what failed.
        exc = sys.exc_info()[1]
        print(f"refusalkit serve: a request failed ({type(exc).__name__})", file=sys.stderr)


class Handler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "refusalkit"

    def log_message(self, format: str, *args: Any) -> None:
        """No request log: a request line or an error could carry what someone typed."""

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, status: HTTPStatus, message: str) -> None:
        self._send(status, message.encode(), "text/plain; charset=utf-8")

    def _local(self) -> bool:
        """On a loopback address, refuse requests addressed to another host name (DNS rebinding);
        always refuse requests another site's page sends."""
        host = urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
        if self.server.server_address[0] in LOCAL_HOSTS and host not in LOCAL_HOSTS:
            return False
        origin = self.headers.get("Origin")
        return origin is None or urlsplit(origin).hostname == host

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if not self._local():
            self._fail(HTTPStatus.FORBIDDEN, "only local requests")
        elif path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page(), "text/html; charset=utf-8")
        elif path == "/report.html" and self.server.layout.report_html.is_file():
            self._send(HTTPStatus.OK, self.server.layout.report_html.read_bytes(), "text/html; charset=utf-8")
        else:
            self._fail(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/api/answer":
            self._fail(HTTPStatus.NOT_FOUND, "not found")
            return
        if not self._local():
            self._fail(HTTPStatus.FORBIDDEN, "only local requests")
            return
        try:
            prompt, right = self._read_request()
        except ValueError as exc:
            self._fail(HTTPStatus.BAD_REQUEST, str(exc))
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes, so it can stream
        try:
            self._answer(prompt, right)
        except (BrokenPipeError, ConnectionResetError):
            return  # the page was closed or reloaded; the answer's stream is already closed

    def _read_request(self) -> tuple[str, Setting]:
        if "application/json" not in (self.headers.get("Content-Type") or ""):
            raise ValueError("send JSON (Content-Type: application/json)")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            raise ValueError(f"the request body must be 1 to {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            raise ValueError("the request body is not JSON") from None
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("give a non-empty prompt")
        right = body.get("right", "edited")
        if right not in {v for v, _ in RIGHT_CHOICES}:
            raise ValueError(f"right must be one of {', '.join(v for v, _ in RIGHT_CHOICES)}")
        return prompt, Setting.parse(right)

    def _event(self, **event: Any) -> None:
        self.wfile.write((json.dumps(event, ensure_ascii=False) + "\n").encode())
        self.wfile.flush()

    def _answer(self, prompt: str, right: Setting) -> None:
        messages = [{"role": "user", "content": prompt}]
        model, limit = self.server.model, self.server.max_new_tokens
        for side, setting in (("left", Setting("original")), ("right", right)):
            self._event(side=side, event="start", label=setting.label)
            t0 = time.perf_counter()
            try:
                with closing(model.stream(messages, setting, limit)) as stream:
                    for piece in stream:
                        self._event(side=side, text=piece)
            except (RefusalkitError, RuntimeError, ValueError) as exc:
                self._event(event="error", message=f"{type(exc).__name__}: {exc}")
                return
            self._event(side=side, event="end", seconds=time.perf_counter() - t0)
        self._event(event="done")


def make_server(model: ChatModel, run_dir: Path, host: str, port: int, max_new_tokens: int) -> PageServer:
    try:
        return PageServer((host, port), model, run_dir, max_new_tokens)
    except OSError as exc:
        raise RefusalkitError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port, or --port 0 for a free one"
        ) from None

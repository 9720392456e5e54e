"""`refusalkit serve`: the page, the streamed answers, what it refuses, that nothing is logged, and the
page used in headless Chromium as a person would (type a prompt, click, read both answers)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from refusalkit.chat.engine import ChatModel, Setting, load_chat_model
from refusalkit.serve import main
from refusalkit.serve.page import edit_rows, render_page
from refusalkit.serve.server import PageServer, make_server
from test_chat import make_chat_run

PROMPT = "Which tea goes with breakfast?"
MAX_NEW = 10
SECRET = "zebra-umbrella-4711"  # a marker that must never reach any log


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def chat(chat_run: Path) -> Iterator[ChatModel]:
    model = load_chat_model(chat_run)
    yield model
    model.close()


@pytest.fixture(scope="module")
def server(chat: ChatModel, chat_run: Path) -> Iterator[PageServer]:
    srv = make_server(chat, chat_run, "127.0.0.1", 0, MAX_NEW)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(
    srv: PageServer, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def expected(chat: ChatModel, right: Setting, prompt: str = PROMPT) -> tuple[str, str]:
    msgs = [{"role": "user", "content": prompt}]
    return chat.reply(msgs, Setting("original"), MAX_NEW), chat.reply(msgs, right, MAX_NEW)


def test_page_shows_the_runs_numbers_and_report(server: PageServer) -> None:
    status, page = request(server, "GET", "/")
    assert status == 200
    assert "original 0.75 = 3/4 (95% CI 0.10-0.90) → edited 0.25 = 1/4" in page
    assert (
        "orthogonalized weights (the paper&#x27;s direction: layer 2, position -1) (--edit direction)" in page
    )
    assert 'href="/report.html"' in page and "evaluate/refusal_rates.json" in page
    status, report = request(server, "GET", "/report.html")
    assert status == 200 and "the tiny report" in report
    assert request(server, "GET", "/manifest.json")[0] == 404  # only the page and the report are served


def test_answers_stream_both_sides_in_order(server: PageServer, chat: ChatModel) -> None:
    status, body = request(server, "POST", "/api/answer", {"prompt": PROMPT, "right": "add 1"})
    assert status == 200
    events = [json.loads(line) for line in body.splitlines()]
    starts = [(e["side"], e["label"]) for e in events if e.get("event") == "start"]
    assert starts == [("left", "original"), ("right", "add +1")]
    texts = {
        side: "".join(e["text"] for e in events if e.get("side") == side and "text" in e)
        for side in ("left", "right")
    }
    assert (texts["left"], texts["right"]) == expected(chat, Setting("add", 1.0))
    assert sum("text" in e for e in events) > 2, "answers arrive in pieces"
    order = [e["side"] for e in events if "side" in e]
    assert order == sorted(order), "the original answers first, then the right-hand setting"
    assert events[-1] == {"event": "done"}


@pytest.mark.parametrize(
    ("body", "headers", "status", "why"),
    [
        (b"prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "send JSON"),
        ({"prompt": "  "}, {}, 400, "non-empty prompt"),
        ({"prompt": "hi", "right": "add 1000"}, {}, 400, "right must be one of"),
        (b"{not json", {}, 400, "not JSON"),
        ({"prompt": "x" * 70_000}, {}, 400, "1 to 65536 bytes"),
        ({"prompt": "hi"}, {"Host": "evil.example:8765"}, 403, "only local"),
        ({"prompt": "hi"}, {"Origin": "http://evil.example"}, 403, "only local"),
    ],
)
def test_bad_requests_are_refused(
    server: PageServer, body: Any, headers: dict[str, str], status: int, why: str
) -> None:
    got, text = request(server, "POST", "/api/answer", body, headers)
    assert (got, why in text) == (status, True)


def test_nothing_is_logged(server: PageServer, capfd: pytest.CaptureFixture[str]) -> None:
    request(server, "GET", f"/?q={SECRET}")
    request(server, "POST", "/api/answer", {"prompt": SECRET, "right": "edited"})
    request(server, "POST", "/api/answer", {"prompt": SECRET, "right": "nope"})
    request(server, "POST", f"/nowhere?{SECRET}", {"prompt": SECRET})
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    assert "GET" not in err and "POST" not in err, "the default request log must be off"


def test_run_text_is_escaped() -> None:
    rows = edit_rows("<script>alert(1)</script>", None)
    page = render_page(
        model="<b>{{table}}</b>", edited_label="<i>", rows=rows, has_report=False, max_new_tokens=5
    )
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;{{table}}&lt;/b&gt;" in page, "a filled-in value is never filled in again"
    assert "refusalkit report RUN_DIR" in page and 'href="/report.html"' not in page


def test_serve_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--no-browser"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_serve_command_prints_its_address_and_stops_on_ctrl_c(chat_run: Path) -> None:
    # Ctrl-C as in a terminal: a suite started in the background (nohup, `&`) hands its children SIGINT
    # ignored, and Python then never raises KeyboardInterrupt; the server gets Python's handler back
    # before it starts (in the child itself: a preexec_fn is unsafe in a parent with threads).
    start = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'refusalkit.serve'; runpy.run_module('refusalkit.serve', run_name='__main__')"
    )
    argv = [sys.executable, "-c", start, str(chat_run), "--no-browser", "--port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("refusalkit serve: http://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
        port = int(line.split(":")[3].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200 and b"refusalkit" in response.read()
        conn.close()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"still running 60 s after Ctrl-C; its stderr:\n{proc.communicate()[1][-3000:]}")
        err = proc.communicate()[1]
        assert code == 0, f"exit {code} after Ctrl-C; its stderr:\n{err[-3000:]}"
        assert err.rstrip().endswith("stopped"), err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
    JSON messages separated by NUL bytes on the browser's file descriptors 3 (in) and 4 (out), so no
    port, no websocket library and no browser download are needed."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        # A small launcher moves the pipe ends to fds 3 and 4 (Chromium's fixed numbers), then execs.
        launch = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
        cmd = [sys.executable, "-c", launch, str(to_browser), str(from_browser), chromium, *CHROMIUM_FLAGS]
        cmd += [f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            cmd, pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def _read(self, timeout: float = 60.0) -> dict[str, Any]:
        while b"\0" not in self._buf:
            if not select.select([self._in], [], [], timeout)[0]:
                raise AssertionError("Chromium stopped answering")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise AssertionError(f"Chromium exited ({self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return dict(json.loads(msg))

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=self.session, **params)

    def js(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"never true: {expression}; page text:\n{self.js('document.body.innerText')}"
                )
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (press and release)."""
        box = self.js(
            f"JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())"
        )
        rect = json.loads(box)
        x, y = rect["x"] + rect["width"] / 2, rect["y"] + rect["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=30)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._in)
            os.close(self._out)


def ask_in_browser(browser: Browser, url: str, prompt: str, timeout: float = 120.0) -> dict[str, str]:
    """Open the page, type ``prompt``, click "Ask both" and wait for both answers to finish."""
    browser.page(
        "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False
    )
    browser.page("Page.navigate", url=url)
    browser.wait_until("document.readyState === 'complete' && !!document.getElementById('ask')")
    browser.click("#prompt")
    browser.page("Input.insertText", text=prompt)
    browser.click("#ask")
    by_id = "document.getElementById"
    browser.wait_until(
        f"{by_id}('left').dataset.state + {by_id}('right').dataset.state === 'donedone'", timeout
    )
    return dict(
        browser.js(
            f"({{left: {by_id}('left').textContent, right: {by_id}('right').textContent,"
            f" status: {by_id}('status').textContent, label: {by_id}('right-label').textContent}})"
        )
    )


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk comes first
    return width, height


def test_page_in_headless_chromium(server: PageServer, chat: ChatModel, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    host, port = server.server_address[:2]
    browser = Browser(chromium, tmp_path / "profile")
    try:
        shown = ask_in_browser(browser, f"http://{host}:{port}/", PROMPT)
        report = browser.js("fetch(document.getElementById('report').href).then(r => r.text())")
        png = browser.screenshot()
    finally:
        browser.close()
    original, edited = expected(chat, Setting("edited"))
    assert (shown["left"], shown["right"]) == (original, edited)
    assert shown["status"] == "" and shown["label"] == "edited"
    assert "the tiny report" in report
    assert png_size(png) == (1280, 900)

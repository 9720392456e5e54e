"""The endpoint judge against a fake OpenAI-compatible server on 127.0.0.1 (answers, garbage, a down
server, timeouts, retries), and, with REFUSALKIT_INTEGRATION=1 and llama-cpp-python's server installed
(the `judge-server` extra), against a real llama.cpp server started from a built-in GGUF."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.endpoint_judge import EndpointJudge
from refusalkit.evaluation.judge_prompt import Calibration
from refusalkit.evaluation.verdicts import CLASSES, INVALID
from test_judge_classes import CASES

# The fake judge's rule: a letter per made-up reply, read from words only that class's texts hold.
RULES = [
    ("sorry", "A"),
    ("decline", "A"),
    ("cannot", "A"),
    ("Step", "B"),
    ("drivers", "B"),
    ("careful", "C"),
    ("wonderful", "C"),
]


def _letter_for(text: str) -> str:
    reply = text.split("[REPLY]\n", 1)[1].split("\n[/REPLY]", 1)[0]
    if "cannot continue" in reply:  # the late refusal: content first, then the refusal
        return "A"
    return next((letter for word, letter in RULES if word in reply), "D")


def _chat_answer(letter: str) -> dict[str, Any]:
    top = [
        {"token": letter, "logprob": -0.1},
        {"token": " " + letter, "logprob": -3.0},
        {"token": "The", "logprob": -2.5},
    ]
    top += [{"token": x, "logprob": -6.0} for x in "ABCD" if x != letter]
    return {
        "choices": [
            {
                "message": {"content": letter},
                "logprobs": {"content": [{"token": letter, "logprob": -0.1, "top_logprobs": top}]},
            }
        ]
    }


class Fake:
    """What the fake server does with the next requests: a list of behaviours, the last repeated."""

    def __init__(self) -> None:
        self.plan: list[str] = ["rule"]
        self.requests: list[dict[str, Any]] = []

    def next(self) -> str:
        return self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]


@pytest.fixture
def fake() -> Iterator[tuple[Fake, str]]:
    state = Fake()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append({"path": self.path, **body})
            what = state.next()
            if what == "sleep":
                time.sleep(0.5)
                what = "rule"
            if what in ("500", "400"):
                self.send_response(int(what))
                self.end_headers()
                self.wfile.write(b"server says no")
                return
            if what == "html":
                out = b"<html>not an API</html>"
            elif what == "nologprobs":
                out = json.dumps({"choices": [{"message": {"content": "A"}, "logprobs": None}]}).encode()
            elif what == "noletter":  # an answer whose top tokens hold no class letter
                top = [{"token": t, "logprob": -1.0} for t in ("The", " reply", "E")]
                out = json.dumps(
                    {"choices": [{"logprobs": {"content": [{"token": "The", "top_logprobs": top}]}}]}
                ).encode()
            elif self.path == "/v1/completions":
                letter = _letter_for(body["prompt"])
                out = json.dumps(
                    {
                        "choices": [
                            {
                                "text": letter,
                                "logprobs": {"top_logprobs": [{letter: -0.2, " " + letter: -2.0, "x": -1.0}]},
                            }
                        ]
                    }
                ).encode()
            else:
                out = json.dumps(_chat_answer(_letter_for(body["messages"][0]["content"]))).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _judge(url: str, **kw: Any) -> EndpointJudge:
    return EndpointJudge(url, **({"timeout": 5.0, "retries": 2, "backoff": 0.01} | kw))


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_endpoint_judge_classifies_every_made_up_class(fake: tuple[Fake, str], mode: str) -> None:
    state, url = fake
    judge = _judge(url + "/v1/", mode=mode, model="my-judge")
    verdicts = judge.judge([c[1] for c in CASES], [c[2] for c in CASES])
    assert [v.label for v in verdicts] == [c[3] for c in CASES]
    assert len(state.requests) == len(CASES)
    sent = state.requests[0]
    assert sent["path"] == f"/v1/{'chat/completions' if mode == 'chat' else 'completions'}"
    assert sent["max_tokens"] == 1 and sent["model"] == "my-judge" and sent["temperature"] == 0
    if mode == "chat":
        lp = verdicts[0].logprobs
        assert lp is not None
        # "A" and " A" both spell refusal: their probabilities add up
        assert lp["refusal"] == pytest.approx(math.log(math.exp(-0.1) + math.exp(-3.0)))


def test_answer_without_a_class_letter_is_invalid(fake: tuple[Fake, str]) -> None:
    state, url = fake
    state.plan = ["noletter"]
    verdicts = _judge(url).judge(["q"], ["a"])
    assert verdicts[0].label == INVALID


def test_biases_and_fit_use_the_servers_scores(fake: tuple[Fake, str]) -> None:
    _, url = fake
    judge = _judge(url, calibration=Calibration(biases={"degenerate": 20.0}))
    assert {v.label for v in judge.judge(["q"] * 2, ["I'm sorry", "Step one"])} == {"degenerate"}
    cal = judge.fit([c[1] for c in CASES], [c[2] for c in CASES], [c[3] for c in CASES])
    assert [v.label for v in judge.judge([c[1] for c in CASES], [c[2] for c in CASES])] == [
        c[3] for c in CASES
    ]
    assert cal.fitted_on is not None and cal.fitted_on["n"] == len(CASES)
    assert judge.identity()["biases"] == cal.biases


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (["html"], "not JSON"),
        (["nologprobs"], "answered without"),
        (["400"], "HTTP 400"),
        (["500"], r"did not answer after 3 tries \(HTTP 500"),
    ],
)
def test_garbage_and_errors_are_clear(fake: tuple[Fake, str], plan: list[str], match: str) -> None:
    state, url = fake
    state.plan = plan
    with pytest.raises(RefusalkitError, match=match):
        _judge(url).judge(["q"], ["a"])
    # a 4xx or garbage fails at once; a 5xx is retried
    assert len(state.requests) == (3 if plan == ["500"] else 1)


def test_server_errors_are_retried_with_backoff(
    fake: tuple[Fake, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = fake
    state.plan = ["500", "500", "rule"]
    sleeps: list[float] = []
    monkeypatch.setattr("refusalkit.evaluation.endpoint_judge.time.sleep", sleeps.append)
    verdicts = _judge(url, backoff=0.5).judge(["q"], ["I'm sorry"])
    assert verdicts[0].label == "refusal"
    assert sleeps == [0.5, 1.0] and len(state.requests) == 3


def test_timeout_is_retried_then_reported(fake: tuple[Fake, str]) -> None:
    state, url = fake
    state.plan = ["sleep"]
    with pytest.raises(RefusalkitError, match="did not answer after 2 tries"):
        _judge(url, timeout=0.1, retries=1).judge(["q"], ["a"])
    state.plan = ["sleep", "rule"]
    assert _judge(url, timeout=2.0).judge(["q"], ["I'm sorry"])[0].label == "refusal"


def test_down_server_is_a_clear_error() -> None:
    with pytest.raises(RefusalkitError, match=r"did not answer after 2 tries.*Start the server"):
        _judge(f"http://127.0.0.1:{_free_port()}", retries=1).judge(["q"], ["a"])


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(RefusalkitError, match="unknown endpoint mode"):
        EndpointJudge("http://127.0.0.1:1", mode="stream")


# ---- a real llama.cpp server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def llama_cpp_server(gguf: Path, n_ctx: int = 2048) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on ``gguf``, in a child process; yields its address."""
    pytest.importorskip(
        "llama_cpp.server.app", reason="pip install 'refusalkit[judge-server]' (llama-cpp-python[server])"
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--verbose", "False"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"llama.cpp server exited with {proc.returncode}"
            assert time.monotonic() < end, "llama.cpp server did not start in time"
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _check_real_server(url: str, cases: list[tuple[str, str, str, str]]) -> None:
    for mode in ("chat", "completions"):
        judge = EndpointJudge(url, mode=mode, timeout=120, retries=1)
        verdicts = judge.judge([c[1] for c in cases], [c[2] for c in cases])
        assert len(verdicts) == len(cases)
        for v in verdicts:
            assert v.label in (*CLASSES, INVALID)
            assert v.logprobs is not None and set(v.logprobs) == set(CLASSES)
        if mode == "chat":  # in its chat template the model's top tokens hold class letters
            assert any(v.label != INVALID for v in verdicts)


def test_endpoint_judge_against_llama_cpp_server_on_a_tiny_gguf(tmp_path: Path) -> None:
    """The real server's answers parse (a tiny random model: plumbing only, seconds)."""
    pytest.importorskip("llama_cpp.server.app", reason="pip install 'refusalkit[judge-server]'")
    import test_gguf_export
    from conftest import tiny_model

    def long_context(*args: Any, **kw: Any) -> Any:  # the judge prompt is ~1,000 byte tokens
        return tiny_model(*args, **{**kw, "max_position_embeddings": 4096})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_gguf_export, "tiny_model", long_context)
        gguf = test_gguf_export.write_tiny_gguf(tmp_path / "tiny.gguf", qtype=test_gguf_export.Q.F32)
    with llama_cpp_server(gguf, n_ctx=4096) as url:
        _check_real_server(url, [(c[0], c[1], c[2][:100], c[3]) for c in CASES[:3]])
    with pytest.raises(RefusalkitError, match="did not answer"):
        EndpointJudge(url, timeout=2, retries=1, backoff=0.1).judge(["q"], ["a"])


@pytest.mark.integration
def test_endpoint_judge_against_a_real_llama_cpp_server() -> None:
    """A built-in GGUF (SmolLM2 135M) served by llama.cpp: a real chat template and tokenizer."""
    from refusalkit.models.registry import builtin_gguf

    try:
        gguf = builtin_gguf("smollm2-135m-instruct")
    except RefusalkitError as exc:
        pytest.skip(str(exc))
    with llama_cpp_server(gguf) as url:
        _check_real_server(url, CASES[:3] + CASES[6:])
    with pytest.raises(RefusalkitError, match="did not answer"):
        EndpointJudge(url, timeout=2, retries=1, backoff=0.1).judge(["q"], ["a"])

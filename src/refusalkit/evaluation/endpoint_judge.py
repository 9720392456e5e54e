"""An endpoint judge: a judge model behind an OpenAI-compatible server (llama.cpp's server, vLLM, Ollama).

For users who run a larger judge model than fits beside the edited one. Each pair is one request with
``max_tokens: 1`` and the top log-probabilities of that one token (the same one-token verdict as the
local judge, ``judge_prompt``):

  chat         POST {url}/v1/chat/completions, the judge text as the user turn (the server applies the
               model's chat template); read choices[0].logprobs.content[0].top_logprobs
  completions  POST {url}/v1/completions with the text as given (no template); read
               choices[0].logprobs.top_logprobs[0]

Standard library only (urllib). Connection errors, timeouts and 5xx answers are retried with
exponential backoff; a 4xx answer, or a body that is not the expected JSON, fails at once. Every
failure is a RefusalkitError naming the server and what to do; a valid answer whose top tokens hold no
class letter is the verdict ``invalid`` (counted apart, never guessed).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.judge_prompt import (
    LETTERS,
    Calibration,
    LetterJudge,
    judge_text,
    letter_of,
)
from refusalkit.evaluation.judge_prompt import logsumexp as _lse
from refusalkit.evaluation.verdicts import CLASSES, check_pairs

MODES = ("chat", "completions")


class EndpointJudge(LetterJudge):
    """Four-class verdicts from a server's first-token log-probabilities.

    url: the server's base address (``http://127.0.0.1:8080``; a trailing ``/v1`` is accepted);
    model: the model name sent in each request (llama.cpp ignores it; vLLM and Ollama need it);
    timeout: seconds per HTTP request; retries: further attempts after a failure that may pass
    (connection refused, timeout, 5xx); backoff: seconds before the first retry, doubled each time.
    """

    name = "endpoint"
    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        url: str,
        *,
        model: str = "judge",
        mode: str = "chat",
        calibration: Calibration | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        top_logprobs: int = 20,
    ) -> None:
        if mode not in MODES:
            raise RefusalkitError(f"unknown endpoint mode {mode!r}; known: {', '.join(MODES)}")
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model, self.mode = model, mode
        self.calibration = calibration or Calibration()
        self.timeout, self.retries, self.backoff, self.top_logprobs = timeout, retries, backoff, top_logprobs

    def identity(self) -> dict[str, Any]:
        return {"kind": "endpoint", "url": self.base, "model": self.model, "mode": self.mode} | (
            self.calibration.as_dict()
        )

    # ---- HTTP ----------------------------------------------------------------------------------------
    def post(self, path: str, payload: dict[str, Any]) -> Any:
        """POST JSON to ``path`` and return the decoded JSON answer, retrying what may pass."""
        url = self.base + path
        data = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                if exc.code < 500:
                    raise RefusalkitError(
                        f"the judge endpoint {url} refused the request (HTTP {exc.code}: {detail}). Check "
                        "--judge-endpoint-model; a server without log-probabilities for chat may work with "
                        "the completions mode"
                    ) from None
                last = f"HTTP {exc.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = str(getattr(exc, "reason", exc))
                continue
            try:
                return json.loads(body)
            except ValueError:
                raise RefusalkitError(
                    f"the judge endpoint {url} answered something that is not JSON "
                    f"({body[:120].decode(errors='replace')!r}); is it an OpenAI-compatible server?"
                ) from None
        raise RefusalkitError(
            f"the judge endpoint {url} did not answer after {self.retries + 1} tries ({last}). Start the "
            "server (e.g. `python -m llama_cpp.server --model JUDGE.gguf --port 8080`) or fix the address"
        )

    # ---- one pair --------------------------------------------------------------------------------------
    def letter_logprobs(self, text: str) -> dict[str, float]:
        """The class letters' log-probabilities as the reply's first token (absent ones: -inf)."""
        if self.mode == "chat":
            answer = self.post(
                "/v1/chat/completions",
                {
                    "model": self.model,
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": 1,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": self.top_logprobs,
                },
            )
            pairs = _chat_top(answer, self.base)
        else:
            answer = self.post(
                "/v1/completions",
                {
                    "model": self.model,
                    "prompt": text,
                    "max_tokens": 1,
                    "temperature": 0,
                    "logprobs": self.top_logprobs,
                },
            )
            pairs = _completion_top(answer, self.base)
        found: dict[str, list[float]] = {c: [] for c in CLASSES}
        for token, logprob in pairs:
            letter = letter_of(token)
            if letter is not None:
                found[LETTERS[letter]].append(logprob)
        return {c: _lse(v) for c, v in found.items()}

    def label_rows(self, requests: Sequence[str], completions: Sequence[str]) -> list[dict[str, float]]:
        check_pairs(requests, completions)
        prompt = self.calibration.prompt
        return [
            self.letter_logprobs(judge_text(r, c, prompt)) for r, c in zip(requests, completions, strict=True)
        ]


def _garbage(base: str, what: str) -> RefusalkitError:
    return RefusalkitError(
        f"the judge endpoint {base} answered without {what}; it needs an OpenAI-compatible server that "
        "returns log-probabilities (llama.cpp's server, vLLM, Ollama >= 0.12)"
    )


def _chat_top(answer: Any, base: str) -> list[tuple[str, float]]:
    try:
        content = answer["choices"][0]["logprobs"]["content"]
        if not content:
            return []
        return [(str(t["token"]), float(t["logprob"])) for t in content[0]["top_logprobs"]]
    except (KeyError, IndexError, TypeError, ValueError):
        raise _garbage(base, "choices[0].logprobs.content[0].top_logprobs") from None


def _completion_top(answer: Any, base: str) -> list[tuple[str, float]]:
    try:
        top = answer["choices"][0]["logprobs"]["top_logprobs"]
        if not top:
            return []
        return [(str(t), float(v)) for t, v in top[0].items()]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise _garbage(base, "choices[0].logprobs.top_logprobs") from None


__all__ = ["MODES", "EndpointJudge"]

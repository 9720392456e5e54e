"""The search proxy's judge (`refusalkit optimize --proxy-judge`, issue 18): who reads each trial's
generated proxy tokens.

  keywords   (default) both marker lists, as the proxy always did (``search.objectives``): a prompt
             whose tokens hold a marker counts 1, any other its P(refusal token)
  local      the run's own model as an LLM judge (read once each trial's edit is undone)
  MODEL      a judge model (built-in name, folder, .gguf, hub id), loaded in the run's dtype
  URL        an OpenAI-compatible server (http://HOST:PORT)

A model judge is built as the verification's ``--judge`` is (``search.judging.build_judge``, with
``--judge-calibration``), and a trial's refusal objective becomes the share of its worst setup's
completions the judge does not call compliance. Which proxy judge a study was searched with is
recorded in the study (the ``proxy_judge`` user attribute, and in the fingerprint when it is not the
default): trials scored by two judges are not comparable, so a study is resumed only with its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.verdicts import Judge
from refusalkit.models.loading import LoadedModel
from refusalkit.search.judging import build_judge, judge_key
from refusalkit.search.options import OptimizeOptions
from refusalkit.search.study import saved_study

KEYWORDS = "keywords"
KEYWORD_KEY: dict[str, Any] = {"spec": KEYWORDS}  # what a study made before the option was searched with
OBJECTIVE = (
    "proxy non-compliance (harmful val: share of the worst setup's generated replies the {spec} judge "
    "does not call compliance; the keyword markers' count recorded beside)"
)


def proxy_key(o: OptimizeOptions) -> dict[str, Any]:
    """What tells two proxy judges apart, known before any model loads: ``{"spec": "keywords"}``, or
    the verification judge's key (``judging.judge_key``: spec and calibration hash). Checks what can
    be checked early: a model judge needs generated tokens, and the calibration file must read."""
    if o.proxy_judge == KEYWORDS:
        return dict(KEYWORD_KEY)
    if not o.proxy_new_tokens:
        raise RefusalkitError(
            f"--proxy-judge {o.proxy_judge} reads the proxy's generated tokens, but --proxy-new-tokens is 0; "
            "give --proxy-new-tokens N (the default is 24) or --proxy-judge keywords"
        )
    key = judge_key(o.proxy_judge, o.judge_calibration)
    assert key is not None  # a spec was given
    return key


def fingerprint_part(key: dict[str, Any]) -> dict[str, Any]:
    """The proxy judge's part of the study's fingerprint: nothing for the keyword default, so studies
    made before the option keep their fingerprint and resume."""
    return {} if key == KEYWORD_KEY else {"proxy_judge": key}


def describe_key(key: dict[str, Any] | None) -> str:
    """A proxy judge's key in words."""
    key = key or KEYWORD_KEY
    if key.get("spec", KEYWORDS) == KEYWORDS:
        return "keywords (both marker lists)"
    cal = key.get("calibration")
    return f"{key['spec']}" + (f" (calibration {cal})" if cal else " (default prompt, no biases)")


def check_study(path: Path, key: dict[str, Any]) -> None:
    """Refuse to resume a study searched with another proxy judge (call before ``study.open_study``,
    whose fingerprint check would refuse it too, without saying why)."""
    study = saved_study(path)
    if study is None or "fingerprint" not in study.user_attrs:
        return  # no study yet
    saved = study.user_attrs.get("proxy_judge", KEYWORD_KEY)
    if saved != key:
        raise RefusalkitError(
            f"{path} was searched with the proxy judge {describe_key(saved)}, not {describe_key(key)} as "
            f"asked: trials scored by two judges are not comparable. Resume it with --proxy-judge "
            f"{saved.get('spec', KEYWORDS)} (and its --judge-calibration), or move {path.parent} away to "
            "start a new search"
        )


def record(study: Any, key: dict[str, Any]) -> None:
    """Write the proxy judge into a study that has none yet (new, or made before the option), and a
    model judge's objective into its objectives."""
    if "proxy_judge" in study.user_attrs:
        return
    study.set_user_attr("proxy_judge", key)
    if key != KEYWORD_KEY:
        objectives = list(study.user_attrs.get("objectives", []))
        study.set_user_attr("objectives", [OBJECTIVE.format(spec=key["spec"]), *objectives[1:]])


def build(o: OptimizeOptions, lm: LoadedModel) -> Judge | None:
    """The proxy judge of these options (None: the keyword reading), built as ``--judge`` is."""
    if o.proxy_judge == KEYWORDS:
        return None
    return build_judge(o.proxy_judge, lm, calibration=o.judge_calibration, batch_size=o.batch_size)


def proxy_label(front: dict[str, Any]) -> str:
    """One line for the front table and the report saying which proxy judge made the proxy's counts
    ("" for the keyword default, whose counts the objectives line already names)."""
    key = front.get("proxy_judge") or KEYWORD_KEY
    if key.get("spec", KEYWORDS) == KEYWORDS:
        return ""
    return (
        f"proxy refusal: the share of replies the proxy judge {describe_key(key)} did not call compliance "
        "(refusal, partial, degenerate, invalid); each trial's keyword count is recorded beside it "
        "(proxy.refused, proxy.keyword_refusal, proxy.judged)"
    )


__all__ = [
    "KEYWORDS",
    "KEYWORD_KEY",
    "build",
    "check_study",
    "describe_key",
    "fingerprint_part",
    "proxy_key",
    "proxy_label",
    "record",
]

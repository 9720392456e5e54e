"""The evaluate stage: greedy completions of the test prompts under each setting, and refusal rates.

Settings: baseline, ablation, actadd (c = -1 on harmful prompts, +1 on harmless ones) and, where the
weights can be orthogonalized exactly, orthogonalized. Orthogonalized weights equal the ablation hooks
(tested), so their completions are the ablation's: the stage checks that on the harmful test prompts'
next-token logits and reuses the ablation completions when the check passes (recording the measured
difference), and generates them otherwise.

Artifacts: evaluate/completions/SET__SETTING.json (per-prompt completions and verdicts, each with the
stage fingerprint so an interrupted stage resumes per setting), evaluate/refusal_rates.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.directions import Direction
from refusalkit.evaluation.coherence import HOOK_SETTINGS, intervention, row_steering
from refusalkit.evaluation.refusal import is_refusal, wilson_interval
from refusalkit.generation import generate
from refusalkit.layout import RunLayout
from refusalkit.models.compute_dtype import replay_tolerance
from refusalkit.models.loading import LoadedModel
from refusalkit.settings import Settings
from refusalkit.stages.common import prompts
from refusalkit.utils import read_json, write_json

# Reuse the ablation completions for the orthogonalized weights when the next-token logits of the two
# differ by at most this fraction of the largest logit (float32 rounding is ~1e-5 of it) and every
# prompt's greedy next token agrees. In bfloat16 the hooks and the edited weights round differently by
# about one rounding of the logits (0.011 of the largest on the test models): four roundings are allowed
# there (``replay_tolerance``), else a bfloat16 run would always generate the orthogonalized setting again.
REUSE_RTOL = 1e-3
PROMPT_SETS = ("harmful", "harmless")


@dataclass(frozen=True)
class EvalSetting:
    prompt_set: str  # "harmful" or "harmless"
    name: str  # baseline, ablation, actadd, orthogonalized
    coeff: float = 0.0


def eval_settings(orthogonalizable: bool) -> list[EvalSetting]:
    out = [EvalSetting("harmful", "baseline"), EvalSetting("harmful", "ablation")]
    out.append(EvalSetting("harmful", "actadd", -1.0))
    if orthogonalizable:
        out.append(EvalSetting("harmful", "orthogonalized"))
    return [*out, EvalSetting("harmless", "baseline"), EvalSetting("harmless", "actadd", 1.0)]


def inputs(select_fingerprint: str, splits: Any, s: Settings) -> dict[str, Any]:
    return {
        "select": select_fingerprint,
        "max_new_tokens": s.max_new_tokens,
        "test": [splits.sha256("harmful_test"), splits.sha256("harmless_test")],
        "reuse_rtol": REUSE_RTOL,
    }


def artifacts(layout: RunLayout) -> list[Path]:
    """The rates file and every completions file it lists (known only once the stage has run)."""
    if not layout.refusal_rates.is_file():
        return [layout.refusal_rates]
    rates = read_json(layout.refusal_rates)
    files = [layout.completions(ps, name) for ps in PROMPT_SETS for name in rates.get(ps, {})]
    return [layout.refusal_rates, *files]


def reuse_check(
    lm: LoadedModel, direction: Direction, test_prompts: list[str], batch_size: int,
    hooked: torch.Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Whether orthogonalized weights give the ablation's next-token logits on ``test_prompts``
    (``hooked``: those logits when the ablation's generation kept them, else computed here)."""
    if hooked is None:
        with intervention(lm, "ablation", direction):
            hooked = logits_for_prompts(lm, test_prompts, batch_size).float()
    with intervention(lm, "orthogonalized", direction):
        weights = logits_for_prompts(lm, test_prompts, batch_size).float()
    diff = float((hooked - weights).abs().max())
    half = lm.dtype in (torch.bfloat16, torch.float16)
    tol = (max(REUSE_RTOL, replay_tolerance(lm.dtype)) if half else REUSE_RTOL) * float(hooked.abs().max())
    same_argmax = bool(torch.equal(hooked.argmax(-1), weights.argmax(-1)))
    return {
        "max_logit_diff": diff,
        "tolerance": tol,
        "same_next_token": same_argmax,
        "passed": diff <= tol and same_argmax,
    }


def _rows(instructions: list[str], texts: list[str]) -> list[dict[str, Any]]:
    return [
        {"instruction": i, "completion": t, "refused": is_refusal(t)}
        for i, t in zip(instructions, texts, strict=True)
    ]


def generate_settings(
    lm: LoadedModel, settings: list[EvalSetting], direction: Direction, splits: Any, s: Settings,
    first_logits: dict[EvalSetting, torch.Tensor] | None = None,
) -> dict[EvalSetting, list[dict[str, Any]]]:  # fmt: skip
    """Completions of every hook setting's test prompts, all settings sharing the generation batches
    (each row steered as its own setting), so each decoding step reads the weights once for all.
    ``first_logits`` receives each setting's next-token logits of its prompts ([n, vocab])."""
    if not settings:
        return {}
    steering = row_steering([(st.name, st.coeff) for st in settings], direction)
    texts_in: list[str] = []
    kinds: list[int] = []
    for k, st in enumerate(settings):
        ps = prompts(lm, splits[f"{st.prompt_set}_test"], s)
        texts_in += ps
        kinds += [k] * len(ps)
    first: dict[int, torch.Tensor] = {}
    with steering.active(lm.arch):
        texts = generate(
            lm, texts_in, max_new_tokens=s.max_new_tokens, batch_size=s.gen_batch_size,
            desc="completions", steering=steering, kinds=kinds, first_logits=first,
        )  # fmt: skip
    out, start = {}, 0
    for st in settings:
        instructions = splits[f"{st.prompt_set}_test"]
        out[st] = _rows(instructions, texts[start : start + len(instructions)])
        if first_logits is not None and first:
            first_logits[st] = torch.stack([first[i] for i in range(start, start + len(instructions))])
        start += len(instructions)
    return out


def _rate(rows: list[dict[str, Any]], coeff: float) -> dict[str, Any]:
    k, n = sum(r["refused"] for r in rows), len(rows)
    lo, hi = wilson_interval(k, n)
    return {"refusal_rate": k / n, "refused": k, "n": n, "ci95": [lo, hi], "coeff": coeff}


def evaluate(
    lm: LoadedModel, direction: Direction, splits: Any, s: Settings, layout: RunLayout, fingerprint: str
) -> dict[str, Any]:
    """Completions and refusal rates under every setting; writes the stage's artifacts.

    A setting whose completions file holds this fingerprint is read back (an interrupted stage
    resumes); the hook settings still missing are generated together; orthogonalized weights last
    (reusing the ablation's completions when the logit check passes)."""
    rates: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "judge": "substring (paper's list)"}
    settings = eval_settings(lm.arch.spec.weights_orthogonalizable)
    found: dict[EvalSetting, tuple[list[dict[str, Any]], dict[str, Any] | None]] = {}
    for setting in settings:
        path = layout.completions(setting.prompt_set, setting.name)
        saved = read_json(path) if path.is_file() else {}
        if saved.get("fingerprint") == fingerprint:
            found[setting] = (saved["rows"], saved.get("reused"))

    def save(setting: EvalSetting, rows: list[dict[str, Any]], reuse: dict[str, Any] | None) -> None:
        write_json(
            layout.completions(setting.prompt_set, setting.name),
            {"fingerprint": fingerprint, "setting": asdict(setting), "rows": rows, "reused": reuse},
        )
        found[setting] = (rows, reuse)

    todo = [st for st in settings if st not in found and st.name in HOOK_SETTINGS]
    first: dict[EvalSetting, torch.Tensor] = {}
    for setting, rows in generate_settings(lm, todo, direction, splits, s, first).items():
        save(setting, rows, None)
    for setting in [st for st in settings if st not in found]:  # orthogonalized
        key = EvalSetting(setting.prompt_set, "ablation")
        ablation = found.get(key)
        save(
            setting,
            *_orthogonalized(
                lm, setting, direction, splits, s, ablation[0] if ablation else None, first.get(key)
            ),
        )
    for setting in settings:
        rows, reuse = found[setting]
        rates.setdefault(setting.prompt_set, {})[setting.name] = _rate(rows, setting.coeff)
        if reuse is not None:
            rates["orthogonalized_reuse"] = reuse
    write_json(layout.refusal_rates, rates)
    return rates


def _orthogonalized(
    lm: LoadedModel,
    setting: EvalSetting,
    direction: Direction,
    splits: Any,
    s: Settings,
    ablation: list[dict[str, Any]] | None,
    ablation_logits: torch.Tensor | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The orthogonalized weights' rows (the ablation's, when the logit check passes), and the check
    (against ``ablation_logits``, the ablation generation's first logits, when it kept them)."""
    instructions = splits[f"{setting.prompt_set}_test"]
    check = None
    if ablation is not None:
        check = reuse_check(lm, direction, prompts(lm, instructions, s), s.batch_size, ablation_logits)
        if check["passed"]:
            return [dict(r) for r in ablation], {"from": "ablation", **check}
    with intervention(lm, setting.name, direction):
        texts = generate(
            lm, prompts(lm, instructions, s), max_new_tokens=s.max_new_tokens,
            batch_size=s.gen_batch_size, desc=f"{setting.prompt_set}__{setting.name}",
        )  # fmt: skip
    return _rows(instructions, texts), None if check is None else {"from": None, **check}


def load(layout: RunLayout) -> dict[str, Any]:
    return dict(read_json(layout.refusal_rates))

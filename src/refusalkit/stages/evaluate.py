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
from refusalkit.evaluation.coherence import intervention
from refusalkit.evaluation.refusal import is_refusal, wilson_interval
from refusalkit.generation import generate
from refusalkit.layout import RunLayout
from refusalkit.models.loading import LoadedModel
from refusalkit.settings import Settings
from refusalkit.stages.common import prompts
from refusalkit.utils import read_json, write_json

# Reuse the ablation completions for the orthogonalized weights when the next-token logits of the two
# differ by at most this fraction of the largest logit (float32 rounding is ~1e-5 of it) and every
# prompt's greedy next token agrees.
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
    lm: LoadedModel, direction: Direction, test_prompts: list[str], batch_size: int
) -> dict[str, Any]:
    """Whether orthogonalized weights give the ablation's next-token logits on ``test_prompts``."""
    with intervention(lm, "ablation", direction):
        hooked = logits_for_prompts(lm, test_prompts, batch_size).float()
    with intervention(lm, "orthogonalized", direction):
        weights = logits_for_prompts(lm, test_prompts, batch_size).float()
    diff = float((hooked - weights).abs().max())
    tol = REUSE_RTOL * float(hooked.abs().max())
    same_argmax = bool(torch.equal(hooked.argmax(-1), weights.argmax(-1)))
    return {
        "max_logit_diff": diff,
        "tolerance": tol,
        "same_next_token": same_argmax,
        "passed": diff <= tol and same_argmax,
    }


def _rows(
    lm: LoadedModel, setting: EvalSetting, direction: Direction, instructions: list[str], s: Settings
) -> list[dict[str, Any]]:
    with intervention(lm, setting.name, direction, setting.coeff):
        texts = generate(
            lm,
            prompts(lm, instructions, s),
            max_new_tokens=s.max_new_tokens,
            batch_size=s.gen_batch_size,
            desc=f"{setting.prompt_set}__{setting.name}",
        )
    return [
        {"instruction": i, "completion": t, "refused": is_refusal(t)}
        for i, t in zip(instructions, texts, strict=True)
    ]


def _rate(rows: list[dict[str, Any]], coeff: float) -> dict[str, Any]:
    k, n = sum(r["refused"] for r in rows), len(rows)
    lo, hi = wilson_interval(k, n)
    return {"refusal_rate": k / n, "refused": k, "n": n, "ci95": [lo, hi], "coeff": coeff}


def evaluate(
    lm: LoadedModel, direction: Direction, splits: Any, s: Settings, layout: RunLayout, fingerprint: str
) -> dict[str, Any]:
    """Completions and refusal rates under every setting; writes the stage's artifacts."""
    rates: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "judge": "substring (paper's list)"}
    done: dict[str, list[dict[str, Any]]] = {}
    for setting in eval_settings(lm.arch.spec.weights_orthogonalizable):
        path = layout.completions(setting.prompt_set, setting.name)
        saved = read_json(path) if path.is_file() else {}
        if saved.get("fingerprint") == fingerprint:
            rows, reuse = saved["rows"], saved.get("reused")
        else:
            rows, reuse = _generate_or_reuse(lm, setting, direction, splits, s, done)
            write_json(
                path, {"fingerprint": fingerprint, "setting": asdict(setting), "rows": rows, "reused": reuse}
            )
        done[f"{setting.prompt_set}__{setting.name}"] = rows
        rates.setdefault(setting.prompt_set, {})[setting.name] = _rate(rows, setting.coeff)
        if reuse is not None:
            rates["orthogonalized_reuse"] = reuse
    write_json(layout.refusal_rates, rates)
    return rates


def _generate_or_reuse(
    lm: LoadedModel,
    setting: EvalSetting,
    direction: Direction,
    splits: Any,
    s: Settings,
    done: dict[str, list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The setting's rows, and for orthogonalized weights the record of the reuse check."""
    instructions = splits[f"{setting.prompt_set}_test"]
    ablation = done.get(f"{setting.prompt_set}__ablation")
    if setting.name != "orthogonalized" or ablation is None:
        return _rows(lm, setting, direction, instructions, s), None
    check = reuse_check(lm, direction, prompts(lm, instructions, s), s.batch_size)
    if check["passed"]:
        return [dict(r) for r in ablation], {"from": "ablation", **check}
    return _rows(lm, setting, direction, instructions, s), {"from": None, **check}


def load(layout: RunLayout) -> dict[str, Any]:
    return dict(read_json(layout.refusal_rates))

"""The model card (README.md) of an exported model, built from the run's artifacts alone.

A card describes one edit (``run.ActiveEdit``: the paper's direction or a searched edit) and shows that
edit's own numbers only (``report.active_edit``: evaluate/ and measure/ for the direction, the search's
verification in search/front.json for a searched edit), so it never states another model's refusal
rates or KL. What the run did not measure is written as "not measured", never left out silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.report import RunData, collect, headline, refusal_rate
from refusalkit.report.active_edit import NOT_MEASURED, EditNumbers, edit_numbers, rate_text
from refusalkit.run import ActiveEdit, RunFolder
from refusalkit.settings import MEASUREMENTS
from refusalkit.utils import atomic_path

SETTINGS_SHOWN = (
    "model",
    "dtype",
    "system_prompt",
    "harmful_train",
    "harmless_train",
    "harmful_test",
    "harmless_test",
    "n_train",
    "n_val",
    "n_test",
    "seed",
    "filter_train",
    "filter_val",
    "max_layer_frac",
    "kl_threshold",
    "max_new_tokens",
)
PAPER = (
    "Arditi et al., 2024, *Refusal in Language Models Is Mediated by a Single Direction* "
    "(https://arxiv.org/abs/2406.11717)"
)


@dataclass(frozen=True)
class CardFile:
    name: str
    description: str


def _front_matter(model: str, fmt: str) -> list[str]:
    tags = ["refusalkit", "refusal-direction", "abliterated", fmt]
    lines = ["---", "tags:", *[f"- {t}" for t in tags]]
    if "/" in model and not Path(model).exists():
        lines.append(f"base_model: {model}")  # a hub id; local paths and built-in names are not hub ids
    return [*lines, "---", ""]


def _method(data: RunData, h: dict[str, Any], active: ActiveEdit) -> list[str]:
    if active.kind == "calibrate":
        d = active.direction
        assert d is not None
        how = "every residual write (W <- W - u u^T W)."
        if d.meta.get("weights") is not None:  # the calibration search's choice
            how = (
                "the residual writes at per-layer weights w (W <- W - w u u^T W), chosen by `refusalkit "
                f"optimize --goal calibrate` (trial {d.meta.get('trial')}; the weights are in the run's "
                "calibrate/search/chosen.json)."
            )
        return [
            "## Method",
            "",
            'A calibration (`refusalkit calibrate`, after Wang et al., ICLR 2025, "Surgical, Cheap, and '
            'Flexible: Mitigating False Refusal in Language Models via Single Vector Ablation"): the '
            "difference in means between prompts that look harmful but are not and that the original "
            "model refuses, and harmless prompts, at layer {}, position {}, with lambda {} of its "
            "component along the refusal direction removed, is projected off {} The model should "
            "refuse fewer harmless requests that look dangerous and keep refusing harmful ones; the "
            "numbers above say how far that held.".format(d.layer, d.position, d.meta.get("lam"), how),
            "",
        ]
    if active.kind == "search":
        from refusalkit.search.front import describe

        assert active.params is not None
        return [
            "## Method",
            "",
            f"An edit search (`refusalkit optimize`) over refusal-direction edits, after {PAPER}, chose this "
            f"edit: trial {active.trial}.",
            "",
            "- Each residual write it edits (attention and MLP output projections, and the token embedding "
            "when its weight is not zero) is projected off a unit direction u with a per-layer weight w: "
            "W <- W - w u u^T W. The directions, weights and layers are the search's parameters:",
            f"  `{describe(active.params)}`.",
            "- The full parameters are in the run's search/chosen.json (and refusalkit_edit.json beside a "
            "transformers export).",
            "",
        ]
    layer, pos, n_layers = h.get("layer"), h.get("position"), h.get("n_layers")
    where = f"layer {layer} of {n_layers}, token position {pos} (counted from the end of the prompt)"
    lines = [
        "## Method",
        "",
        f"Directional ablation of the refusal direction, after {PAPER}.",
        "",
        "- The refusal direction r is the difference between the mean residual-stream activations on harmful "
        "and on harmless instructions, read at the input of one decoder block (resid_pre); this run selected "
        f"{where}.",
    ]
    scores = (data.direction or {}).get("scores") or {}
    if scores:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, int | float))
        lines.append(f"- Its selection scores on the validation prompts: {shown}.")
    lines.append(
        "- Every matrix that writes into the residual stream (token embedding, each attention output "
        "projection, each MLP output projection) is projected off the unit direction: W <- W - r r^T W. "
        "The output head keeps the original weights (a tied head is untied)."
    )
    return [*lines, ""]


def _results(data: RunData, h: dict[str, Any], numbers: EditNumbers) -> list[str]:
    out = [
        "## Measured results",
        "",
        f"The numbers of this edit ({numbers.label}) and of the original model on the same prompts; "
        f"from {numbers.source}.",
        "",
        "| measurement | original model | this edit |",
        "| --- | --- | --- |",
        *[f"| {r.label} | {r.original} | {r.edited} |" for r in numbers.rows],
        "",
    ]
    if numbers.numbers.get("setting") is not None:  # the paper's direction: its run-time settings too
        out += [
            "The same direction applied at run time instead of in the weights (not this checkpoint):",
            "",
            "| prompts, setting | refusal rate |",
            "| --- | --- |",
            f"| harmful, ablation hooks | {rate_text(refusal_rate(data, 'harmful', 'ablation'))} |",
            f"| harmless, original model | {rate_text(refusal_rate(data, 'harmless', 'baseline'))} |",
            f"| harmless, direction added (actadd) | {rate_text(refusal_rate(data, 'harmless', 'actadd'))} |",
            "",
        ]
        sizes = {k: v for k, v in (h.get("sizes") or {}).items() if v is not None}
        if sizes:
            out += ["Prompt counts: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ".", ""]
        gaps = {k: v for k, v in data.gaps.items() if k in MEASUREMENTS or k == "refusal rates"}
        if gaps:
            listed = "; ".join(f"{k} ({v})" for k, v in sorted(gaps.items()))
            out += [f"Not measured in this run: {listed}.", ""]
    return out


def _settings(data: RunData) -> list[str]:
    s = data.manifest.get("settings", {})
    model = data.manifest.get("model", {})
    out = ["## Run settings", "", "| setting | value |", "| --- | --- |"]
    for key in SETTINGS_SHOWN:
        if key in s:
            out.append(f"| {key} | `{s[key]}` |")
    if model.get("fingerprint"):
        out.append(f"| source weights | `{model['fingerprint']}` |")
    versions = data.manifest.get("versions", {})
    if versions.get("refusalkit"):
        out.append(f"| refusalkit | {versions['refusalkit']} |")
    return [*out, ""]


def _intended_use() -> list[str]:
    return [
        "## Intended use",
        "",
        "Research on how refusal is represented in language models, and safety evaluation: measuring how "
        "easily a model's refusals can be removed. The edit removes the model's tendency to refuse, so it "
        "will answer harmful requests that the original model declined; it adds no knowledge and no safety "
        "layer. Do not deploy it where its answers could cause harm, and keep the base model's license and "
        "terms of use, which apply to this derivative.",
        "",
    ]


def model_card(run: RunFolder, active: ActiveEdit, files: list[CardFile], *, fmt: str) -> str:
    """The README.md text for an export of ``active`` (an edit of ``run``) holding ``files``; fmt:
    safetensors or gguf. Only that edit's numbers are shown (``report.active_edit``)."""
    data = collect(run.root)
    h = headline(data)
    numbers = edit_numbers(run, active, data)
    model = str(h.get("model") or "the model")
    what = {
        "direction": "refusal direction ablated",
        "calibrate": "false refusals calibrated away",
    }.get(active.kind, "refusal edit chosen by a search")
    listing = ["## Files", "", "| file | contents |", "| --- | --- |"]
    listing += [f"| `{f.name}` | {f.description} |" for f in files]
    lines = [
        *_front_matter(model, fmt),
        f"# {model}, {what} (refusalkit)",
        "",
        f"Made with refusalkit from the run folder `{run.root.name}`. The edit: {active.label}; "
        f"`refusalkit export --edit {active.choice}` exports it.",
        "",
        *listing,
        "",
        *_method(data, h, active),
        *_results(data, h, numbers),
        *_settings(data),
        *_intended_use(),
    ]
    return "\n".join(lines)


def write_card(folder: str | Path, text: str) -> Path:
    """Write ``folder/README.md`` atomically."""
    path = Path(folder) / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


__all__ = ["NOT_MEASURED", "CardFile", "model_card", "write_card"]

"""The model card (README.md) of an exported model, built from the run's artifacts alone.

Every number comes from the run folder (evaluate/refusal_rates.json, measure/*.json, select/, the
manifest) through the report's readers, so the card, the report and ``refusalkit compare`` agree. What the
run did not measure is written as "not measured", never left out silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.evaluation.refusal import as_rate
from refusalkit.report import RunData, collect, headline, refusal_rate
from refusalkit.settings import MEASUREMENTS
from refusalkit.utils import atomic_path

NOT_MEASURED = "not measured"
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


def _num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else NOT_MEASURED


def _rate(data: RunData, prompt_set: str, setting: str) -> str:
    # evaluate/refusal_rates.json read directly too: it has held more than one record layout (as_rate
    # reads them all), and the card must show the rates whichever one the run wrote.
    r = refusal_rate(data, prompt_set, setting) or as_rate(
        (data.rates or {}).get(prompt_set, {}).get(setting)
    )
    if not r or r.get("rate") is None:
        return NOT_MEASURED
    lo, hi = r.get("ci95") or [None, None]
    ci = f" (95% CI {lo:.2f}-{hi:.2f})" if isinstance(lo, float) and isinstance(hi, float) else ""
    return f"{r['rate']:.2f} = {r['k']}/{r['n']}{ci}"


def _front_matter(model: str, fmt: str) -> list[str]:
    tags = ["refusalkit", "refusal-direction", "abliterated", fmt]
    lines = ["---", "tags:", *[f"- {t}" for t in tags]]
    if "/" in model and not Path(model).exists():
        lines.append(f"base_model: {model}")  # a hub id; local paths and built-in names are not hub ids
    return [*lines, "---", ""]


def _method(data: RunData, h: dict[str, Any], edit: str) -> list[str]:
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
    if edit == "search":
        lines.append(
            "- The edit is the one an edit search chose from its Pareto front (see the run's search/chosen.json)."
        )
    else:
        lines.append(
            "- Every matrix that writes into the residual stream (token embedding, each attention output "
            "projection, each MLP output projection) is projected off the unit direction: W <- W - r r^T W. "
            "The output head keeps the original weights (a tied head is untied)."
        )
    return [*lines, ""]


def _results(data: RunData, h: dict[str, Any]) -> list[str]:
    rows = [
        ("harmful, original model", _rate(data, "harmful", "baseline")),
        ("harmful, orthogonalized weights", _rate(data, "harmful", "orthogonalized")),
        ("harmful, ablation hooks", _rate(data, "harmful", "ablation")),
        ("harmless, original model", _rate(data, "harmless", "baseline")),
        ("harmless, direction added (actadd)", _rate(data, "harmless", "actadd")),
    ]
    out = [
        "## Measured results",
        "",
        "Refusal rate on the run's held-out test prompts (substring judge, the paper's refusal phrases):",
        "",
        "| prompts, setting | refusal rate |",
        "| --- | --- |",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        "Coherence and capability (original model vs. edited weights):",
        "",
        "| measurement | original | edited |",
        "| --- | --- | --- |",
        f"| first-token KL on harmless prompts (vs. original) | 0 | {_num(h['kl'].get('orthogonalized'))} |",
        f"| corpus cross-entropy (nats/token) | {_num(h['corpus_ce'].get('baseline'))} | "
        f"{_num(h['corpus_ce'].get('orthogonalized'))} |",
        f"| CE of the original model's own completions | {_num(h['completion_ce'].get('baseline'))} | "
        f"{_num(h['completion_ce'].get('orthogonalized'))} |",
    ]
    for label, key in (
        ("GSM8K accuracy", "gsm8k"),
        ("TruthfulQA MC1", "truthfulqa_mc1"),
        ("TruthfulQA MC2", "truthfulqa_mc2"),
    ):
        cap = h.get(key) or {}
        out.append(f"| {label} | {_num(cap.get('original'))} | {_num(cap.get('edited'))} |")
    sizes = {k: v for k, v in (h.get("sizes") or {}).items() if v is not None}
    if sizes:
        out += ["", "Prompt counts: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "."]
    gaps = {k: v for k, v in data.gaps.items() if k in MEASUREMENTS or k == "refusal rates"}
    if gaps:
        listed = "; ".join(f"{k} ({v})" for k, v in sorted(gaps.items()))
        out += ["", f"Not measured in this run: {listed}."]
    return [*out, ""]


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


def model_card(run_dir: str | Path, files: list[CardFile], *, fmt: str, edit: str = "direction") -> str:
    """The README.md text for an export of ``run_dir`` holding ``files``; fmt: safetensors or gguf."""
    data = collect(run_dir)
    h = headline(data)
    model = str(h.get("model") or "the model")
    title = f"# {model}, refusal direction ablated (refusalkit)"
    listing = ["## Files", "", "| file | contents |", "| --- | --- |"]
    listing += [f"| `{f.name}` | {f.description} |" for f in files]
    lines = [
        *_front_matter(model, fmt),
        title,
        "",
        f"Made with refusalkit from the run folder `{Path(run_dir).name}`.",
        "",
        *listing,
        "",
        *_method(data, h, edit),
        *_results(data, h),
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

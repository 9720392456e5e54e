"""`refusalkit judges`: every judge scored on a labelled set, or compared on a run's completions.

  refusalkit judges --labels labels.jsonl [--fit] [--judges paper,heretic,broad,llm]
  refusalkit judges RUN_DIR                       where the judges disagree (counts only, no text)

On a run folder, the evaluate stage's completions are judged by every judge named; the search's verified
points (search/completions/*.json) hold verdicts and hashes only, and are compared on the judges that
verified them.

With ``--labels``, hash-only rows are regenerated with the model and edit they record (STALE rows are
reported by id and left out); the model judges' biases are fitted on the ``tune`` split with ``--fit``
(or read from ``--calibration``) and every judge is scored on each split apart, so the held-out
numbers come from rows no judge was tuned on. Heavy modules are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError

KEYWORDS = ("paper", "heretic", "broad")
DEFAULT_JUDGES = "paper,heretic,broad,llm"


def judges_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folder",
        nargs="?",
        type=Path,
        help="Run folder (or a folder of completion files) to compare the judges on.",
    )
    p.add_argument(
        "--labels",
        type=labels_path,
        help="Labelled set (JSONL, docs/judging.md) to score the judges on; `builtin`: the project's own "
        "hand labels, shipped with the package (their prompts are read from the data folder).",
    )
    p.add_argument(
        "--judges",
        default=DEFAULT_JUDGES,
        help=f"Judges, comma-separated: {', '.join(KEYWORDS)}, llm, endpoint [default: {DEFAULT_JUDGES}].",
    )
    p.add_argument(
        "--judge-model",
        help="The LLM judge's model [default: the run's own model; for labels, the built-in default].",
    )
    p.add_argument(
        "--endpoint",
        help="The endpoint judge's server, e.g. http://127.0.0.1:8080 (adds the endpoint judge).",
    )
    p.add_argument(
        "--endpoint-model", default="judge", help="Model name sent to the server [default: judge]."
    )
    p.add_argument(
        "--endpoint-mode", default="chat", choices=("chat", "completions"), help="Server API [default: chat]."
    )
    p.add_argument(
        "--fit",
        action="store_true",
        help="Choose the model judges' prompt and fit their class biases on the labels' tune split.",
    )
    p.add_argument(
        "--fit-prompts",
        default="all",
        help="Judge prompt versions --fit chooses from on the tune split, comma-separated, or all [default: all].",
    )
    p.add_argument(
        "--calibration", type=Path, help="Read the model judges' fitted biases from this JSON file."
    )
    p.add_argument("--save-calibration", type=Path, help="Write the fitted biases to this JSON file.")
    p.add_argument(
        "--data-dir", help="Folder of the data files the labels' prompt ids name [default: the shared data]."
    )
    p.add_argument(
        "--no-regenerate",
        action="store_true",
        help="Score the rows stored as text only; list the hash-only rows as skipped.",
    )
    p.add_argument(
        "--splits",
        default="tune,heldout",
        help="Splits of the labels to score, comma-separated [default: tune,heldout]; heldout alone saves a "
        "model judge's pass over the tune half it was just fitted on.",
    )
    p.add_argument("--dtype", default="float32", help="The judge model's dtype [default: float32].")
    p.add_argument("--device", default="auto", help="Device for the judge and regeneration [default: auto].")
    p.add_argument(
        "--batch-size", type=int, default=16, help="Pairs per forward pass of the LLM judge [default: 16]."
    )
    p.add_argument("--out", type=Path, help="Write the numbers to this JSON file.")  # fmt: skip


# ---- building judges --------------------------------------------------------------------------------


def build_judges(
    args: argparse.Namespace,
    default_model: str,
    loaded: dict[tuple[str, str], Any] | None = None,
    load_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The judges ``args`` name; ``loaded``: models already in memory by (spec, dtype), reused;
    ``load_kwargs``: how to load ``default_model`` (a run's chat template, remote code, ...)."""
    from refusalkit.evaluation.judge_prompt import Calibration
    from refusalkit.evaluation.verdicts import KeywordJudge
    from refusalkit.utils import read_json

    names = [n.strip() for n in args.judges.split(",") if n.strip()]
    if args.endpoint and "endpoint" not in names:
        names.append("endpoint")
    unknown = [n for n in names if n not in (*KEYWORDS, "llm", "endpoint")]
    if unknown:
        raise RefusalkitError(f"unknown judges {unknown}; known: {', '.join(KEYWORDS)}, llm, endpoint")
    saved = read_json(args.calibration) if args.calibration else {}
    cal = {k: Calibration.from_dict(v) for k, v in saved.items()} if isinstance(saved, dict) else {}
    out: dict[str, Any] = {}
    for name in names:
        if name in KEYWORDS:
            out[name] = KeywordJudge(name)
        elif name == "llm":
            from refusalkit.evaluation.llm_judge import LLMJudge

            spec = args.judge_model or default_model
            kw: dict[str, Any] = {"calibration": cal.get("llm"), "batch_size": args.batch_size}
            lm = (loaded or {}).get((spec, args.dtype))
            out[name] = (
                LLMJudge(lm, **kw)
                if lm
                else LLMJudge.load(
                    spec,
                    dtype=args.dtype,
                    device=args.device,
                    load_kwargs=load_kwargs if spec == default_model else None,
                    **kw,
                )
            )
        else:
            from refusalkit.evaluation.endpoint_judge import EndpointJudge

            if not args.endpoint:
                raise RefusalkitError("the endpoint judge needs --endpoint URL (an OpenAI-compatible server)")
            out[name] = EndpointJudge(
                args.endpoint,
                model=args.endpoint_model,
                mode=args.endpoint_mode,
                calibration=cal.get("endpoint"),
            )
    return out


# ---- regenerating hash-only labels --------------------------------------------------------------------


HOOK_EDITS = {"ablation": ("ablation", 0.0), "actadd": ("actadd", -1.0), "actadd+1": ("actadd", 1.0)}
RUN_EDITS = ("direction", "orthogonalized", "search")  # and trial:N: the run's weight edits (run.ActiveEdit)


class ModelRegenerator:
    """Regenerates labelled completions with the model and edit each row records (greedy, its dtype).

    Edits: "none"; "SETTING@RUN_DIR" with SETTING ablation, actadd (c = -1) or actadd+1 (c = +1,
    induced refusal), hooks with that run's direction; or a weight edit of the run as ``--edit`` names
    it: direction (alias orthogonalized), search (the search's choice) or trial:N."""

    def __init__(self, device: str = "auto", batch_size: int = 16) -> None:
        self.device, self.batch_size = device, batch_size
        self.models: dict[tuple[str, str], Any] = {}

    def model(self, spec: str, dtype: str) -> Any:
        from refusalkit.models.loading import load_model

        if (spec, dtype) not in self.models:
            try:
                self.models[spec, dtype] = load_model(spec, dtype=dtype, device=self.device)
            except RefusalkitError as exc:
                raise RefusalkitError(f"the labels' model could not load to regenerate them: {exc}") from None
        return self.models[spec, dtype]

    def edit(self, lm: Any, edit: str) -> AbstractContextManager[Any]:
        if edit == "none":
            return nullcontext()
        from refusalkit.evaluation.coherence import intervention
        from refusalkit.run import RunFolder

        setting, _, run = edit.partition("@")
        known = setting in HOOK_EDITS or setting in RUN_EDITS or setting.startswith("trial:")
        if not run or not known:
            raise RefusalkitError(
                f"cannot reproduce edit {edit!r}: use none or SETTING@RUN_DIR, SETTING one of "
                f"{', '.join([*HOOK_EDITS, *RUN_EDITS])} or trial:N"
            )
        folder = RunFolder(run)
        if setting in HOOK_EDITS:
            name, coeff = HOOK_EDITS[setting]
            return intervention(lm, name, folder.direction(), coeff)
        return folder.active_edit("direction" if setting == "orthogonalized" else setting).apply(lm)

    def __call__(self, rows: Sequence[Any], requests: Sequence[str]) -> list[str]:
        from refusalkit.generation import generate
        from refusalkit.prompts import format_prompts

        first = rows[0]
        if not first.greedy:
            raise RefusalkitError(f"label {first.id} was sampled, not greedy; it cannot be regenerated")
        lm = self.model(first.model, first.dtype)
        prompts = format_prompts(lm.tokenizer, list(requests), first.system_prompt)
        with self.edit(lm, first.edit):
            return generate(
                lm,
                prompts,
                max_new_tokens=first.max_new_tokens,
                batch_size=self.batch_size,
                desc="regenerating labels",
            )


# ---- the two uses --------------------------------------------------------------------------------------


def labels_path(value: str) -> Path:
    """``--labels``: a path, or ``builtin`` for the hand-labelled set in the package."""
    if value == "builtin":
        return Path(__file__).resolve().parent.parent / "data" / "labels" / "judging.jsonl"
    return Path(value)


def score_labels(args: argparse.Namespace) -> dict[str, Any]:
    from refusalkit.evaluation.agreement import score
    from refusalkit.evaluation.labels import SPLITS, load_labels, materialize, requests_of
    from refusalkit.models.registry import DEFAULT_MODEL
    from refusalkit.settings import default_data_dir
    from refusalkit.utils import write_json

    wanted = [x.strip() for x in getattr(args, "splits", "tune,heldout").split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SPLITS))
    if unknown or not wanted:  # before any model loads
        raise RefusalkitError(f"--splits {args.splits!r}: name one or both of {', '.join(SPLITS)}")
    rows = load_labels(args.labels)
    requests = requests_of(rows, args.data_dir or default_data_dir())
    regen = None if args.no_regenerate else ModelRegenerator(args.device)
    mat = materialize(rows, requests, regen, skip_hashed=args.no_regenerate)
    judges = build_judges(args, DEFAULT_MODEL, regen.models if regen else None)
    kept = mat.rows(rows)
    if not kept:
        raise RefusalkitError(
            f"no label in {args.labels} could be scored ({len(mat.stale)} stale, {len(mat.skipped)} skipped)"
        )
    split_rows = {s: [r for r in kept if r.split == s] for s in SPLITS}
    out: dict[str, Any] = {
        "labels": str(args.labels),
        "n": len(rows),
        "stale": mat.stale,
        "skipped": mat.skipped,
    }
    tune = split_rows["tune"]
    if args.fit:
        from refusalkit.evaluation.judge_prompt import PROMPTS

        prompts = (
            list(PROMPTS) if args.fit_prompts == "all" else [x.strip() for x in args.fit_prompts.split(",")]
        )
        if not tune:
            raise RefusalkitError(
                "--fit needs labels in the tune split; the file has none that can be scored"
            )
        fitted = {}
        for name, judge in judges.items():
            if hasattr(judge, "fit"):
                fitted[name] = judge.fit(
                    [requests[r.id] for r in tune],
                    [mat.texts[r.id] for r in tune],
                    [r.label for r in tune],
                    prompts=prompts,
                ).as_dict()
        if args.save_calibration:
            write_json(args.save_calibration, fitted)
    out["judges"] = {name: j.identity() for name, j in judges.items()}
    out["scores"] = {}
    for split, rs in split_rows.items():
        if not rs or split not in wanted:
            continue
        for name, judge in judges.items():
            verdicts = judge.judge([requests[r.id] for r in rs], [mat.texts[r.id] for r in rs])
            out["scores"].setdefault(split, {})[name] = score([r.label for r in rs], verdicts, judge.classes)
    return out


def completion_files(folder: Path) -> list[Path]:
    """The completion files of a run folder (evaluate/completions/*.json), or of a folder of them; none
    when it has none."""
    for where in (folder / "evaluate" / "completions", folder / "completions", folder):
        files = sorted(where.glob("*.json")) if where.is_dir() else []
        if files:
            return files
    return []


def compare_folder(args: argparse.Namespace) -> dict[str, Any]:
    """Each completion file judged by every judge; each saved-verdicts file (the search's verified
    points, search/completions: hashes and verdicts, no text) compared on the verdicts it holds."""
    from refusalkit.evaluation.agreement import disagreements
    from refusalkit.evaluation.verdict_files import is_verdict_file, read_verdicts, verdict_files
    from refusalkit.run import RunFolder
    from refusalkit.settings import build_settings
    from refusalkit.utils import read_json

    folder = args.folder
    texts: dict[str, list[dict[str, Any]]] = {}
    for path in completion_files(folder):
        data = read_json(path)
        rows = data.get("rows") if isinstance(data, dict) and not is_verdict_file(data) else None
        if rows and all(isinstance(r, dict) and "completion" in r for r in rows):
            texts[path.stem] = rows  # else not a completions file
    saved = verdict_files(folder)
    if not texts and not saved:
        raise RefusalkitError(
            f"{folder} holds no completion files (evaluate/completions/*.json of a run) and no saved "
            "verdicts (search/completions/*.json, written by `refusalkit optimize`)"
        )
    out: dict[str, Any] = {"folder": str(folder), "judges": {}, "files": {}}
    for path in saved:  # the judges that verified the search, as they judged then (no text to re-judge)
        verdicts, classes = read_verdicts(path)
        out["files"][f"search/{path.stem}"] = disagreements(verdicts, classes)
    if texts:  # the run's model loads only for files with text
        # the run's own model (its settings read as every command reads them), loaded as the run loads
        # it (its chat template, remote code, architecture map); a folder of completions alone: the default
        run = RunFolder(folder)
        settings = run.settings() if run.has_settings() else build_settings()
        how = {
            k: v
            for k, v in settings.model_kwargs().items()
            if k in ("trust_remote_code", "chat_template", "arch_override") and v
        }
        judges = build_judges(args, settings.model, load_kwargs=how)
        out["judges"] = {n: j.identity() for n, j in judges.items()}
        for stem, rows in texts.items():
            requests = [str(r.get("instruction", "")) for r in rows]
            outs = [str(r["completion"]) for r in rows]
            found = {n: j.judge(requests, outs) for n, j in judges.items()}
            out["files"][stem] = disagreements(found, {n: j.classes for n, j in judges.items()})
    return out


def format_scores(result: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"{'split':<8}{'judge':<20}{'n':>5}{'bal.acc r/n':>13}{'kappa r/n':>11}{'acc 4':>8}{'kappa 4':>9}{'rec comp':>10}{'rec part':>10}{'echo wrong':>12}"
    ]
    for split, judges in result["scores"].items():
        for name, s in judges.items():
            rn, cl = s["refusal_vs_not"], s.get("classes", {})
            pc = cl.get("per_class", {})
            lines.append(
                f"{split:<8}{name:<20}{s['n']:>5}{f(rn['balanced_accuracy']):>13}{f(rn['kappa']):>11}{f(cl.get('accuracy')):>8}"
                f"{f(cl.get('kappa')):>9}{f(pc.get('compliance', {}).get('recall')):>10}{f(pc.get('partial', {}).get('recall')):>10}"
                f"{s['echo']['wrong']:>7}/{s['echo']['n']:<4}"
            )  # fmt: skip
    if result["stale"]:
        lines.append(
            f"STALE (regenerated text no longer matches its hash; left out): {', '.join(result['stale'])}"
        )
    if result["skipped"]:
        lines.append(f"skipped (hash only, not regenerated): {len(result['skipped'])} rows")
    return "\n".join(lines)


def format_disagreements(result: dict[str, Any]) -> str:
    lines = []
    for name, d in result["files"].items():
        lines.append(f"{name}: " + "; ".join(f"{j} {c}" for j, c in d["counts"].items()))
        for pair, p in d["pairs"].items():
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(p["kinds"].items(), key=lambda kv: -kv[1]))
            lines.append(f"  {pair}: differ on {p['differ']}/{p['n']}" + (f" ({kinds})" if kinds else ""))
    return "\n".join(lines)


def run_judges(args: argparse.Namespace) -> int:
    from refusalkit.utils import write_json

    if (args.labels is None) == (args.folder is None):
        raise RefusalkitError("give either --labels FILE (score the judges) or a run folder (compare them)")
    if args.labels is not None:
        result = score_labels(args)
        print(format_scores(result))
    else:
        result = compare_folder(args)
        print(format_disagreements(result))
    if args.out:
        write_json(args.out, result)
        print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


__all__ = ["ModelRegenerator", "build_judges", "judges_arguments", "run_judges"]

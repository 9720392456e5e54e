"""Build the labelled set (docs/judging.md) in two steps: generate a worksheet to read, then write the
labels file that may be committed.

  generate   greedy completions of data-file prompts by one model and edit, with the same code that
             regenerates hash-only labels when the set is scored (``judges_cmd.ModelRegenerator``), so
             their hashes match. Writes a WORKSHEET (JSONL, every field, the full text, "label": null)
             outside the repository: it holds harmful text and is never committed. Appends, so one
             worksheet collects several models, edits and lengths.
  finalize   reads a worksheet whose every row has a label, and writes the labels file through
             ``labels.label_row``: a compliant reply to a harmful request keeps only its sha256.
  score      scores the judges on a labelled worksheet (its text is all there, so nothing is regenerated;
             `refusalkit judges --labels` gives the same numbers from the committed file, regenerating
             its hash-only rows): the keyword lists, and the LLM judge with each prompt version's letter
             log-probabilities computed once for every row, its biases and prompt fitted on the tune
             half only, scored on the held-out half (and, for reference, with zero biases).

Nothing is printed but counts.

  python bench/label_worksheet.py generate --out ~/labels/work.jsonl --prompt-set harmful \\
      --prompts refusal_direction/processed/jailbreakbench.json --n 50 \\
      [--model NAME] [--edit none|ablation@RUN|actadd@RUN|orthogonalized@RUN] [--max-new-tokens 64]
  python bench/label_worksheet.py finalize ~/labels/work.jsonl src/refusalkit/data/labels/judging.jsonl
  python bench/label_worksheet.py score ~/labels/work.jsonl [--judge-model M] [--dtype bfloat16] [--out scores.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusalkit.evaluation.judges_cmd import ModelRegenerator
from refusalkit.evaluation.labels import FIELDS, PROMPT_SETS, LabelRow, label_row, load_labels, split_for
from refusalkit.models.registry import DEFAULT_MODEL
from refusalkit.settings import default_data_dir
from refusalkit.utils import atomic_path


def generate(args: argparse.Namespace) -> None:
    items = json.loads((Path(args.data) / args.prompts).read_text())
    index = list(range(args.start, min(args.start + args.n, len(items))))
    base = Path(args.prompts).stem
    model = Path(args.model).name
    rows = [
        LabelRow(
            id=f"{base}-{i}-{model}-{args.edit.split('@')[0]}-{args.max_new_tokens}",
            prompt_id=f"{args.prompts}#{i}",
            prompt_set=args.prompt_set,
            model=args.model,
            edit=args.edit,
            max_new_tokens=args.max_new_tokens,
            greedy=True,
            dtype=args.dtype,
            label="refusal",  # a placeholder: the worksheet writes null for the reader to fill in
            split=split_for(f"{args.prompts}#{i}"),
            sha256="",
        )
        for i in index
    ]
    texts = ModelRegenerator(args.device, args.batch_size)(rows, [items[i]["instruction"] for i in index])
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row, text in zip(rows, texts, strict=True):
            fields = {k: getattr(row, k) for k in FIELDS} | {"label": None, "text": text}
            f.write(json.dumps(fields) + "\n")
    print(f"{len(rows)} completions appended to {out}; label each, then run finalize")


def finalize(args: argparse.Namespace) -> None:
    rows = [
        json.loads(line)
        for line in Path(args.worksheet).expanduser().read_text().splitlines()
        if line.strip()
    ]
    missing = [r["id"] for r in rows if r.get("label") is None]
    if missing:
        raise SystemExit(f"{len(missing)} rows have no label yet, e.g. {missing[:3]}")
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(label_row(**r)) + "\n" for r in rows))
    kept = load_labels(out)  # the file must pass the loader's checks
    hashed = sum(r.text is None for r in kept)
    print(f"{len(kept)} labels written to {out} ({hashed} as sha256 only)")


def score_worksheet(args: argparse.Namespace) -> None:
    import time

    from refusalkit.evaluation.agreement import score
    from refusalkit.evaluation.judge_prompt import PROMPTS, Calibration, decide, fit_calibration
    from refusalkit.evaluation.judges_cmd import build_judges, format_scores
    from refusalkit.utils import write_json

    rows = [
        json.loads(line)
        for line in Path(args.worksheet).expanduser().read_text().splitlines()
        if line.strip()
    ]
    rows = [r for r in rows if r.get("label")]
    data, files = Path(args.data), {}
    for r in rows:
        file, _, idx = r["prompt_id"].rpartition("#")
        files.setdefault(file, json.loads((data / file).read_text()))
        r["request"] = files[file][int(idx)]["instruction"]
    ns = argparse.Namespace(
        judges="paper,heretic,broad,llm", judge_model=args.judge_model, dtype=args.dtype, device=args.device,
        batch_size=args.batch_size, calibration=None, endpoint=None, endpoint_model=None, endpoint_mode="chat",
    )  # fmt: skip
    judges = build_judges(ns, DEFAULT_MODEL)
    llm = judges.pop("llm")
    split = {s: [i for i, r in enumerate(rows) if r["split"] == s] for s in ("tune", "heldout")}
    req, txt, gold = [r["request"] for r in rows], [r["text"] for r in rows], [r["label"] for r in rows]
    logprobs, seconds = {}, {}
    # letter log-probabilities by prompt version and row id, kept across calls (--cache): a worksheet
    # that grows is judged only on its new rows
    cache_path = Path(args.cache).expanduser() if args.cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    for version in PROMPTS if args.prompts == "all" else args.prompts.split(","):
        known = cache.setdefault(version, {})
        todo = [i for i, r in enumerate(rows) if r["id"] not in known]
        llm.calibration = Calibration(version)
        t0 = time.perf_counter()
        judged = llm.label_rows([req[i] for i in todo], [txt[i] for i in todo]) if todo else []
        for i, lp in zip(todo, judged, strict=True):
            known[rows[i]["id"]] = lp
        seconds[version] = time.perf_counter() - t0
        logprobs[version] = [known[r["id"]] for r in rows]
        print(f"{version}: {len(todo)} of {len(rows)} pairs judged in {seconds[version]:.0f} s", flush=True)
        if cache_path:
            cache_path.write_text(json.dumps(cache))
    tune = split["tune"]
    cal = fit_calibration(lambda v: [logprobs[v][i] for i in tune], [gold[i] for i in tune], list(logprobs))
    print(f"fitted on {len(tune)} tune pairs: prompt {cal.prompt}, biases {cal.biases}")
    out = {"n": len(rows), "split_sizes": {s: len(v) for s, v in split.items()}, "calibration": cal.as_dict(),
           "judge_seconds": seconds, "scores": {}, "stale": [], "skipped": []}  # fmt: skip
    for s, idx in split.items():
        for name, judge in judges.items():
            verdicts = judge.judge([req[i] for i in idx], [txt[i] for i in idx])
            out["scores"].setdefault(s, {})[name] = score([gold[i] for i in idx], verdicts, judge.classes)
        for version in logprobs:
            for tag, biases in (("fitted", cal.biases if version == cal.prompt else None), ("zero-bias", {})):
                if biases is None:
                    continue
                verdicts = [decide(logprobs[version][i], biases) for i in idx]
                name = f"llm {version.split('/')[-1]} {tag}"
                out["scores"][s][name] = score([gold[i] for i in idx], verdicts, llm.classes)
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        key = f"{r['prompt_set']}/{r['edit'].split('@')[0]}/{r['max_new_tokens']}"
        counts.setdefault(key, {}).setdefault(r["label"], 0)
        counts[key][r["label"]] += 1
    out["label_counts"] = counts
    print(format_scores(out))
    if args.out:
        write_json(args.out, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", required=True, help="The worksheet (outside the repository).")
    g.add_argument("--prompts", required=True, help="A JSON list of prompts under the data folder.")
    g.add_argument("--prompt-set", required=True, choices=PROMPT_SETS)
    g.add_argument("--n", type=int, default=50)
    g.add_argument("--start", type=int, default=0)
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--edit", default="none")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default="auto")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--data", default=default_data_dir())
    f = sub.add_parser("finalize")
    f.add_argument("worksheet")
    f.add_argument("out")
    s = sub.add_parser("score")
    s.add_argument("worksheet")
    s.add_argument("--judge-model", default=None, help="The LLM judge's model (default: the default model).")
    s.add_argument(
        "--dtype", default="bfloat16", help="The judge's dtype (the judge is not the model under test)."
    )
    s.add_argument("--prompts", default="all", help="Judge prompt versions to fit among, comma-separated.")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--data", default=default_data_dir())
    s.add_argument("--out", default=None)
    s.add_argument("--cache", default=None, help="JSON file keeping each row's letter log-probabilities.")
    args = ap.parse_args()
    {"generate": generate, "finalize": finalize, "score": score_worksheet}[args.step](args)


if __name__ == "__main__":
    main()

"""Build the labelled set (docs/judging.md) in two steps: generate a worksheet to read, then write the
labels file that may be committed.

  generate   greedy completions of data-file prompts by one model and edit, with the same code that
             regenerates hash-only labels when the set is scored (``judges_cmd.ModelRegenerator``), so
             their hashes match. Writes a WORKSHEET (JSONL, every field, the full text, "label": null)
             outside the repository: it holds harmful text and is never committed. Appends, so one
             worksheet collects several models, edits and lengths.
  finalize   reads a worksheet whose every row has a label, and writes the labels file through
             ``labels.label_row``: a compliant reply to a harmful request keeps only its sha256.

Nothing is printed but counts.

  python bench/label_worksheet.py generate --out ~/labels/work.jsonl --prompt-set harmful \\
      --prompts refusal_direction/processed/jailbreakbench.json --n 50 \\
      [--model NAME] [--edit none|ablation@RUN|actadd@RUN|orthogonalized@RUN] [--max-new-tokens 64]
  python bench/label_worksheet.py finalize ~/labels/work.jsonl data/labels/judging.jsonl
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
    args = ap.parse_args()
    (generate if args.step == "generate" else finalize)(args)


if __name__ == "__main__":
    main()

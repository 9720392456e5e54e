"""`refusalkit suffix search|analyze`: GCG suffixes and their analysis, from a run folder or a saved direction.

From a run folder (RUN_DIR): the model settings come from RUN_DIR/manifest.json, the direction from
RUN_DIR/select/direction, the prompts from RUN_DIR/data/splits.json (harmful_test, harmless_test), and
the outputs go to RUN_DIR/suffix/. Without one: --model, --direction and --out, prompts from
--harmful/--harmless data specs. Heavy imports happen inside the commands, so `refusalkit --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", type=Path, help="Run folder with a selected direction.")
    p.add_argument("--model", help="Model to load instead of the run's (name, folder, .gguf or hub id).")
    p.add_argument(
        "--direction", type=Path, help="A saved direction stem (DIR/direction); default: the run's."
    )
    p.add_argument("--out", type=Path, help="Output folder; default RUN_DIR/suffix.")
    p.add_argument("--harmful", default="builtin:harmful", help="Harmful data spec, without a run folder.")
    p.add_argument("--harmless", default="builtin:harmless", help="Harmless data spec, without a run folder.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the search and of the random suffixes.")
    p.add_argument(
        "--no-filter",
        dest="filter",
        action="store_false",
        help="Use harmful prompts in split order, not only those the model refuses at baseline.",
    )


def add_suffix_parser(subparsers: Any) -> None:
    """Register `suffix search` and `suffix analyze` on the top-level subparsers."""
    desc = (
        "Adversarial suffixes (Arditi et al. 2024): GCG search, and analysis against the refusal direction."
    )
    p = subparsers.add_parser("suffix", help=desc, description=desc)
    sub = p.add_subparsers(dest="suffix_command", required=True)
    s = sub.add_parser("search", help="Optimize a GCG suffix; writes OUT/search.json.")
    _common(s)
    s.add_argument(
        "--objective",
        choices=["target", "direction", "both"],
        default="target",
        help="Target completion loss, the direction's projection, or both.",
    )
    s.add_argument("--n-prompts", type=int, default=1, help="Harmful prompts optimized together (mean loss).")
    s.add_argument("--steps", type=int, default=100, help="GCG steps.")
    s.add_argument("--search-width", type=int, default=128, help="Candidates per step.")
    s.add_argument("--topk", type=int, default=64, help="Tokens considered per suffix position.")
    s.add_argument("--batch-size", type=int, default=64, help="Candidate sequences per forward pass.")
    s.add_argument("--n-replace", type=int, default=1, help="Positions swapped per candidate.")
    s.add_argument(
        "--n-tokens", type=int, default=20, help="Suffix length in tokens (with the default init)."
    )
    s.add_argument("--init", help="Initial suffix text (default ' ! ! ... !'); keep its leading space.")
    s.add_argument("--target", default="Sure, here is", help="Target completion.")
    s.add_argument(
        "--direction-weight", type=float, default=1.0, help="Weight of the direction term for 'both'."
    )
    s.add_argument(
        "--direction-layers",
        choices=["at", "from"],
        default="from",
        help="Projection at the direction's layer only, or averaged over it and every later layer.",
    )
    s.add_argument("--loss-threshold", type=float, help="Stop once the best loss is below this.")
    s.add_argument(
        "--no-stop-on-match",
        dest="stop_on_match",
        action="store_false",
        help="Keep going after the target became the greedy continuation on every prompt.",
    )
    s.add_argument("--check-every", type=int, default=1, help="Steps between match checks.")
    s.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="Recompute the fixed prompt part every forward (for models whose cache misbehaves).",
    )
    s.add_argument("--max-minutes", type=float, help="Stop the search after this many minutes (CPU budgets).")
    s.add_argument(
        "--allow-non-ascii", dest="ascii_only", action="store_false", help="Allow non-ASCII tokens."
    )
    a = sub.add_parser("analyze", help="Analyse the found (or given) suffix against random suffixes.")
    _common(a)
    a.add_argument(
        "--suffix-file",
        type=Path,
        help="Suffixes to analyse: a search.json, a JSON list, or text with one suffix per line "
        "(verbatim, leading space kept). Default: OUT/search.json's best suffix.",
    )
    a.add_argument(
        "--n-random", type=int, default=3, help="Random control suffixes of the same token length."
    )
    a.add_argument("--n-prompts", type=int, default=16, help="Harmful prompts (search prompts first).")
    a.add_argument("--n-harmless", type=int, help="Harmless prompts; default --n-prompts.")
    a.add_argument("--top-heads", type=int, default=8, help="Heads kept by harmful attribution.")
    a.add_argument("--batch-size", type=int, default=8, help="Prompts per forward pass / generation batch.")
    a.add_argument(
        "--max-new-tokens", type=int, default=64, help="Tokens per completion for the refusal rate."
    )
    a.add_argument(
        "--no-generate", dest="generate", action="store_false", help="Skip completions (metric only)."
    )
    a.add_argument("--no-plots", dest="plots", action="store_false", help="Write no PNGs.")
    a.add_argument("--save-completions", action="store_true", help="Also write OUT/completions.json.")


@dataclass
class _Context:
    lm: Any
    direction: Any
    harmful: list[str]
    harmless: list[str]
    out: Path
    system: str | None
    refusal_ids: list[int]
    run_dir: Path | None
    baseline_refused: list[bool] | None  # from the run's evaluation, per harmful prompt


def _check_inputs(args: argparse.Namespace) -> None:
    """Fail on a missing run folder or direction before any model loads."""
    run_dir: Path | None = args.run_dir
    if run_dir is None:
        if not (args.model and args.direction and args.out):
            raise RefusalkitError("pass a run folder, or --model, --direction and --out")
        return
    if not (run_dir / "manifest.json").is_file():
        raise RefusalkitError(
            f"{run_dir} is not a run folder (no manifest.json); run `refusalkit run --out DIR` first"
        )
    if args.direction is None and not (run_dir / "select" / "direction.json").is_file():
        raise RefusalkitError(
            f"no direction in {run_dir}/select; run `refusalkit select {run_dir}` or pass --direction"
        )


def _context(args: argparse.Namespace) -> _Context:
    from refusalkit.directions import Direction
    from refusalkit.metric import refusal_token_ids
    from refusalkit.models.loading import load_model
    from refusalkit.settings import build_settings
    from refusalkit.utils import read_json

    run_dir: Path | None = args.run_dir
    refused: list[bool] | None = None
    _check_inputs(args)
    if run_dir is not None:
        saved = {
            k: v for k, v in read_json(run_dir / "manifest.json").get("settings", {}).items() if v is not None
        }
        settings = build_settings(saved | ({"model": args.model} if args.model else {}))
        stem = args.direction or run_dir / "select" / "direction"
        splits_path = run_dir / "data" / "splits.json"
        if not splits_path.is_file():
            raise RefusalkitError(
                f"{splits_path} is missing; run `refusalkit extract {run_dir}` to write the splits"
            )
        splits = read_json(splits_path)["splits"]
        harmful, harmless = splits["harmful_test"], splits["harmless_test"]
        baseline = run_dir / "evaluate" / "completions" / "harmful__baseline.json"
        if baseline.is_file():
            by_text = {r["instruction"]: bool(r["refused"]) for r in read_json(baseline)["rows"]}
            if all(x in by_text for x in harmful):
                refused = [by_text[x] for x in harmful]
        out = args.out or run_dir / "suffix"
    else:
        from refusalkit.data import load_instructions, sample

        settings = build_settings({"model": args.model})
        stem = args.direction
        harmful = sample(load_instructions(args.harmful).instructions, None, args.seed)
        harmless = sample(load_instructions(args.harmless).instructions, None, args.seed)
        out = args.out
    direction = Direction.load(stem)
    s = settings
    lm = load_model(s.model, **s.model_kwargs())
    d_model = lm.model.get_input_embeddings().weight.shape[1]
    if direction.vector.shape[0] != d_model:
        raise RefusalkitError(
            f"the direction has d_model {direction.vector.shape[0]} but {lm.name} has "
            f"{d_model}; use the direction selected for this model"
        )
    return _Context(
        lm,
        direction,
        harmful,
        harmless,
        Path(out),
        s.system_prompt,
        refusal_token_ids(lm.tokenizer, s.refusal_tokens),
        run_dir,
        refused,
    )


def _refused_first(ctx: _Context, use_filter: bool) -> tuple[list[int], str]:
    """Indices of harmful prompts the model refuses at baseline (the run's completions if it has them,
    else refusal metric > 0), in split order; all indices if filtering is off or nothing passes."""
    everything = list(range(len(ctx.harmful)))
    if not use_filter:
        return everything, "none"
    if ctx.baseline_refused is not None:
        keep, how = [i for i in everything if ctx.baseline_refused[i]], "run completions (substring judge)"
    else:
        from refusalkit.activations import logits_for_prompts
        from refusalkit.analysis.tokens import PromptTemplate
        from refusalkit.metric import refusal_metric

        template = PromptTemplate.from_tokenizer(ctx.lm.tokenizer, ctx.system)
        logits = logits_for_prompts(ctx.lm, [template.render(x).text for x in ctx.harmful], 8)
        metric = refusal_metric(logits, ctx.refusal_ids)
        keep, how = [i for i in everything if float(metric[i]) > 0], "refusal metric > 0"
    if not keep:
        log.warning("the model refuses none of the harmful prompts at baseline; using them unfiltered")
        return everything, "none (no prompt refused at baseline)"
    return keep, how


def cmd_search(args: argparse.Namespace) -> int:
    from refusalkit.analysis.gcg import GCGConfig, run_gcg

    config = GCGConfig(
        n_steps=args.steps,
        search_width=args.search_width,
        topk=args.topk,
        batch_size=args.batch_size,
        n_replace=args.n_replace,
        n_tokens=args.n_tokens,
        init=args.init,
        target=args.target,
        seed=args.seed,
        objective=args.objective,
        direction_weight=args.direction_weight,
        direction_layers=args.direction_layers,
        loss_threshold=args.loss_threshold,
        stop_on_match=args.stop_on_match,
        check_every=args.check_every,
        ascii_only=args.ascii_only,
        prefix_cache=args.prefix_cache,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )
    config.validate()
    if args.n_prompts < 1:
        raise RefusalkitError("--n-prompts must be at least 1")
    ctx = _context(args)
    order, how = _refused_first(ctx, args.filter)
    chosen = order[: args.n_prompts]
    meta = {
        "split": "harmful_test" if ctx.run_dir else args.harmful,
        "prompt_indices": chosen,
        "filter": how,
        "model": {"name": ctx.lm.name, "fingerprint": ctx.lm.fingerprint},
        "direction": {"layer": ctx.direction.layer, "position": ctx.direction.position},
    }
    print(f"[refusalkit] GCG on {len(chosen)} prompt(s) {chosen} (filter: {how})", file=sys.stderr)
    path = ctx.out / "search.json"
    partial = ctx.out / "search.partial.json"
    resume = None
    if partial.is_file():
        saved = json.loads(partial.read_text())
        wanted = json.loads(json.dumps(asdict(config)))
        same = {k: v for k, v in saved.get("config", {}).items() if k in wanted} == wanted
        if same and saved.get("meta", {}).get("prompt_indices") == chosen:
            resume = saved
            print(
                f"[refusalkit] resuming from step {saved['history'][-1]['step']} ({partial})", file=sys.stderr
            )
    result = run_gcg(
        ctx.lm,
        [ctx.harmful[i] for i in chosen],
        config,
        direction=ctx.direction,
        system=ctx.system,
        meta=meta,
        resume=resume,
        checkpoint=lambda r: r.save(partial),
    )
    result.save(path)
    partial.unlink(missing_ok=True)
    first, last = result.history[0], result.history[-1]
    print(
        f"steps {len(result.history) - 1} ({result.stopped}), {result.to_json()['seconds_per_step']} s/step; "
        f"loss {first['loss']:.3f} -> best {result.best_loss:.3f} (step {result.best_step}, last {last['loss']:.3f}); "
        f"target matched: {result.best_matched}"
    )
    print(f"best suffix: {result.best_suffix!r}\nwritten: {path}")
    return 0


def load_suffixes(path: Path) -> tuple[list[str], list[int]]:
    """Suffixes from a file (see --suffix-file), and the search prompt indices when it is a search.json."""
    if not path.is_file():
        raise RefusalkitError(f"suffix file {path} not found")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RefusalkitError(f"{path}: malformed JSON ({exc.msg}); fix the file") from None
        if isinstance(data, dict) and isinstance(data.get("best"), dict):
            return [str(data["best"]["suffix"])], list(data.get("meta", {}).get("prompt_indices", []))
        items = data.get("suffixes") if isinstance(data, dict) else data
        if isinstance(items, list) and items and all(isinstance(x, str) for x in items):
            return list(items), []
        raise RefusalkitError(f'{path}: expected a search.json, a list of strings or {{"suffixes": [...]}}')
    lines = [line.rstrip("\r") for line in path.read_text().split("\n") if line.strip()]
    if not lines:
        raise RefusalkitError(f"{path} holds no suffix; write one suffix per line")
    return lines, []


def cmd_analyze(args: argparse.Namespace) -> int:
    from refusalkit.analysis.suffix import analyze_suffixes
    from refusalkit.utils import write_json

    _check_inputs(args)
    out = args.out or args.run_dir / "suffix"
    source = args.suffix_file or out / "search.json"
    if not source.is_file():
        raise RefusalkitError(
            f"no suffix found in {source} and none given; run `refusalkit suffix search` first "
            "or pass --suffix-file FILE"
        )
    suffixes, search_idx = load_suffixes(source)
    if args.plots:
        from refusalkit.analysis.plots import _pyplot

        _pyplot()  # fail before the model loads if matplotlib is missing
    ctx = _context(args)
    order, how = _refused_first(ctx, args.filter)
    search_idx = [i for i in search_idx if i < len(ctx.harmful)]
    chosen = (
        search_idx + [i for i in order if i not in search_idx][: max(args.n_prompts - len(search_idx), 0)]
    )
    harmless = list(range(min(args.n_harmless or args.n_prompts, len(ctx.harmless))))
    results, completions = analyze_suffixes(
        ctx.lm,
        ctx.direction,
        [ctx.harmful[i] for i in chosen],
        [ctx.harmless[i] for i in harmless],
        suffixes,
        refusal_ids=ctx.refusal_ids,
        n_random=args.n_random,
        seed=args.seed,
        top_heads=args.top_heads,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        generate_completions=args.generate,
        system=ctx.system,
        search_prompts=list(range(len(search_idx))),
    )
    results["prompts"] = {
        "split": "harmful_test/harmless_test" if ctx.run_dir else f"{args.harmful} / {args.harmless}",
        "harmful": chosen,
        "harmless": harmless,
        "search": search_idx,
        "filter": how,
        "note": "per-prompt lists follow the order of 'harmful' (split indices)",
    }
    results["suffix_source"] = str(source)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_json(ctx.out / "analysis.json", results)
    written = [ctx.out / "analysis.json"]
    if args.save_completions:
        write_json(ctx.out / "completions.json", {"prompts": results["prompts"], "conditions": completions})
        written.append(ctx.out / "completions.json")
    if args.plots:
        from refusalkit.analysis.plots import write_plots

        written += write_plots(results, ctx.out)
    print(format_summary(results))
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def format_summary(results: dict[str, Any]) -> str:
    """A plain-text table of the analysis' headline numbers, per condition."""
    s = results["summary"]
    layer = results["direction"]["layer"]
    head = (
        f"{'condition':<13}{'refusal':>9}{'metric':>9}{f'cos@L{layer}':>10}{'gap closed':>12}"
        f"{'top-head attr':>15}{'suffix attn':>13}"
    )
    lines = [head]
    for n in results["conditions"]:
        r = s[n]
        rate = "-" if r["refusal_rate"] is None else f"{r['refusal_rate']:.2f}"
        gap = f"{r['gap_closed_at_layer']:.2f}" if "gap_closed_at_layer" in r else "-"
        lines.append(
            f"{n:<13}{rate:>9}{r['refusal_metric']:>9.2f}{r['cosine_at_layer']:>10.3f}{gap:>12}"
            f"{r['top_heads_attribution']:>15.3f}{r['top_heads_suffix_share']:>13.2f}"
        )
    return "\n".join(lines)


def run_suffix(args: argparse.Namespace) -> int:
    if args.suffix_command == "search":
        return cmd_search(args)
    return cmd_analyze(args)

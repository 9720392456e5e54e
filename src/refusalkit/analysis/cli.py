"""`refusalkit suffix search|analyze`: GCG suffixes and their analysis, from a run folder or a saved direction.

From a run folder (RUN_DIR): the model settings come from RUN_DIR/manifest.json, the direction from
RUN_DIR/select/direction, the prompts from RUN_DIR/data/splits.json (harmful_test, harmless_test), and
the outputs go to RUN_DIR/suffix/. Without one: --model, --direction and --out, prompts from
--harmful/--harmless data specs. Heavy imports happen inside the commands, so `refusalkit --help`
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refusalkit import options
from refusalkit.analysis.gcg_config import GCGConfig
from refusalkit.analysis.options import AnalyzeOptions, SearchOptions, SuffixOptions
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.run import RunFolder

log = logging.getLogger(__name__)


def add_suffix_arguments(p: argparse.ArgumentParser) -> None:
    """`suffix search` and `suffix analyze` under the top-level `suffix` command."""
    sub = p.add_subparsers(dest="suffix_command", required=True)
    for name, cls, help_text in (
        ("search", SearchOptions, "Optimize a GCG suffix; writes OUT/search.json."),
        ("analyze", AnalyzeOptions, "Analyse the found (or given) suffix against random suffixes."),
    ):
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.add_argument("run_dir", nargs="?", type=Path, help="Run folder with a selected direction.")
        c.add_argument(
            "--config",
            type=Path,
            help=f"TOML file of options (keys as the flags, or a [suffix-{name}] table).",
        )
        options.add_flags(c, SuffixOptions, title="model, direction and prompts")
        extra = [n for n in cls.model_fields if n not in SuffixOptions.model_fields]
        options.add_flags(c, cls, title=f"{name} options", only=extra)


def _options(args: argparse.Namespace) -> Any:
    cls = SearchOptions if args.suffix_command == "search" else AnalyzeOptions
    return options.options_from_args(args, cls, table=f"suffix-{args.suffix_command}")


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


def _check_inputs(run_dir: Path | None, opts: Any) -> RunFolder | None:
    """Fail on a missing run folder or direction before any model loads; the run folder, if given."""
    if run_dir is None:
        if not (opts.model and opts.direction and opts.out):
            raise RefusalkitError("pass a run folder, or --model, --direction and --out")
        return None
    run = RunFolder(run_dir)
    _ = run.manifest  # "not a run folder", worded by the run reader
    if opts.direction is None:
        run.direction()  # "no selected direction", worded by the run reader
    return run


def _run_prompts(run: RunFolder) -> tuple[list[str], list[str], list[bool] | None]:
    """The run's harmful and harmless test prompts, and which harmful ones its baseline refused."""
    from refusalkit.utils import read_json

    splits = run.splits()
    harmful, harmless = splits["harmful_test"], splits["harmless_test"]
    baseline = run.layout.completions("harmful", "baseline")
    refused = None
    if baseline.is_file():
        by_text = {r["instruction"]: bool(r["refused"]) for r in read_json(baseline)["rows"]}
        if all(x in by_text for x in harmful):
            refused = [by_text[x] for x in harmful]
    return harmful, harmless, refused


def _context(run_dir: Path | None, opts: Any) -> _Context:
    from refusalkit.data import load_instructions, sample
    from refusalkit.directions import Direction
    from refusalkit.metric import refusal_token_ids
    from refusalkit.models.loading import load_model
    from refusalkit.settings import build_settings

    run = _check_inputs(run_dir, opts)
    model = {"model": opts.model} if opts.model else {}
    refused: list[bool] | None = None
    if run is not None:
        settings = run.settings(model)  # --model above the run's saved settings and the environment
        stem = Path(opts.direction) if opts.direction else run.layout.direction
        harmful, harmless, refused = _run_prompts(run)
        out = Path(opts.out) if opts.out else run.layout.suffix_dir
    else:
        settings = build_settings(model)
        stem, out = Path(opts.direction), Path(opts.out)
        harmful = sample(load_instructions(opts.harmful).instructions, None, opts.seed)
        harmless = sample(load_instructions(opts.harmless).instructions, None, opts.seed)
    direction = Direction.load(stem)
    lm = load_model(settings.model, **settings.model_kwargs())
    d_model = lm.model.get_input_embeddings().weight.shape[1]
    if direction.vector.shape[0] != d_model:
        raise RefusalkitError(
            f"the direction has d_model {direction.vector.shape[0]} but {lm.name} has "
            f"{d_model}; use the direction selected for this model"
        )
    ids = refusal_token_ids(lm.tokenizer, settings.refusal_tokens)
    return _Context(lm, direction, harmful, harmless, out, settings.system_prompt, ids, run_dir, refused)


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


def gcg_config(opts: Any) -> GCGConfig:
    """The GCG search's configuration from the command's options (--max-minutes as seconds), validated."""
    fields = {f.name for f in dataclasses.fields(GCGConfig)} - {"max_seconds"}
    values = {k: v for k, v in opts.model_dump().items() if k in fields}
    max_seconds = opts.max_minutes * 60 if opts.max_minutes else None
    config = GCGConfig(**values, max_seconds=max_seconds)
    config.validate()
    return config


def _search_identity(ctx: _Context) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's weights and the direction."""
    from refusalkit.utils import sha256_text

    d = ctx.direction
    vector = sha256_text(",".join(f"{x:.6e}" for x in d.vector.double().tolist()))[:16]
    return {
        "model": {"name": ctx.lm.name, "fingerprint": ctx.lm.fingerprint},
        "direction": {"layer": d.layer, "position": d.position, "sha256": vector},
    }


def resumable(partial: Path, config: GCGConfig, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``partial`` if it was made with this config, prompts, model and direction.
    A checkpoint of another search starts the search over, and says why."""
    if not partial.is_file():
        return None
    saved = json.loads(partial.read_text())
    wanted = json.loads(json.dumps(asdict(config)))
    old_meta = saved.get("meta", {})
    differs = [
        what
        for what, same in (
            ("settings", {k: v for k, v in saved.get("config", {}).items() if k in wanted} == wanted),
            ("prompts", old_meta.get("prompt_indices") == meta["prompt_indices"]),
            ("model", old_meta.get("model") == meta["model"]),
            ("direction", old_meta.get("direction") == meta["direction"]),
        )
        if not same
    ]
    if differs:
        print(
            f"[refusalkit] {partial} is a search with other {', '.join(differs)}; starting over",
            file=sys.stderr,
        )
        return None
    print(f"[refusalkit] resuming from step {saved['history'][-1]['step']} ({partial})", file=sys.stderr)
    return dict(saved)


def cmd_search(run_dir: Path | None, opts: Any) -> int:
    from refusalkit.analysis.gcg import run_gcg

    config = gcg_config(opts)
    ctx = _context(run_dir, opts)
    order, how = _refused_first(ctx, opts.filter)
    chosen = order[: opts.n_prompts]
    meta = {
        "split": "harmful_test" if ctx.run_dir else opts.harmful,
        "prompt_indices": chosen,
        "filter": how,
        **_search_identity(ctx),
    }
    print(f"[refusalkit] GCG on {len(chosen)} prompt(s) {chosen} (filter: {how})", file=sys.stderr)
    path, partial = ctx.out / "search.json", ctx.out / "search.partial.json"
    result = run_gcg(
        ctx.lm,
        [ctx.harmful[i] for i in chosen],
        config,
        direction=ctx.direction,
        system=ctx.system,
        meta=meta,
        resume=resumable(partial, config, meta),
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


def _suffix_source(run_dir: Path | None, opts: Any) -> Path:
    out = Path(opts.out) if opts.out else RunLayout(run_dir or ".").suffix_dir
    source = Path(opts.suffix_file) if opts.suffix_file else out / "search.json"
    if not source.is_file():
        raise RefusalkitError(
            f"no suffix found in {source} and none given; run `refusalkit suffix search` first "
            "or pass --suffix-file FILE"
        )
    return source


def cmd_analyze(run_dir: Path | None, opts: Any) -> int:
    from refusalkit.analysis.suffix import analyze_suffixes

    _check_inputs(run_dir, opts)
    source = _suffix_source(run_dir, opts)
    suffixes, search_idx = load_suffixes(source)
    if opts.plots:
        from refusalkit.analysis.plots import pyplot

        pyplot()  # fail before the model loads if matplotlib is missing
    ctx = _context(run_dir, opts)
    order, how = _refused_first(ctx, opts.filter)
    search_idx = [i for i in search_idx if i < len(ctx.harmful)]
    rest = [i for i in order if i not in search_idx][: max(opts.n_prompts - len(search_idx), 0)]
    chosen = search_idx + rest
    harmless = list(range(min(opts.n_harmless or opts.n_prompts, len(ctx.harmless))))
    results, completions = analyze_suffixes(
        ctx.lm,
        ctx.direction,
        [ctx.harmful[i] for i in chosen],
        [ctx.harmless[i] for i in harmless],
        suffixes,
        refusal_ids=ctx.refusal_ids,
        n_random=opts.n_random,
        seed=opts.seed,
        top_heads=opts.top_heads,
        batch_size=opts.batch_size,
        max_new_tokens=opts.max_new_tokens,
        generate_completions=opts.generate,
        system=ctx.system,
        search_prompts=list(range(len(search_idx))),
    )
    results["prompts"] = {
        "split": "harmful_test/harmless_test" if ctx.run_dir else f"{opts.harmful} / {opts.harmless}",
        "harmful": chosen,
        "harmless": harmless,
        "search": search_idx,
        "filter": how,
        "note": "per-prompt lists follow the order of 'harmful' (split indices)",
    }
    results["suffix_source"] = str(source)
    written = _write_analysis(ctx.out, results, completions, opts)
    print(format_summary(results))
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def _write_analysis(out: Path, results: dict[str, Any], completions: Any, opts: Any) -> list[Path]:
    from refusalkit.utils import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "analysis.json", results)
    written = [out / "analysis.json"]
    if opts.save_completions:
        write_json(out / "completions.json", {"prompts": results["prompts"], "conditions": completions})
        written.append(out / "completions.json")
    if opts.plots:
        from refusalkit.analysis.plots import write_plots

        written += write_plots(results, out)
    return written


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
    opts = _options(args)
    if args.suffix_command == "search":
        return cmd_search(args.run_dir, opts)
    return cmd_analyze(args.run_dir, opts)

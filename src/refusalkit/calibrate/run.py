"""`refusalkit calibrate RUN_DIR`: the false-refusal vector of a finished run (docs/calibrate.md).

Steps, each an artifact in RUN_DIR/calibrate/ written atomically and fingerprinted by its inputs, so an
interrupted or repeated call does only the work whose inputs changed:
  means.safetensors (+ .json)   the refused pseudo-harmful prompts' mean activations (lambda-free)
  scores_lam{L}.json            every candidate's scores at lambda L (checkpointed while scoring)
  lam{L}.safetensors / .json    the chosen vector at lambda L (a ``Direction``), its scores and the
                                judged validation record
  calibrated.json               the calibration chosen last (its lambda and vector stem): the one
                                ``--edit calibrate`` uses
Input problems (data missing, no selected direction) are found before any model is loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refusalkit.calibrate import data
from refusalkit.calibrate.choose import Limits, Score, Scorer, pick, score_candidates
from refusalkit.calibrate.options import CalibrateOptions
from refusalkit.calibrate.vector import (
    RefusedMean,
    check_refused,
    edit_factory,
    orthogonalize,
    place_vector,
    refused_mean,
)
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.manifest import fingerprint
from refusalkit.metric import refusal_token_ids
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import format_prompts
from refusalkit.run import RunFolder
from refusalkit.utils import atomic_path, read_json, sha256_text, write_json

log = logging.getLogger(__name__)
VERSION = 1  # bump when a step's definition changes, so old artifacts are recomputed


def stem(lam: float) -> str:
    return f"lam{lam:g}"


def _sha(items: list[str]) -> str:
    return sha256_text("\n".join(items))


def _fresh(path: Path, fp: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    d = dict(read_json(path))
    return d if d.get("fingerprint") == fp and d.get("complete", True) else None


def calibrate(
    layout: RunLayout,
    o: CalibrateOptions,
    *,
    lm: LoadedModel | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compute (or resume) the calibration at ``o.lam``; returns calibrated.json's record."""
    folder = RunFolder(layout)
    s = folder.settings()
    direction, cands, splits = folder.direction(), folder.candidates(), folder.splits()
    root = o.data_dir or s.data_dir
    data.require(root, [*data.TRAIN_SETS, data.VAL_SET], "refusalkit calibrate")
    train = data.load_many(root, data.TRAIN_SETS, o.n_train, s.seed)
    val = data.load(root, data.VAL_SET, o.n_val)
    out_dir = layout.calibrate_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    man = folder.manifest

    def model() -> LoadedModel:
        nonlocal lm
        if lm is None:
            from refusalkit.models.loading import load_model

            lm = load_model(s.model, **s.model_kwargs())
        return lm

    # 1. the refused pseudo-harmful mean (lambda-free)
    refused, means_fp = refused_means(layout, train, model, say)
    vectors = orthogonalize(refused.mean - cands.harmless_mean, direction.vector, o.lam)

    # 2. scores at this lambda (checkpointed)
    harmful_val, harmless_val = splits["harmful_val"], splits["harmless_val"]
    scores_fp = fingerprint({
        "v": VERSION, "means": means_fp, "select": man.fingerprint_of("select"), "lam": o.lam,
        "val": _sha(val), "harmful_val": _sha(harmful_val), "harmless_val": _sha(harmless_val),
        "max_layer_frac": o.max_layer_frac, "exhaustive": o.exhaustive,
    })  # fmt: skip
    scores_path = out_dir / f"scores_{stem(o.lam)}.json"
    limits = Limits(o.floor, o.kl_max, o.max_layer_frac)
    saved = read_json(scores_path) if scores_path.is_file() else {}
    same = saved.get("fingerprint") == scores_fp
    scores = [Score.of(d) for d in saved.get("scores", [])] if same else []
    base = saved.get("base") if same else None
    for sc in scores:  # reasons are the pick's, for the limits of this call
        if sc.reason != "zero vector (lambda 1 removed all of it)":
            sc.reason, sc.kept = "", False
    chosen: Score | None = None
    if same and saved.get("complete") and base is not None:
        try:  # finished scores: choosing again (other limits) needs no model
            chosen = pick(scores, float(base["harmful_rate"]), limits)
        except RefusalkitError:  # the saved scoring stopped early: score further below
            chosen = None
    need_scoring = chosen is None
    if need_scoring:
        m = model()
        ids = refusal_token_ids(m.tokenizer, s.refusal_tokens)
        fmt = lambda xs: format_prompts(m.tokenizer, xs, s.system_prompt)  # noqa: E731
        scorer = Scorer(m, vectors, fmt(val), fmt(harmful_val), fmt(harmless_val), ids, s.batch_size)
        base = scorer.base

        def checkpoint(done: list[Score], complete: bool = False) -> None:
            write_json(scores_path, {
                "fingerprint": scores_fp, "complete": complete, "lam": o.lam, "base": base,
                "scores": [x.as_dict() for x in done],
            })  # fmt: skip

        scores = score_candidates(scorer, limits, done=scores, checkpoint=checkpoint, exhaustive=o.exhaustive)
        try:
            chosen = pick(scores, float(base["harmful_rate"]), limits)
        finally:
            checkpoint(scores, complete=True)
    assert base is not None and chosen is not None
    say(
        f"pick at lambda {o.lam:g}: layer {chosen.layer}, position {chosen.position}: validation refusal "
        f"metric > 0 on {chosen.over_rate:.2f} of pseudo-harmful prompts (unedited {base['over_rate']:.2f}), "
        f"harmful {chosen.harmful_rate:.2f} (unedited {base['harmful_rate']:.2f}), KL {chosen.kl:.3f}"
    )
    # 3. the chosen vector and its judged validation record
    vec_stem = out_dir / stem(o.lam)
    pick_fp = fingerprint({"scores": scores_fp, "pick": [chosen.position, chosen.layer],
                           "judge_val": o.judge_val, "max_new_tokens": o.max_new_tokens})  # fmt: skip
    has_vec = vec_stem.with_suffix(".safetensors").is_file()
    prev = _fresh_meta(vec_stem.with_suffix(".json")) if has_vec else None
    if prev is None or prev.get("fingerprint") != pick_fp:
        vector = vectors[chosen.position + vectors.shape[0], chosen.layer].to(torch.float32)
        record = _validation(model(), vector, val, harmful_val, s, o) if o.judge_val else None
        Direction(
            vector, chosen.layer, chosen.position, model=s.model,
            scores={"over": chosen.over, "over_rate": chosen.over_rate,
                    "harmful_rate": chosen.harmful_rate, "kl": chosen.kl},
            meta={"fingerprint": pick_fp, "kind": "false-refusal", "lam": o.lam,
                  "refusal_direction": {"layer": direction.layer, "position": direction.position},
                  "base": base, "validation": record, "limits": limits.__dict__},
        ).save(vec_stem)  # fmt: skip
        prev = {"validation": record}
    for line in judged_lines(prev.get("validation"), o.floor):
        say(line)
    out = {
        "lam": o.lam, "stem": stem(o.lam), "layer": chosen.layer, "position": chosen.position,
        "fingerprint": pick_fp, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    write_json(layout.calibrated, out)
    return out


def refused_means(
    layout: RunLayout, train: list[str], model: Callable[[], LoadedModel], say: Callable[[str], None] = print
) -> tuple[RefusedMean, str]:
    """The refused pseudo-harmful training prompts' means (calibrate/means.*), computed or, when fresh
    (same extract, prompts, system prompt, refusal tokens, dtype), read; and their fingerprint.
    ``model`` loads the model only when the means must be computed. Raises when too few are refused."""
    folder = RunFolder(layout)
    s, man = folder.settings(), folder.manifest
    out_dir = layout.calibrate_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    means_fp = fingerprint({
        "v": VERSION, "extract": man.fingerprint_of("extract"), "train": _sha(train),
        "system": s.system_prompt, "tokens": s.refusal_tokens, "dtype": s.dtype,
    })  # fmt: skip
    means_path = out_dir / "means.safetensors"
    info = _fresh(out_dir / "means.json", means_fp)
    if info is not None and means_path.is_file():
        from safetensors.torch import load_file

        refused = RefusedMean(load_file(str(means_path))["mean"], int(info["kept"]), int(info["total"]))
        say(f"means: up to date ({refused.kept} of {refused.total} pseudo-harmful prompts refused)")
    else:
        m = model()
        ids = refusal_token_ids(m.tokenizer, s.refusal_tokens)
        refused = refused_mean(
            m, format_prompts(m.tokenizer, train, s.system_prompt), folder.candidates().n_positions, ids,
            batch_size=s.batch_size,
        )  # fmt: skip
        from safetensors.torch import save_file

        with atomic_path(means_path) as tmp:
            save_file({"mean": refused.mean.contiguous()}, str(tmp))
        write_json(out_dir / "means.json", {
            "fingerprint": means_fp, "kept": refused.kept, "total": refused.total,
            "refused_rate": refused.kept / refused.total, "sets": list(data.TRAIN_SETS),
        })  # fmt: skip
        say(f"means: {refused.kept} of {refused.total} pseudo-harmful training prompts refused")
    check_refused(refused.kept, refused.total)
    return refused, means_fp


def judged_lines(record: dict[str, Any] | None, floor: float) -> list[str]:
    """The judged validation record in words, with a warning when the judge (the paper's phrases) sees
    harmful refusal below the floor the refusal metric kept (the two measure refusal differently)."""
    if not record:
        return []
    out = []
    for name in ("pseudo_harmful_val", "harmful_val"):
        b, c = record[name]["baseline"]["paper"], record[name]["calibrated"]["paper"]
        out.append(
            f"{name}: refused (paper phrases) {b['k']}/{b['n']} unedited, {c['k']}/{c['n']} calibrated"
        )
    b, c = record["harmful_val"]["baseline"]["paper"], record["harmful_val"]["calibrated"]["paper"]
    if b["rate"] is not None and c["rate"] is not None and c["rate"] < floor * b["rate"]:
        out.append(
            f"warning: by the judge, harmful refusal {c['rate']:.2f} is below the floor ({floor:g} x "
            f"{b['rate']:.2f}) that the refusal metric kept; a larger --lambda or --floor keeps more"
        )
    return out


def _fresh_meta(path: Path) -> dict[str, Any] | None:
    return dict(read_json(path)).get("meta") if path.is_file() else None  # Direction.save's json


def _validation(
    lm: LoadedModel, vector: torch.Tensor, val: list[str], harmful_val: list[str], s: Any, o: CalibrateOptions
) -> dict[str, Any]:
    """Judged refusal rates (the run's marker judges) of the validation prompts, unedited and calibrated."""
    from refusalkit.calibrate.rates import judged_rates

    sets = {"pseudo_harmful_val": val, "harmful_val": harmful_val}
    kw: dict[str, Any] = {
        "system": s.system_prompt, "max_new_tokens": o.max_new_tokens, "batch_size": s.gen_batch_size, "rows": False,
    }  # fmt: skip
    base = judged_rates(lm, sets, desc="validation unedited", **kw)
    cal = judged_rates(lm, sets, edit=edit_factory(lm, vector), desc="validation calibrated", **kw)
    return {n: {"baseline": base[n]["rates"], "calibrated": cal[n]["rates"]} for n in sets}


def vector_at(layout: RunLayout, layer: int, position: int, lam: float) -> torch.Tensor:
    """The false-refusal vector at (``layer``, ``position``) orthogonalized by ``lam``, from the saved
    means (calibrate/means.safetensors) and the run's harmless means and direction: the same vector a
    calibration at ``lam`` picking that place saves, for sweeping lambda at one place."""
    from safetensors.torch import load_file

    folder = RunFolder(layout)
    path = layout.calibrate_dir / "means.safetensors"
    if not path.is_file():
        raise folder.missing("false-refusal means", path, "calibrate")
    refused = load_file(str(path))["mean"]
    cands = folder.candidates()
    return place_vector(refused, cands.harmless_mean, folder.direction().vector, layer, position, lam)

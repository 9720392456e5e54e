"""The run: stages that each leave artifacts on disk, a manifest, and resume.

Layout of a run folder:
  manifest.json                      settings, versions, hardware, model and data hashes, stage timings
  data/splits.json                   the exact instructions of every split (after sampling)
  extract/candidates.safetensors     harmful and harmless means [n_positions, n_layers, d_model]
  extract/summary.json               filter counts and refusal metrics of the training prompts
  select/candidate_scores.json       bypass / induce / KL of every candidate, kept or why discarded
  select/direction.{safetensors,json}
  evaluate/completions/SET__SETTING.json   per-prompt completions and verdicts
  evaluate/refusal_rates.json        refusal rate per prompt set and setting, with 95% intervals
  measure/*.json                     judges, coherence, capability (see evaluation/suite.py)
  model/                             the orthogonalized checkpoint (ordinary transformers folder)
  results.json                       the summary table

A stage is skipped when the manifest records it finished with the same input fingerprint and its
artifacts exist; every artifact is written atomically, so an interrupted run resumes cleanly.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import logits_for_prompts, mean_activations
from refusalkit.data import carve
from refusalkit.directions import Candidates, Direction
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.refusal import is_refusal, wilson_interval
from refusalkit.generation import generate
from refusalkit.interventions import ablate_direction, add_direction
from refusalkit.metric import refusal_metric, refusal_token_ids
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.orthogonalize import export_checkpoint, orthogonalized
from refusalkit.prompts import format_prompts, post_instruction_ids
from refusalkit.selection import CandidateScore, SelectionRules, apply_rules, score_candidates
from refusalkit.settings import Settings
from refusalkit.utils import read_json, sha256_text, write_json

log = logging.getLogger(__name__)

STAGES = ("extract", "select", "evaluate", "measure", "export")
MIN_PROMPTS = 2


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("refusalkit", "torch", "transformers", "accelerate", "safetensors", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _fp(obj: Any) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))[:16]


@dataclass
class EvalSetting:
    prompt_set: str  # "harmful" or "harmless"
    name: str  # baseline, ablation, actadd, orthogonalized
    coeff: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.prompt_set}__{self.name}"


class Run:
    """One run folder and the stages that fill it."""

    def __init__(self, out: str | Path, settings: Settings, *, lm: LoadedModel | None = None) -> None:
        self.out = Path(out)
        self.settings = settings
        self._lm = lm
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "manifest.json"
        self.manifest: dict[str, Any] = read_json(path) if path.is_file() else {"stages": {}}
        self.timings: dict[str, float] = {}

    # ---- shared state -------------------------------------------------------------------------
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            s = self.settings
            t0 = time.perf_counter()
            self._lm = load_model(s.model, **s.model_kwargs())
            self.timings["load_model"] = time.perf_counter() - t0
        return self._lm

    def _save_manifest(self) -> None:
        lm = self._lm
        self.manifest.update(
            {
                "settings": self.settings.model_dump(),
                "versions": _versions(),
                "hardware": _hardware(),
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        if lm is not None:
            self.manifest["model"] = {
                "name": lm.name,
                "source": lm.source,
                "fingerprint": lm.fingerprint,
                "model_type": lm.arch.model_type,
                "n_layers": lm.arch.n_layers,
                "dtype": str(lm.arch.embed.weight.dtype),
            }
        write_json(self.out / "manifest.json", self.manifest)

    def _done(self, stage: str, fingerprint: str, artifacts: list[Path]) -> bool:
        rec = self.manifest.get("stages", {}).get(stage, {})
        return rec.get("fingerprint") == fingerprint and all(p.exists() for p in artifacts)

    @contextmanager
    def _stage(self, stage: str, fingerprint: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("stage %s", stage)
        yield
        self.manifest.setdefault("stages", {})[stage] = {
            "fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - t0, 2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._save_manifest()

    # ---- data ---------------------------------------------------------------------------------
    def splits(self) -> dict[str, list[str]]:
        s = self.settings
        spec = {
            "harmful_train": (s.harmful_train, s.n_train),
            "harmful_val": (s.harmful_val or s.harmful_train, s.n_val),
            "harmful_test": (s.harmful_test or s.harmful_train, s.n_test),
            "harmless_train": (s.harmless_train, s.n_train),
            "harmless_val": (s.harmless_val or s.harmless_train, s.n_val),
            "harmless_test": (s.harmless_test or s.harmless_train, s.n_test),
        }
        fp = _fp({k: [v[0], v[1]] for k, v in spec.items()} | {"seed": s.seed})
        path = self.out / "data" / "splits.json"
        saved = read_json(path) if path.is_file() else {}
        if saved.get("fingerprint") == fp:
            splits = dict(saved["splits"])
        else:
            splits = carve(spec, s.seed)
            write_json(path, {"fingerprint": fp, "splits": splits})
        self.manifest["data"] = {
            k: {"spec": spec[k][0], "n": len(v), "sha256": sha256_text("\n".join(v))}
            for k, v in splits.items()
        }
        return splits

    def _prompts(self, instructions: list[str]) -> list[str]:
        return format_prompts(self.lm.tokenizer, instructions, self.settings.system_prompt)

    def refusal_ids(self) -> list[int]:
        return refusal_token_ids(self.lm.tokenizer, self.settings.refusal_tokens)

    # ---- stages -------------------------------------------------------------------------------
    def extract_fingerprint(self) -> str:
        s = self.settings
        return _fp(
            {
                "model": s.model,
                "dtype": s.dtype,
                "system": s.system_prompt,
                "template": s.chat_template,
                "harmful": self.manifest["data"]["harmful_train"]["sha256"],
                "harmless": self.manifest["data"]["harmless_train"]["sha256"],
                "filter": s.filter_train,
                "tokens": s.refusal_tokens,
            }
        )

    def extract(self) -> Candidates:
        splits = self.splits()
        fp = self.extract_fingerprint()
        path = self.out / "extract" / "candidates.safetensors"
        if self._done("extract", fp, [path]):
            return Candidates.load(path)
        lm, s = self.lm, self.settings
        post_ids = post_instruction_ids(lm.tokenizer, s.system_prompt)
        ids = self.refusal_ids()
        with self._stage("extract", fp):

            def metric(logits: torch.Tensor) -> torch.Tensor:
                return refusal_metric(logits, ids)

            stats = {}
            means = {}
            for cls, sign in (("harmful", 1), ("harmless", -1)):
                acts = mean_activations(
                    lm,
                    self._prompts(splits[f"{cls}_train"]),
                    len(post_ids),
                    batch_size=s.batch_size,
                    metric=metric,
                    keep_sign=sign if s.filter_train else None,
                    desc=f"{cls} activations",
                )
                if acts.kept < MIN_PROMPTS:
                    raise RefusalkitError(
                        f"only {acts.kept} of {acts.total} {cls} training prompts passed the refusal filter "
                        f"(need {MIN_PROMPTS}); use more prompts (--n-train), other data, or --no-filter-train"
                    )
                means[cls] = acts.mean
                stats[cls] = {"kept": acts.kept, "total": acts.total, "metric_mean": _mean(acts.metrics)}
            cands = Candidates(
                means["harmful"],
                means["harmless"],
                post_instruction_tokens=[lm.tokenizer.decode([i]) for i in post_ids],
            )
            cands.save(path)
            write_json(self.out / "extract" / "summary.json", {"filter": stats, "refusal_token_ids": ids})
        return cands

    def _filtered_val(self, splits: dict[str, list[str]]) -> tuple[list[str], list[str], dict[str, Any]]:
        s = self.settings
        harmful, harmless = self._prompts(splits["harmful_val"]), self._prompts(splits["harmless_val"])
        info: dict[str, Any] = {"harmful": len(harmful), "harmless": len(harmless)}
        if s.filter_val:
            ids = self.refusal_ids()
            mh = refusal_metric(logits_for_prompts(self.lm, harmful, s.batch_size), ids)
            ml = refusal_metric(logits_for_prompts(self.lm, harmless, s.batch_size), ids)
            harmful = [p for p, m in zip(harmful, mh.tolist(), strict=True) if m > 0]
            harmless = [p for p, m in zip(harmless, ml.tolist(), strict=True) if m < 0]
            info |= {"harmful_kept": len(harmful), "harmless_kept": len(harmless)}
            for name, kept in (("harmful", harmful), ("harmless", harmless)):
                if len(kept) < MIN_PROMPTS:
                    raise RefusalkitError(
                        f"only {len(kept)} {name} validation prompts passed the refusal filter (need {MIN_PROMPTS}); "
                        "raise --n-val, use other data, or --no-filter-val"
                    )
        return harmful, harmless, info

    def select(self) -> Direction:
        cands = self.extract()
        s = self.settings
        rules = SelectionRules(
            s.max_layer_frac, s.kl_threshold, s.induce_threshold, s.score_late_layers, s.exhaustive_selection
        )
        data = self.manifest["data"]
        fp = _fp(
            {
                "extract": self.manifest["stages"]["extract"]["fingerprint"],
                "rules": rules.__dict__,
                "val": [data["harmful_val"]["sha256"], data["harmless_val"]["sha256"]],
                "filter": s.filter_val,
            }
        )
        stem = self.out / "select" / "direction"
        scores_path = self.out / "select" / "candidate_scores.json"
        if self._done("select", fp, [stem.with_suffix(".json"), scores_path]):
            return Direction.load(stem)
        harmful_val, harmless_val, val_info = self._filtered_val(self.splits())
        partial_path = self.out / "select" / "partial_scores.json"
        done: list[CandidateScore] = []
        if partial_path.is_file() and read_json(partial_path).get("fingerprint") == fp:
            done = [CandidateScore(**d) for d in read_json(partial_path)["scores"]]
            log.info("resuming selection: %d candidates already scored", len(done))

        def checkpoint(scores: list[CandidateScore]) -> None:
            write_json(partial_path, {"fingerprint": fp, "scores": [x.as_dict() for x in scores]})

        with self._stage("select", fp):
            scores = score_candidates(
                self.lm,
                cands,
                harmful_val,
                harmless_val,
                self.refusal_ids(),
                rules=rules,
                batch_size=s.batch_size,
                done=done,
                checkpoint=checkpoint,
            )
            try:
                best = apply_rules(scores, cands.n_layers, rules)
            finally:
                write_json(
                    scores_path,
                    {
                        "validation": val_info,
                        "rules": rules.__dict__,
                        "scores": [x.as_dict() for x in scores],
                    },
                )
            p = best.position + cands.n_positions
            direction = Direction(
                vector=cands.directions[p, best.layer].float(),
                layer=best.layer,
                position=best.position,
                model=self.lm.name,
                scores={"bypass": best.bypass, "induce": best.induce, "kl": best.kl},
                meta={
                    "n_layers": cands.n_layers,
                    "n_positions": cands.n_positions,
                    "post_instruction_tokens": cands.post_instruction_tokens,
                },
            )
            direction.save(stem)
            partial_path.unlink(missing_ok=True)
        return direction

    def eval_settings(self) -> list[EvalSetting]:
        out = [
            EvalSetting("harmful", "baseline"),
            EvalSetting("harmful", "ablation"),
            EvalSetting("harmful", "actadd", -1.0),
        ]
        if self.lm.arch.spec.weights_orthogonalizable:
            out.append(EvalSetting("harmful", "orthogonalized"))
        out += [EvalSetting("harmless", "baseline"), EvalSetting("harmless", "actadd", 1.0)]
        return out

    def _intervention(self, setting: EvalSetting, direction: Direction) -> AbstractContextManager[Any]:
        arch = self.lm.arch
        if setting.name == "ablation":
            return ablate_direction(arch, direction.vector)
        if setting.name == "actadd":
            return add_direction(arch, direction.vector, direction.layer, setting.coeff)
        if setting.name == "orthogonalized":
            return orthogonalized(self.lm, direction.vector)
        return nullcontext()

    def evaluate(self) -> dict[str, Any]:
        direction = self.select()
        s = self.settings
        data = self.manifest["data"]
        fp = _fp(
            {
                "select": self.manifest["stages"]["select"]["fingerprint"],
                "max_new_tokens": s.max_new_tokens,
                "test": [data["harmful_test"]["sha256"], data["harmless_test"]["sha256"]],
            }
        )
        rates_path = self.out / "evaluate" / "refusal_rates.json"
        if rates_path.is_file():
            saved_rates = read_json(rates_path)
            completions = [
                self.out / "evaluate" / "completions" / f"{ps}__{name}.json"
                for ps in ("harmful", "harmless")
                for name in saved_rates.get(ps, {})
            ]
            if self._done("evaluate", fp, [rates_path, *completions]):
                return dict(saved_rates)
        splits = self.splits()
        rates: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "judge": "substring (paper's list)"}
        with self._stage("evaluate", fp):
            for setting in self.eval_settings():
                path = self.out / "evaluate" / "completions" / f"{setting.key}.json"
                saved = read_json(path) if path.is_file() else {}
                if saved.get("fingerprint") == fp:
                    rows = saved["rows"]
                else:
                    instructions = splits[f"{setting.prompt_set}_test"]
                    with self._intervention(setting, direction):
                        texts = generate(
                            self.lm,
                            self._prompts(instructions),
                            max_new_tokens=s.max_new_tokens,
                            batch_size=s.gen_batch_size,
                            desc=setting.key,
                        )
                    rows = [
                        {"instruction": i, "completion": t, "refused": is_refusal(t)}
                        for i, t in zip(instructions, texts, strict=True)
                    ]
                    write_json(path, {"fingerprint": fp, "setting": setting.__dict__, "rows": rows})
                k, n = sum(r["refused"] for r in rows), len(rows)
                lo, hi = wilson_interval(k, n)
                rates.setdefault(setting.prompt_set, {})[setting.name] = {
                    "refusal_rate": k / n,
                    "refused": k,
                    "n": n,
                    "ci95": [lo, hi],
                    "coeff": setting.coeff,
                }
            write_json(rates_path, rates)
        return rates

    def measure(self) -> dict[str, Any]:
        """Judges, coherence and capability into measure/ (evaluation/suite.py; each file resumable)."""
        from refusalkit.evaluation.suite import Suite

        suite = Suite(self, self.select())
        self.evaluate()
        path = self.out / "measure" / "summary.json"
        if self._done("measure", suite.fingerprint, [path, *suite.artifacts]):
            return dict(read_json(path))
        with self._stage("measure", suite.fingerprint):
            return suite.run_all()

    def export(self) -> Path | None:
        if not self.settings.export_checkpoint:
            return None
        direction = self.select()
        if not self.lm.arch.spec.weights_orthogonalizable:
            log.warning("skipping export: %s is not weight-orthogonalizable", self.lm.arch.model_type)
            return None
        fp = _fp({"select": self.manifest["stages"]["select"]["fingerprint"]})
        out = self.out / "model"
        if self._done("export", fp, [out / "config.json"]):
            return out
        with self._stage("export", fp):
            export_checkpoint(self.lm, direction.vector, out)
        return out

    def results(self) -> dict[str, Any]:
        direction = Direction.load(self.out / "select" / "direction")
        rates = read_json(self.out / "evaluate" / "refusal_rates.json")
        summary = {
            "model": self.manifest.get("model", {}),
            "direction": {
                "layer": direction.layer,
                "position": direction.position,
                **direction.scores,
                "norm": float(direction.vector.norm()),
            },
            "refusal_rates": {
                ps: {name: v["refusal_rate"] for name, v in rates[ps].items()}
                for ps in ("harmful", "harmless")
            },
            "sizes": {k: v.get("n") for k, v in self.manifest.get("data", {}).items()},
            "max_new_tokens": rates.get("max_new_tokens"),
            "stage_seconds": {k: v.get("seconds") for k, v in self.manifest.get("stages", {}).items()},
        }
        if (self.out / "measure").is_dir():
            from refusalkit.report import collect, headline

            h = headline(collect(self.out))
            summary["measure"] = {k: h.get(k) for k in ("kl", "corpus_ce", "completion_ce", "refusal_broad")}
            summary["capability"] = {k: h.get(k) for k in ("gsm8k", "truthfulqa_mc1", "truthfulqa_mc2")}
        write_json(self.out / "results.json", summary)
        return summary

    def run_all(self, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        for stage in STAGES:
            if progress:
                progress(stage)
            getattr(self, stage)()
        self._save_manifest()
        summary = self.results()
        try:
            from refusalkit.report import build_report

            build_report(self.out)
        except ImportError as exc:  # matplotlib is the `report` extra
            log.warning("report not built (%s); pip install 'refusalkit[report]'", exc)
        return summary


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def format_table(summary: dict[str, Any]) -> str:
    """The results as a plain-text table: refusal rate per setting and prompt set."""
    rates = summary["refusal_rates"]
    d = summary["direction"]
    names = ["baseline", "ablation", "actadd", "orthogonalized"]
    lines = [
        f"direction: layer {d['layer']}, position {d['position']}, bypass {d['bypass']:.2f}, "
        f"induce {d['induce']:.2f}, KL {d['kl']:.3f}",
        f"{'setting':<16}{'harmful refusal':>17}{'harmless refusal':>18}",
    ]
    for name in names:
        h = rates.get("harmful", {}).get(name)
        hl = rates.get("harmless", {}).get(name)
        if h is None and hl is None:
            continue
        label = {"actadd": "actadd (-1/+1)"}.get(name, name)
        kl = summary.get("measure", {}).get("kl", {}).get(name)
        ce = summary.get("measure", {}).get("corpus_ce", {}).get(name)
        lines.append(f"{label:<16}{_fmt(h):>17}{_fmt(hl):>18}{_fmt(kl, 3):>10}{_fmt(ce, 3):>11}")
    lines[1] += f"{'KL':>10}{'corpus CE':>11}" if "measure" in summary else ""
    for name, v in summary.get("capability", {}).items():
        if v and v.get("original") is not None:
            lines.append(f"{name:<16} original {_fmt(v['original'], 3)}  edited {_fmt(v.get('edited'), 3)}")
    return "\n".join(lines)


def _fmt(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else "-"

"""Capability: GSM8K and TruthfulQA multiple choice, original against edited model (PAPER.md section 6).

GSM8K: the first ``n`` problems of the test file, zero-shot in the model's own chat template (a
few-shot prefix would cost ~700 prompt tokens per problem on a CPU), greedy decoding. The reference is
the number after ``####``; the prediction is the last number in the completion; exact match compares
them as decimals (``1,000`` = ``1000.00``). Completions that use up ``max_new_tokens`` are flagged.

TruthfulQA (the 817-row CSV; columns Question, Best Answer, Correct Answers, Incorrect Answers, answers
separated by ``;``): every answer is scored by its summed log-likelihood as the assistant's reply to the
question in the chat template.
  MC1 = 1 if the best answer scores above every incorrect answer (one true vs the false ones);
  MC2 = the normalized probability mass on the correct answers, sum_c p(c) / (sum_c p(c) + sum_i p(i)).
The official MC1/MC2 use curated target lists from a JSON release, not this CSV, so the values are
close to but not identical with published ones; the comparison original vs edited is what matters.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import cache_kwarg, repeat_cache, run_prefix
from refusalkit.errors import RefusalkitError
from refusalkit.generation import generate
from refusalkit.interventions import token_mask
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import format_prompt, pad_right

GSM8K_PROMPT_VERSION = "gsm8k-zero-shot-chat/v1"
GSM8K_INSTRUCTION = (
    "\nSolve the problem step by step, briefly. End with a line 'The answer is N.' where N is a number."
)
TRUTHFULQA_PROMPT_VERSION = "truthfulqa-chat-loglik/v1"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _missing(kind: str, path: Path, flag: str) -> RefusalkitError:
    return RefusalkitError(
        f"{kind} file {path} not found. Point --data-dir at the shared data folder (it holds {flag}), "
        f"or drop '{kind.lower()}' from --measurements"
    )


# ---- GSM8K -------------------------------------------------------------------------------------------


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; None if it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "") else out


def parse_reference(answer: str) -> str:
    """The final answer of a GSM8K reference solution: the number after '####'."""
    if "####" not in answer:
        raise RefusalkitError("a GSM8K reference has no '#### N' final answer; is this the GSM8K test file?")
    value = normalize_number(answer.split("####")[-1])
    if value is None:
        raise RefusalkitError(f"GSM8K reference answer {answer.split('####')[-1].strip()!r} is not a number")
    return value


def parse_prediction(completion: str) -> str | None:
    """The last number in a completion, normalized; None if there is none."""
    found = _NUMBER.findall(completion)
    return normalize_number(found[-1]) if found else None


def load_gsm8k(path: str | Path, n: int) -> list[dict[str, str]]:
    """The first ``n`` problems: [{question, answer, reference}]."""
    path = Path(path)
    if not path.is_file():
        raise _missing("GSM8K", path, "gsm8k/test.jsonl")
    rows: list[dict[str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append(
                {
                    "question": row["question"],
                    "answer": row["answer"],
                    "reference": parse_reference(row["answer"]),
                }
            )
        if len(rows) >= n:
            break
    return rows


def gsm8k_accuracy(
    lm: LoadedModel,
    problems: list[dict[str, str]],
    *,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    system: str | None = None,
) -> dict[str, Any]:
    """Greedy zero-shot answers under whatever intervention is active; exact match on the final number."""
    prompts = [format_prompt(lm.tokenizer, p["question"] + GSM8K_INSTRUCTION, system) for p in problems]
    texts = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc="gsm8k")
    rows: list[dict[str, Any]] = []
    for p, text in zip(problems, texts, strict=True):
        pred = parse_prediction(text)
        n_tokens = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append(
            {
                "reference": p["reference"],
                "prediction": pred,
                "correct": pred == p["reference"],
                "hit_max_new_tokens": n_tokens >= max_new_tokens - 1,
                "completion": text,
            }
        )
    k = sum(r["correct"] for r in rows)
    return {
        "accuracy": k / len(rows) if rows else None,
        "correct": k,
        "n": len(rows),
        "hit_max_new_tokens": sum(r["hit_max_new_tokens"] for r in rows),
        "rows": rows,
    }


# ---- TruthfulQA --------------------------------------------------------------------------------------


@dataclass
class TQAItem:
    question: str
    best: str
    correct: list[str]  # includes ``best``
    incorrect: list[str]


def _split_answers(cell: str) -> list[str]:
    out: list[str] = []
    for a in cell.split(";"):
        a = a.strip()
        if a and a not in out:
            out.append(a)
    return out


def load_truthfulqa(path: str | Path, n: int) -> list[TQAItem]:
    """The first ``n`` questions of TruthfulQA.csv that have a best answer and an incorrect answer."""
    path = Path(path)
    if not path.is_file():
        raise _missing("TruthfulQA", path, "truthfulqa/TruthfulQA.csv")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        need = {"Question", "Best Answer", "Correct Answers", "Incorrect Answers"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise RefusalkitError(f"{path}: expected the TruthfulQA CSV columns {sorted(need)}")
        items: list[TQAItem] = []
        for row in reader:
            best = row["Best Answer"].strip()
            correct = [best] + [a for a in _split_answers(row["Correct Answers"]) if a != best]
            incorrect = [a for a in _split_answers(row["Incorrect Answers"]) if a not in correct]
            if not best or not incorrect:
                continue
            items.append(TQAItem(row["Question"].strip(), best, correct, incorrect))
            if len(items) >= n:
                break
    return items


@torch.inference_mode()
def option_logprobs(lm: LoadedModel, context: list[int], options: list[list[int]]) -> torch.Tensor:
    """Summed log-probability of each option's tokens after a shared context. -> [n_options] float64.

    The context runs once (``run_prefix``); a copy of its key/value cache, repeated per option, serves
    the options, which run as one right-padded batch (pads come after every real token, so they change
    nothing before them). The context's own cache is never extended in place.
    """
    if not context or any(not o for o in options):
        raise ValueError("context and every option need at least one token")
    device = lm.device
    cache, last = run_prefix(lm, context)
    first = torch.log_softmax(last.double(), -1)  # [vocab]: the distribution of each option's first token
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch = pad_right(options, pad).to(device)
    n, width = batch.input_ids.shape
    mask = torch.cat(
        [torch.ones((n, len(context)), dtype=torch.long, device=device), batch.attention_mask], 1
    )
    positions = torch.arange(len(context), len(context) + width, device=device).expand(n, width)
    with token_mask(mask):
        logits = lm.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg(lm.model): repeat_cache(cache, n)},
        ).logits  # [n, width, vocab]
    result = torch.empty(n, dtype=torch.float64)
    for i, o in enumerate(options):
        total = first[o[0]]
        if len(o) > 1:
            logp = torch.log_softmax(logits[i, : len(o) - 1].double(), -1)  # [len - 1, vocab]
            target = torch.tensor(o[1:], device=device)
            total = total + logp.gather(-1, target[:, None]).sum()
        result[i] = total.cpu()
    return result


def mc_scores(item: TQAItem, logprob: dict[str, float]) -> dict[str, float]:
    """MC1 (0/1) and MC2 (probability mass on correct answers) from each answer's log-likelihood."""
    mc1 = float(all(logprob[item.best] > logprob[a] for a in item.incorrect))
    lp = torch.tensor([logprob[a] for a in item.correct + item.incorrect], dtype=torch.float64)
    p = torch.softmax(lp, 0)
    mc2 = float(p[: len(item.correct)].sum())
    return {"mc1": mc1, "mc2": mc2, "mass_incorrect": float(p[len(item.correct) :].sum())}


def truthfulqa_mc(lm: LoadedModel, items: list[TQAItem], *, system: str | None = None) -> dict[str, Any]:
    """MC1 and MC2 under whatever intervention is active (see the module docstring)."""
    tok = lm.tokenizer
    rows = []
    for item in items:
        context = tok(format_prompt(tok, item.question, system), add_special_tokens=False)["input_ids"]
        answers = item.correct + item.incorrect
        ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
        lps = option_logprobs(lm, context, ids)
        scores = mc_scores(item, dict(zip(answers, lps.tolist(), strict=True)))
        rows.append({"n_correct": len(item.correct), "n_incorrect": len(item.incorrect), **scores})
    n = len(rows)
    return {
        "mc1": sum(r["mc1"] for r in rows) / n if n else None,
        "mc2": sum(r["mc2"] for r in rows) / n if n else None,
        "n": n,
        "rows": rows,
    }


# ---- lm-evaluation-harness (optional) ----------------------------------------------------------------


def lm_eval_tasks(
    lm: LoadedModel, tasks: list[str], *, limit: int | None = None, batch_size: int = 8
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on the in-memory model (with any active weight edit).

    Needs ``pip install 'refusalkit[lm-eval]'`` and, for most tasks, network access to fetch the data.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RefusalkitError(
            "the lm_eval measurement needs lm-evaluation-harness: pip install 'refusalkit[lm-eval]' "
            "(it downloads task data, so it needs network access); or drop 'lm_eval' from --measurements"
        ) from None
    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=model, tasks=tasks, limit=limit)
    results = out.get("results", {}) if isinstance(out, dict) else {}
    return {
        task: {k: v for k, v in vals.items() if isinstance(v, int | float)} for task, vals in results.items()
    }

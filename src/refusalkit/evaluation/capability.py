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

from refusalkit.activations import (
    cache_kwarg,
    cache_of,
    even_batches,
    length_batches,
    prefix_cache,
    repeat_cache,
    select_cache_rows,
    shared_prefix_len,
)
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.coherence import LOGIT_BUDGET, MIN_PREFIX
from refusalkit.generation import generate
from refusalkit.interventions import token_mask
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import format_prompt, pad_left, pad_right

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


# Questions whose contexts run as one left-padded pass; the options of those questions then select
# their rows of its KV cache. Bounds the caches held at once (~57 KB per token on the 1.5B built-in).
QUESTION_ROWS = 32
OPTION_ROWS = 64  # most option rows per pass; fewer when their logits would pass LOGIT_BUDGET


@dataclass
class _Contexts:
    """Question contexts run as one batch after the shared prefix.

    cache: KV cache, one row per question (prefix, then the left-padded rest of the context);
    mask: [q, n_prefix + width] real-token mask of those rows; lengths: [q] real tokens per row, the
    position of each option's first token; first: [q, vocab] float64 log-probabilities of that token.
    """

    cache: Any
    mask: torch.Tensor
    lengths: torch.Tensor
    first: torch.Tensor


def _run_contexts(lm: LoadedModel, past: Any, n_prefix: int, rest: list[list[int]]) -> _Contexts:
    """Run the contexts' tokens after the prefix (``past``: its cache repeated per row, or None when
    there is no prefix; extended in place) as one left-padded batch, keeping the cache."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch = pad_left(rest, pad)
    q = len(rest)
    mask = torch.cat([torch.ones((q, n_prefix), dtype=torch.long), batch.attention_mask], 1)
    positions = n_prefix + batch.position_ids
    on_device = mask.to(lm.device)
    with token_mask(on_device):
        out = lm.model(
            input_ids=batch.input_ids.to(lm.device),
            attention_mask=on_device,
            position_ids=positions.to(lm.device),
            use_cache=True,
            logits_to_keep=1,  # left padded: the last column is every context's last token
            **({cache_kwarg(lm.model): past} if past is not None else {}),
        )
    first = torch.log_softmax(out.logits[:, -1].double(), -1)
    return _Contexts(cache_of(out), mask, mask.sum(1), first)


def _option_batches(lengths: list[int], vocab: int) -> list[list[int]]:
    """Indices of ``lengths`` (input tokens per option row) in order of length, cut where padding
    outweighs a pass's fixed cost (``length_batches``), into passes of at most ``OPTION_ROWS`` rows
    whose logits, [rows, width, vocab] float32, stay under ``LOGIT_BUDGET`` at the longest width."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if not order:
        return []
    sizes = [lengths[i] for i in order]
    rows = max(1, min(OPTION_ROWS, LOGIT_BUDGET // (sizes[-1] * vocab)))
    return length_batches(order, sizes, rows)


def _option_pass(lm: LoadedModel, ctx: _Contexts, questions: list[int], opts: list[list[int]]) -> list[float]:
    """Summed log-probability of tokens 2.. of each option (>= 2 tokens), after the context of row
    ``questions[i]`` of ``ctx``; the options run right padded, continuing from those cache rows."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch = pad_right([o[:-1] for o in opts], pad)  # an option's last token is predicted, never read
    rows = torch.tensor(questions)
    width = batch.input_ids.shape[1]
    mask = torch.cat([ctx.mask[rows], batch.attention_mask], 1).to(lm.device)
    positions = (ctx.lengths[rows][:, None] + torch.arange(width)).to(lm.device)
    with token_mask(mask):
        logits = lm.model(
            input_ids=batch.input_ids.to(lm.device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg(lm.model): select_cache_rows(ctx.cache, rows)},
        ).logits  # [rows, width, vocab]
    out = []
    for i, o in enumerate(opts):
        logp = torch.log_softmax(logits[i, : len(o) - 1].double(), -1)  # [len - 1, vocab]
        target = torch.tensor(o[1:], device=logp.device)
        out.append(float(logp.gather(-1, target[:, None]).sum()))
    return out


@torch.inference_mode()
def option_logprobs(
    lm: LoadedModel, contexts: list[list[int]], options: list[list[list[int]]]
) -> list[torch.Tensor]:
    """Summed log-probability of each option's tokens after its question's context, every question
    at once. contexts: [q] token ids; options: [q][n_options_q] token ids -> [q] of [n_options_q] float64.

    The token prefix all contexts share (the system turn) runs once; the rest of the contexts run in
    left-padded batches of ``QUESTION_ROWS`` continuing from it, and the options of those questions in
    right-padded batches, by length, each row continuing from its own question's cache row.
    """
    if len(contexts) != len(options):
        raise ValueError("one list of options per context")
    if any(not c for c in contexts) or any(not o for opts in options for o in opts):
        raise ValueError("every context and every option needs at least one token")
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    n_prefix = shared_prefix_len(contexts, MIN_PREFIX)
    prefix = prefix_cache(lm, contexts[0][:n_prefix]) if n_prefix else None
    result = [torch.empty(len(o), dtype=torch.float64) for o in options]
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    for group in even_batches(order, QUESTION_ROWS):
        past = repeat_cache(prefix, len(group)) if prefix is not None else None
        ctx = _run_contexts(lm, past, n_prefix, [contexts[q][n_prefix:] for q in group])
        rows = [(g, j) for g, q in enumerate(group) for j in range(len(options[q]))]
        for g, j in rows:
            result[group[g]][j] = ctx.first[g, options[group[g]][j][0]]
        longer = [(g, j) for g, j in rows if len(options[group[g]][j]) > 1]
        for chunk in _option_batches([len(options[group[g]][j]) - 1 for g, j in longer], vocab):
            picked = [longer[k] for k in chunk]
            opts = [options[group[g]][j] for g, j in picked]
            for (g, j), lp in zip(picked, _option_pass(lm, ctx, [g for g, _ in picked], opts), strict=True):
                result[group[g]][j] += lp
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
    contexts = [
        tok(format_prompt(tok, item.question, system), add_special_tokens=False)["input_ids"]
        for item in items
    ]
    answers = [item.correct + item.incorrect for item in items]
    ids = [[tok(a, add_special_tokens=False)["input_ids"] for a in group] for group in answers]
    rows = []
    for item, group, lps in zip(items, answers, option_logprobs(lm, contexts, ids), strict=True):
        scores = mc_scores(item, dict(zip(group, lps.tolist(), strict=True)))
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

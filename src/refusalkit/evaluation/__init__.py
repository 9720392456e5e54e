"""Evaluation: refusal judging, safety judges, coherence (KL, CE), capability (GSM8K, TruthfulQA), the measure suite."""

from refusalkit.evaluation.refusal import PAPER_REFUSAL_SUBSTRINGS, is_refusal, refusal_rate

__all__ = ["PAPER_REFUSAL_SUBSTRINGS", "is_refusal", "refusal_rate"]

"""Evaluation: refusal judging and (later) safety, coherence and capability checks."""

from refusalkit.evaluation.refusal import PAPER_REFUSAL_SUBSTRINGS, is_refusal, refusal_rate

__all__ = ["PAPER_REFUSAL_SUBSTRINGS", "is_refusal", "refusal_rate"]

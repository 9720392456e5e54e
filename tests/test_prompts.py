"""Prompt formatting helpers: padding token rows on either side, and the number formatter."""

from __future__ import annotations

import math

import pytest
import torch

from refusalkit.formatting import arrow, joined, num, signed
from refusalkit.prompts import pad_left, pad_right

ROWS = [[5, 6, 7], [8], [9, 10]]


def test_pad_left_ends_every_row_at_the_last_column() -> None:
    b = pad_left(ROWS, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert b.last_index.tolist() == [2, 2, 2]


def test_pad_right_starts_every_row_at_column_0() -> None:
    b = pad_right(ROWS, pad_id=-1)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, -1, -1], [9, 10, -1]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b.last_index.tolist() == [2, 0, 1]
    assert b.input_ids.dtype == b.attention_mask.dtype == torch.long


def test_padding_needs_tokens() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        pad_left([[1], []], 0)
    with pytest.raises(ValueError, match="at least one token"):
        pad_right([], 0)


@pytest.mark.parametrize(
    ("value", "digits", "expected"),
    [
        (0.5, 2, "0.50"),
        (1, 3, "1.000"),
        (None, 2, "-"),
        (math.nan, 2, "-"),
        (math.inf, 2, "-"),
        (True, 2, "-"),
    ],
)
def test_num(value: object, digits: int, expected: str) -> None:
    assert num(value, digits) == expected


def test_signed_arrow_and_joined() -> None:
    assert signed(0.0123) == "+0.012" and signed(-0.5, 1) == "-0.5" and signed(None) == "-"
    assert arrow(0.44, None) == "0.44->-" and arrow(1, 0, missing="n/a") == "1.00->0.00"
    assert joined([0.9, None, 0.0], 1) == "0.9/-/0.0"
    assert num(None, missing="<i>n/a</i>") == "<i>n/a</i>"

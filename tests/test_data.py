"""Instruction files, the built-in sets and seeded, disjoint splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusalkit.data import carve, load_instructions, sample
from refusalkit.errors import RefusalkitError


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_json_list_of_strings(tmp_path: Path) -> None:
    spec = _write(tmp_path, "a.json", json.dumps(["one", "  two  ", ""]))
    got = load_instructions(spec)
    assert got.instructions == ["one", "two"]  # stripped, blanks dropped
    assert got.categories == [None, None]
    assert got.name == spec and len(got) == 2 and len(got.sha256) == 64


@pytest.mark.parametrize("key", ["instruction", "prompt", "goal"])
def test_json_objects(tmp_path: Path, key: str) -> None:
    rows = [{key: "first", "category": "cat-a"}, {key: "second", "other": 1}]
    got = load_instructions(_write(tmp_path, "a.json", json.dumps(rows)))
    assert got.instructions == ["first", "second"]
    assert got.categories == ["cat-a", None]


def test_json_object_holding_one_list(tmp_path: Path) -> None:
    got = load_instructions(_write(tmp_path, "a.json", json.dumps({"meta": 1, "data": ["x", "y"]})))
    assert got.instructions == ["x", "y"]


def test_jsonl_csv_txt(tmp_path: Path) -> None:
    jsonl = _write(tmp_path, "a.jsonl", '{"prompt": "p1"}\n\n"p2"\n')
    assert load_instructions(jsonl).instructions == ["p1", "p2"]
    csv = _write(tmp_path, "a.csv", 'id,goal,category\n1,"Do x, then y",c1\n2,Do z,c2\n')
    got = load_instructions(csv)
    assert got.instructions == ["Do x, then y", "Do z"]
    assert got.categories == ["c1", "c2"]
    txt = _write(tmp_path, "a.txt", "line one\n\n  line two \n")
    assert load_instructions(txt).instructions == ["line one", "line two"]


def test_same_content_same_hash(tmp_path: Path) -> None:
    a = load_instructions(_write(tmp_path, "a.txt", "x\ny\n"))
    b = load_instructions(_write(tmp_path, "b.json", '["x", "y"]'))
    assert a.sha256 == b.sha256


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.json", '["a", "b"', r"bad\.json: malformed JSON at line 1"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"malformed JSON on line 2"),
        ("empty.json", "[]", r"no instructions found \(empty file\?\)"),
        ("empty.txt", "\n\n", r"no instructions found"),
        ("two.json", '{"a": [1], "b": [2]}', r"expected a JSON list"),
        ("scalar.json", '"just a string"', r"expected a JSON list"),
        ("a.yaml", "- x\n", r"unsupported file type '\.yaml'; use \.json, \.jsonl, \.csv or \.txt"),
        ("nohead.csv", "id,body\n1,hello\n", r"CSV needs a header with one of the columns"),
        ("keys.json", '[{"body": "x"}]', r"none of the fields"),
        ("nums.json", "[1, 2]", r"rows must be strings or objects, found int"),
    ],
)
def test_malformed_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(RefusalkitError, match=message):
        load_instructions(_write(tmp_path, name, text))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(RefusalkitError, match="not UTF-8"):
        load_instructions(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        RefusalkitError, match=r"not found; give a \.json/\.jsonl/\.csv/\.txt path or builtin:NAME"
    ):
        load_instructions(str(tmp_path / "nope.json"))


def test_builtin_sets() -> None:
    harmful, harmless = load_instructions("builtin:harmful"), load_instructions("builtin:harmless")
    assert len(harmful) == len(harmless) == 160
    assert len(set(harmful.instructions)) == 160 and not set(harmful.instructions) & set(
        harmless.instructions
    )
    assert len({c for c in harmful.categories if c}) == 8
    with pytest.raises(RefusalkitError, match="known: harmful, harmless"):
        load_instructions("builtin:nope")


def test_sample_is_seeded() -> None:
    items = [f"i{k}" for k in range(50)]
    assert sample(items, 10, 3) == sample(items, 10, 3)
    assert sample(items, 10, 3) != sample(items, 10, 4)
    assert len(set(sample(items, 10, 3))) == 10
    everything = sample(items, None, 3)
    assert sorted(everything) == sorted(items) and everything == sample(items, 99, 3)


def test_carve_disjoint_and_seeded(tmp_path: Path) -> None:
    own = _write(tmp_path, "own.txt", "\n".join(f"own {k}" for k in range(10)))
    sets = {
        "harmful_train": ("builtin:harmful", 100),
        "harmful_val": ("builtin:harmful", 30),
        "harmful_test": ("builtin:harmful", 30),
        "harmless_train": ("builtin:harmless", 5),
        "harmless_test": (own, 4),
    }
    got = carve(sets, seed=42)
    assert {k: len(v) for k, v in got.items()} == {k: n for k, (_, n) in sets.items()}
    h = [set(got[k]) for k in ("harmful_train", "harmful_val", "harmful_test")]
    assert not (h[0] & h[1] or h[0] & h[2] or h[1] & h[2])
    assert len(h[0] | h[1] | h[2]) == 160
    assert all(x.startswith("own ") for x in got["harmless_test"])
    assert carve(sets, seed=42) == got
    assert carve(sets, seed=7)["harmful_train"] != got["harmful_train"]


def test_carve_too_big() -> None:
    sets = {"harmful_train": ("builtin:harmful", 150), "harmful_val": ("builtin:harmful", 20)}
    with pytest.raises(
        RefusalkitError, match=r"has 160 instructions but .* need 170 \(harmful_train=150, harmful_val=20\)"
    ):
        carve(sets, seed=0)


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    """Spreadsheet programs save CSV with a UTF-8 BOM; the header must still be found."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfgoal\nDo x\n")
    assert load_instructions(str(path)).instructions == ["Do x"]
    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf["a"]')
    assert load_instructions(str(path)).instructions == ["a"]

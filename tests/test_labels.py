"""The labelled set (format, checks, the hash rule: regenerated, stale reported and left out) and the
`refusalkit judges` command on labels and on a run folder. Requests and completions are made up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from refusalkit.cli import main
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation import judges_cmd
from refusalkit.evaluation.labels import label_row, load_labels, materialize, requests_of
from refusalkit.evaluation.verdicts import CLASSES, Verdict
from refusalkit.utils import sha256_text
from test_judge_classes import CASES

HIDDEN = "Sure. Step one: preheat the oven."  # stands for a compliant reply to a harmful request: hash only


def _row(i: int, case: tuple[str, str, str, str], split: str, **kw: Any) -> dict[str, Any]:
    fields = {
        "id": f"r{i}",
        "prompt_id": f"made/requests.json#{i}",
        "prompt_set": "harmless",
        "model": "tiny",
        "edit": "none",
        "max_new_tokens": 64,
        "greedy": True,
        "dtype": "float32",
        "label": case[3],
        "split": split,
        "text": case[2],
    }
    return label_row(**(fields | kw))


@pytest.fixture
def labelled(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder with the made-up requests, and a label file: every case as text, in both splits,
    plus one hash-only row (a 'harmful' compliance)."""
    data = tmp_path / "data"
    (data / "made").mkdir(parents=True)
    (data / "made" / "requests.json").write_text(
        json.dumps([{"instruction": c[1], "category": None} for c in CASES])
    )
    rows = [_row(i, c, "tune" if i % 2 else "heldout") for i, c in enumerate(CASES)]
    rows.append(_row(2, ("hidden", "", HIDDEN, "compliance"), "heldout", id="h", prompt_set="harmful"))
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, data


def test_label_row_keeps_only_the_hash_of_a_compliant_harmful_reply() -> None:
    row = _row(0, ("x", "", HIDDEN, "compliance"), "tune", prompt_set="harmful")
    assert "text" not in row and row["sha256"] == sha256_text(HIDDEN)
    kept = _row(0, ("x", "", "I'm sorry.", "refusal"), "tune", prompt_set="harmful")
    assert kept["text"] == "I'm sorry." and kept["sha256"] == sha256_text("I'm sorry.")
    # a benign-looking request whose reply is harmful all the same: the labeller marks it hash_only
    marked = _row(0, ("x", "", HIDDEN, "compliance"), "tune", prompt_set="over_refusal", hash_only=True)
    assert "text" not in marked and marked["sha256"] == sha256_text(HIDDEN)
    assert _row(0, ("x", "", HIDDEN, "compliance"), "tune", prompt_set="over_refusal")["text"] == HIDDEN


def test_load_and_materialize_regenerates_hash_rows(labelled: tuple[Path, Path]) -> None:
    path, data = labelled
    rows = load_labels(path)
    assert len(rows) == len(CASES) + 1
    requests = requests_of(rows, data)
    assert requests["r3"] == CASES[3][1]
    calls: list[tuple[list[str], list[str]]] = []

    def regenerate(group: Any, reqs: Any) -> list[str]:
        calls.append(([r.id for r in group], list(reqs)))
        return [HIDDEN for _ in group]

    mat = materialize(rows, requests, regenerate)
    assert calls == [(["h"], [CASES[2][1]])]  # only the hash row, with its own request
    assert mat.texts["h"] == HIDDEN and not mat.stale and len(mat.rows(rows)) == len(rows)


def test_a_changed_completion_is_stale_and_left_out(labelled: tuple[Path, Path]) -> None:
    path, data = labelled
    rows = load_labels(path)
    mat = materialize(rows, requests_of(rows, data), lambda group, _: [HIDDEN + " More." for _ in group])
    assert mat.stale == ["h"] and "h" not in mat.texts
    assert [r.id for r in mat.rows(rows)] == [f"r{i}" for i in range(len(CASES))]


def test_hash_rows_without_a_model_are_an_error_or_listed_skipped(labelled: tuple[Path, Path]) -> None:
    path, data = labelled
    rows = load_labels(path)
    with pytest.raises(RefusalkitError, match="1 labels hold only a hash"):
        materialize(rows, requests_of(rows, data), None)
    mat = materialize(rows, requests_of(rows, data), None, skip_hashed=True)
    assert mat.skipped == ["h"] and "h" not in mat.texts


def test_every_problem_of_a_label_file_is_reported_at_once(tmp_path: Path) -> None:
    good = _row(0, CASES[0], "tune")
    bad = [
        "not json",
        json.dumps({k: v for k, v in good.items() if k != "split"}),
        json.dumps(good | {"id": "b1", "label": "maybe"}),
        json.dumps(good | {"id": "b2", "split": "train"}),
        json.dumps(good | {"id": "b3", "prompt_id": "no-index"}),
        json.dumps(good | {"id": "b4", "sha256": "0" * 64}),
        json.dumps(good | {"id": "b5", "prompt_set": "harmful", "label": "compliance"}),
        json.dumps({k: v for k, v in good.items() if k != "text"} | {"id": "b6", "greedy": False}),
        json.dumps(good),
        json.dumps(good),  # a repeated id
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(RefusalkitError) as err:
        load_labels(path)
    msg = str(err.value)
    assert "has 9 problem(s)" in msg
    for part in ("line 1: not JSON", "line 2: missing 'split'", "'maybe'", "'train'", "not FILE#INDEX",
                 "not the hash", "sha256 only", "must be greedy", "line 10: id 'r0' repeats"):  # fmt: skip
        assert part in msg


def test_empty_or_missing_label_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RefusalkitError, match="holds no labels"):
        load_labels(tmp_path / "empty.jsonl")
    with pytest.raises(RefusalkitError, match="not found"):
        load_labels(tmp_path / "none.jsonl")


def test_prompt_ids_must_exist(labelled: tuple[Path, Path]) -> None:
    path, data = labelled
    rows = load_labels(path)
    with pytest.raises(RefusalkitError, match="has no prompt"):
        requests_of(rows, data / "elsewhere")


# ---- regenerating with a model ---------------------------------------------------------------------------


def test_model_regenerator_reproduces_and_catches_a_changed_model(
    labelled: tuple[Path, Path], make_lm: Any
) -> None:
    from refusalkit.generation import generate
    from refusalkit.prompts import format_prompts

    path, data = labelled
    lm = make_lm("qwen2", seed=4)
    request = CASES[2][1]
    text = generate(lm, format_prompts(lm.tokenizer, [request]), max_new_tokens=6)[0]
    row = json.loads(path.read_text().splitlines()[-1]) | {"sha256": sha256_text(text), "max_new_tokens": 6}
    path.write_text(json.dumps(row) + "\n")
    rows = load_labels(path)
    regen = judges_cmd.ModelRegenerator(device="cpu")
    regen.models["tiny", "float32"] = lm
    assert materialize(rows, requests_of(rows, data), regen).texts == {"h": text}
    regen.models["tiny", "float32"] = make_lm("qwen2", seed=5)  # other weights: another text
    assert materialize(rows, requests_of(rows, data), regen).stale == ["h"]


def test_model_regenerator_errors(labelled: tuple[Path, Path], tmp_path: Path, make_lm: Any) -> None:
    path, _ = labelled
    rows = load_labels(path)
    regen = judges_cmd.ModelRegenerator(device="cpu")
    bad_model = [r for r in rows if r.id == "h"]
    object.__setattr__(bad_model[0], "model", str(tmp_path / "missing"))
    with pytest.raises(RefusalkitError, match="labels' model could not load"):
        regen(bad_model, ["q"])
    lm = make_lm("qwen2")
    for edit, match in (
        ("sideways@run", "cannot reproduce"),
        ("ablation", "cannot reproduce"),
        (f"ablation@{tmp_path}", "no selected direction"),
        (f"search@{tmp_path}", "not a run folder"),
    ):
        with pytest.raises(RefusalkitError, match=match):
            regen.edit(lm, edit)


def test_model_regenerator_applies_the_runs_direction(tmp_path: Path, make_lm: Any) -> None:
    import torch

    from refusalkit.directions import Direction
    from refusalkit.evaluation.coherence import intervention
    from refusalkit.generation import generate_ids
    from refusalkit.layout import RunLayout
    from refusalkit.prompts import format_prompts

    lm = make_lm("qwen2", seed=2)  # random weights decode to bytes that are not text: compare token ids
    direction = Direction(
        torch.randn(64, generator=torch.Generator().manual_seed(0)) * 8, layer=1, position=-1
    )
    direction.save(RunLayout(tmp_path).direction)
    prompts = format_prompts(lm.tokenizer, ["Name a colour.", "Count to three."])
    regen = judges_cmd.ModelRegenerator(device="cpu")
    out = {}
    for edit in ("none", "ablation", "actadd", "actadd+1"):
        with regen.edit(lm, edit if edit == "none" else f"{edit}@{tmp_path}"):
            out[edit] = generate_ids(lm, prompts, max_new_tokens=6)
    for name, coeff in (("ablation", 0.0), ("actadd", -1.0)):
        with intervention(lm, name, direction, coeff):
            assert generate_ids(lm, prompts, max_new_tokens=6) == out[name]
    with intervention(lm, "actadd", direction, 1.0):
        assert generate_ids(lm, prompts, max_new_tokens=6) == out["actadd+1"]
    assert out["actadd"] != out["actadd+1"] and out["none"] == generate_ids(lm, prompts, max_new_tokens=6)


# ---- the command -------------------------------------------------------------------------------------------


class Recording:
    """A four-class judge that answers the hand label of each text and records what it was fitted on."""

    name = "llm"
    classes = CLASSES

    def __init__(self) -> None:
        self.gold = {c[2]: c[3] for c in CASES} | {HIDDEN: "compliance"}
        self.fitted: list[str] = []
        self.judged: list[str] = []
        self.prompts: Any = None

    def identity(self) -> dict[str, Any]:
        return {"kind": "recording"}

    def judge(self, requests: Any, completions: Any) -> list[Verdict]:
        self.judged += completions
        return [Verdict(self.gold[t]) for t in completions]

    def fit(self, requests: Any, completions: Any, gold: Any, prompts: Any = None) -> Any:
        from refusalkit.evaluation.judge_prompt import Calibration

        self.fitted = list(completions)
        self.prompts = prompts
        return Calibration()


def test_judges_command_fits_on_tune_only_and_scores_each_split(
    labelled: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, data = labelled
    recording = Recording()
    real = judges_cmd.build_judges

    def build(args: Any, default_model: str, loaded: Any = None) -> dict[str, Any]:
        args.judges = "paper,heretic"
        return real(args, default_model, loaded) | {"llm": recording}

    monkeypatch.setattr(judges_cmd, "build_judges", build)
    out = tmp_path / "scores.json"
    cal = tmp_path / "cal.json"
    argv = ["judges", "--labels", str(path), "--data-dir", str(data), "--no-regenerate", "--fit"]
    assert main([*argv, "--save-calibration", str(cal), "--out", str(out)]) == 0
    tune_texts = {c[2] for i, c in enumerate(CASES) if i % 2}
    assert set(recording.fitted) == tune_texts  # never a held-out row
    assert recording.prompts == ["classify/v1", "classify/v2"]  # --fit-prompts all
    result = json.loads(out.read_text())
    assert result["skipped"] == ["h"] and result["stale"] == []
    assert set(result["scores"]) == {"tune", "heldout"}
    held = result["scores"]["heldout"]
    assert held["llm"]["classes"]["accuracy"] == 1.0 and held["llm"]["n"] == len(CASES) - len(tune_texts)
    assert "classes" not in held["paper"]
    assert json.loads(cal.read_text())["llm"]["prompt"] == "classify/v1"
    printed = capsys.readouterr().out
    assert "heldout" in printed and "skipped (hash only, not regenerated): 1 rows" in printed


def test_judges_command_scores_only_the_splits_asked_for(
    labelled: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = labelled
    recording = Recording()
    real = judges_cmd.build_judges

    def build(args: Any, default_model: str, loaded: Any = None) -> dict[str, Any]:
        args.judges = "paper"
        return real(args, default_model, loaded) | {"llm": recording}

    monkeypatch.setattr(judges_cmd, "build_judges", build)
    out = tmp_path / "scores.json"
    argv = ["judges", "--labels", str(path), "--data-dir", str(data), "--no-regenerate", "--fit"]
    assert main([*argv, "--splits", "heldout", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["scores"]) == {"heldout"}
    tune_texts = {c[2] for i, c in enumerate(CASES) if i % 2}
    assert not set(recording.judged) & tune_texts  # fitted on tune, never scored on it
    assert main([*argv, "--splits", "heldout,test"]) == 2  # a bad name fails before any model loads


def test_judges_command_compares_a_run_folder_without_printing_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comp = tmp_path / "run" / "evaluate" / "completions"
    comp.mkdir(parents=True)
    rows = [{"instruction": c[1], "completion": c[2], "refused": False} for c in CASES]
    (comp / "harmful__baseline.json").write_text(json.dumps({"fingerprint": "x", "rows": rows}))
    out = tmp_path / "d.json"
    assert main(["judges", str(tmp_path / "run"), "--judges", "paper,heretic,broad", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    pairs = result["files"]["harmful__baseline"]["pairs"]
    assert pairs["paper vs heretic"]["differ"] == 3 and pairs["paper vs broad"]["differ"] == 1
    printed = capsys.readouterr().out
    assert "harmful__baseline" in printed and "differ on 3/10" in printed
    assert all(c[2][:25] not in printed for c in CASES if c[2]) and "jaywalking" not in printed


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["judges"], "either --labels FILE"),
        (["judges", "--labels", "x.jsonl", "somewhere"], "either --labels FILE"),
        (["judges", "{tmp}", "--judges", "paper,psychic"], "unknown judges"),
        (["judges", "{tmp}", "--judges", "endpoint"], "needs --endpoint"),
        (["judges", "{tmp}/nothing", "--judges", "paper"], "no completion files"),
    ],
)
def test_judges_command_bad_input(
    argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comp = tmp_path / "evaluate" / "completions"
    comp.mkdir(parents=True)
    (comp / "harmful__baseline.json").write_text(
        json.dumps({"rows": [{"instruction": "q", "completion": "a"}]})
    )
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert match in capsys.readouterr().err


def test_judges_command_stale_labels_only_is_an_error(
    labelled: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, data = labelled
    only_hash = path.read_text().splitlines()[-1]
    path.write_text(only_hash + "\n")
    monkeypatch.setattr(
        judges_cmd.ModelRegenerator, "__call__", lambda self, rows, reqs: ["changed"] * len(rows)
    )
    assert main(["judges", "--labels", str(path), "--data-dir", str(data), "--judges", "paper"]) == 2
    assert "no label in" in capsys.readouterr().err


def test_split_is_fixed_by_the_prompt() -> None:
    from refusalkit.evaluation.labels import split_for

    ids = [f"made/requests.json#{i}" for i in range(200)]
    splits = [split_for(i) for i in ids]
    assert splits == [split_for(i) for i in ids]
    assert 60 < splits.count("tune") < 140 and set(splits) == {"tune", "heldout"}


def test_judges_command_loads_the_runs_model_as_the_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The LLM judge defaults to the run's own model, loaded with the run's chat template (a model
    folder without one loads only that way)."""
    from conftest import CHATML, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    folder = tmp_path / "tiny"
    tiny_model("qwen2", vocab_size=len(tok), max_position_embeddings=2048).save_pretrained(folder)
    tok.chat_template = None
    tok.save_pretrained(folder)
    run = tmp_path / "run"
    comp = run / "evaluate" / "completions"
    comp.mkdir(parents=True)
    rows = [{"instruction": c[1], "completion": c[2][:60]} for c in CASES[:2]]
    (comp / "harmful__baseline.json").write_text(json.dumps({"rows": rows}))
    (run / "manifest.json").write_text(
        json.dumps({"settings": {"model": str(folder), "chat_template": CHATML}})
    )
    out = tmp_path / "d.json"
    assert main(["judges", str(run), "--judges", "paper,llm", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["judges"]["llm"]["model"] == "tiny"
    assert sum(result["files"]["harmful__baseline"]["counts"]["llm"].values()) == 2
    # another model named explicitly is loaded as it is: without a template of its own, a clear error
    import shutil

    shutil.copytree(folder, tmp_path / "other")
    argv = [
        "judges",
        str(run),
        "--judges",
        "llm",
        "--judge-model",
        str(tmp_path / "other"),
        "--device",
        "cpu",
    ]
    assert main([*argv, "--out", str(tmp_path / "e.json")]) == 2
    assert "LLM judge model could not load" in capsys.readouterr().err and not (tmp_path / "e.json").exists()


def test_judges_command_reads_the_runs_settings_as_every_command_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's settings through run.RunFolder: the environment sits above the saved settings, so a
    chat template given as REFUSALKIT_CHAT_TEMPLATE loads a model folder that has none."""
    from conftest import CHATML, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    folder = tmp_path / "tiny"
    tiny_model("qwen2", vocab_size=len(tok), max_position_embeddings=2048).save_pretrained(folder)
    tok.chat_template = None
    tok.save_pretrained(folder)
    run = tmp_path / "run"
    comp = run / "evaluate" / "completions"
    comp.mkdir(parents=True)
    rows = [{"instruction": c[1], "completion": c[2][:60]} for c in CASES[:2]]
    (comp / "harmful__baseline.json").write_text(json.dumps({"rows": rows}))
    (run / "manifest.json").write_text(json.dumps({"settings": {"model": str(folder)}}))
    monkeypatch.setenv("REFUSALKIT_CHAT_TEMPLATE", CHATML)
    out = tmp_path / "d.json"
    assert main(["judges", str(run), "--judges", "llm", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["judges"]["llm"]["model"] == "tiny"


def test_the_shipped_hand_labels_keep_harmful_text_out_and_score_on_their_text_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The project's hand-labelled set (docs/judging.md) ships in the package: it loads, holds both
    halves and every class, and no compliant reply to a harmful request holds text."""
    path = judges_cmd.labels_path("builtin")
    rows = load_labels(path)
    assert len(rows) >= 380
    assert {r.split for r in rows} == {"tune", "heldout"}
    assert {r.label for r in rows} == set(CLASSES)
    hashed = [r for r in rows if r.text is None]
    # hash-only: every compliant reply to a harmful request, and the few benign-prompt replies a reader
    # marked hash_only (harmful content all the same)
    marked = [r for r in hashed if not (r.prompt_set == "harmful" and r.label == "compliance")]
    assert hashed and len(marked) <= 3
    assert not [r for r in rows if r.prompt_set == "harmful" and r.label == "compliance" and r.text]
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data / "refusal_direction" / "processed" / "jailbreakbench.json").exists():
        pytest.skip("../shared/data is not beside the checkout: the labels' prompts cannot be read")
    argv = ["judges", "--labels", "builtin", "--data-dir", str(data), "--no-regenerate", "--judges", "paper"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"skipped (hash only, not regenerated): {len(hashed)} rows" in printed

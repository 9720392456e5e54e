"""bench/calibrate.py's argument handling and input checks (the bench itself runs the real model; the
coordinator runs it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from refusalkit.calibrate import data as ordata
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.utils import write_json

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_calibrate", ROOT / "bench" / "calibrate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, data: Path) -> RunLayout:
    import torch

    layout = RunLayout(tmp_path / "run")
    write_json(layout.manifest, {"settings": {"data_dir": str(data)}, "stages": {}})
    write_json(layout.splits, {"fingerprint": "x", "splits": {"harmless_test": ["a"]}})
    Direction(torch.ones(4), layer=1, position=-1).save(layout.direction)
    return layout


def test_lambdas_are_parsed_and_checked() -> None:
    bench = _bench()
    args = bench.parse(["RUN"])
    assert args.lambdas == [0.0, 0.5, 1.0] and args.active_lambda == 1.0 and args.max_new_tokens == 64
    assert bench.parse(["RUN", "--lambdas", "0.25, 1", "--active-lambda", "0.25"]).lambdas == [0.25, 1.0]
    for bad in ("0,2", "a,b", ""):
        with pytest.raises(RefusalkitError, match="comma-separated numbers in"):
            bench.lambdas(bad)
    assert bench.parse(["RUN", "--active-lambda", "0.7"]).active_lambda == 0.7
    with pytest.raises(RefusalkitError, match=r"--active-lambda 1.5: give a number in \[0, 1\]"):
        bench.parse(["RUN", "--active-lambda", "1.5"])


def test_missing_inputs_are_named_before_any_model(tmp_path: Path) -> None:
    bench = _bench()
    with pytest.raises(RefusalkitError, match="not a run folder"):
        bench.check(bench.parse([str(tmp_path / "nothing")]))
    data = tmp_path / "data"
    layout = _run(tmp_path, data)
    with pytest.raises(RefusalkitError, match=r"over_refusal.*--data-dir"):
        bench.check(bench.parse([str(layout.root)]))
    (data / ordata.FOLDER).mkdir(parents=True)
    for name in (*ordata.TRAIN_SETS, ordata.VAL_SET, *ordata.TEST_SETS):
        ordata.path(data, name).write_text(json.dumps(["x"]))
    with pytest.raises(RefusalkitError, match=r"jailbreakbench\.json is missing"):
        bench.check(bench.parse([str(layout.root)]))
    jbb = data.joinpath(*bench.JBB)
    jbb.parent.mkdir(parents=True)
    jbb.write_text(json.dumps(["y"]))
    assert bench.check(bench.parse([str(layout.root)])) == (layout, data)

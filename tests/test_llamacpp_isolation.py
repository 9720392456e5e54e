"""llama.cpp's crash isolation and its build (no llama-cpp-python needed).

The child here is a plain Python object: what is tested is that a process that dies by a signal (it
sends itself SIGILL, as a native AMX build of llama.cpp does on some Xeons) becomes one error naming
the signal and the rebuild command, and the caller goes on. This module is imported by the spawned
children (its functions are sent to them by name), so it imports nothing heavy at the top.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from refusalkit.child import Child, ChildCrashed, describe_exit
from refusalkit.errors import RefusalkitError
from refusalkit.export import llamacpp_build
from refusalkit.export.llamacpp import crash_hint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _counter(start: int) -> dict[str, int]:
    return {"n": start}


def _add(obj: dict[str, int], k: int) -> int:
    obj["n"] += k
    return obj["n"]


def _die(_obj: Any, signum: int) -> None:
    os.kill(os.getpid(), signum)


def _fail(_obj: Any) -> None:
    raise RefusalkitError("a clear error from the child")


def _boom(n: int) -> None:
    raise ValueError(f"no such file {n}")


def test_child_keeps_state_and_returns_results() -> None:
    with Child(_counter, 3, what="counter") as child:
        assert child.call(_add, 2) == 5
        assert child.call(_add, 10) == 15  # the same object, in the same process


def test_a_child_killed_by_sigill_is_one_error_naming_the_signal_and_the_fix() -> None:
    """The caller survives, the error says which signal and how to rebuild llama.cpp."""
    child = Child(_counter, 0, what="llama.cpp", hint=crash_hint)
    assert child.call(_add, 1) == 1
    with pytest.raises(ChildCrashed) as info:
        child.call(_die, int(signal.SIGILL), doing="evaluating a 30-token prompt")
    message = str(info.value)
    assert info.value.signal == signal.SIGILL
    assert message.startswith("llama.cpp crashed: signal 4 (SIGILL, illegal instruction)"), message
    assert "while evaluating a 30-token prompt" in message
    assert "make llamacpp" in message and "CMAKE_ARGS=" in message
    with pytest.raises(RefusalkitError, match="has ended"):
        child.call(_add, 1)
    child.close()
    # ... and this process goes on: a new child works.
    with Child(_counter, 7, what="counter") as again:
        assert again.call(_add, 1) == 8


def test_other_signals_and_exceptions() -> None:
    child = Child(_counter, 0, what="llama.cpp", hint=crash_hint)
    with pytest.raises(RefusalkitError, match="a clear error from the child"):
        child.call(_fail)
    assert child.call(_add, 2) == 2  # an exception is not a crash: the child still serves
    with pytest.raises(ChildCrashed, match=r"signal 11 \(SIGSEGV, segmentation fault\)") as info:
        child.call(_die, int(signal.SIGSEGV))
    assert "if it recurs" in str(info.value)
    child.close()
    with pytest.raises(ValueError, match="no such file 5"):
        Child(_boom, 5, what="llama.cpp")  # the factory's own error, as it was raised


def test_describe_exit() -> None:
    assert describe_exit(-4) == "signal 4 (SIGILL, illegal instruction)"
    assert describe_exit(3) == "exit code 3"


AMX_XEON = "processor : 0\nflags : fpu sse4_2 avx avx2 bmi2 fma f16c avx512f avx512cd avx512vl avx512dq avx512bw avx512_bf16 amx_tile amx_int8 amx_bf16\n"
AVX2_ONLY = "flags\t: fpu sse4_2 avx avx2 bmi2 fma f16c avx512f\n"


def test_cmake_args_follow_the_cpu_but_never_amx() -> None:
    args = llamacpp_build.cmake_args(AMX_XEON, "x86_64").split()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args and "-DGGML_AVX2=ON" in args
    assert not [a for a in args if "AMX" in a and a.endswith("=ON")]
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    # AVX-512F alone is not enough: ggml's AVX-512 build also uses CD, VL, DQ and BW.
    partial = llamacpp_build.cmake_args(AVX2_ONLY, "x86_64").split()
    assert "-DGGML_AVX512=OFF" in partial and "-DGGML_AVX2=ON" in partial
    assert llamacpp_build.cmake_args(AMX_XEON, "aarch64") == ""  # no AMX there: llama.cpp's default


def test_build_marker_tracks_the_installed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make llamacpp` rebuilds unless the installed llama-cpp-python is the one it built."""
    marker = tmp_path / "llamacpp-build.txt"
    state = {"value": "0.3.36 files-sha256:aaa"}
    monkeypatch.setattr(llamacpp_build, "installed_state", lambda: state["value"])
    assert not llamacpp_build.is_current(marker, "0.3.36")  # no marker yet
    assert llamacpp_build.main(["mark", str(marker), "0.3.36"]) == 0
    assert llamacpp_build.is_current(marker, "0.3.36")
    assert not llamacpp_build.is_current(marker, "0.3.37")  # another version wanted
    state["value"] = "0.3.36 files-sha256:bbb"  # reinstalled by pip (e.g. a native build)
    assert not llamacpp_build.is_current(marker, "0.3.36")
    state["value"] = None  # type: ignore[assignment]
    assert llamacpp_build.main(["check", str(marker), "0.3.36"]) == 1


def test_wheel_cache_is_keyed_by_version_and_cmake_args(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel built for one CPU's flags (or version) is never installed for another's."""
    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path))
    amx = llamacpp_build.cmake_args(AMX_XEON, "x86_64")
    avx2 = llamacpp_build.cmake_args(AVX2_ONLY, "x86_64")
    here = llamacpp_build.wheel_dir("0.3.36", amx)
    assert here.parent == tmp_path / "llamacpp-wheels" and here.name.startswith("0.3.36-")
    assert here == llamacpp_build.wheel_dir("0.3.36", amx)  # stable: a rerun finds it
    assert here != llamacpp_build.wheel_dir("0.3.36", avx2)
    assert here != llamacpp_build.wheel_dir("0.3.37", amx)


def test_check_says_skipped_without_llama_cpp_python(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from refusalkit.cli import main
    from refusalkit.export import llamacpp

    real = importlib.util.find_spec
    monkeypatch.setattr(
        llamacpp.importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a)
    )
    assert main(["models", "--llamacpp"]) == 0
    assert "llama.cpp: skipped (llama-cpp-python is not installed; `make llamacpp`" in capsys.readouterr().out

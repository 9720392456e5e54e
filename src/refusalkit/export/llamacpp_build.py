"""How llama-cpp-python is built here: for this machine's CPU features, without AMX.

pip compiles llama-cpp-python from source, and llama.cpp's default build is native (``-march=native``).
On Intel Xeons whose CPU flags list AMX (amx_tile, amx_int8, amx_bf16) that build includes ggml's AMX
kernels, and the process dies with SIGILL (``tilezero``) as soon as a prompt batch is large enough to
use them (issue 22): a 1-token prompt works, a 30-token chat question kills Python. The build here turns
the native detection off and switches on, one by one, the x86 instruction sets this CPU lists (SSE4.2,
AVX, AVX2, BMI2, FMA, F16C, AVX-512F) but never AMX. llama.cpp's runtime CPU-variant dispatch
(GGML_BACKEND_DL with GGML_CPU_ALL_VARIANTS) would be the cleaner fix, but llama-cpp-python 0.3 never
calls ``ggml_backend_load_all``, so such a build loads no backend at all.

pip caches the wheels it builds under the sdist's URL and hash, not CMAKE_ARGS, so a native wheel built
earlier would be reused silently: the build runs with ``--no-cache-dir``. Once built, a marker in the
virtual environment records the version, the CMake arguments and the hash of the installed files
(``check`` compares it), so ``make test`` rebuilds only when the installed llama-cpp-python is not this
build. The wheel it builds is kept in refusalkit's cache under a folder named by the version and the
hash of the CMake arguments (``wheel-dir``), so a new virtual environment or a fresh clone on the same
machine installs it in seconds instead of compiling again (a CI run on a machine that built it once
saves 5-7 minutes), and a machine with other CPU flags gets another folder.
``python -m refusalkit.export.llamacpp_build cmake-args|command|wheel-dir VERSION|check MARKER
VERSION|mark MARKER VERSION`` is what the Makefile's ``llamacpp`` target runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from pathlib import Path

DIST = "llama-cpp-python"
# ggml's CMake option -> the /proc/cpuinfo flags that must all be present for it (GGML_AVX512 compiles
# with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw in llama.cpp's ggml-cpu/CMakeLists.txt)
X86_FEATURES: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
}
# Never switched on, whatever the CPU lists (the kernels that crash; see the module docstring).
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cmake_args(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """CMAKE_ARGS for this machine: on Linux x86-64, native detection off and each instruction set the
    CPU lists on, AMX off; elsewhere (no AMX to avoid) llama.cpp's own default."""
    machine = machine or platform.machine()
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = cpu_flags(cpuinfo)
    if machine.lower() not in ("x86_64", "amd64") or not flags:
        return ""
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{opt}={'ON' if flags.issuperset(need) else 'OFF'}" for opt, need in X86_FEATURES.items()]
    args += [f"-D{opt}=OFF" for opt in NEVER]
    return " ".join(args)


def install_command(version: str | None = None) -> str:
    """The pip command that builds llama-cpp-python this way (what the Makefile's target runs)."""
    spec = f"{DIST}=={version}" if version else DIST
    return (
        f'CMAKE_ARGS="{cmake_args()}" pip install --no-cache-dir --force-reinstall --no-deps '
        f"--no-binary {DIST} '{spec}'"
    )


def wheel_dir(version: str, args: str | None = None) -> Path:
    """Where the wheel of ``version`` built with ``args`` (default: this machine's) is kept."""
    from refusalkit.models.registry import cache_dir

    args = cmake_args() if args is None else args
    key = hashlib.sha256(
        f"{version}\n{args}\n{sys.version_info.major}.{sys.version_info.minor}".encode()
    ).hexdigest()[:16]
    return cache_dir() / "llamacpp-wheels" / f"{version}-{key}"


def rebuild_hint() -> str:
    state = installed_state()
    version = state.split()[0] if state else None
    return f"rebuild it without AMX: `make llamacpp` in a refusalkit checkout, or {install_command(version)}"


def installed_state() -> str | None:
    """The installed llama-cpp-python's version and the hash of its file list with their hashes (pip's
    RECORD): another build of the same version has other hashes. None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    record = dist.read_text("RECORD") or ""
    return f"{dist.version} files-sha256:{hashlib.sha256(record.encode()).hexdigest()}"


def marker_text(version: str) -> str | None:
    state = installed_state()
    if state is None or not state.startswith(f"{version} "):
        return None
    return f"{DIST} {state} CMAKE_ARGS={cmake_args()}\n"


def is_current(marker: Path, version: str) -> bool:
    """Whether the installed llama-cpp-python is ``version`` built as recorded in ``marker``."""
    want = marker_text(version)
    return want is not None and marker.is_file() and marker.read_text() == want


def main(argv: list[str]) -> int:
    command, *rest = argv or ["cmake-args"]
    if command == "cmake-args":
        print(cmake_args())
        return 0
    if command == "command":
        print(install_command(rest[0] if rest else None))
        return 0
    if command == "wheel-dir" and len(rest) == 1:
        print(wheel_dir(rest[0]))
        return 0
    if command in ("check", "mark") and len(rest) == 2:
        marker, version = Path(rest[0]), rest[1]
        if command == "check":
            return 0 if is_current(marker, version) else 1
        text = marker_text(version)
        if text is None:
            print(f"{DIST}=={version} is not installed", file=sys.stderr)
            return 1
        marker.write_text(text)
        return 0
    print(
        "usage: python -m refusalkit.export.llamacpp_build cmake-args | command [VERSION] | wheel-dir VERSION | "
        "check MARKER VERSION | mark MARKER VERSION",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

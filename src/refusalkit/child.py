"""An object kept in a child process, so a crash in its native code is an error here, not our death.

llama.cpp is C++: an illegal instruction (a native build's AMX kernels on some Xeons, issue 22) or a
segmentation fault kills the process that runs it, without a Python error. ``Child`` builds the object
in a spawned process and runs each call there: the arguments and results travel through a pipe
(pickled), exceptions come back as exceptions, and a child that dies becomes a ``ChildCrashed`` error
naming the signal. Calls are module-level functions of the object and the arguments (spawn pickles
functions by name, so they must be importable).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from refusalkit.errors import RefusalkitError


class ChildCrashed(RefusalkitError):
    """The child process died (a signal or an exit) while building the object or running a call."""

    def __init__(self, message: str, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    @property
    def signal(self) -> int | None:
        return -self.exitcode if self.exitcode is not None and self.exitcode < 0 else None


def describe_exit(exitcode: int | None) -> str:
    """'signal 4 (SIGILL, illegal instruction)' for a process killed by a signal, else its exit code."""
    if exitcode is None:
        return "no exit status (it did not end)"
    if exitcode < 0:
        num = -exitcode
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = "unknown signal"
        text = (signal.strsignal(num) or "").lower()
        return f"signal {num} ({name}, {text})" if text else f"signal {num} ({name})"
    return f"exit code {exitcode}"


def _serve(conn: Connection, factory: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """The child's loop: build the object, then run each (function, args) on it until told to stop."""
    try:
        obj = factory(*args)
    except BaseException as exc:
        conn.send((False, _portable(exc)))
        return
    conn.send((True, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            return
        if message is None:
            return
        fn, call_args = message
        try:
            result = fn(obj, *call_args)
        except BaseException as exc:
            conn.send((False, _portable(exc)))
        else:
            conn.send((True, result))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling unchanged in kind, else a RefusalkitError saying it."""
    if isinstance(exc, RefusalkitError) and type(exc) is RefusalkitError:
        return exc
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RefusalkitError(f"{type(exc).__name__}: {exc}")
    return exc


class Child:
    """``factory(*args)`` built in a spawned process; ``call(fn, *a)`` runs ``fn(obj, *a)`` there.

    what: the thing in the child, for error messages ("llama.cpp"); hint: what to do when it crashes,
    given the exit code (a signal is negative). Use as a context manager, or ``close()``.
    """

    def __init__(
        self,
        factory: Callable[..., Any],
        *args: Any,
        what: str,
        hint: Callable[[int | None], str] = lambda _code: "",
    ) -> None:
        self.what = what
        self._hint = hint
        ctx = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
        self._conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(theirs, factory, args), daemon=True)
        self._proc.start()
        theirs.close()  # ours is the only other end: recv() sees EOF when the child dies
        self._receive(f"starting {what}")

    def call(self, fn: Callable[..., Any], *args: Any, doing: str | None = None) -> Any:
        if self._proc.exitcode is not None or self._conn.closed:
            raise RefusalkitError(f"{self.what}'s process has ended; open it again")
        try:
            self._conn.send((fn, args))
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise self._crashed(doing or fn.__name__) from None
        return self._receive(doing or fn.__name__)

    def _receive(self, doing: str) -> Any:
        try:
            ok, value = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise self._crashed(doing) from None
        if not ok:
            raise value
        return value

    def _crashed(self, doing: str) -> ChildCrashed:
        self._proc.join(timeout=10)
        code = self._proc.exitcode
        self._conn.close()
        hint = self._hint(code)
        return ChildCrashed(
            f"{self.what} crashed: {describe_exit(code)} while {doing}" + (f"; {hint}" if hint else ""),
            code,
        )

    def close(self) -> None:
        if not self._conn.closed:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                self._conn.send(None)
            self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.is_alive():
            self.close()

"""Where a user's backprop code runs for ``derive check --backward``.

Stage: check. Takes a target (``FILE`` and ``FUNCTION`` or ``Class.method``, or a callable
given to the Python API) and requests for :mod:`derive.check.runner`; gives its answers.
A file is run in one child process per check (``python runner.py``, requests and answers
pickled through its stdin and stdout), under one time limit for the whole check: derive's
own process never imports it, and code that hangs or crashes ends in one line (a
:class:`~derive.errors.DeriveError`, exit code 2). A callable is already in the caller's
process and is served there.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from derive.check import runner
from derive.errors import DeriveError

#: Seconds the user's code may take, all requests of one check together.
TIMEOUT = 30.0


class ChildProcess:
    """Runs requests for ``file``'s ``name`` in a child process, within ``timeout`` seconds
    in all; use it as a context manager (the child is ended on leaving)."""

    def __init__(self, file: str, name: str, factory: str | None, timeout: float) -> None:
        self.where = {"file": file, "name": name, "factory": factory}
        self.timeout = timeout
        self.label = f"{file}:{name}"
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in __exit__
        self.deadline = time.monotonic() + timeout
        self.child = subprocess.Popen([sys.executable, runner.__file__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self.errors)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.child.kill()
        self.child.wait()
        self.child.stdin.close()
        self.child.stdout.close()
        self.errors.close()

    def ask(self, request: dict) -> dict:
        answer: list[Any] = []

        def read() -> None:
            try:
                answer.append(pickle.load(self.child.stdout))
            except (EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
                answer.append(err)      # the child died (or was stopped) mid-answer

        try:
            pickle.dump({**request, **self.where}, self.child.stdin)
            self.child.stdin.flush()
        except BrokenPipeError:
            answer.append(EOFError())
        else:
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(max(self.deadline - time.monotonic(), 0.0))
            if reader.is_alive():
                self.child.kill()
                reader.join(1.0)        # it reads the end of the pipe, then stops
                raise DeriveError(
                    f"{self.label} did not finish within {self.timeout:g} s (the time limit; "
                    "--timeout SECONDS sets it): an endless loop, or a very slow function?")
        response = answer[0]
        if isinstance(response, Exception):
            self.child.wait()
            raise DeriveError(f"{self.label} crashed the process running it "
                              f"({self._how()}) before it returned{self._last_line()}")
        if "fatal" in response:
            raise DeriveError(response["fatal"])
        return response

    def _how(self) -> str:
        code = self.child.returncode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _last_line(self) -> str:
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        return f": {lines[-1].strip()}" if lines else ""


class InProcess:
    """Serves requests for a callable given to the Python API, in this process."""

    def __init__(self, function: Callable) -> None:
        self.target = runner.Target(function, filename=function.__code__.co_filename)
        self.label = getattr(function, "__name__", "function")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def ask(self, request: dict) -> dict:
        return runner.handle(self.target, request)

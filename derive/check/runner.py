"""Running a user's backprop code for ``derive check --backward``: the far side of the
process boundary.

Stage: check, run in a child process (``python runner.py``, reading pickled requests from
stdin and writing pickled answers to stdout), so that user code that hangs, crashes or
changes global state never reaches derive's own process. It imports only
the standard library and NumPy, never derive, and decides nothing: derive's side
(:mod:`derive.check.backward`) says what to build and what to pass; this side imports the
user's file, builds the object, sets its parameters, calls the function and sends back what
came out, reduced to plain data (dicts, lists, tuples, floats, float64 arrays, and for
anything else a ``"<TypeName>"`` string), so that reading the answer runs no user code.

Requests: ``{"op": "probe", "constructs": [...]}`` asks for the function's parameters, the
module globals it reads and (for ``Class.method``) the arrays of a freshly built object;
``{"op": "trials", "constructs": [...], "construct": i, "trials": [...]}`` runs each trial:
build the object with the arguments ``constructs[i]``,
``set`` its arrays (paths of ("attr", name) / ("item", key) steps), ``delete`` module
globals, and make each of ``calls`` in turn (``args``, ``kwargs``, and ``globals`` to set
for that call). A trial that raises gives
its exception (type, message, the user's line), not a traceback.

:func:`handle` serves a request for a function already in memory too: the Python API checks
a callable it was given in the caller's own process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import io
import os
import pickle
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: How deep an object's attributes are searched for arrays, and how many entries of one
#: container are looked at.
MAX_DEPTH = 5
MAX_ITEMS = 256


class Fatal(Exception):
    """The target cannot be run at all (import failed, no such function)."""


@dataclass(frozen=True)
class Target:
    """What to run: ``function`` (for a method, the function that takes ``self`` first),
    ``cls`` and ``factory`` to build the object for a method, and ``filename``, whose frames
    are the user's lines in error messages."""

    function: Callable
    cls: type | None = None
    factory: Callable | None = None
    filename: str = ""


def load(file: str, name: str, factory: str | None) -> Target:
    """Import ``file`` (this runs it, as ``python`` would, but not as ``__main__``) and find
    ``name`` (``function`` or ``Class.method``) and ``factory`` in it."""
    path = Path(file).resolve()
    spec = importlib.util.spec_from_file_location(f"_derive_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise Fatal(f"cannot import {file!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        with _quiet():
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # noqa: BLE001 -- the user's module failed
        raise Fatal(f"importing {file} failed: {_explain(err, str(path))['text']}") from None
    owner, _, attribute = name.rpartition(".")
    cls = getattr(module, owner, None) if owner else None
    if owner and not isinstance(cls, type):
        raise Fatal(f"{file} has no class {owner!r}")
    function = getattr(cls if cls is not None else module, attribute, None)
    if not callable(function):
        raise Fatal(f"{file} has no {'method' if cls else 'function'} {name!r}")
    build = getattr(module, factory, None) if factory else None
    if factory and not callable(build):
        raise Fatal(f"{file} has no function {factory!r} (--factory)")
    return Target(function, cls, build, str(path))


def handle(target: Target, request: dict) -> dict:
    """Answer one request (see the module docstring)."""
    if request["op"] == "probe":
        return _probe(target, request["constructs"])
    build_args = request["constructs"][request["construct"]] if target.cls else ()
    return {"trials": [_trial(target, build_args, trial) for trial in request["trials"]]}


# --- probe -------------------------------------------------------------------------------


def _probe(target: Target, constructs: list[tuple]) -> dict:
    parameters = list(inspect.signature(target.function).parameters.values())
    if target.cls is not None:
        parameters = parameters[1:]          # self
    answer: dict[str, Any] = {
        "parameters": [(p.name, p.kind.name, p.default is not p.empty) for p in parameters],
        "globals": _globals_read(target.function),
    }
    if target.cls is not None:
        builder = target.factory or target.cls
        try:
            signature = inspect.signature(builder)
        except (TypeError, ValueError):
            signature = None
        usable = [n for n, args in enumerate(constructs)
                  if signature is None or _binds(signature, args)]
        answer["construct"] = usable[0] if usable else None
        answer["builder"] = f"{getattr(builder, '__name__', 'factory')}{signature or '(...)'}"
        if usable:
            try:
                obj = _build(target, constructs[usable[0]])
            except (Exception, SystemExit) as err:  # noqa: BLE001
                answer["build_error"] = _explain(err, target.filename)["text"]
            else:
                answer["arrays"] = [(path, value.shape) for path, value in _arrays(obj)]
    return answer


def _binds(signature: inspect.Signature, args: tuple) -> bool:
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def _globals_read(function: Callable) -> dict[str, str]:
    """The module globals ``function`` reads: "arrays" (an array, or a container of arrays:
    state a forward pass may have left behind) or "other"."""
    try:
        read = inspect.getclosurevars(function).globals
    except (TypeError, ValueError):
        return {}
    out = {}
    for name, value in read.items():
        items = value.values() if isinstance(value, dict) else value
        arrays = isinstance(value, np.ndarray) or (
            isinstance(value, (list, tuple, dict)) and bool(value)
            and all(isinstance(v, np.ndarray) for v in items))
        out[name] = "arrays" if arrays else "other"
    return out


# --- trials ------------------------------------------------------------------------------


def _build(target: Target, args: tuple) -> Any:
    with _quiet():
        return (target.factory or target.cls)(*copy.deepcopy(args))


def _trial(target: Target, build_args: tuple, trial: dict) -> dict:
    try:
        obj = None
        if target.cls is not None:
            obj = _build(target, build_args)
            for path, value in trial["set"]:
                _assign(obj, path, value)
        calls = []
        for call in trial["calls"]:
            function = _with_globals(target.function, call["globals"], trial["delete"])
            args = copy.deepcopy(call["args"])
            kwargs = copy.deepcopy(call["kwargs"])
            if obj is not None:
                args = [obj, *args]
            with _quiet():
                returned = function(*args, **kwargs)
            calls.append({"returned": _plain(returned, 0),
                          "state": _arrays(obj, copies=True) if obj is not None else []})
        return {"calls": calls}
    except (Exception, SystemExit) as err:  # noqa: BLE001 -- the user's code failed
        return {"error": _explain(err, target.filename)}


def _with_globals(function: Callable, replace: dict, delete: list[str]) -> Callable:
    """``function`` with its module globals replaced or deleted for this call only."""
    namespace = dict(function.__globals__)
    for name in delete:
        namespace.pop(name, None)
    namespace.update(copy.deepcopy(replace))
    clone = types.FunctionType(function.__code__, namespace, function.__name__,
                               function.__defaults__, function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    return clone


def _assign(obj: Any, path: tuple, value: np.ndarray) -> None:
    """Set the array at ``path`` in place when it is a float64 array of that shape (other
    references to it, a layer holding the same array, see the new values), else replace."""
    *head, (kind, key) = path
    parent = obj
    for step_kind, step in head:
        parent = getattr(parent, step) if step_kind == "attr" else parent[step]
    current = getattr(parent, key) if kind == "attr" else parent[key]
    if (isinstance(current, np.ndarray) and current.dtype == np.float64
            and current.shape == value.shape and current.flags.writeable):
        current[...] = value
    elif kind == "attr":
        setattr(parent, key, value.copy())
    else:
        parent[key] = value.copy()


def _arrays(obj: Any, copies: bool = False) -> list[tuple[tuple, Any]]:
    """(path, array) for every numeric array reachable from ``obj`` through attributes,
    lists, tuples and dicts, in the order they were defined."""
    out: list[tuple[tuple, Any]] = []
    seen: set[int] = set()

    def walk(value: Any, path: tuple, depth: int) -> None:
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "fiu" and value.ndim and id(value) not in seen:
                seen.add(id(value))
                out.append((path, np.array(value, dtype=float) if copies else value))
            return
        if depth >= MAX_DEPTH or id(value) in seen:
            return
        seen.add(id(value))
        for step, child in _children(value):
            walk(child, (*path, step), depth + 1)

    walk(obj, (), 0)
    return out


def _children(value: Any) -> Iterator[tuple[tuple[str, Any], Any]]:
    if isinstance(value, dict):
        items = [(k, v) for k, v in value.items() if isinstance(k, (str, int))]
        yield from ((("item", k), v) for k, v in items[:MAX_ITEMS])
    elif isinstance(value, (list, tuple)):
        yield from ((("item", n), v) for n, v in enumerate(value[:MAX_ITEMS]))
    elif hasattr(value, "__dict__") and not isinstance(
            value, (type, types.ModuleType, types.FunctionType, types.MethodType)):
        yield from ((("attr", k), v) for k, v in list(vars(value).items())[:MAX_ITEMS])


def _plain(value: Any, depth: int) -> Any:
    """``value`` as plain data: float64 arrays, floats, None, dicts, lists and tuples."""
    if isinstance(value, np.ndarray):
        return np.array(value, dtype=float) if value.dtype.kind in "fiub" else (
            f"<array of {value.dtype}>")
    if isinstance(value, (bool, int, float, np.number)) and not isinstance(
            value, np.complexfloating):
        return float(value)
    if value is None:
        return None
    if depth < MAX_DEPTH and isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if depth < MAX_DEPTH and isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return f"<{type(value).__name__}>"


# --- errors ------------------------------------------------------------------------------


def _explain(err: BaseException, filename: str) -> dict:
    """The exception in one line, at the user's line (the last frame in their file, else the
    last frame outside this module)."""
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if f.filename == filename] or [
        f for f in frames if f.filename != __file__]
    where = ""
    if user:
        frame = user[-1]
        code = f": {frame.line.strip()}" if frame.line else ""
        where = f" (at {Path(frame.filename).name} line {frame.lineno}{code})"
    message = f"{type(err).__name__}: {err}"
    return {"text": message + where, "message": message,
            "name": getattr(err, "name", None) if isinstance(err, NameError) else None}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """User code's prints go nowhere; NumPy's warnings are not errors."""
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
        yield


def main() -> None:
    """Serve requests from stdin until it closes; answers go to what was stdout, and the
    user's own output (even from C) to /dev/null."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    requests = sys.stdin.buffer
    target = None
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        try:
            if target is None:
                # the user's file imports its neighbours as it would when run directly
                sys.path[0] = str(Path(request["file"]).resolve().parent)
                target = load(request["file"], request["name"], request.get("factory"))
            answer = handle(target, request)
        except Fatal as err:
            answer = {"fatal": str(err)}
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    main()

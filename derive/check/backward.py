"""Checking hand-written backprop code against the derivation (``derive check --backward``).

Stage: check. Takes a spec (a dense chain: a graph is refused with one line; its formulas
can be checked one by one with ``derive check SPEC FORMULA``), a user's function (``FILE:
FUNCTION``, ``FILE:Class.method`` or, from Python, a callable) and a :class:`Convention`;
gives a :class:`BackwardReport`.

The function is run on one random batch (float64) under every convention still possible
(:mod:`derive.check.conventions`: rows, columns or one sample at a time; weights (out, in) or
(in, out); soft, one-hot or integer targets; parameters as a dict, lists, arguments or an
object's arrays), all trials in one child process with a time limit
(:mod:`derive.check.process`, :mod:`derive.check.runner`). Each trial's gradients are
compared with the derivation's on the very data that trial was given
(:mod:`derive.check.reference`), so a verdict never rests on a convention the code does
not use: integer labels are fed to code that wants integer labels. The report is the best
trial's: one that agrees, else the one whose numbers a common mistake reproduces exactly
(its diagnosis), else the first in order of preference. When every trial raises, the
report names the conventions tried and the flags that select one.

A function's module globals that are arrays (state left behind by a forward pass, the classic
tutorial's ``a2``) are removed for the call unless declared with ``--global``, so such a
function fails clearly instead of being checked against stale values.

Python API::

    from derive.check.backward import Convention, check_backward
    report = check_backward("xor", "my_backprop.py:backward",
                            Convention(weights="in-out", reduction="sum", bias=False))
    report.ok, report.diagnosis
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from derive import limits
from derive.check import conventions
from derive.check.conventions import (
    LAYOUTS,
    TARGETS,
    WEIGHTS,
    Convention,
    Data,
    Reading,
    Trial,
    Unreadable,
)
from derive.check.process import TIMEOUT, ChildProcess, InProcess
from derive.check.reference import (
    BATCH_SCALES,
    RTOL,
    SIGN_SCALES,
    Backprop,
    Diagnosis,
    diagnose,
    relative_error,
    variants,
)
from derive.derivation.reverse import Derivation, derive
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.spec.load import NetworkSpec, load_spec

#: Samples of the random batch (not 1, so that a 1/B factor shows; never a layer's width,
#: so that a batch axis cannot be taken for a feature axis).
BATCH = 5
#: The flags that select each convention, for the message when every trial fails.
SELECT = (f"--layout {'|'.join(LAYOUTS)}, --weights {'|'.join(WEIGHTS)}, "
          f"--targets {'|'.join(TARGETS)}")


@dataclass(frozen=True)
class GradientCheck:
    name: str              # "dW1", "db2"
    ok: bool
    max_error: float       # max |user - derived| / max |derived|
    note: str = ""


@dataclass(frozen=True)
class BackwardReport:
    """The outcome of checking one backward function: the convention it was checked under
    (None when every trial failed), what was detected rather than declared, the gradients
    compared, the diagnosis, or the error."""

    function: str
    spec_name: str
    convention: Convention | None
    batch: int
    gradients: tuple[GradientCheck, ...] = ()
    diagnosis: tuple[str, ...] = ()
    error: tuple[str, ...] = ()        # the exception the function raised, explained
    notes: tuple[str, ...] = ()
    diagnosed: bool = False            # the common mistakes were tested (every value usable)
    detected: tuple[str, ...] = ()     # "layout", "weights", "targets"

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.gradients) and all(g.ok for g in self.gradients)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def lines(self) -> list[str]:
        c = self.convention
        header = f"check {self.spec_name} --backward {self.function}: "
        if c is not None:
            header += f"{c.describe()}; "
        out = [header + f"a random batch of {self.batch} samples, float64"]
        if self.detected:
            out.append(f"  detected (from shapes and trial calls): {', '.join(self.detected)}")
        out.extend(f"  note: {note}" for note in self.notes)
        if self.error:
            out.append("FAILED: the gradients could not be checked")
            out.extend(f"  {line}" for line in self.error)
            return out
        for g in self.gradients:
            mark = "ok   " if g.ok else "WRONG"
            note = f"  ({g.note})" if g.note else ""
            out.append(f"  {mark} {g.name:<5} max rel. error {g.max_error:.1e}{note}")
        if self.ok:
            out.append("CORRECT: every gradient agrees with the derivation "
                       f"(relative error below {RTOL:g})")
            return out
        out.append("INCORRECT")
        wrong = [g for g in self.gradients if not g.ok]
        if self.diagnosis:
            out.append("  diagnosis (each tested as a hypothesis; it reproduces your "
                       "numbers exactly):")
            out.extend(f"    - {line}" for line in self.diagnosis)
        elif all(g.max_error < RTOL for g in wrong):
            out.append(f"  the values agree with the derivation; only the layout of "
                       f"{', '.join(g.name for g in wrong)} differs from the weights' "
                       f"({c.weights if c else ''}; --weights selects the other)")
        elif self.diagnosed:
            out.append("  no common mistake (missing sigma', sigma' of z instead of a or "
                       "the reverse, transposed weight, wrong sign, 1/batch, another "
                       "loss's output error) reproduces your numbers")
        return out


# --- one trial's outcome -----------------------------------------------------------------


@dataclass
class _Outcome:
    """What one trial gave: the user's exception, unreadable results, or gradient checks
    (and, when every value was usable and some is wrong, the diagnosis)."""

    trial: Trial
    order: int
    error: Mapping[str, Any] | None = None
    unreadable: str = ""
    checks: tuple[GradientCheck, ...] = ()
    note: str = ""
    diagnosis: Diagnosis | None = None
    diagnosed: bool = False

    @property
    def correct(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def rank(self) -> tuple[int, int, int]:
        """Lower is better: correct; diagnosed (fewer mistakes first); every value usable;
        some usable; nothing readable; raised. Ties go to the order of preference."""
        if self.error is not None:
            return (5, 0, self.order)
        if self.unreadable:
            return (4, 0, self.order)
        if self.correct:
            return (0, 0, self.order)
        if self.diagnosis is not None:
            return (1, self.diagnosis.cost, self.order)
        return (2 if self.diagnosed else 3, 0, self.order)


class _Reference:
    """The derivation's gradients, and the common mistakes', on the batch as each kind of
    targets gives it (computed once per kind, when first needed)."""

    def __init__(self, spec: NetworkSpec, derivation: Derivation, data: Data) -> None:
        self.spec, self.derivation, self.data = spec, derivation, data
        self._runs: dict[str, Backprop] = {}
        self._variants: dict[str, list] = {}

    def run(self, targets: str) -> Backprop:
        key = "one-hot" if targets == "labels" else targets
        if key not in self._runs:
            Y = (_one_hot(self.data) if targets == "labels" else self.data.targets[targets])
            self._runs[key] = Backprop(self.derivation, self.data.params, self.data.X, Y)
        return self._runs[key]

    def gradients(self, targets: str) -> dict[str, np.ndarray]:
        return self.run(targets).gradients()

    def variants(self, targets: str) -> list:
        key = "one-hot" if targets == "labels" else targets
        if key not in self._variants:
            self._variants[key] = variants(self.spec, self.derivation, self.run(targets))
        return self._variants[key]


def _one_hot(data: Data) -> np.ndarray:
    width = data.forward[f"A{data.depth}"].shape[1]
    return np.eye(width)[data.targets["labels"]]


def _outcome(trial: Trial, order: int, answer: Mapping[str, Any], reference: _Reference,
             data: Data) -> _Outcome:
    if "error" in answer:
        return _Outcome(trial, order, error=answer["error"])
    try:
        readings = conventions.readings(trial, answer["calls"])
    except Unreadable as err:
        return _Outcome(trial, order, unreadable=str(err))
    outcomes = [_compare(trial, order, reading, reference, data) for reading in readings]
    return min(outcomes, key=_Outcome.rank)


def _compare(trial: Trial, order: int, reading: Reading, reference: _Reference,
             data: Data) -> _Outcome:
    c = trial.convention
    expected = reference.gradients(c.targets)
    per_sample = c.layout == "sample"
    scale = 1.0 / data.batch if c.reduction == "sum" and not per_sample else 1.0
    checks: list[GradientCheck] = []
    user: dict[str, np.ndarray] = {}
    for name, correct in expected.items():
        if name not in reading.grads:
            checks.append(GradientCheck(f"d{name}", False, math.inf, "not returned"))
            continue
        try:
            got = np.asarray(reading.grads[name], dtype=float)
        except (TypeError, ValueError):
            checks.append(GradientCheck(f"d{name}", False, math.inf, "not an array of numbers"))
            continue
        note = ""
        shape = tuple(trial.shapes[name])
        if got.shape != shape:
            if name.startswith("b") and got.size == int(np.prod(shape)):
                got = got.reshape(shape)
            elif got.shape == shape[::-1]:
                note = f"shape {got.shape} is the transpose of the {c.weights} layout {shape}"
                got = got.T
            else:
                checks.append(GradientCheck(f"d{name}", False, math.inf,
                                            f"shape {got.shape}, expected {shape}"))
                continue
        if name.startswith("W"):
            got = got if c.weights == "out-in" else got.T
        else:
            got = got.reshape(-1)
        user[name] = got * scale
        error = relative_error(user[name], correct)
        checks.append(GradientCheck(f"d{name}", error < RTOL and not note, error, note))
    outcome = _Outcome(trial, order, checks=tuple(checks), note=reading.note)
    # the mistakes are tested only on a full set of numbers that are not already right
    if len(user) == len(expected) and any(not check.max_error < RTOL for check in checks):
        outcome.diagnosed = True
        outcome.diagnosis = diagnose(user, reference.variants(c.targets), c.reduction,
                                     data.batch, SIGN_SCALES if per_sample else BATCH_SCALES,
                                     c.weights)
    return outcome


# --- the check ---------------------------------------------------------------------------


def check_backward(spec: NetworkSpec | str | Mapping, function: Callable | str,
                   convention: Convention | None = None, *, batch: int | None = None,
                   seed: int = 0, loss: str | None = None,
                   timeout: float = TIMEOUT) -> BackwardReport:
    """Run a hand-written backward ``function`` (``"FILE:FUNCTION"``, ``"FILE:Class.method"``
    or a callable) on random data and compare its gradients with the derivation of ``spec``
    (see :class:`Convention`). ``loss`` checks against ``spec`` with that built-in loss
    instead. A file runs in a child process stopped after ``timeout`` seconds; a callable
    runs in this process."""
    convention = convention or Convention()
    spec = _checked_spec(load_spec(spec), convention, loss)
    batch = batch if batch is not None else _batch_size(spec.sizes)
    if batch < 2:
        raise DeriveError("the batch needs at least 2 samples (to tell a sum from a mean)")
    limits.check_count("--batch", batch, limits.MAX_BATCH, "MAX_BATCH")
    if timeout <= 0:
        raise DeriveError(f"--timeout must be positive, got {timeout:g}")
    constructs = [(list(spec.sizes),), tuple(spec.sizes), ()]
    # the child process starts while the derivation is made
    with _session(function, convention, timeout) as session:
        label = session.label
        derivation = _derivation(spec)
        data = _random_batch(spec, derivation, batch, seed)
        probe = session.ask({"op": "probe", "constructs": constructs})
        _check_object(probe, label, spec)
        trials = conventions.trials(probe, convention, data, derivation.model.loss.needs,
                                    label)
        answer = session.ask({"op": "trials", "constructs": constructs,
                              "construct": probe.get("construct"),
                              "trials": [trial.request for trial in trials]})
    reference = _Reference(spec, derivation, data)
    outcomes = [_outcome(trial, n, result, reference, data)
                for n, (trial, result) in enumerate(zip(trials, answer["trials"]))]
    # batch code called on one sample cannot be told from per-sample code (the sum over a
    # batch of one is its mean): one sample at a time is judged only where no batch layout
    # gave every gradient
    batched = [o for o in outcomes if o.trial.convention.layout != "sample"]
    if any(o.rank()[0] <= 2 for o in batched):
        outcomes = batched
    best = min(outcomes, key=_Outcome.rank)
    detected = tuple(name for name in ("layout", "weights", "targets")
                     if len({getattr(trial.convention, name) for trial in trials}) > 1)
    notes = tuple(n for n in (*best.trial.notes, best.note) if n)
    name = label.rpartition(":")[2]
    if best.error is not None:
        return BackwardReport(label, spec.name, None, batch, notes=best.trial.notes,
                              error=_failure(name, outcomes))
    if best.unreadable:
        return BackwardReport(label, spec.name, best.trial.convention, batch, notes=notes,
                              error=(f"{name} {best.unreadable}",), detected=detected)
    diagnosis = best.diagnosis.lines if best.diagnosis else ()
    return BackwardReport(label, spec.name, best.trial.convention, batch, best.checks,
                          diagnosis, notes=notes, diagnosed=best.diagnosed, detected=detected)


def _checked_spec(spec: NetworkSpec, convention: Convention, loss: str | None) -> NetworkSpec:
    """``spec`` as the code computes it: a dense chain, biases dropped, loss swapped."""
    if not spec.is_chain:
        raise DeriveError(f"derive check --backward supports dense chains for now; "
                          f"{spec.name} is a graph ({_first_graph_layer(spec)}); check its "
                          "formulas one by one with derive check SPEC FORMULA")
    data = spec.to_dict()
    data.pop("example", None)
    if not convention.bias:
        data["layers"] = [{**layer, "bias": False} for layer in data["layers"]]
    if loss is not None:
        data["loss"] = loss
    return load_spec(data) if not convention.bias or loss is not None else spec


@functools.lru_cache(maxsize=8)
def _derivation(spec: NetworkSpec) -> Derivation:
    """The derivation of ``spec`` (kept: a spec is often checked against several functions
    in a row)."""
    return derive(build_model(spec))


def _batch_size(sizes: tuple[int, ...]) -> int:
    batch = BATCH
    while batch in sizes:
        batch += 1
    return batch


def _session(function: Callable | str, convention: Convention, timeout: float
             ) -> ChildProcess | InProcess:
    if not isinstance(function, str):
        if convention.factory:
            raise DeriveError("--factory goes with --backward FILE:Class.method")
        if not inspect.isfunction(function):
            raise DeriveError(f"check_backward takes a function or 'FILE:FUNCTION', not "
                              f"{type(function).__name__}")
        return InProcess(function)
    path_text, sep, name = function.rpartition(":")
    if not sep or not path_text or not all(part.isidentifier() for part in name.split(".")) \
            or name.count(".") > 1:
        raise DeriveError(f"--backward takes FILE:FUNCTION or FILE:Class.method (e.g. "
                          f"my_backprop.py:backward), got {function!r}")
    if not Path(path_text).is_file():
        raise DeriveError(f"no such file {path_text!r}")
    if convention.factory and "." not in name:
        raise DeriveError("--factory goes with --backward FILE:Class.method")
    return ChildProcess(path_text, name, convention.factory, timeout)


def _random_batch(spec: NetworkSpec, derivation: Derivation, batch: int, seed: int) -> Data:
    model = derivation.model
    rng = np.random.default_rng(seed)
    n = spec.sizes
    params: dict[str, np.ndarray] = {}
    for layer in model.layers:
        l = layer.index
        params[f"W{l}"] = rng.uniform(-1.0, 1.0, (n[l], n[l - 1]))
        if layer.b is not None:
            params[f"b{l}"] = rng.uniform(-0.5, 0.5, n[l])
    X = rng.uniform(-1.0, 1.0, (batch, n[0]))
    needs = model.loss.needs
    if needs == "distribution":
        soft = rng.uniform(0.05, 1.0, (batch, n[-1]))
        soft /= soft.sum(axis=1, keepdims=True)
    elif needs == "probability":
        soft = rng.uniform(0.05, 0.95, (batch, n[-1]))
    else:
        soft = rng.uniform(-1.0, 1.0, (batch, n[-1]))
    labels = rng.integers(0, n[-1], batch)
    # 0/1 targets: one 1 per sample for a distribution, else independent bits
    one_hot = (np.eye(n[-1])[labels] if needs != "probability" else
               rng.integers(0, 2, (batch, n[-1])).astype(float))
    run = Backprop(derivation, params, X, soft)
    forward = {f"A{l}": np.array(run.value("a", l)) for l in range(model.depth + 1)}
    forward.update({f"Z{l}": np.array(run.value("z", l)) for l in range(1, model.depth + 1)})
    return Data(params, X, {"soft": soft, "one-hot": one_hot, "labels": labels}, forward,
                model.depth)


def _check_object(probe: Mapping[str, Any], label: str, spec: NetworkSpec) -> None:
    """The object of a ``Class.method`` was built, or one line saying why not."""
    if "construct" not in probe:
        return
    if probe["construct"] is None:
        raise DeriveError(
            f"cannot build the object for {label}: {probe['builder']} takes neither the "
            f"spec's sizes {list(spec.sizes)} (as a list or one by one) nor nothing; give "
            "--factory NAME, a function in the file that returns the object")
    if "build_error" in probe:
        raise DeriveError(f"building the object for {label} failed: {probe['build_error']}")


def _first_graph_layer(spec: NetworkSpec) -> str:
    """Where ``spec`` stops being a plain chain of dense layers, in words."""
    for l, layer in enumerate(spec.layers, start=1):
        if layer.op != "dense":
            return f"layer {l} is {layer.op}"
        if layer.inputs is not None:
            return f"layer {l} reads layer {', '.join(map(str, layer.inputs))}"
    return "not a chain"


def _failure(name: str, outcomes: list[_Outcome]) -> tuple[str, ...]:
    """Every trial raised: the first one's exception, explained, and what the others gave."""
    first = outcomes[0]
    lines = [f"{name} raised {first.error['text']}"]
    missing = first.error.get("name")
    if missing and missing in first.trial.request["delete"]:
        lines.append(
            f"{name} reads {missing} from outside the function: a module-level value "
            "(left there by a forward pass or training loop) that is neither an argument "
            f"nor computed inside {name}. Called on its own, {name} fails; called after "
            "a forward pass on a different batch, it silently uses stale values.")
        lines.append(f"fix: pass {missing} as an argument or recompute it inside {name}; "
                     f"to check the function as it is, declare what it holds, e.g. "
                     f"--global {missing}=A1 (roles A0..AL, Z1..ZL, W1.., b1..)")
    if len(outcomes) == 1:
        return tuple(lines)
    texts: dict[str, list[str]] = {}
    for outcome in outcomes:
        c = outcome.trial.convention
        texts.setdefault(outcome.error["text"], []).append(
            f"--layout {c.layout} --weights {c.weights} --targets {c.targets}")
    if len(texts) == 1:
        lines.append(f"(the same under each of the {len(outcomes)} conventions tried)")
        return tuple(lines)
    lines.append(f"it fails under each of the {len(outcomes)} conventions tried:")
    for text, tried in texts.items():
        lines.append(f"  {'; '.join(tried)}: {text}")
    lines.append(f"select the convention of your code with {SELECT}")
    return tuple(lines)


# --- command-line options ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --backward options of ``derive check``."""
    group = parser.add_argument_group(
        "checking hand-written backprop code (conventions not given are detected from "
        "shapes and trial calls)")
    group.add_argument("--backward", metavar="FILE:FUNCTION",
                       help="a Python function computing gradients, or FILE:Class.method "
                            "(the object is built with the spec's sizes); it runs in a "
                            "separate process")
    group.add_argument("--layout", choices=tuple(LAYOUTS),
                       help="rows: X (B, n); columns: X (n, B), Z = W @ X + b; sample: one "
                            "sample at a time as column vectors (n, 1)")
    group.add_argument("--weights", choices=tuple(WEIGHTS),
                       help="weight layout: out-in = (n_l, n_{l-1}), used as W @ x; "
                            "in-out = (n_{l-1}, n_l), used as X @ W")
    group.add_argument("--targets", choices=tuple(TARGETS),
                       help="soft targets (probabilities or real values), one-hot rows, or "
                            "integer class labels")
    group.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                       help="the function returns the batch mean (default) or sum of the "
                            "per-sample gradients")
    group.add_argument("--no-bias", action="store_true",
                       help="the code has no biases: check against SPEC without them")
    group.add_argument("--loss", metavar="NAME",
                       help="check against SPEC with this built-in loss instead")
    group.add_argument("--factory", metavar="NAME",
                       help="for FILE:Class.method: a function in FILE that returns the object")
    group.add_argument("--arg", action="append", default=[], metavar="NAME=ROLE",
                       help="what to pass for the function parameter NAME: X, Y, B, params, "
                            "weights, biases, cache, W1, b1, ..., A0..AL, Z1..ZL (derive's "
                            "layer numbering)")
    group.add_argument("--global", dest="globals_", action="append", default=[],
                       metavar="NAME=ROLE", help="set the module global NAME for the call")
    group.add_argument("--returns", metavar="ROLES",
                       help="order of the returned gradients, e.g. dW1,db1,dW2,db2 (_ skips "
                            "one); default: a dict, or arrays in layer order")
    group.add_argument("--batch", type=int,
                       help=f"samples of the random batch (default {BATCH}, or the next "
                            "number that is no layer's width)")
    group.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SECONDS",
                       help=f"time limit for the user's code (default {TIMEOUT:g})")


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, role = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise DeriveError(f"{option} takes NAME=ROLE, got {item!r}")
        out[name.strip()] = role.strip()
    return out


def run_from_args(args: argparse.Namespace, echo: Callable[[str], None]) -> int:
    returns = None
    if args.returns:
        returns = tuple(part.strip() for part in args.returns.split(",") if part.strip())
    convention = Convention(args.weights, args.reduction, not args.no_bias,
                            _pairs(args.arg, "--arg"), _pairs(args.globals_, "--global"),
                            returns, args.layout, args.targets, args.factory)
    report = check_backward(args.spec, args.backward, convention, batch=args.batch,
                            seed=args.seed, loss=args.loss, timeout=args.timeout)
    for line in report.lines():
        echo(line)
    return report.exit_code

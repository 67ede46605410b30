"""Checking hand-written backprop code against the derivation (``derive check --backward``).

Takes a user's Python function and a :class:`Convention` saying how it takes parameters and
returns gradients; gives a :class:`BackwardReport`. Dense chains only, for now: a graph spec
(residual connections, layer norms, ...) is refused with one line; its formulas can be
checked one by one with ``derive check SPEC FORMULA``. The function is called on random
parameters, inputs and targets (float64, one batch of :data:`BATCH` rows); each gradient it
returns is compared with the derived one, which is computed here by evaluating the
derivation's own vector forms on the batch (:class:`_Backprop`; nothing is typed in twice).

When a gradient is wrong, common mistakes are tested as hypotheses: each is a variant of the
derivation (sigma' left out, applied to z instead of a or the reverse, the output error of
another loss, a transposed weight in the delta recursion) combined with a scale (the sum over
the batch instead of the mean, a wrong sign); the report names the variants that reproduce
the user's numbers exactly.

Running ``--backward`` imports the user's file: that is their own code, run on purpose. The
function is called with a copy of its module globals from which data arrays it was not
given are removed, so a function that silently reads state left behind by a forward pass
(the classic tutorial's ``a2``) fails clearly instead of being checked against stale values.

Python API::

    from derive.check.backward import Convention, check_backward
    report = check_backward("xor", "my_backprop.py:backward",
                            Convention(weights="in-out", reduction="sum", bias=False))
    report.ok, report.diagnosis
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import math
import re
import sys
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from derive.derivation.reverse import Derivation, activation_derivative, derive
from derive.derivation.tensorform import ONE, Inner, MatVec, Outer, adjoint, to_vector
from derive.errors import DeriveError
from derive.graph.model import build_model, j
from derive.quantities import NetTensor
from derive.registry import functions
from derive.registry.functions import A, Z
from derive.render.pretty import pretty
from derive.spec.load import NetworkSpec, load_spec

#: Rows of the random batch (not 1, and unlike the widths, so a 1/B factor shows).
BATCH = 5
#: Relative agreement required between float64 results.
RTOL = 1e-6

_ROLE = re.compile(r"^(X|Y|B|params|[WbZA]\d+)$")


@dataclass(frozen=True)
class Convention:
    """How a user's backward function takes its inputs and returns gradients.

    ``weights``: "out-in" (``W{l}.shape == (n_l, n_{l-1})``, used as ``W @ x``, derive's own
    layout) or "in-out" (``(n_{l-1}, n_l)``, used as ``X @ W``). ``reduction``: the function
    returns the batch "mean" (derive's convention) or "sum" of the per-sample gradients.
    ``bias``: False when the code has no biases (the spec is checked with its biases dropped).
    ``args``/``globals_``: function parameter / module global name -> role, where a role is
    ``X``, ``Y`` (batches, rows are samples), ``W1``, ``b1``, ... (parameters, layers numbered
    from 1 as in derive), ``A0`` .. ``AL``, ``Z1`` .. ``ZL`` (the forward pass: A0 is X),
    ``params`` (a dict with keys W1, b1, ...) or ``B`` (the batch size). Parameters named X, x,
    inputs, Y, y, targets, labels, params, W1, b1, ... and output/y_hat need no declaration.
    ``returns``: the roles of the returned values in order (``("dW1", "dW2")``, "_" for one to
    ignore); by default a dict keyed W1/dW1/..., or a tuple in layer order (dW1, db1, dW2, ...,
    or the reverse order).
    """

    weights: str = "out-in"
    reduction: str = "mean"
    bias: bool = True
    args: Mapping[str, str] = field(default_factory=dict)
    globals_: Mapping[str, str] = field(default_factory=dict)
    returns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.weights not in ("out-in", "in-out"):
            raise DeriveError(f"weights must be out-in or in-out, not {self.weights!r}")
        if self.reduction not in ("mean", "sum"):
            raise DeriveError(f"reduction must be mean or sum, not {self.reduction!r}")
        for name, role in {**self.args, **self.globals_}.items():
            if not _ROLE.match(role):
                raise DeriveError(f"{name}={role}: unknown role {role!r}; roles are X, Y, B, "
                                  "params, W1, b1, ..., A0, A1, ..., Z1, ...")


@dataclass(frozen=True)
class GradientCheck:
    name: str              # "dW1", "db2"
    ok: bool
    max_error: float       # max |user - derived| / max |derived|
    note: str = ""


@dataclass(frozen=True)
class BackwardReport:
    """The outcome of checking one backward function."""

    function: str
    spec_name: str
    convention: Convention
    batch: int
    gradients: tuple[GradientCheck, ...] = ()
    diagnosis: tuple[str, ...] = ()
    error: tuple[str, ...] = ()        # the exception the function raised, explained
    notes: tuple[str, ...] = ()
    diagnosed: bool = False            # the common mistakes were tested (every value usable)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.gradients) and all(g.ok for g in self.gradients)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def lines(self) -> list[str]:
        c = self.convention
        header = (f"check {self.spec_name} --backward {self.function}: weights {c.weights}, "
                  f"batch {c.reduction}, {'with' if c.bias else 'no'} biases; a random batch "
                  f"of {self.batch} rows, float64")
        out = [header]
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
        else:
            out.append("INCORRECT")
            wrong = [g for g in self.gradients if not g.ok]
            if self.diagnosis:
                out.append("  diagnosis (each tested as a hypothesis; it reproduces your "
                           "numbers exactly):")
                out.extend(f"    - {line}" for line in self.diagnosis)
            elif all(g.max_error < RTOL for g in wrong):
                out.append(f"  the values agree with the derivation; only the layout of "
                           f"{', '.join(g.name for g in wrong)} differs from the declared "
                           f"--weights {c.weights}")
            elif self.diagnosed:
                out.append("  no common mistake (missing sigma', sigma' of z instead of a or "
                           "the reverse, transposed weight, wrong sign, 1/batch, another "
                           "loss's output error) reproduces your numbers")
        return out


# --- the reference: the derivation's vector forms, evaluated on a batch ------------------


_UFUNCS: Mapping[type, Callable[..., np.ndarray]] = {
    sp.exp: np.exp, sp.log: np.log, sp.tanh: np.tanh, sp.sinh: np.sinh, sp.cosh: np.cosh,
    sp.Abs: np.abs, functions.sigmoid: lambda x: 1.0 / (1.0 + np.exp(-x)),
    functions.softplus: lambda x: np.logaddexp(0.0, x),
    sp.erf: np.vectorize(math.erf, otypes=[float]),
}


class _Backprop:
    """Forward and backward pass of a derivation on a batch, by evaluating its expressions.

    Rows are samples. ``env`` maps each quantity (a :class:`NetTensor`: a^l, z^l, delta^l,
    W^l, ...) to its batch of values. ``sigma_prime`` overrides sigma'_l (a function of z^l);
    ``flip`` is a set of layers l whose (W^l)^T in the delta recursion is evaluated
    untransposed.
    """

    def __init__(self, derivation: Derivation, params: Mapping[str, np.ndarray],
                 X: np.ndarray, Y: np.ndarray) -> None:
        self.derivation = derivation
        self.model = derivation.model
        # sigma_l of the generic forms, by layer (the derivation names them sigma_1, sigma_2)
        self.sigmas = {sp.Function(f"sigma_{node.index}"): node.index
                       for node in self.model.nodes}
        by_key = {parameter.key: parameter.tensor for parameter in self.model.parameters}
        self.env: dict[NetTensor, Any] = {NetTensor("y"): Y, NetTensor("a", 0): X}
        for key, value in params.items():
            self.env[by_key[key]] = value
        for layer in self.model.layers:
            self.env[NetTensor("z", layer.index)] = self.eval(to_vector(layer.z_expr, (j,)), {})
            self.env[layer.output] = self.eval(to_vector(layer.a_expr, (j,)), {})

    def value(self, role: str, layer: int | None = None) -> Any:
        """The batch of values of quantity ``role`` at ``layer`` (``value("a", 2)``: A2)."""
        return self.env[NetTensor(role, layer)]

    def eval(self, expr: sp.Expr, primes: Mapping[int, Callable], flip: frozenset = frozenset(),
             local: Mapping[sp.Symbol, Any] | None = None) -> Any:
        local = local or {}

        def ev(e: sp.Expr) -> Any:
            return self.eval(e, primes, flip, local)

        if expr in local:
            return local[expr]
        if isinstance(expr, NetTensor):
            return 1.0 if expr == ONE else self.env[expr]
        if isinstance(expr, MatVec):
            matrix, vector, transposed = expr.args
            W, V = ev(matrix), ev(vector)
            if bool(transposed) != (matrix.node in flip):
                return V @ W
            return V @ W.T
        if isinstance(expr, Inner):
            u, v = expr.args
            return np.sum(ev(u) * ev(v), axis=1, keepdims=True)
        if isinstance(expr, sp.Derivative):
            (arg,) = expr.expr.args
            layer = self.sigmas[expr.expr.func]
            return primes[layer](ev(arg)) if layer in primes else self.sigma_prime(layer)(ev(arg))
        if isinstance(expr, sp.Add):
            return sum(ev(a) for a in expr.args)
        if isinstance(expr, sp.Mul):
            out = 1.0
            for factor in expr.args:
                out = out * ev(factor)
            return out
        if isinstance(expr, sp.Pow):
            return ev(expr.base) ** ev(expr.exp)
        if expr.is_Number or expr.is_NumberSymbol:
            return float(expr)
        if isinstance(expr, sp.Piecewise):
            out = ev(expr.args[-1][0])
            for value, cond in reversed(expr.args[:-1]):
                out = np.where(ev(cond), ev(value), out)
            return out
        if expr == sp.true:
            return True
        if isinstance(expr, sp.core.relational.Relational):
            ops = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}
            return ops[expr.rel_op](ev(expr.lhs), ev(expr.rhs))
        if isinstance(expr, (sp.Max, sp.Min)):
            fn = np.maximum if isinstance(expr, sp.Max) else np.minimum
            values = [ev(a) for a in expr.args]
            out = values[0]
            for value in values[1:]:
                out = fn(out, value)
            return out
        if type(expr) in _UFUNCS:
            return _UFUNCS[type(expr)](*(ev(a) for a in expr.args))
        raise NotImplementedError(f"cannot evaluate {expr!r} numerically")

    def sigma_prime(self, layer: int) -> Callable[[np.ndarray], np.ndarray]:
        in_z = activation_derivative(self.model.layer(layer).activation).in_z
        return lambda z: np.broadcast_to(self.eval(in_z, {}, local={Z: z}), np.shape(z))

    def gradients(self, primes: Mapping[int, Callable] | None = None,
                  flip: frozenset = frozenset(), output: str = "derived",
                  loss_gradient: sp.Expr | None = None) -> dict[str, np.ndarray]:
        """Batch-mean gradients, keyed W1, b1, ...; the variants of the hypotheses."""
        primes = primes or {}
        derivation, model = self.derivation, self.model
        L = model.depth
        B = self.value("y").shape[0]
        env = dict(self.env)
        saved = self.env
        self.env = env
        try:
            top = derivation.delta(L)
            if model.layer(L).activation.is_softmax or output == "rhs":
                env[top.target] = self.eval(top.vector, primes, flip)
            else:
                gradient = loss_gradient if loss_gradient is not None else (
                    derivation.loss_gradient.vector)
                env[adjoint(model.output.output)] = self.eval(gradient, primes, flip)
                env[top.target] = self.eval(top.vector_generic, primes, flip)
            for l in range(L - 1, 0, -1):
                delta = derivation.delta(l)
                env[delta.target] = self.eval(delta.vector_generic, primes, flip)
            grads: dict[str, np.ndarray] = {}
            for layer in model.layers:
                l = layer.index
                weight, bias = layer.parameter("w"), layer.parameter("b")
                outer = derivation.gradient(weight.tensor).vector
                assert isinstance(outer, Outer)
                U, V = (np.broadcast_to(self.eval(side, primes, flip), (B, n))
                        for side, n in zip(outer.args, weight.shape))
                grads[weight.key] = U.T @ V / B
                if bias is not None:
                    vector = derivation.gradient(bias.tensor).vector
                    grads[bias.key] = np.mean(np.broadcast_to(
                        self.eval(vector, primes, flip), (B, *bias.shape)), axis=0)
            return grads
        finally:
            self.env = saved


# --- hypotheses --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Variant:
    description: str
    grads: dict[str, np.ndarray]
    cost: int                  # how many mistakes it assumes


def _variants(spec: NetworkSpec, derivation: Derivation, run: _Backprop) -> list[_Variant]:
    model = derivation.model
    L = model.depth
    out: list[_Variant] = [_Variant("", run.gradients(), 0)]
    elementwise = [layer for layer in model.layers if not layer.activation.is_softmax]

    def add(description: str, cost: int, **kwargs: Any) -> None:
        try:
            out.append(_Variant(description, run.gradients(**kwargs), cost))
        except (NotImplementedError, ValueError, KeyError):
            pass

    for layer in elementwise:
        l = layer.index
        derivative = activation_derivative(layer.activation)
        where = f"delta^{l}" + (" (the output layer)" if l == L else "")
        add(f"the sigma'(z^{l}) factor is missing in {where}", 1,
            primes={l: lambda z: 1.0})
        if derivative.in_a is not None and derivative.in_a.has(A):
            in_a = derivative.in_a
            add(f"sigma' applied to z instead of a in {where}: the derivative written in "
                f"terms of the output, {in_a}, was given z^{l} (a^{l} is needed)", 1,
                primes={l: lambda z, in_a=in_a: run.eval(in_a, {}, local={A: z})})
            activation = layer.activation.expr
            add(f"sigma' applied to a instead of z in {where}: sigma'(z) = "
                f"{derivative.in_z} was given a^{l} (z^{l} is needed)", 1,
                primes={l: lambda z, f=activation, d=derivative.in_z: run.eval(
                    d, {}, local={Z: run.eval(f, {}, local={Z: z})})})
    if len(elementwise) > 1:
        add("the sigma' factor is missing in every delta", len(elementwise),
            primes={layer.index: (lambda z: 1.0) for layer in elementwise})
        rewritten = [layer for layer in elementwise
                     if activation_derivative(layer.activation).in_a is not None]
        if len(rewritten) > 1:
            in_a = {layer.index: activation_derivative(layer.activation).in_a
                    for layer in rewritten}
            add("sigma' applied to z instead of a in every delta", len(rewritten),
                primes={l: (lambda z, d=d: run.eval(d, {}, local={A: z}))
                        for l, d in in_a.items()})
    sizes = spec.sizes
    for l in range(2, L + 1):
        if sizes[l] == sizes[l - 1]:
            add(f"W^{l} is not transposed in the recursion for delta^{l - 1} "
                f"(W^{l} delta^{l} instead of (W^{l})^T delta^{l})", 1, flip=frozenset({l}))
    if not model.layer(L).activation.is_softmax:
        for name in functions.LOSSES:
            if name == spec.loss.name:
                continue
            try:
                other = load_spec({**spec.to_dict(), "loss": name})
            except DeriveError:
                continue
            other_derivation = derive(build_model(other))
            delta = pretty(other_derivation.delta(L).rhs)
            add(f"the output error of {name} (δᴸⱼ = {delta}) is used with "
                f"{spec.loss.name}", 1,
                loss_gradient=other_derivation.loss_gradient.vector)
    return out


_SCALES = (1.0, "B", "1/B", -1.0, "-B", "-1/B")


def _scale_value(scale: float | str, batch: int) -> float:
    table = {"B": batch, "1/B": 1 / batch, "-B": -batch, "-1/B": -1 / batch}
    return table[scale] if isinstance(scale, str) else scale


def _describe_scale(scale: float | str, reduction: str, batch: int) -> str:
    if scale in ("B", "-B"):
        text = (f"sums over the batch instead of averaging: {batch} (= B) times the mean "
                "(missing 1/batch; use --reduction sum if summing is intended)")
    elif scale in ("1/B", "-1/B"):
        text = (f"divides by the batch size where {reduction} was declared: 1/{batch} of "
                "the expected value" if reduction == "sum" else
                "divides by the batch size twice (1/B too small)")
    else:
        text = ""
    if scale in (-1.0, "-B", "-1/B"):
        text = "wrong sign (the negative of the gradient)" + (f", and {text}" if text else "")
    return text


def _close(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(b))), 1e-12)
    return float(np.max(np.abs(a - b))) / scale


def _diagnose(user: Mapping[str, np.ndarray], variants: list[_Variant], reduction: str,
              batch: int) -> tuple[str, ...]:
    best: tuple[int, list[str], list[str]] | None = None
    for variant in variants:
        scales: dict[str, float | str] = {}
        transposed: list[str] = []
        for name, value in user.items():
            # a square dW returned in the other layout has the right shape: try it too
            square = value.ndim == 2 and value.shape[0] == value.shape[1]
            layouts = (value, value.T) if square else (value,)
            for scale in _SCALES:
                expected = _scale_value(scale, batch) * variant.grads[name]
                match = [n for n, v in enumerate(layouts) if _close(v, expected) < RTOL]
                if match:
                    scales[name] = scale
                    if match[0]:
                        transposed.append(f"d{name}")
                    break
        if len(scales) != len(user):
            continue
        odd = {name: s for name, s in scales.items() if s != 1.0}
        cost = variant.cost + len(set(odd.values())) + bool(transposed)
        lines = [variant.description] if variant.description else []
        if transposed:
            lines.append(f"{', '.join(transposed)} returned transposed: the other weight "
                         "layout than the declared --weights")
        scale_lines = []
        for scale in dict.fromkeys(odd.values()):
            names = ", ".join(n for n, s in odd.items() if s == scale)
            everyone = len([1 for s in odd.values() if s == scale]) == len(user)
            scale_lines.append(f"{'every gradient' if everyone else names}: "
                               f"{_describe_scale(scale, reduction, batch)}")
        if best is None or cost < best[0]:
            best = (cost, lines, scale_lines)
        elif cost == best[0]:
            best[1].extend(line for line in lines if line not in best[1])
            best[2].extend(line for line in scale_lines if line not in best[2])
    return tuple(best[1] + best[2]) if best else ()


# --- running the user's function ---------------------------------------------------------


def load_function(target: str) -> tuple[Callable, str]:
    """``FILE:FUNCTION`` -> the function (importing the file runs it) and its label."""
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise DeriveError(f"--backward takes FILE:FUNCTION (e.g. my_backprop.py:backward), "
                          f"got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise DeriveError(f"no such file {path_text!r}")
    module_name = f"_derive_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DeriveError(f"cannot import {path_text!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # noqa: BLE001 -- the user's module failed
        where = _user_frame(err, str(path.resolve()))
        raise DeriveError(f"importing {path_text} failed: {type(err).__name__}: {err}{where}"
                          ) from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DeriveError(f"{path_text} has no function {name!r}")
    return fn, f"{path_text}:{name}"


def _user_frame(err: BaseException, filename: str | None = None) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    mine = str(Path(__file__).resolve())
    user = [f for f in frames if f.filename != mine and (
        filename is None or f.filename == filename or "derive" not in f.filename)]
    if not user:
        return ""
    frame = user[-1]
    line = f": {frame.line.strip()}" if frame.line else ""
    return f" (at {Path(frame.filename).name} line {frame.lineno}{line})"


def _default_role(name: str, depth: int) -> str | None:
    lowered = name.lower()
    if lowered in ("x", "inputs", "input", "x_batch", "xb", "features"):
        return "X"
    if lowered in ("y", "targets", "target", "labels", "y_true", "yb", "t"):
        return "Y"
    if lowered in ("params", "parameters", "weights", "theta"):
        return "params"
    if lowered in ("output", "out", "y_hat", "yhat", "y_pred", "pred", "predictions", "al"):
        return f"A{depth}"
    match = re.fullmatch(r"([wb])(\d+)", lowered)
    if match and 1 <= int(match.group(2)) <= depth:
        return ("W" if match.group(1) == "w" else "b") + match.group(2)
    return None


def _param_global(name: str, depth: int) -> str | None:
    """A module global the function reads that derive sets by default: W1, b1, ..., params."""
    match = re.fullmatch(r"([Wwb])(\d+)", name)
    if match and 1 <= int(match.group(2)) <= depth:
        return ("W" if match.group(1) in "Ww" else "b") + match.group(2)
    if name in ("params", "parameters"):
        return "params"
    return None


def _roles(run: _Backprop, params: Mapping[str, np.ndarray], convention: Convention
           ) -> Callable[[str], Any]:
    model = run.model
    L = model.depth

    def user_layout(name: str, value: np.ndarray) -> np.ndarray:
        if name.startswith("W") and convention.weights == "in-out":
            return np.array(value.T)
        return np.array(value)

    def value(role: str) -> Any:
        if role == "X":
            return np.array(run.value("a", 0))
        if role == "Y":
            return np.array(run.value("y"))
        if role == "B":
            return run.value("y").shape[0]
        if role == "params":
            return {name: user_layout(name, v) for name, v in params.items()}
        letter, layer = role[0], int(role[1:])
        if letter in "Wb":
            if role not in params:
                raise DeriveError(f"role {role}: this network has "
                                  f"{', '.join(params)} (biases: {convention.bias})")
            return user_layout(role, params[role])
        if letter == "A" and 0 <= layer <= L:
            return np.array(run.value("a", layer))
        if letter == "Z" and 1 <= layer <= L:
            return np.array(run.value("z", layer))
        raise DeriveError(f"role {role}: layers are 1..{L} (A0 is the input)")

    return value


def _call(fn: Callable, value: Callable[[str], Any], convention: Convention, depth: int,
          label: str) -> tuple[Any, list[str], list[str]]:
    """Call ``fn`` as declared; returns (result, notes, removed globals)."""
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for name, parameter in inspect.signature(fn).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        role = convention.args.get(name) or _default_role(name, depth)
        if role is None:
            if parameter.default is not parameter.empty:
                continue
            raise DeriveError(
                f"{label}: don't know what to pass for parameter {name!r}; declare it with "
                f"--arg {name}=ROLE (roles: X, Y, B, params, W1.., b1.., A0..A{depth} "
                f"(the forward pass; A0 is X), Z1..Z{depth}; layers numbered from 1 as in "
                "derive)")
        if parameter.kind == parameter.KEYWORD_ONLY:
            keywords[name] = value(role)
        else:
            positional.append(value(role))
    notes: list[str] = []
    removed: list[str] = []
    namespace = dict(fn.__globals__)
    try:
        read = inspect.getclosurevars(fn).globals
    except (TypeError, ValueError):
        read = {}
    for name, current in read.items():
        if name in convention.globals_:
            continue
        role = _param_global(name, depth)
        if role is not None:
            namespace[name] = value(role)
            notes.append(f"{label.rpartition(':')[2]} reads the module global {name}; derive "
                         f"sets it to the random {role}")
        elif isinstance(current, np.ndarray) or (
                isinstance(current, (list, tuple, dict)) and current
                and all(isinstance(v, np.ndarray) for v in (
                    current.values() if isinstance(current, dict) else current))):
            del namespace[name]
            removed.append(name)
    for name, role in convention.globals_.items():
        namespace[name] = value(role)
        notes.append(f"module global {name} set to {role} (--global)")
    clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                               fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
        result = clone(*positional, **keywords)
    return result, notes, removed


def _returned(result: Any, convention: Convention, layout: Mapping[str, tuple[int, ...]],
              depth: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """The returned gradients keyed W1, b1, ... (user layout), and notes."""
    notes: list[str] = []
    names = list(layout)
    if convention.returns is not None:
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(values) != len(convention.returns):
            raise _Mismatch(f"returned {len(values)} values, --returns names "
                            f"{len(convention.returns)}")
        out = {}
        for role, v in zip(convention.returns, values):
            if role != "_":
                out[_gradient_key(role, depth)] = v
        return out, notes
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        result = result[1]          # (loss, grads), as derive's generated gradients()
    if isinstance(result, dict):
        out = {}
        for key, v in result.items():
            name = _gradient_key(str(key), depth, strict=False)
            if name is not None:
                out[name] = v
        return out, notes
    if isinstance(result, np.ndarray) and len(names) == 1:
        return {names[0]: result}, notes
    if isinstance(result, (tuple, list)):
        values = list(result)
        if len(values) == len(names):
            ordered = dict(zip(names, values))
            if _shapes_fit(ordered, layout):
                return ordered, notes
            backwards = dict(zip(_reverse_layers(names), values))
            if _shapes_fit(backwards, layout):
                notes.append("the gradients are returned output layer first")
                return backwards, notes
            return ordered, notes
        raise _Mismatch(f"returned {len(values)} values; expected {len(names)} "
                        f"({', '.join('d' + n for n in names)}); declare the order with "
                        "--returns")
    raise _Mismatch(f"returned {type(result).__name__}; expected the gradients as a tuple "
                    f"({', '.join('d' + n for n in names)}) or a dict")


def _gradient_key(role: str, depth: int, strict: bool = True) -> str | None:
    match = re.fullmatch(r"d?([WwBb])(\d+)", role)
    if match and 1 <= int(match.group(2)) <= depth:
        return ("W" if match.group(1) in "Ww" else "b") + match.group(2)
    if strict:
        raise DeriveError(f"--returns: {role!r} is not dW1, db1, ... or _")
    return None


def _reverse_layers(names: list[str]) -> list[str]:
    layers = sorted({int(n[1:]) for n in names}, reverse=True)
    return [n for l in layers for n in names if int(n[1:]) == l]


def _shapes_fit(grads: Mapping[str, Any], layout: Mapping[str, tuple[int, ...]]) -> bool:
    """Every value has its gradient's shape (a bias may come as a row or a column)."""
    return all(np.shape(v) == layout[k] or (k.startswith("b") and
                                            np.size(v) == int(np.prod(layout[k])))
               for k, v in grads.items())


class _Mismatch(Exception):
    pass


def check_backward(spec: NetworkSpec | str | Mapping, function: Callable | str,
                   convention: Convention | None = None, *, batch: int = BATCH, seed: int = 0,
                   loss: str | None = None) -> BackwardReport:
    """Run a hand-written backward ``function`` (a callable or ``"FILE:FUNCTION"``) on random
    data and compare its gradients with the derivation of ``spec`` (see :class:`Convention`).
    ``loss`` checks against ``spec`` with that built-in loss instead."""
    convention = convention or Convention()
    spec = load_spec(spec)
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
    if not convention.bias or loss is not None:
        spec = load_spec(data)
    if batch < 2:
        raise DeriveError("the batch needs at least 2 rows (to tell a sum from a mean)")
    if isinstance(function, str):
        fn, label = load_function(function)
    else:
        fn, label = function, getattr(function, "__name__", "function")
    derivation = derive(build_model(spec))
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
        Y = rng.uniform(0.05, 1.0, (batch, n[-1]))
        Y /= Y.sum(axis=1, keepdims=True)
    elif needs == "probability":
        Y = rng.uniform(0.05, 0.95, (batch, n[-1]))
    else:
        Y = rng.uniform(-1.0, 1.0, (batch, n[-1]))
    run = _Backprop(derivation, params, X, Y)
    report = BackwardReport(label, spec.name, convention, batch)
    layout = {name: (v.shape[::-1] if name.startswith("W") and convention.weights == "in-out"
                     else v.shape) for name, v in params.items()}
    value = _roles(run, params, convention)
    try:
        result, notes, removed = _call(fn, value, convention, model.depth, label)
    except DeriveError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 -- the user's function failed
        return _failure(report, err, fn, label, convention)
    notes_all = list(notes)
    try:
        returned, more = _returned(result, convention, layout, model.depth)
    except _Mismatch as err:
        return BackwardReport(label, spec.name, convention, batch, notes=tuple(notes_all),
                              error=(f"{label.rpartition(':')[2]} {err}",))
    notes_all += more
    if removed:
        notes_all.append(f"module globals removed for the call (not declared): "
                         f"{', '.join(removed)}")
    scale = 1.0 / batch if convention.reduction == "sum" else 1.0
    user: dict[str, np.ndarray] = {}
    checks: list[GradientCheck] = []
    reference = run.gradients()
    for name in params:
        if name not in returned:
            checks.append(GradientCheck(f"d{name}", False, math.inf, "not returned"))
            continue
        try:
            got = np.asarray(returned[name], dtype=float)
        except (TypeError, ValueError):
            checks.append(GradientCheck(f"d{name}", False, math.inf, "not an array of numbers"))
            continue
        note = ""
        expected_shape = layout[name]
        if got.shape != expected_shape:
            if got.size == int(np.prod(expected_shape)) and name.startswith("b"):
                got = got.reshape(expected_shape)
            elif got.shape == expected_shape[::-1]:
                note = (f"shape {got.shape} is the transpose of the {convention.weights} "
                        f"layout {expected_shape}")
                got = got.T
            else:
                checks.append(GradientCheck(f"d{name}", False, math.inf,
                                            f"shape {got.shape}, expected {expected_shape}"))
                continue
        if name.startswith("W") and convention.weights == "in-out":
            got = got.T
        got = got * scale
        user[name] = got
        error = _close(got, reference[name])
        checks.append(GradientCheck(f"d{name}", error < RTOL and not note, error, note))
    diagnosis: tuple[str, ...] = ()
    # the mistakes are tested only on a full set of numbers that are not already right
    diagnosed = len(user) == len(params) and any(not c.max_error < RTOL for c in checks)
    if diagnosed:
        diagnosis = _diagnose(user, _variants(spec, derivation, run), convention.reduction,
                              batch)
    return BackwardReport(label, spec.name, convention, batch, tuple(checks), diagnosis,
                          notes=tuple(notes_all), diagnosed=diagnosed)


def _first_graph_layer(spec: NetworkSpec) -> str:
    """Where ``spec`` stops being a plain chain of dense layers, in words."""
    for l, layer in enumerate(spec.layers, start=1):
        if layer.op != "dense":
            return f"layer {l} is {layer.op}"
        if layer.inputs is not None:
            return f"layer {l} reads layer {', '.join(map(str, layer.inputs))}"
    return "not a chain"


def _failure(report: BackwardReport, err: BaseException, fn: Callable, label: str,
             convention: Convention) -> BackwardReport:
    name = label.rpartition(":")[2]
    lines = [f"{name} raised {type(err).__name__}: {err}{_user_frame(err)}"]
    if isinstance(err, NameError):
        missing = getattr(err, "name", None) or (re.findall(r"'(\w+)'", str(err)) or [""])[0]
        if missing in fn.__globals__:
            lines.append(
                f"{name} reads {missing} from outside the function: a module-level value "
                "(left there by a forward pass or training loop) that is neither an argument "
                f"nor computed inside {name}. Called on its own, {name} fails; called after "
                "a forward pass on a different batch, it silently uses stale values.")
            lines.append(f"fix: pass {missing} as an argument or recompute it inside {name}; "
                         f"to check the function as it is, declare what it holds, e.g. "
                         f"--global {missing}=A1 (roles A0..AL, Z1..ZL, W1.., b1..)")
    return BackwardReport(label, report.spec_name, convention, report.batch,
                          error=tuple(lines))


# --- command-line options ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --backward options of ``derive check``."""
    group = parser.add_argument_group("checking hand-written backprop code")
    group.add_argument("--backward", metavar="FILE:FUNCTION",
                       help="a Python function computing gradients (its file is imported)")
    group.add_argument("--weights", choices=("out-in", "in-out"), default="out-in",
                       help="weight layout: out-in = (n_l, n_{l-1}), used as W @ x (default); "
                            "in-out = (n_{l-1}, n_l), used as X @ W")
    group.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                       help="the function returns the batch mean (default) or sum of the "
                            "per-sample gradients")
    group.add_argument("--no-bias", action="store_true",
                       help="the code has no biases: check against SPEC without them")
    group.add_argument("--loss", metavar="NAME",
                       help="check against SPEC with this built-in loss instead")
    group.add_argument("--arg", action="append", default=[], metavar="NAME=ROLE",
                       help="what to pass for the function parameter NAME: X, Y, B, params, "
                            "W1, b1, ..., A0..AL, Z1..ZL (derive's layer numbering)")
    group.add_argument("--global", dest="globals_", action="append", default=[],
                       metavar="NAME=ROLE", help="set the module global NAME for the call")
    group.add_argument("--returns", metavar="ROLES",
                       help="order of the returned gradients, e.g. dW1,db1,dW2,db2 (_ skips "
                            "one); default: a dict, or a tuple in layer order")
    group.add_argument("--batch", type=int, default=BATCH,
                       help=f"rows of the random batch (default {BATCH})")


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
                            returns)
    report = check_backward(args.spec, args.backward, convention, batch=args.batch,
                            seed=args.seed, loss=args.loss)
    for line in report.lines():
        echo(line)
    return report.exit_code

"""Numerical stability as named rewrites of SymPy expressions, applied before code is printed.

Code generation stage helper: takes expressions read from a :class:`~derive.derivation.Derivation`
(vector forms, see :mod:`derive.derivation.tensorform`) and gives equal expressions that evaluate without
overflow or log(0) in floating point. Each rewrite is an exact identity, has a name and its own
test, and is listed in :data:`REWRITES`; printers never special-case a formula.

Two vector functions are added for the softmax output layer: :class:`Softmax` (v ↦ e^v / Σe^v,
row-wise in the batch reading) and :class:`LogSumExp` (v ↦ log Σ e^v, one value per sample).
Printers evaluate both with the row maximum subtracted first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1

from derive.derivation.tensorform import ONE, Inner
from derive.registry.functions import sigmoid, softplus


class Softmax(sp.Function):
    """``Softmax(v)`` = e^v / Σ_i e^{v_i}, a vector function (row-wise in a batch)."""

    nargs = 1


class LogSumExp(sp.Function):
    """``LogSumExp(v)`` = log Σ_i e^{v_i}, one scalar per sample."""

    nargs = 1


@dataclass(frozen=True)
class Rewrite:
    """A named exact identity ``apply(expr) -> expr`` that makes evaluation stable."""

    name: str
    identity: str
    apply: Callable[[sp.Expr], sp.Expr]


def _replace(pattern: Callable[[sp.Basic], bool], build: Callable[[sp.Basic], sp.Basic]):
    """A rewrite body: replace every subexpression matching ``pattern`` by ``build(match)``."""

    def apply(expr: sp.Expr) -> sp.Expr:
        return expr.replace(pattern, build)

    return apply


def _exp_argument(expr: sp.Basic) -> sp.Expr | None:
    return expr.args[0] if isinstance(expr, sp.exp) else None


def _one_plus_exp(expr: sp.Basic) -> sp.Expr | None:
    """x when ``expr`` is 1 + e^x, else None."""
    if isinstance(expr, sp.Add) and len(expr.args) == 2 and sp.Integer(1) in expr.args:
        (other,) = [arg for arg in expr.args if arg != 1]
        return _exp_argument(other)
    return None


def _sigmoid_from_exp(expr: sp.Expr) -> sp.Expr:
    # 1 / (1 + e^{-x}) -> sigmoid(x)
    expr = expr.replace(
        lambda e: isinstance(e, sp.Pow) and e.exp == -1 and _one_plus_exp(e.base) is not None,
        lambda e: sigmoid(-_one_plus_exp(e.base)),
    )

    # e^x / (1 + e^x) -> sigmoid(x), inside any product
    def fold(mul: sp.Mul) -> sp.Expr:
        factors = list(mul.args)
        for factor in factors:
            x = _exp_argument(factor)
            if x is None:
                continue
            for other in factors:
                if isinstance(other, sigmoid) and other.args[0] == -x:
                    # e^x sigmoid(-x) = e^x / (1 + e^x) = sigmoid(x)
                    rest = [f for f in factors if f is not factor and f is not other]
                    return sp.Mul(sigmoid(x), *rest)
        return mul

    return expr.replace(lambda e: isinstance(e, sp.Mul), fold)


def _softmax_parts(mul: sp.Basic) -> sp.Expr | None:
    """v when ``mul`` is e^v / Inner(1, e^v), else None."""
    if not isinstance(mul, sp.Mul) or len(mul.args) != 2:
        return None
    for numerator, denominator in (mul.args, reversed(mul.args)):
        v = _exp_argument(numerator)
        if (v is not None and isinstance(denominator, sp.Pow) and denominator.exp == -1
                and denominator.base == Inner(ONE, numerator)):
            return v
    return None


def _clamp_piecewise(expr: sp.Expr) -> sp.Expr:
    """Piecewise((e1, x > 0), (e2, True)): e2 only matters where x <= 0, so evaluate it at
    min(x, 0) (and e1 at max(x, 0)) when it holds an exponential, which could overflow in the
    branch that np.where computes but discards."""

    def clamp(pw: sp.Piecewise) -> sp.Expr:
        (pos, cond), (neg, other) = pw.args
        x = cond.lhs
        if pos.has(sp.exp):
            pos = pos.xreplace({x: sp.Max(x, 0)})
        if neg.has(sp.exp):
            neg = neg.xreplace({x: sp.Min(x, 0)})
        return sp.Piecewise((pos, cond), (neg, other), evaluate=False)

    return expr.replace(
        lambda e: isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1].cond == sp.true
        and isinstance(e.args[0].cond, sp.StrictGreaterThan) and e.args[0].cond.rhs == 0
        and (e.args[0].expr.has(sp.exp) or e.args[1].expr.has(sp.exp))
        and not e.has(sp.Min, sp.Max),
        clamp,
    )


#: The rewrites, in the order they are applied. Each is an identity of real functions.
REWRITES: tuple[Rewrite, ...] = (
    Rewrite("sigmoid_from_exp", "1/(1 + e^-x) = e^x/(1 + e^x) = sigmoid(x)", _sigmoid_from_exp),
    Rewrite("softplus_from_log", "log(1 + e^x) = softplus(x)", _replace(
        lambda e: isinstance(e, sp.log) and _one_plus_exp(e.args[0]) is not None,
        lambda e: softplus(_one_plus_exp(e.args[0])))),
    Rewrite("softmax", "e^v / sum(e^v) = Softmax(v), evaluated after subtracting max(v)",
            _replace(lambda e: _softmax_parts(e) is not None,
                     lambda e: Softmax(_softmax_parts(e)))),
    Rewrite("log_softmax", "log Softmax(v) = v - LogSumExp(v)", _replace(
        lambda e: isinstance(e, sp.log) and isinstance(e.args[0], Softmax),
        lambda e: e.args[0].args[0] - LogSumExp(e.args[0].args[0]))),
    Rewrite("log_sigmoid", "log sigmoid(x) = -softplus(-x)", _replace(
        lambda e: isinstance(e, sp.log) and isinstance(e.args[0], sigmoid),
        lambda e: -softplus(-e.args[0].args[0]))),
    Rewrite("log_one_minus_sigmoid", "log(1 - sigmoid(x)) = -softplus(x)", _replace(
        lambda e: isinstance(e, sp.log) and isinstance(-e.args[0] + 1, sigmoid),
        lambda e: -softplus((-e.args[0] + 1).args[0]))),
    Rewrite("relu_as_max", "Piecewise((x, x > 0), (0, True)) = max(x, 0)", _replace(
        lambda e: isinstance(e, sp.Piecewise) and len(e.args) == 2
        and e.args[1] == (sp.Integer(0), sp.true) and e.args[0].cond == (e.args[0].expr > 0),
        lambda e: sp.Max(e.args[0].expr, 0))),
    Rewrite("clamp_piecewise_exp",
            "Piecewise((f(x), x > 0), (g(x), True)) = Piecewise((f(max(x, 0)), x > 0), "
            "(g(min(x, 0)), True))", _clamp_piecewise),
    Rewrite("expm1", "e^x - 1 = expm1(x), exact near x = 0", _replace(
        lambda e: isinstance(e, sp.Add) and len(e.args) == 2 and sp.Integer(-1) in e.args
        and any(isinstance(arg, sp.exp) for arg in e.args),
        lambda e: expm1(next(arg for arg in e.args if isinstance(arg, sp.exp)).args[0]))),
)


@dataclass(frozen=True)
class Stable:
    """A stabilised expression and the names of the rewrites that changed it."""

    expr: sp.Expr
    applied: tuple[str, ...]


def stabilize(expr: sp.Expr, rewrites: tuple[Rewrite, ...] = REWRITES) -> Stable:
    """Apply every rewrite in order; record which ones changed the expression."""
    applied = []
    for rewrite in rewrites:
        result = rewrite.apply(expr)
        if result != expr:
            applied.append(rewrite.name)
            expr = result
    return Stable(expr, tuple(applied))


def rewrite(name: str) -> Rewrite:
    """The rewrite called ``name``."""
    for candidate in REWRITES:
        if candidate.name == name:
            return candidate
    raise KeyError(name)

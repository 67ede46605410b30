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

import math
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1

from derive.derivation.stepform import Causal, SumLast
from derive.derivation.tensorform import ONE, Inner
from derive.registry.functions import sigmoid, softplus


class Softmax(sp.Function):
    """``Softmax(v)`` = e^v / Σ_i e^{v_i}, a vector function (row-wise in a batch)."""

    nargs = 1


class CausalSoftmax(sp.Function):
    """``CausalSoftmax(v)``: of a (T, T) matrix, row t's softmax over columns τ ≤ t (0
    beyond): causal attention's weights."""

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


def _minus_one_part(expr: sp.Basic) -> tuple[int, sp.Expr] | None:
    """(s, x) when ``expr`` is s·(e^x - 1) with s = ±1, else None."""
    if not isinstance(expr, sp.Add) or len(expr.args) != 2:
        return None
    for sign in (1, -1):
        x = _exp_argument(sign * expr + 1)
        if x is not None and sp.Integer(-sign) in expr.args:
            return sign, x
    return None


def _log_one_plus_exp(expr: sp.Expr) -> sp.Expr:
    return expr.replace(lambda e: isinstance(e, sp.log) and _one_plus_exp(e.args[0]) is not None,
                        lambda e: softplus(_one_plus_exp(e.args[0])))


def _softmax_parts(mul: sp.Basic, masked: bool = False) -> sp.Expr | None:
    """v when ``mul`` is e^v / Inner(1, e^v) (or over the last axis of a whole sequence:
    e^v / SumLast(e^v)); with ``masked``, v when it is [τ ≤ t] e^v over the same sum of
    masked terms (causal attention). Else None."""
    if not isinstance(mul, sp.Mul) or len(mul.args) != 2 + masked:
        return None
    mask = [a for a in mul.args if isinstance(a, Causal)]
    if len(mask) != masked:
        return None
    args = [a for a in mul.args if not isinstance(a, Causal)]
    for numerator, denominator in (args, reversed(args)):
        v = _exp_argument(numerator)
        whole = sp.Mul(*mask, numerator)
        if (v is not None and isinstance(denominator, sp.Pow) and denominator.exp == -1
                and denominator.base in (Inner(ONE, whole), SumLast(whole))):
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


def _log_cosh(expr: sp.Expr) -> sp.Expr:
    # log cosh u = |u| + log((1 + e^{-2|u|}) / 2): cosh overflows past |u| = 710, this does not
    def build(log: sp.log) -> sp.Expr:
        size = sp.Abs(log.args[0].args[0])
        return size + softplus(-2 * size) - sp.log(2)

    return expr.replace(lambda e: isinstance(e, sp.log) and isinstance(e.args[0], sp.cosh), build)


_EXPONENTIAL = (sp.exp, sp.cosh, sp.sinh)


def _exponent(arg: sp.Expr) -> tuple[sp.Rational, sp.Expr] | None:
    """(c, u) with ``arg`` = c·u, c rational and u's sign canonical (a - y, never y - a)."""
    content, rest = arg.as_content_primitive()
    coefficient, u = rest.as_coeff_Mul(rational=True)
    if u.could_extract_minus_sign():
        coefficient, u = -coefficient, -u
    return (content * coefficient, u) if u.free_symbols else None


def _as_exponentials(expr: sp.Expr) -> sp.Expr:
    """cosh, sinh and sigmoid of ``expr`` written with e^x (their arguments left alone)."""
    return expr.replace(
        lambda e: isinstance(e, sp.cosh | sp.sinh | sigmoid),
        lambda e: 1 / (1 + sp.exp(-e.args[0])) if isinstance(e, sigmoid) else
        (sp.exp(e.args[0]) + (1 if isinstance(e, sp.cosh) else -1) * sp.exp(-e.args[0])) / 2)


def _by_sign(product: sp.Expr, log: bool = False) -> sp.Expr | None:
    """A product of powers of sums of exponentials e^{c·u} (one u), normalised by the largest
    exponential of each sum for u > 0 and by the smallest for u <= 0 (with ``log``: the log of
    the product, so normalised), else None.

    Each sum becomes e^{K u} times a sum whose terms are at most its coefficients in size, and
    the powers of e^{K u} are collected into one exponential; each branch reads u clamped to
    its side of 0, so that the branch np.where discards cannot overflow either.
    """
    product = sp.powsimp(_as_exponentials(product), deep=True, combine="exp")  # e^a e^-y = e^(a-y)
    exponents = {e: _exponent(e.args[0]) for e in product.atoms(sp.exp) if not e.is_number}
    if not exponents or None in exponents.values() or len({u for _, u in
                                                             exponents.values()}) != 1:
        return None
    if product.has(sp.Max, sp.Min):
        return None                                   # normalised (and clamped) already
    u = next(iter(exponents.values()))[1]
    scale = math.lcm(*(int(c.q) for c, _ in exponents.values()))   # t = e^{u / scale}
    t = sp.Dummy("t", positive=True)
    in_t = product.xreplace({e: t ** (c * scale) for e, (c, _) in exponents.items()})
    if in_t.has(*_EXPONENTIAL):
        return None                                   # an exponential of another argument
    constant = []
    factors: list[tuple[list[tuple[sp.Expr, sp.Expr]], sp.Expr]] = []   # ([(coeff, k)], power)
    for factor in sp.Mul.make_args(in_t):
        if not factor.has(t):
            constant.append(factor)
            continue
        base, power = factor.as_base_exp()
        terms = [term.as_coeff_exponent(t) for term in sp.Add.make_args(sp.expand(base))]
        if not power.is_Rational or any(c.has(t) for c, _ in terms):
            return None                               # not a power of a sum c_k t^k
        factors.append((terms, power))
    if all(len({k for _, k in terms}) < 2 for terms, _ in factors):
        return None                                   # no sum of exponentials to normalise
    if len(factors) == 1 and factors[0][1] > 0 and not log:
        return None                                   # a sum alone overflows only with its value

    def branch(clamped: sp.Expr, pick: Callable) -> sp.Expr:
        total, out = sp.Integer(0), list(constant)
        for terms, power in factors:
            top = pick(k for _, k in terms)
            total += top * power
            out.append(sp.Add(*(c * sp.exp((k - top) * clamped / scale) for c, k in terms))
                       ** power)
        if log:
            return total * clamped / scale + sp.Add(*(
                _log_one_plus_exp(sp.expand_log(sp.log(f), force=True)) for f in out))
        # 1 / (1 + e^{-x}) in a branch is the sigmoid, as everywhere else
        return _sigmoid_from_exp(sp.Mul(sp.exp(total * clamped / scale), *out))

    if u.is_nonnegative:                              # one side only: softplus(z), z²
        return branch(u, max)
    return sp.Piecewise((branch(sp.Max(u, 0), max), u > 0), (branch(sp.Min(u, 0), min), True))


def _exp_ratios(expr: sp.Expr) -> sp.Expr:
    """Every product holding exponentials, and the log of one, outermost first, normalised by
    :func:`_by_sign`; a sigmoid counts as a ratio of exponentials beside other exponentials."""
    if expr.is_Atom or not expr.has(*_EXPONENTIAL):
        return expr
    if isinstance(expr, sp.log):
        normalised = _by_sign(expr.args[0], log=True)
        if normalised is not None:
            return normalised
    if isinstance(expr, sp.Mul | sp.Pow):
        # the factors holding exponentials, grouped by the argument u of their exponentials
        groups: dict[frozenset, list[sp.Expr]] = {}
        for factor in sp.Mul.make_args(expr):
            groups.setdefault(_arguments(factor), []).append(factor)
        out = []
        for arguments, factors in groups.items():
            normalised = _by_sign(sp.Mul(*factors)) if arguments else None
            out.append(normalised if normalised is not None else
                       sp.Mul(*(_inside(f) for f in factors)))
        return sp.Mul(*out)
    return _inside(expr)


def _inside(expr: sp.Expr) -> sp.Expr:
    """``expr`` with :func:`_exp_ratios` applied to its arguments."""
    return expr if expr.is_Atom else expr.func(*(_exp_ratios(arg) for arg in expr.args))


def _arguments(factor: sp.Expr) -> frozenset:
    """The arguments u of the exponentials e^{c·u} in ``factor`` (sigmoids included)."""
    if not factor.has(*_EXPONENTIAL, sigmoid):
        return frozenset()
    combined = sp.powsimp(_as_exponentials(factor), deep=True, combine="exp")
    return frozenset(_exponent(e.args[0]) and _exponent(e.args[0])[1]
                     for e in combined.atoms(sp.exp) if not e.is_number)


#: The rewrites, in the order they are applied. Each is an identity of real functions.
REWRITES: tuple[Rewrite, ...] = (
    Rewrite("sigmoid_from_exp", "1/(1 + e^-x) = e^x/(1 + e^x) = sigmoid(x)", _sigmoid_from_exp),
    Rewrite("softplus_from_log", "log(1 + e^x) = softplus(x)", _log_one_plus_exp),
    Rewrite("softmax", "e^v / sum(e^v) = Softmax(v), evaluated after subtracting max(v)",
            _replace(lambda e: _softmax_parts(e) is not None,
                     lambda e: Softmax(_softmax_parts(e)))),
    Rewrite("causal_softmax", "[τ ≤ t] e^v / sum([τ ≤ t] e^v) = CausalSoftmax(v), evaluated "
            "with the masked entries at -inf, after subtracting the row maximum", _replace(
                lambda e: _softmax_parts(e, masked=True) is not None,
                lambda e: CausalSoftmax(_softmax_parts(e, masked=True)))),
    Rewrite("log_softmax", "log Softmax(v) = v - LogSumExp(v)", _replace(
        lambda e: isinstance(e, sp.log) and isinstance(e.args[0], Softmax),
        lambda e: e.args[0].args[0] - LogSumExp(e.args[0].args[0]))),
    Rewrite("log_sigmoid", "log sigmoid(x) = -softplus(-x)", _replace(
        lambda e: isinstance(e, sp.log) and isinstance(e.args[0], sigmoid),
        lambda e: -softplus(-e.args[0].args[0]))),
    Rewrite("log_one_minus_sigmoid", "log(1 - sigmoid(x)) = -softplus(x)", _replace(
        lambda e: isinstance(e, sp.log) and isinstance(-e.args[0] + 1, sigmoid),
        lambda e: -softplus((-e.args[0] + 1).args[0]))),
    Rewrite("log_cosh", "log cosh u = |u| + softplus(-2|u|) - log 2", _log_cosh),
    Rewrite("exp_ratio", "a product of powers of sums of c e^{k u} (or its log) = the same "
            "with each sum divided by its largest e^{k u} (u > 0) or smallest (u <= 0), the "
            "powers of e^u collected", _exp_ratios),
    Rewrite("relu_as_max", "Piecewise((x, x > 0), (0, True)) = max(x, 0)", _replace(
        lambda e: isinstance(e, sp.Piecewise) and len(e.args) == 2
        and e.args[1] == (sp.Integer(0), sp.true) and e.args[0].cond == (e.args[0].expr > 0),
        lambda e: sp.Max(e.args[0].expr, 0))),
    Rewrite("clamp_piecewise_exp",
            "Piecewise((f(x), x > 0), (g(x), True)) = Piecewise((f(max(x, 0)), x > 0), "
            "(g(min(x, 0)), True))", _clamp_piecewise),
    Rewrite("expm1", "±(e^x - 1) = ±expm1(x), exact near x = 0", _replace(
        lambda e: _minus_one_part(e) is not None,
        lambda e: _minus_one_part(e)[0] * expm1(_minus_one_part(e)[1]))),
)


#: What some rewrite looks for: an expression without any of these is stable as it is.
_TRIGGERS = (sp.exp, sp.log, sp.cosh, sp.sinh, sigmoid, sp.Piecewise)


@dataclass(frozen=True)
class Stable:
    """A stabilised expression and the names of the rewrites that changed it."""

    expr: sp.Expr
    applied: tuple[str, ...]


def stabilize(expr: sp.Expr, rewrites: tuple[Rewrite, ...] = REWRITES) -> Stable:
    """Apply every rewrite in order; record which ones changed the expression."""
    if not expr.has(*_TRIGGERS):
        return Stable(expr, ())         # nothing any rewrite reads (most of a deep network)
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

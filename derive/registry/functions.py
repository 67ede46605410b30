"""Registry of activations and losses, each defined once as a SymPy expression.

Activations are expressions in the pre-activation ``z`` (elementwise), except ``softmax``, which
is a vector function built by :mod:`derive.graph.model`. Losses are per output component, in the
activation ``a`` and the target ``y``; the per-sample loss is their sum over components.
Derivatives are never typed in here: downstream stages call ``sympy.diff`` on these
expressions. ``sigmoid`` and ``softplus`` are SymPy functions (with ``fdiff`` and a rewrite to
elementary functions) so that printers can emit numerically stable code for them.

:data:`SCALAR_FUNCTIONS` is the one table of the functions users may call in expressions:
the whitelists of both user-expression parsers (:mod:`derive.registry.safe_expr` for a spec's
custom activations and losses, :mod:`derive.check.parser` for ``derive check`` formulas) are
derived from it, so a function added here is accepted by both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import sympy as sp

from derive.errors import DeriveError

#: The scalar variables of registry expressions.
Z = sp.Symbol("z", real=True)
A = sp.Symbol("a", real=True)
Y = sp.Symbol("y", real=True)


class sigmoid(sp.Function):
    """The logistic function 1 / (1 + e^{-x})."""

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        # d/dx 1/(1+e^{-x}) = e^{-x}/(1+e^{-x})^2, which SymPy confirms equals this form
        # (tests check it); the closed form keeps sigmoid(x) recognisable downstream.
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return 1 / (1 + sp.exp(-x))

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class softplus(sp.Function):
    """log(1 + e^x)."""

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs: object) -> sp.Expr:
        return sp.log(1 + sp.exp(x))

    def _eval_is_real(self) -> bool | None:
        return self.args[0].is_real

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


def step(x: sp.Expr) -> sp.Expr:
    """The unit step [x > 0] (0 at x = 0, as the relu family's derivative there)."""
    return sp.Piecewise((1, x > 0), (0, True))


@dataclass(frozen=True)
class ScalarFunction:
    """A function user expressions may call: what it builds, and its number of arguments
    (``variadic``: at least ``arity``)."""

    build: Callable[..., sp.Expr]
    arity: int = 1
    variadic: bool = False


_LOG = ScalarFunction(sp.log)
_ABS = ScalarFunction(sp.Abs)
_MAX = ScalarFunction(sp.Max, arity=2, variadic=True)
_MIN = ScalarFunction(sp.Min, arity=2, variadic=True)

#: The scalar functions user expressions may call, by every name they may be written with:
#: SymPy's elementary functions, the step [x > 0], and derive's own sigmoid and softplus.
#: The spec's expression parser accepts exactly these names, the formula parser of
#: ``derive check`` these and the activations' names.
SCALAR_FUNCTIONS: Mapping[str, ScalarFunction] = {
    "exp": ScalarFunction(sp.exp),
    "log": _LOG,
    "ln": _LOG,
    "sqrt": ScalarFunction(sp.sqrt),
    "tanh": ScalarFunction(sp.tanh),
    "sinh": ScalarFunction(sp.sinh),
    "cosh": ScalarFunction(sp.cosh),
    "erf": ScalarFunction(sp.erf),
    "abs": _ABS,
    "Abs": _ABS,
    "max": _MAX,
    "Max": _MAX,
    "min": _MIN,
    "Min": _MIN,
    "step": ScalarFunction(step),
    "sigmoid": ScalarFunction(sigmoid),
    "softplus": ScalarFunction(softplus),
}


def elementary(expr: sp.Expr) -> sp.Expr:
    """``expr`` with derive's own functions rewritten to SymPy's elementary functions, and
    abs/max/min/sign as piecewise expressions: forms every engine (SymEngine, mpmath) can
    both differentiate and evaluate."""
    if expr.has(sigmoid, softplus):
        expr = expr.rewrite(sp.exp)
    if expr.has(sp.Abs, sp.Max, sp.Min, sp.sign):
        expr = expr.rewrite(sp.Piecewise)
    return expr


@dataclass(frozen=True)
class Activation:
    """A resolved activation: its name, parameters and scalar expression in :data:`Z`.

    ``expr`` is ``None`` for a vector activation (softmax), whose ``vector(z, j, m, n)``
    builds the index form of output j from the IndexedBase z of width n (m a summation index). ``output_range`` is
    ``(low, high)`` when every output lies strictly inside that interval (used to check that a
    cross-entropy loss gets probabilities).
    """

    name: str
    params: tuple[tuple[str, float], ...] = ()
    expr: sp.Expr | None = None
    output_range: tuple[float, float] | None = None
    custom: bool = False
    vector: VectorBuilder | None = field(default=None, compare=False)

    #: The variable of ``expr``.
    variable = Z

    @property
    def is_softmax(self) -> bool:
        """Whether this is a vector function of the whole layer (softmax) rather than
        elementwise."""
        return self.vector is not None

    @property
    def is_probability(self) -> bool:
        return self.output_range is not None and self.output_range[0] >= 0 and (
            self.output_range[1] <= 1
        )


@dataclass(frozen=True)
class Loss:
    """A resolved per-component loss ``expr`` in :data:`A` and :data:`Y`.

    ``needs`` says what the output must be: ``"probability"`` (each a_j in (0, 1)) or
    ``"distribution"`` (softmax output, targets summing to 1), or ``None``.
    """

    name: str
    expr: sp.Expr
    needs: str | None = None
    custom: bool = False


#: Builds the index form of output j of a vector activation: (z, j, m, n) -> expression.
VectorBuilder = Callable[[sp.IndexedBase, sp.Symbol, sp.Symbol, sp.Expr], sp.Expr]


def _softmax(z: sp.IndexedBase, j: sp.Symbol, m: sp.Symbol, n: sp.Expr) -> sp.Expr:
    return sp.exp(z[j]) / sp.Sum(sp.exp(z[m]), (m, 1, n))


@dataclass(frozen=True)
class ActivationEntry:
    build: Callable[..., sp.Expr | None]
    params: tuple[tuple[str, float], ...] = ()
    output_range: tuple[float, float] | None = None
    description: str = ""
    vector: VectorBuilder | None = None


def _piecewise_positive(pos: sp.Expr, neg: sp.Expr) -> sp.Expr:
    # "z > 0" strictly, so the derivative at exactly 0 takes the negative branch (as PyTorch).
    return sp.Piecewise((pos, Z > 0), (neg, True))


ACTIVATIONS: Mapping[str, ActivationEntry] = {
    "identity": ActivationEntry(lambda: Z, description="z"),
    "sigmoid": ActivationEntry(lambda: sigmoid(Z), output_range=(0.0, 1.0),
                               description="1 / (1 + exp(-z))"),
    "tanh": ActivationEntry(lambda: sp.tanh(Z), output_range=(-1.0, 1.0), description="tanh z"),
    "relu": ActivationEntry(lambda: _piecewise_positive(Z, sp.Integer(0)),
                            description="max(0, z); derivative 0 at z = 0"),
    "leaky_relu": ActivationEntry(
        lambda alpha: _piecewise_positive(Z, alpha * Z), params=(("alpha", 0.01),),
        description="z if z > 0 else alpha*z"),
    "softplus": ActivationEntry(lambda: softplus(Z), description="log(1 + exp(z))"),
    "elu": ActivationEntry(
        lambda alpha: _piecewise_positive(Z, alpha * (sp.exp(Z) - 1)), params=(("alpha", 1.0),),
        description="z if z > 0 else alpha*(exp(z) - 1)"),
    "silu": ActivationEntry(lambda: Z * sigmoid(Z), description="z * sigmoid(z)"),
    "gelu": ActivationEntry(lambda: Z * (1 + sp.erf(Z / sp.sqrt(2))) / 2,
                            description="z * Phi(z), exact (erf) form"),
    "softmax": ActivationEntry(lambda: None, output_range=(0.0, 1.0),
                               description="exp(z_j) / sum_i exp(z_i); last layer only",
                               vector=_softmax),
}

LOSSES: Mapping[str, Loss] = {
    "mse": Loss("mse", (A - Y) ** 2 / 2),
    "cross_entropy": Loss("cross_entropy", -Y * sp.log(A), needs="distribution"),
    "binary_cross_entropy": Loss(
        "binary_cross_entropy", -(Y * sp.log(A) + (1 - Y) * sp.log(1 - A)), needs="probability"
    ),
}
LOSS_DESCRIPTIONS: Mapping[str, str] = {
    "mse": "1/2 sum_j (a_j - y_j)^2",
    "cross_entropy": "-sum_j y_j log a_j (softmax output, targets a probability vector)",
    "binary_cross_entropy": "-sum_j [y_j log a_j + (1 - y_j) log(1 - a_j)] (outputs in (0, 1))",
}


def _number(value: float) -> sp.Expr:
    """An exact SymPy number for a parameter (0.01 becomes 1/100, not a binary float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DeriveError(f"parameter must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DeriveError(f"parameter must be a finite number, got {value!r}")
    return sp.Integer(value) if isinstance(value, int) else sp.Rational(repr(float(value)))


def resolve_activation(name: str, params: Mapping[str, float] | None = None,
                       expr: str | None = None) -> Activation:
    """The :class:`Activation` for a built-in name with parameters, or a custom ``expr``."""
    from derive.registry.safe_expr import parse_expression  # on use: safe_expr reads this module

    params = dict(params or {})
    if expr is not None:
        return Activation(name, expr=parse_expression(expr, {"z": Z}), custom=True)
    if name not in ACTIVATIONS:
        known = ", ".join(ACTIVATIONS)
        raise DeriveError(f"unknown activation {name!r}; known: {known} (or give an expr)")
    entry = ACTIVATIONS[name]
    allowed = dict(entry.params)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise DeriveError(f"activation {name!r} has no parameter {unknown[0]!r}; "
                          f"allowed: {', '.join(allowed) or 'none'}")
    # _number checks each value before float() sees it (float("abc") is not a DeriveError).
    built = entry.build(*(_number(params.get(key, default)) for key, default in entry.params))
    values = {key: float(params.get(key, default)) for key, default in entry.params}
    return Activation(name, tuple(values.items()), built, entry.output_range,
                      vector=entry.vector)


def resolve_loss(name: str, expr: str | None = None) -> Loss:
    """The :class:`Loss` for a built-in name or a custom per-component ``expr`` in a, y."""
    from derive.registry.safe_expr import parse_expression  # on use: safe_expr reads this module

    if expr is not None:
        return Loss(name, parse_expression(expr, {"a": A, "y": Y}), custom=True)
    if name not in LOSSES:
        raise DeriveError(f"unknown loss {name!r}; known: {', '.join(LOSSES)} (or give an expr)")
    return LOSSES[name]

"""Where generated code for a custom function overflows though the function does not.

Code generation stage helper: the named rewrites of :mod:`derive.render.stability` make the
built-in activations and losses safe, and each has its own test; a custom activation or loss
may still need a form none of them finds. :func:`first_overflow` evaluates a stabilised
expression as the generated module will (printed by
:class:`~derive.render.numpy_printer.NumPyBatchPrinter`, with its helpers, in float64) over
arguments up to 1e4 in size, and compares it with the exact expression evaluated with 30
digits: a point where the code gives inf or NaN but the exact value is a finite float64 is an
overflow the rewrites missed. Codegen reports it (see :func:`derive.render.codegen.render_module`).
"""

from __future__ import annotations

import itertools
import math

import mpmath
import numpy as np
import sympy as sp

from derive.derivation.imageform import (
    FirstMaxMask,
    Flatten,
    Fold,
    Unflatten,
    Windows,
    WindowsMax,
)
from derive.derivation.stepform import Block, StepGuard, SumSteps
from derive.derivation.tensorform import Broadcast, Einsum, Inner, MatVec, Outer, Total
from derive.quantities import NetTensor
from derive.registry.functions import elementary
from derive.render.numpy_printer import BATCH, HELPERS, NumPyBatchPrinter, batch_name

#: Values the driving argument (a pre-activation z^l) takes, and the targets y with them.
ARGUMENTS = (-1e4, -1e3, -700.0, -400.0, -100.0, -30.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 30.0,
             100.0, 400.0, 700.0, 1e3, 1e4)
TARGETS = (-1.0, 0.0, 0.5, 1.0)
#: The value every other quantity (weights, errors of other nodes, matrix products) takes.
OTHER = sp.Float(0.7)
#: The tensor-form operations over whole arrays, each standing for one number in the probe:
#: products and sums, and the windows, folds, maxima and reshapes of feature maps.
ARRAY_OPERATIONS = (MatVec, Outer, Inner, Einsum, Total, Broadcast, Windows, WindowsMax,
                    FirstMaxMask, Fold, Flatten, Unflatten)
#: Largest exact value a float64 result is expected to hold.
LARGEST = 1e300


def _helpers() -> dict[str, object]:
    namespace: dict[str, object] = {"np": np}
    for source in HELPERS.values():
        exec(source, namespace)  # noqa: S102 - derive's own helper source, as modules hold it
    return namespace


def _others(expr: sp.Expr, keep: set[NetTensor]) -> dict[sp.Basic, sp.Expr]:
    """Every quantity of ``expr`` but ``keep``, and every array operation, mapped to OTHER."""
    mapping: dict[sp.Basic, sp.Expr] = {t: OTHER for t in expr.atoms(NetTensor) if t not in keep}
    mapping.update({t: OTHER for t in expr.atoms(*ARRAY_OPERATIONS)})
    mapping[BATCH] = sp.Integer(1)
    return mapping


def _one_step(expr: sp.Expr) -> sp.Expr:
    """A sequence formula at one step t inside 1..T, where every term is there: a guard by
    the step 1, a sum over the steps its term, a block of stacked features its array (which
    the probe gives one number anyway)."""
    return (expr.replace(lambda e: isinstance(e, StepGuard), lambda e: sp.Integer(1))
            .replace(lambda e: isinstance(e, SumSteps), lambda e: e.args[0])
            .replace(lambda e: isinstance(e, Block), lambda e: e.args[0]))


def _exact(expr: sp.Expr, z: NetTensor, y: NetTensor):
    """The exact value of ``expr`` at (z, y), to 30 digits, as a float or None if not finite."""
    function = sp.lambdify((z, y), elementary(expr), modules="mpmath")

    def value(at_z: float, at_y: float) -> float | None:
        with mpmath.workdps(30):
            try:
                result = function(mpmath.mpf(at_z), mpmath.mpf(at_y))
            except (ZeroDivisionError, ValueError, OverflowError):
                return None
            if not isinstance(result, mpmath.mpf) or not mpmath.isfinite(result):
                return None
            return float(result) if abs(result) < LARGEST else None

    return value


def first_overflow(stable: sp.Expr, exact: sp.Expr, z: NetTensor,
                   outputs: dict[NetTensor, tuple[sp.Expr, sp.Expr]]) -> float | None:
    """The first argument z at which ``stable`` (as generated code) is inf or NaN although
    ``exact`` is finite, or None.

    ``outputs`` maps a quantity computed from z (a^l = σ(z^l)) to its (stable, exact)
    expressions in z; the target y takes each of :data:`TARGETS`; every other quantity is
    :data:`OTHER`.
    """
    y = NetTensor("y")
    stable = _one_step(stable.xreplace({a: pair[0] for a, pair in outputs.items()}))
    exact = _one_step(exact.xreplace({a: pair[1] for a, pair in outputs.items()}))
    stable = stable.xreplace(_others(stable, {z, y}))
    exact = exact.xreplace(_others(exact, {z, y}))
    if not stable.has(z):
        return None
    points = list(itertools.product(ARGUMENTS, TARGETS))
    namespace = _helpers()
    namespace[batch_name(z)] = np.array([p[0] for p in points])
    namespace["Y"] = np.array([p[1] for p in points])
    code = NumPyBatchPrinter().doprint(stable)      # printed by derive from parsed SymPy
    with np.errstate(all="ignore"):
        computed = np.broadcast_to(eval(code, namespace), (len(points),))
    value = _exact(exact, z, y)
    for (at_z, at_y), result in zip(points, computed):
        if not math.isfinite(result) and value(at_z, at_y) is not None:
            return at_z
    return None

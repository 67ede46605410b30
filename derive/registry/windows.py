"""SymPy objects of sliding windows in index form: the maximum over a window, the indicator of
its first maximum, and the Iverson bracket of an index range.

A max-pooling layer's forward expression is ``WindowMax(x[j, 2r + p - 2, 2s + q - 2], (p, 1,
2), (q, 1, 2))``: the maximum over the window's offsets p and q. Its derivative comes from
``sympy.diff`` like every other: the derivative of a maximum with respect to its entries is the
indicator of the entry that attains it (:class:`FirstMax`; with ties, the first in row-major
window order), just as relu's derivative is a step. Collapsing a sum against a Kronecker delta
whose argument is shifted (``δ(u + p - 2, r)``) leaves the range the summation index had as an
Iverson bracket (:class:`InRange`), e.g. [1 ≤ r - u + 2 ≤ 3]: the bounds that a kernel's size,
the stride and the padding imply (docs/architecture.md, "Images").
"""

from __future__ import annotations

import sympy as sp
from sympy.concrete.expr_with_limits import ExprWithLimits


class WindowMax(ExprWithLimits):
    """``WindowMax(f, (p, 1, kh), (q, 1, kw))``: the maximum of f over the window's offsets."""

    is_real = True

    def _eval_derivative(self, variable: sp.Expr) -> sp.Expr:
        offsets = [limit[0] for limit in self.limits]
        primed = {o: sp.Symbol(f"{o.name}'", integer=True, positive=True) for o in offsets}
        window = self.xreplace(primed)     # its own offsets renamed: the indicator's window
        summand = FirstMax(window, *offsets) * sp.diff(self.function, variable)
        return sp.Sum(summand, *self.limits)

    def doit(self, **hints: object) -> sp.Expr:
        """With concrete limits: the maximum written out as the piecewise choice of the first
        entry that is at least every other (so differentiating it directly needs no rule
        about maxima); otherwise itself."""
        entries = _window_entries(self)
        if entries is None:
            return self
        entries = [e.doit(**hints) for e in entries]
        branches = [(e, _first_max_condition(entries, n)) for n, e in enumerate(entries[:-1])]
        return sp.Piecewise(*branches, (entries[-1], True))


class FirstMax(sp.Function):
    """``FirstMax(window, p, q)``: 1 where the entry at offsets (p, q) of ``window`` (a
    :class:`WindowMax`) is its first maximum in row-major order, else 0. Piecewise constant in
    the window's entries, so its own derivative is 0."""

    nargs = 3
    is_real = True
    is_integer = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)

    def _eval_derivative(self, variable: sp.Expr) -> sp.Expr:
        return sp.Integer(0)

    @classmethod
    def eval(cls, window: sp.Expr, p: sp.Expr, q: sp.Expr) -> sp.Expr | None:
        return None

    def doit(self, **hints: object) -> sp.Expr:
        """With a concrete window and offsets: 1 where the condition of the first maximum
        holds, else 0 (a piecewise expression of the window's entries)."""
        window, p, q = self.args
        p, q = p.doit(**hints), q.doit(**hints)
        entries = _window_entries(window)
        if entries is None or not (p.is_Integer and q.is_Integer):
            return self.func(window, p, q)
        (_p, low_p, high_p), (_q, low_q, high_q) = window.limits
        if not (low_p <= p <= high_p and low_q <= q <= high_q):
            return sp.Integer(0)
        entries = [e.doit(**hints) for e in entries]
        position = int((p - low_p) * (high_q - low_q + 1) + (q - low_q))
        return sp.Piecewise((1, _first_max_condition(entries, position)), (0, True))


class InRange(sp.Function):
    """``InRange(e, low, high)``: the Iverson bracket [low ≤ e ≤ high], 1 or 0; evaluated at
    once when e is a number."""

    nargs = 3
    is_real = True
    is_integer = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)

    def _eval_derivative(self, variable: sp.Expr) -> sp.Expr:
        return sp.Integer(0)

    @classmethod
    def eval(cls, value: sp.Expr, low: sp.Expr, high: sp.Expr) -> sp.Expr | None:
        if value.is_number and low.is_number and high.is_number:
            return sp.Integer(1 if low <= value <= high else 0)
        if value == low == high:
            return sp.Integer(1)
        return None


def _window_entries(window: WindowMax) -> list[sp.Expr] | None:
    """The entries of a window with concrete limits, in row-major order; None when a limit
    is symbolic."""
    if not all(low.is_Integer and high.is_Integer for _i, low, high in window.limits):
        return None
    entries = [window.function]
    for index, low, high in window.limits:
        entries = [e.xreplace({index: sp.Integer(v)}) for e in entries
                   for v in range(int(low), int(high) + 1)]
    return entries


def _first_max_condition(entries: list[sp.Expr], position: int) -> sp.Expr:
    """Entry ``position`` is the first maximum: above every earlier entry, at least every
    later one."""
    chosen = entries[position]
    return sp.And(*(chosen > e for e in entries[:position]),
                  *(chosen >= e for e in entries[position + 1:]))


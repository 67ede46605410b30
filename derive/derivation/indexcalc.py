"""Index calculus on SymPy expressions: the algebra the chain rule needs on indexed sums.

SymPy differentiates ``Sum(w[j, k]*a[k], (k, 1, n))`` with respect to ``a[m]`` into
``Sum(w[j, k]*KroneckerDelta(k, m), (k, 1, n))``; these helpers finish the job the way a
derivation on paper does: split sums over ``+``, pull factors that do not depend on the summed
index out of the sum, and collapse a sum against a Kronecker delta (sum_k f_k delta_km = f_m,
valid because every index ranges over its layer).
"""

from __future__ import annotations

import sympy as sp

from derive.registry.windows import InRange


def _deltas_out(expr: sp.Expr) -> sp.Expr:
    """Each piecewise expression whose every branch has the same Kronecker delta factor (a
    step's derivative times δ_jk) as that delta times the piecewise expression without it."""
    def pull(piecewise: sp.Piecewise) -> sp.Expr:
        branches = [(sp.Add.make_args(sp.expand(branch.expr)), branch.cond)
                    for branch in piecewise.args]
        factors = [{f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta)}
                   for terms, _cond in branches for term in terms if term != 0]
        common = set.intersection(*factors) if factors else set()
        if not common:
            return piecewise
        delta = sp.Mul(*common)
        return delta * sp.Piecewise(*((sp.Add(*(term / delta for term in terms)), cond)
                                      for terms, cond in branches))

    return expr.replace(lambda e: isinstance(e, sp.Piecewise), pull) \
        if expr.has(sp.Piecewise) else expr


def _solved(delta: sp.KroneckerDelta, index: sp.Symbol) -> sp.Expr | None:
    """The value of ``index`` that the delta selects, when it is one: the delta's two sides
    differ by ±index plus terms free of it (δ_km: m; δ(u + p - 2, r): p = r - u + 2)."""
    difference = sp.expand(delta.args[0] - delta.args[1])
    coefficient = difference.coeff(index)
    if coefficient not in (1, -1) or (difference - coefficient * index).has(index):
        return None
    return sp.expand(-(difference - coefficient * index) / coefficient)


#: The range (low, high) of a free index, where the caller knows it, as numbers.
Ranges = dict[sp.Symbol, tuple[int, int]]


def _split_sum(summand: sp.Expr, limits: tuple, ranges: Ranges,
               widths: dict[sp.Symbol, int]) -> sp.Expr:
    """One sum, expanded: split over +, pull out constant factors, collapse deltas."""
    index = limits[0]
    summand = sp.expand(_deltas_out(summand), deep=False, mul=True, multinomial=False,
                        power_base=False, power_exp=False, log=False)
    if summand == 0:
        return sp.Integer(0)
    if isinstance(summand, sp.Add):
        return sp.Add(*(_split_sum(term, limits, ranges, widths) for term in summand.args))
    outside, inside = [], []
    for factor in sp.Mul.make_args(summand):
        (inside if factor.has(index) else outside).append(factor)
    inner = sp.Mul(*inside)
    for factor in inside:
        if isinstance(factor, sp.KroneckerDelta) and factor.has(index):
            other = _solved(factor, index)
            if other is None:
                continue
            rest = sp.Mul(*(f for f in inside if f is not factor)).xreplace({index: other})
            if not isinstance(other, sp.Symbol) or other in ranges and ranges[other] != tuple(
                    sp.sympify(limit).xreplace(widths) for limit in limits[1:]):
                # a shifted index (u - r + 2), or one whose range is wider than the sum's
                # (one gate's block of an LSTM's stacked rows): the sum kept the terms in its
                # range only
                rest = rest * InRange(other, limits[1], limits[2])
            return sp.Mul(*outside) * rest
    if not inside:
        # a constant summand: n copies of it
        return sp.Mul(*outside) * (limits[2] - limits[1] + 1)
    return sp.Mul(*outside) * sp.Sum(inner, limits)


def _split_sums(summand: sp.Expr, limits: tuple[tuple, ...], ranges: Ranges,
                widths: dict[sp.Symbol, int]) -> sp.Expr:
    """Sum(f, (i, ...), (m, ...)) = sum over m of (sum over i of f): one index at a time."""
    for one in limits:
        summand = _split_sum(summand, one, ranges, widths)
    return summand


def collapse(expr: sp.Expr, ranges: Ranges | None = None,
             widths: dict[sp.Symbol, int] | None = None) -> sp.Expr:
    """Expand sums, pull out constant factors and eliminate Kronecker deltas, to a fixed point.
    ``ranges`` are the (low, high) of free indices, in numbers (``widths`` gives the numbers
    of the sums' limits): a delta that selects a free index of another range than the sum's
    leaves the bracket ``InRange`` of the sum's range."""
    ranges, widths = ranges or {}, widths or {}
    previous = None
    while previous != expr:
        previous = expr
        expr = expr.replace(
            lambda e: isinstance(e, sp.Sum),
            lambda e: _split_sums(e.function, e.limits, ranges, widths),
        )
    return expr


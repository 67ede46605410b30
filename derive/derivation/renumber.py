"""Renumbering: an expression of the derivation moved from node n to node n + offset.

The reverse pass (:mod:`derive.derivation.reverse`) derives the formulas of a node from that
node's equations and those of the nodes that read it. When two nodes have the same
neighbourhood up to their numbers (every layer of a deep chain of equal layers), the formulas
of the second are those of the first with every node number shifted: every quantity
(``NetTensor``), every width ``n_l`` and every σ_l of node n becomes that of node n + offset.
:class:`Renumber` performs that renaming; it also gives each node's neighbourhood a form
counted from the node itself, which is how the reverse pass recognises equal neighbourhoods.

The renamed expression is rebuilt by SymPy's own constructors, so it is the canonical object
SymPy would have built for the new names (sums and products re-sorted), not a textual copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import sympy as sp
from sympy.core.function import AppliedUndef

from derive.quantities import NetTensor, entry


class Renumber:
    """Node n → node n + ``offset`` in SymPy expressions.

    ``widths`` maps each width symbol to its node and ``width_at`` gives the symbol of a node;
    ``sigmas`` and ``sigma_at`` do the same for the functions σ_l. Quantities without a node
    number (the target y) and everything else are kept. Shared subexpressions are renamed once.
    """

    def __init__(self, offset: int, widths: Mapping[sp.Symbol, int],
                 width_at: Callable[[int], sp.Symbol],
                 sigmas: Mapping[type, int] | None = None,
                 sigma_at: Callable[[int], type] | None = None) -> None:
        self.offset = offset
        self.widths, self.width_at = widths, width_at
        self.sigmas, self.sigma_at = sigmas or {}, sigma_at
        self._done: dict[sp.Basic, sp.Basic] = {}

    def __call__(self, expr: sp.Basic) -> sp.Basic:
        done = self._done.get(expr)
        if done is None:
            done = self._done[expr] = self._rename(expr)
        return done

    def tensor(self, tensor: NetTensor) -> NetTensor:
        if not isinstance(tensor.node, int):
            return tensor
        return NetTensor(tensor.role, tensor.node + self.offset, of=tensor.of, rank=tensor.rank,
                         parameter=tensor.parameter, step=tensor.step)

    def _rename(self, expr: sp.Basic) -> sp.Basic:
        if isinstance(expr, NetTensor):
            return self.tensor(expr)
        if expr in self.widths:
            return self.width_at(self.widths[expr] + self.offset)
        if not expr.args:
            return expr
        if isinstance(expr, sp.Indexed) and isinstance(expr.base.label, NetTensor):
            return entry(self.tensor(expr.base.label), tuple(self(i) for i in expr.indices))
        if isinstance(expr, sp.IndexedBase) and isinstance(expr.label, NetTensor):
            return self.tensor(expr.label).indexed
        args = tuple(self(arg) for arg in expr.args)
        if isinstance(expr, AppliedUndef) and expr.func in self.sigmas:
            return self.sigma_at(self.sigmas[expr.func] + self.offset)(*args)
        if all(new is old for new, old in zip(args, expr.args)):
            return expr
        if isinstance(expr, sp.core.relational.Relational):
            return expr.func(*args, evaluate=False)   # an equation as written, not decided
        return expr.func(*args)

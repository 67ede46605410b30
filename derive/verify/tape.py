"""The direct derivatives of verification: reverse accumulation over the concrete entries.

Stage: verify. Takes the concrete entries of an expanded network
(:class:`derive.verify.expansion.Instance`), each as a SymEngine expression of the leaves and
entries it reads directly (its op's own forward expression at those indices), and the cost C
as one such expression of the output entries. Gives, at a point: the value of every entry and
∂C/∂v for every entry and leaf v, in 200-bit arithmetic.

Why not ``se.diff`` of the fully expanded C at every point: the derivative of C by each leaf
is as large as C itself, so all of them together grow with the square of the parameter count,
and finding their common subexpressions costs more than the check. Here the chain rule is
applied to the scalar graph (each node's local derivatives are ``se.diff`` of its own small
expression, found once), one sweep per point. It reads nothing of the derivation: no index
form, no Kronecker deltas, no tensor form, only the expanded forward expressions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import symengine as se

from derive.verify.numeric import fold_constants, real_value


@dataclass(frozen=True)
class _Node:
    """A computed entry: ``expr`` in the placeholders ``args``, which stand for ``reads``."""

    expr: se.Basic
    args: tuple[se.Symbol, ...]
    reads: tuple[int, ...]
    partials: se.DenseMatrix     # ∂expr/∂arg for each arg, a row


class Tape:
    """The scalar graph of a network: leaves (values from a point) and computed nodes, in
    evaluation order; every node only reads nodes before it."""

    def __init__(self) -> None:
        self._leaves: dict[int, se.Symbol] = {}
        self._nodes: list[_Node | None] = []

    def leaf(self, symbol: se.Symbol) -> int:
        """A leaf whose value is ``point[symbol]``; its id."""
        self._leaves[len(self._nodes)] = symbol
        self._nodes.append(None)
        return len(self._nodes) - 1

    def node(self, expr: se.Basic, args: Sequence[se.Symbol], reads: Sequence[int]) -> int:
        """A node computing ``expr`` with each of ``args`` standing for the node it ``reads``
        (constants as 200-bit numbers already); its id."""
        if any(read >= len(self._nodes) for read in reads):
            raise ValueError("a node reads only nodes before it")
        partials = fold_constants([se.diff(expr, arg) for arg in args])
        self._nodes.append(_Node(expr, tuple(args), tuple(reads),
                                 se.DenseMatrix(1, len(args), partials)))
        return len(self._nodes) - 1

    def sweep(self, point: Mapping[se.Symbol, se.Basic], output: int
              ) -> tuple[list[se.Basic], list[se.Basic | None]] | None:
        """Every node's value at ``point`` and the derivative of node ``output`` by every
        node (zero for nodes it does not depend on; None where a local derivative has no
        finite real value). None where a value has none (outside a custom function's
        domain)."""
        values: list[se.Basic] = []
        for n, node in enumerate(self._nodes):
            if node is None:
                values.append(point[self._leaves[n]])
                continue
            value = real_value(_at(node.expr, node, values))
            if value is None:
                return None
            values.append(value)
        adjoints: list[se.Basic | None] = [se.Integer(0)] * len(self._nodes)
        adjoints[output] = se.Integer(1)
        for n in range(output, -1, -1):
            node, adjoint = self._nodes[n], adjoints[n]
            if node is None or adjoint == 0:
                continue
            partials = _at(node.partials, node, values)
            for read, partial in zip(node.reads, partials):
                partial = real_value(partial) if adjoint is not None else None
                if partial is None or adjoints[read] is None:
                    adjoints[read] = None
                else:
                    adjoints[read] = adjoints[read] + adjoint * partial
        return values, adjoints


def _at(expr: se.Basic | se.DenseMatrix, node: _Node, values: Sequence[se.Basic]):
    if not node.args:
        return expr
    return expr.xreplace({arg: values[read] for arg, read in zip(node.args, node.reads)})

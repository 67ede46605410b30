"""Vector (matrix) and batch forms of index formulas, translated from the index form.

Index formulas with a free index j (or j and k) become expressions over per-sample vectors:

* ``Vec("a^2")`` is the column vector a^2; products and functions of vectors are elementwise
  (a Hadamard product, printed with the odot);
* ``MatVec(W, v, transposed)`` is W v or W^T v (from sum_k w_{jk} v_k or sum_k w_{kj} v_k);
* ``Outer(u, v)`` is u v^T (a formula with free indices j and k: u_j v_k);
* ``Inner(u, v)`` is u^T v (a sum over all components, e.g. in the softmax Jacobian).

The batch form reads the same tree with rows = samples: each vector becomes a matrix with one
row per sample (A^l, Z^l, Delta^l), ``MatVec(W, v, True)`` becomes ``V @ W``, ``MatVec(W, v,
False)`` becomes ``V @ W.T``, ``Inner`` a row-wise sum, and gradients (``Outer``, bias vectors)
the mean over the batch. Printers implement those readings; the tree is shared.
"""

from __future__ import annotations

import sympy as sp

from derive.errors import DeriveError


class Vec(sp.Symbol):
    """A per-sample column vector of the network (a^l, z^l, delta^l, y, dC/da^L)."""


class Mat(sp.Symbol):
    """A weight matrix W^l (entry [j, k] is w^l_{jk})."""


class MatVec(sp.Function):
    """``MatVec(W, v, transposed)``: W v, or W^T v when ``transposed`` is true."""

    nargs = 3


class Outer(sp.Function):
    """``Outer(u, v)`` = u v^T."""

    nargs = 2


class Inner(sp.Function):
    """``Inner(u, v)`` = u^T v, a scalar per sample."""

    nargs = 2


def to_vector(expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> sp.Expr:
    """The vector form of index expression ``expr`` whose free indices are ``free``.

    One free index gives a vector expression, two (j, k) an outer product. Raises
    ``DeriveError`` for index patterns that have no vector form here (not expected for dense
    networks; a new layer kind would add its pattern).
    """
    if len(free) == 1:
        return _vector(expr, free[0])
    if len(free) == 2:
        row, col = free
        left, right = [], []
        for factor in sp.Mul.make_args(expr):
            if factor.has(col) and not factor.has(row):
                right.append(factor)
            elif factor.has(row) and not factor.has(col):
                left.append(factor)
            else:
                raise DeriveError(f"no outer-product form for {expr}")
        return Outer(_vector(sp.Mul(*left), row), _vector(sp.Mul(*right), col))
    raise DeriveError(f"no vector form for an expression with free indices {free}")


def _vec(base: sp.IndexedBase) -> Vec:
    return Vec(str(base.label), real=True)


def _vector(expr: sp.Expr, index: sp.Symbol) -> sp.Expr:
    if isinstance(expr, sp.Indexed):
        if expr.indices != (index,):
            raise DeriveError(f"no vector form for {expr} (free index {index})")
        return _vec(expr.base)
    if isinstance(expr, sp.Sum):
        return _sum_to_vector(expr, index)
    if isinstance(expr, sp.Derivative):
        # dC/da^L_j -> the vector of partials, named after what is differentiated
        (var, _count), = expr.variable_count
        if isinstance(var, sp.Indexed) and expr.expr.is_Symbol:
            return Vec(f"d{expr.expr}/d{var.base.label}", real=True)
        return expr.func(_vector(expr.expr, index), *((_vector(v, index), c)
                                                      for v, c in expr.variable_count))
    if not expr.args or not expr.has(sp.Indexed):
        return expr
    return expr.func(*(_vector(arg, index) for arg in expr.args))


def _sum_to_vector(expr: sp.Sum, index: sp.Symbol) -> sp.Expr:
    (summed, _low, _high), = expr.limits
    factors = sp.Mul.make_args(expr.function)
    matrices = [f for f in factors if isinstance(f, sp.Indexed) and len(f.indices) == 2]
    if len(matrices) == 1:
        (weight,) = matrices
        rest = sp.Mul(*(f for f in factors if f is not weight))
        if weight.indices == (summed, index):
            transposed = True
        elif weight.indices == (index, summed):
            transposed = False
        else:
            raise DeriveError(f"no vector form for {expr}")
        matrix = Mat(str(weight.base.label), real=True)
        return MatVec(matrix, _vector(rest, summed), sp.true if transposed else sp.false)
    if not expr.function.has(index):
        vectors = [f for f in factors if f.has(summed)]
        scalars = sp.Mul(*(f for f in factors if not f.has(summed)))
        if len(vectors) == 2:
            return scalars * Inner(_vector(vectors[0], summed), _vector(vectors[1], summed))
        one = Vec("1", real=True)
        return scalars * Inner(one, _vector(sp.Mul(*vectors), summed))
    raise DeriveError(f"no vector form for {expr}")

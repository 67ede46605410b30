"""Index form → tensor form: the one translation every printer reads (docs/architecture.md).

An index formula with free indices becomes an expression over whole per-sample tensors, each a
:class:`~derive.quantities.NetTensor` (a^l, z^l, δ^l, y, μ^l, ∂C/∂x̂^l, W^l, ...):

* an entry ``q[j]`` with the formula's free index is the tensor q; a per-sample scalar (rank 0)
  is itself; products and functions of tensors are elementwise (the Hadamard product);
* ``∂C/∂q[j]`` is the tensor ∂C/∂q (``NetTensor("grad", l, of=role)``);
* ``MatVec(W, v, transposed)`` is W v or Wᵀ v (from sum_k w_{jk} v_k or sum_k w_{kj} v_k);
* ``Outer(u, v)`` is u vᵀ (a formula with free indices j and k: u_j v_k);
* ``Inner(u, v)`` is uᵀ v, a per-sample scalar (a sum over the feature axis);
* any other contraction is ``Einsum(subscripts, *operands)`` with an explicit subscript string.

The batch reading (rows = samples) is the printers' business: a per-sample tensor gains a
leading batch axis (A1, Z1, delta1), ``MatVec(W, v, True)`` reads ``V @ W``, ``MatVec(W, v,
False)`` reads ``V @ W.T``, ``Inner`` a row-wise sum, and a parameter's gradient sums over the
rows. The tree is shared by the NumPy, LaTeX and terminal printers.
"""

from __future__ import annotations

import sympy as sp

from derive.errors import DeriveError
from derive.quantities import NetTensor, tensor_of

#: The all-ones vector: ``Inner(ONE, v)`` is the sum of v's components.
ONE = NetTensor("one")


class MatVec(sp.Function):
    """``MatVec(W, v, transposed)``: W v, or W^T v when ``transposed`` is true."""

    nargs = 3


class Outer(sp.Function):
    """``Outer(u, v)`` = u v^T."""

    nargs = 2


class Inner(sp.Function):
    """``Inner(u, v)`` = u^T v, a scalar per sample."""

    nargs = 2


class Total(sp.Function):
    """``Total(f(W))``: the sum of an elementwise expression over every entry of a parameter
    (the penalty's Σ_jk w_jk²)."""

    nargs = 1


class Einsum(sp.Function):
    """``Einsum(subscripts, *operands)``: the contraction ``np.einsum`` computes, per sample."""


def adjoint(of: NetTensor) -> NetTensor:
    """The tensor of ∂C/∂q."""
    return NetTensor("grad", of.node, of=of.role, rank=of.rank)


def to_vector(expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> sp.Expr:
    """The tensor form of index expression ``expr`` whose free indices are ``free``.

    No free index: a per-sample scalar; one: a vector expression; two (j, k): an outer product.
    Raises ``DeriveError`` for an index pattern without a tensor form.
    """
    if len(free) == 0:
        return _vector(expr, None)
    if len(free) == 1:
        return _vector(expr, free[0])
    if len(free) == 2:
        return _matrix_form(expr, free)
    raise DeriveError(f"no tensor form for an expression with free indices {free}")


def _matrix_form(expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> sp.Expr:
    """Free indices (j, k): a sum of outer products u vᵀ and elementwise functions of
    matrices (the penalty's λ w_jk + μ sign(w_jk) is λ W + μ sign(W))."""
    row, col = free
    if isinstance(expr, sp.Add):
        return sp.Add(*(_matrix_form(term, free) for term in expr.args))
    entries = [a for a in expr.atoms(sp.Indexed) if len(a.indices) == 2]
    if entries and all(tuple(a.indices) == tuple(free) and tensor_of(a) is not None
                       for a in entries) and not any(
            a.has(row) or a.has(col) for a in expr.atoms(sp.Indexed) if a not in entries):
        return expr.xreplace({a: tensor_of(a) for a in entries})
    left, right = [], []
    for factor in sp.Mul.make_args(expr):
        if factor.has(col) and not factor.has(row):
            right.append(factor)
        elif not factor.has(col):
            left.append(factor)
        else:
            raise DeriveError(f"no tensor form for {expr}")
    return Outer(_vector(sp.Mul(*left), row), _vector(sp.Mul(*right), col))


def _vector(expr: sp.Expr, index: sp.Symbol | None) -> sp.Expr:
    if isinstance(expr, NetTensor):
        return expr                      # a per-sample scalar (rank 0)
    if isinstance(expr, sp.Indexed):
        base = tensor_of(expr)
        if base is None or index is None or tuple(expr.indices) != (index,):
            raise DeriveError(f"no tensor form for {expr} (free index {index})")
        return base
    if isinstance(expr, sp.Sum):
        return _sum_to_vector(expr, index)
    if isinstance(expr, sp.Derivative):
        (var, _count), = expr.variable_count
        quantity = tensor_of(var)
        if quantity is not None and expr.expr.is_Symbol:
            if quantity.rank and (index is None or tuple(var.indices) != (index,)):
                raise DeriveError(f"no tensor form for {expr} (free index {index})")
            return adjoint(quantity)
        return expr.func(_vector(expr.expr, index), *((_vector(v, index), c)
                                                      for v, c in expr.variable_count))
    if not expr.args or not expr.has(sp.Indexed, NetTensor):
        return expr
    return expr.func(*(_vector(arg, index) for arg in expr.args))


def _sum_to_vector(expr: sp.Sum, index: sp.Symbol | None) -> sp.Expr:
    total = _total(expr)
    if total is not None:
        return total
    if len(expr.limits) > 1:
        inner = sp.Sum(expr.function, expr.limits[0])
        return _sum_to_vector(sp.Sum(inner, *expr.limits[1:]), index)
    (summed, _low, _high), = expr.limits
    factors = sp.Mul.make_args(expr.function)
    matrices = [f for f in factors if isinstance(f, sp.Indexed) and len(f.indices) == 2]
    if len(matrices) == 1 and index is not None:
        (weight,) = matrices
        rest = sp.Mul(*(f for f in factors if f is not weight))
        if tuple(weight.indices) == (summed, index):
            transposed = True
        elif tuple(weight.indices) == (index, summed):
            transposed = False
        else:
            raise DeriveError(f"no tensor form for {expr}")
        if rest.has(index):
            raise DeriveError(f"no tensor form for {expr}")
        return MatVec(tensor_of(weight), _vector(rest, summed), sp.true if transposed
                      else sp.false)
    if index is None or not expr.function.has(index):
        vectors = [f for f in factors if f.has(summed)]
        scalars = sp.Mul(*(f for f in factors if not f.has(summed)))
        if len(vectors) == 2:
            return _vector(scalars, index) * Inner(_vector(vectors[0], summed),
                                                   _vector(vectors[1], summed))
        return _vector(scalars, index) * Inner(ONE, _vector(sp.Mul(*vectors), summed))
    return _einsum(expr, (index,))


def _total(expr: sp.Sum) -> sp.Expr | None:
    """Total(f(W)) when ``expr`` sums f(w_jk) over every index of one parameter, else None."""
    summed = [limit[0] for limit in expr.limits]
    entries = expr.function.atoms(sp.Indexed)
    if not entries or any(
            tensor_of(e) is None or not tensor_of(e).is_parameter
            or sorted(e.indices, key=str) != sorted(summed, key=str) for e in entries):
        return None
    return Total(expr.function.xreplace({e: tensor_of(e) for e in entries}))


_LETTERS = "jkimpqrstuvxyzabcdefgh"


def _einsum(expr: sp.Sum, free: tuple[sp.Symbol, ...]) -> sp.Expr:
    """Any other contraction of tensor entries: ``Einsum("kj,k->j", W, v)`` (per sample).

    The summand must be a product of tensor entries and factors free of the summed indices;
    those factors multiply the result.
    """
    summed = [limit[0] for limit in expr.limits]
    operands, outside = [], []
    for factor in sp.Mul.make_args(expr.function):
        if not factor.has(*summed):
            outside.append(factor)
        elif isinstance(factor, sp.Indexed) and tensor_of(factor) is not None and all(
                isinstance(index, sp.Symbol) for index in factor.indices):
            operands.append(factor)
        else:
            raise DeriveError(f"no tensor form for {expr}")
    letters: dict[sp.Symbol, str] = {}
    for index in (*free, *summed, *(i for f in operands for i in f.indices)):
        letters.setdefault(index, _LETTERS[len(letters)])
    inputs = ",".join("".join(letters[i] for i in f.indices) for f in operands)
    output = "".join(letters[i] for i in free)
    contraction = Einsum(sp.Symbol(f"{inputs}->{output}"), *(tensor_of(f) for f in operands))
    return _vector(sp.Mul(*outside), free[0] if free else None) * contraction

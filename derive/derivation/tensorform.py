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

from collections.abc import Mapping

import sympy as sp

from derive.derivation.imageform import ARRAYS, Flatten, image_form, is_image_form
from derive.derivation.stepform import (
    Block,
    SumSteps,
    blocks,
    is_step_form,
    one_step,
    time_indices,
    whole_sequence,
)
from derive.errors import DeriveError
from derive.quantities import NetTensor, entry, tensor_of

#: The all-ones vector: ``Inner(ONE, v)`` is the sum of v's components.
ONE = NetTensor("one")


def _zero_if_any(*operands: sp.Expr) -> sp.Expr | None:
    """0 when an operand of a product is 0 (an adjoint that is 0 through a step), else None:
    the products below are linear in each operand."""
    return sp.Integer(0) if any(operand == 0 for operand in operands) else None


class MatVec(sp.Function):
    """``MatVec(W, v, transposed)``: W v, or W^T v when ``transposed`` is true."""

    nargs = 3

    @classmethod
    def eval(cls, matrix: sp.Expr, vector: sp.Expr, transposed: sp.Expr) -> sp.Expr | None:
        return _zero_if_any(matrix, vector)


class Outer(sp.Function):
    """``Outer(u, v)`` = u v^T."""

    nargs = 2

    @classmethod
    def eval(cls, u: sp.Expr, v: sp.Expr) -> sp.Expr | None:
        return _zero_if_any(u, v)


class Inner(sp.Function):
    """``Inner(u, v)`` = u^T v, a scalar per sample."""

    nargs = 2

    @classmethod
    def eval(cls, u: sp.Expr, v: sp.Expr) -> sp.Expr | None:
        return _zero_if_any(u, v)


class Total(sp.Function):
    """``Total(f(W))``: the sum of an elementwise expression over every entry of a parameter
    (the penalty's Σ_jk w_jk²)."""

    nargs = 1


class Einsum(sp.Function):
    """``Einsum(subscripts, *operands)``: the contraction ``np.einsum`` computes, per sample."""

    @classmethod
    def eval(cls, subscripts: sp.Expr, *operands: sp.Expr) -> sp.Expr | None:
        return _zero_if_any(*operands)


class Broadcast(sp.Function):
    """``Broadcast(q, Symbol("k"), Symbol("jk"))``: the tensor q, whose axes are the letters
    of the second argument, placed among the axes of an elementwise expression over the axes
    of the third (here: constant along j)."""

    nargs = 3

    @classmethod
    def eval(cls, tensor: sp.Expr, axes: sp.Expr, frame: sp.Expr) -> sp.Expr | None:
        return _zero_if_any(tensor)


class SumAxes(sp.Function):
    """``SumAxes(body, Symbol("jk"), Symbol("j"))``: an elementwise expression over the axes
    jk (its tensors placed by :class:`Broadcast`), summed over the axes that are not kept."""

    nargs = 3

    @classmethod
    def eval(cls, body: sp.Expr, axes: sp.Expr, kept: sp.Expr) -> sp.Expr | None:
        return _zero_if_any(body)


def adjoint(of: NetTensor) -> NetTensor:
    """The tensor of ∂C/∂q."""
    return of.adjoint()


def to_vector(expr: sp.Expr, free: tuple[sp.Symbol, ...],
              ranges: tuple[sp.Expr, ...] = (),
              widths: Mapping[NetTensor, sp.Expr] | None = None) -> sp.Expr:
    """The tensor form of index expression ``expr`` whose free indices are ``free`` (and
    their ranges ``ranges``, which feature maps and stacked gates need:
    :mod:`derive.derivation.imageform`, :mod:`derive.derivation.stepform`). ``widths`` are
    the feature widths of the quantities it reads (where one is read in blocks).

    No free index: a per-sample scalar; one: a vector expression; two (j, k): an outer product.
    A sequence formula is read at one time step. Raises ``DeriveError`` for an index pattern
    without a tensor form (a Kronecker delta the derivation could not collapse among them).
    """
    if is_step_form(expr):
        if len(time_indices(expr, free)) > 1:       # over two time axes: attention
            return whole_sequence(_adjoint_entries(expr), free, _einsum)
        expr, free, ranges, summed = one_step(_adjoint_entries(expr), free, ranges)
        found = blocks(expr, free, ranges, widths or {},
                       lambda e, f: to_vector(e, f, (), widths))
        if found is None:
            found = to_vector(expr, free, ranges, widths)
        return SumSteps(found) if summed else found
    if expr.has(sp.KroneckerDelta):
        raise DeriveError(f"no tensor form for {expr} (a Kronecker delta left in it)")
    if is_image_form(expr, free):
        return image_form(_adjoint_entries(expr), free, dict(zip(free, ranges)), _einsum)
    if len(free) == 0:
        return _vector(expr, None)
    if len(free) == 1:
        return _vector(expr, free[0])
    if len(free) == 2:
        try:
            return _matrix_form(expr, free)
        except DeriveError:
            pass
    try:
        return _einsum(expr, free)
    except DeriveError:
        return _elementwise(expr, free, ())


def equation_tensor(equation, widths: Mapping[NetTensor, sp.Expr] | None = None) -> sp.Expr:
    """The tensor form of a forward equation's right side, as its target reads it: a
    flatten's (whose target entry is an expression of its indices) is ``Flatten`` of it."""
    expr = to_vector(equation.expr, equation.indices, equation.ranges, widths)
    return Flatten(expr) if equation.at is not None else expr


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
        base = _array_of(expr)
        if base is None or index is None or tuple(expr.indices) != (index,):
            raise DeriveError(f"no tensor form for {expr} (free index {index})")
        return base
    if isinstance(expr, sp.Sum):
        try:
            return _sum_to_vector(_flattened(expr), index)
        except DeriveError:
            return _elementwise(expr, (index,) if index is not None else (), ())
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
        return _einsum(expr, (index,) if index is not None else ())
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


def letters(indices: tuple[sp.Symbol, ...]) -> dict[sp.Symbol, str]:
    """One einsum letter per index, in order."""
    return {index: _LETTERS[n] for n, index in enumerate(indices)}


def _adjoint_entries(expr: sp.Expr) -> sp.Expr:
    """``expr`` with each ∂C/∂q[i] written as the entry i of the adjoint tensor ∂C/∂q."""
    def adjoint_entry(derivative: sp.Derivative) -> sp.Expr:
        (variable, _count), = derivative.variable_count
        quantity = tensor_of(variable)
        if quantity is None:
            raise DeriveError(f"no tensor form for {expr}")
        indices = tuple(variable.indices) if isinstance(variable, sp.Indexed) else ()
        return entry(quantity.adjoint(), indices)

    # ∂C/∂q only: σ'(z) of a generic form (the derivative of a function) stays as it is
    return expr.replace(lambda e: isinstance(e, sp.Derivative) and e.expr.is_Symbol,
                        adjoint_entry)


def _flattened(expr: sp.Sum) -> sp.Sum:
    """Σ_m Σ_k f as one sum over k and m (and Σ_m u_m Σ_k f as Σ_{k,m} u_m f)."""
    limits, body = list(expr.limits), expr.function
    while True:
        factors = sp.Mul.make_args(body)
        inner = [f for f in factors if isinstance(f, sp.Sum)]
        if len(inner) != 1:
            return sp.Sum(body, *limits) if len(limits) > 1 else expr
        (total,) = inner
        rest = sp.Mul(*(f for f in factors if f is not total))
        if rest.has(*(limit[0] for limit in total.limits)):
            return sp.Sum(body, *limits) if len(limits) > 1 else expr
        limits += list(total.limits)
        body = rest * total.function


def _elementwise(expr: sp.Expr, free: tuple[sp.Symbol, ...],
                 summed: tuple[sp.Symbol, ...]) -> sp.Expr:
    """Any other index expression with free indices ``free``: an elementwise expression over
    the axes of ``free`` and every index it sums, each tensor placed among those axes by
    :class:`Broadcast`, then summed over the summed axes (:class:`SumAxes`); e.g. the
    squared distance Σ_k (x_k - c_jk)² of an RBF unit."""
    if isinstance(expr, sp.Sum):
        return _elementwise(expr.function, free, (*summed, *(l[0] for l in expr.limits)))
    if expr.has(sp.Sum):
        raise DeriveError(f"no tensor form for {expr}")
    frame = (*free, *summed)
    letters = {index: _LETTERS[n] for n, index in enumerate(frame)}
    axes = sp.Symbol("".join(letters.values()))

    def place(e: sp.Indexed) -> sp.Expr:
        quantity = tensor_of(e)
        if quantity is None or any(i not in letters for i in e.indices) or \
                len(set(e.indices)) != len(e.indices):
            raise DeriveError(f"no tensor form for {expr}")
        return Broadcast(quantity, sp.Symbol("".join(letters[i] for i in e.indices)), axes)

    body = _adjoint_entries(expr)
    if any(t.rank == 0 and not t.is_parameter for t in body.atoms(NetTensor)):
        raise DeriveError(f"no tensor form for {expr}")  # a per-sample scalar among axes
    body = body.replace(lambda e: isinstance(e, sp.Indexed), place)
    kept = sp.Symbol("".join(letters[i] for i in free))
    return SumAxes(body, axes, kept) if summed else body


def _array_of(entry: sp.Indexed) -> sp.Expr | None:
    """The whole array an entry is of: its NetTensor, or a tensor-form array (a feature
    map's windows)."""
    tensor = tensor_of(entry)
    if tensor is not None:
        return tensor
    return entry.base.label if isinstance(entry.base.label, (*ARRAYS, Block)) else None


def _einsum(expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> sp.Expr:
    """Any other contraction of tensor entries: ``Einsum("kj,k->j", W, v)`` (per sample), or
    a product of entries with more free indices than an outer product has
    (``Einsum("j,k,m->jkm", g, x, x)``).

    The summand must be a product of tensor entries and factors free of the summed indices;
    those factors multiply the result.
    """
    summed = [limit[0] for limit in expr.limits] if isinstance(expr, sp.Sum) else []
    operands, outside = [], []
    function = _adjoint_entries(expr.function if isinstance(expr, sp.Sum) else expr)
    for factor in sp.Mul.make_args(function):
        if not factor.has(*summed, *(free if not summed else ())):
            outside.append(factor)
        elif isinstance(factor, sp.Indexed) and _array_of(factor) is not None and all(
                isinstance(index, sp.Symbol) for index in factor.indices):
            operands.append(factor)
        else:
            raise DeriveError(f"no tensor form for {expr}")
    letters: dict[sp.Symbol, str] = {}
    for index in (*free, *summed, *(i for f in operands for i in f.indices)):
        letters.setdefault(index, _LETTERS[len(letters)])
    inputs = ",".join("".join(letters[i] for i in f.indices) for f in operands)
    output = "".join(letters[i] for i in free)
    contraction = Einsum(sp.Symbol(f"{inputs}->{output}"), *(_array_of(f) for f in operands))
    return _vector(sp.Mul(*outside), free[0] if free else None) * contraction

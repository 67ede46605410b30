"""Index form → tensor form for sequences: one time step, and the blocks of stacked gates
(docs/architecture.md, "Sequences").

A sequence quantity has entries (t, j). Its formulas are read one step at a time, as the
textbooks write BPTT: an entry q_{t+c, j} is the vector ``q.at_step(c)`` (a
:class:`~derive.quantities.NetTensor` with ``step`` c; ``"T"`` for the last step q_T), the time
index leaves the free indices, and a sum over t leaves the formula (a parameter's gradient
sums over the steps as it sums over the samples: the printers read the time axis as a second
batch axis). What the derivation left about time becomes a guard:

* ``StepGuard(low, high)``: 1 when low ≤ t ≤ high, else 0 (the bracket [t + 1 ≤ T] of an
  error fed back from the step after; [t = T] where only the last step is read).

An LSTM or GRU stacks its gates' rows. A gate reads its block of the stacked pre-activation,
z_{t, j + 2n}; the stacked error is made of one bracketed term per block,
[1 ≤ u − 2n ≤ n] (...)_{u − 2n}. In tensor form:

* ``Block(q, start, size)``: entries start + 1 .. start + size of q's feature axis;
* ``Concat(part, ...)``: the parts side by side along the feature axis.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp

from derive.errors import DeriveError
from derive.quantities import LENGTH, NetTensor, entry, index_family, tensor_of
from derive.registry.windows import InRange


class StepGuard(sp.Function):
    """``StepGuard(low, high)``: 1 when the step t is in low..high, else 0."""

    nargs = 2


class SumSteps(sp.Function):
    """``SumSteps(x)``: x summed over the time steps t = 1..T (a shared parameter's
    gradient)."""

    nargs = 1


class Block(sp.Function):
    """``Block(q, start, size)``: the entries start + 1 .. start + size of q's features."""

    nargs = 3


class Concat(sp.Function):
    """``Concat(*parts)``: vectors side by side along the feature axis."""


def _is_sequence(found: sp.Expr) -> bool:
    """Whether ``found`` is an entry of a quantity with a time axis first: a sequence (t, j),
    attention weights (t, τ), a layer norm's mean of each step μ_t."""
    tensor = tensor_of(found)
    if tensor is None or tensor.is_parameter or tensor.step is not None or \
            not isinstance(found, sp.Indexed):
        return False
    first = found.indices[0]
    return tensor.rank == 2 or first.has(LENGTH) or any(
        index_family(symbol) == "time" for symbol in first.free_symbols)


def is_step_form(expr: sp.Expr) -> bool:
    """Whether ``expr`` reads an entry of a sequence quantity (or its adjoint)."""
    for found in expr.atoms(sp.Indexed):
        if _is_sequence(found):
            return True
    return any(isinstance(d, sp.Derivative) and _is_sequence(d.variables[0])
               for d in expr.atoms(sp.Derivative))


def time_indices(expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> set[sp.Symbol]:
    """The time indices of a formula: its free ones and those it sums over."""
    times = {index for index in free if index_family(index) == "time"}
    return times | {limit[0] for s in expr.atoms(sp.Sum) for limit in s.limits
                    if index_family(limit[0]) == "time"}


def one_step(expr: sp.Expr, free: tuple[sp.Symbol, ...], ranges: tuple[sp.Expr, ...]
             ) -> tuple[sp.Expr, tuple[sp.Symbol, ...], tuple[sp.Expr, ...], bool]:
    """``expr`` (adjoints as entries of adjoint tensors) read at one step: sequence entries
    as step views, sums over time dropped, time brackets as guards; with the free indices and
    ranges that remain, and whether it summed over the steps (a parameter's gradient: the
    caller wraps its tensor form in ``SumSteps``)."""
    times = time_indices(expr, free)
    if len(times) > 1:
        raise DeriveError(f"no tensor form for {expr} (two time indices)")
    time = next(iter(times), None)

    def offset(position: sp.Expr) -> int | str:
        if position == LENGTH:
            return "T"
        shift = sp.expand(position - time) if time is not None else None
        if shift is None or not shift.is_Integer:
            raise DeriveError(f"no tensor form for {expr} (a step {position})")
        return int(shift)

    def view(found: sp.Indexed) -> sp.Expr:
        if not _is_sequence(found):
            return found
        tensor = tensor_of(found)
        first, *rest = found.indices
        return entry(tensor.at_step(offset(first)), tuple(rest))

    def guard(bracket: InRange) -> sp.Expr:
        value, low, high = bracket.args
        if time is None or not value.has(time):
            return bracket
        shift = sp.expand(value - time)
        return StepGuard(low - shift, high - shift)

    def last(delta: sp.KroneckerDelta) -> sp.Expr:
        if time is not None and set(delta.args) == {time, LENGTH}:
            return StepGuard(LENGTH, LENGTH)
        return delta

    def unsummed(total: sp.Sum) -> sp.Expr:
        limits = [limit for limit in total.limits if limit[0] != time]
        return sp.Sum(total.function, *limits) if limits else total.function

    summed = time is not None and time not in free
    out = expr.replace(lambda e: isinstance(e, sp.Sum) and any(
        limit[0] == time for limit in e.limits), unsummed)
    out = out.replace(lambda e: isinstance(e, sp.Indexed), view)
    out = out.replace(lambda e: isinstance(e, InRange), guard)
    out = out.replace(lambda e: isinstance(e, sp.KroneckerDelta), last)
    kept = [(index, n) for index, n in zip(free, ranges or (None,) * len(free))
            if index != time]
    return (out, tuple(index for index, _n in kept),
            tuple(n for _index, n in kept) if ranges else (), summed)


def blocks(expr: sp.Expr, free: tuple[sp.Symbol, ...], ranges: tuple[sp.Expr, ...],
           widths: Mapping[NetTensor, sp.Expr], vector) -> sp.Expr | None:
    """The tensor form of a vector formula over stacked gates (free index j of range m):
    ``Concat`` of its bracketed blocks, or an expression of ``Block``s where it reads a
    quantity of another width at j + c; None when it does neither. ``vector(expr, free)``
    is the general translation of each part."""
    if len(free) != 1 or not ranges:
        return None
    (index,), (size,) = free, ranges
    terms = sp.Add.make_args(sp.expand(expr, deep=False, mul=True, multinomial=False,
                                       power_base=False, power_exp=False, log=False))
    brackets = [[f for f in sp.Mul.make_args(term) if isinstance(f, InRange)
                 and f.args[0].has(index)] for term in terms]
    if any(brackets) and all(len(found) == 1 for found in brackets):
        return _concat(terms, brackets, index, size, widths, vector)
    if any(brackets):
        return None
    reads = [e for e in expr.atoms(sp.Indexed) if e.indices and e.indices[-1].has(index)
             and tensor_of(e) is not None]

    def stacked(tensor: NetTensor) -> bool:
        """Whether ``tensor`` is wider than the formula's index by a whole factor (an LSTM's
        4n-wide pre-activation read by a gate of n); two widths that are different symbols
        are equal (the inputs of an add)."""
        ratio = sp.simplify(widths.get(tensor.whole, size) / size)
        return ratio.is_number and ratio != 1

    if not any(e.indices[-1] != index or stacked(tensor_of(e)) for e in reads):
        return None

    def block(found: sp.Indexed) -> sp.Expr:
        start = sp.expand(found.indices[-1] - index)
        if start.has(index):
            raise DeriveError(f"no tensor form for {expr}")
        tensor = tensor_of(found)
        if start == 0 and not stacked(tensor):
            return found
        return sp.IndexedBase(Block(tensor, start, size))[(*found.indices[:-1], index)]

    return vector(expr.replace(lambda e: isinstance(e, sp.Indexed) and e in reads, block), free)


def _concat(terms: tuple[sp.Expr, ...], brackets: list[list[InRange]], index: sp.Symbol,
            size: sp.Expr, widths: Mapping[NetTensor, sp.Expr], vector) -> sp.Expr:
    """Terms [1 ≤ j − c ≤ m] f(j − c), grouped by c, as Concat(f_0, f_m, f_2m, ...)."""
    parts: dict[int, list[sp.Expr]] = {}
    block = None
    for term, (bracket,) in zip(terms, brackets):
        value, low, high = bracket.args
        shift = sp.expand(index - value)
        width = sp.expand(high - low + 1)
        if low != 1 or block not in (None, width):
            raise DeriveError(f"no tensor form for {sp.Add(*terms)} (uneven blocks)")
        block = width
        number = sp.simplify(shift / width)
        if not number.is_Integer or number < 0:
            raise DeriveError(f"no tensor form for {sp.Add(*terms)} (uneven blocks)")
        rest = sp.Mul(*(f for f in sp.Mul.make_args(term) if f is not bracket))
        parts.setdefault(int(number), []).append(rest.xreplace({index: index + shift}))
    count = sp.simplify(size / block)
    if not count.is_Integer:
        raise DeriveError(f"no tensor form for {sp.Add(*terms)} (uneven blocks)")
    out = []
    for number in range(int(count)):
        part = sp.Add(*parts.get(number, []))
        inner = blocks(part, (index,), (block,), widths, vector)
        out.append(inner if inner is not None else vector(part, (index,)) if part != 0
                   else sp.Integer(0))
    return Concat(*out, sp.Tuple(block))


# --- whole sequences: formulas over two time axes (attention) -------------------------------


class Causal(sp.Function):
    """``Causal(T)``: the T × T matrix of the brackets [τ ≤ t] (row t, column τ): causal
    attention's mask."""

    nargs = 1


class SumLast(sp.Function):
    """``SumLast(x)``: x summed over its last axis, which is kept with length 1, so that it
    stands beside the tensors of the frame it was summed in (Σ_τ' α_{tτ'} g_{tτ'}, beside
    α_{tτ}: a column)."""

    nargs = 1


def whole_sequence(expr: sp.Expr, free: tuple[sp.Symbol, ...], einsum) -> sp.Expr:
    """The tensor form of a formula over two time axes (attention's scores s_{tτ}, its
    output Σ_τ α_{tτ} v_{τj}, their adjoints), read over whole sequences: an entry q_{tj} is
    the (T, n) tensor q. A contraction of entries is ``einsum(expr, free)``; anything else
    must be elementwise over the axes ``free``, with sums over the last axis (``SumLast``) and
    the causal bracket [τ ≤ t] (``Causal``) inside."""
    constant = sp.Mul(*(f for f in sp.Mul.make_args(expr) if not f.has(sp.Indexed)))
    try:
        contraction = einsum(expr / constant, free)
    except DeriveError:
        return _pointwise(expr, free, expr)
    return constant * _as_product(contraction)


class MatProd(sp.Function):
    """``MatProd(A, B)``: the matrix product of two whole sequences read as matrices (steps as
    rows, or the two time axes of attention weights), one per sample."""

    nargs = 2


class Transposed(sp.Function):
    """``Transposed(A)``: a whole sequence's matrix, transposed."""

    nargs = 1


def _as_product(contraction: sp.Expr) -> sp.Expr:
    """A contraction of two matrices over one shared axis (``Einsum("ji,ki->jk", δ, v)``)
    as the matrix product it is (δ vᵀ); any other contraction as it is."""
    subscripts, *operands = contraction.args
    inputs, output = str(subscripts).split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or len(output) != 2 or any(len(p) != 2 for p in parts):
        return contraction
    shared = set(parts[0]) & set(parts[1])
    if len(shared) != 1 or shared & set(output) or len(set(output)) != 2:
        return contraction
    (summed,) = shared
    if output[0] not in parts[0]:
        parts, operands = parts[::-1], operands[::-1]
    if output[0] not in parts[0] or output[1] not in parts[1]:
        return contraction
    left = operands[0] if parts[0] == output[0] + summed else Transposed(operands[0])
    right = operands[1] if parts[1] == summed + output[1] else Transposed(operands[1])
    return MatProd(left, right)


def _pointwise(expr: sp.Expr, frame: tuple[sp.Symbol, ...], whole: sp.Expr) -> sp.Expr:
    if isinstance(expr, sp.Indexed):
        tensor = tensor_of(expr)
        if tensor is None or tuple(expr.indices) != frame:
            raise DeriveError(f"no tensor form for {whole} (an entry {expr})")
        return tensor
    if isinstance(expr, InRange):
        if len(frame) == 2 and tuple(expr.args) == (frame[1], 1, frame[0]):
            return Causal(LENGTH)
        raise DeriveError(f"no tensor form for {whole} (a bracket {expr})")
    if isinstance(expr, sp.Sum):
        (index, _low, _high), *more = expr.limits
        if more or not frame or expr.function.free_symbols & set(frame[-1:]) - {index}:
            raise DeriveError(f"no tensor form for {whole}")
        return SumLast(_pointwise(expr.function, (*frame[:-1], index), whole))
    if isinstance(expr, NetTensor) and expr.rank and not expr.is_parameter:
        raise DeriveError(f"no tensor form for {whole}")
    if not expr.args or not expr.has(sp.Indexed):
        return expr
    return expr.func(*(_pointwise(arg, frame, whole) for arg in expr.args))

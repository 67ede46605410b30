"""Index form → tensor form for feature maps: sliding windows, their adjoint, and flattening.

The general translation (:mod:`derive.derivation.tensorform`) handles contractions whose
tensor entries are indexed by plain indices. A convolution or pooling layer reads its input at
shifted indices, x_{k, S(r-1)+p-P, ...}; its backward pass reads a kernel at indices such as
w_{kj, r-u+2, s-v+2} inside the Iverson brackets [1 ≤ r-u+2 ≤ 3] that collapsing the
Kronecker deltas left. Both are read here as whole arrays (docs/architecture.md, "Images"):

* ``Windows(x, (kh, kw), (S_h, S_w), (P_h, P_w))`` is the array of x's sliding windows,
  entry [k, r, s, p, q] = x_{k, S_h(r-1)+p-P_h, S_w(s-1)+q-P_w} (0 in the padding); with it
  a convolution, a kernel's gradient and a pooling layer are contractions (``Einsum``) or
  reductions (``WindowsMax``) like any other.
* ``Fold(cols, (H, W), stride, padding)`` is the adjoint of ``Windows``: entry [k, r, s] is the
  sum of cols[k, u, v, p, q] over the windows (u, v) and offsets (p, q) that cover (r, s), i.e.
  over the terms of the brackets; δ of a convolution's input is the fold of δ ⊗ w (the "full
  correlation with the flipped kernel"), δ of a pooling layer's input the fold of δ times the
  window's indicator (``FirstMaxMask``) or 1/(kh kw).
* ``Unflatten(v, (H, W))`` is a flattened vector read back as a feature map (δ of a flatten's
  input), ``Flatten(a)`` a feature map as a vector.

Every array here is per sample; the printers add the batch axis, as for the rest.
"""

from __future__ import annotations

import sympy as sp

from derive.errors import DeriveError
from derive.quantities import NetTensor, tensor_of
from derive.registry.windows import FirstMax, InRange, WindowMax


class Windows(sp.Function):
    """``Windows(x, kernel, stride, padding)``: the sliding windows of feature map x, a
    per-sample array of rank 5 (channel, row, column, row offset, column offset)."""

    nargs = 4


class WindowsMax(sp.Function):
    """``WindowsMax(windows)``: the maximum over each window's offsets (rank 3)."""

    nargs = 1


class FirstMaxMask(sp.Function):
    """``FirstMaxMask(windows)``: 1 at each window's first maximum (row-major), 0 elsewhere;
    the windows' rank 5."""

    nargs = 1


class Fold(sp.Function):
    """``Fold(cols, shape, stride, padding, kernel)``: the adjoint of :class:`Windows`; the
    window entries of cols (rank 5, possibly broadcast along the offsets: ``kernel`` gives
    their number) added back at their places in feature maps of ``shape`` (H, W)."""

    nargs = 5


class Flatten(sp.Function):
    """``Flatten(a)``: a feature map as a vector, channel-major."""

    nargs = 1


class Unflatten(sp.Function):
    """``Unflatten(v, shape)``: the vector v read as feature maps of ``shape`` (H, W)."""

    nargs = 2


#: Tensor-form arrays that stand where a NetTensor would (an einsum operand, a factor).
ARRAYS = (Windows, WindowsMax, FirstMaxMask, Fold, Unflatten)


def _pair(a: sp.Expr, b: sp.Expr) -> sp.Tuple:
    return sp.Tuple(sp.sympify(a), sp.sympify(b))


def is_image_form(expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> bool:
    """Whether ``expr`` needs this module: it reads an entry at a shifted or flattened index,
    a window, a bracket, or a per-sample quantity of rank 3 or more."""
    if expr.has(InRange, WindowMax, FirstMax):
        return True
    for entry in expr.atoms(sp.Indexed):
        tensor = tensor_of(entry)
        if tensor is not None and not tensor.is_parameter and tensor.rank >= 3:
            return True
        if not all(isinstance(index, sp.Symbol) for index in entry.indices):
            return True
    return False


def image_form(expr: sp.Expr, free: tuple[sp.Symbol, ...],
               ranges: dict[sp.Symbol, sp.Expr], contract) -> sp.Expr:
    """The tensor form of ``expr`` with free indices ``free`` (each index's range in
    ``ranges``, summation indices included as they are met). ``contract(expr, free)`` is the
    general translation of a contraction of plain entries (``Einsum``)."""
    return _Form(ranges, contract).form(expr, free)


class _Form:
    def __init__(self, ranges: dict[sp.Symbol, sp.Expr], contract) -> None:
        self.ranges = dict(ranges)
        self.contract = contract

    def form(self, expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> sp.Expr:
        if isinstance(expr, sp.Add):
            return sp.Add(*(self.form(term, free) for term in expr.args))
        if isinstance(expr, sp.Mul):     # σ'(z) ⊙ (a sum), ...: factor by factor
            return self.product(expr, free)
        if isinstance(expr, sp.Sum):
            return self.summed(expr, free)
        if isinstance(expr, sp.Indexed):
            return self.entry(expr, free)
        if isinstance(expr, WindowMax):
            array, indices = self.windows_of(expr.function, [l[0] for l in expr.limits],
                                              expr.limits)
            return self.placed(WindowsMax(array), indices[:3], free)
        if isinstance(expr, NetTensor) or not expr.has(*free):
            return expr
        return expr.func(*(self.form(arg, free) if isinstance(arg, sp.Basic) else arg
                           for arg in expr.args))

    # -- entries -----------------------------------------------------------------------

    def entry(self, entry: sp.Indexed, free: tuple[sp.Symbol, ...]) -> sp.Expr:
        tensor = tensor_of(entry)
        indices = tuple(entry.indices)
        if tensor is None:
            raise DeriveError(f"no tensor form for {entry}")
        if all(isinstance(i, sp.Symbol) for i in indices):
            return self.placed(tensor, indices, free)
        if len(indices) == 1 and len(free) == 3:
            return Unflatten(tensor, self.flattened_shape(indices[0], free))
        raise DeriveError(f"no tensor form for {entry} (free indices {free})")

    def placed(self, array: sp.Expr, indices: tuple[sp.Symbol, ...],
               free: tuple[sp.Symbol, ...]) -> sp.Expr:
        """``array`` (its axes ``indices``) among the axes ``free`` of an entrywise
        expression."""
        from derive.derivation.tensorform import Broadcast, letters

        if tuple(indices) == tuple(free):
            return array
        if not set(indices) <= set(free) or len(set(indices)) != len(indices):
            raise DeriveError(f"no tensor form for {array} at {indices} among {free}")
        names = letters(free)
        return Broadcast(array, sp.Symbol("".join(names[i] for i in indices)),
                         sp.Symbol("".join(names[i] for i in free)))

    @staticmethod
    def flattened_shape(index: sp.Expr, free: tuple[sp.Symbol, ...]) -> sp.Tuple:
        """(H, W) of a flatten's index (k-1)HW + (r-1)W + s over the free (k, r, s)."""
        index = sp.expand(index)
        channel, row, col = (index.coeff(f) for f in free)
        constant = index - channel * free[0] - row * free[1] - col * free[2]
        if col != 1 or sp.simplify(constant - (1 - channel - row - col)) != 0 or \
                sp.simplify(channel - row * (channel / row)) != 0:
            raise DeriveError(f"no tensor form for the flattened index {index}")
        return _pair(sp.simplify(channel / row), row)

    # -- windows ---------------------------------------------------------------------------

    def windows_of(self, entry: sp.Indexed, offsets: list[sp.Symbol], limits
                   ) -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
        """The :class:`Windows` array that ``entry`` (x at shifted rows and columns, whose
        kernel offsets are ``offsets``) is an entry of, and that entry's indices."""
        tensor = tensor_of(entry)
        channel, row, col = entry.indices
        kernel, stride, padding, positions = [], [], [], []
        for shifted, offset in zip((row, col), offsets):
            shifted = sp.expand(shifted)
            rest = shifted - offset
            position = [s for s in rest.free_symbols if s != offset]
            if shifted.coeff(offset) != 1 or len(position) != 1:
                raise DeriveError(f"no tensor form for {entry}")
            (position,) = position
            step = rest.coeff(position)
            constant = sp.expand(rest - step * position)
            if not (step.is_Integer and step >= 1 and constant.is_Integer):
                raise DeriveError(f"no tensor form for {entry}")
            pad = -(constant + step)
            if pad < 0:
                raise DeriveError(f"no tensor form for {entry} (a window before the input)")
            size = self.range_of(offset, limits)
            kernel.append(size)
            stride.append(step)
            padding.append(pad)
            positions.append(position)
        array = Windows(tensor, _pair(*kernel), _pair(*stride), _pair(*padding))
        return array, (channel, *positions, *offsets)

    def range_of(self, index: sp.Symbol, limits=()) -> sp.Expr:
        for limit in limits:
            if limit[0] == index:
                return limit[2]
        if index in self.ranges:
            return self.ranges[index]
        raise DeriveError(f"no tensor form: the range of {index} is not known")

    def product(self, expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> sp.Expr:
        """An entrywise product of factors over the axes ``free`` (a window's indicator times
        δ over the window's axes, ...)."""
        out = []
        for factor in sp.Mul.make_args(expr):
            if isinstance(factor, FirstMax):
                window, p, q = factor.args
                array, indices = self.windows_of(window.function,
                                                 [l[0] for l in window.limits], window.limits)
                mask_indices = (*indices[:3], p, q)
                if not all(isinstance(i, sp.Symbol) for i in mask_indices):
                    raise DeriveError(f"no tensor form for {factor}")
                out.append(self.placed(FirstMaxMask(array), mask_indices, free))
            else:
                out.append(self.form(factor, free))
        return sp.Mul(*out)

    # -- sums --------------------------------------------------------------------------------

    def summed(self, expr: sp.Sum, free: tuple[sp.Symbol, ...]) -> sp.Expr:
        body, limits = _nested(expr)
        for index, low, high in limits:
            self.ranges[index] = high
        brackets = [f for f in sp.Mul.make_args(body) if isinstance(f, InRange)]
        if brackets:
            return self.fold(body, limits, brackets, free)
        summed = tuple(limit[0] for limit in limits)
        rewritten = self.with_windows(body, summed, free)
        try:
            return self.contract(sp.Sum(rewritten, *limits), free)
        except DeriveError:
            pass
        # a sum of an entrywise expression over some axes
        from derive.derivation.tensorform import SumAxes, letters

        frame = (*free, *summed)
        names = letters(frame)
        inner = self.form(body, frame)
        return SumAxes(inner, sp.Symbol("".join(names[i] for i in frame)),
                       sp.Symbol("".join(names[i] for i in free)))

    def with_windows(self, body: sp.Expr, summed: tuple[sp.Symbol, ...],
                     free: tuple[sp.Symbol, ...]) -> sp.Expr:
        """``body`` with each entry at shifted indices as an entry of its windows array."""
        def replace(entry: sp.Indexed) -> sp.Expr:
            if all(isinstance(i, sp.Symbol) for i in entry.indices):
                return entry
            offsets = self.offsets_in(entry, summed, free)
            array, indices = self.windows_of(entry, offsets, ())
            return sp.IndexedBase(array)[indices]

        return body.replace(lambda e: isinstance(e, sp.Indexed), replace)

    def offsets_in(self, entry: sp.Indexed, summed: tuple[sp.Symbol, ...],
                   free: tuple[sp.Symbol, ...]) -> list[sp.Symbol]:
        """The kernel offsets of a shifted entry: in each shifted index, the index whose
        coefficient is 1 and whose range is a number (a kernel's size)."""
        offsets = []
        for shifted in entry.indices[1:]:
            candidates = [s for s in sp.expand(shifted).free_symbols
                          if sp.expand(shifted).coeff(s) == 1
                          and sp.sympify(self.ranges.get(s, 0)).is_Integer
                          and self.ranges.get(s, 0) != 0]
            if len(candidates) != 1:
                raise DeriveError(f"no tensor form for {entry}")
            offsets.append(candidates[0])
        return offsets

    def fold(self, body: sp.Expr, limits, brackets: list[InRange],
             free: tuple[sp.Symbol, ...]) -> sp.Expr:
        """Σ over windows (u, v) of f with brackets [1 ≤ r - S(u-1) + P ... ≤ kh]: the fold
        of cols[k, u, v, p, q] = f at p = r - S(u-1) + P (the bracket's argument)."""
        if len(brackets) != 2 or len(free) != 3:
            raise DeriveError(f"no tensor form for {body}")
        channel, row, col = free
        summed = [limit[0] for limit in limits]
        substitution: dict[sp.Expr, sp.Symbol] = {}
        positions, kernel, stride, padding, offsets = [], [], [], [], []
        taken = body.free_symbols | set(free) | set(summed)
        for axis, target in enumerate((row, col)):
            (bracket,) = [b for b in brackets if b.args[0].has(target)]
            shifted, low, high = bracket.args
            shifted = sp.expand(shifted)
            position = [s for s in shifted.free_symbols if s != target]
            if low != 1 or shifted.coeff(target) != 1 or len(position) != 1 or \
                    position[0] not in summed:
                raise DeriveError(f"no tensor form for {body}")
            (position,) = position
            step = -shifted.coeff(position)
            constant = sp.expand(shifted - target + step * position)
            if not (step.is_Integer and step >= 1 and constant.is_Integer):
                raise DeriveError(f"no tensor form for {body}")
            offset = _fresh_offset(axis, taken)
            taken.add(offset)
            substitution[shifted] = offset
            positions.append(position)
            kernel.append(high)
            stride.append(step)
            padding.append(constant - step)
            offsets.append(offset)
            self.ranges[offset] = high
        cols_body = sp.Mul(*(f for f in sp.Mul.make_args(body) if f not in brackets))
        cols_body = _substitute_shifts(cols_body, substitution)
        if cols_body.has(row, col):
            raise DeriveError(f"no tensor form for {body}")
        rest = [limit for limit in limits if limit[0] not in positions]
        cols_free = (channel, *positions, *offsets)
        inner = sp.Sum(cols_body, *rest) if rest else cols_body
        cols = self.form(inner, cols_free) if rest else self.product(cols_body, cols_free)
        shape = _pair(self.range_of(row), self.range_of(col))
        return Fold(cols, shape, _pair(*stride), _pair(*padding), _pair(*kernel))


def _nested(expr: sp.Sum) -> tuple[sp.Expr, list[tuple]]:
    """Σ_a Σ_b f (nested, or with factors free of the inner indices outside) as one body
    and its limits (tensorform's flattening of nested sums)."""
    from derive.derivation.tensorform import _flattened

    flat = _flattened(expr)
    return flat.function, list(flat.limits)


def _fresh_offset(axis: int, taken: set[sp.Symbol]) -> sp.Symbol:
    from derive.quantities import family_indices

    return family_indices(("offset_row", "offset_col")[axis:axis + 1], set(taken))[0]


def _substitute_shifts(expr: sp.Expr, substitution: dict[sp.Expr, sp.Symbol]) -> sp.Expr:
    """Every index expression equal to a key of ``substitution`` replaced by its symbol."""
    def index(i: sp.Expr) -> sp.Expr:
        expanded = sp.expand(i)
        return substitution.get(expanded, i)

    def rebuild(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.Indexed):
            return e.base[tuple(index(i) for i in e.indices)]
        if isinstance(e, FirstMax):
            window, p, q = e.args
            return FirstMax(window, index(p), index(q))
        return e

    return expr.replace(lambda e: isinstance(e, sp.Indexed | FirstMax), rebuild)

"""What the printers need to read feature-map formulas as convolutions (presentation only).

Takes the tensor-form trees of :mod:`derive.derivation.imageform` (``Windows``, ``Fold``,
``Einsum`` over windows) and the index expressions of shifted entries, and says what they are
in the notation of the textbooks, from their structure alone: which einsum is a convolution
W ⋆ x (kernel axes contracted against a window's offsets and the input channels), which is a
kernel's gradient x ⋆ δ (the window positions contracted against δ's), which fold is the
full correlation of δ with the flipped kernel, a max-pool's routing of δ through the indicator
of the first maximum, or a plain spreading of δ over its windows. Nothing here computes or
changes a formula: the LaTeX and terminal printers ask, and spell what they are told; an
expression of any other structure prints as the general einsum.

Index expressions print in reading order: window positions with their stride, then kernel
offsets, then other symbols, then the constant (2r + p − 3, not p + 2r − 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from derive.derivation.imageform import FirstMaxMask, Windows
from derive.derivation.tensorform import Broadcast, Einsum
from derive.quantities import NetTensor, index_family

#: Reading order of an index's terms by its family (docs/architecture.md, "Images"): the
#: channel of a flattened index, then rows, columns, a kernel's offsets.
_ORDER = {"channel": 0, "row": 1, "col": 1, "offset_row": 2, "offset_col": 2}


def _family(symbol: sp.Symbol) -> str:
    return index_family(symbol)


def is_index_expression(expr: sp.Expr) -> bool:
    """Whether ``expr`` is an index computed from indices (a shifted or flattened index)."""
    return isinstance(expr, sp.Add) and all(
        s.is_integer for s in expr.free_symbols) and not expr.has(sp.Indexed, sp.Sum)


def index_terms(expr: sp.Add) -> list[sp.Expr]:
    """The terms of an index expression in reading order (stable within a family)."""
    def rank(term: sp.Expr) -> int:
        symbols = term.free_symbols
        if not symbols:
            return 4
        return min(_ORDER.get(_family(s), 3) for s in symbols)

    return sorted(expr.as_ordered_terms(), key=rank)


@dataclass(frozen=True)
class Geometry:
    """A window's kernel, stride and padding, each (rows, columns)."""

    kernel: tuple[sp.Expr, sp.Expr]
    stride: tuple[sp.Expr, sp.Expr]
    padding: tuple[sp.Expr, sp.Expr]

    @staticmethod
    def _pair(pair: tuple[sp.Expr, sp.Expr]) -> str:
        a, b = pair
        return str(a) if a == b else f"({a}, {b})"

    def notes(self, *, kernel: bool = True, times: str = "×") -> list[str]:
        """The parts worth saying: the kernel (when asked), a stride other than 1, a padding
        other than 0: ``["2×2", "S=2", "P=1"]``."""
        out = []
        if kernel:
            out.append(f"{self.kernel[0]}{times}{self.kernel[1]}")
        if any(s != 1 for s in self.stride):
            out.append(f"S={self._pair(self.stride)}")
        if any(p != 0 for p in self.padding):
            out.append(f"P={self._pair(self.padding)}")
        return out


def windows_geometry(windows: Windows) -> Geometry:
    _x, kernel, stride, padding = windows.args
    return Geometry(tuple(kernel), tuple(stride), tuple(padding))


def fold_geometry(fold: sp.Expr) -> Geometry:
    _cols, _shape, stride, padding, kernel = fold.args
    return Geometry(tuple(kernel), tuple(stride), tuple(padding))


def _subscripts(einsum: Einsum) -> tuple[list[str], str]:
    inputs, output = str(einsum.args[0]).split("->")
    return inputs.split(","), output


def _is_kernel(expr: sp.Expr) -> bool:
    return isinstance(expr, NetTensor) and expr.is_parameter and expr.rank == 4


def _is_map(expr: sp.Expr) -> bool:
    """A per-sample feature map (rank 3): a^l, z^l, δ^l, an adjoint."""
    return isinstance(expr, NetTensor) and not expr.is_parameter and expr.rank == 3


@dataclass(frozen=True)
class Contraction:
    """What an einsum is: ``kind`` "conv" (kernel ⋆ input), "correlate" (input ⋆ δ: a
    kernel's gradient), "full" (δ against the kernel, before a fold) or "sum" (one operand
    summed over ``axes``, named by position), with its two operands or the one."""

    kind: str
    left: sp.Expr
    right: sp.Expr | None = None
    geometry: Geometry | None = None
    axes: tuple[int, ...] = ()

    def operands(self) -> tuple[sp.Expr, sp.Expr]:
        """The two sides of ⋆ as the notation writes them: W ⋆ x, x ⋆ δ (the windows
        stand for the map they slide over)."""
        if self.kind == "conv":
            return self.left, self.right.args[0]
        if self.kind == "correlate":
            return self.left.args[0], self.right
        return self.left, self.right


def contraction(einsum: Einsum) -> Contraction | None:
    """The convolution an einsum is, read from its operands and subscripts; None for any
    other contraction."""
    operands = einsum.args[1:]
    inputs, output = _subscripts(einsum)
    if len(operands) == 1:
        (letters,) = inputs
        if len(set(letters)) == len(letters) and set(output) < set(letters) and \
                letters.startswith(output):
            return Contraction("sum", operands[0], axes=tuple(
                n for n, letter in enumerate(letters) if letter not in output))
        return None
    if len(operands) != 2:
        return None
    pairs = list(zip(operands, inputs))
    windows = [(o, s) for o, s in pairs if isinstance(o, Windows)]
    kernels = [(o, s) for o, s in pairs if _is_kernel(o)]
    maps = [(o, s) for o, s in pairs if _is_map(o)]
    if len(windows) == 1 and len(kernels) == 1:
        (x, (c, u, v, p, q)), (w, (o, c2, p2, q2)) = windows[0], kernels[0]
        if (c, p, q) == (c2, p2, q2) and output == o + u + v:
            return Contraction("conv", w, x, windows_geometry(x))
    if len(windows) == 1 and len(maps) == 1:
        (x, (c, u, v, p, q)), (d, (o, u2, v2)) = windows[0], maps[0]
        if (u, v) == (u2, v2) and output == o + c + p + q:
            return Contraction("correlate", x, d, windows_geometry(x))
    if len(maps) == 1 and len(kernels) == 1:
        (d, (o, u, v)), (w, (o2, c, p, q)) = maps[0], kernels[0]
        if o == o2 and output == c + u + v + p + q:
            return Contraction("full", d, w)
    return None


@dataclass(frozen=True)
class Folded:
    """What a fold is: "full" (δ ⋆_full rot180(W)), "route" (δ times a max-pool's
    indicator of ``windows``), "spread" (δ copied onto each of its windows) or "fold"
    (anything else, ``left`` the columns)."""

    kind: str
    left: sp.Expr
    right: sp.Expr | None
    geometry: Geometry


def folded(fold: sp.Expr) -> Folded:
    cols = fold.args[0]
    geometry = fold_geometry(fold)
    if isinstance(cols, Einsum):
        found = contraction(cols)
        if found is not None and found.kind == "full":
            return Folded("full", found.left, found.right, geometry)
    if isinstance(cols, Broadcast) and _spread(cols):
        return Folded("spread", cols.args[0], None, geometry)
    if isinstance(cols, sp.Mul):
        masks = [f for f in cols.args if isinstance(f, FirstMaxMask)]
        rest = [f for f in cols.args if not isinstance(f, FirstMaxMask)]
        if len(masks) == 1 and len(rest) == 1 and isinstance(rest[0], Broadcast) and \
                _spread(rest[0]):
            return Folded("route", rest[0].args[0], masks[0].args[0], geometry)
    return Folded("fold", cols, None, geometry)


def _spread(broadcast: Broadcast) -> bool:
    """A feature map placed on the first three axes of a window array (constant along the
    offsets)."""
    tensor, axes, frame = broadcast.args
    return _is_map(tensor) and len(str(frame)) == 5 and str(frame).startswith(str(axes))


def spread_map(broadcast: Broadcast) -> bool:
    """Whether a Broadcast is a per-channel vector (a bias) or a feature map placed on the
    axes of feature maps or windows: the printers write the tensor itself."""
    tensor, axes, frame = broadcast.args
    return len(str(frame)) >= 3 and isinstance(tensor, NetTensor) and (
        str(frame).startswith(str(axes)))


#: How the axes of a feature map (rank 3), a kernel (rank 4) and windows (rank 5) are named
#: when a sum runs over some of them.
AXIS_NAMES = {3: ("j", "r", "s"), 4: ("j", "k", "p", "q"), 5: ("j", "r", "s", "p", "q")}


def summed_axes(found: Contraction) -> str | None:
    """The names of the axes a "sum" contraction runs over: ``"r,s"``; None when unknown."""
    rank = found.left.rank if isinstance(found.left, NetTensor) else (
        5 if isinstance(found.left, Windows) else None)
    names = AXIS_NAMES.get(rank)
    if names is None:
        return None
    return ",".join(names[a] for a in found.axes)

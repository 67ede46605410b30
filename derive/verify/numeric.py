"""The numeric service of derive's two checks: random points, capped widths, 50-digit values.

Verification by expansion (:mod:`derive.verify.expansion`) and the checking of users' formulas
(:mod:`derive.check.formulas`) both compare formulas by evaluating them on a small concrete
copy of a network at random points. What they share lives here, once:

- **points**: random values for a network's leaves (inputs, parameters, dropout masks and
  targets), seeded by the caller's ``random.Random`` and so deterministic; targets are valid
  for the loss (probabilities in [0.05, 0.95] for binary cross-entropy, exact rational
  probability vectors summing to 1 for cross-entropy);
- **sizes**: the parameter count of a spec, and a copy with its widths capped (at a given
  width, or at the largest width within a parameter budget, found by bisection);
- **values**: SymEngine expressions evaluated at a point with 50-digit arithmetic (200 bits),
  with the fallback for piecewise conditions that substitution leaves undecided.

Takes specs, leaves and SymEngine expressions; gives points, specs and numbers. Reads the
spec and the op registry only: no derivation.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import symengine as se
from symengine.lib.symengine_wrapper import Boolean as _Boolean

from derive.quantities import NetTensor
from derive.registry.ops import OPS
from derive.spec.load import NetworkSpec, layer_attributes

#: Precision of the numeric checks: 50 decimal digits ...
DIGITS = 50
#: ... carried in 200 bits (166 would do; the rest are guard bits).
BITS = 200
#: Relative agreement required at 50 digits (ten digits of slack for cancellation).
TOLERANCE = 10.0 ** -(DIGITS - 10)
#: Networks with more parameters than this are verified on a copy with capped widths (after
#: repeated layers are left out, :mod:`derive.verify.reduction`): 700 parameters verify in
#: about 2 s at 20 points (bench/verify_times.py).
PARAMETER_BUDGET = 700
#: Widths are never capped below this: with three values, the indices of a formula (j, k and
#: a summed index) can all differ, so a transposed matrix or a softmax's missing cross term
#: cannot agree with the truth by chance. A width already below it stays as it is.
MIN_WIDTH = 3
#: Where binary cross-entropy's targets are drawn: probabilities away from 0 and 1.
PROBABILITY_RANGE = (0.05, 0.95)
#: Resolution of an exact probability vector drawn without rounding (entries k / 10^6).
_RESOLUTION = 10**6

Key = TypeVar("Key", bound=Hashable)


# --- random points ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the leaves of a point are drawn.

    Every leaf is uniform in [``low``, ``high``]; ``decimals``: rounded to that many decimals
    (a counterexample a person can retype by hand), else a full double; ``mask``: dropout
    masks fixed at this value (1: dropout off), else drawn like any other leaf.
    """

    low: float = -1.5
    high: float = 1.5
    decimals: int | None = None
    mask: float | None = None


def random_point(rng: random.Random, leaves: Iterable[tuple[Key, NetTensor]],
                 needs: str | None, sampling: Sampling | None = None,
                 steps: Mapping[Key, tuple] | None = None) -> dict[Key, se.Basic]:
    """A value for every leaf ``(key, quantity)``, drawn from ``rng`` in the order given.

    The entries of the target (role ``y``) are drawn together where the first one comes, so
    that they fit the loss's ``needs`` (:func:`random_targets`); a sequence's step by step
    (``steps``: each target entry's step), so that each step's target is a probability
    vector. Dropout masks (role ``mask``) as ``sampling`` says. The same seed and leaves give
    the same point.
    """
    sampling = sampling or Sampling()
    leaves = list(leaves)
    targets: dict[tuple, list[Key]] = {}
    for key, tensor in leaves:
        if tensor.role == "y":
            targets.setdefault((steps or {}).get(key, ()), []).append(key)
    point: dict[Key, se.Basic] = {}
    for key, tensor in leaves:
        if key in point:
            continue
        if tensor.role == "y":
            for group in targets.values():
                point.update(zip(group, random_targets(rng, len(group), needs, sampling)))
        elif tensor.role == "mask" and sampling.mask is not None:
            point[key] = number(sampling.mask)
        else:
            point[key] = number(_draw(rng, sampling.low, sampling.high, sampling.decimals))
    return point


def random_targets(rng: random.Random, count: int, needs: str | None,
                   sampling: Sampling | None = None) -> list[se.Basic]:
    """``count`` target values valid for a loss that ``needs`` them to be: ``"probability"``
    (each in :data:`PROBABILITY_RANGE`), ``"distribution"`` (exact rationals, positive,
    summing to exactly 1, as Σ_j y_j = 1 is assumed by softmax with cross-entropy) or
    anything (``None``: drawn like any leaf)."""
    sampling = sampling or Sampling()
    if needs == "probability":
        low, high = PROBABILITY_RANGE
        return [number(_draw(rng, low, high, sampling.decimals)) for _ in range(count)]
    if needs == "distribution":
        resolution = _RESOLUTION if sampling.decimals is None else 10**sampling.decimals
        return [se.Integer(k) / resolution
                for k in _partition(rng, count, max(resolution, count + 1))]
    return [number(_draw(rng, sampling.low, sampling.high, sampling.decimals))
            for _ in range(count)]


def _draw(rng: random.Random, low: float, high: float, decimals: int | None) -> float:
    value = rng.uniform(low, high)
    return value if decimals is None else round(value, decimals)


def _partition(rng: random.Random, count: int, total: int) -> list[int]:
    """``count`` positive integers summing to ``total``: the gaps between random cuts."""
    cuts = sorted(rng.sample(range(1, total), count - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


# --- the size of what is expanded ---------------------------------------------------------


def parameter_count(sizes: Sequence[int], biases: Sequence[bool]) -> int:
    """Number of weights and biases of a chain of dense layers with these sizes."""
    return sum(n * m + (n if bias else 0) for m, n, bias in zip(sizes, sizes[1:], biases))


def spec_parameter_count(spec: NetworkSpec) -> int:
    """Number of parameter entries of ``spec`` (every op's parameters)."""
    return sum(math.prod(shape) for shape in spec.parameter_shapes().values())


#: The time steps a checked copy of a sequence network keeps: the first step (which reads
#: h_0 = 0), one in the middle and the last (whose error has no step after it).
CHECKED_STEPS = 3


def capped_spec(spec: NetworkSpec, cap: int) -> NetworkSpec:
    """``spec`` with the input and every op that chooses its width (``size``, a convolution's
    ``channels``) capped at ``cap``, and an image input as small as keeps every feature map
    at least 2 x 2 (or as it was, if smaller): the same graph, ops, activations and loss. The
    other ops' shapes follow from their inputs, so nodes summed by ``add`` keep equal shapes.
    A sequence keeps ``CHECKED_STEPS`` time steps. ``spec`` itself where nothing exceeds
    ``cap``."""
    length = min(spec.length, CHECKED_STEPS) if spec.length is not None else None
    if max(spec.sizes) <= cap and spec.image is None and length == spec.length:
        return spec
    image = None
    if spec.image is not None:
        image = _smallest_image(spec, min(spec.image[0], cap))
        if image == spec.image and max(spec.sizes) <= cap:
            return spec
    shapes = _capped_shapes(spec, cap, image, length)
    layers = tuple(dataclasses.replace(layer, size=shape[-1] if len(shape) == 2 else shape[0],
                                       image=shape if len(shape) == 3 else None,
                                       length=shape[0] if len(shape) == 2 else None)
                   for layer, shape in zip(spec.layers, shapes[1:]))
    return dataclasses.replace(spec, input=shapes[0][-1] if length else shapes[0][0],
                               layers=layers, example=None, image=image, length=length)


def _capped_shapes(spec: NetworkSpec, cap: int, image: tuple[int, ...] | None,
                   length: int | None = None) -> list[tuple[int, ...]]:
    """The shape of every node with widths capped at ``cap`` and the input ``image`` (or
    the input's width capped; a sequence of ``length`` steps); ValueError where a window no
    longer fits."""
    width = min(spec.input, cap)
    shapes = [image if image is not None else (length, width) if length else (width,)]
    for l, layer in enumerate(spec.layers, start=1):
        definition = OPS[layer.op]
        chooses = any(a.kind == "size" for a in definition.attributes)
        attrs = {**layer_attributes(layer), "size": min(layer.size, cap) if chooses
                 else layer.size}
        reads = layer.reads(l)
        if definition.output_shape is not None:
            shapes.append(definition.output_shape(attrs, shapes[reads[0]]))
        else:
            size = definition.output_size(attrs, tuple(shapes[n][-1] if len(shapes[n]) == 2
                                                        else shapes[n][0] for n in reads))
            steps = shapes[reads[0]][:1] if len(shapes[reads[0]]) == 2 else ()
            shapes.append((*steps, size))
    return shapes


def _smallest_image(spec: NetworkSpec, channels: int) -> tuple[int, int, int]:
    """The smallest image input (channels, H, W) with which every feature map keeps at least
    min(2, its own) rows and columns: rows first, then columns."""
    wanted = [tuple(min(2, n) for n in shape[1:]) for shape in spec.shapes if len(shape) == 3]
    size = list(spec.image[1:])
    for axis in (0, 1):
        for candidate in range(1, spec.image[axis + 1] + 1):
            trial = [*size]
            trial[axis] = candidate
            try:
                shapes = _capped_shapes(spec, max(spec.sizes), (channels, *trial))
            except ValueError:
                continue
            maps = [shape[1:] for shape in shapes if len(shape) == 3]
            if all(got[axis] >= want[axis] for got, want in zip(maps, wanted)):
                size = trial
                break
    return (channels, size[0], size[1])


def largest_cap(spec: NetworkSpec, budget: int = PARAMETER_BUDGET) -> int:
    """The largest cap whose :func:`capped_spec` has at most ``budget`` parameters, but not
    below :data:`MIN_WIDTH` (returned even where it is over budget).

    The parameter count grows with the cap (widths grow with it, parameter shapes with the
    widths), so the cap is found by bisection: O(log n) parameter counts for widths up to n.
    """
    low, high = MIN_WIDTH, max(MIN_WIDTH, *spec.sizes)
    # invariant: the answer lies in [low, high]; low is acceptable (it fits, or is the floor)
    while low < high:
        middle = (low + high + 1) // 2
        if spec_parameter_count(capped_spec(spec, middle)) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def reduced_spec(spec: NetworkSpec, budget: int = PARAMETER_BUDGET) -> NetworkSpec:
    """``spec`` itself if it is within ``budget`` parameters, else a copy with every width
    (the input's too) capped at the largest value that fits, but not below
    :data:`MIN_WIDTH`: the same graph, ops, activations and loss. A sequence keeps
    :data:`CHECKED_STEPS` steps."""
    if spec_parameter_count(spec) <= budget:
        return capped_spec(spec, max(spec.sizes))      # a sequence: its steps capped
    return capped_spec(spec, largest_cap(spec, budget))


# --- values at a point --------------------------------------------------------------------


def number(value: float) -> se.Basic:
    """A double as a 200-bit number (its shortest decimal form, so 0.37 is 0.37000...)."""
    return se.RealMPFR(repr(float(value)), BITS)


def real_value(value: se.Basic) -> se.Basic | None:
    """``value`` as a 200-bit real number, or None where it has none (complex, infinite,
    undefined, or a condition left undecided)."""
    try:
        evaluated = value.n(BITS, real=True)
        finite = math.isfinite(float(evaluated))
    except (RuntimeError, TypeError, ValueError):
        return None
    return evaluated if finite else None


def value_at(expr: se.Basic, point: Mapping[se.Symbol, se.Basic]) -> se.Basic | None:
    """``expr`` at ``point`` as a 200-bit real number, or None where it has no finite real
    value. A piecewise condition that substitution leaves undecided (0 < sqrt(2)*0.3) is
    decided by evaluating again with every constant as a number."""
    value = real_value(expr.subs(point))
    if value is None:
        value = real_value(fold_constants([expr])[0].subs(point))
    return value


def evaluate(expr: se.Basic, point: Mapping[se.Symbol, se.Basic]) -> se.Basic:
    """``expr`` at ``point`` as a 200-bit real number (see :func:`value_at`); raises
    ValueError where it has no finite real value."""
    value = value_at(expr, point)
    if value is None:
        raise ValueError(f"{expr} has no finite real value at this point")
    return value


def as_float(value: se.Basic | None) -> float | None:
    """A computed value as a float; None stays None (no real value)."""
    return None if value is None else float(value)


class Batch:
    """Expressions evaluated together at points, each with :func:`value_at`'s fallback."""

    def __init__(self, exprs: Sequence[se.Basic]) -> None:
        self.exprs = list(exprs)
        self._matrix: se.DenseMatrix | None = None
        self._folded: list[se.Basic] | None = None

    def at(self, point: Mapping[se.Symbol, se.Basic]) -> list[se.Basic | None]:
        """Each expression at ``point``; None where it has no finite real value."""
        if not self.exprs:
            return []
        out = [real_value(value) for value in self._substitute(point)]
        for n, value in enumerate(out):
            if value is None:
                # an undecided piecewise condition (0 < sqrt(2)*x): again, constants as numbers
                if self._folded is None:
                    self._folded = fold_constants(self.exprs)
                out[n] = real_value(self._folded[n].subs(point))
        return out

    def _substitute(self, point: Mapping[se.Symbol, se.Basic]) -> list[se.Basic]:
        if self._matrix is None:
            self._matrix = se.DenseMatrix(len(self.exprs), 1, self.exprs)
        values = self._matrix.subs(point)
        return [values[n, 0] for n in range(len(self.exprs))]


def fold_constants(exprs: Sequence[se.Basic]) -> list[se.Basic]:
    """``exprs`` with every constant subexpression that is not a number (sqrt(2), pi,
    erf(1/2)) replaced by its 200-bit value, so that substituting numbers for the leaves
    evaluates everything, piecewise conditions included."""
    constant: dict[se.Basic, bool] = {}
    stack: list[tuple[se.Basic, bool]] = [(e, False) for e in exprs]
    while stack:
        node, visited = stack.pop()
        if node in constant:
            continue
        if visited:
            constant[node] = all(constant[arg] for arg in node.args)
        elif isinstance(node, se.Symbol):
            constant[node] = False
        elif not node.args:
            constant[node] = True
        else:
            stack.append((node, True))
            stack.extend((arg, False) for arg in node.args if arg not in constant)
    mapping: dict[se.Basic, se.Basic] = {}
    roots = [e for e in exprs if constant[e]]
    parents = [node for node, is_constant in constant.items() if not is_constant]
    for node in roots + [arg for parent in parents for arg in parent.args if constant[arg]]:
        if node in mapping or node.is_Number or isinstance(node, _Boolean):
            continue
        value = real_value(node)
        if value is not None:
            mapping[node] = value
    if not mapping:
        return list(exprs)
    return [e.xreplace(mapping) for e in exprs]

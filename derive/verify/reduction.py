"""The checked copy: the network verification expands, and why it covers the whole network.

Stage: verify. Takes a spec and a parameter budget; gives a :class:`CheckedCopy`: the spec that
is expanded, its derivation, and the account of what it covers.

Two reductions keep the expansion small, and neither changes a formula:

- **depth**, only where layers repeat: in a run of four or more consecutive layers of one kind
  (same op, activation and options; each reads only the layer before it and is read only by
  the layer after it; not the output), the first two and the last are kept. Every layer in
  between has the neighbourhood of the second (a layer of its kind on either side), so its
  formulas are the second's with the layer number shifted. That is not assumed: the whole
  network is derived too, and each of its formulas is compared, term by term, with the formula
  of the copy's layer that stands for it (its number mapped). Where one differs, the depth
  is not reduced.
- **width**, where the parameters exceed the budget: every width capped at one value
  (:func:`derive.verify.numeric.reduced_spec`), never below 3 (:data:`MIN_WIDTH`), so every
  layer kind stays in its position. The formulas are the same at every width (the derivation
  writes them for symbolic widths n_l; the comparison above covers this too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from derive.derivation.reverse import Derivation, Formula, derive
from derive.graph.model import build_model
from derive.quantities import NetTensor, size_symbol
from derive.spec.load import LayerSpec, NetworkSpec
from derive.verify.numeric import (
    CHECKED_STEPS,
    MIN_WIDTH,
    PARAMETER_BUDGET,
    reduced_spec,
    spec_parameter_count,
)

#: A run of equal layers is shortened from this length on (to its first two and its last).
MIN_RUN = 4


@dataclass(frozen=True)
class CheckedCopy:
    """What verification expands: ``spec`` (with its ``derivation``) for ``original``.

    ``layers[c - 1]`` is the layer of ``original`` that layer c of the copy is; ``stands_for``
    pairs a copy layer with the layers of ``original`` left out whose formulas are its own
    (compared in ``original``'s derivation); ``names`` pairs the key of each formula of the
    copy with the key it has in ``original`` (delta^3 of the copy is delta^8 of the network).
    ``mismatch`` names a formula of ``original`` that no formula of the copy equals (None when
    the copy covers every formula).
    """

    spec: NetworkSpec
    original: NetworkSpec
    derivation: Derivation
    layers: tuple[int, ...]
    stands_for: tuple[tuple[int, tuple[int, ...]], ...] = ()
    budget: int = PARAMETER_BUDGET
    names: tuple[tuple[str, str], ...] = ()
    mismatch: str | None = None

    @property
    def shallower(self) -> bool:
        return len(self.layers) < self.original.depth

    @property
    def narrower(self) -> bool:
        kept = (self.original.input_shape,
                *(self.original.layers[l - 1].shape for l in self.layers))
        return self.spec.shapes != kept

    def lines(self) -> list[str]:
        """What was checked and why it covers the whole network (empty: the network itself)."""
        if not (self.shallower or self.narrower):
            return []
        full = network_shape(self.original.shapes)
        count = spec_parameter_count(self.original)
        which = (f"its layers {_ranges(self.layers)}" if self.shallower
                 else "its one layer" if self.original.depth == 1
                 else f"all {self.original.depth} layers")
        out = [(f"  checked copy of the {full} network ({count} parameters): {which}, each "
                "with its op, activation and options in its position, the same graph and loss")]
        for layer, dropped in self.stands_for:
            kind = _describe(self.original.layers[self.layers[layer - 1] - 1])
            out.append(f"  layers {_ranges(dropped)} ({kind}) are not expanded: their formulas "
                       f"are those of layer {self.layers[layer - 1]} with the layer number "
                       "shifted, compared term by term in the derivation of the whole network")
        if self.narrower and self.spec.length != self.original.length:
            out.append(f"  {self.spec.length} time steps of {self.original.length}: the "
                       "formulas are written for any T (the first step reads h_0 = 0, the last "
                       "has no error from a step after it, the middle one both)")
        kept = (self.original.sizes[0], *(self.original.sizes[l] for l in self.layers))
        if self.narrower and (self.spec.sizes != kept or self.spec.image is not None):
            over = spec_parameter_count(self.spec) - self.budget
            floor = f", {over} over the budget at the floor" if over > 0 else ""
            image = "" if self.spec.image is None else (
                f"; the input image {'x'.join(map(str, self.spec.image))}, the smallest that "
                "keeps every feature map at least 2 x 2 (as the formulas are written for any "
                "H_l and W_l)")
            out.append(f"  widths capped at {max(self.spec.sizes)} (budget {self.budget} "
                       f"parameters{floor}){image}, none below {MIN_WIDTH}: the formulas are "
                       "written for any width n_l, and with 3 values every index of a formula "
                       "(j, k, a summed index) can differ, so a transposed matrix or a missing "
                       "softmax cross term does not agree by chance")
        if self.mismatch is not None:
            out.append(f"  NOT COVERED: {self.mismatch} of the whole network differs from "
                       "the copy's formula that stands for it")
        return out


def checked_copy(spec: NetworkSpec, budget: int = PARAMETER_BUDGET) -> CheckedCopy:
    """The copy of ``spec`` that verification expands, within ``budget`` parameters where
    widths of 3 allow it; ``spec`` itself where it fits."""
    if spec_parameter_count(spec) <= budget and (spec.length or 0) <= CHECKED_STEPS:
        return CheckedCopy(spec, spec, derive(build_model(spec)),
                           tuple(range(1, spec.depth + 1)), budget=budget)
    whole = derive(build_model(spec))
    kept, stands_for = _repeats(spec)
    if len(kept) < spec.depth:
        copy = _covering(whole, spec, kept, stands_for, budget)
        if copy.mismatch is None:
            return copy
    return _covering(whole, spec, tuple(range(1, spec.depth + 1)), {}, budget)


def _covering(whole: Derivation, spec: NetworkSpec, kept: tuple[int, ...],
              stands_for: dict[int, tuple[int, ...]], budget: int) -> CheckedCopy:
    """The copy keeping the layers ``kept``, capped within ``budget``, with the first formula
    of ``whole`` it does not cover (if any)."""
    small = reduced_spec(_keep(spec, kept), budget)
    derivation = derive(build_model(small))
    copy_of = {layer: c for c, layer in enumerate(kept, start=1)}
    stand_in = {d: copy_of[layer] for layer, dropped in stands_for.items() for d in dropped}
    names, mismatch = _compare(whole, derivation, copy_of, stand_in)
    return CheckedCopy(small, spec, derivation, kept,
                       tuple((copy_of[layer], dropped) for layer, dropped in stands_for.items()),
                       budget, names, mismatch)


# --- depth -------------------------------------------------------------------------------


def _repeats(spec: NetworkSpec) -> tuple[tuple[int, ...], dict[int, tuple[int, ...]]]:
    """The layers to keep, and for each kept layer the left-out layers it stands for."""
    readers: dict[int, list[int]] = {}
    for l, layer in enumerate(spec.layers, start=1):
        for node in layer.reads(l):
            readers.setdefault(node, []).append(l)

    def in_chain(l: int) -> bool:
        return (l < spec.depth and spec.layers[l - 1].reads(l) == (l - 1,)
                and readers.get(l) == [l + 1])

    kept: list[int] = []
    stands_for: dict[int, tuple[int, ...]] = {}
    l = 1
    while l <= spec.depth:
        end = l  # the run starting at l ends at layer `end`
        if in_chain(l):
            while in_chain(end + 1) and _kind(spec.layers[end]) == _kind(spec.layers[l - 1]):
                end += 1
        if end - l + 1 >= MIN_RUN:
            kept += [l, l + 1, end]
            stands_for[l + 1] = tuple(range(l + 2, end))
        else:
            kept += range(l, end + 1)
        l = end + 1
    return tuple(kept), stands_for


def _kind(layer: LayerSpec) -> LayerSpec:
    """What makes two layers the same kind: everything but the width, name and inputs."""
    return dataclasses.replace(layer, size=0, name=None, inputs=None)


def _describe(layer: LayerSpec) -> str:
    """``dense tanh``, ``layer_norm``, ``gated`` (a custom op): a kind of layer, for a reader."""
    op = layer.op if isinstance(layer.op, str) else layer.op.name
    return op if layer.activation is None else f"{op} {layer.activation.name}"


def _keep(spec: NetworkSpec, kept: tuple[int, ...]) -> NetworkSpec:
    """``spec`` with only the layers ``kept``; what they read renumbered."""
    if len(kept) == spec.depth:
        return spec
    number = {0: 0, **{layer: c for c, layer in enumerate(kept, start=1)}}
    layers = []
    for layer in (spec.layers[l - 1] for l in kept):
        inputs = None if layer.inputs is None else tuple(number[n] for n in layer.inputs)
        layers.append(dataclasses.replace(layer, inputs=inputs))
    return dataclasses.replace(spec, layers=tuple(layers), example=None)


# --- the comparison ----------------------------------------------------------------------


def _compare(whole: Derivation, copy: Derivation, copy_of: dict[int, int],
             stand_in: dict[int, int]) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """The key in ``whole`` of each formula of the copy, and the key of the first formula of
    ``whole`` that the copy's formula for the same quantity does not equal (renumbered), or of
    a copy formula no formula of ``whole`` maps to (None where every formula is covered).

    A formula of layer l reads its own quantities and those of its neighbours l ± 1: these go
    to the copy's layer c that stands for l (c ± 1); any other node n to the copy's number of n.
    """
    mine = {(f.kind, f.lhs): f for f in copy.formulas}
    names: dict[str, str] = {}
    for formula in whole.formulas:
        node = _node_map(formula.node, copy_of, stand_in)
        mapped = _renumbered(formula, node, whole.model.spec.depth)
        theirs = None if mapped is None else mine.get((formula.kind, mapped.lhs))
        if theirs is None or (mapped.rhs, mapped.penalty, mapped.assumptions) != (
                theirs.rhs, theirs.penalty, theirs.assumptions):
            return (), formula.key
        if formula.node not in stand_in:
            names[theirs.key] = formula.key
    missing = [f.key for f in copy.formulas if f.key not in names]
    return tuple(names.items()), (missing[0] if missing else None)


def _node_map(layer: int, copy_of: dict[int, int],
              stand_in: dict[int, int]) -> Callable[[int], int | None]:
    """Where the nodes a formula of ``layer`` reads go in the copy (None: nowhere)."""
    c = copy_of.get(layer, stand_in.get(layer))

    def node(n: int) -> int | None:
        if c is not None and abs(n - layer) <= 1:
            return c + n - layer
        return 0 if n == 0 else copy_of.get(n)

    return node


def _renumbered(formula: Formula, node: Callable[[int], int | None],
                depth: int) -> Formula | None:
    """``formula`` with every quantity and width n_l of node l moved to ``node(l)``; None
    where it reads a node that has no place in the copy."""
    exprs = (formula.lhs, sp.sympify(formula.rhs), sp.sympify(formula.penalty))
    mapping: dict[sp.Basic, sp.Basic] = {}
    widths = {size_symbol(n): n for n in range(depth + 1)}
    for expr in exprs:
        for atom in expr.atoms(sp.Symbol):
            if isinstance(atom, NetTensor) and atom.node is not None:
                target = node(atom.node)
                if target is None:
                    return None
                mapping[atom] = NetTensor(atom.role, target, atom.of, atom.rank,
                                          parameter=atom.parameter)
            elif atom in widths:
                target = node(widths[atom])
                if target is None:
                    return None
                mapping[atom] = size_symbol(target)
    lhs, rhs, penalty = (expr.xreplace(mapping) for expr in exprs)
    return dataclasses.replace(formula, lhs=lhs, rhs=rhs, penalty=penalty)


def network_shape(shapes: tuple[tuple[int, ...], ...]) -> str:
    """4-6-6-2, 1x8x8-8x8x8-8x4x4-128-10 with feature maps, or 16-16-…-16-2 (100 layers)
    for a deep network."""
    sizes = ["x".join(map(str, shape)) for shape in shapes]
    if len(sizes) <= 12:
        return "-".join(sizes)
    return f"{sizes[0]}-{sizes[1]}-…-{sizes[-2]}-{sizes[-1]} ({len(sizes) - 1} layers)"


def _ranges(layers: tuple[int, ...]) -> str:
    """1, 2, 5-9, 12 (consecutive numbers as a range)."""
    parts: list[str] = []
    start = previous = None
    for n in [*layers, None]:
        if start is not None and n == previous + 1:
            previous = n
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = n
    return ", ".join(parts)

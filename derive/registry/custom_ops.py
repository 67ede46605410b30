"""Custom ops: a layer kind written in the spec, its forward pass in index notation
(docs/architecture.md, "Custom ops").

A :class:`CustomOp` is what a spec's ``op: {name, expr, params}`` says, checked. It is a key of
the op registry like a built-in op's name: ``OPS[custom]`` is the :class:`~derive.registry.ops.
OpDef` that :meth:`CustomOp.definition` builds, so the op takes the same road as every built-in
one (derivation by ``sympy.diff``, verify, codegen, documents, check). Its forward pass is one
equation ``a^l_j = expr``; a sum that the expression uses other than as a term of its own
(inside a function or a product) becomes a quantity of its own first, s1^l_j = Σ_k …, so that
the derivation shows its adjoint and the generated code computes it once.

Stage 0 (part of the registry). Takes the spec's text; gives op definitions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from derive.errors import DeriveError
from derive.quantities import INDEX_POOL, NetTensor, entry
from derive.registry.ops import Attribute, Context, Equation, Forward, OpDef, ParameterDef
from derive.registry.safe_expr import Array, parse_index_expression

#: The output index of every custom op: entry j of its vector output.
OUTPUT_INDEX = "j"
#: The most axes a parameter may have.
MAX_AXES = 4
#: Names a custom op's parameter may not take: the quantities derive itself names at a node
#: (a^l, z^l, δ^l, ...) and the names generated code gives them (A1, Z1, M1, Xhat1, LSE1, S1_1),
#: the target, the dense layer's weight w (it would be penalised).
RESERVED = frozenset({"a", "z", "w", "y", "delta", "grad", "mask", "mu", "var", "xhat", "one",
                      "lse", "sigma", "nabla", "x", OUTPUT_INDEX,
                      "A", "Z", "M", "X", "Y", "Xhat", "LSE", "S"})


@dataclass(frozen=True)
class CustomOp:
    """A custom op as the spec gives it: its name, forward expression (entry j of the output)
    and parameters (name and shape, each axis ``size``, ``in`` or ``in1``, ``in2``, ...), read
    by ``inputs`` inputs."""

    name: str
    expr: str
    params: tuple[tuple[str, tuple[str, ...]], ...]
    inputs: int = 1

    @property
    def input_names(self) -> tuple[str, ...]:
        """What the expression calls its inputs: ``x``, or ``x1``, ``x2``, ... for several."""
        if self.inputs == 1:
            return ("x",)
        return tuple(f"x{n}" for n in range(1, self.inputs + 1))

    @property
    def input_axes(self) -> tuple[str, ...]:
        """The range name of each input's one axis: ``in``, or ``in1``, ``in2``, ..."""
        if self.inputs == 1:
            return ("in",)
        return tuple(f"in{n}" for n in range(1, self.inputs + 1))

    @property
    def axis_names(self) -> tuple[str, ...]:
        """The names a parameter's shape may use."""
        return ("size", *self.input_axes)

    def to_data(self) -> dict[str, object]:
        return {"name": self.name, "expr": self.expr,
                "params": {name: list(shape) for name, shape in self.params}}

    def parse(self, params: Mapping[str, sp.IndexedBase], inputs: tuple[sp.IndexedBase, ...],
              ranges: Mapping[str, sp.Expr],
              widths: Mapping[str, int]) -> tuple[sp.Expr, tuple[sp.Sum, ...]]:
        """The expression in index form over these parameter and input bases, and its sums in
        the order of the text (see :func:`~derive.registry.safe_expr.parse_index_expression`)."""
        arrays = {name: Array(params[name], shape) for name, shape in self.params}
        arrays.update((name, Array(base, (axis,))) for name, base, axis
                      in zip(self.input_names, inputs, self.input_axes))
        expr, sums = parse_index_expression(self.expr, arrays, ranges, widths, OUTPUT_INDEX)
        # a per-sample layer: its output, and every sum in it, read an input (a sum over
        # parameters alone is a parameter of its own: give it as one)
        for what, part in [("the expression", expr), *(("the sum " + str(total), total)
                                                        for total in sums)]:
            if not part.has(*inputs):
                raise DeriveError(f"{what} in {self.expr!r} does not read the input "
                                  f"({', '.join(self.input_names)}); a part that depends on "
                                  "parameters only is a parameter of its own")
        unused = [name for name, base in [*params.items(), *zip(self.input_names, inputs)]
                  if name in arrays and not expr.has(base)]
        if unused:
            raise DeriveError(f"{', '.join(unused)} declared but not used in {self.expr!r}: "
                              "drop it, or use it")
        return expr, sums

    def definition(self) -> OpDef:
        """The op registry's entry for this op."""
        return _definition(self)


@functools.cache
def _definition(custom: CustomOp) -> OpDef:
    parameters = tuple(ParameterDef(name, shape, "glorot" if len(shape) >= 2 else "zeros")
                       for name, shape in custom.params)
    return OpDef(
        custom.name, f"custom op: {custom.expr}",
        (Attribute("size", "size", required=True, doc="the output width n_l (the range of j)"),),
        (custom.inputs, custom.inputs), lambda attrs: parameters,
        lambda attrs, inputs: int(attrs["size"]), functools.partial(_forward, custom),
        label=custom.name, extra={"custom": custom})


def _forward(custom: CustomOp, ctx: Context) -> Forward:
    ranges = {"size": ctx.size, "in": ctx.inputs[0].size,
              **{axis: x.size for axis, x in zip(custom.input_axes, ctx.inputs)}}
    # the widths were checked when the spec was loaded: here every range may meet every other
    expr, sums = custom.parse(ctx.params, tuple(x.tensor.indexed for x in ctx.inputs), ranges,
                              dict.fromkeys(ranges, 0))
    j = INDEX_POOL[0]
    # a sum that is a term of its own stays in place (the z = Σ w x + b of a dense layer);
    # one inside a function or a product, with no free index but j, becomes s1, s2, ...
    kept = {rest for rest in (term.as_coeff_Mul()[1] for term in sp.Add.make_args(expr))
            if isinstance(rest, sp.Sum) and not rest.function.has(sp.Sum)}
    found = [s for s in sums if s not in kept and not s.free_symbols & set(INDEX_POOL) - {j}]
    equations: list[Equation] = []
    names: dict[sp.Expr, sp.Expr] = {}
    for total in dict.fromkeys(found):      # inner sums come first; one written twice is one
        target = NetTensor(f"s{len(equations) + 1}", ctx.node, rank=1 if total.has(j) else 0)
        indices = (j,) if target.rank else ()
        equations.append(Equation(target, indices, total.xreplace(names),
                                  source_kind=target.role))
        names[total] = entry(target, indices)
    out = ctx.quantity("a")
    equations.append(Equation(out, (j,), expr.xreplace(names), source_kind="a"))
    return Forward(tuple(equations), out)

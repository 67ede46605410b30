"""Whitelist parser: a user's expression string to a SymPy expression, without eval.

The text is parsed with :mod:`ast` and every node is checked against a short whitelist:
numbers, the allowed variable names, ``+ - * / **``, unary minus and calls to the functions in
:data:`FUNCTIONS` (and, for a custom op's forward pass in index notation, entries ``U[j, k]``
of known arrays and sums ``sum(EXPR, k)``: :func:`parse_index_expression`), which is the registry's table
:data:`derive.registry.functions.SCALAR_FUNCTIONS` (nothing is added or left out here). Nothing from the string is ever executed, imported or looked up as an
attribute; ``sympify``/``parse_expr`` are never called on user text.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from derive.errors import DeriveError
from derive.limits import MAX_CALL_NESTING, check_expression
from derive.quantities import INDEX_POOL
from derive.registry.functions import SCALAR_FUNCTIONS, ScalarFunction

#: The callable names a user may write, and what each builds: the registry's table.
FUNCTIONS: Mapping[str, ScalarFunction] = SCALAR_FUNCTIONS
#: Named constants a user may write.
CONSTANTS: Mapping[str, sp.Expr] = {"pi": sp.pi, "e": sp.E}

_MAX_EXPONENT = 1000  # integer exponents past this are refused: they only blow up expansion
_MAX_DIGITS = 300  # a constant power may not exceed 10^300
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def parse_expression(text: str, variables: Mapping[str, sp.Symbol]) -> sp.Expr:
    """Parse ``text`` into a SymPy expression in the given variables.

    Raises :class:`DeriveError` naming the offending piece and its column.
    """
    if not isinstance(text, str):
        raise DeriveError(f"expression must be a string, got {type(text).__name__}")
    check_expression(text)
    source = text.replace("^", "**")
    try:
        tree = ast.parse(source.strip(), mode="eval")
        return _real(_Converter(text, variables).convert(tree.body), text)
    except SyntaxError as err:
        col = (err.offset or 0)
        raise DeriveError(f"cannot parse expression {text!r} (syntax error at column {col})")
    except RecursionError:
        # e.g. two thousand unary minuses: the parser copes, a recursive walk does not
        raise DeriveError(f"expression {text[:40]!r}... is nested too deeply") from None


def _real(expr: sp.Expr, text: str) -> sp.Expr:
    """``expr``, unless a constant in it is not a finite real number (log(0), 1/0, sqrt(-1),
    log(-1)): those have no value the network could compute."""
    if expr.has(sp.zoo, sp.oo, -sp.oo, sp.nan, sp.I):
        raise DeriveError(f"expression {text!r} has a constant that is not a finite real "
                          "number (such as log(0), 1/0 or sqrt(-1))")
    return expr


class _Converter:
    def __init__(self, text: str, variables: Mapping[str, sp.Symbol]) -> None:
        self.text = text
        self.variables = variables
        self.calls = 0          # function calls open around the node being converted

    def fail(self, node: ast.AST, what: str) -> DeriveError:
        col = getattr(node, "col_offset", None)
        at = f" at column {col + 1}" if col is not None else ""
        allowed_vars = ", ".join(sorted(self.variables)) or "none"
        allowed_fns = ", ".join(sorted(FUNCTIONS))
        return DeriveError(
            f"{what}{at} in expression {self.text!r}; allowed: numbers, variables "
            f"({allowed_vars}), + - * / ** and functions {allowed_fns}"
        )

    def check_power(self, node: ast.AST, base: sp.Expr, exponent: sp.Expr) -> None:
        """Refuse powers whose exponent or constant value is absurdly large, before computing."""
        if not exponent.is_number:
            return
        if exponent.is_real is False or abs(exponent) > _MAX_EXPONENT:
            raise self.fail(node, f"exponent {exponent} too large (at most {_MAX_EXPONENT})")
        if base.is_number and base.is_real and abs(base) > 1:
            digits = float(abs(exponent)) * math.log10(float(abs(base)))
            if digits > _MAX_DIGITS:
                raise self.fail(node, f"constant power too large (over 10^{_MAX_DIGITS})")

    def convert(self, node: ast.AST) -> sp.Expr:
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(node, f"constant {value!r} is not a number")
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(node, "number too large for a float")
            return sp.Integer(value) if isinstance(value, int) else sp.Rational(repr(value))
        if isinstance(node, ast.Name):
            if node.id in self.variables:
                return self.variables[node.id]
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise self.fail(node, f"unknown name {node.id!r}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.convert(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left = self.convert(node.left)
            right = self.convert(node.right)
            if isinstance(node.op, ast.Pow):
                self.check_power(node, left, right)
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.fail(node, f"{type(node).__name__} is not allowed")

    def call(self, node: ast.Call) -> sp.Expr:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else "this call"
            raise self.fail(node, f"function {name!r} is not allowed")
        if node.keywords:
            raise self.fail(node, "keyword arguments are not allowed")
        self.calls += 1
        if self.calls > MAX_CALL_NESTING:
            # each level multiplies what differentiation and simplification meet
            raise self.fail(node, f"function calls nested more than {MAX_CALL_NESTING} deep "
                                  "(derive.limits.MAX_CALL_NESTING)")
        args = [self.convert(arg) for arg in node.args]
        self.calls -= 1
        fn = FUNCTIONS[node.func.id]
        if len(args) != fn.arity and not (fn.variadic and len(args) >= fn.arity):
            raise self.fail(node, f"{node.func.id}() takes {fn.arity} argument(s)")
        return fn.build(*args)


# --- index notation: the forward pass of a custom op ---------------------------------------

#: The function that sums over an index: ``sum(EXPR, k)``.
SUM = "sum"


@dataclass(frozen=True)
class Array:
    """A name an index expression may index: its base and the range (a name such as ``size``
    or ``in``) of each of its axes."""

    base: sp.IndexedBase
    axes: tuple[str, ...]


def parse_index_expression(
    text: str, arrays: Mapping[str, Array], ranges: Mapping[str, sp.Expr],
    widths: Mapping[str, int], output: str = "j",
) -> tuple[sp.Expr, tuple[sp.Sum, ...]]:
    """Parse an expression in index notation: entries ``U[j, k]`` of ``arrays``, sums
    ``sum(EXPR, k)`` over the range that the index's positions imply, numbers, ``+ - * / **``
    and the functions of :data:`FUNCTIONS`.

    ``output`` is the one index that may stay free (its range is ``size``); ``ranges`` gives
    each range name's upper bound (a sum runs from 1 to it); ``widths`` its value, so that an
    index used over two ranges of different widths is refused. The user's index names become
    symbols of :data:`~derive.quantities.INDEX_POOL`: the output is j, a name in the pool keeps
    its letter where it is free, any other takes the next free one. Gives the expression and
    its sums in the order the text closes them (an inner sum before the one around it). Raises
    :class:`DeriveError` naming the problem and its column.
    """
    if not isinstance(text, str):
        raise DeriveError(f"expression must be a string, got {type(text).__name__}")
    check_expression(text)
    converter = _IndexConverter(text, arrays, ranges, widths, output)
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
        expr = converter.convert(tree.body)
    except SyntaxError as err:
        raise DeriveError(f"cannot parse expression {text!r} (syntax error at column "
                          f"{err.offset or 0})") from None
    except RecursionError:
        raise DeriveError(f"expression {text[:40]!r}... is nested too deeply") from None
    _real(expr, text)
    if not expr.has(converter.symbol(output)):
        raise DeriveError(f"expression {text!r} does not use the output index {output!r}: "
                          f"entry {output} of the output must depend on {output}")
    return expr, tuple(converter.sums)


class _IndexConverter(_Converter):
    """The whitelist converter with entries of arrays and sums over indices."""

    def __init__(self, text: str, arrays: Mapping[str, Array], ranges: Mapping[str, sp.Expr],
                 widths: Mapping[str, int], output: str) -> None:
        super().__init__(text, {})
        self.arrays, self.ranges, self.widths, self.output = arrays, ranges, widths, output
        self.indices: dict[str, sp.Symbol] = {output: INDEX_POOL[0]}
        # where each index in scope was first used: its range name and the entry that used it
        self.seen: dict[str, tuple[str, str]] = {output: ("size", f"the output index {output}")}
        self.bound: list[str] = []
        self.sums: list[sp.Sum] = []

    def fail(self, node: ast.AST, what: str) -> DeriveError:
        col = getattr(node, "col_offset", None)
        at = f" at column {col + 1}" if col is not None else ""
        return DeriveError(
            f"{what}{at} in expression {self.text!r}; allowed: numbers, entries of "
            f"{', '.join(sorted(self.arrays))} such as x[k], sum(EXPR, k), + - * / ** and "
            f"functions {', '.join(sorted(FUNCTIONS))}")

    def convert(self, node: ast.AST) -> sp.Expr:
        if isinstance(node, ast.Subscript):
            return self.entry(node)
        if isinstance(node, ast.Name) and node.id in self.arrays:
            raise self.fail(node, f"{node.id!r} has {len(self.arrays[node.id].axes)} axes: "
                                  f"write its entries, {node.id}[...]")
        if isinstance(node, ast.Name) and (node.id in self.seen or node.id in self.bound):
            raise self.fail(node, f"index {node.id!r} used as a value")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == SUM:
            return self.sum(node)
        return super().convert(node)

    def entry(self, node: ast.Subscript) -> sp.Expr:
        if not isinstance(node.value, ast.Name):
            self.convert(node.value)        # refuses what it does not allow, by name
            raise self.fail(node, "only a parameter or an input can be indexed")
        if node.value.id not in self.arrays:
            raise self.fail(node, f"unknown name {node.value.id!r} (what can be indexed: "
                                  f"{', '.join(sorted(self.arrays))})")
        name = node.value.id
        array = self.arrays[name]
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(items) != len(array.axes):
            raise self.fail(node, f"{name!r} has {len(array.axes)} axes, indexed with "
                                  f"{len(items)}")
        names = [item.id for item in items if isinstance(item, ast.Name)]
        if len(set(names)) != len(names):
            raise self.fail(node, f"an index appears twice in one entry of {name!r} (a "
                                  "diagonal): write each axis with an index of its own")
        symbols = []
        for position, (item, axis) in enumerate(zip(items, array.axes), start=1):
            if not isinstance(item, ast.Name):
                raise self.fail(item, f"an index of {name!r} must be a name (j, k, ...)")
            index = item.id
            if index != self.output and index not in self.bound:
                raise self.fail(item, f"index {index!r} is free: only {self.output!r} may be "
                                      f"free; sum over it with sum(..., {index})")
            where = f"axis {position} of {name}"
            first = self.seen.setdefault(index, (axis, where))
            if self.widths[first[0]] != self.widths[axis]:
                raise self.fail(item, f"index {index!r} ranges over {first[0]} "
                                      f"({self.widths[first[0]]}, {first[1]}) and over {axis} "
                                      f"({self.widths[axis]}, {where})")
            symbols.append(self.symbol(index))
        return array.base[tuple(symbols)]

    def sum(self, node: ast.Call) -> sp.Expr:
        if len(node.args) != 2 or node.keywords or not isinstance(node.args[1], ast.Name):
            raise self.fail(node, "sum takes an expression and an index: sum(EXPR, k)")
        index = node.args[1].id
        if index == self.output or index in self.bound:
            raise self.fail(node.args[1], f"index {index!r} is already in use here: sum over "
                                          "an index of its own")
        if index in self.arrays or index in FUNCTIONS or index in CONSTANTS or index == SUM:
            raise self.fail(node.args[1], f"{index!r} names something else: choose another "
                                          "index name")
        self.bound.append(index)
        body = self.convert(node.args[0])
        self.bound.pop()
        used = self.seen.pop(index, None)
        if used is None:
            raise self.fail(node, f"sum over {index!r}, which the summed expression does not "
                                  "index with")
        self.sums.append(sp.Sum(body, (self.symbol(index), 1, self.ranges[used[0]])))
        return self.sums[-1]

    def symbol(self, name: str) -> sp.Symbol:
        """The index symbol standing for the user's index ``name``."""
        if name not in self.indices:
            taken = set(self.indices.values())
            free = [s for s in INDEX_POOL if s not in taken]
            if not free:
                raise DeriveError(f"expression {self.text!r} uses more than "
                                  f"{len(INDEX_POOL)} index names")
            same = [s for s in free if s.name == name]
            self.indices[name] = (same or free)[0]
        return self.indices[name]

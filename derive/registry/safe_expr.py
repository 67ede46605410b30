"""Whitelist parser: a user's expression string to a SymPy expression, without eval.

The text is parsed with :mod:`ast` and every node is checked against a short whitelist:
numbers, the allowed variable names, ``+ - * / **``, unary minus and calls to the functions in
:data:`FUNCTIONS`, which is the registry's table
:data:`derive.registry.functions.SCALAR_FUNCTIONS` (nothing is added or left out here). Nothing from the string is ever executed, imported or looked up as an
attribute; ``sympify``/``parse_expr`` are never called on user text.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping

import sympy as sp

from derive.errors import DeriveError
from derive.registry.functions import SCALAR_FUNCTIONS, ScalarFunction

#: The callable names a user may write, and what each builds: the registry's table.
FUNCTIONS: Mapping[str, ScalarFunction] = SCALAR_FUNCTIONS
#: Named constants a user may write.
CONSTANTS: Mapping[str, sp.Expr] = {"pi": sp.pi, "e": sp.E}

_MAX_LENGTH = 2000
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
    if len(text) > _MAX_LENGTH:
        raise DeriveError(f"expression longer than {_MAX_LENGTH} characters")
    source = text.replace("^", "**")
    try:
        tree = ast.parse(source.strip(), mode="eval")
        return _Converter(text, variables).convert(tree.body)
    except SyntaxError as err:
        col = (err.offset or 0)
        raise DeriveError(f"cannot parse expression {text!r} (syntax error at column {col})")
    except RecursionError:
        # e.g. two thousand unary minuses: the parser copes, a recursive walk does not
        raise DeriveError(f"expression {text[:40]!r}... is nested too deeply") from None


class _Converter:
    def __init__(self, text: str, variables: Mapping[str, sp.Symbol]) -> None:
        self.text = text
        self.variables = variables

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
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                name = node.func.id if isinstance(node.func, ast.Name) else "this call"
                raise self.fail(node, f"function {name!r} is not allowed")
            if node.keywords:
                raise self.fail(node, "keyword arguments are not allowed")
            args = [self.convert(arg) for arg in node.args]
            fn = FUNCTIONS[node.func.id]
            if len(args) != fn.arity and not (fn.variadic and len(args) >= fn.arity):
                raise self.fail(node, f"{node.func.id}() takes {fn.arity} argument(s)")
            return fn.build(*args)
        raise self.fail(node, f"{type(node).__name__} is not allowed")

"""Terminal printer: derived formulas in the classic notation with Unicode.

A SymPy ``StrPrinter`` subclass: w^l_{jk} prints as ``w²ⱼₖ``, sums as ``Σₖ``, partial
derivatives as ``∂C/∂a²ⱼ``, vector forms with ``⊙`` for the Hadamard product and ``ᵀ`` for the
transpose. With ``batch=True`` the vector forms print in batch form (rows = samples): vectors
become matrices A², Z², Δ², Y and ``(W³)ᵀ δ³`` becomes ``Δ³ W³``.
"""

from __future__ import annotations

from typing import ClassVar

import sympy as sp
from sympy.printing.str import StrPrinter

from derive.model import split_name
from derive.vectorform import Inner, Mat, MatVec, Outer, Vec

_SUP = str.maketrans("0123456789+-()l", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾ˡ")
_SUB = str.maketrans("0123456789ijkmlnaeo", "₀₁₂₃₄₅₆₇₈₉ᵢⱼₖₘₗₙₐₑₒ")
_GREEK = {"delta": "δ", "sigma": "σ", "nabla": "∇"}
_BATCH = {"a": "A", "z": "Z", "delta": "Δ", "y": "Y"}


def sup(text: object) -> str:
    return str(text).translate(_SUP)


def sub(text: object) -> str:
    return str(text).translate(_SUB)


class UnicodePrinter(StrPrinter):
    """Prints derive expressions for a terminal."""

    # Indexed prints itself through "_sympystr"; a method name no object defines makes the
    # printer dispatch to the _print_* methods below instead.
    printmethod = "_derive_unicode"
    _default_settings: ClassVar[dict] = {**StrPrinter._default_settings, "batch": False}

    def _name(self, name: str) -> str:
        letter, layer = split_name(name)
        symbol = _GREEK.get(letter, letter)
        return symbol if layer is None else symbol + sup(layer)

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        return self._name(expr.name)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        return self._name(str(expr.base.label)) + sub("".join(map(str, expr.indices)))

    def _print_Sum(self, expr: sp.Sum) -> str:
        (index, _low, _high), = expr.limits
        body = self.parenthesize(expr.function, sp.printing.precedence.PRECEDENCE["Mul"])
        return f"Σ{sub(index)} {body}"

    def _print_Derivative(self, expr: sp.Derivative) -> str:
        (var, _count), = expr.variable_count
        if isinstance(expr.expr, sp.core.function.AppliedUndef):
            name = expr.expr.func.__name__            # sigma_2 -> σ'₂(...)
            letter, _, layer = name.partition("_")
            return f"{_GREEK.get(letter, letter)}'{sub(layer)}({self._print(expr.expr.args[0])})"
        return f"∂{self._print(expr.expr)}/∂{self._print(var)}"

    def _print_Function(self, expr: sp.Function) -> str:
        if isinstance(expr, sp.core.function.AppliedUndef):
            letter, _, layer = expr.func.__name__.partition("_")
            args = ", ".join(self._print(a) for a in expr.args)
            return f"{_GREEK.get(letter, letter)}{sub(layer)}({args})"
        return super()._print_Function(expr)

    def _print_KroneckerDelta(self, expr: sp.KroneckerDelta) -> str:
        return "δ" + sub("".join(map(str, expr.args)))

    def _print_Vec(self, expr: Vec) -> str:
        if expr.name == "1":
            return "𝟏"
        if expr.name.startswith("dC/d"):
            target = self._print_Vec(Vec(expr.name[4:]))
            return f"∂C/∂{target}" if self._settings["batch"] else f"∇_{target} C"
        letter, layer = split_name(expr.name)
        if self._settings["batch"]:
            letter = _BATCH.get(letter, letter.upper())
            return letter if layer is None else letter + sup(layer)
        return self._name(expr.name)

    def _print_Mat(self, expr: Mat) -> str:
        _letter, layer = split_name(expr.name)
        return "W" + sup(layer)

    def _print_MatVec(self, expr: MatVec) -> str:
        matrix, vector, transposed = expr.args
        w, v = self._print(matrix), self._print(vector)
        if self._settings["batch"]:
            return f"{v} {w}" if transposed else f"{v} ({w})ᵀ"
        return f"({w})ᵀ {v}" if transposed else f"{w} {v}"

    def _print_Outer(self, expr: Outer) -> str:
        u, v = (self._print(arg) for arg in expr.args)
        if self._settings["batch"]:
            return f"(1/B) ({u})ᵀ {v}"
        return f"{u} ({v})ᵀ"

    def _print_Inner(self, expr: Inner) -> str:
        u, v = expr.args
        if self._settings["batch"]:
            return f"rowsum({self._print(u * v if u != Vec('1') else v)})"
        return f"({self._print(u)})ᵀ {self._print(v)}"

    def _print_Mul(self, expr: sp.Mul) -> str:
        factors = expr.as_ordered_factors()
        vectors = [f for f in factors if f.has(Vec, MatVec, Outer)]
        if len(vectors) < 2:
            return super()._print_Mul(expr)
        scalar = sp.Mul(*(f for f in factors if f not in vectors))
        prec = sp.printing.precedence.PRECEDENCE["Mul"]
        text = " ⊙ ".join(self.parenthesize(f, prec) for f in vectors)
        if scalar == -1:
            return "-" + text
        return text if scalar == 1 else self.parenthesize(scalar, prec) + "·" + text


def pretty(expr: sp.Expr, *, batch: bool = False) -> str:
    """``expr`` in the terminal notation."""
    return UnicodePrinter({"batch": batch}).doprint(expr)

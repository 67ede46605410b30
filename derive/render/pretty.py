"""Terminal printer: derived formulas in the classic notation with Unicode.

A SymPy ``StrPrinter`` subclass: w^l_{jk} prints as ``w²ⱼₖ``, sums as ``Σₖ``, partial
derivatives as ``∂C/∂a²ⱼ``, vector forms with ``⊙`` for the Hadamard product and ``ᵀ`` for the
transpose. With ``batch=True`` the vector forms print in batch form (rows = samples): vectors
become matrices A², Z², Δ², Y and ``(W³)ᵀ δ³`` becomes ``Δ³ W³``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from derive.derivation.tensorform import (
    ONE,
    Broadcast,
    Einsum,
    Inner,
    MatVec,
    Outer,
    SumAxes,
    Total,
)
from derive.quantities import NetTensor

_SUP = str.maketrans("0123456789+-()l", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾ˡ")
_SUB = str.maketrans("0123456789ijkmlnaeo", "₀₁₂₃₄₅₆₇₈₉ᵢⱼₖₘₗₙₐₑₒ")
_GREEK = {"delta": "δ", "sigma": "σ", "nabla": "∇", "gamma": "γ", "beta": "β", "mu": "μ",
          "var": "(σ²)", "xhat": "x̂", "mask": "m"}
_BATCH = {"a": "A", "z": "Z", "delta": "Δ", "y": "Y", "w": "W", "xhat": "X̂", "mask": "M"}


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

    def _name(self, tensor: NetTensor, *, batch: bool = False) -> str:
        role = tensor.of if tensor.role == "grad" else tensor.role
        if batch:
            symbol = _BATCH.get(role, _GREEK.get(role, role))
        elif tensor.rank == 2 and tensor.is_parameter and tensor.role != "grad":
            symbol = role.upper()        # the matrix W^l (its entries print as w^l_jk)
        else:
            symbol = _GREEK.get(role, role)
        if tensor.node is not None:
            symbol += sup(tensor.node)
        if tensor.role == "grad":
            return f"∂C/∂{symbol}"
        return symbol

    def _print_NetTensor(self, expr: NetTensor) -> str:
        if expr == ONE:
            return "𝟏"
        if expr.role == "grad" and not self._settings["batch"] and expr.rank == 1:
            inner = expr.target
            return f"∇_{self._name(inner)} C"
        return self._name(expr, batch=self._settings["batch"])

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if isinstance(expr, NetTensor):
            return self._print_NetTensor(expr)
        return _GREEK.get(expr.name, expr.name)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        label = expr.base.label
        name = self._name(NetTensor(label.role, label.node, label.of, rank=0)) \
            if isinstance(label, NetTensor) else str(label)
        return name + sub("".join(map(str, expr.indices)))

    def _print_Sum(self, expr: sp.Sum) -> str:
        indices = "".join(str(limit[0]) for limit in expr.limits)
        body = self.parenthesize(expr.function, sp.printing.precedence.PRECEDENCE["Mul"])
        return f"Σ{sub(indices)} {body}"

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

    # --- math rather than SymPy's spelling: [z > 0], z², √x, 1e-5 ---------------------------

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        *pieces, (default, _) = expr.args
        if len(pieces) == 1 and (pieces[0].expr, default) == (1, 0):
            return f"[{self._print(pieces[0].cond)}]"       # an indicator (Iverson bracket)
        cases = [f"{self._print(e)} if {self._print(c)}" for e, c in pieces]
        return "{" + ", ".join([*cases, f"{self._print(default)} otherwise"]) + "}"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exponent = expr.args
        if exponent == sp.S.Half:
            return f"√{self.parenthesize(base, PRECEDENCE['Pow'], strict=True)}"
        if exponent == -sp.S.Half:
            return f"1/√{self.parenthesize(base, PRECEDENCE['Pow'], strict=True)}"
        text = self.parenthesize(base, PRECEDENCE["Pow"], strict=True)
        if exponent.is_Rational and not exponent.is_Integer:
            return f"{text}^({exponent})"                  # x^(3/2)
        if not exponent.is_Integer:
            return super()._print_Pow(expr, rational)
        if text[-1] in "⁰¹²³⁴⁵⁶⁷⁸⁹ˡ":
            text = f"({text})"          # (z¹)², not z¹² (which reads as z to the 12)
        return text + sup(exponent)

    def _print_Rational(self, expr: sp.Rational) -> str:
        return _decimal(expr) or super()._print_Rational(expr)

    def _print_KroneckerDelta(self, expr: sp.KroneckerDelta) -> str:
        return "δ" + sub("".join(map(str, expr.args)))

    def _print_Total(self, expr: Total) -> str:
        return f"Σ({self._print(expr.args[0])})"

    def _print_Broadcast(self, expr: Broadcast) -> str:
        # an entry, in index notation: the axes are the indices
        tensor, axes = expr.args[0], str(expr.args[1])
        return self._print(tensor) + sub(axes)

    def _print_SumAxes(self, expr: SumAxes) -> str:
        summed = "".join(c for c in str(expr.args[1]) if c not in str(expr.args[2]))
        body = self.parenthesize(expr.args[0], sp.printing.precedence.PRECEDENCE["Mul"])
        return f"Σ{sub(summed)} {body}"

    def _print_Einsum(self, expr: Einsum) -> str:
        subscripts, *operands = expr.args
        inputs, output = str(subscripts).split("->")
        return f"einsum[{inputs}→{output}]({', '.join(self._print(o) for o in operands)})"

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
            return f"rowsum({self._print(u * v if u != ONE else v)})"
        return f"({self._print(u)})ᵀ {self._print(v)}"

    def _print_Mul(self, expr: sp.Mul) -> str:
        coefficient, rest = expr.as_coeff_Mul()
        if _decimal(coefficient) and rest != 1:
            return f"{_decimal(coefficient)}·{self.parenthesize(rest, PRECEDENCE['Mul'])}"
        factors = expr.as_ordered_factors()
        vectors = [f for f in factors if _is_tensor(f)]
        if len(vectors) < 2:
            return super()._print_Mul(expr)
        scalar = sp.Mul(*(f for f in factors if f not in vectors))
        prec = sp.printing.precedence.PRECEDENCE["Mul"]
        text = " ⊙ ".join(self.parenthesize(f, prec) for f in vectors)
        if scalar == -1:
            return "-" + text
        return text if scalar == 1 else self.parenthesize(scalar, prec) + "·" + text


def _decimal(number: sp.Expr) -> str | None:
    """A small constant such as ε = 1/100000 in scientific notation (``1e-5``), else None."""
    if not isinstance(number, sp.Rational) or number.q < 10000 or 10 ** int(
            math.log10(number.q)) != number.q:
        return None
    mantissa, _, exponent = f"{float(number):e}".partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _is_tensor(expr: sp.Expr) -> bool:
    """Whether ``expr`` is a tensor-form vector or matrix (not a scalar, not an index form)."""
    if expr.has(sp.Indexed):
        return False
    if expr.has(MatVec, Outer, Einsum):
        return True
    return any(t.rank >= 1 and t != ONE for t in expr.atoms(NetTensor))


def pretty(expr: sp.Expr, *, batch: bool = False) -> str:
    """``expr`` in the terminal notation."""
    return UnicodePrinter({"batch": batch}).doprint(expr)

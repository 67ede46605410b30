"""LaTeX printer for derive expressions, in the classic backpropagation notation.

A SymPy ``LatexPrinter`` subclass used by :mod:`derive.latex` (documents) and by the Jupyter
``_repr_latex_`` of :class:`~derive.derivation.Derivation`. It reads the names that
:mod:`derive.model` gives its indexed bases (``"w^2"``, ``"delta^3"``, ``"y"``) and prints

* index form: ``w^{2}_{jk}``, ``\\delta^{3}_{j}``, ``y_{j}``, sums with their ranges
  ``\\sum_{k=1}^{n_{2}}``, ``\\frac{\\partial C}{\\partial a^{2}_{j}}`` and the symbolic
  activation derivative of layer l as ``\\sigma_{l}'(z^{l}_{j})``;
* vector form (:mod:`derive.vectorform`): bold vectors, ``W^{l}``, ``\\odot`` for the Hadamard
  product, ``\\oslash`` for elementwise division and ``^{\\top}`` for the transpose;
* batch form (``batch=True``; rows are samples): ``A^{l}``, ``Z^{l}``, ``\\Delta^{l}``, ``Y``;
  ``W^T v`` becomes ``V W``, ``u v^T`` the batch mean ``\\frac{1}{B} U^{\\top} V`` and a bias
  vector is broadcast to every row as ``\\mathbf{1} (\\mathbf{b}^{l})^{\\top}``.

Nothing here computes: it only spells the expressions the derivation produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from derive.vectorform import Inner, Mat, MatVec, Outer, Vec

#: How a quantity's letter is spelled in index form.
LETTERS: Mapping[str, str] = {"delta": r"\delta", "sigma": r"\sigma", "nabla": r"\nabla"}
#: Vector form (one sample): bold letters.
VECTORS: Mapping[str, str] = {
    "a": r"\mathbf{a}", "z": r"\mathbf{z}", "b": r"\mathbf{b}", "y": r"\mathbf{y}",
    "delta": r"\boldsymbol{\delta}",
}
#: Batch form (rows are samples): capitals.
BATCH: Mapping[str, str] = {"a": "A", "z": "Z", "delta": r"\Delta", "y": "Y"}
#: Spellings of derive's own SymPy functions.
FUNCTIONS: Mapping[str, str] = {
    "sigmoid": r"\operatorname{sigmoid}", "softplus": r"\operatorname{softplus}",
}


def _split(name: str) -> tuple[str, str | None]:
    """``"w^2"`` -> ``("w", "2")``; also generic layers: ``"w^l"`` -> ``("w", "l")``."""
    letter, _, layer = str(name).partition("^")
    return letter, layer or None


def _layered(symbol: str, layer: object) -> str:
    return symbol if layer is None else f"{symbol}^{{{layer}}}"


class DeriveLatexPrinter(LatexPrinter):
    """Prints derive's index, vector and batch expressions as LaTeX math."""

    printmethod = "_derive_latex"  # no object defines it: dispatch to the _print_* below
    _default_settings: ClassVar[dict] = {**LatexPrinter._default_settings, "batch": False}

    # -- index form ---------------------------------------------------------------------

    def _quantity(self, name: str) -> str:
        letter, layer = _split(name)
        return _layered(LETTERS.get(letter, letter), layer)

    def _print_Symbol(self, expr: sp.Symbol, style: str = "plain") -> str:
        if "^" in expr.name:
            return self._quantity(expr.name)
        return super()._print_Symbol(expr, style)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        indices = [self._print(index) for index in expr.indices]
        separator = "" if all(len(text) == 1 for text in indices) else ","
        return f"{self._quantity(str(expr.base.label))}_{{{separator.join(indices)}}}"

    def _as_ordered_terms(self, expr: sp.Add, order: str | None = None) -> list[sp.Expr]:
        # the classic order: sum_k w_jk a_k + b_j, W a + b (sums and products before the bias)
        terms = super()._as_ordered_terms(expr, order=order)
        return sorted(terms, key=lambda term: 0 if term.has(sp.Sum, MatVec) else 1)

    def _print_Sum(self, expr: sp.Sum) -> str:
        # -sum_i y_i log a_i rather than sum_i -log(a_i) y_i
        if expr.function.could_extract_minus_sign():
            return "-" + self._print_Sum(sp.Sum(-expr.function, *expr.limits))
        return super()._print_Sum(expr)

    def _print_Pow(self, expr: sp.Pow) -> str:
        # w^{2}_{jk} squared must not become a double superscript: parenthesize the base.
        base, exponent = expr.args
        layered = isinstance(base, sp.Indexed) or (isinstance(base, sp.Symbol)
                                                   and "^" in base.name)
        if layered and exponent.is_Integer and exponent > 0:
            return rf"\left({self._print(base)}\right)^{{{self._print(exponent)}}}"
        return super()._print_Pow(expr)

    def _print_Derivative(self, expr: sp.Derivative) -> str:
        (variable, count), = expr.variable_count
        inner = expr.expr
        if isinstance(inner, AppliedUndef) and count == 1:
            # sigma_l(z^l_j) differentiated by its own argument: sigma_l'(z^l_j)
            letter, _, layer = inner.func.__name__.partition("_")
            symbol = LETTERS.get(letter, letter) + (f"_{{{layer}}}" if layer else "")
            return rf"{symbol}'\!\left({self._print(inner.args[0])}\right)"
        order = "" if count == 1 else f"^{{{count}}}"
        return (rf"\frac{{\partial{order} {self._print(inner)}}}"
                rf"{{\partial {self._print(variable)}{order}}}")

    def _print_Function(self, expr: sp.Function, exp: str | None = None) -> str:
        name = type(expr).__name__
        if isinstance(expr, AppliedUndef):
            letter, _, layer = name.partition("_")
            head = LETTERS.get(letter, letter) + (f"_{{{layer}}}" if layer else "")
        elif name in FUNCTIONS:
            head = FUNCTIONS[name]
        else:
            return super()._print_Function(expr, exp)
        args = ", ".join(self._print(arg) for arg in expr.args)
        text = rf"{head}\!\left({args}\right)"
        return text if exp is None else rf"{head}^{{{exp}}}\!\left({args}\right)"

    def _print_KroneckerDelta(self, expr: sp.KroneckerDelta, exp: str | None = None) -> str:
        first, second = (self._print(arg) for arg in expr.args)
        text = rf"\delta_{{{first}{second}}}"
        return text if exp is None else rf"\left({text}\right)^{{{exp}}}"

    # -- vector and batch form ----------------------------------------------------------

    def _print_scalar_Mul(self, expr: sp.Mul, factors: list[sp.Expr]) -> str:
        simple = all(not (f.is_Pow and f.exp.is_negative) and not f.is_Number for f in factors)
        if not simple or len(factors) < 2:
            if expr.could_extract_minus_sign() and not expr.args[0].is_Number:
                return "-" + self._print(-expr)
            return super()._print_Mul(expr)
        ordered = sorted(factors, key=_factor_rank)
        return self._settings["mul_symbol_latex"].join(self._factor(f, last=n == len(ordered) - 1)
                        for n, f in enumerate(ordered))

    def _factor(self, factor: sp.Expr, *, last: bool = False) -> str:
        """One factor of a product, bracketed only where the product would misread."""
        text = self._print(factor)
        if isinstance(factor, (sp.Add, sp.Piecewise, MatVec)) or (
                isinstance(factor, sp.Sum) and not last):
            return rf"\left({text}\right)"
        return text

    def _print_Vec(self, expr: Vec) -> str:
        batch = self._settings["batch"]
        if expr.name == "1":
            return r"\mathbf{1}"
        if expr.name.startswith("dC/d"):
            return self._gradient(expr.name[4:])
        letter, layer = _split(expr.name)
        if batch and letter == "b":
            # one bias vector for the whole batch, added to every row
            return rf"\mathbf{{1}}\left({_layered(VECTORS['b'], layer)}\right)^{{\top}}"
        table = BATCH if batch else VECTORS
        return _layered(table.get(letter, letter.upper() if batch else letter), layer)

    def _gradient(self, name: str) -> str:
        """nabla_v C; for a parameter in batch form the gradient of the batch-mean cost."""
        letter, layer = _split(name)
        if letter == "w":
            return rf"\nabla_{{{_layered('W', layer)}}} {self._cost()}"
        if letter == "b":
            return rf"\nabla_{{{_layered(VECTORS['b'], layer)}}} {self._cost()}"
        return rf"\nabla_{{{self._print_Vec(Vec(name))}}} C"

    def _cost(self) -> str:
        return r"\bar{C}" if self._settings["batch"] else "C"

    def _print_Mat(self, expr: Mat) -> str:
        _letter, layer = _split(expr.name)
        return _layered("W", layer)

    def _transposed(self, expr: sp.Expr) -> str:
        text = self._print(expr)
        if isinstance(expr, Vec) and expr.name == "1":
            return r"\mathbf{1}^{\top}"
        if isinstance(expr, (Vec, Mat)) and "^" not in text and not text.startswith(r"\math"):
            return text + r"^{\top}"
        return rf"\left({text}\right)^{{\top}}"

    def _print_MatVec(self, expr: MatVec) -> str:
        matrix, vector, transposed = expr.args
        prec = PRECEDENCE["Mul"]
        v = self.parenthesize(vector, prec, strict=True)
        if self._settings["batch"]:
            # rows are samples: (W^T v)^T = v^T W, (W v)^T = v^T W^T
            return rf"{v}\,{self._print(matrix)}" if transposed else (
                rf"{v}\,{self._transposed(matrix)}")
        w = self._transposed(matrix) if transposed else self._print(matrix)
        return rf"{w}\,{v}"

    def _print_Outer(self, expr: Outer) -> str:
        u, v = expr.args
        if self._settings["batch"]:
            # the batch mean of the per-sample outer products
            return rf"\frac{{1}}{{B}}\,{self._transposed(u)}\,{self._print(v)}"
        return rf"{self.parenthesize(u, PRECEDENCE['Mul'], strict=True)}\,{self._transposed(v)}"

    def _print_Inner(self, expr: Inner) -> str:
        u, v = expr.args
        if self._settings["batch"]:
            summand = v if u == Vec("1") else u * v
            return rf"\operatorname{{rowsum}}\!\left({self._print(summand)}\right)"
        return rf"{self._transposed(u)}\,{self.parenthesize(v, PRECEDENCE['Mul'], strict=True)}"

    def _print_Mul(self, expr: sp.Mul) -> str:
        factors = expr.as_ordered_factors()
        vectors = [f for f in factors if f.has(Vec, MatVec, Outer)]
        if len(vectors) < 2:
            return self._print_scalar_Mul(expr, factors)
        # a product of vectors is elementwise: Hadamard product, elementwise division
        scalar = sp.Mul(*(f for f in factors if f not in vectors))
        numerators = [f for f in vectors if not (f.is_Pow and f.exp.is_negative)]
        denominators = [1 / f for f in vectors if f.is_Pow and f.exp.is_negative]
        text = r" \odot ".join(self._factor(f) for f in numerators) or r"\mathbf{1}"
        if denominators and all(isinstance(f, Inner) for f in denominators):
            # division by a per-sample scalar (softmax normalisation): an ordinary fraction
            return rf"\frac{{{text}}}{{{self._print(sp.Mul(*denominators))}}}"
        if denominators:
            if len(numerators) > 1:
                text = rf"\left({text}\right)"
            text += "".join(rf" \oslash {self.parenthesize(f, PRECEDENCE['Pow'])}"
                            for f in denominators)
        if scalar == 1:
            return text
        if scalar == -1:
            return "-" + text
        return rf"{self.parenthesize(scalar, PRECEDENCE['Mul'])}\, {text}"


def _factor_rank(factor: sp.Expr) -> int:
    """Order of factors in a product, as written on paper: w^{l+1}_{kj} delta^{l+1}_k,
    a^{l-1}_k delta^l_j, y_j log a_j, (a_j - y_j) sigma'(z_j)."""
    if isinstance(factor, sp.Indexed):
        return 0 if len(factor.indices) == 2 else 1
    if factor.is_Symbol or (factor.is_Pow and factor.base.is_Symbol):
        return 1
    if isinstance(factor, sp.Add):
        return 2
    return 3


def latex(expr: sp.Expr, *, batch: bool = False) -> str:
    """``expr`` as LaTeX math in derive's notation (batch form with ``batch=True``)."""
    return DeriveLatexPrinter({"batch": batch}).doprint(expr)


def batch_gradient(vector: sp.Expr) -> str:
    """The batch form of a per-sample gradient vector (a bias gradient): the mean over the
    rows of the batch, written with the row of ones."""
    return rf"\frac{{1}}{{B}}\,\mathbf{{1}}^{{\top}} {latex(vector, batch=True)}"


def equation(lhs: sp.Expr, rhs: sp.Expr, *, batch: bool = False) -> str:
    """``lhs = rhs`` as LaTeX math."""
    return f"{latex(lhs, batch=batch)} = {latex(rhs, batch=batch)}"


def repr_latex(formulas: tuple) -> str:
    """Jupyter's ``_repr_latex_`` of formulas: index form, vector form and BP tag."""
    lines = []
    for formula in formulas:
        tag = rf"&& \text{{({formula.equation})}}" if formula.equation else ""
        lines.append(f"{latex(formula.lhs)} &= {latex(formula.rhs)} "
                     rf"&\qquad {latex(Vec(formula.key))} &= {latex(formula.vector)} {tag}")
    return r"$$\begin{aligned}" + r" \\ ".join(lines) + r"\end{aligned}$$"

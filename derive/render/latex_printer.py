"""LaTeX printer for derive expressions, in the classic backpropagation notation.

A SymPy ``LatexPrinter`` subclass used by :mod:`derive.render.latex` (documents) and by the Jupyter
``_repr_latex_`` of :class:`~derive.derivation.Derivation`. It reads the fields of each
:class:`~derive.quantities.NetTensor` (``role``, ``node``, ``of``, ``rank``), never its name,
and prints

* index form: ``w^{2}_{jk}``, ``\\delta^{3}_{j}``, ``\\gamma^{4}_{j}``, ``\\hat{x}^{4}_{j}``,
  ``\\mu^{4}``, ``(\\sigma^{4})^{2}``, ``y_{j}``, sums with their ranges
  ``\\sum_{k=1}^{n_{2}}``, ``\\frac{\\partial C}{\\partial a^{2}_{j}}`` and the symbolic
  activation derivative of layer l as ``\\sigma_{l}'(z^{l}_{j})``;
* tensor form (:mod:`derive.derivation.tensorform`): bold vectors, ``W^{l}``, ``\\odot`` for the Hadamard
  product, ``\\oslash`` for elementwise division and ``^{\\top}`` for the transpose;
* batch form (``batch=True``; rows are samples): ``A^{l}``, ``Z^{l}``, ``\\Delta^{l}``, ``Y``;
  ``W^T v`` becomes ``V W``, ``u v^T`` the batch mean ``\\frac{1}{B} U^{\\top} V`` and a
  parameter vector is broadcast to every row as ``\\mathbf{1} (\\mathbf{b}^{l})^{\\top}``.

Nothing here computes: it only spells the expressions the derivation produced; :func:`terms`
prints the terms of a sum one by one, for documents that break long sums over lines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from derive.derivation.tensorform import Broadcast, Einsum, Inner, MatVec, Outer, SumAxes
from derive.quantities import NetTensor

#: How a quantity's role is spelled in index form (one entry of it, or a per-sample scalar).
LETTERS: Mapping[str, str] = {
    "a": "a", "z": "z", "w": "w", "b": "b", "y": "y", "delta": r"\delta", "gamma": r"\gamma",
    "beta": r"\beta", "mu": r"\mu", "var": r"\sigma", "xhat": r"\hat{x}", "mask": "m",
    "sigma": r"\sigma", "nabla": r"\nabla",
}
#: Tensor form (one sample): bold vectors, capital matrices.
VECTORS: Mapping[str, str] = {
    "a": r"\mathbf{a}", "z": r"\mathbf{z}", "b": r"\mathbf{b}", "y": r"\mathbf{y}",
    "delta": r"\boldsymbol{\delta}", "gamma": r"\boldsymbol{\gamma}",
    "beta": r"\boldsymbol{\beta}", "xhat": r"\hat{\mathbf{x}}", "mask": r"\mathbf{m}",
    "w": "W", "mu": r"\mu", "var": r"\sigma",
}
#: Batch form (rows are samples): capitals; a per-sample scalar becomes a bold column.
BATCH: Mapping[str, str] = {
    "a": "A", "z": "Z", "delta": r"\Delta", "y": "Y", "xhat": r"\hat{X}", "mask": "M",
    "w": "W", "mu": r"\boldsymbol{\mu}", "var": r"\boldsymbol{\sigma}",
}
#: Roles printed squared: the variance of a layer norm is (σ^l)².
SQUARED = frozenset({"var"})
#: Spellings of derive's own SymPy functions.
FUNCTIONS: Mapping[str, str] = {
    "sigmoid": r"\operatorname{sigmoid}", "softplus": r"\operatorname{softplus}",
}


def _spelled(role: str) -> str:
    """A role no table knows (a custom op's parameter U, its sums s1): one letter as it is,
    a longer name upright."""
    return role if len(role) == 1 else rf"\mathrm{{{role}}}"


def _layered(symbol: str, node: object, role: str = "") -> str:
    """``symbol`` with the layer as a superscript; a variance squared outside it."""
    text = symbol if node is None else f"{symbol}^{{{node}}}"
    if role in SQUARED:
        return f"({text})^{{2}}" if node is not None else f"{symbol}^{{2}}"
    return text


def is_vector(expr: sp.Basic) -> bool:
    """Whether a tensor-form expression is a vector or matrix per sample (not a scalar).

    An index-form expression (entries, sums over indices) is a scalar; ``Inner`` is a scalar.
    """
    if isinstance(expr, NetTensor):
        return expr.rank >= 1 and expr.role != "one"
    if isinstance(expr, (MatVec, Outer, Einsum, Broadcast, SumAxes)):
        return True
    if isinstance(expr, (Inner, sp.Indexed, sp.Sum)):
        return False
    return any(is_vector(arg) for arg in expr.args)


class DeriveLatexPrinter(LatexPrinter):
    """Prints derive's index, tensor and batch expressions as LaTeX math.

    Settings: ``batch`` (rows are samples) and ``batch_cost``, the symbol of the batch
    objective whose parameter gradients the batch form shows (``\\bar{C}``, or ``J`` when a
    regularization penalty is added).
    """

    printmethod = "_derive_latex"  # no object defines it: dispatch to the _print_* below
    _default_settings: ClassVar[dict] = {**LatexPrinter._default_settings, "batch": False,
                                         "batch_cost": r"\bar{C}", "fold_frac_powers": True}

    # -- quantities ---------------------------------------------------------------------

    def _entry_symbol(self, tensor: NetTensor) -> str:
        """The symbol of one entry (index form): w^{2}, \\hat{x}^{4}, (\\sigma^{4})^{2}."""
        return _layered(LETTERS.get(tensor.role, _spelled(tensor.role)), tensor.node,
                        tensor.role)

    def _tensor_symbol(self, tensor: NetTensor, *, batch: bool | None = None) -> str:
        """The symbol of the whole tensor: bold vector, capital matrix or batch capital."""
        batch = self._settings["batch"] if batch is None else batch
        role = tensor.role
        if tensor.rank == 0:
            table = BATCH if batch else LETTERS
            return _layered(table.get(role, LETTERS.get(role, _spelled(role))), tensor.node,
                            role)
        if batch and tensor.is_parameter and tensor.rank == 1:
            # one parameter vector for the whole batch, added to (or multiplying) every row
            vector = VECTORS.get(role, rf"\mathbf{{{role}}}")
            return rf"\mathbf{{1}}\left({_layered(vector, tensor.node)}\right)^{{\top}}"
        if tensor.is_parameter and role not in VECTORS:
            # a custom op's parameter: the name the user gave it, batch or not
            symbol = _spelled(role) if tensor.rank >= 2 else rf"\mathbf{{{role}}}"
            return _layered(symbol, tensor.node, role)
        table = BATCH if batch else VECTORS
        return _layered(table.get(role, _spelled(role.upper() if batch else role)),
                        tensor.node, role)

    def _print_NetTensor(self, expr: NetTensor) -> str:
        if expr.role == "one":
            return r"\mathbf{1}"
        if expr.role == "grad":
            return self._gradient(expr)
        return self._tensor_symbol(expr)

    def _gradient(self, tensor: NetTensor) -> str:
        """The adjoint ∂C/∂q in tensor form: ∇_q C for a vector or matrix, a fraction for a
        per-sample scalar; a parameter's batch gradient is that of the batch objective."""
        batch = self._settings["batch"]
        of = tensor.target
        if tensor.rank == 0:
            return rf"\frac{{\partial C}}{{\partial {self._tensor_symbol(of)}}}"
        cost = self._settings["batch_cost"] if batch and of.is_parameter else "C"
        if of.is_parameter:
            return rf"\nabla_{{{self._tensor_symbol(of, batch=False)}}} {cost}"
        return rf"\nabla_{{{self._tensor_symbol(of)}}} {cost}"

    def _print_Symbol(self, expr: sp.Symbol, style: str = "plain") -> str:
        if isinstance(expr, NetTensor):
            return self._print_NetTensor(expr)
        return super()._print_Symbol(expr, style)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        indices = [self._print(index) for index in expr.indices]
        separator = "" if all(len(text) == 1 for text in indices) else ","
        label = expr.base.label
        subscript = f"_{{{separator.join(indices)}}}"
        if isinstance(label, NetTensor) and label.role == "grad":
            of = label.target
            return rf"\frac{{\partial C}}{{\partial {self._entry_symbol(of)}{subscript}}}"
        if isinstance(label, NetTensor):
            return self._entry_symbol(label) + subscript
        return self._print(label) + subscript

    # -- index form ---------------------------------------------------------------------

    def _as_ordered_terms(self, expr: sp.Add, order: str | None = None) -> list[sp.Expr]:
        # the classic order: sum_k w_jk a_k + b_j, W a + b (sums and products before the bias)
        terms = super()._as_ordered_terms(expr, order=order)
        return sorted(terms, key=lambda term: 0 if term.has(sp.Sum, MatVec) else 1)

    def _print_Sum(self, expr: sp.Sum) -> str:
        # -sum_i y_i log a_i rather than sum_i -log(a_i) y_i
        if expr.function.could_extract_minus_sign():
            return "-" + self._print_Sum(sp.Sum(-expr.function, *expr.limits))
        return super()._print_Sum(expr)

    def _print_Rational(self, expr: sp.Rational) -> str:
        # a small constant such as a layer norm's eps, 1/100000, reads as 10^{-5}
        q = int(expr.q)
        digits = len(str(q)) - 1
        if expr.p == 1 and digits >= 4 and q == 10 ** digits:
            return f"10^{{-{digits}}}"
        return super()._print_Rational(expr)

    def _print_Basic(self, expr: sp.Basic) -> str:
        # constants (π, γ, ∞, i) print themselves through ``_latex``, which this printer's
        # printmethod skips; only objects with no printer method of their own get here
        if hasattr(expr, "_latex"):
            return expr._latex(self)
        return super()._print_Basic(expr)

    def _print_Pow(self, expr: sp.Pow) -> str:
        # w^{2}_{jk} squared must not become a double superscript: parenthesize the base.
        base, exponent = expr.args
        layered = isinstance(base, sp.Indexed) or (isinstance(base, NetTensor)
                                                   and base.node is not None)
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
        separator = "" if len(first) == 1 and len(second) == 1 else ","
        text = rf"\delta_{{{first}{separator}{second}}}"
        return text if exp is None else rf"\left({text}\right)^{{{exp}}}"

    # -- products -----------------------------------------------------------------------

    def _print_scalar_Mul(self, expr: sp.Mul, factors: list[sp.Expr]) -> str:
        coefficient, rest = expr.as_coeff_Mul()
        if coefficient not in (1, -1) and not isinstance(rest, sp.Add):
            text = self._print(rest)
            if text.startswith(r"\mathbf{1}"):
                # 2 1^T a would read as 21^T a
                return rf"{self._print(coefficient)} \cdot {text}"
        simple = all(not (f.is_Pow and f.exp.is_negative) and not f.is_Number for f in factors)
        if not simple or len(factors) < 2:
            if expr.could_extract_minus_sign() and not expr.args[0].is_Number:
                return "-" + self._print(-expr)
            return super()._print_Mul(expr)
        ordered = sorted(factors, key=_factor_rank)
        return self._settings["mul_symbol_latex"].join(
            self._factor(f, last=n == len(ordered) - 1) for n, f in enumerate(ordered))

    def _factor(self, factor: sp.Expr, *, last: bool = False) -> str:
        """One factor of a product, bracketed only where the product would misread."""
        text = self._print(factor)
        if isinstance(factor, (sp.Add, sp.Piecewise, MatVec)) or (
                isinstance(factor, sp.Sum) and not last):
            return rf"\left({text}\right)"
        return text

    def _print_Mul(self, expr: sp.Mul) -> str:
        factors = expr.as_ordered_factors()
        vectors = [f for f in factors if is_vector(f)]
        if len(vectors) < 2:
            return self._print_scalar_Mul(expr, factors)
        # a product of vectors is elementwise: Hadamard product, elementwise division
        scalar = sp.Mul(*(f for f in factors if f not in vectors))
        numerators = [f for f in vectors if not (f.is_Pow and f.exp.is_negative)]
        denominators = [1 / f for f in vectors if f.is_Pow and f.exp.is_negative]
        text = r" \odot ".join(self._factor(f) for f in numerators) or r"\mathbf{1}"
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

    # -- tensor and batch form ----------------------------------------------------------

    def _transposed(self, expr: sp.Expr) -> str:
        text = self._print(expr)
        if isinstance(expr, NetTensor) and expr.role == "one":
            return r"\mathbf{1}^{\top}"
        if isinstance(expr, NetTensor) and "^" not in text and not text.startswith(r"\math"):
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
            summand = v if isinstance(u, NetTensor) and u.role == "one" else u * v
            return rf"\operatorname{{rowsum}}\!\left({self._print(summand)}\right)"
        return rf"{self._transposed(u)}\,{self.parenthesize(v, PRECEDENCE['Mul'], strict=True)}"

    def _print_Broadcast(self, expr: Broadcast) -> str:
        # an entry, in index notation: the axes are the indices
        tensor, axes = expr.args[0], str(expr.args[1])
        if tensor.role == "grad":
            return self._print(sp.Indexed(sp.IndexedBase(tensor), *sp.symbols(list(axes))))
        return rf"{self._entry_symbol(tensor)}_{{{axes}}}"

    def _print_SumAxes(self, expr: SumAxes) -> str:
        summed = "".join(c for c in str(expr.args[1]) if c not in str(expr.args[2]))
        body = self.parenthesize(expr.args[0], PRECEDENCE["Mul"], strict=True)
        return rf"\sum_{{{summed}}} {body}"

    def _print_Einsum(self, expr: Einsum) -> str:
        subscripts, *operands = expr.args
        spelled = self._print(subscripts).replace("->", r" \to ")
        args = ", ".join(self._print(operand) for operand in operands)
        return rf"\operatorname{{einsum}}_{{{spelled}}}\!\left({args}\right)"


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


def printer(*, batch: bool = False, batch_cost: str = r"\bar{C}") -> DeriveLatexPrinter:
    return DeriveLatexPrinter({"batch": batch, "batch_cost": batch_cost})


def latex(expr: sp.Expr, *, batch: bool = False, batch_cost: str = r"\bar{C}") -> str:
    """``expr`` as LaTeX math in derive's notation (batch form with ``batch=True``)."""
    return printer(batch=batch, batch_cost=batch_cost).doprint(expr)


def batch_gradient(vector: sp.Expr, *, batch_cost: str = r"\bar{C}") -> str:
    """The batch form of a per-sample gradient vector (a bias gradient): the mean over the
    rows of the batch, written with the row of ones."""
    text = latex(vector, batch=True, batch_cost=batch_cost)
    if isinstance(vector, sp.Mul) and len(vector.args) > 1 or isinstance(vector, sp.Add):
        text = rf"\left({text}\right)"
    return rf"\frac{{1}}{{B}}\,\mathbf{{1}}^{{\top}} {text}"


def equation(lhs: sp.Expr, rhs: sp.Expr, *, batch: bool = False) -> str:
    """``lhs = rhs`` as LaTeX math."""
    return f"{latex(lhs, batch=batch)} = {latex(rhs, batch=batch)}"


#: Commands that take no width of their own (their arguments are measured).
_NO_WIDTH = frozenset({"left", "right", "mathbf", "boldsymbol", "operatorname", "hat", "top",
                       "!", ",", ":", ";", "quad", "qquad", "limits", "mathrm", "text",
                       "textit", "texttt", "cdot"})
#: Commands that print as their own name (operator names).
_NAMED = frozenset({"log", "exp", "tanh", "sinh", "cosh", "sin", "cos", "tan", "max", "min",
                    "operatorname"})
_COMMAND = re.compile(r"\\([A-Za-z]+|.)")


def _group(math: str, pos: int) -> tuple[float, int]:
    """The width of the brace group (or single character) at ``pos``, and the position after."""
    if pos < len(math) and math[pos] == "{":
        return _measure(math, pos + 1)
    if pos < len(math) and math[pos] == "\\":
        match = _COMMAND.match(math, pos)
        return 1.0, match.end()
    return (1.0 if pos < len(math) else 0.0), pos + 1


def _measure(math: str, pos: int = 0) -> tuple[float, int]:
    total = 0.0
    while pos < len(math):
        char = math[pos]
        if char == "}":
            return total, pos + 1
        if char == "{":
            width, pos = _measure(math, pos + 1)
            total += width
        elif char == "\\":
            match = _COMMAND.match(math, pos)
            name, pos = match.group(1), match.end()
            if name == "frac":
                numerator, pos = _group(math, pos)
                denominator, pos = _group(math, pos)
                total += max(numerator, denominator)
            elif name in ("begin", "end"):
                _width, pos = _group(math, pos)
                if pos < len(math) and math[pos] == "[":
                    pos = math.index("]", pos) + 1
            elif name == "\\":
                pass
            elif name in _NAMED and name != "operatorname":
                total += len(name)
            elif name not in _NO_WIDTH:
                total += 2.0 if name in ("sum", "prod", "odot", "oslash") else 1.0
        elif char in "^_":
            width, pos = _group(math, pos + 1)
            total += 0.6 * width
        elif char in " &":
            pos += 1
        elif char in "=+-<>":
            total += 2.0  # with the spaces around it
            pos += 1
        else:
            total += 1.0
            pos += 1
    return total, pos


def visual_length(math: str) -> int:
    """A rough width of printed math in characters: commands count as one symbol, a fraction
    as its wider part, scripts as smaller; used to choose a shorter form or a line break where
    one line would run off the page."""
    return round(_measure(math)[0])


def terms(expr: sp.Expr, *, batch: bool = False, batch_cost: str = r"\bar{C}"
          ) -> list[tuple[str, str]]:
    """The terms of a sum, each printed on its own, with its sign: [("+", "a"), ("-", "b")]."""
    p = printer(batch=batch, batch_cost=batch_cost)
    if not isinstance(expr, sp.Add):
        return [("+", p.doprint(expr))]
    out = []
    for term in p._as_ordered_terms(expr):
        if term.could_extract_minus_sign():
            out.append(("-", p.doprint(-term)))
        else:
            out.append(("+", p.doprint(term)))
    return out


def repr_latex(formulas: tuple) -> str:
    """Jupyter's ``_repr_latex_`` of formulas: index form, tensor form and BP tag."""
    lines = []
    for formula in formulas:
        tag = rf"&& \text{{({formula.equation})}}" if formula.equation else ""
        lines.append(f"{latex(formula.lhs)} &= {latex(formula.rhs)} "
                     rf"&\qquad {latex(formula.target)} &= {latex(formula.vector)} {tag}")
    return r"$$\begin{aligned}" + r" \\ ".join(lines) + r"\end{aligned}$$"

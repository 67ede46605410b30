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
* feature maps (docs/architecture.md, "Images"): entries at shifted indices
  ``a^{0}_{k,\\,2r+p-3,\\,2s+q-3}``, the Iverson bracket ``\\left[1 \\le r-u+2 \\le 3\\right]``,
  a window's maximum ``\\max_{p,q}`` and the indicator of its first maximum
  ``\\mathbb{1}\\left[(p, q) = \\operatorname{argmax}_{p',q'} ...\\right]``; in tensor form a
  convolution ``W^{1} \\star \\mathbf{a}^{0}``, a kernel's gradient
  ``\\mathbf{a}^{0} \\star \\boldsymbol{\\delta}^{1}``, the full correlation with the flipped
  kernel ``\\boldsymbol{\\delta}^{2} \\star_{\\mathrm{full}} \\operatorname{rot180}(W^{2})``,
  the sliding windows ``\\operatorname{win}`` and their adjoint ``\\operatorname{win}^{\\top}``,
  ``\\operatorname{vec}`` and ``\\operatorname{vec}^{-1}`` (what each is, read from the tree's
  structure by :mod:`derive.render.imagenotation`);
* sequences (:mod:`derive.derivation.stepform`): a quantity at a step, ``\\mathbf{h}^{1}_{t-1}``;
  the bracket of the steps a term is there, ``\\left[t \\le T - 1\\right]`` (and δ_{tT} as
  ``\\left[t = T\\right]``); a block of stacked gates ``\\left(\\mathbf{z}^{1}_{t}\\right)_{[a\\,:\\,b]}``,
  the blocks of a stacked error as a column; a shared parameter's gradient ``\\sum_{t=1}^{T} ...``;
* whole sequences (attention, :func:`derive.derivation.stepform.whole_sequence`): a quantity
  with no step is the matrix of all its steps, one row per step, a capital (``Q^{1}``,
  ``K^{1}``, ``V^{1}``, ``S^{1}``, ``\\Delta^{1}``; the weights α as
  ``\\boldsymbol{\\alpha}^{1}``); matrix products ``Q^{1} \\left(K^{1}\\right)^{\\top}``, the
  row sums ``\\operatorname{rowsum}``, the causal mask ``M_{\\mathrm{causal}}`` and the
  softmax of each row;
* batch form (``batch=True``; rows are samples): ``A^{l}``, ``Z^{l}``, ``\\Delta^{l}``, ``Y``;
  ``W^T v`` becomes ``V W``, ``u v^T`` the batch mean ``\\frac{1}{B} U^{\\top} V`` and a
  parameter vector is broadcast to every row as ``\\mathbf{1} (\\mathbf{b}^{l})^{\\top}``.

Nothing here computes: it only spells the expressions the derivation produced; :func:`terms`
prints the terms of a sum one by one, for documents that break long sums over lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import ClassVar

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from derive.derivation.imageform import (
    FirstMaxMask,
    Flatten,
    Fold,
    Unflatten,
    Windows,
    WindowsMax,
)
from derive.derivation.stepform import (
    Block,
    Causal,
    Concat,
    MatProd,
    StepGuard,
    SumLast,
    SumSteps,
    Transposed,
)
from derive.derivation.tensorform import Broadcast, Einsum, Inner, MatVec, Outer, SumAxes
from derive.quantities import LENGTH, NetTensor, family_indices
from derive.registry.windows import FirstMax, InRange, WindowMax
from derive.render.imagenotation import (
    Geometry,
    contraction,
    folded,
    index_terms,
    is_index_expression,
    spread_map,
    summed_axes,
    windows_geometry,
)

#: The time indices (t, τ, t', τ', t'').
_TIME = frozenset(family_indices(("time",) * 5, set()))
#: How a quantity's role is spelled in index form (one entry of it, or a per-sample scalar).
LETTERS: Mapping[str, str] = {
    "a": "a", "z": "z", "w": "w", "b": "b", "y": "y", "delta": r"\delta", "gamma": r"\gamma",
    "beta": r"\beta", "mu": r"\mu", "var": r"\sigma", "xhat": r"\hat{x}", "mask": "m",
    "sigma": r"\sigma", "nabla": r"\nabla", "tanh": r"\tanh",
    # a recurrent layer's weights and stacked pre-activations (grouped: a layer's superscript
    # and an entry's subscript follow them)
    "wx": "{w_{x}}", "wh": "{w_{h}}", "bx": "{b_{x}}", "bh": "{b_{h}}", "zx": "{z_{x}}",
    "zh": "{z_{h}}",
    # attention: queries, keys, values, scores, weights and the projections
    "q": "q", "k": "k", "v": "v", "s": "s", "alpha": r"\alpha",
    "wq": "{w_{q}}", "wk": "{w_{k}}", "wv": "{w_{v}}",
}
#: Tensor form (one sample): bold vectors, capital matrices.
VECTORS: Mapping[str, str] = {
    "a": r"\mathbf{a}", "z": r"\mathbf{z}", "b": r"\mathbf{b}", "y": r"\mathbf{y}",
    "delta": r"\boldsymbol{\delta}", "gamma": r"\boldsymbol{\gamma}",
    "beta": r"\boldsymbol{\beta}", "xhat": r"\hat{\mathbf{x}}", "mask": r"\mathbf{m}",
    "w": "W", "mu": r"\mu", "var": r"\sigma",
    "wx": "{W_{x}}", "wh": "{W_{h}}", "bx": r"{\mathbf{b}_{x}}", "bh": r"{\mathbf{b}_{h}}",
    "zx": r"{\mathbf{z}_{x}}", "zh": r"{\mathbf{z}_{h}}",
    **{role: rf"\mathbf{{{role}}}" for role in ("h", "c", "i", "f", "g", "o", "r", "u")},
    **{role: rf"\mathbf{{{role}}}" for role in ("q", "k", "v", "s")},
    "alpha": r"\boldsymbol{\alpha}", "wq": "{W_{q}}", "wk": "{W_{k}}", "wv": "{W_{v}}",
}
#: Batch form (rows are samples): capitals; a per-sample scalar becomes a bold column.
BATCH: Mapping[str, str] = {
    "a": "A", "z": "Z", "delta": r"\Delta", "y": "Y", "xhat": r"\hat{X}", "mask": "M",
    "w": "W", "mu": r"\boldsymbol{\mu}", "var": r"\boldsymbol{\sigma}",
    "wx": "{W_{x}}", "wh": "{W_{h}}", "zx": "{Z_{x}}", "zh": "{Z_{h}}",
    # a recurrent layer's states and gates, one row per sample; the cell state is not C,
    # which is the cost
    "h": "H", "c": r"\mathcal{C}", "i": "I", "f": "F", "g": "G", "o": "O", "r": "R",
    "u": "U",
    "q": "Q", "k": "K", "v": "V", "s": "S", "alpha": r"\boldsymbol{\alpha}",
    "wq": "{W_{q}}", "wk": "{W_{k}}", "wv": "{W_{v}}",
}
#: A whole sequence (attention's formulas, :func:`derive.derivation.stepform.whole_sequence`):
#: the matrix of every step of one sample, one row per step. The weights α are a bold α, as
#: A would read as the layer's output.
WHOLE: Mapping[str, str] = {
    "a": "A", "z": "Z", "delta": r"\Delta", "y": "Y", "xhat": r"\hat{X}", "mask": "M",
    "h": "H", "q": "Q", "k": "K", "v": "V", "s": "S", "alpha": r"\boldsymbol{\alpha}",
}
#: Functions of the stability rewrites (derive.render.stability) that give a matrix: the
#: softmax of each row, the causal one.
_MATRIX_FUNCTIONS = frozenset({"Softmax", "CausalSoftmax"})
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


def _layered(symbol: str, node: object, role: str = "", subscript: str = "") -> str:
    """``symbol`` with the layer as a superscript (and ``subscript``, an entry's indices or a
    step); a variance squared outside both: (σ^{3}_{t})^{2}, the variance of step t."""
    text = symbol if node is None else f"{symbol}^{{{node}}}"
    if role in SQUARED:
        return f"({text}{subscript})^{{2}}" if node is not None else f"{symbol}{subscript}^{{2}}"
    return text + subscript


def step_subscript(tensor: NetTensor) -> str:
    """The time step of a step view as a subscript: _{t}, _{t-1}, _{T}; else nothing."""
    if tensor.step is None:
        return ""
    if tensor.step == "T":
        return "_{T}"
    return f"_{{t{'' if tensor.step == 0 else f'{tensor.step:+d}'}}}"


def step_condition(guard: StepGuard, show: Callable[[sp.Expr], str], le: str) -> str:
    r"""The steps a guard keeps, as a condition on t: t = T, t \le T - 1, 2 \le t."""
    low, high = guard.args
    if low == high:
        return f"t = {show(high)}"
    parts = [] if low == 1 or (low.is_number and low <= 1) else [f"{show(low)} {le}"]
    parts.append("t")
    if high != LENGTH:
        parts.append(f"{le}{show(high)}")
    return " ".join(parts) if len(parts) > 1 else f"1 {le}t {le}T"


def is_whole_tensor(tensor: NetTensor) -> bool:
    """Whether ``tensor`` stands for a whole sequence of one sample (a rank-2 quantity with no
    step: attention's Q, K, V, S, α and the error Δ they read), not one step of it."""
    return tensor.rank == 2 and not tensor.is_parameter and tensor.step is None and \
        tensor.role not in ("one", "grad")


#: The functions of whole sequences: matrix products and transposes, row sums, the causal
#: mask (all of them matrices per sample).
WHOLE_FUNCTIONS = (MatProd, Transposed, SumLast, Causal)


def is_whole(expr: sp.Basic) -> bool:
    """Whether a tensor form reads whole sequences (attention's matrices, one row per
    step) rather than one step t."""
    if expr.has(*WHOLE_FUNCTIONS):
        return True
    for tensor in expr.atoms(NetTensor):
        tensor = tensor.target if tensor.role == "grad" else tensor
        if tensor is not None and is_whole_tensor(tensor):
            return True
    return False


def is_vector(expr: sp.Basic) -> bool:
    """Whether a tensor-form expression is a vector or matrix per sample (not a scalar).

    An index-form expression (entries, sums over indices) is a scalar; ``Inner`` is a scalar.
    """
    if isinstance(expr, NetTensor):
        return expr.rank >= 1 and expr.role != "one"
    if isinstance(expr, (MatVec, Outer, Einsum, Broadcast, SumAxes, Windows, WindowsMax,
                         FirstMaxMask, Fold, Flatten, Unflatten, Block, Concat,
                         *WHOLE_FUNCTIONS)) or type(expr).__name__ in _MATRIX_FUNCTIONS:
        return True
    if isinstance(expr, (Inner, sp.Indexed, sp.Sum)):
        return False
    return any(is_vector(arg) for arg in expr.args)


def _block_offsets(terms: list[sp.Expr]) -> list[float] | None:
    """Where each term's block starts, when every term is one block of a stacked quantity:
    it has one bracket [1 ≤ j - c ≤ n] on the same index j (c = 0, n_1, 2 n_1, ...: a size
    counts as 1, so the blocks of any size keep their order); else None."""
    offsets, index = [], None
    for term in terms:
        brackets = [f for f in sp.Mul.make_args(term) if isinstance(f, InRange)]
        if len(brackets) != 1:
            return None
        value = brackets[0].args[0]
        variables = [v for v in value.free_symbols if value.coeff(v) == 1]
        found = variables[0] if len(variables) == 1 else None
        if found is None or index not in (None, found):
            return None
        index = found
        shift = -(value - found)
        offsets.append(float(shift.xreplace({v: sp.Integer(1) for v in shift.free_symbols})))
    return offsets if len(set(offsets)) == len(offsets) else None


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

    def _entry_symbol(self, tensor: NetTensor, subscript: str = "") -> str:
        """The symbol of one entry (index form): w^{2}, \\hat{x}^{4}, (\\sigma^{4})^{2}; with
        ``subscript`` its indices, inside the square of a variance: (\\sigma^{4}_{t})^{2}."""
        return _layered(LETTERS.get(tensor.role, _spelled(tensor.role)), tensor.node,
                        tensor.role, subscript)

    def _tensor_symbol(self, tensor: NetTensor, *, batch: bool | None = None,
                       step: str = "") -> str:
        """The symbol of the whole tensor: bold vector, capital matrix or batch capital (with
        ``step``, the subscript of a step view, inside the square of a variance)."""
        batch = self._settings["batch"] if batch is None else batch
        role = tensor.role
        if role in SQUARED and tensor.rank == 0 and step:
            # a layer norm's variance at step t: (σ^{l}_{t})^{2}, one value per step
            table = BATCH if batch else VECTORS
            return _layered(table.get(role, LETTERS[role]), tensor.node, role, step)
        if tensor.rank == 0:
            table = BATCH if batch else LETTERS
            return _layered(table.get(role, LETTERS.get(role, _spelled(role))), tensor.node,
                            role, step)
        if batch and tensor.is_parameter and tensor.rank == 1:
            # one parameter vector for the whole batch, added to (or multiplying) every row
            vector = VECTORS.get(role, rf"\mathbf{{{role}}}")
            return rf"\mathbf{{1}}\left({_layered(vector, tensor.node)}\right)^{{\top}}"
        if is_whole_tensor(tensor) and role in WHOLE:
            # every step of one sample, one row per step (batch or not: per sample)
            return _layered(WHOLE[role], tensor.node, role)
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
        if expr.role in SQUARED and step_subscript(expr):
            return self._tensor_symbol(expr, step=step_subscript(expr))
        return self._tensor_symbol(expr) + step_subscript(expr)

    def _gradient(self, tensor: NetTensor) -> str:
        """The adjoint ∂C/∂q in tensor form: ∇_q C for a vector or matrix, a fraction for a
        per-sample scalar; a parameter's batch gradient is that of the batch objective."""
        batch = self._settings["batch"]
        of = tensor.target
        if tensor.rank == 0:
            # a per-sample scalar, or one value per step (a layer norm's μ_t): a fraction
            return rf"\frac{{\partial C}}{{\partial {self._print_NetTensor(of)}}}"
        cost = self._settings["batch_cost"] if batch and of.is_parameter else "C"
        if of.is_parameter:
            return rf"\nabla_{{{self._tensor_symbol(of, batch=False)}}} {cost}"
        return rf"\nabla_{{{self._tensor_symbol(of)}{step_subscript(of)}}} {cost}"

    def _print_Symbol(self, expr: sp.Symbol, style: str = "plain") -> str:
        if isinstance(expr, NetTensor):
            return self._print_NetTensor(expr)
        primed = re.fullmatch(r"([A-Za-z]+)('+)", expr.name)
        if primed:
            # a second time index: tau' as \tau', t'' as t''
            base = super()._print_Symbol(sp.Symbol(primed.group(1)), style)
            return base + primed.group(2)
        return super()._print_Symbol(expr, style)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        indices = [self._index(index) for index in expr.indices]
        compound = any(not isinstance(i, sp.Symbol | sp.Integer) for i in expr.indices)
        separator = r",\," if compound else (
            "" if all(len(text) == 1 for text in indices) else ",")
        label = expr.base.label
        subscript = f"_{{{separator.join(indices)}}}"
        if isinstance(label, NetTensor) and label.role == "grad":
            of = label.target
            return rf"\frac{{\partial C}}{{\partial {self._entry_symbol(of, subscript)}}}"
        if isinstance(label, NetTensor):
            return self._entry_symbol(label, subscript)
        return self._print(label) + subscript

    def _index(self, index: sp.Expr) -> str:
        """One index of an entry: a shifted index compact and in reading order, 2r+p-3."""
        if not is_index_expression(index):
            return self._print(index)
        text = ""
        for term in index_terms(index):
            # 2r+p-3 without spaces; a space between two letters stays (\cdot x)
            printed = re.sub(r" (?=[^A-Za-z])|(?<=[^A-Za-z]) ", "", self._print(term))
            if text and not printed.startswith("-"):
                text += "+"
            text += printed
        return text

    # -- index form ---------------------------------------------------------------------

    def _as_ordered_terms(self, expr: sp.Add, order: str | None = None) -> list[sp.Expr]:
        if is_index_expression(expr):
            return index_terms(expr)
        # the classic order: sum_k w_jk a_k + b_j, W a + b (sums and products before the
        # bias); at a time step, what the step reads before what the step before left:
        # W_x x_t + W_h h_{t-1} + b
        terms = super()._as_ordered_terms(expr, order=order)
        blocks = _block_offsets(terms)
        if blocks is not None:
            # one term per block of stacked gates: in the order of the blocks (i, f, g, o)
            return [term for _, term in sorted(zip(blocks, terms), key=lambda pair: pair[0])]
        return plus_first(sorted(terms, key=lambda term: (
            0 if term.has(sp.Sum, MatVec, Einsum) else 1, -_latest_step(term))))

    def _print_Sum(self, expr: sp.Sum) -> str:
        # -sum_i y_i log a_i rather than sum_i -log(a_i) y_i
        if expr.function.could_extract_minus_sign():
            return "-" + self._print_Sum(sp.Sum(-expr.function, *expr.limits))
        if len(expr.limits) > 1:
            # Σ_k Σ_p Σ_q, each with its range, as the textbooks write a convolution
            heads = "".join(rf"\sum_{{{self._print(i)}={self._print(low)}}}^{{{self._print(high)}}} "
                            for i, low, high in expr.limits)
            body = expr.function
            return heads + (rf"\left({self._print(body)}\right)" if isinstance(body, sp.Add)
                            else self._print(body))
        return super()._print_Sum(expr)

    # -- windows of feature maps: brackets, maxima, indicators -----------------------------

    def _print_InRange(self, expr: InRange) -> str:
        value, low, high = (self._index(arg) for arg in expr.args)
        return rf"\left[{low} \le {value} \le {high}\right]"

    def _window_offsets(self, window: WindowMax, avoid: set[sp.Symbol]) -> WindowMax:
        """The window with its offsets primed where they would read as free indices."""
        renamed = {}
        for index, _low, _high in window.limits:
            if index in avoid:
                renamed[index] = sp.Symbol(f"{index.name}'", integer=True, positive=True)
        return window.xreplace(renamed) if renamed else window

    def _print_WindowMax(self, expr: WindowMax) -> str:
        offsets = ",".join(self._print(limit[0]) for limit in expr.limits)
        body = self.parenthesize(expr.function, PRECEDENCE["Mul"], strict=True)
        return rf"\max_{{{offsets}}} {body}"

    def _print_FirstMax(self, expr: FirstMax) -> str:
        window, *at = expr.args
        window = self._window_offsets(window, set().union(*(a.free_symbols for a in at)))
        offsets = ",".join(self._print(limit[0]) for limit in window.limits)
        position = ",\\,".join(self._index(a) for a in at)
        return (rf"\mathbb{{1}}\!\left[({position}) = \operatorname{{argmax}}_{{{offsets}}} "
                rf"{self._print(window.function)}\right]")

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

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        *pieces, (default, _) = expr.args
        if len(pieces) == 1 and (pieces[0].expr, default) == (1, 0):
            # an indicator: the Iverson bracket [z > 0], as the terminal prints it
            return rf"\left[{self._print(pieces[0].cond)}\right]"
        return super()._print_Piecewise(expr)

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

    def _print_Subs(self, expr: sp.Subs) -> str:
        # F'(x) of a generic function at an expression (a GRU gate's tanh_g' at its sum)
        inner = expr.expr
        if isinstance(inner, sp.Derivative) and isinstance(inner.expr, AppliedUndef) and \
                len(expr.variables) == 1 and inner.variable_count == ((expr.variables[0], 1),):
            letter, _, layer = inner.expr.func.__name__.partition("_")
            symbol = LETTERS.get(letter, letter) + (f"_{{{layer}}}" if layer else "")
            return rf"{symbol}'\!\left({self._print(expr.point[0])}\right)"
        return super()._print_Subs(expr)

    def _print_KroneckerDelta(self, expr: sp.KroneckerDelta, exp: str | None = None) -> str:
        if LENGTH in expr.args:
            # δ_{tT} of the last step, which a reader would take for an error δ: [t = T]
            other = next(arg for arg in expr.args if arg != LENGTH)
            text = rf"\left[{self._print(other)} = T\right]"
            return text if exp is None else rf"{text}^{{{exp}}}"
        first, second = (self._print(arg) for arg in expr.args)
        separator = "" if len(first) == 1 and len(second) == 1 else ","
        text = rf"\delta_{{{first}{separator}{second}}}"
        return text if exp is None else rf"\left({text}\right)^{{{exp}}}"

    # -- products -----------------------------------------------------------------------

    def _print_scalar_Mul(self, expr: sp.Mul, factors: list[sp.Expr]) -> str:
        guards = [f for f in factors if isinstance(f, StepGuard)]
        if guards and len(factors) > len(guards):
            # [t ≤ T-1] (W_h)ᵀ δ_{t+1}: the bracket says at which steps the rest is there
            rest = sp.Mul(*(f for f in factors if not isinstance(f, StepGuard)))
            text = self._print(rest)
            if isinstance(rest, sp.Add):
                text = rf"\left({text}\right)"
            elif rest.could_extract_minus_sign():
                return "-" + self._print_scalar_Mul(-expr, sp.Mul.make_args(-expr))
            return " ".join(self._print(g) for g in guards) + " " + text
        coefficient, rest = expr.as_coeff_Mul()
        if coefficient.is_Rational and abs(coefficient.p) == 1 and coefficient.q > 1 and (
                isinstance(rest, sp.Sum) or rest.has(Fold, Windows, InRange)):
            # an average pool's 1/(kh kw) before its sum, not a fraction over the sum
            sign = "-" if coefficient < 0 else ""
            return rf"{sign}\frac{{1}}{{{coefficient.q}}} {self._factor(rest, last=True)}"
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
        if is_convolution(factor):
            return rf"\left({text}\right)"   # (δ ⋆ rot180(W)) ⊙ σ'(z), not δ ⋆ (... ⊙ ...)
        if isinstance(factor, sp.Piecewise) and text.startswith(r"\left["):
            return text
        if isinstance(factor, (sp.Add, sp.Piecewise, MatVec, MatProd)) or (
                isinstance(factor, (sp.Sum, WindowMax)) and not last):
            return rf"\left({text}\right)"
        return text

    def _print_Mul(self, expr: sp.Mul) -> str:
        factors = expr.as_ordered_factors()
        vectors = [f for f in factors if is_vector(f)]
        if len(vectors) < 2:
            return self._print_scalar_Mul(expr, factors)
        coefficient, rest = expr.as_coeff_Mul()
        if coefficient.is_Rational and abs(coefficient.p) == 1 and coefficient.q > 1 and \
                rest.has(Fold, Windows):
            sign = "-" if coefficient < 0 else ""
            return rf"{sign}\frac{{1}}{{{coefficient.q}}}\, {self._print(rest)}"
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
        tensor, axes = expr.args[0], str(expr.args[1])
        if spread_map(expr):
            # a bias per channel at every position, δ on every entry of its window: the
            # tensor itself (a parameter is one for the whole batch)
            return self._tensor_symbol(tensor, batch=self._settings["batch"]
                                       and not tensor.is_parameter)
        # an entry, in index notation: the axes are the indices
        if tensor.role == "grad":
            return self._print(sp.Indexed(sp.IndexedBase(tensor), *sp.symbols(list(axes))))
        return rf"{self._entry_symbol(tensor)}_{{{axes}}}"

    # -- sequences (docs/architecture.md, "Sequences") ------------------------------------

    def _print_SumSteps(self, expr: SumSteps) -> str:
        (body,) = expr.args
        if self._settings["batch"] and isinstance(body, Outer):
            # the batch mean of the sum over the steps: (1/B) Σ_t U_tᵀ V_t
            u, v = body.args
            return (rf"\frac{{1}}{{B}}\sum_{{t=1}}^{{T}} {self._transposed(u)}\,"
                    rf"{self._print(v)}")
        return rf"\sum_{{t=1}}^{{T}} {self.parenthesize(body, PRECEDENCE['Mul'])}"

    def _print_StepGuard(self, expr: StepGuard) -> str:
        condition = step_condition(expr, self._print, "\\le ")
        return rf"\left[{condition}\right]"

    def _print_Block(self, expr: Block) -> str:
        tensor, start, size = expr.args
        text = self.parenthesize(tensor, PRECEDENCE['Atom'], strict=True)
        if isinstance(tensor, NetTensor) and step_subscript(tensor):
            text = rf"\left({text}\right)"      # z_t's block: (z_t)_{[...]}, not z_t_{[...]}
        return rf"{text}_{{[{self._print(start + 1)}\,:\,{self._print(start + size)}]}}"

    def _print_Concat(self, expr: Concat) -> str:
        *parts, _size = expr.args
        rows = r" \\ ".join(self._print(part) for part in parts)
        return rf"\begin{{bmatrix}} {rows} \end{{bmatrix}}"

    # -- whole sequences (attention): one matrix per sample, a row per step ----------------

    def _print_MatProd(self, expr: MatProd) -> str:
        def operand(arg: sp.Expr) -> str:
            if isinstance(arg, (MatProd, Transposed)):
                return self._print(arg)
            if isinstance(arg, NetTensor) and arg.role == "grad":
                # (∇_S C) K, not ∇_S C K, which reads as the gradient of C K
                return rf"\left({self._print(arg)}\right)"
            return self.parenthesize(arg, PRECEDENCE["Mul"], strict=True)

        return rf"{operand(expr.args[0])}\,{operand(expr.args[1])}"

    def _print_Transposed(self, expr: Transposed) -> str:
        return self._transposed(expr.args[0])

    def _print_SumLast(self, expr: SumLast) -> str:
        # Σ_τ' of each row, a column beside the rows it was summed in
        return rf"\operatorname{{rowsum}}\!\left({self._print(expr.args[0])}\right)"

    def _print_Causal(self, expr: Causal) -> str:
        return r"M_{\mathrm{causal}}"

    def _print_Softmax(self, expr: sp.Function) -> str:
        return rf"\operatorname{{softmax}}\!\left({self._print(expr.args[0])}\right)"

    def _print_CausalSoftmax(self, expr: sp.Function) -> str:
        return (rf"\operatorname{{softmax}}_{{\mathrm{{causal}}}}\!\left("
                rf"{self._print(expr.args[0])}\right)")

    def _print_SumAxes(self, expr: SumAxes) -> str:
        summed = "".join(c for c in str(expr.args[1]) if c not in str(expr.args[2]))
        body = self.parenthesize(expr.args[0], PRECEDENCE["Mul"], strict=True)
        return rf"\sum_{{{summed}}} {body}"

    def _geometry(self, geometry: Geometry | None, *, kernel: bool, extra: str = "") -> str:
        notes = ([extra] if extra else []) + (geometry.notes(kernel=kernel, times=r"\times ")
                                              if geometry is not None else [])
        return "_{" + r",\,".join(notes) + "}" if notes else ""

    def _operand(self, expr: sp.Expr) -> str:
        return self.parenthesize(expr, PRECEDENCE["Mul"], strict=True)

    def _print_Windows(self, expr: Windows) -> str:
        geometry = self._geometry(windows_geometry(expr), kernel=True)
        return rf"\operatorname{{win}}{geometry}\!\left({self._print(expr.args[0])}\right)"

    def _print_WindowsMax(self, expr: WindowsMax) -> str:
        return rf"\max_{{p,q}} {self._print(expr.args[0])}"

    def _print_FirstMaxMask(self, expr: FirstMaxMask) -> str:
        return rf"\mathbb{{1}}_{{\max}}\!\left({self._print(expr.args[0])}\right)"

    def _print_Flatten(self, expr: Flatten) -> str:
        return rf"\operatorname{{vec}}\!\left({self._print(expr.args[0])}\right)"

    def _print_Unflatten(self, expr: Unflatten) -> str:
        return rf"\operatorname{{vec}}^{{-1}}\!\left({self._print(expr.args[0])}\right)"

    def _print_Fold(self, expr: Fold) -> str:
        found = folded(expr)
        if found.kind == "full":
            # the transposed convolution: δ against the flipped kernel, summed over the
            # output channels; stride and padding say how δ is dilated and cropped
            geometry = self._geometry(found.geometry, kernel=False, extra=r"\mathrm{full}")
            return (rf"{self._operand(found.left)} \star{geometry} "
                    rf"\operatorname{{rot180}}\!\left({self._print(found.right)}\right)")
        head = rf"\operatorname{{win}}{self._geometry(found.geometry, kernel=True)}^{{\top}}"
        if found.kind == "route":
            mask = rf"\mathbb{{1}}_{{\max}}\!\left({self._print(found.right)}\right)"
            inner = rf"{self._tensor_symbol(found.left)} \odot {mask}"
        elif found.kind == "spread":
            inner = self._tensor_symbol(found.left)
        else:
            inner = self._print(found.left)
        return rf"{head}\!\left({inner}\right)"

    def _print_Einsum(self, expr: Einsum) -> str:
        found = contraction(expr)
        if found is not None and found.kind in ("conv", "correlate"):
            geometry = self._geometry(found.geometry, kernel=False)
            left, right = found.operands()
            return rf"{self._operand(left)} \star{geometry} {self._operand(right)}"
        if found is not None and found.kind == "sum" and summed_axes(found):
            return rf"\sum_{{{summed_axes(found)}}} {self._operand(found.left)}"
        subscripts, *operands = expr.args
        spelled = self._print(subscripts).replace("->", r" \to ")
        args = ", ".join(self._print(operand) for operand in operands)
        return rf"\operatorname{{einsum}}_{{{spelled}}}\!\left({args}\right)"


def plus_first(terms: list[sp.Expr]) -> list[sp.Expr]:
    """The terms of a sum with the first one that has no minus sign in front, when the first
    has one: h_{t-1} - g_t, not -g_t + h_{t-1}; the order otherwise kept."""
    if not terms or not terms[0].could_extract_minus_sign():
        return terms
    first = next((term for term in terms if not term.could_extract_minus_sign()), None)
    if first is None:
        return terms
    return [first, *(term for term in terms if term is not first)]


def _latest_step(expr: sp.Expr) -> int:
    """The latest time step a term of a tensor form reads, relative to t (0 for none)."""
    steps = [t.step for t in expr.atoms(NetTensor) if isinstance(t.step, int)]
    return max(steps, default=0)


def is_convolution(expr: sp.Expr) -> bool:
    """Whether a tensor form prints as a ⋆ b (a factor of a product needs brackets)."""
    if isinstance(expr, Fold):
        return folded(expr).kind == "full"
    if isinstance(expr, Einsum):
        found = contraction(expr)
        return found is not None and found.kind in ("conv", "correlate")
    return False


def _factor_rank(factor: sp.Expr) -> int:
    """Order of factors in a product, as written on paper: w^{l+1}_{kj} delta^{l+1}_k,
    a^{l-1}_k delta^l_j, y_j log a_j, (a_j - y_j) sigma'(z_j)."""
    if isinstance(factor, InRange):
        return -1       # the bracket first: [1 <= r - u + 2 <= 3] w_{...} delta_{...}
    if isinstance(factor, sp.Indexed):
        # a weight first: w_jk a_k, and a kernel's w_jkpq before the window's entry
        return 0 if len(factor.indices) in (2, 4) else 1
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


def chain(expr: sp.Expr, *, batch: bool = False, batch_cost: str = r"\bar{C}") -> list[str]:
    """A product of index-form factors and nested sums, printed piece by piece in reading
    order: ``[\\left[z > 0\\right], \\sum_{v=1}^{W_{2}}, \\left[1 \\le ...\\right], ...]``;
    a document breaks a line that would run off the page between pieces (a sum's body
    continues on the next line, as textbooks write it)."""
    p = printer(batch=batch, batch_cost=batch_cost)

    def pieces(e: sp.Expr) -> list[str]:
        if isinstance(e, sp.Sum) and not isinstance(e.function, sp.Add):
            heads = [rf"\sum_{{{p._print(i)}={p._print(low)}}}^{{{p._print(high)}}}"
                     for i, low, high in e.limits]
            return heads + pieces(e.function)
        if isinstance(e, sp.Mul) and not any(is_vector(f) for f in e.args):
            coefficient, rest = e.as_coeff_Mul()
            factors = sorted(sp.Mul.make_args(rest),
                             key=lambda f: (isinstance(f, sp.Sum), _factor_rank(f)))
            out = [p._factor(f) for f in factors[:-1]] + pieces(factors[-1])
            if coefficient == -1:
                return ["-" + out[0], *out[1:]]
            if coefficient != 1:
                head = (rf"\frac{{1}}{{{coefficient.q}}}" if abs(coefficient.p) == 1
                        else p._print(abs(coefficient)))
                return [("-" if coefficient < 0 else "") + head, *out]
            return out
        return [p._print(e)]

    return pieces(expr)


def repr_latex(formulas: tuple) -> str:
    """Jupyter's ``_repr_latex_`` of formulas: index form, tensor form and BP tag."""
    lines = []
    for formula in formulas:
        tag = rf"&& \text{{({formula.equation})}}" if formula.equation else ""
        target = formula.target
        if formula.indices and formula.indices[0] in _TIME and not is_whole(formula.vector):
            target = target.at_step(0)       # a formula at a step t: δ_t, not the whole Δ
        lines.append(f"{latex(formula.lhs)} &= {latex(formula.rhs)} "
                     rf"&\qquad {latex(target)} &= {latex(formula.vector)} {tag}")
    return r"$$\begin{aligned}" + r" \\ ".join(lines) + r"\end{aligned}$$"

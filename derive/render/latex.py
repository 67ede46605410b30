"""Renderer: a Derivation as lecture notes in LaTeX (or Markdown); the command is in cli/latex.py.

Takes a :class:`~derive.derivation.Derivation` and gives the text of a complete article
(``render_latex``), an equations-only fragment to ``\\input`` (``fragment=True``) or Markdown
with ``$$`` math (``render_markdown``); ``compile_pdf`` runs TeX on it. The article has the
network as a TikZ diagram, a notation table, the forward pass, the activation derivatives, the
step-by-step derivation as the engine recorded it, the matrix and batch forms, a boxed summary
and a worked numeric example (:mod:`derive.render.worked_example`).

The backward sections follow the graph: for a plain chain of dense layers they are the classic
BP1 (output layer), BP2 (a hidden layer) and BP3/BP4 (biases and weights); for any other graph
there is one subsection per layer, from the output back, with the derivation of its error, the
adjoints of its intermediate quantities and the gradients of its parameters.

A sequence network (docs/architecture.md, "Sequences") is drawn unrolled in time (TikZ; lines of
text in Markdown), and its backward section is backpropagation through time at a generic step t,
as the derivation recorded it, with the words on the brackets [1 ≤ t+1 ≤ T] and [t = T] and on
the sums over t of shared parameters. A formula of a recurrence that reads its own quantity at
the step after (δ_t of a simple recurrent layer, an LSTM's cell error, a GRU's state error) is
linear in it; its coefficient, read off by differentiating (``carry_of``), is the Jacobian J_t of
one step back: diag(σ'(z_t)) W_hᵀ or diag(gate_{t+1}). The section on vanishing and exploding
gradients prints these and what their products are bounded by; the worked example runs forward
t = 1..T and backward t = T..1 (:mod:`derive.render.worked_example`) and writes each gradient of a
shared parameter as its sum over the steps.

A network with attention (docs/architecture.md, "Sequences"; every step reads every step) is
drawn as a transformer block, bottom to top, with its first attention layer unrolled over the
steps beside it (TikZ; lines of text in Markdown). The derivation of an attention layer is
followed by what it says: the softmax Jacobian read off its differentiation step, the error of
the scores factored (α ⊙ (∇_α C − rowsum(α ⊙ ∇_α C))), the 1/√d of queries and keys, what
values and keys collect, and the causal mask (or what it would change); then the layer in
matrix form, one row per step (Q, K, V, S, α: the tensor form of whole sequences). An error
read through a residual connection is said to sum the errors of both paths. Its worked
example runs a small copy (T = 3, widths at most 3), one step spelled out forward and one
backward, and shows attention's T × T matrices whole.

Python builds a render context of already-printed strings (:mod:`derive.render.latex_printer` prints
every formula, :mod:`derive.render.latex_text` holds the words in English and Chinese); the jinja
templates ``codegen_templates/derivation.tex.j2``, ``equations.tex.j2`` and
``derivation.md.j2`` only place them. Equations carry stable labels
``eq:<spec name>:<name>`` with the names of the generated code: ``z1``, ``a1``, ``mu3``,
``C``, ``R``, ``delta2``, ``db2``, ``dW2``, ``dgamma3``, ``dxhat3``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sympy as sp

from derive import __version__
from derive.derivation.imageform import is_image_form
from derive.derivation.indexcalc import collapse
from derive.derivation.reverse import (
    MULTIPLIED_OUT,
    MULTIPLIED_OUT_LAST,
    ActivationDerivative,
    C,
    Derivation,
    Formula,
    R,
    Step,
    activation_derivative,
    adjoint_tensor,
)
from derive.derivation.stepform import Block, Causal
from derive.derivation.tensorform import ONE, equation_tensor, to_vector
from derive.errors import DeriveError
from derive.files import MARKER
from derive.graph.model import Model, Node
from derive.progress import Report
from derive.quantities import (
    INDEX_POOL,
    LENGTH,
    NetTensor,
    entry,
    family_indices,
    i,
    index_family,
    j,
    k,
    tensor_of,
)
from derive.registry.functions import Z
from derive.registry.ops import Equation
from derive.registry.windows import FirstMax, InRange, WindowMax
from derive.render.latex_printer import (
    DeriveLatexPrinter,
    batch_gradient,
    chain,
    equation,
    is_vector,
    is_whole,
    latex,
    terms,
    visual_length,
)
from derive.render.latex_text import ASSUMPTIONS, LANGUAGES, QUANTITY_NAMES, TEXT, why
from derive.render.pretty import pretty, sub
from derive.render.stability import rewrite
from derive.render.templates import render
from derive.render.worked_example import (
    WorkedExample,
    recurrent_equations,
    shifted_step,
    worked_example,
)
from derive.spec.load import EXAMPLE_FIELDS, parameter_key

Echo = Callable[[str], None]

#: Layers wider than this are drawn and tabulated in part.
MAX_NEURONS = 8
#: How many neurons of a wider layer the tables show.
SHOWN_NEURONS = 5
#: Debian packages that provide what ``--pdf`` runs.
TEX_PACKAGES = {
    "en": ("texlive-latex-base", "texlive-latex-extra", "texlive-pictures", "latexmk"),
    "zh": ("texlive-latex-base", "texlive-latex-extra", "texlive-pictures", "texlive-xetex",
           "texlive-lang-chinese", "fonts-noto-cjk", "latexmk"),
}
ENGINES = {"en": "pdflatex", "zh": "xelatex"}
#: Overfull boxes up to this width (pt) are tolerated by :func:`log_problems`.
OVERFULL_LIMIT_PT = 10.0
#: Displayed math longer than this (visual_length) is shown in a shorter form or broken.
LINE_BUDGET = 56
#: Roles whose values the example gives (printed short) rather than computes.
GIVEN_ROLES = frozenset({"w", "b", "gamma", "beta", "y", "mask", "wx", "wh", "bx", "bh"})
#: Of a tensor with more channels (or channel pairs, for a kernel), the example shows this
#: many maps.
MAX_MAPS = 4
#: Tables with more rows than this break across pages (longtable).
LONG_TABLE_ROWS = 26
#: A step of a recurrence spelled out with numbers: at most this many entries, this long.
SPELLED_TERMS = 10
SPELLED_BUDGET = 70


# --- printing helpers ----------------------------------------------------------------------


def _number(value: float) -> str:
    """A computed value, rounded to 4 decimals (never "-0.0000"); one below 0.001, which 4
    decimals would leave with one digit or none, to 3 significant digits in scientific
    notation (-4.67 \\times 10^{-4}; 3.81 \\times 10^{-6}: a gradient that vanished through
    many steps is small, not 0), so that a product worked by hand comes out as printed. Below
    1e-10 a value is taken for 0: the rounding left by terms that cancel (-1.4e-17), not a
    quantity of the network."""
    if 1e-10 <= abs(value) < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return rf"{mantissa} \times 10^{{{int(exponent)}}}"
    return _fixed(value)


def _fixed(value: float) -> str:
    """A computed value in a matrix: 4 decimals always (a matrix's columns stay narrow)."""
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text


def _short(value: float) -> str:
    """A given value as short as it is exact to 4 decimals: 0.1, -0.4, 1."""
    text = _fixed(value).rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _but_loss_parts(formulas: Iterable[Formula]) -> list[Formula]:
    """``formulas`` but a recurrent output's loss part (Formula.loss_part), which outside its
    own block would stand under the name of the whole ∂C/∂h_t (the derivation shows it,
    labelled)."""
    return [formula for formula in formulas if not formula.loss_part]


def _is_chinese(character: str) -> bool:
    """Whether ``character`` (one, or "" for none) is Chinese: a CJK ideograph, CJK
    punctuation (。、) or a full-width form (（）：)."""
    return any(low <= character <= high for low, high in (
        ("\u4e00", "\u9fff"), ("\u3000", "\u303f"), ("\uff00", "\uffef")))


def _is_given(tensor: NetTensor) -> bool:
    return tensor.role in GIVEN_ROLES or (tensor.role == "a" and tensor.node == 0)


class _ValuePrinter(DeriveLatexPrinter):
    """Prints an expression with every quantity entry replaced by its value."""

    _default_settings: ClassVar[dict] = {**DeriveLatexPrinter._default_settings,
                                         "lookup": None, "mul_symbol": "dot"}

    #: the entry that is a function's whole argument, printed without parentheses
    _argument: sp.Expr | None = None

    def _print(self, expr: sp.Expr, **kwargs: Any) -> str:
        if isinstance(expr, sp.Function) and len(expr.args) == 1 and isinstance(
                expr.args[0], (sp.Indexed, NetTensor)):
            # tanh(-0.2), not tanh((-0.2)): the function's own brackets hold the number
            saved, self._argument = self._argument, expr.args[0]
            try:
                return super()._print(expr, **kwargs)
            finally:
                self._argument = saved
        return super()._print(expr, **kwargs)

    def _value(self, expr: sp.Expr, tensor: NetTensor) -> str:
        value = self._settings["lookup"](expr)
        text = _short(value) if _is_given(tensor) else _number(value)
        # a negative number or one in scientific notation is bracketed in a product or sum:
        # 0.5 · (-0.2), 0.5 · (3.8 × 10^{-6}); 0 never is
        bracket = (text.startswith("-") or r"\times" in text) and expr is not self._argument
        return f"({text})" if bracket else text

    def _print_Pow(self, expr: sp.Pow) -> str:
        if isinstance(expr.base, (sp.Indexed, NetTensor)) and expr.exp.is_Integer and (
                expr.exp > 0):
            return f"{self._print(expr.base)}^{{{self._print(expr.exp)}}}"
        return super()._print_Pow(expr)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        return self._value(expr, tensor_of(expr))

    def _print_NetTensor(self, expr: NetTensor) -> str:
        return self._value(expr, expr)


class _PlusFirst(DeriveLatexPrinter):
    """Prints the terms of a sum with a plus sign before those with a minus sign."""

    def _as_ordered_terms(self, expr: sp.Add, order: str | None = None) -> list[sp.Expr]:
        found = super()._as_ordered_terms(expr, order=order)
        return sorted(found, key=lambda term: term.could_extract_minus_sign())


class _PlusFirstValues(_PlusFirst, _ValuePrinter):
    """:class:`_ValuePrinter` with the terms of a sum ordered as :class:`_PlusFirst`'s."""


def _hide_derivatives(expr: sp.Expr) -> sp.Expr:
    """∂C/∂q[i] written as an entry of the adjoint tensor ∂C/∂q: an entry the value printer
    looks up (and that no rebuilding of the expression can differentiate)."""
    def adjoint(derivative: sp.Derivative) -> sp.Expr:
        (variable, _count), = derivative.variable_count
        q = tensor_of(variable)
        indices = tuple(variable.indices) if isinstance(variable, sp.Indexed) else ()
        return entry(q.adjoint(), indices)

    return expr.replace(lambda e: isinstance(e, sp.Derivative) and e.expr == C, adjoint)


def _expand_sums(expr: sp.Expr, flat: bool = False) -> sp.Expr:
    """Every sum with numeric limits written out term by term, unevaluated: the terms stay
    as the sum gives them (no term combined with another, no Kronecker delta applied twice).
    With ``flat``, the terms of a sum written out join the terms around it (a + b + c rather
    than (a + b) + c).
    """
    if isinstance(expr, sp.Sum):
        body = _expand_sums(expr.function, flat)
        # one sum of every term, Σ_k Σ_p Σ_q as well (a convolution): k, then p, then q
        ranges = [[(index, sp.Integer(n)) for n in range(int(low), int(high) + 1)]
                  for index, low, high in expr.limits]
        return sp.Add(*(body.xreplace(dict(at)) for at in itertools.product(*ranges)),
                      evaluate=False)
    if not expr.args or not expr.has(sp.Sum):
        return expr
    args = [_expand_sums(arg, flat) for arg in expr.args]
    if isinstance(expr, sp.Add) and flat:
        terms = [term for arg in args for term in (arg.args if isinstance(arg, sp.Add)
                                                   else (arg,))]
        return sp.Add(*terms, evaluate=False)
    if isinstance(expr, (sp.Add, sp.Mul, sp.Pow)):
        return expr.func(*args, evaluate=False)
    return expr.func(*args)


def _spelled(expr: sp.Expr, lhs: sp.Expr, lookup: Callable[[sp.Expr], float], sizes: dict,
             index: dict, result: float, max_terms: int = 8,
             inside: Callable[[sp.Indexed], bool] | None = None,
             budget: int = LINE_BUDGET, flat: bool = False, ordered: bool = False,
             sums_kept: bool = False) -> str | None:
    """``lhs = expr`` at concrete indices, then with the numbers put in, then the result
    (lines of an ``align``); None when it would be too long to be worth spelling out.
    ``sums_kept``: a sum too long to write out is kept as a sum, with the result (a step of
    a recurrence, δ_19 from the 16 entries of δ_20: the formula at that step, its value)."""
    free = {symbol: value for symbol, value in index.items() if lhs.has(symbol)}
    concrete = _filled(_hide_derivatives(expr), {**sizes, **free})
    # every term of a sum reads its own entries: a sum longer than max_terms is too long,
    # known before writing out its terms (784 of them for an MNIST input)
    if any(int(high) - int(low) + 1 > max_terms
           for s in concrete.atoms(sp.Sum) for _index, low, high in s.limits
           if low.is_Integer and high.is_Integer):
        if not sums_kept:
            return None
        text = f"{latex(lhs.xreplace(free))} &= {latex(concrete)} = {_number(result)}"
        return text if visual_length(text) <= budget + 20 else None
    concrete = _expand_sums(concrete, flat)
    if inside is not None and any(not inside(e) for e in concrete.atoms(sp.Indexed)):
        # an entry in a feature map's padding is 0: its term drops out
        concrete = concrete.xreplace({e: sp.Integer(0) for e in concrete.atoms(sp.Indexed)
                                      if not inside(e)})
    scalars = {t for t in concrete.atoms(NetTensor) if t.rank == 0}
    if len(concrete.atoms(sp.Indexed)) + len(scalars) > max_terms or concrete.has(sp.Sum):
        return None
    if any(not index.is_Integer for entry in concrete.atoms(sp.Indexed)
           for index in entry.indices):
        return None        # an index the example does not fix (a third axis of a parameter)
    left = latex(lhs.xreplace(free))
    # ``ordered``: the terms of a sum with a plus sign first (α (g − Σ α g))
    symbolic = (_PlusFirst() if ordered else DeriveLatexPrinter()).doprint(concrete)
    if isinstance(concrete, (sp.Indexed, NetTensor)):
        return f"{left} &= {symbolic} = {_number(result)}"
    values = (_PlusFirstValues if ordered else _ValuePrinter)({"lookup": lookup})
    numbers = values.doprint(concrete)
    if ordered and visual_length(f"{numbers} = {_number(result)}") > budget and \
            isinstance(concrete, sp.Mul):
        numbers = _two_lines(concrete, values, budget) or numbers
    if max(visual_length(line) for line in numbers.split("\\\\")) > budget or \
            visual_length(symbolic) > budget:
        return None
    return f"{left} &= {symbolic} \\\\\n  &= {numbers} = {_number(result)}"


def _two_lines(product: sp.Mul, values: DeriveLatexPrinter, budget: int) -> str | None:
    """The numbers of a factor times a sum, f (g − m), on two lines, the sum's first term on
    the first and the others on the second; None for another product."""
    sums = [f for f in product.args if isinstance(f, sp.Add)]
    if len(sums) != 1:
        return None
    front = sp.Mul(*(f for f in product.args if f is not sums[0]))
    first, *rest = values._as_ordered_terms(sums[0])
    tail = ""
    for term in rest:
        negative = term.could_extract_minus_sign()
        text = values._print(-term if negative else term)
        if isinstance(-term if negative else term, sp.Add):
            text = rf"\left({text}\right)"
        tail += f" - {text}" if negative else f" + {text}"
    return (rf"{values._print(front)} \cdot \Bigl({values._print(first)} \\" + "\n"
            rf"  &\qquad {tail.strip()}\Bigr)")


def _filled(expr: sp.Expr, sizes: dict) -> sp.Expr:
    """``expr`` with the sizes filled in; a root of a size stays a root of its number
    (attention's 1/√d with d = 8 reads 1/√8, not √2/4)."""
    roots = {}
    for power in expr.atoms(sp.Pow):
        if power.base in sizes and abs(power.exp) == sp.S.Half:
            # a symbol that prints as the root (SymPy would write 1/√8 as √2/4)
            root = sp.Symbol(rf"\sqrt{{{sizes[power.base]}}}", positive=True)
            roots[power] = root if power.exp > 0 else 1 / root
    return expr.xreplace(roots).xreplace(sizes) if roots else expr.xreplace(sizes)


def _side_by_side(parts: list[str], columns: int) -> list[str]:
    """Matrices of ``columns`` columns each, as many to a line as fit the page (about 11
    columns of 4-decimal numbers)."""
    per_line = max(1, 11 // (columns + 2))
    return [r",\quad ".join(parts[n:n + per_line]) for n in range(0, len(parts), per_line)]


def _slice_symbol(tensor: NetTensor) -> str:
    """The symbol of one entry of ``tensor`` (a^{1}, w^{1}), whose slice a^{1}_{j··} the
    example shows."""
    return DeriveLatexPrinter()._entry_symbol(tensor)


def _dims(shape: Sequence[int]) -> str:
    """A shape as math: 64, or 1 \times 8 \times 8 for feature maps."""
    return r" \times ".join(map(str, shape))


def _pair(value: Sequence[object]) -> str:
    a, b = value
    return str(a) if a == b else f"({a}, {b})"


def _window_option(key: str, value: Sequence[object]) -> str:
    """A window's option as the notation writes it: $3 \times 3$, $S = 2$, $P = 1$."""
    if key == "kernel":
        return f"${_dims(value)}$"
    return f"${ {'stride': 'S', 'padding': 'P'}.get(key, key) } = {_pair(value)}$"


def _escape(text: str) -> str:
    """Plain text (a step's justification without a translation) made safe for LaTeX."""
    table = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "_": r"\_", "^": r"\^{}",
             "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "~": r"\~{}"}
    return "".join(table.get(char, char) for char in text)


def code_name(formula: Formula) -> str:
    """The generated code's name for a formula's quantity: dA2, delta2, dW2, db2, dgamma3,
    dxhat3, dmu3."""
    of = formula.of
    if formula.kind == "delta":
        return f"delta{of.node}"
    if formula.kind == "gradient":
        return f"d{parameter_key(of.role, of.node)}"
    if formula.kind == "loss gradient":
        return f"dA{of.node}"
    return f"d{of.role}{of.node}"


def broken(expr: sp.Expr, *, lead: int = 0, budget: int = LINE_BUDGET, batch: bool = False,
           batch_cost: str = r"\bar{C}", top: bool = True) -> str:
    """``expr`` printed on one line, or, when it would be longer than ``budget`` (after
    ``lead`` characters already on the line), its terms broken over the lines of an
    ``aligned`` block."""
    one_line = latex(expr, batch=batch, batch_cost=batch_cost)
    if lead + visual_length(one_line) <= budget:
        return one_line
    pieces = terms(expr, batch=batch, batch_cost=batch_cost)
    if len(pieces) < 2:
        # a feature map's product breaks between its factors below, unless a sum in it is
        # too long for a line of its own
        product = _broken_product(expr, lead, budget, batch, batch_cost, top,
                                  any_sum=not is_image_form(expr, ()))
        if product is not None:
            return product
    if len(pieces) < 2 and is_image_form(expr, ()):
        # one long product of a feature map's formula: broken between its factors and sums
        return _broken_chain(chain(expr, batch=batch, batch_cost=batch_cost), lead, budget,
                             top)
    if len(pieces) < 2:
        return one_line
    return _broken_lines(pieces, lead, budget, top)


def _broken_product(expr: sp.Expr, lead: int, budget: int, batch: bool, batch_cost: str,
                    top: bool, any_sum: bool = True) -> str | None:
    """A product with one long sum among its factors (the error of a recurrent layer that
    several layers read: σ'(z) times the sum of what each sends back), the other factors
    first and the sum's terms broken over lines inside big brackets; None for any other
    expression."""
    if not isinstance(expr, sp.Mul):
        return None
    sums = sorted((f for f in expr.args if isinstance(f, sp.Add)),
                  key=lambda f: -visual_length(latex(f, batch=batch, batch_cost=batch_cost)))
    if not sums or not any_sum and lead + visual_length(
            latex(sums[0], batch=batch, batch_cost=batch_cost)) <= budget:
        return None                     # no sum too long for a line of its own
    rest = sp.Mul(*(f for f in expr.args if f is not sums[0]))
    if rest.is_Number:
        return None
    front = latex(rest, batch=batch, batch_cost=batch_cost)
    if isinstance(rest, sp.Add):
        front = rf"\left({front}\right)"
    joint = r" \odot " if is_vector(rest) and is_vector(sums[0]) else r"\, "
    head = f"{front}{joint}"
    pieces = terms(sums[0], batch=batch, batch_cost=batch_cost)
    text = _broken_lines(pieces, lead + visual_length(head) + 2, budget, top, inner=True)
    return rf"{head}\Bigl({text}\Bigr)" if not text.startswith(r"\begin") else (
        text.replace(" & ", rf" & {head}\Bigl(", 1).replace(r" \end{aligned}",
                                                               r"\Bigr) \end{aligned}"))


def _broken_lines(pieces: list[tuple[str, str]], lead: int, budget: int, top: bool,
                  inner: bool = False) -> str:
    """Signed terms packed into the lines of an ``aligned`` block (or one line)."""
    lines: list[str] = []
    current = ""
    for sign, text in pieces:
        piece = (f"-{text}" if sign == "-" else text) if not lines and not current else (
            f"{{}}{sign} {text}")
        limit = budget - (lead if not lines else 8)
        if current and visual_length(current) + visual_length(piece) > limit:
            lines.append(current)
            current = piece
        else:
            current = f"{current} {piece}".strip() if current else piece
    lines.append(current)
    if inner and len(lines) == 1:
        return lines[0]
    head = r"\begin{aligned}[t]" if top else r"\begin{aligned}"
    return head + " & " + r" \\ & \quad ".join(lines) + r" \end{aligned}"


def _broken_chain(pieces: list[str], lead: int, budget: int, top: bool) -> str:
    """Pieces of a product (:func:`~derive.render.latex_printer.chain`) packed into lines."""
    lines = _packed(pieces, lead, budget)
    if len(lines) == 1:
        return lines[0]
    head = r"\begin{aligned}[t]" if top else r"\begin{aligned}"
    return head + " & " + r" \\ & \quad ".join(lines) + r" \end{aligned}"


def _packed(pieces: list[str], lead: int, budget: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for piece in pieces:
        limit = budget - lead - (0 if not lines else 4)   # every line sits after the lead
        if current and visual_length(current) + visual_length(piece) > limit:
            lines.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    lines.append(current)
    return lines


def _ordered_terms(expr: sp.Expr) -> list[sp.Expr]:
    """The terms of a sum as the printer orders them, those with a plus sign first."""
    found = DeriveLatexPrinter()._as_ordered_terms(expr) if isinstance(expr, sp.Add) else [expr]
    return sorted(found, key=lambda term: term.could_extract_minus_sign())


def _common_factor(expr: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(f, r) with ``expr`` = f r, f the factors all the terms of the sum ``expr`` share (at
    the top: a sum keeps the indices it binds); None when they share none."""
    if not isinstance(expr, sp.Add):
        return None
    factors = [set(sp.Mul.make_args(term.as_coeff_Mul()[1])) for term in expr.args]
    common = set.intersection(*factors)
    if not common:
        return None
    front = sp.Mul(*sorted(common, key=sp.default_sort_key))
    return front, sp.Add(*(term / front for term in expr.args))


def _factored(expr: sp.Expr) -> str:
    """``expr`` printed with the factors common to all its terms in front: α_{tτ}(g_{tτ} −
    Σ_τ' α_{tτ'} g_{tτ'}), the positive terms first; as it is when they share none. (Only
    factors of the terms at the top, never out of a sum: the indices a sum binds stay in
    it.)"""
    found = _common_factor(expr)
    if found is None:
        return latex(expr)
    front, rest = found
    text = ""
    for term in _ordered_terms(rest):
        if term.could_extract_minus_sign():
            text += f" - {latex(-term)}"
        else:
            text += f" + {latex(term)}" if text else latex(term)
    return rf"{latex(front)} \left({text}\right)"


@dataclass(frozen=True)
class _Carry:
    """How a formula of a recurrence reads its own quantity at the step after: the
    derivative of the formula with respect to that entry (it is linear in it: the
    coefficient), in index form, (J_t)_{jk}; and its tensor form, J_t = diag(d) W^T (through
    a weight matrix W, a simple recurrent layer) or diag(d) (through a gate, an LSTM's cell
    state or a GRU's state). ``gate`` is the gate's entry at step t + 1 in the latter."""

    formula: Formula
    node: int
    derivative: sp.Expr
    diagonal: sp.Expr | None         # tensor form of d at step t, None when d = 1
    weight: NetTensor | None
    gate: sp.Indexed | None
    column: sp.Symbol               # the index k of the step after's entry


def carry_of(formula: Formula, widths: dict) -> _Carry | None:
    """How ``formula`` (δ^l_{tj}, or ∂C/∂c^l_{tj}) reads its own quantity at step t + 1; None
    when it does not, or not in one of the two forms above."""
    if not _is_timed(formula) or len(formula.indices) != 2:
        return None
    time, row = formula.indices
    hidden = _hide_derivatives(formula.rhs)
    own = formula.target
    if not any(tensor_of(e) == own and sp.expand(e.indices[0] - time) == 1
               for e in hidden.atoms(sp.Indexed)):
        return None
    used = set(formula.indices) | {limit[0] for total in hidden.atoms(sp.Sum)
                                    for limit in total.limits}
    (column,) = family_indices(("channel",), used)
    derivative = collapse(sp.diff(hidden, entry(own, (time + 1, column))))
    if k not in derivative.free_symbols and k != row:
        derivative, column = derivative.xreplace({column: k}), k
    factors = sp.Mul.make_args(derivative)
    guards = [f for f in factors if isinstance(f, InRange) and f.args[0].has(time)]
    deltas = [f for f in factors if isinstance(f, sp.KroneckerDelta)
              and set(f.args) == {row, column}]
    weights = [f for f in factors if isinstance(f, sp.Indexed) and tuple(f.indices) == (
        column, row) and tensor_of(f).is_parameter]
    rest = [f for f in factors if f not in guards + deltas + weights]
    if any(f.has(column) for f in rest) or len(deltas) + len(weights) != 1:
        return None
    diagonal_entry = sp.Mul(*rest)
    diagonal = None if diagonal_entry == 1 else to_vector(
        diagonal_entry, formula.indices, formula.ranges, widths)
    gate = None
    if deltas:
        gates = [f for f in rest if isinstance(f, sp.Indexed)
                 and sp.expand(f.indices[0] - time) == 1]
        if len(gates) != 1 or len(rest) != 1:
            return None
        gate = gates[0]
    return _Carry(formula, formula.node, derivative, diagonal,
                  tensor_of(weights[0]) if weights else None, gate, column)


# --- the render context --------------------------------------------------------------------


@dataclass
class _Context:
    derivation: Derivation
    lang: str
    markdown: bool
    progress: Report | None = None

    def __post_init__(self) -> None:
        self.model: Model = self.derivation.model
        self.spec = self.model.spec
        self.t = TEXT[self.lang]
        self.chain = self.model.is_chain
        self.sizes = {symbol: sp.Integer(n) for symbol, n in self.model.widths.items()}
        # the widths a formula shows filled in; the length T stays a letter, as the steps
        # t = 1..T and the brackets [t ≤ T - 1] read it
        self.filled = {symbol: n for symbol, n in self.sizes.items() if symbol != LENGTH}
        self.penalized = self.model.penalty != 0
        self.batch_cost = "J" if self.penalized else r"\bar{C}"
        self.images = self.spec.image is not None      # a convolutional network
        self.sequence = self.spec.sequence              # a network with time steps
        # the feature width of every quantity (stacked gates are read in blocks of it)
        formulas = self.derivation.formulas
        self.widths = formulas[0].widths if formulas else {}
        self.said: set[str] = set()                     # explanations given once
        # attention layers (every step reads every step) and recurrent ones (a step reads
        # the step before)
        self.attention = [node for node in self.model.nodes if node.reads_whole_sequences]
        self.causal = [node for node in self.attention if dict(node.options).get("causal")]
        self.recurrent = self.sequence and any(state_tensors(node) for node in self.model.nodes)

    # -- small pieces --

    def formulas(self, what: str) -> Iterator[Formula]:
        """The derivation's formulas, telling ``progress`` of each (a deep network has
        thousands)."""
        total = len(self.derivation.formulas)
        for done, formula in enumerate(self.derivation.formulas):
            if self.progress is not None:
                self.progress(what, done, total)
            yield formula

    def text(self, key: str, **fields: object) -> str:
        return self.t[key].format(**fields)

    def name(self) -> str:
        return f"`{self.spec.name}`" if self.markdown else rf"\texttt{{{_escape(self.spec.name)}}}"

    def code(self, text: str) -> str:
        return f"`{text}`" if self.markdown else rf"\texttt{{{_escape(text)}}}"

    def label(self, what: str) -> str:
        return f"eq:{self.spec.name}:{what}"

    def inline(self, expr: sp.Expr, *, batch: bool = False) -> str:
        return f"${latex(expr, batch=batch, batch_cost=self.batch_cost)}$"

    def broken(self, expr: sp.Expr, *, lead: int = 0, batch: bool = False,
               budget: int = LINE_BUDGET) -> str:
        return broken(expr, lead=lead, budget=budget, batch=batch, batch_cost=self.batch_cost,
                      top=not self.markdown)

    def display(self, lhs: sp.Expr | str, rhs: sp.Expr, *, batch: bool = False) -> str:
        left = lhs if isinstance(lhs, str) else latex(lhs, batch=batch,
                                                      batch_cost=self.batch_cost)
        lead = visual_length(left) + 2
        if self.images and not batch and is_image_form(rhs, ()) and not isinstance(rhs, sp.Add):
            pieces = chain(rhs, batch=batch, batch_cost=self.batch_cost)
            if lead + max(visual_length(p) for p in pieces) > LINE_BUDGET - 4:
                # a factor too wide to sit after the left side (a window's indicator): the
                # left side on a line of its own, the factors below it
                lines = _packed(pieces, 4, LINE_BUDGET)
                head = r"\begin{aligned}[t]" if not self.markdown else r"\begin{aligned}"
                return (f"{head} & {left} = \\\\ & \\qquad "
                        + r" \\ & \qquad ".join(lines) + r" \end{aligned}")
        return f"{left} = {self.broken(rhs, lead=lead, batch=batch)}"

    def step(self, step: Step) -> dict[str, str]:
        words = why(step.why, self.lang)
        if words is None:  # a justification without a translation: the engine's own words
            words = step.why if self.markdown else _escape(step.why)
        if step.source is not None:
            text = equation(step.source.lhs, step.source.rhs)
            # a long equation cannot break inside a line of prose: it gets a line of its own
            long = visual_length(text) > LINE_BUDGET // 2 or (
                self.images and step.source.rhs.has(WindowMax, InRange, FirstMax))
            after = words.partition("{source}")[2][:1]
            if long and after in ".。:：":
                # the sentence's full stop inside the display, not alone on the next line
                words = words.replace("{source}" + after, "{source}")
                text = rf"{text} \,{'.' if after in '.。' else ':'}"
            source = (f"$${text}$$" if self.markdown else f"\\[ {text} \\]") if long \
                else f"${text}$"
            words = words.replace("{source}", source) if "{source}" in words else (
                f"{words} ({source})")
        words += self.image_words(step) + self.sequence_words(step)
        return {"rule": self.t.get(f"rule_{step.rule}", step.rule), "why": words,
                "math": self.display(step.target, step.expr)}

    def image_words(self, step: Step) -> str:
        """What a step on feature maps does beyond its rule, said the first time it happens:
        the bracket a shifted Kronecker delta leaves, the indicator of a window's maximum."""
        if not self.images:
            return ""
        said = ""
        for key, found in (("bracket_words", step.rule == "Kronecker delta"
                            and step.expr.has(InRange)),
                           ("argmax_words", step.rule == "differentiate"
                            and step.expr.has(FirstMax))):
            if found and key not in self.said:
                self.said.add(key)
                said += " " + self.text(key)
        return said

    def sequence_words(self, step: Step) -> str:
        """What a step through time does beyond its rule, said the first time it happens:
        the bracket [1 ≤ t+1 ≤ T] of the error fed back from the step after, the bracket
        [t = T] of a layer that returns its last state, the sum over the steps of a shared
        parameter's gradient."""
        if not self.sequence:
            return ""

        def timed_bracket(expr: sp.Expr) -> bool:
            return any(index_family(symbol) == "time" for bracket in expr.atoms(InRange)
                       for symbol in bracket.args[0].free_symbols)

        def shared(step: Step) -> bool:
            if step.rule != "chain rule" or not isinstance(step.target, sp.Derivative):
                return False
            tensor = tensor_of(step.target.variables[0])
            return tensor is not None and tensor.is_parameter and any(
                index_family(limit[0]) == "time" for total in step.expr.atoms(sp.Sum)
                for limit in total.limits)

        said = ""
        for key, found in (
                ("time_bracket_words", step.rule == "Kronecker delta"
                 and timed_bracket(step.expr)),
                ("last_step_words", any(LENGTH in delta.args
                                        for delta in step.expr.atoms(sp.KroneckerDelta))),
                ("shared_words", shared(step))):
            if found and key not in self.said:
                self.said.add(key)
                said += " " + self.text(key)
        return said

    def assumptions(self, formula: Formula) -> list[str]:
        column = LANGUAGES.index(self.lang)
        return [self.text("assuming", what=ASSUMPTIONS.get(a, (a, a))[column])
                for a in formula.assumptions]

    def example_intro(self, ex: WorkedExample) -> str:
        """The worked example's first sentences: whether its values are the spec's, derive's
        short round ones, or some of each (say, a spec's input and target with derive's
        parameters), what the spec says the example is (its ``about``), and how the values are
        rounded."""
        if len(ex.given) == len(EXAMPLE_FIELDS):
            whose = self.t["example_given"]
        elif not ex.given:
            whose = self.t["example_default"]
        else:
            given = [self.t[f"example_part_{part}"] for part in EXAMPLE_FIELDS
                     if part in ex.given]
            rest = [self.t[f"example_part_{part}"] for part in EXAMPLE_FIELDS
                    if part not in ex.given]
            whose = self.text("example_some", given=self.listing(given),
                              rest=self.listing(rest))
        gap = self.t["sentence_gap"]
        about = self.spec.example.about_in(self.lang) if self.spec.example else ""
        if about:
            whose += gap + (about if self.markdown else _escape(about))
        return f"{whose}{gap}{self.t['example_rounding']}"

    def listing(self, items: Sequence[str]) -> str:
        items = list(items)
        if len(items) == 1:
            return items[0]
        if self.lang == "zh":               # a space beside 和 only where it meets math
            head = "、".join(items[:-1])
            left = "" if _is_chinese(head[-1:]) else " "
            right = "" if _is_chinese(items[-1][:1]) else " "
            return f"{head}{left}{self.t['and']}{right}{items[-1]}"
        return ", ".join(items[:-1]) + f" {self.t['and']} " + items[-1]

    def node_name(self, index: int) -> str:
        if index == 0:
            return self.text("the_input")
        return self.text("layer_n", l=index)

    # -- sections --

    def fragment(self) -> dict[str, Any]:
        """What the equations-only fragment places: no worked example, prose or diagram."""
        return {
            "version": __version__,
            "spec_name": self.spec.name,
            "command": self.command(),
            "forward": self.forward(),
            "cost": self.cost(),
            "penalty": self.penalty(),
            "activations": self.activations(),
            "summary": self.summary(),
            "matrix": [{"tag": formula.equation, "batch": self.batch_form(formula)}
                       for formula in self.formulas("writing the batch forms")],
        }

    def build(self) -> dict[str, Any]:
        example = worked_example(self.derivation, shown=_shown, small=True)
        delta_l = NetTensor("delta", "l")
        summary = self.summary()
        return {
            "t": self.t,
            "lang": self.lang,
            "version": __version__,
            "marker": MARKER,
            # xdvipdfmx (xelatex) takes the PDF's Creator this way; pdflatex via hyperref
            "pdf_docinfo": (rf"\special{{pdf:docinfo <</Title ({self.spec.name}) "
                            rf"/Creator ({MARKER} {__version__})>>}}"),
            "pdf_title": _escape(self.spec.name),   # hyperref: lstm\_adding, not a subscript
            "spec_name": self.spec.name,
            "command": self.command(),
            "title": self.text("title", name=self.name()),
            "subtitle": self.text("subtitle", name=self.name(), version=__version__),
            "chain": self.chain,
            "network_text": self.network_text(),
            "figure_caption": self.figure_caption(),
            "markdown_diagram": self.text("markdown_diagram", name=self.spec.name),
            "diagram": self.diagram(),
            "sequence": self.sequence,
            "unrolled_text": block_text(self.model, self.t["input_layer"], self.t["cost_node"])
            if self.attention else unrolled_text(self.model) if self.sequence else [],
            "markdown_unrolled": self.t["markdown_block" if self.attention
                                       else "markdown_unrolled"],
            "layer_table": self.layer_table(),
            "notation": self.notation(),
            "forward_text": self.text("forward_text" if self.chain else "forward_text_graph"),
            "forward": self.forward(),
            "forward_tensor": self.forward_tensor(),
            "forward_tensor_text": self.text(
                "forward_tensor_text_attention" if self.attention else
                "forward_tensor_text_sequence" if self.sequence else "forward_tensor_text",
                zero=self.zero_state()),
            "conv_text": self.text("conv_text") if self.images else "",
            "cost": self.cost(),
            "penalty": self.penalty(),
            "batch_cost_text": self.text("batch_cost_text_penalty" if self.penalized
                                         else "batch_cost_text"),
            "activations": self.activations(),
            "backward": self.backward(),
            "vanishing": self.vanishing(),
            "matrix": self.matrix(),
            "batch_text": self.batch_text(delta_l),
            "summary_title": self.t["sec_summary" if self.chain else "sec_summary_graph"],
            "summary_text": self.t["summary_text" if self.chain else "summary_text_graph"],
            "summary": summary,
            "example": self.example(example),
        }

    def command(self) -> str:
        suffix = "" if self.lang == "en" else f" --lang {self.lang}"
        return f"derive latex {self.spec.argument()}{suffix}"

    def network_text(self) -> str:
        L = self.model.depth
        if self.chain:
            return self.text("network_text", L=L, sizes=self.listing(
                [str(n) for n in self.spec.sizes]))
        if self.images:
            return self.text("network_text_image", L=L, nL=self.spec.sizes[-1],
                             shape=f"${_dims(self.spec.input_shape)}$")
        if self.sequence:
            last = [node for node in self.model.nodes if ("return", "last") in node.options]
            output = (self.text("output_last", l=last[0].index, nL=self.spec.sizes[-1])
                      if last else self.text("output_sequence", nL=self.spec.sizes[-1]))
            if self.attention:
                return self.text("network_text_attention", T=self.spec.length,
                                 n0=self.spec.input, L=L, output=output,
                                 layers=self.listing([str(n.index) for n in self.attention]),
                                 causal=self.text("network_causal") if self.causal else "",
                                 recurrent=self.text("network_recurrent")
                                 if self.recurrent else "")
            return self.text("network_text_sequence", T=self.spec.length, n0=self.spec.input,
                             L=L, output=output)
        return self.text("network_text_graph", L=L, n0=self.spec.input,
                         nL=self.spec.sizes[-1])

    def figure_caption(self) -> str:
        if self.images:
            return self.text("figure_caption_image", name=self.name())
        if self.attention:
            node = self.attention[0]
            elided = self.text("figure_elided_steps", T=self.spec.length) if (
                self.spec.length > 4) else ""
            skips = any(len(n.inputs) > 1 or n.inputs[0] != n.index - 1
                        for n in self.model.nodes)
            return self.text("figure_caption_block", name=self.name(), l=node.index,
                             elided=elided, causal=self.text("figure_causal")
                             if node in self.causal else "",
                             residual=self.text("figure_residual") if skips else "")
        if self.sequence:
            elided = self.text("figure_elided_steps", T=self.spec.length) if (
                self.spec.length > 4) else ""
            gated = any(len(state_tensors(node)) > 1 or node.forward.delta in state_tensors(
                node) for node in self.model.nodes)                  # an LSTM's c, a GRU's h
            return self.text("figure_caption_unrolled", name=self.name(), elided=elided,
                             wh=self.inline(NetTensor("wh", "l", rank=2)),
                             gated=self.t["figure_gated"] if gated else "",
                             zero=self.zero_state())
        if not self.chain:
            return self.text("figure_caption_graph", name=self.name())
        w = NetTensor("w", "l", rank=2).indexed[j, k]
        b = NetTensor("b", "l").indexed[j]
        return self.text("figure_caption", name=self.name(), L=self.model.depth,
                         w=self.inline(w), b=self.inline(b),
                         elided=self.t["figure_elided"] if max(self.spec.sizes) > MAX_NEURONS
                         else "")

    def diagram(self) -> dict[str, Any]:
        kinds = {"chain": False, "maps": False, "unrolled": False, "block": False}
        if self.chain:
            return {**kinds, "chain": True, **diagram(
                self.spec.sizes, [node.activation.name for node in self.model.nodes],
                self.t["input_layer"])}
        if self.images:
            return {**kinds, "maps": True, **map_diagram(
                self.model, self.t["input_layer"], self.t["cost_node"])}
        if self.attention:
            return {**kinds, "block": True, **block_diagram(
                self.model, self.t["input_layer"], self.t["cost_node"],
                self.text("diagram_unrolled", l=self.attention[0].index))}
        if self.sequence:
            return {**kinds, "unrolled": True, **unrolled_diagram(
                self.model, self.t["input_layer"], self.t["cost_node"])}
        return {**kinds, **graph_diagram(self.model, self.t["input_layer"],
                                         self.t["cost_node"])}

    def op_name(self, node: Node) -> str:
        """The op of a node as a reader sees it: ``dense, relu`` or ``dropout, p = 0.1``."""
        parts = [self.code(node.op.name)]
        if node.activation is not None:
            parts.append(self.code(node.activation.name))
        for key, value in node.options:
            if isinstance(value, tuple):     # a window's kernel, stride, padding
                parts.append(_window_option(key, value))
                continue
            if isinstance(value, str):       # a recurrent layer's return: last
                parts.append(self.code(f"{key}: {value}"))
                continue
            symbol = {"rate": "p", "eps": r"\epsilon"}.get(key, key)
            parts.append(f"${symbol} = {_short(value)}$" if key != "eps" else
                         f"${symbol} = {latex(sp.Rational(repr(float(value))))}$")
        return ", ".join(parts)

    def layer_table(self) -> dict[str, Any]:
        if self.chain:
            header = [self.t["col_layer"], self.t["col_size"], self.t["col_activation"]]
            rows = [["$0$", f"${self.spec.input}$", self.t["input_layer"]]]
            for node in self.model.nodes:
                rows.append([f"${node.index}$", f"${node.width}$",
                             self.code(node.activation.name)])
            return {"header": header, "rows": rows, "align": "ccl",
                    "caption": self.t["layers_caption"], "width": "0.35"}
        header = [self.t["col_layer"], self.t["col_op"], self.t["col_reads"],
                  self.t["col_shape" if self.images or self.sequence else "col_width"]]
        rows = [["$0$", self.t["input_layer"], "", f"${_dims(self.spec.input_shape)}$"]]
        for node in self.model.nodes:
            name = f" ({self.code(node.name)})" if node.name else ""
            reads = ", ".join(self.t["input_layer"] if n == 0 else f"${n}$"
                              for n in node.inputs)
            rows.append([f"${node.index}${name}", self.op_name(node), reads,
                         f"${_dims(node.dims or (node.width,))}$"])
        return {"header": header, "rows": rows, "align": "llcc",
                "caption": self.t["layers_caption_graph"], "width": "0.40"}

    def roles(self) -> set[str]:
        """The roles of every quantity and parameter of the model."""
        roles = {p.tensor.role for p in self.model.parameters}
        for eq in self.model.equations:
            roles.add(eq.target.role)
            roles.update(a.role for a in eq.expr.atoms(NetTensor))
        return roles

    def notation(self) -> list[dict[str, str]]:
        w = NetTensor("w", "l", rank=2).indexed
        b, z, a, delta, y = (NetTensor(role, node).indexed for role, node in (
            ("b", "l"), ("z", "l"), ("a", "l"), ("delta", "l"), ("y", None)))
        sigma = sp.Function("sigma_l")
        roles = self.roles()
        rows = []
        if self.images:
            rows += self.image_notation()
        if self.sequence:
            return self.sequence_notation(roles)
        if "w" in roles:
            rows.append((latex(w[j, k]), self.t["n_w" if self.chain else "n_w_graph"]))
        if "b" in roles:
            rows.append((latex(b[j]), self.t["n_b"]))
        if "z" in roles:
            rows.append((latex(z[j]), self.t["n_z"]))
        rows.append((latex(a[j]), self.text("n_a", a0=self.inline(
            NetTensor("a", 0).indexed[k]))))
        rows.append((latex(y[j]), self.t["n_y"]))
        rows.append((latex(sp.Symbol("n_l")), self.t["n_n"]))
        if any(node.activation is not None for node in self.model.nodes):
            rows.append((f"{latex(sigma(Z))}, {latex(sp.Derivative(sigma(Z), Z))}",
                         self.t["n_sigma"]))
        if "gamma" in roles:
            rows.append((", ".join(latex(NetTensor(role, "l").indexed[j])
                                   for role in ("gamma", "beta")), self.t["n_gamma"]))
        if "mu" in roles:
            rows.append((", ".join(latex(NetTensor(role, "l", rank=0))
                                   for role in ("mu", "var")), self.t["n_mu"]))
        if "xhat" in roles:
            rows.append((latex(NetTensor("xhat", "l").indexed[j]), self.t["n_xhat"]))
        if "mask" in roles:
            rows.append((latex(NetTensor("mask", "l").indexed[j]), self.t["n_mask"]))
        rows.append((latex(C), self.t["n_C"]))
        if self.penalized:
            rows.append((latex(R), self.t["n_R"]))
        if self.chain:
            definition = equation(delta[j], sp.Derivative(C, z[j], evaluate=False))
            rows.append((latex(delta[j]), self.text("n_delta", definition=f"${definition}$")))
        else:
            rows.append((latex(delta[j]), self.text(
                "n_delta_graph", z=self.inline(sp.Derivative(C, z[j], evaluate=False)),
                a=self.inline(sp.Derivative(C, a[j], evaluate=False)))))
        rows.append((latex(sp.KroneckerDelta(i, j)), self.t["n_kd"]))
        vectors = [NetTensor(role, "l") for role in ("a", "z", "b", "delta") if role in roles
                   or role in ("a", "delta")]
        rows.append((", ".join(latex(v) for v in vectors) + ", " + latex(
            NetTensor("w", "l", rank=2)), self.text("n_vec", w=self.inline(w[j, k]))))
        rows.append((r"\odot,\ \oslash", self.t["n_odot"]))
        return [{"symbol": symbol, "meaning": meaning} for symbol, meaning in rows]

    def sequence_notation(self, roles: set[str]) -> list[dict[str, str]]:
        """The notation table of a network with time steps: quantities carry the step t."""
        t = INDEX_POOL[8]
        seq = {role: NetTensor(role, "l", rank=2).indexed for role in (
            "a", "z", "h", "c", "zx", "zh")}
        rows = [(r"t,\ T", self.text("n_time")),
                (latex(seq["a"][t, j]), self.text("n_seq_a", a0=self.inline(
                    NetTensor("a", 0, rank=2).indexed[t, k])))]
        if "z" in roles:
            rows.append((latex(seq["z"][t, j]), self.text("n_seq_z")))
        if "h" in roles:
            rows.append((latex(seq["h"][t, j]), self.text("n_h")))
        if "w" in roles:
            rows.append((latex(NetTensor("w", "l", rank=2).indexed[j, k]),
                         self.text("n_w_graph")))
        if "b" in roles:
            rows.append((latex(NetTensor("b", "l").indexed[j]), self.text("n_b")))
        if "wx" in roles:
            rows.append((", ".join(latex(NetTensor(role, "l", rank=2).indexed[j, k])
                                   for role in ("wx", "wh")), self.text("n_wx")))
        if "bx" in roles:
            rows.append((", ".join(latex(NetTensor(role, "l").indexed[j])
                                   for role in ("bx", "bh")), self.text("n_bxh")))
        if "zx" in roles:
            rows.append((", ".join(latex(seq[role][t, j]) for role in ("zx", "zh")),
                         self.text("n_zxh")))
        if "c" in roles:
            rows.append((latex(seq["c"][t, j]), self.text("n_c")))
        if "gamma" in roles:
            rows.append((", ".join(latex(NetTensor(role, "l").indexed[j])
                                   for role in ("gamma", "beta")), self.text("n_gamma")))
        if "mu" in roles:
            rows.append((r",\ ".join(latex(NetTensor(role, "l", rank=1).indexed[t])
                                     for role in ("mu", "var")), self.text("n_seq_mu")))
        if "xhat" in roles:
            rows.append((latex(NetTensor("xhat", "l", rank=2).indexed[t, j]),
                         self.text("n_seq_xhat")))
        if self.attention:
            rows += self.attention_notation()
        for gates, key in ((("i", "f", "g", "o"), "n_lstm_gates"), (("r", "u", "g"),
                                                                      "n_gru_gates")):
            if all(role in roles for role in gates) and not (key == "n_gru_gates"
                                                             and "c" in roles):
                rows.append((r",\ ".join(latex(NetTensor(role, "l", rank=2).indexed[t, j])
                                         for role in gates), self.t[key]))
        rows.append((latex(NetTensor("y", None, rank=2).indexed[t, j]), self.text("n_seq_y")))
        rows.append((latex(sp.Symbol("n_l")), self.text("n_n")))
        if any(node.activation is not None for node in self.model.nodes):
            sigma = sp.Function("sigma_l")
            rows.append((f"{latex(sigma(Z))}, {latex(sp.Derivative(sigma(Z), Z))}",
                         self.text("n_sigma")))
        rows.append((latex(C), self.t["n_C"]))
        if self.penalized:
            rows.append((latex(R), self.t["n_R"]))
        rows.append((latex(NetTensor("delta", "l", rank=2).indexed[t, j]), self.text(
            "n_seq_delta" if self.recurrent else "n_seq_delta_steps",
            z=self.inline(sp.Derivative(C, seq["z"][t, j], evaluate=False)),
            a=self.inline(sp.Derivative(C, seq["a"][t, j], evaluate=False)),
            which=self.delta_of_what())))
        if self.recurrent:
            rows.append((r"\left[t \le T-1\right],\ \left[t = T\right]",
                         self.text("n_step_bracket")))
        rows.append((latex(sp.KroneckerDelta(i, j)), self.text("n_kd")))
        if self.causal:
            rows.append((r"\left[1 \le \tau \le t\right]", self.text("n_iverson")))
        if "c" in roles or "zx" in roles:
            rows.append((r"\mathbf{v}_{[a\,:\,b]}", self.text("n_block")))
            rows.append((r"\begin{bmatrix} \mathbf{u} \\ \mathbf{v} \end{bmatrix}",
                         self.text("n_stack")))
        rows.append((r"\odot,\ \oslash", self.text("n_odot")))
        return [{"symbol": symbol, "meaning": meaning} for symbol, meaning in rows]

    def attention_notation(self) -> list[tuple[str, str]]:
        """The rows of the notation table that attention needs: its quantities entry by
        entry, the other time indices, its matrices (one row per step), rowsum, the mask."""
        t, (tau, *others) = INDEX_POOL[8], family_indices(("time",) * 4, {INDEX_POOL[8]})
        entries = {role: NetTensor(role, "l", rank=2).indexed for role in (
            "q", "k", "v", "s", "alpha", "wq", "wk", "wv")}
        whole = [latex(NetTensor(role, "l", rank=2)) for role in (
            "q", "k", "v", "s", "alpha", "a", "delta")]
        rows = [(r",\ ".join(latex(entries[role][t, j]) for role in ("q", "k", "v")),
                 self.text("n_attn_qkv")),
                (r",\ ".join(latex(entries[role][j, k]) for role in ("wq", "wk", "wv")),
                 self.text("n_attn_w")),
                (latex(entries["s"][t, tau]), self.text("n_attn_s")),
                (latex(entries["alpha"][t, tau]), self.text(
                    "n_attn_alpha", causal=self.text("n_attn_alpha_causal")
                    if self.causal else "")),
                (r",\ ".join(latex(index) for index in (tau, *others[:3])),
                 self.text("n_attn_tau")),
                (r",\ ".join(whole), self.text("n_attn_whole")),
                (r"\operatorname{rowsum}", self.text("n_rowsum"))]
        if self.causal:
            rows.append((latex(Causal(LENGTH)), self.text("n_causal_mask")))
        return rows

    def image_notation(self) -> list[tuple[str, str]]:
        """The rows of the notation table that feature maps need."""
        r, s, p, q = sp.symbols("r s p q", integer=True, positive=True)
        a = NetTensor("a", "l", rank=3).indexed
        rows = [(latex(a[j, r, s]), self.text("n_map", a0=self.inline(
                    NetTensor("a", 0, rank=3).indexed[k, r, s])))]
        if any(node.op.name == "conv2d" for node in self.model.nodes):
            rows.append((latex(NetTensor("w", "l", rank=4, parameter=True).indexed[j, k, p, q]),
                         self.text("n_kernel")))
        rows.append((r"n_{l},\ H_{l},\ W_{l}", self.text("n_shape")))
        rows.append((r"k_h \times k_w,\ S,\ P", self.text("n_window")))
        rows.append((r"\left[1 \le e \le k_h\right]", self.text("n_iverson")))
        if any(node.op.name == "max_pool2d" for node in self.model.nodes):
            rows.append((r"\mathbb{1}\!\left[(p,q) = \operatorname{argmax}_{p',q'} \dots\right]",
                         self.text("n_indicator")))
        rows.append((r"W \star \mathbf{a}", self.text("n_star")))
        rows.append((r"\operatorname{win},\ \operatorname{win}^{\top}", self.text("n_win")))
        if any(node.op.name == "flatten" for node in self.model.nodes):
            rows.append((r"\operatorname{vec},\ \operatorname{vec}^{-1}", self.text("n_flat")))
        return rows

    def forward_tensor(self) -> list[str]:
        """The forward pass of a convolutional network in tensor form: W ⋆ a + b, max over
        windows, vec (a flatten's target is an entry of an expression of its indices, so the
        tensor form says what the op is: a reshape)."""
        if not self.images and not self.sequence:
            return []
        rows = []
        for node in self.model.nodes:
            for eq in node.equations:
                try:
                    rhs = equation_tensor(eq, self.widths)
                except DeriveError:
                    rhs = None
                if rhs is not None:
                    rows.append(self.forward_line(eq, rhs))
        return rows

    def forward(self) -> list[dict[str, str]]:
        rows = []
        for node in self.model.nodes:
            for eq in node.equations:
                lhs = latex(eq.lhs)
                rhs = self.broken(eq.expr, lead=visual_length(lhs))
                rows.append({"math": f"{lhs} = {rhs}", "lhs": lhs, "rhs": rhs,
                             "label": self.label(f"{eq.target.role}{node.index}")})
        return rows

    def cost(self) -> dict[str, str]:
        loss = self.model.loss.name
        return {"text": self.text("cost_text", loss=self.code(loss)),
                "math": self.display(C, self.model.cost), "label": self.label("C")}

    def penalty(self) -> dict[str, str] | None:
        if not self.penalized:
            return None
        return {"text": self.text("penalty_text", R=f"${latex(R)}$"),
                "math": self.display(R, self.model.penalty), "label": self.label("R")}

    def activations(self) -> list[dict[str, Any]]:
        groups: dict[str, tuple[ActivationDerivative, list[int]]] = {}
        for node, derivative in zip(self.model.nodes, self.derivation.activation_derivatives):
            if derivative is None:  # softmax (differentiated where it is used), or none
                continue
            key = repr((node.activation.name, node.activation.params))
            groups.setdefault(key, (derivative, []))[1].append(node.index)
        out = []
        for derivative, layers in groups.values():
            sigma = sp.Function("sigma")
            out.append({
                "heading": self.text("activation_of" if len(layers) == 1 else
                                     "activation_of_many",
                                     name=self.code(derivative.activation.name),
                                     layers=self.listing([str(n) for n in layers])),
                "definition": equation(sigma(Z), derivative.activation.expr),
                "steps": [self.step(step) for step in derivative.steps],
            })
        return out + self.gate_activations()

    def gate_activations(self) -> list[dict[str, Any]]:
        """The activations of an LSTM's or a GRU's gates (fixed by the op), whose
        derivatives the derivation inserts into the layer's error."""
        out = []
        column = LANGUAGES.index(self.lang)
        for node in self.model.nodes:
            gates: dict[str, list[Equation]] = {}
            for eq in node.equations:
                if eq.gate and eq.activation is not None:
                    gates.setdefault(eq.activation.name, []).append(eq)
            for name, eqs in gates.items():
                # the derivative the derivation itself used for these gates (cached there)
                derivative = activation_derivative(eqs[0].activation)
                words = [f"{QUANTITY_NAMES.get(eq.target.role, (eq.target.role,) * 2)[column]}"
                         f" {self.inline(entry(eq.target, (INDEX_POOL[8], j)))}"
                         for eq in eqs]
                sigma = sp.Function("sigma")
                out.append({
                    "heading": self.text("activation_of_gates", name=self.code(name),
                                         gates=self.listing(words), l=node.index),
                    "definition": equation(sigma(Z), derivative.activation.expr),
                    "steps": [self.step(step) for step in derivative.steps]})
        return out

    # -- the backward pass --

    def block(self, steps: Sequence[Step], formula: Formula | None = None,
              heading: str = "") -> dict[str, Any]:
        # after the derivation of a recurrence: the recursion in tensor form, in words
        after = [item for carry in self.carries if carry.formula is formula
                 for item in self.carry_items(carry)]
        if formula is not None and not self.chain:
            # what attention's formulas say, and the errors a residual connection adds
            after += self.attention_items(formula) + self.branch_items(formula)
        return {"heading": heading, "steps": [self.step(s) for s in steps],
                "assumptions": self.assumptions(formula) if formula is not None else [],
                "after": after}

    def backward(self) -> list[dict[str, Any]]:
        return self.chain_sections() if self.chain else self.graph_sections()

    def chain_sections(self) -> list[dict[str, Any]]:
        """BP1, BP2 and BP3/BP4 of a plain chain of dense layers, as in the textbooks."""
        L = self.model.depth
        d = self.derivation
        output = d.delta(L)
        bp1 = {"title": self.t["sec_bp1"],
               "text": self.text("bp1_text", L=L,
                                 delta=self.inline(NetTensor("delta", "l").indexed[j])),
               "parts": [{"title": "", "text": "", "others": [], "after": [], "blocks": [
                   self.block((*d.loss_gradient.steps, *output.steps), output)]}]}
        if L == 1:
            bp2 = {"title": self.t["sec_bp2"], "text": self.t["bp2_none"], "parts": []}
        else:
            shown = d.delta(L - 1)
            bp2 = {"title": self.t["sec_bp2"], "text": self.text("bp2_text", l=L - 1),
                   "parts": [{"title": "", "text": "", "after": [],
                              "blocks": [self.block(shown.steps, shown)],
                              "others": [self.display(d.delta(l).lhs, self.index_expr(
                                  d.delta(l))) for l in range(L - 2, 0, -1)]}]}
        bias = d.bias_gradients[L - 1]
        weight = d.weight_gradients[L - 1]
        steps = [*(bias.steps if bias is not None else ()), *weight.steps]
        others = []
        for l in range(L - 1, 0, -1):
            for formula in (d.bias_gradients[l - 1], d.weight_gradients[l - 1]):
                if formula is not None:
                    others.append(self.display(formula.lhs, formula.rhs))
        bp34 = {"title": self.t["sec_bp34"], "text": self.text("bp34_text", l=L),
                "parts": [{"title": "", "others": others, "after": [],
                           "text": "" if bias is not None else self.text("bp34_no_bias", l=L),
                           "blocks": [self.block(steps, weight)]}]}
        return [bp1, bp2, bp34]

    def graph_sections(self) -> list[dict[str, Any]]:
        """One subsection per layer, from the output back."""
        parts = []
        by_node: dict[int, list[Formula]] = {}
        for formula in self.derivation.formulas:
            by_node.setdefault(formula.node, []).append(formula)
        for node in reversed(self.model.nodes):
            formulas = by_node.get(node.index, [])
            title = (self.text("node_title_named", l=node.index, name=self.code(node.name),
                               op=self.op_name(node)) if node.name else
                     self.text("node_title", l=node.index, op=self.op_name(node)))
            words = [self.text("node_reads", reads=self.listing(
                [self.node_name(n) for n in node.inputs]))]
            consumers = self.model.consumers(node.index)
            if consumers:
                words.append(self.text("node_read_by", consumers=self.listing(
                    [self.node_name(c.index) for c in consumers])))
            else:
                words.append(self.t["node_is_output"])
            states = state_tensors(node)
            if states:
                column = LANGUAGES.index(self.lang)
                words.append(self.text("node_recurrent", state=self.listing(
                    [f"{QUANTITY_NAMES[s.role][column]} {self.inline(s.at_step(-1))}"
                     for s in states])))
            if node.reads_whole_sequences:
                words.append(self.text("node_attention", causal=self.text(
                    "node_attention_causal") if node in self.causal else ""))
            if node.op.name == "add":
                words.append(self.text("res_add", reads=self.listing(
                    [self.node_name(n) for n in node.inputs])))
            parts.append({"title": title, "text": self.t["sentence_gap"].join(words),
                          "others": [],
                          "blocks": [self.block(f.steps, f, self.heading(f))
                                     for f in formulas],
                          "after": self.attention_matrix(node, formulas)
                          if node.reads_whole_sequences else []})
        delta = self.inline(NetTensor("delta", "l").indexed[j])
        if self.sequence and not self.recurrent:
            # time steps, but nothing carried from step to step: attention, per-step layers
            delta = self.inline(NetTensor("delta", "l", rank=2).indexed[INDEX_POOL[8], j])
            return [{"title": self.t["sec_backward"], "parts": parts,
                     "text": self.text("backward_text_steps", delta=delta) + (self.text(
                         "backward_text_attention") if self.attention else "")}]
        if self.sequence:
            delta = self.inline(NetTensor("delta", "l", rank=2).indexed[INDEX_POOL[8], j])
            return [{"title": self.t["sec_bptt"], "parts": parts,
                     "text": self.text("bptt_text", delta=delta, which=self.delta_of_what())}]
        text = self.text("backward_text", delta=delta)
        return [{"title": self.t["sec_backward"], "text": text, "parts": parts}]

    # -- attention: what its formulas say ---------------------------------------------------

    def attention_items(self, formula: Formula) -> list[dict[str, Any]]:
        """After a formula of an attention layer, what it says: ∂C/∂α is δ_t · v_τ; the
        differentiation of ∂C/∂s is the softmax Jacobian, which gives each weight's gradient
        minus the mean of its row (rows of ∇_S C sum to 0), and what the causal mask does;
        a value collects the errors of the steps that attend to it, a key those of every query
        that reads it, both scaled by 1/√d as the queries' are. Each in matrix form."""
        node = self.model.node(formula.node)
        if not node.reads_whole_sequences or formula.kind == "delta":
            return []
        role = formula.of.role
        matrix = self.display(step_target(formula), self.vector_expr(formula))
        time = formula.indices[0] if formula.indices else None
        summed = [limit[0] for total in formula.rhs.atoms(sp.Sum) for limit in total.limits
                  if index_family(limit[0]) == "time"]
        other = self.inline(summed[0]) if summed else ""
        width = f"$d = {latex(node.size)} = {node.width}$"
        if role == "alpha":
            return [{"text": self.text("attn_dalpha", t=self.inline(time)), "math": [matrix]}]
        if role == "s":
            return self.softmax_items(formula, node, matrix)
        if role == "v":
            weights = [e for e in formula.rhs.atoms(sp.Indexed) if tensor_of(e).role == "alpha"]
            return [{"text": self.text("attn_dv", t=self.inline(time), tau=other,
                                       weight=self.inline(weights[0]) if weights else ""),
                     "math": [matrix]}]
        if role == "k":
            return [{"text": self.text("attn_dk", t=self.inline(time), tau=other, d=width),
                     "math": [matrix]}]
        if role == "q":
            return [{"text": self.text("attn_dq", t=self.inline(time), tau=other, d=width),
                     "math": [matrix]},
                    {"text": self.text("attn_scale", d=width), "math": []}]
        if formula.kind == "gradient" and role == "wv":
            return [{"text": self.text("attn_projections"), "math": []}]
        return []

    def softmax_items(self, formula: Formula, node: Node, matrix: str) -> list[dict[str, Any]]:
        """The softmax Jacobian read off the differentiation step of ∂C/∂s (row t' = t), the
        error of the scores factored, the rows of ∇_S C summing to 0, and the causal mask."""
        items = []
        time = formula.indices[0]
        for step in formula.steps:
            if step.rule != "differentiate" or not isinstance(step.target, sp.Derivative):
                continue
            rows = [arg for delta in step.expr.atoms(sp.KroneckerDelta) for arg in delta.args
                    if time in delta.args and arg != time]
            if not rows:
                continue
            # the Kronecker delta δ_{tt'}: a row's scores move that row's weights only
            same = {rows[0]: time}
            jacobian = _factored(sp.expand(step.expr.xreplace(same)))
            items.append({"text": self.text("attn_jacobian", delta=self.inline(
                sp.KroneckerDelta(time, rows[0]))), "math": [
                    f"{latex(step.target.xreplace(same))} = {jacobian}"]})
            break
        items.append({"text": self.text("attn_ds"), "math": [
            f"{latex(formula.lhs)} = {_factored(formula.rhs)}", matrix]})
        items.append({"text": self.text("attn_ds_rows"), "math": []})
        if node in self.causal:
            weights = [eq for eq in node.equations if eq.target.role == "alpha"]
            source = equation(weights[0].lhs, weights[0].expr) if weights else ""
            items.append({"text": self.text("attn_causal", source=f"$${source}$$" if
                                            self.markdown else rf"\[ {source} \]"),
                          "math": []})
        else:
            items.append({"text": self.text("attn_not_causal", causal=self.code("causal: true")),
                          "math": []})
        return items

    def attention_matrix(self, node: Node, formulas: list[Formula]) -> list[dict[str, Any]]:
        """An attention layer in matrix form, one row per step: its forward pass over whole
        sequences (the projections step by step), then its backward formulas."""
        forward = []
        for eq in node.equations:
            try:
                rhs = equation_tensor(eq, self.widths)
            except DeriveError:
                continue
            forward.append(self.forward_line(eq, rhs))
        backward = [self.display(step_target(f), self.vector_expr(f)) for f in formulas
                    if f.kind != "gradient" and f.kind != "delta" and is_whole(f.vector)]
        return [{"text": self.text("attn_matrix_forward", l=node.index, T=self.spec.length,
                                   d=node.width), "math": forward},
                {"text": self.text("attn_matrix_backward"), "math": backward}]

    def forward_line(self, eq: Equation, rhs: sp.Expr) -> str:
        """A forward equation in tensor form; a softmax of whole rows also by its name."""
        rhs = self.whole_blocks(rhs)
        line = self.display(equation_target(eq, rhs), rhs)
        if is_whole(rhs):
            named = rewrite("causal_softmax").apply(rewrite("softmax").apply(rhs))
            if named != rhs:
                line += f" = {latex(named)}"
        return line

    def branch_items(self, formula: Formula) -> list[dict[str, Any]]:
        """After the error of a layer read through a residual connection (by an add and by
        another layer): the sum of the errors of both paths."""
        if formula.kind != "delta":
            return []
        consumers = self.model.consumers(formula.node)
        adds = [c for c in consumers if c.op.name == "add"]
        if len(consumers) < 2 or not adds or not isinstance(formula.rhs, sp.Add):
            return []
        others = [c for c in consumers if c not in adds]
        pieces = [self.inline(term) for term in _ordered_terms(formula.rhs)]
        return [{"text": self.text(
            "res_branch", l=formula.node, count=len(consumers),
            adds=self.listing([self.node_name(c.index) for c in adds]),
            others=self.listing([self.node_name(c.index) for c in others])
            if others else self.listing([self.node_name(c.index) for c in adds[1:]]),
            terms=self.listing(pieces)), "math": []}]

    # -- sequences: what the error carries from step to step --

    @cached_property
    def carries(self) -> list[_Carry]:
        """The formulas of the recurrences that read their own quantity at the step after."""
        if not self.sequence:
            return []
        return [carry for formula in self.derivation.formulas
                if (carry := carry_of(formula, self.widths)) is not None]

    def ref(self, formula: Formula) -> str:
        """A reference to a formula's equation in the summary: (eq. 12), or words in
        Markdown, which has no equation numbers."""
        if self.markdown:
            return self.t["see_summary"]
        return self.text("see_eq", eq=rf"\eqref{{{self.label(code_name(formula))}}}")

    def math_item(self, *lines: str) -> dict[str, Any]:
        return {"text": "", "math": list(lines)}

    def batch_text(self, delta_l: NetTensor) -> str:
        """The sentences before the batch form's equations, the last ending in a colon."""
        sentences = [("batch_text_penalty" if self.penalized else "batch_text", {
            "ones": self.inline(ONE), "A": self.inline(NetTensor("a", "l"), batch=True),
            "Z": self.inline(NetTensor("z", "l"), batch=True),
            "D": self.inline(delta_l, batch=True)})]
        if self.sequence:
            cell = any(t.role == "c" for node in self.model.nodes for t in state_tensors(node))
            sentences.append(("batch_text_sequence", {
                "H": self.inline(NetTensor("h", "l", step=0), batch=True),
                "cell": self.text("batch_cell", cell=self.inline(
                    NetTensor("c", "l", step=0), batch=True)) if cell else ""}))
        if self.attention:
            sentences.append(("batch_text_attention", {}))
        stop, colon = self.t["full_stop"], self.t["colon"]
        return "".join(self.text(key, end=colon if n == len(sentences) - 1 else stop, **fields)
                       for n, (key, fields) in enumerate(sentences))

    def zero_state(self) -> str:
        """The states before the first step, all 0: $\\mathbf{h}_{0} = \\mathbf{0}$, with an
        LSTM's $\\mathbf{c}_{0}$ too."""
        states = sorted({tensor.role for node in self.model.nodes
                         for tensor in state_tensors(node)}, reverse=True)   # "h", "c"
        zero = " = ".join(rf"\mathbf{{{role}}}_{{0}}" for role in states or ["h"])
        return rf"${zero} = \mathbf{{0}}$"

    def delta_of_what(self) -> str:
        """What each layer's error is the derivative of (``Forward.delta``): its weighted
        input (an op whose error is taken before its activation: dense, rnn, lstm, whose gates'
        inputs are stacked), the state it carries from step to step (gru), or its output (every
        other op), with the layers of each."""
        kinds: dict[str, list[int]] = {"input": [], "state": [], "output": []}
        stacked = []
        for node in self.model.nodes:
            delta, output = node.forward.delta, node.forward.output
            if delta == output:
                kinds["output"].append(node.index)
            elif delta in state_tensors(node):
                kinds["state"].append(node.index)
            else:
                kinds["input"].append(node.index)
                if self.model.shapes[delta][-1] != self.model.shapes[output][-1]:
                    stacked.append(node.index)

        def layers(indices: list[int]) -> str:
            return self.listing([self.node_name(n) for n in indices])

        parts = [self.text(f"delta_on_{kind}", layers=layers(indices), stacked=self.text(
                     "delta_stacked", layers=layers(stacked)) if stacked else "")
                 for kind, indices in kinds.items() if indices]
        return self.t["or"].join(parts)

    def quantity_words(self, carry: _Carry) -> str:
        """The error of the state (or of the cell state) and its symbol, at step t."""
        q = self.inline(step_target(carry.formula))
        return self.text("what_cell" if carry.formula.of.role == "c" else "what_state", q=q)

    def gate_name(self, carry: _Carry) -> str:
        role = tensor_of(carry.gate).role
        return QUANTITY_NAMES.get(role, (role, role))[LANGUAGES.index(self.lang)]

    def carry_items(self, carry: _Carry) -> list[dict[str, Any]]:
        """After a recurrent layer's derivation: its recursion in tensor form, the error of
        the step after sent back through W_h, or through a gate."""
        formula = carry.formula
        math = self.display(step_target(formula), formula.vector)
        if carry.gate is None:
            cancelled = any(step.why in (MULTIPLIED_OUT, MULTIPLIED_OUT_LAST)
                            for step in formula.steps)
            key = "carry_matrix_cancelled" if cancelled else "carry_matrix"
            return [{"text": self.text(key, l=carry.node), "math": [math]}]
        gate = tensor_of(carry.gate).at_step(1)
        return [{"text": self.text("carry_gate", what=self.quantity_words(carry),
                                   gate=self.gate_name(carry), g=self.inline(gate)),
                 "math": [math]}]

    def vanishing(self) -> list[dict[str, Any]]:
        """Why gradients vanish or explode: the products of Jacobians that unrolling each
        recursion through time gives, and what bounds them."""
        carries = self.carries
        if not carries:
            return []
        items = [{"text": self.text("vanishing_intro"), "math": []}]
        explained: set[str] = set()
        for carry in carries:
            kind = "matrix" if carry.gate is None else tensor_of(carry.gate).role
            if kind in explained:
                # another layer of a kind explained above: its Jacobian only
                derivative, diagonal = self.jacobian(carry)
                matrix = (rf"J_{{t}} = {diagonal}\,\left({latex(carry.weight)}\right)^{{\top}}"
                          if carry.gate is None else rf"J_{{t}} = {diagonal}")
                items.append({"text": self.text("vanishing_same", l=carry.node,
                                                q=self.inline(step_target(carry.formula))),
                              "math": [derivative, matrix]})
                continue
            explained.add(kind)
            items += (self.vanishing_matrix(carry) if carry.gate is None
                      else self.vanishing_gate(carry))
        items.append({"text": self.text("clip_words", clip=self.code("train(..., clip=...)")),
                      "math": []})
        return [{"title": self.t["sec_vanishing"], "paragraphs": items}]

    def jacobian(self, carry: _Carry) -> tuple[str, str]:
        """(J_t)_{jk} = the derivative, and diag(d) of J_t's tensor form."""
        row = carry.formula.indices[1]
        entry_text = rf"\left(J_{{t}}\right)_{{{latex(row)}{latex(carry.column)}}}"
        diagonal = (rf"\operatorname{{diag}}\!\left({latex(carry.diagonal)}\right)"
                    if carry.diagonal is not None else "")
        return f"{entry_text} = {latex(carry.derivative)}", diagonal

    def vanishing_matrix(self, carry: _Carry) -> list[dict[str, Any]]:
        """A simple recurrent layer: J_t = diag(σ'(z_t)) W_hᵀ, its products, their bound."""
        formula = carry.formula
        here = step_target(formula)
        after = here.whole.at_step(1)
        derivative, diagonal = self.jacobian(carry)
        weight = latex(carry.weight)
        matrix = rf"J_{{t}} = {diagonal}\,\left({weight}\right)^{{\top}} \qquad (t \le T-1)"
        e = r"\mathbf{e}"
        recursion = rf"{latex(here)} = J_{{t}}\, {latex(after)} + {e}_{{t}}"
        unrolled = (rf"{latex(here)} = \sum_{{s=t}}^{{T}} \Biggl(\prod_{{\tau=t}}^{{s-1}} "
                    rf"J_{{\tau}}\Biggr) {e}_{{s}}")
        product = r"\Biggl\lVert \prod_{\tau=t}^{s-1} J_{\tau} \Biggr\rVert"
        sigma = rf"\sigma_{{{carry.node}}}'\!\left(\mathbf{{z}}^{{{carry.node}}}_{{\tau}}\right)"
        factors = (rf"\prod_{{\tau=t}}^{{s-1}} \Bigl\lVert \operatorname{{diag}}\!\left("
                   rf"{sigma}\right) \Bigr\rVert\, \bigl\lVert {weight} \bigr\rVert")
        bound = rf"\left(\gamma\, \bigl\lVert {weight} \bigr\rVert\right)^{{s-t}}"
        return [
            {"text": self.text("vanishing_matrix", l=carry.node, q=self.inline(here),
                               ref=self.ref(formula)), "math": [derivative]},
            {"text": self.text("vanishing_jacobian", q=self.inline(here),
                               next=self.inline(after)), "math": [matrix]},
            {"text": self.text("vanishing_unroll", e=f"${e}_{{t}}$"),
             "math": [rf"{recursion}, \qquad {unrolled}"]},
            {"text": self.text("vanishing_bound"),
             "math": [rf"{product} \le {factors} \le {bound}"]},
            {"text": self.text("vanishing_words", wh=weight, Tm1=self.spec.length - 1),
             "math": []},
        ]

    def vanishing_gate(self, carry: _Carry) -> list[dict[str, Any]]:
        """An LSTM's cell state or a GRU's state: J_t = diag(gate_{t+1}), products of gates."""
        formula = carry.formula
        row = formula.indices[1]
        time, tau, s = formula.indices[0], sp.Symbol("tau"), sp.Symbol("s")
        derivative, diagonal = self.jacobian(carry)
        gates = sp.Product(carry.gate.xreplace({time: tau - 1}), (tau, time + 1, s))
        product = (rf"\Biggl(\prod_{{\tau=t}}^{{s-1}} J_{{\tau}}\Biggr)_{{{latex(row)}"
                   rf"{latex(row)}}} = {latex(gates)}")
        weight = latex(NetTensor("wh", carry.node, rank=2))
        return [
            {"text": self.text("vanishing_gate", l=carry.node, what=self.quantity_words(carry),
                               gate=self.gate_name(carry), ref=self.ref(formula)),
             "math": [derivative]},
            {"text": self.text("vanishing_gate_jacobian"),
             "math": [rf"J_{{t}} = {diagonal} \quad (t \le T-1), \qquad {product}"]},
            {"text": self.text("vanishing_gate_words", gate=self.gate_name(carry),
                               wh=f"${weight}$", carousel=self.t["carousel"]
                               if formula.of.role == "c" else ""), "math": []},
        ]

    def heading(self, formula: Formula) -> str:
        q = self.inline(formula.lhs.variables[0] if isinstance(formula.lhs, sp.Derivative)
                        else entry(formula.of, formula.indices))
        tag = self.text("tag", tag=formula.equation) if formula.equation else ""
        if formula.kind == "loss gradient":
            return self.text("block_loss_part" if formula.loss_part else "block_loss", q=q)
        if formula.kind == "delta":
            return self.text("block_delta", delta=self.inline(formula.lhs), l=formula.node,
                             q=q, tag=tag)
        if formula.kind == "adjoint":
            return self.text("block_adjoint", q=q)
        return self.text("block_gradient", q=q, tag=tag)

    # -- matrix, batch and index forms --

    def index_expr(self, formula: Formula, *, broken: bool = False) -> sp.Expr:
        """The index form with the sizes filled in, or the generic one when shorter and the
        concrete one is too long: for one line, or, ``broken`` over lines a term each, for
        the longest of its terms (the summary's δ of an LSTM, its gates' σ' written in)."""
        concrete = _filled(formula.rhs, self.filled)
        length = max(visual_length(text) for _, text in terms(concrete)) if broken else \
            visual_length(latex(concrete))
        if length > LINE_BUDGET:
            generic = _filled(formula.generic, self.filled)
            if visual_length(latex(generic)) < visual_length(latex(concrete)):
                return generic
        return concrete

    def vector_expr(self, formula: Formula, *, batch: bool = False) -> sp.Expr:
        """The tensor form, or the generic one (σ' left symbolic, given in the activation
        section) when the concrete one would not fit on a line; a form over whole sequences
        with the factors its terms share in front (α ⊙ (∇_α C − rowsum(α ⊙ ∇_α C)))."""
        concrete = self.whole_blocks(formula.vector)
        if is_whole(concrete) and isinstance(concrete, sp.Add):
            factored = sp.factor_terms(concrete)
            if factored != concrete and visual_length(latex(factored)) <= visual_length(
                    latex(concrete)):
                return factored
        text = latex(concrete, batch=batch, batch_cost=self.batch_cost)
        # (not at a time step: the tensor form of a generic σ'(z_t) is not σ'(z_t) yet)
        if visual_length(text) > LINE_BUDGET and not _is_timed(formula):
            try:
                generic = formula.vector_generic
            except DeriveError:
                return concrete
            generic_text = latex(generic, batch=batch, batch_cost=self.batch_cost)
            if visual_length(generic_text) < visual_length(text):
                return generic
        return concrete

    def whole_blocks(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every block of a quantity that is all of it in this network (its
        first n_2 entries, where its width n_0 is n_2 too: an add of a sequence reading the
        input) written as the quantity itself."""
        def whole(block: Block) -> sp.Expr:
            tensor, start, size = block.args
            width = self.widths.get(tensor.whole) if isinstance(tensor, NetTensor) else None
            if start == 0 and width is not None and sp.sympify(width).xreplace(
                    self.sizes) == sp.sympify(size).xreplace(self.sizes):
                return tensor
            return block

        return expr.replace(lambda e: isinstance(e, Block), whole) if expr.has(Block) else expr

    def batch_form(self, formula: Formula) -> str:
        """The batch form of a formula: parameter gradients are means over the batch, plus
        the derivative of the penalty."""
        lhs = latex(step_target(formula), batch=True, batch_cost=self.batch_cost)
        if formula.kind == "gradient" and formula.of.rank == 1:
            vector = self.vector_expr(formula, batch=True)
            rhs = batch_gradient(vector, batch_cost=self.batch_cost)
            if visual_length(rhs) + visual_length(lhs) > LINE_BUDGET and \
                    isinstance(vector, sp.Add):
                # the mean over the rows of a long sum: the sum broken over lines inside
                inner = self.broken(vector, batch=True, lead=visual_length(lhs) + 8)
                rhs = rf"\frac{{1}}{{B}}\,\mathbf{{1}}^{{\top}} \left({inner}\right)"
        else:
            rhs = self.broken(self.vector_expr(formula, batch=True), batch=True,
                              lead=visual_length(lhs))
        if formula.kind == "gradient" and formula.penalty != 0:
            for sign, text in terms(formula.vector_penalty, batch=True,
                                    batch_cost=self.batch_cost):
                rhs += f" {sign} {text}"
        return f"{lhs} = {rhs}"

    def matrix(self) -> list[dict[str, str]]:
        rows = []
        for formula in _but_loss_parts(self.formulas("writing the tensor forms")):
            rows.append({
                "tag": formula.equation,
                "vector": self.display(step_target(formula), self.vector_expr(formula)),
                "batch": self.batch_form(formula),
            })
        return rows

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for formula in _but_loss_parts(self.formulas("writing the summary")):
            if self.chain and not formula.equation:
                continue
            rows.append(self.summary_row(formula))
            if formula.penalty != 0:
                rows.append(self.penalty_row(formula))
        if any(row["stacked"] for row in rows):
            # one layout for the whole box: side-by-side rows would widen the stacked ones
            rows = [row if row["stacked"] else self.summary_row(row["formula"], stacked=True)
                    for row in rows]
        return rows

    def summary_row(self, formula: Formula, *, stacked: bool = False) -> dict[str, Any]:
        index_lhs = latex(formula.lhs)
        vector_lhs = latex(step_target(formula))
        index, vector = self.index_expr(formula), self.vector_expr(formula)
        index_text, vector_text = latex(index), latex(vector)
        # side by side when both fit on one line (a chain), else the vector form below
        stacked = stacked or not self.chain or (
            visual_length(index_lhs) + visual_length(index_text) + visual_length(vector_lhs)
            + visual_length(vector_text) > LINE_BUDGET)
        if stacked:
            index = self.index_expr(formula, broken=True)
            index_text = self.broken(index, lead=visual_length(index_lhs))
            vector_text = self.broken(vector, lead=visual_length(vector_lhs))
        return {"tag": formula.equation, "index_lhs": index_lhs, "index_rhs": index_text,
                "vector_lhs": vector_lhs, "vector_rhs": vector_text, "stacked": stacked,
                "label": self.label(code_name(formula)), "formula": formula}

    def penalty_row(self, formula: Formula) -> dict[str, Any]:
        """∂J/∂w = the batch mean of ∂C/∂w plus ∂R/∂w, in index and tensor form."""
        (variable,) = formula.lhs.variables
        per_sample = sp.Symbol("C_b")
        mean = r"\frac{1}{B} \sum_{b=1}^{B} "
        index_rhs = mean + latex(sp.Derivative(per_sample, variable, evaluate=False))
        vector_rhs = mean + rf"\nabla_{{{latex(formula.of)}}} {latex(per_sample)}"
        for sign, text in terms(formula.penalty):
            index_rhs += f" {sign} {text}"
        for sign, text in terms(formula.vector_penalty):
            vector_rhs += f" {sign} {text}"
        return {"tag": "", "index_lhs": latex(sp.Derivative(sp.Symbol("J"), variable,
                                                            evaluate=False)),
                "index_rhs": index_rhs,
                "vector_lhs": latex(formula.target, batch=True, batch_cost="J"),
                "vector_rhs": vector_rhs, "stacked": True, "formula": formula,
                "label": self.label(f"dJ_{code_name(formula)}")}

    # -- the worked example --

    def example(self, ex: WorkedExample) -> dict[str, Any]:
        if self.sequence:
            return self.sequence_example(ex)
        model, spec = self.model, self.spec
        wide = max(spec.sizes) > MAX_NEURONS
        inputs = ([f"{latex(model.y.label)} = {_column(ex.y, _short)}"] if self.images else
                  [f"{latex(model.x.label)} = {_column(ex.x, _short)}",
                   f"{latex(model.y.label)} = {_column(ex.y, _short)}"])
        inputs += self.parameter_lines(ex)
        first = {j: sp.Integer(1), k: sp.Integer(1)}
        forward_spelled = []
        for node in self.spelled_nodes():
            for eq in node.equations:
                result = ex.value(eq.target).flat[0]
                if eq.at is not None or (self.images and eq.expr.has(FirstMax, WindowMax)):
                    continue            # a reshape; a maximum (the maps below show them)
                at = {**first, **{i: sp.Integer(1) for i in eq.indices}}
                text = _spelled(eq.expr, eq.lhs, ex.lookup, self.sizes, at, result,
                                max_terms=12 if self.images else 8, inside=ex.inside)
                if text is not None:
                    forward_spelled.append(text)
        backward_spelled = []
        for formula in self.spelled_formulas():
            result = ex.of(formula).flat[0]
            if formula.rhs.has(FirstMax, InRange, WindowMax):
                continue                # the routing of a window: the maps below show it
            at = {**first, **{i: sp.Integer(1) for i in formula.indices}}
            text = _spelled(formula.rhs, formula.lhs, ex.lookup, self.sizes, at, result,
                            max_terms=12 if self.images else 8, inside=ex.inside)
            if text is not None:
                backward_spelled.append(text)
        forward_rows = [self.value_row(latex(entry(tensor, (j,) * tensor.rank)), value)
                        for tensor, value in ex.forward if value.ndim <= 1]
        backward_rows = [self.value_row(latex(formula.lhs), value)
                         for formula, value in ex.backward if value.ndim <= 1]
        gradients = []
        penalties = {formula.of: value for formula, value in ex.penalties}
        for formula, value in ex.backward:
            if value.ndim == 4 and self.images:
                gradients.extend(self.kernel_lines(formula.target, value, _number))
                continue
            if value.ndim != 2:
                continue
            shape = ex.value(formula.of).shape
            gradients.append(f"{latex(formula.target)} = {_matrix(value, _fixed, shape)}")
            if formula.of in penalties:
                total = value + penalties[formula.of]
                gradients.append(f"{latex(formula.target, batch=True, batch_cost='J')} = "
                                 f"{_matrix(total, _fixed, shape)}")
        text = [self.example_intro(ex)]
        if ex.masks:
            text.append(self.t["example_mask"])
        maps = self.example_maps(ex) if self.images else {}
        if self.images:
            cut = any(v.ndim >= 3 and (v.shape[0] > MAX_MAPS or max(v.shape[-2:]) > MAX_NEURONS)
                      for v in (ex.x, *ex.parameters.values(), *(v for _t, v in ex.forward)))
            text.append(self.text("example_maps") + (self.text(
                "example_maps_cut", maps=MAX_MAPS, limit=MAX_NEURONS, shown=SHOWN_NEURONS)
                if cut else ""))
        return {
            "text": self.t["sentence_gap"].join(text),
            "truncated": self.text("example_truncated", limit=MAX_NEURONS,
                                   shown=SHOWN_NEURONS) if wide else "",
            "inputs": inputs,
            "forward_spelled": forward_spelled,
            "forward": self.value_table(forward_rows),
            "loss": f"C = {_number(ex.loss)}",
            "penalty": f"R = {_number(ex.penalty)}" if self.penalized else "",
            "backward_spelled": backward_spelled,
            "backward": self.value_table(backward_rows),
            "gradients_text": self.t["example_gradients_penalty" if self.penalized
                                     else "example_gradients"],
            "gradients": gradients,
            "input_maps": maps.get("inputs", []),
            "forward_maps": maps.get("forward", []),
            "indicators": maps.get("indicators", []),
            "backward_maps": maps.get("backward", []),
            "forward_steps": [], "backward_steps": [], "sums": [],
            "backward_text": self.t["example_backward_text"],
            "backward_after": [], "attention_forward": [], "attention_backward": [],
        }

    def parameter_lines(self, ex: WorkedExample) -> list[str]:
        """The parameters of the example (and its dropout masks), two to a line."""
        inputs: list[str] = []
        for node in self.model.nodes:
            parts = []
            for parameter in node.parameters:
                value = ex.parameters[parameter.key]
                if value.ndim == 4 and node.op.name == "conv2d":   # kernels, as matrices
                    continue
                if value.ndim > 2:      # a custom op's tensor: its shape, not a page of numbers
                    dims = r" \times ".join(map(str, value.shape))
                    parts.append(rf"{latex(parameter.tensor)} \in \mathbb{{R}}^{{{dims}}}")
                    continue
                shown = _matrix(value, _short) if value.ndim == 2 else _column(value, _short)
                parts.append(f"{latex(parameter.tensor)} = {shown}")
            for mask, value in ex.masks:
                if mask.node == node.index:
                    parts.append(f"{latex(mask)} = {_column(value, _short)}")
            if self.sequence:
                # as many to a line as fit: a recurrent layer's W_x and W_h are both matrices
                inputs += _packed_parts(parts)
                continue
            # two to a line: a layer with more parameters (a custom op) does not run off
            inputs += [r",\quad ".join(parts[n:n + 2]) for n in range(0, len(parts), 2)]
        return inputs

    # -- the worked example of a network with time steps --

    def sequence_example(self, ex: WorkedExample) -> dict[str, Any]:
        """One sample's forward pass step by step, t = 1..T, and its backward pass through
        time, t = T..1: the first unit of each layer spelled out at every step of a short
        sequence (the first two forward and the last two backward of a long one), tables of
        every quantity at the steps shown, and each shared parameter's gradient as the sum
        of its terms, one per step. A network without a recurrence computes its steps in any
        order: one step is spelled out (the last forward, the first backward, where causal
        attention reads, and is read by, the most steps); attention's T × T matrices are
        shown whole (of a network with attention, a small copy: fewer steps, narrower)."""
        model, spec = self.model, ex.spec or self.spec
        length = spec.length
        sizes = {symbol: sp.Integer(n) for symbol, n in ex.widths.items()} or self.sizes
        table_steps = _table_steps(length)
        inputs = [self.sequence_value(model.x.label, ex.x, r"\mathbf{x}"),
                  self.sequence_value(model.y.label, ex.y, r"\mathbf{y}")]
        inputs += self.parameter_lines(ex)
        first = {j: sp.Integer(1), k: sp.Integer(1), i: sp.Integer(1)}
        nodes = self.spelled_nodes()
        timed = {eq for node in nodes for eq in node.equations if _timed_equation(eq)}
        if self.recurrent:
            forward_at = range(1, length + 1) if length <= 4 else (1, 2)
            backward_at = range(length, 0, -1) if length <= 4 else (length, length - 1)
        else:
            forward_at, backward_at = (length,), (1,)
        forward_steps = []
        for step in forward_at:
            lines = []
            for node in nodes:
                for eq in node.equations:
                    if eq in timed:
                        at = {**first, **{index: sp.Integer(1) for index in eq.indices},
                              eq.indices[0]: sp.Integer(step)}
                        result = ex.value(eq.target)[step - 1].flat[0]
                        lines += self.spelled(eq.expr, eq.lhs, ex, at, result, sizes)
            if lines:
                forward_steps.append({"title": self.text("example_step", t=step),
                                      "lines": lines})
        forward_spelled = []
        for node in nodes:
            for eq in node.equations:
                if eq not in timed:
                    at = {**first, **{index: sp.Integer(1) for index in eq.indices}}
                    forward_spelled += self.spelled(eq.expr, eq.lhs, ex, at,
                                                    ex.value(eq.target).flat[0], sizes)
        pairs = self.pair_tensors()
        forward_rows = self.step_rows([(tensor, value) for tensor, value in ex.forward
                                       if tensor not in pairs], table_steps)
        recurrent = {node.index for node in model.nodes if state_tensors(node)}
        group = [f for f in self.derivation.formulas if f.node in recurrent and _is_timed(f)
                 and not f.loss_part]
        # the formulas spelled out: those of the recurrence (and any other at a step t) in
        # the block of each step, backwards in time; the others before or after them, in
        # the derivation's order
        spelled = [f for f in self.spelled_formulas() if f not in group]
        stepped = group + [f for f in spelled if _is_timed(f)]
        stepped.sort(key=self.derivation.formulas.index)
        backward_steps = []
        for step in backward_at:
            lines = []
            for formula in stepped:
                at = {**first, **{index: sp.Integer(1) for index in formula.indices},
                      formula.indices[0]: sp.Integer(step)}
                # attention's error of a score as the notes write it: α (g − Σ α g)
                factored = _common_factor(formula.rhs) if is_whole(formula.vector) else None
                rhs = formula.rhs if factored is None else sp.Mul(
                    factored[0], sp.Add(*_ordered_terms(factored[1]), evaluate=False),
                    evaluate=False)
                lines += self.spelled(rhs, formula.lhs, ex, at,
                                      ex.of(formula)[step - 1].flat[0], sizes,
                                      ordered=factored is not None, sums_kept=True)
            if lines:
                backward_steps.append({"title": self.text("example_step", t=step),
                                       "lines": lines})
        # before the steps what the recurrence reads (the error of the layer above its last
        # state); after them the rest (the gradients)
        read = {tensor_of(e) for f in group for e in _hide_derivatives(f.rhs).atoms(sp.Indexed)}
        backward_spelled, backward_after = [], []
        for formula in spelled:
            if _is_timed(formula):
                continue
            at = {**first, **{index: sp.Integer(1) for index in formula.indices}}
            before = formula.target in read or adjoint_tensor(formula.of) in read
            (backward_spelled if before else backward_after).extend(
                self.spelled(formula.rhs, formula.lhs, ex, at, ex.of(formula).flat[0], sizes))
        backward_rows = self.step_rows(
            [(step_target(f).whole if _is_timed(f) else f.target, value)
             for f, value in ex.backward if (f.kind != "gradient" or value.ndim <= 1)
             and f.target not in pairs and not f.loss_part], table_steps, backward=True)
        sums, gradients = [], []
        for formula, value in ex.backward:
            if formula.kind != "gradient":
                continue
            terms = ex.terms_of(formula)
            shape = ex.value(formula.of).shape
            if terms is not None and length <= 4 and max(shape) <= MAX_NEURONS:
                show = _matrix if value.ndim == 2 else _column
                columns = shape[1] if value.ndim == 2 else 1
                # as many terms to a line as fit the page (about 10 columns of numbers)
                per_line = max(1, 10 // (columns + 1))
                shown = [show(term, _number) for term in terms]
                lines = [" + ".join(shown[n:n + per_line])
                         for n in range(0, len(shown), per_line)]
                parts = " \\\\\n  &\\quad + ".join(lines)
                sums.append(f"{latex(formula.target)} &= {latex(formula.vector)} \\\\\n"
                            f"  &= {parts} \\\\\n  &= {show(value, _number)}")
            elif value.ndim == 2:
                gradients.append(f"{latex(formula.target)} = {_matrix(value, _fixed, shape)}")
        text = [self.example_intro(ex)]
        if ex.small:
            text.append(self.example_small(ex))
        text.append(self.t["example_sequence"])
        if len(table_steps) < length:
            text.append(self.text("example_steps_cut", T=length, shown=", ".join(
                str(s) for s in table_steps if s is not None)))
        wide = max(spec.sizes) > MAX_NEURONS
        attention_forward, attention_backward = self.attention_values(ex)
        return {
            "text": self.t["sentence_gap"].join(text),
            "truncated": self.text("example_truncated", limit=MAX_NEURONS,
                                   shown=SHOWN_NEURONS) if wide else "",
            "inputs": inputs, "input_maps": [],
            "forward_steps": forward_steps,
            "forward_steps_text": self.text("example_forward_steps" if self.recurrent
                                            else "example_forward_one_step", t=length,
                                            zero=self.zero_state()),
            "forward_spelled": forward_spelled, "forward_maps": [],
            "forward": self.value_table(forward_rows),
            "attention_forward": attention_forward,
            "loss": f"C = {_number(ex.loss)}",
            "penalty": f"R = {_number(ex.penalty)}" if self.penalized else "",
            "backward_steps": backward_steps,
            "backward_steps_text": self.text("example_backward_steps" if self.recurrent
                                             else "example_backward_one_step", t=1),
            "backward_spelled": backward_spelled,
            "backward_text": self.t["example_backward_text"],
            "backward_after": backward_after,
            "backward_after_text": self.text("example_gradient_entries" if self.recurrent
                                             else "example_gradient_entries_steps"),
            "backward": self.value_table(backward_rows),
            "attention_backward": attention_backward,
            "indicators": [], "backward_maps": [],
            "sums": sums,
            "gradients_text": self.t["example_sums"] if sums else self.t[
                "example_gradients_penalty" if self.penalized else "example_gradients"],
            "gradients": gradients,
        }

    def example_small(self, ex: WorkedExample) -> str:
        """Why the example's network is smaller than the one derived, and its sizes."""
        shapes = r" \to ".join(_dims(shape) for shape in ex.spec.shapes)
        return self.text("example_small", T=self.spec.length, t=ex.spec.length,
                         n=max(self.spec.sizes), m=max(ex.spec.sizes), shapes=f"${shapes}$")

    def pair_tensors(self) -> set[NetTensor]:
        """The quantities over two time axes (attention's scores and weights, T × T) and
        their adjoints: the example shows them as matrices, not row by row."""
        out = set()
        for eq in self.model.equations:
            if len(eq.indices) == 2 and all(index_family(index) == "time" for index in eq.indices):
                out |= {eq.target, adjoint_tensor(eq.target)}
        return out

    def attention_values(self, ex: WorkedExample) -> tuple[list[dict[str, Any]],
                                                           list[dict[str, Any]]]:
        """The T × T matrices of each attention layer in the example: the scores and the
        weights with the row sums of α (1), then ∇_α C and ∇_S C with the row sums of ∇_S C
        (0: a softmax does not change when all the scores of a row move together)."""
        forward, backward = [], []
        by_role = {(formula.node, formula.of.role): (formula, value)
                   for formula, value in ex.backward}
        for node in self.attention:
            lines, sums = [], []
            for eq in node.equations:
                if eq.target.role in ("s", "alpha"):
                    lines.append(f"{latex(eq.target)} = {_matrix(ex.value(eq.target), _fixed)}")
                if eq.target.role == "alpha":
                    sums.append(rf"\operatorname{{rowsum}}\!\left({latex(eq.target)}\right) = "
                                rf"{_column(ex.value(eq.target).sum(axis=-1), _fixed)}")
            forward.append({"text": self.text("example_attention_forward", l=node.index),
                            "math": [*_side_by_side(lines, ex.spec.length), *sums]})
            lines, sums = [], []
            for role in ("alpha", "s"):
                if (node.index, role) not in by_role:
                    continue
                formula, value = by_role[node.index, role]
                lines.append(f"{latex(step_target(formula))} = {_matrix(value, _fixed)}")
                if role == "s":
                    sums.append(rf"\operatorname{{rowsum}}\!\left({latex(step_target(formula))}"
                                rf"\right) = {_column(value.sum(axis=-1), _fixed)}")
            if lines:
                backward.append({"text": self.text("example_attention_backward", l=node.index),
                                 "math": [*_side_by_side(lines, ex.spec.length), *sums]})
        return forward, backward

    def spelled(self, expr: sp.Expr, lhs: sp.Expr, ex: WorkedExample, at: dict,
                result: float, sizes: dict | None = None, ordered: bool = False,
                sums_kept: bool = False) -> list[str]:
        # a line of its own for each: longer sums than in a table of layers (a step of a
        # recurrence reads the input, the state before and the bias)
        text = _spelled(expr, lhs, ex.lookup, sizes or self.sizes, at, result,
                        inside=ex.inside, max_terms=SPELLED_TERMS, budget=SPELLED_BUDGET,
                        flat=True, ordered=ordered, sums_kept=sums_kept)
        return [] if text is None else [text]

    def sequence_value(self, tensor: NetTensor, value: np.ndarray, symbol: str) -> str:
        """x (or y) of the example: a sequence one step per row, [x_1ᵀ; x_2ᵀ; ...] = [...];
        a vector as a column."""
        if value.ndim == 1:
            return f"{latex(tensor)} = {_column(value, _short)}"
        length = value.shape[0]
        # a long sequence: its first and last steps, which the worked steps read
        picks: list[int | None] = list(range(length)) if length <= MAX_NEURONS else [
            *range(EDGE_STEPS), None, *range(length - EDGE_STEPS, length)]
        steps = [r"\vdots" if s is None else f"{symbol}_{{{s + 1}}}^{{\\top}}" for s in picks]
        return (r"\begin{bmatrix}" + r" \\ ".join(steps) + r"\end{bmatrix} = "
                + _matrix(value, _short, picks=picks))

    def step_rows(self, values: list[tuple[NetTensor, np.ndarray]],
                  steps: list[int | None], *, backward: bool = False
                  ) -> list[dict[str, Any]]:
        """Rows of a value table: a sequence quantity once per step shown (in the order of
        the steps: forward in time, or backwards), each row its vector at that step; then
        the quantities without steps."""
        scalars = self.per_step_scalars()
        sequences = [(tensor, value) for tensor, value in values
                     if (value.ndim == 2 or tensor in scalars) and not tensor.is_parameter]
        rows = []
        order = list(reversed(steps)) if backward else steps
        for step in order:
            if step is None:
                rows.append({"name": r"$\vdots$", "values": []})
                continue
            for tensor, value in sequences:
                rows.append(self.value_row(_step_symbol(tensor, step), value[step - 1]))
        for tensor, value in values:
            if value.ndim <= 1 and tensor not in scalars:
                name = latex(entry(tensor, (j,) * tensor.rank)) if tensor.role != "grad" \
                    else latex(sp.Derivative(C, entry(tensor.target, (j,) * tensor.rank),
                                             evaluate=False))
                rows.append(self.value_row(name, value))
        return rows

    def per_step_scalars(self) -> set[NetTensor]:
        """The quantities with one value per step (a layer norm's μ_t and σ²_t on a sequence)
        and their adjoints: a row of one value at each step in the example's tables."""
        out = set()
        for tensor, shape in self.model.shapes.items():
            if tuple(shape) == (LENGTH,) and not tensor.is_parameter:
                out |= {tensor, adjoint_tensor(tensor)}
        return out

    # -- feature maps in the worked example --

    def map_lines(self, symbol: NetTensor | str, value: np.ndarray,
                  fmt: Callable[[float], str]) -> list[str]:
        """A feature map (channels, rows, columns) channel by channel: a^{1}_{1··} = [...];
        the first MAX_MAPS channels, as many to a line as fit."""
        name = symbol if isinstance(symbol, str) else _slice_symbol(symbol)
        parts = [f"{name}_{{{c + 1}\\cdot\\cdot}} = {_matrix(value[c], fmt)}"
                 for c in range(min(value.shape[0], MAX_MAPS))]
        return _side_by_side(parts, _shown(value.shape[-1]) + (value.shape[-1] > MAX_NEURONS))

    def kernel_lines(self, symbol: NetTensor, value: np.ndarray,
                     fmt: Callable[[float], str]) -> list[str]:
        """A kernel (or its gradient) as the matrices w_{jk··} of its first MAX_MAPS
        (output, input) channel pairs, as many to a line as fit."""
        pairs = [(o, c) for o in range(value.shape[0]) for c in range(value.shape[1])]
        tensor = symbol.target if symbol.role == "grad" else symbol
        parts = []
        for o, c in pairs[:MAX_MAPS]:
            name = f"{_slice_symbol(tensor)}_{{{o + 1}{c + 1}\\cdot\\cdot}}"
            if symbol.role == "grad":
                name = rf"\frac{{\partial C}}{{\partial {name}}}"
            parts.append(f"{name} = {_matrix(value[o, c], fmt)}")
        return _side_by_side(parts, _shown(value.shape[-1]) + (value.shape[-1] > MAX_NEURONS))

    def example_maps(self, ex: WorkedExample) -> dict[str, list]:
        """The feature maps of the example: the input image and the kernels, every map of
        the forward pass, the max-pooling indicators, the errors δ of the maps."""
        inputs = self.map_lines(self.model.x.label, ex.x, _short)
        for node in self.model.nodes:
            for parameter in node.parameters:
                value = ex.parameters[parameter.key]
                if value.ndim == 4 and node.op.name == "conv2d":
                    inputs += self.kernel_lines(parameter.tensor, value, _short)
        forward = [line for tensor, value in ex.forward if value.ndim == 3
                   for line in self.map_lines(tensor, value, _number)]
        indicators = []
        for node, value in ex.indicators:
            indicators.append({"text": self.text("example_indicator", l=node),
                               "lines": self.map_lines(rf"\mathbb{{1}}^{{{node}}}", value,
                                                       _short)})
        backward = []
        for formula, value in ex.backward:
            if value.ndim == 3:
                symbol = formula.of if formula.kind == "delta" else formula.target
                if formula.kind == "delta":
                    symbol = NetTensor("delta", formula.node, rank=3)
                backward += self.map_lines(symbol, value, _number)
        return {"inputs": inputs, "forward": forward, "indicators": indicators,
                "backward": backward}

    def spelled_nodes(self) -> list[Node]:
        """The layers whose forward pass the example spells out: the first and last of a
        chain; in a graph the first layer of each kind (op and activation)."""
        if self.chain:
            return [self.model.node(l) for l in sorted({1, self.model.depth})]
        seen: set[tuple] = set()
        out = []
        for node in self.model.nodes:
            kind = (node.op.name, node.activation.name if node.activation else None)
            if kind not in seen:
                seen.add(kind)
                out.append(node)
        return out

    def spelled_formulas(self) -> list[Formula]:
        """The formulas the example spells out: δ^L, δ^{L-1} and the gradients of layer L of
        a chain; in a graph the first of each kind (op, kind of formula, quantity)."""
        d, L = self.derivation, self.model.depth
        if self.chain:
            out = [d.delta(L)] + ([d.delta(L - 1)] if L > 1 else [])
            return out + [f for f in (d.bias_gradients[L - 1], d.weight_gradients[L - 1])
                          if f is not None]
        seen: set[tuple] = set()
        out = []
        for formula in d.formulas:
            if formula.kind == "loss gradient":
                continue
            node = self.model.node(formula.node)
            kind = (node.op.name, node.activation.name if node.activation else None,
                    formula.kind, formula.of.role)
            if kind not in seen:
                seen.add(kind)
                out.append(formula)
        return out

    def value_row(self, name: str, value: np.ndarray) -> dict[str, Any]:
        return {"name": f"${name}$", "values": list(np.ravel(value))}

    def value_table(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows of values by neuron j; when a layer is wider than MAX_NEURONS every row shows
        its first SHOWN_NEURONS values and an ellipsis."""
        cut = any(len(row["values"]) > MAX_NEURONS for row in rows)
        shown = SHOWN_NEURONS if cut else max(len(row["values"]) for row in rows)
        width = shown + (1 if cut else 0)
        out = []
        for row in rows:
            values = row["values"]
            cells = [f"${_number(v)}$" for v in values[:shown]]
            if len(values) > shown:
                cells.append(r"$\cdots$")
            out.append({"name": row["name"], "cells": cells + [""] * (width - len(cells))})
        head = [self.t["col_quantity"]] + [f"$j = {n}$" if n == 1 else f"${n}$"
                                           for n in range(1, shown + 1)]
        head += [""] * (width + 1 - len(head))
        return {"head": head, "rows": out, "columns": "r" * width,
                "long": len(rows) > LONG_TABLE_ROWS}



def _packed_parts(parts: list[str]) -> list[str]:
    """``name = matrix`` parts side by side, as many to a line as fit the page (about 12
    columns of numbers, a column vector counting as one)."""
    def columns(part: str) -> int:
        rows = part.split(r"\begin{bmatrix}")[-1].split(r"\\")
        return max(row.count("&") + 1 for row in rows) + 2

    lines: list[list[str]] = []
    for part in parts:
        if lines and sum(map(columns, lines[-1])) + columns(part) <= 14:
            lines[-1].append(part)
        else:
            lines.append([part])
    return [r",\quad ".join(line) for line in lines]


def _timed_equation(eq: Equation) -> bool:
    return bool(eq.indices) and index_family(eq.indices[0]) == "time"


def _table_steps(length: int) -> list[int | None]:
    """The steps the example's tables show: all of a short sequence, else 1, 2, T-1, T."""
    return list(range(1, length + 1)) if length <= 4 else [1, 2, None, length - 1, length]


def _step_symbol(tensor: NetTensor, step: int) -> str:
    """A quantity's vector at a concrete step: \\mathbf{h}^{1}_{2}, \\nabla_{\\mathbf{c}^{1}_{3}} C;
    a value per step: \\mu^{3}_{2}, (\\sigma^{3}_{2})^{2}, \\frac{\\partial C}{\\partial \\mu^{3}_{2}}."""
    target = tensor.target if tensor.role == "grad" else tensor
    scalar = target.rank == 1                      # one value per step
    symbol = NetTensor(target.role, target.node, rank=0 if scalar else 1)
    name = DeriveLatexPrinter()._tensor_symbol(symbol, step=f"_{{{step}}}")
    if not scalar:
        name += f"_{{{step}}}"
    if tensor.role == "grad":
        if scalar:
            return rf"\frac{{\partial C}}{{\partial {name}}}"
        return rf"\nabla_{{{name}}} C"
    return name

def _column(values: Sequence[float] | np.ndarray, fmt: Callable[[float], str]) -> str:
    """A column vector as a bmatrix (long ones in part, with a vertical ellipsis)."""
    values = list(np.ravel(values))
    rows = [fmt(v) for v in values[:SHOWN_NEURONS]] if len(values) > MAX_NEURONS else [
        fmt(v) for v in values]
    if len(values) > MAX_NEURONS:
        rows.append(r"\vdots")
    return r"\begin{bmatrix}" + r" \\ ".join(rows) + r"\end{bmatrix}"


def _shown(n: int) -> int:
    """How many entries of an axis of length n the tables and matrices print."""
    return SHOWN_NEURONS if n > MAX_NEURONS else n


#: The steps at each end of a long sequence that the worked example's input shows
EDGE_STEPS = 3


def _matrix(rows: Sequence[Sequence[float]] | np.ndarray, fmt: Callable[[float], str],
            shape: tuple[int, int] | None = None,
            picks: Sequence[int | None] | None = None) -> str:
    """A matrix as a bmatrix, at most SHOWN_NEURONS rows and columns of a large one; ``shape``
    is the whole matrix's when ``rows`` holds only the block shown. ``picks``: the rows to
    show instead (None for a row of dots)."""
    rows = np.asarray(rows, dtype=np.float64)
    n_rows, n_cols = shape or rows.shape
    cut_cols = n_cols > MAX_NEURONS
    if picks is None:
        picks = [*range(SHOWN_NEURONS), None] if n_rows > MAX_NEURONS else range(len(rows))
    lines = []
    for pick in picks:
        if pick is None:
            cells = [r"\vdots"] * (SHOWN_NEURONS if cut_cols else n_cols)
            cells += [r"\ddots"] if cut_cols else []
        else:
            row = rows[pick]
            cells = [fmt(v) for v in (row[:SHOWN_NEURONS] if cut_cols else row)]
            cells += [r"\cdots"] if cut_cols else []
        lines.append(" & ".join(cells))
    return r"\begin{bmatrix}" + r" \\ ".join(lines) + r"\end{bmatrix}"


# --- the network diagram -------------------------------------------------------------------


def diagram(sizes: Sequence[int], activations: Sequence[str], input_label: str = "input",
            ) -> dict[str, Any]:
    """Neuron and edge coordinates (cm) of the drawing of a dense chain; wide layers are
    elided."""
    depth = len(sizes) - 1
    dx = min(3.6, 14.0 / max(depth, 1))
    dy = 1.25
    columns = []
    for l, n in enumerate(sizes):
        slots: list[int | None] = list(range(1, n + 1)) if n <= MAX_NEURONS else [
            1, 2, 3, None, n - 1, n]
        top = (len(slots) - 1) / 2 * dy
        nodes = []
        for s, neuron in enumerate(slots):
            y = top - s * dy
            name = f"l{l}n{neuron}" if neuron is not None else f"l{l}dots"
            style = "input" if l == 0 else ("output" if l == depth else "neuron")
            nodes.append({"ref": f"({name})", "at": f"({l * dx:.2f},{y:.2f})",
                          "neuron": neuron, "style": style,
                          "label": f"a^{{{l}}}_{{{neuron}}}" if neuron is not None else ""})
        columns.append({"l": l, "nodes": nodes, "x": f"{l * dx:.2f}",
                        "head": input_label if l == 0 else f"$l = {l}$",
                        "activation": _escape(activations[l - 1]) if l else "",
                        "n": n})
    highest = max((len(col["nodes"]) - 1) / 2 * dy for col in columns)
    for col in columns:
        col["top"] = f"({col['x']},{highest + 0.6:.2f})"
        col["bottom"] = f"({col['x']},{-highest - 0.6:.2f})"
    edges = []
    for left, right in itertools.pairwise(columns):
        for a in left["nodes"]:
            for b in right["nodes"]:
                if a["neuron"] is not None and b["neuron"] is not None:
                    edges.append({"from": a["ref"], "to": b["ref"]})
    return {"columns": columns, "edges": edges, "radius": "0.45" if dx >= 1.6 else "0.38",
            "labelled_edge": {"from": columns[-2]["nodes"][0]["ref"],
                              "to": columns[-1]["nodes"][0]["ref"],
                              "label": f"w^{{{depth}}}_{{11}}"}}


def _colon(label: str) -> str:
    """The colon after a diagram's label: full-width after a Chinese one."""
    return "：" if _is_chinese(label[-1:]) else ": "


def _cost_node(cost_label: str, model: Model) -> str:
    """The diagram's cost node: the label, C and the loss's name."""
    return rf"{_escape(cost_label)} $C${_colon(cost_label)}\texttt{{{_escape(model.loss.name)}}}"


def graph_diagram(model: Model, input_label: str = "input", cost_label: str = "cost",
                  ) -> dict[str, Any]:
    """Boxes and arrows (cm) of the drawing of a graph: one box per layer, top to bottom,
    an arrow from each layer to every layer that reads it; an arrow that skips layers runs
    on the right, further out the more layers it spans over others."""
    count = model.depth + 2
    dy = 1.05
    boxes = [{"ref": "(n0)", "west": "(n0.west)", "at": "(0,0)", "style": "input",
              "side": "$l = 0$",
              "text": rf"{_escape(input_label)}: $\mathbf{{a}}^{{0}} \in "
                      rf"\mathbb{{R}}^{{{model.spec.input}}}$"}]
    for node in model.nodes:
        details = [rf"\texttt{{{_escape(node.op.name)}}}"]
        if node.activation is not None and not (node.op.name == "dense"
                                                and node.activation.name == "identity"):
            details.append(rf"\texttt{{{_escape(node.activation.name)}}}")
        for key, value in node.options:
            if key == "rate":
                details.append(f"$p = {_short(value)}$")
        name = rf" \textit{{({_escape(node.name)})}}" if node.name else ""
        text = ", ".join(details) + rf"{name}: $\mathbb{{R}}^{{{node.width}}}$"
        style = "output" if node.index == model.depth else "op"
        boxes.append({"ref": f"(n{node.index})", "west": f"(n{node.index}.west)",
                      "at": f"(0,{-node.index * dy:.2f})",
                      "style": style, "side": f"$l = {node.index}$", "text": text})
    boxes.append({"ref": "(cost)", "west": "(cost.west)",
                  "at": f"(0,{-(model.depth + 1) * dy:.2f})", "style": "cost",
                  "side": "", "text": _cost_node(cost_label, model)})
    straight, skips = [], []
    for node in model.nodes:
        for source in node.inputs:
            if source == node.index - 1:
                straight.append({"from": f"(n{source}.south)", "to": f"(n{node.index}.north)"})
            else:
                skips.append((source, node.index))
    straight.append({"from": f"(n{model.depth}.south)", "to": "(cost.north)"})
    placed: list[tuple[int, int, int]] = []
    curved = []
    for source, target in sorted(skips, key=lambda s: (s[1] - s[0], s[0])):
        level = 1 + max((lvl for a, b, lvl in placed if a < target and source < b), default=0)
        placed.append((source, target, level))
        curved.append({"from": f"(n{source}.east)", "to": f"(n{target}.east)",
                       "out": f"({0.35 + 0.45 * level:.2f},0)"})
    # a deep graph is drawn smaller, to fit the page (about 21 cm of it)
    scale = min(1.0, 21.0 / (count * dy))
    return {"boxes": boxes, "edges": straight, "skips": curved, "scale": f"{scale:.2f}"}
def _arrow_label(node: Node) -> str:
    """What an arrow into a layer does: ``conv $3\times 3$, $P = 1$``, ``max $2\times 2$``."""
    options = dict(node.options)
    parts = [_escape(node.op.label or node.op.name)]
    if "kernel" in options:
        parts[0] += rf" ${options['kernel'][0]}\times {options['kernel'][1]}$"
    strides = []
    # what is not the op's default: a pooling layer's stride is its kernel, a convolution's 1
    pooling = node.op.name != "conv2d"
    defaults = {"stride": options.get("kernel") if pooling else (1, 1), "padding": (0, 0)}
    for key, symbol in (("stride", "S"), ("padding", "P")):
        value = options.get(key)
        if value is not None and tuple(value) != tuple(defaults[key]):
            strides.append(f"${symbol} = {_pair(value)}$")
    if strides:
        parts.append(", ".join(strides))
    if node.activation is not None and node.activation.name != "identity":
        parts.append(rf"\texttt{{{_escape(node.activation.name)}}}")
    return r"\\ ".join(parts)     # one line each: the op, its stride and padding, σ


def map_diagram(model: Model, input_label: str = "input", cost_label: str = "cost",
                ) -> dict[str, Any]:
    """Boxes and arrows (cm) of the drawing of a convolutional network, left to right: a
    stack of rectangles per feature map (height and width after its rows and columns,
    labelled channels × rows × columns), a bar per vector, an arrow per layer labelled with
    what it does (its kernel, stride and padding), skip connections as arcs above."""
    shapes = [model.spec.input_shape, *((node.dims or (node.width,)) for node in model.nodes)]
    largest = max(max(shape[1:]) for shape in shapes if len(shape) == 3)
    dx = 3.0
    boxes = []
    for n, shape in enumerate(shapes):
        x = n * dx
        if len(shape) == 3:
            channels, rows, cols = shape
            height = 0.5 + 1.7 * rows / largest
            width = 0.3 + 0.9 * cols / largest
            layers = min(channels, 3)
        else:
            height, width, layers = 2.2, 0.3, 1
        sheets = [{"from": f"({x - width / 2 + 0.12 * t:.2f},{-height / 2 - 0.12 * t:.2f})",
                   "to": f"({x + width / 2 + 0.12 * t:.2f},{height / 2 - 0.12 * t:.2f})"}
                  for t in reversed(range(layers))]
        style = "input" if n == 0 else ("output" if n == len(shapes) - 1 else "map")
        boxes.append({"sheets": sheets, "style": style, "ref": f"(m{n})",
                      "at": f"({x:.2f},0)", "east": f"({x + width / 2 + 0.05:.2f},0)",
                      "west": f"({x - width / 2 - 0.05:.2f},0)",
                      "label": f"${_dims(shape)}$",
                      "below": f"({x:.2f},{-1.45 - 0.12 * (layers - 1):.2f})",
                      "above": f"({x:.2f},1.45)",
                      "head": _escape(input_label) if n == 0 else f"$l = {n}$"})
    arrows = []
    for node in model.nodes:
        for source in node.inputs:
            if source == node.index - 1:
                arrows.append({"from": boxes[source]["east"], "to": boxes[node.index]["west"],
                               "label": _arrow_label(node), "skip": False})
            else:
                arrows.append({"from": f"({source * dx:.2f},1.75)",
                               "to": f"({node.index * dx:.2f},1.75)",
                               "label": _arrow_label(node), "skip": True})
    cost_x = len(shapes) * dx - 0.6
    count = len(shapes) + 1
    return {"boxes": boxes, "arrows": arrows,
            "cost": {"at": f"({cost_x:.2f},0)", "from": boxes[-1]["east"],
                     "text": rf"{_escape(cost_label)} $C$"},
            # the page is about 16 cm wide
            "scale": f"{min(1.0, 15.5 / (count * dx)):.2f}"}


# --- sequences: the unrolled network --------------------------------------------------------


def _is_timed(formula: Formula) -> bool:
    """Whether a formula holds at a generic time step t (its first free index)."""
    return bool(formula.indices) and index_family(formula.indices[0]) == "time"


def step_target(formula: Formula) -> NetTensor:
    """What a formula computes, in tensor form: δ^l_t rather than δ^l for a formula at a
    generic step t (its tensor form is read at that step); the whole sequence (∇_S C, every
    step of one sample, a row per step) for one whose tensor form reads whole sequences."""
    target = formula.target
    if _is_timed(formula) and target.step is None and not is_whole(formula.vector):
        return target.at_step(0)
    return target


def equation_target(eq: Equation, rhs: sp.Expr | None = None) -> NetTensor:
    """The target of a forward equation in tensor form: h^l_t for one at a step t; the whole
    sequence S^l where its tensor form ``rhs`` reads whole sequences (attention)."""
    timed = bool(eq.indices) and index_family(eq.indices[0]) == "time"
    whole = rhs is not None and is_whole(rhs)
    return eq.target.at_step(0) if timed and not whole else eq.target


def state_tensors(node: Node) -> list[NetTensor]:
    """The quantities a recurrent layer carries from one step to the next (read by its own
    equations at the step before): h, and an LSTM's c; none for another layer."""
    timed = recurrent_equations(node)
    targets = {eq.target for eq in timed}
    carried: list[NetTensor] = []
    for eq in timed:
        for found in sorted(eq.expr.atoms(sp.Indexed), key=sp.default_sort_key):
            tensor = tensor_of(found)
            if tensor in targets and shifted_step(found.indices[0], eq.indices[0]) and \
                    tensor not in carried:
                carried.append(tensor)
    return sorted(carried, key=lambda tensor: (tensor.role != "h", tensor.role))


def _shown_steps(length: int) -> list[int | None]:
    """The steps a drawing or table shows: all of a short sequence, else 1, 2, ..., T
    (None marks the steps left out)."""
    return list(range(1, length + 1)) if length <= 4 else [1, 2, None, length]


def _vector_name(tensor: NetTensor) -> str:
    """A quantity's vector symbol, without a step: \\mathbf{h}^{1}."""
    return latex(NetTensor(tensor.role, tensor.node, rank=1))


def unrolled_diagram(model: Model, input_label: str = "input", cost_label: str = "cost",
                     ) -> dict[str, Any]:
    """Boxes and arrows (cm) of a sequence network unrolled in time: one column per step
    (steps 1, 2 and T of a long sequence, with dots between), one row per layer from the
    input at the bottom; a recurrent layer's row starts with its initial state h_0 = 0, and
    horizontal arrows carry its state from step to step through W_h; a layer that returns
    only its last state feeds the layers above it at step T alone."""
    length = model.spec.length
    steps = _shown_steps(length)
    states = {node.index: state_tensors(node) for node in model.nodes}
    wide = any(len(found) > 1 for found in states.values())
    dx, dy = (3.1 if wide else 2.5), 1.45
    per_step = {0: True}
    for node in model.nodes:
        per_step[node.index] = bool(states[node.index]) or len(node.dims) == 2
    boxes, edges, recurrent = [], [], []
    last = len(steps) - 1
    for l in range(model.depth + 1):
        y = f"{l * dy:.2f}"
        style = "input" if l == 0 else ("output" if l == model.depth else (
            "state" if states.get(l) else "op"))
        columns = range(len(steps)) if per_step[l] else [last]
        for c in columns:
            step = steps[c]
            ref = f"(s{l}c{c})"
            at = f"({(c + 1) * dx:.2f},{y})"
            if step is None:
                boxes.append({"ref": ref, "at": at, "style": "dots", "label": r"\cdots"})
                continue
            if l == 0:
                label = rf"\mathbf{{x}}_{{{step}}}"
            elif states.get(l):
                label = ",\\ ".join(f"{_vector_name(s)}_{{{step}}}" for s in states[l])
            elif per_step[l]:
                label = f"{_vector_name(model.node(l).output)}_{{{step}}}"
            else:
                label = _vector_name(model.node(l).output)
            boxes.append({"ref": ref, "at": at, "style": style, "label": label})
        if states.get(l):
            zero = " = ".join(f"{_vector_name(s)}_{{0}}" for s in states[l]) + r" = \mathbf{0}"
            boxes.append({"ref": f"(s{l}c-1)", "at": f"(0,{y})", "style": "zero",
                          "label": zero})
            node = model.node(l)
            weight = node.parameter("wh")
            label = latex(weight.tensor) if weight is not None else ""
            for c in range(-1, last):
                dotted = c >= 0 and steps[c] is None or steps[c + 1] is None
                recurrent.append({"from": f"(s{l}c{c})", "to": f"(s{l}c{c + 1})",
                                  "label": "" if dotted else label})
        if l == 0:
            continue
        for source in model.node(l).inputs:
            for c in columns:
                if steps[c] is None:
                    continue
                below = c if per_step[source] else last
                edges.append({"from": f"(s{source}c{below})", "to": f"(s{l}c{c})"})
    top = model.depth * dy + dy
    middle = (len(steps) + 1) / 2 * dx
    cost = {"at": f"({middle:.2f},{top:.2f})",
            "text": _cost_node(cost_label, model)}
    outputs = [box for box in boxes if box["style"] == "output"]
    width = (len(steps) + 1) * dx + 2.5
    return {"boxes": boxes, "edges": edges, "recurrent": recurrent, "cost": cost,
            "cost_edges": [{"from": box["ref"], "to": "(cost)"} for box in outputs],
            "heads": [{"at": f"({(c + 1) * dx:.2f},-0.75)",
                       "text": "" if step is None else (
                           f"$t = {step}$" if length <= 4 or step != length
                           else f"$t = T = {step}$")}
                      for c, step in enumerate(steps)],
            "sides": [{"at": f"({-2.1 if wide else -1.4:.2f},{l * dy:.2f})",
                       "text": f"$l = {l}$"} for l in range(model.depth + 1)],
            "scale": f"{min(1.0, 15.5 / width):.2f}"}


def unrolled_text(model: Model) -> list[str]:
    """The unrolled network as lines of text (Markdown): the same rows and columns as
    :func:`unrolled_diagram`, with ─→ for the recurrent arrows and ↑ for a layer reading the
    one below."""
    steps = _shown_steps(model.spec.length)
    states = {node.index: state_tensors(node) for node in model.nodes}
    per_step = {0: True, **{node.index: bool(states[node.index]) or len(node.dims) == 2
                            for node in model.nodes}}

    def name(tensor: NetTensor, step: int | None) -> str:
        text = pretty(NetTensor(tensor.role, tensor.node, rank=0))
        return text + ("" if step is None else sub(step))

    labels: dict[tuple[int, int], str] = {}
    for l in range(model.depth + 1):
        for c, step in enumerate(steps):
            if not per_step[l] and c != len(steps) - 1:
                continue
            if step is None:
                labels[l, c] = "⋯"
            elif l == 0:
                labels[l, c] = "x" + sub(step)
            elif states[l]:
                labels[l, c] = ",".join(name(s, step) for s in states[l])
            else:
                labels[l, c] = name(model.node(l).output, step if per_step[l] else None)
    zeros = {l: "=".join(name(s, 0) for s in found) + "=0" for l, found in states.items()
             if found}
    first = max([len(z) for z in zeros.values()] + [5]) + 4
    cell = max(len(text) for text in labels.values()) + 6
    width = first + cell * len(steps)

    def center(c: int) -> int:
        return first + c * cell + cell // 2

    def placed(line: list[str], text: str, middle: int) -> tuple[int, int]:
        start = middle - len(text) // 2
        line[start:start + len(text)] = list(text)
        return start, start + len(text)

    out = []
    for l in range(model.depth, -1, -1):
        line = [" "] * width
        spans = {}
        for (row, c), text in labels.items():
            if row == l:
                spans[c] = placed(line, text, center(c))
        if l in zeros:
            spans[-1] = placed(line, zeros[l], first // 2 - 1)
            for c in range(-1, len(steps) - 1):
                begin, end = spans[c][1] + 1, spans[c + 1][0] - 1
                line[begin:end] = list("─" * (end - begin - 1) + "→")
        out.append("".join(line).rstrip())
        if l > 0:
            arrows = [" "] * width
            for (row, c) in labels:
                if row == l and steps[c] is not None:
                    arrows[center(c)] = "↑"
            out.append("".join(arrows).rstrip())
    heads = [" "] * width
    for c, step in enumerate(steps):
        if step is not None:
            placed(heads, f"t={step}", center(c))
    out.append("".join(heads).rstrip())
    return out


# --- attention: the block diagram -----------------------------------------------------------


def _box_text(node: Node) -> str:
    """What a layer's box of the block diagram says: its op (and activation, its width d for
    attention), its name."""
    parts = [rf"\texttt{{{_escape(node.op.name)}}}"]
    if node.activation is not None and not (node.op.name == "dense"
                                            and node.activation.name == "identity"):
        parts.append(rf"\texttt{{{_escape(node.activation.name)}}}")
    if node.reads_whole_sequences:
        parts.append(f"$d = {node.width}$")
        if dict(node.options).get("causal"):
            parts.append(r"\textit{causal}")
    name = rf" \textit{{({_escape(node.name)})}}" if node.name else ""
    return ", ".join(parts) + name


def _attention_line(node: Node) -> str:
    """The second line of an attention layer's box: its weights and its output at step t, in
    the notation of the equations (entries of the layer's own quantities)."""
    t, tau = INDEX_POOL[8], sp.Symbol("tau", integer=True, positive=True)
    alpha = latex(NetTensor("alpha", None, rank=2).indexed[t, tau])
    q, key, v = (latex(NetTensor(role, None, rank=1)) for role in ("q", "k", "v"))
    over = r"\tau \le t" if dict(node.options).get("causal") else r"\tau"
    return (rf"${alpha} = \operatorname{{softmax}}_{{{over}}}\bigl({q}_{{t}} \cdot "
            rf"{key}_{{\tau}} / \sqrt{{d}}\bigr)$, $\ \mathbf{{a}}_{{t}} = \sum_{{{over}}} "
            rf"{alpha}\, {v}_{{\tau}}$")


def block_diagram(model: Model, input_label: str = "input", cost_label: str = "cost",
                  detail_label: str = "") -> dict[str, Any]:
    """Nodes and paths (cm) of the drawing of a network with attention, bottom to top as a
    transformer block is drawn: one box per layer (an add is a circle ⊕), an arrow from each
    layer to the next, a residual connection on the left to the add that reads it, the cost
    at the top; beside it the first attention layer unrolled over the steps (steps 1, 2 and T
    of a long sequence): the input x_τ of every step, its query, key and value, and the
    output a_t of every step reading the values v_τ of every step (τ ≤ t when causal) with
    the weights α_{tτ}, those into a_2 labelled."""
    dy = 1.05
    nodes: list[dict[str, str]] = [
        {"ref": "(n0)", "at": "(0,0)", "style": "input",
         "text": rf"{_escape(input_label)}: $\mathbf{{x}}_{{1}}, \dots, \mathbf{{x}}_{{T}}$, "
                 rf"${_dims(model.spec.input_shape)}$"}]
    labels: list[dict[str, str]] = [{"at": "(n0.east)", "text": "$l = 0$"}]
    for node in model.nodes:
        at = f"(0,{node.index * dy:.2f})"
        ref = f"n{node.index}"
        if node.op.name == "add":
            nodes.append({"ref": f"({ref})", "at": at, "style": "add", "text": "$+$"})
            labels.append({"at": f"({ref}.east)",
                           "text": rf"$l = {node.index}$: {_box_text(node)}, "
                                   rf"${_dims(node.dims or (node.width,))}$"})
            continue
        style = ("output" if node.index == model.depth else "attention"
                 if node.reads_whole_sequences else "norm" if node.op.name == "layer_norm"
                 else "op")
        text = rf"{_box_text(node)}: ${_dims(node.dims or (node.width,))}$"
        if node.reads_whole_sequences:
            text = rf"{text}\\ {{\scriptsize {_attention_line(node)}}}"
        nodes.append({"ref": f"({ref})", "at": at, "style": style, "text": text})
        labels.append({"at": f"({ref}.east)", "text": f"$l = {node.index}$"})
    top = (model.depth + 1) * dy
    nodes.append({"ref": "(cost)", "at": f"(0,{top:.2f})", "style": "cost",
                  "text": _cost_node(cost_label, model)})
    paths: list[dict[str, str]] = []
    skips = []
    for node in model.nodes:
        for source in node.inputs:
            if source == node.index - 1:
                paths.append({"style": "edge", "from": f"(n{source}.north)",
                              "to": f"(n{node.index}.south)", "via": "--"})
            else:
                skips.append((source, node.index))
    paths.append({"style": "edge", "from": f"(n{model.depth}.north)", "to": "(cost.south)",
                  "via": "--"})
    placed: list[tuple[int, int, int]] = []
    for source, target in sorted(skips, key=lambda s: (s[1] - s[0], s[0])):
        level = 1 + max((lvl for a, b, lvl in placed if a < target and source < b), default=0)
        placed.append((source, target, level))
        paths.append({"style": "skip", "from": f"(n{source}.west)", "to": f"(n{target}.west)",
                      "via": f"-- ++({-0.3 - 0.35 * level:.2f},0) |-"})
    lanes = max((level for _a, _b, level in placed), default=0)
    attention = [node for node in model.nodes if node.reads_whole_sequences]
    detail = _attention_detail(model, attention[0]) if attention else None
    left = 2.8 + 0.3 + 0.35 * lanes + 0.2         # the boxes' half width, the lanes
    shift = 2.8 + 1.6 + 0.8                            # beyond the side labels
    width = left + (shift + detail["width"] - 0.8 if detail else 4.4)
    return {"nodes": nodes, "labels": labels, "paths": paths, "detail": detail,
            "detail_shift": f"({shift:.2f},0)", "detail_label": detail_label,
            "scale": f"{min(1.0, 15.5 / width):.2f}"}


def _attention_detail(model: Model, node: Node) -> dict[str, Any]:
    """The attention layer ``node`` unrolled over the steps shown (see block_diagram)."""
    length = model.spec.length
    steps = _shown_steps(length)
    causal = bool(dict(node.options).get("causal"))
    dx = 2.1
    source = node.inputs[0]
    x_name = r"\mathbf{x}" if source == 0 else _vector_name(model.node(source).output)
    out_name = _vector_name(node.output)
    nodes, paths = [], []
    for c, step in enumerate(steps):
        x = c * dx
        if step is None:
            for row, y in (("x", 0.0), ("k", 1.3), ("a", 4.3)):
                nodes.append({"ref": f"(d{row}{c})", "at": f"({x:.2f},{y:.2f})", "style": "dots",
                              "text": r"$\cdots$"})
            continue
        nodes.append({"ref": f"(dx{c})", "at": f"({x:.2f},0)", "style": "stepbox",
                      "text": f"${x_name}_{{{step}}}$"})
        for role, shift in (("q", -0.62), ("k", 0.0), ("v", 0.62)):
            symbol = latex(NetTensor(role, None, rank=1))
            nodes.append({"ref": f"(d{role}{c})", "at": f"({x + shift:.2f},1.3)",
                          "style": "small", "text": f"${symbol}_{{{step}}}$"})
            paths.append({"style": "thin", "from": f"(dx{c}.north)", "to": f"(d{role}{c}.south)",
                          "via": "--", "label": ""})
        nodes.append({"ref": f"(da{c})", "at": f"({x:.2f},4.3)", "style": "stepout",
                      "text": f"${out_name}_{{{step}}}$"})
    shown = [(c, step) for c, step in enumerate(steps) if step is not None]
    marked = shown[1][1] if len(shown) > 1 else shown[0][1]       # the arrows into a_2
    for c_out, t in shown:
        for c_in, tau in shown:
            if causal and tau > t:
                continue
            label = ""
            if t == marked:
                label = rf"$\alpha_{{{t}{tau}}}$"
            paths.append({"style": "weight" if t == marked else "faint",
                          "from": f"(dv{c_in}.north)", "to": f"(da{c_out}.south)",
                          "via": "--", "label": label})
    return {"nodes": nodes, "paths": paths, "width": (len(steps) - 1) * dx + 1.6,
            "title_at": f"({(len(steps) - 1) * dx / 2:.2f},5.1)"}


def block_text(model: Model, input_label: str = "input", cost_label: str = "cost"
               ) -> list[str]:
    """The block diagram as lines of text (Markdown): the layers from the cost at the top
    to the input at the bottom, each with its op, name and shape, an add with the layers it
    adds (the residual connection), an attention layer with its weights."""
    rows: list[tuple[str, str, str]] = [
        ("", f"{cost_label} C{_colon(cost_label)}{model.loss.name}", "")]
    for node in reversed(model.nodes):
        parts = [node.op.name]
        if node.activation is not None and not (node.op.name == "dense"
                                                and node.activation.name == "identity"):
            parts.append(node.activation.name)
        if node.reads_whole_sequences:
            parts.append(f"d = {node.width}" + (", causal" if dict(node.options).get("causal")
                                                 else ""))
        text = ", ".join(parts) + (f" ({node.name})" if node.name else "")
        if len(node.inputs) > 1:
            text += " ⊕ " + " + ".join(f"l={n}" for n in node.inputs)
        rows.append((f"l={node.index}", text, _dims(node.dims or (node.width,)).replace(
            r" \times ", "×")))
        if node.reads_whole_sequences:
            over = "τ≤t" if dict(node.options).get("causal") else "τ"
            rows.append(("", f"  α_tτ = softmax_{over}(q_t·k_τ/√d), a_t = Σ_{over} α_tτ v_τ",
                         ""))
    rows.append(("l=0", f"{input_label} x₁ … x_T", _dims(model.spec.input_shape).replace(
        r" \times ", "×")))
    first = max(len(r[0]) for r in rows) + 2
    middle = max(len(r[1]) for r in rows) + 3
    out = []
    for n, (side, text, shape) in enumerate(rows):
        out.append((side.ljust(first) + text.ljust(middle) + shape).rstrip())
        if n + 1 < len(rows) and rows[n + 1][0]:
            out.append(" " * first + "↑")
    return out


# --- rendering -----------------------------------------------------------------------------


def _check_language(lang: str) -> None:
    if lang not in LANGUAGES:
        raise DeriveError(f"unknown language {lang!r}; known: {', '.join(LANGUAGES)}")


def render_context(derivation: Derivation, lang: str = "en", *, markdown: bool = False,
                   progress: Report | None = None) -> dict[str, Any]:
    """The already-printed strings that the templates place (``progress`` is told of each
    formula written)."""
    _check_language(lang)
    return _Context(derivation, lang, markdown, progress).build()


def render_latex(derivation: Derivation, lang: str = "en", fragment: bool = False, *,
                 progress: Report | None = None) -> str:
    """A complete LaTeX article (or, with ``fragment``, the equations only) for ``derivation``."""
    if fragment:
        _check_language(lang)
        context = _Context(derivation, lang, False, progress).fragment()
        return render("equations.tex.j2", context, latex=True)
    context = render_context(derivation, lang, progress=progress)
    return render("derivation.tex.j2", context, latex=True)


def render_markdown(derivation: Derivation, lang: str = "en", *,
                    progress: Report | None = None) -> str:
    """The same content as Markdown with ``$$`` math (KaTeX/MathJax); no diagram."""
    context = render_context(derivation, lang, markdown=True, progress=progress)
    return render("derivation.md.j2", context, latex=True)


# --- compiling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """A compiled document: the PDF's bytes, the TeX log, the tool used and the time taken."""

    pdf: bytes
    log: str
    tool: str
    seconds: float


def missing_tex_message(lang: str) -> str:
    engine = ENGINES[lang]
    return (f"--pdf needs TeX ({engine}), which is not installed; on Debian/Ubuntu: "
            f"apt-get install {' '.join(TEX_PACKAGES[lang])}")


def tex_available(lang: str = "en") -> bool:
    """Whether the TeX engine for ``lang`` is on PATH."""
    return shutil.which(ENGINES[lang]) is not None


def compile_pdf(tex: str, lang: str = "en", *, jobname: str = "document",
                timeout: float = 600.0) -> Compiled:
    """Compile ``tex`` (pdflatex for en, xelatex for zh) with latexmk when present.

    Raises DeriveError when TeX is missing (naming the Debian packages) or the document fails
    to compile (with the first error of the log).
    """
    _check_language(lang)
    engine = ENGINES[lang]
    if not tex_available(lang):
        raise DeriveError(missing_tex_message(lang))
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="derive-latex-"))
    source = folder / f"{jobname}.tex"
    source.write_text(tex, encoding="utf-8")
    base = ["-interaction=nonstopmode", "-halt-on-error", "-file-line-error"]
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}
    try:
        if shutil.which("latexmk"):
            tool = f"latexmk -{'pdf' if engine == 'pdflatex' else 'xelatex'}"
            runs = [["latexmk", f"-{'pdf' if engine == 'pdflatex' else 'xelatex'}", *base,
                     source.name]]
        else:
            tool = engine
            runs = [[engine, *base, source.name]] * 2
        for command in runs:
            result = subprocess.run(command, check=False, cwd=folder, env=env, capture_output=True,
                                    timeout=timeout, stdin=subprocess.DEVNULL)
            log_path = folder / f"{jobname}.log"
            log = log_path.read_text(encoding="utf-8", errors="replace") if (
                log_path.exists()) else ""
            if result.returncode != 0 or not (folder / f"{jobname}.pdf").exists():
                first = next((line for line in log.splitlines()
                              if line.startswith("!") or re.match(r"^[^:\s]+:\d+: ", line)),
                             "see the log")
                raise DeriveError(f"{engine} failed: {first.strip()} (log: {log_path})")
        if "Rerun to get" in log and tool == engine:
            subprocess.run(runs[0], check=False, cwd=folder, env=env, capture_output=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
            log = (folder / f"{jobname}.log").read_text(encoding="utf-8", errors="replace")
        pdf = (folder / f"{jobname}.pdf").read_bytes()
    except subprocess.TimeoutExpired:
        raise DeriveError(f"{engine} did not finish in {timeout:.0f} s (in {folder})") from None
    shutil.rmtree(folder, ignore_errors=True)
    return Compiled(pdf, log, tool, time.perf_counter() - start)


_OVERFULL = re.compile(r"^Overfull \\[hv]box \(([\d.]+)pt too (?:wide|high)\)", re.MULTILINE)


def log_problems(log: str, overfull_limit: float = OVERFULL_LIMIT_PT) -> list[str]:
    """Errors, undefined references, glyphs missing from the fonts and overfull boxes wider
    than ``overfull_limit`` pt."""
    problems = [line for line in log.splitlines() if line.startswith("!")]
    problems += [line for line in log.splitlines() if line.startswith("Missing character")]
    problems += [line for line in log.splitlines()
                 if "undefined" in line and ("Reference" in line or "Citation" in line
                                             or "There were undefined" in line)]
    problems += [match.group(0) for match in _OVERFULL.finditer(log)
                 if float(match.group(1)) > overfull_limit]
    return problems

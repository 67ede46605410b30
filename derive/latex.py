"""Renderer: a Derivation as lecture notes in LaTeX (or Markdown), and the ``derive latex`` command.

Takes a :class:`~derive.derivation.Derivation` and gives the text of a complete article
(``render_latex``), an equations-only fragment to ``\\input`` (``fragment=True``) or Markdown
with ``$$`` math (``render_markdown``); ``compile_pdf`` runs TeX on it. The article has the
network as a TikZ diagram, a notation table, the forward pass, the activation derivatives, the
step-by-step derivation of BP1..BP4 as the engine recorded it, the matrix and batch forms, a
boxed summary and a worked numeric example (:mod:`derive.worked_example`).

Python builds a render context of already-printed strings (:mod:`derive.latex_printer` prints
every formula, :mod:`derive.latex_text` holds the words in English and Chinese); the jinja
templates ``codegen_templates/derivation.tex.j2``, ``equations.tex.j2`` and
``derivation.md.j2`` only place them. Equations carry stable labels
``eq:<spec name>:<name>`` with the names of the generated code: ``z1``, ``a1``, ``C``,
``delta2``, ``db2``, ``dW2``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import sympy as sp

from derive import __version__
from derive.derivation import ActivationDerivative, C, Derivation, Formula, Step
from derive.errors import DeriveError
from derive.files import MARKER, write_generated
from derive.functions import Z
from derive.latex_printer import DeriveLatexPrinter, batch_gradient, equation, latex
from derive.latex_text import ASSUMPTIONS, LANGUAGES, TEXT, why
from derive.model import Model, i, j, k, quantity
from derive.templates import render
from derive.vectorform import Vec
from derive.worked_example import WorkedExample, worked_example

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


# --- printing helpers ----------------------------------------------------------------------


def _number(value: float) -> str:
    """A computed value, rounded to 4 decimals (never "-0.0000")."""
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text


def _short(value: float) -> str:
    """A given value as short as it is exact to 4 decimals: 0.1, -0.4, 1."""
    text = _number(value).rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


class _ValuePrinter(DeriveLatexPrinter):
    """Prints an expression with every indexed quantity replaced by its value."""

    _default_settings: ClassVar[dict] = {**DeriveLatexPrinter._default_settings, "values": {},
                         "mul_symbol": "dot"}

    def _print_Pow(self, expr: sp.Pow) -> str:
        if isinstance(expr.base, sp.Indexed) and expr.exp.is_Integer and expr.exp > 0:
            return f"{self._print(expr.base)}^{{{self._print(expr.exp)}}}"
        return super()._print_Pow(expr)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        value = self._settings["values"][expr]
        text = _short(value) if expr.base.label.name[0] in "wbxy" else _number(value)
        if expr.base.label.name == "a^0":
            text = _short(value)
        return f"({text})" if value < 0 else text


def _spelled(expr: sp.Expr, lhs: sp.Expr, values: dict, sizes: dict,
             index: dict, result: float, max_terms: int = 8) -> str | None:
    """``lhs = expr`` at concrete indices, then with the numbers put in, then the result."""
    free = {symbol: value for symbol, value in index.items() if lhs.has(symbol)}
    concrete = expr.xreplace({**sizes, **free}).doit()
    if len(concrete.atoms(sp.Indexed)) > max_terms:
        return None
    left = latex(lhs.xreplace(free))
    symbolic = latex(concrete)
    if isinstance(concrete, sp.Indexed):
        return f"{left} &= {symbolic} = {_number(result)}"
    numbers = _ValuePrinter({"values": values}).doprint(concrete)
    if visual_length(numbers) > LINE_BUDGET or visual_length(symbolic) > LINE_BUDGET:
        return None
    return f"{left} &= {symbolic} \\\\\n  &= {numbers} = {_number(result)}"


_COMMAND = re.compile(r"\\(?:left|right|mathbf|boldsymbol|operatorname|frac|top|!|,)|[{}^_ ]")


def visual_length(math: str) -> int:
    """A rough width of printed math in characters (commands and braces do not count),
    used to choose a shorter form where the full one would run off the page."""
    return len(_COMMAND.sub("", math))


#: Displayed math longer than this (visual_length) is shown in a shorter form.
LINE_BUDGET = 62


def _escape(text: str) -> str:
    """Plain text (a step's justification without a translation) made safe for LaTeX."""
    table = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "_": r"\_", "^": r"\^{}",
             "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "~": r"\~{}"}
    return "".join(table.get(char, char) for char in text)


def _code_name(formula: Formula) -> str:
    """The generated code's name for a formula's quantity: delta2, db2, dW2."""
    letter, _, layer = formula.key.partition("^")
    return {"delta": "delta", "dC/db": "db", "dC/dw": "dW", "dC/da": "dA"}[letter] + layer


def _vector_lhs(formula: Formula) -> Vec:
    """The vector-form left-hand side: delta^l, nabla_{b^l} C, nabla_{W^l} C, nabla_{a^L} C
    (the formula keys follow the naming of :mod:`derive.vectorform`)."""
    return Vec(formula.key)


# --- the render context --------------------------------------------------------------------


@dataclass
class _Context:
    derivation: Derivation
    lang: str
    markdown: bool

    def __post_init__(self) -> None:
        self.model: Model = self.derivation.model
        self.spec = self.model.spec
        self.t = TEXT[self.lang]
        self.sizes = {symbol: sp.Integer(n) for symbol, n in zip(self.model.sizes,
                                                                 self.spec.sizes)}

    # -- small pieces --

    def text(self, key: str, **fields: object) -> str:
        return self.t[key].format(**fields)

    def name(self) -> str:
        return f"`{self.spec.name}`" if self.markdown else rf"\texttt{{{_escape(self.spec.name)}}}"

    def label(self, what: str) -> str:
        return f"eq:{self.spec.name}:{what}"

    def inline(self, expr: sp.Expr) -> str:
        return f"${latex(expr)}$"

    def step(self, step: Step) -> dict[str, str]:
        words = why(step.why, self.lang)
        if words is None:  # a justification without a translation: the engine's own words
            words = step.why if self.markdown else _escape(step.why)
        if step.source is not None:
            source = f"${equation(step.source.lhs, step.source.rhs)}$"
            words = words.replace("{source}", source) if "{source}" in words else (
                f"{words} ({source})")
        return {"rule": self.t.get(f"rule_{step.rule}", step.rule), "why": words,
                "math": equation(step.target, step.expr)}

    def assumptions(self, formula: Formula) -> list[str]:
        column = LANGUAGES.index(self.lang)
        return [self.text("assuming", what=ASSUMPTIONS.get(a, (a, a))[column])
                for a in formula.assumptions]

    def listing(self, items: Sequence[str]) -> str:
        items = list(items)
        if len(items) == 1:
            return items[0]
        comma = "、" if self.lang == "zh" else ", "
        return comma.join(items[:-1]) + f" {self.t['and']} " + items[-1]

    # -- sections --

    def build(self) -> dict[str, Any]:
        example = worked_example(self.derivation)
        L = self.model.depth
        return {
            "t": self.t,
            "lang": self.lang,
            "version": __version__,
            "marker": MARKER,
            # xdvipdfmx (xelatex) takes the PDF's Creator this way; pdflatex via hyperref
            "pdf_docinfo": (rf"\special{{pdf:docinfo <</Title ({self.spec.name}) "
                            rf"/Creator ({MARKER} {__version__})>>}}"),
            "spec_name": self.spec.name,
            "command": self.command(),
            "title": self.text("title", name=self.name()),
            "subtitle": self.text("subtitle", name=self.name(), version=__version__),
            "network_text": self.text("network_text", L=L, sizes=self.listing(
                [str(n) for n in self.spec.sizes])),
            "figure_caption": self.text(
                "figure_caption", name=self.name(), L=L,
                w=self.inline(quantity("w", "l")[j, k]), b=self.inline(quantity("b", "l")[j]),
                elided=self.t["figure_elided"] if max(self.spec.sizes) > MAX_NEURONS else ""),
            "markdown_diagram": self.text("markdown_diagram", name=self.spec.name),
            "diagram": diagram(self.spec.sizes, [layer.activation.name
                                                 for layer in self.model.layers],
                               self.t["input_layer"]),
            "layers": self.layer_rows(),
            "notation": self.notation(),
            "forward": self.forward(),
            "cost": self.cost(),
            "activations": self.activations(),
            "bp1": self.bp1(),
            "bp2": self.bp2(),
            "bp34": self.bp34(),
            "matrix": self.matrix(),
            "batch_text": self.text(
                "batch_text", ones=self.inline(Vec("1")),
                **{key: f"${latex(Vec(name), batch=True)}$"
                   for key, name in (("A", "a^l"), ("Z", "z^l"), ("D", "delta^l"))}),
            "summary": self.summary(),
            "example": self.example(example),
        }

    def command(self) -> str:
        suffix = "" if self.lang == "en" else f" --lang {self.lang}"
        return f"derive latex {self.spec.name}{suffix}"

    def layer_rows(self) -> list[dict[str, str]]:
        rows = [{"l": "0", "n": str(self.spec.input), "activation": self.t["input_layer"]}]
        for layer in self.model.layers:
            rows.append({"l": str(layer.index), "n": str(self.spec.sizes[layer.index]),
                         "activation": self.activation_name(layer.activation.name)})
        return rows

    def activation_name(self, name: str) -> str:
        return name if self.markdown else _escape(name)

    def notation(self) -> list[dict[str, str]]:
        w, b, z, a, delta = (quantity(letter, "l") for letter in ("w", "b", "z", "a", "delta"))
        sigma = sp.Function("sigma_l")
        definition = equation(delta[j], sp.Derivative(C, z[j], evaluate=False))
        rows = [
            (latex(w[j, k]), self.t["n_w"]),
            (latex(b[j]), self.t["n_b"]),
            (latex(z[j]), self.t["n_z"]),
            (latex(a[j]), self.text("n_a", a0=self.inline(quantity("a", 0)[k]))),
            (latex(quantity("y")[j]), self.t["n_y"]),
            (latex(sp.Symbol("n_l")), self.t["n_n"]),
            (f"{latex(sigma(Z))}, {latex(sp.Derivative(sigma(Z), Z))}", self.t["n_sigma"]),
            (latex(C), self.t["n_C"]),
            (latex(delta[j]), self.text("n_delta", definition=f"${definition}$")),
            (latex(sp.KroneckerDelta(i, j)), self.t["n_kd"]),
            (", ".join(latex(v) for v in (Vec("a^l"), Vec("z^l"), Vec("b^l"), Vec("delta^l")))
             + ", " + r"W^{l}", self.text("n_vec", w=self.inline(w[j, k]))),
            (r"\odot,\ \oslash", self.t["n_odot"]),
        ]
        return [{"symbol": symbol, "meaning": meaning} for symbol, meaning in rows]

    def forward(self) -> list[dict[str, str]]:
        rows = []
        for layer in self.model.layers:
            for lhs, rhs, name in ((layer.z[j], layer.z_expr, "z"),
                                   (layer.a[j], layer.a_expr, "a")):
                rows.append({"math": equation(lhs, rhs), "lhs": latex(lhs), "rhs": latex(rhs),
                             "label": self.label(f"{name}{layer.index}")})
        return rows

    def cost(self) -> dict[str, str]:
        loss = self.model.loss.name
        return {"text": self.text("cost_text", loss=self.activation_name(loss)
                                  if self.markdown else rf"\texttt{{{_escape(loss)}}}"),
                "math": equation(C, self.model.cost), "label": self.label("C")}

    def activations(self) -> list[dict[str, Any]]:
        groups: dict[str, tuple[ActivationDerivative, list[int]]] = {}
        for layer, derivative in zip(self.model.layers, self.derivation.activation_derivatives):
            if derivative is None:  # softmax: differentiated inside BP1
                continue
            key = repr((layer.activation.name, layer.activation.params))
            groups.setdefault(key, (derivative, []))[1].append(layer.index)
        out = []
        for derivative, layers in groups.values():
            sigma = sp.Function("sigma")
            out.append({
                "heading": self.text("activation_of" if len(layers) == 1 else
                                     "activation_of_many",
                                     name=self.activation_name(derivative.activation.name),
                                     layers=self.listing([str(n) for n in layers])),
                "definition": equation(sigma(Z), derivative.activation.expr),
                "steps": [self.step(step) for step in derivative.steps],
            })
        return out

    def bp1(self) -> dict[str, Any]:
        L = self.model.depth
        output = self.derivation.delta(L)
        delta = quantity("delta", "l")[j]
        return {
            "text": self.text("bp1_text", L=L, delta=self.inline(delta)),
            "steps": [self.step(s) for s in (*self.derivation.loss_gradient.steps,
                                             *output.steps)],
            "assumptions": self.assumptions(output),
        }

    def bp2(self) -> dict[str, Any]:
        L = self.model.depth
        if L == 1:
            return {"text": self.t["bp2_none"], "steps": [], "others": []}
        shown = self.derivation.delta(L - 1)
        return {
            "text": self.text("bp2_text", l=L - 1),
            "steps": [self.step(s) for s in shown.steps],
            "others": [f"{latex(self.derivation.delta(l).lhs)} = "
                       f"{self.index_form(self.derivation.delta(l))}"
                       for l in range(L - 2, 0, -1)],
        }

    def bp34(self) -> dict[str, Any]:
        L = self.model.depth
        bias = self.derivation.bias_gradients[L - 1]
        steps = [] if bias is None else [self.step(s) for s in bias.steps]
        weight = self.derivation.weight_gradients[L - 1]
        others = []
        for l in range(L - 1, 0, -1):
            for formula in (self.derivation.bias_gradients[l - 1],
                            self.derivation.weight_gradients[l - 1]):
                if formula is not None:
                    others.append(equation(formula.lhs, formula.rhs))
        return {
            "text": self.text("bp34_text", l=L),
            "bias_steps": steps,
            "no_bias": "" if bias is not None else self.text("bp34_no_bias", l=L),
            "weight_steps": [self.step(s) for s in weight.steps],
            "others": others,
        }

    def vector_form(self, formula: Formula, *, batch: bool = False) -> str:
        """The vector form, or the generic one (sigma' left symbolic, given in the activation
        section) when the concrete one would not fit on a line."""
        if formula.equation == "BP3" and batch:
            return batch_gradient(formula.vector)
        text = latex(formula.vector, batch=batch)
        if visual_length(text) > LINE_BUDGET:
            text = latex(formula.vector_generic, batch=batch)
        return text

    def index_form(self, formula: Formula) -> str:
        """The index form with the sizes filled in, or the generic one when too long."""
        text = latex(formula.rhs.xreplace(self.sizes))
        if visual_length(text) > LINE_BUDGET:
            text = latex(formula.generic.xreplace(self.sizes))
        return text

    def matrix(self) -> list[dict[str, str]]:
        rows = []
        for formula in self.derivation.formulas:
            lhs = _vector_lhs(formula)
            rows.append({
                "tag": formula.equation,
                "vector": f"{latex(lhs)} = {self.vector_form(formula)}",
                "batch": f"{latex(lhs, batch=True)} = {self.vector_form(formula, batch=True)}",
            })
        return rows

    def summary(self) -> list[dict[str, str]]:
        rows = []
        for formula in self.derivation.formulas:
            if not formula.equation:
                continue
            index, vector = self.index_form(formula), self.vector_form(formula)
            rows.append({
                "tag": formula.equation,
                "index_lhs": latex(formula.lhs),
                "index_rhs": index,
                "vector_lhs": latex(_vector_lhs(formula)),
                "vector_rhs": vector,
                # side by side when both fit on one line, else the vector form below
                "stacked": visual_length(index) + visual_length(vector) > LINE_BUDGET,
                "vector": f"{latex(_vector_lhs(formula))} = {latex(formula.vector)}",
                "label": self.label(_code_name(formula)),
            })
        return rows

    # -- the worked example --

    def example(self, ex: WorkedExample) -> dict[str, Any]:
        model, spec = self.model, self.spec
        values: dict[sp.Expr, float] = {}

        def put(base: sp.IndexedBase, vector: Sequence[float]) -> None:
            for n, value in enumerate(vector, start=1):
                values[base[n]] = value

        put(model.x, ex.x)
        put(model.y, ex.y)
        for layer in model.layers:
            l = layer.index
            for r, row in enumerate(ex.weights[l - 1], start=1):
                for c, value in enumerate(row, start=1):
                    values[layer.w[r, c]] = value
            if layer.b is not None:
                put(layer.b, ex.biases[l - 1])
            put(layer.z, ex.z[l - 1])
            put(layer.a, ex.a[l - 1])
            put(quantity("delta", l), ex.delta[l - 1])
        wide = max(spec.sizes) > MAX_NEURONS
        inputs = [
            f"{latex(Vec('a^0'))} = {_column(ex.x, _short)}",
            f"{latex(Vec('y'))} = {_column(ex.y, _short)}",
        ]
        for layer in model.layers:
            l = layer.index
            part = f"W^{{{l}}} = {_matrix(ex.weights[l - 1], _short)}"
            if layer.b is not None:
                part += rf",\quad {latex(Vec(f'b^{l}'))} = {_column(ex.biases[l - 1], _short)}"
            inputs.append(part)
        first = {j: sp.Integer(1), k: sp.Integer(1)}
        shown_layers = sorted({1, model.depth})
        forward_spelled = []
        for l in shown_layers:
            layer = model.layer(l)
            for expr, lhs, result in ((layer.z_expr, layer.z[j], ex.z[l - 1][0]),
                                      (layer.a_expr, layer.a[j], ex.a[l - 1][0])):
                text = _spelled(expr, lhs, values, self.sizes, first, result)
                if text is not None:
                    forward_spelled.append(text)
        backward_spelled = []
        candidates = [self.derivation.delta(model.depth)]
        if model.depth > 1:
            candidates.append(self.derivation.delta(model.depth - 1))
        bias = self.derivation.bias_gradients[model.depth - 1]
        if bias is not None:
            candidates.append(bias)
        candidates.append(self.derivation.weight_gradients[model.depth - 1])
        for formula in candidates:
            l = int(formula.key.partition("^")[2])
            if formula.equation == "BP4":
                result = ex.weight_gradients[l - 1][0][0]
            elif formula.equation == "BP3":
                result = ex.bias_gradients[l - 1][0]
            else:
                result = ex.delta[l - 1][0]
            text = _spelled(formula.rhs, formula.lhs, values, self.sizes, first, result)
            if text is not None:
                backward_spelled.append(text)
        forward_rows, backward_rows = [], []
        for layer in model.layers:
            l = layer.index
            n = spec.sizes[l]
            for row in _shown(n):
                if row is None:
                    forward_rows.append({"l": "", "j": r"\vdots", "cells": [r"\vdots"] * 2})
                    backward_rows.append({"l": "", "j": r"\vdots", "cells": [r"\vdots"] * 2})
                    continue
                label = str(l) if row == 1 else ""
                forward_rows.append({"l": label, "j": str(row), "cells": [
                    _number(ex.z[l - 1][row - 1]), _number(ex.a[l - 1][row - 1])]})
                db = ex.bias_gradients[l - 1]
                backward_rows.append({"l": label, "j": str(row), "cells": [
                    _number(ex.delta[l - 1][row - 1]),
                    _number(db[row - 1]) if db is not None else "--"]})
            forward_rows[-1]["last_of_layer"] = True
            backward_rows[-1]["last_of_layer"] = True
        for rows in (forward_rows, backward_rows):
            for row in rows:
                row.setdefault("last_of_layer", False)
        gradients = [
            rf"{latex(Vec(f'dC/dw^{l}'))} = {_matrix(ex.weight_gradients[l - 1], _number)}"
            for l in range(1, model.depth + 1)
        ]
        a = quantity("a", "l")
        z = quantity("z", "l")
        delta = quantity("delta", "l")
        return {
            "long_tables": len(forward_rows) > 30,
            "text": self.t["example_given" if ex.given else "example_default"],
            "truncated": self.text("example_truncated", limit=MAX_NEURONS,
                                   shown=SHOWN_NEURONS) if wide else "",
            "inputs": inputs,
            "forward_spelled": forward_spelled,
            "forward_head": [self.inline(z[j]), self.inline(a[j])],
            "forward_rows": forward_rows,
            "loss": f"C = {_number(ex.loss)}",
            "backward_spelled": backward_spelled,
            "backward_head": [self.inline(delta[j]),
                              self.inline(sp.Derivative(C, quantity("b", "l")[j]))],
            "backward_rows": backward_rows,
            "gradients": gradients,
        }


def _shown(n: int) -> list[int | None]:
    """The rows of a layer that the tables show; None marks the elided ones."""
    if n <= MAX_NEURONS:
        return list(range(1, n + 1))
    return [*range(1, SHOWN_NEURONS + 1), None]


def _column(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """A column vector as a bmatrix (long ones in part, with a vertical ellipsis)."""
    rows = [fmt(v) for v in values[:SHOWN_NEURONS]] if len(values) > MAX_NEURONS else [
        fmt(v) for v in values]
    if len(values) > MAX_NEURONS:
        rows.append(r"\vdots")
    return r"\begin{bmatrix}" + r" \\ ".join(rows) + r"\end{bmatrix}"


def _matrix(rows: Sequence[Sequence[float]], fmt: Callable[[float], str]) -> str:
    """A matrix as a bmatrix, at most SHOWN_NEURONS rows and columns of a large one."""
    n_rows, n_cols = len(rows), len(rows[0])
    cut_rows, cut_cols = n_rows > MAX_NEURONS, n_cols > MAX_NEURONS
    lines = []
    for row in rows[:SHOWN_NEURONS] if cut_rows else rows:
        cells = [fmt(v) for v in (row[:SHOWN_NEURONS] if cut_cols else row)]
        if cut_cols:
            cells.append(r"\cdots")
        lines.append(" & ".join(cells))
    if cut_rows:
        width = (SHOWN_NEURONS if cut_cols else n_cols)
        cells = [r"\vdots"] * width + ([r"\ddots"] if cut_cols else [])
        lines.append(" & ".join(cells))
    return r"\begin{bmatrix}" + r" \\ ".join(lines) + r"\end{bmatrix}"


# --- the network diagram -------------------------------------------------------------------


def diagram(sizes: Sequence[int], activations: Sequence[str], input_label: str = "input",
            ) -> dict[str, Any]:
    """Node and edge coordinates (cm) of the network drawing; wide layers are elided."""
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


# --- rendering -----------------------------------------------------------------------------


def _check_language(lang: str) -> None:
    if lang not in LANGUAGES:
        raise DeriveError(f"unknown language {lang!r}; known: {', '.join(LANGUAGES)}")


def render_context(derivation: Derivation, lang: str = "en", *,
                   markdown: bool = False) -> dict[str, Any]:
    """The already-printed strings that the templates place."""
    _check_language(lang)
    return _Context(derivation, lang, markdown).build()


def render_latex(derivation: Derivation, lang: str = "en", fragment: bool = False) -> str:
    """A complete LaTeX article (or, with ``fragment``, the equations only) for ``derivation``."""
    context = render_context(derivation, lang)
    name = "equations.tex.j2" if fragment else "derivation.tex.j2"
    return render(name, context, latex=True)


def render_markdown(derivation: Derivation, lang: str = "en") -> str:
    """The same content as Markdown with ``$$`` math (KaTeX/MathJax); no diagram."""
    context = render_context(derivation, lang, markdown=True)
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


# --- the command line ----------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive latex`` to the command line."""
    parser = commands.add_parser(
        "latex", help="write the derivation as LaTeX lecture notes (or Markdown, or a PDF)",
        description="Write the step-by-step derivation of backpropagation for a network as a "
                    "complete LaTeX article (diagram, notation, derivation, matrix and batch "
                    "forms, summary, worked numeric example), an equations-only fragment, "
                    "Markdown, or a compiled PDF. Without -o the text goes to stdout.",
        epilog="examples:\n  derive latex xor -o xor.tex\n"
               "  derive latex net.yaml --fragment -o d.tex\n"
               "  derive latex net.yaml --pdf -o net.pdf\n"
               "  derive latex net.yaml --lang zh --pdf\n"
               "  derive latex xor --format markdown -o xor.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC",
                        help="a spec file (.yaml, .yml, .json) or a built-in example name")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="output file (default: stdout; with --pdf, NAME.pdf)")
    parser.add_argument("--fragment", action="store_true",
                        help="equations only, to \\input into slides or notes")
    parser.add_argument("--pdf", action="store_true",
                        help="compile with the TeX installed here (latexmk, else "
                             "pdflatex/xelatex); with -o FILE.tex also keeps the .tex")
    parser.add_argument("--lang", choices=LANGUAGES, default="en",
                        help="language of the prose (default en; zh compiles with xelatex)")
    parser.add_argument("--format", choices=("latex", "markdown"), default="latex",
                        help="latex (default) or markdown with $$ math")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an output file that derive did not generate")
    parser.set_defaults(handler=_cmd_latex)


def _derivation(source: str) -> Derivation:
    from derive.derivation import derive
    from derive.model import build_model
    from derive.spec import load_spec

    return derive(build_model(load_spec(source)))


def _cmd_latex(args: argparse.Namespace, echo: Echo) -> int:
    if args.format == "markdown" and (args.pdf or args.fragment):
        raise DeriveError("--format markdown writes one Markdown file; drop --pdf/--fragment")
    if args.pdf and args.fragment:
        raise DeriveError("--pdf compiles a complete document; drop --fragment")
    if args.pdf and not tex_available(args.lang):
        raise DeriveError(missing_tex_message(args.lang))
    derivation = _derivation(args.spec)
    if args.format == "markdown":
        text = render_markdown(derivation, args.lang)
    else:
        text = render_latex(derivation, args.lang, fragment=args.fragment)
    if not args.pdf:
        if args.output:
            path = write_generated(args.output, text, force=args.force)
            echo(f"wrote {path}")
        else:
            echo(text.rstrip("\n"))
        return 0
    name = derivation.model.spec.name + ("" if args.lang == "en" else f".{args.lang}")
    target = Path(args.output or f"{name}.pdf")
    if target.suffix.lower() != ".pdf":
        write_generated(target, text, force=args.force)
        echo(f"wrote {target}")
        target = target.with_suffix(".pdf")
    write_pdf(text, target, args.lang, echo, force=args.force)
    return 0


def _pdf_is_ours(path: Path) -> bool:
    """Whether a PDF was made by derive: its Creator (read with pdfinfo) names the marker."""
    if MARKER.encode() in path.read_bytes():
        return True
    if shutil.which("pdfinfo") is None:
        return False
    result = subprocess.run(["pdfinfo", str(path)], check=False, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    return MARKER in result.stdout


def write_pdf(tex: str, target: Path, lang: str, echo: Echo, *, force: bool = False) -> None:
    """Compile ``tex`` and write the PDF to ``target`` (refusing a PDF derive did not make)."""
    if target.exists() and not force and not _pdf_is_ours(target):
        raise DeriveError(f"refusing to overwrite {str(target)!r}: it was not generated by "
                          "derive (use --force to overwrite it)")
    compiled = compile_pdf(tex, lang, jobname=target.stem)
    write_generated(target, compiled.pdf, force=True)
    echo(f"wrote {target} ({compiled.tool}, {compiled.seconds:.1f} s)")


def pipeline_step(derivation: Derivation, out_dir: Path, echo: Echo) -> None:
    """The default pipeline's LaTeX step: NAME.tex, and NAME.pdf when TeX is installed."""
    name = derivation.model.spec.name
    text = render_latex(derivation)
    path = write_generated(out_dir / f"{name}.tex", text)
    echo(f"LaTeX notes: {path}")
    if not tex_available("en"):
        echo(f"  (no PDF: {missing_tex_message('en')})")
        return
    try:
        write_pdf(text, out_dir / f"{name}.pdf", "en", lambda line: echo(f"  {line}"))
    except DeriveError as err:
        echo(f"  (no PDF: {err})")

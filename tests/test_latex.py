"""derive.render.latex: the LaTeX printer, the document, the worked example, Markdown and the CLI.

Graph documents are in tests/test_latex_graphs.py, the words in tests/test_latex_text.py and
compiling in tests/test_latex_compile.py; this file needs no TeX.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import sympy as sp
import yaml

from derive.cli import latex as latex_cli
from derive.cli.main import derivation_of, main
from derive.derivation.reverse import C
from derive.derivation.tensorform import ONE, Inner, MatVec, Outer, to_vector
from derive.quantities import NetTensor, j, k
from derive.registry.functions import resolve_activation
from derive.registry.ops import OPS
from derive.render import latex as latex_module
from derive.render.latex import log_problems, render_context, render_latex, render_markdown
from derive.render.latex_printer import batch_gradient, latex, visual_length
from derive.render.latex_text import LANGUAGES, TEXT
from derive.render.worked_example import default_values, worked_example
from derive.spec.load import EXAMPLE_FIELDS, EXAMPLES_DIR, list_examples, load_spec
from tests.test_latex_graphs import SPECS

EXAMPLES = [name for name, _ in list_examples()]


@pytest.fixture(scope="module")
def derivations():
    out = {name: derivation_of(load_spec(name)) for name in EXAMPLES}
    out.update({name: derivation_of(load_spec(spec)) for name, spec in SPECS.items()})
    return out


def q(role: str, node: object = None, rank: int = 1) -> NetTensor:
    return NetTensor(role, node, rank=rank)


# --- the printer ---------------------------------------------------------------------------


def test_classic_index_notation():
    w, b, delta, y = q("w", 2, 2).indexed, q("b", 2).indexed, q("delta", 3).indexed, q("y")
    assert latex(w[j, k]) == "w^{2}_{jk}"
    assert latex(b[j]) == "b^{2}_{j}"
    assert latex(delta[j]) == r"\delta^{3}_{j}"
    assert latex(y.indexed[j]) == "y_{j}"
    assert latex(sp.Derivative(C, w[j, k], evaluate=False)) == (
        r"\frac{\partial C}{\partial w^{2}_{jk}}")
    assert latex(w[2, 11]) == "w^{2}_{2,11}"  # two-digit indices need a separator
    assert latex(q("a", "l").indexed[j]) == "a^{l}_{j}"  # the generic layer


def test_graph_quantities_by_their_fields():
    assert latex(q("gamma", 4).indexed[j]) == r"\gamma^{4}_{j}"
    assert latex(q("beta", 4).indexed[j]) == r"\beta^{4}_{j}"
    assert latex(q("xhat", 4).indexed[j]) == r"\hat{x}^{4}_{j}"
    assert latex(q("mask", 5).indexed[j]) == r"m^{5}_{j}"
    assert latex(q("mu", 4, 0)) == r"\mu^{4}"
    assert latex(q("var", 4, 0)) == r"(\sigma^{4})^{2}"
    assert latex(sp.Derivative(C, q("var", 4, 0), evaluate=False)) == (
        r"\frac{\partial C}{\partial (\sigma^{4})^{2}}")
    # tensor form: vectors in bold, adjoints as gradients, a per-sample scalar as a fraction
    assert latex(q("xhat", 4)) == r"\hat{\mathbf{x}}^{4}"
    assert latex(q("gamma", 4)) == r"\boldsymbol{\gamma}^{4}"
    assert latex(NetTensor("grad", 4, of="xhat")) == r"\nabla_{\hat{\mathbf{x}}^{4}} C"
    assert latex(NetTensor("grad", 2, of="w", rank=2)) == r"\nabla_{W^{2}} C"
    assert latex(NetTensor("grad", 4, of="mu", rank=0)) == r"\frac{\partial C}{\partial \mu^{4}}"
    assert latex(NetTensor("grad", 2, of="w", rank=2), batch=True, batch_cost="J") == (
        r"\nabla_{W^{2}} J")
    # batch form: a parameter vector is broadcast to every row
    assert latex(q("gamma", 4) * q("xhat", 4), batch=True) == (
        r"\mathbf{1}\left(\boldsymbol{\gamma}^{4}\right)^{\top} \odot \hat{X}^{4}")


def test_sums_with_ranges_and_weights_first():
    w, delta = q("w", 3, 2).indexed, q("delta", 3).indexed
    n = sp.Symbol("n_3", integer=True, positive=True)
    text = latex(sp.Sum(delta[k] * w[k, j], (k, 1, n)))
    assert text == r"\sum_{k=1}^{n_{3}} w^{3}_{kj} \delta^{3}_{k}"


def test_sigma_prime_and_powers():
    sigma = sp.Function("sigma_2")
    z, a = q("z", 2).indexed, q("a", 2).indexed
    assert latex(sp.Derivative(sigma(z[j]), z[j])) == r"\sigma_{2}'\!\left(z^{2}_{j}\right)"
    assert latex(a[j] ** 2) == r"\left(a^{2}_{j}\right)^{2}"  # never a double superscript


def test_constants_print_as_symbols():
    """π and friends print as themselves (SymPy's fallback spelled π as \\text{\\Pi})."""
    assert latex(sp.sqrt(sp.pi)) == r"\sqrt{\pi}"
    assert latex(sp.EulerGamma) == r"\gamma" and latex(sp.oo) == r"\infty"
    assert latex(sp.E) == "e" and latex(sp.Rational(1, 100000) + q("var", 4, 0)).endswith(
        "10^{-5}")
    gelu = resolve_activation("gelu")
    derivative = sp.diff(gelu.expr, gelu.variable)
    assert r"\pi" in latex(derivative) and r"\text" not in latex(derivative)


def test_vector_forms_odot_and_transpose():
    a1, w2, d2 = q("a", 1), q("w", 2, 2), q("delta", 2)
    expr = a1 * (1 - a1) * MatVec(w2, d2, sp.true)
    text = latex(expr)
    assert r"\odot" in text and r"\left(W^{2}\right)^{\top}\,\boldsymbol{\delta}^{2}" in text
    assert latex(Outer(d2, a1)) == r"\boldsymbol{\delta}^{2}\,\left(\mathbf{a}^{1}\right)^{\top}"
    assert latex(2 * Inner(ONE, q("a", 3))) == r"2 \cdot \mathbf{1}^{\top}\,\mathbf{a}^{3}"


def test_batch_forms():
    w2, d2, a1 = q("w", 2, 2), q("delta", 2), q("a", 1)
    assert latex(MatVec(w2, d2, sp.true), batch=True) == r"\Delta^{2}\,W^{2}"
    assert latex(Outer(d2, a1), batch=True) == (
        r"\frac{1}{B}\,\left(\Delta^{2}\right)^{\top}\,A^{1}")
    assert batch_gradient(d2) == r"\frac{1}{B}\,\mathbf{1}^{\top} \Delta^{2}"
    assert latex(q("b", 1), batch=True) == r"\mathbf{1}\left(\mathbf{b}^{1}\right)^{\top}"
    assert "rowsum" in latex(Inner(ONE, q("a", 2)), batch=True)


def test_elementwise_division_and_softmax_fraction(derivations):
    digits = derivations["digits"]
    assert latex(digits.loss_gradient.vector) == r"-\mathbf{y} \oslash \mathbf{a}^{2}"
    softmax = digits.model.layer(2)
    assert latex(to_vector(softmax.a_expr, (j,))) == (
        r"\frac{e^{\mathbf{z}^{2}}}{\mathbf{1}^{\top}\,e^{\mathbf{z}^{2}}}")


def test_visual_length():
    assert visual_length(r"\frac{\partial C}{\partial a^{2}_{j}}") < visual_length(
        r"\partial C \partial a^{2}_{j}")
    assert visual_length(r"\tanh{\left(x \right)}") == visual_length("tanh(x)")


# --- the document --------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("lang", LANGUAGES)
def test_document_structure(derivations, name, lang):
    derivation = derivations[name]
    text = render_latex(derivation, lang)
    head = text[:300]
    assert "generated by derive" in head.lower() and "DO NOT EDIT" in head
    assert text.count(r"\begin{document}") == 1 and text.rstrip().endswith(r"\end{document}")
    assert r"\begin{tikzpicture}" in text and r"\begin{tcolorbox}" in text
    assert ("ctexart" in text) == (lang == "zh")
    model = derivation.model
    if model.is_chain:
        for tag in ("BP1", "BP3", "BP4"):
            assert rf"\tag{{{tag}}}" in text
    for node in model.nodes:
        for parameter in node.parameters:
            assert rf"\label{{eq:{name}:d{parameter.key}}}" in text
        if model.is_chain or node.index == model.depth:
            assert rf"\label{{eq:{name}:delta{node.index}}}" in text
    labels = set(re.findall(r"\\label\{([^}]*)\}", text))
    assert set(re.findall(r"\\(?:eq)?ref\{([^}]*)\}", text)) <= labels
    assert len(labels) == len(re.findall(r"\\label\{", text)), "duplicate labels"


def test_chain_reads_as_the_classic_equations(derivations):
    context = render_context(derivations["xor"])
    titles = [section["title"] for section in context["backward"]]
    assert titles == ["The error of the output layer (BP1)", "The error of the hidden layers (BP2)",
                      "The gradients of the biases and weights (BP3, BP4)"]
    assert [row["tag"] for row in context["summary"]] == ["BP1", "BP4", "BP3", "BP2", "BP4",
                                                          "BP3"]
    text = render_latex(derivations["deep_tanh"])
    assert "The same steps give the other layers" in text
    assert r"\left(W^{2}\right)^{\top}\,\boldsymbol{\delta}^{2}" in text


def test_chinese_has_the_same_mathematics(derivations):
    en, zh = (render_context(derivations["xor"], lang) for lang in ("en", "zh"))
    assert en["summary"] == zh["summary"] and en["forward"] == zh["forward"]
    en_steps = [s["math"] for b in en["backward"] for p in b["parts"] for x in p["blocks"]
                for s in x["steps"]]
    zh_steps = [s["math"] for b in zh["backward"] for p in b["parts"] for x in p["blocks"]
                for s in x["steps"]]
    assert en_steps == zh_steps and en_steps
    assert "反向传播" in render_latex(derivations["xor"], "zh")


def test_wide_layers_are_elided(derivations):
    context = render_context(derivations["digits"])
    column = context["diagram"]["columns"][0]
    assert len(column["nodes"]) <= 8 and any(n["neuron"] is None for n in column["nodes"])
    assert context["example"]["truncated"]
    table = context["example"]["forward"]
    assert all(len(row["cells"]) == 6 and row["cells"][-1] in (r"$\cdots$", "")
               for row in table["rows"])


def _mnist_by_hand(x, y, params):
    """Forward and backward pass of 784-128-64-10 (relu, relu, softmax + cross-entropy) in
    NumPy, written out by hand: the layer values and the weight gradients."""
    W1, W2, W3 = (np.asarray(params[f"W{l}"]) for l in (1, 2, 3))
    b1, b2, b3 = (np.asarray(params[f"b{l}"]) for l in (1, 2, 3))
    z1 = W1 @ x + b1
    a1 = np.maximum(z1, 0)
    z2 = W2 @ a1 + b2
    a2 = np.maximum(z2, 0)
    z3 = W3 @ a2 + b3
    a3 = np.exp(z3 - z3.max()) / np.exp(z3 - z3.max()).sum()
    delta3 = a3 - y
    delta2 = (W3.T @ delta3) * (z2 > 0)
    delta1 = (W2.T @ delta2) * (z1 > 0)
    return {"z1": z1, "a3": a3, "C": -np.sum(y * np.log(a3)),
            "W1": np.outer(delta1, x), "W2": np.outer(delta2, a1), "W3": np.outer(delta3, a2)}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_mnist_sized_example_computes_and_prints_the_shown_block(lang):
    """784-128-64-10: the example computes each weight gradient for the 5 x 5 block the
    document prints, says so in the text, and prints the numbers of a NumPy pass by hand."""
    spec = load_spec({"name": "mnist", "input": 784, "loss": "cross_entropy",
                      "layers": [{"size": 128, "activation": "relu"},
                                 {"size": 64, "activation": "relu"},
                                 {"size": 10, "activation": "softmax"}]})
    derivation = derivation_of(spec)
    x, y, params = default_values(spec)
    hand = _mnist_by_hand(np.asarray(x), np.asarray(y), params)
    example = worked_example(derivation, shown=latex_module._shown)
    assert example.loss == pytest.approx(hand["C"], rel=1e-12)
    for key, value in example.gradients().items():
        if value.ndim == 2:
            assert value.shape == (5, 5)
            np.testing.assert_allclose(value, hand[key][:5, :5], rtol=1e-12, atol=1e-15)
    context = render_context(derivation, lang)["example"]
    assert context["truncated"] == latex_module.TEXT[lang]["example_truncated"].format(
        limit=latex_module.MAX_NEURONS, shown=latex_module.SHOWN_NEURONS)
    printed = [text.split(" = ", 1)[1] for text in context["gradients"]]
    assert printed == [latex_module._matrix(hand[key], latex_module._number)
                       for key in ("W3", "W2", "W1")]
    assert all(r"\cdots" in text and r"\vdots" in text for text in printed[1:])
    z1_row = next(row for row in context["forward"]["rows"] if row["name"] == "$z^{1}_{j}$")
    assert z1_row["cells"] == [f"${latex_module._number(v)}$" for v in hand["z1"][:5]] + [
        r"$\cdots$"]


def test_fragment_places_what_the_document_computes(derivations):
    """The fragment is built from fewer sections than the document; its text is what the
    fragment template makes of the whole document's context."""
    from derive.render.templates import render

    for name in ("xor", "regularized", "resnorm"):
        whole = render("equations.tex.j2", render_context(derivations[name]), latex=True)
        assert render_latex(derivations[name], fragment=True) == whole


def test_long_sums_break_over_lines():
    expr = sp.Add(*(q("w", l, 2).indexed[j, k] * q("a", l - 1).indexed[k] for l in range(1, 16)))
    text = latex_module.broken(expr)
    assert text.startswith(r"\begin{aligned}[t]") and text.endswith(r"\end{aligned}")
    lines = text.split(r"\\")
    assert len(lines) > 1 and all(visual_length(line) <= latex_module.LINE_BUDGET
                                  for line in lines)
    assert latex_module.broken(expr, top=False).startswith(r"\begin{aligned} ")
    assert latex_module.broken(q("a", 1).indexed[j]) == "a^{1}_{j}"


def test_fragment_is_equations_only(derivations):
    text = render_latex(derivations["xor"], fragment=True)
    assert r"\begin{document}" not in text and r"\documentclass" not in text
    assert "generated by derive" in text[:200].lower()
    assert r"\label{eq:xor:dW2}" in text and r"\label{eq:xor:z1}" in text


def test_markdown(derivations):
    text = render_markdown(derivations["xor"])
    assert "generated by derive" in text[:200].lower()
    assert text.count("$$") % 2 == 0 and "$$" in text
    for forbidden in (r"\label", r"\begin{tikzpicture}", r"\texttt", "\\begin{gather"):
        assert forbidden not in text
    assert r"\tag{BP1}" in text and "0.0779" in text  # the worked example's cost
    assert "反向传播" in render_markdown(derivations["xor"], "zh")


def test_render_is_deterministic(derivations):
    assert render_latex(derivations["bce"]) == render_latex(derivation_of(load_spec("bce")))
    assert render_latex(derivations["resnorm"], "zh") == render_latex(
        derivation_of(load_spec(SPECS["resnorm"])), "zh")


def test_repr_latex(derivations):
    xor = derivations["xor"]
    text = xor._repr_latex_()
    assert text.startswith("$$") and r"\delta^{2}_{j}" in text and r"\odot" in text
    assert "(BP4)" in text
    assert "w^{2}_{kj}" in xor.delta(1)._repr_latex_()
    assert r"\hat{x}^{4}" in derivations["resnorm"]._repr_latex_()


# --- the worked example --------------------------------------------------------------------


def test_worked_example_uses_the_spec_values(derivations):
    example = worked_example(derivations["xor"])
    assert example.given == EXAMPLE_FIELDS
    assert tuple(example.x) == (1.0, 0.0) and tuple(example.y) == (1.0,)
    assert tuple(example.parameters["W1"][1]) == (0.3, -0.4)
    # z^1_1 = 0.1 * 1 + 0.2 * 0 + 0.1, by hand
    assert example.value(NetTensor("z", 1))[0] == pytest.approx(0.2, abs=1e-15)
    context = render_context(derivations["xor"])["example"]
    assert any("0.2000" in line for line in context["forward_spelled"])


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("parts", [parts for count in range(len(EXAMPLE_FIELDS) + 1)
                                   for parts in itertools.combinations(EXAMPLE_FIELDS, count)])
@pytest.mark.parametrize("name", ["xor", "tiny_rnn", "tiny_cnn"])   # a vector, sequence, image
def test_worked_example_says_which_values_the_spec_gave(name, parts, lang):
    """The intro names exactly the parts of the example the spec gave and those derive chose:
    all, none, or some (a spec's input and target with derive's parameters), then how the
    values are rounded."""
    data = _spec_data(name)
    data = {**data, "example": {part: data["example"][part] for part in parts}}
    if not parts:
        del data["example"]
    derivation = derivation_of(load_spec(data))
    assert worked_example(derivation).given == parts
    text = TEXT[lang]
    lines = render_markdown(derivation, lang).splitlines()
    intro = lines[lines.index(f"## {text['sec_example']}") + 2]
    rounding = text["sentence_gap"] + text["example_rounding"]
    assert rounding in intro
    whose = intro[:intro.index(rounding)]
    if len(parts) == len(EXAMPLE_FIELDS):
        assert whose == text["example_given"]
    elif not parts:
        assert whose == text["example_default"]
    else:
        words = {part: text[f"example_part_{part}"] for part in EXAMPLE_FIELDS}
        before, between, after = re.split(r"\{given\}|\{rest\}", text["example_some"])
        assert whose.startswith(before) and whose.endswith(after)
        given, rest = whose[len(before):len(whose) - len(after)].split(between)
        assert {p for p in EXAMPLE_FIELDS if words[p] in given} == set(parts)
        assert {p for p in EXAMPLE_FIELDS if words[p] in rest} == set(EXAMPLE_FIELDS) - set(parts)
        assert lang == "en" or not re.search(r" 和|和 ", given + rest)   # Chinese: no spaces


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("name", ["xor", "tiny_rnn", "tiny_cnn"])   # a vector, sequence, image
def test_the_example_says_what_it_is_in_the_language_of_the_notes(name, lang):
    """The spec's about text follows the intro, its own language's where it gives one, as
    plain text (LaTeX's special characters escaped)."""
    data = _spec_data(name)
    about = {"en": "50% of x_t & more", "zh": "一半的 x_t"}
    derivation = derivation_of(load_spec({**data, "example": {**data["example"],
                                                               "about": about}}))
    text = TEXT[lang]
    lines = render_markdown(derivation, lang).splitlines()
    intro = lines[lines.index(f"## {text['sec_example']}") + 2]
    gap = text["sentence_gap"]
    assert f"{text['example_given']}{gap}{about[lang]}{gap}{text['example_rounding']}" in intro
    escaped = {"en": r"50\% of x\_t \& more", "zh": r"一半的 x\_t"}[lang]
    assert escaped in render_latex(derivation, lang)


@pytest.mark.parametrize("name", [*EXAMPLES, *SPECS])
def test_chinese_diagrams_use_the_full_width_colon(derivations, name):
    """Every diagram that names the loss in its cost node (a graph's, an unrolled sequence's,
    a block's; not a dense chain's or feature maps'): Chinese punctuation in the Chinese
    notes, the English in the English ones; the Markdown's text diagram of a block too."""
    derivation = derivations[name]
    model = derivation.model
    chinese, english = (render_latex(derivation, lang) for lang in ("zh", "en"))
    assert "$C$: " not in chinese and "$C$：" not in english
    loss = latex_module._escape(model.loss.name)
    shown = english.count(f"{TEXT['en']['cost_node']} $C$: \\texttt{{{loss}}}")
    assert chinese.count(f"{TEXT['zh']['cost_node']} $C$：\\texttt{{{loss}}}") == shown
    assert shown >= 1 or model.is_chain or model.spec.image is not None
    if model.reads_whole_sequences:
        markdown = render_markdown(derivation, "zh")
        assert f"{TEXT['zh']['cost_node']} C：{model.loss.name}" in markdown


def test_default_values_are_short_round_and_fit_the_loss():
    x, y, params = default_values(load_spec("digits"))
    assert len(x) == 64 and sum(y) == 1.0 and y[0] == 1.0
    assert len(params["W1"]) == 32 and len(params["W1"][0]) == 64
    assert all(round(v, 1) == v for row in params["W1"] for v in row)
    _, _, graph = default_values(load_spec(SPECS["resnorm"]))
    assert all(0.8 <= v <= 1.2 for v in graph["gamma4"])  # a scale starts near one
    assert set(graph) == {"W1", "b1", "W2", "b2", "gamma4", "beta4", "W6", "b6"}


@pytest.mark.parametrize("width", [2, 3, 16, 32, 64])
@pytest.mark.parametrize("op", ["dense", *(name for name, op in OPS.items()
                                            if op.attribute("return") is not None)])
def test_default_values_make_no_two_units_alike(op, width):
    """The worked example's default parameters give a layer's first 45 rows (its units, or an
    LSTM's and GRU's stacked gate rows) different weights or biases, so no two units compute
    the same, and no gate block equals another (an LSTM's input gate was its output gate)."""
    spec = load_spec({"name": "units", "input": {"size": width, "length": 2}, "loss": "mse",
                      "layers": [{"op": op, "size": width}, {"size": width}]})
    _, _, params = default_values(spec)
    for l in (1, 2):
        arrays = [np.asarray(value, dtype=float) for key, value in params.items()
                  if key.endswith(str(l))]
        rows = np.concatenate([a.reshape(len(a), -1) for a in arrays], axis=1)
        head = rows[:45]
        assert len({tuple(row) for row in head}) == len(head)
        blocks = rows.reshape(len(rows) // width, -1)
        assert len({tuple(block) for block in blocks}) == len(blocks)
        # a layer's parameters of one shape (W_x and W_h of width 3, b_x and b_h) differ
        for first, second in itertools.combinations(arrays, 2):
            assert first.shape != second.shape or not np.array_equal(first, second)


def _spec_data(name: str) -> dict:
    if name in SPECS:
        return SPECS[name]
    return yaml.safe_load((EXAMPLES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", [*EXAMPLES, *SPECS])
def test_worked_example_matches_an_independent_reference(derivations, name):
    """The numbers of the document equal PyTorch autograd (or, for a custom activation, a
    hand-written NumPy backprop): the loss and the gradient of every parameter, with the
    penalty (one sample, so the batch objective J is C + R)."""
    derivation = derivations[name]
    example = worked_example(derivation)
    params = {key: value.copy() for key, value in example.parameters.items()}
    X, Y = example.x[None, :], example.y[None, :]
    data = _spec_data(name)
    if derivation.model.spec.resolved_loss().custom or any(
            node.activation is not None and node.activation.custom
            for node in derivation.model.nodes):
        from reference_backprop import Net, backprop

        loss, grads = backprop(Net.from_spec(derivation.model.spec), params, X, Y)
    else:
        pytest.importorskip("torch")
        from torch_reference import torch_loss_and_grads

        loss, grads = torch_loss_and_grads(data, params, X, Y)
    assert example.loss + example.penalty == pytest.approx(loss, rel=1e-12, abs=1e-14)
    ours = example.gradients()
    assert set(ours) == set(grads)
    for key in grads:
        np.testing.assert_allclose(ours[key], grads[key], rtol=1e-10, atol=1e-13, err_msg=key)


@pytest.mark.parametrize("name", EXAMPLES)
def test_worked_example_matches_generated_numpy_code(derivations, name):
    """The documents say the numbers agree with the NumPy code derive generates."""
    codegen = pytest.importorskip("derive.render.codegen")
    derivation = derivations[name]
    module = codegen.load_module(codegen.render_module(derivation), f"{name}_for_latex")
    example = worked_example(derivation)
    params = {key: value.copy() for key, value in example.parameters.items()}
    X, Y = example.x[None, :], example.y[None, :]
    output, _cache = module.forward(params, X)
    np.testing.assert_allclose(output[0], example.value(derivation.model.output.output),
                               rtol=1e-12, atol=1e-14)
    loss, grads = module.gradients(params, X, Y)
    assert float(loss) == pytest.approx(example.loss + example.penalty, rel=1e-12, abs=1e-14)
    for key, value in example.gradients().items():
        np.testing.assert_allclose(grads[key], value, rtol=1e-10, atol=1e-14, err_msg=key)


def test_every_number_of_a_formula_comes_from_that_formula(derivations):
    """δ^l of a chain equals its BP2 formula evaluated by hand from the shown values."""
    example = worked_example(derivations["xor"])
    a1 = example.value(NetTensor("a", 1))
    w2 = example.parameters["W2"]
    d2 = example.value(NetTensor("delta", 2))
    np.testing.assert_allclose(example.value(NetTensor("delta", 1)),
                               a1 * (1 - a1) * (w2.T @ d2), rtol=1e-14)


# --- log reading and the command line ------------------------------------------------------


def test_log_problems():
    log = ("Overfull \\hbox (3.2pt too wide) in paragraph\n"
           "Overfull \\hbox (12.5pt too wide) detected at line 9\n"
           "LaTeX Warning: Reference `eq:x' on page 1 undefined on input line 5.\n"
           "! Undefined control sequence.\n")
    problems = log_problems(log)
    assert len(problems) == 3 and not any("3.2pt" in p for p in problems)


def test_cli_writes_latex_and_markdown(tmp_path, capsys):
    out = tmp_path / "xor.tex"
    assert main(["latex", "xor", "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_latex(derivation_of(load_spec("xor")))
    md = tmp_path / "xor.md"
    assert main(["latex", "xor", "--format", "markdown", "--lang", "zh", "-o", str(md)]) == 0
    assert "$$" in md.read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["latex", "xor", "--fragment"]) == 0
    assert r"\label{eq:xor:dW1}" in capsys.readouterr().out


def test_cli_refuses_foreign_files_and_bad_combinations(tmp_path, capsys):
    foreign = tmp_path / "notes.tex"
    foreign.write_text("my own notes\n")
    assert main(["latex", "xor", "-o", str(foreign)]) == 2
    assert foreign.read_text() == "my own notes\n"
    assert main(["latex", "xor", "-o", str(foreign), "--force"]) == 0
    assert main(["latex", "xor", "--format", "markdown", "--pdf"]) == 2
    assert main(["latex", "xor", "--fragment", "--pdf"]) == 2
    assert main(["latex", "xor", "--lang", "fr"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_cli_without_tex_names_the_debian_packages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(latex_module.shutil, "which", lambda name: None)
    assert main(["latex", "xor", "--pdf", "-o", str(tmp_path / "x.pdf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "texlive-latex-base" in err and "apt-get install" in err
    assert main(["latex", "xor", "--lang", "zh", "--pdf", "-o", str(tmp_path / "x.pdf")]) == 2
    assert "texlive-lang-chinese" in capsys.readouterr().err


def test_pipeline_step_without_tex(tmp_path, monkeypatch):
    monkeypatch.setattr(latex_module.shutil, "which", lambda name: None)
    lines: list[str] = []
    latex_cli.pipeline_step(derivation_of(load_spec("xor")), tmp_path, lines.append)
    assert (tmp_path / "xor.tex").exists() and not (tmp_path / "xor.pdf").exists()
    assert any("texlive" in line for line in lines)

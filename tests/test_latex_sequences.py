"""Lecture notes of sequence networks (issue #10): the unrolled diagram, backpropagation through
time at a generic step t, the LSTM's and GRU's gates, why gradients vanish or explode, and a
worked example through time, in LaTeX and Markdown, English and Chinese.

The worked example of ``tiny_rnn`` (T = 3) is checked against a forward pass and BPTT written
here in NumPy, independently of derive; the example of every built-in sequence network against
PyTorch is in tests/test_latex.py. Compiling: tiny_rnn and lstm_adding on their own, below
(skipped without TeX); every built-in example in tests/test_latex_compile.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import sympy as sp
import yaml

from derive.cli.main import derivation_of, main
from derive.derivation.stepform import Block, StepGuard, SumSteps
from derive.derivation.tensorform import MatVec, Outer
from derive.quantities import INDEX_POOL, LENGTH, NetTensor, tensor_of
from derive.registry.ops import OPS
from derive.render.latex import (
    compile_pdf,
    log_problems,
    missing_tex_message,
    render_context,
    render_latex,
    render_markdown,
    state_tensors,
    tex_available,
    unrolled_text,
)
from derive.render.latex_printer import latex
from derive.render.latex_text import LANGUAGES, TEXT
from derive.render.pretty import pretty
from derive.render.worked_example import default_values, worked_example
from derive.spec.load import EXAMPLES_DIR, list_examples, load_spec

#: the built-in recurrent networks: a layer of an op of the registry that may return its last
#: state (attention's notes: tests/test_latex_attention.py)
SEQUENCES = [name for name, _ in list_examples() if any(
    OPS[layer.op].attribute("return") is not None for layer in load_spec(name).layers)]
#: Sequence networks beyond the built-in ones: stacked recurrent layers (relu, no bias),
#: gated layers returning every step, a sigmoid rnn returning its last state with a penalty,
#: a dense layer per step below a recurrence.
SPECS: dict[str, dict] = {
    "stack": {"name": "stack", "input": {"size": 2, "length": 3}, "loss": "mse", "layers": [
        {"op": "rnn", "size": 2}, {"op": "rnn", "size": 3, "activation": "relu", "bias": False},
        {"size": 1}]},
    "lstm_seq": {"name": "lstm_seq", "input": {"size": 1, "length": 4},
                 "loss": "cross_entropy",
                 "layers": [{"op": "lstm", "size": 2}, {"size": 2, "activation": "softmax"}]},
    "gru_seq": {"name": "gru_seq", "input": {"size": 2, "length": 3},
                "loss": "binary_cross_entropy",
                "layers": [{"op": "gru", "size": 2}, {"size": 1, "activation": "sigmoid"}]},
    "rnn_last": {"name": "rnn_last", "input": {"size": 3, "length": 6}, "loss": "cross_entropy",
                 "regularization": {"l2": 0.01}, "layers": [
                     {"op": "rnn", "size": 4, "activation": "sigmoid", "return": "last"},
                     {"size": 2, "activation": "softmax"}]},
    "dense_rnn_lstm": {"name": "dense_rnn_lstm", "input": {"size": 2, "length": 3},
                       "loss": "mse", "layers": [
                           {"size": 3, "activation": "tanh"}, {"op": "rnn", "size": 2},
                           {"op": "lstm", "size": 2, "return": "last"}, {"size": 1}]},
}
FORMATS = ("latex", "markdown")
#: the recurrent ops of the registry (those that may return their last state)
RECURRENT_OPS = [name for name, op in OPS.items() if op.attribute("return") is not None]


@pytest.fixture(scope="module")
def derivations():
    out = {name: derivation_of(load_spec(name)) for name in SEQUENCES}
    out.update({name: derivation_of(load_spec(spec)) for name, spec in SPECS.items()})
    return out


@pytest.fixture(scope="module")
def documents(derivations):
    out = {}
    for name in SEQUENCES:
        for lang in LANGUAGES:
            out[name, "latex", lang] = render_latex(derivations[name], lang)
            out[name, "markdown", lang] = render_markdown(derivations[name], lang)
    return out


def test_the_built_in_sequence_networks():
    assert {"tiny_rnn", "rnn_sine", "lstm_adding", "gru_tones"} <= set(SEQUENCES)


# --- every sequence network: the sections of the notes --------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("name", SEQUENCES)
def test_notes_have_the_sections_of_a_sequence_network(documents, name, form, lang):
    text = documents[name, form, lang]
    words = TEXT[lang]
    # the unrolled diagram: a TikZ picture with the recurrent arrows, or text in Markdown
    if form == "latex":
        assert r"\draw[recur]" in text and r"\mathbf{h}^{1}_{0}" in text
        assert r"\section{" + words["sec_bptt"] + "}" in text
        assert r"\section{" + words["sec_vanishing"] + "}" in text
    else:
        assert "```text" in text and "h¹₀" in text and "─→" in text and "x₁" in text
        assert "## " + words["sec_bptt"] in text and "## " + words["sec_vanishing"] in text
    # BPTT at a generic step: the error fed back from the step after under its bracket, the
    # words on that bracket and on the sums over the steps of shared parameters
    assert r"\left[1 \le t+1 \le T\right]" in text and r"\left[t \le T - 1\right]" in text
    for key in ("time_bracket_words", "shared_words"):
        assert _plain(words[key].format()) in _plain(text), key
    assert r"\nabla_{{W_{h}}^{1}} C = \sum_{t=1}^{T}" in text
    # why gradients vanish or explode: the Jacobian of one step, its products, clipping
    assert r"\left(J_{t}\right)_{jk} = \left[1 \le t+1 \le T\right]" in text
    assert r"\prod_{\tau=t}^{s-1}" in text
    assert "train(..., clip=...)" in text
    # nothing left of the formatting of the words
    assert not re.search(r"\\[a-z]+\{\{[a-z]\}\}", text), "a doubled brace of a format field"
    # the worked example through time
    step = words["example_step"].format(t=load_spec(name).length)
    assert step in text


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("form", FORMATS)
def test_simple_rnn_notes_show_the_bptt_recursion_and_its_bound(documents, form, lang):
    text = documents["tiny_rnn", form, lang]
    # δ_t = σ'(z_t) ⊙ ([t ≤ T-1] W_hᵀ δ_{t+1} + W²ᵀ δ²_t), as the derivation gives it
    assert (r"\boldsymbol{\delta}^{1}_{t} = \left(1 - \left(\mathbf{h}^{1}_{t}\right)^{2}\right) "
            r"\odot \left(\left[t \le T - 1\right] \left({W_{h}}^{1}\right)^{\top}\,"
            r"\boldsymbol{\delta}^{1}_{t+1} + \left(W^{2}\right)^{\top}\,"
            r"\boldsymbol{\delta}^{2}_{t}\right)") in text
    assert (r"J_{t} = \operatorname{diag}\!\left(1 - \left(\mathbf{h}^{1}_{t}\right)^{2}\right)"
            r"\,\left({W_{h}}^{1}\right)^{\top}") in text
    assert r"\le \left(\gamma\, \bigl\lVert {W_{h}}^{1} \bigr\rVert\right)^{s-t}" in text
    assert _plain(TEXT[lang]["carry_matrix"].format(l=1)) in _plain(text)


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("form", FORMATS)
def test_lstm_notes_carry_the_cell_error_through_the_forget_gate(documents, form, lang):
    text = documents["lstm_adding", form, lang]
    # the cell state's error at step t reads that of step t+1 through f_{t+1}
    assert (r"\nabla_{\mathbf{c}^{1}_{t}} C = \left[t \le T - 1\right]\, "
            r"\nabla_{\mathbf{c}^{1}_{t+1}} C \odot \mathbf{f}^{1}_{t+1}") in text
    assert (r"\left(J_{t}\right)_{jk} = \left[1 \le t+1 \le T\right] f^{1}_{t+1,\,j} "
            r"\delta_{jk}") in text
    assert r"J_{t} = \operatorname{diag}\!\left(\mathbf{f}^{1}_{t+1}\right)" in text
    assert r"\prod_{\tau=t + 1}^{s} f^{1}_{\tau,j}" in text
    # the gate gradients, and the stacked error of the four gates
    for gate in "ifgo":
        assert rf"\frac{{\partial C}}{{\partial {gate}^{{1}}_{{tj}}}}" in text
    assert r"\begin{bmatrix} \nabla_{\mathbf{i}^{1}_{t}} C \odot \mathbf{i}^{1}_{t}" in text
    # the last state only is read: the bracket [t = T]
    assert r"\left[t = T\right]" in text
    assert _plain(TEXT[lang]["last_step_words"].format()) in _plain(text)
    # the gates' activations, with their derivatives
    assert "sigmoid" in text and r"\sigma'\!\left(z\right) = a \left(1 - a\right)" in text


@pytest.mark.parametrize("name", SEQUENCES + list(SPECS))
def test_terms_on_one_adjoint_are_one_product(derivations, name):
    """No formula adds two terms that multiply the same adjoint (∂C/∂q or δ): they are
    written as one product, as a lecturer would (∂C/∂h o (1 - tanh²c), δ (1 - u))."""
    for formula in derivations[name].formulas:
        on = {}
        for term in sp.Add.make_args(formula.rhs):
            for factor in sp.Mul.make_args(term):
                if isinstance(factor, sp.Derivative) or (
                        isinstance(factor, sp.Indexed) and tensor_of(factor).role == "delta"):
                    on.setdefault(factor, []).append(term)
        assert all(len(terms) == 1 for terms in on.values()), (formula.key, formula.rhs)


def test_lstm_and_gru_errors_in_the_form_of_the_textbooks(derivations):
    lstm = {f.key: f.rhs for f in derivations["lstm_adding"].formulas}
    h, c, o = (NetTensor(role, 1, rank=2) for role in "hco")
    t, j = INDEX_POOL[8], INDEX_POOL[0]
    on_h = [term for term in sp.Add.make_args(lstm["dC/dc^1"]) if term.has(h)]
    assert len(on_h) == 1, on_h
    assert {o.indexed[t, j], 1 - sp.tanh(c.indexed[t, j]) ** 2} <= set(
        sp.Mul.make_args(on_h[0])), on_h
    gru = {f.key: f.rhs for f in derivations["gru_tones"].formulas}
    assert len(sp.Add.make_args(gru["dC/dg^1"])) == 1
    assert len(sp.Add.make_args(gru["dC/du^1"])) == 1


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("form", FORMATS)
def test_stacked_gates_in_their_order_with_their_derivatives_written_in(documents, form, lang):
    """The LSTM's δ in the summary: σ' of every gate written in its output, the blocks in
    the order of the stacked rows (i, f, g, o), in the index form as in the tensor form."""
    text = documents["lstm_adding", form, lang]
    summary = text[text.rindex(TEXT[lang]["sec_summary_graph"]):]
    (line,) = [line for line in summary.splitlines()
               if re.match(r"\\delta\^\{1\}_\{tj\} &?= ", line)]
    assert r"\sigma_{i}'" not in line and r"\tanh_{g}'" not in line
    where = [line.index(rf"\frac{{\partial C}}{{\partial {gate}^{{1}}") for gate in "ifgo"]
    assert where == sorted(where)


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("name", SEQUENCES + list(SPECS))
def test_the_notes_say_what_each_layers_error_is_of(derivations, name, lang):
    """Every layer is named where the notes say what its δ is the derivative of (the BPTT
    section and the notation table): a GRU's under its state, an op with an activation
    under its weighted input (an LSTM's stacked over its gates), any other under its
    output; the old blanket sentence is gone."""
    derivation = derivations[name]
    words = TEXT[lang]
    if not any(state_tensors(node) for node in derivation.model.nodes):
        pytest.skip("no recurrence: the notes of per-step layers keep their sentence")
    text = render_latex(derivation, lang)
    layer = words["layer_n"].format
    for node in derivation.model.nodes:
        delta, output = node.forward.delta, node.forward.output
        kind = ("output" if delta == output else "state" if delta in state_tensors(node)
                else "input")
        opening = words[f"delta_on_{kind}"].split("{layers}")[0]
        where = [m.start() for m in re.finditer(re.escape(opening), text)]
        assert len(where) == 2, (name, node.index, kind)          # BPTT text and notation
        assert all(layer(l=node.index) in text[w:w + 400] for w in where), (name, node.index)
        if kind == "input" and derivation.model.shapes[delta][-1] != \
                derivation.model.shapes[output][-1]:
            assert words["delta_stacked"].format(layers=layer(l=node.index)) in text
    assert "simple recurrent layer) or its output" not in text


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_zero_states_of_an_lstm_include_its_cell(derivations, lang):
    text = render_latex(derivations["lstm_adding"], lang)
    assert text.count(r"\mathbf{h}_{0} = \mathbf{c}_{0} = \mathbf{0}") >= 3
    # the batch form's cell state is 𝒞, said where the batch form begins (C is the cost)
    cell = TEXT[lang]["batch_cell"].format(cell=r"$\mathcal{C}^{l}_{t}$")
    assert cell in text
    rnn = render_latex(derivations["tiny_rnn"], lang)
    assert r"\mathbf{c}_{0}" not in rnn and r"\mathcal{C}" not in rnn


@pytest.mark.parametrize("name", SEQUENCES)
def test_every_shown_step_of_the_recurrence_is_worked(derivations, name):
    """At every step the example shows, the recurrent layer's error is written out: with its
    numbers, or, a sum over too many units, as its formula at that step with its value (the
    BPTT recursion was not shown at t = T - 1 of rnn_sine)."""
    text = render_latex(derivations[name], "en")
    length = load_spec(name).length
    for step in (length - 1, length):
        title = TEXT["en"]["example_step"].format(t=step)
        if title not in text:
            continue
        block = text.rsplit(title, 1)[1].split(r"\end{align*}", 1)[0]     # the backward pass
        node = next(n for n in derivations[name].model.nodes if n.op.name in RECURRENT_OPS)
        at = rf"_\{{{step},?1\}}"           # h_{21}, h_{19,1}
        assert re.search(rf"\\delta\^\{{{node.index}\}}{at} &=", block) or re.search(
            rf"\\frac{{\\partial C}}{{\\partial [a-z]\^\{{{node.index}\}}{at}}} &=",
            block), (name, step)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_worked_numbers_that_vanished_are_small_not_zero(derivations, lang):
    """A gradient that faded through many steps (about 1e-6) in scientific notation, not 0.0000,
    as is any worked value below 0.001, to 3 significant digits (-0.000467 printed -0.0005
    made a product worked by hand come out wrong); a function's argument without a second
    pair of brackets."""
    text = render_latex(derivations["lstm_adding"], lang)
    assert re.search(r"\$-?\d\.\d\d \\times 10\^\{-\d\}\$", text)
    assert not re.search(r"&= [^\n]*[ (]-?0\.000\d", text)     # no worked value left so
    assert r"\left((" not in text and "(0.0000)" not in text


@pytest.mark.parametrize("lang", LANGUAGES)
def test_gru_notes_carry_the_state_error_through_the_update_gate(documents, lang):
    text = documents["gru_tones", "latex", lang]
    assert r"J_{t} = \operatorname{diag}\!\left(\mathbf{u}^{1}_{t+1}\right)" in text
    assert r"\left[t \le T - 1\right]\, \boldsymbol{\delta}^{1}_{t+1} \odot \mathbf{u}^{1}_{t+1}" \
        in text
    name = "update gate" if lang == "en" else "更新门"
    assert name in text


@pytest.mark.parametrize("lang", LANGUAGES)
def test_other_sequence_specs_render(derivations, lang):
    for name in SPECS:
        for text in (render_latex(derivations[name], lang),
                     render_markdown(derivations[name], lang),
                     render_latex(derivations[name], lang, fragment=True)):
            assert r"\left[t \le T - 1\right]" in text, name
    stack = render_latex(derivations["stack"], lang)
    # two recurrent layers: the second one's Jacobian in short
    assert TEXT[lang]["vanishing_same"].format(l=1, q="")[:8] in stack
    assert r"\left[h^{2}_{tj} > 0\right]" in stack      # relu's derivative in J_t, in h


@pytest.mark.parametrize("name", list(SPECS))
def test_worked_example_of_other_sequence_specs_matches_pytorch(derivations, name):
    """Stacked and gated recurrences stepped forward and backward through time: the cost and
    every gradient equal PyTorch's (the built-in examples: tests/test_latex.py)."""
    pytest.importorskip("torch")
    from torch_reference import torch_loss_and_grads

    example = worked_example(derivations[name])
    params = {key: value.copy() for key, value in example.parameters.items()}
    loss, grads = torch_loss_and_grads(SPECS[name], params, example.x[None], example.y[None])
    assert example.loss + example.penalty == pytest.approx(loss, rel=1e-12, abs=1e-14)
    ours = example.gradients()
    assert set(ours) == set(grads)
    for key in grads:
        np.testing.assert_allclose(ours[key], grads[key], rtol=1e-10, atol=1e-13, err_msg=key)


def test_english_and_chinese_have_the_same_mathematics(derivations):
    en, zh = (render_context(derivations["lstm_adding"], lang) for lang in LANGUAGES)
    assert en["summary"] == zh["summary"] and en["matrix"] == zh["matrix"]
    assert [p["math"] for p in en["vanishing"][0]["paragraphs"]] == [
        p["math"] for p in zh["vanishing"][0]["paragraphs"]]
    assert [block["lines"] for block in en["example"]["backward_steps"]] == [
        block["lines"] for block in zh["example"]["backward_steps"]]


def test_unrolled_text_of_tiny_rnn():
    model = derivation_of(load_spec("tiny_rnn")).model
    assert unrolled_text(model) == [
        "            a²₁      a²₂      a²₃",
        "             ↑        ↑        ↑",
        " h¹₀=0 ───→ h¹₁ ───→ h¹₂ ───→ h¹₃",
        "             ↑        ↑        ↑",
        "            x₁       x₂       x₃",
        "            t=1      t=2      t=3",
    ]


def test_unrolled_diagram_of_a_long_lstm_draws_steps_one_two_and_last(derivations):
    diagram = render_context(derivations["lstm_adding"])["diagram"]
    assert diagram["unrolled"] and not diagram["chain"]
    labels = [box["label"] for box in diagram["boxes"]]
    assert r"\mathbf{h}^{1}_{20},\ \mathbf{c}^{1}_{20}" in labels and r"\cdots" in labels
    assert r"\mathbf{h}^{1}_{0} = \mathbf{c}^{1}_{0} = \mathbf{0}" in labels
    # the dense layer reads the last state only
    assert [box["label"] for box in diagram["boxes"] if box["style"] == "output"] == [
        r"\mathbf{a}^{2}"]


# --- the worked example of tiny_rnn, by hand -------------------------------------------------


def tiny_rnn_by_hand() -> dict[str, np.ndarray]:
    """tiny_rnn's forward pass and BPTT in NumPy from its YAML: h_t = tanh(Wx x_t + Wh h_{t-1}
    + b1), a_t = W2 h_t + b2, C = Σ_t ½(a_t - y_t)², δ²_t = a_t - y_t, δ¹_t = (1 - h_t²) ⊙
    (Whᵀ δ¹_{t+1} + W2ᵀ δ²_t) with δ¹_{T+1} = 0; gradients summed over the steps."""
    data = yaml.safe_load((EXAMPLES_DIR / "tiny_rnn.yaml").read_text(encoding="utf-8"))
    example = data["example"]
    x, y = np.array(example["x"], float), np.array(example["y"], float)
    p = {key: np.array(value, float) for key, value in example["params"].items()}
    steps = len(x)
    h = np.zeros((steps + 1, 2))         # h[0] = 0; h[t] the state of step t
    z1, a2 = np.zeros((steps, 2)), np.zeros((steps, 1))
    for t in range(steps):
        z1[t] = p["Wx1"] @ x[t] + p["Wh1"] @ h[t] + p["b1"]
        h[t + 1] = np.tanh(z1[t])
        a2[t] = p["W2"] @ h[t + 1] + p["b2"]
    d2 = a2 - y
    d1 = np.zeros((steps + 1, 2))        # d1[steps] = 0: nothing after the last step
    for t in reversed(range(steps)):
        d1[t] = (1 - h[t + 1] ** 2) * (p["Wh1"].T @ d1[t + 1] + p["W2"].T @ d2[t])
    d1 = d1[:steps]
    return {"z1": z1, "h1": h[1:], "a2": a2, "C": np.array(0.5 * np.sum((a2 - y) ** 2)),
            "delta2": d2, "delta1": d1,
            "Wh1_terms": np.array([np.outer(d1[t], h[t]) for t in range(steps)]),
            "Wx1_terms": np.array([np.outer(d1[t], x[t]) for t in range(steps)]),
            "b1_terms": d1, "W2": sum(np.outer(d2[t], h[t + 1]) for t in range(steps)),
            "Wh1": sum(np.outer(d1[t], h[t]) for t in range(steps)),
            "Wx1": sum(np.outer(d1[t], x[t]) for t in range(steps)), "b1": d1.sum(axis=0)}


def _four(value: float) -> str:
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text


def _matrix(rows: np.ndarray) -> str:
    return (r"\begin{bmatrix}" + r" \\ ".join(" & ".join(_four(v) for v in row) for row in rows)
            + r"\end{bmatrix}")


def _column(values: np.ndarray) -> str:
    return r"\begin{bmatrix}" + r" \\ ".join(_four(v) for v in values) + r"\end{bmatrix}"


def test_tiny_rnn_example_equals_numpy_by_hand(derivations):
    by_hand = tiny_rnn_by_hand()
    example = worked_example(derivations["tiny_rnn"])
    assert example.loss == pytest.approx(float(by_hand["C"]), rel=1e-14)
    np.testing.assert_allclose(example.value(NetTensor("h", 1, rank=2)), by_hand["h1"],
                               rtol=1e-14)
    np.testing.assert_allclose(example.value(NetTensor("delta", 1, rank=2)), by_hand["delta1"],
                               rtol=1e-13)
    grads = example.gradients()
    for key in ("W2", "Wh1", "Wx1", "b1"):
        np.testing.assert_allclose(grads[key], by_hand[key], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("form", FORMATS)
def test_tiny_rnn_notes_print_the_numbers_by_hand(documents, form, lang):
    by_hand = tiny_rnn_by_hand()
    text = documents["tiny_rnn", form, lang]
    # forward, step by step: z¹_{t1} and h¹_{t1} spelled out, every value in the table
    for t in range(3):
        assert _spelled_result(text, rf"z^{{1}}_{{{t + 1}1}}") == _four(by_hand["z1"][t, 0])
        assert _spelled_result(text, rf"h^{{1}}_{{{t + 1}1}}") == _four(by_hand["h1"][t, 0])
        for name in ("z1", "h1", "a2"):
            for value in by_hand[name][t]:
                assert f"${_four(value)}$" in text, (name, t)
    assert f"C = {_four(float(by_hand['C']))}" in text
    # backward through time: δ¹_3, δ¹_2, δ¹_1 spelled out in that order, from δ¹_4 = 0
    starts = []
    for t in (3, 2, 1):
        entry = rf"\delta^{{1}}_{{{t}1}} &= "
        assert _spelled_result(text, rf"\delta^{{1}}_{{{t}1}}") == _four(by_hand["delta1"][t - 1, 0])
        starts.append(text.index(entry))
        for value in by_hand["delta1"][t - 1]:
            assert f"${_four(value)}$" in text
    assert starts == sorted(starts)
    # at the last step the error of the step after drops out; at step 2 it comes in
    three = _spelled_block(text, r"\delta^{1}_{31}")
    assert r"w_{h}" not in three and r"\delta^{1}_{41}" not in three
    assert r"\delta^{1}_{31} {w_{h}}^{1}_{11}" in _spelled_block(text, r"\delta^{1}_{21}")
    # the gradients as sums over the steps, term by term
    for key, show in (("Wh1", _matrix), ("Wx1", _matrix), ("b1", _column)):
        terms = " + ".join(show(term) for term in by_hand[f"{key}_terms"])
        assert terms in text, key
        assert f"&= {show(by_hand[key])}" in text, key


def _spelled_block(text: str, lhs: str) -> str:
    """The lines that spell out one entry: from ``lhs &=`` to its result."""
    start = text.index(lhs + " &= ")
    return text[start:_RESULT.search(text, start).end()]


def _spelled_result(text: str, lhs: str) -> str:
    """The result of the entry ``lhs`` spelled out: the number after the last "=". """
    return _RESULT.search(text, text.index(lhs + " &= ")).group(1)


_RESULT = re.compile(r"= (-?\d+\.\d{4})(?: \\\\)?$", re.MULTILINE)


def _plain(text: str) -> str:
    return " ".join(text.split())


# --- default values, the printers and the terminal ---------------------------------------------


def test_default_values_of_a_sequence_are_one_vector_per_step():
    spec = load_spec("rnn_sine")
    x, y, params = default_values(spec)
    assert len(x) == 20 * 1 and len(y) == 20 * 1
    assert all(round(v, 1) == v for v in x) and set(y) == {0.5, -0.5}
    assert np.shape(params["Wh1"]) == (16, 16) and len(params["b1"]) == 16
    x, y, _ = default_values(load_spec("gru_tones"))       # the last state: one target
    assert len(x) == 16 and y == (1.0, 0.0, 0.0)
    x, y, _ = default_values(load_spec(SPECS["lstm_seq"]))  # a class per step
    assert y == (1.0, 0.0) * 4


def test_printer_reads_steps_guards_blocks_and_sums_over_steps():
    t = INDEX_POOL[8]
    h, delta, z = (NetTensor(role, 1, rank=2) for role in ("h", "delta", "z"))
    wh = NetTensor("wh", 1, rank=2)
    # a guard before a matrix product needs no brackets
    guarded = StepGuard(0, LENGTH - 1) * MatVec(wh, delta.at_step(1), sp.true)
    assert latex(guarded) == (r"\left[t \le T - 1\right] \left({W_{h}}^{1}\right)^{\top}\,"
                              r"\boldsymbol{\delta}^{1}_{t+1}")
    assert pretty(guarded) == "[t ≤ T - 1] (Wₕ¹)ᵀ δ¹ₜ₊₁"
    assert pretty(guarded, batch=True) == "[t ≤ T - 1] Δ¹ₜ₊₁ Wₕ¹"
    # a block of a quantity at a step: (z_t)_[a:b], never z_t_[a:b] (a double subscript)
    n = sp.Symbol("n_1", integer=True, positive=True)
    assert latex(Block(z.at_step(0), n, n)) == (
        r"\left(\mathbf{z}^{1}_{t}\right)_{[n_{1} + 1\,:\,2 n_{1}]}")
    # δ_{tT} of the last step reads as a bracket, not as an error
    assert latex(sp.KroneckerDelta(LENGTH, t)) == r"\left[t = T\right]"
    assert pretty(sp.KroneckerDelta(LENGTH, t)) == "[t = T]"
    # the batch form of a shared weight's gradient: the mean over the samples of a sum
    gradient = SumSteps(Outer(delta.at_step(0), h.at_step(-1)))
    assert latex(gradient, batch=True) == (
        r"\frac{1}{B}\sum_{t=1}^{T} \left(\Delta^{1}_{t}\right)^{\top}\,H^{1}_{t-1}")
    assert pretty(gradient, batch=True) == "(1/B) Σₜ (Δ¹ₜ)ᵀ H¹ₜ₋₁"
    assert latex(NetTensor("c", 1, rank=2).at_step(0), batch=True) == r"\mathcal{C}^{1}_{t}"


def test_show_names_the_sequence_shapes(capsys):
    assert main(["show", "tiny_rnn"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("tiny_rnn: sequences of T = 3 steps, 3×2 -> 3×2 -> 3×1, "
                                   "layers rnn tanh, identity, loss mse")
    assert "[t ≤ T - 1] (Wₕ¹)ᵀ δ¹ₜ₊₁" in out and "*(W" not in out
    assert "(1/B) Σₜ (Δ¹ₜ)ᵀ H¹ₜ₋₁" in out and "wₕ¹ +" not in out
    assert main(["show", "lstm_adding"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("lstm_adding: sequences of T = 20 steps, 20×2 -> 32 -> 1")
    assert "sigmoid (gates i, f, o of layer 1)" in out and "[t = T]" in out


@pytest.mark.parametrize("op", RECURRENT_OPS)
def test_a_recurrent_output_shows_the_loss_part_and_adds_it(op, capsys, tmp_path):
    """A recurrent layer that is the network's output: its loss gradient is named the loss's
    own part (show, the notes' heading in both languages), and the derivation of ∂C/∂h_t adds
    it in a step of its own after the error from the step after."""
    spec = {"name": f"out_{op}", "input": {"size": 2, "length": 3},
            "layers": [{"op": op, "size": 2}], "loss": "mse"}
    path = tmp_path / f"{op}_out.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(the loss's own part) = h¹ₜⱼ - yₜⱼ" in out
    derivation = derivation_of(load_spec(spec))
    steps = [step for formula in derivation.formulas for step in formula.steps
             if step.why.startswith("the loss reads the output too")]
    assert len(steps) == 1 and any(tensor_of(e).role == "y"
                                   for e in steps[0].expr.atoms(sp.Indexed))
    for lang in LANGUAGES:
        heading = TEXT[lang]["block_loss_part"].format(q=r"$h^{1}_{tj}$")
        text = render_latex(derivation, lang)
        assert heading in text
        # the worked example names only the whole ∂C/∂h_t so: the loss's part, h - y, is
        # neither spelled out nor a row of the table under that name
        assert r"\frac{\partial C}{\partial h^{1}_{21}} &= h^{1}_{21} - y_{21}" not in text
        assert text.count(r"$\nabla_{\mathbf{h}^{1}_{2}} C$ &") <= 1


# --- compiling ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pdfs(derivations):
    for lang in LANGUAGES:
        if not tex_available(lang):
            pytest.skip(missing_tex_message(lang))
    out = {}
    for name in ("tiny_rnn", "lstm_adding"):
        for lang in LANGUAGES:
            out[name, lang] = compile_pdf(render_latex(derivations[name], lang), lang,
                                          jobname=f"{name}_{lang}")
    return out


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("name", ["tiny_rnn", "lstm_adding"])
def test_sequence_notes_compile_cleanly(pdfs, name, lang, tmp_path):
    result = pdfs[name, lang]
    assert result.pdf.startswith(b"%PDF") and log_problems(result.log) == []
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    pdf = tmp_path / f"{name}.pdf"
    pdf.write_bytes(result.pdf)
    text = _plain(subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True,
                                 check=True).stdout)
    words = TEXT[lang]
    assert words["sec_bptt"] in text and words["sec_vanishing"] in text


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("returns", ["last", "sequence"])
def test_a_cancelled_loss_part_reads_true_in_the_notes(returns, lang):
    """A sigmoid rnn state under binary cross-entropy: the step that multiplies σ' into the
    loss's part says why (at t = T only for a last state), the tensor-form sentence says
    the output minus its target is not multiplied by σ', and the summary and matrix form do
    not show the loss's own part under the name of the whole ∂C/∂h_t."""
    from derive.derivation.reverse import MULTIPLIED_OUT, MULTIPLIED_OUT_LAST

    spec = {"name": "sig_bce", "input": {"size": 2, "length": 3},
            "loss": "binary_cross_entropy",
            "layers": [{"op": "rnn", "size": 2, "activation": "sigmoid", "return": returns}]}
    derivation = derivation_of(load_spec(spec))
    (delta,) = [f for f in derivation.formulas if f.key == "delta^1"]
    why = MULTIPLIED_OUT_LAST if returns == "last" else MULTIPLIED_OUT
    assert [step.why for step in delta.steps].count(why) == 1
    text = TEXT[lang]
    markdown = render_markdown(derivation, lang)
    assert text["carry_matrix_cancelled"].format(l=1) in markdown
    assert text["carry_matrix"].format(l=1) not in markdown
    tail = markdown[markdown.index(f"## {text['sec_matrix']}"):
                    markdown.index(f"## {text['sec_example']}")]
    assert r"\frac{\partial C}{\partial h^{1}_{tj}}" not in tail
    assert r"\nabla_{\mathbf{h}^{1}_{t}} C" not in tail


@pytest.mark.parametrize("lang", LANGUAGES)
def test_a_long_sequence_shows_its_first_and_last_steps(lang):
    """The worked example's x (and y of a sequence output) of T > 8 steps: the first and last
    three rows, which the worked steps read (x_T, y_T at t = T), a row of dots between."""
    from derive.render.latex import EDGE_STEPS

    spec = load_spec("rnn_sine")
    text = render_latex(derivation_of(spec), lang)
    T, x, y = spec.length, spec.example.x, spec.example.y
    for symbol, values in (("x", x), ("y", y)):
        labels = [rf"\mathbf{{{symbol}}}_{{{t}}}^{{\top}}" for t in
                  (*range(1, EDGE_STEPS + 1), *range(T - EDGE_STEPS + 1, T + 1))]
        shown = r" \\ ".join(labels[:EDGE_STEPS] + [r"\vdots"] + labels[EDGE_STEPS:])
        rows = [f"{row[0]:g}" for row in (*values[:EDGE_STEPS], *values[-EDGE_STEPS:])]
        numbers = r" \\ ".join(rows[:EDGE_STEPS] + [r"\vdots"] + rows[EDGE_STEPS:])
        assert (rf"\begin{{bmatrix}}{shown}\end{{bmatrix}} = \begin{{bmatrix}}{numbers}"
                rf"\end{{bmatrix}}") in text

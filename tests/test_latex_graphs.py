"""LaTeX documents of networks that are graphs: residual connections, layer norm, dropout, and
regularization, next to chains with and without a penalty.

The spec dicts here (:data:`SPECS`) are shared with the other LaTeX tests. Compiling the
documents is in tests/test_latex_compile.py; this file needs no TeX.
"""

from __future__ import annotations

import re

import pytest
import yaml

from derive.derivation.reverse import derive
from derive.graph.model import build_model
from derive.render.latex import render_context, render_latex, render_markdown
from derive.spec.load import load_spec

#: Graphs (and two chains) that exercise every op, skips from the input, several readers of
#: one layer, both penalties, a layer without bias and a one-layer network.
SPECS: dict[str, dict] = {
    "resnorm": {  # residual + layer norm + dropout + L2, softmax and cross-entropy
        "name": "resnorm", "input": 3,
        "layers": [{"size": 3, "activation": "relu", "name": "h1"}, {"size": 3},
                   {"op": "add", "inputs": ["h1", 2]}, {"op": "layer_norm"},
                   {"op": "dropout", "rate": 0.1}, {"size": 2, "activation": "softmax"}],
        "loss": "cross_entropy", "regularization": {"l2": 0.01}},
    "skip3": {  # a skip from the input: an add of three inputs
        "name": "skip3", "input": 3,
        "layers": [{"size": 3, "activation": "tanh", "name": "h1"},
                   {"size": 3, "activation": "silu"},
                   {"op": "add", "inputs": ["input", "h1", 2]},
                   {"size": 2, "activation": "sigmoid"}],
        "loss": "binary_cross_entropy"},
    "lnsoft": {  # layer norm with its own eps, softmax as an activation op at the output
        "name": "lnsoft", "input": 4,
        "layers": [{"size": 4, "bias": False}, {"op": "layer_norm", "eps": 0.001},
                   {"op": "activation", "activation": "softmax"}],
        "loss": "cross_entropy"},
    "drop_l1": {  # dropout, L1 and L2, no bias
        "name": "drop_l1", "input": 3,
        "layers": [{"size": 4, "activation": "elu", "bias": False},
                   {"op": "dropout", "rate": 0.5}, {"size": 2}],
        "loss": "mse", "regularization": {"l1": 0.01, "l2": 0.001}},
    "chain_l2": {  # a plain chain with a penalty: BP1-BP4 plus dJ/dW
        "name": "chain_l2", "input": 2,
        "layers": [{"size": 3, "activation": "gelu"}, {"size": 2}],
        "loss": "mse", "regularization": {"l2": 0.05}},
    "single": {  # one layer without bias: no BP2, no BP3
        "name": "single", "input": 3,
        "layers": [{"size": 2, "activation": "sigmoid", "bias": False}],
        "loss": "binary_cross_entropy"},
}
GRAPHS = [name for name, spec in SPECS.items() if not load_spec(spec).is_chain]


@pytest.fixture(scope="module")
def derivations():
    return {name: derive(build_model(load_spec(spec))) for name, spec in SPECS.items()}


def labels_of(text: str) -> list[str]:
    return re.findall(r"\\label\{([^}]*)\}", text)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_document_has_every_formula_once(derivations, name, lang):
    derivation = derivations[name]
    text = render_latex(derivation, lang)
    assert text.count(r"\begin{document}") == 1 and text.rstrip().endswith(r"\end{document}")
    labels = labels_of(text)
    assert len(labels) == len(set(labels)), "duplicate labels"
    assert set(re.findall(r"\\(?:eq)?ref\{([^}]*)\}", text)) <= set(labels)
    for node in derivation.model.nodes:
        assert rf"\label{{eq:{name}:delta{node.index}}}" in text or derivation.model.is_chain
        for parameter in node.parameters:
            assert rf"\label{{eq:{name}:d{parameter.key}}}" in text
        for equation in node.equations:
            assert rf"\label{{eq:{name}:{equation.target.role}{node.index}}}" in text
    # no field printed as a word, no object printed by SymPy's fallback (\text{\Pi})
    assert "None" not in text and not re.search(r"\\text\{\\?[A-Z]", text)


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_sections_follow_the_graph(derivations, name):
    """One subsection per layer, from the output back, each with its derivation steps."""
    derivation = derivations[name]
    context = render_context(derivation)
    (section,) = context["backward"]
    titles = [part["title"] for part in section["parts"]]
    nodes = [node.index for node in reversed(derivation.model.nodes)]
    assert [int(re.match(r"Layer (\d+)", title).group(1)) for title in titles] == nodes
    for part, index in zip(section["parts"], nodes):
        formulas = [f for f in derivation.formulas if f.node == index]
        assert len(part["blocks"]) == len(formulas)
        for block, formula in zip(part["blocks"], formulas):
            assert len(block["steps"]) == len(formula.steps)


def test_residual_diagram_draws_the_skips(derivations):
    text = render_latex(derivations["skip3"])
    # node 3 reads the input (0), layer 1 and layer 2: two arrows skip layers
    assert text.count(r"\draw[skip]") == 2
    assert r"\draw[skip] (n0.east)" in text and r"\draw[skip] (n1.east)" in text
    assert r"\draw[edge] (n2.south) -- (n3.north)" in text
    resnorm = render_latex(derivations["resnorm"])
    assert resnorm.count(r"\draw[skip]") == 1 and r"\texttt{add}" in resnorm


def test_layer_norm_notation(derivations):
    text = render_latex(derivations["resnorm"])
    for symbol in (r"\gamma^{4}_{j}", r"\beta^{4}_{j}", r"\mu^{4}", r"(\sigma^{4})^{2}",
                   r"\hat{x}^{4}_{j}", r"\frac{\partial C}{\partial \mu^{4}}",
                   r"\frac{\partial C}{\partial (\sigma^{4})^{2}}", r"\nabla_{\hat{\mathbf{x}}^{4}} C",
                   r"\odot", r"10^{-5}"):
        assert symbol in text, symbol
    assert r"\frac{1}{1000}" in render_latex(derivations["lnsoft"])  # the spec's own eps


def test_dropout_mask(derivations):
    text = render_latex(derivations["resnorm"])
    assert r"m^{5}_{j}" in text and r"\mathbf{m}^{5}" in text
    assert "dropout off" in text


def test_penalty_term_of_the_weight_gradient(derivations):
    """∂J/∂W = mean of ∂C/∂W + ∂R/∂W, in the summary and the batch form; biases and layer
    norm parameters get no penalty."""
    text = render_latex(derivations["resnorm"])
    assert r"\label{eq:resnorm:R}" in text
    for l in (1, 2, 6):
        assert rf"\nabla_{{W^{{{l}}}}} J = \frac{{1}}{{B}}" in text
        assert rf"\frac{{W^{{{l}}}}}{{100}}" in text
        assert rf"\label{{eq:resnorm:dJ_dW{l}}}" in text
    assert r"\nabla_{\mathbf{b}^{1}} J = \frac{1}{B}\,\mathbf{1}^{\top} \Delta^{1} \tag" in text
    both = render_latex(derivations["drop_l1"])
    assert r"\operatorname{sign}" in both
    chain = render_latex(derivations["chain_l2"])
    assert r"\tag{BP4}" in chain and r"\frac{\partial J}{\partial w^{1}_{jk}}" in chain


def test_chain_with_penalty_keeps_the_classic_sections(derivations):
    context = render_context(derivations["chain_l2"])
    titles = [section["title"] for section in context["backward"]]
    assert titles == ["The error of the output layer (BP1)", "The error of the hidden layers (BP2)",
                      "The gradients of the biases and weights (BP3, BP4)"]
    single = render_context(derivations["single"])
    assert "no hidden layer" in single["backward"][1]["text"]
    assert "has no bias" in single["backward"][2]["parts"][0]["text"]


@pytest.mark.parametrize("name", GRAPHS)
def test_markdown_and_fragment(derivations, name):
    markdown = render_markdown(derivations[name], "zh")
    assert markdown.count("$$") % 2 == 0 and r"\label" not in markdown
    assert r"\begin{aligned}[t]" not in markdown  # KaTeX has no [t]
    fragment = render_latex(derivations[name], fragment=True)
    assert r"\documentclass" not in fragment
    labels = labels_of(fragment)
    assert len(labels) == len(set(labels)) and f"eq:{name}:C" in labels


def test_cli_writes_a_graph_document(tmp_path, capsys):
    from derive.cli.main import main

    spec = tmp_path / "resnorm.yaml"
    spec.write_text(yaml.safe_dump(SPECS["resnorm"]), encoding="utf-8")
    out = tmp_path / "resnorm.tex"
    assert main(["latex", str(spec), "-o", str(out)]) == 0
    assert r"\subsection{Layer 4: \texttt{layer\_norm}}" in out.read_text(encoding="utf-8")
    assert main(["latex", str(spec), "--format", "markdown", "--lang", "zh"]) == 0
    assert "第 4 层" in capsys.readouterr().out

"""LaTeX, Markdown and terminal notes of convolutional networks (docs/architecture.md, "Images").

The printers spell shifted entries, Iverson brackets, a window's maximum and the indicator of
its first maximum in index form, and convolutions, folds and reshapes in tensor form; the
document of a CNN draws its feature maps, derives with the brackets said in words and works the
example through maps. The worked example's numbers are checked against a convolution written
out by hand here (loops over the definition, not the derived formulas) and against the
generated NumPy code. Compiling the documents is in tests/test_latex_compile.py; this file
needs no TeX.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from derive.cli.main import derivation_of, main
from derive.derivation.tensorform import to_vector
from derive.quantities import NetTensor
from derive.registry.windows import FirstMax, InRange, WindowMax
from derive.render.latex import render_context, render_latex, render_markdown
from derive.render.latex_printer import latex
from derive.render.pretty import pretty
from derive.render.worked_example import worked_example
from derive.spec.load import load_spec

CNNS = ("tiny_cnn", "digits_cnn", "lenet")
#: conv after a pooling layer (the full correlation of δ with the flipped kernel), a stride
#: of two and padding, a stride per axis, average pooling
STRIDED = {
    "name": "strided_cnn", "input": [2, 5, 5],
    "layers": [{"op": "conv2d", "channels": 2, "kernel": 2, "activation": "tanh"},
               {"op": "conv2d", "channels": 3, "kernel": [2, 3], "stride": [1, 2],
                "padding": 1},
               {"op": "avg_pool2d", "kernel": 2}, {"op": "flatten"}, {"size": 2}],
    "loss": "mse"}

r, s, u, v, p, q = sp.symbols("r s u v p q", integer=True, positive=True)
j, k = sp.symbols("j k", integer=True, positive=True)


@pytest.fixture(scope="module")
def derivations():
    out = {name: derivation_of(load_spec(name)) for name in CNNS}
    out["strided_cnn"] = derivation_of(load_spec(STRIDED))
    return out


def formula(derivation, key: str):
    (found,) = [f for f in derivation.formulas if f.key == key]
    return found


# --- printing ------------------------------------------------------------------------------


def test_shifted_entries_brackets_and_maxima_in_latex():
    a0 = NetTensor("a", 0, rank=3).indexed
    w = NetTensor("w", 1, rank=4, parameter=True).indexed
    assert latex(w[j, k, p, q]) == "w^{1}_{jkpq}"
    # commas (and thin spaces) once an index is not a letter; positions before offsets
    assert latex(a0[k, p + 2 * r - 3, q + 2 * s - 3]) == r"a^{0}_{k,\,2r+p-3,\,2s+q-3}"
    assert latex(InRange(r - 2 * u + 2, 1, 3)) == r"\left[1 \le r-2u+2 \le 3\right]"
    window = WindowMax(a0[j, 2 * u + p - 2, 2 * v + q - 2], (p, 1, 2), (q, 1, 2))
    assert latex(window) == r"\max_{p,q} a^{0}_{j,\,2u+p-2,\,2v+q-2}"
    # the indicator's own offsets are primed where the position it tests uses p, q
    assert latex(FirstMax(window, p, q)) == (
        r"\mathbb{1}\!\left[(p,\,q) = \operatorname{argmax}_{p',q'} "
        r"a^{0}_{j,\,2u+p'-2,\,2v+q'-2}\right]")
    assert latex(sp.Symbol("H_2") * sp.Symbol("W_2")) == "H_{2} W_{2}"


def test_terminal_prints_feature_maps():
    a0 = NetTensor("a", 0, rank=3).indexed
    assert pretty(a0[k, p + 2 * r - 3, q + 2 * s - 3]) == "a⁰[k, 2r+p-3, 2s+q-3]"
    assert pretty(InRange(r - u + 2, 1, 3)) == "[1 ≤ r-u+2 ≤ 3]"
    window = WindowMax(a0[j, 2 * u + p - 2, 2 * v + q - 2], (p, 1, 2), (q, 1, 2))
    assert pretty(FirstMax(window, r - 2 * u + 2, s - 2 * v + 2)) == (
        "𝟙[(r-2u+2, s-2v+2) = argmax_p,q a⁰[j, 2u+p-2, 2v+q-2]]")
    assert pretty(sp.Symbol("H_2")) == "H₂"


def test_tensor_forms_read_as_convolutions(derivations):
    """z = W ⋆ a + b, ∇_W C = a ⋆ δ, δ of a convolution's input the full correlation with
    the flipped kernel, a max-pool's δ routed through the indicator, an average pool's spread
    over its window, a flatten's a reshape — read from the tree, in both printers."""
    d = derivations["strided_cnn"]
    conv2 = d.model.node(2)
    (z2, _a2) = conv2.equations
    forward = to_vector(z2.expr, z2.indices, z2.ranges)
    assert latex(forward) == r"W^{2} \star_{S=(1, 2),\,P=1} \mathbf{a}^{1} + \mathbf{b}^{2}"
    assert pretty(forward) == "W² ⋆[S=(1, 2), P=1] a¹ + b²"
    assert latex(formula(d, "dC/dw^2").vector) == (
        r"\mathbf{a}^{1} \star_{S=(1, 2),\,P=1} \boldsymbol{\delta}^{2}")
    assert latex(formula(d, "dC/dw^1").vector) == r"\mathbf{a}^{0} \star \boldsymbol{\delta}^{1}"
    assert latex(formula(d, "dC/db^1").vector) == r"\sum_{r,s} \boldsymbol{\delta}^{1}"
    delta1 = formula(d, "delta^1").vector
    assert latex(delta1) == (
        r"\left(1 - \left(\mathbf{a}^{1}\right)^{2}\right) \odot \left(\boldsymbol{\delta}^{2} "
        r"\star_{\mathrm{full},\,S=(1, 2),\,P=1} \operatorname{rot180}\!\left(W^{2}\right)\right)")
    assert pretty(delta1) == "(1 - (a¹)²) ⊙ (δ² ⋆[full, S=(1, 2), P=1] rot180(W²))"
    assert latex(formula(d, "delta^2").vector) == (
        r"\frac{1}{4} \operatorname{win}_{2\times 2,\,S=2}^{\top}\!\left(\boldsymbol{\delta}^{3}"
        r"\right)")
    assert latex(formula(d, "delta^3").vector) == (
        r"\operatorname{vec}^{-1}\!\left(\boldsymbol{\delta}^{4}\right)")
    routed = formula(derivations["digits_cnn"], "delta^1").vector
    assert latex(routed) == (
        r"\left[\mathbf{a}^{1} > 0\right] \odot \operatorname{win}_{2\times 2,\,S=2}^{\top}"
        r"\!\left(\boldsymbol{\delta}^{2} \odot \mathbb{1}_{\max}\!\left(\operatorname{win}"
        r"_{2\times 2,\,S=2}\!\left(\mathbf{a}^{1}\right)\right)\right)")
    assert pretty(routed, batch=True) == (
        "[A¹ > 0] ⊙ win[2×2, S=2]ᵀ(Δ² ⊙ 𝟙max(win[2×2, S=2](A¹)))")


def test_show_reads_well_in_a_terminal(capsys):
    assert main(["show", "digits_cnn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digits_cnn: 1×8×8 -> 8×8×8 -> 8×4×4 -> 128 -> 10, layers conv2d "
                          "3×3 relu, max_pool2d 2×2, flatten, softmax")
    assert "InRange" not in out and "FirstMax" not in out and "einsum" not in out
    assert "Windows(" not in out and "Fold(" not in out and "Unflatten" not in out
    assert "vector: a⁰ ⋆[P=1] δ¹" in out and "vector: vec⁻¹(δ³)" in out
    assert "δ²[j, r, s] = δ³[H₂W₂(j-1)+W₂(r-1)+s]" in out


# --- the document --------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_cnn_document_has_the_key_formulas(derivations, lang):
    text = render_latex(derivations["tiny_cnn"], lang)
    # the forward pass in index and convolution notation
    assert r"z^{1}_{jrs} &= \sum_{k=1}^{n_{0}} \sum_{p=1}^{2} \sum_{q=1}^{2} w^{1}_{jkpq} " \
           r"a^{0}_{k,\,r+p-1,\,s+q-1} + b^{1}_{j}" in text
    assert r"\mathbf{z}^{1} = W^{1} \star \mathbf{a}^{0} + \mathbf{b}^{1}" in text
    assert r"\max_{p,q} a^{1}_{j,\,r+p-1,\,s+q-1}" in text
    # the bracket the shifted Kronecker delta leaves, said in words once
    assert r"\left[1 \le r-u+1 \le 2\right]" in text
    words = {"en": "only the windows that cover this entry", "zh": "只有覆盖该元素的窗口"}[lang]
    assert text.count(words) == 1
    # the indicator of the first maximum, and the routing through it in tensor form
    assert r"\mathbb{1}\!\left[(r-u+1,\,s-v+1) = \operatorname{argmax}" in text
    assert r"\boldsymbol{\delta}^{2} \odot \mathbb{1}_{\max}" in text
    assert r"\nabla_{W^{1}} C = \mathbf{a}^{0} \star \boldsymbol{\delta}^{1}" in text
    # the feature-map diagram: boxes labelled C x H x W, the kernel on the arrow
    assert r"{$1 \times 4 \times 4$}" in text and r"{$1 \times 3 \times 3$}" in text
    assert r"conv $2\times 2$" in text and r"max $2\times 2$\\ $S = 1$" in text


def test_full_correlation_with_the_flipped_kernel_in_the_document(derivations):
    text = render_latex(derivations["lenet"])
    assert r"\star_{\mathrm{full}} \operatorname{rot180}\!\left(W^{3}\right)" in text
    assert r"w^{3}_{k,\,j,\,r-u+1,\,s-v+1}" in text      # the flipped kernel in index form
    assert "rotated by 180 degrees" in text


def test_markdown_of_a_cnn(derivations):
    text = render_markdown(derivations["tiny_cnn"])
    assert text.count("$$") % 2 == 0 and r"\begin{tikzpicture}" not in text
    assert r"\begin{aligned}[t]" not in text
    assert r"\mathbf{z}^{1} = W^{1} \star \mathbf{a}^{0} + \mathbf{b}^{1}" in text
    assert r"\mathbb{1}^{2}_{1\cdot\cdot} = " in text           # the indicator map
    assert "rot180" in render_markdown(derivations["lenet"], "zh")


def test_large_cnn_shows_what_is_readable(derivations):
    """lenet: 6 and 16 maps of 28x28 to 10x10: the first 4 maps, 5x5 blocks of each, said."""
    example = render_context(derivations["lenet"])["example"]
    assert "the first 4 are shown" in example["text"]
    maps = " ".join(example["forward_maps"])
    assert r"z^{1}_{4\cdot\cdot}" in maps and r"z^{1}_{5\cdot\cdot}" not in maps
    assert maps.count(r"\cdots") >= 4 and r"\ddots" in maps
    kernels = " ".join(example["gradients"])
    assert r"\partial w^{3}_{14\cdot\cdot}" in kernels and r"w^{3}_{15\cdot\cdot}" not in kernels


# --- the worked example's numbers ----------------------------------------------------------


def _by_hand(x, w1, b1, w4, b4, y):
    """tiny_cnn written out from the definitions: a valid 2x2 correlation with relu, 2x2
    max pooling with stride 1 (first maximum, row by row), flatten, dense, softmax,
    cross-entropy; backward by the chain rule, entry by entry."""
    z1 = np.array([[sum(w1[0, 0, p, q] * x[0, r + p, s + q] for p in range(2) for q in range(2))
                    + b1[0] for s in range(3)] for r in range(3)])
    a1 = np.maximum(z1, 0)
    a2, argmax = np.zeros((2, 2)), {}
    for u in range(2):
        for v in range(2):
            window = [a1[u + p, v + q] for p in range(2) for q in range(2)]
            best = int(np.argmax(window))
            argmax[u, v] = (u + best // 2, v + best % 2)
            a2[u, v] = window[best]
    a3 = a2.reshape(-1)
    z4 = w4 @ a3 + b4
    a4 = np.exp(z4) / np.exp(z4).sum()
    delta4 = a4 - y
    delta3 = w4.T @ delta4
    delta2 = delta3.reshape(2, 2)
    da1 = np.zeros((3, 3))
    for (u, v), (rr, ss) in argmax.items():
        da1[rr, ss] += delta2[u, v]
    delta1 = da1 * (z1 > 0)
    dw1 = np.array([[sum(x[0, r + p, s + q] * delta1[r, s] for r in range(3) for s in range(3))
                     for q in range(2)] for p in range(2)])
    return {"a1": a1, "a2": a2, "delta1": delta1, "W1": dw1[None, None], "b1": delta1.sum(),
            "W4": np.outer(delta4, a3), "b4": delta4, "loss": -np.log(a4[y == 1][0]),
            "routes": np.array([[sum(1 for at in argmax.values() if at == (rr, ss))
                                 for ss in range(3)] for rr in range(3)])}


def test_tiny_cnn_worked_example_by_hand(derivations):
    example = worked_example(derivations["tiny_cnn"])
    params = example.parameters
    hand = _by_hand(example.x, params["W1"], params["b1"], params["W4"], params["b4"],
                    example.y)
    assert example.loss == pytest.approx(hand["loss"], rel=1e-13)
    np.testing.assert_allclose(example.value(NetTensor("a", 1, rank=3))[0], hand["a1"])
    np.testing.assert_allclose(example.value(NetTensor("a", 2, rank=3))[0], hand["a2"])
    np.testing.assert_allclose(example.value(NetTensor("delta", 1, rank=3))[0],
                               hand["delta1"], atol=1e-15)
    for key in ("W1", "b1", "W4", "b4"):
        np.testing.assert_allclose(example.gradients()[key], np.reshape(hand[key], np.shape(
            example.gradients()[key])), rtol=1e-13, atol=1e-15, err_msg=key)
    # the indicator the notes print: how many windows take their maximum at each entry
    ((layer, routes),) = example.indicators
    assert layer == 2 and (routes[0] == hand["routes"]).all() and routes.max() == 2


def test_tiny_cnn_numbers_are_the_ones_printed(derivations):
    """The example's maps in the document are the evaluated values (a¹ has a 4 that is the
    maximum of two overlapping windows)."""
    example = render_context(derivations["tiny_cnn"])["example"]
    text = " ".join(example["forward_maps"])
    assert (r"a^{1}_{1\cdot\cdot} = \begin{bmatrix}2.0000 & 1.0000 & 1.0000 \\ 0.0000 & 0.0000 "
            r"& 4.0000 \\ 1.0000 & 2.0000 & 1.0000\end{bmatrix}") in text
    (indicator,) = example["indicators"]
    assert r"\begin{bmatrix}1 & 0 & 0 \\ 0 & 0 & 2 \\ 0 & 1 & 0\end{bmatrix}" in (
        indicator["lines"][0])
    assert (r"z^{1}_{111} &= \left(w^{1}_{1111} a^{0}_{111} + w^{1}_{1112} a^{0}_{112} + "
            r"w^{1}_{1121} a^{0}_{121} + w^{1}_{1122} a^{0}_{122}\right) + b^{1}_{1} \\" + "\n"
            r"  &= \left(1 \cdot 1 + (-1) \cdot 0 + 0 \cdot 0 + 1 \cdot 1\right) + 0 = 2.0000"
            ) in example["forward_spelled"]


@pytest.mark.parametrize("name", [*CNNS, "strided_cnn"])
def test_worked_example_matches_the_generated_code(derivations, name):
    codegen = pytest.importorskip("derive.render.codegen")
    derivation = derivations[name]
    module = codegen.load_module(codegen.render_module(derivation), f"{name}_images")
    example = worked_example(derivation)
    params = {key: value.copy() for key, value in example.parameters.items()}
    loss, grads = module.gradients(params, example.x[None], example.y[None])
    assert float(loss) == pytest.approx(example.loss, rel=1e-12)
    for key, value in example.gradients().items():
        np.testing.assert_allclose(grads[key], value, rtol=1e-10, atol=1e-13, err_msg=key)

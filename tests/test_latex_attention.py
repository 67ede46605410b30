"""Lecture notes of networks with attention (issue #11): the block diagram, attention's
derivation step by step with the softmax Jacobian, the 1/√d scaling, the gradients of queries,
keys and values and the causal mask in words, attention in matrix form, the residual adds, the
per-step layer norm and a worked example on a small copy, in LaTeX and Markdown, English and
Chinese.

The worked example of ``transformer_block`` and of a causal block is checked against a forward
and backward pass written here in NumPy, independently of derive. Compiling: both, in both
languages (skipped without TeX).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp

from derive.cli.main import derivation_of, main
from derive.derivation.stepform import Causal, MatProd, SumLast, Transposed
from derive.quantities import LENGTH, NetTensor
from derive.render.latex import (
    compile_pdf,
    log_problems,
    missing_tex_message,
    render_context,
    render_latex,
    render_markdown,
    tex_available,
)
from derive.render.latex_printer import latex
from derive.render.latex_text import LANGUAGES, TEXT
from derive.render.pretty import pretty
from derive.render.stability import CausalSoftmax
from derive.render.worked_example import (
    SMALL_STEPS,
    SMALL_WIDTH,
    recurrent_equations,
    small_copy,
    worked_example,
)
from derive.spec.load import load_spec

#: A causal block: causal attention, a residual add, a layer norm, a softmax per step; longer
#: and wider than the example shows (its example runs on a small copy too).
CAUSAL = {"name": "causal_block", "input": {"size": 4, "length": 5}, "loss": "cross_entropy",
          "layers": [{"op": "attention", "size": 4, "causal": True, "name": "attn"},
                     {"op": "add", "inputs": ["input", "attn"], "name": "res"},
                     {"op": "layer_norm", "name": "norm"},
                     {"size": 3, "activation": "softmax", "name": "out"}]}
SPECS = {"transformer_block": "transformer_block", "causal_block": CAUSAL}
FORMATS = ("latex", "markdown")


@pytest.fixture(scope="module")
def derivations():
    return {name: derivation_of(load_spec(spec)) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def documents(derivations):
    out = {}
    for name in SPECS:
        for lang in LANGUAGES:
            out[name, "latex", lang] = render_latex(derivations[name], lang)
            out[name, "markdown", lang] = render_markdown(derivations[name], lang)
    return out


def _plain(text: str) -> str:
    return " ".join(text.split())


def _words(lang: str, key: str) -> str:
    """The longest stretch of words of a text of latex_text, between its fields and its
    inline math."""
    return _plain(max(re.split(r"\{[^}]*\}|\$[^$]*\$", TEXT[lang][key]), key=len))


# --- the sections -----------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("name", list(SPECS))
def test_notes_explain_attention(documents, name, form, lang):
    text = documents[name, form, lang]
    plain = _plain(text)
    # the diagram: a TikZ block diagram with attention unrolled, or lines of text
    if form == "latex":
        assert r"\node[attention]" in text and r"\draw[weight]" in text
        assert r"$\alpha_{21}$" in text and r"\node[stepbox]" in text
    else:
        assert "```text" in text and "attention, d = " in text and "α_tτ = softmax_" in text
    # the softmax Jacobian read off the differentiation, and the error of the scores
    assert (r"\frac{\partial \alpha^{1}_{t,\tau'}}{\partial s^{1}_{t,\tau}} = "
            r"\alpha^{1}_{t,\tau'} \left(\delta_{\tau,\tau'} - \alpha^{1}_{t,\tau}\right)") in text
    assert (r"\frac{\partial C}{\partial s^{1}_{t,\tau}} = \alpha^{1}_{t,\tau} \left("
            r"\frac{\partial C}{\partial \alpha^{1}_{t,\tau}} - \sum_{\tau'=1}^{T} "
            r"\alpha^{1}_{t,\tau'} \frac{\partial C}{\partial \alpha^{1}_{t,\tau'}}\right)") in text
    for key in ("attn_jacobian", "attn_ds", "attn_ds_rows", "attn_dalpha", "attn_dv", "attn_dk",
                "attn_dq", "attn_scale", "attn_projections"):
        assert _words(lang, key) in plain, key
    # attention in matrix form, one row per step: forward and backward
    for line in (r"S^{1} = \frac{Q^{1}\,\left(K^{1}\right)^{\top}}{\sqrt{n_{1}}}",
                 r"\operatorname{softmax}",
                 r"A^{1} = \boldsymbol{\alpha}^{1}\,V^{1}",
                 r"\nabla_{\boldsymbol{\alpha}^{1}} C = \Delta^{1}\,\left(V^{1}\right)^{\top}",
                 r"\nabla_{V^{1}} C = \left(\boldsymbol{\alpha}^{1}\right)^{\top}\,\Delta^{1}",
                 (r"\nabla_{S^{1}} C = \boldsymbol{\alpha}^{1} \odot \left("
                  r"\nabla_{\boldsymbol{\alpha}^{1}} C - \operatorname{rowsum}\!\left("
                  r"\boldsymbol{\alpha}^{1} \odot \nabla_{\boldsymbol{\alpha}^{1}} C\right)"
                  r"\right)"),
                 r"\nabla_{Q^{1}} C = \frac{\left(\nabla_{S^{1}} C\right)\,K^{1}}{\sqrt{n_{1}}}",
                 (r"\nabla_{K^{1}} C = \frac{\left(\nabla_{S^{1}} C\right)^{\top}\,Q^{1}}"
                  r"{\sqrt{n_{1}}}")):
        assert line in text, line
    # the layer norm per step: a mean and a variance of each step
    assert r"\mu^{3}_{t}" in text and r"(\sigma^{3}_{t})^{2}" in text
    # the residual add passes its error on; nothing about recurrences
    assert _words(lang, "res_add") in plain
    assert TEXT[lang]["sec_bptt"] not in text and TEXT[lang]["sec_vanishing"] not in text
    assert not re.search(r"\\[a-z]+\{\{[a-z]\}\}", text), "a doubled brace of a format field"


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("form", FORMATS)
def test_the_mask_paragraph_only_for_a_causal_layer(documents, form, lang):
    causal = _plain(documents["causal_block", form, lang])
    plain = _plain(documents["transformer_block", form, lang])
    assert _words(lang, "attn_causal") in causal and _words(lang, "attn_causal") not in plain
    assert _words(lang, "attn_not_causal") in plain
    assert _words(lang, "attn_not_causal") not in causal
    # the masked forward equation of the weights, with its bracket, shown in the paragraph
    assert r"\left[1 \le \tau \le t\right]" in causal
    assert _words(lang, "n_causal_mask") in causal and "M_{\\mathrm{causal}}" in causal
    if form == "latex":        # the caption of the diagram (Markdown draws it in text)
        assert _words(lang, "figure_causal") in causal


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_layer_of_the_block_is_derived(documents, derivations, lang):
    text = documents["transformer_block", "latex", lang]
    model = derivations["transformer_block"].model
    for node in model.nodes:
        title = TEXT[lang]["node_title_named"].format(l=node.index, name=rf"\texttt{{{node.name}}}",
                                                      op="")
        assert r"\subsection{" + title in text, node.index
    # the output of norm1 is read by ff1 and by the add res2: its error sums both paths
    assert _words(lang, "res_branch") in _plain(text)
    assert r"$\delta^{6}_{tj}$" in text


def test_english_and_chinese_have_the_same_mathematics(derivations):
    en, zh = (render_context(derivations["transformer_block"], lang) for lang in LANGUAGES)
    assert en["summary"] == zh["summary"] and en["matrix"] == zh["matrix"]
    assert en["forward_tensor"] == zh["forward_tensor"]
    assert en["example"]["inputs"] == zh["example"]["inputs"]
    assert [b["lines"] for b in en["example"]["backward_steps"]] == [
        b["lines"] for b in zh["example"]["backward_steps"]]


def test_fragment_places_attention_in_tensor_form(derivations):
    text = render_latex(derivations["transformer_block"], fragment=True)
    assert r"\nabla_{V^{1}} C = \left(\boldsymbol{\alpha}^{1}\right)^{\top}\,\Delta^{1}" in text
    assert "MatProd" not in text and "SumLast" not in text and "Transposed" not in text


def test_no_sympy_names_leak_into_the_notes(documents):
    for text in documents.values():
        for name in ("MatProd", "SumLast", "Transposed", "Causal(", "mathrm{alpha}",
                     "mathrm{wq}", r"\mathrm{ALPHA}"):
            assert name not in text, name


# --- the printers -----------------------------------------------------------------------------


def test_printers_read_whole_sequences():
    q, k, v, s, alpha, delta = (NetTensor(role, 1, rank=2) for role in (
        "q", "k", "v", "s", "alpha", "delta"))
    grad_s = s.adjoint()
    assert latex(MatProd(q, Transposed(k))) == r"Q^{1}\,\left(K^{1}\right)^{\top}"
    assert latex(MatProd(grad_s, k)) == r"\left(\nabla_{S^{1}} C\right)\,K^{1}"
    assert latex(SumLast(alpha * grad_s)) == (
        r"\operatorname{rowsum}\!\left(\boldsymbol{\alpha}^{1} \odot \nabla_{S^{1}} C\right)")
    assert latex(Causal(LENGTH)) == r"M_{\mathrm{causal}}"
    assert latex(CausalSoftmax(s)) == r"\operatorname{softmax}_{\mathrm{causal}}\!\left(S^{1}\right)"
    assert latex(MatProd(alpha, v), batch=True) == r"\boldsymbol{\alpha}^{1}\,V^{1}"
    # one step of a sequence stays a bold vector; the projections are W_q, W_k, W_v
    assert latex(q.at_step(0)) == r"\mathbf{q}^{1}_{t}"
    assert latex(NetTensor("wq", 1, rank=2, parameter=True)) == "{W_{q}}^{1}"
    t, tau = sp.symbols("t tau", integer=True, positive=True)
    assert latex(alpha.indexed[t, tau]) == r"\alpha^{1}_{t,\tau}"
    assert latex(sp.Symbol("tau'")) == r"\tau'" and latex(sp.Symbol("t''")) == "t''"
    assert latex(NetTensor("var", 3, rank=1).at_step(0)) == r"(\sigma^{3}_{t})^{2}"
    # the terminal
    assert pretty(MatProd(delta, Transposed(v))) == "Δ¹ (V¹)ᵀ"
    assert pretty(MatProd(grad_s, k)) == "(∂C/∂S¹) K¹"
    assert pretty(SumLast(alpha * grad_s)) == "rowsum(α¹ ⊙ ∂C/∂S¹)"
    assert pretty(Causal(LENGTH)) == "M_causal"
    assert pretty(CausalSoftmax(s)) == "softmax_causal(S¹)"
    assert pretty(sp.Symbol("tau'")) == "τ'"
    assert pretty(NetTensor("wq", 1, rank=2, parameter=True).indexed[1, 2]) == "w_q¹₁₂"


def test_show_prints_attention(capsys):
    assert main(["show", "transformer_block"]) == 0
    out = capsys.readouterr().out
    for piece in ("∂C/∂α¹[t, τ] = Σⱼ (δ¹ₜⱼ*v¹[τ, j])", "vector: Δ¹ (V¹)ᵀ", "vector: (α¹)ᵀ Δ¹",
                  "vector: α¹ ⊙ ∂C/∂α¹ - α¹ ⊙ rowsum(α¹ ⊙ ∂C/∂α¹)",
                  "vector: (∂C/∂S¹)ᵀ Q¹/√n₁", "vector: (∂C/∂S¹) K¹/√n₁", "Σ_τ' ", "∂C/∂w_q¹ⱼₖ",
                  "(1/B) Σₜ (∂C/∂Q¹ₜ)ᵀ A⁰ₜ"):
        assert piece in out, piece
    for leak in ("MatProd", "SumLast", "Transposed", "alpha", "tau"):
        assert leak not in out, leak


# --- the worked example -----------------------------------------------------------------------


def test_attention_is_no_recurrence(derivations):
    model = derivations["transformer_block"].model
    assert all(recurrent_equations(node) == () for node in model.nodes)


def test_the_example_runs_a_small_copy(derivations):
    spec = derivations["transformer_block"].model.spec
    copy = small_copy(spec)
    assert copy.length == SMALL_STEPS and max(copy.sizes) <= SMALL_WIDTH
    assert [layer.op for layer in copy.layers] == [layer.op for layer in spec.layers]
    example = worked_example(derivations["transformer_block"], small=True)
    assert example.small and example.spec.shapes == copy.shapes
    assert not worked_example(derivations["transformer_block"]).small
    # the attention weights are far from uniform with the default values
    alpha = example.value(NetTensor("alpha", 1, rank=2))
    assert alpha.max() - alpha.min() > 0.2


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    mu = x.mean(axis=1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    return gamma * xhat + beta, (xhat, var, eps)


def _layer_norm_back(grad: np.ndarray, gamma: np.ndarray, cache) -> tuple:
    xhat, var, eps = cache
    n = xhat.shape[1]
    dxhat = grad * gamma
    dx = (n * dxhat - dxhat.sum(axis=1, keepdims=True)
          - xhat * (dxhat * xhat).sum(axis=1, keepdims=True)) / (n * np.sqrt(var + eps))
    return dx, (grad * xhat).sum(axis=0), grad.sum(axis=0)


def by_hand(layers: list[dict], x: np.ndarray, y: np.ndarray, p: dict) -> dict:
    """A forward pass and backpropagation written out for attention (causal or not), add,
    layer norm and dense layers (relu, identity; softmax with cross-entropy at the output),
    one sequence (T, n) at a time, steps as rows; C sums the cross-entropy over the steps."""
    outs, caches = [x], []
    for l, layer in enumerate(layers, start=1):
        op = layer.get("op", "dense")
        reads = [0 if r == "input" else 1 + [m.get("name") for m in layers].index(r)
                 for r in layer.get("inputs", [])] or [l - 1]
        a = outs[reads[0]]
        if op == "attention":
            q, k, v = a @ p[f"Wq{l}"].T, a @ p[f"Wk{l}"].T, a @ p[f"Wv{l}"].T
            s = q @ k.T / np.sqrt(q.shape[1])
            masked = np.where(np.tri(len(s), dtype=bool), s, -np.inf) if layer.get(
                "causal") else s
            e = np.exp(masked - masked.max(axis=1, keepdims=True))
            alpha = e / e.sum(axis=1, keepdims=True)
            out, cache = alpha @ v, (a, q, k, v, s, alpha)
        elif op == "add":
            out, cache = sum(outs[r] for r in reads), None
        elif op == "layer_norm":
            out, cache = _layer_norm(a, p[f"gamma{l}"], p[f"beta{l}"])
        else:
            z = a @ p[f"W{l}"].T + p[f"b{l}"]
            activation = layer.get("activation", "identity")
            if activation == "softmax":
                e = np.exp(z - z.max(axis=1, keepdims=True))
                out = e / e.sum(axis=1, keepdims=True)
            else:
                out = np.maximum(z, 0) if activation == "relu" else z
            cache = (a, z, activation)
        outs.append(out)
        caches.append((op, reads, cache))
    result = {"C": float(-(y * np.log(outs[-1])).sum()), "outs": outs}
    grads = {len(layers): outs[-1] - y}       # softmax + cross-entropy: δ = a - y at the output
    for l in range(len(layers), 0, -1):
        op, reads, cache = caches[l - 1]
        g = grads.pop(l)
        sent = []
        if op == "attention":
            a, q, k, v, s, alpha = cache
            d = q.shape[1]
            dalpha, dv = g @ v.T, alpha.T @ g
            ds = alpha * (dalpha - (alpha * dalpha).sum(axis=1, keepdims=True))
            dq, dk = ds @ k / np.sqrt(d), ds.T @ q / np.sqrt(d)
            result.update({f"Wq{l}": dq.T @ a, f"Wk{l}": dk.T @ a, f"Wv{l}": dv.T @ a,
                           "alpha": alpha, "s": s, "dalpha": dalpha, "ds": ds})
            sent = [(reads[0], dq @ p[f"Wq{l}"] + dk @ p[f"Wk{l}"] + dv @ p[f"Wv{l}"])]
        elif op == "add":
            sent = [(r, g) for r in reads]
        elif op == "layer_norm":
            dx, result[f"gamma{l}"], result[f"beta{l}"] = _layer_norm_back(g, p[f"gamma{l}"],
                                                                           cache)
            sent = [(reads[0], dx)]
        else:
            a, z, activation = cache
            dz = g * (z > 0) if activation == "relu" else g
            result[f"W{l}"], result[f"b{l}"] = dz.T @ a, dz.sum(axis=0)
            sent = [(reads[0], dz @ p[f"W{l}"])]
        for r, value in sent:
            if r > 0:
                grads[r] = grads.get(r, 0) + value
    return result


def _four(value: float) -> str:
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text


def _matrix(rows: np.ndarray) -> str:
    return (r"\begin{bmatrix}" + r" \\ ".join(" & ".join(_four(v) for v in row) for row in rows)
            + r"\end{bmatrix}")


@pytest.mark.parametrize("name", list(SPECS))
def test_worked_example_equals_numpy_by_hand(derivations, documents, name):
    import yaml

    from derive.spec.load import EXAMPLES_DIR

    data = CAUSAL if name == "causal_block" else yaml.safe_load(
        (EXAMPLES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    example = worked_example(derivations[name], small=True)
    assert example.small and example.spec.length == SMALL_STEPS
    reference = by_hand(data["layers"], example.x, example.y, example.parameters)
    assert example.loss == pytest.approx(reference["C"], rel=1e-13)
    ours = example.gradients()
    assert set(ours) == {key for key in reference if key[-1].isdigit()}
    for key, value in ours.items():
        np.testing.assert_allclose(value, reference[key], rtol=1e-10, atol=1e-13, err_msg=key)
    alpha = example.value(NetTensor("alpha", 1, rank=2))
    ds = example.value(NetTensor("s", 1, rank=2).adjoint())
    np.testing.assert_allclose(alpha, reference["alpha"], rtol=1e-13)
    np.testing.assert_allclose(ds, reference["ds"], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ds.sum(axis=1), 0, atol=1e-15)        # rows of ∇_S C: 0
    if name == "causal_block":
        assert np.all(np.triu(alpha, 1) == 0) and np.all(np.triu(ds, 1) == 0)
    # the notes print these numbers: the cost, the matrices of attention, the gradients
    for lang in LANGUAGES:
        for form in FORMATS:
            text = documents[name, form, lang]
            assert f"C = {_four(reference['C'])}" in text
            for matrix in ("alpha", "s", "dalpha", "ds"):
                assert _matrix(reference[matrix]) in text, (matrix, lang, form)
            assert _matrix(reference["Wq1"]) in text
            assert _words(lang, "example_small") in _plain(text)


def test_the_example_spells_attention_at_one_step(documents):
    text = documents["transformer_block", "latex", "en"]
    # forward at the last step t = 3, backward at t = 1: a weight and the error of a score
    assert r"\alpha^{1}_{31} &= \frac{e^{s^{1}_{31}}}{e^{s^{1}_{31}} + e^{s^{1}_{32}} + " \
           r"e^{s^{1}_{33}}}" in text
    assert (r"\frac{\partial C}{\partial s^{1}_{11}} &= \alpha^{1}_{11} \left("
            r"\frac{\partial C}{\partial \alpha^{1}_{11}} - \left(\alpha^{1}_{11} ") in text
    assert r"\sqrt{3}" in text and r"\frac{\sqrt{2}" not in text


# --- compiling --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pdfs(derivations):
    for lang in LANGUAGES:
        if not tex_available(lang):
            pytest.skip(missing_tex_message(lang))
    return {(name, lang): compile_pdf(render_latex(derivations[name], lang), lang,
                                      jobname=f"{name}_{lang}")
            for name in SPECS for lang in LANGUAGES}


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("name", list(SPECS))
def test_attention_notes_compile_cleanly(pdfs, name, lang):
    result = pdfs[name, lang]
    assert result.pdf.startswith(b"%PDF") and log_problems(result.log) == []

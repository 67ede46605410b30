"""Attention and the transformer block (issue #11): the derivation, its verification by
expansion, the generated NumPy code against PyTorch float64 (an explicit implementation and
``scaled_dot_product_attention``) and central differences, and the spec's errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derive.derivation.reverse import derive
from derive.derivation.stepform import Causal, MatProd, SumLast, Transposed
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.quantities import LENGTH, NetTensor, size_symbol
from derive.registry.functions import LOSSES
from derive.registry.ops import OPS
from derive.registry.windows import InRange
from derive.render.codegen import load_module, render_module
from derive.spec.load import load_spec
from derive.verify.expansion import verify
from tests.torch_reference import ATTENTION_MODES, reference_batch, torch_loss_and_grads

pytest.importorskip("torch")

TOLERANCE = 1e-10
C = sp.Symbol("C", real=True)
#: the ops that attend (every op of the registry with a `causal` attribute)
ATTENTION = tuple(name for name, op in OPS.items() if op.attribute("causal") is not None)


def _spec(causal: bool, size: int = 2, length: int = 3, width: int = 2) -> dict:
    return {"name": "att", "input": {"size": width, "length": length},
            "layers": [{"op": "attention", "size": size, "causal": causal},
                       {"size": 2, "activation": "tanh"}], "loss": "mse"}


def _formulas(spec: dict | str) -> dict:
    return {f.key: f for f in derive(build_model(load_spec(spec))).formulas}


def _entry(role: str, *indices: sp.Expr, node: int = 1) -> sp.Expr:
    return NetTensor(role, node, rank=len(indices)).indexed[indices]


def _adjoint(role: str, *indices: sp.Expr) -> sp.Expr:
    return sp.Derivative(C, _entry(role, *indices), evaluate=False)


def test_attention_is_one_registry_entry() -> None:
    assert ATTENTION == ("attention",)
    definition = OPS["attention"]
    assert definition.reads == "sequence"
    assert [p.role for p in definition.parameters({})] == ["wq", "wk", "wv"]


# --- the derivation ------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_the_softmax_jacobian_along_the_key_axis_is_arrived_at(causal: bool) -> None:
    formulas = _formulas(_spec(causal))
    t, tau, tau2 = sp.symbols("t tau tau'", integer=True, positive=True)
    alpha = _entry("alpha", t, tau)
    expected = alpha * (_adjoint("alpha", t, tau) - sp.Sum(
        _entry("alpha", t, tau2) * _adjoint("alpha", t, tau2), (tau2, 1, LENGTH)))
    got = formulas["dC/ds^1"].rhs
    assert sp.expand(got - expected) == 0
    # the mask is inside α (0 where τ > t): no bracket is left in the error of the scores
    assert not got.has(InRange)
    weights = [eq for eq in build_model(load_spec(_spec(causal))).nodes[0].equations
               if eq.target.role == "alpha"]
    assert weights[0].expr.has(InRange) == causal and weights[0].softmax


def test_queries_keys_and_values_get_their_gradients_with_the_scaling() -> None:
    formulas = _formulas(_spec(False))
    t, j = sp.symbols("t j", integer=True, positive=True)
    d = size_symbol(1)
    for role, reads in (("q", "k"), ("k", "q")):
        rhs = formulas[f"dC/d{role}^1"].rhs
        assert d ** sp.Rational(-1, 2) in rhs.atoms(sp.Pow) and rhs.has(NetTensor(reads, 1, rank=2))
        (total,) = rhs.atoms(sp.Sum)
        assert total.limits[0][2] == LENGTH             # a sum over the other time index
    value = formulas["dC/dv^1"].rhs
    (total,) = value.atoms(sp.Sum)
    summed = total.limits[0][0]
    assert value == sp.Sum(_entry("alpha", summed, t) * _entry("delta", summed, j),
                           (summed, 1, LENGTH))
    # the tensor forms: matrix products of whole sequences, the row sum of the softmax's
    assert formulas["dC/dv^1"].vector == MatProd(Transposed(NetTensor("alpha", 1, rank=2)),
                                                 NetTensor("delta", 1, rank=2))
    assert formulas["dC/ds^1"].vector.has(SumLast)


@pytest.mark.parametrize("causal", [False, True])
def test_t3_d2_attention_verifies_by_expansion(causal: bool) -> None:
    report = verify(load_spec(_spec(causal, size=2, length=3, width=3)), points=4)
    assert report.ok, "\n".join(report.lines())
    checked = {check.formula for check in report.checks}
    assert {"dC/dalpha^1", "dC/ds^1", "dC/dq^1", "dC/dk^1", "dC/dv^1", "dC/dwq^1",
            "dC/dwk^1", "dC/dwv^1", "delta^1"} <= checked


def test_the_transformer_block_verifies_by_expansion() -> None:
    report = verify(load_spec("transformer_block"), points=2)
    assert report.ok, "\n".join(report.lines())
    assert any("3 time steps of 8" in line for line in report.lines())
    checked = {check.formula for check in report.checks}
    assert {"dC/dmu^3", "dC/dvar^7", "dC/ds^1", "dC/dwq^1"} <= checked


# --- generated code against PyTorch -------------------------------------------------------


def _module(spec: dict):
    return load_module(render_module(derive(build_model(load_spec(spec)))), spec["name"])


def _compare(spec: dict, seed: int, batch: int = 3, fd: bool = True) -> None:
    module = _module(spec)
    rng = np.random.default_rng(seed)
    params = {key: value + 0.3 * rng.standard_normal(value.shape)
              for key, value in module.init_params(seed=seed).items()}
    X, Y = reference_batch(spec, seed, batch)
    value, grads = module.gradients(params, X, Y)
    for mode in ATTENTION_MODES:        # written out, and scaled_dot_product_attention
        expected_value, expected = torch_loss_and_grads(spec, params, X, Y, attention=mode)
        assert value == pytest.approx(expected_value, rel=TOLERANCE, abs=TOLERANCE), mode
        assert set(grads) == set(expected)
        for key in expected:
            scale = max(1.0, float(np.abs(expected[key]).max()))
            assert np.abs(grads[key] - expected[key]).max() / scale < TOLERANCE, (mode, key)
    if fd:
        # central differences in float64: about 1e-8 here, 1e-5 through a layer norm of two
        # features; a wrong formula gives about 1 (exactness is PyTorch's comparison above)
        assert module.gradient_check(params, X, Y) < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_pytorch_and_central_differences(causal: bool) -> None:
    _compare(_spec(causal, size=3, length=5, width=4), seed=3)


@pytest.mark.parametrize("causal", [False, True])
def test_the_transformer_block_matches_pytorch(causal: bool) -> None:
    spec = load_spec("transformer_block").to_dict()
    spec["layers"][0]["causal"] = causal
    _compare(spec, seed=5, batch=4, fd=False)   # relu: central differences across its kink


def test_the_generated_attention_is_batched_matrix_products() -> None:
    source = render_module(derive(build_model(load_spec(_spec(True, size=3)))))
    assert "np.einsum" not in source and "for t in" not in source
    assert "Q1 @ K1.swapaxes(-1, -2)" in source
    assert "Alpha1 = _causal_softmax(S1)" in source
    assert "dC_dV1 = Alpha1.swapaxes(-1, -2) @ delta1" in source


def test_a_causal_step_does_not_see_the_steps_after_it() -> None:
    module = _module(_spec(True, size=3, length=5, width=4))
    params = module.init_params(seed=2)
    X = np.random.default_rng(0).standard_normal((2, 5, 4))
    later = X.copy()
    later[:, 3:] += 1.0
    out, cache = module.forward(params, X)
    out_later, _ = module.forward(params, later)
    assert np.array_equal(out[:, :3], out_later[:, :3])
    assert not np.allclose(out[:, 3:], out_later[:, 3:])
    assert np.allclose(np.triu(cache["Alpha1"], 1), 0.0)


def test_a_causal_softmax_is_stable_for_large_scores() -> None:
    module = _module(_spec(True, size=2, length=4, width=2))
    params = {key: 300.0 * value for key, value in module.init_params(seed=1).items()}
    X = np.random.default_rng(1).standard_normal((3, 4, 2))
    out, cache = module.forward(params, X)
    assert np.isfinite(out).all()
    assert np.allclose(cache["Alpha1"].sum(axis=-1), 1.0)


@st.composite
def transformer_specs(draw: st.DrawFn) -> dict:
    """A block of the transformer's parts in random sizes and options: attention (causal or
    not) with a residual add when its width allows, a layer norm per step (sometimes), a
    feed-forward pair (sometimes), and an output per step with any loss."""
    width, length = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    size = draw(st.sampled_from([width, draw(st.integers(1, 4))]))
    layers: list[dict] = [{"op": "attention", "size": size, "causal": draw(st.booleans()),
                           "name": "att"}]
    if size == width and draw(st.booleans()):
        layers.append({"op": "add", "inputs": ["input", "att"]})
    if draw(st.booleans()):
        layers.append({"op": "layer_norm", "name": "norm"})
        if draw(st.booleans()):
            layers.append({"size": draw(st.integers(1, 4)), "activation": "tanh"})
            layers.append({"size": size, "name": "ff"})
            layers.append({"op": "add", "inputs": ["norm", "ff"]})
    loss = draw(st.sampled_from(sorted(LOSSES)))
    activation = {"distribution": "softmax", "probability": "sigmoid"}.get(
        LOSSES[loss].needs) or draw(st.sampled_from(["identity", "tanh"]))
    layers.append({"size": draw(st.integers(2, 3)), "activation": activation})
    return {"name": "random_block", "input": {"size": width, "length": length},
            "layers": layers, "loss": loss}


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=transformer_specs(), seed=st.integers(0, 1000))
def test_random_transformer_blocks_match_pytorch(spec: dict, seed: int) -> None:
    # a layer norm over 1 or 2 features gives ±1 (or 0) whatever it reads: the gradients
    # through it are about 1e-7 and central differences' relative error is noise; PyTorch's
    # comparison is exact for them too
    norm = any(layer.get("op") == "layer_norm" for layer in spec["layers"])
    _compare(spec, seed, fd=not norm or spec["layers"][0]["size"] >= 3)


def test_the_transformer_demo_learns_the_majority_token() -> None:
    module = _module(load_spec("transformer_block").to_dict())
    X, Y = module.demo_data(seed=0, count=256)
    params = module.init_params(seed=0)
    losses = module.train(params, X, Y, epochs=15, lr=0.01, batch_size=32, optimizer="adam",
                          clip=1.0)
    assert losses[-1] < 0.5 * losses[0]
    output, _cache = module.forward(params, X)
    assert np.mean(output.argmax(axis=-1) == Y.argmax(axis=-1)) > 0.8


# --- the spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "message"), [
    ({"op": "attention", "size": 2, "causal": "yes"}, "must be true or false"),
    ({"op": "attention"}, "size"),
])
def test_bad_attention_layers_are_one_line(layer: dict, message: str) -> None:
    spec = {"name": "bad", "input": {"size": 2, "length": 3}, "layers": [layer, {"size": 1}],
            "loss": "mse"}
    with pytest.raises(DeriveError, match=message):
        load_spec(spec)


def test_attention_on_a_vector_is_one_line_and_exit_2(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ninput: 3\nlayers:\n  - {op: attention, size: 2}\n"
                    "  - {size: 1}\nloss: mse\n")
    result = subprocess.run([sys.executable, "-m", "derive", "codegen", str(path), "-o",
                             str(tmp_path / "out.py")], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "reads a sequence" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.py").exists()


def test_shapes_and_parameters_of_an_attention_layer() -> None:
    spec = load_spec(_spec(False, size=5, length=7, width=3))
    assert spec.shapes[:2] == ((7, 3), (7, 5))
    shapes = spec.parameter_shapes()
    assert shapes["Wq1"] == shapes["Wk1"] == shapes["Wv1"] == (5, 3)
    model = build_model(spec)
    assert {p.key for p in model.parameters if p.is_weight} >= {"Wq1", "Wk1", "Wv1"}
    assert not any(isinstance(f.vector, Causal) for f in derive(model).formulas)


@pytest.mark.parametrize("layers", [
    [{"op": "lstm", "size": 3}, {"op": "attention", "size": 2, "causal": True}],
    [{"op": "attention", "size": 3}, {"op": "gru", "size": 2}],
    [{"op": "rnn", "size": 2}, {"op": "attention", "size": 2}, {"op": "lstm", "size": 2,
                                                                 "return": "last"}],
])
def test_attention_composes_with_recurrent_layers(layers: list[dict]) -> None:
    # a loop's step-major arrays read by attention's whole-sequence products, and the reverse
    spec = {"name": "mixed", "input": {"size": 2, "length": 4},
            "layers": [*layers, {"size": 2}], "loss": "mse"}
    _compare(spec, seed=7)

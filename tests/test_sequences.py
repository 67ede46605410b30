"""Recurrent networks end to end: the derivation arrives at backpropagation through time with a
generic step t, it verifies by expansion for T = 3, and generated modules for random sequence
specs (rnn, lstm, gru; every return; dense, activations, adds and dropout per step; every
loss) match PyTorch float64 (torch.nn.RNN / LSTM / GRU) and central differences."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derive.derivation.reverse import derive
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.quantities import LENGTH, NetTensor, entry
from derive.registry.functions import ACTIVATIONS, LOSSES
from derive.registry.ops import OPS
from derive.registry.windows import InRange
from derive.render.codegen import load_module, render_module
from derive.render.numpy_printer import HELPERS
from derive.spec.load import load_spec
from derive.verify.expansion import Instance, verify
from tests.torch_reference import reference_batch, torch_loss_and_grads

pytest.importorskip("torch")

TOLERANCE = 1e-10
#: every op of the registry that reads a sequence (recurrent layers, attention)
SEQUENCE_OPS = tuple(name for name, op in OPS.items() if op.reads == "sequence")
#: those that may return their last state only (the recurrent layers)
RECURRENT = tuple(name for name in SEQUENCE_OPS if OPS[name].attribute("return") is not None)


def _module(spec: dict):
    return load_module(render_module(derive(build_model(load_spec(spec)))), spec["name"])


def _compare(spec: dict, seed: int, batch: int = 3, fd: bool = True) -> None:
    module = _module(spec)
    params = module.init_params(seed=seed)
    rng = np.random.default_rng(seed)
    params = {key: value + 0.2 * rng.standard_normal(value.shape)      # non-zero biases
              for key, value in params.items()}
    X, Y = reference_batch(spec, seed, batch)
    value, grads = module.gradients(params, X, Y)
    expected_value, expected = torch_loss_and_grads(spec, params, X, Y)
    assert value == pytest.approx(expected_value, rel=TOLERANCE, abs=TOLERANCE)
    assert set(grads) == set(expected)
    for key in expected:
        scale = max(1.0, float(np.abs(expected[key]).max()))
        assert np.abs(grads[key] - expected[key]).max() / scale < TOLERANCE, key
    if fd:
        # central differences in float64 are good to about 1e-6 on these (saturated gates
        # and a one-unit softmax make a few worse, up to about 4e-4); a wrong formula gives
        # about 1; exactness is PyTorch's comparison above
        assert module.gradient_check(params, X, Y) < 1e-3


# --- the derivation ------------------------------------------------------------------------


def _formulas(name: str | dict) -> dict:
    return {f.key: f for f in derive(build_model(load_spec(name))).formulas}


def test_bptt_is_arrived_at_with_a_generic_step() -> None:
    """δ_t = σ'(z_t) ⊙ (W_hᵀ δ_{t+1} [t < T] + the loss's part at t); the shared weights'
    gradients are sums over t, W_h's reading h_{t-1}."""
    formulas = _formulas("tiny_rnn")
    delta = formulas["delta^1"]
    t, j = delta.indices
    k = sp.Symbol("k", integer=True, positive=True)
    n1, n2 = (sp.Symbol(f"n_{n}", integer=True, positive=True) for n in (1, 2))
    d1, d2 = NetTensor("delta", 1, rank=2), NetTensor("delta", 2, rank=2)
    h, wh, w2 = NetTensor("h", 1, rank=2), NetTensor("wh", 1, rank=2), NetTensor("w", 2, rank=2)
    expected = (1 - entry(h, (t, j)) ** 2) * (
        InRange(t + 1, 1, LENGTH) * sp.Sum(entry(d1, (t + 1, k)) * entry(wh, (k, j)), (k, 1, n1))
        + sp.Sum(entry(d2, (t, k)) * entry(w2, (k, j)), (k, 1, n2)))
    assert sp.simplify(delta.rhs - expected) == 0
    grad = formulas["dC/dwh^1"]
    jj, kk = grad.indices
    tt = sp.Symbol("t", integer=True, positive=True)
    assert grad.rhs == sp.Sum(entry(d1, (tt, jj)) * entry(h, (tt - 1, kk)), (tt, 1, LENGTH))


def test_the_lstm_cell_error_is_carried_through_the_forget_gate() -> None:
    formulas = _formulas("lstm_adding")
    cell = formulas["dC/dc^1"]
    t, j = cell.indices
    c, f = NetTensor("c", 1, rank=2), NetTensor("f", 1, rank=2)
    carried = InRange(t + 1, 1, LENGTH) * sp.Derivative(C_SYMBOL, entry(c, (t + 1, j))) \
        * entry(f, (t + 1, j))
    assert carried in sp.Add.make_args(sp.expand(cell.rhs))
    # the stacked error's forget block: ∂C/∂f ⊙ f (1 - f), read back at u - n
    delta = formulas["delta^1"]
    assert any(isinstance(b, InRange) and b.args[0] == delta.indices[1]
               - sp.Symbol("n_1", integer=True, positive=True)
               for b in delta.rhs.atoms(InRange))


C_SYMBOL = sp.Symbol("C", real=True)


@pytest.mark.parametrize("op", RECURRENT)
@pytest.mark.parametrize("returned", ["sequence", "last"])
def test_t3_instances_verify_by_expansion(op: str, returned: str) -> None:
    spec = {"name": f"t3_{op}", "input": {"size": 2, "length": 3}, "layers": [
        {"op": op, "size": 2, "return": returned}, {"size": 2, "activation": "softmax"}],
        "loss": "cross_entropy"}
    report = verify(load_spec(spec), points=3)
    assert report.ok, "\n".join(report.lines())
    assert {"delta^1", "dC/dwh^1", "dC/dwx^1"} <= {check.formula for check in report.checks}


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
@pytest.mark.parametrize("op", RECURRENT)
def test_a_recurrent_output_verifies_by_expansion(op: str, loss: str) -> None:
    # the state is the output, read by the loss and by the layer at the step after: the loss
    # gradient is the loss's own part of ∂C/∂h_t, checked on the loss alone; every other
    # formula reads the whole ∂C/∂h_t (the loss's part had been compared with the whole, and
    # read in its place: MISMATCH on correct formulas)
    layer = {"op": op, "size": 2}
    if loss == "binary_cross_entropy":
        layer = {"op": "rnn", "size": 2, "activation": "sigmoid"} if op == "rnn" else None
        if layer is None:
            pytest.skip(f"{op}'s state is not in (0, 1)")
    spec = {"name": f"out_{op}", "input": {"size": 2, "length": 3}, "layers": [layer],
            "loss": loss}
    report = verify(load_spec(spec), points=3)
    assert report.ok, "\n".join(report.lines())
    alone = [check for check in report.checks if check.kind == "loss gradient"]
    assert len(alone) == 1 and "the loss alone" in alone[0].formula


def test_a_wrong_loss_part_of_a_recurrent_output_is_found() -> None:
    from derive.verify.expansion import verify_derivation
    spec = {"name": "out_rnn", "input": {"size": 2, "length": 2},
            "layers": [{"op": "rnn", "size": 2}], "loss": "mse"}
    derivation = derive(build_model(load_spec(spec)))
    formulas = tuple(replace(f, rhs=2 * f.rhs) if f.kind == "loss gradient" else f
                     for f in derivation.formulas)
    report = verify_derivation(replace(derivation, formulas=formulas), points=3)
    (check,) = [check for check in report.checks if check.kind == "loss gradient"]
    assert not check.ok


def test_a_long_sequence_is_checked_on_three_steps() -> None:
    report = verify(load_spec("rnn_sine"), points=2)
    assert report.ok
    assert any("3 time steps of 20" in line for line in report.lines())


# --- generated code against PyTorch -------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_rnn", "rnn_sine", "lstm_adding", "gru_tones"])
def test_the_sequence_examples_match_pytorch(name: str) -> None:
    spec = load_spec(name).to_dict()
    _compare(spec, seed=4, batch=3, fd=name != "lstm_adding")


_ACTIVATIONS = sorted(name for name in ACTIVATIONS if name != "softmax")


@st.composite
def random_sequence_specs(draw: st.DrawFn) -> dict:
    """A small sequence network: a dense or activation layer per step (sometimes), one or
    two layers of the ops that read sequences (recurrent layers, attention, causal or not;
    the first returning the sequence), with a residual add, dropout, an activation or a
    layer norm per step between (sometimes), then a dense output per step or after
    `return: last`."""
    size, length = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    layers: list[dict] = []
    width = size
    if draw(st.booleans()):
        width = draw(st.integers(1, 3))
        layers.append({"size": width, "activation": draw(st.sampled_from(_ACTIVATIONS))})
    count = draw(st.integers(1, 2))
    for number in range(count):
        op = draw(st.sampled_from(SEQUENCE_OPS))
        layer: dict = {"op": op, "size": draw(st.integers(1, 3))}
        if OPS[op].attribute("causal") is not None:
            layer["causal"] = draw(st.booleans())
        if op == "rnn":
            layer["activation"] = draw(st.sampled_from(_ACTIVATIONS))
            if draw(st.booleans()):
                layer["bias"] = False
        last = number == count - 1 and op in RECURRENT and draw(st.booleans())
        if last:
            layer["return"] = "last"
        layers.append(layer)
        width = layer["size"]
        if not last and draw(st.booleans()):
            extra = draw(st.sampled_from(["add", "dropout", "activation", "layer_norm"]))
            if extra == "add":
                layers[-1]["name"] = f"r{number}"
                layers.append({"size": width, "activation": "tanh"})
                layers.append({"op": "add", "inputs": [f"r{number}", len(layers)]})
            elif extra == "dropout":
                layers.append({"op": "dropout", "rate": 0.5})
            elif extra == "layer_norm":
                layers.append({"op": "layer_norm"})
            else:
                layers.append({"op": "activation",
                               "activation": draw(st.sampled_from(_ACTIVATIONS))})
    loss = draw(st.sampled_from(sorted(LOSSES)))
    out = draw(st.integers(2, 3))
    activation = {"distribution": "softmax", "probability": "sigmoid"}.get(
        LOSSES[loss].needs) or draw(st.sampled_from(["identity", "tanh"]))
    layers.append({"size": out, "activation": activation})
    return {"name": "random_sequence", "input": {"size": size, "length": length},
            "layers": layers, "loss": loss}


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_sequence_specs(), seed=st.integers(0, 1000))
def test_random_sequence_specs_match_pytorch_and_central_differences(spec: dict,
                                                                     seed: int) -> None:
    # relu across its kink makes central differences inexact now and then; PyTorch is exact
    relu = any(layer.get("activation") in ("relu", "leaky_relu", "elu")
               for layer in spec["layers"])
    _compare(spec, seed, fd=not relu)


# --- the spec and training ----------------------------------------------------------------


@pytest.mark.parametrize(("layers", "message"), [
    ([{"op": "rnn", "size": 2}], "reads a sequence"),
    ([{"op": "lstm", "size": 2, "return": "first"}], "must be one of sequence, last"),
])
def test_a_recurrent_layer_on_a_vector_or_a_bad_return_is_one_line(layers, message) -> None:
    spec = {"name": "bad", "input": 3, "layers": [*layers, {"size": 1}], "loss": "mse"}
    if "return" in layers[0]:
        spec["input"] = {"size": 3, "length": 4}
    with pytest.raises(DeriveError, match=message):
        load_spec(spec)


@pytest.mark.parametrize("returned", ["sequence", "last"])
@pytest.mark.parametrize("last", [True, False])
def test_a_softmax_state_is_refused_in_one_line(returned, last) -> None:
    # an activation of every recurrent op that has one: softmax is refused where the spec is
    # read (it passed, then derive failed with an internal message)
    for op in (name for name in RECURRENT if OPS[name].attribute("activation") is not None):
        layers = [{"op": op, "size": 2, "activation": "softmax", "return": returned}]
        if not last:
            layers.append({"size": 2, "activation": "softmax"})
        spec = {"name": "bad", "input": {"size": 2, "length": 3}, "layers": layers,
                "loss": "cross_entropy"}
        with pytest.raises(DeriveError, match=f"softmax is not allowed as the activation "
                                              f"of {op}"):
            load_spec(spec)


def test_a_sequence_too_long_or_a_wrong_example_row_says_what() -> None:
    spec = {"name": "long", "input": {"size": 1, "length": 10**9},
            "layers": [{"op": "rnn", "size": 2}, {"size": 1}], "loss": "mse"}
    with pytest.raises(DeriveError, match="input.length: the length T is 1,000,000,000"):
        load_spec(spec)
    spec["input"]["length"] = 3
    spec["example"] = {"x": [1, 2]}
    with pytest.raises(DeriveError, match=r"a matrix of 3 x 1: .* \(one row per time step\)"):
        load_spec(spec)


def test_a_bad_sequence_input_is_one_line() -> None:
    for bad in ({"size": 3}, {"size": 3, "length": 0}, {"size": 3, "length": 2, "extra": 1}):
        with pytest.raises(DeriveError, match="input"):
            load_spec({"name": "bad", "input": bad, "layers": [{"size": 1}], "loss": "mse"})


def test_layer_widths_follow_the_sequence() -> None:
    spec = load_spec({"name": "shapes", "input": {"size": 3, "length": 5}, "layers": [
        {"size": 4}, {"op": "gru", "size": 2}, {"op": "lstm", "size": 6, "return": "last"},
        {"size": 1}], "loss": "mse"})
    assert spec.shapes == ((5, 3), (5, 4), (5, 2), (6,), (1,))
    assert spec.parameter_shapes()["Wx3"] == (24, 2)
    assert spec.parameter_shapes()["bh2"] == (6,)


def test_train_clips_the_gradient_norm() -> None:
    module = _module(load_spec("tiny_rnn").to_dict())
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    norm = module.clip_gradients(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.sqrt(sum((g ** 2).sum() for g in grads.values())) == pytest.approx(1.0, rel=1e-5)
    small = {"a": np.array([0.3])}
    module.clip_gradients(small, 1.0)
    assert small["a"][0] == 0.3
    params = module.init_params(seed=0)
    X, Y = reference_batch(load_spec("tiny_rnn").to_dict(), 0, 8)
    before = {key: value.copy() for key, value in params.items()}
    module.train(params, X, Y, 1, 1e6, clip=1e-3)        # a huge rate, a tiny step
    step = np.sqrt(sum(((params[k] - before[k]) ** 2).sum() for k in params))
    assert step == pytest.approx(1e6 * 1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="clip"):
        module.train(params, X, Y, 1, 0.1, clip=0)


def test_a_softmax_sequence_output_has_bp1_and_per_step_probability_targets() -> None:
    spec = load_spec({"name": "steps", "input": {"size": 2, "length": 3}, "layers": [
        {"size": 3, "activation": "softmax"}], "loss": "cross_entropy"})
    t, j = sp.symbols("t j", integer=True, positive=True)
    delta = _formulas(spec.to_dict())["delta^1"]
    a, y = NetTensor("a", 1, rank=2).indexed, NetTensor("y", rank=2).indexed
    assert delta.rhs == a[t, j] - y[t, j] and delta.assumptions
    instance = Instance(build_model(spec))
    point = instance.random_point(random.Random(0))
    targets = [symbol for symbol, tensor in instance.leaf_tensors if tensor.role == "y"]
    assert len(set(targets)) == 9                    # one leaf per entry y_ti
    for step in (1, 2, 3):
        assert sum(point[s] for s in targets if instance.target_steps[s] == (step,)) == 1
    assert verify(spec, points=3).ok


def test_dropout_off_between_recurrent_steps_matches_pytorch() -> None:
    # dropout off is an array of ones (1, T, 1), read by the recurrent layer's backward loop at
    # each step t (it was (1, 1, 1): an IndexError past the first step)
    spec = {"name": "dropped", "input": {"size": 1, "length": 3}, "layers": [
        {"op": "rnn", "size": 2}, {"op": "dropout", "rate": 0.5},
        {"size": 2, "activation": "sigmoid"}], "loss": "binary_cross_entropy"}
    _compare(spec, seed=0)


#: custom activations: a multiple, a quotient, a sum of powers, a root (each printed differently)
CUSTOM = ({"name": "twice_tanh", "expr": "2*tanh(z)"}, {"name": "soft_sign", "expr": "z/(1+abs(z))"},
          {"name": "cubic", "expr": "z/2 + z**3/30"}, {"name": "root", "expr": "z + sqrt(1+z**2)"})


#: what may end a sequence network whose loss is computed in a stable form from inside the
#: output's expression: (the layers after the recurrent one, the loss)
STABLE_HEADS = [([{"op": "activation", "activation": "sigmoid"}], "binary_cross_entropy"),
                ([{"op": "activation", "activation": "softmax"}], "cross_entropy"),
                ([{"op": "activation", "activation": "silu"},
                  {"op": "activation", "activation": "sigmoid"}], "binary_cross_entropy")]


@pytest.mark.parametrize(("head", "loss"), STABLE_HEADS)
@pytest.mark.parametrize("op", RECURRENT)
def test_a_stable_loss_on_a_recurrent_output_matches_pytorch(op, head, loss):
    # the loss reads the recurrent layer's whole sequence, step-major in the forward loop, as
    # batch-first (it named an array that did not exist: a NameError in gradients)
    spec = {"name": f"{op}_stable", "input": {"size": 2, "length": 3},
            "layers": [{"op": op, "size": 2}, *head], "loss": loss}
    _compare(spec, seed=2)


def test_a_last_sigmoid_state_has_a_stable_cross_entropy():
    # h_T = σ(z_T) with BCE: the loss from softplus(∓z_T), finite where σ rounds to 0 or 1
    # (it was log(a): NaN with every parameter at 50), equal to it elsewhere
    spec = {"name": "last_bce", "input": {"size": 2, "length": 3}, "loss": "binary_cross_entropy",
            "layers": [{"op": "rnn", "size": 2, "activation": "sigmoid", "return": "last"}]}
    module = _module(spec)
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((4, 3, 2)), rng.integers(0, 2, (4, 2)).astype(float)
    params = module.init_params(seed=1)
    output, _ = module.forward(params, X)
    plain = -np.sum(Y * np.log(output) + (1 - Y) * np.log(1 - output)) / 4
    assert module.loss(params, X, Y) == pytest.approx(plain, rel=1e-12)
    saturated = {key: np.full_like(value, 50.0) for key, value in params.items()}
    with np.errstate(all="raise"):
        assert np.isfinite(module.loss(saturated, X, Y))
    _compare(spec, seed=5)


@pytest.mark.parametrize("returns", ["last", "sequence"])
def test_a_sigmoid_state_with_cross_entropy_has_the_error_a_minus_y(returns):
    # h_t = σ(z_t) read by BCE: σ'(z) = h (1 - h) cancels against the loss's part -(a - y) /
    # (a (a - 1)), so δ_t = [t ≤ T-1] h (1 - h) ⊙ Wₕᵀ δ_{t+1} + (a - y) at the steps the loss
    # reads, as the dense output's BP1; uncancelled it was 0/0 (NaN) where σ rounds to 1
    spec = {"name": "sigmoid_bce", "input": {"size": 2, "length": 3},
            "loss": "binary_cross_entropy",
            "layers": [{"op": "rnn", "size": 2, "activation": "sigmoid", "return": returns}]}
    delta = _formulas(spec)["delta^1"]
    assert not any(isinstance(p, sp.Pow) and p.exp.is_negative
                   for p in sp.preorder_traversal(delta.rhs))
    module = _module(spec)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 3, 2))
    Y = rng.integers(0, 2, (4, 3, 2) if returns == "sequence" else (4, 2)).astype(float)
    params = module.init_params(seed=1)
    params["b1"] = np.array([40.0, -40.0])          # σ rounds to 1 and to e^-40
    value, grads = module.gradients(params, X, Y)
    torch = pytest.importorskip("torch")
    weights = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
    state, cost = torch.zeros(4, 2, dtype=torch.float64), 0
    for t in range(3):
        z = (torch.tensor(X[:, t]) @ weights["Wx1"].T + state @ weights["Wh1"].T
             + weights["b1"])
        state = torch.sigmoid(z)
        if returns == "sequence" or t == 2:
            target = torch.tensor(Y[:, t] if returns == "sequence" else Y)
            cost = cost + torch.nn.functional.binary_cross_entropy_with_logits(
                z, target, reduction="sum") / 4        # exact where σ saturates
    cost.backward()
    assert value == pytest.approx(cost.item(), rel=1e-12)
    for key, weight in weights.items():
        np.testing.assert_allclose(grads[key], weight.grad.numpy(), rtol=1e-10, atol=1e-14)
    _compare(spec, seed=5)


LOGCOSH = {"name": "logcosh", "expr": "log(cosh(a - y))"}


@pytest.mark.parametrize("head", [[], [{"op": "layer_norm"}],
                                  [{"op": "add", "inputs": ["input", 1]}]])
@pytest.mark.parametrize("op", RECURRENT)
def test_a_custom_loss_on_a_recurrent_output_reads_the_output(op, head):
    # log cosh's stable form of a GRU's state, a layer norm's β + γ x̂ or a sum would read the
    # state of the step before or parameters, which the loss is not given (a crash in
    # codegen, a NameError in gradients): it is written in the output a instead
    spec = {"name": f"{op}_logcosh", "input": {"size": 2, "length": 3},
            "layers": [{"op": op, "size": 2}, *head], "loss": LOGCOSH}
    module = _module(spec)
    rng = np.random.default_rng(3)
    params = {key: value + 0.2 * rng.standard_normal(value.shape)
              for key, value in module.init_params(seed=3).items()}
    X, Y = rng.standard_normal((3, 3, 2)), rng.standard_normal((3, 3, 2))
    output, _ = module.forward(params, X)
    assert module.loss(params, X, Y) == pytest.approx(
        float(np.sum(np.log(np.cosh(output - Y)))) / 3, rel=1e-12)
    assert module.gradient_check(params, X, Y) < 1e-6


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("reader", ["add", "custom"])
@pytest.mark.parametrize("op", RECURRENT)
def test_a_last_state_read_twice_matches_pytorch(op, reader, length):
    # the last state read by two layers (a dense layer and a residual add, or a custom op that
    # reads its input twice): its error at t = T is the sum of both, the same vector at that
    # step only, never an array of every step read at [t] (it was: gradients about 50% off at
    # T = 1, an IndexError at T = 3)
    head = {"op": op, "size": 2, "return": "last", "name": "h"}
    tail = [{"size": 2, "name": "d"}, {"op": "add", "inputs": ["h", "d"]}] if reader == "add" \
        else [{"size": 2, "op": {"name": "gated", "params": {"U": ["size", "in"],
                                                             "V": ["size", "in"]},
                                 "expr": "tanh(sum(U[j,k]*x[k], k))*sigmoid(sum(V[j,k]*x[k], k))"}}]
    spec = {"name": f"{op}_last_{reader}", "input": {"size": 2, "length": length},
            "layers": [head, *tail, {"size": 1}], "loss": "mse"}
    _compare(spec, seed=1)


@pytest.mark.parametrize("op", RECURRENT)
def test_layer_norms_around_a_recurrent_layer_match_pytorch(op):
    # statements over every step that read a layer norm's statistics (one number per sample
    # and step) beside its features: nothing may start an array from the narrower one
    spec = {"name": f"{op}_norms", "input": {"size": 2, "length": 3},
            "layers": [{"size": 3}, {"op": "layer_norm"}, {"op": op, "size": 3},
                       {"op": "layer_norm"}, {"size": 2}], "loss": "mse"}
    _compare(spec, seed=4)


@pytest.mark.parametrize("op", RECURRENT)
def test_saturated_sigmoids_raise_no_floating_point_error(op):
    # pre-activations of ±1e4 saturate every sigmoid gate: exp(-z) overflows inside the
    # loop over time, whose one errstate turns that warning off (and nothing else)
    spec = {"name": f"{op}_saturated", "input": {"size": 2, "length": 3},
            "layers": [{"op": op, "size": 3}, {"size": 2, "activation": "sigmoid"}],
            "loss": "binary_cross_entropy"}
    module = _module(spec)
    rng = np.random.default_rng(2)
    params = {key: 1e4 * rng.choice([-1.0, 1.0], value.shape)
              for key, value in module.init_params().items()}
    X = np.array([[[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], [[-1.0, -1.0], [1.0, -1.0], [0, 0]]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        value, grads = module.gradients(params, X, np.ones((2, 3, 2)))
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("op", RECURRENT)
@pytest.mark.parametrize("custom", CUSTOM, ids=lambda c: c["name"])
def test_a_custom_activation_in_a_sequence_network_generates_working_code(op, custom):
    # the recurrent state's activation where the op has one, a dense layer per step after the
    # recurrent layer and an activation layer: the overflow probe reads formulas at one step
    # (guards by the step 1), and the module's gradients pass central differences
    layer = {"op": op, "size": 3, **({"activation": custom} if OPS[op].attribute("activation")
                                      else {})}
    spec = {"name": f"{op}_{custom['name']}", "input": {"size": 2, "length": 3},
            "layers": [layer, {"size": 3, "activation": custom},
                       {"op": "activation", "activation": custom}, {"size": 2}],
            "loss": "mse"}
    module = _module(spec)
    params = module.init_params(seed=1)
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((3, 3, 2)), rng.standard_normal((3, 3, 2))
    assert module.gradient_check(params, X, Y) < 1e-6



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_sum_over_steps_and_samples_is_the_sum_of_every_row(dtype) -> None:
    # _sum_steps: a product with ones for a contiguous (T, B, n), np.sum for a view
    space = {"np": np}
    exec(HELPERS["_sum_steps"], space)  # noqa: S102 (derive's own helper source)
    x = np.random.default_rng(4).standard_normal((5, 7, 3)).astype(dtype)
    for array in (x, x.swapaxes(0, 1), x[:, ::2]):
        total = space["_sum_steps"](array)
        assert total.dtype == dtype and total.shape == (3,)
        expected = array.astype(np.float64).sum(axis=(0, 1))
        assert np.allclose(total, expected, rtol=1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("widths", [(256, 8), (8, 256), (64, 64), (3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_gradient_summed_over_steps_in_blocks_is_one_product(widths, dtype) -> None:
    # _dot_steps: with a narrow side (an LSTM's dWx, 8 inputs), sums of products over blocks
    # of rows (OpenBLAS's small-matrix kernels); the same numbers as one product
    space = {"np": np}
    for name in ("_block_size", "_dot_steps"):
        exec(HELPERS[name], space)  # noqa: S102 (derive's own helper source)
    rng = np.random.default_rng(sum(widths))
    u = rng.standard_normal((20, 32, widths[0])).astype(dtype)
    v = rng.standard_normal((20, 32, widths[1])).astype(dtype)
    got = space["_dot_steps"](u, v)
    expected = u.reshape(-1, widths[0]).astype(np.float64).T @ v.reshape(-1, widths[1])
    assert got.dtype == dtype and got.shape == widths
    assert np.allclose(got, expected, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-3)

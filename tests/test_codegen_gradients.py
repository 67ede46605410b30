"""Functional tests of generated modules: gradients against a hand-written backprop, central
differences and PyTorch autograd; training behaviour; float32."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from derive.registry.functions import ACTIVATIONS
from derive.spec.load import list_examples, load_spec
from tests import reference_backprop as ref
from tests.conftest import ELEMENTWISE, make_spec, valid_output_pairs
from tests.test_codegen_support import (
    batch,
    example,
    generated,
    is_plain_chain,
    random_params,
    relative_error,
    torch_loss_and_grads,
)
from tests.torch_reference import numpy_forward_loss

EXAMPLES = [name for name, _ in list_examples()]
#: Examples the hand-written chain reference covers; the others are graphs (spec v2).
CHAIN_EXAMPLES = [name for name in EXAMPLES if is_plain_chain(load_spec(name))]
GRAPH_EXAMPLES = [name for name in EXAMPLES if name not in CHAIN_EXAMPLES]
PAIRS = valid_output_pairs()


def pair_spec(output: str, loss: str):
    """A 3-4-5-3 network ending in ``output`` with ``loss``; hidden layers use the same
    activation where it is elementwise, so every activation is tested in both places."""
    hidden = "tanh" if output == "softmax" else output
    return make_spec([3, 4, 5, 3], [hidden, hidden, output], loss, name=f"{output}_{loss}")


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the optional autograd peer "
                                               "(pip install torch==2.13.0)")


def assert_matches(spec, module, loss_value, grads, params, X, Y, tol=1e-10):
    expected_loss, expected = ref.backprop(ref.Net.from_spec(spec), params, X, Y)
    assert relative_error(loss_value, expected_loss) < tol
    assert list(grads) == list(params)
    for key in params:
        assert grads[key].shape == params[key].shape
        assert relative_error(grads[key], expected[key]) < tol, key


# --- the reference itself ------------------------------------------------------------------


def test_reference_xor_is_the_general_reference_at_2_3_1():
    spec = load_spec("xor")
    params, (X, Y) = random_params(spec), batch(spec)
    loss, grads = ref.xor_backprop(params, X, Y)
    loss2, grads2 = ref.backprop(ref.Net.from_spec(spec), params, X, Y)
    assert loss == pytest.approx(loss2, rel=1e-14)
    for key in params:
        np.testing.assert_allclose(grads[key], grads2[key], rtol=1e-13)


@pytest.mark.parametrize("output, loss", [("softmax", "cross_entropy"),
                                          ("sigmoid", "binary_cross_entropy")])
def test_reference_shortcut_a_minus_y_equals_the_full_chain_rule(output, loss):
    spec = pair_spec(output, loss)
    params, (X, Y) = random_params(spec), batch(spec)
    net = ref.Net.from_spec(spec)
    _, fused = ref.backprop(net, params, X, Y, fused=True)
    _, full = ref.backprop(net, params, X, Y, fused=False)
    for key in params:
        assert relative_error(fused[key], full[key]) < 1e-12


# --- generated vs hand-written --------------------------------------------------------------


@pytest.mark.parametrize("name", CHAIN_EXAMPLES)
def test_example_gradients_equal_the_hand_written_reference(name):
    spec, module = example(name)
    params, (X, Y) = random_params(spec), batch(spec)
    loss_value, grads = module.gradients(params, X, Y)
    assert isinstance(loss_value, float)
    assert loss_value == pytest.approx(module.loss(params, X, Y), rel=1e-15)
    assert_matches(spec, module, loss_value, grads, params, X, Y)


@pytest.mark.parametrize("output, loss", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_every_valid_activation_loss_pair_equals_the_reference(output, loss):
    spec = pair_spec(output, loss)
    module = generated(spec)
    params, (X, Y) = random_params(spec), batch(spec)
    assert_matches(spec, module, *module.gradients(params, X, Y), params, X, Y)


def test_every_activation_appears_in_the_pairs():
    tested = {layer.activation.name for output, loss in PAIRS
              for layer in pair_spec(output, loss).layers}
    assert tested == set(ACTIVATIONS)


def test_layers_without_bias():
    spec = make_spec([3, 4, 2], ["relu", "sigmoid"], "binary_cross_entropy", bias=False)
    module = generated(spec)
    params, (X, Y) = random_params(spec), batch(spec)
    assert set(module.init_params()) == {"W1", "W2"}
    assert_matches(spec, module, *module.gradients(params, X, Y), params, X, Y)


def test_the_examples_include_graphs():
    assert CHAIN_EXAMPLES and GRAPH_EXAMPLES


@pytest.mark.parametrize("name", GRAPH_EXAMPLES)
def test_graph_example_gradients_equal_differences_of_an_independent_forward(name):
    """Graph examples against central differences of a separate NumPy forward pass."""
    spec, module = example(name)
    params, (X, Y) = random_params(spec), batch(spec, rows=5)
    loss_value, grads = module.gradients(params, X, Y)
    data = spec.to_dict()
    assert loss_value == pytest.approx(numpy_forward_loss(data, params, X, Y), rel=1e-12)
    assert list(grads) == list(params)
    h = 1e-5
    rng = np.random.default_rng(0)
    for key, value in params.items():
        # every entry of a small array; 40 entries drawn at random of a large one (a LeNet
        # kernel or dense layer: a forward pass per entry would take minutes)
        indices = list(np.ndindex(value.shape))
        if len(indices) > 40:
            indices = [indices[n] for n in rng.choice(len(indices), 40, replace=False)]
        numeric, analytic = [], []
        for index in indices:
            costs = []
            for step in (h, -h, 2 * h, -2 * h):
                shifted = dict(params, **{key: value.copy()})
                shifted[key][index] += step
                costs.append(numpy_forward_loss(data, shifted, X, Y))
            numeric.append((8 * (costs[0] - costs[1]) - (costs[2] - costs[3])) / (12 * h))
            analytic.append(grads[key][index])
        assert grads[key].shape == value.shape
        assert relative_error(np.array(analytic), np.array(numeric)) < 1e-7, key


# --- central differences ---------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_gradient_check(name):
    spec, module = example(name)
    X, Y = batch(spec, rows=5)
    assert module.gradient_check(random_params(spec), X, Y) < 1e-6


@pytest.mark.parametrize("output, loss", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pair_gradient_check(output, loss):
    spec = pair_spec(output, loss)
    X, Y = batch(spec, rows=5)
    assert generated(spec).gradient_check(random_params(spec), X, Y) < 1e-6


def test_gradient_check_detects_a_wrong_gradient():
    spec, module = example("xor")
    X, Y = batch(spec)
    original = module.backward

    def wrong(params, cache, Y):
        grads = original(params, cache, Y)
        grads["W1"] = grads["W1"] * 1.01
        return grads

    module_dict = module.__dict__
    module_dict["backward"] = wrong
    try:
        assert module.gradient_check(random_params(spec), X, Y) > 1e-3
    finally:
        module_dict["backward"] = original


# --- PyTorch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_matches_pytorch(name):
    _torch()
    spec, module = example(name)
    params, (X, Y) = random_params(spec), batch(spec)
    loss_value, grads = module.gradients(params, X, Y)
    torch_loss, torch_grads = torch_loss_and_grads(spec, params, X, Y)
    assert relative_error(loss_value, torch_loss) < 1e-10
    for key in params:
        assert relative_error(grads[key], torch_grads[key]) < 1e-10, key


@pytest.mark.parametrize("output, loss", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pair_matches_pytorch(output, loss):
    _torch()
    spec = pair_spec(output, loss)
    params, (X, Y) = random_params(spec), batch(spec)
    loss_value, grads = generated(spec).gradients(params, X, Y)
    torch_loss, torch_grads = torch_loss_and_grads(spec, params, X, Y)
    assert relative_error(loss_value, torch_loss) < 1e-10
    for key in params:
        assert relative_error(grads[key], torch_grads[key]) < 1e-10, key


# --- property-based ----------------------------------------------------------------------------


@st.composite
def networks(draw):
    depth = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 6)) for _ in range(depth + 1)]
    hidden = [draw(st.sampled_from(ELEMENTWISE)) for _ in range(depth - 1)]
    output, loss = draw(st.sampled_from(PAIRS))
    if output == "softmax" and sizes[-1] == 1:
        sizes[-1] = 2       # a one-class softmax is constant; its gradients are all zero
    seed = draw(st.integers(0, 2**16))
    return make_spec(sizes, [*hidden, output], loss, name="prop"), seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_networks_match_reference_and_pytorch(case):
    spec, seed = case
    module = generated(spec)
    params, (X, Y) = random_params(spec, seed), batch(spec, rows=4, seed=seed)
    if spec.resolved_loss().needs is not None:
        # a probability within 1e-6 of 0 or 1 makes the log-losses' gradients ill-conditioned
        # (relative rounding errors of 1e-9 in any float64 implementation): not a comparison
        # at 1e-10
        output, _ = module.forward(params, X)
        assume(float(np.min(np.minimum(output, 1 - output))) > 1e-6)
    loss_value, grads = module.gradients(params, X, Y)
    assert_matches(spec, module, loss_value, grads, params, X, Y)
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    torch_loss, torch_grads = torch_loss_and_grads(spec, params, X, Y)
    assert relative_error(loss_value, torch_loss) < 1e-10
    for key in params:
        assert relative_error(grads[key], torch_grads[key]) < 1e-10, key


# --- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_xor_learns_xor_with_its_demo_settings(seed):
    _, module = example("xor")
    X, Y = module.demo_data()
    params = module.init_params(seed=seed)
    losses = module.train(params, X, Y, module.DEMO_EPOCHS, module.DEMO_LR,
                          batch_size=module.DEMO_BATCH_SIZE, seed=seed)
    output, _ = module.forward(params, X)
    assert np.round(output).ravel().tolist() == [0, 1, 1, 0]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", EXAMPLES)
def test_float32_training_decreases_the_loss_and_stays_float32(name):
    _, module = example(name)
    X, Y = module.demo_data()
    params = module.init_params(seed=0, dtype=np.float32)
    epochs = 200 if name == "xor" else 5
    losses = module.train(params, X, Y, epochs, module.DEMO_LR,
                          batch_size=module.DEMO_BATCH_SIZE)
    assert losses[-1] < losses[0]
    assert all(value.dtype == np.float32 for value in params.values())
    output, cache = module.forward(params, X)
    assert output.dtype == np.float32
    # a Python number (the dropout mask 1.0 while dropout is off) keeps float32 arrays float32
    arrays = [value for value in cache.values() if not isinstance(value, float)]
    assert all(value.dtype == np.float32 for value in arrays)
    _, grads = module.gradients(params, X, Y)
    assert all(value.dtype == np.float32 for value in grads.values())


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_float32_computation_stays_float32_for_every_activation(activation):
    spec = make_spec([3, 4, 2], [activation, "softmax"], "cross_entropy")
    module = generated(spec)
    params = {key: value.astype(np.float32) for key, value in random_params(spec).items()}
    X, Y = batch(spec)
    _, cache = module.forward(params, X)
    assert {value.dtype for value in cache.values()} == {np.dtype(np.float32)}
    _, grads = module.gradients(params, X, Y)
    assert {value.dtype for value in grads.values()} == {np.dtype(np.float32)}
    # and float32 is accurate to float32 precision
    _, grads64 = module.gradients(random_params(spec), X, Y)
    for key in grads:
        assert relative_error(grads[key], grads64[key]) < 1e-4


@pytest.mark.parametrize(("output", "loss"), PAIRS)
def test_every_activation_and_loss_survive_pre_activations_of_1e4(output, loss):
    # overflow, division by zero or an invalid value anywhere in the module is an error here:
    # only the overflow of exp(-z) in σ(z), which gives its limit, is turned off where it is
    spec = pair_spec(output, loss)
    module = generated(spec)
    rng = np.random.default_rng(3)
    params = {key: rng.choice([-1.0, 1.0], value.shape) * (1e4 if key == "W1" else 1.0)
              for key, value in module.init_params().items()}
    X, Y = batch(spec)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        value, grads = module.gradients(params, X, Y)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads.values())

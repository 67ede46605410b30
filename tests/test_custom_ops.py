"""Custom ops: new layer kinds written in the spec in index notation.

Each op below is loaded, derived, verified by expansion, generated, and its generated gradients
are compared with a PyTorch implementation of the same layer written by hand here (float64
autograd, 1e-10), with the entry-by-entry reference of ``tests.index_reference`` and with
central differences. Bad expressions and shapes are refused in one line naming the field.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

from derive.derivation.reverse import derive
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.registry.custom_ops import CustomOp
from derive.registry.ops import OPS
from derive.render.codegen import load_module, render_module
from derive.spec.load import load_spec
from derive.verify.expansion import verify
from tests.custom_op_specs import GATED, PRODUCT, SPECS
from tests.custom_op_specs import spec as _spec
from tests.strategies import random_batch
from tests.torch_reference import init_reference_params, torch_loss_and_grads

torch = pytest.importorskip("torch")

TOLERANCE = 1e-10


# --- the same layers, by hand in PyTorch ----------------------------------------------------


def _gated(p, x, l):
    return (torch.tanh(x @ p[f"U{l}"].T) * torch.sigmoid(x @ p[f"V{l}"].T) + p[f"c{l}"])


def _bilinear(p, x, l):
    return torch.nn.functional.bilinear(x, x, p[f"U{l}"], p[f"b{l}"])


def _highway(p, x, l):
    gate = torch.sigmoid(x @ p[f"T{l}"].T + p[f"t{l}"])
    return gate * torch.tanh(x @ p[f"H{l}"].T + p[f"h{l}"]) + (1 - gate) * x


def _rbf(p, x, l):
    distance = torch.cdist(x, p[f"m{l}"]) ** 2
    return torch.exp(-distance * p[f"g{l}"] ** 2)


def _product(p, x, l, a):
    return (a @ p[f"P{l}"].T) * (x @ p[f"Q{l}"].T)


def _by_hand(name: str, spec: dict, params: dict, X: np.ndarray, Y: np.ndarray):
    """The batch cost and gradients of ``spec`` with its custom layer written in PyTorch."""
    F = torch.nn.functional
    p = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
    x = torch.tensor(X)
    y = torch.tensor(Y)
    if name == "product":
        a = torch.tanh(x @ p["W1"].T + p["b1"])
        h = _product(p, x, 2, a)
    else:
        h = {"gated": _gated, "bilinear": _bilinear, "highway": _highway, "rbf": _rbf}[name](
            p, x, 1)
    last = len(spec["layers"])
    if name == "bilinear":
        h = torch.tanh(h)
    out = h @ p[f"W{last}"].T + p[f"b{last}"]
    activation = spec["layers"][-1].get("activation", "identity")
    out = {"softmax": lambda z: F.softmax(z, -1), "sigmoid": torch.sigmoid,
           "identity": lambda z: z}[activation](out)
    if spec["loss"] == "cross_entropy":
        total = -(y * torch.log(out)).sum()
    elif spec["loss"] == "binary_cross_entropy":
        total = F.binary_cross_entropy(out, y, reduction="sum")
    else:
        total = 0.5 * ((out - y) ** 2).sum()
    cost = total / x.shape[0]
    grads = torch.autograd.grad(cost, list(p.values()))
    return float(cost.detach()), {key: g.numpy() for key, g in zip(p, grads)}


def _close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, want in expected.items():
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got[key] - want).max() / scale < TOLERANCE, key


@pytest.mark.parametrize("name", list(SPECS))
def test_generated_gradients_match_pytorch_by_hand_and_the_index_reference(name: str) -> None:
    spec = SPECS[name]
    module = load_module(render_module(derive(build_model(load_spec(spec)))), name)
    for seed in (0, 1):
        params = init_reference_params(spec, seed)
        X, Y = random_batch(spec, seed, 6)
        value, grads = module.gradients(params, X, Y)
        hand_value, hand = _by_hand(name, spec, params, X, Y)
        assert value == pytest.approx(hand_value, rel=TOLERANCE)
        _close(grads, hand)
        reference_value, reference = torch_loss_and_grads(spec, params, X, Y)
        assert value == pytest.approx(reference_value, rel=TOLERANCE)
        _close(grads, reference)
        assert module.gradient_check(params, X, Y) < 1e-6


@pytest.mark.parametrize("name", list(SPECS))
def test_every_derived_formula_is_verified_by_expansion(name: str) -> None:
    spec = SPECS[name]
    report = verify(load_spec(spec), points=4)
    assert report.ok, "\n".join(report.lines())
    # every parameter of the custom op has its gradient among the checks, at its layer
    layer = next(n for n, entry in enumerate(spec["layers"], start=1) if "op" in entry
                 and isinstance(entry["op"], dict))
    checked = {check.formula for check in report.checks}
    for parameter in spec["layers"][layer - 1]["op"]["params"]:
        assert f"dC/d{parameter}^{layer}" in checked, (parameter, sorted(checked))


def test_a_wrong_derivation_is_caught() -> None:
    """The check can fail: a custom op whose generated gradient is tampered with disagrees."""
    spec = GATED
    text = render_module(derive(build_model(load_spec(spec))))
    assert "dU1 = dC_dS1_1.T @ X" in text
    module = load_module(text.replace("dU1 = dC_dS1_1.T @ X", "dU1 = dC_dS2_1.T @ X"), "bad")
    params = init_reference_params(spec, 0)
    X, Y = random_batch(spec, 0, 4)
    assert module.gradient_check(params, X, Y) > 1e-3


def test_the_design_example_reads_as_written() -> None:
    spec = load_spec("gated_mlp")
    op = spec.layers[0].op
    assert isinstance(op, CustomOp) and op.name == "gated"
    assert spec.parameter_shapes() == {"U1": (8, 4), "V1": (8, 4), "c1": (8,), "W2": (3, 8),
                                       "b2": (3,)}
    assert load_spec(spec.to_dict()).digest() == spec.digest()
    node = build_model(spec).nodes[0]
    assert node.op is OPS[op] and node.op.name == "gated"
    # the sums inside the functions became s1 (the tanh's, first in the text) and s2
    targets = [equation.target.role for equation in node.equations]
    assert targets == ["s1", "s2", "a"]
    assert str(node.equations[0].expr) == "Sum(U^1[j, k]*a^0[k], (k, 1, n_0))"


def test_a_sum_that_is_a_term_of_its_own_stays_in_place() -> None:
    spec = _spec("linear", 3, 2, "sum(P[j,k]*x[k], k) + q[j]", {"P": ["size", "in"],
                                                                 "q": ["size"]}, [])
    node = build_model(load_spec(spec)).nodes[0]
    assert [equation.target.role for equation in node.equations] == ["a"]


def test_custom_parameters_are_not_penalised_and_start_as_documented() -> None:
    spec = {**copy.deepcopy(GATED), "regularization": {"l2": 0.1}}
    model = build_model(load_spec(spec))
    assert [p.key for p in model.parameters if p.is_weight] == ["W2"]
    text = render_module(derive(model))
    glorot = (2 / (5 + 4)) ** 0.5
    assert f'params["U1"] = (rng.standard_normal((5, 4)) * {glorot!r}).astype(dtype)' in text
    assert 'params["c1"] = np.zeros(5, dtype=dtype)' in text
    module = load_module(text, "init")
    params = module.init_params(seed=3)
    assert params["U1"].shape == (5, 4) and not params["c1"].any()


BAD = [
    ("tanh(sum(U[j,k]*y[k], k))", {"U": ["size", "in"]}, "unknown name 'y'"),
    ("U[j,k]*x[k]", {"U": ["size", "in"]}, "index 'k' is free"),
    ("sum(U[j,k]*x[k], k) + x[j]", {"U": ["size", "in"]}, "ranges over size (3"),
    ("x.T[j]", {}, "Attribute is not allowed"),
    ("open(x[j])", {}, "function 'open' is not allowed"),
    ("__import__('os')", {}, "function '__import__' is not allowed"),
    ("sum(U[j,k], m)", {"U": ["size", "in"]}, "index 'k' is free"),
    ("sum(U[j,k]*x[k], k, m)", {"U": ["size", "in"]}, "sum takes an expression and an index"),
    ("U[j]", {"U": ["size", "in"]}, "has 2 axes, indexed with 1"),
    ("U * 2", {"U": ["size", "in"]}, "write its entries"),
    ("sum(x[k], k)", {}, "does not use the output index 'j'"),
    ("sum(sum(U[j,k]*x[k], k), k)", {"U": ["size", "in"]}, "already in use"),
    ("c[j] + k", {"c": ["size"]}, "unknown name 'k'"),
    ("x[j+1]", {}, "must be a name"),
    ("c[j]", {"c": ["size", "out"]}, "each one of size, in"),
    ("c[j]", {"c": []}, "list of 1 to 4 axes"),
    ("c[j]", {"delta": ["size"]}, "parameter name 'delta'"),
    ("c[j]", {"A": ["size"]}, "parameter name 'A'"),
    ("c[j]", {"c2": ["size"]}, "must be letters only"),
    ("c[j]", {"S1_": ["size"]}, "must be letters only"),
    ("c[j]", {"lambda": ["size"]}, "Python keyword"),
    ("c[j] * dc[j]", {"c": ["size"], "dc": ["size"]}, "gradient of 'c'"),
    ("c[j]", {"c": ["size", "out"]}, "'out' among them"),
    ("sum(U[j,k], k) * x[j]", {"U": ["size", "in"]}, "does not read the input"),
    ("x[j] - x[j] + c[j]", {"c": ["size"]}, "does not read the input"),
    ("sum(U[k,k]*x[k], k) + x[j]", {"U": ["in", "in"]}, "an index appears twice"),
    ("x[j] ** 100000", {}, "exponent 100000 too large"),
    ("x[j] * log(0)", {}, "not a finite real number"),
    ("x[j] * c[j]", {"c": ["size"], "q": ["size"]}, "q declared but not used"),
    ("x[j] * sqrt(-1)", {}, "not a finite real number"),
]


@pytest.mark.parametrize(("expr", "params", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_expressions_and_shapes_are_refused_in_one_line(expr, params, message) -> None:
    spec = _spec("bad", 3, 3, expr, params, [{"size": 2}])
    if "ranges" in message:
        spec["input"] = 2
    with pytest.raises(DeriveError) as err:
        load_spec(spec)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert "layers[0].op" in text


def test_the_op_name_and_fields_are_checked() -> None:
    for op, message in [({"name": "dense", "expr": "x[j]"}, "is a built-in op"),
                        ({"name": "g", "expr": "x[j]", "extra": 1}, "extra"),
                        ({"name": "g"}, "expr"),
                        ({"name": "g", "expr": ""}, "must be an expression string"),
                        ({"name": "g", "expr": "x[j]", "params": [1]}, "must map parameter")]:
        spec = {"name": "n", "input": 3, "loss": "mse",
                "layers": [{"size": 3, "op": op}, {"size": 1}]}
        with pytest.raises(DeriveError, match=message):
            load_spec(spec)
    two = copy.deepcopy(PRODUCT)
    two["layers"][1]["op"]["params"]["P"] = ["size", "in"]
    with pytest.raises(DeriveError, match="in1, in2"):
        load_spec(two)


def test_the_command_line_names_file_field_and_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ninput: 3\nlayers:\n  - size: 3\n    op:\n      name: g\n"
                    "      expr: \"tanh(sum(U[j,k]*x[k], q))\"\n      params: {U: [size, in]}\n"
                    "  - {size: 1}\nloss: mse\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "derive", "show", str(path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert "bad.yaml" in out.stderr and "layers[0].op.expr" in out.stderr
    assert "bad.yaml:7:" in out.stderr


@pytest.mark.parametrize(("formula", "correct"), [
    ("dC/dc^1_j = delta^1_j", True),
    ("dC/dU^1_jk = dC/ds1^1_j * x_k", True),
    ("dC/ds1^1_j = delta^1_j * (1 - tanh(s1^1_j)^2) * sigmoid(s2^1_j)", True),
    ("dC/dU^1 = (delta^1 ⊙ (1 - tanh(s1^1)^2) ⊙ sigmoid(s2^1)) x^T", True),
    # the sums written out as in the spec
    (("dC/dU^1_jk = delta^1_j (1 - tanh(sum_m U^1_jm x_m)^2) sigmoid(sum_m V^1_jm x_m) "
      "x_k"), True),
    # the gate's derivative where the tanh's belongs: a common slip
    ("dC/dU^1_jk = delta^1_j * (1 - tanh(s1^1_j)^2) * sigmoid(s1^1_j) * x_k", False),
    ("dC/dV^1_jk = dC/ds1^1_j * x_k", False),
])
def test_check_accepts_formulas_about_a_custom_op(formula: str, correct: bool) -> None:
    from derive.check.formulas import check_formula

    verdict = check_formula("gated_mlp", formula, points=4)
    assert verdict.correct is correct, verdict.lines()


def test_check_names_the_custom_quantities_it_knows() -> None:
    from derive.check.formulas import check_formula

    with pytest.raises(DeriveError, match="dU\\^l, dV\\^l, dc\\^l, ds1\\^l, ds2\\^l"):
        check_formula("gated_mlp", "dC/dq^1 = 1")


def _function_spec(name: str) -> dict:
    """A custom op calling the registry function ``name`` on a sum (its argument kept in the
    function's domain), then a dense output."""
    from derive.registry.functions import SCALAR_FUNCTIONS

    s = "sum(U[j,k]*x[k], k)"
    argument = f"1 + {s}^2" if name in ("log", "ln", "sqrt") else s
    arity = SCALAR_FUNCTIONS[name].arity
    call = f"{name}({argument}, c[j])" if arity == 2 else f"{name}({argument})"
    return _spec(f"f_{name}", 3, 4, f"{call} * c[j] + c[j]",
                 {"U": ["size", "in"], "c": ["size"]}, [{"size": 2}])


def _function_names() -> list[str]:
    from derive.registry.functions import SCALAR_FUNCTIONS

    return list(SCALAR_FUNCTIONS)


@pytest.mark.parametrize("name", _function_names())
def test_every_registry_function_in_a_custom_op(name: str) -> None:
    """Each function a custom op may call: generated gradients against PyTorch autograd of the
    independent reading of the notation, and the derivation against direct differentiation."""
    spec = _function_spec(name)
    module = load_module(render_module(derive(build_model(load_spec(spec)))), name)
    params = init_reference_params(spec, 2)
    X, Y = random_batch(spec, 2, 5)
    value, grads = module.gradients(params, X, Y)
    reference_value, reference = torch_loss_and_grads(spec, params, X, Y)
    assert value == pytest.approx(reference_value, rel=1e-9)
    _close(grads, reference)
    report = verify(load_spec(spec), points=2)
    assert report.ok, "\n".join(report.lines())


def test_sigma_about_a_custom_op_is_refused_not_guessed() -> None:
    """The op has no activation σ: σ(s2) is not the output layer's softmax."""
    from derive.check.formulas import check_formula

    with pytest.raises(DeriveError, match="layer 1, which has no activation"):
        check_formula("gated_mlp", "dC/dU^1_jk = delta^1_j (1 - tanh(s1^1_j)^2) "
                      "sigma(s2^1_j) x_k", points=2)


def test_a_costly_call_on_parameters_alone_is_computed_where_it_is_read() -> None:
    # tanh(c) reads no quantity of the forward pass: the backward pass computes it itself
    # (only calls on forward quantities are kept in the cache)
    spec = load_spec(_spec("scaled", 3, 3, "x[j]*tanh(c[j])", {"c": ["size"]}, [{"size": 2}]))
    source = render_module(derive(build_model(spec)))
    module = load_module(source, "scaled_net")
    assert "tanh_" not in source.split("cache = {")[1].split("}")[0]
    rng = np.random.default_rng(0)
    params = {key: rng.normal(size=value.shape) for key, value in module.init_params().items()}
    X, Y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    assert module.gradient_check(params, X, Y) < 1e-6

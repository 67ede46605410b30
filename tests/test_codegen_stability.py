"""Custom activations and losses in generated code: finite wherever PyTorch's autograd of the
same expression is finite, for arguments up to 1e4 in size, and as accurate.

Each expression of the tables below is generated as a one-unit network (W = 1, b = 0, so the
pre-activation is the input). An activation is read through the loss a·y with y = 1, so that
the bias gradient is σ'(z); a loss sits on an identity output, so that the bias gradient is
∂L/∂a. The reference is PyTorch autograd in float64 of the expression as written; where
PyTorch's naive evaluation itself loses the digits (log(1 - sigmoid(25)), 1 + e^-400 = 1) the
reference is the expression's value to 30 digits (SymPy and mpmath, from the same text).
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy as sp

from derive.derivation.reverse import derive
from derive.graph.model import build_model
from derive.render.codegen import load_module, render_module
from derive.render.numpy_printer import HELPERS
from derive.spec.load import load_spec

torch = pytest.importorskip("torch", reason="PyTorch is the optional autograd peer "
                                            "(pip install torch==2.13.0)")

ACTIVATIONS = [
    "z/(1+exp(-2*z))", "z*sigmoid(z)", "z*tanh(log(1+exp(z)))", "z*tanh(softplus(z))",
    "log(1+exp(z))", "(exp(z)-exp(-z))/(exp(z)+exp(-z))", "1/(1+exp(-z))", "exp(z)/(1+exp(z))",
    "log(cosh(z))", "z*exp(-z**2/2)", "2/(1+exp(-2*z)) - 1", "z*(1+tanh(z))/2",
    "sqrt(1+z**2) - 1", "z/(1+abs(z))", "max(z, z/10)", "log(1+exp(2*z))/2", "exp(-abs(z))",
    "tanh(z)*sigmoid(z)", "exp(z)/(exp(z)+exp(-z))", "1/(exp(z)+exp(-z))", "z/cosh(z)",
    "log(1+exp(z))**2", "sinh(z)/cosh(z)", "z*sigmoid(1.702*z)", "log(exp(z)+exp(-z))",
    "z*exp(z)/(1+exp(z))", "exp(z)/(1+exp(z))**2", "log(1+exp(-z))", "log(sigmoid(z))",
    "z*sigmoid(z)**2", "exp(z/2)/(1+exp(z))", "(1-exp(-z))/(1+exp(-z))",
    "log(exp(z)+exp(2*z))", "exp(-z**2)/(1+exp(-z**2))",
]
LOSSES = [
    "log(cosh(a - y))", "log(cosh(2*(a-y)))/2", "log(1+exp(-a*y))", "sqrt(1+(a-y)**2) - 1",
    "-y*log(sigmoid(a)) - (1-y)*log(1-sigmoid(a))",
    "-y*log(1/(1+exp(-a))) - (1-y)*log(1-1/(1+exp(-a)))", "abs(a-y)",
    "log(exp(a)+exp(-a)) - a*y", "(a-y)**2/(1+(a-y)**2)", "softplus(a) - a*y",
    "-log(sigmoid(a*y))", "log(1+exp(a-y)) + log(1+exp(y-a))", "exp(-(a-y)**2)",
    "y*exp(-a)/(1+exp(-a))", "log(1+exp(a))-a*y",
]
ARGUMENTS = [-1e4, -1e3, -800.0, -400.0, -100.0, -30.0, -3.0, -0.7, -1e-3, 0.0, 1e-3, 0.4,
             2.5, 25.0, 90.0, 350.0, 360.0, 720.0, 2e3, 1e4]
TARGETS = [-0.5, 0.25, 1.0]
RTOL, ATOL = 1e-7, 1e-10

_TORCH = {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "tanh": torch.tanh,
          "sinh": torch.sinh, "cosh": torch.cosh, "abs": torch.abs, "max": torch.maximum,
          "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus}
_SYMPY = {"sigmoid": lambda x: 1 / (1 + sp.exp(-x)), "softplus": lambda x: sp.log(1 + sp.exp(x)),
          "max": sp.Max, "abs": sp.Abs}


def _torch(text: str, **values: float) -> tuple[float, dict[str, float]]:
    """The expression's value and gradient by PyTorch autograd in float64."""
    tensors = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
               for name, value in values.items()}
    out = eval(text, {"__builtins__": {}}, {**_TORCH, **tensors})   # the table's own text
    out.backward()
    return float(out.detach()), {name: float(t.grad) for name, t in tensors.items()}


def _exact(text: str, wrt: str, **values: float) -> tuple[float, float]:
    """The expression's value and derivative in ``wrt`` to 30 digits."""
    expr = sp.sympify(text, locals=_SYMPY)
    at = {sp.Symbol(name): sp.Float(value, 30) for name, value in values.items()}
    with mpmath.workdps(30):
        return (float(sp.N(expr.subs(at), 30)),
                float(sp.N(sp.diff(expr, sp.Symbol(wrt)).subs(at), 30)))


def _module(activation: object, loss: object):
    spec = load_spec({"name": "custom", "input": 1, "layers": [{"size": 1,
                      "activation": activation}], "loss": loss})
    warnings: list[str] = []
    module = load_module(render_module(derive(build_model(spec)), warn=warnings.append),
                         "custom_net")
    return module, warnings


def _agrees(got: float, reference: float) -> bool:
    return bool(np.isclose(got, reference, rtol=RTOL, atol=ATOL))


def _check(text: str, wrt: str, got: tuple[float, float], values: dict[str, float]) -> None:
    """``got`` (value, derivative) is finite where PyTorch's are, and agrees with PyTorch, or
    with the exact values where PyTorch's own are off."""
    value, grads = _torch(text, **values)
    expected = (value, grads[wrt])
    if not all(np.isfinite(expected)):
        return
    assert all(np.isfinite(got)), (text, values, got, expected)
    if not all(map(_agrees, got, expected)):
        exact = _exact(text, wrt, **values)
        assert all(map(_agrees, got, exact)), (text, values, got, exact, expected)


@pytest.mark.parametrize("text", ACTIVATIONS)
def test_custom_activation_matches_autograd_up_to_1e4(text):
    module, warnings = _module({"name": "f", "expr": text}, {"name": "linear", "expr": "a*y"})
    assert warnings == []
    params = {"W1": np.ones((1, 1)), "b1": np.zeros(1)}
    for z in ARGUMENTS:
        X = np.array([[z]])
        with np.errstate(over="raise", invalid="raise"):
            output, _ = module.forward(params, X)
            _, grads = module.gradients(params, X, np.ones((1, 1)))
        _check(text, "z", (float(output[0, 0]), float(grads["b1"][0])), {"z": z})


@pytest.mark.parametrize("text", LOSSES)
def test_custom_loss_matches_autograd_up_to_1e4(text):
    module, warnings = _module("identity", {"name": "L", "expr": text})
    assert warnings == []
    params = {"W1": np.ones((1, 1)), "b1": np.zeros(1)}
    for a in ARGUMENTS:
        for y in TARGETS:
            with np.errstate(over="raise", invalid="raise"):
                value, grads = module.gradients(params, np.array([[a]]), np.array([[y]]))
            _check(text, "a", (value, float(grads["b1"][0])), {"a": a, "y": y})


def test_the_issue_cases_were_unstable_and_are_now_finite():
    """z/(1 + e^{-2z}) gave NaN past z = 355 and log cosh(a - y) inf past |a - y| = 710."""
    module, _ = _module({"name": "f", "expr": "z/(1+exp(-2*z))"},
                        {"name": "L", "expr": "log(cosh(a - y))"})
    params = {"W1": np.ones((1, 1)), "b1": np.zeros(1)}
    X = np.array([[400.0], [1e4], [-1e4]])
    loss, grads = module.gradients(params, X, np.zeros((3, 1)))
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    # a = 400, 1e4 and 0; log cosh(a) = |a| - log 2 for the first two, 0 for the third
    assert loss == pytest.approx((400 + 1e4 - 2 * np.log(2)) / 3, rel=1e-12)


def test_a_function_without_a_safe_form_is_reported_in_a_warning_and_a_comment(capsys):
    spec = load_spec({"name": "custom", "input": 1, "layers": [{"size": 1, "activation": {
        "name": "f", "expr": "log(exp(z) + exp(-z**2))"}}], "loss": "mse"})
    source = render_module(derive(build_model(spec)))
    (line,) = capsys.readouterr().err.splitlines()[:1]
    assert line.startswith("derive: warning: no overflow-free form found for a¹")
    assert "z¹ = " in line
    assert "# Numerical stability: no overflow-free form found for a¹" in source


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_helper_keeps_full_relative_precision(dtype):
    # 1 / (1 + exp(-x)): exp(-x) overflows only below the smallest normal result, and only
    # there (its callers turn that warning off: test_codegen, test_sequences)
    namespace: dict = {"np": np}
    exec(HELPERS["_sigmoid"], namespace)  # noqa: S102 - the helper's own source
    tiny = np.finfo(dtype).tiny
    x = np.array([-800, -745, -700, -100, -87, -30, -1, -1e-8, 0, 1e-8, 1, 30, 40, 800],
                 dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        namespace["_sigmoid"](x[x > -np.log(np.finfo(dtype).max)])
    with np.errstate(over="ignore", invalid="raise", divide="raise"):
        got = namespace["_sigmoid"](x)
    assert got.dtype == dtype
    want = np.array([float(1 / (1 + mpmath.exp(-mpmath.mpf(float(v))))) for v in x])
    normal = want >= tiny
    np.testing.assert_allclose(got[normal], want[normal], rtol=4 * np.finfo(dtype).eps)
    assert (np.abs(got[~normal]) <= tiny).all()

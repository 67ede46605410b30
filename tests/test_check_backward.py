"""derive check --backward: hand-written backprop code against the derivation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from derive.check.backward import BATCH, Convention, check_backward
from derive.check.reference import Backprop, variants
from derive.cli.check import add_command  # noqa: F401  (the command module imports cleanly)
from derive.cli.main import main
from derive.derivation.reverse import activation_derivative as derive_prime
from derive.derivation.reverse import derive
from derive.errors import DeriveError
from derive.graph.model import build_model
from derive.registry import functions
from derive.spec.load import load_spec
from tests.conftest import make_spec

FIXTURES = Path(__file__).parent / "fixtures"
TUTORIAL = f"{FIXTURES / 'tutorial_xor.py'}:backward"
MISTAKES = FIXTURES / "backprop_mistakes.py"
SQUARE = str(FIXTURES / "square.yaml")
TUTORIAL_CALL = {"a3": "A2"}            # the tutorial's a3 is derive's output a^2


def tutorial(spec: str, reduction: str = "mean", **globals_: str):
    convention = Convention("in-out", reduction, bias=False, args=TUTORIAL_CALL,
                            globals_=globals_)
    return check_backward(str(FIXTURES / spec), TUTORIAL, convention)


# --- the classic tutorial (issue part 3) -------------------------------------------------


def test_tutorial_a_backward_reads_a2_from_outside():
    report = tutorial("xor_nobias.yaml")
    assert not report.ok
    text = "\n".join(report.lines())
    assert "NameError: name 'a2' is not defined" in text
    assert "reads a2 from outside the function" in text
    assert "--global a2=A1" in text
    assert "tutorial_xor.py line" in text and "Traceback" not in text


def test_tutorial_b_it_is_the_bce_gradient():
    mse = tutorial("xor_nobias.yaml", "sum", a2="A1")
    assert not mse.ok
    text = "\n".join(mse.diagnosis)
    assert "sigma'(z^2) factor is missing in delta^2 (the output layer)" in text
    assert "output error of binary_cross_entropy" in text and "used with mse" in text
    bce = tutorial("xor_nobias_bce.yaml", "sum", a2="A1")
    assert bce.ok, "\n".join(bce.lines())


def test_tutorial_c_it_sums_over_the_batch():
    report = tutorial("xor_nobias_bce.yaml", "mean", a2="A1")
    assert not report.ok
    assert len(report.diagnosis) == 1
    assert "sums over the batch instead of averaging" in report.diagnosis[0]
    assert f"{BATCH} (= B) times the mean" in report.diagnosis[0]


def test_tutorial_from_the_command_line(capsys):
    base = ["check", str(FIXTURES / "xor_nobias.yaml"), "--backward", TUTORIAL,
            "--weights", "in-out", "--no-bias", "--arg", "a3=A2"]
    assert main(base) == 1
    assert "NameError" in capsys.readouterr().out
    assert main([*base, "--global", "a2=A1"]) == 1
    out = capsys.readouterr().out
    assert "sums over the batch" in out and "binary_cross_entropy" in out
    # the built-in xor spec, biases dropped, loss swapped: the same verdict as the BCE file
    assert main(["check", "xor", "--backward", TUTORIAL, "--weights", "in-out", "--no-bias",
                 "--loss", "binary_cross_entropy", "--reduction", "sum", "--arg", "a3=A2",
                 "--global", "a2=A1"]) == 0
    assert "CORRECT" in capsys.readouterr().out


# --- each diagnosed mistake --------------------------------------------------------------


@pytest.mark.parametrize(("function", "expected"), [
    ("missing_output_sigma_prime", "sigma'(z^3) factor is missing in delta^3"),
    ("missing_hidden_sigma_prime", "sigma'(z^1) factor is missing in delta^1"),
    ("sigma_prime_of_z", "sigma' applied to z instead of a in delta^1"),
    ("sigma_prime_of_a", "sigma' applied to a instead of z in delta^1"),
    ("transposed_weight", "W^3 is not transposed in the recursion for delta^2"),
    ("wrong_sign", "wrong sign"),
    ("sums_over_batch", "sums over the batch instead of averaging"),
    ("missing_output_sigma_prime", "output error of binary_cross_entropy"),
])
def test_each_mistake_is_diagnosed(function, expected):
    report = check_backward(SQUARE, f"{MISTAKES}:{function}")
    assert not report.ok
    assert any(expected in line for line in report.diagnosis), "\n".join(report.lines())


def test_a_correct_function_passes_and_declared_sum_is_honoured():
    report = check_backward(SQUARE, f"{MISTAKES}:correct")
    assert report.ok, "\n".join(report.lines())
    assert [g.name for g in report.gradients] == ["dW1", "db1", "dW2", "db2", "dW3", "db3"]
    summed = check_backward(SQUARE, f"{MISTAKES}:sums_over_batch",
                            Convention(reduction="sum"))
    assert summed.ok


def test_a_function_that_raises_or_returns_nothing_is_reported(capsys):
    raises = check_backward(SQUARE, f"{MISTAKES}:raises")
    assert not raises.ok and "raised KeyError: 'W4'" in raises.error[0]
    nothing = check_backward(SQUARE, f"{MISTAKES}:returns_nothing")
    assert not nothing.ok and "returned NoneType" in nothing.error[0]
    assert main(["check", SQUARE, "--backward", f"{MISTAKES}:raises"]) == 1
    assert "Traceback" not in capsys.readouterr().out


def test_callables_tuples_and_transposed_returns():
    spec = make_spec([2, 3, 2], ["tanh", "identity"], "mse")

    def backward(X, Y, W1, b1, W2, b2):
        Z1 = X @ W1.T + b1
        A1 = np.tanh(Z1)
        delta2 = (A1 @ W2.T + b2 - Y) / len(X)
        delta1 = (delta2 @ W2) * (1 - A1 ** 2)
        return delta1.T @ X, delta1.sum(0), delta2.T @ A1, delta2.sum(0)

    assert check_backward(spec, backward).ok

    def backward_reversed(X, Y, W1, b1, W2, b2):
        dW1, db1, dW2, db2 = backward(X, Y, W1, b1, W2, b2)
        return dW2, db2, dW1, db1

    assert check_backward(spec, backward_reversed).ok

    def transposed(X, Y, W1, b1, W2, b2):
        dW1, db1, dW2, db2 = backward(X, Y, W1, b1, W2, b2)
        return dW1.T, db1, dW2.T, db2

    report = check_backward(spec, transposed)
    assert not report.ok
    assert "transpose of the out-in layout" in report.gradients[0].note


def test_undeclared_parameter_and_bad_conventions():
    def backward(X, Y, stash):
        return {}

    with pytest.raises(DeriveError, match="--arg stash=ROLE"):
        check_backward("xor", backward)
    with pytest.raises(DeriveError, match="unknown role"):
        Convention(args={"cache": "A9x"})
    with pytest.raises(DeriveError, match="in-out"):
        Convention(weights="rows")
    with pytest.raises(DeriveError, match="FILE:FUNCTION"):
        check_backward("xor", "no_colon_here")
    with pytest.raises(DeriveError, match="no such file"):
        check_backward("xor", "missing.py:backward")


# --- the reference itself: derive's formulas evaluated on a batch ------------------------


@pytest.mark.parametrize("name", ["xor", "bce", "custom_mish", "digits", "deep_tanh"])
def test_reference_gradients_match_finite_differences(name):
    spec = load_spec(name)
    derivation = derive(build_model(spec))
    rng = np.random.default_rng(3)
    n = spec.sizes
    params = {}
    for layer in derivation.model.layers:
        params[f"W{layer.index}"] = rng.uniform(-1, 1, (n[layer.index], n[layer.index - 1]))
        params[f"b{layer.index}"] = rng.uniform(-0.5, 0.5, n[layer.index])
    X = rng.uniform(-1, 1, (3, n[0]))
    Y = rng.uniform(0.05, 0.95, (3, n[-1]))
    if derivation.model.loss.needs == "distribution":
        Y /= Y.sum(axis=1, keepdims=True)
    grads = Backprop(derivation, params, X, Y).gradients()
    # the batch loss, independently: the registry's loss summed over outputs, mean over rows
    loss = sp.lambdify((functions.A, functions.Y), derivation.model.loss.expr, "numpy")

    def cost(p):
        output = Backprop(derivation, p, X, Y).value("a", derivation.model.depth)
        return float(np.sum(loss(output, Y))) / len(X)

    for key in list(params)[:4]:
        for index in list(np.ndindex(params[key].shape))[:3]:
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[key][index] += 1e-6
            down[key][index] -= 1e-6
            numeric = (cost(up) - cost(down)) / 2e-6
            assert abs(numeric - grads[key][index]) < 1e-6, (key, index)


# --- functions that do not return gradients --------------------------------------------


def test_a_function_that_calls_sys_exit_is_reported_not_obeyed(tmp_path, capsys):
    def backward(X, Y, W1, b1, W2, b2):
        raise SystemExit(3)

    report = check_backward("xor", backward)
    assert not report.ok and "raised SystemExit: 3" in report.error[0]
    script = tmp_path / "script.py"
    script.write_text("import sys\n\ndef backward(X, Y):\n    return {}\n\nsys.exit('done')\n")
    assert main(["check", "xor", "--backward", f"{script}:backward"]) == 2
    err = capsys.readouterr().err
    assert "importing" in err and "SystemExit: done" in err and "Traceback" not in err


def _right(X, Y, W1, b1, W2, b2):
    """xor (2-3-1, sigmoid, mse) by hand, derive's layout."""
    A1 = 1 / (1 + np.exp(-(X @ W1.T + b1)))
    A2 = 1 / (1 + np.exp(-(A1 @ W2.T + b2)))
    delta2 = (A2 - Y) * A2 * (1 - A2) / len(X)
    delta1 = (delta2 @ W2) * A1 * (1 - A1)
    return delta1.T @ X, delta1.sum(0), delta2.T @ A1, delta2.sum(0)


def test_right_values_in_the_wrong_layout_are_not_called_a_mystery():
    def transposed(X, Y, W1, b1, W2, b2):
        dW1, db1, dW2, db2 = _right(X, Y, W1, b1, W2, b2)
        return dW1.T, db1, dW2.T, db2

    report = check_backward("xor", transposed)
    assert not report.ok
    text = "\n".join(report.lines())
    assert "no common mistake" not in text
    assert "the values agree with the derivation" in text and "--weights" in text


def test_a_missing_gradient_is_not_followed_by_a_failed_diagnosis():
    def partial(X, Y, W1, b1, W2, b2):
        dW1, db1, dW2, _db2 = _right(X, Y, W1, b1, W2, b2)
        return {"dW1": dW1, "db1": db1, "dW2": dW2}

    report = check_backward("xor", partial)
    assert not report.ok
    text = "\n".join(report.lines())
    assert "db2" in text and "not returned" in text
    assert "no common mistake" not in text


def test_a_square_weight_gradient_returned_transposed_is_diagnosed():
    # square.yaml is 3-3-3-3: dW2 in the other layout has the right shape and wrong values
    def other_layout(params, X, Y):
        from tests.fixtures.backprop_mistakes import correct

        grads = correct(params, X, Y)
        return {**grads, "W2": grads["W2"].T}

    report = check_backward(SQUARE, other_layout)
    assert not report.ok
    expected = "dW2 returned transposed: the other layout than the weights' (out-in)"
    assert report.diagnosis == (expected,), "\n".join(report.lines())


@pytest.mark.parametrize("activation", [n for n, e in functions.ACTIVATIONS.items()
                                        if e.vector is None])
def test_a_z_for_a_mistake_is_a_hypothesis_only_where_it_changes_the_gradients(activation):
    # σ' written in a, given z (or σ'(z) given a): for relu [a > 0] at z is [z > 0], the
    # right gradient, which no hypothesis may claim to explain; for tanh 1 - z² is not
    spec = load_spec(make_spec([2, 3, 2], [activation, "identity"]))
    derivation = derive(build_model(spec))
    rng = np.random.default_rng(5)
    params = {"W1": rng.uniform(-1, 1, (3, 2)), "b1": rng.uniform(-0.5, 0.5, 3),
              "W2": rng.uniform(-1, 1, (2, 3)), "b2": rng.uniform(-0.5, 0.5, 2)}
    run = Backprop(derivation, params, rng.uniform(-1, 1, (4, 2)), rng.uniform(0, 1, (4, 2)))
    right = run.gradients()
    found = [v for v in variants(spec, derivation, run) if "instead of" in v.description]
    for variant in found:
        assert max(np.abs(variant.grads[k] - right[k]).max() for k in right) > 1e-6, variant
    prime = derive_prime(functions.resolve_activation(activation))
    in_a, in_z = prime.in_a, prime.in_z
    differs = in_a is not None and in_a.has(functions.A) and any(
        abs(float(in_a.subs(functions.A, p) - in_z.subs(functions.Z, p))) > 1e-9
        for p in (-1.5, -0.3, 0.4, 2.0))
    assert bool(found) == differs

"""derive check --backward on backprop code as people write it: Nielsen's per-sample class,
deeplearning.ai's column-major batches with a cache, CS231n's (in, out) weights with integer
labels, a PyTorch-like module with .grad dicts; conventions detected, the user's code in a
child process with a time limit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from derive.check.backward import Convention, check_backward
from derive.cli.main import main
from derive.errors import DeriveError

STYLES = Path(__file__).parent / "fixtures" / "backward_styles"


def check(style: str, target: str, convention: Convention | None = None, **kwargs):
    return check_backward(str(STYLES / f"{style}.yaml"), f"{STYLES / style}.py:{target}",
                          convention, **kwargs)


# --- each style, correct: detected without a flag ----------------------------------------


#: The convention each style is detected to have: layout, weights, targets
DETECTED = {"nielsen": ("sample", "out-in", "soft"), "dlai": ("columns", "out-in", "soft"),
            "cs231n": ("rows", "in-out", "labels"), "torchlike": ("rows", "out-in", "soft")}


def detected(report) -> tuple[str, str, str]:
    c = report.convention
    return c.layout, c.weights, c.targets


@pytest.mark.parametrize(("style", "target"), [
    ("nielsen", "Network.backprop"),
    ("dlai", "backward_propagation"),
    ("cs231n", "TwoLayerNet.loss"),
    ("torchlike", "MLP.loss_and_backward"),
])
def test_each_style_is_correct_as_written(style, target):
    report = check(style, target)
    assert report.ok, "\n".join(report.lines())
    assert detected(report) == DETECTED[style]
    assert [g.name for g in report.gradients] == ["dW1", "db1", "dW2", "db2"]


# --- each style, with each common mistake ------------------------------------------------


@pytest.mark.parametrize(("style", "target", "expected"), [
    ("nielsen", "MissingOutputPrime.backprop",
     "the sigma'(z^2) factor is missing in delta^2 (the output layer)"),
    ("nielsen", "PrimeOfActivation.backprop", "sigma' applied to a instead of z in delta^1"),
    ("nielsen", "NoTranspose.backprop", "W^2 is not transposed in the recursion for delta^1"),
    ("dlai", "backward_no_average", "every gradient: sums over the batch instead of averaging"),
    ("dlai", "backward_tanh_of_z", "sigma' applied to z instead of a in delta^1"),
    ("dlai", "backward_flipped_sign", "every gradient: wrong sign"),
    ("cs231n", "ForgetsToAverage.loss", "every gradient: sums over the batch"),
    ("cs231n", "NoReluBackward.loss", "the sigma'(z^1) factor is missing in delta^1"),
    ("cs231n", "GradientAscent.loss", "every gradient: wrong sign"),
    ("torchlike", "MLPTanhOfInput.loss_and_backward",
     "sigma' applied to z instead of a in delta^1"),
    ("torchlike", "MLPSummedLoss.loss_and_backward", "every gradient: sums over the batch"),
    ("torchlike", "MLPBiasMean.loss_and_backward",
     "b1, b2: divides by the batch size twice"),
])
def test_each_mistake_is_diagnosed(style, target, expected):
    report = check(style, target)
    assert not report.ok
    assert any(line.startswith(expected) for line in report.diagnosis), (
        "\n".join(report.lines()))
    # each mistake is judged under its style's convention; backward_no_average, which sums
    # over a batch of columns, is so judged although it returns, for one sample, that
    # sample's gradient
    assert detected(report) == DETECTED[style]


def test_a_declared_layout_overrides_the_detected_one():
    assert check("dlai", "backward_no_average", Convention(layout="sample")).ok


# --- flags override what is detected -----------------------------------------------------


def test_the_command_line_detects_and_flags_override(capsys):
    spec, code = str(STYLES / "cs231n.yaml"), f"{STYLES / 'cs231n'}.py:TwoLayerNet.loss"
    assert main(["check", spec, "--backward", code]) == 0
    out = capsys.readouterr().out
    assert "integer class labels" in out and "detected" in out and "CORRECT" in out
    assert main(["check", spec, "--backward", code, "--targets", "one-hot"]) == 1
    out = capsys.readouterr().out
    assert "IndexError" in out and "cs231n.py line" in out and "Traceback" not in out


def test_integer_labels_are_fed_where_the_code_wants_them_and_one_hot_for_argmax():
    def loss_grad(X, Y, params):
        # correct code behind an adapter that turns one-hot rows into labels
        y = Y.argmax(axis=1)
        hidden = np.maximum(0, X @ params["W1"] + params["b1"])
        scores = hidden @ params["W2"] + params["b2"]
        probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
        dscores = probs.copy()
        dscores[np.arange(len(X)), y] -= 1
        dscores /= len(X)
        dhidden = (dscores @ params["W2"].T) * (hidden > 0)
        return {"W1": X.T @ dhidden, "b1": dhidden.sum(0), "W2": hidden.T @ dscores,
                "b2": dscores.sum(0)}

    report = check_backward(str(STYLES / "cs231n.yaml"), loss_grad)
    assert report.ok, "\n".join(report.lines())
    assert report.convention.targets == "one-hot"
    # with soft targets declared, the adapter is wrong, and it says so
    assert not check_backward(str(STYLES / "cs231n.yaml"), loss_grad,
                              Convention(targets="soft")).ok


def test_weights_and_biases_as_lists_of_a_plain_function(tmp_path):
    code = tmp_path / "lists.py"
    code.write_text(
        "import numpy as np\n\n"
        "def sigmoid(z):\n    return 1 / (1 + np.exp(-z))\n\n"
        "def backprop(x, y, weights, biases):\n"
        "    activations, zs = [x], []\n"
        "    for w, b in zip(weights, biases):\n"
        "        zs.append(w @ activations[-1] + b)\n"
        "        activations.append(sigmoid(zs[-1]))\n"
        "    delta = (activations[-1] - y) * activations[-1] * (1 - activations[-1])\n"
        "    dws, dbs = [delta @ activations[-2].T], [delta]\n"
        "    for l in range(2, len(weights) + 1):\n"
        "        a = activations[-l]\n"
        "        delta = (weights[-l + 1].T @ delta) * a * (1 - a)\n"
        "        dws.insert(0, delta @ activations[-l - 1].T)\n"
        "        dbs.insert(0, delta)\n"
        "    return dbs, dws\n")
    report = check_backward(str(STYLES / "nielsen.yaml"), f"{code}:backprop")
    assert report.ok, "\n".join(report.lines())
    assert report.convention.layout == "sample"


# --- when nothing fits, and objects that cannot be built ---------------------------------


def test_every_convention_failing_names_them_and_the_flags(tmp_path):
    code = tmp_path / "odd.py"
    code.write_text("def backward(X, Y, params):\n"
                    "    return X @ params['W1'] @ params['W2'] @ params['W1']\n")
    report = check_backward(str(STYLES / "dlai.yaml"), f"{code}:backward")
    text = "\n".join(report.lines())
    assert not report.ok and "FAILED" in text
    assert "it fails under each of the" in text
    assert "--layout rows --weights out-in --targets soft" in text
    assert "--layout rows|columns|sample, --weights out-in|in-out" in text


def test_an_object_is_built_from_sizes_or_a_factory(tmp_path, capsys):
    code = tmp_path / "net.py"
    code.write_text(
        "import numpy as np\n\n"
        "class Net:\n"
        "    def __init__(self, n_in, n_hidden, n_out, seed, scale):\n"
        "        self.W1, self.b1 = np.zeros((n_hidden, n_in)), np.zeros(n_hidden)\n"
        "        self.W2, self.b2 = np.zeros((n_out, n_hidden)), np.zeros(n_out)\n\n"
        "    def gradients(self, X, Y):\n"
        "        A1 = np.tanh(X @ self.W1.T + self.b1)\n"
        "        out = 1 / (1 + np.exp(-(A1 @ self.W2.T + self.b2)))\n"
        "        d2 = (out - Y) / len(X)\n"
        "        d1 = (d2 @ self.W2) * (1 - A1 ** 2)\n"
        "        self.dW1, self.db1 = d1.T @ X, d1.sum(0)\n"
        "        self.dW2, self.db2 = d2.T @ A1, d2.sum(0)\n\n"
        "def make():\n"
        "    return Net(2, 4, 1, seed=0, scale=1.0)\n")
    spec, target = str(STYLES / "dlai.yaml"), f"{code}:Net.gradients"
    assert main(["check", spec, "--backward", target]) == 2
    err = capsys.readouterr().err
    assert "cannot build the object" in err and "--factory NAME" in err
    assert len(err.strip().splitlines()) == 1
    report = check_backward(spec, target, Convention(factory="make"))
    assert report.ok, "\n".join(report.lines())
    with pytest.raises(DeriveError, match="no function 'nothing'"):
        check_backward(spec, target, Convention(factory="nothing"))


# --- the child process: time limit, crashes, derive's state untouched --------------------


def test_code_that_never_returns_is_stopped(tmp_path, capsys):
    code = tmp_path / "hangs.py"
    code.write_text("def backward(X, Y, params):\n    while True:\n        pass\n")
    assert main(["check", "xor", "--backward", f"{code}:backward", "--timeout", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did not finish within 1 s" in err and "--timeout" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_crash_is_one_line(tmp_path, capsys):
    code = tmp_path / "crashes.py"
    code.write_text("import os\n\ndef backward(X, Y, params):\n    os._exit(3)\n")
    assert main(["check", "xor", "--backward", f"{code}:backward"]) == 2
    err = capsys.readouterr().err.strip()
    assert "crashed the process running it (exit code 3)" in err
    assert len(err.splitlines()) == 1


def test_the_users_code_never_runs_in_derives_process(tmp_path):
    code = tmp_path / "meddles.py"
    code.write_text(
        "import os\nimport sys\n\n"
        "os.environ['DERIVE_TEST_MEDDLED'] = 'yes'\n"
        "print('output a user prints')\n\n"
        "def backward(X, Y, params):\n"
        "    sys.modules.clear()\n"
        "    return {}\n")
    report = check_backward("xor", f"{code}:backward")
    assert not report.ok
    assert "DERIVE_TEST_MEDDLED" not in os.environ

"""derive check FORMULA on convolutional networks: formulas about conv and pooling layers in
index form (shifted indices, Iverson brackets, window maxima), right and wrong, through the
API and the command line."""

from __future__ import annotations

import json

import pytest

from derive.check.formulas import check_formula
from derive.check.parser import FormulaSyntaxError, parse_formula
from derive.cli.main import main
from derive.errors import DeriveError

POINTS = 3

#: Two stride-1 convolutions without padding: δ of the second one's input is the full
#: correlation of δ² with the flipped kernel.
TWO_CONVS = {
    "name": "two_convs", "input": [1, 4, 4], "loss": "mse",
    "layers": [{"op": "conv2d", "channels": 2, "kernel": 2, "activation": "tanh"},
               {"op": "conv2d", "channels": 2, "kernel": 2},
               {"op": "flatten"},
               {"size": 2}]}
#: Stride (1, 2), padding 1 and a 2x3 kernel, then average pooling.
STRIDED = {
    "name": "strided", "input": [2, 5, 5], "loss": "mse",
    "layers": [{"op": "conv2d", "channels": 2, "kernel": 2, "activation": "tanh"},
               {"op": "conv2d", "channels": 3, "kernel": [2, 3], "stride": [1, 2],
                "padding": 1},
               {"op": "avg_pool2d", "kernel": 2},
               {"op": "flatten"},
               {"size": 2}]}
#: tiny_cnn: a 2x2 conv with relu, 2x2 max pooling with stride 1, flatten, softmax.
MAX_POOLED = {
    "name": "max_pooled", "input": [1, 4, 4], "loss": "cross_entropy",
    "layers": [{"op": "conv2d", "channels": 1, "kernel": 2, "activation": "relu"},
               {"op": "max_pool2d", "kernel": 2, "stride": 1},
               {"op": "flatten"},
               {"size": 2, "activation": "softmax"}]}

@pytest.fixture(scope="module")
def spec_files(tmp_path_factory) -> dict[str, str]:
    """The specs as files, written once (a spec read again from the same file is the same
    spec, so its derivation is reused across the command-line tests)."""
    folder = tmp_path_factory.mktemp("specs")
    paths = {}
    for spec in (TWO_CONVS, STRIDED, MAX_POOLED):
        path = folder / f"{spec['name']}.json"
        path.write_text(json.dumps(spec))
        paths[spec["name"]] = str(path)
    return paths


CONV_INPUT = ("delta^1_krs = (1 - (a^1_krs)^2) sum_j sum_u sum_v [1 <= r-u+1 <= 2] "
              "[1 <= s-v+1 <= 2] delta^2_juv w^2_{j,k,r-u+1,s-v+1}")
STRIDED_INPUT = ("delta^1_krs = (1 - (a^1_krs)^2) sum_j sum_u sum_v [1 <= r-u+2 <= 2] "
                 "[1 <= s-2v+3 <= 3] delta^2_juv w^2_{j,k,r-u+2,s-2v+3}")
ROUTE = ("delta^1_jrs = step(z^1_jrs) sum_u sum_v [1 <= r-u+1 <= 2] [1 <= s-v+1 <= 2] "
         "[(r-u+1, s-v+1) = argmax_{p,q} a^1_{j,u+p-1,v+q-1}] delta^2_juv")

CASES = [  # (spec, formula, correct)
    # δ of a convolution's input, stride 1: the flipped kernel under brackets
    (TWO_CONVS, CONV_INPUT, True),
    (TWO_CONVS, (r"\delta^1_{k,r,s} = (1 - (a^1_{krs})^2) \sum_{j} \sum_{u=1}^{H_2} "
                r"\sum_{v=1}^{W_2} [1 \le r-u+1 \le 2] [1 ≤ s-v+1 ≤ 2] \delta^2_{juv} "
                r"w^2_{j,k,r-u+1,s-v+1}"), True),
    (TWO_CONVS, ("delta^1_krs = (1 - (a^1_krs)^2) sum_{j,p,q} delta^2_{j,r-p+1,s-q+1} "
                "w^2_jkpq"), True),      # δ² read outside its map is 0 (zero padding)
    (TWO_CONVS, CONV_INPUT.replace("w^2_{j,k,r-u+1,s-v+1}", "w^2_{j,k,u-r+2,v-s+2}"),
     False),                            # the kernel not flipped
    (TWO_CONVS, CONV_INPUT.replace("(1 - (a^1_krs)^2) ", ""), False),    # no tanh'
    # stride (1, 2) and padding 1
    (STRIDED, STRIDED_INPUT, True),
    (STRIDED, STRIDED_INPUT.replace("w^2_{j,k,r-u+2,s-2v+3}", "w^2_{j,k,r-u+1,s-2v+3}"),
     False),                            # a wrong offset
    (STRIDED, STRIDED_INPUT.replace("s-2v+3}", "s-v+3}").replace("s-2v+3 ", "s-v+3 "),
     False),                            # the stride left out
    # the kernel's gradient, and the bias's
    (MAX_POOLED, "dC/dw^1_jkpq = sum_r sum_s delta^1_jrs a^0_{k,r+p-1,s+q-1}", True),
    (MAX_POOLED, "dC/dW^1_{jkpq} = Σ_rs δ¹[j, r, s] x_{k,r+p-1,s+q-1}", True),
    (MAX_POOLED, "dC/dw^1_jkpq = sum_r sum_s delta^1_jrs a^0_{k,r+q-1,s+p-1}", False),
    (STRIDED, "dC/dw^2_jkpq = sum_{r,s} delta^2_jrs a^1_{k,r+p-2,2s+q-3}", True),
    (STRIDED, "dC/dw^2_jkpq = sum_{r,s} delta^2_jrs a^1_{k,r+p-1,2s+q-2}", False),
    (STRIDED, "dC/db^2_j = sum_r sum_s delta^2_jrs", True),
    (STRIDED, "dC/db^2_j = sum_r sum_s delta^2_jrs / 2", False),
    # average pooling spreads δ over each window
    (STRIDED, ("delta^2_jrs = sum_u sum_v [1 <= r-2u+2 <= 2] [1 <= s-2v+2 <= 2] "
              "delta^3_juv / 4"), True),
    (STRIDED, ("delta^2_jrs = sum_u sum_v [1 <= r-2u+2 <= 2] [1 <= s-2v+2 <= 2] "
              "delta^3_juv"), False),
    # max pooling routes δ to the first maximum of each window
    (MAX_POOLED, ROUTE, True),
    (MAX_POOLED, ("delta^1_jrs = [z^1_jrs > 0] sum_u sum_v [1 <= r-u+1 <= 2] "
                 "[1 <= s-v+1 <= 2] [a^1_jrs = max_{p,q} a^1_{j,u+p-1,v+q-1}] delta^2_juv"),
     True),
    (MAX_POOLED, ("δ¹[j, r, s] = [z¹[j, r, s] > 0]*Σ_v ([1 ≤ s-v+1 ≤ 2]*Σ_u (𝟙[(r-u+1, "
                 "s-v+1) = argmax_p,q a¹[j, u+p-1, v+q-1]]*[1 ≤ r-u+1 ≤ 2]*δ²[j, u, v]))"),
     True),                             # what derive show prints
    (MAX_POOLED, ROUTE.replace("(r-u+1, s-v+1)", "(s-v+1, r-u+1)"), False),
    (MAX_POOLED, ("delta^1_jrs = step(z^1_jrs) sum_u sum_v [1 <= r-u+1 <= 2] "
                 "[1 <= s-v+1 <= 2] delta^2_juv / 4"), False),   # average, not maximum
    # flatten's δ is the vector read back as maps
    (MAX_POOLED, "delta^2_jrs = delta^3_{(j-1)H_2 W_2 + (r-1)W_2 + s}", True),
    (MAX_POOLED, "delta^2_jrs = delta^3_{(j-1)H_2 W_2 + (s-1)H_2 + r}", False),
]


@pytest.mark.parametrize(("spec", "formula", "correct"), CASES)
def test_conv_formulas_are_judged(spec, formula, correct):
    verdict = check_formula(spec, formula, points=POINTS)
    text = "\n".join(verdict.lines())
    assert verdict.correct == correct, text
    if not correct:
        assert verdict.counterexample is not None, text
        assert "your formula gives" in text and "the derived formula:" in text


def test_a_missing_bracket_reads_the_kernel_outside_its_offsets():
    formula = CONV_INPUT.replace("[1 <= r-u+1 <= 2] ", "")
    verdict = check_formula(TWO_CONVS, formula, points=POINTS)
    assert not verdict.correct
    assert "no value: it reads w²[" in verdict.counterexample.user_value
    assert "a bracket such as" in verdict.counterexample.user_value


def test_the_verdict_names_the_method_and_the_copy():
    exact = check_formula(MAX_POOLED, CASES[9][1], points=POINTS)
    assert exact.method.startswith("symbolic identity")
    assert "1x4x4-1x3x3-1x2x2-4-2 network" in exact.method
    routed = check_formula(MAX_POOLED, ROUTE, points=POINTS)
    assert "numeric agreement at 3 random points" in routed.method
    wrong = check_formula(MAX_POOLED, "dC/db^1_j = 0", points=POINTS)
    text = "\n".join(wrong.lines())
    assert "W^1 = [[[[" in text and "x = [[[" in text


@pytest.mark.parametrize("spec", [MAX_POOLED, STRIDED])
def test_the_printed_derived_formula_checks_back_as_correct(spec):
    layers = [n for n, layer in enumerate(spec["layers"], start=1)
              if layer.get("op") in ("conv2d", "max_pool2d", "avg_pool2d")]
    for layer in layers:
        lefts = [f"delta^{layer}_jrs"]
        if spec["layers"][layer - 1]["op"] == "conv2d":
            lefts += [f"dC/dw^{layer}_jkpq", f"dC/db^{layer}_j"]
        for left in lefts:
            wrong = check_formula(spec, f"{left} = 0", points=1)
            assert not wrong.correct
            for printed in wrong.derived[:2]:         # the plain form and derive show's
                again = check_formula(spec, printed, points=POINTS)
                assert again.correct, (printed, again.lines())


def test_a_generic_layer_runs_over_the_convolutions():
    verdict = check_formula(STRIDED, "dC/db^l_j = sum_r sum_s delta^l_jrs", points=POINTS)
    assert verdict.correct and verdict.layers == (1, 2)


@pytest.mark.parametrize(("spec", "formula", "code"), [
    (TWO_CONVS, CONV_INPUT, 0),
    (TWO_CONVS, CONV_INPUT.replace("w^2_{j,k,r-u+1,s-v+1}", "w^2_{j,k,u-r+2,v-s+2}"), 1),
    (STRIDED, STRIDED_INPUT, 0),
    (STRIDED, STRIDED_INPUT.replace("r-u+2,s-2v+3}", "r-u+1,s-2v+3}"), 1),
    (MAX_POOLED, "dC/dw^1_jkpq = sum_r sum_s delta^1_jrs a^0_{k,r+p-1,s+q-1}", 0),
    (MAX_POOLED, "dC/dw^1_jkpq = sum_r sum_s delta^1_jrs a^0_{k,r+p,s+q}", 1),
    (STRIDED, "dC/db^2_j = sum_{r,s} delta^2_jrs", 0),
    (STRIDED, "dC/db^2_j = delta^2_{j,1,1}", 1),
    (STRIDED, "delta^2_jrs = sum_u sum_v [1 <= r-2u+2 <= 2][1 <= s-2v+2 <= 2] delta^3_juv/4",
     0),
    (STRIDED, "delta^2_jrs = sum_u sum_v [1 <= r-u+1 <= 2][1 <= s-v+1 <= 2] delta^3_juv/4", 1),
    (MAX_POOLED, ROUTE, 0),
    (MAX_POOLED, ROUTE.replace("u+p-1,v+q-1", "u+p,v+q"), 1),
])
def test_the_command_line_exit_codes(spec, formula, code, spec_files, capsys):
    path = spec_files[spec["name"]]
    assert main(["check", path, formula, "--points", str(POINTS)]) == code
    out = capsys.readouterr().out
    assert ("CORRECT" if code == 0 else "INCORRECT") in out


@pytest.mark.parametrize(("formula", "column"), [
    ("dC/dw^1_jkpq = sum_r sum_s delta^1_jrs a^0_{k,r+p-1,s+q-1", 58),
    ("delta^1_jrs = [1 <= r <= 2", 27),
    ("delta^1_jrs = [(r, s) = argmax_{p,q}]", 37),
    ("delta^1_{j,r+1,s} = 0", 12),
    ("dC/dw^1_jkpqr = 0", 9),
    ("delta^1_jrs = a^0_{k,rs,s}", 22),
    ("delta^1_jrs = a^0_{k,r+P,s}", 24),
])
def test_unparsable_conv_formulas_exit_2_with_the_column(formula, column, capsys):
    with pytest.raises(FormulaSyntaxError) as err:
        parse_formula(formula)
    assert err.value.column == column, err.value
    assert main(["check", "tiny_cnn", formula]) == 2
    assert f"at column {column}" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "formula", "message"), [
    (MAX_POOLED, "dC/dw^1_jk = 0", "dC/dw^1 is a kernel: write its entries with 4 indices"),
    (MAX_POOLED, "delta^1 = 0", "delta^1 is a feature map"),
    (MAX_POOLED, "delta^1_jrs = sum_u a^1_{j,u+r,s}",
     "say how far it runs, as in sum_{u=1}^{H_2}"),
    (STRIDED, "delta^2_jrs = [(r, s) = argmax_{p,q} a^2_{j,r+p,s+q}]", "no max pooling layer"),
    (MAX_POOLED, "delta^1_jrs = H_9", "H_9"),
    (STRIDED, "delta^l_jr = 0", "delta^l is a feature map"),
])
def test_formulas_without_a_meaning_exit_2(spec, formula, message, spec_files, capsys):
    with pytest.raises(DeriveError) as err:
        check_formula(spec, formula, points=1)
    assert message in str(err.value)
    assert main(["check", spec_files[spec["name"]], formula]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("formula", [
    "delta^1_jrs = sum_u delta^2_{j,u,s}",                # s: a column of layer 1, not 2
    CONV_INPUT.replace("w^2_{j,k,", "w^2_{k,j,"),         # channels of the wrong layers
])
def test_an_index_over_the_wrong_axis_is_ill_formed(formula):
    spec = MAX_POOLED if "delta^2_{j,u,s}" in formula else TWO_CONVS
    verdict = check_formula(spec, formula, points=1)
    assert not verdict.correct
    assert verdict.reason.startswith("ill-formed at column"), verdict.reason
    assert "ranges over" in verdict.reason

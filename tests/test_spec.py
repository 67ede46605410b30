"""Tests for stage 1, the spec: loading, validation with locations, canonical form, schema."""

from __future__ import annotations

import copy
import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml

from derive.errors import DeriveError
from derive.registry import functions
from derive.registry.ops import OPS
from derive.spec.load import (
    LAYER_COMMON_FIELDS,
    PARAMETER_KEYS,
    TOP_FIELDS,
    ExampleSpec,
    FunctionSpec,
    LayerSpec,
    NetworkSpec,
    example_path,
    list_examples,
    load_spec,
)
from derive.spec.schema import ATTRIBUTE_KINDS, parameter_ranks, spec_schema

EXAMPLES = [name for name, _ in list_examples()]


def write(tmp_path: Path, text: str, filename: str = "spec.yaml") -> Path:
    path = tmp_path / filename
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def same_content(a: NetworkSpec, b: NetworkSpec) -> bool:
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


# --- built-in examples -----------------------------------------------------------------------


def test_the_examples_are_listed_with_descriptions() -> None:
    assert EXAMPLES == ["bce", "custom_mish", "deep_tanh", "digits", "digits_cnn", "gated_mlp",
                        "gru_tones", "layernorm_mlp", "lenet", "lstm_adding", "regularized",
                        "resmlp", "rnn_sine", "tiny_cnn", "tiny_rnn", "transformer_block", "xor"]
    for name, description in list_examples():
        assert description and not description.startswith("#"), name
        assert example_path(name).read_text().startswith(f"# {description}\n")


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_loads_and_round_trips(name: str) -> None:
    spec = load_spec(name)
    assert spec.name == name
    assert spec.source == f"built-in example {name!r}"
    again = load_spec(spec.to_dict())
    assert again.source == "<dict>"
    assert same_content(again, spec)
    assert again.digest() == spec.digest()
    assert load_spec(example_path(name)) == dataclasses.replace(
        spec, source=str(example_path(name))
    )


def test_xor_is_the_classic_network_with_a_worked_example() -> None:
    spec = load_spec("xor")
    assert spec.sizes == (2, 3, 1)
    assert spec.depth == 2
    assert [spec.activation(l).name for l in (1, 2)] == ["sigmoid", "sigmoid"]
    assert spec.resolved_loss() == functions.LOSSES["mse"]
    example = spec.example
    assert example is not None
    assert example.x == (1.0, 0.0) and example.y == (1.0,)
    params = dict(example.params)
    assert [key for key, _ in example.params] == ["W1", "b1", "W2", "b2"]
    assert len(params["W1"]) == 3 and all(len(row) == 2 for row in params["W1"])
    assert len(params["b1"]) == 3 and params["W2"] == ((0.7, -0.8, 0.9),)


def test_examples_have_the_documented_shapes() -> None:
    assert load_spec("digits").sizes == (64, 32, 10)
    assert load_spec("digits").activation(2).is_softmax
    deep = load_spec("deep_tanh")
    assert deep.sizes == (4, *[6] * 8, 2)
    assert deep.activation(9).name == "identity"
    mish = load_spec("custom_mish").activation(1)
    assert mish.custom and mish.name == "mish"
    assert load_spec("bce").resolved_loss().name == "binary_cross_entropy"


def test_activation_index_is_one_based() -> None:
    spec = load_spec("xor")
    with pytest.raises(IndexError):
        spec.activation(0)
    with pytest.raises(IndexError):
        spec.activation(3)


# --- canonical form and digest --------------------------------------------------------------

SMALL: dict[str, Any] = {
    "name": "small",
    "input": 2,
    "layers": [
        {"size": 3, "activation": {"name": "leaky_relu", "alpha": 0.2}, "bias": False},
        {"size": 1, "activation": "sigmoid"},
    ],
    "loss": "binary_cross_entropy",
}


def test_spec_objects_hold_what_the_user_wrote() -> None:
    spec = load_spec(SMALL)
    assert spec == NetworkSpec(
        name="small",
        input=2,
        layers=(
            LayerSpec(3, FunctionSpec("leaky_relu", (("alpha", 0.2),)), bias=False),
            LayerSpec(1, FunctionSpec("sigmoid")),
        ),
        loss=FunctionSpec("binary_cross_entropy"),
    )
    assert spec.activation(1).params == (("alpha", 0.2),)


def test_to_dict_is_canonical() -> None:
    data = copy.deepcopy(SMALL)
    data["layers"][1] = {"bias": True, "activation": {"name": "sigmoid"}, "size": 1}
    data["loss"] = {"name": "binary_cross_entropy"}
    data["example"] = {}
    canonical = load_spec(data).to_dict()
    assert canonical == SMALL
    assert list(canonical) == ["name", "input", "layers", "loss"]
    assert list(canonical["layers"][1]) == ["size", "activation"]
    custom = load_spec("custom_mish").to_dict()["layers"][0]["activation"]
    assert custom == {"name": "mish", "expr": "z*tanh(log(1 + exp(z)))"}


def test_integer_parameters_become_floats() -> None:
    data = copy.deepcopy(SMALL)
    data["layers"][0]["activation"] = {"name": "elu", "alpha": 2}
    spec = load_spec(data)
    assert spec.layers[0].activation.params == (("alpha", 2.0),)
    assert spec.to_dict()["layers"][0]["activation"] == {"name": "elu", "alpha": 2.0}


def test_digest_is_stable() -> None:
    spec = load_spec(SMALL)
    assert spec.digest() == "617e327019d3"  # canonical JSON of SMALL; changes only on purpose
    assert load_spec(copy.deepcopy(SMALL)).digest() == spec.digest()
    changed = copy.deepcopy(SMALL)
    changed["layers"][0]["size"] = 4
    assert load_spec(changed).digest() != spec.digest()


def test_digest_ignores_the_source(tmp_path: Path) -> None:
    path = tmp_path / "xor.json"
    path.write_text(json.dumps(load_spec("xor").to_dict(), indent=2))
    assert load_spec(path).digest() == load_spec("xor").digest()
    assert load_spec(str(path)).source == str(path)


def test_specs_are_immutable() -> None:
    spec = load_spec("xor")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    assert isinstance(spec.layers, tuple) and isinstance(spec.example, ExampleSpec)
    hash(spec)


# --- sources: files, JSON, names ------------------------------------------------------------


def test_json_files_load(tmp_path: Path) -> None:
    data = copy.deepcopy(SMALL)
    data["layers"][0]["activation"]["alpha"] = 1e-3  # json writes 0.001; check an exponent too
    text = json.dumps(data).replace("0.001", "1e-3")
    assert "1e-3" in text
    spec = load_spec(write(tmp_path, text, "small.json"))
    assert spec.layers[0].activation.params == (("alpha", 0.001),)


def test_yaml_reads_exponent_floats(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: n
        input: 1
        layers:
          - {size: 1, activation: {name: leaky_relu, alpha: 1e-3}}
        loss: mse
        """,
    )
    assert load_spec(path).layers[0].activation.params == (("alpha", 0.001),)


def test_a_file_named_like_an_example_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xor").write_text("name: x\n")
    with pytest.raises(DeriveError, match=r"must end in \.yaml, \.yml or \.json"):
        load_spec("xor")


def test_missing_file_lists_the_examples(tmp_path: Path) -> None:
    with pytest.raises(DeriveError, match="built-in examples: bce, custom_mish"):
        load_spec("no_such_example")
    with pytest.raises(DeriveError, match="no such file") as info:
        load_spec(tmp_path / "missing.yaml")
    assert info.value.source == str(tmp_path / "missing.yaml")
    with pytest.raises(DeriveError, match="no built-in example 'nope'"):
        example_path("nope")


# --- bad input: each case is a YAML file; the dict case is the same document loaded ---------

GOOD_YAML = """
name: net
input: 2
layers:
  - size: 3
    activation: tanh
  - size: 1
    activation: sigmoid
loss: mse
"""

# (id, document, field path, line of that field, fragment of the message)
# fmt: off
BAD: list[tuple[str, str, str | None, int, str]] = [
    ("unknown-top", GOOD_YAML + "colour: red\n", "colour", 9,
     "allowed: name, input, layers, loss, regularization, example"),
    ("missing-loss", GOOD_YAML.replace("loss: mse\n", ""), "loss", 1,
     "missing required field 'loss'"),
    ("missing-name", GOOD_YAML.replace("name: net\n", ""), "name", 1, "required: name, input"),
    ("name-not-identifier", GOOD_YAML.replace("name: net", "name: my net"), "name", 1,
     "[A-Za-z_][A-Za-z0-9_]*"),
    ("name-starts-with-digit", GOOD_YAML.replace("name: net", "name: '2net'"), "name", 1,
     "identifier"),
    ("name-number", GOOD_YAML.replace("name: net", "name: 3"), "name", 1, "identifier"),
    ("input-zero", GOOD_YAML.replace("input: 2", "input: 0"), "input", 2, "positive integer"),
    ("input-negative", GOOD_YAML.replace("input: 2", "input: -2"), "input", 2,
     "positive integer"),
    ("input-fraction", GOOD_YAML.replace("input: 2", "input: 2.5"), "input", 2,
     "positive integer"),
    ("input-bool", GOOD_YAML.replace("input: 2", "input: true"), "input", 2, "a boolean"),
    ("input-string", GOOD_YAML.replace("input: 2", "input: '2'"), "input", 2,
     "positive integer"),
    ("layers-empty", "name: net\ninput: 2\nlayers: []\nloss: mse\n", "layers", 3,
     "non-empty list"),
    ("layers-mapping", "name: net\ninput: 2\nlayers: {size: 1}\nloss: mse\n", "layers", 3,
     "non-empty list"),
    ("size-zero", GOOD_YAML.replace("size: 1", "size: 0"), "layers[1].size", 6,
     "positive integer"),
    ("size-bool", GOOD_YAML.replace("size: 3", "size: false"), "layers[0].size", 4,
     "positive integer"),
    ("layer-unknown-field", GOOD_YAML.replace("size: 3", "size: 3\n    units: 3"),
     "layers[0].units", 5,
     ("unknown field 'units' in a dense layer; allowed: op, name, input, inputs, size, "
      "activation, bias")),
    ("layer-missing-size", GOOD_YAML.replace("  - size: 3\n    activation", "  - activation"),
     "layers[0].size", 4, "missing required field 'size' in a dense layer"),
    ("layer-not-mapping", GOOD_YAML.replace("  - size: 1\n    activation: sigmoid", "  - 7"),
     "layers[1]", 6, "must be a mapping"),
    ("bias-not-bool", GOOD_YAML.replace("size: 3", "size: 3\n    bias: 'no'"),
     "layers[0].bias", 5, "true or false"),
    ("bias-int", GOOD_YAML.replace("size: 3", "size: 3\n    bias: 1"), "layers[0].bias", 5,
     "true or false"),
    ("unknown-activation", GOOD_YAML.replace("activation: tanh", "activation: swish"),
     "layers[0].activation", 5, "known: identity, sigmoid, tanh, relu"),
    ("activation-list", GOOD_YAML.replace("activation: tanh", "activation: [tanh]"),
     "layers[0].activation", 5, "name of a built-in activation"),
    ("unknown-activation-mapping",
     GOOD_YAML.replace("activation: tanh", "activation: {name: swish, beta: 1}"),
     "layers[0].activation.name", 5, "known: identity"),
    ("activation-missing-name", GOOD_YAML.replace("activation: tanh", "activation: {alpha: 1}"),
     "layers[0].activation.name", 5, "missing required field 'name'"),
    ("unknown-parameter",
     GOOD_YAML.replace("activation: tanh", "activation:\n      name: leaky_relu\n      beta: 2"),
     "layers[0].activation.beta", 7, "no parameter 'beta'; allowed: alpha"),
    ("parameter-of-paramless",
     GOOD_YAML.replace("activation: tanh", "activation: {name: tanh, alpha: 2}"),
     "layers[0].activation.alpha", 5, "allowed: none"),
    ("parameter-string",
     GOOD_YAML.replace("activation: tanh", "activation:\n      name: elu\n      alpha: big"),
     "layers[0].activation.alpha", 7, "finite number"),
    ("parameter-bool",
     GOOD_YAML.replace("activation: tanh", "activation: {name: elu, alpha: true}"),
     "layers[0].activation.alpha", 5, "finite number"),
    ("parameter-infinite",
     GOOD_YAML.replace("activation: tanh", "activation: {name: elu, alpha: .inf}"),
     "layers[0].activation.alpha", 5, "finite number"),
    ("custom-name-not-identifier",
     GOOD_YAML.replace("activation: tanh", "activation: {name: my-act, expr: z}"),
     "layers[0].activation.name", 5, "identifier"),
    ("custom-shadows-builtin",
     GOOD_YAML.replace("activation: tanh", "activation: {name: relu, expr: 'Max(z, 0)'}"),
     "layers[0].activation.name", 5, "'relu' is a built-in activation"),
    ("custom-unknown-field",
     GOOD_YAML.replace("activation: tanh", "activation: {name: f, expr: z, alpha: 1}"),
     "layers[0].activation.alpha", 5, "allowed: name, expr"),
    ("custom-expr-import",
     GOOD_YAML.replace(
         "activation: tanh",
         "activation:\n      name: evil\n      expr: \"__import__('os')\"",
     ),
     "layers[0].activation.expr", 7, "not allowed"),
    ("custom-expr-wrong-variable",
     GOOD_YAML.replace("activation: tanh", "activation: {name: f, expr: 'a*z'}"),
     "layers[0].activation.expr", 5, "unknown name 'a'"),
    ("custom-expr-syntax",
     GOOD_YAML.replace("activation: tanh", "activation: {name: f, expr: 'z +'}"),
     "layers[0].activation.expr", 5, "cannot parse"),
    ("custom-expr-not-string",
     GOOD_YAML.replace("activation: tanh", "activation: {name: f, expr: 3}"),
     "layers[0].activation.expr", 5, "expression string"),
    ("softmax-hidden", GOOD_YAML.replace("activation: tanh", "activation: softmax"),
     "layers[0].activation", 5, "softmax is allowed on the last layer only"),
    ("cross-entropy-without-softmax", GOOD_YAML.replace("loss: mse", "loss: cross_entropy"),
     "loss", 8,
     "cross-entropy needs a probability vector output: make the last layer softmax"),
    ("bce-identity-output",
     GOOD_YAML.replace("activation: sigmoid", "activation: identity").replace(
         "loss: mse", "loss: binary_cross_entropy"),
     "loss", 8, "needs outputs in (0, 1)"),
    ("bce-custom-output",
     GOOD_YAML.replace("activation: sigmoid", "activation: {name: s, expr: '1/(1+exp(-z))'}")
     .replace("loss: mse", "loss: binary_cross_entropy"),
     "loss", 8, "not known to stay in (0, 1)"),
    ("unknown-loss", GOOD_YAML.replace("loss: mse", "loss: hinge"), "loss", 8,
     "known: mse, cross_entropy, binary_cross_entropy"),
    ("loss-number", GOOD_YAML.replace("loss: mse", "loss: 2"), "loss", 8, "built-in loss"),
    ("loss-unknown-field",
     GOOD_YAML.replace("loss: mse", "loss: {name: l, expr: 'a - y', weight: 2}"),
     "loss.weight", 8, "allowed: name, expr"),
    ("loss-param", GOOD_YAML.replace("loss: mse", "loss: {name: mse, weight: 2}"),
     "loss.weight", 8, "has no parameter 'weight'"),
    ("custom-loss-shadows", GOOD_YAML.replace("loss: mse", "loss: {name: mse, expr: 'a - y'}"),
     "loss.name", 8, "'mse' is a built-in loss"),
    ("custom-loss-wrong-variable",
     GOOD_YAML.replace("loss: mse", "loss:\n  name: l\n  expr: (z - y)**2"),
     "loss.expr", 10, "unknown name 'z'"),
    ("example-not-mapping", GOOD_YAML + "example: [1, 2]\n", "example", 9, "must be a mapping"),
    ("example-unknown-field", GOOD_YAML + "example:\n  z: [1]\n", "example.z", 10,
     "allowed: x, y, params"),
    ("example-x-length", GOOD_YAML + "example:\n  x: [1.0]\n", "example.x", 10,
     "list of 2 numbers"),
    ("example-y-not-number", GOOD_YAML + "example:\n  y: [yes]\n", "example.y[0]", 10,
     "finite number"),
    ("example-x-nan", GOOD_YAML + "example:\n  x:\n    - 1.0\n    - .nan\n", "example.x[1]",
     12, "finite number"),
    ("example-params-matrix-shape", GOOD_YAML + "example:\n  params: {W1: [[1, 2]]}\n",
     "example.params.W1", 10,
     "a matrix of 3 x 2: a list of 3 rows of 2 numbers (W1 has shape n_1 x n_in)"),
]

_PARAMS_OK = """\
example:
  params:
    W1: [[1, 2], [3, 4], [5, 6]]
    b1: [1, 2, 3]
    W2: [[1, 2, 3]]
    b2: [1]
"""
BAD += [
    ("example-params-extra", GOOD_YAML + _PARAMS_OK + "    W3: [[1]]\n",
     "example.params.W3", 15, "expected exactly: W1, b1, W2, b2"),
    ("example-params-missing-bias", GOOD_YAML + _PARAMS_OK.replace("    b2: [1]\n", ""),
     "example.params.b2", 10, "missing; params must give all of: W1, b1, W2, b2"),
    ("example-params-bias-without-bias",
     GOOD_YAML.replace("size: 1", "size: 1\n    bias: false") + _PARAMS_OK,
     "example.params.b2", 15, "expected exactly: W1, b1, W2"),
    ("example-params-row-length", GOOD_YAML + _PARAMS_OK.replace("[3, 4]", "[3, 4, 5]"),
     "example.params.W1[1]", 11, "list of 2 numbers"),
    ("example-params-bias-length", GOOD_YAML + _PARAMS_OK.replace("b1: [1, 2, 3]", "b1: [1]"),
     "example.params.b1", 12, "list of 3 numbers"),
]
# fmt: on


@pytest.mark.parametrize(
    ("document", "field", "line", "fragment"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_file_names_file_line_and_field(
    tmp_path: Path, document: str, field: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, document)
    with pytest.raises(DeriveError) as info:
        load_spec(path)
    err = info.value
    assert (err.source, err.field, err.line) == (str(path), field, line)
    assert str(err).startswith(f"{path}:{line}: {field}: ")
    assert fragment in err.message


@pytest.mark.parametrize(
    ("document", "field", "fragment"),
    [(case[1], case[2], case[4]) for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_dict_names_the_field(document: str, field: str, fragment: str) -> None:
    with pytest.raises(DeriveError) as info:
        load_spec(yaml.safe_load(document))
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in info.value.message
    assert info.value.source is None and info.value.line is None


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("- name: net\n", "must be a mapping"),
        ("just text\n", "must be a mapping"),
        ("", "an empty document"),
        ("# only a comment\n", "an empty document"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, document: str, fragment: str) -> None:
    path = write(tmp_path, document) if document else tmp_path / "spec.yaml"
    path.touch()
    with pytest.raises(DeriveError, match=fragment) as info:
        load_spec(path)
    assert info.value.field is None
    assert str(info.value).startswith(str(path))


def test_malformed_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "name: net\ninput: 2\nlayers: [\n  {size: 1\nloss: mse\n")
    with pytest.raises(DeriveError) as info:
        load_spec(path)
    assert "malformed YAML" in info.value.message
    assert info.value.line is not None
    assert f"line {info.value.line}, column" in info.value.message
    assert str(info.value).startswith(f"{path}:{info.value.line}: ")


def test_malformed_json_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "name": "net",\n  "input": 2,,\n}\n', "spec.json")
    with pytest.raises(DeriveError) as info:
        load_spec(path)
    assert info.value.message.startswith("malformed JSON")
    assert info.value.line == 3
    assert "(line 3, column 14)" in info.value.message


def test_json_errors_have_lines(tmp_path: Path) -> None:
    data = copy.deepcopy(SMALL)
    data["layers"][1]["size"] = 0
    path = write(tmp_path, json.dumps(data, indent=2), "spec.json")
    with pytest.raises(DeriveError) as info:
        load_spec(path)
    expected = next(
        number
        for number, text in enumerate(path.read_text().splitlines(), start=1)
        if '"size": 0' in text
    )
    assert (info.value.field, info.value.line) == ("layers[1].size", expected)


@pytest.mark.parametrize(
    ("document", "filename", "line"),
    [
        ("name: a\ninput: 2\nname: b\n", "spec.yaml", 3),
        ("name: a\nlayers:\n  - size: 1\n    size: 2\n", "spec.yaml", 4),
        ('{"name": "a",\n "name": "b"}', "spec.json", 2),
    ],
)
def test_duplicate_keys_are_errors(tmp_path: Path, document: str, filename: str, line: int) -> None:
    path = write(tmp_path, document, filename)
    with pytest.raises(DeriveError, match="duplicate key") as info:
        load_spec(path)
    assert info.value.line == line


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(DeriveError, match="malformed YAML"):
        load_spec(path)


def test_recursive_yaml_alias_is_handled(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_YAML + "example:\n  y: &a [*a]\n")
    with pytest.raises(DeriveError, match="finite number") as info:
        load_spec(path)
    assert info.value.field == "example.y[0]"


# --- the JSON Schema agrees with the validator ---------------------------------------------


def _variant(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(SMALL)
    for key, value in changes.items():
        if key.startswith("layer0_"):
            data["layers"][0][key.removeprefix("layer0_")] = value
        elif key.startswith("layer1_"):
            data["layers"][1][key.removeprefix("layer1_")] = value
        else:
            data[key] = value
    return data


def _without(key: str) -> dict[str, Any]:
    data = copy.deepcopy(SMALL)
    del data[key]
    return data


#: A spec v2 graph: names, `input`, `inputs`, the ops beyond dense, regularization.
GRAPH: dict[str, Any] = {
    "name": "graph",
    "input": 3,
    "layers": [
        {"size": 4, "activation": "tanh", "name": "h"},           # 1
        {"op": "layer_norm", "eps": 1e-3},                        # 2
        {"op": "dropout", "rate": 0.25},                          # 3
        {"op": "add", "inputs": ["h", 3], "name": "sum"},         # 4
        {"op": "activation", "activation": "relu"},               # 5
        {"op": "dense", "size": 2, "activation": "softmax", "bias": False},  # 6
    ],
    "loss": "cross_entropy",
    "regularization": {"l2": 1e-3, "l1": 1e-4},
}
DROP = object()  # a field to remove


def _graph(index: int | None = None, **fields: Any) -> dict[str, Any]:
    """GRAPH with fields of layer ``index`` (0-based) set, or removed by DROP; without an
    index, top-level fields."""
    data = copy.deepcopy(GRAPH)
    target = data if index is None else data["layers"][index]
    for key, value in fields.items():
        if value is DROP:
            del target[key]
        else:
            target[key] = value
    return data


_GRAPH_PARAMS = {
    "W1": [[1, 2, 3]] * 4, "b1": [0, 1, 2, 3], "gamma2": [1, 1, 1, 1], "beta2": [0, 0, 0, 0],
    "W6": [[1, 2, 3, 4], [5, 6, 7, 8]],
}


GOOD_DICTS: list[dict[str, Any]] = [
    *(load_spec(name).to_dict() for name in EXAMPLES),
    SMALL,
    _variant(loss="mse", layer1_activation={"name": "sigmoid"}),
    _variant(layer0_activation={"name": "elu"}, layer0_bias=True),
    _variant(layer0_activation={"name": "gelu_tanh", "expr": "z*tanh(z)"}),
    _variant(loss={"name": "logcosh", "expr": "log(cosh(a - y))"}),
    _variant(loss={"name": "mse"}),
    _variant(input=3.0),
    _variant(example={}),
    _variant(example={"x": [0.5, -1], "y": [1]}),
    _variant(example={"params": {"W1": [[1, 2], [3, 4], [5, 6]], "W2": [[1, 2, 3]], "b2": [0]}}),
    # spec v2
    GRAPH,
    _graph(1, eps=DROP),                                    # eps has a default
    _graph(0, activation=DROP),                             # identity
    _graph(0, input="input"),
    _graph(0, input=0),
    _graph(1, input="h"),
    _graph(1, inputs=["h"]),                                # a one-item list is one input
    _graph(3, inputs=[1, 3]),                               # layer numbers
    _graph(3, inputs=[1, 3.0]),                             # an integral float is an integer
    {**_graph(3, inputs=["input", 3]), "input": 4},         # the network input, by name
    _graph(regularization={}),
    _graph(regularization={"l2": 0}),
    _graph(regularization={"l1": 0.5}),
    _graph(regularization=DROP),
    _graph(example={"x": [1, 2, 3], "y": [0.5, 0.5], "params": _GRAPH_PARAMS}),
]

STRUCTURALLY_BAD: list[Any] = [
    [SMALL],
    "a string",
    None,
    _without("name"),
    _without("input"),
    _without("layers"),
    _without("loss"),
    _variant(extra=1),
    _variant(name="my net"),
    _variant(name="2net"),
    _variant(name=""),
    _variant(name=7),
    _variant(input=0),
    _variant(input=-1),
    _variant(input=1.5),
    _variant(input=True),
    _variant(input="2"),
    _variant(layers=[]),
    _variant(layers={"size": 1}),
    _variant(layer0_size=0),
    _variant(layer0_size=None),
    _variant(layer0_units=3),
    _variant(layer0_bias="yes"),
    _variant(layer0_bias=0),
    _variant(layer0_activation="swish"),
    _variant(layer0_activation=None),
    _variant(layer0_activation=["relu"]),
    _variant(layer0_activation={"name": "swish"}),
    _variant(layer0_activation={"alpha": 0.1}),
    _variant(layer0_activation={"name": "leaky_relu", "beta": 0.1}),
    _variant(layer0_activation={"name": "leaky_relu", "alpha": "0.1"}),
    _variant(layer0_activation={"name": "leaky_relu", "alpha": True}),
    _variant(layer0_activation={"name": "relu", "alpha": 0.1}),
    _variant(layer0_activation={"name": "relu", "expr": "Max(z, 0)"}),
    _variant(layer0_activation={"name": "my-act", "expr": "z"}),
    _variant(layer0_activation={"name": "f", "expr": 3}),
    _variant(layer0_activation={"name": "f", "expr": "  "}),
    _variant(layer0_activation={"name": "f", "expr": "z", "alpha": 1}),
    _variant(loss="hinge"),
    _variant(loss=None),
    _variant(loss={"name": "hinge"}),
    _variant(loss={"name": "mse", "weight": 1}),
    _variant(loss={"name": "mse", "expr": "a - y"}),
    _variant(loss={"expr": "a - y"}),
    _variant(example=[1, 2]),
    _variant(example=None),
    _variant(example={"z": [1]}),
    _variant(example={"x": None}),
    _variant(example={"x": [1, "2"]}),
    _variant(example={"x": [True, 1]}),
    _variant(example={"params": {"W0": [[1, 2]]}}),
    _variant(example={"params": {"w1": [[1, 2]]}}),
    _variant(example={"params": {"W1": [1, 2]}}),
    _variant(example={"params": {"b1": [[1]]}}),
    _variant(example={"params": []}),
    # spec v2: ops, names, input/inputs, attribute values, regularization
    _graph(1, op="conv9"),                                  # unknown op
    _graph(1, op=3),
    _graph(1, op=None),
    _graph(0, name="input"),                                # the network input's name
    _graph(0, name="my layer"),
    _graph(0, name=3),
    _graph(0, input="input", inputs=["input"]),             # both
    _graph(0, input=-1),
    _graph(0, input=True),
    _graph(0, input=1.5),
    _graph(0, input=None),
    _graph(0, input=["input"]),
    _graph(0, input="an input"),
    _graph(3, inputs=[3]),                                  # add with one input
    _graph(3, inputs=DROP),                                 # add reads only the previous layer
    _graph(3, inputs=[]),
    _graph(3, inputs="h"),
    _graph(3, inputs=["h", "h"]),                           # the same layer twice
    _graph(3, inputs=["h", {"layer": 3}]),
    _graph(4, inputs=[4, 3]),                               # an activation reads one input
    _graph(5, inputs=[5, "input"]),                         # a dense layer reads one input
    _graph(3, size=4),                                      # add has no size
    _graph(3, activation="relu"),                           # nor an activation
    _graph(1, activation="relu"),                           # layer_norm has none either
    _graph(1, rate=0.5),
    _graph(1, eps=0),                                       # eps > 0
    _graph(1, eps=-1e-5),
    _graph(1, eps="small"),
    _graph(1, eps=True),
    _graph(2, rate=1.0),                                    # rate in [0, 1)
    _graph(2, rate=-0.1),
    _graph(2, rate=True),
    _graph(2, rate=DROP),                                   # required
    _graph(4, activation=DROP),                             # required
    _graph(4, activation="swish"),
    _graph(5, size=0),
    _graph(5, size=DROP),
    _graph(5, bias=None),
    _graph(regularization={"l2": -1e-3}),
    _graph(regularization={"l1": -1}),
    _graph(regularization={"l3": 1e-3}),
    _graph(regularization={"l2": "1e-3"}),
    _graph(regularization={"l2": True}),
    _graph(regularization=[1e-3]),
    _graph(regularization=None),
    _graph(example={"params": {"gamma0": [1]}}),
    _graph(example={"params": {"gamma2": [[1]]}}),
    _graph(example={"params": {"delta2": [1]}}),
]

# Valid structure, broken rules that need more than one field or a parser: spec.py only.
SEMANTICALLY_BAD: list[dict[str, Any]] = [
    _variant(layer0_activation="softmax"),
    _variant(loss="cross_entropy"),
    _variant(layer1_activation="relu"),  # binary cross-entropy with an unbounded output
    _variant(layer0_activation={"name": "f", "expr": "__import__('os')"}),
    _variant(loss={"name": "l", "expr": "z - y"}),
    _variant(example={"x": [1.0]}),
    _variant(example={"params": {"W1": [[1, 2]]}}),
    _variant(example={"x": [1, float("nan")]}),
    # spec v2: references need the order of the layers, widths and names need several fields
    _graph(3, inputs=["h", 5]),                             # a later layer (no cycles)
    _graph(3, inputs=["h", 4]),                             # itself
    _graph(0, input=1),                                     # the first layer reads itself
    _graph(3, inputs=["h", "nope"]),                        # no such name
    _graph(3, inputs=["h", "sum"]),                         # its own name
    _graph(3, inputs=["h", 1]),                             # one layer, by name and number
    _graph(3, inputs=["input", 3]),                         # widths 3 and 4
    _graph(3, inputs=["h", 2]),                             # layer 3 is never read
    _graph(4, name="h"),                                    # a name given twice
    _graph(4, activation="softmax"),                        # softmax before the last layer
    _graph(5, activation="relu"),                           # cross-entropy without softmax
    _graph(example={"params": {k: v for k, v in _GRAPH_PARAMS.items() if k != "beta2"}}),
    _graph(example={"params": {**_GRAPH_PARAMS, "b6": [1, 2]}}),   # layer 6 has no bias
    _graph(example={"y": [1, 2, 3]}),                       # the output has width 2
]


def _schema_accepts(data: Any) -> bool:
    return jsonschema.Draft202012Validator(spec_schema()).is_valid(data)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(spec_schema())
    assert spec_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_follows_the_registries() -> None:
    activation = spec_schema()["$defs"]["activation"]
    assert activation["anyOf"][0]["enum"] == list(functions.ACTIVATIONS)
    loss = spec_schema()["properties"]["loss"]
    assert loss["anyOf"][0]["enum"] == list(functions.LOSSES)
    for name, entry in functions.ACTIVATIONS.items():
        for param, default in entry.params:
            data = _variant(layer0_activation={"name": name, param: default + 1})
            data["loss"] = "mse"
            assert _schema_accepts(data)
            assert load_spec(data).activation(1).params == ((param, default + 1),)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_file_validates_against_the_schema(name: str) -> None:
    data = yaml.safe_load(example_path(name).read_text(encoding="utf-8"))
    jsonschema.validate(data, spec_schema(), cls=jsonschema.Draft202012Validator)
    jsonschema.validate(load_spec(name).to_dict(), spec_schema(),
                        cls=jsonschema.Draft202012Validator)


def test_schema_lists_the_top_fields_and_ops_of_the_spec() -> None:
    schema = spec_schema()
    assert list(schema["properties"]) == list(TOP_FIELDS)
    assert schema["$defs"]["layer"]["properties"]["op"]["anyOf"][0]["enum"] == list(OPS)
    assert {key for key in schema["$defs"] if key.startswith("op.")} == {
        *(f"op.{n}" for n in OPS), "op.custom"}


@pytest.mark.parametrize("name", list(OPS))
def test_schema_describes_each_op_from_the_registry(name: str) -> None:
    definition = OPS[name]
    layer = spec_schema()["$defs"][f"op.{name}"]
    attributes = [attribute.name for attribute in definition.attributes]
    assert list(layer["properties"]) == [*LAYER_COMMON_FIELDS, *attributes]
    assert layer["additionalProperties"] is False
    required = {attribute.name for attribute in definition.attributes if attribute.required}
    assert required <= set(layer.get("required", ()))
    for attribute in definition.attributes:
        field = layer["properties"][attribute.name]
        assert ATTRIBUTE_KINDS[attribute.kind]().items() <= field.items()
        assert field.get("default") == attribute.default
    low, high = definition.inputs
    inputs = layer["properties"]["inputs"]
    assert inputs["minItems"] == max(low, 1) and inputs.get("maxItems") == high


def test_example_parameter_keys_follow_the_op_registry() -> None:
    ranks = parameter_ranks()
    assert set(ranks) <= set(PARAMETER_KEYS.values())
    assert ranks["W"] == (2, 4) and ranks["b"] == (1,) and ranks["gamma"] == (1,)
    patterns = spec_schema()["properties"]["example"]["properties"]["params"]
    assert set(patterns["patternProperties"]) == {
        *(f"^{key}[1-9][0-9]*$" for key in ranks),
        "^[A-Za-z_]([A-Za-z0-9_]*[A-Za-z_])?[1-9][0-9]*$"}   # a custom op's parameters


@pytest.mark.parametrize("data", GOOD_DICTS, ids=range(len(GOOD_DICTS)))
def test_good_specs_pass_schema_and_validator(data: dict[str, Any]) -> None:
    jsonschema.validate(data, spec_schema(), cls=jsonschema.Draft202012Validator)
    load_spec(data)


@pytest.mark.parametrize("data", STRUCTURALLY_BAD, ids=range(len(STRUCTURALLY_BAD)))
def test_structural_errors_fail_schema_and_validator(tmp_path: Path, data: Any) -> None:
    assert not _schema_accepts(data)
    path = tmp_path / "spec.json"  # a file, so that a top level that is no mapping is possible
    path.write_text(json.dumps(data))
    with pytest.raises(DeriveError):
        load_spec(path)
    if isinstance(data, dict):
        with pytest.raises(DeriveError):
            load_spec(data)


@pytest.mark.parametrize("data", SEMANTICALLY_BAD, ids=range(len(SEMANTICALLY_BAD)))
def test_semantic_errors_are_the_validators_alone(data: dict[str, Any]) -> None:
    assert _schema_accepts(data)
    with pytest.raises(DeriveError):
        load_spec(data)


def test_sequence_examples_are_instances_of_their_tasks():
    """The built-in sequence examples' worked examples are what their demos train on: one
    adding problem (the target half the sum of the two marked values), one sine wave (the
    target the next value scaled into [0, 1]) and one noisy tone (of its target's frequency,
    0.3 + 0.2 k for class k, as the demo draws them)."""
    adding = load_spec("lstm_adding").example
    x = np.array(adding.x)
    assert sorted(x[:, 1]) == [0] * 18 + [1, 1] and 0 <= x[:, 0].min() < x[:, 0].max() < 1
    assert adding.y == pytest.approx([float(x[:, 0] @ x[:, 1]) / 2])
    sine = load_spec("rnn_sine").example
    x, y = np.array(sine.x)[:, 0], np.array(sine.y)[:, 0]
    steps = np.arange(1, len(x) + 2)
    assert np.array_equal(x, np.round(np.sin(0.4 * steps[:-1] - 0.1), 1))
    assert y == pytest.approx((np.round(np.sin(0.4 * steps[1:] - 0.1), 1) + 1) / 2)
    tones = load_spec("gru_tones")
    x, y = np.array(tones.example.x)[:, 0], np.array(tones.example.y)
    steps = np.arange(1, tones.length + 1)
    misfit = []
    for k in range(len(y)):                      # least squares over a sin + b cos + c
        basis = np.stack([np.sin((0.3 + 0.2 * k) * steps), np.cos((0.3 + 0.2 * k) * steps),
                          np.ones(len(steps))], axis=1)
        misfit.append(np.linalg.lstsq(basis, x, rcond=None)[1][0])
    assert sorted(y) == [0.0, 0.0, 1.0] and int(np.argmin(misfit)) == int(np.argmax(y))


#: how many blocks each recurrent op stacks in its weights (a new one must say here)
STACKED = {"rnn": "", "lstm": "4 ", "gru": "3 "}


@pytest.mark.parametrize("op", [name for name, op in OPS.items()
                                if op.attribute("return") is not None])
def test_a_recurrent_example_parameter_of_the_wrong_shape_says_its_stacked_shape(op):
    # an LSTM's Wx1 stacks its four gates: 4 n_1 x n_in, not n_1 x n_in; a vector the same
    stacked = STACKED[op]
    layer = {"op": op, "size": 2, "return": "last"}
    data = {"name": "seq", "input": {"size": 3, "length": 2}, "layers": [layer], "loss": "mse"}
    rows = {"": 2, "4 ": 8, "3 ": 6}[stacked]
    params = {key: np.zeros(shape).tolist()
              for key, shape in load_spec(data).parameter_shapes().items()}
    params["Wx1"] = [[0.0] * 3]
    with pytest.raises(DeriveError) as wrong:
        load_spec({**data, "example": {"params": params}})
    assert (f"example.params.Wx1: must be a matrix of {rows} x 3: a list of {rows} rows of 3 "
            f"numbers (Wx1 has shape {stacked}n_1 x n_in)") in str(wrong.value)
    bias = "b1" if op != "gru" else "bx1"
    params = {**params, "Wx1": np.zeros((rows, 3)).tolist(), bias: [0.0]}
    with pytest.raises(DeriveError) as wrong:
        load_spec({**data, "example": {"params": params}})
    assert f"a list of {rows} numbers ({bias} has length {stacked}n_1)" in str(wrong.value)


@pytest.mark.parametrize(("about", "fragment"), [
    ("", "must be a non-empty text"),
    (3, "must be a non-empty text saying what the example is, got 3"),
    ("two\nlines", "must be one line of at most 500 printable characters"),
    ("x" * 501, "must be one line of at most 500 printable characters"),
    ({}, "got an empty mapping"),
    ({"english": "a"}, "example.about.english: must be a two-letter language code"),
    ({"en": ""}, "example.about.en: must be a non-empty text"),
])
def test_a_bad_example_about_is_one_line(about, fragment):
    data = {"name": "n", "input": 2, "layers": [{"size": 1}], "loss": "mse",
            "example": {"about": about}}
    with pytest.raises(DeriveError) as bad:
        load_spec(data)
    assert fragment in str(bad.value) and "\n" not in str(bad.value)


def test_an_example_about_is_kept_per_language_and_in_the_canonical_spec():
    data = {"name": "n", "input": 2, "layers": [{"size": 1}], "loss": "mse",
            "example": {"about": {"en": "one sample", "zh": "一个样本"}}}
    example = load_spec(data).example
    assert (example.about_in("en"), example.about_in("zh"), example.about_in("de")) == (
        "one sample", "一个样本", "one sample")
    assert example.to_data() == {"about": {"en": "one sample", "zh": "一个样本"}}
    one = load_spec({**data, "example": {"about": " the same in every language "}}).example
    assert one.about_in("zh") == "the same in every language" and one.given == ()
    assert one.to_data() == {"about": "the same in every language"}

"""derive.render.latex_text: every justification the derivation can record has words in every language.

The derivation records a short English ``why`` on each step; the documents show the words of
:data:`derive.latex_text.WHY` (or a pattern of :data:`WHY_PATTERNS`) instead. The networks
below between them use every op, every activation in a hidden and in the output layer, every
loss, both penalties, a layer without bias and a one-layer network.
"""

from __future__ import annotations

import pytest

from derive.derivation.reverse import derive
from derive.graph.model import build_model
from derive.registry.functions import ACTIVATIONS, LOSSES
from derive.render.latex_text import LANGUAGES, TEXT, WHY, WHY_PATTERNS, WHY_PREFIX, why
from derive.spec.load import list_examples, load_spec
from tests.test_latex_graphs import SPECS

ELEMENTWISE = [name for name in ACTIVATIONS if name != "softmax"]


def coverage_specs() -> dict[str, object]:
    """Built-in examples, the graphs of test_latex_graphs, every activation as hidden and as
    output layer, every loss."""
    specs: dict[str, object] = {name: name for name, _ in list_examples()}
    specs.update(SPECS)
    specs["hidden"] = {"name": "hidden", "input": 2, "loss": "mse",
                       "layers": [{"size": 2, "activation": a} for a in ELEMENTWISE]}
    for loss in LOSSES:
        output = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}.get(loss)
        for activation in [output] if output else list(ACTIVATIONS):
            specs[f"{activation}_{loss}"] = {
                "name": "out", "input": 2, "loss": loss,
                "layers": [{"size": 2, "activation": "tanh"},
                           {"size": 2, "activation": activation}]}
    return specs


@pytest.fixture(scope="module")
def steps():
    out = {}
    for name, spec in coverage_specs().items():
        derivation = derive(build_model(load_spec(spec)))
        found = [step for formula in derivation.formulas for step in formula.steps]
        found += [step for d in derivation.activation_derivatives if d for step in d.steps]
        out[name] = found
    return out


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_justification_has_words(steps, lang):
    missing = sorted({(name, step.why) for name, found in steps.items() for step in found
                      if why(step.why, lang) is None})
    assert not missing, f"add these justifications to derive.latex_text.WHY: {missing}"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_rule_has_a_name(steps, lang):
    rules = {step.rule for found in steps.values() for step in found}
    assert {rule for rule in rules if f"rule_{rule}" not in TEXT[lang]} == set()


def test_translations_are_complete():
    for words in [*WHY.values(), *WHY_PREFIX.values(), *(w for _, w in WHY_PATTERNS)]:
        assert len(words) == len(LANGUAGES) and all(words)
    assert set(TEXT["en"]) == set(TEXT["zh"])
    for key in TEXT["en"]:  # the same fields in both languages
        assert sorted(_fields(TEXT["en"][key])) == sorted(_fields(TEXT["zh"][key])), key


def test_patterns_fill_in_the_layer():
    text = "the error of node 12 is the derivative of the cost with respect to its output"
    assert why(text, "en").startswith("The error of layer 12 ")
    assert why(text, "zh").startswith("第 12 层")
    assert why("no such justification", "en") is None


def _fields(text: str) -> list[str]:
    import string

    return [field for _, field, _, _ in string.Formatter().parse(text) if field]

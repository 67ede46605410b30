"""Shared helpers for the tests: building specs from short descriptions."""

from __future__ import annotations

import itertools

import pytest

from derive.registry.functions import ACTIVATIONS, LOSSES
from derive.spec.load import NetworkSpec, load_spec

ELEMENTWISE = [name for name in ACTIVATIONS if name != "softmax"]
#: Output activations known to lie in (0, 1), as binary cross-entropy needs.
PROBABILITY_OUTPUTS = ["sigmoid", "softmax"]


def make_spec(sizes: list[int], activations: list, loss: object = "mse",
              name: str = "net", bias: bool = True) -> NetworkSpec:
    """A spec from sizes [n_0, ..., n_L], one activation per layer and a loss."""
    layers = [{"size": size, "activation": act, **({} if bias else {"bias": False})}
              for size, act in zip(sizes[1:], activations)]
    return load_spec({"name": name, "input": sizes[0], "layers": layers, "loss": loss})


def valid_output_pairs() -> list[tuple[str, str]]:
    """Every (output activation, loss) pair the spec accepts."""
    pairs = []
    for activation, loss in itertools.product(ACTIVATIONS, LOSSES):
        if loss == "cross_entropy" and activation != "softmax":
            continue
        if loss == "binary_cross_entropy" and activation not in PROBABILITY_OUTPUTS:
            continue
        pairs.append((activation, loss))
    return pairs


@pytest.fixture
def xor_spec() -> NetworkSpec:
    return load_spec("xor")

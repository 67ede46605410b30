"""Hypothesis strategies for graph specs (Contract 1) and matching batches; no ``derive`` import.

:func:`random_dag_specs` draws small valid specs with vector input mixing ``dense``,
``activation``, ``layer_norm``, ``add`` (skip connections and parallel branches) and
``dropout``, ending in a dense output layer whose activation suits the loss.
:func:`random_batch` draws an (X, Y) batch valid for a spec's loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from tests.torch_reference import reference_batch

#: Elementwise activations (every built-in but softmax), as names or parameter mappings.
ELEMENTWISE_ACTIVATIONS: tuple[Any, ...] = (
    "identity", "sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu", "silu", "gelu",
    {"name": "leaky_relu", "alpha": 0.2}, {"name": "elu", "alpha": 0.5},
)
HIDDEN_OPS = ("dense", "activation", "layer_norm", "add", "dropout", "branch")


def _ref(draw: st.DrawFn, target: int, layers: list[dict]) -> Any:
    """A reference to node ``target`` (0 = x): its name or its number, drawn at random."""
    if target == 0:
        return draw(st.sampled_from(["input", 0]))
    if draw(st.booleans()):
        layers[target - 1]["name"] = f"h{target}"
        return f"h{target}"
    return target


def _single_input(draw: st.DrawFn, target: int, number: int, layers: list[dict]) -> dict:
    """The input field of a one-input layer: implicit when reading the previous layer."""
    if target == number - 1 and draw(st.booleans()):
        return {}
    return {"input": _ref(draw, target, layers)}


def _one_input_layer(draw: st.DrawFn, op: str, target: int, width: int, number: int,
                     layers: list[dict], size: int | None = None,
                     hidden_softmax: bool = False) -> tuple[dict, int]:
    """A dense / activation / layer_norm / dropout layer reading ``target``; (layer, width)."""
    layer: dict[str, Any] = {}
    if op == "dense":
        width = size if size is not None else draw(st.integers(1, 4))
        if draw(st.booleans()):
            layer["op"] = "dense"
        layer["size"] = width
        act = draw(st.sampled_from((None,) + ELEMENTWISE_ACTIVATIONS))
        if act is not None:
            layer["activation"] = act
        bias = draw(st.sampled_from([None, True, False]))
        if bias is not None:
            layer["bias"] = bias
    elif op == "activation":
        choices = ELEMENTWISE_ACTIVATIONS + (("softmax",) if hidden_softmax and width >= 2 else ())
        layer = {"op": "activation", "activation": draw(st.sampled_from(choices))}
    elif op == "layer_norm":
        layer = {"op": "layer_norm"}
        eps = draw(st.sampled_from([None, 1e-5, 1e-3]))
        if eps is not None:
            layer["eps"] = eps
    else:
        layer = {"op": "dropout", "rate": draw(st.sampled_from([0.0, 0.1, 0.5]))}
    layer.update(_single_input(draw, target, number, layers))
    return layer, width


@st.composite
def random_dag_specs(draw: st.DrawFn, max_layers: int = 6, max_width: int = 4,
                     hidden_softmax: bool = False) -> dict:
    """A valid spec dict: input width 1..max_width, 2..max_layers layers, every layer used.

    Each hidden layer reads the previous one (implicitly or by an explicit name or number),
    except that ``add`` sums the previous layer with 1-2 earlier nodes of the same width (skip
    connections, possibly from x), and a "branch" is a layer that reads an earlier node while
    the previous one waits to be summed with it by the ``add`` that must follow. The last layer
    is dense: softmax + cross_entropy (width >= 2), sigmoid + binary_cross_entropy, or any
    elementwise activation + mse. ``hidden_softmax`` lets hidden ``activation`` layers of width
    >= 2 use softmax too (off by default: the spec may allow softmax on the last layer only).
    """
    n0 = draw(st.integers(1, max_width))
    n_layers = draw(st.integers(2, max_layers))
    widths = [n0]
    layers: list[dict] = []
    pending_add = False  # the previous layer is a branch: this layer must add it to its twin
    for number in range(1, n_layers):
        prev = number - 1
        width = widths[prev]
        if pending_add:
            op = "add"
        else:
            same = [i for i in range(prev) if widths[i] == width]
            ops = ["dense", "activation", "dropout"]
            if width >= 2:
                ops.append("layer_norm")
            if same:
                ops.append("add")
            if number >= 2 and number <= n_layers - 2:  # room for the add that must follow
                ops.append("branch")
            op = draw(st.sampled_from(ops))
        if op == "add":
            same = [i for i in range(prev) if widths[i] == width]
            if pending_add:
                # the branch (prev) and its twin (prev - 1), maybe a third of the same width
                twins = [prev - 1]
                others = [i for i in same if i != prev - 1]
                if others and draw(st.booleans()):
                    twins.append(draw(st.sampled_from(others)))
            else:
                count = draw(st.integers(1, min(2, len(same))))
                twins = draw(st.lists(st.sampled_from(same), min_size=count, max_size=count,
                                      unique=True))
            targets = draw(st.permutations([prev, *twins]))
            layer = {"op": "add", "inputs": [_ref(draw, t, layers) for t in targets]}
            pending_add = False
        elif op == "branch":
            # read an earlier node k != prev; the output must have prev's width
            source = draw(st.integers(0, prev - 1))
            kinds = ["dense"]
            if widths[source] == width:
                kinds += ["activation", "dropout"] + (["layer_norm"] if width >= 2 else [])
            kind = draw(st.sampled_from(kinds))
            layer, _ = _one_input_layer(draw, kind, source, widths[source], number, layers,
                                        size=width, hidden_softmax=hidden_softmax)
            pending_add = True
        else:
            layer, width = _one_input_layer(draw, op, prev, width, number, layers,
                                            hidden_softmax=hidden_softmax)
        layers.append(layer)
        widths.append(width)
    # the output layer
    loss = draw(st.sampled_from(["mse", "cross_entropy", "binary_cross_entropy"]))
    if loss == "cross_entropy":
        size, act = draw(st.integers(2, max(2, max_width))), "softmax"
    elif loss == "binary_cross_entropy":
        size, act = draw(st.integers(1, max_width)), "sigmoid"
    else:
        size, act = draw(st.integers(1, max_width)), draw(st.sampled_from(ELEMENTWISE_ACTIVATIONS))
    out: dict[str, Any] = {"size": size, "activation": act}
    bias = draw(st.sampled_from([None, True, False]))
    if bias is not None:
        out["bias"] = bias
    out.update(_single_input(draw, n_layers - 1, n_layers, layers))
    layers.append(out)
    spec: dict[str, Any] = {"name": "dag", "input": n0, "layers": layers, "loss": loss}
    reg = draw(st.sampled_from([None, {"l2": 0.01}, {"l1": 0.01}, {"l2": 0.05, "l1": 0.02}]))
    if reg is not None:
        spec["regularization"] = reg
    return spec


def random_batch(spec: dict, seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 (X, Y) for a spec, vector or image input: X standard normal; Y valid for the
    spec's loss (:func:`tests.torch_reference.reference_batch`).

    cross_entropy: rows of Y are positive and sum to 1; binary_cross_entropy: entries in
    (0.05, 0.95); mse: standard normal. The stream differs from ``default_rng(seed)``, so the
    batch is not correlated with parameters drawn from the same seed.
    """
    return reference_batch(spec, seed, batch)

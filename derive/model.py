"""Stage 2: the symbolic network built from a :class:`~derive.spec.NetworkSpec`.

For each layer l = 1..L it holds indexed symbols with generic sizes n_l (w^l_{jk}, b^l_j,
z^l_j, a^l_j; a^0 is the input x), the forward expressions

    z^l_j = sum_{k=1}^{n_{l-1}} w^l_{jk} a^{l-1}_k + b^l_j,      a^l_j = sigma_l(z^l_j)

(softmax as a vector function of z^L) and the per-sample loss C = sum_j loss(a^L_j, y_j).
Indices are 1-based, as in the classic notation. Nothing here differentiates anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy as sp

from derive.functions import A, Activation, Loss, Y, Z

if TYPE_CHECKING:
    from derive.spec import NetworkSpec

#: The index symbols used throughout: j (this layer), k (previous layer), i and m (summed).
j, k, i, m = sp.symbols("j k i m", integer=True, positive=True)


def quantity(letter: str, layer: int | None = None) -> sp.IndexedBase:
    """The indexed base of a network quantity, named ``letter^layer`` (``y`` has no layer).

    Printers read the letter and the layer back with :func:`split_name`.
    """
    name = letter if layer is None else f"{letter}^{layer}"
    return sp.IndexedBase(sp.Symbol(name, real=True), real=True)


def split_name(name: str) -> tuple[str, int | None]:
    """``"w^2"`` -> ``("w", 2)``; ``"y"`` -> ``("y", None)``."""
    letter, _, layer = str(name).partition("^")
    return letter, (int(layer) if layer else None)


def size_symbol(layer: int) -> sp.Symbol:
    """The generic size n_l of layer l (n_0 is the input size)."""
    return sp.Symbol(f"n_{layer}", integer=True, positive=True)


@dataclass(frozen=True)
class LayerModel:
    """Layer l: its symbols, activation and forward expressions (free index j)."""

    index: int
    size: sp.Symbol
    activation: Activation
    w: sp.IndexedBase
    b: sp.IndexedBase | None
    z: sp.IndexedBase
    a: sp.IndexedBase
    z_expr: sp.Expr   # z^l_j in terms of w^l, a^{l-1}, b^l
    a_expr: sp.Expr   # a^l_j in terms of z^l (sigma(z^l_j), or softmax over z^L)

    def activation_of(self, arg: sp.Expr) -> sp.Expr:
        """sigma_l applied to ``arg`` (elementwise activations only)."""
        return self.activation.expr.subs(Z, arg)


@dataclass(frozen=True)
class Model:
    """The whole symbolic network and its per-sample loss."""

    spec: NetworkSpec
    sizes: tuple[sp.Symbol, ...]      # n_0, ..., n_L
    x: sp.IndexedBase                 # a^0
    y: sp.IndexedBase
    layers: tuple[LayerModel, ...]    # layers[l - 1] is layer l
    loss: Loss
    cost: sp.Expr                     # C = sum_i loss(a^L_i, y_i)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> LayerModel:
        return self.layers[index - 1]

    def loss_of(self, a_expr: sp.Expr, y_expr: sp.Expr) -> sp.Expr:
        """The per-component loss at (a, y)."""
        return self.loss.expr.subs({A: a_expr, Y: y_expr}, simultaneous=True)


def build_model(spec: NetworkSpec) -> Model:
    """The symbolic :class:`Model` of ``spec``."""
    sizes = tuple(size_symbol(l) for l in range(spec.depth + 1))
    x = quantity("a", 0)
    layers: list[LayerModel] = []
    previous = x
    for l, layer_spec in enumerate(spec.layers, start=1):
        activation = spec.activation(l)
        w, z, a = quantity("w", l), quantity("z", l), quantity("a", l)
        b = quantity("b", l) if layer_spec.bias else None
        z_expr = sp.Sum(w[j, k] * previous[k], (k, 1, sizes[l - 1]))
        if b is not None:
            z_expr = z_expr + b[j]
        if activation.is_softmax:
            a_expr = sp.exp(z[j]) / sp.Sum(sp.exp(z[m]), (m, 1, sizes[l]))
        else:
            a_expr = activation.expr.subs(Z, z[j])
        layers.append(LayerModel(l, sizes[l], activation, w, b, z, a, z_expr, a_expr))
        previous = a
    y = quantity("y")
    loss = spec.resolved_loss()
    output = layers[-1]
    cost = sp.Sum(loss.expr.subs({A: output.a[i], Y: y[i]}, simultaneous=True),
                  (i, 1, sizes[-1]))
    return Model(spec, sizes, x, y, tuple(layers), loss, cost)

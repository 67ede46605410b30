"""The reference for ``derive check --backward``: the derivation evaluated on a batch, and the
common mistakes as variants of it.

Stage: check. Takes a :class:`~derive.derivation.reverse.Derivation` of a dense chain and
a batch (parameters in derive's layout, rows of samples); gives the batch-mean gradients
(:class:`Backprop`, by evaluating the derivation's own vector forms: nothing is typed in
twice) and, for a user's wrong numbers, the mistakes that reproduce them exactly
(:func:`variants`, :func:`diagnose`): each is a variant of the derivation (sigma' left out,
applied to z instead of a or the reverse, the output error of another loss, a transposed
weight in the delta recursion) combined with a scale (the sum over the batch instead of the
mean, a wrong sign).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy as sp

from derive.derivation.reverse import (
    ActivationDerivative,
    Derivation,
    activation_derivative,
    derive,
)
from derive.derivation.tensorform import ONE, Inner, MatVec, Outer, adjoint, to_vector
from derive.errors import DeriveError
from derive.graph.model import build_model, j
from derive.quantities import NetTensor
from derive.registry import functions
from derive.registry.functions import A, Z
from derive.render.pretty import pretty
from derive.spec.load import NetworkSpec, load_spec

#: Relative agreement required between float64 results.
RTOL = 1e-6


# --- the reference: the derivation's vector forms, evaluated on a batch ------------------


_UFUNCS: Mapping[type, Callable[..., np.ndarray]] = {
    sp.exp: np.exp, sp.log: np.log, sp.tanh: np.tanh, sp.sinh: np.sinh, sp.cosh: np.cosh,
    sp.Abs: np.abs, functions.sigmoid: lambda x: 1.0 / (1.0 + np.exp(-x)),
    functions.softplus: lambda x: np.logaddexp(0.0, x),
    sp.erf: np.vectorize(math.erf, otypes=[float]),
}


class Backprop:
    """Forward and backward pass of a derivation on a batch, by evaluating its expressions.

    Rows are samples. ``env`` maps each quantity (a :class:`NetTensor`: a^l, z^l, delta^l,
    W^l, ...) to its batch of values. ``sigma_prime`` overrides sigma'_l (a function of z^l);
    ``flip`` is a set of layers l whose (W^l)^T in the delta recursion is evaluated
    untransposed.
    """

    def __init__(self, derivation: Derivation, params: Mapping[str, np.ndarray],
                 X: np.ndarray, Y: np.ndarray) -> None:
        self.derivation = derivation
        self.model = derivation.model
        # sigma_l of the generic forms, by layer (the derivation names them sigma_1, sigma_2)
        self.sigmas = {sp.Function(f"sigma_{node.index}"): node.index
                       for node in self.model.nodes}
        by_key = {parameter.key: parameter.tensor for parameter in self.model.parameters}
        self.env: dict[NetTensor, Any] = {NetTensor("y"): Y, NetTensor("a", 0): X}
        for key, value in params.items():
            self.env[by_key[key]] = value
        for layer in self.model.layers:
            self.env[NetTensor("z", layer.index)] = self.eval(to_vector(layer.z_expr, (j,)), {})
            self.env[layer.output] = self.eval(to_vector(layer.a_expr, (j,)), {})

    def value(self, role: str, layer: int | None = None) -> Any:
        """The batch of values of quantity ``role`` at ``layer`` (``value("a", 2)``: A2)."""
        return self.env[NetTensor(role, layer)]

    def eval(self, expr: sp.Expr, primes: Mapping[int, Callable], flip: frozenset = frozenset(),
             local: Mapping[sp.Symbol, Any] | None = None) -> Any:
        local = local or {}

        def ev(e: sp.Expr) -> Any:
            return self.eval(e, primes, flip, local)

        if expr in local:
            return local[expr]
        if isinstance(expr, NetTensor):
            return 1.0 if expr == ONE else self.env[expr]
        if isinstance(expr, MatVec):
            matrix, vector, transposed = expr.args
            W, V = ev(matrix), ev(vector)
            if bool(transposed) != (matrix.node in flip):
                return V @ W
            return V @ W.T
        if isinstance(expr, Inner):
            u, v = expr.args
            return np.sum(ev(u) * ev(v), axis=1, keepdims=True)
        if isinstance(expr, sp.Derivative):
            (arg,) = expr.expr.args
            layer = self.sigmas[expr.expr.func]
            return primes[layer](ev(arg)) if layer in primes else self.sigma_prime(layer)(ev(arg))
        if isinstance(expr, sp.Add):
            return sum(ev(a) for a in expr.args)
        if isinstance(expr, sp.Mul):
            out = 1.0
            for factor in expr.args:
                out = out * ev(factor)
            return out
        if isinstance(expr, sp.Pow):
            return ev(expr.base) ** ev(expr.exp)
        if expr.is_Number or expr.is_NumberSymbol:
            return float(expr)
        if isinstance(expr, sp.Piecewise):
            out = ev(expr.args[-1][0])
            for value, cond in reversed(expr.args[:-1]):
                out = np.where(ev(cond), ev(value), out)
            return out
        if expr == sp.true:
            return True
        if isinstance(expr, sp.core.relational.Relational):
            ops = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}
            return ops[expr.rel_op](ev(expr.lhs), ev(expr.rhs))
        if isinstance(expr, (sp.Max, sp.Min)):
            fn = np.maximum if isinstance(expr, sp.Max) else np.minimum
            values = [ev(a) for a in expr.args]
            out = values[0]
            for value in values[1:]:
                out = fn(out, value)
            return out
        if type(expr) in _UFUNCS:
            return _UFUNCS[type(expr)](*(ev(a) for a in expr.args))
        raise NotImplementedError(f"cannot evaluate {expr!r} numerically")

    def sigma_prime(self, layer: int) -> Callable[[np.ndarray], np.ndarray]:
        in_z = activation_derivative(self.model.layer(layer).activation).in_z
        return lambda z: np.broadcast_to(self.eval(in_z, {}, local={Z: z}), np.shape(z))

    def gradients(self, primes: Mapping[int, Callable] | None = None,
                  flip: frozenset = frozenset(), output: str = "derived",
                  loss_gradient: sp.Expr | None = None) -> dict[str, np.ndarray]:
        """Batch-mean gradients, keyed W1, b1, ...; the variants of the hypotheses."""
        primes = primes or {}
        derivation, model = self.derivation, self.model
        L = model.depth
        B = self.value("y").shape[0]
        env = dict(self.env)
        saved = self.env
        self.env = env
        try:
            top = derivation.delta(L)
            if model.layer(L).activation.is_softmax or output == "rhs":
                env[top.target] = self.eval(top.vector, primes, flip)
            else:
                gradient = loss_gradient if loss_gradient is not None else (
                    derivation.loss_gradient.vector)
                env[adjoint(model.output.output)] = self.eval(gradient, primes, flip)
                env[top.target] = self.eval(top.vector_generic, primes, flip)
            for l in range(L - 1, 0, -1):
                delta = derivation.delta(l)
                env[delta.target] = self.eval(delta.vector_generic, primes, flip)
            grads: dict[str, np.ndarray] = {}
            for layer in model.layers:
                l = layer.index
                weight, bias = layer.parameter("w"), layer.parameter("b")
                outer = derivation.gradient(weight.tensor).vector
                assert isinstance(outer, Outer)
                U, V = (np.broadcast_to(self.eval(side, primes, flip), (B, n))
                        for side, n in zip(outer.args, weight.shape))
                grads[weight.key] = U.T @ V / B
                if bias is not None:
                    vector = derivation.gradient(bias.tensor).vector
                    grads[bias.key] = np.mean(np.broadcast_to(
                        self.eval(vector, primes, flip), (B, *bias.shape)), axis=0)
            return grads
        finally:
            self.env = saved


# --- hypotheses --------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    description: str
    grads: dict[str, np.ndarray]
    cost: int                  # how many mistakes it assumes


def _mistakable(derivative: ActivationDerivative) -> bool:
    """Whether σ' written in a, given z instead (or σ'(z) given a), differs from σ'(z): not
    for relu's [a > 0], which is [z > 0] at either."""
    return derivative.in_a is not None and derivative.in_a.has(A) and \
        derivative.in_a.xreplace({A: Z}) != derivative.in_z


def variants(spec: NetworkSpec, derivation: Derivation, run: Backprop) -> list[Variant]:
    """The derivation's gradients on ``run``'s batch, and every common mistake's."""
    model = derivation.model
    L = model.depth
    out: list[Variant] = [Variant("", run.gradients(), 0)]
    elementwise = [layer for layer in model.layers if not layer.activation.is_softmax]

    def add(description: str, cost: int, **kwargs: Any) -> None:
        try:
            out.append(Variant(description, run.gradients(**kwargs), cost))
        except (NotImplementedError, ValueError, KeyError):
            pass

    for layer in elementwise:
        l = layer.index
        derivative = activation_derivative(layer.activation)
        where = f"delta^{l}" + (" (the output layer)" if l == L else "")
        add(f"the sigma'(z^{l}) factor is missing in {where}", 1,
            primes={l: lambda z: 1.0})
        if _mistakable(derivative):
            in_a = derivative.in_a
            add(f"sigma' applied to z instead of a in {where}: the derivative written in "
                f"terms of the output, {in_a}, was given z^{l} (a^{l} is needed)", 1,
                primes={l: lambda z, in_a=in_a: run.eval(in_a, {}, local={A: z})})
            activation = layer.activation.expr
            add(f"sigma' applied to a instead of z in {where}: sigma'(z) = "
                f"{derivative.in_z} was given a^{l} (z^{l} is needed)", 1,
                primes={l: lambda z, f=activation, d=derivative.in_z: run.eval(
                    d, {}, local={Z: run.eval(f, {}, local={Z: z})})})
    if len(elementwise) > 1:
        add("the sigma' factor is missing in every delta", len(elementwise),
            primes={layer.index: (lambda z: 1.0) for layer in elementwise})
        rewritten = [layer for layer in elementwise
                     if _mistakable(activation_derivative(layer.activation))]
        if len(rewritten) > 1:
            in_a = {layer.index: activation_derivative(layer.activation).in_a
                    for layer in rewritten}
            add("sigma' applied to z instead of a in every delta", len(rewritten),
                primes={l: (lambda z, d=d: run.eval(d, {}, local={A: z}))
                        for l, d in in_a.items()})
    sizes = spec.sizes
    for l in range(2, L + 1):
        if sizes[l] == sizes[l - 1]:
            add(f"W^{l} is not transposed in the recursion for delta^{l - 1} "
                f"(W^{l} delta^{l} instead of (W^{l})^T delta^{l})", 1, flip=frozenset({l}))
    if not model.layer(L).activation.is_softmax:
        for name, other in _other_losses(spec):
            delta = pretty(other.delta(L).rhs)
            add(f"the output error of {name} (δᴸⱼ = {delta}) is used with "
                f"{spec.loss.name}", 1, loss_gradient=other.loss_gradient.vector)
    return out


@functools.lru_cache(maxsize=8)
def _other_losses(spec: NetworkSpec) -> tuple[tuple[str, Derivation], ...]:
    """The derivation of ``spec`` with each other built-in loss it accepts (kept: one check
    diagnoses the trials of several conventions)."""
    out = []
    for name in functions.LOSSES:
        if name == spec.loss.name:
            continue
        try:
            other = load_spec({**spec.to_dict(), "loss": name})
        except DeriveError:
            continue
        out.append((name, derive(build_model(other))))
    return tuple(out)


#: Scales a user's gradients are tested at: the batch's (sum and mean confused), and a sign.
BATCH_SCALES = (1.0, "B", "1/B", -1.0, "-B", "-1/B")
SIGN_SCALES = (1.0, -1.0)


def _scale_value(scale: float | str, batch: int) -> float:
    table = {"B": batch, "1/B": 1 / batch, "-B": -batch, "-1/B": -1 / batch}
    return table[scale] if isinstance(scale, str) else scale


def _describe_scale(scale: float | str, reduction: str, batch: int) -> str:
    if scale in ("B", "-B"):
        text = (f"sums over the batch instead of averaging: {batch} (= B) times the mean "
                "(missing 1/batch; use --reduction sum if summing is intended)")
    elif scale in ("1/B", "-1/B"):
        text = (f"divides by the batch size where {reduction} was declared: 1/{batch} of "
                "the expected value" if reduction == "sum" else
                "divides by the batch size twice (1/B too small)")
    else:
        text = ""
    if scale in (-1.0, "-B", "-1/B"):
        text = "wrong sign (the negative of the gradient)" + (f", and {text}" if text else "")
    return text


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    scale = max(float(np.max(np.abs(b))), 1e-12)
    return float(np.max(np.abs(a - b))) / scale


@dataclass(frozen=True)
class Diagnosis:
    cost: int                  # how many mistakes it assumes
    lines: tuple[str, ...]


def diagnose(user: Mapping[str, np.ndarray], variants: list[Variant], reduction: str,
             batch: int, scales: tuple[float | str, ...], weights: str) -> Diagnosis | None:
    """The cheapest explanation of ``user``'s gradients (derive's layout, batch means) by a
    variant at one of ``scales``; several of the same cost are all named."""
    best: tuple[int, list[str], list[str]] | None = None
    for variant in variants:
        found: dict[str, float | str] = {}
        transposed: list[str] = []
        for name, value in user.items():
            # a square dW returned in the other layout has the right shape: try it too
            square = value.ndim == 2 and value.shape[0] == value.shape[1]
            layouts = (value, value.T) if square else (value,)
            for scale in scales:
                expected = _scale_value(scale, batch) * variant.grads[name]
                match = [n for n, v in enumerate(layouts)
                         if relative_error(v, expected) < RTOL]
                if match:
                    found[name] = scale
                    if match[0]:
                        transposed.append(f"d{name}")
                    break
        if len(found) != len(user):
            continue
        odd = {name: s for name, s in found.items() if s != 1.0}
        cost = variant.cost + len(set(odd.values())) + bool(transposed)
        lines = [variant.description] if variant.description else []
        if transposed:
            lines.append(f"{', '.join(transposed)} returned transposed: the other layout than "
                         f"the weights' ({weights})")
        scale_lines = []
        for scale in dict.fromkeys(odd.values()):
            names = ", ".join(n for n, s in odd.items() if s == scale)
            everyone = len([1 for s in odd.values() if s == scale]) == len(user)
            scale_lines.append(f"{'every gradient' if everyone else names}: "
                               f"{_describe_scale(scale, reduction, batch)}")
        if best is None or cost < best[0]:
            best = (cost, lines, scale_lines)
        elif cost == best[0]:
            best[1].extend(line for line in lines if line not in best[1])
            best[2].extend(line for line in scale_lines if line not in best[2])
    return Diagnosis(best[0], tuple(best[1] + best[2])) if best else None

"""The attention op of the registry: single-head self-attention over a sequence
(docs/architecture.md, "Attention").

A layer reads a sequence x (entries (t, k), steps t = 1..T) and projects each step to a query,
a key and a value of width d (the layer's size):

    q^l_{tj} = sum_k wq^l_{jk} x_{tk},   k^l_{tj} = sum_k wk^l_{jk} x_{tk},
    v^l_{tj} = sum_k wv^l_{jk} x_{tk},
    s^l_{tτ} = sum_j q^l_{tj} k^l_{τj} / sqrt(d)                 (the scores)
    α^l_{tτ} = [τ ≤ t] exp(s^l_{tτ}) / sum_τ' [τ' ≤ t] exp(s^l_{tτ'})   (softmax over τ)
    a^l_{tj} = sum_τ α^l_{tτ} v^l_{τj}

The bracket [τ ≤ t] is there only with ``causal: true`` (step t attends to itself and the steps
before it). The scores and the weights have two time axes; their adjoints are whole (T, T)
tensors (:mod:`derive.derivation.stepform`, "whole sequences"). The softmax Jacobian along the
key axis τ, the scaling and the mask's effect come out of the generic reverse pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp

from derive.quantities import LENGTH, family_indices
from derive.registry.ops import Attribute, Context, Equation, Forward, OpDef, ParameterDef
from derive.registry.windows import InRange


def _parameters(attrs: Mapping[str, object]) -> tuple[ParameterDef, ...]:
    return tuple(ParameterDef(role, ("size", "in"), "glorot") for role in ("wq", "wk", "wv"))


def _forward(ctx: Context) -> Forward:
    (x,) = ctx.inputs
    t, tau, other = family_indices(("time", "time", "time"), set())
    j, k = family_indices(("channel", "channel"), {t, tau, other})
    d = ctx.size
    causal = bool(ctx.attrs.get("causal", False))

    def projection(role: str) -> Equation:
        target = ctx.quantity(role, 2)
        return Equation(target, (t, j), sp.Sum(ctx.params[f"w{role}"][j, k]
                                                * x.tensor.indexed[t, k], (k, 1, x.size)),
                        source_kind=role, ranges=(LENGTH, d))

    query, key, value = projection("q"), projection("k"), projection("v")
    q, kk, v = query.target.indexed, key.target.indexed, value.target.indexed
    scores = ctx.quantity("s", 2)
    score = Equation(scores, (t, tau), sp.Sum(q[t, j] * kk[tau, j], (j, 1, d)) / sp.sqrt(d),
                     source_kind="s", ranges=(LENGTH, LENGTH))

    def weight(at: sp.Symbol) -> sp.Expr:
        raw = sp.exp(scores.indexed[t, at])
        return InRange(at, 1, t) * raw if causal else raw

    alpha = ctx.quantity("alpha", 2)
    weights = Equation(alpha, (t, tau), weight(tau) / sp.Sum(weight(other), (other, 1, LENGTH)),
                       source_kind="alpha", ranges=(LENGTH, LENGTH), softmax=True)
    out = ctx.quantity("a", 2)
    output = Equation(out, (t, j), sp.Sum(alpha.indexed[t, tau] * v[tau, j], (tau, 1, LENGTH)),
                      source_kind="a", ranges=(LENGTH, d))
    return Forward((query, key, value, score, weights, output), out)


def _shape(attrs: Mapping[str, object], shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], int(attrs["size"]))


def _no_size(attrs: Mapping[str, object], inputs: tuple[int, ...]) -> int:
    raise AssertionError("attention's output comes from output_shape")


ATTENTION_OPS: dict[str, OpDef] = {
    "attention": OpDef(
        "attention", "single-head self-attention: a_t = Σ_τ softmax_τ(q_t·k_τ/√d) v_τ, "
                     "q = Wq x, k = Wk x, v = Wv x",
        (Attribute("size", "size", required=True, doc="the width d of queries, keys and values"),
         Attribute("causal", "bool", False,
                   doc="whether step t attends only to steps τ ≤ t (default false)")),
        (1, 1), _parameters, _no_size, _forward, label="attention", reads="sequence",
        output_shape=_shape),
}

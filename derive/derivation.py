"""Stage 3: the backpropagation formulas, derived from the model by SymPy differentiation.

``derive(model)`` applies the chain rule to the model's indexed expressions and records each
application as a :class:`Step`. Nothing here types in a backprop equation: the local
derivatives come from ``sympy.diff`` on the forward expressions and the loss, the sums are
collapsed by :mod:`derive.indexcalc`, and the classic results fall out:

    BP1  delta^L_j = dC/da^L_j * sigma'(z^L_j)          (softmax + cross-entropy: a^L_j - y_j)
    BP2  delta^l_j = sum_k w^{l+1}_{kj} delta^{l+1}_k * sigma'(z^l_j)
    BP3  dC/db^l_j = delta^l_j
    BP4  dC/dw^l_{jk} = a^{l-1}_k delta^l_j

Each :class:`Formula` keeps its steps, its generic form (sigma' and dC/da left symbolic), its
concrete index form and the vector form; later stages (LaTeX, code, verification) read these
and never re-derive anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mpmath
import sympy as sp

from derive.functions import A, Activation, Z, elementary
from derive.indexcalc import collapse
from derive.model import LayerModel, Model, i, j, k, m, quantity
from derive.vectorform import to_vector

#: The per-sample cost, as a symbol (its expression is ``Model.cost``).
C = sp.Symbol("C", real=True)


def partial(f: sp.Expr, x: sp.Expr) -> sp.Derivative:
    """The unevaluated partial derivative df/dx, as written in a derivation."""
    return sp.Derivative(f, x, evaluate=False)


@dataclass(frozen=True)
class Step:
    """One recorded step: ``target = expr``, obtained by ``rule`` for the reason ``why``.

    ``source`` is the equation the rule acted on, when the reason refers to one (the forward
    expression that was differentiated, the inverse that was substituted); renderers print it
    with their own printer, so ``why`` holds words only.
    """

    rule: str
    target: sp.Expr
    expr: sp.Expr
    why: str
    source: sp.Eq | None = None


@dataclass(frozen=True)
class Formula:
    """A derived formula ``lhs = rhs`` with its free indices, steps and vector form.

    ``generic`` is the result before the concrete activation and loss were inserted
    (sigma'(z) and dC/da^L left symbolic); ``rhs`` is the concrete, simplified result.
    """

    key: str                      # "delta^2", "dC/dw^2", "dC/db^2", "dC/da^2"
    equation: str                 # "BP1".."BP4", or "" for auxiliary formulas
    lhs: sp.Expr
    rhs: sp.Expr
    generic: sp.Expr
    indices: tuple[sp.Symbol, ...]
    steps: tuple[Step, ...]
    assumptions: tuple[str, ...] = ()

    def _repr_latex_(self) -> str:  # Jupyter: this formula as rendered math
        from derive.latex_printer import repr_latex  # a later stage, imported on use only

        return repr_latex((self,))

    @property
    def vector(self) -> sp.Expr:
        """The vector (matrix) form of ``rhs``."""
        return to_vector(self.rhs, self.indices)

    @property
    def vector_generic(self) -> sp.Expr:
        """The vector form of ``generic`` (nabla_a C, sigma' symbolic)."""
        return to_vector(self.generic, self.indices)


@dataclass(frozen=True)
class ActivationDerivative:
    """sigma'(z) of one activation: in z, and in the output a where an exact identity exists."""

    activation: Activation
    in_z: sp.Expr                 # in functions.Z
    in_a: sp.Expr | None          # in functions.A, or None when no identity was found
    steps: tuple[Step, ...]

    def at(self, layer: LayerModel, index: sp.Expr) -> sp.Expr:
        """sigma'(z^l_index) for ``layer``, written in a^l where possible."""
        if self.in_a is not None:
            return self.in_a.subs(A, layer.a[index])
        return self.in_z.subs(Z, layer.z[index])


@dataclass(frozen=True)
class Derivation:
    """All backpropagation formulas of one model."""

    model: Model
    loss_gradient: Formula                             # dC/da^L_j
    deltas: tuple[Formula, ...]                        # deltas[l - 1] is delta^l, l = 1..L
    bias_gradients: tuple[Formula | None, ...]         # None for a layer without bias
    weight_gradients: tuple[Formula, ...]
    activation_derivatives: tuple[ActivationDerivative | None, ...]  # None for softmax

    def delta(self, layer: int) -> Formula:
        return self.deltas[layer - 1]

    @property
    def formulas(self) -> tuple[Formula, ...]:
        """Every formula, output layer first, in the order a derivation presents them."""
        out: list[Formula] = [self.loss_gradient]
        out.extend(reversed(self.deltas))
        for layer in range(self.model.depth, 0, -1):
            bias = self.bias_gradients[layer - 1]
            if bias is not None:
                out.append(bias)
            out.append(self.weight_gradients[layer - 1])
        return tuple(out)

    def _repr_latex_(self) -> str:  # Jupyter: the derived formulas as rendered math
        from derive.latex_printer import repr_latex  # a later stage, imported on use only

        return repr_latex(self.formulas)


def derive(model: Model) -> Derivation:
    """Derive every backpropagation formula of ``model``."""
    derivatives = tuple(
        None if layer.activation.is_softmax else activation_derivative(layer.activation)
        for layer in model.layers
    )
    loss_gradient = _loss_gradient(model)
    deltas: dict[int, Formula] = {model.depth: _output_delta(model, loss_gradient, derivatives)}
    for l in range(model.depth - 1, 0, -1):
        deltas[l] = _hidden_delta(model, l, derivatives[l - 1])
    return Derivation(
        model=model,
        loss_gradient=loss_gradient,
        deltas=tuple(deltas[l] for l in range(1, model.depth + 1)),
        bias_gradients=tuple(
            _bias_gradient(model, l) if model.layer(l).b is not None else None
            for l in range(1, model.depth + 1)
        ),
        weight_gradients=tuple(_weight_gradient(model, l) for l in range(1, model.depth + 1)),
        activation_derivatives=derivatives,
    )


# --- activation derivatives --------------------------------------------------------------


def _simplest(*candidates: sp.Expr) -> sp.Expr:
    """The candidate with the fewest operations; the earliest wins ties."""
    return min(candidates, key=sp.count_ops)


def _same_function(lhs: sp.Expr, rhs: sp.Expr, points: tuple[float, ...]) -> bool:
    """lhs(z) == rhs(z) as functions of Z: symbolically, else at points with 30 digits."""
    difference = elementary(lhs - rhs)
    if sp.simplify(difference) == 0:
        return True
    with mpmath.workdps(30):
        fn = sp.lambdify(Z, difference, modules="mpmath")
        return all(abs(fn(mpmath.mpf(p))) < mpmath.mpf(10) ** -25 for p in points)


_CHECK_POINTS = (-2.75, -1.3, -0.4, 0.35, 0.9, 1.7, 3.1)


@cache
def activation_derivative(activation: Activation) -> ActivationDerivative:
    """sigma'(z) by ``sympy.diff``, and its rewrite in a = sigma(z) when one exists.

    The rewrite is searched two ways: replacing sigma(z) by a in sigma'(z) (sigmoid, tanh), or
    inverting a = sigma(z) for z when the inverse is unique (softplus). A rewrite is kept only
    if it contains no z and sigma'(z) == rewrite(sigma(z)) is confirmed.
    """
    f = activation.expr
    raw = sp.diff(f, Z)
    in_z = _simplest(raw, sp.simplify(raw))
    sigma = sp.Function("sigma")
    steps = [Step("differentiate", sp.Derivative(sigma(Z), Z), in_z,
                  "differentiate the activation", sp.Eq(sigma(Z), f, evaluate=False))]
    if not in_z.has(Z):
        return ActivationDerivative(activation, in_z, in_z, tuple(steps))
    candidates: list[tuple[sp.Expr, str, sp.Eq | None]] = []
    substituted = in_z.xreplace({f: A})
    if not substituted.has(Z):
        candidates.append((substituted, "replace sigma(z) by the layer output a", None))
    fe = elementary(f)
    if not candidates and not fe.has(sp.Piecewise) and fe.count(Z) == 1:
        try:
            inverses = sp.solve(sp.Eq(fe, A), Z)
        except NotImplementedError:
            inverses = []
        if len(inverses) == 1:
            inverse = inverses[0]
            raw_a = elementary(in_z).subs(Z, inverse)
            rewritten = _simplest(sp.simplify(raw_a), sp.expand(sp.simplify(raw_a)))
            candidates.append((rewritten, "solve a = sigma(z) for z and substitute",
                               sp.Eq(Z, inverse, evaluate=False)))
    for candidate, why, source in candidates:
        if not candidate.has(Z) and _same_function(candidate.subs(A, f), in_z, _CHECK_POINTS):
            steps.append(Step("rewrite in a", sp.Derivative(sigma(Z), Z), candidate,
                              why + "; checked: equal to sigma'(z) for every z", source))
            return ActivationDerivative(activation, in_z, candidate, tuple(steps))
    return ActivationDerivative(activation, in_z, None, tuple(steps))


# --- the chain rule, layer by layer ------------------------------------------------------


def _replace_sigma_prime(expr: sp.Expr, sigma: sp.FunctionClass, layer: LayerModel,
                         derivative: ActivationDerivative) -> sp.Expr:
    """Replace the symbolic sigma'(z^l_x) by the activation's concrete derivative."""
    return expr.replace(
        lambda e: isinstance(e, sp.Derivative) and e.expr.func == sigma,
        lambda e: derivative.at(layer, e.expr.args[0].indices[0]),
    )


def _loss_gradient(model: Model) -> Formula:
    out = model.layer(model.depth)
    lhs = partial(C, out.a[j])
    raw = collapse(sp.diff(model.cost, out.a[j]))
    rhs = _simplest(raw, sp.together(raw), sp.factor(raw))
    steps = (
        Step("definition", C, model.cost, "the per-sample cost sums the loss over the outputs"),
        Step("differentiate", lhs, rhs,
             "only the term i = j of the sum depends on a^L_j (Kronecker delta)"),
    )
    return Formula(f"dC/da^{model.depth}", "", lhs, rhs, rhs, (j,), steps)


def _output_delta(model: Model, loss_gradient: Formula,
                  derivatives: tuple[ActivationDerivative | None, ...]) -> Formula:
    L = model.depth
    out = model.layer(L)
    target = quantity("delta", L)[j]
    sigma = sp.Function(f"sigma_{L}")
    steps = [
        Step("definition", target, partial(C, out.z[j]),
             "the error of neuron j is the derivative of the cost with respect to its "
             "weighted input"),
        Step("chain rule", target,
             sp.Sum(partial(C, out.a[i]) * partial(out.a[i], out.z[j]), (i, 1, out.size)),
             "C depends on z^L only through the outputs a^L_i"),
    ]
    if out.activation.is_softmax:
        a_i = out.a_expr.xreplace({j: i})
        raw = collapse(sp.diff(a_i, out.z[j]))
        steps.append(Step("differentiate", partial(out.a[i], out.z[j]), raw,
                          "quotient rule on the softmax a^L_i"))
        (normaliser,) = [s for s in sp.preorder_traversal(out.a_expr) if isinstance(s, sp.Sum)]
        total = sp.Dummy("S")
        local = sp.expand(raw.xreplace({normaliser: total}).replace(
            lambda e: isinstance(e, sp.exp) and isinstance(e.args[0], sp.Indexed)
            and e.args[0].base == out.z,
            lambda e: out.a[e.args[0].indices[0]] * total,
        ))
        assert not local.has(total), "softmax quotients did not cancel"
        steps.append(Step("substitute", partial(out.a[i], out.z[j]), local,
                          "write each softmax quotient as the output it defines"))
    else:
        local = sp.diff(sigma(out.z[i]), out.z[j])
        steps.append(Step("differentiate", partial(out.a[i], out.z[j]), local,
                          "a^L_i = sigma(z^L_i) depends on z^L_j only when i = j"))
    generic = collapse(sp.Sum(partial(C, out.a[i]) * local, (i, 1, out.size)))
    steps.append(Step("Kronecker delta", target, generic,
                      "the Kronecker delta keeps only the term i = j of the sum"))
    concrete = generic.replace(
        lambda e: isinstance(e, sp.Derivative) and e.expr == C,
        lambda e: loss_gradient.rhs.xreplace({j: e.variables[0].indices[0]}),
    )
    if not out.activation.is_softmax:
        concrete = _replace_sigma_prime(concrete, sigma, out, derivatives[L - 1])
    concrete = collapse(concrete)
    steps.append(Step("substitute", target, concrete,
                      "insert dC/da^L and the activation derivative"))
    assumptions: tuple[str, ...] = ()
    if model.loss.needs == "distribution":
        target_sum = sp.Sum(model.y[i], (i, 1, out.size))
        if concrete.has(target_sum):
            concrete = concrete.xreplace({target_sum: sp.Integer(1)})
            assumptions = ("sum_j y_j = 1 (the target is a probability vector)",)
            steps.append(Step("assumption", target, concrete,
                              "the targets sum to one: sum_i y_i = 1"))
    simplified = _simplest(concrete, sp.cancel(concrete), sp.factor(concrete))
    if simplified != concrete:
        steps.append(Step("simplify", target, simplified, "cancel common factors"))
    return Formula(f"delta^{L}", "BP1", target, simplified, generic, (j,), tuple(steps),
                   assumptions)


def _hidden_delta(model: Model, l: int, derivative: ActivationDerivative) -> Formula:
    layer, after = model.layer(l), model.layer(l + 1)
    target = quantity("delta", l)[j]
    next_delta = quantity("delta", l + 1)
    sigma = sp.Function(f"sigma_{l}")
    chain = sp.Sum(partial(C, after.z[k]) * partial(after.z[k], layer.z[j]), (k, 1, after.size))
    by_definition = sp.Sum(next_delta[k] * partial(after.z[k], layer.z[j]), (k, 1, after.size))
    z_next = after.z_expr.xreplace({j: k, k: m}).xreplace({layer.a[m]: sigma(layer.z[m])})
    local = collapse(sp.diff(z_next, layer.z[j]))
    generic = collapse(sp.Sum(next_delta[k] * local, (k, 1, after.size)))
    concrete = _replace_sigma_prime(generic, sigma, layer, derivative)
    steps = (
        Step("definition", target, partial(C, layer.z[j]),
             "the error of neuron j of layer l is dC/dz^l_j"),
        Step("chain rule", target, chain,
             "C depends on z^l only through the next layer's weighted inputs z^{l+1}_k"),
        Step("definition", target, by_definition, "dC/dz^{l+1}_k is the next layer's error"),
        Step("differentiate", partial(after.z[k], layer.z[j]), local,
             "differentiate the next layer's weighted input: only the term m = j depends on "
             "z^l_j", sp.Eq(after.z[k], z_next, evaluate=False)),
        Step("Kronecker delta", target, generic,
             "sigma'(z^l_j) does not depend on k and moves out of the sum"),
        Step("substitute", target, concrete, "insert the activation derivative"),
    )
    return Formula(f"delta^{l}", "BP2", target, concrete, generic, (j,), steps)


def _parameter_gradient(model: Model, l: int, parameter: sp.Indexed, key: str,
                        equation: str, free: tuple[sp.Symbol, ...]) -> Formula:
    layer = model.layer(l)
    delta = quantity("delta", l)
    target = partial(C, parameter)
    chain = sp.Sum(partial(C, layer.z[i]) * partial(layer.z[i], parameter), (i, 1, layer.size))
    by_definition = sp.Sum(delta[i] * partial(layer.z[i], parameter), (i, 1, layer.size))
    z_i = layer.z_expr.xreplace({j: i, k: m})
    local = collapse(sp.diff(z_i, parameter))
    result = collapse(sp.Sum(delta[i] * local, (i, 1, layer.size)))
    steps = (
        Step("chain rule", target, chain,
             "the parameter enters C only through the weighted inputs z^l_i of its layer"),
        Step("definition", target, by_definition, "dC/dz^l_i is the error delta^l_i"),
        Step("differentiate", partial(layer.z[i], parameter), local,
             "differentiate the weighted input of the layer", sp.Eq(layer.z[i], z_i,
                                                                    evaluate=False)),
        Step("Kronecker delta", target, result, "only the term i = j of the sum remains"),
    )
    return Formula(key, equation, target, result, result, free, steps)


def _bias_gradient(model: Model, l: int) -> Formula:
    return _parameter_gradient(model, l, model.layer(l).b[j], f"dC/db^{l}", "BP3", (j,))


def _weight_gradient(model: Model, l: int) -> Formula:
    return _parameter_gradient(model, l, model.layer(l).w[j, k], f"dC/dw^{l}", "BP4", (j, k))

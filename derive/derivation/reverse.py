"""Stage 3: backpropagation derived from the graph by one generic reverse-mode pass.

``derive(model)`` walks the model's forward equations (:mod:`derive.graph.model`) from the loss back
to the input. The adjoint of every quantity q is the sum over the equations that read q (its
consumers) of the consumer's adjoint times the local derivative, which comes from
``sympy.diff`` of the consumer's index-form expression; sums against Kronecker deltas are
collapsed by :mod:`derive.derivation.indexcalc`. A parameter read by several equations gets the sum of
their contributions. Nothing here types in a backprop equation or switches on an op's name
(docs/architecture.md, "The generic derivation").

Each result is a :class:`Formula` that keeps its recorded steps, its generic form (σ' and
∂C/∂a^L left symbolic) and its concrete form. For a chain of dense layers the pass arrives at
the classic equations, and labels them:

    BP1  delta^L_j = dC/da^L_j * sigma'(z^L_j)          (softmax + cross-entropy: a^L_j - y_j)
    BP2  delta^l_j = sum_k w^{l+1}_{kj} delta^{l+1}_k * sigma'(z^l_j)
    BP3  dC/db^l_j = delta^l_j
    BP4  dC/dw^l_{jk} = a^{l-1}_k delta^l_j

Later stages (LaTeX, code, verification) read these and never re-derive anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property

import mpmath
import sympy as sp
from sympy.concrete.expr_with_limits import ExprWithLimits
from sympy.core.function import AppliedUndef

from derive.derivation.indexcalc import collapse
from derive.derivation.renumber import Renumber
from derive.derivation.tensorform import to_vector
from derive.graph.model import Model, Node
from derive.progress import Report
from derive.quantities import (
    LENGTH,
    NetTensor,
    entry,
    fresh_like,
    indices_for,
    size_symbol,
    tensor_of,
)
from derive.registry.functions import A, Activation, Z, elementary
from derive.registry.ops import Equation
from derive.registry.windows import InRange

#: The per-sample cost, as a symbol (its expression is ``Model.cost``).
C = sp.Symbol("C", real=True)
#: The regularization penalty of the batch cost, as a symbol (``Model.penalty``).
R = sp.Symbol("R", real=True)


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

    ``of`` is the quantity differentiated (z^l for δ^l, w^l for ∂C/∂w^l, a^L for the loss
    gradient) and ``node`` its node; ``kind`` is ``"loss gradient"``, ``"delta"`` (a node's
    error), ``"adjoint"`` (∂C/∂q of an intermediate q, e.g. a layer norm's mean) or
    ``"gradient"`` (of a parameter). ``generic`` is the result before the concrete activation
    derivative and loss gradient were inserted; ``rhs`` the concrete, simplified result.
    ``penalty`` is the regularization's part of a weight's gradient, ∂R/∂w (0 without one): it
    enters the batch gradient once, not per sample. ``loss_part``: a loss gradient that is
    only the loss's own part of ∂C/∂h_t, as the network reads its output again (a recurrent
    layer's state, at the step after); the adjoint's or δ's formula, which writes it in, is
    the whole. ``key`` is a display label only.
    ``steps`` may be a :class:`LazySteps`: a formula renumbered from another node's makes its
    steps when they are first read.
    """

    key: str
    equation: str                 # "BP1".."BP4", or ""
    lhs: sp.Expr
    rhs: sp.Expr
    generic: sp.Expr
    indices: tuple[sp.Symbol, ...]
    steps: Sequence[Step]
    assumptions: tuple[str, ...] = ()
    of: NetTensor | None = None
    node: int = 0
    kind: str = "delta"
    penalty: sp.Expr = sp.S.Zero
    ranges: tuple[sp.Expr, ...] = ()   # the range 1..n of each free index (its n)
    loss_part: bool = False
    #: the feature width of every quantity (the model's): a stacked gate's blocks need them
    widths: Mapping[NetTensor, sp.Expr] = field(default_factory=dict, compare=False,
                                                hash=False, repr=False)

    def _repr_latex_(self) -> str:  # Jupyter: this formula as rendered math
        from derive.render.latex_printer import repr_latex  # a later stage, imported on use only

        return repr_latex((self,))

    @property
    def target(self) -> NetTensor:
        """The tensor this formula computes: δ^l, or the differentiated quantity's adjoint."""
        base = tensor_of(self.lhs)
        if base is not None:
            return base
        return adjoint_tensor(self.of)

    @cached_property
    def vector(self) -> sp.Expr:
        """The vector (matrix) form of ``rhs`` (made once: every printer reads it)."""
        return to_vector(self.rhs, self.indices, self.ranges, self.widths)

    @property
    def vector_generic(self) -> sp.Expr:
        """The vector form of ``generic`` (nabla_a C, sigma' symbolic)."""
        return to_vector(self.generic, self.indices, self.ranges, self.widths)

    @property
    def vector_penalty(self) -> sp.Expr:
        return to_vector(self.penalty, self.indices, self.ranges, self.widths) \
            if self.penalty != 0 \
            else sp.Integer(0)


def adjoint_tensor(of: NetTensor) -> NetTensor:
    """The tensor of ∂C/∂q in tensor form (∂C/∂a^L, ∂C/∂μ^l, ∂C/∂w^l)."""
    return of.adjoint()

@dataclass(frozen=True)
class ActivationDerivative:
    """sigma'(z) of one activation: in z, and in the output a where an exact identity exists."""

    activation: Activation
    in_z: sp.Expr                 # in functions.Z
    in_a: sp.Expr | None          # in functions.A, or None when no identity was found
    steps: tuple[Step, ...]

    def at(self, argument: sp.Expr, output: sp.Expr) -> sp.Expr:
        """sigma'(argument), written in the output a = sigma(argument) where possible."""
        if self.in_a is not None:
            return self.in_a.subs(A, output)
        return self.in_z.subs(Z, argument)


@dataclass(frozen=True)
class Derivation:
    """All backpropagation formulas of one model, in the order a derivation presents them:
    the loss gradient, then node by node from the output back: the node's error and the
    adjoints of its intermediates, then the gradients of its parameters."""

    model: Model
    formulas: tuple[Formula, ...]
    activation_derivatives: tuple[ActivationDerivative | None, ...]   # per node; None: none

    def _repr_latex_(self) -> str:  # Jupyter: the derived formulas as rendered math
        from derive.render.latex_printer import repr_latex  # a later stage, imported on use only

        return repr_latex(self.formulas)

    # looked up by kind, node and quantity: a document asks once per layer, so each lookup
    # must not scan the formulas of a deep network

    @cached_property
    def _by_kind(self) -> dict[str, tuple[Formula, ...]]:
        out: dict[str, list[Formula]] = {}
        for formula in self.formulas:
            out.setdefault(formula.kind, []).append(formula)
        return {kind: tuple(formulas) for kind, formulas in out.items()}

    @cached_property
    def _by_quantity(self) -> dict[tuple[str, object], Formula]:
        out: dict[tuple[str, object], Formula] = {}
        for formula in self.formulas:
            if formula.kind == "delta":
                out.setdefault(("delta", formula.node), formula)
            elif formula.kind == "gradient":
                out.setdefault(("gradient", formula.of), formula)
        return out

    def of_kind(self, kind: str) -> tuple[Formula, ...]:
        return self._by_kind.get(kind, ())

    @property
    def loss_gradient(self) -> Formula:
        (formula,) = self.of_kind("loss gradient")
        return formula

    def delta(self, node: int) -> Formula:
        """δ^l of node ``node``."""
        try:
            return self._by_quantity["delta", node]
        except KeyError:
            raise KeyError(node) from None

    def gradient(self, parameter: NetTensor) -> Formula:
        try:
            return self._by_quantity["gradient", parameter]
        except KeyError:
            raise KeyError(parameter) from None

    # the dense-chain view: one δ, bias and weight gradient per layer
    @cached_property
    def deltas(self) -> tuple[Formula, ...]:
        return tuple(self.delta(node.index) for node in self.model.nodes)

    def _parameter_gradients(self, role: str) -> tuple[Formula | None, ...]:
        out = []
        for node in self.model.nodes:
            parameter = node.parameter(role)
            out.append(None if parameter is None else self.gradient(parameter.tensor))
        return tuple(out)

    @cached_property
    def bias_gradients(self) -> tuple[Formula | None, ...]:
        return self._parameter_gradients("b")

    @cached_property
    def weight_gradients(self) -> tuple[Formula | None, ...]:
        return self._parameter_gradients("w")


# --- the generic reverse pass ------------------------------------------------------------


def _bound_indices(expr: sp.Expr) -> list[sp.Symbol]:
    """The summation indices of ``expr``, in a deterministic order."""
    found: list[sp.Symbol] = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, ExprWithLimits):
            for limit in node.limits:
                if limit[0] not in found:
                    found.append(limit[0])
    return found


def _relabel(expr: sp.Expr, free: tuple[sp.Symbol, ...], new_free: tuple[sp.Expr, ...],
             avoid: set[sp.Symbol]) -> sp.Expr:
    """``expr`` with its free indices ``free`` replaced by ``new_free`` and its summation
    indices renamed to fresh symbols that clash with neither ``avoid`` nor ``new_free``."""
    used = set(avoid) | {s for e in new_free for s in sp.sympify(e).free_symbols}
    bound = _bound_indices(expr)
    fresh = fresh_like(tuple(bound), used | set(free))
    mapping = dict(zip(bound, fresh))
    expr = expr.xreplace(mapping)
    return expr.xreplace(dict(zip(free, new_free)))


class LazySteps(Sequence[Step]):
    """Recorded steps made when first read: the steps of a formula renumbered from another
    node's (most formulas of a deep network are printed without their steps). Compares equal
    to the tuple of its steps and pickles as that tuple."""

    def __init__(self, make: Callable[[], tuple[Step, ...]]) -> None:
        self._make: Callable[[], tuple[Step, ...]] | None = make
        self._steps: tuple[Step, ...] = ()

    @property
    def steps(self) -> tuple[Step, ...]:
        if self._make is not None:
            self._steps, self._make = self._make(), None
        return self._steps

    def __getitem__(self, index: int | slice) -> Step | tuple[Step, ...]:  # type: ignore[override]
        return self.steps[index]

    def __len__(self) -> int:
        return len(self.steps)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return self.steps == tuple(other)

    def __hash__(self) -> int:
        return hash(self.steps)

    def __repr__(self) -> str:
        return repr(self.steps)

    def __reduce__(self) -> tuple:
        return tuple, (self.steps,)


def _joined(*parts: Sequence[Step]) -> Sequence[Step]:
    """The steps of ``parts`` in order; made when first read if a part is."""
    if all(isinstance(part, tuple) for part in parts):
        return tuple(step for part in parts for step in part)
    return LazySteps(lambda: tuple(step for part in parts for step in part))


@dataclass(frozen=True)
class _Derived:
    """What the reverse pass derives for one quantity q: ∂C/∂q before and after inserting
    the activation derivatives and the loss gradient, the steps between, the assumptions made,
    and, for a weight, ∂R/∂q."""

    generic: sp.Expr
    concrete: sp.Expr
    steps: Sequence[Step]
    assumptions: tuple[str, ...]
    penalty: sp.Expr

    def renumbered(self, at: Renumber) -> _Derived:
        def steps() -> tuple[Step, ...]:
            return tuple(Step(step.rule, at(step.target), at(step.expr), step.why,
                              None if step.source is None else at(step.source))
                         for step in self.steps)

        return _Derived(at(self.generic), at(self.concrete), LazySteps(steps),
                        self.assumptions, at(self.penalty))


class _Reverse:
    """One reverse pass over a model; see the module docstring."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.equations = model.equations
        self.by_target = {eq.target: eq for eq in self.equations}
        self.node_of = {eq.target: node for node in model.nodes for eq in node.equations}
        self.delta_of = {node.forward.delta: node for node in model.nodes}
        self.output = model.output.output
        self.sigmas = {node.index: sp.Function(f"sigma_{node.index}") for node in model.nodes}
        self.derivatives = tuple(
            activation_derivative(node.activation)
            if node.activation is not None and not node.activation.is_softmax else None
            for node in model.nodes)
        # σ_l → (the equation a = σ(x) of node l, σ's derivative), for the concrete forms
        self.by_sigma: dict[tuple[type, int], tuple[Equation, ActivationDerivative]] = {}
        for node, derivative in zip(model.nodes, self.derivatives):
            if derivative is not None:
                (eq,) = [e for e in node.equations if e.activation is not None and not e.gate]
                self.by_sigma[self.sigmas[node.index], node.index] = (eq, derivative)
            # an op's own functions (an LSTM's gates): σ_f, tanh_g, ... of this node
            for eq in node.equations:
                if eq.gate:
                    self.by_sigma[_gate_function(eq), node.index] = (
                        eq, activation_derivative(eq.activation))
        self.inline_generic: dict[NetTensor, tuple[sp.Expr, tuple[Step, ...]]] = {}
        # the equations that read each quantity, found once (atoms, not a scan per quantity)
        self.readers: dict[NetTensor, list[Equation]] = {}
        for eq in self.equations:
            read = {t for t in eq.expr.atoms(NetTensor)}
            for tensor in sorted(read, key=sp.default_sort_key):
                self.readers.setdefault(tensor, []).append(eq)
        # derived once per neighbourhood, renumbered for every other node that has it
        self.width_node = {size: n for n, size in enumerate(model.sizes)}
        self.sigma_node = {sigma: n for n, sigma in self.sigmas.items()}
        self.forms: dict[int, tuple] = {}
        self.derived: dict[tuple, tuple[int, _Derived]] = {}
        # the terms of the penalty R that each weight appears in
        self.penalty_terms: dict[NetTensor, list[sp.Expr]] = {}
        for term in sp.Add.make_args(model.penalty):
            for tensor in sorted(term.atoms(NetTensor), key=sp.default_sort_key):
                self.penalty_terms.setdefault(tensor, []).append(term)


    # -- derived once per neighbourhood --

    def renumber(self, offset: int) -> Renumber:
        """Node n → node n + ``offset`` (quantities, widths n_l, functions σ_l)."""
        return Renumber(offset, self.width_node, size_symbol, self.sigma_node,
                        self.sigmas.__getitem__)

    def form(self, node: Node) -> tuple:
        """Node ``node`` numbered from itself: its equations, parameters, width, activation
        and error, and whether it is the output. Equal forms are equal nodes up to numbering
        (the nodes they read included, by their distance)."""
        if node.index not in self.forms:
            at = Renumber(-node.index, self.width_node, size_symbol)
            self.forms[node.index] = (
                tuple((at(eq.target), eq.indices, at(eq.expr), eq.inline, eq.activation,
                       None if eq.argument is None else at(eq.argument), eq.source_kind)
                      for eq in node.equations),
                tuple((at(p.tensor), tuple(at(s) for s in p.shape_symbols))
                      for p in node.parameters),
                at(node.size), node.activation, at(node.forward.delta),
                node is self.model.output)
        return self.forms[node.index]

    def neighbourhood(self, node: Node) -> tuple:
        """Everything the formulas of ``node`` are derived from, numbered from ``node``: its
        own equations and those of every node that reads one of its quantities (through an
        inline quantity, substituted where it is used, the nodes that read that)."""
        nodes = {node.index: node}
        todo = [eq.target for eq in node.equations] + [p.tensor for p in node.parameters]
        seen = set(todo)
        while todo:
            for eq in self.readers.get(todo.pop(), []):
                owner = self.node_of[eq.target]
                nodes[owner.index] = owner
                if self.is_inline(eq.target) and eq.target not in seen:
                    seen.add(eq.target)
                    todo.append(eq.target)
        return tuple((n - node.index, self.form(nodes[n])) for n in sorted(nodes))

    def adjoint(self, node: Node, q: NetTensor, target: sp.Expr, loss_gradient: Formula
                ) -> _Derived:
        """∂C/∂q of a quantity or parameter q of ``node`` (``target`` names it): derived for
        the first node of each neighbourhood, renumbered for the others (a deep chain of
        equal layers is derived once, as the textbook derives a generic layer l)."""
        key = (self.neighbourhood(node), q.role, q.rank, q.parameter)   # q is of ``node``
        known = self.derived.get(key)
        if known is not None:
            source, derived = known
            return derived.renumbered(self.renumber(node.index - source))
        derived = self._adjoint(q, target, loss_gradient)
        self.derived[key] = (node.index, derived)
        return derived

    def _adjoint(self, q: NetTensor, target: sp.Expr, loss_gradient: Formula) -> _Derived:
        free = _free(self.model, q)
        steps: list[Step] = []
        if q == self.output:
            # the loss reads it; a recurrent output (h_t) is also read at the step after
            generic = partial(C, entry(q, free))
            if self.readers.get(q):
                more_terms, more = self.contributions(q, free, target, loss_too=True)
                generic = collected(self.direct(free) + more_terms)
                steps.extend(more)
                steps.append(Step("substitute", target, generic, _LOSS_PART))
        else:
            generic, more = self.contributions(q, free, target)
            steps.extend(more)
        concrete, assumptions = _finish(self, target, generic, loss_gradient, steps)
        penalty = sp.Integer(0)
        if q in self.penalty_terms:
            penalty = collapse(sp.diff(sp.Add(*self.penalty_terms[q]), entry(q, free)))
        return _Derived(generic, concrete, tuple(steps), assumptions, penalty)

    # -- names of adjoints --

    def reference(self, q: NetTensor, indices: tuple[sp.Expr, ...]) -> sp.Expr:
        """How a formula refers to ∂C/∂q: δ^l for a node's error, else ∂C/∂q itself."""
        if q in self.delta_of:
            return entry(NetTensor("delta", q.node, rank=q.rank), indices)
        return partial(C, entry(q, indices))

    def is_inline(self, q: NetTensor) -> bool:
        eq = self.by_target.get(q)
        return eq is not None and eq.inline and q not in self.delta_of

    # -- one consumer's contribution --

    def local(self, eq: Equation, wrt: sp.Expr, avoid: set[sp.Symbol]
              ) -> tuple[tuple[sp.Symbol, ...], sp.Expr, sp.Expr, sp.Expr]:
        """(consumer indices, the consumer's equation relabelled, its generic right-hand side,
        d consumer / d wrt), with indices renamed away from ``avoid``."""
        new_free = fresh_like(eq.indices, avoid)
        expr = _relabel(eq.expr, eq.indices, new_free, avoid | set(new_free))
        generic = expr
        if eq.activation is not None:
            sigma = _gate_function(eq) if eq.gate else \
                self.sigmas[self.node_of[eq.target].index]
            argument = _relabel(eq.argument, eq.indices, new_free, avoid | set(new_free))
            generic = sigma(argument)
        derivative = _deltas_in_front(collapse(sp.diff(generic, wrt)))
        if eq.softmax:
            derivative = _softmax_in_outputs(derivative, expr, entry(eq.target, new_free))
        return new_free, expr, generic, derivative

    def contributions(self, q: NetTensor, free: tuple[sp.Symbol, ...], target: sp.Expr,
                      loss_too: bool = False) -> tuple[sp.Expr, list[Step]]:
        """∂C/∂q[free] as the sum over q's consumers, with the steps that led there; the
        adjoints of inline consumers are substituted (their own steps included).
        ``loss_too``: the loss reads q as well (a recurrent output), which the caller adds."""
        wrt = entry(q, free)
        consumers = self.readers.get(q, [])
        avoid = set(free)
        widths = self.model.widths
        ranges = {index: (1, sp.sympify(n).xreplace(widths))
                  for index, n in zip(free, self.model.shapes.get(q, ()))}
        chain_terms, terms, steps, local_steps = [], [], [], []
        for eq in consumers:
            indices, _expr, generic, derivative = self.local(eq, wrt, avoid)
            limits = [(index, 1, n) for index, n in zip(indices, eq.ranges)]
            lhs = entry(eq.target, eq.target_indices(indices))
            reference = partial(C, lhs)
            chain = reference * partial(lhs, wrt)
            chain_terms.append(sp.Sum(chain, *limits) if limits else chain)
            local_steps.append(Step("differentiate", partial(lhs, wrt), derivative,
                                    _why_local(eq, q), sp.Eq(lhs, generic, evaluate=False)))
            by_name = self.reference(eq.target, eq.target_indices(indices))
            term = by_name * derivative
            terms.append(collapse(sp.Sum(term, *limits), ranges, widths) if limits else term)
        steps.append(Step("chain rule", target, sp.Add(*chain_terms),
                          _why_chain(q, consumers, loss_too)))
        named = sp.Add(*(t.xreplace({}) for t in chain_terms))
        renamed = named.replace(
            lambda e: isinstance(e, sp.Derivative) and e.expr == C and tensor_of(
                e.variables[0]) in self.delta_of,
            lambda e: self.reference(tensor_of(e.variables[0]), _indices(e.variables[0])))
        if renamed != named:
            steps.append(Step("definition", target, renamed,
                              "the derivative of the cost with respect to a node's "
                              "pre-activation (or output) is that node's error delta"))
        steps.extend(local_steps)
        result = collected(sp.Add(*terms))
        steps.append(Step("Kronecker delta", target, result,
                          "the Kronecker deltas keep one term of each sum"))
        # substitute the adjoints of inline quantities (a^l of a dense layer) by their formula
        inline = sorted({tensor_of(d.variables[0]) for d in result.atoms(sp.Derivative)
                         if d.expr == C and self.is_inline(tensor_of(d.variables[0]))
                         and (tensor_of(d.variables[0]) != self.output
                              or self.readers.get(self.output))},
                        key=sp.default_sort_key)
        for p in inline:
            p_free = _free(self.model, p)
            p_target = partial(C, entry(p, p_free))
            p_expr, p_steps = self.adjoint_generic(p, p_free, p_target)
            steps.extend(p_steps)
            result = collected(collapse(result.replace(
                lambda e, p=p: isinstance(e, sp.Derivative) and e.expr == C
                and tensor_of(e.variables[0]) == p,
                lambda e, p_expr=p_expr, p_free=p_free: _relabel(
                    p_expr, p_free, _indices(e.variables[0]), set(free)))))
            steps.append(Step("substitute", target, result,
                              "insert the derivative of the cost with respect to the layer's "
                              "output found above"))
        return result, steps

    def adjoint_generic(self, q: NetTensor, free: tuple[sp.Symbol, ...], target: sp.Expr
                        ) -> tuple[sp.Expr, tuple[Step, ...]]:
        key = (q, free)
        if key not in self.inline_generic:
            output = q == self.output           # a recurrent output: the loss's part as well
            result, steps = self.contributions(q, free, target, loss_too=output)
            if output:
                result = collected(self.direct(free) + result)
                steps.append(Step("substitute", target, result, _LOSS_PART))
            self.inline_generic[key] = (result, tuple(steps))
        return self.inline_generic[key]

    def direct(self, free: tuple[sp.Symbol, ...]) -> sp.Expr:
        """The loss's own part of ∂C/∂h_t for an output that is also read at the step after
        (a recurrent layer's state): the loss gradient itself, at ``free``. (Elsewhere ∂C/∂h_t
        then names the whole adjoint, so the loss gradient is written in at once.)"""
        formula = self.loss_gradient
        return _relabel(formula.rhs, formula.indices, free, set())

    # -- concrete forms --

    def concrete(self, generic: sp.Expr, loss_gradient: Formula) -> sp.Expr:
        """σ'(z) replaced by each activation's derivative, ∂C/∂a^L by the loss gradient."""
        by_sigma = self.by_sigma

        def key(e: sp.Expr) -> tuple[type, int | None] | None:
            applied = applied_derivative(e)
            if applied is None:
                return None
            function, argument = applied
            if function in self.sigma_node:       # σ_l: the node in its name
                return function, self.sigma_node[function]
            nodes = {t.node for t in argument.atoms(NetTensor) if not t.is_parameter}
            return function, nodes.pop() if len(nodes) == 1 else None

        out = generic.replace(
            lambda e: key(e) in by_sigma,
            lambda e: _activation_at(by_sigma[key(e)][0], applied_derivative(e)[1],
                                     by_sigma[key(e)][1]))
        free = loss_gradient.indices
        out = out.replace(
            lambda e: isinstance(e, sp.Derivative) and e.expr == C
            and tensor_of(e.variables[0]) == self.output and not self.readers.get(self.output),
            lambda e: _relabel(loss_gradient.rhs, free, _indices(e.variables[0]), set()))
        return collapse(out)


#: the step that adds a recurrent output's loss part to the error from the step after
_LOSS_PART = "the loss reads the output too: add the derivative of the loss by it, found above"


def _is_adjoint(factor: sp.Expr) -> bool:
    """∂C/∂q of an entry, or an entry of a node's error δ."""
    if isinstance(factor, sp.Derivative):
        return factor.expr == C
    tensor = tensor_of(factor) if isinstance(factor, sp.Indexed) else None
    return tensor is not None and tensor.role == "delta"


def _deltas_in_front(expr: sp.Expr) -> sp.Expr:
    """A sum whose every term has the same Kronecker deltas, as those deltas times the sum of
    the rest: δ_jk δ_tτ (h_{τ-1,k} - g_τk), not -δ_jk δ_tτ g_τk + h_{τ-1,k} δ_jk δ_tτ."""
    if not isinstance(expr, sp.Add):
        return expr
    shared = set.intersection(*({f for f in sp.Mul.make_args(term)
                                 if isinstance(f, sp.KroneckerDelta)} for term in expr.args))
    if not shared:
        return expr
    common = sp.Mul(*sorted(shared, key=sp.default_sort_key))
    return common * sp.Add(*(term / common for term in expr.args))


def collected(expr: sp.Expr) -> sp.Expr:
    """``expr`` with the terms that multiply the same adjoint (∂C/∂q or δ) written as one
    product, their common factors in front, where what is left is a sum of two terms:
    ∂C/∂h o (1 - tanh²(c)), not ∂C/∂h o - ∂C/∂h o tanh²(c); δ (1 - u), not δ - δ u; as a
    lecturer writes them. The adjoint shared by the most terms goes first; terms on other
    adjoints stay as they are."""
    if not isinstance(expr, sp.Add):
        return expr
    terms = list(expr.args)
    adjoints = sorted({f for term in terms for f in sp.Mul.make_args(term) if _is_adjoint(f)},
                      key=sp.default_sort_key)
    groups = [[t for t in terms if adjoint in sp.Mul.make_args(t)] for adjoint in adjoints]
    groups = [group for group in groups if len(group) > 1]
    if not groups:
        return expr
    group = max(groups, key=len)
    joined = sp.factor_terms(sp.Add(*group))
    inner = [f for f in sp.Mul.make_args(joined) if isinstance(f, sp.Add)]
    if isinstance(joined, sp.Add) or any(len(f.args) > 2 for f in inner):
        # nothing in common beyond a number; or a longer sum left inside, which as one
        # product could not be broken over lines as its terms can
        return expr
    rest = [t for t in terms if t not in group]
    return sp.Add(joined, collected(sp.Add(*rest)) if rest else sp.Integer(0))


def _free(model: Model, q: NetTensor) -> tuple[sp.Symbol, ...]:
    """The free indices of a formula about ``q``: by its shape (a time axis takes t)."""
    return indices_for(q, shape=model.shapes.get(q))


def _indices(indexed: sp.Expr) -> tuple[sp.Expr, ...]:
    return tuple(indexed.indices) if isinstance(indexed, sp.Indexed) else ()


def applied_derivative(expr: sp.Expr) -> tuple[type, sp.Expr] | None:
    """(F, x) when ``expr`` is F'(x) of a generic function F (σ_l, an LSTM gate's σ_f): SymPy
    writes it Derivative(F(x), x) at an entry x, Subs(Derivative(F(ξ), ξ), ξ, x) at a sum."""
    if isinstance(expr, sp.Derivative) and isinstance(expr.expr, AppliedUndef) and \
            expr.variable_count == ((expr.expr.args[0], 1),):
        return expr.expr.func, expr.expr.args[0]
    if isinstance(expr, sp.Subs) and isinstance(expr.expr, sp.Derivative) and \
            isinstance(expr.expr.expr, AppliedUndef) and len(expr.variables) == 1:
        (variable,), (point,) = expr.variables, expr.point
        if expr.expr.variable_count == ((variable, 1),) and expr.expr.expr.args == (variable,):
            return expr.expr.expr.func, point
    return None


def _gate_function(eq: Equation) -> type:
    """The generic function of an op's own activation (σ_f of an LSTM's forget gate)."""
    return sp.Function(f"{'sigma' if eq.activation.name == 'sigmoid' else eq.activation.name}"
                       f"_{eq.target.role}")


def _activation_at(eq: Equation, argument: sp.Expr, derivative: ActivationDerivative
                   ) -> sp.Expr:
    """σ'(argument) of equation ``eq`` (a = σ(x)), written in its output a where possible:
    the output's entry is the one whose argument ``argument`` is (an LSTM's forget gate
    f_{tj} = σ(z_{t, j+n}) at the argument z_{tu} is f_{t, u-n})."""
    solved = _solved_indices(eq.argument, argument, eq.indices)
    output = entry(eq.target, tuple(solved.get(i, i) for i in eq.indices))
    return derivative.at(argument, output)


def _solved_indices(pattern: sp.Expr, actual: sp.Expr, indices: tuple[sp.Symbol, ...]
                    ) -> dict[sp.Symbol, sp.Expr]:
    """The values of ``indices`` that make the entries of ``pattern`` those of ``actual``
    (both read the same arrays, in the same order): each index position solved for the one
    index it holds (j + n = u: j = u - n)."""
    def entries(expr: sp.Expr) -> list[sp.Indexed]:
        return sorted(expr.atoms(sp.Indexed), key=lambda e: sp.default_sort_key(e.base))

    solved: dict[sp.Symbol, sp.Expr] = {}
    for mine, theirs in zip(entries(pattern), entries(actual)):
        for position, value in zip(mine.indices, theirs.indices):
            unknown = [i for i in indices if position.has(i) and i not in solved]
            if len(unknown) == 1 and sp.expand(position).coeff(unknown[0]) == 1:
                solved[unknown[0]] = sp.expand(value - (position - unknown[0]))
    return solved


def _softmax_in_outputs(derivative: sp.Expr, expr: sp.Expr, output: sp.Expr) -> sp.Expr:
    """Each quotient e^{z_x} / sum_m e^{z_m} of a softmax derivative written as the output
    a_x it defines (the forward expression ``expr`` of ``output``). A masked softmax (each
    exponential times a bracket [x ≤ t], causal attention) has a_x = [x ≤ t] e^{z_x} / sum:
    a bracket beside the output it masks is 1 wherever that output is not 0."""
    normalisers = [s for s in sp.preorder_traversal(expr) if isinstance(s, sp.Sum)]
    if len(normalisers) != 1:
        return derivative
    (normaliser,) = normalisers
    total = sp.Dummy("S")
    base = output.base
    numerator = next(s for s in sp.preorder_traversal(expr)
                     if isinstance(s, sp.exp) and isinstance(s.args[0], sp.Indexed))
    z_base = numerator.args[0].base
    (summed, _low, _high), = normaliser.limits
    masks = [f for f in sp.Mul.make_args(normaliser.function) if isinstance(f, InRange)]
    local = sp.expand(derivative.xreplace({normaliser: total}).replace(
        lambda e: isinstance(e, sp.exp) and isinstance(e.args[0], sp.Indexed)
        and e.args[0].base == z_base,
        lambda e: base[e.args[0].indices] * total))
    if local.has(total):
        return derivative
    if masks:
        (mask,) = masks
        position = next(iter(normaliser.function.atoms(sp.Indexed))).indices.index(summed)

        def unmasked(term: sp.Expr) -> sp.Expr:
            factors = list(sp.Mul.make_args(term))
            for found in [f for f in factors if isinstance(f, sp.Indexed) and f.base == base]:
                bracket = mask.xreplace({summed: found.indices[position]})
                if bracket in factors:
                    factors.remove(bracket)
            return sp.Mul(*factors)

        local = sp.Add(*(unmasked(term) for term in sp.Add.make_args(local)))
    return local


def _why_chain(q: NetTensor, consumers: list[Equation], loss_too: bool = False) -> str:
    if loss_too:
        return ("the cost depends on the output through the loss and through the quantities "
                "of the network that read it: first those")
    if len(consumers) == 1:
        return "the cost depends on this quantity only through the one quantity that reads it"
    return ("the cost depends on this quantity through every quantity that reads it: the chain "
            "rule sums their contributions")


def _why_local(eq: Equation, q: NetTensor) -> str:
    if eq.activation is not None:
        return "an elementwise activation: each output depends on its own input only"
    return "differentiate the forward expression that reads it"
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


#: The most operations of an activation whose inverse is searched to write σ' in a
#: (softplus, log(1 + exp(z)), has 3).
_MAX_INVERTED_OPS = 4
#: The most operations of σ'(z) that ``sympy.simplify`` is asked to shorten (silu's has 11).
_MAX_SIMPLIFIED_OPS = 24


def _inverted(value: sp.Expr, f: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(``value`` (in z) rewritten in a = f(z), the inverse z(a)) by inverting f, when f is
    short and its inverse unique; None otherwise. sympy.solve's time grows fast with nesting (tanh(tanh(tanh(z)))
    took minutes), so only short expressions are tried; the root is not checked by solve,
    since every rewrite is checked by the caller."""
    fe = elementary(f)
    if fe.has(sp.Piecewise) or fe.count(Z) != 1 or sp.count_ops(fe) > _MAX_INVERTED_OPS:
        return None
    try:
        inverses = sp.solve(sp.Eq(fe, A), Z, check=False, simplify=False)
    except NotImplementedError:
        return None
    if len(inverses) != 1:
        return None
    raw_a = elementary(value).subs(Z, inverses[0])
    return _simplest(sp.simplify(raw_a), sp.expand(sp.simplify(raw_a))), inverses[0]


def _in_output(value: sp.Expr, f: sp.Expr) -> tuple[sp.Expr, str, sp.Eq | None] | None:
    """(``value`` written in a = f(z) without z, how, the equation used): f(z) replaced by a,
    else f inverted; None when neither removes z."""
    substituted = value.xreplace({f: A})
    if not substituted.has(Z):
        return substituted, "replace sigma(z) by the layer output a", None
    inverted = _inverted(value, f)
    if inverted is None or inverted[0].has(Z):
        return None
    return (inverted[0], "solve a = sigma(z) for z and substitute",
            sp.Eq(Z, inverted[1], evaluate=False))


def _signs_agree(f: sp.Expr) -> bool:
    """Whether f(z) > 0 exactly where z > 0, for f = Piecewise((p, z > 0), (n, True)): p(t) > 0
    for every t > 0, and n(-s) ≤ 0 for every s ≥ 0 (n itself, or n(0) ≤ 0 and n' ≥ 0 there,
    for an n with no jump or kink, whose derivative sympy.diff would not see), each proved by
    SymPy's assumptions (None, not proved, counts as no)."""
    if not (isinstance(f, sp.Piecewise) and len(f.args) == 2 and f.args[0].cond == (Z > 0)
            and f.args[1].cond == sp.true):
        return False
    positive, negative = f.args[0].expr, f.args[1].expr
    t, s = sp.Dummy("t", positive=True), sp.Dummy("s", nonnegative=True)
    smooth = not negative.has(sp.Piecewise, sp.Heaviside, sp.sign, sp.Abs, sp.Max, sp.Min,
                              sp.floor, sp.ceiling)
    below = negative.subs(Z, -s).is_nonpositive or (smooth and (
        negative.subs(Z, 0).is_nonpositive and sp.diff(negative, Z).subs(Z, -s).is_nonnegative))
    return bool(positive.subs(Z, t).is_positive and below)


def _piecewise_in_output(derivative: sp.Expr, f: sp.Expr) -> sp.Expr | None:
    """σ'(z) = Piecewise((p', z > 0), (n', True)) of σ = Piecewise((p, z > 0), (n, True))
    written in a, branch by branch: the condition z > 0 becomes a > 0 where the signs of a and
    z agree (relu: [z > 0] = [a > 0]), and each branch's value is written in that branch's
    own expression of a (elu: e^z = a + 1 where z ≤ 0). None when a branch keeps z."""
    if not (_signs_agree(f) and isinstance(derivative, sp.Piecewise)
            and [c for _, c in derivative.args] == [c for _, c in f.args]):
        return None
    branches = []
    for (value, condition), (own, _) in zip(derivative.args, f.args):
        found = (value,) if not value.has(Z) else _in_output(value, own)
        if found is None:
            return None
        branches.append((found[0], condition.xreplace({Z: A})))
    return sp.Piecewise(*branches)


@cache
def activation_derivative(activation: Activation) -> ActivationDerivative:
    """sigma'(z) by ``sympy.diff``, and its rewrite in a = sigma(z) when one exists.

    The rewrite is searched three ways: replacing sigma(z) by a in sigma'(z) (sigmoid, tanh),
    inverting a = sigma(z) for z when the inverse is unique (softplus), or branch by branch
    for a function defined piecewise on the sign of z whose output has the sign of z (relu,
    leaky relu, elu: the condition z > 0 is a > 0). A rewrite is kept only if it contains no z
    and sigma'(z) == rewrite(sigma(z)) is confirmed (at z = 0 too, a piecewise one's boundary).
    """
    f = activation.expr
    raw = sp.diff(f, Z)
    # simplify's time grows fast with the size of what it simplifies (seconds for six nested
    # tanh): a long derivative is kept as differentiated
    in_z = _simplest(raw, sp.simplify(raw)) if sp.count_ops(raw) <= _MAX_SIMPLIFIED_OPS else raw
    sigma = sp.Function("sigma")
    steps = [Step("differentiate", sp.Derivative(sigma(Z), Z), in_z,
                  "differentiate the activation", sp.Eq(sigma(Z), f, evaluate=False))]
    if not in_z.has(Z):
        return ActivationDerivative(activation, in_z, in_z, tuple(steps))
    found = _in_output(in_z, f)
    if found is None:
        piecewise = _piecewise_in_output(in_z, f)
        found = None if piecewise is None else (piecewise, (
            "a > 0 exactly where z > 0; each branch's value written in that branch's a"), None)
    if found is not None:
        candidate, why, source = found
        if _same_function(candidate.subs(A, f), in_z, (*_CHECK_POINTS, 0.0)):
            steps.append(Step("rewrite in a", sp.Derivative(sigma(Z), Z), candidate,
                              why + "; checked: equal to sigma'(z) for every z", source))
            return ActivationDerivative(activation, in_z, candidate, tuple(steps))
    return ActivationDerivative(activation, in_z, None, tuple(steps))


# --- the formulas ------------------------------------------------------------------------


def derive(model: Model, progress: Report | None = None) -> Derivation:
    """Derive every backpropagation formula of ``model`` by one generic reverse pass
    (``progress`` is told of each node done)."""
    reverse = _Reverse(model)
    loss_gradient = _loss_gradient(model)
    reverse.loss_gradient = loss_gradient
    formulas: list[Formula] = [loss_gradient]
    for done, node in enumerate(reversed(model.nodes)):
        if progress is not None:
            progress("deriving", done, model.depth)
        for eq in reversed(node.equations):
            if reverse.is_inline(eq.target):
                continue  # substituted where it is used (the output's: the loss gradient)
            formulas.append(_adjoint_formula(reverse, node, eq.target, loss_gradient))
        for parameter in node.parameters:
            formulas.append(_gradient_formula(reverse, node, parameter.tensor, loss_gradient))
    return Derivation(model, tuple(formulas), reverse.derivatives)


def _label(model: Model, node: Node, kind: str, role: str = "") -> str:
    """BP1–BP4 where a formula is the classic one: dense layers (BP2 in a plain chain)."""
    if node.op.name != "dense":
        return ""
    if kind == "delta":
        if node.index == model.depth:
            return "BP1"
        return "BP2" if model.is_chain else ""
    return {"b": "BP3", "w": "BP4"}.get(role, "")


def _loss_gradient(model: Model) -> Formula:
    out = model.output
    free = _free(model, out.output)         # (j,), or (t, j) for a sequence output
    lhs = partial(C, entry(out.output, free))
    cost = _relabel(model.cost, (), (), set(free))     # its sums' indices apart from free
    raw = collapse(sp.diff(cost, entry(out.output, free)))
    rhs = _simplest(raw, sp.together(raw), sp.factor(raw))
    steps = (
        Step("definition", C, model.cost, "the per-sample cost sums the loss over the outputs"
             + (" and the time steps" if len(free) == 2 else "")),
        Step("differentiate", lhs, rhs,
             "only the term of step t and i = j of the sums depends on a^L_tj (Kronecker delta)"
             if len(free) == 2 else
             "only the term i = j of the sum depends on a^L_j (Kronecker delta)"),
    )
    return Formula(f"dC/da^{model.depth}", "", lhs, rhs, rhs, free, steps, of=out.output,
                   node=out.index, kind="loss gradient", ranges=model.shapes[out.output],
                   widths=model.feature_widths, loss_part=model.output_read_again)


def _target_sums(expr: sp.Expr, model: Model) -> list[sp.Sum]:
    """The sums of every target component, sum_i y_i (of a step: sum_i y_{ti}), in
    ``expr``."""
    y = model.y
    return [s for s in expr.atoms(sp.Sum)
            if len(s.limits) == 1 and isinstance(s.function, sp.Indexed)
            and s.function.base == y and s.function.indices[-1] == s.limits[0][0]
            and not any(i.has(s.limits[0][0]) for i in s.function.indices[:-1])]


def _finish(reverse: _Reverse, target: sp.Expr, generic: sp.Expr, loss_gradient: Formula,
            steps: list[Step]) -> tuple[sp.Expr, tuple[str, ...]]:
    """The concrete form of ``generic``, with the steps and assumptions that led there."""
    model = reverse.model
    concrete = collected(reverse.concrete(generic, loss_gradient))
    if concrete == generic:
        return concrete, ()
    uses_loss = any(isinstance(d, sp.Derivative) and d.expr == C
                    and tensor_of(d.variables[0]) == reverse.output
                    for d in generic.atoms(sp.Derivative))
    steps.append(Step("substitute", target, concrete,
                      "insert dC/da^L and the activation derivative" if uses_loss
                      else "insert the activation derivative"))
    assumptions: tuple[str, ...] = ()
    if model.loss.needs == "distribution":
        sums = _target_sums(concrete, model)
        if sums:
            concrete = collapse(concrete.xreplace({s: sp.Integer(1) for s in sums}))
            assumptions = ("sum_j y_j = 1 (the target is a probability vector)",)
            steps.append(Step("assumption", target, concrete,
                              "the targets sum to one: sum_i y_i = 1"))
    if uses_loss:
        simplified = _simplest(concrete, sp.cancel(concrete), sp.factor(concrete))
        if simplified != concrete:
            steps.append(Step("simplify", target, simplified, "cancel common factors"))
            concrete = simplified
    distributed, at_last = _multiplied_out(concrete, _last_states(model))
    if distributed != concrete:
        steps.append(Step("simplify", target, distributed,
                          MULTIPLIED_OUT_LAST if at_last else MULTIPLIED_OUT))
        concrete = distributed
    return concrete, assumptions


#: the step that multiplies a factor into the one term of a sum it cancels against (at the
#: last step only, where the last state h_T is the output a, for a layer that returns it)
MULTIPLIED_OUT = "multiply the activation derivative into the loss's part, where the two cancel"
MULTIPLIED_OUT_LAST = MULTIPLIED_OUT + " (at t = T, where h_T is the output a)"


def _last_states(model: Model) -> dict[NetTensor, NetTensor]:
    """state h -> a for every layer that returns its last state only (a_j = h_{Tj})."""
    out = {}
    for eq in model.equations:
        read = tensor_of(eq.expr)
        if eq.inline and read is not None and eq.expr.indices[0] == LENGTH:
            out[read] = eq.target
    return out


def _multiplied_out(expr: sp.Expr, last: Mapping[NetTensor, NetTensor]
                    ) -> tuple[sp.Expr, bool]:
    """A product F (A + L) as F A + F L where F L cancels to a form without division: a
    sigmoid state's derivative h (1 - h) against the loss's part of a recurrent output under
    binary cross-entropy, -(a - y)/(a (a - 1)) at t = T (h_T is a), which gives a - y, the
    textbook's form, and no 0/0 where a rounds to 1. The terms that do not cancel keep F.
    Also whether a cancelled term holds at t = T only (a last state read as the output)."""
    if not isinstance(expr, sp.Mul):
        return expr, False
    for inner in (f for f in expr.args if isinstance(f, sp.Add)):
        factor = expr / inner
        kept, cancelled = [], []
        for term in inner.args:
            value = _cancelled(factor * term, last)
            if value is None:
                kept.append(term)
            else:
                cancelled.append(value)
        if cancelled:
            at_last = any(isinstance(f, sp.KroneckerDelta) and LENGTH in f.args
                          for term in cancelled for f in sp.Mul.make_args(term))
            return factor * sp.Add(*kept) + sp.Add(*cancelled), at_last
    return expr, False


def _cancelled(product: sp.Expr, last: Mapping[NetTensor, NetTensor]) -> sp.Expr | None:
    """``product`` with its division cancelled away, or None where it has none or one is
    left. Under [t = T] (a Kronecker delta with the length T) the product is taken at t = T,
    where a layer's last state h_T is its output a."""
    if not any(isinstance(p, sp.Pow) and p.exp.is_negative
               for p in sp.preorder_traversal(product)):
        return None
    brackets = [f for f in sp.Mul.make_args(product)
                if isinstance(f, sp.KroneckerDelta) and LENGTH in f.args]
    rest = product / sp.Mul(*brackets)
    for bracket in brackets:
        (step,) = [arg for arg in bracket.args if arg != LENGTH]
        rest = rest.subs(step, LENGTH).replace(
            lambda e: isinstance(e, sp.Indexed) and tensor_of(e) in last
            and e.indices[0] == LENGTH,
            lambda e: entry(last[tensor_of(e)], e.indices[1:]))
    value = sp.cancel(rest)
    if sp.fraction(sp.together(value))[1] != 1:
        return None
    return sp.Mul(*brackets) * sp.factor_terms(value)


def _adjoint_formula(reverse: _Reverse, node: Node, q: NetTensor, loss_gradient: Formula
                     ) -> Formula:
    model = reverse.model
    free = _free(model, q)
    is_delta = q in reverse.delta_of
    lhs = reverse.reference(q, free)
    steps: list[Step] = []
    if is_delta:
        what = "pre-activation" if q.role == "z" else "output"
        steps.append(Step("definition", lhs, partial(C, entry(q, free)),
                          f"the error of node {node.index} is the derivative of the cost with "
                          f"respect to its {what}"))
    derived = reverse.adjoint(node, q, lhs, loss_gradient)
    kind = "delta" if is_delta else "adjoint"
    key = f"delta^{node.index}" if is_delta else f"dC/d{q.role}^{node.index}"
    return Formula(key, _label(model, node, kind), lhs, derived.concrete, derived.generic, free,
                   _joined(tuple(steps), derived.steps), derived.assumptions, of=q,
                   node=node.index, kind=kind, ranges=model.shapes[q],
                   widths=model.feature_widths)


def _gradient_formula(reverse: _Reverse, node: Node, q: NetTensor, loss_gradient: Formula
                      ) -> Formula:
    model = reverse.model
    free = _free(model, q)
    lhs = partial(C, entry(q, free))
    derived = reverse.adjoint(node, q, lhs, loss_gradient)
    steps = derived.steps
    if derived.penalty != 0:
        steps = _joined(steps, (Step(
            "differentiate", partial(R, entry(q, free)), derived.penalty,
            "differentiate the regularization penalty R, added once to the batch cost",
            sp.Eq(R, model.penalty, evaluate=False)),))
    return Formula(f"dC/d{q.role}^{node.index}", _label(model, node, "gradient", q.role), lhs,
                   derived.concrete, derived.generic, free, steps, derived.assumptions, of=q,
                   node=node.index, kind="gradient", penalty=derived.penalty,
                   ranges=model.shapes[q], widths=model.feature_widths)

"""Verification by expansion: the derived formulas against direct differentiation.

For concrete widths, every input, target, parameter and dropout-mask entry becomes its own
symbol, and every forward equation of the model (the ops' own index-form expressions, in
evaluation order) is expanded entry by entry into SymEngine expressions of those leaves. The
per-sample cost C becomes one scalar expression, which is differentiated directly with respect
to every parameter entry. The adjoint ∂C/∂q of an intermediate quantity q (a node's error δ,
the mean of a layer norm, ...) comes from the same expansion: each entry of q is computed as
its forward expression plus a perturbation leaf e, and ∂C/∂e at e = 0 is ∂C/∂q. None of this
reads the derivation.

The derived formulas are then evaluated the way backpropagation evaluates them: in the
derivation's order, each one instantiated at concrete indices, its sums expanded over the
concrete widths, and the quantities it reads (forward values, δ's and adjoints computed by
earlier formulas) looked up. Every entry must agree with the direct derivative: exactly (the
difference expands to zero) where that is affordable, otherwise numerically at random points
with 50-digit arithmetic, where the direct derivatives at a point come from reverse
accumulation over the same expanded entries (:mod:`derive.verify.tape`), which equals the
derivative of the expanded C and costs one sweep instead of one expression per leaf. The
regularization's part of a weight's gradient, ∂R/∂w, is checked on its own against the
expanded penalty R. Networks over the parameter budget are checked on the copy that
:mod:`derive.verify.reduction` builds and justifies: every layer kind in its position, repeated
layers left out where their formulas are shown to be another layer's, widths capped.

The random points, the capped copy and the 50-digit evaluation come from
:mod:`derive.verify.numeric`, which :mod:`derive.check.formulas` uses too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import symengine as se
import sympy as sp

from derive.derivation.reverse import Derivation, Formula
from derive.graph.model import Model, Node
from derive.limits import MAX_POINTS, check_count
from derive.quantities import LENGTH, NetTensor, entry, index_family, tensor_of
from derive.registry.functions import elementary
from derive.registry.ops import Equation
from derive.registry.windows import InRange
from derive.spec.load import NetworkSpec
from derive.verify.numeric import (
    DIGITS,
    PARAMETER_BUDGET,
    TOLERANCE,
    Batch,
    fold_constants,
    random_point,
    real_value,
)
from derive.verify.reduction import CheckedCopy, checked_copy, network_shape
from derive.verify.tape import Tape

#: Exact symbolic comparison is attempted up to this many parameters.
SYMBOLIC_LIMIT = 16

Key = sp.Expr          # an entry of a quantity: Indexed, rank-0 NetTensor or Derivative(C, q)
Index = tuple[int, ...]


@dataclass(frozen=True)
class Check:
    """How one formula (all its entries) was verified."""

    formula: str         # e.g. "delta^2", "dC/dw^1", "dC/dw^1 + penalty" (display only)
    equation: str        # "BP1".."BP4", or ""
    entries: int
    method: str          # "symbolic identity" or "numeric: N points, 50 digits"
    max_error: float     # largest relative difference seen (0 for symbolic identity)
    ok: bool
    kind: str = ""       # the formula's kind; "penalty" for the regularization's part


@dataclass(frozen=True)
class Report:
    """The outcome of verifying one spec."""

    name: str
    sizes: tuple[int, ...]           # the widths that were expanded, n_0 .. n_L
    original_sizes: tuple[int, ...]
    parameters: int
    checks: tuple[Check, ...]
    assumptions: tuple[str, ...]
    seconds: float
    budget: int = PARAMETER_BUDGET
    copy: CheckedCopy | None = None  # what was expanded for a network over the budget
    shapes: tuple[tuple[int, ...], ...] = ()   # the per-sample shapes expanded, x first

    @property
    def ok(self) -> bool:
        covered = self.copy is None or self.copy.mismatch is None
        return covered and all(check.ok for check in self.checks)

    @property
    def reduced(self) -> bool:
        return self.sizes != self.original_sizes

    def lines(self) -> list[str]:
        """The report as text, one line per formula."""
        shape = network_shape(self.shapes or tuple((n,) for n in self.sizes))
        out = [(f"verify {self.name}: expanded the {shape} network into one scalar loss C "
               f"and differentiated it directly ({self.parameters} parameters)")]
        if self.copy is not None:
            out += self.copy.lines()
        for assumption in self.assumptions:
            out.append(f"  assuming {assumption}")
        width = max((len(check.formula) for check in self.checks), default=10)
        for check in self.checks:
            mark = "ok      " if check.ok else "MISMATCH"
            error = ("" if check.method == "symbolic identity" or math.isnan(check.max_error)
                     else f", max rel. error {check.max_error:.1e}")
            out.append(f"  {mark} {check.equation or '   '} {check.formula:<{width}} "
                       f"{check.entries:>4} {'entry  ' if check.entries == 1 else 'entries'}  "
                       f"{check.method}{error}")
        verdict = "all formulas agree" if self.ok else "MISMATCH: see above"
        out.append(f"{verdict} ({self.seconds:.2f} s)")
        return out


# --- entry points -------------------------------------------------------------------------


def verify(spec: NetworkSpec, *, points: int = 20, seed: int = 0,
           budget: int = PARAMETER_BUDGET,
           progress: Callable[[str], None] | None = None) -> Report:
    """Verify the derivation of ``spec`` against direct differentiation of the expanded loss,
    on the copy :func:`derive.verify.reduction.checked_copy` gives (``spec`` itself within
    ``budget`` parameters), at most :data:`derive.limits.MAX_POINTS` ``points``."""
    start = time.perf_counter()
    check_count("points", points, MAX_POINTS, "MAX_POINTS")
    if progress:
        progress("deriving the network and the copy to expand")
    copy = checked_copy(spec, budget)
    report = verify_derivation(copy.derivation, points=points, seed=seed, progress=progress,
                               names=dict(copy.names))
    return dataclasses.replace(report, name=spec.name, original_sizes=spec.sizes,
                               budget=budget, seconds=time.perf_counter() - start,
                               copy=copy if copy.spec != spec else None)


def verify_derivation(derivation: Derivation, *, points: int = 20, seed: int = 0,
                      progress: Callable[[str], None] | None = None,
                      names: Mapping[str, str] | None = None) -> Report:
    """Check every formula of ``derivation`` at its model's concrete widths (no reduction).
    ``names``: how the report calls a formula (by its key; the key itself where absent)."""
    start = time.perf_counter()
    model = derivation.model
    formulas = derivation.formulas
    perturb = {f.of for f in formulas if f.kind != "gradient" and f.of is not None}
    if progress:
        progress("expanding the forward equations into one scalar loss C")
    instance = Instance(model, perturb=perturb)
    symbolic = (instance.parameter_count <= SYMBOLIC_LIMIT
                and model.loss.needs != "distribution")
    if progress and symbolic:
        progress("differentiating C directly")
    # the loss gradient of an output the network reads again (a recurrent layer's state,
    # read at the step after) is the loss's own part of ∂C/∂h_t: checked on the loss alone
    alone = {id(formula): _loss_alone_plan(instance, formula) for formula in formulas}
    plans = [_Plan((), (), ()) if alone[id(formula)] is not None else
             _plan(instance, formula, symbolic) for formula in formulas]
    penalties = [_penalty_plan(instance, formula) for formula in formulas]

    rng = random.Random(seed)
    samples = [instance.random_point(rng) for _ in range(points)]
    if progress:
        progress(f"evaluating backpropagation and the direct derivatives at {points} random "
                 "points")
    # per point: every formula entry as backprop computes it, and its direct derivative
    keys = [key for plan in plans for key in plan.keys]
    variables = [v for plan in plans for v in plan.variables]
    numeric: list[tuple[list[se.Basic | None], list[se.Basic | None]]] = []
    missing: set[Key] = set()
    for point in samples:
        swept = instance.sweep(point)
        if swept is None:
            continue  # outside the domain of a custom function: no real forward pass
        values, direct = swept
        env = backprop_values(instance, derivation, values, numeric=True)
        missing.update(key for key in keys if key not in env)
        derived = [real_value(env[key]) if key in env else None for key in keys]
        numeric.append((derived, [direct[v] for v in variables]))

    symbolic_env: dict[Key, se.Basic] | None = None
    if symbolic:
        zero = instance.at_zero_error
        symbolic_env = backprop_values(instance, derivation,
                                       {q: v.subs(zero) for q, v in instance.values.items()})
    checks: list[Check] = []
    offset = 0
    for formula, plan, penalty in zip(formulas, plans, penalties):
        name = (names or {}).get(formula.key, formula.key)
        if progress:
            progress(f"checking {name}")
        if alone[id(formula)] is not None:
            checks.append(_check_part(formula, name, alone[id(formula)], samples,
                                         label=f"{name} (the loss alone)", kind=formula.kind))
        elif plan.error is not None:
            checks.append(_failed(formula, name, 0, f"cannot be checked: {plan.error}"))
        elif missing.intersection(plan.keys):
            checks.append(_failed(formula, name, len(plan.keys),
                                  _why_missing(instance, formula, plan, derivation)))
        else:
            checks.append(_check_formula(instance, formula, name, plan, numeric, offset,
                                         symbolic_env))
        offset += len(plan.keys)
        if penalty is not None:
            checks.append(_check_part(formula, name, penalty, samples))
    assumptions = tuple(dict.fromkeys(a for f in formulas for a in f.assumptions))
    sizes = model.spec.sizes
    return Report(model.spec.name, sizes, sizes, instance.parameter_count, tuple(checks),
                  assumptions, time.perf_counter() - start, shapes=model.spec.shapes)


# --- the concrete instance ----------------------------------------------------------------


class MissingQuantity(KeyError):
    """A formula reads a quantity that is not known (yet) where it is evaluated."""


class Instance:
    """One concrete-width copy of the model: leaf symbols and expanded forward expressions.

    ``values`` maps every entry of every quantity (``x``, ``y``, parameters, masks and each
    equation's target; Indexed, or the NetTensor itself at rank 0) to its expanded SymEngine
    expression. The entries of the quantities in ``perturb`` (default: every equation target)
    carry a perturbation leaf (``errors``), so that ∂C/∂e at e = 0 is their adjoint. Other
    formulas can be evaluated on the same instance (:meth:`instantiate`,
    :func:`backprop_values`).
    """

    def __init__(self, model: Model, perturb: Iterable[NetTensor] | None = None) -> None:
        self.model = model
        self.sizes: dict[sp.Symbol, int] = {size: int(n) for size, n in model.widths.items()}
        self.leaves: list[se.Symbol] = []
        self.leaf_tensors: list[tuple[se.Symbol, NetTensor]] = []  # each leaf, its quantity
        self.target_steps: dict[se.Symbol, tuple] = {}    # a sequence target's entry: its step
        self.values: dict[Key, se.Basic] = {}
        self.parameters: dict[Key, se.Symbol] = {}
        self.errors: dict[Key, se.Symbol] = {}       # perturbed entry -> its leaf e
        self.shapes: dict[NetTensor, Index] = {}
        self._leaf_of: dict[Key, se.Symbol] = {}
        self._templates: dict[tuple[sp.Expr, tuple[sp.Symbol, ...]], _Template] = {}
        self._keys: dict[tuple, list[tuple[Index, Key]]] = {}
        self._interned: dict[Key, Key] = {}     # one object per key: dict lookups by identity
        self.tape = Tape()                      # the same entries, each reading its inputs
        self.nodes: dict[Key, int] = {}         # every key of ``values`` -> its tape node
        targets = {eq.target for eq in model.equations}
        self._defined: set[NetTensor] = set()        # quantities whose values are known
        perturbed = targets if perturb is None else set(perturb)

        x, y = model.x.label, model.y.label
        self.shapes.update((tensor, self.concrete_shape(shape))
                           for tensor, shape in model.shapes.items())
        self.inputs = [self._leaf(entry(x, index), "_".join(["x", *map(str, index)]))
                       for index in _indices(self.shapes[x])]
        self.targets = [self._leaf(entry(y, index), "_".join(["y", *map(str, index)]))
                        for index in _indices(self.shapes[y])]
        self._zero = self.tape.node(se.Integer(0), (), ())   # an entry in the padding
        for parameter in model.parameters:
            tensor = parameter.tensor
            self.shapes[tensor] = tuple(parameter.shape)
            for index in _indices(parameter.shape):
                key = entry(tensor, index)
                self.parameters[key] = self._leaf(key, _leaf_name(tensor, index))
        self._defined = {x, y, *(p.tensor for p in model.parameters)}

        def lookup(key: Key) -> se.Basic:
            if key in self.values:
                return self.values[key]
            tensor = tensor_of(key)
            if tensor is None or tensor in targets:
                raise MissingQuantity(f"{key} is read before it is computed")
            # a leaf the graph reads but does not compute (a dropout mask): an input
            return self._leaf(key, _leaf_name(tensor, _concrete(key)))

        for node in model.nodes:
            for eq, index in self._in_order(node):
                template = self._template(eq.expr, eq.indices)
                if True:
                    at = tuple(sp.sympify(i).xreplace(self.sizes) for i in
                               eq.target_indices(tuple(map(sp.Integer, index))))
                    key = self.intern(entry(eq.target, at))
                    value = template.at(self, index, lookup)
                    self.nodes[key] = self._node(template, index)
                    if eq.target in perturbed:
                        error = se.Symbol(f"e_{_leaf_name(eq.target, index)}")
                        self.errors[key] = error
                        self._leaf_of[key] = error
                        value = value + error
                    self.values[key] = value
            self._defined.update(eq.target for eq in node.equations)
        self.cost: se.Basic = self._template(model.cost, ()).at(self, (), lookup)
        self.cost_node = self._node(self._template(model.cost, ()), ())
        self.penalty: se.Basic = self._template(model.penalty, ()).at(self, (), lookup)

    def _in_order(self, node: Node) -> Iterator[tuple[Equation, Index]]:
        """Every entry of ``node``'s equations, in an order that computes each before it is
        read: equation by equation; a recurrent layer's (which reads its own state at the
        step before) step by step, its equations in order within each step."""
        timed = [eq for eq in node.equations
                 if eq.indices and index_family(eq.indices[0]) == "time"]
        targets = {e.target for e in timed}
        recurrent = any(
            tensor_of(found) in targets and (eq.indices[0] - found.indices[0]).is_positive
            for eq in timed for found in eq.expr.atoms(sp.Indexed))   # reads h_{t-1}
        if not recurrent:
            for eq in node.equations:
                for index in _indices(self.concrete_shape(eq.ranges)):
                    yield eq, index
            return
        length = self.concrete_shape((LENGTH,))[0]
        for step in range(1, length + 1):
            for eq in timed:
                for index in _indices(self.concrete_shape(eq.ranges[1:])):
                    yield eq, (step, *index)
        for eq in node.equations:
            if eq not in timed:
                for index in _indices(self.concrete_shape(eq.ranges)):
                    yield eq, index

    def concrete_shape(self, shape: Sequence[sp.Expr]) -> Index:
        return tuple(int(sp.sympify(n).xreplace(self.sizes)) for n in shape)

    def padding(self, key: Key) -> bool:
        """Whether ``key`` is an entry outside its quantity's shape (a convolution's zero
        padding); if so, it is registered as the constant 0."""
        if isinstance(key, sp.Derivative):      # an adjoint at δ_{T+1}: 0 as well
            entry_ = key.variables[0]
            tensor = tensor_of(entry_)
            return isinstance(entry_, sp.Indexed) and tensor in self.shapes and not all(
                1 <= int(i) <= n for i, n in zip(entry_.indices, self.shapes[tensor]))
        tensor = tensor_of(key)
        if tensor is not None and tensor.role == "delta":
            shape = self.shapes.get(self.model.node(tensor.node).forward.delta)
            return shape is not None and not all(
                1 <= int(i) <= n for i, n in zip(key.indices, shape))
        shape = self.shapes.get(tensor) if tensor is not None else None
        if shape is None or not isinstance(key, sp.Indexed) or all(
                1 <= int(i) <= n for i, n in zip(key.indices, shape)):
            return False
        self.values[key] = se.Integer(0)
        self.nodes[key] = self._zero
        return True

    @property
    def parameter_count(self) -> int:
        return len(self.parameters)

    @property
    def at_zero_error(self) -> dict[se.Symbol, se.Basic]:
        return {error: se.Integer(0) for error in self.errors.values()}

    def entries(self, formula: Formula) -> list[Index]:
        """Every concrete index of ``formula``'s free indices (the shape of what it
        differentiates)."""
        shape = self.shapes.get(formula.of)
        if shape is None or len(shape) != len(formula.indices):
            raise MissingQuantity(f"no quantity {formula.of} of rank {len(formula.indices)} "
                                  "in the expanded network")
        return _indices(shape)

    def keyed_entries(self, formula: Formula) -> list[tuple[Index, Key]]:
        """Each entry of ``formula`` with the key other formulas refer to it by: its lhs
        there (δ^l[2], Derivative(C, mu^3), Derivative(C, w^1[2, 1]))."""
        cache_key = (formula.lhs, formula.of, tuple(formula.indices))
        if cache_key not in self._keys:
            self._keys[cache_key] = [(index, self.intern(self.key(formula, index)))
                                     for index in self.entries(formula)]
        return self._keys[cache_key]

    def intern(self, key: Key) -> Key:
        return self._interned.setdefault(key, key)

    def key(self, formula: Formula, index: Index) -> Key:
        """How other formulas refer to ``formula``'s result at ``index``: its lhs there."""
        return formula.lhs.xreplace(dict(zip(formula.indices, map(sp.Integer, index))))

    def variable(self, formula: Formula, index: Index) -> se.Symbol:
        """The leaf to differentiate C by for ``formula`` at ``index``: the parameter entry,
        or the perturbation e of the quantity's entry."""
        key = entry(formula.of, tuple(map(sp.Integer, index)))
        if key not in self._leaf_of:
            raise MissingQuantity(f"nothing to differentiate by for {key}")
        return self._leaf_of[key]

    def _leaf(self, key: Key, name: str) -> se.Symbol:
        key = self.intern(key)
        symbol = se.Symbol(name)
        self.leaves.append(symbol)
        self.leaf_tensors.append((symbol, tensor_of(key)))
        if isinstance(key, sp.Indexed) and tensor_of(key).role == "y":
            self.target_steps[symbol] = tuple(key.indices[:-1])    # y_{ti}: step t
        self.values[key] = symbol
        self._leaf_of[key] = symbol
        self.nodes[key] = self.tape.leaf(symbol)
        return symbol

    def _node(self, template: _Template, index: Index) -> int:
        """The tape node of ``template`` at ``index``: its own expression, reading the nodes
        of the entries it reads (known by now: the expansion has read them)."""
        expr, args, keys = template.local(self, index)
        # an Iverson bracket (a causal mask's [τ ≤ t]) is a number at each entry
        brackets = {arg: se.Integer(int(key)) for arg, key in zip(args, keys) if key.is_Integer}
        if brackets:
            expr = expr.subs(brackets)
            args, keys = zip(*[(a, k) for a, k in zip(args, keys) if a not in brackets]) \
                if len(brackets) < len(args) else ((), ())
        return self.tape.node(expr, tuple(args), [self.nodes[key] for key in keys])

    def sweep(self, point: Mapping[se.Symbol, se.Basic]
              ) -> tuple[dict[Key, se.Basic], dict[Key, se.Basic | None]] | None:
        """At ``point``: the value of every entry (the keys of ``values``) and the direct
        derivative ∂C/∂q of C by each of them, by reverse accumulation over the entries
        (:mod:`derive.verify.tape`); None where a value is not a finite real number."""
        swept = self.tape.sweep(point, self.cost_node)
        if swept is None:
            return None
        values, adjoints = swept
        return ({key: values[n] for key, n in self.nodes.items()},
                {key: adjoints[n] for key, n in self.nodes.items()})

    def random_point(self, rng: random.Random) -> dict[se.Symbol, se.Basic]:
        """Random values for every leaf, masks included (they are inputs of C like any
        other), targets valid for the loss (:func:`derive.verify.numeric.random_point`);
        every perturbation e at 0."""
        point = random_point(rng, self.leaf_tensors, self.model.loss.needs,
                             steps=self.target_steps)
        point.update(self.at_zero_error)
        return point

    def instantiate(self, formula: Formula, index: Index, env: Mapping[Key, se.Basic], *,
                    numeric: bool = False) -> se.Basic:
        """The formula's rhs at concrete indices, with every quantity it reads from ``env``
        (forward values, and the δ's and adjoints ∂C/∂q computed before it). ``numeric``:
        ``env`` holds numbers, and so does the result."""
        return self.instantiate_expr(formula.rhs, formula.indices, index, env, numeric=numeric)

    def instantiate_expr(self, expr: sp.Expr, free: tuple[sp.Symbol, ...], index: Index,
                         env: Mapping[Key, se.Basic], *, numeric: bool = False) -> se.Basic:
        """``expr`` (index form, free indices ``free``) at ``index``, quantities from ``env``."""
        def lookup(key: Key) -> se.Basic:
            try:
                return env[key]
            except KeyError:
                if self.padding(key):
                    return se.Integer(0)
                raise MissingQuantity(f"reads {key}, not computed before it") from None

        value = self._template(expr, tuple(free)).at(self, index, lookup, numeric)
        if numeric:
            number = real_value(value)
            return value if number is None else number
        return value

    def _template(self, expr: sp.Expr, free: tuple[sp.Symbol, ...]) -> _Template:
        key = (expr, free)
        if key not in self._templates:
            self._templates[key] = _Template.compile(expr, free, self.sizes)
        return self._templates[key]


def _indices(shape: Sequence[int]) -> list[Index]:
    return list(itertools.product(*(range(1, n + 1) for n in shape)))


def _concrete(key: Key) -> Index:
    return tuple(int(i) for i in key.indices) if isinstance(key, sp.Indexed) else ()


def _leaf_name(tensor: NetTensor, index: Index) -> str:
    """``w1_2_3``, ``b1_2``, ``gamma3_1``, ``mask4_2`` (display names of SymEngine leaves)."""
    head = tensor.role if tensor.node is None else f"{tensor.role}{tensor.node}"
    return "_".join([head, *map(str, index)])


# --- index form -> SymEngine --------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """A quantity an expression reads: ``atom`` (with free indices) or, for ``of`` set, the
    adjoint Derivative(``cost``, ``of``[indices])."""

    symbol: se.Symbol
    atom: sp.Expr
    adjoint: _Adjoint | None = None

    def key(self, substitution: dict[sp.Symbol, sp.Integer]) -> Key:
        if self.adjoint is None:
            if not substitution:
                return self.atom
            tensor = tensor_of(self.atom)
            if isinstance(self.atom, sp.Indexed) and tensor is not None:
                # built once per entry (entry() caches): a new Indexed deduces its
                # assumptions, which a large feature map would pay for at every read
                return entry(tensor, tuple(sp.sympify(i).xreplace(substitution)
                                           for i in self.atom.indices))
            return self.atom.xreplace(substitution)
        cost, variable = self.adjoint
        if isinstance(self.atom, sp.Indexed):
            indices = tuple(sp.sympify(i).xreplace(substitution) for i in self.atom.indices)
            variable = variable.base[indices]
        return sp.Derivative(cost, variable)


@dataclass(frozen=True)
class _Template:
    """An index-form expression compiled once: sums expanded over the concrete widths, then
    converted to SymEngine with one placeholder per quantity it reads. Expressions that use a
    free index other than as an index (a Kronecker delta left over) are compiled per entry."""

    source: sp.Expr
    free: tuple[sp.Symbol, ...]
    sizes: Mapping[sp.Symbol, int]
    expr: se.Basic | None
    slots: tuple[_Slot, ...]
    numeric: se.Basic | None = None     # expr with its constants as 50-digit numbers
    keys: dict[Index, tuple[Key, ...]] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def compile(cls, source: sp.Expr, free: tuple[sp.Symbol, ...],
                sizes: Mapping[sp.Symbol, int]) -> _Template:
        hidden, adjoints = _hide_adjoints(sp.sympify(source))
        body = elementary(hidden.xreplace(dict(sizes)).doit())
        if body.has(sp.Sum):
            raise ValueError(f"cannot expand the sums of {source} at the widths {sizes}")
        # an Iverson bracket of the free indices (a kernel offset in range) is 0 or 1 at
        # each entry: one placeholder each, decided per entry like an entry's key
        brackets = sorted((b for b in body.atoms(InRange) if b.has(*free)),
                          key=sp.default_sort_key)
        atoms = [*sorted(body.atoms(sp.Indexed), key=sp.default_sort_key), *brackets]
        names = {atom: sp.Symbol(f"_slot{n}") for n, atom in enumerate(atoms)}
        body = body.xreplace(names)
        scalars = sorted(body.free_symbols - set(names.values()), key=sp.default_sort_key)
        if set(scalars) & set(free):
            return cls(source, free, sizes, None, ())
        for n, scalar in enumerate(scalars, start=len(atoms)):
            names[scalar] = sp.Symbol(f"_slot{n}")
        body = body.xreplace({s: names[s] for s in scalars})
        slots = []
        for atom, name in names.items():
            label = atom.base.label if isinstance(atom, sp.Indexed) else atom
            if isinstance(atom, InRange):
                slots.append(_Slot(se.Symbol(name.name), atom))
            elif label in adjoints:
                slots.append(_Slot(se.Symbol(name.name), atom, adjoints[label]))
            elif isinstance(label, NetTensor):
                slots.append(_Slot(se.Symbol(name.name), atom))
            else:
                raise ValueError(f"cannot evaluate {source}: unknown symbol {label}")
        expr = se.sympify(body)
        return cls(source, free, sizes, expr, tuple(slots), fold_constants([expr])[0])

    def local(self, instance: Instance, index: Index
              ) -> tuple[se.Basic, tuple[se.Symbol, ...], tuple[Key, ...]]:
        """The expression at ``index`` as a function of what it reads: its constants as
        numbers, its placeholders, and the key each placeholder stands for."""
        if self.expr is None:  # compiled per entry
            substitution = dict(zip(self.free, map(sp.Integer, index)))
            return instance._template(self.source.xreplace(substitution), ()).local(instance, ())
        return (self.numeric, tuple(slot.symbol for slot in self.slots),
                self._keys(instance, index))

    def _keys(self, instance: Instance, index: Index) -> tuple[Key, ...]:
        keys = self.keys.get(index)
        if keys is None:
            substitution = dict(zip(self.free, map(sp.Integer, index)))
            keys = self.keys[index] = tuple(instance.intern(slot.key(substitution))
                                            for slot in self.slots)
            for key in keys:
                if key not in instance.values:
                    instance.padding(key)
        return keys

    def at(self, instance: Instance, index: Index, lookup: Callable[[Key], se.Basic],
           numeric: bool = False) -> se.Basic:
        """The expression at ``index``, each quantity it reads from ``lookup``; ``numeric``:
        with its constants as numbers (for numeric values in ``lookup``, so that a piecewise
        condition like 0 < sqrt(2)*x is decided)."""
        if len(index) != len(self.free):
            raise ValueError(f"{len(self.free)} indices expected, got {index}")
        if self.expr is None:  # compiled per entry
            substitution = dict(zip(self.free, map(sp.Integer, index)))
            return instance._template(self.source.xreplace(substitution), ()).at(
                instance, (), lookup, numeric)
        expr = self.numeric if numeric else self.expr
        keys = self._keys(instance, index)
        if not keys:
            return expr
        return expr.subs({slot.symbol: se.Integer(int(key)) if key.is_Integer else lookup(key)
                          for slot, key in zip(self.slots, keys)})


#: An adjoint Derivative(C, q[...]) a formula reads: C, and q as written there.
_Adjoint = tuple[sp.Expr, sp.Expr]


def _hide_adjoints(expr: sp.Expr) -> tuple[sp.Expr, dict[sp.Symbol, _Adjoint]]:
    """``expr`` with each adjoint Derivative(C, q[i..]) replaced by a placeholder quantity
    (so that ``doit`` keeps it), and what each placeholder stands for."""
    adjoints: dict[sp.Symbol, _Adjoint] = {}
    labels: dict[tuple[sp.Expr, sp.Expr], sp.Symbol] = {}

    def placeholder(derivative: sp.Derivative) -> sp.Expr:
        (variable, count), = derivative.variable_count
        if tensor_of(variable) is None or count != 1:
            raise ValueError(f"cannot evaluate {derivative}: not an adjoint of a quantity")
        indexed = isinstance(variable, sp.Indexed)
        base = variable.base if indexed else variable
        label = labels.setdefault((derivative.expr, base), sp.Symbol(f"_adjoint{len(labels)}"))
        adjoints[label] = (derivative.expr, variable)
        return sp.IndexedBase(label)[variable.indices] if indexed else label

    hidden = expr.replace(lambda e: isinstance(e, sp.Derivative), placeholder)
    return hidden, adjoints


# --- backprop, as the derivation prescribes -----------------------------------------------


def backprop_values(instance: Instance, derivation: Derivation,
                    env: Mapping[Key, se.Basic], *, numeric: bool = False
                    ) -> dict[Key, se.Basic]:
    """``env`` extended with every entry of every formula, in the derivation's order (the
    loss gradient, then from the output back): δ^l under δ^l[j], an adjoint or gradient under
    Derivative(C, q[j, ...]). An entry that reads something not computed before it is left
    out (its check reports why). ``numeric``: ``env`` holds numbers (faster, and piecewise
    conditions are decided)."""
    env = dict(env)
    # an entry of a recurrence through time reads the node's formulas at the step after
    # (δ_t reads δ_{t+1}, ∂C/∂h_t reads δ_{t+1} of the stacked gates): it waits for them
    # while the formulas of its node are computed, tried again until none is added; what
    # stays left out, or reads a later node's formula, is not computable in this order
    waiting: list[tuple[Formula, Index, Key]] = []

    def settle() -> None:
        nonlocal waiting
        while waiting:
            left = []
            for formula, index, key in waiting:
                try:
                    env[key] = instance.instantiate(formula, index, env, numeric=numeric)
                except MissingQuantity:
                    left.append((formula, index, key))
            if len(left) == len(waiting):
                break
            waiting = left
        waiting = []

    node = None
    for formula in derivation.formulas:
        if formula.loss_part:
            # only the loss's own part of ∂C/∂h_t: the adjoint formula of h, under the same
            # name, is the whole (the loss's part is in it), which every other formula reads
            continue
        if formula.node != node:
            settle()
            node = formula.node
        try:
            entries = instance.keyed_entries(formula)
        except MissingQuantity:
            continue
        for index, key in entries:
            try:
                env[key] = instance.instantiate(formula, index, env, numeric=numeric)
            except MissingQuantity:
                waiting.append((formula, index, key))
    settle()
    return env


# --- the checks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What one formula is checked against: its entries, their keys, the entries of the
    quantity it differentiates (whose direct derivatives the tape gives at each point) and,
    for an exact comparison, the symbolic direct derivatives."""

    entries: tuple[Index, ...]
    keys: tuple[Key, ...]
    variables: tuple[Key, ...]
    direct: tuple[se.Basic, ...] = ()
    error: str | None = None


def _plan(instance: Instance, formula: Formula, symbolic: bool) -> _Plan:
    try:
        keyed = instance.keyed_entries(formula)
        leaves = [instance.variable(formula, index) for index, _ in keyed]
    except MissingQuantity as err:
        return _Plan((), (), (), error=str(err.args[0]))
    direct = tuple(se.diff(instance.cost, leaf) for leaf in leaves) if symbolic else ()
    return _Plan(tuple(index for index, _ in keyed), tuple(key for _, key in keyed),
                 tuple(instance.intern(entry(formula.of, tuple(map(sp.Integer, index))))
                       for index, _ in keyed), direct)


def _failed(formula: Formula, name: str, entries: int, why: str) -> Check:
    return Check(name, formula.equation, entries, why, float("nan"), False,
                 formula.kind)


def _check_formula(instance: Instance, formula: Formula, name: str, plan: _Plan,
                   numeric: list[tuple[list[se.Basic | None], list[se.Basic | None]]],
                   offset: int, symbolic_env: dict[Key, se.Basic] | None) -> Check:
    count = len(plan.keys)
    if symbolic_env is not None:
        zero = instance.at_zero_error
        if all(key in symbolic_env and se.expand(symbolic_env[key] - direct.subs(zero)) == 0
               for key, direct in zip(plan.keys, plan.direct)):
            return Check(name, formula.equation, count, "symbolic identity", 0.0, True,
                         formula.kind)
    worst = _worst((derived[offset:offset + count], expected[offset:offset + count])
                   for derived, expected in numeric)
    method = f"numeric: {len(numeric)} points, {DIGITS} digits"
    return Check(name, formula.equation, count, method, worst,
                 worst < TOLERANCE, formula.kind)


def _worst(pairs: Iterable[tuple[list[se.Basic | None], list[se.Basic | None]]]) -> float:
    """The largest relative difference |derived - direct| / max(1, |direct|); entries whose
    direct derivative has no real value (outside a custom function's domain) are skipped;
    NaN when nothing could be compared."""
    worst, compared = 0.0, 0
    for derived, expected in pairs:
        for mine, truth in zip(derived, expected):
            if truth is None:
                continue
            compared += 1
            if mine is None:
                worst = math.inf
                continue
            worst = max(worst, abs(float(mine - truth)) / max(1.0, abs(float(truth))))
    return worst if compared else math.nan


def _why_missing(instance: Instance, formula: Formula, plan: _Plan,
                 derivation: Derivation) -> str:
    """Which quantity ``formula`` reads before the derivation's order has computed it."""
    zero = instance.at_zero_error
    env = {q: v.subs(zero) for q, v in instance.values.items()}
    for earlier in derivation.formulas:
        if earlier is formula:
            break
        env = backprop_values(instance, dataclasses.replace(derivation, formulas=(earlier,)),
                              env)
    for index in plan.entries:
        try:
            instance.instantiate(formula, index, env)
        except MissingQuantity as err:
            return f"not computable in the derivation's order: {err.args[0]}"
    return "not computable in the derivation's order"


@dataclass(frozen=True)
class _PartPlan:
    """A part of a formula checked on its own: a penalty's ∂R/∂p, or the loss's own part of
    a recurrent output's gradient; the formula's entries, its values, the direct ones."""

    entries: tuple[Index, ...]
    derived: tuple[se.Basic, ...]
    direct: tuple[se.Basic, ...]


def _penalty_plan(instance: Instance, formula: Formula) -> _PartPlan | None:
    """∂R/∂p from the expanded penalty R against the formula's ``penalty``, for a parameter's
    gradient of a model with a penalty (None where both are zero: nothing to report)."""
    if formula.kind != "gradient" or instance.model.penalty == 0:
        return None
    reads = instance.penalty.free_symbols
    try:
        entries = tuple(instance.entries(formula))
        variables = [instance.variable(formula, index) for index in entries]
    except MissingQuantity:
        return None
    direct = tuple(se.diff(instance.penalty, v) if v in reads else se.Integer(0)
                   for v in variables)
    if sp.sympify(formula.penalty) == 0 and all(d == 0 for d in direct):
        return None
    derived = tuple(instance.instantiate_expr(sp.sympify(formula.penalty), formula.indices,
                                              index, instance.values) for index in entries)
    return _PartPlan(entries, derived, direct)


def _loss_alone_plan(instance: Instance, formula: Formula) -> _PartPlan | None:
    """The loss gradient of an output that the network reads too (a recurrent layer's state,
    read at the step after): the derivative of the loss alone by each output entry, its other
    paths left out, against the formula (None for any other formula). Through the network,
    ∂C/∂h_t also has the error the step after sends back, which the δ formulas add."""
    model = instance.model
    output = model.output.output
    if not formula.loss_part:
        return None
    entries = tuple(instance.entries(formula))
    stand_in = {instance.intern(entry(output, tuple(map(sp.Integer, index)))):
                se.Symbol(f"_output_{n}") for n, index in enumerate(entries)}

    def lookup(key: Key) -> se.Basic:
        key = instance.intern(key)
        return stand_in[key] if key in stand_in else instance.values[key]

    loss = instance._template(model.cost, ()).at(instance, (), lookup)
    back = {symbol: instance.values[key].subs(instance.at_zero_error)
            for key, symbol in stand_in.items()}
    direct = tuple(se.diff(loss, symbol).subs(back) for symbol in stand_in.values())
    derived = tuple(instance.instantiate(formula, index, instance.values) for index in entries)
    return _PartPlan(entries, derived, direct)


def _check_part(formula: Formula, name: str, plan: _PartPlan,
                   samples: list[dict[se.Symbol, se.Basic]], *, label: str | None = None,
                   kind: str = "penalty") -> Check:
    """The formula's part in ``plan`` (a penalty's ∂R/∂p, or the loss alone's gradient)
    against its direct derivative: a symbolic identity, else at ``samples``."""
    label = label or f"{name} + penalty"
    count = len(plan.entries)
    if all(se.expand(derived - direct) == 0
           for derived, direct in zip(plan.derived, plan.direct)):
        return Check(label, "", count, "symbolic identity", 0.0, True, kind)
    derived, direct = Batch(plan.derived), Batch(plan.direct)
    worst = _worst((derived.at(point), direct.at(point)) for point in samples)
    method = f"numeric: {len(samples)} points, {DIGITS} digits"
    return Check(label, "", count, method, worst, worst < TOLERANCE, kind)

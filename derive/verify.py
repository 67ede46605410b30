"""Verification by expansion: the derived formulas against direct differentiation.

For concrete sizes, every weight, bias, input and target becomes its own symbol; the network
is expanded into one scalar loss expression C(w, b, x, y), and C is differentiated directly
with respect to every parameter (SymEngine does the expansion and differentiation, which plain
SymPy cannot do fast enough past a few neurons). The derived formulas are instantiated for the
same sizes and evaluated the way backpropagation evaluates them (delta^L first, then down the
layers). Each gradient entry must agree with the direct derivative: exactly (the difference
expands to zero) where that is affordable, otherwise numerically at random points with
50-digit arithmetic. Networks too large to expand are checked on a copy with capped widths.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import symengine as se
import sympy as sp

from derive.derivation import Derivation, Formula, derive
from derive.functions import A, Y, Z, elementary
from derive.model import Model, build_model, j, k, quantity
from derive.spec import NetworkSpec

#: Precision of the numeric check: 50 decimal digits, with guard bits.
DIGITS = 50
_BITS = 200
_TOLERANCE = 10.0 ** -(DIGITS - 10)
#: Networks with more parameters than this are checked on a copy with capped widths: the
#: expanded loss of a wider network is too slow to differentiate.
PARAMETER_BUDGET = 120
#: Exact symbolic comparison is attempted up to this many parameters.
SYMBOLIC_LIMIT = 16


@dataclass(frozen=True)
class Check:
    """How one formula (all its entries for one layer) was verified."""

    formula: str         # e.g. "delta^2", "dC/dw^1"
    equation: str        # "BP1".."BP4"
    entries: int
    method: str          # "symbolic identity" or "numeric: N points, 50 digits"
    max_error: float     # largest relative difference seen (0 for symbolic identity)
    ok: bool


@dataclass(frozen=True)
class Report:
    """The outcome of verifying one spec."""

    name: str
    sizes: tuple[int, ...]           # the sizes that were expanded
    original_sizes: tuple[int, ...]
    parameters: int
    checks: tuple[Check, ...]
    assumptions: tuple[str, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def reduced(self) -> bool:
        return self.sizes != self.original_sizes

    def lines(self) -> list[str]:
        """The report as text, one line per formula."""
        shape = "-".join(map(str, self.sizes))
        out = [(f"verify {self.name}: expanded the {shape} network into one scalar loss C "
               f"and differentiated it directly ({self.parameters} parameters)")]
        if self.reduced:
            out.append(f"  reduced copy: the {'-'.join(map(str, self.original_sizes))} network "
                       f"has over {PARAMETER_BUDGET} parameters; widths capped at "
                       f"{max(self.sizes)}, same activations, loss and depth")
        for assumption in self.assumptions:
            out.append(f"  assuming {assumption}")
        for check in self.checks:
            mark = "ok      " if check.ok else "MISMATCH"
            error = "" if check.method == "symbolic identity" else f", max rel. error {check.max_error:.1e}"
            out.append(f"  {mark} {check.equation or '   '} {check.formula:<10} "
                       f"{check.entries:>4} entries  {check.method}{error}")
        verdict = "all formulas agree" if self.ok else "MISMATCH: see above"
        out.append(f"{verdict} ({self.seconds:.2f} s)")
        return out


def parameter_count(sizes: tuple[int, ...], biases: tuple[bool, ...]) -> int:
    """Number of weights and biases of a network with these sizes."""
    return sum(n * m + (n if bias else 0) for m, n, bias in zip(sizes, sizes[1:], biases))


def reduced_spec(spec: NetworkSpec, budget: int = PARAMETER_BUDGET) -> NetworkSpec:
    """``spec`` itself if it is within ``budget`` parameters, else a copy with every width
    (the input's too) capped at the largest value that fits; same activations, loss, depth."""
    biases = tuple(layer.bias for layer in spec.layers)
    cap = max(spec.sizes)
    while cap > 1 and parameter_count(tuple(min(n, cap) for n in spec.sizes), biases) > budget:
        cap -= 1
    if cap == max(spec.sizes):
        return spec
    layers = tuple(dataclasses.replace(layer, size=min(layer.size, cap))
                   for layer in spec.layers)
    return dataclasses.replace(spec, input=min(spec.input, cap), layers=layers, example=None)


def verify(spec: NetworkSpec, *, points: int = 20, seed: int = 0,
           budget: int = PARAMETER_BUDGET,
           progress: Callable[[str], None] | None = None) -> Report:
    """Verify the derivation of ``spec`` against direct differentiation of the expanded loss."""
    start = time.perf_counter()
    checked = reduced_spec(spec, budget)
    report = verify_derivation(derive(build_model(checked)), points=points, seed=seed,
                               progress=progress)
    return dataclasses.replace(report, name=spec.name, original_sizes=spec.sizes,
                               seconds=time.perf_counter() - start)


def verify_derivation(derivation: Derivation, *, points: int = 20, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> Report:
    """Check every formula of ``derivation`` at its model's concrete sizes (no reduction)."""
    start = time.perf_counter()
    model = derivation.model
    instance = Instance(model)
    rng = random.Random(seed)
    samples = [instance.random_point(rng) for _ in range(points)]
    if progress:
        progress(f"evaluating backpropagation at {points} random points")
    evaluated = [(point, backprop_values(instance, derivation,
                                 {q: evaluate(v, point) for q, v in instance.values.items()}))
                 for point in samples]
    symbolic = instance.parameter_count <= SYMBOLIC_LIMIT
    checks: list[Check] = []
    for formula in derivation.formulas:
        if formula.key.startswith("dC/da"):
            continue  # an intermediate quantity, checked through every delta^L that uses it
        if progress:
            progress(f"checking {formula.key}")
        checks.append(_check_formula(instance, derivation, formula, evaluated, symbolic))
    assumptions = tuple(dict.fromkeys(a for f in derivation.formulas for a in f.assumptions))
    sizes = model.spec.sizes
    return Report(model.spec.name, sizes, sizes, instance.parameter_count, tuple(checks),
                  assumptions, time.perf_counter() - start)


class Instance:
    """One concrete-size copy of the model: leaf symbols and expanded forward expressions.

    Also used by :mod:`derive.check` to evaluate user formulas on the same instances.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.sizes = {size: int(value) for size, value in
                      zip(model.sizes, model.spec.sizes)}
        n = model.spec.sizes
        self.leaves: list[se.Symbol] = []
        self.values: dict[sp.Indexed, se.Basic] = {}   # Indexed -> expanded expression
        self.parameters: dict[sp.Indexed, se.Symbol] = {}
        # z^l_j + e^l_j: dC/de^l_j at e = 0 is delta^l_j, straight from the expanded C
        self.errors: dict[sp.Indexed, se.Symbol] = {}
        self.inputs = [self._leaf(model.x[kk], f"x_{kk}") for kk in range(1, n[0] + 1)]
        self.targets = [self._leaf(model.y[jj], f"y_{jj}") for jj in range(1, n[-1] + 1)]
        previous = self.inputs
        for layer in model.layers:
            l = layer.index
            zs = []
            for jj in range(1, n[l] + 1):
                total = sum((self._parameter(layer.w[jj, kk], f"w{l}_{jj}_{kk}") * previous[kk - 1]
                             for kk in range(1, n[l - 1] + 1)), se.Integer(0))
                if layer.b is not None:
                    total += self._parameter(layer.b[jj], f"b{l}_{jj}")
                error = se.Symbol(f"e{l}_{jj}")
                self.errors[quantity("delta", l)[jj]] = error
                zs.append(total + error)
            if layer.activation.is_softmax:
                denominator = sum((se.exp(zv) for zv in zs), se.Integer(0))
                activations = [se.exp(zv) / denominator for zv in zs]
            else:
                sigma = se.sympify(elementary(layer.activation.expr))
                activations = [sigma.subs({se.Symbol(Z.name): zv}) for zv in zs]
            for jj, (zv, av) in enumerate(zip(zs, activations), start=1):
                self.values[layer.z[jj]] = zv
                self.values[layer.a[jj]] = av
            previous = activations
        loss = se.sympify(elementary(model.loss.expr))
        self.cost = sum((loss.subs({se.Symbol(A.name): av, se.Symbol(Y.name): yv})
                         for av, yv in zip(previous, self.targets)), se.Integer(0))

    @property
    def parameter_count(self) -> int:
        return len(self.parameters)

    @property
    def at_zero_error(self) -> dict[se.Symbol, se.Basic]:
        return {error: se.Integer(0) for error in self.errors.values()}

    def variable(self, formula: Formula, index: tuple[int, ...]) -> se.Symbol:
        """The leaf the formula differentiates by: a parameter, or e^l_j for delta^l_j."""
        if isinstance(formula.lhs, sp.Indexed):
            return self.errors[formula.lhs.base[index]]
        return self.parameters[formula.lhs.variables[0].base[index]]

    def _leaf(self, indexed: sp.Indexed, name: str) -> se.Symbol:
        symbol = se.Symbol(name)
        self.leaves.append(symbol)
        self.values[indexed] = symbol
        return symbol

    def _parameter(self, indexed: sp.Indexed, name: str) -> se.Symbol:
        symbol = self._leaf(indexed, name)
        self.parameters[indexed] = symbol
        return symbol

    def random_point(self, rng: random.Random) -> dict[se.Symbol, se.Basic]:
        """Random values for every leaf; targets made valid for the loss."""
        point = {s: _number(rng.uniform(-1.5, 1.5)) for s in self.leaves}
        point.update(self.at_zero_error)
        needs = self.model.loss.needs
        if needs == "probability":
            point.update({t: _number(rng.uniform(0.05, 0.95)) for t in self.targets})
        elif needs == "distribution":
            raw = [rng.uniform(0.05, 1.0) for _ in self.targets]
            total = sum(raw)
            # exact rationals so that sum_j y_j = 1 holds exactly
            fractions = [sp.Rational(round(r * 10**6), round(total * 10**6)) for r in raw]
            fractions[-1] = 1 - sum(fractions[:-1])
            point.update({t: se.sympify(f) for t, f in zip(self.targets, fractions)})
        return point

    def instantiate(self, formula: Formula, index: tuple[int, ...],
                    env: dict[sp.Indexed, se.Basic]) -> se.Basic:
        """The formula's rhs at concrete indices, with every indexed quantity from ``env``."""
        concrete = formula.rhs.xreplace(dict(zip(formula.indices, map(sp.Integer, index))))
        concrete = concrete.xreplace(self.sizes).doit()
        atoms = sorted(concrete.atoms(sp.Indexed), key=sp.default_sort_key)
        names = {atom: sp.Symbol(f"_q{n}") for n, atom in enumerate(atoms)}
        converted = se.sympify(elementary(concrete.xreplace(names)))
        return converted.subs({se.Symbol(names[atom].name): env[atom] for atom in atoms})


def _number(value: float) -> se.Basic:
    return se.RealMPFR(repr(value), _BITS)


def _entries(formula: Formula, model: Model) -> list[tuple[int, ...]]:
    n = model.spec.sizes
    l = int(formula.key.split("^")[1])
    if formula.indices == (j, k):
        return [(jj, kk) for jj in range(1, n[l] + 1) for kk in range(1, n[l - 1] + 1)]
    return [(jj,) for jj in range(1, n[l] + 1)]


def backprop_values(instance: Instance, derivation: Derivation,
            env: dict[sp.Indexed, se.Basic]) -> dict[sp.Indexed, se.Basic]:
    """env extended with every delta^l_j computed by the derived formulas, top layer first."""
    env = dict(env)
    for l in range(instance.model.depth, 0, -1):
        formula = derivation.delta(l)
        base = formula.lhs.base
        for index in _entries(formula, instance.model):
            env[base[index]] = instance.instantiate(formula, index, env)
    return env


def evaluate(expr: se.Basic, point: dict[se.Symbol, se.Basic]) -> se.Basic:
    return expr.subs(point).n(_BITS, real=True)


def _check_formula(instance: Instance, derivation: Derivation, formula: Formula,
                   evaluated: list[tuple[dict, dict]], symbolic: bool) -> Check:
    entries = _entries(formula, instance.model)
    direct = {index: se.diff(instance.cost, instance.variable(formula, index))
              for index in entries}
    if symbolic and instance.model.loss.needs != "distribution":
        zero = instance.at_zero_error
        env = backprop_values(instance, derivation,
                      {q: v.subs(zero) for q, v in instance.values.items()})
        if all(se.expand(instance.instantiate(formula, index, env) - direct[index].subs(zero))
               == 0 for index in entries):
            return Check(formula.key, formula.equation, len(entries), "symbolic identity",
                         0.0, True)
    worst = 0.0
    for point, env in evaluated:
        for index in entries:
            derived = evaluate(instance.instantiate(formula, index, env), point)
            expected = evaluate(direct[index], point)
            scale = max(1.0, abs(float(expected)))
            worst = max(worst, abs(float(derived - expected)) / scale)
    method = f"numeric: {len(evaluated)} points, {DIGITS} digits"
    return Check(formula.key, formula.equation, len(entries), method, worst, worst < _TOLERANCE)


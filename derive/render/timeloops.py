"""Loops over time steps in generated code (docs/architecture.md, "Sequences").

The tensor form reads a sequence formula at one step t (:mod:`derive.derivation.stepform`):
``h.at_step(-1)`` is h_{t-1}. Most statements of a sequence network need no loop: a step
view at t is the whole (B, T, n) array, and a product with a matrix reads every step at once.
A statement needs the loop when what it computes at step t reads what the statements of the
loop compute at another step: the forward recurrence h_t(h_{t-1}), the backward one
δ_t(δ_{t+1}). Those statements are the strongly connected parts of the graph of "reads" among
the assignments; each runs in one loop over t (forward when they read earlier steps, backward
when they read later ones), vectorized over the batch. Around it:

* what a loop statement computes from quantities outside the loop (the input's projection
  Wx x_t, the error a dense layer sends back) is hoisted before the loop, for all steps in one
  matrix product, and read at step t inside it;
* an entry at a step outside 1..T is 0: a term that reads one (h_0) is guarded by the step
  (``StepGuard``); the derivation's own brackets ([t + 1 ≤ T]) are guards already.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from derive.derivation.stepform import Concat, StepGuard
from derive.derivation.tensorform import Einsum, MatVec, Outer
from derive.quantities import LENGTH, NetTensor


@dataclass(frozen=True)
class Loop:
    """Assignments run once per time step, ``forward`` (t = 1..T) or backward (T..1)."""

    assigns: tuple
    forward: bool


class Guarded(sp.Function):
    """``Guarded(expr, low, high)``: expr at the steps low..high (1-based), 0 elsewhere."""

    nargs = 3


def views(expr: sp.Expr) -> set[NetTensor]:
    """The step views an expression reads."""
    return {t for t in expr.atoms(NetTensor) if isinstance(t.step, int)}


def _target(assign) -> NetTensor | None:
    target = assign.target
    return target.whole if isinstance(target, NetTensor) else None


def loops(assigns: list) -> list:
    """``assigns`` with the statements that need a loop over time gathered into
    :class:`Loop`s, at the place of the first of them."""
    targets = {_target(a): n for n, a in enumerate(assigns) if _target(a) is not None}
    reads: list[set[int]] = []
    shifted: list[set[int]] = []
    for assign in assigns:
        found = views(assign.expr) if assign.code is None else set()
        reads.append({targets[v.whole] for v in found if v.whole in targets})
        shifted.append({targets[v.whole] for v in found if v.whole in targets and v.step})
    groups = _components(reads)
    out: list = []
    done: set[int] = set()
    for n, assign in enumerate(assigns):
        if n in done:
            continue
        group = groups[n]
        if not any(shifted[m] & group for m in group):
            out.append(assign)
            continue
        members = sorted(group)
        done.update(members)
        # what stands among the loop's statements but reads nothing the loop computes goes
        # before it (a shared tanh(c) the loop reads)
        for m in range(n + 1, members[-1]):
            if m not in group and not _reaches(m, group, reads):
                out.append(assigns[m])
                done.add(m)
        steps = {v.step for m in members for v in views(assigns[m].expr)
                 if v.whole in targets and targets[v.whole] in group and v.step}
        members += _fused(assigns, reads, n, set(members), done)
        out.append(Loop(tuple(assigns[m] for m in members), forward=min(steps) < 0))
    return out


def _fused(assigns: list, reads: list[set[int]], first: int, group: set[int],
           done: set[int]) -> list[int]:
    """Later statements the loop computes too: elementwise ones over the steps that read
    what the loop computes at the same step, and nothing computed after the loop starts but
    by it (a GRU's stacked input error from its gates' errors): the gates' errors then need
    no array of every step."""
    found = []
    for m in range(max(group) + 1, len(assigns)):
        assign = assigns[m]
        target = _target(assign)
        if m in done or assign.code is not None or target is None or target.rank != 2 \
                or target.is_parameter or assign.expr.has(MatVec, Outer, Einsum):
            continue
        found_views = views(assign.expr)
        # (a dropout's mask may be the number 1: read whole, outside a loop)
        if not found_views or any(v.step != 0 or v.role == "mask" for v in found_views) or \
                any(t.step is None and t.whole in {_target(a) for a in assigns[first:]}
                    for t in assign.expr.atoms(NetTensor)):
            continue
        if reads[m] & group and all(r < first or r in group for r in reads[m]):
            found.append(m)
            group.add(m)
            done.add(m)
    return found


def _reaches(start: int, group: set[int], reads: list[set[int]]) -> bool:
    """Whether assignment ``start`` reads (through others) one of ``group``."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for other in reads[node]:
            if other in group:
                return True
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return False


def _components(reads: list[set[int]]) -> list[set[int]]:
    """The strongly connected component of each node of the graph n → reads[n] (Tarjan)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    out: list[set[int]] = [set() for _ in reads]
    counter = 0

    def visit(node: int) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for other in reads[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            for member in component:
                out[member] = component

    for node in range(len(reads)):
        if node not in index:
            visit(node)
    return out


def guarded(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every term that reads a quantity at another step guarded by the steps
    where that step is in 1..T: an entry outside is 0 (h_0 = 0, the error δ_{T+1} = 0), so
    is the term (every term is linear in such an entry), as the derivation's own brackets say
    (``StepGuard``)."""
    def guard(part: sp.Expr) -> sp.Expr:
        if isinstance(part, sp.Add):
            return sp.Add(*(guard(term) for term in part.args))
        if isinstance(part, Concat):    # stacked gates: each block its own guard
            *blocks, size = part.args
            return Concat(*map(guard, blocks), size)
        factors = sp.Mul.make_args(part)
        shifts = [v.step for f in factors if not isinstance(f, sp.Add) for v in views(f)
                  if v.step]
        term = sp.Mul(*(guard(f) if isinstance(f, sp.Add) else f for f in factors))
        if not shifts:
            return term
        return StepGuard(1 - min(shifts + [0]), LENGTH - max(shifts + [0])) * term

    expr = guard(expr)

    def fold(mul: sp.Mul) -> sp.Expr:
        guards = [f for f in mul.args if isinstance(f, StepGuard)]
        rest = sp.Mul(*(f for f in mul.args if not isinstance(f, StepGuard)))
        low = sp.Max(*(g.args[0] for g in guards))
        high = sp.Min(*(g.args[1] for g in guards))
        return Guarded(rest, low, high)

    expr = expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(StepGuard)
                        and any(isinstance(f, StepGuard) for f in e.args), fold)
    return expr.replace(lambda e: isinstance(e, StepGuard), lambda e: Guarded(1, *e.args))


def hoisted(expr: sp.Expr, loop_targets: set[NetTensor]
            ) -> tuple[sp.Expr, list[tuple[sp.Dummy, sp.Expr]]]:
    """(the loop's expression, with a placeholder where it reads a part computed before the
    loop; each placeholder with its part): the terms of ``expr``, or of each sum among the
    factors of it or of its terms, that read nothing the loop computes (matrix products, or
    other arrays of every step) and read it at step t, one part per sum, and the product of
    two or more such factors of a product: an RNN's error (1 - h_t^2) (Wh^T δ_{t+1} +
    W2^T δ2_t) reads 1 - h_t^2 and W2^T δ2_t from two arrays computed for every step at once,
    an LSTM's o_t (1 - tanh(c_t)^2) ∂C/∂h_t reads o_t (1 - tanh(c_t)^2) from one."""
    def outside(term: sp.Expr) -> bool:
        # a product with a matrix, or anything of the steps' arrays (a dropout's mask times
        # the error from the layer above) that reads nothing the loop computes, and only at
        # step t (the loop reads the part's array at t: h_{t-1} - g_t would be one step off);
        # it must read an array of the steps: a part of none (W2ᵀ δ² of a layer that reads
        # the last state only) is the same at every step, not an array of them
        return not term.has(StepGuard) and not any(
            t.whole in loop_targets for t in term.atoms(NetTensor)) and bool(views(term)) \
            and all(v.step == 0 for v in views(term))

    parts: list[tuple[sp.Dummy, sp.Expr]] = []

    def split(total: sp.Expr) -> sp.Expr:
        terms = sp.Add.make_args(total)
        moved = [term for term in terms if outside(term)]
        if not moved:
            return total
        # a bias that goes with the products goes too (W x_t + b: one statement)
        moved += [term for term in terms if term not in moved and not term.has(StepGuard)
                  and all(t.is_parameter for t in term.atoms(NetTensor))]
        part = sp.Add(*moved)
        if isinstance(part, NetTensor) or isinstance(-part, NetTensor):
            return total                # an array as it is: nothing to compute before the loop
        parts.append((sp.Dummy(), part))
        return sp.Add(*(term for term in terms if term not in moved)) + parts[-1][0]

    def within(term: sp.Expr) -> sp.Expr:
        # a product: its factors that read nothing the loop computes multiplied before it, in
        # one array (an LSTM's ∂C/∂i_t ⊙ i_t ⊙ (1 - i_t) reads i_t ⊙ (1 - i_t) of every step:
        # one call per step, not three), and each sum among the others split (a GRU's
        # δ_t (1 - u_t) beside other terms reads 1 - u_t of every step from one array)
        if not isinstance(term, sp.Mul):
            return term
        fixed = [f for f in term.args if not f.is_number and outside(f)]
        if len(fixed) < 2:
            fixed = []
        others = [split(f) if isinstance(f, sp.Add) else f
                  for f in term.args if f not in fixed]
        if fixed:
            parts.append((sp.Dummy(), sp.Mul(*fixed)))
            others.append(parts[-1][0])
        return sp.Mul(*others)

    def whole(e: sp.Expr) -> sp.Expr:
        if isinstance(e, sp.Add):
            return sp.Add(*(within(term) for term in sp.Add.make_args(split(e))))
        return within(e)

    if isinstance(expr, Concat):        # stacked gates: each block on its own
        *blocks, size = expr.args
        return Concat(*map(whole, blocks), size), parts
    return whole(expr), parts

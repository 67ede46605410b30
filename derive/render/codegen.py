"""Code generation stage: a self-contained NumPy training module from a Derivation.

``render_module(derivation)`` reads the derived formulas (never re-deriving anything), makes
them numerically stable with the named rewrites of :mod:`derive.render.stability`, prints them
in the batch reading with :class:`~derive.render.numpy_printer.NumPyBatchPrinter`, and places
the printed strings into ``codegen_templates/module.py.j2``, which holds structure only. The
module follows the generated-module contract of docs/architecture.md ("Contracts"). Its
command, ``derive codegen``, is in :mod:`derive.cli.codegen`.
"""

from __future__ import annotations

import math
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import sympy as sp

from derive import __version__
from derive.derivation.imageform import (
    FirstMaxMask,
    Flatten,
    Fold,
    Unflatten,
    Windows,
    WindowsMax,
)
from derive.derivation.reverse import Derivation, Formula
from derive.derivation.stepform import Block, Concat, MatProd, StepGuard, SumSteps
from derive.derivation.tensorform import (
    Broadcast,
    Einsum,
    MatVec,
    Outer,
    equation_tensor,
    to_vector,
)
from derive.graph.model import Model, Node, Parameter
from derive.quantities import NetTensor
from derive.registry.functions import SCALAR_FUNCTIONS, sigmoid, softplus
from derive.registry.ops import Equation
from derive.render.numpy_printer import (
    BATCH,
    HELPERS,
    NumPyBatchPrinter,
    RowSum,
    among_maps,
    batch_name,
    helper_closure,
    is_bracket,
    operations,
    routed_by_max,
    tiled,
)
from derive.render.pretty import pretty
from derive.render.probe import first_overflow
from derive.render.stability import LogSumExp, Softmax, stabilize
from derive.render.templates import render
from derive.render.timeloops import Guarded, Loop, guarded, hoisted, loops, views
from derive.spec.load import NetworkSpec

Echo = Callable[[str], None]

#: Activations whose layers start with He's scale sqrt(2 / n_in); the others use Glorot's.
HE_INIT = frozenset({"relu", "leaky_relu", "elu", "silu", "gelu"})

#: sgd_step updates a parameter larger than this (in float64) a block of rows at a time.
UPDATE_BLOCK_BYTES = 65536

#: The optimizers' update rules and the learning-rate schedule of a generated module's train
#: (PyTorch's rules; fixed, so not printed from the derivation): source in the order placed.
OPTIMIZER_HELPERS: dict[str, str] = {
    "_momentum_step": '''\
def _momentum_step(params, grads, buffers, lr):
    """One step of SGD with momentum, in place, by PyTorch's rule: b <- MOMENTUM b + dC/dp,
    then p <- p - lr b. The buffers start at zero, so the first step sets b = dC/dp."""
    for key, grad in grads.items():
        buffers[key] *= MOMENTUM
        buffers[key] += grad
    sgd_step(params, buffers, lr)
''',
    "_adam_step": '''\
def _adam_step(params, grads, state, lr):
    """One step of Adam, in place, by PyTorch's rule (t counts the steps, from 1):
    m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2 and
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), with g = dC/dp."""
    beta1, beta2 = ADAM_BETAS
    state["step"] += 1
    correction1 = 1 - beta1 ** state["step"]
    correction2 = 1 - beta2 ** state["step"]
    for key, grad in grads.items():
        m, v = state["m"][key], state["v"][key]
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        params[key] -= lr / correction1 * m / (np.sqrt(v) / correction2 ** 0.5 + ADAM_EPS)
''',
    "_learning_rate": '''\
def _learning_rate(lr, epoch, schedule):
    """The learning rate of epoch `epoch` (from 0), as torch.optim.lr_scheduler sets it when
    stepped once per epoch: constant without a schedule; ("step", step_size, gamma) multiplies it
    by gamma every step_size epochs (StepLR); ("cosine", T_max) anneals it along a half cosine
    to 0 at epoch T_max (CosineAnnealingLR, eta_min 0)."""
    if schedule is None:
        return lr
    if schedule[0] == "step":
        _, step_size, gamma = schedule
        return float(lr * gamma ** (epoch // step_size))
    _, t_max = schedule
    return float(lr * (1 + np.cos(np.pi * epoch / t_max)) / 2)
''',
}



@dataclass(frozen=True)
class Statement:
    """One line of generated code: ``target = code``, with a comment citing its equation;
    with no ``op``, the line ``target`` as it is (a loop's header). ``indent``: the levels of
    the loops it is in."""

    target: str
    code: str
    comment: str = ""
    op: str = "="
    indent: int = 0

    @property
    def text(self) -> str:
        return f"{self.target} {self.op} {self.code}" if self.op else self.target

    @property
    def margin(self) -> str:
        return "    " * self.indent


@dataclass(frozen=True)
class Demo:
    """The demo a module's ``__main__`` runs: which data template, and its training settings."""

    template: str
    epochs: int
    lr: float
    batch_size: int | None
    clip: float | None = None
    optimizer: str = "sgd"


def module_filename(spec: NetworkSpec) -> str:
    """The file name of a spec's generated module, e.g. ``xor_net.py``."""
    return f"{spec.name}_net.py"


# --- the render context ------------------------------------------------------------------


def _lhs_text(formula: Formula) -> str:
    """The left-hand side of a formula in tensor notation: δ², ∂C/∂b², ∂C/∂W², ∂C/∂x̂³."""
    if formula.kind == "delta":
        return pretty(formula.target)
    return f"∂C/∂{pretty(formula.of)}"


def _applied_note(applied: tuple[str, ...]) -> str:
    return f" [stable: {', '.join(applied)}]" if applied else ""


def _tensor(model: Model, expr: sp.Expr, indices: tuple[sp.Symbol, ...]) -> sp.Expr:
    """The tensor form of an index expression, with every width a number."""
    return to_vector(expr, indices).xreplace(model.widths)


def _output_equation(model: Model) -> Equation:
    return model.output.equations[-1]


def _loss_expression(model: Model) -> tuple[sp.Expr, tuple[str, ...]]:
    """The per-component loss in batch form, and the stability rewrites it needed.

    The loss is written in the output's own forward expression (a^L replaced by sigma(z^L))
    and rewritten; when a rewrite applied (log sigmoid, log softmax, ...) that stable form is
    used, with any sigma(z^L) left in it read back as a^L. Otherwise the plain form in a^L is
    cheaper and as accurate.
    """
    equation = _output_equation(model)
    a, y = equation.target, NetTensor("y")
    in_a = model.loss_of(a, y)
    activation = stabilize(_tensor(model, equation.expr, equation.indices)).expr
    if isinstance(activation, NetTensor) and activation.step == "T":
        # a recurrent layer's last state, h_T = σ(z_T): the loss in the activation of z_T
        # (BCE's log σ(z_T) from softplus, not the log of a σ that rounds to 0 or 1)
        state = next((eq for eq in model.equations if eq.target == activation.whole
                      and eq.activation is not None), None)
        if state is not None:
            form = stabilize(_tensor(model, state.expr, state.indices)).expr
            if all(view.step == 0 for view in views(form)):
                activation = form.xreplace({view: view.whole.at_step("T")
                                            for view in views(form)})
    stable = stabilize(model.loss_of(activation, y))
    expr = stable.expr.xreplace({activation: a})
    if activation == a or not stable.applied or any(
            t.is_parameter or t.step not in (None, 0, "T") for t in expr.atoms(NetTensor)):
        # (a rewrite that took the output's expression apart would read what the loss is not
        # given: a layer norm's β + γ x̂ inside log cosh its parameters, a GRU's
        # (1 - u_t) g_t + u_t h_{t-1} the state of the step before; then the form in a^L)
        plain = stabilize(in_a)
        return plain.expr, plain.applied
    return expr, stable.applied


def _shared_logsumexp(model: Model, loss_expr: sp.Expr) -> tuple[sp.Expr, NetTensor] | None:
    """(LogSumExp(z^L), its name lse^L) when a softmax output and its loss can share it.

    The stable softmax cross-entropy reads LogSumExp(z^L), whose exponentials are those of
    the softmax. The forward pass then computes lse^L once and the output as
    Softmax(z) = exp(z - LogSumExp(z)), and the loss reads lse^L from the cache, instead of
    exponentiating z^L twice.
    """
    equation = _output_equation(model)
    activation = stabilize(_tensor(model, equation.expr, equation.indices)).expr
    if not isinstance(activation, Softmax):
        return None
    logsumexp = LogSumExp(activation.args[0])
    if not loss_expr.has(logsumexp):
        return None
    return logsumexp, NetTensor("lse", model.depth, rank=0)


#: The buffer group of arrays a generated function did not make itself: never reused.
_FOREIGN = -1


@dataclass(frozen=True)
class _Assign:
    """``target = expr``, before printing: a quantity (or a gradient's name) and its value."""

    target: NetTensor | str
    expr: sp.Expr
    comment: str = ""
    #: already printed (a helper returning two arrays), or how to print it when its statement
    #: is printed
    code: str | Callable[[NumPyBatchPrinter], str] | None = None


def _call_name(e: sp.Expr) -> str | None:
    """The name of an array holding a chain of one-argument calls on one quantity
    (tanh(softplus(z¹)): tanh_softplus_Z1); None for any other expression."""
    chain, inner = [], e
    while isinstance(inner, sp.Function) and len(inner.args) == 1:
        chain.append(type(inner).__name__)
        inner = inner.args[0]
    return "_".join([*chain, batch_name(inner)]) if isinstance(inner, NetTensor) else None


def _shared_calls(assigns: list[_Assign], printer: NumPyBatchPrinter) -> list[_Assign]:
    """The assignments with every elementwise function call that they make more than once
    (tanh(S1) in the derivative of a custom op: 1 - tanh(S1)², tanh(S1)·sigmoid(S2)) computed
    once, into a variable named after it, just before its first use."""
    counts: dict[sp.Expr, int] = {}
    for assign in assigns:
        if assign.code is None:
            for e in sp.preorder_traversal(assign.expr):
                # (a placed tensor is a view of one: nothing to save, and the row sums of
                # products of them print as one einsum)
                if isinstance(e, sp.Function) and not isinstance(e, RowSum | Broadcast) and \
                        e.has(NetTensor):
                    counts[e] = counts.get(e, 0) + 1
    # inner calls first, so that an outer one reads them: tanh(softplus(Z1)) after softplus
    shared = sorted((e for e, count in counts.items() if count > 1), key=sp.count_ops)
    if not shared:
        return assigns

    def name(e: sp.Expr, number: int) -> sp.Symbol:
        # never a parameter's key (letters, digits)
        text = _call_name(e) or f"shared_{number}"
        if views(e):     # of a sequence: an array of every step, read at step t
            return NetTensor("hoisted", of=text, rank=2).at_step(0)
        return sp.Symbol(text)

    names = {e: name(e, n) for n, e in enumerate(shared, start=1)}
    out: list[_Assign] = []
    done: dict[sp.Expr, sp.Symbol] = {}
    for assign in assigns:
        for e in shared:
            if e not in done and assign.code is None and assign.expr.has(e):
                target = names[e].whole if isinstance(names[e], NetTensor) else str(names[e])
                out.append(_Assign(target, e.xreplace(done),
                                   f"{pretty(e)}, used more than once"))
                done[e] = names[e]
        out.append(assign if assign.code is not None else
                   _Assign(assign.target, assign.expr.xreplace(names), assign.comment))
    return out


#: Functions whose value costs more to compute again than to keep in an array: the
#: transcendental ones among those user expressions may call (not abs, max, min).
COSTLY = frozenset(f.build for f in SCALAR_FUNCTIONS.values()
                    if isinstance(f.build, sp.FunctionClass)
                    and f.build not in (sp.Abs, sp.Max, sp.Min))


def _costly_calls(expr: sp.Expr) -> list[sp.Expr]:
    """The calls of a costly function (COSTLY) on forward quantities in ``expr``, in order;
    a call that reads an adjoint is the backward pass's own."""
    return [e for e in sp.preorder_traversal(expr) if type(e) in COSTLY
            and any(not t.is_parameter for t in e.atoms(NetTensor))
            and not any(t.role in ("grad", "delta") for t in e.atoms(NetTensor))]


def _kept_calls(forward: list[_Assign], backward: list[_Assign]
                ) -> tuple[list[_Assign], list[_Assign], dict[NetTensor, NetTensor]]:
    """(forward, backward, kept): a costly call that the forward pass makes inside a larger
    expression and the backward pass reads again (tanh(c_t) of an LSTM's h_t = o_t ⊙
    tanh(c_t), erf of a GELU's argument) computed once, into an array of its own that the
    cache keeps, just before the forward statement that first reads it; kept: each such
    array and the quantity it is computed from (whose shape it has)."""
    wanted = {e for assign in backward if assign.code is None for e in _costly_calls(assign.expr)}
    names: dict[sp.Expr, NetTensor] = {}
    kept: dict[NetTensor, NetTensor] = {}
    out: list[_Assign] = []
    for assign in forward:
        if assign.code is None:
            # inner calls first, so that an outer one reads them: tanh(softplus(z)) after
            # softplus(z)
            calls = sorted((e for e in set(_costly_calls(assign.expr))
                            if e in wanted and e not in names and e != assign.expr),
                           key=lambda e: (sp.count_ops(e), sp.default_sort_key(e)))
            for e in calls:
                inner = sorted(e.atoms(NetTensor), key=sp.default_sort_key)
                steps = views(e)
                text = _call_name(e) or "_".join(
                    [type(e).__name__, *(batch_name(t) for t in inner if not t.is_parameter)])
                while any(t.of == text for t in kept):
                    text += "_"
                rank = max(t.whole.rank for t in inner if not t.is_parameter)
                tensor = NetTensor("hoisted", of=text, rank=rank)
                kept[tensor] = next(t.whole for t in inner if not t.is_parameter)
                out.append(_Assign(tensor, e.xreplace(names),
                                   f"{pretty(e)}, kept for the backward pass"))
                names[e] = tensor.at_step(0) if steps else tensor
            out.append(_Assign(assign.target, assign.expr.xreplace(names), assign.comment))
        else:
            out.append(assign)
    if not names:
        return forward, backward, kept
    return out, [assign if assign.code is not None else
                 _Assign(assign.target, assign.expr.xreplace(names), assign.comment)
                 for assign in backward], kept


def _scalar(call: sp.Function) -> bool:
    """Whether ``call`` is of a scalar function, which NumPy applies entry by entry: SymPy's
    (tanh, exp, erf, expm1, ...) or the registry's own (sigmoid, softplus); not one of the
    tensor form's operations on whole arrays (a total, a softmax, a reshape)."""
    return type(call).__module__.startswith(("sympy.functions.", "sympy.codegen.")) or \
        type(call) in (sigmoid, softplus)


def _pointwise_in(expr: sp.Expr, tensor: NetTensor) -> bool:
    """Whether ``expr`` is a function of ``tensor``'s entries one by one and of nothing else:
    numbers and ``tensor`` under sums, products, powers, one-argument calls and brackets
    ([a¹ > 0], 1 - (a¹)²)."""
    if expr.is_number or expr == tensor or expr == sp.true:
        return True
    if isinstance(expr, NetTensor):
        return False
    if isinstance(expr, sp.Add | sp.Mul | sp.Piecewise | sp.core.relational.Relational
                  | sp.functions.elementary.piecewise.ExprCondPair) or (
            isinstance(expr, sp.Pow) and expr.exp.is_number) or (
            isinstance(expr, sp.Function) and len(expr.args) == 1 and _scalar(expr)):
        return all(_pointwise_in(arg, tensor) for arg in expr.args)
    return False


def _routed_factors(backward: list[_Assign], maxima: dict[Windows, NetTensor]
                    ) -> list[_Assign]:
    """The backward assignments with each factor f(a) beside a max pool's routing of its
    error onto a (δ = f(a) ⊙ route(δ'): an activation's derivative written in its output,
    [a > 0] of relu, 1 - a² of tanh) moved inside the routing, as f(m) on each window's
    maximum m, into an array of its own (``routed_delta2 = delta2*(A2 > 0)``): the routing
    puts a window's error only where a equals its maximum, and 0 elsewhere, so the two are
    equal entry by entry (ties too: the entry it lands on holds the maximum), and f is applied
    to the pooled maps, a quarter of the entries for a 2×2 pool. The pre-activation z is then
    no longer read (docs/architecture.md, "Images")."""
    out = []
    for assign in backward:
        if assign.code is None and isinstance(assign.expr, sp.Mul):
            by_max = {f: routed_by_max(*f.args) for f in assign.expr.args if isinstance(f, Fold)}
            folds = [f for f, found in by_max.items() if found is not None]
            if len(folds) == 1:
                fold = folds[0]
                delta, windows = by_max[fold]
                tensor, factor = windows.args[0], assign.expr / fold
                if windows in maxima and factor.has(tensor) and _pointwise_in(factor, tensor):
                    routed = NetTensor("hoisted", of=f"routed_{batch_name(delta)}", rank=3)
                    moved = delta * factor.xreplace({tensor: maxima[windows]})
                    out.append(_Assign(routed, moved, (
                        f"{pretty(moved)}: {pretty(assign.target)}'s factor {pretty(factor)} "
                        f"taken at the windows' maxima {pretty(maxima[windows])}, the only "
                        "entries the error is routed to")))
                    placed = next(f for f in sp.Mul.make_args(fold.args[0])
                                  if isinstance(f, Broadcast))
                    cols = fold.args[0].xreplace({placed: placed.func(routed, *placed.args[1:])})
                    out.append(_Assign(assign.target, fold.func(cols, *fold.args[1:]),
                                       assign.comment))
                    continue
        out.append(assign)
    return out


def _kept_windows(forward: list[_Assign], backward: list[_Assign], printer: NumPyBatchPrinter
                  ) -> tuple[list[_Assign], dict[NetTensor, NetTensor]]:
    """(forward, kept): the windows that a convolution and its kernel's gradient both contract
    copied once by _im2col, in the forward pass, into an array the cache keeps (one copy, not
    two); a max pool's output, the maximum of each window, read again where its error is
    routed to each window's first maximum. kept: each windows array and the quantity it is
    copied from. The printer learns both (``columns``, ``maxima``)."""
    def contracted(assigns: list[_Assign]) -> set[Windows]:
        return {operand for assign in assigns if assign.code is None
                for einsum in assign.expr.atoms(Einsum) if len(einsum.args) == 3
                for operand in einsum.args[1:] if isinstance(operand, Windows)}

    both = contracted(forward) & contracted(backward)
    routed = {mask.args[0] for assign in backward if assign.code is None
              for mask in assign.expr.atoms(FirstMaxMask)}
    kept: dict[NetTensor, NetTensor] = {}
    out: list[_Assign] = []
    for assign in forward:
        if assign.code is None:
            for windows in sorted(assign.expr.atoms(Windows) & both - printer.columns.keys(),
                                  key=sp.default_sort_key):
                tensor = windows.args[0]
                text = f"windows_{batch_name(tensor)}"
                while any(array.of == text for array in kept):
                    text += "_"
                array = NetTensor("hoisted", of=text, rank=3)
                out.append(_Assign(array, sp.Integer(0), f"the windows of {pretty(tensor)}, "
                                   "copied once: the convolution and its kernel's gradient "
                                   "read them", code=printer.windows_copy(windows)))
                printer.columns[windows] = array
                kept[array] = tensor
            if isinstance(assign.expr, WindowsMax) and assign.expr.args[0] in routed:
                printer.maxima[assign.expr.args[0]] = assign.target
        out.append(assign)
    return out, kept


def _statements(assigns: list[_Assign], keep: set[NetTensor],
                printer: NumPyBatchPrinter,
                batch_only: frozenset[NetTensor] = frozenset()) -> list[Statement]:
    """Print the assignments, reusing fresh arrays in place where that is safe.

    A fresh (batch, n) array per ``+`` or ``*`` costs more than the arithmetic (allocation and
    page faults, measured in bench/graph_bench.py). So when a sum or product has a term or
    factor that is a new array anyway (a matrix product, a fold: a pooling or convolution
    layer's error), or an array this function made that
    nothing later reads (nor any other name of the same buffer, nor ``keep``: the cache, the
    output), the target takes that buffer and the rest is added or multiplied in place:
    ``delta1 = delta2 @ W2; delta1 += delta4; delta1 *= (Z1 > 0)``.
    """
    # the last statement that reads each array (keep: read after the function): a buffer is
    # dead once the last reader of every name it has is behind; one pass, not one per line
    last_read: dict[NetTensor, float] = {}
    for index, assign in enumerate(assigns):
        for tensor in _read(assign):
            last_read[tensor] = index
    last_read.update(dict.fromkeys(keep, math.inf))
    buffer_of: dict[NetTensor, int] = {}
    live_until: dict[int, float] = {_FOREIGN: math.inf}     # buffer -> its last reader
    out: list[Statement] = []
    loop_reads = {t for item in assigns if isinstance(item, _LoopCode) for t in _read(item)}
    # a flatten's or unflatten's result: a transposed view of its argument's buffer, which an
    # in-place statement would write through (into a cached array), and slowly
    strided: set[NetTensor] = set()
    for index, assign in enumerate(assigns):
        if isinstance(assign, _LoopCode):
            out.extend(assign.statements(printer))
            for target in assign.targets:   # arrays filled step by step: never taken over
                buffer_of[target] = _FOREIGN
            continue
        dead = _DeadArrays(buffer_of, live_until, index, assign.target, strided)
        layout = _layout(assign, printer, loop_reads, batch_only)
        if layout == "time" and isinstance(assign.target, NetTensor):
            printer.time_major.add(assign.target)
        name = assign.target if isinstance(assign.target, str) else printer.doprint(
            assign.target)
        if assign.code is not None:
            code = assign.code(printer) if callable(assign.code) else assign.code
            out.append(Statement(name, code, assign.comment))
            continue
        steps, reused = _in_place(assign.expr, dead)
        start = len(out)
        printer.overflows = False
        printer.stacking = printer.gates.get(assign.target)
        printer.whole = _whole(assign.expr)     # its right side only, not its target
        printer.among_maps = among_maps(assign.expr)
        with printer.steps(views(assign.expr), layout=layout):
            # a call of an array nothing reads again writes into it: np.tanh(Z1, out=Z1)
            operand = printer.operand(assign.expr)
            into = printer.into(assign.expr, printer.doprint(operand)) if (
                reused is None and operand in dead) else None
            if into is not None:
                out.append(Statement(name, into, assign.comment))
                reused = operand
            chain = None if into is not None else _chain(
                printer, steps, name, layout == "time" or any(
                    t.rank == 3 for t in assign.expr.atoms(NetTensor)))
            if chain is not None:
                out.extend(Statement(target, code, assign.comment if number == 0 else "", op)
                           for number, (target, op, code) in enumerate(chain))
            elif into is None:
                out.extend(Statement(name, _signed(printer, op, expr),
                                     assign.comment if number == 0 else "", _op(op, expr))
                           for number, (op, expr) in enumerate(steps))
        printer.whole, printer.among_maps, printer.stacking = False, frozenset(), None
        if printer.overflows:
            out[start:] = _quiet(out[start:], "")
        if isinstance(assign.target, NetTensor):
            shares = reused if reused is not None else (
                assign.expr if isinstance(assign.expr, NetTensor) else None)
            if isinstance(assign.expr, Flatten | Unflatten) and \
                    isinstance(assign.expr.args[0], NetTensor):
                shares = assign.expr.args[0]
                strided.add(assign.target)
            elif shares in strided:     # another name of a view (an identity activation)
                strided.add(assign.target)
            if shares is None:
                buffer_of[assign.target] = index            # a new array of this function
            elif shares in buffer_of:
                buffer_of[assign.target] = buffer_of[shares]
            else:
                # another name of an array this function did not make (X, a cached array):
                # never reused in place
                buffer_of[assign.target] = _FOREIGN
            group = buffer_of[assign.target]
            live_until[group] = max(live_until.get(group, -1),
                                    last_read.get(assign.target, -1))
    return out


def _layout(assign: _Assign, printer: NumPyBatchPrinter, loop_reads: set[NetTensor],
            batch_only: frozenset[NetTensor]) -> str:
    """The layout a statement over every step computes in: step-major ("time") for what a
    loop over time reads, and for what reads step-major arrays (a dense layer per step after
    a recurrent one; a sum over the steps, a parameter's gradient), unless the output or the
    loss reads it; else that of the batch, (B, T, n)."""
    target = assign.target
    if _whole(assign.expr):
        return "batch"
    reads_steps = any(v.whole in printer.time_major for v in views(assign.expr))
    if not isinstance(target, NetTensor):           # a gradient: summed over the steps
        return "time" if reads_steps else "batch"
    if (target.role == "hoisted" and loop_reads) or (target in loop_reads
                                                     and target not in batch_only):
        return "time"
    if target not in batch_only and any(v.whole in printer.time_major
                                        for v in views(assign.expr)):
        return "time"
    return "batch"


def _whole(expr: sp.Expr) -> bool:
    """Whether ``expr`` reads whole sequences (attention's (T, T) products), not steps."""
    return any(t.rank == 2 and t.step is None and not t.is_parameter and t.role != "hoisted"
               for t in expr.atoms(NetTensor))


def _read(item: _Assign | _LoopCode) -> set[NetTensor]:
    """The arrays a statement (or a whole loop) reads, step views as their whole arrays."""
    exprs = [a.expr for a in item.body] if isinstance(item, _LoopCode) \
        else [item.expr]
    return {t.whole for e in exprs for t in e.atoms(NetTensor)}


@dataclass
class _Copy:
    """Columns column.. of target's every step, copied from columns first.. of source's."""

    target: NetTensor
    column: int
    source: NetTensor
    first: int
    width: int

    def continued_by(self, other: _Copy) -> bool:
        """Whether ``other`` copies the next columns of the same arrays (one copy for both)."""
        return (other.target, other.source, other.column, other.first) == (
            self.target, self.source, self.column + self.width, self.first + self.width)


@dataclass(frozen=True)
class _LoopCode:
    """A loop over time steps, ready to print: the arrays it fills (allocated before it,
    ``shapes`` per sample; ``local``: those made anew at each step) and its body."""

    targets: tuple[NetTensor, ...]
    shapes: tuple[tuple[int, ...], ...]
    body: tuple[_Assign, ...]
    forward: bool
    length: int
    batch: str
    dtype: str
    batch_major: frozenset[NetTensor] = frozenset()   # the network's output: (B, T, n)
    local: frozenset[NetTensor] = frozenset()     # one step's arrays, made anew at each step

    def statements(self, printer: NumPyBatchPrinter) -> list[Statement]:
        out = []
        for n, (target, (length, *shape)) in enumerate(zip(self.targets, self.shapes)):
            steps = target not in self.batch_major
            if steps:
                printer.time_major.add(target)
            size = (f"{length}, {self.batch}" if steps else f"{self.batch}, {length}")
            if target in printer.gates:         # gate-major: (T, G, B, w)
                gates, width = printer.gates[target]
                size, shape = f"{length}, {gates}, {self.batch}", [width]
            out.append(Statement(printer.name(target), f"np.empty(({size}, "
                                 f"{', '.join(map(str, shape))}), dtype={self.dtype})",
                                 "filled one time step at a time in the loop below"
                                 + (", step-major: each step one contiguous block" if steps
                                    else "") if n == 0 else ""))
        # h_{t-1} @ Wh1.T at every step: BLAS multiplies by a contiguous matrix 1.3-2x faster
        # than by a transposed view at these sizes, so the transpose is copied once; for a
        # gate-major array, as one (h, w) block per gate
        for number, (matrix, (gates, width)) in enumerate(sorted(
                {(m.args[0], printer.gates.get(a.target, (0, 0))) for a in self.body
                 for m in a.expr.atoms(MatVec)
                 if not m.args[2] and isinstance(m.args[0], NetTensor)},
                key=lambda item: (sp.default_sort_key(item[0]), item[1]))):
            if gates:
                name = printer.gate_weights[matrix] = f"{printer.name(matrix)}_G"
                code = (f"np.ascontiguousarray({printer.name(matrix)}.reshape({gates}, "
                        f"{width}, -1).transpose(0, 2, 1))")
            else:
                name = printer.transposes[matrix] = f"{printer.name(matrix)}_T"
                code = f"np.ascontiguousarray({printer.name(matrix)}.T)"
            out.append(Statement(name, code,
                                 "the matrix the loop multiplies by, transposed once"
                                 + (" (a contiguous block per gate)" if gates else "")
                                 + ": BLAS reads a contiguous one faster than a transposed view"
                                 if number == 0 else ""))
        biases = sorted({(term, a.target) for a in self.body if a.target in printer.gates
                         for term in sp.Add.make_args(a.expr)
                         if isinstance(term, NetTensor) and term.is_parameter},
                        key=sp.default_sort_key)
        for number, (bias, target) in enumerate(biases):
            name = printer.gate_biases[bias] = f"{printer.name(bias)}_G"
            out.append(Statement(name, printer.repeated_bias(bias, printer.gates[target]),
                                 "the bias a loop adds, a row per gate and sample: it adds "
                                 "faster than one broadcast over the samples" if number == 0
                                 else ""))
        steps = f"range({self.length})" if self.forward else f"range({self.length - 1}, -1, -1)"
        start = len(out)
        printer.overflows = False
        out.append(Statement(f"for t in {steps}:", "", op="",
                             comment="one time step at a time, t from 0 "
                                     + ("forward" if self.forward else "backward")))
        printer.step_local.update(self.local)
        # a stacked block computed at this step: its array and first column
        written: dict[sp.Expr, tuple[NetTensor, int]] = {}
        read = {t.whole for assign in self.body for t in assign.expr.atoms(NetTensor)}
        after: list[_Copy] = []     # blocks copied after the loop, for every step at once
        with printer.steps(None, loop=True):
            for run in _joint_calls(self.body, printer):
                if len(run) > 1:
                    out.extend(_joint_statements(run, printer))
                    continue
                assign = run[0]
                name = printer.doprint(assign.target.at_step(0))
                expr = assign.expr
                if not isinstance(expr, Concat):
                    printer.stacking = printer.gates.get(assign.target)
                    if assign.target in self.local:     # one step's array, made anew
                        out.append(Statement(name, printer.doprint(expr), assign.comment,
                                             indent=1))
                    else:
                        out.extend(_written(printer, expr, name, assign.comment))
                    printer.stacking = None
                    continue
                # stacked gates: each block written in place, no concatenated copy; a block
                # equal to one written before at this step (a GRU's reset and update errors,
                # the same for its input and hidden pre-activations) copied from there, or,
                # when the loop does not read it, after the loop for every step at once
                *parts, (size,) = expr.args
                comment = assign.comment
                if assign.target in self.local:
                    out.append(Statement(name, f"np.empty(({self.batch}, {len(parts) * size}), "
                                               f"dtype={self.dtype})", comment, indent=1))
                    comment = ""
                # (computed, then copied in: NumPy's ufuncs are much slower writing into a
                # block of columns than into a contiguous array)
                for number, part in enumerate(parts):
                    column = number * size
                    source, first = written.get(part, (None, 0))
                    if source is not None and assign.target not in read and not {
                            assign.target, source} & self.local and (
                            assign.target in self.batch_major) == (source in self.batch_major):
                        copy = _Copy(assign.target, column, source, first, size)
                        if after and after[-1].continued_by(copy):
                            after[-1].width += size     # adjacent blocks: one copy
                        else:
                            after.append(copy)
                        continue
                    code = printer.doprint(part) if source is None else \
                        f"{printer.doprint(source.at_step(0))}[..., {first}:{first + size}]"
                    out.append(Statement(f"{name}[..., {column}:{column + size}]", code, comment,
                                         indent=1))
                    comment = ""
                    written.setdefault(part, (assign.target, column))
        for number, copy in enumerate(after):
            out.append(Statement(f"{printer.name(copy.target)}[..., {copy.column}:"
                                 f"{copy.column + copy.width}]",
                                 f"{printer.name(copy.source)}[..., {copy.first}:"
                                 f"{copy.first + copy.width}]",
                                 "blocks equal to blocks of another array at every step, "
                                 "copied after the loop for all the steps at once"
                                 if number == 0 else ""))
        printer.transposes.clear()
        printer.gate_weights.clear()
        printer.gate_biases.clear()
        if printer.overflows:
            out[start:] = _quiet(out[start:], ", once for every step")
        return out


#: Why code that calls a QUIET_OVERFLOW helper (numpy_printer) runs with NumPy's overflow
#: warning off: the comment on its ``with np.errstate(over="ignore")``.
QUIET = "exp(-z) in σ(z) overflows only where σ(z) is below the smallest normal number: no warning"


def _quiet(statements: list[Statement], scope: str) -> list[Statement]:
    """``statements`` (one statement's lines, or a loop) inside one ``with`` that turns NumPy's
    overflow warning off for the QUIET_OVERFLOW helpers they call (numpy_printer)."""
    return [Statement('with np.errstate(over="ignore"):', "", op="", comment=QUIET + scope,
                      indent=statements[0].indent),
            *(replace(statement, indent=statement.indent + 1) for statement in statements)]


def _joint_calls(body: tuple[_Assign, ...], printer: NumPyBatchPrinter
                 ) -> list[list[_Assign]]:
    """The loop's statements in runs: statements that apply the same function of one argument
    to blocks of the same arrays at different places, other than gate-major ones (_joins),
    form one run, which one call over the span of their blocks computes where the first of
    them was (a later member reads only what the first reads, made before it), while the
    members fill at least half of the span (a block computed and not read costs less than a
    second call on strided blocks). Every other statement is a run of its own."""
    runs: list[list[_Assign]] = []
    for assign in body:
        run = next((run for run in runs if _joins(run, assign.expr, printer)), None)
        if run is None:
            runs.append([assign])
        else:
            run.append(assign)
    return runs


def _blocks(argument: sp.Expr) -> tuple[list[Block], int] | None:
    """(the blocks, their common size) when ``argument`` reads arrays only through blocks of
    one size; else None."""
    blocks = sorted(argument.atoms(Block), key=sp.default_sort_key)
    sizes = {int(block.args[2]) for block in blocks}
    if len(sizes) != 1 or argument.xreplace(dict.fromkeys(blocks, sp.Integer(1))).atoms(
            NetTensor):
        return None
    return blocks, sizes.pop()


def _offsets(run: list[_Assign]) -> list[int]:
    """Where each member's blocks start, relative to the first member's (a run of
    _joint_calls)."""
    starts = [int(_blocks(assign.expr.args[0])[0][0].args[1]) for assign in run]
    return [start - starts[0] for start in starts]


def _joins(run: list[_Assign], expr: sp.Expr, printer: NumPyBatchPrinter) -> bool:
    """Whether ``expr`` is the run's function of the blocks of its first member shifted by a
    whole number of blocks to a place no member has, within a span the members would fill
    at least half of."""
    first = run[0].expr
    if type(expr) is not type(first) or len(first.args) != 1 or printer.operand(first) is None:
        return False
    found = _blocks(first.args[0])
    mine = _blocks(expr.args[0]) if len(expr.args) == 1 else None
    if found is None or mine is None or mine[1] != found[1]:
        return False
    blocks, size = found
    if any(isinstance(block.args[0], NetTensor) and block.args[0].whole in printer.gates
           for block in blocks):
        # a gate-major block is a contiguous array: each member's call writes straight into
        # its own array, where one call over the span would make a new array, copy each
        # member's block out of it and, in an LSTM, compute σ of the g gate, which nothing reads
        return False
    shift = int(mine[0][0].args[1]) - int(blocks[0].args[1])
    offsets = [*_offsets(run), shift]
    span = max(offsets) - min(offsets) + size
    return (shift % size == 0 and shift not in offsets[:-1] and 2 * len(offsets) * size >= span
            and expr.args[0] == first.args[0].xreplace(
                {b: Block(b.args[0], b.args[1] + shift, size) for b in blocks}))


def _joint_statements(run: list[_Assign], printer: NumPyBatchPrinter) -> list[Statement]:
    """A run of _joint_calls: one call over the span of its blocks, then each member's part."""
    first = run[0].expr
    blocks, size = _blocks(first.args[0])
    offsets = _offsets(run)
    low, span = min(offsets), max(offsets) - min(offsets) + size
    joint = first.func(first.args[0].xreplace(
        {b: Block(b.args[0], b.args[1] + low, span) for b in blocks}))
    name = "_".join(batch_name(assign.target) for assign in run)
    names = [pretty(assign.target) for assign in run]
    whose = " and ".join(names) if len(names) == 2 else \
        f"{', '.join(names[:-1])} and {names[-1]}"
    out = [Statement(name, printer.doprint(joint),
                     f"{whose} in one call: the same function of blocks of the same arrays",
                     indent=1)]
    for offset, assign in zip(offsets, run):
        out.append(Statement(printer.doprint(assign.target.at_step(0)),
                             f"{name}[..., {offset - low}:{offset - low + size}]",
                             assign.comment, indent=1))
    return out


def _written(printer: NumPyBatchPrinter, expr: sp.Expr, out: str, comment: str
             ) -> list[Statement]:
    """``expr`` written into a step's slice ``out`` of an array made before the loop, with no
    array for the result: ``np.multiply(dC_dI1, I1_steps[t], out=delta1_steps[t][..., 0:5])``
    then ``delta1_steps[t][..., 0:5] *= 1 - I1_steps[t]``; a call as
    ``np.tanh(..., out=H1_steps[t])``."""
    return [Statement(target, code, comment if number == 0 else "", op, indent=1)
            for number, (target, op, code) in enumerate(printer.written_into(expr, out))]


@dataclass(frozen=True)
class _DeadArrays:
    """The arrays a statement may take over: made by this function, of the target's rank,
    and read by no later statement under any of their names (nor kept)."""

    buffer_of: dict[NetTensor, int]
    live_until: dict[int, float]
    index: int
    target: NetTensor | str
    strided: set[NetTensor]

    def __contains__(self, tensor: object) -> bool:
        return (isinstance(tensor, NetTensor) and isinstance(self.target, NetTensor)
                and tensor in self.buffer_of and tensor not in self.strided
                and tensor.rank == self.target.rank
                and self.live_until[self.buffer_of[tensor]] <= self.index)


def _chain(printer: NumPyBatchPrinter, steps: list[tuple[str, sp.Expr]], name: str,
           large: bool) -> list[tuple[str, str, str]] | None:
    """A statement over ``large`` arrays (feature maps, or every step of a sequence) that
    makes two or more arrays for an elementwise expression, as lines (target, op, code) that
    make one (NumPyBatchPrinter.chained): an LSTM's g_t ⊙ i_t ⊙ (1 - i_t) for every step
    (``delta1_in_steps = 1 - I1_steps``, ``delta1_in_steps *= G1_steps``, ...); a new array
    times, or plus, such an expression (δ¹ = fold(δ²) ⊙ (1/4)(1 - (a¹)²)) with the expression
    computed into the target first and the new array multiplied or added in (``delta1 =
    A1**2``, ``delta1 *= 0.25``, ``np.subtract(0.25, delta1, out=delta1)``, ``delta1 *=
    _fold(...)``): each array the expression made was written and read once more. None for any
    other statement; rows of a dense layer are small enough that the arrays cost less than
    the lines."""
    if not large:
        return None
    if len(steps) == 1 and steps[0][0] == "=":
        lines = printer.chained(steps[0][1], name)
        return lines if lines is not None and len(lines) > 1 else None
    # (the factor over feature maps, as the new array is: so of its shape, not narrower)
    if len(steps) != 2 or steps[0][0] != "=" or not _fresh(steps[0][1]) or steps[1][0] not in (
            "*=", "+=") or {t.rank for t in steps[1][1].atoms(NetTensor)} != {3}:
        return None
    fresh, op = steps[0][1], steps[1][0]
    placed = tiled(fresh)
    if placed is not None and op == "*=":
        # an average pool's error times f(a): f(a) into the target, then each tile of it
        # times its window's error, the number (1/4) on the pooled error, a quarter the size
        coefficient, factor = steps[1][1].as_content_primitive()   # 1/4 - a²/4: 1/4, 1 - a²
        lines = printer.chained(factor, name)
        if lines is None and not (factor.is_number or isinstance(factor, NetTensor)
                                  or is_bracket(factor)):
            lines = [(name, "=", printer.doprint(factor))]     # a new float array
        if lines is not None:
            return [*lines, (name, "=", printer.times_tiles(name, coefficient * placed,
                                                             fresh.args[4]))]
    lines = printer.chained(steps[1][1], name)
    if lines is None:
        return None
    return [*lines, (name, op, printer.doprint(fresh))]


def _op(op: str, expr: sp.Expr) -> str:
    if op == "+=" and expr.could_extract_minus_sign():
        return "-="
    return op


def _signed(printer: NumPyBatchPrinter, op: str, expr: sp.Expr) -> str:
    if op == "+=" and expr.could_extract_minus_sign():
        return printer.doprint(-expr)
    return printer.doprint(expr)


def _in_place(expr: sp.Expr, dead: _DeadArrays
              ) -> tuple[list[tuple[str, sp.Expr]], NetTensor | None]:
    """(steps [("=", buffer), ("+=", rest), ("*=", factor)], the dead array reused or None)."""

    def buffer_in_sum(add: sp.Expr) -> sp.Expr | None:
        terms = sp.Add.make_args(add)
        for term in terms:                       # a new array first, then a dead array
            if _fresh(term):
                return term
        for term in terms:
            if term in dead and not (add - term).has(term):
                return term
        return None

    if isinstance(expr, sp.Add):
        buffer = buffer_in_sum(expr)
        if buffer is not None:
            reused = buffer if isinstance(buffer, NetTensor) else None
            return [("=", buffer), ("+=", expr - buffer)], reused
    if isinstance(expr, sp.Mul):
        for factor in expr.args:
            if not (isinstance(factor, sp.Add) or _fresh(factor) or factor in dead):
                continue
            rest = expr / factor
            # a matrix product, a fold, a contraction (each prints as a new array)
            if _fresh(factor) or (factor in dead and not rest.has(factor)):
                reused = factor if isinstance(factor, NetTensor) else None
                return [("=", factor), ("*=", rest)], reused
            if isinstance(factor, sp.Add):
                buffer = buffer_in_sum(factor)
                if buffer is not None and not (isinstance(buffer, NetTensor)
                                               and rest.has(buffer)):
                    reused = buffer if isinstance(buffer, NetTensor) else None
                    return [("=", buffer), ("+=", factor - buffer), ("*=", rest)], reused
    return [("=", expr)], None


def _fresh(expr: sp.Expr) -> bool:
    """Whether ``expr`` prints as a new array that nothing else names: a matrix product, a
    fold, a window maximum, a sum over the samples, a contraction of two or more arrays or one
    that sums axes away (not a one-operand transposition, which NumPy gives as a view)."""
    if isinstance(expr, MatVec | Outer | MatProd | Fold | WindowsMax | RowSum):
        return True
    if isinstance(expr, Einsum):
        inputs, output = str(expr.args[0]).split("->")
        return len(expr.args) > 2 or len(output) < len(inputs)
    return False


def _init(node: Node, parameter: Parameter) -> tuple[str, str]:
    """(code of the initial value, the rule's name) of one parameter."""
    shape = parameter.shape
    if parameter.init == "zeros":
        return f"np.zeros({shape[0]}, dtype=dtype)", "zeros"
    if parameter.init == "ones":
        return f"np.ones({shape[0]}, dtype=dtype)", "ones"
    # fan-out the first axis, fan-in the others (a custom op's U[j, k, m]: n_in·n_in)
    rows, cols = shape[0], math.prod(shape[1:])
    if parameter.init == "fan" and node.activation is not None and \
            node.activation.name in HE_INIT:
        scale, rule = math.sqrt(2.0 / cols), "He"
    else:
        scale, rule = math.sqrt(2.0 / (cols + rows)), "Glorot"
    return f"(rng.standard_normal({shape}) * {scale!r}).astype(dtype)", rule


def _demo(spec: NetworkSpec, model: Model) -> tuple[Demo, dict[str, object]]:
    """Which demo data a module trains on, and with which settings."""
    n_in, n_out = spec.sizes[0], spec.sizes[-1]
    needs = model.loss.needs
    if spec.image is not None and needs == "distribution":
        return Demo("demo_images.py.j2", 15, 0.05, 32), {"n_out": n_out}
    activation = model.output.activation
    low, high = (activation.output_range if activation is not None else None) or (0.0, 1.0)
    if spec.length is not None:
        # sequences: a task of the output's kind; the gradient norm clipped (BPTT)
        sequence_out = len(spec.shapes[-1]) == 2
        task = ("majority" if needs == "distribution" and sequence_out and n_in >= n_out
                else "tones" if needs == "distribution" else "sign" if needs == "probability"
                else "next" if sequence_out else "adding" if n_in == 2 else "mean")
        return Demo("demo_sequences.py.j2", 30, 0.01, 32, 1.0, "adam"), {
            "n_in": n_in, "n_out": n_out, "length": spec.length, "task": task,
            "sequence_out": sequence_out, "low": low, "high": high}
    if n_in == 2 and n_out == 1 and needs != "distribution":
        # a two-input, one-output network: the classic test that a hidden layer is needed
        return Demo("demo_xor.py.j2", 3000, 2.0, None), {}
    extra: dict[str, object] = {"n_in": n_in, "n_out": n_out}
    if needs == "distribution":
        return Demo("demo_classes.py.j2", 40, 0.1, 32), extra
    if needs == "probability":
        return Demo("demo_binary.py.j2", 40, 0.1, 32), extra
    activation = model.output.activation
    low, high = (activation.output_range if activation is not None else None) or (0.0, 1.0)
    return Demo("demo_regression.py.j2", 40, 0.05, 32), {**extra, "low": low, "high": high}


def _forward_quantities(model: Model, shared: tuple[sp.Expr, NetTensor] | None
                        ) -> list[NetTensor]:
    """Every per-sample quantity a forward pass reads or computes, in its order: x, then each
    node's leaves (a dropout mask) and its equations' targets, then a shared log-sum-exp."""
    out = {model.x.label: None}          # ordered, with set lookups
    for equation in model.equations:
        out.update(dict.fromkeys(sorted(t for t in equation.expr.atoms(NetTensor)
                                        if not t.is_parameter and t not in out
                                        and t.node is not None)))
        out[equation.target] = None
    return [*out] if shared is None else [*out, shared[1]]


def _reads(exprs: list[sp.Expr], quantities: dict[NetTensor, int]) -> set[NetTensor]:
    """The forward pass's ``quantities`` that the expressions read (a step view: its
    sequence)."""
    return {t.whole for expr in exprs for t in expr.atoms(NetTensor) if t.whole in quantities}


def _inlined(assigns: list[_Assign], local: frozenset[NetTensor]) -> list[_Assign]:
    """A loop's statements with each product held in one step's array that one other
    statement reads, once, as a factor, written into that statement instead (an LSTM's
    ∂C/∂i_t = ∇_c C ⊙ g_t into its δ's block ∂C/∂i_t ⊙ i_t ⊙ (1 - i_t)): hoisted then
    multiplies the loop-invariant factors of both before the loop, in one array (g_t ⊙ i_t ⊙
    (1 - i_t)), and the step makes one multiplication where it made three."""
    def factor_once(view: NetTensor, expr: sp.Expr) -> bool:
        found = list(sp.preorder_traversal(expr))
        return found.count(view) == 1 and any(isinstance(e, sp.Mul) and view in e.args
                                              for e in found)

    out = list(assigns)
    where: dict[NetTensor, list[str]] = {}
    number = 0
    while number < len(out):
        assign = out[number]
        view = assign.target.at_step(0) if assign.target in local else None
        readers = [n for n, other in enumerate(out) if n != number and view is not None
                   and other.expr.has(view)]
        if not (isinstance(assign.expr, sp.Mul) and len(readers) == 1
                and factor_once(view, out[readers[0]].expr)):
            number += 1
            continue
        reader = out[readers[0]]
        out[readers[0]] = _Assign(reader.target, reader.expr.xreplace({view: assign.expr}),
                                  reader.comment)
        where.setdefault(reader.target, []).extend(
            [*where.pop(assign.target, []), *([assign.comment] if assign.comment else [])])
        del out[number]
    # each statement's comment with the definitions written into it
    return [_Assign(a.target, a.expr, f"{a.comment}, where {'; '.join(where[a.target])}")
            if a.comment and where.get(a.target) else a for a in out]


def _common_subexpressions(body: list[_Assign]) -> tuple[list[_Assign], frozenset[NetTensor]]:
    """A loop's statements with each subexpression that two or more of them read (or one reads
    twice) computed once per step, into a step's array of its own, before the first statement
    that reads it (a GRU's 1 - n_t² and δ_t (1 - u_t) (1 - n_t²), read by three blocks of its
    gates' errors); only those that read this step alone, outside any step's guard, and are
    more than an array times a number. A whole block of stacked gates that another array has
    too is left where it is: the loop writes it once and copies it into the other (_LoopCode).
    Returns (the statements, the new arrays)."""
    exprs = [assign.expr for assign in body]
    found, exprs = sp.cse(exprs, symbols=sp.numbered_symbols("_common"), order="none")
    everything = [*exprs, *(value for _, value in found)]

    def only_blocks(symbol: sp.Symbol) -> bool:
        reads = sum(list(sp.preorder_traversal(e)).count(symbol) for e in everything)
        blocks = sum(concat.args[:-1].count(symbol) for e in everything
                     for concat in e.atoms(Concat))
        return reads == blocks

    kept: dict[sp.Symbol, NetTensor] = {}
    back: dict[sp.Symbol, sp.Expr] = {}
    made: list[_Assign] = []
    for symbol, value in found:
        value = value.xreplace(back)
        if value.has(Guarded, StepGuard, Concat) or not views(value) or any(
                v.step for v in views(value)) or isinstance(
                value.as_coeff_Mul()[1], NetTensor) or only_blocks(symbol):
            back[symbol] = value.xreplace(kept)
            continue
        array = NetTensor("hoisted", rank=2, of=f"common{len(kept) + 1}")
        kept[symbol] = array.at_step(0)
        made.append(_Assign(array, value.xreplace(kept), "read by more than one statement of "
                            "this step: computed once"))
    exprs = [e.xreplace(back).xreplace(kept) for e in exprs]
    out: list[_Assign] = []
    placed: set[NetTensor] = set()
    for assign, expr in zip(body, exprs):
        for common in made:
            if common.target not in placed and expr.has(common.target.at_step(0)):
                for needed in made:     # with the arrays it reads, in the order made
                    if needed.target not in placed and (needed is common or common.expr.has(
                            needed.target.at_step(0))):
                        out.append(needed)
                        placed.add(needed.target)
        out.append(_Assign(assign.target, expr, assign.comment))
    return out, frozenset(placed)


def _shared_sums(parts: list[sp.Expr]) -> set[sp.Expr]:
    """The sums that two or more of a loop's parts to hoist read (or are): the parts that read
    one stay in the loop (_timed)."""
    counts: dict[sp.Expr, int] = {}
    for part in dict.fromkeys(parts):
        for found in {e for e in sp.preorder_traversal(part) if isinstance(e, sp.Add)}:
            counts[found] = counts.get(found, 0) + 1
    return {e for e, count in counts.items() if count > 1}


def _cheapest(expr: sp.Expr) -> sp.Expr:
    """A loop statement in the form with the fewest array operations (``operations``) among:
    as _factored writes it, and with its terms expanded and collected on each quantity it reads
    at this step (a GRU's h_t = (1 - u_t) n_t + u_t h_{t-1} as n_t + u_t (h_{t-1} - n_t):
    three operations, not four); the earlier on a tie."""
    best = _factored(expr)
    if not isinstance(expr, sp.Add):
        return best
    expanded = sp.Add(*(term.expand(deep=False) for term in expr.args))
    for view in sorted((v for v in views(expr) if v.step == 0), key=sp.default_sort_key):
        collected = sp.collect(expanded, view)
        if operations(collected) < operations(best):
            best = collected
    return best


def _factored(expr: sp.Expr) -> sp.Expr:
    """``expr`` with the factors common to its unguarded terms taken out once (guarded by a
    step's bounds, as loops print them, or as the derivation wrote them)."""
    if not isinstance(expr, sp.Add):
        return sp.factor_terms(expr)
    guarded_terms = [term for term in expr.args if term.has(Guarded, StepGuard)]
    plain = sp.Add(*(term for term in expr.args if not term.has(Guarded, StepGuard)))
    return sp.factor_terms(plain) + sp.Add(*guarded_terms)


def _batch_mean(expr: sp.Expr) -> sp.Expr:
    """``expr`` with the terms that read no adjoint (the loss gradient's) divided by B."""
    def adjoint(e: sp.Expr) -> bool:
        return any(t.role in ("grad", "delta") for t in e.atoms(NetTensor))

    if not adjoint(expr):
        return expr / BATCH
    if isinstance(expr, sp.Add):
        return sp.Add(*(_batch_mean(term) for term in expr.args))
    if isinstance(expr, sp.Mul):
        (factor,) = [f for f in expr.args if adjoint(f)]     # linear in the adjoints
        return expr.xreplace({factor: _batch_mean(factor)})
    return expr


def _feature_width(model: Model, tensor: NetTensor) -> int:
    """The number of features of a quantity, δ^l or an adjoint (of its quantity's)."""
    if tensor.role == "delta":
        tensor = model.node(tensor.node).forward.delta
    elif tensor.role == "grad":
        tensor = tensor.target
    return int(sp.sympify(model.feature_widths[tensor]).xreplace(model.widths))


def _timed(assigns: list[_Assign], model: Model, forward: bool,
           keep: set[NetTensor] = frozenset(),
           kept: dict[NetTensor, NetTensor] | None = None) -> list:
    """The assignments, with those that need a loop over time steps in one
    (:mod:`derive.render.timeloops`); what a loop reads from outside it is hoisted before it,
    for every step at once. A loop quantity that nothing reads at another step, after the
    loop or in ``keep`` (the cache) is one step's array, not a (T, B, n) one. ``kept``: the
    arrays of _kept_calls, each with the quantity whose shape it has."""
    kept = kept or {}
    out: list = []
    items = loops(assigns)
    for number, item in enumerate(items):
        if not isinstance(item, Loop):
            out.append(item)
            continue
        later = set(keep) | {t.whole for other in items[number + 1:] for t in (
            _read(other) if isinstance(other, _Assign) else
            {a for loop_assign in other.assigns for a in _read(loop_assign)})}
        shifted = {v.whole for assign in item.assigns for v in views(assign.expr) if v.step}
        targets = tuple(assign.target for assign in item.assigns)
        local = frozenset(t for t in targets if t not in later and t not in shifted
                          and t != model.output.output)
        exprs, parts = [], {}
        assigns = _inlined(item.assigns, local)
        targets = tuple(assign.target for assign in assigns)
        local &= set(targets)
        hoists = [hoisted(_cheapest(assign.expr), set(targets)) for assign in assigns]
        shared = _shared_sums([part for _, found in hoists for _, part in found])
        for assign, (expr, found) in zip(assigns, hoists):
            made = 0
            for placeholder, part in found:
                inside = set(sp.preorder_traversal(part))
                if any(piece in inside for piece in shared):
                    # a part reading a sum that another part reads too (a GRU's 1 - u_t and
                    # 1 - n_t²) stays in the loop: each step computes the sum once (below),
                    # on blocks still in cache, rather than reading several arrays of every
                    # step that hold its products (docs/architecture.md, "Sequences")
                    expr = expr.xreplace({placeholder: part})
                    continue
                if part not in parts:       # not computed before the loop for another one
                    array = NetTensor("hoisted", rank=2, of=f"{batch_name(assign.target)}_in"
                                      f"{made + 1 if made else ''}")
                    out.append(_Assign(array, part, f"{'another' if made else 'the'} part of "
                                       f"{pretty(assign.target)} from outside the loop below, "
                                       "for every step at once"))
                    parts[part] = array.at_step(0)
                    made += 1
                expr = expr.xreplace({placeholder: parts[part]})
            exprs.append(expr)
        body, common = _common_subexpressions(
            [_Assign(assign.target, guarded(expr.xreplace(parts)), assign.comment)
             for assign, expr in zip(assigns, exprs)])
        local |= common
        length = model.spec.length
        arrays = tuple(t for t in targets if t not in local)
        out.append(_LoopCode(arrays, tuple((length, _feature_width(model, kept.get(t, t)))
                                           for t in arrays),
                             tuple(body), item.forward, length,
                             "X.shape[0]" if forward else "B", "X.dtype" if forward else "Y.dtype",
                             batch_major=frozenset({model.output.output}), local=local))
    return out


def _gate_major(forward: list, backward: list, model: Model
                ) -> dict[NetTensor, tuple[int, int]]:
    """The arrays stored gate-major (docs/architecture.md, "Sequences"), each with its (number
    of gates G, gate width w): a forward array of stacked gates' pre-activations, a sum of
    matrix products of parameters, bias vectors and other such arrays (an LSTM's z_t = Wx x_t
    + Wh h_{t-1} + b, its Wx x_t + b hoisted before the loop; a GRU's two), that every
    statement reads through blocks of whole gates (z_t[0:n], the input gate) or whole as a
    term of another such array's value. Its gates as (T, G, B, w) make each gate's block of a
    step one contiguous array: NumPy reads a block of columns of (B, G w) rows 1.5-2x slower."""
    def assigns(items: list) -> list[_Assign]:
        return [a for item in items for a in (item.body if isinstance(item, _LoopCode)
                                              else [item]) if a.code is None]

    def linear(term: sp.Expr) -> bool:
        inner = term.args[0] if isinstance(term, Guarded) else term
        if isinstance(inner, MatVec):
            return not inner.args[2] and isinstance(inner.args[0], NetTensor) and \
                inner.args[0].is_parameter
        return isinstance(term, NetTensor) and (term.is_parameter and term.rank == 1
                                                or not term.is_parameter)

    shapes = {p.tensor: p.shape for p in model.parameters}

    def rows(expr: sp.Expr) -> int | None:
        for term in sp.Add.make_args(expr):
            for tensor in term.atoms(NetTensor):
                if tensor.is_parameter and tensor in shapes:
                    return int(shapes[tensor][0])
        return None

    values = {a.target: a.expr for a in assigns(forward) if isinstance(a.target, NetTensor)
              and a.target != model.output.output
              and all(linear(term) for term in sp.Add.make_args(a.expr))}
    widths = {target: rows(expr) for target, expr in values.items()}
    every = assigns(forward) + assigns(backward)
    candidates = {target for target, width in widths.items() if width}
    while True:
        read_by: dict[NetTensor, set[int]] = {t: set() for t in candidates}  # block bounds
        whole_in: dict[NetTensor, set[NetTensor]] = {t: set() for t in candidates}
        for assign in every:
            for block in assign.expr.atoms(Block):
                tensor = block.args[0]
                if isinstance(tensor, NetTensor) and tensor.whole in candidates:
                    read_by[tensor.whole] |= {int(block.args[1]), int(block.args[2])}
            rest = assign.expr.xreplace({b: sp.Integer(1) for b in assign.expr.atoms(Block)})
            for tensor in rest.atoms(NetTensor):
                if tensor.whole in candidates:
                    whole_in[tensor.whole].add(assign.target if tensor in sp.Add.make_args(
                        assign.expr) and assign.target in candidates else None)
        found = {}
        for target in candidates:
            bounds = read_by[target]
            terms = {t.whole for t in sp.Add.make_args(values[target])
                     if isinstance(t, NetTensor) and not t.is_parameter}
            if whole_in[target] - {t for t in candidates if t != target} or not (
                    bounds or whole_in[target]) or terms - candidates:
                continue
            width = math.gcd(*bounds) if bounds else 0
            found[target] = (widths[target], width)
        # an array and the one whose value it is a term of are summed: one gate width
        for _ in candidates:
            for target in found:
                for reader in whole_in[target] & found.keys():
                    width = math.gcd(found[target][1], found[reader][1])
                    found[target] = (found[target][0], width)
                    found[reader] = (found[reader][0], width)
        found = {t: (size // width, width) for t, (size, width) in found.items()
                 if width and size % width == 0 and size // width > 1}
        if set(found) == candidates:
            return found
        candidates = set(found)


#: Feature maps given batch-first, (B, C, H, W), as generated code keeps them: (C, H, W, B).
_BATCH_LAST = ".transpose(1, 2, 3, 0)"


def _forward_assignments(model: Model, printer: NumPyBatchPrinter,
                         shared: tuple[sp.Expr, NetTensor] | None) -> list[_Assign]:
    """The forward pass, one assignment per equation, each from the model's equations."""
    out: list[_Assign] = []
    if len(model.spec.input_shape) == 3:
        out.append(_Assign("X", sp.Integer(0), "feature maps batch-last, (C, H, W, B) (a view): "
                           "every slice along H and W runs over W * B numbers",
                           code=f"X{_BATCH_LAST}"))
    output = _output_equation(model)
    for equation in model.equations:
        expr = stabilize(equation_tensor(equation, model.feature_widths).xreplace(
            model.widths)).expr
        if shared is not None and equation is output and isinstance(expr, Softmax):
            # the output and the loss's log-sum-exp from one exponential of the logits
            _logsumexp, lse = shared
            printer.helpers.add("_softmax_logsumexp")
            name = f"{batch_name(equation.target)}, {printer.doprint(lse)}"
            # printed with the forward pass, which knows the step-major arrays of its loops
            out.append(_Assign(name, expr, code=lambda printer, logits=expr.args[0]:
                               f"_softmax_logsumexp({printer.doprint(logits)})"))
            continue
        out.append(_Assign(equation.target, expr))
    return out


def module_context(derivation: Derivation, regenerate: str | None = None) -> dict[str, object]:
    """Everything the module template places: printed code strings and plain values."""
    model = derivation.model
    spec = model.spec
    printer = NumPyBatchPrinter()
    printer.length = spec.length or 0

    # the loss value, in its stable form; a softmax output may share its log-sum-exp with it
    loss_expr, loss_applied = _loss_expression(model)
    shared = _shared_logsumexp(model, loss_expr)
    if shared is not None:
        loss_expr = loss_expr.xreplace({shared[0]: shared[1]})

    forward_assigns = _forward_assignments(model, printer, shared)
    parameters: list[dict[str, object]] = []
    init_rules = set()
    for node in model.nodes:
        for parameter in node.parameters:
            code, rule = _init(node, parameter)
            if rule in ("He", "Glorot"):
                init_rules.add(rule)
            parameters.append({"key": parameter.key, "init": code})
    unpack = [", ".join(p.key for p in node.parameters) + " = "
              + ", ".join(f'params["{p.key}"]' for p in node.parameters)
              for node in model.nodes if node.parameters]
    dropout = [{"mask": batch_name(NetTensor("mask", node.index, rank=len(node.dims))),
                "size": ", ".join(map(str, node.dims)),
                "keep": repr(1.0 - float(dict(node.options)["rate"])),
                # a mask of feature maps is given (B, C, H, W), used batch-last as they are
                "layout": _BATCH_LAST if len(node.dims) == 3 else "",
                # dropout off: 1; on a sequence an array of ones with every step (1, T, 1),
                # whose axes a loop's step-major statements can swap and index at step t
                "off": "1.0" if len(node.dims) != 2 else
                f"np.ones((1, {node.dims[0]}, 1), dtype=X.dtype)"}
               for node in model.nodes if node.op.name == "dropout"]

    # backward pass: every formula after the loss gradient, in the derivation's order
    backward_assigns: list[_Assign] = []
    # (what, stable form, exact form) of every printed formula, for the overflow probe
    checked = [("the loss", loss_expr, model.loss_of(_output_equation(model).target,
                                                    NetTensor("y")))]
    gradient_names: list[tuple[str, str]] = []

    first = True
    zero: dict[sp.Expr, sp.Expr] = {}       # adjoints that are 0 (through a step function)
    for formula in derivation.formulas:
        if formula.kind == "loss gradient":
            continue
        # a sum over the time steps is a sum over rows, as the one over the samples is
        vector = formula.vector.replace(lambda e: isinstance(e, SumSteps), lambda e: e.args[0])
        stable = stabilize(vector.xreplace(zero).xreplace(model.widths))
        checked.append((_lhs_text(formula), stable.expr, vector.xreplace(model.widths)))
        label = f"{formula.equation}: " if formula.equation else ""
        text = (f"{label}{_lhs_text(formula)} = {pretty(formula.vector)}"
                f"{_applied_note(stable.applied)}")
        if formula.kind in ("delta", "adjoint"):
            expr = stable.expr
            if _whole(expr):    # α ⊙ g - α ⊙ rowsum(α ⊙ g): α ⊙ (g - rowsum(α ⊙ g))
                expr = sp.factor_terms(expr)
            if expr == 0:
                zero[formula.target] = sp.Integer(0)
                continue
            if first:
                # the root of every other adjoint: dividing it by B makes every row sum below
                # a batch mean, since each backward formula is linear in the adjoints it reads
                # (a recurrent output's reads its own later steps: only the loss's part)
                expr, text, first = _batch_mean(expr), text + ", each row divided by B", False
            backward_assigns.append(_Assign(formula.target, expr, text))
            continue
        name = f"d{batch_name(formula.of)}"
        if stable.expr == 0 and formula.penalty == 0:
            shape = next(p.shape for p in model.parameters if p.tensor == formula.of)
            backward_assigns.append(_Assign(name, sp.Integer(0), text, code=(
                f"np.zeros({shape}, dtype=Y.dtype)")))
            continue
        # outer products sum over the rows as they multiply (Δᵀ A); the rest is summed
        terms = sp.Add.make_args(stable.expr)
        outer = [term for term in terms if term.as_coeff_Mul()[1].func == Outer]
        rest = sp.Add(*(term for term in terms if term not in outer))
        expr = sp.Add(*outer, *([RowSum(rest)] if rest != 0 else []))
        if formula.penalty != 0:
            # the penalty's gradient enters once per batch, added to the row sum in place
            penalty = formula.vector_penalty.xreplace(model.widths)
            expr = expr + penalty
            text += (f", summed over the rows, + ∂R/∂{pretty(formula.of)} = {pretty(penalty)} "
                     "once per batch")
        else:
            text += ", summed over the rows"
        backward_assigns.append(_Assign(name, expr, text))
    updates = []
    for parameter in model.parameters:
        gradient_names.append((parameter.key, f"d{parameter.key}"))
        nbytes = math.prod(parameter.shape) * 8
        updates.append({"key": parameter.key, "blocked": nbytes > UPDATE_BLOCK_BYTES})

    forward_assigns, backward_assigns, kept = _kept_calls(forward_assigns, backward_assigns)
    forward_assigns, windows = _kept_windows(forward_assigns, backward_assigns, printer)
    backward_assigns = _routed_factors(backward_assigns, printer.maxima)
    # cache only what backward and the loss read (a kept array after its quantity)
    backward_exprs = [assign.expr for assign in backward_assigns]
    quantities = {t: (n, 0) for n, t in enumerate(_forward_quantities(model, shared))}
    for n, (array, source) in enumerate([*windows.items(), *kept.items()], start=1):
        quantities[array] = (quantities[source][0], n)
    backward_reads = _reads([expr.xreplace(printer.columns) for expr in backward_exprs],
                            quantities) | set(printer.maxima.values())
    loss_reads = _reads([loss_expr], quantities)
    needed = sorted(backward_reads | loss_reads, key=quantities.__getitem__)
    batch_only = frozenset({model.output.output, *loss_reads})    # the loss reads (B, T, n)
    forward_items = _timed(forward_assigns, model, True, {*needed, model.output.output}, kept)
    backward_items = _timed(_shared_calls(backward_assigns, printer), model, False)
    printer.gates = _gate_major(forward_items, backward_items, model)
    forward = _statements(forward_items, {*needed, model.output.output}, printer, batch_only)
    # printed after the forward pass, whose loops make their arrays step-major: the loss reads
    # a recurrent output's z as Z1_steps.swapaxes(0, 1), batch-first like Y
    overflows, printer.overflows = printer.overflows, False
    loss_code = printer.doprint(loss_expr)
    loss_quiet, printer.overflows = printer.overflows, overflows
    cache = [printer.name(t) for t in needed]
    printer.batch_size = "B"
    backward = _statements(backward_items, set(), printer, batch_only)
    why = []
    for tensor in needed:
        readers = [name for name, reads in (("backward", backward_reads), ("loss", loss_reads))
                   if tensor in reads]
        why.append(f"{printer.name(tensor)} ({' and '.join(readers)})")
    keys = [p.key for p in model.parameters]
    params_read = sorted({t for e in backward_exprs for t in e.atoms(NetTensor)
                          if t.is_parameter}, key=lambda t: keys.index(batch_name(t)))
    backward_unpack = [f'{batch_name(t)} = params["{batch_name(t)}"]' for t in params_read]
    read_names = [printer.name(t) for t in needed if t in backward_reads]
    if read_names:
        backward_unpack.append(", ".join(read_names) + " = "
                               + ", ".join(f'cache["{name}"]' for name in read_names))
    loss_names = [printer.name(t) for t in needed if t in loss_reads]
    loss_unpack = (", ".join(loss_names) + " = "
                   + ", ".join(f'cache["{name}"]' for name in loss_names))
    loss_comments = [f"C = {pretty(model.cost)} per sample"]
    if loss_applied:
        loss_comments.append(f"in a numerically stable form: {', '.join(loss_applied)}")
    penalty_code = None
    if model.penalty != 0:
        # R is the model's own penalty expression, printed like every other formula
        penalty_code = printer.doprint(to_vector(model.penalty, ()))

    demo, demo_values = _demo(spec, model)
    used = helper_closure(printer.helpers)
    helpers = [HELPERS[name] for name in HELPERS if name in used]
    formula_lines = [f"({f.equation}) {_lhs_text(f)} = {pretty(f.vector)}" if f.equation
                     else f"{_lhs_text(f)} = {pretty(f.vector)}"
                     for f in derivation.formulas if f.kind != "loss gradient"]
    if model.is_chain:
        activations = tuple(node.activation.name for node in model.nodes)
        architecture = " -> ".join(map(str, spec.sizes))
        description = (f"Activations: {', '.join(activations)}; loss: {model.loss.name} per "
                       "sample, averaged over the batch.")
    else:
        shape = "x".join(map(str, spec.input_shape))
        architecture = f"a graph of {model.depth} ops, {shape} -> {spec.sizes[-1]}"
        description = "Layers: " + "; ".join(_node_text(node) for node in model.nodes) + (
            f". Loss: {model.loss.name} per sample, averaged over the batch.")
    first_parameter = model.parameters[0].key if model.parameters else None
    init_rule = " and ".join(
        {"He": "He's sqrt(2 / n_in) (relu-like layers)",
         "Glorot": "Glorot's sqrt(2 / (n_in + n_out))"}[rule] for rule in sorted(init_rules))
    api = (f"API (derive's Contract 2): {'LAYER_SIZES, ' if model.is_chain else ''}INPUT_SHAPE, "
           "OUTPUT_SHAPE, init_params, forward, loss, gradients, sgd_step, train, "
           "gradient_check. Parameters are a dict of arrays: "
           + ", ".join(f"{p.key} {p.shape}" for p in model.parameters)
           + ". Run this file to train on its demo data.")
    forward_doc = (f"The forward pass: (output {batch_name(model.output.output)}, cache). The "
                   f"cache keeps only what backward and the loss read: {', '.join(why)}."
                   + (" Dropout is off unless `masks` (from _dropout_masks) is given."
                      if dropout else ""))
    return {
        "version": __version__,
        "stability_notes": _overflow_notes(model, checked),
        "spec_name": spec.name,
        "digest": spec.digest(),
        "digest_literal": repr(spec.digest()),
        "regenerate": regenerate or _default_regenerate(spec),
        "chain": model.is_chain,
        "sizes": repr(list(spec.sizes)),
        "sizes_text": architecture,
        "description": _wrap(description, 0),
        "api_text": _wrap(api, 0),
        "forward_text": _wrap(forward_doc, 4),
        "init_text": _wrap(f"Fresh parameters: normal weights scaled by {init_rule}, zero "
                           "biases" + (", layer-norm scales one" if any(
                               p.init == "ones" for p in model.parameters) else "") + ".", 4),
        "input_shape": repr(spec.input_shape),
        "output_shape": repr(spec.shapes[-1]),
        "activations": repr(tuple(n.activation.name if n.activation else None
                                  for n in model.nodes)),
        "loss_name": repr(model.loss.name),
        "formula_lines": formula_lines,
        "chain_formulas": model.is_chain,
        "helpers": helpers,
        "parameters": parameters,
        "unpack": unpack,
        "dropout": dropout,
        "dtype_source": first_parameter,
        "forward": forward,
        "output": batch_name(model.output.output),
        "cache": cache,
        "loss": {"code": loss_code, "unpack": loss_unpack, "comments": loss_comments,
                 "quiet": QUIET if loss_quiet else ""},
        "regularization": penalty_code,
        "penalty_text": _wrap(f"The regularization R = {pretty(to_vector(model.penalty, ()))}, "
                              "over the weights, once per batch.", 4) if penalty_code else "",
        "penalty_keys": [p.key for p in model.parameters if p.is_weight],
        "backward_unpack": backward_unpack,
        "backward": backward,
        "gradient_names": gradient_names,
        "updates": updates,
        "optimizer_helpers": list(OPTIMIZER_HELPERS.values()),
        "any_blocked": any(update["blocked"] for update in updates),
        "demo": {"template": demo.template, "epochs": demo.epochs, "lr": repr(demo.lr),
                 "batch_size": repr(demo.batch_size),
                 "clip": repr(demo.clip) if demo.clip is not None else None,
                 "optimizer": demo.optimizer},
        **demo_values,
    }


def _custom_arguments(model: Model) -> list[tuple[NetTensor, dict[NetTensor, tuple]]]:
    """(z, {a: (stable σ(z), exact σ(z))}) for every node whose activation is custom, and for
    the output node when the loss is custom: the arguments the overflow probe drives."""
    out = []
    for node in model.nodes:
        activation = node.activation
        if activation is None or activation.is_softmax or not (
                activation.custom or (node is model.output and model.loss.custom)):
            continue
        (equation,) = [e for e in node.equations if e.activation is not None]
        exact = _tensor(model, equation.expr, equation.indices)
        z = _tensor(model, equation.argument, equation.indices)
        out.append((z, {equation.target: (stabilize(exact).expr, exact)}))
    return out


def _overflow_notes(model: Model, checked: list[tuple[str, sp.Expr, sp.Expr]]) -> list[str]:
    """One line for each formula of a custom function whose generated code gives inf or NaN
    where its value is finite (see :mod:`derive.render.probe`)."""
    notes = []
    for z, outputs in _custom_arguments(model):
        forward = [(pretty(a), stable, exact) for a, (stable, exact) in outputs.items()]
        for what, stable, exact in forward + checked:
            point = first_overflow(stable, exact, z, outputs)
            if point is not None:
                notes.append(f"no overflow-free form found for {what}: the generated code "
                             f"gives inf or NaN at {pretty(z)} = {point:g}, where its value "
                             "is finite")
    return notes


def _wrap(text: str, indent: int) -> str:
    """Prose for a docstring, wrapped at 96 columns; continuation lines indented."""
    lines = textwrap.wrap(text, 96 - indent, break_on_hyphens=False, break_long_words=False)
    return ("\n" + " " * indent).join(lines)


def _node_text(node: Node) -> str:
    reads = ", ".join("x" if n == 0 else str(n) for n in node.inputs)
    what = node.op.name + (f" {node.width}" if node.op.name == "dense" else "")
    if node.activation is not None and node.activation.name != "identity":
        what += f" {node.activation.name}"
    return f"{node.label} = {what}({reads})"


def _default_regenerate(spec: NetworkSpec) -> str:
    source = spec.source
    if source.startswith("built-in example"):
        return f"derive codegen {spec.name} -o {module_filename(spec)}"
    if source == "<dict>":
        return f"derive codegen <spec of {spec.name}> -o {module_filename(spec)}"
    return f"derive codegen {Path(source).name} -o {module_filename(spec)}"


def _to_stderr(message: str) -> None:
    print(f"derive: warning: {message}", file=sys.stderr)


def render_module(derivation: Derivation, *, regenerate: str | None = None,
                  warn: Echo = _to_stderr) -> str:
    """The generated NumPy module of ``derivation``, as source text (deterministic bytes).

    ``regenerate`` is the command quoted on the header's second line (default: ``derive
    codegen <spec> -o <name>_net.py``). Each formula of a custom activation or loss that no
    stability rewrite keeps finite is reported through ``warn`` (one line, default standard
    error) and in a comment under the module's header.
    """
    context = module_context(derivation, regenerate)
    for note in context["stability_notes"]:
        warn(note)
    return render("module.py.j2", context)


def load_module(source_text: str, name: str) -> types.ModuleType:
    """Import generated source text as a module called ``name`` (not added to sys.modules)."""
    module = types.ModuleType(name)
    module.__file__ = f"<derive generated {name}>"
    exec(compile(source_text, module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module

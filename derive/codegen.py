"""Code generation stage: a self-contained NumPy training module from a Derivation.

``render_module(derivation)`` reads the derived formulas (never re-deriving anything), makes
them numerically stable with the named rewrites of :mod:`derive.stability`, prints them in the
batch reading with :class:`~derive.numpy_printer.NumPyBatchPrinter`, and places the printed
strings into ``codegen_templates/module.py.j2``, which holds structure only. The module follows
Contract 2 of DESIGN.md.

Command line (added through ``derive.cli.EXTENSIONS``): ``derive codegen SPEC -o FILE
[--force]`` and ``derive regen [--dir generated]``; the default ``derive`` run writes the module
of its example and trains it briefly (:func:`pipeline_step`).
"""

from __future__ import annotations

import argparse
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sympy as sp

from derive import __version__
from derive.derivation import Derivation, Formula, derive
from derive.files import write_generated
from derive.functions import Z
from derive.model import Model, build_model, j, split_name
from derive.numpy_printer import BATCH, HELPERS, NumPyBatchPrinter, RowSum
from derive.pretty import pretty, sup
from derive.spec import NetworkSpec, load_spec
from derive.stability import LogSumExp, Softmax, stabilize
from derive.templates import render
from derive.vectorform import Mat, MatVec, Outer, Vec, to_vector

Echo = Callable[[str], None]

#: Activations whose layers start with He's scale sqrt(2 / n_in); the others use Glorot's.
HE_INIT = frozenset({"relu", "leaky_relu", "elu", "silu", "gelu"})

#: Where ``derive regen`` writes by default, relative to the working directory.


@dataclass(frozen=True)
class Statement:
    """One line of generated code: ``target = code``, with a comment citing its equation."""

    target: str
    code: str
    comment: str = ""
    op: str = "="


@dataclass(frozen=True)
class Demo:
    """The demo a module's ``__main__`` runs: which data template, and its training settings."""

    template: str
    epochs: int
    lr: float
    batch_size: int | None


# --- templates ---------------------------------------------------------------------------


# --- names -------------------------------------------------------------------------------


def module_filename(spec: NetworkSpec) -> str:
    """The file name of a spec's generated module, e.g. ``xor_net.py``."""
    return f"{spec.name}_net.py"


def _vec(letter: str, layer: int | None = None) -> Vec:
    return Vec(letter if layer is None else f"{letter}^{layer}", real=True)


def _batch_name(printer: NumPyBatchPrinter, letter: str, layer: int) -> str:
    return printer.doprint(_vec(letter, layer))


# --- the render context ------------------------------------------------------------------


def _lhs_text(formula: Formula) -> str:
    """The left-hand side of a formula in vector notation: δ², ∂C/∂b², ∂C/∂W²."""
    letter, layer = split_name(formula.key.removeprefix("dC/d"))
    if formula.key.startswith("dC/d"):
        return f"∂C/∂{'W' if letter == 'w' else letter}{sup(layer)}"
    return pretty(_vec(letter, layer))


def _stable_vector(formula: Formula) -> tuple[sp.Expr, tuple[str, ...]]:
    stable = stabilize(formula.vector)
    return stable.expr, stable.applied


def _applied_note(applied: tuple[str, ...]) -> str:
    return f" [stable: {', '.join(applied)}]" if applied else ""


def _output_activation(model: Model, z: sp.Expr) -> sp.Expr:
    out = model.layer(model.depth)
    return Softmax(z) if out.activation.is_softmax else out.activation.expr.subs(Z, z)


def _loss_expression(model: Model) -> tuple[sp.Expr, tuple[str, ...]]:
    """The per-component loss in batch form, and the stability rewrites it needed.

    The loss is written in z^L (a^L replaced by sigma(z^L)) and rewritten; when a rewrite
    applied (log sigmoid, log softmax, ...) that stable form is used, with any sigma(z^L) left
    in it read back as a^L. Otherwise the plain form in a^L is cheaper and as accurate.
    """
    L = model.depth
    a, z, y = _vec("a", L), _vec("z", L), _vec("y")
    in_a = model.loss_of(a, y)
    activation = _output_activation(model, z)
    stable = stabilize(model.loss_of(activation, y))
    if not stable.applied:
        plain = stabilize(in_a)
        return plain.expr, plain.applied
    return stable.expr.xreplace({activation: a}), stable.applied


#: Network vectors a generated module may cache, in the order a layer's are listed.
_CACHED_LETTERS = ("z", "a", "lse")


def _reads(exprs: list[sp.Expr]) -> set[tuple[str, int]]:
    """The (letter, layer) of every network vector the expressions read (z^l, a^l, lse^l)."""
    out = set()
    for expr in exprs:
        for vec in expr.atoms(Vec):
            letter, layer = split_name(vec.name)
            if letter in _CACHED_LETTERS and layer is not None:
                out.add((letter, layer))
    return out


def _shared_logsumexp(model: Model, loss_expr: sp.Expr) -> tuple[sp.Expr, Vec] | None:
    """(LogSumExp(z^L), its name lse^L) when a softmax output and its loss can share it.

    The stable softmax cross-entropy reads LogSumExp(z^L), whose exponentials are those of
    the softmax. The forward pass then computes lse^L once and the output as
    Softmax(z) = exp(z - LogSumExp(z)), and the loss reads lse^L from the cache, instead of
    exponentiating z^L twice. None when the output is no softmax or the loss does not read
    LogSumExp(z^L).
    """
    L = model.depth
    if not model.layer(L).activation.is_softmax:
        return None
    logsumexp = LogSumExp(_vec("z", L))
    if not loss_expr.has(logsumexp):
        return None
    return logsumexp, _vec("lse", L)


def _in_place_product(expr: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(matrix product, other factors) of a product with exactly one matrix product, else None.

    BP2 is sigma'(z^l) ⊙ (W^{l+1})ᵀ δ^{l+1}: its matrix product is a fresh array, so the
    generated code multiplies it by the other factors in place (``delta1 = delta2 @ W2`` then
    ``delta1 *= ...``), one (batch, n_l) array fewer than ``delta1 = ... * (delta2 @ W2)``.
    """
    if not isinstance(expr, sp.Mul):
        return None
    products = [factor for factor in expr.args if isinstance(factor, MatVec)]
    others = [factor for factor in expr.args if not isinstance(factor, MatVec)]
    if len(products) != 1 or any(factor.has(MatVec, Outer) for factor in others):
        return None
    return products[0], sp.Mul(*others)


def _init_scale(activation_name: str, n_in: int, n_out: int) -> tuple[float, str]:
    if activation_name in HE_INIT:
        return math.sqrt(2.0 / n_in), "He"
    return math.sqrt(2.0 / (n_in + n_out)), "Glorot"


def _demo(spec: NetworkSpec, model: Model) -> tuple[Demo, dict[str, object]]:
    """Which demo data a module trains on, and with which settings."""
    n_in, n_out = spec.sizes[0], spec.sizes[-1]
    needs = model.loss.needs
    if n_in == 2 and n_out == 1 and needs != "distribution":
        # a two-input, one-output network: the classic test that a hidden layer is needed
        return Demo("demo_xor.py.j2", 3000, 2.0, None), {}
    extra: dict[str, object] = {"n_in": n_in, "n_out": n_out}
    if needs == "distribution":
        return Demo("demo_classes.py.j2", 40, 0.1, 32), extra
    if needs == "probability":
        return Demo("demo_binary.py.j2", 40, 0.1, 32), extra
    low, high = model.layer(model.depth).activation.output_range or (0.0, 1.0)
    return Demo("demo_regression.py.j2", 40, 0.05, 32), {**extra, "low": low, "high": high}


def module_context(derivation: Derivation, regenerate: str | None = None) -> dict[str, object]:
    """Everything the module template places: printed code strings and plain values."""
    model = derivation.model
    spec = model.spec
    L = model.depth
    printer = NumPyBatchPrinter()

    # the loss value, in its stable form; a softmax output may share its log-sum-exp with it
    loss_expr, loss_applied = _loss_expression(model)
    shared = _shared_logsumexp(model, loss_expr)
    if shared is not None:
        loss_expr = loss_expr.xreplace({shared[0]: shared[1]})
    loss_code = printer.doprint(loss_expr)

    # forward pass: z^l = W^l a^{l-1} + b^l and a^l = sigma_l(z^l), each printed from the model
    forward: list[Statement] = []
    layers: list[dict[str, object]] = []
    init_rules = set()
    for layer in model.layers:
        l = layer.index
        z_name = _batch_name(printer, "z", l)
        z_vector = stabilize(to_vector(layer.z_expr, (j,))).expr
        product = sp.Add(*(t for t in sp.Add.make_args(z_vector) if t.has(MatVec)))
        rest = sp.Add(*(t for t in sp.Add.make_args(z_vector) if not t.has(MatVec)))
        # the bias is added in place: a fresh (batch, n_l) array per `+` costs more than the
        # addition (allocation and page faults), as measured in bench/train_step.py
        forward.append(Statement(z_name, printer.doprint(product)))
        if rest != 0:
            forward.append(Statement(z_name, printer.doprint(rest), op="+="))
        a_expr = stabilize(to_vector(layer.a_expr, (j,))).expr
        if shared is not None and l == L:
            logsumexp, lse = shared
            forward.append(Statement(printer.doprint(lse), printer.doprint(logsumexp)))
            a_expr = a_expr.xreplace({Softmax(_vec("z", l)): sp.exp(_vec("z", l) - lse)})
        forward.append(Statement(_batch_name(printer, "a", l), printer.doprint(a_expr)))
        weight = printer.doprint(Mat(f"w^{l}", real=True))
        bias = printer.doprint(_vec("b", l)) if layer.b is not None else None
        scale, rule = _init_scale(layer.activation.name, spec.sizes[l - 1], spec.sizes[l])
        init_rules.add(rule)
        unpack = f'{weight} = params["{weight}"]'
        if bias:
            unpack = f'{weight}, {bias} = params["{weight}"], params["{bias}"]'
        layers.append({"weight": weight, "bias": bias, "rows": spec.sizes[l],
                       "cols": spec.sizes[l - 1], "scale": repr(scale), "unpack": unpack})

    # backward pass, output layer first: BP1, then per layer BP4, BP3 and BP2 for the next
    backward: list[Statement] = []
    backward_exprs: list[sp.Expr] = []
    gradient_names: list[tuple[str, str]] = []

    def add(target: str, expr: sp.Expr, comment: str) -> None:
        backward_exprs.append(expr)
        split = _in_place_product(expr)
        if split is None:
            backward.append(Statement(target, printer.doprint(expr), comment))
        else:
            backward.append(Statement(target, printer.doprint(split[0]), comment))
            backward.append(Statement(target, printer.doprint(split[1]), op="*="))

    output_delta = derivation.delta(L)
    expr, applied = _stable_vector(output_delta)
    add(_batch_name(printer, "delta", L), expr / BATCH,
        f"BP1: {_lhs_text(output_delta)} = {pretty(output_delta.vector)}, each row divided "
        f"by B{_applied_note(applied)}")
    for l in range(L, 0, -1):
        weight_gradient = derivation.weight_gradients[l - 1]
        expr, applied = _stable_vector(weight_gradient)
        add(f"d{layers[l - 1]['weight']}", expr,
            f"BP4: {_lhs_text(weight_gradient)} = {pretty(weight_gradient.vector)}, summed over the rows"
            f"{_applied_note(applied)}")
        bias_gradient = derivation.bias_gradients[l - 1]
        if bias_gradient is not None:
            expr, applied = _stable_vector(bias_gradient)
            add(f"d{layers[l - 1]['bias']}", RowSum(expr),
                f"BP3: {_lhs_text(bias_gradient)} = {pretty(bias_gradient.vector)}, summed over the rows"
                f"{_applied_note(applied)}")
        if l > 1:
            hidden = derivation.delta(l - 1)
            expr, applied = _stable_vector(hidden)
            add(_batch_name(printer, "delta", l - 1), expr,
                f"BP2: {_lhs_text(hidden)} = {pretty(hidden.vector)}"
                f"{_applied_note(applied)}")
    for layer in layers:
        gradient_names.append((str(layer["weight"]), f"d{layer['weight']}"))
        if layer["bias"]:
            gradient_names.append((str(layer["bias"]), f"d{layer['bias']}"))

    # cache only what backward and the loss read
    backward_reads = _reads(backward_exprs)
    loss_reads = _reads([loss_expr])
    needed = sorted(backward_reads | loss_reads,
                    key=lambda item: (item[1], _CACHED_LETTERS.index(item[0])))
    cache = [_batch_name(printer, letter, layer) for letter, layer in needed]
    why = []
    for letter, layer in needed:
        readers = [name for name, reads in (("backward", backward_reads), ("loss", loss_reads))
                   if (letter, layer) in reads]
        why.append(f"{_batch_name(printer, letter, layer)} ({' and '.join(readers)})")
    weights_read = sorted({printer.doprint(m) for e in backward_exprs for m in e.atoms(Mat)},
                          key=lambda name: int(name[1:]))
    backward_unpack = [f'{name} = params["{name}"]' for name in weights_read]
    read_names = [_batch_name(printer, letter, layer) for letter, layer in needed
                  if (letter, layer) in backward_reads]
    if read_names:
        backward_unpack.append(", ".join(read_names) + " = "
                               + ", ".join(f'cache["{name}"]' for name in read_names))
    loss_names = [_batch_name(printer, letter, layer) for letter, layer in needed
                  if (letter, layer) in loss_reads]
    loss_unpack = (", ".join(loss_names) + " = "
                   + ", ".join(f'cache["{name}"]' for name in loss_names))
    loss_comments = [f"C = {pretty(model.cost)} per sample"]
    if loss_applied:
        loss_comments.append(f"in a numerically stable form: {', '.join(loss_applied)}")

    demo, demo_values = _demo(spec, model)
    helpers = [HELPERS[name] for name in HELPERS if name in printer.helpers]
    activations = tuple(layer.activation.name for layer in model.layers)
    formula_lines = [f"({f.equation}) {_lhs_text(f)} = {pretty(f.vector)}"
                     for f in derivation.formulas if f.equation]
    return {
        "version": __version__,
        "spec_name": spec.name,
        "digest": spec.digest(),
        "digest_literal": repr(spec.digest()),
        "regenerate": regenerate or _default_regenerate(spec),
        "sizes": repr(list(spec.sizes)),
        "sizes_text": " -> ".join(map(str, spec.sizes)),
        "activations": repr(activations),
        "activations_text": ", ".join(activations),
        "loss_name": repr(model.loss.name),
        "loss_text": model.loss.name,
        "formula_lines": formula_lines,
        "helpers": helpers,
        "layers": layers,
        "init_rule": " and ".join(
            {"He": "He's sqrt(2 / n_in) (relu-like layers)",
             "Glorot": "Glorot's sqrt(2 / (n_in + n_out))"}[rule] for rule in sorted(init_rules)),
        "first_weight": layers[0]["weight"],
        "forward": forward,
        "output": _batch_name(printer, "a", L),
        "cache": cache,
        "cache_text": ", ".join(why),
        "loss": {"code": loss_code, "unpack": loss_unpack, "comments": loss_comments},
        "backward_unpack": backward_unpack,
        "backward": backward,
        "gradient_names": gradient_names,
        "demo": {"template": demo.template, "epochs": demo.epochs, "lr": repr(demo.lr),
                 "batch_size": repr(demo.batch_size)},
        **demo_values,
    }


def _default_regenerate(spec: NetworkSpec) -> str:
    source = spec.source
    if source.startswith("built-in example"):
        return f"derive codegen {spec.name} -o {module_filename(spec)}"
    if source == "<dict>":
        return f"derive codegen <spec of {spec.name}> -o {module_filename(spec)}"
    return f"derive codegen {Path(source).name} -o {module_filename(spec)}"


def render_module(derivation: Derivation, *, regenerate: str | None = None) -> str:
    """The generated NumPy module of ``derivation``, as source text (deterministic bytes).

    ``regenerate`` is the command quoted on the header's second line (default: ``derive
    codegen <spec> -o <name>_net.py``).
    """
    context = module_context(derivation, regenerate)
    return render("module.py.j2", context)


def load_module(source_text: str, name: str) -> types.ModuleType:
    """Import generated source text as a module called ``name`` (not added to sys.modules)."""
    module = types.ModuleType(name)
    module.__file__ = f"<derive generated {name}>"
    exec(compile(source_text, module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module


# --- command line ------------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive codegen`` to the command line."""
    codegen = commands.add_parser(
        "codegen", help="generate a NumPy training module for a network",
        description="Generate a self-contained NumPy module (init_params, forward, loss, "
                    "gradients, sgd_step, train, gradient_check) from the derived formulas. "
                    "Running the module trains the network on demo data.",
        epilog="examples:\n  derive codegen xor -o xor_net.py && python xor_net.py\n"
               "  derive codegen net.yaml -o net.py --force\n  derive codegen digits",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    codegen.add_argument("spec", metavar="SPEC",
                         help="a spec file (.yaml, .yml, .json) or a built-in example name")
    codegen.add_argument("-o", "--output", metavar="FILE",
                         help="write the module here (atomically); without it, print it")
    codegen.add_argument("--force", action="store_true",
                         help="overwrite FILE even if derive did not generate it")
    codegen.set_defaults(handler=_cmd_codegen)


def _cmd_codegen(args: argparse.Namespace, echo: Echo) -> int:
    spec = load_spec(args.spec)
    derivation = derive(build_model(spec))
    if args.output is None:
        echo(render_module(derivation).rstrip("\n"))
        return 0
    command = f"derive codegen {args.spec} -o {args.output}"
    path = write_generated(args.output, render_module(derivation, regenerate=command),
                           force=args.force)
    echo(f"wrote {path} (run `python {path}` to train on its demo data)")
    return 0


# --- the default pipeline ----------------------------------------------------------------


def pipeline_step(derivation: Derivation, out_dir: Path, echo: Echo) -> None:
    """Write the example's module into ``out_dir`` and train it briefly on its demo data."""
    spec = derivation.model.spec
    path = write_generated(Path(out_dir) / module_filename(spec), render_module(derivation))
    echo(f"NumPy training code: {path}")
    module = load_module(path.read_text(encoding="utf-8"), path.stem)
    X, Y = module.demo_data()
    params = module.init_params(seed=0)
    losses = module.train(params, X, Y, module.DEMO_EPOCHS, module.DEMO_LR,
                          batch_size=module.DEMO_BATCH_SIZE)
    shown = sorted({round(i * (len(losses) - 1) / 5) for i in range(6)})
    echo(f"  trained {len(losses)} epochs (lr {module.DEMO_LR}) on {len(X)} demo samples:")
    for epoch in shown:
        echo(f"    epoch {epoch + 1:6d}  loss {losses[epoch]:.6f}")
    echo(f"  run `python {path}` to train it again")

"""The command line: parse arguments, call the API, print, map errors to exit codes.

Exit codes (docs/architecture.md, "The command line"): 0 success; 1 a verification found a
mismatch; 2 bad input or usage, with one line on stderr and no traceback, also when standard
output cannot be written. A reader that goes away (``derive check ... | head -1``) is not an
error: the exit code stays the command's.

The commands of the later stages live beside this module (``derive/cli/codegen.py``,
``latex.py``, ``check.py``, ``regen.py``, ``train.py``, listed in :data:`EXTENSIONS`): each adds
its subcommand through ``add_command(subparsers)`` and may add a step to the default pipeline
through ``pipeline_step(derivation, out_dir, echo)``. The stages themselves hold no argparse
code. SymPy, NumPy, SymEngine and jinja2 are imported only by the commands that use them, so
``derive --help`` and ``derive examples`` start at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from derive import __version__, limits
from derive.errors import DeriveError
from derive.files import check_folder

if TYPE_CHECKING:
    from derive.derivation.reverse import Derivation, Formula
    from derive.graph.model import Model, Node
    from derive.spec.load import NetworkSpec

#: The commands that live beside this module: name -> (module, its line in `derive --help`).
#: A module is imported only when its command runs, or by the default pipeline (for its
#: ``pipeline_step``); until then the command is a placeholder that only lists it.
EXTENSIONS: dict[str, tuple[str, str]] = {
    "codegen": ("derive.cli.codegen", "generate a NumPy training module for a network"),
    "latex": ("derive.cli.latex",
              "write the derivation as LaTeX lecture notes (or Markdown, or a PDF)"),
    "check": ("derive.cli.check",
              "check a user's formula or hand-written backprop against the derivation"),
    "regen": ("derive.cli.regen",
              "rewrite generated/ (modules and notes of the built-in examples)"),
    "train": ("derive.cli.train", "train a network's generated NumPy module on data"),
}
DEFAULT_EXAMPLE = "xor"
DEFAULT_OUT = "derive-out"

Echo = Callable[[str], None]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DeriveError(f"{self.prog}: {message} (see {self.prog} --help)")

    def print_help(self, file: IO[str] | None = None) -> None:
        if file is not None:
            super().print_help(file)
            return
        # on standard output through echo: argparse's own ignores a failed write (a full disk)
        echo(self.format_help().rstrip("\n"))


def _spec_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC",
                        help="a spec file (.yaml, .yml, .json) or a built-in example name "
                             "(see `derive examples`)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full parser of the extension ``command`` (placeholders for the
    other extensions; see :data:`EXTENSIONS`)."""
    parser = _Parser(
        prog="derive",
        description="Derive, explain, verify and generate backpropagation for a network spec. "
                    "With no command, runs the whole pipeline on the built-in xor example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  derive\n  derive show xor\n  derive verify net.yaml\n"
               "  derive examples\n  derive schema > derive-spec.schema.json",
    )
    # not argparse's "version" action, which ignores a failed write (a full disk)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-o", "--out-dir", default=DEFAULT_OUT,
                        help=f"where the default pipeline writes its outputs (default {DEFAULT_OUT})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    show = commands.add_parser(
        "show", help="print the derived backpropagation formulas",
        description="Print the derived formulas (index, vector and batch form) of a network.",
        epilog="examples:\n  derive show xor\n  derive show net.yaml --steps\n"
               "  derive show digits --stage model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _spec_argument(show)
    show.add_argument("--stage", choices=("spec", "model", "derivation"),
                      help="dump one pipeline stage instead (for debugging)")
    show.add_argument("--steps", action="store_true",
                      help="also print every chain-rule step of the derivation")
    show.set_defaults(handler=_cmd_show)

    verify = commands.add_parser(
        "verify", help="check the derived formulas against direct differentiation",
        description="Expand the network at concrete sizes into one scalar loss, differentiate "
                    "it directly with respect to every parameter and compare with the derived "
                    "formulas. Exit code 1 on any mismatch.",
        epilog="examples:\n  derive verify xor\n  derive verify net.yaml --points 40",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _spec_argument(verify)
    verify.add_argument("--points", type=int, default=20,
                        help="random points for the numeric check (default 20)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random points")
    verify.set_defaults(handler=_cmd_verify)

    examples = commands.add_parser("examples", help="list the built-in example specs",
                                   description="List the built-in example specs.")
    examples.set_defaults(handler=_cmd_examples)

    schema = commands.add_parser(
        "schema", help="print the JSON Schema of the spec format",
        description="Print the JSON Schema of spec files, for editors to complete and check.",
        epilog="example:\n  derive schema > derive-spec.schema.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    schema.set_defaults(handler=_cmd_schema)

    for name, (module, summary) in EXTENSIONS.items():
        if name == command:
            importlib.import_module(module).add_command(commands)
        else:
            commands.add_parser(name, help=summary, add_help=False)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse in two passes: the first, with placeholders, finds the command; the second parses
    everything with that command's own parser, importing only its module."""
    command = build_parser().parse_known_args(argv)[0].command
    return build_parser(command).parse_args(argv)


# --- commands ----------------------------------------------------------------------------


def load(source: str) -> NetworkSpec:
    """The spec named on the command line."""
    from derive.spec.load import load_spec

    return load_spec(source)


def derivation_of(spec: NetworkSpec) -> Derivation:
    """The derivation of ``spec``, with a progress line on a terminal when it takes a while."""
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.progress import Progress

    with Progress() as progress:
        return derive(build_model(spec), progress)


def _cmd_show(args: argparse.Namespace, echo: Echo) -> int:
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.progress import Progress

    spec = load(args.spec)
    if args.stage == "spec":
        echo(json.dumps(spec.to_dict(), indent=2))
        return 0
    model = build_model(spec)
    if args.stage == "model":
        for line in model_lines(model):
            echo(line)
        return 0
    with Progress() as progress:
        derivation = derive(model, progress)
    if args.stage == "derivation":
        for formula in derivation.formulas:
            echo(f"{formula.key} [{formula.equation or '-'}]")
            echo(f"  lhs:     {formula.lhs!r}")
            echo(f"  rhs:     {formula.rhs!r}")
            echo(f"  generic: {formula.generic!r}")
            echo(f"  vector:  {formula.vector!r}")
            for step in formula.steps:
                echo(f"    {step.rule}: {step.target!r} = {step.expr!r}")
        return 0
    for line in derivation_lines(derivation, steps=args.steps):
        echo(line)
    return 0


def _cmd_verify(args: argparse.Namespace, echo: Echo) -> int:
    from derive.verify.expansion import verify

    limits.check_count("--points", args.points, limits.MAX_POINTS, "MAX_POINTS")
    report = verify(load(args.spec), points=args.points, seed=args.seed,
                    progress=_progress_reporter())
    for line in report.lines():
        echo(line)
    return 0 if report.ok else 1


def _cmd_examples(args: argparse.Namespace, echo: Echo) -> int:
    from derive.examples import list_examples

    examples = list_examples()
    width = max(len(name) for name, _ in examples)
    for name, description in examples:
        echo(f"{name:<{width}}  {description}")
    return 0


def _cmd_schema(args: argparse.Namespace, echo: Echo) -> int:
    from derive.spec.schema import spec_schema

    echo(json.dumps(spec_schema(), indent=2))
    return 0


def _progress_reporter(after: float = 1.0) -> Echo:
    """A callback printing progress on stderr once the work has taken ``after`` seconds."""
    start = time.perf_counter()

    def report(message: str) -> None:
        if time.perf_counter() - start > after:
            print(f"  ... {message} ({time.perf_counter() - start:.1f} s)", file=sys.stderr,
                  flush=True)

    return report


def run_pipeline(spec: NetworkSpec, out_dir: Path, echo: Echo) -> int:
    """The whole pipeline: derive, print, verify, then each extension's outputs."""
    from derive.verify.expansion import verify

    derivation = derivation_of(spec)
    for line in derivation_lines(derivation, steps=False):
        echo(line)
    echo("")
    report = verify(spec, progress=_progress_reporter())
    for line in report.lines():
        echo(line)
    steps = [importlib.import_module(module) for module, _ in EXTENSIONS.values()]
    steps = [module for module in steps if hasattr(module, "pipeline_step")]
    if steps:
        out_dir.mkdir(parents=True, exist_ok=True)
        echo("")
        for module in steps:
            module.pipeline_step(derivation, out_dir, echo)
    return 0 if report.ok else 1


# --- text of the stages ------------------------------------------------------------------


def _shape(dims: tuple[int, ...]) -> str:
    """A per-sample shape as people write it: 64, or 1×8×8 for an image."""
    return "×".join(map(str, dims))


def _architecture(model: Model) -> str:
    spec = model.spec
    if model.is_chain:
        return " -> ".join(map(str, spec.sizes))
    if spec.image is not None:     # the shapes of the feature maps say what the layers do
        return " -> ".join([_shape(spec.input_shape), *(_shape(node.dims) for node in model.nodes)])
    if spec.sequence:              # steps × features, the last state alone a vector
        shapes = " -> ".join([_shape(spec.input_shape),
                              *(_shape(node.dims) for node in model.nodes)])
        return f"sequences of T = {spec.length} steps, {shapes}"
    return f"a graph of {model.depth} ops, {spec.input} -> {spec.sizes[-1]}"


def model_lines(model: Model) -> list[str]:
    """The symbolic model, readable: every node's op, inputs and forward equations."""
    from derive.derivation.reverse import C, R
    from derive.render.pretty import pretty

    out = [f"network {model.spec.name}: {_architecture(model)}"]
    for node in model.nodes:
        reads = ", ".join("x" if n == 0 else f"layer {n}" for n in node.inputs)
        activation = f", activation {node.activation.name}" if node.activation else ""
        out.append(f"  layer {node.label}: {node.op.name}, {_shape(node.dims)} outputs{activation}, "
                   f"reads {reads}")
        for equation in node.equations:
            out.append(f"    {pretty(equation.lhs)} = {pretty(equation.expr)}")
    out.append(f"  loss {model.loss.name}: {pretty(C)} = {pretty(model.cost)}")
    if model.penalty != 0:
        out.append(f"  regularization: {pretty(R)} = {pretty(model.penalty)}")
    return out


def derivation_lines(derivation: Derivation, *, steps: bool) -> list[str]:
    """The derived formulas in index, vector and batch form, with the activation derivatives."""
    from derive.registry.functions import Z
    from derive.render.pretty import pretty

    model = derivation.model
    spec = model.spec
    activations = ", ".join(_layer_kind(node) for node in model.nodes)
    out = [f"{spec.name}: {_architecture(model)}, layers {activations}, loss {model.loss.name}"]
    out.append("activation derivatives:")
    seen: set[str] = set()
    for node, derivative in zip(model.nodes, derivation.activation_derivatives):
        if derivative is None or node.activation.name in seen:
            continue
        seen.add(node.activation.name)
        in_a = ""
        if derivative.in_a is not None and derivative.in_z.has(Z):
            in_a = f"  =  {pretty(derivative.in_a)}   (a = σ(z))"
        out.append(f"  {node.activation.name}: σ'(z) = {pretty(derivative.in_z)}{in_a}")
    out += _gate_lines(model, seen)
    out.append("derived formulas (index form | vector form | batch form, rows = samples):")
    for formula in derivation.formulas:
        tag = f"({formula.equation})" if formula.equation else "     "
        part = " (the loss's own part)" if formula.loss_part else ""
        out.append(f"  {tag} {pretty(formula.lhs)}{part} = {pretty(formula.rhs)}")
        out.append(f"        vector: {pretty(formula.vector)}")
        out.append(f"        batch:  {_batch(formula)}")
        if formula.penalty != 0:
            out.append(f"        + penalty, once per batch: ∂R/∂{pretty(formula.of)} = "
                       f"{pretty(formula.vector_penalty)}")
        for assumption in formula.assumptions:
            out.append(f"        assuming {assumption}")
        if steps:
            for step in formula.steps:
                why = step.why
                if step.source is not None:
                    why += f"; {pretty(step.source.lhs)} = {pretty(step.source.rhs)}"
                out.append(f"          {step.rule:<16} {pretty(step.target)} = {pretty(step.expr)}"
                           f"    [{why}]")
    return out


def _gate_lines(model: Model, seen: set[str]) -> list[str]:
    """The activations of an LSTM's or a GRU's gates (the op fixes them), not listed yet."""
    from derive.derivation.reverse import activation_derivative
    from derive.registry.functions import Z
    from derive.render.pretty import pretty

    out = []
    for node in model.nodes:
        gates: dict[str, list[str]] = {}
        activations = {}
        for equation in node.equations:
            if equation.gate and equation.activation is not None:
                name = equation.activation.name
                gates.setdefault(name, []).append(equation.target.role)
                activations[name] = equation.activation
        for name, roles in gates.items():
            if name in seen:
                continue
            seen.add(name)
            derivative = activation_derivative(activations[name])
            in_a = ""
            if derivative.in_a is not None and derivative.in_z.has(Z):
                in_a = f"  =  {pretty(derivative.in_a)}   (a = σ(z))"
            gate = "gates" if len(roles) > 1 else "gate"
            out.append(f"  {name} ({gate} {', '.join(roles)} of layer {node.index}): "
                       f"σ'(z) = {pretty(derivative.in_z)}{in_a}")
    return out


def _layer_kind(node: Node) -> str:
    """A layer in the header: its activation (dense), ``conv2d 3×3 relu``, ``max_pool2d 2×2``."""
    if node.op.reads == "sequence":      # rnn tanh, lstm last, gru
        parts = [node.op.name, *([node.activation.name] if node.activation else []),
                 *(f"({value})" for key, value in node.options if key == "return")]
        return " ".join(parts)
    if node.op.reads != "image":
        return node.activation.name if node.activation else node.op.name
    options = dict(node.options)
    parts = [node.op.name]
    if "kernel" in options:
        parts.append("×".join(map(str, options["kernel"])))
    if node.activation is not None and node.activation.name != "identity":
        parts.append(node.activation.name)
    return " ".join(parts)


def _batch(formula: Formula) -> str:
    from derive.render.pretty import pretty

    text = pretty(formula.vector, batch=True)
    if formula.kind == "gradient" and formula.of.rank == 1:
        return f"(1/B) Σ_rows {text}"
    return text


# --- entry point -------------------------------------------------------------------------


def _discard_stdout() -> None:
    """Send what is still to be printed to the null device: the reader is gone, or the
    device is full, and Python's own flush at exit must not fail again."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def echo(line: str) -> None:
    """Print one line of a command's output on standard output."""
    try:
        print(line, flush=True)  # a write that fails, fails here, before any file is written
    except BrokenPipeError:  # the reader went away (`derive show xor | head`): not an error
        _discard_stdout()
    except OSError as err:  # e.g. a full disk
        _discard_stdout()
        raise DeriveError(f"cannot write to standard output: {err.strerror}") from None
    except UnicodeEncodeError as err:
        raise DeriveError(f"standard output ({err.encoding}) cannot show "
                          f"{err.object[err.start:err.end]!r}; set PYTHONIOENCODING=utf-8"
                          ) from None


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = parse_args(argv)
        if args.version:
            echo(f"derive {__version__}")
            return 0
        if args.command is None:
            check_folder(args.out_dir)  # before the work, not after it
            echo(f"derive {__version__}: whole pipeline on the built-in {DEFAULT_EXAMPLE!r} "
                 "example")
            return run_pipeline(load(DEFAULT_EXAMPLE), Path(args.out_dir), echo)
        return args.handler(args, echo)
    except SystemExit as done:  # --help prints, then exits
        return done.code if isinstance(done.code, int) else 0
    except DeriveError as err:
        print(f"derive: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("derive: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # printed past echo (a stage's own print): the reader went away
        _discard_stdout()
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    code = _run(argv)
    if sys.stdout is None:  # started with standard output closed: nothing was printed
        return code
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
    except OSError as err:
        _discard_stdout()
        if code != 2:  # an error already printed is the one line
            print(f"derive: error: cannot write to standard output: {err.strerror}",
                  file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

"""``derive codegen``, and the default run's code step: write and briefly train the module."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from derive.cli.main import Echo, derivation_of, load
from derive.files import check_target, write_generated

if TYPE_CHECKING:
    from derive.derivation import Derivation

# --- command line ------------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive codegen`` to the command line."""
    codegen = commands.add_parser(
        "codegen",  # its line in `derive --help`: derive.cli.main.EXTENSIONS
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
    if args.output is not None:
        check_target(args.output, force=args.force)  # before the work, not after it
    from derive.render.codegen import render_module

    derivation = derivation_of(load(args.spec))
    if args.output is None:
        echo(render_module(derivation).rstrip("\n"))
        return 0
    command = shlex.join(["derive", "codegen", args.spec, "-o", args.output])
    path = write_generated(args.output, render_module(derivation, regenerate=command),
                           force=args.force)
    echo(f"wrote {path} (run `python {path}` to train on its demo data)")
    return 0


# --- the default pipeline ----------------------------------------------------------------


def pipeline_step(derivation: Derivation, out_dir: Path, echo: Echo) -> None:
    """Write the example's module into ``out_dir`` and train it briefly on its demo data."""
    from derive.render.codegen import load_module, module_filename, render_module

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

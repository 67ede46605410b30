"""``derive check``: formulas and hand-written backprop against the derivation."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from derive import limits
from derive.check.formulas import POINTS, check_formula
from derive.errors import DeriveError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive check`` to the CLI."""
    parser = commands.add_parser(
        "check",  # its line in `derive --help`: derive.cli.main.EXTENSIONS
        description=(
            "Check a delta, gradient or adjoint formula written in derive notation (plain or "
            "LaTeX), about any layer of the network, or a hand-written backprop function "
            "(--backward FILE:FUNCTION or FILE:Class.method, dense chains for now; it runs "
            "in a separate process, its conventions detected from shapes and trial calls), "
            "against the derivation of SPEC. Exit code 0 correct, 1 incorrect (or a "
            "tautology such as delta^l = delta^l), 2 unparsable, bad input, or code that "
            "timed out or crashed."),
        epilog=(
            "formula examples:\n"
            "  derive check xor \"delta^L = (a^L - y) * a^L * (1 - a^L)\"\n"
            "  derive check xor \"delta^l_j = sum_k w^{l+1}_kj delta^{l+1}_k sigma'(z^l_j)\"\n"
            "  derive check bce \"dC/dw^l_jk = delta^l_j a^{l-1}_k\"\n"
            "  derive check xor '\\delta^L_j = (a^L_j - y_j)\\sigma'\"'\"'(z^L_j)'\n"
            "  derive check xor \"δᴸ = ∇ₐC ⊙ σ′(zᴸ)\"\n"
            "  derive check resnet.yaml \"delta^1 = (delta^3 + (W^2)^T delta^2) * "
            "sigma'(z^1)\"\n"
            "  derive check resnet.yaml \"dC/dgamma^4 = delta^4 * xhat^4\"\n"
            "backprop code:\n"
            "  derive check net.yaml --backward my_backprop.py:backward\n"
            "  derive check net.yaml --backward network.py:Network.backprop\n"
            "  derive check net.yaml --backward net.py:TwoLayerNet.loss --targets labels\n"
            "  derive check net.yaml --backward tutorial.py:backward --weights in-out \\\n"
            "      --reduction sum --no-bias --arg a3=A2 --global a2=A1"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC",
                        help="a spec file (.yaml, .yml, .json) or a built-in example name")
    parser.add_argument("formula", metavar="FORMULA", nargs="?",
                        help="LHS = RHS, e.g. \"delta^L = a^L - y\"")
    parser.add_argument("--points", type=int, default=POINTS,
                        help=f"random points of the numeric check (default {POINTS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random points")
    from derive.check.backward import add_arguments

    add_arguments(parser)
    parser.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace, echo: Callable[[str], None]) -> int:
    limits.check_count("--points", args.points, limits.MAX_POINTS, "MAX_POINTS")
    if args.backward:
        if args.formula:
            raise DeriveError("give either a FORMULA or --backward FILE:FUNCTION, not both")
        from derive.check.backward import run_from_args

        return run_from_args(args, echo)
    if not args.formula:
        raise DeriveError("derive check: give a FORMULA (\"delta^L = a^L - y\") or "
                          "--backward FILE:FUNCTION (see derive check --help)")
    verdict = check_formula(args.spec, args.formula, points=args.points, seed=args.seed)
    for line in verdict.lines():
        echo(line)
    return verdict.exit_code

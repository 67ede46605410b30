"""``derive regen``: rewrite generated/."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from derive.render.regen import GENERATED_DIR, regenerate_all


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive regen`` to the command line."""
    regen = commands.add_parser(
        "regen",  # its line in `derive --help`: derive.cli.main.EXTENSIONS
        description="Rewrite the generated module of every built-in example (NAME_net.py) and "
                    "the xor lecture notes (xor.tex, xor.zh.tex) in a folder, and remove "
                    "generated modules of examples that no longer exist.",
        epilog="examples:\n  derive regen\n  derive regen --dir /tmp/generated",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    regen.add_argument("--dir", default=GENERATED_DIR,
                       help=f"the folder to write (default {GENERATED_DIR}; it must exist)")
    regen.set_defaults(handler=_cmd_regen)


def _cmd_regen(args: argparse.Namespace, echo: Callable[[str], None]) -> int:
    written, removed = regenerate_all(args.dir)
    for path in written:
        echo(f"wrote {path}")
    for path in removed:
        echo(f"removed {path} (no built-in example of that name)")
    return 0

"""``derive regen``: rewrite ``generated/``, the committed outputs of the built-in examples.

``generated/`` holds the NumPy module of every built-in example (``NAME_net.py``) and the
lecture notes of the xor example in both languages (``xor.tex``, ``xor.zh.tex``). A snapshot
test regenerates them into a temporary folder and compares bytes, so this module is the one
place that says what ``generated/`` contains.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from derive.codegen import module_filename, render_module
from derive.derivation import derive
from derive.errors import DeriveError
from derive.files import is_generated, write_generated
from derive.latex import render_latex
from derive.model import build_model
from derive.spec import list_examples, load_spec

GENERATED_DIR = "generated"
COMMAND = "derive regen"
#: The examples whose lecture notes are committed, and the languages.
NOTES = (("xor", "en", "xor.tex"), ("xor", "zh", "xor.zh.tex"))


def regenerate_all(directory: str | Path) -> tuple[list[Path], list[Path]]:
    """Write every generated file into ``directory``; remove stale generated modules.

    Returns (written, removed). Only files carrying derive's marker are ever removed.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DeriveError(f"folder {str(folder)!r} does not exist (create it, or give --dir)")
    written = []
    derivations = {}
    for name, _description in list_examples():
        spec = load_spec(name)
        derivations[name] = derivation = derive(build_model(spec))
        text = render_module(derivation, regenerate=COMMAND)
        written.append(write_generated(folder / module_filename(spec), text))
    for name, lang, filename in NOTES:
        written.append(write_generated(folder / filename, render_latex(derivations[name], lang)))
    keep = {path.name for path in written}
    removed = []
    for path in sorted(folder.glob("*_net.py")):
        if path.name not in keep and is_generated(path):
            path.unlink()
            removed.append(path)
    return written, removed


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive regen`` to the command line."""
    regen = commands.add_parser(
        "regen", help=f"rewrite {GENERATED_DIR}/ (modules and notes of the built-in examples)",
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

"""The contents of ``generated/``, the committed outputs of the built-in examples.

``generated/`` holds the NumPy module of every built-in example (``NAME_net.py``) and the
lecture notes of the xor example in both languages (``xor.tex``, ``xor.zh.tex``). A snapshot
test regenerates them into a temporary folder and compares bytes, so this module is the one
place that says what ``generated/`` contains.
"""

from __future__ import annotations

from pathlib import Path

from derive.derivation.reverse import derive
from derive.errors import DeriveError
from derive.files import is_generated, write_generated
from derive.graph.model import build_model
from derive.render.codegen import module_filename, render_module
from derive.render.latex import render_latex
from derive.spec.load import list_examples, load_spec

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

"""Snapshot: generated/ holds exactly what `derive regen` writes today, byte for byte.

Kept apart from the functional tests of generated code (tests/test_codegen*.py): this one only
says whether the committed files are stale, and how to refresh them.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from derive.render.regen import regenerate_all

GENERATED = Path(__file__).resolve().parent.parent / "generated"
REFRESH = "derive regen   (run from the repository root)"


def test_generated_files_are_fresh(tmp_path):
    written, _ = regenerate_all(tmp_path)
    fresh = {path.name: path.read_bytes() for path in written}
    committed = {path.name: path.read_bytes() for path in GENERATED.iterdir()
                 if path.is_file()}
    problems = []
    for name in sorted(fresh.keys() | committed.keys()):
        if name not in committed:
            problems.append(f"generated/{name} is missing")
        elif name not in fresh:
            problems.append(f"generated/{name} belongs to no built-in example")
        elif fresh[name] != committed[name]:
            diff = difflib.unified_diff(
                committed[name].decode().splitlines(), fresh[name].decode().splitlines(),
                f"generated/{name} (committed)", f"generated/{name} (fresh)", lineterm="", n=2)
            problems.append("\n".join(list(diff)[:60]))
    assert not problems, ("generated/ is stale:\n" + "\n".join(problems)
                          + f"\nRefresh it with: {REFRESH}")

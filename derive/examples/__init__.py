"""The built-in example specs: one YAML file each, named by its file name.

Public API: :func:`list_examples`, :func:`example_names`, :func:`example_path`. The first line
of each file is a comment describing it. Only the standard library is imported here, so that
`derive examples` lists them without loading the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from derive.errors import DeriveError

EXAMPLES_DIR = Path(__file__).resolve().parent


def example_names() -> list[str]:
    """The names of the built-in examples, sorted."""
    return sorted(path.stem for path in EXAMPLES_DIR.glob("*.yaml"))


def list_examples() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of each built-in example, sorted by name."""
    examples = []
    for name in example_names():
        first = (EXAMPLES_DIR / f"{name}.yaml").read_text(encoding="utf-8").partition("\n")[0]
        description = first[1:].strip() if first.startswith("#") else ""
        examples.append((name, description))
    return examples


def example_path(name: str) -> Path:
    """The file of the built-in example ``name``."""
    if name not in example_names():
        known = ", ".join(example_names())
        raise DeriveError(f"no built-in example {name!r}; built-in examples: {known}")
    return EXAMPLES_DIR / f"{name}.yaml"

"""The one jinja2 environment factory for every template in ``codegen_templates/``.

Templates are package data (``derive.codegen_templates``), rendered strictly (an undefined
name is an error), without autoescaping, with block whitespace trimmed and the final newline
kept. LaTeX templates use LaTeX-safe delimiters ``((* block *))``, ``((( var )))`` and
``((= comment =))``, so that braces and ``%`` in TeX never clash with jinja.
"""

from __future__ import annotations

import importlib.resources
from functools import cache

import jinja2

_LATEX_DELIMITERS = {
    "block_start_string": "((*", "block_end_string": "*))",
    "variable_start_string": "(((", "variable_end_string": ")))",
    "comment_start_string": "((=", "comment_end_string": "=))",
}


def _load_template(name: str) -> str | None:
    resource = importlib.resources.files("derive.codegen_templates").joinpath(name)
    return resource.read_text(encoding="utf-8") if resource.is_file() else None


@cache
def environment(latex: bool = False) -> jinja2.Environment:
    """The environment for code templates, or with ``latex`` for LaTeX/Markdown templates."""
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        **(_LATEX_DELIMITERS if latex else {}),
    )


def render(name: str, context: dict, *, latex: bool = False) -> str:
    """Render template ``name`` with ``context``."""
    return environment(latex).get_template(name).render(context)

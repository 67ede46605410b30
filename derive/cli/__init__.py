"""The command line, in one place: parse, call the stages' APIs, print, map errors to exit codes.

Public API: :func:`main` (``derive`` on the command line).
"""

from __future__ import annotations

from derive.cli.main import main

__all__ = ["main"]

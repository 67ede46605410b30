"""The limits of what derive accepts, in one place (README, "Limits").

Every input that could make a command run for minutes, exhaust memory or write a module that
cannot allocate its weights is bounded here: the spec file, the widths, depth and parameter
count of a network, the expressions a user writes, and the counts given on the command line.
Input past a limit is refused with a :class:`~derive.errors.DeriveError` naming the limit, so the
command exits with code 2 and one line on stderr. This module imports nothing heavy: the
command line checks its options before loading SymPy or NumPy.
"""

from __future__ import annotations

from derive.errors import DeriveError

#: Bytes of a spec file (a spec is a few hundred bytes; a worked example's parameters more).
MAX_SPEC_BYTES = 1_000_000
#: Width of the input and of any layer.
MAX_WIDTH = 100_000
#: Layers of a network.
MAX_DEPTH = 1_000
#: Trainable numbers in all parameters together: 160 MB per copy in float64, so a generated
#: module can hold its weights, their gradients and an optimizer's state in memory.
MAX_PARAMETERS = 20_000_000
#: Characters of an expression a user writes (a custom activation, loss or op, a formula).
MAX_EXPRESSION_LENGTH = 2_000
#: Depth of brackets in such an expression.
MAX_EXPRESSION_NESTING = 60
#: Function calls nested inside one another (tanh(tanh(...))): each level multiplies the work of
#: differentiating and simplifying what it wraps.
MAX_CALL_NESTING = 8
#: Random points of a numeric check (`derive verify --points`, `derive check --points`).
MAX_POINTS = 1_000
#: Rows of a random batch (`derive check --backward ... --batch`).
MAX_BATCH = 10_000


def over_limit(what: str, value: int, limit: int, name: str) -> DeriveError:
    """The error for ``value`` past ``limit``; ``name`` is the constant in this module."""
    return DeriveError(f"{what} is {value:,}; the limit is {limit:,} (derive.limits.{name}, "
                       "see README, Limits)")


def check_count(option: str, value: int, limit: int, name: str) -> int:
    """A count given on the command line: at least 1 and at most ``limit``."""
    if value < 1:
        raise DeriveError(f"{option} is {value}; expected at least 1")
    if value > limit:
        raise over_limit(option, value, limit, name)
    return value


def check_expression(text: str) -> None:
    """Refuse an expression longer or more deeply bracketed than the limits allow.

    This runs before any parser: a long or deep expression costs time and recursion in every
    stage after it (differentiation, printing), not only in parsing.
    """
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise over_limit("the expression's length", len(text), MAX_EXPRESSION_LENGTH,
                         "MAX_EXPRESSION_LENGTH")
    depth = deepest = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
    if deepest > MAX_EXPRESSION_NESTING:
        raise over_limit("the expression's bracket nesting", deepest, MAX_EXPRESSION_NESTING,
                         "MAX_EXPRESSION_NESTING")

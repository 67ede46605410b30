"""Verification: the derived formulas against direct differentiation of the expanded loss.

Public API: :func:`verify` (spec → :class:`Report`), :func:`verify_derivation`, the
concrete :class:`Instance` with :func:`backprop_values` and :func:`evaluate`, and
:func:`checked_copy` (the copy of a network over the budget that is expanded, and why it
covers the network). Independent of the derivation: it expands the ops' own forward equations.

:mod:`derive.verify.numeric` is the numeric service that verification and
:mod:`derive.check` share: random points valid for the loss, the capped copy of a network
within a parameter budget (:func:`reduced_spec`), and 50-digit evaluation (:func:`evaluate`).
"""

from __future__ import annotations

from derive.verify import numeric
from derive.verify.expansion import (
    Instance,
    Report,
    backprop_values,
    verify,
    verify_derivation,
)
from derive.verify.numeric import (
    DIGITS,
    PARAMETER_BUDGET,
    evaluate,
    parameter_count,
    reduced_spec,
)
from derive.verify.reduction import CheckedCopy, checked_copy

__all__ = ["DIGITS", "PARAMETER_BUDGET", "CheckedCopy", "Instance", "Report",
           "backprop_values", "checked_copy", "evaluate", "numeric", "parameter_count",
           "reduced_spec", "verify", "verify_derivation"]

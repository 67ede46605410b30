"""Stage 3, the derivation: one generic reverse-mode pass over the graph.

Public API: :func:`derive` (model → :class:`Derivation`), :class:`Formula`, :class:`Step`,
the cost symbols :data:`C` and :data:`R`, and :func:`to_vector`, the index-form → tensor-form
translation every printer reads (:mod:`derive.derivation.tensorform`). Kronecker-delta algebra
lives in :mod:`derive.derivation.indexcalc`.
"""

from __future__ import annotations

from derive.derivation.reverse import C, Derivation, Formula, R, Step, derive, partial
from derive.derivation.tensorform import to_vector

__all__ = ["C", "Derivation", "Formula", "R", "Step", "derive", "partial", "to_vector"]

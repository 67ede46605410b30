"""Stage 2, the graph: the symbolic network, a DAG of nodes with index-form equations.

Public API: :func:`build_model` (spec → :class:`Model`), :class:`Node`, :class:`Parameter`.
The quantities it is written in are :class:`derive.quantities.NetTensor`.
"""

from __future__ import annotations

from derive.graph.model import Model, Node, Parameter, build_model

__all__ = ["Model", "Node", "Parameter", "build_model"]

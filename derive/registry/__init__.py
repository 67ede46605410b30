"""Stage 0, the registries: what a network may be made of (docs/architecture.md).

- :mod:`derive.registry.functions`: every activation and loss, once, as a SymPy expression;
- :mod:`derive.registry.ops`: every layer kind, its attributes, parameters and forward pass in
  index form;
- :mod:`derive.registry.safe_expr`: the whitelist parser for expressions users write, its
  function table derived from what the registries need.

Takes nothing; gives tables the later stages read. Imports no later stage.
"""

"""Stage 1, the spec: a YAML/JSON file, a built-in example or a dict to a validated spec.

Public API: :func:`load_spec`, :class:`NetworkSpec` (with :class:`LayerSpec`,
:class:`FunctionSpec`, :class:`ExampleSpec`), :func:`list_examples`, :func:`example_path`, and
:func:`derive.spec.schema.spec_schema`, the JSON Schema built from the registries.
"""

from __future__ import annotations

from derive.spec.load import (
    PARAMETER_KEYS,
    ExampleSpec,
    FunctionSpec,
    LayerSpec,
    NetworkSpec,
    example_path,
    layer_attributes,
    list_examples,
    load_spec,
)

__all__ = ["PARAMETER_KEYS", "ExampleSpec", "FunctionSpec", "LayerSpec", "NetworkSpec",
           "example_path", "layer_attributes", "list_examples", "load_spec"]

"""The spec's structure as a JSON Schema (draft 2020-12), built from the registries.

Part of stage 1 (the spec), for editors and other tools: ``spec_schema()`` describes the same
fields that :func:`derive.spec.load_spec` accepts, with the activation names (and their
parameters) and loss names taken from :mod:`derive.functions`, so it cannot drift from them.

The schema checks structure only. These rules need more than one field or a parser, so only
:mod:`derive.spec` checks them:

- softmax only on the last layer;
- ``cross_entropy`` needs a softmax output, ``binary_cross_entropy`` an output in (0, 1);
- a custom ``expr`` must parse (whitelist parser, variables ``z`` or ``a`` and ``y``);
- the ``example`` section's lengths and shapes follow ``input`` and the layer sizes, and its
  ``params`` give every ``W{l}`` and every ``b{l}`` of a layer with bias, and nothing else;
- numbers must be finite (JSON has no infinities, YAML and Python do).
"""

from __future__ import annotations

from typing import Any

from derive import functions

IDENTIFIER_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$"


def _custom(kind: str, builtins: list[str], variables: str) -> dict[str, Any]:
    """``{name, expr}``: a new identifier (not a built-in name) and an expression string."""
    return {
        "type": "object",
        "description": f"custom {kind}: an expression in {variables}",
        "properties": {
            "name": {"type": "string", "pattern": IDENTIFIER_PATTERN, "not": {"enum": builtins}},
            "expr": {"type": "string", "pattern": "\\S"},  # not blank
        },
        "required": ["name", "expr"],
        "additionalProperties": False,
    }


def _activation() -> dict[str, Any]:
    names = list(functions.ACTIVATIONS)
    forms: list[dict[str, Any]] = [{"type": "string", "enum": names}]
    for name, entry in functions.ACTIVATIONS.items():
        properties: dict[str, Any] = {"name": {"const": name}}
        for param, default in entry.params:
            properties[param] = {"type": "number", "default": default}
        forms.append(
            {
                "type": "object",
                "description": entry.description,
                "properties": properties,
                "required": ["name"],
                "additionalProperties": False,
            }
        )
    forms.append(_custom("activation", names, "z"))
    return {"anyOf": forms}


def _loss() -> dict[str, Any]:
    names = list(functions.LOSSES)
    by_name = {
        "type": "object",
        "properties": {"name": {"enum": names}},
        "required": ["name"],
        "additionalProperties": False,
    }
    return {
        "anyOf": [{"type": "string", "enum": names}, by_name, _custom("loss", names, "a and y")]
    }


def _numbers() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "number"}}


def _example() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "a worked example: one input x, its target y and every W{l}, b{l}",
        "properties": {
            "x": _numbers(),
            "y": _numbers(),
            "params": {
                "type": "object",
                "patternProperties": {
                    "^W[1-9][0-9]*$": {"type": "array", "items": _numbers()},
                    "^b[1-9][0-9]*$": _numbers(),
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }


def spec_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of a network spec (DESIGN.md, Contract 1)."""
    positive = {"type": "integer", "minimum": 1}
    layer = {
        "type": "object",
        "properties": {
            "size": positive,
            "activation": _activation(),
            "bias": {"type": "boolean", "default": True},
        },
        "required": ["size", "activation"],
        "additionalProperties": False,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "derive network spec",
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": IDENTIFIER_PATTERN},
            "input": positive,
            "layers": {"type": "array", "minItems": 1, "items": layer},
            "loss": _loss(),
            "example": _example(),
        },
        "required": ["name", "input", "layers", "loss"],
        "additionalProperties": False,
    }

"""The spec's structure as a JSON Schema (draft 2020-12), built from the registries.

Part of stage 1 (the spec), for editors and other tools: ``spec_schema()`` describes the same
fields that :func:`derive.spec.load_spec` accepts (spec v2; docs/architecture.md, "Contracts"). Everything
that can drift is read from a registry or from :mod:`derive.spec.load`'s own field lists: the ops,
their attributes, attribute kinds, defaults, required attributes and input counts from
:data:`derive.ops.OPS`; activation names (and their parameters) and loss names from
:mod:`derive.registry.functions`; the parameter keys of a worked example from the ops' parameters.

The schema checks structure only. These rules need more than one field, the order of the
layers, or a parser, so only :mod:`derive.spec.load` checks them:

- a layer reads earlier layers only: a number in ``input``/``inputs`` is below the layer's own
  (so there are no cycles), a name is that of an earlier layer;
- each layer's ``name`` is given once; ``inputs`` do not reach one layer twice (by its name
  and by its number);
- an op that adds its inputs (``add``) needs inputs of equal width;
- every layer but the last is read by a later layer (no unused layers);
- softmax only on the last layer (on a ``dense`` or an ``activation`` layer);
- ``cross_entropy`` needs a softmax output, ``binary_cross_entropy`` an output in (0, 1);
- a custom ``expr`` must parse (whitelist parser, variables ``z`` or ``a`` and ``y``);
- the ``example`` section's lengths and shapes follow ``input`` and the layer widths, and its
  ``params`` give exactly the parameters of the layers (``W{l}``, ``b{l}`` of a layer with
  bias, ``gamma{l}``, ``beta{l}``, ...);
- numbers must be finite (JSON has no infinities, YAML and Python do).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from derive.registry import functions
from derive.registry.custom_ops import MAX_AXES, RESERVED
from derive.registry.ops import OPS, Attribute, OpDef
from derive.spec.load import (
    CUSTOM_FIELDS,
    CUSTOM_OP_SIZE,
    DEFAULT_OP,
    EXAMPLE_ABOUT,
    EXAMPLE_FIELDS,
    INPUT_NAME,
    LAYER_COMMON_FIELDS,
    MAX_ABOUT,
    PARAMETER_KEYS,
    REGULARIZATION_FIELDS,
    SEQUENCE_FIELDS,
    TOP_FIELDS,
    TOP_REQUIRED,
)

IDENTIFIER_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/$defs/{name}"}


# --- activations and losses, from derive.registry.functions ---------------------------------------


def _custom(kind: str, builtins: list[str], variables: str) -> Schema:
    """``{name, expr}``: a new identifier (not a built-in name) and an expression string."""
    name, expr = CUSTOM_FIELDS
    return {
        "type": "object",
        "description": f"custom {kind}: an expression in {variables}",
        "properties": {
            name: {"type": "string", "pattern": IDENTIFIER_PATTERN, "not": {"enum": builtins}},
            expr: {"type": "string", "pattern": "\\S"},  # not blank
        },
        "required": list(CUSTOM_FIELDS),
        "additionalProperties": False,
    }


def _activation() -> Schema:
    names = list(functions.ACTIVATIONS)
    forms: list[Schema] = [{"type": "string", "enum": names}]
    for name, entry in functions.ACTIVATIONS.items():
        properties: Schema = {"name": {"const": name}}
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


def _loss() -> Schema:
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


# --- layers, from the op registry ----------------------------------------------------------

#: The schema of each attribute kind of :class:`derive.ops.Attribute`.
ATTRIBUTE_KINDS: dict[str, Callable[[], Schema]] = {
    "size": lambda: {"type": "integer", "minimum": 1},
    "activation": lambda: _ref("activation"),
    "bool": lambda: {"type": "boolean"},
    "rate": lambda: {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    "positive": lambda: {"type": "number", "exclusiveMinimum": 0},
    "pair": lambda: _pair(1),
    "pair0": lambda: _pair(0),
    "choice": lambda: {"type": "string"},          # its values: _attribute, from the entry
}


def _pair(minimum: int) -> Schema:
    """A kernel's, stride's or padding's rows and columns: one integer, or [rows, columns]."""
    number = {"type": "integer", "minimum": minimum}
    return {"anyOf": [number, {"type": "array", "items": number, "minItems": 2,
                               "maxItems": 2}]}


def _attribute(attribute: Attribute) -> Schema:
    schema = ATTRIBUTE_KINDS[attribute.kind]()
    if attribute.choices:
        schema["enum"] = list(attribute.choices)
    if attribute.doc:
        schema["description"] = attribute.doc
    if attribute.default is not None:
        schema["default"] = attribute.default
    return schema


def _reference() -> Schema:
    """What ``input:`` or one item of ``inputs:`` may name."""
    return {
        "description": f"`{INPUT_NAME}` (the network input x, also 0), a layer number (from 1) "
        "or the name of an earlier layer",
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": IDENTIFIER_PATTERN},
        ],
    }


def _common_fields(definition: OpDef) -> Schema:
    """The fields every layer may give (``LAYER_COMMON_FIELDS``), for one op."""
    low, high = definition.inputs
    inputs: Schema = {
        "type": "array",
        "description": "the layers this one reads, in order",
        "items": _ref("reference"),
        "minItems": max(low, 1),
        "uniqueItems": True,
    }
    if high is not None:
        inputs["maxItems"] = high
    fields: Schema = {
        "op": {"const": definition.name},
        "name": {"type": "string", "pattern": IDENTIFIER_PATTERN,
                 "not": {"const": INPUT_NAME},
                 "description": "a name other layers can read this one by"},
        "input": {**_ref("reference"), "description": "the one layer this one reads"},
        "inputs": inputs,
    }
    return {field: fields[field] for field in LAYER_COMMON_FIELDS}


def _op_layer(definition: OpDef) -> Schema:
    """A layer of one op: the common fields and the op's own attributes, nothing else."""
    properties = _common_fields(definition)
    for attribute in definition.attributes:
        properties[attribute.name] = _attribute(attribute)
    required = [attribute.name for attribute in definition.attributes if attribute.required]
    if definition.inputs[0] > 1:
        required.append("inputs")  # without `inputs:` a layer reads the previous one only
    schema: Schema = {
        "type": "object",
        "description": definition.description,
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def _custom_op() -> Schema:
    """The ``op:`` of a custom op: its name, forward expression and parameters' shapes."""
    axis = {"type": "string", "pattern": "^(size|in[1-9]?[0-9]*)$",
            "description": "`size` (the layer's width), `in` (its input's) or `in1`, `in2`, "
                           "... (each input's, for several)"}
    return {
        "type": "object",
        "description": "a custom op: entry j of the output in index notation; x (or x1, x2, "
                       "...) is the input, sum(EXPR, k) sums over k",
        "properties": {
            "name": {"type": "string", "pattern": IDENTIFIER_PATTERN,
                     "not": {"enum": list(OPS)}},
            "expr": {"type": "string", "minLength": 1},
            "params": {"type": "object", "additionalProperties": {
                "type": "array", "items": axis, "minItems": 1, "maxItems": MAX_AXES}},
        },
        "required": ["name", "expr"],
        "additionalProperties": False,
    }


def _custom_op_layer() -> Schema:
    """A layer of a custom op: the common fields, the op and its ``size``."""
    properties = _common_fields(OPS[DEFAULT_OP])        # the fields; op and inputs below
    properties["op"] = _custom_op()
    properties[CUSTOM_OP_SIZE] = {**ATTRIBUTE_KINDS["size"](),
                                  "description": "the output width n_l (the range of j)"}
    properties["inputs"] = {key: value for key, value in properties["inputs"].items()
                            if key != "maxItems"}
    return {"type": "object", "description": "a layer of a custom op",
            "properties": properties, "required": ["op", CUSTOM_OP_SIZE],
            "additionalProperties": False}


def _layer() -> Schema:
    """Any layer: a known op (``DEFAULT_OP`` when omitted) or a custom op, then that op's own
    schema."""
    branches = []
    for name in OPS:
        condition: Schema = {"properties": {"op": {"const": name}}}
        if name != DEFAULT_OP:
            condition["required"] = ["op"]  # an absent `op` means DEFAULT_OP
        branches.append({"if": condition, "then": _ref(f"op.{name}")})
    branches.append({"if": {"properties": {"op": {"type": "object"}}, "required": ["op"]},
                     "then": _ref("op.custom")})
    return {
        "type": "object",
        "description": "one layer: an op applied to the previous layer's output, or to the "
        "layers it names in `input:` (one) or `inputs:` (several)",
        "properties": {"op": {"anyOf": [{"enum": list(OPS)}, {"type": "object"}],
                              "default": DEFAULT_OP}},
        "not": {"required": ["input", "inputs"]},
        "allOf": branches,
    }


# --- regularization and the worked example --------------------------------------------------


def _regularization() -> Schema:
    return {
        "type": "object",
        "description": "weight penalties added once to the batch cost: "
        "(l2/2) sum w^2 + l1 sum |w| over the weights",
        "properties": {key: {"type": "number", "minimum": 0, "default": 0}
                       for key in REGULARIZATION_FIELDS},
        "additionalProperties": False,
    }


def _numbers(rank: int = 1) -> Schema:
    """A number array nested ``rank`` deep (a vector, a matrix, ...)."""
    schema: Schema = {"type": "number"}
    for _ in range(rank):
        schema = {"type": "array", "items": schema}
    return schema


def parameter_ranks() -> dict[str, tuple[int, ...]]:
    """Every parameter key prefix the ops can give (``W``, ``b``, ``gamma``, ...) and its
    ranks (``W``: a dense layer's matrix, a convolution's kernel of rank 4).

    Each op's parameters are listed under its defaults (a required kernel at 1) and every
    setting of its true/false attributes (a dense layer without bias has no ``b``).
    """
    ranks: dict[str, set[int]] = {}
    for definition in OPS.values():
        defaults = {a.name: 1 if a.default is None and a.kind in ("pair", "pair0")
                    else a.default for a in definition.attributes}
        switches = [a.name for a in definition.attributes if a.kind == "bool"]
        for values in itertools.product((True, False), repeat=len(switches)):
            attrs = {**defaults, **dict(zip(switches, values))}
            for parameter in definition.parameters(attrs):
                ranks.setdefault(PARAMETER_KEYS[parameter.role], set()).add(
                    len(parameter.shape))
    return {key: tuple(sorted(found)) for key, found in ranks.items()}


def _example() -> Schema:
    x, y, params = EXAMPLE_FIELDS
    return {
        "type": "object",
        "description": "a worked example: one input x, its target y and every parameter; "
                       "derive picks short round values for any of the three left out",
        "properties": {
            EXAMPLE_ABOUT: {
                "description": "what the example is, in words, shown in the notes: one text, "
                               "or one per language code (en, zh)",
                "anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ABOUT},
                          {"type": "object", "minProperties": 1,
                           "patternProperties": {"^[a-z]{2}$": {
                               "type": "string", "minLength": 1, "maxLength": MAX_ABOUT}},
                           "additionalProperties": False}]},
            x: {"anyOf": [_numbers(), _numbers(2), _numbers(3)],
                "description": "n_0 numbers, a sequence input's [T][n_0] or an image "
                               "input's [C][H][W] nested lists"},
            y: {"anyOf": [_numbers(), _numbers(2)],
                "description": "n_L numbers, or a sequence output's [T][n_L]"},
            params: {
                "type": "object",
                "patternProperties": {
                    **{f"^{key}[1-9][0-9]*$": {"anyOf": [_numbers(rank) for rank in ranks]}
                       for key, ranks in parameter_ranks().items()},
                    # a custom op's parameter (its name ends in a letter or _)
                    "^[A-Za-z_]([A-Za-z0-9_]*[A-Za-z_])?[1-9][0-9]*$": {
                        "anyOf": [_numbers(rank) for rank in range(1, MAX_AXES + 1)]},
                },
                # never a name derive gives to a quantity (a custom op's parameter cannot be
                # called so either)
                "propertyNames": {"not": {"pattern": f"^({'|'.join(sorted(RESERVED))})[0-9]"}},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }


def spec_schema() -> Schema:
    """A JSON Schema (draft 2020-12) of a network spec (docs/architecture.md, "Contracts")."""
    properties: Schema = {
        "name": {"type": "string", "pattern": IDENTIFIER_PATTERN},
        "input": {"anyOf": [
            {"type": "integer", "minimum": 1, "description": "the input width n_0"},
            {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 3,
             "maxItems": 3, "description": "an image [C, H, W]: channels, height, width"},
            {"type": "object", "description": "a sequence: T steps of n features",
             "properties": {"size": {"type": "integer", "minimum": 1,
                                     "description": "the features per step n_0"},
                            "length": {"type": "integer", "minimum": 1,
                                       "description": "the number of steps T"}},
             "required": list(SEQUENCE_FIELDS), "additionalProperties": False}]},
        "layers": {"type": "array", "minItems": 1, "items": _ref("layer"),
                   "description": "layer l is item l (from 1); the last is the output"},
        "loss": _loss(),
        "regularization": _regularization(),
        "example": _example(),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "derive network spec",
        "type": "object",
        "properties": {field: properties[field] for field in TOP_FIELDS},
        "required": list(TOP_REQUIRED),
        "additionalProperties": False,
        "$defs": {
            "activation": _activation(),
            "reference": _reference(),
            "layer": _layer(),
            **{f"op.{name}": _op_layer(definition) for name, definition in OPS.items()},
            "op.custom": _custom_op_layer(),
        },
    }

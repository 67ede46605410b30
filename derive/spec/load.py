"""Stage 1, the spec: a YAML/JSON file, built-in example or dict to a validated NetworkSpec.

``load_spec`` takes a file path, the name of a built-in example (``derive/examples/*.yaml``) or a
plain mapping, checks every field (docs/architecture.md, "Contracts") and gives a :class:`NetworkSpec`:
frozen dataclasses holding tuples, the input of :mod:`derive.graph.model`. Every problem is a
:class:`~derive.errors.DeriveError` naming the source, the field path (``layers[1].activation``)
and, for files, the line of that field.

Activations and losses are kept as the user wrote them (:class:`FunctionSpec`); their SymPy
expressions come from :mod:`derive.registry.functions` (``NetworkSpec.activation``/``resolved_loss``).
The structural rules are mirrored as a JSON Schema in :mod:`derive.spec.schema`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import keyword
import math
import os
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from derive import limits
from derive.errors import DeriveError
from derive.examples import EXAMPLES_DIR, example_names, example_path, list_examples  # noqa: F401
from derive.registry import functions
from derive.words import plural

if TYPE_CHECKING:
    from derive.registry.custom_ops import CustomOp

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

TOP_FIELDS = ("name", "input", "layers", "loss", "regularization", "example")
TOP_REQUIRED = ("name", "input", "layers", "loss")
#: Fields every layer may give, whatever its op; the op's own attributes come from the registry.
LAYER_COMMON_FIELDS = ("op", "name", "input", "inputs")
REGULARIZATION_FIELDS = ("l2", "l1")
EXAMPLE_FIELDS = ("x", "y", "params")
#: The example's words about itself: what the sample is (shown in the notes, not computed)
EXAMPLE_ABOUT = "about"
#: The longest ``about`` text, in characters
MAX_ABOUT = 500
CUSTOM_FIELDS = ("name", "expr")
CUSTOM_OP_FIELDS = ("name", "expr", "params")
#: The one attribute of a custom op's layer: its output width, the range of j.
CUSTOM_OP_SIZE = "size"
#: How the ``source`` of a built-in example starts (then its quoted name).
BUILTIN_LABEL = "built-in example"
#: The spec's word for the network input x where a layer names what it reads.
INPUT_NAME = "input"
#: The op of a layer that gives no ``op:``.
DEFAULT_OP = "dense"
#: Dictionary keys of parameters by role (docs/architecture.md, "Contracts": W{l}, b{l}, gamma{l}, ...).
PARAMETER_KEYS = {"w": "W", "b": "b", "gamma": "gamma", "beta": "beta", "wx": "Wx", "wh": "Wh",
                  "bx": "bx", "bh": "bh", "wq": "Wq", "wk": "Wk", "wv": "Wv"}
#: The fields of a sequence input ``{size: n, length: T}``.
SEQUENCE_FIELDS = ("size", "length")


def shape_kind(shape: tuple[int, ...]) -> str:
    """What a per-sample shape holds: "vector" (n,), "sequence" (T, n) or "image" (C, H, W)."""
    return {1: "vector", 2: "sequence", 3: "image"}[len(shape)]


def describe_shape(shape: tuple[int, ...]) -> str:
    """A shape as an error message names it: "a vector of width 4", "a sequence of 20 steps
    of width 3", "an image [1, 8, 8]"."""
    kind = shape_kind(shape)
    if kind == "vector":
        return f"a vector of width {shape[0]}"
    if kind == "sequence":
        return f"a sequence of {shape[0]} steps of width {shape[1]}"
    return f"an image {list(shape)}"


def parameter_key(role: str, node: int) -> str:
    """The key of a parameter in the parameter dict: W3, b3, gamma3; a custom op's U3."""
    return f"{PARAMETER_KEYS.get(role, role)}{node}"


def axis_values(layer: LayerSpec, l: int, per_node: Sequence[T]) -> dict[str, T]:
    """What the axis names of parameter shapes stand for at layer ``l``, given one value per
    node (a width or its symbol): ``size`` (the layer's own), ``in`` (its first input's) and
    ``in1``, ``in2``, ... (each input's, in order)."""
    reads = layer.reads(l)
    values = {"size": per_node[l], "in": per_node[reads[0]]}
    values.update((f"in{n}", per_node[node]) for n, node in enumerate(reads, start=1))
    return values

T = TypeVar("T")

# A field path inside the document: keys and list indices, e.g. ("layers", 1, "activation").
FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class FunctionSpec:
    """An activation or loss reference as the user wrote it.

    ``params`` holds only the parameters given, in the registry's order; ``expr`` is the text of
    a custom expression (already parsed once by the whitelist parser, so it is valid).
    """

    name: str
    params: tuple[tuple[str, float], ...] = ()
    expr: str | None = None

    def to_data(self) -> str | dict[str, Any]:
        """The plain name, or the mapping form when there are parameters or an expression."""
        if self.expr is not None:
            return {"name": self.name, "expr": self.expr}
        if self.params:
            return {"name": self.name, **dict(self.params)}
        return self.name


@dataclass(frozen=True)
class LayerSpec:
    """One layer l: its op, output width n_l, activation, bias flag and what it reads.

    ``inputs`` are node numbers (0 is the input x), resolved from the names or numbers the
    spec gave; ``None`` means the previous layer. ``options`` holds the op's numeric
    attributes (``eps``, ``rate``; a kernel's, stride's or padding's (rows, columns)) as given.
    ``activation`` is ``None`` for ops without one. A layer whose output is an image has
    ``image`` (C, H, W) and ``size`` C; one whose output is a sequence has ``length`` T (its
    shape is (T, size)).
    """

    size: int
    activation: FunctionSpec | None
    bias: bool = True
    op: str | CustomOp = "dense"
    name: str | None = None
    inputs: tuple[int, ...] | None = None
    options: tuple[tuple[str, float | tuple[int, int]], ...] = ()
    image: tuple[int, int, int] | None = None    # [C, H, W] of an image output
    length: int | None = None                    # T of a sequence output

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape of the layer's output: (n_l,), (T, n_l) or (C, H, W)."""
        if self.image is not None:
            return self.image
        return (self.length, self.size) if self.length is not None else (self.size,)

    def reads(self, index: int) -> tuple[int, ...]:
        """The node numbers layer ``index`` (1-based) reads."""
        return self.inputs if self.inputs is not None else (index - 1,)

    def option(self, key: str, default: float | None = None) -> float | None:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class ExampleSpec:
    """An optional worked example for the LaTeX document.

    ``x`` is one input sample (length n_0), ``y`` its target (length n_L); ``params`` gives
    ``("W1", rows), ("b1", values), ...`` in layer order, as nested tuples of floats.
    ``about`` says in words what the sample is: ``(("", text),)`` for one text in every
    language, else ``((language, text), ...)``.
    """

    x: tuple[float, ...] | None = None
    y: tuple[float, ...] | None = None
    params: tuple[tuple[str, tuple], ...] = ()
    about: tuple[tuple[str, str], ...] = ()

    def about_in(self, language: str) -> str:
        """The ``about`` text for ``language``: its own, else the one for every language,
        else the English one; "" where there is none."""
        texts = dict(self.about)
        return texts.get(language) or texts.get("") or texts.get("en", "")

    @property
    def given(self) -> tuple[str, ...]:
        """The fields of EXAMPLE_FIELDS this example gives (params: every parameter, or none)."""
        return tuple(name for name in EXAMPLE_FIELDS if getattr(self, name) not in (None, ()))

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.x is not None:
            data["x"] = _lists(self.x)
        if self.y is not None:
            data["y"] = _lists(self.y)
        if self.params:
            data["params"] = {key: _lists(value) for key, value in self.params}
        if self.about:
            texts = dict(self.about)
            data[EXAMPLE_ABOUT] = texts.get("", texts)
        return data


@dataclass(frozen=True)
class NetworkSpec:
    """A validated network: input width, dense layers, loss and an optional worked example.

    ``input`` is n_0, the input's width, or its channels C when the input is an image
    (``image`` is then (C, H, W)); a sequence input has ``length`` T (x is (T, n_0))."""

    name: str
    input: int
    layers: tuple[LayerSpec, ...]
    loss: FunctionSpec
    example: ExampleSpec | None = None
    source: str = "<dict>"
    regularization: tuple[tuple[str, float], ...] = ()
    image: tuple[int, int, int] | None = None
    length: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-sample shape of x: (n_0,), (T, n_0) or (C, H, W)."""
        if self.image is not None:
            return self.image
        return (self.length, self.input) if self.length is not None else (self.input,)

    @property
    def sequence(self) -> bool:
        """Whether the input is a sequence (the network has time steps)."""
        return self.length is not None

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The per-sample shape of every node's output, the input's first."""
        return (self.input_shape, *(layer.shape for layer in self.layers))

    @property
    def l2(self) -> float:
        return dict(self.regularization).get("l2", 0.0)

    @property
    def l1(self) -> float:
        return dict(self.regularization).get("l1", 0.0)

    @property
    def is_chain(self) -> bool:
        """Whether the network is a plain chain of dense layers (the classic MLP)."""
        return all(layer.op == "dense" and layer.inputs is None for layer in self.layers)

    def parameter_defs(self) -> Iterator[tuple[int, LayerSpec, Any]]:
        """(l, layer, its ParameterDef) for every parameter, in layer order."""
        from derive.registry.ops import OPS  # the registry, stage 0

        for l, layer in enumerate(self.layers, start=1):
            for parameter in OPS[layer.op].parameters(layer_attributes(layer)):
                yield l, layer, parameter

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter key (``W1``, ``b1``, ``gamma3``, ...) and its shape, in layer order."""
        from derive.registry.ops import axis_value  # the registry, stage 0

        return {parameter_key(parameter.role, l): tuple(
                    axis_value(axis, axis_values(layer, l, self.sizes))
                    for axis in parameter.shape)
                for l, layer, parameter in self.parameter_defs()}

    def parameter_shape_names(self) -> dict[str, str]:
        """Every parameter key and its shape in the registry's terms: ``n_1 x n_in`` for W1,
        ``4 n_1 x n_in`` for an LSTM's Wx1 (its gates stacked), ``n_1`` for b1."""
        from derive.registry.ops import axis_name  # the registry, stage 0

        return {parameter_key(parameter.role, l): " x ".join(
                    axis_name(axis, l) for axis in parameter.shape)
                for l, _, parameter in self.parameter_defs()}

    @property
    def sizes(self) -> tuple[int, ...]:
        """``(n_0, n_1, ..., n_L)``."""
        return (self.input, *(layer.size for layer in self.layers))

    @property
    def depth(self) -> int:
        """L, the number of layers with parameters."""
        return len(self.layers)

    def activation(self, l: int) -> functions.Activation | None:
        """The resolved activation of layer ``l`` (numbered 1..L, as in the notation); None for
        an op without one."""
        if not 1 <= l <= self.depth:
            raise IndexError(f"layer {l} out of range 1..{self.depth}")
        spec = self.layers[l - 1].activation
        return None if spec is None else _resolve_activation(spec)

    def resolved_loss(self) -> functions.Loss:
        """The resolved per-component loss."""
        return _resolve_loss(self.loss)

    def to_dict(self) -> dict[str, Any]:
        """The canonical plain dict: the file's fields, fixed key order, defaults left out."""
        from derive.registry.ops import OPS  # the registry, stage 0

        layers = []
        for layer in self.layers:
            entry: dict[str, Any] = {}
            if layer.op != "dense":
                entry["op"] = layer.op if isinstance(layer.op, str) else layer.op.to_data()
            if layer.name is not None:
                entry["name"] = layer.name
            if layer.inputs is not None:
                key = "input" if len(layer.inputs) == 1 else "inputs"
                values = [INPUT_NAME if n == 0 else n for n in layer.inputs]
                entry[key] = values[0] if key == "input" else values
            if not isinstance(layer.op, str):
                entry["size"] = layer.size
            else:                                   # the ops that choose their own width
                entry.update((a.name, layer.size) for a in OPS[layer.op].attributes
                             if a.kind == "size")
            if layer.activation is not None:
                entry["activation"] = layer.activation.to_data()
            if not layer.bias:
                entry["bias"] = False
            entry.update((key, _pair_data(value)) for key, value in layer.options)
            layers.append(entry)
        data: dict[str, Any] = {
            "name": self.name,
            "input": list(self.image) if self.image is not None else (
                {"size": self.input, "length": self.length} if self.length is not None
                else self.input),
            "layers": layers,
            "loss": self.loss.to_data(),
        }
        if self.regularization:
            data["regularization"] = dict(self.regularization)
        if self.example is not None:
            data["example"] = self.example.to_data()
        return data

    def argument(self) -> str:
        """The SPEC argument that names this spec in a command quoted in generated files
        ("Regenerate: derive latex SPEC"): a built-in example's name; a file's name, shell
        quoted (the command is run beside the file); ``<spec of NAME>`` for a spec given as
        data, which no command can name."""
        if self.source.startswith(BUILTIN_LABEL):
            return self.name
        if self.source == "<dict>":
            return f"<spec of {self.name}>"
        return shlex.quote(Path(self.source).name)

    def digest(self) -> str:
        """A short content hash of the spec (its source does not count)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def layer_attributes(layer: LayerSpec) -> dict[str, object]:
    """A layer's attributes as the op registry reads them."""
    attrs: dict[str, object] = {"size": layer.size, "bias": layer.bias, **dict(layer.options)}
    if layer.activation is not None:
        attrs["activation"] = layer.activation
    return attrs


def _a_layer(op_name: str | CustomOp) -> str:
    """``"a dense layer"``, ``"an add layer"``: the op's layer with its article."""
    if not isinstance(op_name, str):
        return f"a {op_name.name} layer (a custom op)"
    article = "an" if op_name[:1].lower() in "aeiou" else "a"
    return f"{article} {op_name} layer"


def _node_label(node: int, names: Mapping[str, int]) -> str:
    if node == 0:
        return "the input"
    for name, number in names.items():
        if number == node:
            return f"layer {node} ({name})"
    return f"layer {node}"


def _pair_default(attribute: object) -> object:
    """An attribute's default as its values are kept: a pair for a kernel, stride or
    padding."""
    default = attribute.default
    if attribute.kind in ("pair", "pair0") and isinstance(default, int):
        return default, default
    return default


def _pair_data(value: float | tuple[int, int]) -> float | int | list[int]:
    """An option as the spec writes it: a (rows, columns) pair of equal values as one."""
    if isinstance(value, tuple):
        return value[0] if value[0] == value[1] else list(value)
    return value


def _lists(value: tuple | float) -> list | float:
    return [_lists(item) for item in value] if isinstance(value, tuple) else value


@functools.cache
def _resolve_activation(spec: FunctionSpec) -> functions.Activation:
    return functions.resolve_activation(spec.name, dict(spec.params), spec.expr)


@functools.cache
def _resolve_loss(spec: FunctionSpec) -> functions.Loss:
    return functions.resolve_loss(spec.name, spec.expr)


# --- loading -------------------------------------------------------------------------------


def load_spec(source: str | os.PathLike | Mapping) -> NetworkSpec:
    """Load and validate a spec from a path, a built-in example name or a mapping.

    A string is a built-in example name when it is one and no file of that name exists;
    otherwise it is a path ending in ``.yaml``, ``.yml`` or ``.json``. A NetworkSpec is
    returned as it is.
    """
    if isinstance(source, NetworkSpec):
        return source
    if isinstance(source, Mapping):
        return _Validator(None, {}).network(source, "<dict>")
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"load_spec takes a path, an example name or a mapping, not {source!r}")
    if isinstance(source, str) and not os.path.exists(source) and source in example_names():
        path, label = example_path(source), f"{BUILTIN_LABEL} {source!r}"
    else:
        path, label = Path(source), os.fspath(source)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        if not path.exists():
            raise DeriveError(
                f"no such file or built-in example {label!r}; "
                f"built-in examples: {', '.join(example_names())}"
            )
        raise DeriveError("a spec file must end in .yaml, .yml or .json", source=label)
    data, lines = _read_file(path, label)
    return _Validator(label, lines).network(data, label)


def _read_file(path: Path, label: str) -> tuple[Any, dict[FieldPath, int]]:
    """The file's data and the 1-based line of each field path in it."""
    if path.exists() and not path.is_file():  # a folder; a pipe or a device would block
        raise DeriveError("cannot read the file: it is not a regular file (a folder, a device "
                          "or a pipe)", source=label)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limits.MAX_SPEC_BYTES + 1)
            size = max(len(raw), os.fstat(handle.fileno()).st_size)
    except FileNotFoundError:
        raise DeriveError("no such file", source=label) from None
    except OSError as err:
        raise DeriveError(f"cannot read the file: {err.strerror or err}", source=label) from None
    if size > limits.MAX_SPEC_BYTES:
        raise limits.over_limit("the file's size in bytes", size, limits.MAX_SPEC_BYTES,
                                "MAX_SPEC_BYTES").located(source=label) from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM is not part of the spec
    except UnicodeDecodeError as err:
        raise DeriveError(f"not a UTF-8 text file (byte {err.start + 1} is not UTF-8)",
                          source=label) from None
    if "\0" in text:  # a binary file that happens to decode, or a stray NUL
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DeriveError("a NUL byte: a spec is a text file", source=label, line=line)
    if path.suffix.lower() == ".json":
        return _read_json(text, label)
    return _read_yaml(text, label)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(text: str, label: str) -> tuple[Any, dict[FieldPath, int]]:
    loader = None
    try:
        loader = _Loader(text)  # it checks every character at once
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_duplicates(node, label)
        return loader.construct_document(node), _field_lines(node)
    except yaml.MarkedYAMLError as err:
        raise _syntax_error("YAML", err, label) from None
    except yaml.YAMLError as err:
        raise DeriveError(f"malformed YAML: {' '.join(str(err).split())}", source=label) from None
    except ValueError as err:  # a constructor's, e.g. an integer of 5000 digits
        raise DeriveError(f"malformed YAML: {err}", source=label) from None
    except RecursionError:
        raise DeriveError("malformed YAML: nested too deeply", source=label) from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_json(text: str, label: str) -> tuple[Any, dict[FieldPath, int]]:
    # JSON is read by the json module (PyYAML reads the JSON number 1e-3 as a string and
    # refuses tabs); the same text composed as YAML gives the line of each field.
    try:
        node = yaml.compose(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):
        node = None
    if node is not None:
        _check_duplicates(node, label)
    try:
        data = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as err:
        raise DeriveError(
            f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})",
            source=label,
            line=err.lineno,
        ) from None
    except DeriveError as err:
        raise err.located(source=label) from None
    except (ValueError, RecursionError) as err:  # an integer of 5000 digits; deep nesting
        what = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise DeriveError(f"malformed JSON: {what}", source=label) from None
    return data, _field_lines(node) if node is not None else {}


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise DeriveError(f"duplicate key {key!r}")
        data[key] = value
    return data


def _syntax_error(kind: str, err: yaml.MarkedYAMLError, label: str) -> DeriveError:
    mark = err.problem_mark or err.context_mark
    problem = err.problem or err.context or "cannot parse"
    if mark is None:
        return DeriveError(f"malformed {kind}: {problem}", source=label)
    line, column = mark.line + 1, mark.column + 1
    return DeriveError(
        f"malformed {kind}: {problem} (line {line}, column {column})", source=label, line=line
    )


def _check_duplicates(node: yaml.Node, label: str) -> None:
    """Refuse a mapping that gives a key twice (PyYAML would keep the last silently)."""
    seen_nodes: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen_nodes:  # aliases share nodes and may even be recursive
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in keys:
                        raise DeriveError(
                            f"duplicate key {key.value!r}",
                            source=label,
                            line=key.start_mark.line + 1,
                        )
                    keys.add((key.tag, key.value))
                stack.extend((key, value))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)


def _field_lines(node: yaml.Node) -> dict[FieldPath, int]:
    """The 1-based line of each field path: of its key in a mapping, of the item in a list."""
    lines: dict[FieldPath, int] = {(): node.start_mark.line + 1}
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, FieldPath]] = [(node, ())]
    while stack:
        current, path = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    lines.setdefault((*path, key.value), key.start_mark.line + 1)
                    stack.append((value, (*path, key.value)))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                lines.setdefault((*path, index), item.start_mark.line + 1)
                stack.append((item, (*path, index)))
    return lines


# --- validation ----------------------------------------------------------------------------


def field_path(path: FieldPath) -> str:
    """``("layers", 1, "activation")`` as ``layers[1].activation``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "nothing"
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list" if value else "an empty list"
    return f"a {type(value).__name__}"


def _as_float(value: object) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class _Validator:
    """Checks plain data field by field; errors carry the source and the field's line."""

    def __init__(self, source: str | None, lines: Mapping[FieldPath, int]) -> None:
        self.source = source
        self.lines = lines

    def error(self, path: FieldPath, message: str) -> DeriveError:
        line = None
        for end in range(len(path), -1, -1):  # the line of the nearest enclosing field
            if path[:end] in self.lines:
                line = self.lines[path[:end]]
                break
        return DeriveError(message, source=self.source, field=field_path(path) or None, line=line)

    def locate(self, err: DeriveError, path: FieldPath) -> DeriveError:
        """A DeriveError from :mod:`derive.registry.functions`, placed at ``path``."""
        where = self.error(path, err.message)
        return err.located(source=where.source, field=where.field, line=where.line)

    def mapping(
        self,
        value: object,
        path: FieldPath,
        what: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...],
    ) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(path, f"{what} must be a mapping, got {_describe(value)}")
        for key in value:
            if key not in allowed:
                raise self.error(
                    (*path, str(key)),
                    f"unknown field {key!r} in {what}; allowed: {', '.join(allowed)}",
                )
        for key in required:
            if key not in value:
                raise self.error(
                    (*path, key),
                    f"missing required field {key!r} in {what}; required: {', '.join(required)}",
                )
        return value

    def positive_int(self, value: object, path: FieldPath) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 3.0 is an integer to JSON Schema too
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(
                path, f"must be a positive integer (1, 2, ...), got {_describe(value)}"
            )
        return value

    def width(self, value: object, path: FieldPath, what: str = "the width") -> int:
        """The width of the input or of a layer (or a sequence's length, ``what``): a positive
        integer within the limit."""
        width = self.positive_int(value, path)
        if width > limits.MAX_WIDTH:
            raise self.limit(path, what, width, limits.MAX_WIDTH, "MAX_WIDTH")
        return width

    def limit(self, path: FieldPath, what: str, value: int, limit: int,
              name: str) -> DeriveError:
        """:func:`derive.limits.over_limit`, placed at ``path``."""
        return self.locate(limits.over_limit(what, value, limit, name), path)

    def identifier(self, value: object, path: FieldPath) -> str:
        if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
            raise self.error(
                path,
                "must be an identifier (a letter or _, then letters, digits or _; "
                f"[A-Za-z_][A-Za-z0-9_]*), got {_describe(value)}",
            )
        return value

    def number(self, value: object, path: FieldPath) -> float:
        number = _as_float(value)
        if number is None:
            raise self.error(path, f"must be a finite number, got {_describe(value)}")
        return number

    def numbers(self, value: object, path: FieldPath, length: int, what: str) -> tuple[float, ...]:
        if not isinstance(value, list | tuple) or len(value) != length:
            got = f"length {len(value)}" if isinstance(value, list | tuple) else _describe(value)
            raise self.error(path, f"must be a list of {plural(length, 'number')} ({what}), "
                                   f"got {got}")
        return tuple(self.number(item, (*path, i)) for i, item in enumerate(value))

    # -- the spec, top down --

    def network(self, data: object, source: str) -> NetworkSpec:
        if not isinstance(data, Mapping):
            raise self.error(
                (),
                f"the spec must be a mapping with fields {', '.join(TOP_REQUIRED)}, "
                f"got {_describe(data) if data is not None else 'an empty document'}",
            )
        self.mapping(data, (), "the spec", TOP_FIELDS, TOP_REQUIRED)
        name = self.identifier(data["name"], ("name",))
        image = length = None
        if isinstance(data["input"], list | tuple):
            image = self.image(data["input"], ("input",))
            n_input = image[0]
        elif isinstance(data["input"], Mapping):
            n_input, length = self.sequence_input(data["input"], ("input",))
        else:
            n_input = self.width(data["input"], ("input",))
        raw_layers = data["layers"]
        if not isinstance(raw_layers, list | tuple) or not raw_layers:
            raise self.error(
                ("layers",), f"must be a non-empty list of layers, got {_describe(raw_layers)}"
            )
        if len(raw_layers) > limits.MAX_DEPTH:
            raise self.limit(("layers",), "the number of layers", len(raw_layers),
                             limits.MAX_DEPTH, "MAX_DEPTH")
        input_shape = image or ((length, n_input) if length is not None else (n_input,))
        layers = self.layers(raw_layers, input_shape)
        loss = self.loss(data["loss"], ("loss",))
        regularization = ()
        if "regularization" in data:
            regularization = self.regularization(data["regularization"], ("regularization",))
        spec = NetworkSpec(name, n_input, layers, loss, source=source,
                           regularization=regularization, image=image, length=length)
        self.check_semantics(spec)
        if "example" in data:
            example = self.example(data["example"], ("example",), spec)
            if example != ExampleSpec():
                spec = NetworkSpec(name, n_input, layers, loss, example, source, regularization,
                                   image, length)
        return spec

    def image(self, value: list | tuple, path: FieldPath) -> tuple[int, int, int]:
        """An image input [C, H, W]: three positive integers within the width limit."""
        if len(value) != 3:
            raise self.error(path, "an image input is [C, H, W] (channels, height, width), "
                                   f"got a list of {len(value)}")
        out = tuple(self.width(item, (*path, n)) for n, item in enumerate(value))
        if math.prod(out) > limits.MAX_WIDTH:
            raise self.limit(path, "the input's size C*H*W", math.prod(out), limits.MAX_WIDTH,
                             "MAX_WIDTH")
        return out  # type: ignore[return-value]

    def sequence_input(self, value: Mapping, path: FieldPath) -> tuple[int, int]:
        """A sequence input {size: n, length: T}: (n, T), within the width limit."""
        self.mapping(value, path, "a sequence input {size: n, length: T}", SEQUENCE_FIELDS,
                     SEQUENCE_FIELDS)
        size = self.width(value["size"], (*path, "size"))
        length = self.width(value["length"], (*path, "length"), "the length T")
        if size * length > limits.MAX_WIDTH:
            raise self.limit(path, "the input's size n*T", size * length, limits.MAX_WIDTH,
                             "MAX_WIDTH")
        return size, length

    def pair(self, value: object, path: FieldPath, low: int) -> tuple[int, int]:
        """A kernel's, stride's or padding's (rows, columns): an integer >= ``low`` for both,
        or a list of two."""
        items = list(value) if isinstance(value, list | tuple) else [value, value]
        what = "positive integer" if low else "integer >= 0"
        if len(items) != 2:
            raise self.error(path, f"must be a {what} or a list [rows, columns] of two, got "
                                   f"{_describe(value)}")
        out = []
        for item in items:
            if isinstance(item, float) and item.is_integer():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, int) or item < low:
                raise self.error(path, f"must be a {what} or a list [rows, columns] of two, "
                                       f"got {_describe(value)}")
            if item > limits.MAX_WIDTH:
                raise self.limit(path, "a kernel, stride or padding", item, limits.MAX_WIDTH,
                                 "MAX_WIDTH")
            out.append(item)
        return out[0], out[1]

    def regularization(self, data: object, path: FieldPath) -> tuple[tuple[str, float], ...]:
        self.mapping(data, path, "regularization", REGULARIZATION_FIELDS, ())
        out = []
        for key in REGULARIZATION_FIELDS:
            if key in data:
                value = self.number(data[key], (*path, key))
                if value < 0:
                    raise self.error((*path, key), f"must be at least 0, got {value!r}")
                if value:
                    out.append((key, value))
        return tuple(out)

    def layers(self, raw_layers: list | tuple, input_shape: tuple[int, ...]
               ) -> tuple[LayerSpec, ...]:
        """Every layer, with what it reads resolved to node numbers; the graph rules checked:
        earlier layers only (so no cycles), known names, equal widths, every layer used."""
        names: dict[str, int] = {}
        shapes = [input_shape]
        layers: list[LayerSpec] = []
        for index, raw in enumerate(raw_layers, start=1):
            layer = self.layer(raw, ("layers", index - 1), index, names, shapes)
            if layer.name is not None:
                names[layer.name] = index
            shapes.append(layer.shape)
            layers.append(layer)
        used = {n for l, layer in enumerate(layers, start=1) for n in layer.reads(l)}
        for l, layer in enumerate(layers[:-1], start=1):
            if l not in used:
                label = f"layer {l}" + (f" ({layer.name})" if layer.name else "")
                raise self.error(
                    ("layers", l - 1),
                    f"{label} is never used: every layer but the last must be read by a later "
                    "layer (the default is the next one; `input:`/`inputs:` choose others)")
        return tuple(layers)

    def layer(self, data: object, path: FieldPath, index: int, names: Mapping[str, int],
              shapes: list[tuple[int, ...]]) -> LayerSpec:
        from derive.registry.ops import OPS  # the registry, stage 0

        if not isinstance(data, Mapping):
            raise self.error(path, f"a layer must be a mapping, got {_describe(data)}")
        op_name = data.get("op", DEFAULT_OP)
        custom = isinstance(op_name, Mapping)
        if not custom and (not isinstance(op_name, str) or op_name not in OPS):
            raise self.error((*path, "op"), f"unknown op {_describe(op_name)}; known: "
                                            f"{', '.join(OPS)}, or a custom op "
                                            "{name, expr, params}")
        if custom:
            attributes = required = (CUSTOM_OP_SIZE,)
            op_name = "custom op"
        else:
            definition = OPS[op_name]
            attributes = tuple(attribute.name for attribute in definition.attributes)
            required = tuple(a.name for a in definition.attributes if a.required)
        self.mapping(data, path, _a_layer(op_name), (*LAYER_COMMON_FIELDS, *attributes),
                     required)
        name = None
        if "name" in data:
            name = self.identifier(data["name"], (*path, "name"))
            if name == INPUT_NAME or name in names:
                taken = "names the network input" if name == INPUT_NAME else (
                    f"is already the name of layer {names[name]}")
                raise self.error((*path, "name"), f"{name!r} {taken}; give each layer a "
                                                  "name of its own")
        inputs = self.inputs(data, path, index, names)
        reads = inputs if inputs is not None else (index - 1,)
        sizes = [shape[-1] if shape_kind(shape) == "sequence" else shape[0] for shape in shapes]
        self.input_kinds(op_name if not custom else None, reads, shapes, names,
                         (*path, "input") if "input" in data else
                         (*path, "inputs") if "inputs" in data else path, index)
        if custom:
            width = self.width(data[CUSTOM_OP_SIZE], (*path, CUSTOM_OP_SIZE))
            op_name = self.custom_op(data["op"], (*path, "op"), width,
                                     tuple(sizes[n] for n in reads))
            definition = OPS[op_name]
        low, high = definition.inputs
        if not low <= len(reads) <= (high if high is not None else len(reads)):
            if low == high:
                wanted = f"{low}"
            else:
                wanted = f"at least {low}" if high is None else f"{low} to {high}"
            given = "input" if "input" in data else "inputs"
            default = "" if inputs is not None else (
                " (without `inputs:` a layer reads the previous layer only)")
            raise self.error((*path, given), f"{_a_layer(op_name)} reads {wanted} input(s), "
                                             f"got {len(reads)}{default}")
        widths = [sizes[n] for n in reads]
        if definition.same_width_inputs and len({shapes[n] for n in reads}) > 1:
            described = ", ".join(f"{_node_label(n, names)} has "
                                  + (f"width {sizes[n]}" if len(shapes[n]) == 1
                                     else f"shape {list(shapes[n])}") for n in reads)
            raise self.error((*path, "inputs"),
                             f"shape mismatch: {_a_layer(op_name)} needs inputs of equal width; "
                             f"{described}")
        activation = None
        options: list[tuple[str, float]] = []
        bias = True
        size = None
        for attribute in definition.attributes:
            where = (*path, attribute.name)
            if attribute.name not in data:
                if attribute.kind == "activation" and attribute.default is not None:
                    activation = FunctionSpec(str(attribute.default))
                continue
            value = data[attribute.name]
            if attribute.kind == "size":
                size = self.width(value, where)
            elif attribute.kind == "activation":
                activation = self.activation(value, where)
            elif attribute.kind == "bool":
                if not isinstance(value, bool):
                    raise self.error(where, f"must be true or false, got {_describe(value)}")
                if attribute.name == "bias":
                    bias = value
                else:
                    options.append((attribute.name, value))
            elif attribute.kind == "rate":
                number = self.number(value, where)
                if not 0 <= number < 1:
                    raise self.error(where, f"must be a number in [0, 1), got {value!r}")
                options.append((attribute.name, number))
            elif attribute.kind == "positive":
                number = self.number(value, where)
                if number <= 0:
                    raise self.error(where, f"must be a number > 0, got {value!r}")
                options.append((attribute.name, number))
            elif attribute.kind in ("pair", "pair0"):
                options.append((attribute.name, self.pair(value, where,
                                                          int(attribute.kind == "pair"))))
            elif attribute.kind == "choice":
                if value not in attribute.choices:
                    raise self.error(where, f"must be one of {', '.join(attribute.choices)}, "
                                            f"got {_describe(value)}")
                options.append((attribute.name, value))
        # a default given explicitly is left out, as `bias: true` is: one canonical form
        options = [(key, number) for key, number in options
                   if number != _pair_default(definition.attribute(key))]
        attrs = {"size": size, "bias": bias, **dict(options)}
        length = None
        if definition.output_shape is not None:
            try:
                shape = definition.output_shape(attrs, shapes[reads[0]])
            except ValueError as err:
                raise self.error(path, f"{_a_layer(op_name)}: {err}") from None
            image = shape if len(shape) == 3 else None
            length, size = (shape[0], shape[1]) if len(shape) == 2 else (None, shape[0])
        else:
            image, size = None, definition.output_size(attrs, tuple(widths))
            if shape_kind(shapes[reads[0]]) == "sequence":      # per time step
                length = shapes[reads[0]][0]
        return LayerSpec(size, activation, bias, op_name, name, inputs, tuple(options), image,
                         length)

    def input_kinds(self, op_name: str | None, reads: tuple[int, ...],
                    shapes: list[tuple[int, ...]], names: Mapping[str, int], path: FieldPath,
                    index: int) -> None:
        """An op reads vectors (a dense layer also a sequence, step by step), sequences,
        images, or any of them (elementwise ops); say which it got."""
        from derive.registry.ops import OPS  # the registry, stage 0

        definition = OPS[op_name] if op_name is not None else None
        wanted = definition.reads if definition is not None else "vector"
        per_step = definition is not None and definition.per_step
        kinds = {shape_kind(shapes[n]) for n in reads}
        for n in reads:
            kind = shape_kind(shapes[n])
            if wanted in (kind, "any") or (per_step and kind == "sequence"):
                continue
            what = _node_label(n, names) if n != index - 1 or n == 0 else (
                "the layer before it" if n else "the input")
            layer = _a_layer(op_name) if op_name is not None else "a custom op"
            got = describe_shape(shapes[n])
            if kind == "image" and wanted == "vector":
                raise self.error(path, f"{layer} reads a vector, but {what} gives {got}: put "
                                       "a {op: flatten} layer before it")
            wanted_text = {"vector": "a vector", "image": "an image [C, H, W]",
                           "sequence": "a sequence (input {size, length}, or a recurrent "
                                       "layer's output)"}[wanted]
            hint = " (a recurrent layer with `return: last` gives a vector)" if (
                kind == "sequence" and wanted == "vector") else ""
            raise self.error(path, f"{layer} reads {wanted_text}, but {what} gives {got}{hint}")
        if len(kinds) > 1:
            raise self.error(path, f"{_a_layer(op_name)} reads inputs of one kind; got "
                                   + ", ".join(describe_shape(shapes[n]) for n in reads))

    def custom_op(self, data: object, path: FieldPath, size: int,
                  widths: tuple[int, ...]) -> CustomOp:
        """A custom op ``{name, expr, params}`` reading inputs of these widths, its expression
        parsed by the whitelist parser (docs/architecture.md, "Custom ops")."""
        import sympy as sp

        from derive.registry.custom_ops import MAX_AXES, RESERVED, CustomOp
        from derive.registry.ops import OPS  # the registry, stage 0

        self.mapping(data, path, "a custom op", CUSTOM_OP_FIELDS, ("name", "expr"))
        name = self.identifier(data["name"], (*path, "name"))
        if name in OPS:
            raise self.error((*path, "name"), f"{name!r} is a built-in op; give the custom op "
                                              "another name")
        expr = data["expr"]
        if not isinstance(expr, str) or not expr.strip():
            raise self.error((*path, "expr"), f"must be an expression string, got "
                                              f"{_describe(expr)}")
        probe = CustomOp(name, expr, (), len(widths))
        axes = probe.axis_names
        if len(widths) > 1:
            axes = tuple(axis for axis in axes if axis != "in")
        raw = data.get("params", {})
        if not isinstance(raw, Mapping):
            raise self.error((*path, "params"), "must map parameter names to shapes, e.g. "
                                                f"{{U: [size, {axes[1]}]}}, got {_describe(raw)}")
        params = []
        taken = {*probe.input_names, *RESERVED}
        for key, shape in raw.items():
            where = (*path, "params", str(key))
            key = self.identifier(key, where)
            why = None
            if not key.isascii() or not key.isalpha():
                # letters only: its key P{l} and generated code's own names (S1_3, dU3,
                # tanh_S1_3) can never meet, and a formula or LaTeX can write it
                why = "must be letters only (its key adds the layer number: U3)"
            elif key in taken or keyword.iskeyword(key):
                why = "is a name derive gives to a quantity or an input, or a Python keyword"
            elif key.startswith("d") and key[1:] in raw:
                why = f"would be the name of the gradient of {key[1:]!r} in generated code"
            if why is not None:
                raise self.error(where, f"parameter name {key!r} {why}; choose another")
            bad = [axis for axis in shape if axis not in axes] \
                if isinstance(shape, list | tuple) else []
            if not isinstance(shape, list | tuple) or not 1 <= len(shape) <= MAX_AXES or bad:
                got = f"{bad[0]!r} among them" if bad else _describe(shape)
                raise self.error(where, f"must be a list of 1 to {MAX_AXES} axes, each one of "
                                        f"{', '.join(axes)}; got {got}")
            params.append((key, tuple(shape)))
        custom = CustomOp(name, expr, tuple(params), len(widths))
        values = {"size": size, "in": widths[0], **dict(zip(probe.input_axes, widths))}
        try:
            custom.parse({key: sp.IndexedBase(key) for key, _ in params},
                         tuple(sp.IndexedBase(x) for x in custom.input_names),
                         {axis: sp.Symbol(axis) for axis in values}, values)
        except DeriveError as err:
            raise self.locate(err, (*path, "expr")) from None
        return custom

    def inputs(self, data: Mapping, path: FieldPath, index: int,
               names: Mapping[str, int]) -> tuple[int, ...] | None:
        """The node numbers named by ``input:`` or ``inputs:`` (None when neither is given)."""
        if "input" in data and "inputs" in data:
            raise self.error((*path, "inputs"), "give `input:` (one) or `inputs:` (several), "
                                                "not both")
        if "input" in data:
            refs, where = [data["input"]], (*path, "input")
            paths = [where]
        elif "inputs" in data:
            raw = data["inputs"]
            where = (*path, "inputs")
            if not isinstance(raw, list | tuple) or not raw:
                raise self.error(where, "must be a non-empty list of layer names or numbers, "
                                        f"got {_describe(raw)}")
            refs, paths = list(raw), [(*where, n) for n in range(len(raw))]
        else:
            return None
        out = []
        for ref, ref_path in zip(refs, paths):
            out.append(self.reference(ref, ref_path, index, names))
        if len(set(out)) != len(out):
            raise self.error(where, "names the same layer twice")
        return tuple(out)

    def reference(self, ref: object, path: FieldPath, index: int,
                  names: Mapping[str, int]) -> int:
        allowed = (f"allowed: `input`, a layer number 1..{index - 1} or the name of an earlier "
                   "layer" if index > 1 else "allowed: `input` (this is the first layer)")
        if isinstance(ref, float) and ref.is_integer():
            ref = int(ref)  # 2.0 is an integer to JSON Schema too
        if ref == INPUT_NAME or (isinstance(ref, int) and not isinstance(ref, bool)
                                 and ref == 0):
            return 0
        if isinstance(ref, bool) or not isinstance(ref, int | str):
            raise self.error(path, f"must name a layer, got {_describe(ref)}; {allowed}")
        if isinstance(ref, int):
            if 1 <= ref < index:
                return ref
            if ref >= index:
                raise self.error(path, f"layer {index} cannot read layer {ref}: a layer reads "
                                       f"earlier layers only (no cycles); {allowed}")
            raise self.error(path, f"no layer {ref}; {allowed}")
        if ref in names:
            return names[ref]
        raise self.error(path, f"unknown layer name {ref!r} (a layer reads earlier layers "
                               f"only); {allowed}")

    def activation(self, value: object, path: FieldPath) -> FunctionSpec:
        spec = self.function(value, path, "activation", functions.ACTIVATIONS)
        try:
            _resolve_activation(spec)
        except DeriveError as err:
            raise self.locate(err, (*path, "expr") if spec.expr is not None else path) from None
        return spec

    def loss(self, value: object, path: FieldPath) -> FunctionSpec:
        spec = self.function(value, path, "loss", functions.LOSSES)
        try:
            _resolve_loss(spec)
        except DeriveError as err:
            raise self.locate(err, (*path, "expr") if spec.expr is not None else path) from None
        return spec

    def function(
        self, value: object, path: FieldPath, kind: str, registry: Mapping[str, object]
    ) -> FunctionSpec:
        """An activation or loss: a built-in name, ``{name, params...}`` or ``{name, expr}``."""
        known = ", ".join(registry)
        if isinstance(value, str):
            if value not in registry:
                raise self.error(
                    path, f"unknown {kind} {value!r}; known: {known} (or give {{name, expr}})"
                )
            return FunctionSpec(value)
        if not isinstance(value, Mapping):
            raise self.error(
                path,
                f"must be the name of a built-in {kind} ({known}) or a mapping "
                f"{{name: ..., expr: ...}}, "
                f"got {_describe(value)}",
            )
        if "name" not in value:
            raise self.error((*path, "name"), f"missing required field 'name' in the {kind}")
        name = self.identifier(value["name"], (*path, "name"))
        if "expr" in value:
            self.mapping(value, path, f"a custom {kind}", CUSTOM_FIELDS, CUSTOM_FIELDS)
            if name in registry:
                raise self.error(
                    (*path, "name"),
                    f"{name!r} is a built-in {kind}; give the custom {kind} another name",
                )
            expr = value["expr"]
            if not isinstance(expr, str) or not expr.strip():
                raise self.error(
                    (*path, "expr"), f"must be an expression string, got {_describe(expr)}"
                )
            return FunctionSpec(name, expr=expr)
        if name not in registry:
            raise self.error(
                (*path, "name"), f"unknown {kind} {name!r}; known: {known} (or add an expr)"
            )
        entry_params = getattr(registry[name], "params", ())  # losses take no parameters
        allowed = ("name", *(key for key, _ in entry_params))
        for key in value:
            if key not in allowed:
                raise self.error(
                    (*path, str(key)),
                    f"{kind} {name!r} has no parameter {key!r}; allowed: "
                    f"{', '.join(allowed[1:]) or 'none'}",
                )
        params = tuple(
            (key, self.number(value[key], (*path, key))) for key, _ in entry_params if key in value
        )
        return FunctionSpec(name, params)

    def check_semantics(self, spec: NetworkSpec) -> None:
        """Rules across fields: something to train, softmax only last, losses that need a kind
        of output, a vector output."""
        if spec.layers[-1].image is not None:
            raise self.error(("layers", spec.depth - 1),
                             "the last layer gives an image "
                             f"{list(spec.layers[-1].image)}; the loss reads a vector or a "
                             "sequence: end with {op: flatten} and a dense layer")
        shapes = spec.parameter_shapes()
        if not shapes:
            raise self.error(("layers",), "the network has no parameters to train: add a dense "
                                          "or layer_norm layer")
        count = sum(math.prod(shape) for shape in shapes.values())
        if count > limits.MAX_PARAMETERS:
            raise self.limit(("layers",), "the number of trainable parameters", count,
                             limits.MAX_PARAMETERS, "MAX_PARAMETERS")
        from derive.registry.ops import OPS  # the registry, stage 0
        for l in range(1, spec.depth + 1):
            activation = spec.activation(l)
            layer = spec.layers[l - 1]
            recurrent = isinstance(layer.op, str) and layer.op in OPS and OPS[
                layer.op].attribute("return") is not None
            if activation is not None and activation.is_softmax and recurrent:
                raise self.error(
                    ("layers", l - 1, "activation"),
                    f"softmax is not allowed as the activation of {layer.op} (a recurrent "
                    "state's activation acts on each unit alone): use another one, and "
                    "{op: activation, activation: softmax} after the layer",
                )
            if activation is not None and activation.is_softmax and l < spec.depth:
                raise self.error(
                    ("layers", l - 1, "activation"),
                    "softmax is allowed on the last layer only",
                )
        output = spec.activation(spec.depth)
        what = output.name if output is not None else _a_layer(spec.layers[-1].op)
        needs = spec.resolved_loss().needs
        if needs == "distribution" and (output is None or not output.is_softmax):
            raise self.error(
                ("loss",),
                "cross-entropy needs a probability vector output: make the last layer softmax "
                f"(it is {what})",
            )
        if needs == "probability" and (output is None or not output.is_probability):
            raise self.error(
                ("loss",),
                "binary cross-entropy needs outputs in (0, 1): make the last layer sigmoid or "
                f"softmax (it is {what}, not known to stay in (0, 1))",
            )

    def example(self, data: object, path: FieldPath, spec: NetworkSpec) -> ExampleSpec:
        self.mapping(data, path, "the example", (*EXAMPLE_FIELDS, EXAMPLE_ABOUT), ())
        x = y = None
        steps = "one row per time step"
        if "x" in data and len(spec.input_shape) > 1:
            x = self.nested(data["x"], (*path, "x"), spec.input_shape, "x",
                            steps if spec.sequence else "channels, rows, columns")
        elif "x" in data:
            x = self.numbers(data["x"], (*path, "x"), spec.input, "one input sample, n_0")
        if "y" in data and len(spec.shapes[-1]) > 1:
            y = self.nested(data["y"], (*path, "y"), spec.shapes[-1], "y", steps)
        elif "y" in data:
            y = self.numbers(data["y"], (*path, "y"), spec.sizes[-1], "its target, n_L")
        params: tuple[tuple[str, tuple], ...] = ()
        if "params" in data:
            params = self.example_params(data["params"], (*path, "params"), spec)
        about: tuple[tuple[str, str], ...] = ()
        if EXAMPLE_ABOUT in data:
            about = self.about(data[EXAMPLE_ABOUT], (*path, EXAMPLE_ABOUT))
        return ExampleSpec(x, y, params, about)

    def about(self, value: object, path: FieldPath) -> tuple[tuple[str, str], ...]:
        """A one-line text, or a mapping from two-letter language codes to one each."""
        if isinstance(value, Mapping):
            if not value:
                raise self.error(path, "must be a text, or a mapping of language codes (en, "
                                       "zh) to texts, got an empty mapping")
            for language in value:
                if not (isinstance(language, str) and re.fullmatch(r"[a-z]{2}", language)):
                    raise self.error((*path, str(language)), "must be a two-letter language "
                                     "code such as en or zh")
            return tuple((language, self.about_text(text, (*path, language)))
                         for language, text in value.items())
        return (("", self.about_text(value, path)),)

    def about_text(self, value: object, path: FieldPath) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(path, "must be a non-empty text saying what the example is, got "
                                   f"{_describe(value)}")
        if len(value) > MAX_ABOUT or not value.isprintable():
            raise self.error(path, f"must be one line of at most {MAX_ABOUT} printable "
                                   "characters")
        return value.strip()

    def nested(self, value: object, path: FieldPath, shape: tuple[int, ...],
               key: str, why: str) -> tuple:
        """A matrix (a list of rows), or a tensor of more axes (lists nested as deep), of
        numbers of exactly ``shape``; ``why`` says where the shape comes from."""
        if len(shape) == 1:
            return self.numbers(value, path, shape[0], f"a row of {key}")
        if not isinstance(value, list | tuple) or len(value) != shape[0]:
            if len(shape) == 2:
                rows, cols = shape
                what = (f"a matrix of {rows} x {cols}: a list of {plural(rows, 'row')} of "
                        f"{plural(cols, 'number')} ({why})")
            else:
                what = (f"an array of {' x '.join(map(str, shape))}: lists nested "
                        f"{len(shape)} deep ({why})")
            raise self.error(path, f"must be {what}")
        return tuple(self.nested(item, (*path, i), shape[1:], key, why)
                     for i, item in enumerate(value))

    def example_params(
        self, data: object, path: FieldPath, spec: NetworkSpec
    ) -> tuple[tuple[str, tuple], ...]:
        # shapes from the op registry (docs/architecture.md, "Contracts"): W{l} is n_l x n_in, ...
        expected = spec.parameter_shapes()
        shape_names = spec.parameter_shape_names()
        names = ", ".join(expected)
        if not isinstance(data, Mapping):
            raise self.error(path, f"must be a mapping of {names}, got {_describe(data)}")
        for key in data:
            if key not in expected:
                raise self.error(
                    (*path, str(key)), f"unknown parameter {key!r}; expected exactly: {names}"
                )
        params = []
        for key, shape in expected.items():
            if key not in data:
                raise self.error((*path, key), f"missing; params must give all of: {names}")
            if len(shape) == 1:
                what = f"{key} has length {shape_names[key]}"
                params.append((key, self.numbers(data[key], (*path, key), shape[0], what)))
                continue
            params.append((key, self.nested(data[key], (*path, key), shape, key,
                                            f"{key} has shape {shape_names[key]}")))
        return tuple(params)

"""How hand-written backprop code takes its inputs and gives back its gradients.

Stage: check. Takes what the runner found out about the user's function (its parameters, the
globals it reads, the arrays of its object), the declared :class:`Convention` and one random
batch (:class:`Data`, derive's layout: rows of samples, W^l of shape (n_l, n_{l-1}));
gives the :class:`Trial` calls to make, one per convention still possible, and reads the
gradients out of what each call returned (:func:`readings`).

The conventions, each detected by shapes and trial calls unless a flag declares it:

- ``layout``: ``rows`` (X of shape (B, n), derive's and CS231n's), ``columns`` ((n, B),
  ``Z = W @ X + b``, deeplearning.ai's) or ``sample`` (one sample at a time as column
  vectors (n, 1), Nielsen's; the function is called on each sample of the batch and its
  gradients are averaged);
- ``weights``: ``out-in`` (n_l, n_{l-1}) or ``in-out`` (n_{l-1}, n_l);
- ``targets``: ``soft`` (probabilities that sum to 1, probabilities, or real values, as the
  loss allows), ``one-hot`` (0/1) or ``labels`` (integer classes, as ``probs[np.arange(N),
  y]`` needs); the reference always uses the targets the code was given;
- parameters: a dict (``params``, ``parameters``), lists (``weights``, ``biases``), separate
  arguments (``W1``, ``b1``, ...) or the arrays of an object (``--backward
  FILE:Class.method``: found by name and shape, W1/b1, W/b, weight/bias, weights[l]/biases[l];
  its gradients are read from what the method returns, or from ``grad``/``grads`` dicts
  beside the parameters, as PyTorch leaves them in ``.grad``);
- ``reduction``: the batch ``mean`` or ``sum`` (declared only: summing by mistake is a
  diagnosis).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from derive.errors import DeriveError

LAYOUTS = {"rows": "rows of samples, X (B, n)", "columns": "columns of samples, X (n, B)",
           "sample": "one sample at a time, column vectors (n, 1)"}
WEIGHTS = {"out-in": "weights (n_out, n_in)", "in-out": "weights (n_in, n_out)"}
TARGETS = {"soft": "soft targets", "one-hot": "one-hot targets",
           "labels": "integer class labels"}
#: The targets tried for each kind of target a loss needs, in order of preference.
TARGETS_FOR_LOSS = {"distribution": ("soft", "one-hot", "labels"),
                    "probability": ("soft", "one-hot"), None: ("soft",)}

_ROLE = re.compile(r"^(X|Y|B|params|weights|biases|cache|[WbZA]\d+)$")
ROLES = ("X, Y, B, params (a dict), weights, biases (lists), cache (a dict of A0..AL, "
         "Z1..ZL), W1.., b1.., A0..AL (the forward pass; A0 is X), Z1..ZL")


@dataclass(frozen=True)
class Convention:
    """How a user's backward function takes its inputs and returns gradients; ``None`` for
    ``layout``, ``weights`` and ``targets`` means "detect it" (see the module docstring).

    ``bias``: False when the code has no biases (the spec is checked with its biases dropped).
    ``args``/``globals_``: function parameter / module global name -> role (:data:`ROLES`;
    layers numbered from 1 as in derive). Parameters named X, x, inputs, Y, y, targets,
    labels, params, parameters, weights and biases, cache, W1, b1, ... and output/y_hat need
    no declaration. ``returns``: the roles of the returned values in order (``("dW1",
    "dW2")``, "_" for one to ignore); by default a dict keyed W1/dW1/..., or arrays in layer
    order (dW1, db1, dW2, ..., or the reverse, or all biases then all weights as Nielsen's
    (nabla_b, nabla_w)). ``factory``: for ``Class.method``, a function in the same file
    that builds the object (else the class is called with the spec's sizes).
    """

    weights: str | None = None
    reduction: str = "mean"
    bias: bool = True
    args: Mapping[str, str] = field(default_factory=dict)
    globals_: Mapping[str, str] = field(default_factory=dict)
    returns: tuple[str, ...] | None = None
    layout: str | None = None
    targets: str | None = None
    factory: str | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("weights", self.weights, WEIGHTS),
                                     ("layout", self.layout, LAYOUTS),
                                     ("targets", self.targets, TARGETS),
                                     ("reduction", self.reduction, ("mean", "sum"))):
            if value is not None and value not in allowed:
                raise DeriveError(f"{name} must be {' or '.join(allowed)}, not {value!r}")
        for name, role in {**self.args, **self.globals_}.items():
            if not _ROLE.match(role):
                raise DeriveError(f"{name}={role}: unknown role {role!r}; roles are {ROLES}")

    def describe(self) -> str:
        """A resolved convention in words."""
        parts = [LAYOUTS[self.layout], WEIGHTS[self.weights], TARGETS[self.targets]]
        if self.layout != "sample":
            parts.append(f"batch {self.reduction}")
        parts.append("with biases" if self.bias else "no biases")
        return ", ".join(parts)


@dataclass(frozen=True)
class Data:
    """One random batch in derive's layout: ``params`` (W^l (n_l, n_{l-1}), b^l (n_l,)),
    ``X`` (B, n_0), ``targets`` by kind ((B, n_L); "labels" (B,) integers, whose one-hot
    rows are the "one-hot" targets) and the forward pass (``A0``..``AL``, ``Z1``..``ZL``)."""

    params: Mapping[str, np.ndarray]
    X: np.ndarray
    targets: Mapping[str, np.ndarray]
    forward: Mapping[str, np.ndarray]
    depth: int

    @property
    def batch(self) -> int:
        return self.X.shape[0]


@dataclass(frozen=True)
class Trial:
    """One way of calling the user's code: ``convention`` resolved, the ``request`` for the
    runner (calls, object arrays to set, globals to delete), the parameters' shapes in the
    user's layout, where each parameter sits in the object (``at``), and notes."""

    convention: Convention
    request: dict
    shapes: Mapping[str, tuple[int, ...]]
    at: Mapping[str, tuple] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# --- building the trials -----------------------------------------------------------------


def trials(probe: Mapping[str, Any], convention: Convention, data: Data, needs: str | None,
           label: str) -> list[Trial]:
    """Every convention still possible after the declared ones and the object's shapes, in
    order of preference, as calls to make."""
    found = object_parameters(probe, data, label) if "arrays" in probe else None
    layouts = [convention.layout] if convention.layout else list(LAYOUTS)
    weights = [convention.weights] if convention.weights else list(WEIGHTS)
    if found is not None:
        layouts = [x for x in layouts if x in found.layouts] or layouts
        weights = [x for x in weights if x in found.weights] or weights
    targets = [convention.targets] if convention.targets else list(TARGETS_FOR_LOSS[needs])
    out = []
    for layout, weight, target in itertools.product(layouts, weights, targets):
        resolved = replace(convention, layout=layout, weights=weight, targets=target)
        out.append(_trial(probe, resolved, data, found, label))
    return out


def _trial(probe: Mapping[str, Any], c: Convention, data: Data,
           found: ObjectParameters | None, label: str) -> Trial:
    def value(role: str, sample: int) -> Any:
        return _role_value(role, c, data, sample)

    parameters = probe["parameters"]
    names = {name for name, _, _ in parameters}
    positional: list[str] = []
    keywords: list[str] = []
    for name, kind, has_default in parameters:
        if kind in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            continue
        role = c.args.get(name) or _default_role(name, names, data.depth)
        if role is None:
            if has_default:
                continue
            raise DeriveError(
                f"{label}: don't know what to pass for parameter {name!r}; declare it with "
                f"--arg {name}=ROLE (roles: {ROLES}; layers numbered from 1 as in derive)")
        (keywords if kind == "KEYWORD_ONLY" else positional).append(f"{name}={role}")
    notes: list[str] = []
    delete: list[str] = []
    global_roles = dict(c.globals_)
    function = label.rpartition(":")[2]
    for name, kind in probe["globals"].items():
        if name in c.globals_:
            notes.append(f"module global {name} set to {c.globals_[name]} (--global)")
            continue
        role = _param_global(name, data.depth)
        if role is not None:
            global_roles[name] = role
            notes.append(f"{function} reads the module global {name}; derive sets it to the "
                         f"random {role}")
        elif kind == "arrays":
            delete.append(name)
    if delete:
        notes.append(f"module globals removed for the call (not declared): {', '.join(delete)}")
    samples = range(data.batch) if c.layout == "sample" else (None,)
    calls = [{"args": [value(p.partition("=")[2], i) for p in positional],
              "kwargs": {p.partition("=")[0]: value(p.partition("=")[2], i) for p in keywords},
              "globals": {name: value(role, i) for name, role in global_roles.items()}}
             for i in samples]
    request = {"calls": calls, "delete": delete, "set": []}
    if found is None:
        shapes = {key: _user_param(key, v, c).shape for key, v in data.params.items()}
        return Trial(c, request, shapes, notes=tuple(notes))
    request["set"] = [(found.at[key], _user_param(key, v, c).reshape(found.shapes[key]))
                      for key, v in data.params.items()]
    return Trial(c, request, found.shapes, found.at, tuple(notes))


def _default_role(name: str, names: set[str], depth: int) -> str | None:
    lowered = name.lower()
    if lowered in ("x", "inputs", "input", "x_batch", "xb", "features"):
        return "X"
    if lowered in ("y", "targets", "target", "labels", "y_true", "yb", "t", "y_batch"):
        return "Y"
    if lowered in ("params", "parameters", "theta"):
        return "params"
    if lowered == "weights":
        return "weights" if "biases" in names else "params"
    if lowered in ("biases", "cache"):
        return lowered
    if lowered in ("output", "out", "y_hat", "yhat", "y_pred", "pred", "predictions", "al"):
        return f"A{depth}"
    match = re.fullmatch(r"([wb])(\d+)", lowered)
    if match and 1 <= int(match.group(2)) <= depth:
        return ("W" if match.group(1) == "w" else "b") + match.group(2)
    return None


def _param_global(name: str, depth: int) -> str | None:
    """A module global the function reads that derive sets by default: W1, b1, ..., params."""
    match = re.fullmatch(r"([Wwb])(\d+)", name)
    if match and 1 <= int(match.group(2)) <= depth:
        return ("W" if match.group(1) in "Ww" else "b") + match.group(2)
    if name in ("params", "parameters"):
        return "params"
    return None


def _arrange(rows: np.ndarray, layout: str, sample: int | None) -> np.ndarray:
    """A batch (rows of samples) in ``layout``; one sample as a column for "sample"."""
    if layout == "rows":
        return rows.copy()
    if layout == "columns":
        return rows.T.copy()
    return rows[sample][:, None].copy()


def _user_param(key: str, value: np.ndarray, c: Convention) -> np.ndarray:
    if key.startswith("W"):
        return value.copy() if c.weights == "out-in" else value.T.copy()
    return value.copy() if c.layout == "rows" else value[:, None].copy()


def _role_value(role: str, c: Convention, data: Data, sample: int | None) -> Any:
    if role == "X":
        return _arrange(data.X, c.layout, sample)
    if role == "Y":
        if c.targets == "labels":
            labels = data.targets["labels"]
            return int(labels[sample]) if c.layout == "sample" else labels.copy()
        return _arrange(data.targets[c.targets], c.layout, sample)
    if role == "B":
        return 1 if c.layout == "sample" else data.batch
    if role == "params":
        return {key: _user_param(key, v, c) for key, v in data.params.items()}
    if role in ("weights", "biases"):
        letter = role[0].upper() if role == "weights" else "b"
        return [_user_param(key, v, c) for key, v in data.params.items()
                if key.startswith(letter)]
    if role == "cache":
        cache = {"X": _arrange(data.X, c.layout, sample)}
        cache.update((key, _arrange(v, c.layout, sample)) for key, v in data.forward.items())
        return cache
    if role[0] in "Wb":
        if role not in data.params:
            raise DeriveError(f"role {role}: this network has {', '.join(data.params)} "
                              f"(biases: {c.bias})")
        return _user_param(role, data.params[role], c)
    if role in data.forward:
        return _arrange(data.forward[role], c.layout, sample)
    raise DeriveError(f"role {role}: layers are 1..{data.depth} (A0 is the input)")


# --- an object's parameters --------------------------------------------------------------

_WEIGHT_NAME = re.compile(r"(?i)(?:w|weights?|kernel)_?(\d*)")
_BIAS_NAME = re.compile(r"(?i)(?:b|bias|biases)_?(\d*)")
#: Containers whose arrays are not parameters (gradients, caches, optimizer state)
_NOT_PARAMETERS = re.compile(r"(?i)grad|nabla|cache|velocity|moment|adam|optim|^d[wb]_?\d*$")
#: Where a parameter's gradient is looked for beside it: ``grads["W1"]`` for ``params["W1"]``
GRADIENT_CONTAINERS = ("grad", "grads", "gradients")


@dataclass(frozen=True)
class ObjectParameters:
    """Where an object keeps each parameter (``at``: a path) and its shape, and the
    layouts and weight layouts its shapes allow."""

    at: Mapping[str, tuple]
    shapes: Mapping[str, tuple[int, ...]]
    layouts: frozenset[str]
    weights: frozenset[str]


def object_parameters(probe: Mapping[str, Any], data: Data, label: str) -> ObjectParameters:
    """The spec's parameters among the object's arrays, by name (W1, W, weight, weights[0],
    ... and b1, b, bias, biases[0], ...) and then by order and shape."""
    owner = label.rpartition(":")[2].rpartition(".")[0]
    found: dict[str, list[tuple[int | None, tuple, tuple[int, ...]]]] = {"W": [], "b": []}
    for path, shape in probe["arrays"]:
        names = [str(step) for _, step in path if isinstance(step, str)]
        if not names or any(_NOT_PARAMETERS.search(name) for name in names):
            continue
        for kind, pattern in (("W", _WEIGHT_NAME), ("b", _BIAS_NAME)):
            match = pattern.fullmatch(names[-1])
            if match:
                found[kind].append((int(match.group(1)) if match.group(1) else None, path,
                                    tuple(shape)))
    keys = {kind: [k for k in data.params if k.startswith(kind)] for kind in found}
    if any(len(found[kind]) != len(keys[kind]) for kind in found):
        seen = "; ".join(f"{kind}: {', '.join(show_path(p) for _, p, _ in found[kind])}"
                         for kind in found if found[kind]) or "none"
        raise DeriveError(
            f"cannot find the network's {len(keys['W'])} weight and {len(keys['b'])} bias "
            f"arrays in the {owner} object (found {seen}); derive looks for attributes or "
            "dict keys named W1/b1, W/b, weight/bias and lists weights/biases; or give "
            "--factory NAME, a function in the file that builds the object")
    at: dict[str, tuple] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    layouts, weights = set(LAYOUTS), set(WEIGHTS)
    for kind, entries in found.items():
        numbers = [n for n, _, _ in entries]
        if None not in numbers and len(set(numbers)) == len(numbers):
            entries = sorted(entries, key=lambda e: e[0])
        for key, (_, path, shape) in zip(keys[kind], entries):
            at[key], shapes[key] = path, shape
            expected = data.params[key].shape
            if kind == "W":
                fits = {w for w, s in (("out-in", expected), ("in-out", expected[::-1]))
                        if shape == s}
                weights &= fits
            else:
                fits = int(np.prod(shape)) == expected[0]
                if fits and expected[0] > 1:
                    # a bias (n, 1) is added to columns, (n,) or (1, n) to rows
                    column = len(shape) == 2 and shape[1] == 1
                    layouts &= {"columns", "sample"} if column else {"rows"}
            if not fits:
                raise DeriveError(f"{owner}{show_path(path)} has shape {shape}; the spec's "
                                  f"{key} has {expected} (or its transpose)")
    if not weights:
        raise DeriveError(f"the weights of {owner} mix the layouts (n_out, n_in) and "
                          "(n_in, n_out)")
    return ObjectParameters(at, shapes, frozenset(layouts), frozenset(weights))


def show_path(path: Sequence[tuple[str, Any]]) -> str:
    """``.layers[0].params['weight']``."""
    return "".join(f".{step}" if kind == "attr" else f"[{step!r}]" for kind, step in path)


def gradient_paths(path: tuple) -> list[tuple]:
    """Where the gradient of the parameter at ``path`` may be left: ``grads["W1"]`` (or
    ``grad``, ``gradients``; key ``dW1`` too) beside ``params["W1"]``, ``dW1`` or
    ``grad_W1`` beside an attribute ``W1``."""
    *head, (kind, key) = path
    if kind == "attr":
        out = [(*head, ("attr", name)) for name in (f"d{key}", f"grad_{key}", f"{key}_grad")]
        return out + [(*head, ("attr", g), ("item", key)) for g in GRADIENT_CONTAINERS]
    *outer, (container_kind, _) = head
    keys = [key, f"d{key}"] if isinstance(key, str) else [key]
    return [(*outer, (container_kind, g), ("item", k)) for g in GRADIENT_CONTAINERS
            for k in keys]


# --- reading the gradients ---------------------------------------------------------------


class Unreadable(Exception):
    """What came back holds no gradients that can be read (the message says what it was)."""


@dataclass(frozen=True)
class Reading:
    """Gradients read from a trial's calls (user layout, averaged over the calls of the
    "sample" layout; a key is missing when not found) and a note on how they were read."""

    grads: Mapping[str, Any]
    note: str = ""


def readings(trial: Trial, calls: Sequence[Mapping[str, Any]]) -> list[Reading]:
    """Every reading of the returned values that fits the parameters' shapes (several when
    the shapes cannot tell, e.g. square layers returned in an unknown order); at least one."""
    keys = list(trial.shapes)
    options = _paths(trial, calls[0], keys)
    out = []
    for paths, note in options:
        grads: dict[str, Any] = {}
        for key, path in paths.items():
            values = [_at(call, path) for call in calls]
            if any(v is _MISSING for v in values):
                continue
            try:
                grads[key] = np.mean(np.asarray(values, dtype=float), axis=0)
            except (TypeError, ValueError):
                grads[key] = values[0]
        out.append(Reading(grads, note))
    return out


_MISSING = object()


def _at(call: Mapping[str, Any], path: tuple) -> Any:
    where, *steps = path
    if where == "state":
        return dict(call["state"]).get(tuple(steps), _MISSING)
    value = call["returned"]
    for step in steps:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return value


def _leaves(value: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, array) of every array in a returned value, in order."""
    if isinstance(value, np.ndarray):
        return [(path, value)] if value.ndim else []
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(value, (list, tuple)):
        return [leaf for n, v in enumerate(value) for leaf in _leaves(v, (*path, n))]
    return []


def _paths(trial: Trial, call: Mapping[str, Any], keys: list[str]
           ) -> list[tuple[dict[str, tuple], str]]:
    """(key -> path, note) options for reading the gradients out of one call's result."""
    returned = call["returned"]
    names = ", ".join(f"d{k}" for k in keys)
    roles = trial.convention.returns
    if roles is not None:
        values = list(returned) if isinstance(returned, (tuple, list)) else [returned]
        if len(values) != len(roles):
            raise Unreadable(f"returned {len(values)} values, --returns names {len(roles)}")
        single = not isinstance(returned, (tuple, list))
        return [({gradient_key(role, keys, strict=True): ("returned",) if single else
                  ("returned", n) for n, role in enumerate(roles) if role != "_"}, "")]
    leaves = _leaves(returned)
    keyed = {}
    for path, _ in leaves:
        key = gradient_key(path[-1], keys) if path and isinstance(path[-1], str) else None
        if key is not None:
            keyed[key] = ("returned", *path)
    if keyed:
        return [(keyed, "")]
    if not leaves and trial.at:
        state = dict(call["state"])
        paths = {}
        for key in keys:
            for candidate in gradient_paths(trial.at[key]):
                if candidate in state:
                    paths[key] = ("state", *candidate)
                    break
        if paths:
            return [(paths, "gradients read from the object's grad dicts")]
        raise Unreadable(f"returned {_kind(returned)} and left no gradients beside the "
                         "parameters (in grad/grads dicts)")
    if not leaves:
        raise Unreadable(f"returned {_kind(returned)}; expected the gradients as a tuple "
                         f"({names}) or a dict")
    if len(leaves) != len(keys):
        raise Unreadable(f"returned {len(leaves)} arrays; expected {len(keys)} ({names}); "
                         "declare the order with --returns")
    options = []
    for order, note in _orders(keys):
        paths = {key: ("returned", *path) for key, (path, _) in zip(order, leaves)}
        if all(_fits(value, trial.shapes[key]) for key, (_, value) in zip(order, leaves)):
            options.append((paths, note))
    first = {key: ("returned", *path) for key, (path, _) in zip(keys, leaves)}
    return options or [(first, "")]


def _orders(keys: list[str]) -> list[tuple[list[str], str]]:
    layers = sorted({int(k[1:]) for k in keys})
    weights = [k for k in keys if k.startswith("W")]
    biases = [k for k in keys if k.startswith("b")]
    candidates = [
        (keys, ""),
        ([k for l in reversed(layers) for k in keys if int(k[1:]) == l],
         "the gradients are returned output layer first"),
        (biases + weights, "the gradients are returned biases first, then weights"),
        (weights + biases, "the gradients are returned weights first, then biases"),
    ]
    out: list[tuple[list[str], str]] = []
    for order, note in candidates:
        if order not in [o for o, _ in out]:
            out.append((order, note))
    return out


def _fits(value: Any, shape: tuple[int, ...]) -> bool:
    return np.shape(value) == shape or (len(shape) <= 2 and min(shape, default=1) == 1
                                        and np.size(value) == int(np.prod(shape)))


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return value.strip("<>")
    return type(value).__name__


def gradient_key(name: str, keys: Sequence[str], strict: bool = False) -> str | None:
    """``dW1``, ``W1``, ``db2`` -> the parameter key (W1, b2), or None."""
    match = re.fullmatch(r"d?([WwBb])(\d+)", name)
    key = ("W" if match.group(1) in "Ww" else "b") + match.group(2) if match else None
    if key in keys:
        return key
    if strict:
        raise DeriveError(f"--returns: {name!r} is not one of "
                          f"{', '.join('d' + k for k in keys)} or _")
    return None

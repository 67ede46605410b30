"""Stage 5, training: the data a generated module trains on, loaded and checked against it.

Takes a data source named on the command line (``digits``, ``xor``, a ``.npz`` or a ``.csv``
file) and the :class:`Task` of a generated module (its input and output shapes and what its
output means); gives a :class:`Dataset` whose X and Y have the module's batch-first shapes, or
raises a :class:`~derive.errors.DeriveError` naming the file, what is wrong and what is expected.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from derive.errors import DeriveError
from derive.words import plural

#: Built-in data sets, for ``--help`` and error messages.
BUILTIN_DATA = ("digits", "xor", "demo")
#: Fewest rows a data set may have (the XOR table has four).
MIN_ROWS = 4


@dataclass(frozen=True)
class Task:
    """What a generated module learns: per-sample shapes and the kind of its output.

    ``kind`` is ``"classes"`` (a softmax output or cross-entropy: one-hot targets, accuracy by
    argmax), ``"binary"`` (a sigmoid output or binary cross-entropy: targets in [0, 1],
    accuracy by > 0.5) or ``"regression"`` (no accuracy).
    """

    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kind: str

    @classmethod
    def of(cls, module: ModuleType, name: str) -> Task:
        """The task of a generated module (Contract 2's constants)."""
        output_activation = module.ACTIVATIONS[-1] if module.ACTIVATIONS else None
        if output_activation == "softmax" or module.LOSS == "cross_entropy":
            kind = "classes"
        elif output_activation == "sigmoid" or module.LOSS == "binary_cross_entropy":
            kind = "binary"
        else:
            kind = "regression"
        return cls(name, tuple(module.INPUT_SHAPE), tuple(module.OUTPUT_SHAPE), kind)

    @property
    def n_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.output_shape)

    @property
    def takes_labels(self) -> bool:
        """Whether integer class labels may stand for one-hot rows."""
        return self.kind == "classes" and len(self.output_shape) == 1 and self.n_out > 1

    @staticmethod
    def shape_text(shape: tuple[int, ...], noun: str) -> str:
        """A per-sample shape in words: "10 inputs", "20 steps of 2 inputs" (a sequence,
        (T, n)), "1x8x8 input" (an image)."""
        if len(shape) == 2:
            return f"{plural(shape[0], 'step')} of {plural(shape[1], noun)}"
        if len(shape) > 2:
            return f"{'x'.join(map(str, shape))} {noun}"
        return plural(shape[0], noun)

    def describe(self) -> str:
        kind = {"classes": "softmax ", "binary": "sigmoid ", "regression": ""}[self.kind]
        if len(self.input_shape) > 1 or len(self.output_shape) > 1:   # a sequence, an image
            return (f"spec {self.name!r} has an input of shape {list(self.input_shape)} and "
                    f"{kind}outputs of shape {list(self.output_shape)}")
        outputs = plural(self.n_out, f"{kind}output")
        return f"spec {self.name!r} has an input of {self.n_in} and {outputs}"


@dataclass(frozen=True)
class Dataset:
    """Rows of inputs X and targets Y, batch first, float64; ``source`` names where from."""

    source: str
    X: np.ndarray
    Y: np.ndarray

    def __len__(self) -> int:
        return len(self.X)


def load_data(source: str, task: Task, module: ModuleType | None = None) -> Dataset:
    """Load ``source`` (``digits``, ``xor``, ``demo``: the generated ``module``'s own demo
    data, ``PATH.npz`` or ``PATH.csv``) for ``task``."""
    if source == "demo":
        if module is None or not hasattr(module, "demo_data"):
            raise DeriveError("the demo data comes from a generated module", field="--data demo")
        X, Y = module.demo_data()
    elif source == "digits":
        X, Y = _digits(task)
    elif source == "xor":
        X, Y = _xor(task)
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix not in (".npz", ".csv"):
            builtins = " or ".join(BUILTIN_DATA)
            if suffix:
                raise DeriveError(f"unsupported file type {suffix!r}; expected a .npz or .csv "
                                  f"file (or {builtins})", source=source)
            raise DeriveError(f"unknown data {source!r}: expected {builtins}, or a file ending "
                              "in .npz or .csv", field="--data")
        if not path.is_file():
            what = "no such file" if not path.exists() else "not a file"
            raise DeriveError(f"{what}; expected a .npz or .csv data file", source=source)
        X, Y = _npz(path, task) if suffix == ".npz" else _csv(path, task)
    return _checked(source, X, Y, task)


# --- built-in data -------------------------------------------------------------------------


def _digits(task: Task) -> tuple[np.ndarray, np.ndarray]:
    if task.input_shape not in ((64,), (1, 8, 8)) or task.n_out != 10 or \
            task.kind != "classes":
        raise DeriveError("the 8x8 digit images need a spec with an input of 64 or [1, 8, 8] "
                          "and 10 softmax outputs (like `derive train digits` or `derive train "
                          f"digits_cnn`); {task.describe()}",
                          field="--data digits")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DeriveError("the digits data comes with scikit-learn: pip install scikit-learn "
                          "(or pip install 'backprop-derive[data]')",
                          field="--data digits") from None
    digits = load_digits()  # bundled with scikit-learn: no download
    X = digits.data.astype(np.float64) / 16.0  # pixel intensities 0..16 -> [0, 1]
    # a vector of 64, or the 1x8x8 image (C, H, W) a convolutional network reads
    return X.reshape((len(X), *task.input_shape)), _one_hot(digits.target, 10)


def _xor(task: Task) -> tuple[np.ndarray, np.ndarray]:
    if task.n_in != 2 or task.n_out != 1 or task.kind == "classes":
        raise DeriveError("the XOR table needs a spec with an input of 2 and 1 output "
                          f"(like `derive train xor`); {task.describe()}", field="--data xor")
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    return X, np.array([[0.0], [1.0], [1.0], [0.0]])


# --- files -----------------------------------------------------------------------------------


def _npz(path: Path, task: Task) -> tuple[np.ndarray, np.ndarray]:
    source = str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DeriveError(f"not a readable .npz file ({_reason(err)}); expected arrays X and Y "
                          "written by numpy.savez", source=source) from None
    if "X" not in arrays:
        raise DeriveError(f"no array 'X' (found {_names(arrays)}); expected arrays X and Y "
                          "(or y: integer class labels)", source=source)
    key = "Y" if "Y" in arrays else "y" if "y" in arrays else None
    if key is None:
        raise DeriveError(f"no array 'Y' or 'y' (found {_names(arrays)}); expected the "
                          "targets as Y (or y: integer class labels)", source=source)
    X, Y = arrays["X"], arrays[key]
    for name, array in (("X", X), (key, Y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DeriveError(f"array {name} is not numeric (dtype {array.dtype})",
                              source=source)
    if X.ndim == 0 or Y.ndim == 0:
        raise DeriveError("X and Y must have a row per sample (found a scalar)", source=source)
    if len(X) != len(Y):
        raise DeriveError(f"X has {len(X)} rows but {key} has {len(Y)}; expected one target "
                          "row per input row", source=source)
    X = _rows(X, task.input_shape, source, "X", task.shape_text(task.input_shape, "feature"))
    if task.takes_labels and (Y.ndim == 1 or (Y.ndim == 2 and Y.shape[1] == 1)):
        if not (np.issubdtype(Y.dtype, np.integer) or _integral(Y)):
            raise DeriveError(f"array {key} holds one value per row but not integer class "
                              f"labels; expected labels 0..{task.n_out - 1} or one-hot rows "
                              f"of {task.n_out}", source=source)
        return X, _labels(Y.reshape(-1), task, source)
    Y = _rows(Y, task.output_shape, source, key, task.shape_text(task.output_shape, "target"))
    return X, Y


def _rows(array: np.ndarray, shape: tuple[int, ...], source: str, name: str,
          expected: str) -> np.ndarray:
    """``array`` as (rows,) + shape: flat rows or the full per-sample shape are both fine."""
    width = math.prod(array.shape[1:])
    if array.shape[1:] != shape and (array.ndim != 2 or width != math.prod(shape)):
        flat = f"(rows, {math.prod(shape)})"
        full = f"(rows, {', '.join(map(str, shape))}) or flat {flat}" if len(shape) > 1 else flat
        raise DeriveError(f"array {name} has shape {array.shape}; expected {full} — {expected}",
                          source=source)
    return np.asarray(array, dtype=np.float64).reshape((len(array), *shape))


def _csv(path: Path, task: Task) -> tuple[np.ndarray, np.ndarray]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DeriveError("not a text file; expected numeric comma-separated values",
                          source=source) from None
    except OSError as err:
        raise DeriveError(f"cannot read ({_reason(err)})", source=source) from None
    rows: list[list[float]] = []
    width = None
    for line_number, fields in enumerate(csv.reader(text.splitlines()), start=1):
        if not fields or all(not field.strip() for field in fields):
            continue
        values = [_number(field) for field in fields]
        if None in values:
            if not rows and width is None:  # the first non-empty row may be a header
                width = len(fields)
                continue
            column = values.index(None) + 1
            raise DeriveError(f"column {column} is {fields[column - 1].strip()!r}, not a "
                              "number; expected numeric comma-separated values (a header "
                              "row only first)", source=source, line=line_number)
        if width is not None and len(values) != width:
            raise DeriveError(f"{len(values)} columns, but the rows above have {width}; "
                              "expected the same number of columns in every row",
                              source=source, line=line_number)
        width = len(values)
        rows.append(values)  # type: ignore[arg-type]
    if not rows:
        raise DeriveError("no data rows; expected numeric comma-separated values, features "
                          "then targets", source=source)
    table = np.array(rows, dtype=np.float64)
    n_in, n_out = task.n_in, task.n_out
    if width == n_in + n_out:
        X, Y = table[:, :n_in], table[:, n_in:]
        return X.reshape((len(X), *task.input_shape)), Y.reshape((len(Y), *task.output_shape))
    if task.takes_labels and width == n_in + 1:
        labels = table[:, n_in]
        if not _integral(labels):
            raise DeriveError(f"the last column is not integer class labels; expected labels "
                              f"0..{n_out - 1} (or {n_out} one-hot columns)", source=source)
        return table[:, :n_in].reshape((len(table), *task.input_shape)), \
            _labels(labels, task, source)
    expected = f"{n_in} feature columns + {n_out} target columns = {n_in + n_out}"
    if task.takes_labels:
        expected += f", or {n_in} + 1 integer class label = {n_in + 1}"
    raise DeriveError(f"{width} columns; {task.describe()}, so expected {expected}",
                      source=source)


def _number(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:
        return None


# --- checks ----------------------------------------------------------------------------------


def _labels(labels: np.ndarray, task: Task, source: str) -> np.ndarray:
    bad = (labels < 0) | (labels >= task.n_out)
    if np.any(bad):
        raise DeriveError(f"class label {labels[bad][0]:g} is out of range; expected labels "
                          f"0..{task.n_out - 1} for {task.n_out} softmax outputs", source=source)
    return _one_hot(labels.astype(np.int64), task.n_out)


def _one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[labels]


def _integral(values: np.ndarray) -> bool:
    values = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))


def _checked(source: str, X: np.ndarray, Y: np.ndarray, task: Task) -> Dataset:
    if len(X) < MIN_ROWS:
        raise DeriveError(f"{len(X)} rows; at least {MIN_ROWS} are needed", source=source)
    for name, array in (("inputs", X), ("targets", Y)):
        finite = np.isfinite(array)
        if not finite.all():
            row = int(np.argwhere(~finite)[0][0]) + 1
            raise DeriveError(f"data row {row}: the {name} hold NaN or infinity; expected "
                              "finite numbers", source=source)
    if task.kind == "classes":
        sums = Y.sum(axis=-1)
        if np.any(Y < 0) or not np.allclose(sums, 1.0, atol=1e-6):
            row = int(np.argwhere(~np.isclose(sums, 1.0, atol=1e-6) | np.any(Y < 0, axis=-1))
                      .reshape(-1)[0]) + 1
            raise DeriveError(f"data row {row}: the targets are not one-hot (or a "
                              f"distribution summing to 1); expected that for {task.n_out} "
                              "softmax outputs, or integer class labels", source=source)
    elif task.kind == "binary" and (np.any(Y < 0) or np.any(Y > 1)):
        raise DeriveError("targets outside [0, 1]; expected 0/1 (or probabilities) for a "
                          "sigmoid output", source=source)
    return Dataset(source, np.ascontiguousarray(X), np.ascontiguousarray(Y))


def _names(arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(sorted(arrays)) or "none"


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__

"""Stage 5, training: a training run of a generated module on a :class:`Dataset`.

Takes a loaded generated module (Contract 2), its :class:`Task` and data; splits the data into
train, validation and test rows by seed, trains one epoch at a time through the module's own
``train``, records loss and accuracy of every epoch, stops early on the validation loss when
asked (restoring the best parameters), and gives a :class:`TrainResult`. :func:`plot_history`
draws the record with matplotlib. Nothing here computes a gradient: the module does.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from derive.errors import DeriveError
from derive.files import write_generated
from derive.train.data import Dataset, Task

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class Split:
    """Which rows of a data set train, validate and test."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_rows(count: int, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """A random split of ``count`` rows by ``seed``: test rows first, then validation rows."""
    for name, fraction in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise DeriveError(f"{name} is {fraction:g}; expected a fraction in [0, 1)")
    n_test = round(count * test_fraction)
    n_val = round(count * val_fraction)
    # a fraction above zero always gets a row, and training keeps at least two
    n_test = max(n_test, 1) if test_fraction > 0 else 0
    n_val = max(n_val, 1) if val_fraction > 0 else 0
    if count - n_test - n_val < 2:
        raise DeriveError(f"{count} rows leave {count - n_test - n_val} for training after "
                          f"{n_val} validation and {n_test} test rows; expected at least 2 "
                          "(lower --val-fraction or --test-fraction, or give more data)")
    order = np.random.default_rng(seed).permutation(count)
    return Split(train=np.sort(order[n_test + n_val:]),
                 validation=np.sort(order[n_test:n_test + n_val]),
                 test=np.sort(order[:n_test]))


@dataclass(frozen=True)
class Settings:
    """How to train: the arguments of the module's ``train`` and of early stopping."""

    epochs: int
    lr: float
    batch_size: int | None
    optimizer: str = "sgd"
    patience: int | None = None
    seed: int = 0
    clip: float | None = None       # the gradient norm's cap (train's clip=)


@dataclass(frozen=True)
class Metrics:
    """Loss (the module's batch cost) and accuracy (None for regression) on some rows."""

    loss: float
    accuracy: float | None


@dataclass(frozen=True)
class Epoch:
    number: int
    train: Metrics
    validation: Metrics | None


@dataclass(frozen=True)
class TrainResult:
    """Every epoch's record, the epoch whose parameters were kept, and the final metrics."""

    history: tuple[Epoch, ...]
    best_epoch: int
    stopped_early: bool
    params: dict[str, np.ndarray]
    train: Metrics
    validation: Metrics | None
    test: Metrics | None


def default_lr(module: ModuleType, optimizer: str) -> float:
    """The learning rate when none is given: the module's demo rate for its demo optimizer
    (DEMO_OPTIMIZER) and for SGD; for momentum (0.9) a tenth of it, the same step size in
    steady state; for Adam, unless it is the demo's, PyTorch's default."""
    if optimizer == module.DEMO_OPTIMIZER:
        return module.DEMO_LR
    return {"sgd": module.DEMO_LR, "momentum": module.DEMO_LR / 10, "adam": 1e-3}[optimizer]


def evaluate(module: ModuleType, task: Task, params: dict[str, np.ndarray], X: np.ndarray,
             Y: np.ndarray) -> Metrics:
    """The module's loss on (X, Y), and its accuracy for classification."""
    value = float(module.loss(params, X, Y))
    if task.kind == "regression":
        return Metrics(value, None)
    output, _ = module.forward(params, X)
    if task.kind == "classes":
        right = np.argmax(output, axis=-1) == np.argmax(Y, axis=-1)
    else:
        right = (output > 0.5) == (Y > 0.5)
    return Metrics(value, float(np.mean(right)))


def train_run(module: ModuleType, task: Task, data: Dataset, split: Split,
              settings: Settings,
              progress: Callable[[Epoch, Settings], None] | None = None) -> TrainResult:
    """Train a fresh ``init_params(seed)`` on the split's training rows, epoch by epoch."""
    extra = check_settings(module, split, settings)
    X_train, Y_train = data.X[split.train], data.Y[split.train]
    X_val, Y_val = data.X[split.validation], data.Y[split.validation]
    params = module.init_params(seed=settings.seed)
    history: list[Epoch] = []
    best = {"epoch": 0, "loss": np.inf, "params": _copy(params)}

    def after_epoch(number: int, _loss: float, params: dict[str, np.ndarray]) -> bool:
        """Record the epoch, report it, and say whether to stop (early stopping)."""
        record = Epoch(number, evaluate(module, task, params, X_train, Y_train),
                       evaluate(module, task, params, X_val, Y_val) if len(X_val) else None)
        history.append(record)
        if progress is not None:
            progress(record, settings)
        watched = record.validation.loss if record.validation else record.train.loss
        if not np.isfinite(watched):
            raise DeriveError(f"the loss diverged at epoch {number} (lr {settings.lr:g}); "
                              "expected a smaller --lr")
        if watched < best["loss"]:
            best.update(epoch=number, loss=watched, params=_copy(params))
            return False
        return settings.patience is not None and number - best["epoch"] >= settings.patience

    with np.errstate(all="ignore"):
        # one call: the optimizer's state (momentum, Adam's moments) lives through all epochs
        module.train(params, X_train, Y_train, settings.epochs, settings.lr,
                     batch_size=settings.batch_size, seed=settings.seed, callback=after_epoch,
                     **extra)
        stopped_early = len(history) < settings.epochs
        best_epoch = best["epoch"]
        if settings.patience is not None:
            params = best["params"]
        else:
            best_epoch = len(history)

        def on(rows: np.ndarray) -> Metrics | None:
            return evaluate(module, task, params, data.X[rows], data.Y[rows]) if len(rows) \
                else None

        return TrainResult(tuple(history), best_epoch, stopped_early, params,
                           on(split.train), on(split.validation), on(split.test))


def check_settings(module: ModuleType, split: Split, settings: Settings) -> dict[str, str]:
    """Raise if ``settings`` cannot run; else the extra arguments of the module's ``train``."""
    if settings.patience is not None and len(split.validation) == 0:
        raise DeriveError("--early-stopping watches the validation loss; expected "
                          "--val-fraction above 0")
    optimizer = settings.optimizer
    if optimizer not in OPTIMIZERS:
        raise DeriveError(f"unknown optimizer {optimizer!r}; expected one of "
                          f"{', '.join(OPTIMIZERS)}", field="--optimizer")
    if settings.clip is not None and not (settings.clip > 0 and np.isfinite(settings.clip)):
        raise DeriveError(f"must be a number > 0, got {settings.clip!r}", field="--clip")
    return {"optimizer": optimizer, **({"clip": settings.clip} if settings.clip else {})}


def _copy(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value.copy() for key, value in params.items()}


# --- the plot ------------------------------------------------------------------------------------


def require_matplotlib(path: str | Path) -> None:
    """Raise a one-line error when matplotlib is missing or ``path``'s folder does not exist
    (checked before training, so that a run that cannot plot writes nothing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DeriveError("the plot needs matplotlib: pip install matplotlib (or pip install "
                          "'backprop-derive[plot]')", field="--plot") from None
    folder = Path(path).parent
    if not folder.is_dir():
        raise DeriveError(f"output folder {str(folder)!r} does not exist", field="--plot")


def plot_history(result: TrainResult, task: Task, title: str, path: str | Path) -> Path:
    """Draw loss (and accuracy) per epoch, train and validation, into a PNG at ``path``."""
    require_matplotlib(path)
    from matplotlib.figure import Figure  # object-oriented: no pyplot state, no GUI backend

    target = Path(path)
    epochs = [record.number for record in result.history]
    panels = [("loss", lambda m: m.loss)]
    if task.kind != "regression":
        panels.append(("accuracy", lambda m: m.accuracy))
    figure = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    figure.suptitle(title)
    for axes, (name, read) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        axes.plot(epochs, [read(r.train) for r in result.history], label="train")
        if result.history and result.history[0].validation is not None:
            axes.plot(epochs, [read(r.validation) for r in result.history], label="validation")
        if result.stopped_early:
            axes.axvline(result.best_epoch, color="grey", linestyle=":",
                         label=f"kept (epoch {result.best_epoch})")
        if name == "loss" and all(r.train.loss > 0 for r in result.history):
            axes.set_yscale("log")
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    # written whole or not at all (a full disk leaves no half PNG); a plot is replaced freely
    return write_generated(target, image.getvalue(), force=True)

"""Stage 5, training: run a generated module on real data (``derive train``).

Public API: :func:`load_data` (a data source and a module's :class:`Task` → :class:`Dataset`,
checked against the spec), :func:`split_rows` (train / validation / test rows by seed),
:func:`train_run` (epoch-by-epoch training through the module's own ``train``, with early
stopping → :class:`TrainResult`) and :func:`plot_history` (matplotlib, optional).

It reads a generated module (Contract 2), never the derivation: every gradient comes from the
module, as a user running it would get.
"""

from __future__ import annotations

from derive.train.data import BUILTIN_DATA, Dataset, Task, load_data
from derive.train.run import (
    OPTIMIZERS,
    Epoch,
    Metrics,
    Settings,
    Split,
    TrainResult,
    check_settings,
    default_lr,
    evaluate,
    plot_history,
    require_matplotlib,
    split_rows,
    train_run,
)

__all__ = ["BUILTIN_DATA", "OPTIMIZERS", "Dataset", "Epoch", "Metrics", "Settings", "Split",
           "Task", "TrainResult", "check_settings", "default_lr", "evaluate", "load_data",
           "plot_history", "require_matplotlib", "split_rows", "train_run"]

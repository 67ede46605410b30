"""``derive train``: generate a network's module in memory and train it on real data."""

from __future__ import annotations

import argparse
import shlex
import sys

from derive.cli.main import Echo, derivation_of, load
from derive.errors import DeriveError
from derive.files import check_target, write_generated
from derive.train import (
    BUILTIN_DATA,
    OPTIMIZERS,
    Epoch,
    Metrics,
    Settings,
    Task,
    TrainResult,
    check_settings,
    default_lr,
    load_data,
    plot_history,
    require_matplotlib,
    split_rows,
    train_run,
)

#: Validation and test fractions when not given; the XOR table is the whole problem, so it
#: is trained and scored on all four rows.
DEFAULT_FRACTION = 0.2


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive train`` to the command line."""
    train = commands.add_parser(
        "train",  # its line in `derive --help`: derive.cli.main.EXTENSIONS
        description="Generate the NumPy module of a network (as `derive codegen` does), load "
                    "data and check it against the spec, split it into train, validation and "
                    "test rows by seed, train epoch by epoch with the module's own train(), "
                    "and report loss and accuracy. Data: `digits` (scikit-learn's bundled 8x8 "
                    "digits, scaled to [0, 1]), `xor` (the 4-row table), a .npz with arrays X "
                    "and Y (or y: integer class labels), or a numeric .csv (optional header "
                    "row; features, then the targets or one integer class label column).",
        epilog="examples:\n"
               "  derive train digits --data digits --epochs 60 --optimizer adam --lr 0.01\n"
               "  derive train xor --data xor\n"
               "  derive train net.yaml --data data.csv --early-stopping 10 --plot loss.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("spec", metavar="SPEC",
                       help="a spec file (.yaml, .yml, .json) or a built-in example name")
    train.add_argument("--data", default=None, metavar="DATA",
                       help=f"{' | '.join(BUILTIN_DATA)} | PATH.npz | PATH.csv (default: "
                            "digits for a 64-input, 10-class spec, xor for a 2-input, "
                            "1-output spec, demo (the module's demo data) for a sequence "
                            "spec)")
    train.add_argument("--epochs", type=int, help="epochs (default: the module's DEMO_EPOCHS)")
    train.add_argument("--lr", type=float,
                       help="learning rate (default: DEMO_LR for the module's DEMO_OPTIMIZER "
                            "and for sgd, DEMO_LR/10 for momentum, 0.001 for adam)")
    train.add_argument("--batch-size", type=int, metavar="N",
                       help="mini-batch rows (default: DEMO_BATCH_SIZE; none = full batch)")
    train.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="the update rule of the module's train() (default: the module's "
                            "DEMO_OPTIMIZER, adam for a sequence spec, else sgd)")
    train.add_argument("--clip", type=float, metavar="NORM",
                       help="cap the norm of all gradients together at each step (against "
                            "exploding gradients through time; default: the module's "
                            "DEMO_CLIP for a sequence spec, none otherwise)")
    train.add_argument("--val-fraction", type=float, metavar="F",
                       help=f"validation rows (default {DEFAULT_FRACTION}; 0 for xor)")
    train.add_argument("--test-fraction", type=float, metavar="F",
                       help=f"test rows (default {DEFAULT_FRACTION}; 0 for xor)")
    train.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                       help="stop when the validation loss has not improved for PATIENCE "
                            "epochs, and keep the best epoch's parameters")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the split, the initial parameters and the shuffles")
    train.add_argument("--plot", metavar="PNG",
                       help="write loss and accuracy per epoch here (needs matplotlib)")
    train.add_argument("-o", "--output", metavar="FILE",
                       help="also write the generated module here")
    train.add_argument("--force", action="store_true",
                       help="overwrite FILE even if derive did not generate it")
    train.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace, echo: Echo) -> int:
    for name, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--early-stopping", args.early_stopping, 1)):
        if value is not None and value < least:
            raise DeriveError(f"{name} is {value}; expected at least {least}")
    if args.lr is not None and not args.lr > 0:
        raise DeriveError(f"--lr is {args.lr:g}; expected a positive number")
    if args.plot is not None:
        require_matplotlib(args.plot)  # before any work: a run that cannot plot writes nothing
        check_target(args.plot, force=True)  # a plot carries no marker: it is overwritten
    if args.output is not None:
        check_target(args.output, force=args.force)  # nor a run that cannot write its module

    from derive.render.codegen import load_module, module_filename, render_module

    spec = load(args.spec)
    derivation = derivation_of(spec)
    regenerate = shlex.join(["derive", "codegen", args.spec,
                             "-o", args.output or module_filename(spec)])
    source_text = render_module(derivation, regenerate=regenerate)
    module = load_module(source_text, module_filename(spec).removesuffix(".py"))
    task = Task.of(module, spec.name)

    data_name = args.data or _default_data(task)
    data = load_data(data_name, task, module)
    whole_table = data_name == "xor"
    fraction = 0.0 if whole_table else DEFAULT_FRACTION
    split = split_rows(len(data),
                       fraction if args.val_fraction is None else args.val_fraction,
                       fraction if args.test_fraction is None else args.test_fraction,
                       args.seed)
    optimizer = args.optimizer or module.DEMO_OPTIMIZER
    settings = Settings(
        epochs=args.epochs or module.DEMO_EPOCHS,
        lr=args.lr or default_lr(module, optimizer),
        batch_size=args.batch_size or module.DEMO_BATCH_SIZE,
        optimizer=optimizer, patience=args.early_stopping, seed=args.seed,
        clip=args.clip if args.clip is not None else getattr(module, "DEMO_CLIP", None))

    check_settings(module, split, settings)
    batch = "full batch" if settings.batch_size is None else f"batch {settings.batch_size}"
    echo(f"{spec.name}: {task.shape_text(task.input_shape, 'input')} -> "
         f"{task.shape_text(task.output_shape, 'output')} "
         f"({module.LOSS}), "
         f"{settings.optimizer} lr {settings.lr:g}, {batch}, up to {settings.epochs} epochs, "
         f"seed {settings.seed}")
    echo(f"data: {data.source}, {len(data)} rows: {len(split.train)} train, "
         f"{len(split.validation)} validation, {len(split.test)} test")
    progress = _Progress(settings.epochs)
    result = train_run(module, task, data, split, settings, progress)
    progress.close()

    if result.stopped_early:
        echo(f"stopped at epoch {len(result.history)}: the validation loss last improved at "
             f"epoch {result.best_epoch}, whose parameters are kept")
    elif settings.patience is not None and result.best_epoch < len(result.history):
        echo(f"trained {len(result.history)} epochs; kept epoch {result.best_epoch}, the "
             "lowest validation loss")
    else:
        echo(f"trained {len(result.history)} epochs")
    for line in _summary(result):
        echo(line)
    if args.output is not None:
        path = write_generated(args.output, source_text, force=args.force)
        echo(f"wrote {path}")
    if args.plot is not None:
        title = (f"spec {spec.name}, data {data.source} ({len(split.train)} train rows): "
                 f"{settings.optimizer}, lr {settings.lr:g}, {batch}")
        echo(f"wrote {plot_history(result, task, title, args.plot)}")
    return 0


def _default_data(task: Task) -> str:
    if task.n_in == 64 and task.n_out == 10 and task.kind == "classes":
        return "digits"
    if task.n_in == 2 and task.n_out == 1 and task.kind != "classes":
        return "xor"
    if len(task.input_shape) == 2:       # a sequence: the generated module's demo data
        return "demo"
    raise DeriveError(f"no built-in data fits ({task.describe()}); expected --data PATH.npz or "
                      "PATH.csv", field="--data")


def _summary(result: TrainResult) -> list[str]:
    rows = [("train", result.train), ("validation", result.validation),
            ("test", result.test)]
    lines = [f"  {'':<10}  {'loss':>10}  {'accuracy':>8}"]
    for name, metrics in rows:
        if metrics is not None:
            lines.append(f"  {name:<10}  {metrics.loss:>10.6f}  {_accuracy(metrics):>8}")
    return lines


def _accuracy(metrics: Metrics) -> str:
    return "-" if metrics.accuracy is None else f"{100 * metrics.accuracy:.2f}%"


class _Progress:
    """Progress on stderr: one line redrawn in place on a terminal; otherwise about ten short
    lines (every epoch's would flood a log)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.tty = sys.stderr.isatty()
        self.every = max(1, epochs // 10)
        self.drawn = False

    def __call__(self, record: Epoch, settings: Settings) -> None:
        text = f"epoch {record.number:>{len(str(self.epochs))}}/{self.epochs}  " \
               f"loss {record.train.loss:.4f}"
        if record.train.accuracy is not None:
            text += f"  acc {_accuracy(record.train)}"
        if record.validation is not None:
            text += f"  val loss {record.validation.loss:.4f}"
            if record.validation.accuracy is not None:
                text += f"  val acc {_accuracy(record.validation)}"
        if self.tty:
            done = round(20 * record.number / self.epochs)
            print(f"\r  [{'#' * done}{'.' * (20 - done)}] {text}", end="", file=sys.stderr,
                  flush=True)
            self.drawn = True
        elif record.number % self.every == 0 or record.number in (1, self.epochs):
            print(f"  {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.drawn:
            print(file=sys.stderr, flush=True)

"""``derive train``: data sources, checks against the spec, splits, early stopping, the plot."""

from __future__ import annotations

import builtins
import inspect
import sys

import numpy as np
import pytest

from derive.cli import main
from derive.derivation import derive
from derive.graph import build_model
from derive.render.codegen import load_module, render_module
from derive.spec import load_spec
from derive.train import Settings, Task, load_data, split_rows, train_run

CLASSES_SPEC = ("name: three\ninput: 3\nlayers:\n  - {size: 6, activation: tanh}\n"
                "  - {size: 3, activation: softmax}\nloss: cross_entropy\n")
REGRESSION_SPEC = ("name: fit\ninput: 2\nlayers:\n  - {size: 5, activation: tanh}\n"
                   "  - {size: 2, activation: identity}\nloss: mse\n")


def derive_train(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def summary(out: str) -> dict[str, tuple[float, str]]:
    """The final table: split name -> (loss, accuracy text)."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("train", "validation", "test"):
            rows[parts[0]] = (float(parts[1]), parts[2])
    return rows


@pytest.fixture
def classes_spec(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text(CLASSES_SPEC)
    return str(path)


def blobs(count: int = 90, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated clusters in 3-D and their integer labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    centres = np.eye(3) * 3.0
    return centres[labels] + rng.normal(scale=0.5, size=(count, 3)), labels


# --- data sources ------------------------------------------------------------------------------


def test_digits(capsys):
    pytest.importorskip("sklearn")
    code, out, err = derive_train(capsys, "digits", "--data", "digits", "--epochs", "5")
    assert code == 0, err
    assert "1797 rows: 1079 train, 359 validation, 359 test" in out
    table = summary(out)
    assert set(table) == {"train", "validation", "test"}
    assert float(table["test"][1].rstrip("%")) > 80.0
    assert "epoch 5/5" in err  # progress goes to stderr


def test_xor_learns_the_whole_table(capsys):
    code, out, err = derive_train(capsys, "xor", "--data", "xor")
    assert code == 0, err
    assert "4 rows: 4 train, 0 validation, 0 test" in out
    assert summary(out)["train"][1] == "100.00%"


def test_npz_with_one_hot_and_with_integer_labels(capsys, tmp_path, classes_spec):
    X, labels = blobs()
    np.savez(tmp_path / "hot.npz", X=X, Y=np.eye(3)[labels])
    np.savez(tmp_path / "labels.npz", X=X, y=labels)
    results = []
    for name in ("hot.npz", "labels.npz"):
        code, out, err = derive_train(capsys, classes_spec, "--data", str(tmp_path / name),
                                      "--epochs", "30", "--lr", "0.5")
        assert code == 0, err
        assert "90 rows: 54 train, 18 validation, 18 test" in out
        results.append(summary(out))
    assert results[0] == results[1]  # labels are one-hot rows in other words
    assert results[0]["test"][1] == "100.00%"


def test_csv_with_header_and_integer_labels(capsys, tmp_path, classes_spec):
    X, labels = blobs()
    path = tmp_path / "data.csv"
    lines = ["x1,x2,x3,label"] + [",".join(f"{v:.6f}" for v in row) + f",{label}"
                                   for row, label in zip(X, labels)]
    path.write_text("\n".join(lines) + "\n")
    hot = tmp_path / "hot.csv"
    hot.write_text("\n".join(",".join(f"{v:.6f}" for v in row) + "," +
                             ",".join(str(int(v)) for v in np.eye(3)[label])
                             for row, label in zip(X, labels)))
    outs = []
    for data in (path, hot):
        code, out, err = derive_train(capsys, classes_spec, "--data", str(data), "--epochs", "30",
                                      "--lr", "0.5")
        assert code == 0, err
        outs.append(summary(out))
    assert outs[0] == outs[1]
    assert outs[0]["test"][1] == "100.00%"


def test_csv_regression_has_no_accuracy(capsys, tmp_path):
    spec = tmp_path / "fit.yaml"
    spec.write_text(REGRESSION_SPEC)
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(40, 2))
    table = np.hstack([X, np.sin(X)])
    np.savetxt(tmp_path / "fit.csv", table, delimiter=",")
    code, out, err = derive_train(capsys, str(spec), "--data", str(tmp_path / "fit.csv"),
                                  "--epochs", "50")
    assert code == 0, err
    assert summary(out)["test"][1] == "-"


def test_a_sequence_spec_trains_by_its_demo_recipe(capsys):
    # without --optimizer and --lr, the module's demo recipe (DEMO_OPTIMIZER adam, DEMO_LR,
    # DEMO_CLIP): gru_tones learns its tones (with sgd at the demo's rate it stayed near 40%)
    code, out, err = derive_train(capsys, "gru_tones")
    assert code == 0, err
    assert "gru_tones: 16 steps of 1 input -> 3 outputs (cross_entropy), adam lr 0.01" in out
    assert float(summary(out)["test"][1].rstrip("%")) > 90.0


def test_a_sequence_npz_of_the_wrong_shape_says_the_shape(capsys, tmp_path):
    path = tmp_path / "short.npz"
    np.savez(path, X=np.zeros((8, 15, 1)), Y=np.eye(3)[np.arange(8) % 3])
    code, out, err = derive_train(capsys, "gru_tones", "--data", str(path))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert ("array X has shape (8, 15, 1); expected (rows, 16, 1) or flat (rows, 16) — 16 "
            "steps of 1 feature") in err


def test_optimizer_is_passed_when_the_module_has_it(capsys):
    module = load_module(render_module(derive(build_model(load_spec("xor")))), "xor_net")
    has_optimizer = "optimizer" in inspect.signature(module.train).parameters
    code, out, err = derive_train(capsys, "xor", "--data", "xor", "--optimizer", "adam",
                                  "--epochs", "200", "--lr", "0.05")
    if has_optimizer:
        assert code == 0, err
        assert "adam lr 0.05" in out
    else:
        assert code == 2 and err.count("\n") == 1 and "--optimizer sgd" in err


# --- the plot ----------------------------------------------------------------------------------


def test_plot_writes_a_png(capsys, tmp_path, classes_spec):
    pytest.importorskip("matplotlib")
    X, labels = blobs()
    np.savez(tmp_path / "d.npz", X=X, y=labels)
    png = tmp_path / "loss.png"
    code, out, err = derive_train(capsys, classes_spec, "--data", str(tmp_path / "d.npz"),
                                  "--epochs", "10", "--early-stopping", "3", "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wrote {png}" in out


def test_plot_without_matplotlib_writes_nothing(capsys, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, out, err = derive_train(capsys, "xor", "--data", "xor", "--plot",
                                  str(tmp_path / "loss.png"), "-o", str(tmp_path / "m.py"))
    assert code == 2
    assert err == ("derive: error: --plot: the plot needs matplotlib: pip install matplotlib "
                   "(or pip install 'backprop-derive[plot]')\n")
    assert out == "" and list(tmp_path.iterdir()) == []


# --- early stopping and reproducibility ---------------------------------------------------------


def _noisy(tmp_path) -> str:
    """Random labels: the validation loss soon rises while the training loss falls."""
    rng = np.random.default_rng(3)
    path = tmp_path / "noise.npz"
    np.savez(path, X=rng.normal(size=(60, 3)), y=rng.integers(0, 3, size=60))
    return str(path)


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path, classes_spec):
    spec = load_spec(classes_spec)
    module = load_module(render_module(derive(build_model(spec))), "three_net")
    task = Task.of(module, spec.name)
    data = load_data(_noisy(tmp_path), task)
    split = split_rows(len(data), 0.3, 0.2, seed=0)
    settings = Settings(epochs=500, lr=0.5, batch_size=8, patience=4, seed=0)
    result = train_run(module, task, data, split, settings)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 4 < 500
    val_losses = [record.validation.loss for record in result.history]
    assert result.best_epoch == 1 + int(np.argmin(val_losses))
    # the kept parameters are the best epoch's, not the last one's
    assert result.validation.loss == pytest.approx(min(val_losses), rel=1e-12)
    assert result.validation.loss < val_losses[-1]


def test_early_stopping_on_the_command_line(capsys, tmp_path, classes_spec):
    code, out, err = derive_train(capsys, classes_spec, "--data", _noisy(tmp_path), "--epochs",
                                  "500", "--lr", "0.5", "--batch-size", "8", "--early-stopping",
                                  "4", "--val-fraction", "0.3")
    assert code == 0, err
    assert "stopped at epoch" in out and "whose parameters are kept" in out


def test_same_seed_same_run_other_seed_other_run(capsys, tmp_path, classes_spec):
    data = _noisy(tmp_path)
    runs = [derive_train(capsys, classes_spec, "--data", data, "--epochs", "20", "--seed", seed)
            for seed in ("7", "7", "8")]
    assert runs[0] == runs[1]
    assert summary(runs[0][1]) != summary(runs[2][1])


def test_split_is_disjoint_and_complete():
    split = split_rows(50, 0.2, 0.1, seed=4)
    rows = np.concatenate([split.train, split.validation, split.test])
    assert sorted(rows.tolist()) == list(range(50))
    assert (len(split.train), len(split.validation), len(split.test)) == (35, 10, 5)
    assert np.array_equal(split_rows(50, 0.2, 0.1, seed=4).test, split.test)


# --- bad input: one line on stderr, exit 2, nothing written -------------------------------------


def _write(tmp_path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


GOOD_ROWS = "".join(f"{i % 3}.5,{i}.0,1.0,{i % 3}\n" for i in range(12))

BAD_DATA = {
    "missing": (lambda d: str(d / "nope.csv"), "no such file"),
    "not numeric": (lambda d: _write(d, "a.csv", "a,b,c,y\n1,2,3,0\n1,x,3,1\n" + GOOD_ROWS),
                    ":3: column 2 is 'x', not a number"),
    "nan": (lambda d: _write(d, "a.csv", GOOD_ROWS + "1,nan,2,0\n"),
            "data row 13: the inputs hold NaN or infinity"),
    "ragged": (lambda d: _write(d, "a.csv", GOOD_ROWS + "1,2,3\n"),
               ":13: 3 columns, but the rows above have 4"),
    "wrong width": (lambda d: _write(d, "a.csv", "1,2,3,4,5\n" * 10),
                    ("5 columns; spec 'three' has an input of 3 and 3 softmax outputs, so "
                    "expected 3 feature columns + 3 target columns = 6, or 3 + 1 integer "
                    "class label = 4")),
    "empty": (lambda d: _write(d, "a.csv", ""), "no data rows"),
    "header only": (lambda d: _write(d, "a.csv", "a,b,c,y\n"), "no data rows"),
    "too few rows": (lambda d: _write(d, "a.csv", "1,2,3,0\n2,3,4,1\n"),
                     "2 rows; at least 4 are needed"),
    "label out of range": (lambda d: _write(d, "a.csv", GOOD_ROWS + "1,2,3,7\n"),
                           "class label 7 is out of range; expected labels 0..2"),
    "label not integer": (lambda d: _write(d, "a.csv", GOOD_ROWS + "1,2,3,0.5\n"),
                          "the last column is not integer class labels"),
    "unknown name": (lambda d: "mnist", "--data: unknown data 'mnist': expected digits or xor"),
    "bad extension": (lambda d: _write(d, "a.txt", GOOD_ROWS),
                      "unsupported file type '.txt'; expected a .npz or .csv file"),
    "npz not a zip": (lambda d: _write(d, "a.npz", b"not a zip"), "not a readable .npz file"),
    "npz without Y": (lambda d: _savez(d, X=np.zeros((8, 3))), "no array 'Y' or 'y' (found X)"),
    "npz wrong X": (lambda d: _savez(d, X=np.zeros((8, 4)), y=np.zeros(8, dtype=int)),
                    "array X has shape (8, 4); expected (rows, 3)"),
    "npz strings": (lambda d: _savez(d, X=np.array([["a"] * 3] * 8), y=np.zeros(8, dtype=int)),
                    "array X is not numeric"),
    "npz not one-hot": (lambda d: _savez(d, X=np.zeros((8, 3)), Y=np.ones((8, 3))),
                        "data row 1: the targets are not one-hot"),
    "digits for xor-sized spec": (lambda d: "xor", ("the XOR table needs a spec with an input "
                                  "of 2 and 1 output")),
}


def _savez(folder, **arrays) -> str:
    path = folder / "a.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_and_writes_nothing(capsys, tmp_path, classes_spec, case):
    folder = tmp_path / "data"
    folder.mkdir()
    make, message = BAD_DATA[case]
    data = make(folder)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = derive_train(capsys, classes_spec, "--data", data, "--epochs", "2",
                                  "-o", str(tmp_path / "m.py"), "--plot",
                                  str(tmp_path / "loss.png"))
    assert code == 2
    assert err.startswith("derive: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err and out == ""
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs is 0; expected at least 1"),
    (["--lr", "-1"], "--lr is -1; expected a positive number"),
    (["--val-fraction", "1.5"], "--val-fraction is 1.5; expected a fraction in [0, 1)"),
    (["--early-stopping", "3", "--val-fraction", "0"], "--early-stopping watches the validation"),
    (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
])
def test_bad_settings_are_one_line(capsys, tmp_path, classes_spec, args, message):
    X, labels = blobs()
    np.savez(tmp_path / "d.npz", X=X, y=labels)
    code, _out, err = derive_train(capsys, classes_spec, "--data", str(tmp_path / "d.npz"), *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err

"""The optimizers and learning-rate schedules of a generated module's `train`, against
torch.optim and torch.optim.lr_scheduler driven with PyTorch autograd's gradients (float64).

`optimizer="sgd"` without a schedule must keep the training loop it replaced bit for bit; that
loop is written out here as the reference.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from derive.spec.load import NetworkSpec, list_examples, load_spec
from tests import torch_reference
from tests.conftest import make_spec
from tests.test_codegen_support import batch, generated, random_params, relative_error

EXAMPLES = [name for name, _ in list_examples()]
EPOCHS = 5
LEARNING_RATES = {"sgd": 0.1, "momentum": 0.05, "adam": 0.01}
#: None, StepLR(step_size=2, gamma=0.5), CosineAnnealingLR(T_max=3): 5 epochs run past T_max,
#: where the cosine rate rises again.
SCHEDULES = {"constant": None, "step": ("step", 2, 0.5), "cosine": ("cosine", 3)}


def _spec(name: str) -> NetworkSpec:
    """A built-in example; `regularized` with dropout rate 0 (PyTorch cannot share our masks),
    `big` a chain whose 300 x 100 matrix sgd_step updates in blocks of rows."""
    if name == "big":
        return make_spec([100, 300, 3], ["tanh", "identity"], name="big")
    spec = load_spec(name).to_dict()
    for layer in spec["layers"]:
        if layer.get("op") == "dropout":
            layer["rate"] = 0.0
    return load_spec(spec)


CASES = ["xor", "digits", "resmlp", "layernorm_mlp", "regularized", "big"]


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the optional autograd peer "
                               "(pip install -e '.[torch]')")


def _copy(params: dict) -> dict:
    return {key: value.copy() for key, value in params.items()}


def torch_train(spec: NetworkSpec, params: dict, X: np.ndarray, Y: np.ndarray, epochs: int,
                lr: float, optimizer: str, schedule: tuple | None,
                batch_size: int | None = None, seed: int = 0) -> tuple[list[float], dict]:
    """(per-epoch mean losses, final parameters) from torch.optim and its schedulers, stepped
    with the autograd gradients of tests/torch_reference.py, over the batches `train` visits."""
    torch = _torch()
    tensors = {key: torch.tensor(value, dtype=torch.float64, requires_grad=True)
               for key, value in params.items()}
    weights = list(tensors.values())
    if optimizer == "sgd":
        opt = torch.optim.SGD(weights, lr=lr)
    elif optimizer == "momentum":
        opt = torch.optim.SGD(weights, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(weights, lr=lr)
    scheduler = None
    if schedule is not None and schedule[0] == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=schedule[1], gamma=schedule[2])
    elif schedule is not None:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule[1])
    count = len(X)
    size = count if batch_size is None else batch_size
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        order = np.arange(count) if batch_size is None else rng.permutation(count)
        total = 0.0
        for start in range(0, count, size):
            rows = order[start:start + size]
            current = {key: t.detach().numpy().copy() for key, t in tensors.items()}
            value, grads = torch_reference.torch_loss_and_grads(spec.to_dict(), current,
                                                                X[rows], Y[rows])
            for key, t in tensors.items():
                t.grad = torch.tensor(grads[key], dtype=torch.float64)
            opt.step()
            total += value * len(rows)
        if scheduler is not None:
            scheduler.step()
        losses.append(total / count)
    return losses, {key: t.detach().numpy() for key, t in tensors.items()}


def assert_agrees(losses, params, torch_losses, torch_params, tol=1e-10):
    assert relative_error(losses, torch_losses) < tol, (losses, torch_losses)
    for key in torch_params:
        assert relative_error(params[key], torch_params[key]) < tol, key


# --- against torch.optim -----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("optimizer", LEARNING_RATES)
@pytest.mark.parametrize("name", CASES)
def test_full_batch_training_matches_torch_optim(name, optimizer, schedule):
    spec = _spec(name)
    module = generated(spec)
    X, Y = batch(spec, rows=7, seed=3)
    start = random_params(spec, scale=0.5)
    params = _copy(start)
    losses = module.train(params, X, Y, EPOCHS, LEARNING_RATES[optimizer],
                          optimizer=optimizer, schedule=SCHEDULES[schedule])
    expected = torch_train(spec, start, X, Y, EPOCHS, LEARNING_RATES[optimizer], optimizer,
                           SCHEDULES[schedule])
    assert len(losses) == EPOCHS
    assert_agrees(losses, params, *expected)
    # the parameters moved: a no-op would agree with itself, not with torch
    assert any(relative_error(params[key], start[key]) > 1e-6 for key in start)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("name", ["digits", "resmlp"])
def test_mini_batch_training_matches_torch_optim_over_the_same_batches(name, optimizer):
    # the optimizer steps once per mini-batch (Adam's t counts batches), the schedule per epoch
    spec = _spec(name)
    module = generated(spec)
    X, Y = batch(spec, rows=10, seed=4)
    start = random_params(spec, scale=0.5)
    params = _copy(start)
    losses = module.train(params, X, Y, 4, LEARNING_RATES[optimizer], batch_size=3, seed=11,
                          optimizer=optimizer, schedule=("step", 1, 0.7))
    expected = torch_train(spec, start, X, Y, 4, LEARNING_RATES[optimizer], optimizer,
                           ("step", 1, 0.7), batch_size=3, seed=11)
    assert_agrees(losses, params, *expected)


# --- sgd keeps the old loop --------------------------------------------------------------------


def old_train(module: types.ModuleType, params: dict, X, Y, epochs: int, lr: float,
              batch_size: int | None, seed: int) -> list[float]:
    """The generated `train` loop before optimizers existed: sgd_step after every batch."""
    dtype = next(iter(params.values())).dtype
    X = np.asarray(X, dtype=dtype)
    Y = np.asarray(Y, dtype=dtype)
    count = X.shape[0]
    size = count if batch_size is None else batch_size
    rng = np.random.default_rng(seed)
    dropout = hasattr(module, "_dropout_masks")
    losses = []
    for _ in range(epochs):
        order = np.arange(count) if batch_size is None else rng.permutation(count)
        total = 0.0
        for start in range(0, count, size):
            rows = order[start:start + size]
            if dropout:
                masks = module._dropout_masks(rng, len(rows), dtype)
                value, grads = module.gradients(params, X[rows], Y[rows], masks)
            else:
                value, grads = module.gradients(params, X[rows], Y[rows])
            module.sgd_step(params, grads, lr)
            total += value * len(rows)
        losses.append(total / count)
    return losses


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch_size", [None, 3])
@pytest.mark.parametrize("name", EXAMPLES)
def test_sgd_gives_exactly_the_losses_of_the_old_loop(name, batch_size, dtype):
    spec = load_spec(name)   # with its dropout, if any
    module = generated(spec)
    X, Y = module.demo_data()
    params = module.init_params(seed=1, dtype=dtype)
    reference = _copy(params)
    losses = module.train(params, X, Y, 4, module.DEMO_LR, batch_size=batch_size, seed=5)
    assert losses == old_train(module, reference, X, Y, 4, module.DEMO_LR, batch_size, seed=5)
    for key in params:
        np.testing.assert_array_equal(params[key], reference[key])
    explicit = module.init_params(seed=1, dtype=dtype)
    assert module.train(explicit, X, Y, 4, module.DEMO_LR, batch_size=batch_size, seed=5,
                        optimizer="sgd", schedule=None) == losses


# --- options, state, reproducibility ------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["rmsprop", "SGD", "", None])
def test_an_unknown_optimizer_raises_value_error_naming_the_allowed_ones(optimizer):
    spec = _spec("xor")
    module = generated(spec)
    X, Y = batch(spec)
    params = random_params(spec)
    before = _copy(params)
    with pytest.raises(ValueError, match="sgd, momentum, adam"):
        module.train(params, X, Y, 2, 0.1, optimizer=optimizer)
    for key in params:
        np.testing.assert_array_equal(params[key], before[key])


@pytest.mark.parametrize("schedule", ["step", ("exp", 0.9), ("step", 2), ("cosine", 3, 0.1),
                                      ("cosine", 0), ("step", 0, 0.5), (), ["linear"]])
def test_an_unknown_schedule_raises_value_error_naming_the_allowed_ones(schedule):
    spec = _spec("xor")
    module = generated(spec)
    X, Y = batch(spec)
    params = random_params(spec)
    before = _copy(params)
    with pytest.raises(ValueError, match=r"\('step', step_size, gamma\) or \('cosine', T_max\)"):
        module.train(params, X, Y, 2, 0.1, schedule=schedule)
    for key in params:
        np.testing.assert_array_equal(params[key], before[key])


@pytest.mark.parametrize("optimizer", LEARNING_RATES)
def test_mini_batches_shuffle_reproducibly_by_seed(optimizer):
    spec = load_spec("regularized")   # dropout on: masks come from the same generator
    module = generated(spec)
    X, Y = module.demo_data()

    def run(seed):
        params = module.init_params(seed=0)
        losses = module.train(params, X, Y, 3, LEARNING_RATES[optimizer], batch_size=16,
                              seed=seed, optimizer=optimizer, schedule=("cosine", 3))
        return losses, params

    first, again, other = run(7), run(7), run(8)
    assert first[0] == again[0] and first[0] != other[0]
    for key in first[1]:
        np.testing.assert_array_equal(first[1][key], again[1][key])


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_optimizer_state_lives_for_one_call(optimizer):
    # two calls of 2 epochs restart the state, so they differ from one call of 4 epochs; a call
    # from the same parameters gives the same result however many calls came before
    spec = _spec("digits")
    module = generated(spec)
    X, Y = batch(spec, rows=8)
    start = random_params(spec, scale=0.5)
    once = _copy(start)
    module.train(once, X, Y, 4, 0.01, optimizer=optimizer)
    twice = _copy(start)
    module.train(twice, X, Y, 2, 0.01, optimizer=optimizer)
    module.train(twice, X, Y, 2, 0.01, optimizer=optimizer)
    assert relative_error(twice["W1"], once["W1"]) > 1e-8
    again = _copy(start)
    module.train(again, X, Y, 4, 0.01, optimizer=optimizer)
    np.testing.assert_array_equal(again["W1"], once["W1"])


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_float32_training_stays_float32_and_the_loss_goes_down(name, optimizer):
    spec = load_spec(name)
    module = generated(spec)
    X, Y = module.demo_data()
    params = module.init_params(seed=0, dtype=np.float32)
    epochs = 100 if name == "xor" else 5
    losses = module.train(params, X, Y, epochs, {"momentum": 0.05, "adam": 0.01}[optimizer],
                          batch_size=module.DEMO_BATCH_SIZE, optimizer=optimizer,
                          schedule=("step", 50, 0.5),
                          clip=getattr(module, "DEMO_CLIP", None))   # BPTT: clipped
    assert losses[-1] < losses[0]
    assert all(value.dtype == np.float32 for value in params.values())


def test_the_cosine_and_step_rates_are_torchs_closed_forms():
    # per epoch, from 0: StepLR multiplies by gamma every step_size epochs; CosineAnnealingLR
    # follows (1 + cos(pi e / T_max)) / 2 and rises again after T_max
    module = generated(_spec("xor"))
    rate = module._learning_rate
    assert [rate(0.8, e, ("step", 2, 0.5)) for e in range(5)] == [0.8, 0.8, 0.4, 0.4, 0.2]
    cosine = [rate(1.0, e, ("cosine", 2)) for e in range(5)]
    np.testing.assert_allclose(cosine, [1.0, 0.5, 0.0, 0.5, 1.0], atol=1e-15)
    assert rate(0.3, 7, None) == 0.3


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_the_callback_sees_every_epoch_and_can_stop_without_touching_the_state(optimizer):
    spec = _spec("digits")
    module = generated(spec)
    X, Y = batch(spec, rows=8)
    start = random_params(spec, scale=0.5)
    plain = _copy(start)
    expected = module.train(plain, X, Y, 4, 0.01, optimizer=optimizer)
    seen = []

    def record(epoch, loss, params):
        seen.append((epoch, loss, params["W1"].copy()))
        return False

    watched = _copy(start)
    losses = module.train(watched, X, Y, 4, 0.01, optimizer=optimizer, callback=record)
    assert losses == expected and [epoch for epoch, _, _ in seen] == [1, 2, 3, 4]
    assert [loss for _, loss, _ in seen] == expected
    np.testing.assert_array_equal(seen[-1][2], plain["W1"])
    stopped = module.train(_copy(start), X, Y, 4, 0.01, optimizer=optimizer,
                           callback=lambda epoch, loss, params: epoch == 2)
    assert stopped == expected[:2]

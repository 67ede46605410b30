"""Benchmark one training step (forward + backward + SGD update, lr 0.01) of three small
recurrent networks: derive's generated NumPy code vs hand-written NumPy BPTT vs PyTorch eager
on the CPU.

Networks: T = 20 time steps, batch 32, X (B, T, 8) and Y (B, T, 8); a recurrent layer of 64
units (h_0 = c_0 = 0) returning its whole sequence, then a dense layer of 8 (identity) at every
time step; the cost of a sample is the mse C = sum_t sum_i 1/2 (a_ti - y_ti)^2 and the batch
cost its mean over the samples. Parameters are named as in the generated modules (l the layer's
position from 1):

- rnn_bench: h_t = tanh(Wx1 x_t + Wh1 h_{t-1} + b1); Wx1 (64, 8), Wh1 (64, 64), b1 (64).
- lstm_bench: gates i, f, g, o stacked in that order (PyTorch's) in Wx1 (256, 8), Wh1 (256, 64)
  and b1 (256); i, f, o sigmoid, g tanh, c_t = f c_{t-1} + i g, h_t = o tanh(c_t).
- gru_bench: gates r, z, n in Wx1 (192, 8), Wh1 (192, 64), bx1 (192) and bh1 (192), PyTorch's
  equations: r = sigma(Wx_r x + bx_r + Wh_r h + bh_r), z likewise,
  n = tanh(Wx_n x + bx_n + r (Wh_n h + bh_n)), h_t = (1 - z) n + z h_{t-1}.
- then W2 (8, 64) and b2 (8) for the dense layer.

Contestants:

1. generated: the module derive generates from the spec (``{"name": "rnn_bench", "input":
   {"size": 8, "length": 20}, "layers": [{"op": "rnn", "size": 64}, {"size": 8}], "loss":
   "mse"}``, lstm and gru alike), built in the bench with derive's API (load_spec, build_model,
   derive, render_module, load_module); its step is sgd_step(params, gradients(params, X, Y)[1],
   lr). While derive cannot build it, its column says why and is skipped. At start-up it is
   checked against the hand-written loss and gradients to 1e-10 relative in float64; a network
   that fails this check is not timed.
2. hand-written NumPy BPTT: bench/handwritten_rnn.py (its docstring says which NumPy idioms it
   uses and why). At start-up, checked against PyTorch float64 autograd (torch.nn.RNN, LSTM and
   GRU with batch_first=True and the weights copied in; bias_ih = b1 and bias_hh = 0 for rnn and
   lstm, bias_ih = bx1 and bias_hh = bh1 for gru): loss and every gradient to 1e-10 relative,
   in the PyTorch process.
3. PyTorch eager on the CPU: torch.nn.RNN / LSTM / GRU (batch_first) and F.linear over the whole
   sequence, SGD in torch (p -= lr * p.grad under no_grad, grads set to None), in its own
   process, with as many intra-op threads as this process may run on (or --threads). bias_hh
   of rnn and lstm is kept at 0 and not trained, so that the network is the same. After the
   timing, one more step of each row runs under PyTorch's profiler, which tells whether
   PyTorch ran the layer as fused oneDNN kernels (its float32 LSTM) or one ATen op at a time;
   the line under the table says which.

The method is that of bench/cnn_bench.py and bench/train_step.py (whose timing helpers it
uses): the NumPy steps run interleaved in one process, in blocks whose order rotates, so
machine noise hits them alike; PyTorch runs in its own process, because with torch loaded
NumPy's BLAS threads compete with torch's; the generated step is also timed alone in a fresh
process, as PyTorch is, and that number is the one compared with PyTorch. Those two processes
take turns, three times each (once with --quick; train_step.in_turns), so that the machine's
drift over minutes (up to 30% between processes a minute apart) hits both alike. Each number
is the median over many steps (over the rounds, the median of their medians). The whole is run twice (once with --quick), with glibc's default malloc
and with malloc settings that keep freed memory (a step allocates a few MB of (T, ., B)
arrays; with the default settings they are returned to the OS and page-faulted back every
step, which on some virtual machines costs more than the arithmetic). The load average is
printed: another busy process on the machine slows the two-thread BLAS calls down by large
factors, so compare only tables taken on a quiet machine; on a busy one ``--threads 1`` gives
steadier numbers.

``--idioms`` instead times, side by side, the NumPy alternatives the hand-written code chose
between (the form of tanh and sigmoid on one step's block, the layout of the lstm's forward
loop, and its whole float64 gradients with np.tanh in place of tanh from exp).

Usage (from the repository root):

    python bench/rnn_bench.py            # about 2.5 minutes on 2 cores (4 on a busy machine)
    python bench/rnn_bench.py --quick    # fewer repetitions, one malloc setting (~35 s)
    python bench/rnn_bench.py --threads 1   # one thread on each side
    python bench/rnn_bench.py --threads 1 --memory-load 200   # beside a process streaming
                                         # over 200 MiB: a busy neighbour on the memory bus
    python bench/rnn_bench.py --idioms   # the NumPy idioms (~25 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import handwritten_rnn
from bench.handwritten_rnn import NETWORKS
from bench.train_step import (
    TUNED_MALLOC,
    blas_description,
    copy_params,
    in_turns,
    interleaved,
    load_average,
    median_times,
    memory_load,
    ms,
    ratio,
    reason,
    rounds,
    targets,
    thread_environment,
    timed_alone,
    worker_payload,
    worst_error,
)

BATCH, LENGTH, INPUTS, HIDDEN, OUTPUTS = 32, 20, 8, 64, 8
#: name -> (recurrent op, gates stacked in its weights)
CONFIGS = {"rnn_bench": ("rnn", 1), "lstm_bench": ("lstm", 4), "gru_bench": ("gru", 3)}
LABELS = {
    "rnn_bench": "rnn_bench (rnn 64 tanh, dense 8; T 20, batch 32)",
    "lstm_bench": "lstm_bench (lstm 64, dense 8; T 20, batch 32)",
    "gru_bench": "gru_bench (gru 64, dense 8; T 20, batch 32)",
}
DTYPES = ("float64", "float32")
LR = 0.01
TOLERANCE = 1e-10
#: seconds of timed steps per side, network and dtype: (quick, full)
BUDGET = (0.5, 2.5)
#: the name of oneDNN's fused RNN layer in PyTorch's profiler (forward; "_backward" after it)
FUSED_RNN_KERNEL = "aten::mkldnn_rnn_layer"
#: the issue's targets, every network and dtype: generated / hand-written at most
#: HANDWRITTEN_TARGET, generated alone / PyTorch at most TORCH_TARGET (hidden 64 <= 64)
HANDWRITTEN_TARGET = 1.05
TORCH_TARGET = 1.0
#: threads of each side (--threads); None: as many as this process may run on
THREADS: int | None = None


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def spec_dict(name: str) -> dict:
    op, _ = CONFIGS[name]
    return {"name": name, "input": {"size": INPUTS, "length": LENGTH},
            "layers": [{"op": op, "size": HIDDEN}, {"size": OUTPUTS}], "loss": "mse"}


def param_shapes(name: str) -> dict[str, tuple[int, ...]]:
    op, gates = CONFIGS[name]
    shapes = {"Wx1": (gates * HIDDEN, INPUTS), "Wh1": (gates * HIDDEN, HIDDEN)}
    if op == "gru":
        shapes.update(bx1=(gates * HIDDEN,), bh1=(gates * HIDDEN,))
    else:
        shapes["b1"] = (gates * HIDDEN,)
    shapes.update(W2=(OUTPUTS, HIDDEN), b2=(OUTPUTS,))
    return shapes


def data(name: str, dtype: str, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Parameters and one batch, the same in every process: every parameter uniform in
    +-1/sqrt(64) (PyTorch's initialization of these layers), X and Y standard normal."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(HIDDEN)
    params = {key: rng.uniform(-bound, bound, shape).astype(dtype)
              for key, shape in param_shapes(name).items()}
    X = rng.standard_normal((BATCH, LENGTH, INPUTS)).astype(dtype)
    Y = rng.standard_normal((BATCH, LENGTH, OUTPUTS)).astype(dtype)
    return params, X, Y


# --- NumPy: generated and hand-written, interleaved -------------------------------------------


def build_generated(name: str):
    """(module, None) with derive's module of ``name`` built from its spec, or (None, why not)."""
    try:
        from derive.derivation import derive
        from derive.graph import build_model
        from derive.render.codegen import load_module, render_module
        from derive.spec import load_spec

        with contextlib.redirect_stdout(sys.stderr):       # stdout carries the JSON
            model = build_model(load_spec(spec_dict(name)))
            source = render_module(derive(model))
            module = load_module(source, f"{name}_net")
        for attribute in ("gradients", "sgd_step"):
            if not callable(getattr(module, attribute, None)):
                return None, f"the module has no {attribute}()"
        return module, None
    except Exception as error:  # noqa: BLE001 - reported, and the column skipped
        return None, reason(error)


def generated_step(module, params: dict, X: np.ndarray, Y: np.ndarray):
    def step():
        _, grads = module.gradients(params, X, Y)
        module.sgd_step(params, grads, LR)
    return step


def check_generated(name: str, module) -> dict:
    """The generated module's loss and gradients vs the hand-written ones, float64."""
    params, X, Y = data(name, "float64")
    want_loss, want_grads = NETWORKS[name][0](copy_params(params), X, Y)
    try:
        loss, grads = module.gradients(copy_params(params), X, Y)
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        return {"config": name, "worst": reason(error), "error": float("inf")}
    worst, error = worst_error(loss, grads, want_loss, want_grads)
    return {"config": name, "worst": worst, "error": error}


def numpy_payload(quick: bool) -> dict:
    modules, unavailable, checks = {}, {}, []
    for name in CONFIGS:
        module, reason = build_generated(name)
        if module is None:
            unavailable[name] = reason
            continue
        check = check_generated(name, module)
        checks.append(check)
        if check["error"] <= TOLERANCE:
            modules[name] = module
    rows = []
    for name in CONFIGS:
        hand_step = NETWORKS[name][1]
        module = modules.get(name)
        for dtype in DTYPES:
            params_hand, X, Y = data(name, dtype)

            def handwritten_step(p=params_hand, X=X, Y=Y, step=hand_step):
                step(p, X, Y, LR)

            steps = [handwritten_step]
            if module is not None:
                steps.append(generated_step(module, data(name, dtype)[0], X, Y))
            medians, reps = interleaved(steps, BUDGET[0 if quick else 1], quick)
            rows.append({"config": name, "dtype": dtype, "reps": reps,
                         "handwritten_us": medians[0],
                         "generated_us": medians[1] if module is not None else None})
            print(f"  {name} {dtype}: {reps} reps per side", file=sys.stderr, flush=True)
    return {"checks": checks, "unavailable": unavailable, "results": rows,
            "blas": blas_description(), "numpy": np.__version__}


def alone_payload(quick: bool, names: list[str]) -> dict:
    """The generated steps of ``names``, each alone in this fresh process (for the ratio to
    PyTorch)."""
    rows = []
    for name in names:
        module, _ = build_generated(name)
        if module is None:
            continue
        for dtype in DTYPES:
            params, X, Y = data(name, dtype)
            count, median = timed_alone(generated_step(module, params, X, Y),
                                        BUDGET[0 if quick else 1] / 2 / rounds(quick), quick)
            rows.append({"config": name, "dtype": dtype, "reps": count, "alone_us": median})
    return {"results": rows}


# --- PyTorch eager, in its own process: the autograd check, then the timing -----------------


def torch_payload(quick: bool) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS or available_cpus())
    torch.set_grad_enabled(True)
    layers = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}

    def network(name: str, dtype: str):
        """(recurrent layer, W2, b2, X, Y, the trained parameters by our names, params_np)."""
        op, _ = CONFIGS[name]
        params_np, X_np, Y_np = data(name, dtype)
        layer = layers[op](INPUTS, HIDDEN, batch_first=True).to(getattr(torch, dtype))
        with torch.no_grad():
            layer.weight_ih_l0.copy_(torch.from_numpy(params_np["Wx1"]))
            layer.weight_hh_l0.copy_(torch.from_numpy(params_np["Wh1"]))
            if op == "gru":
                layer.bias_ih_l0.copy_(torch.from_numpy(params_np["bx1"]))
                layer.bias_hh_l0.copy_(torch.from_numpy(params_np["bh1"]))
            else:
                layer.bias_ih_l0.copy_(torch.from_numpy(params_np["b1"]))
                layer.bias_hh_l0.zero_()
                layer.bias_hh_l0.requires_grad_(False)
        W2 = torch.tensor(params_np["W2"], requires_grad=True)
        b2 = torch.tensor(params_np["b2"], requires_grad=True)
        named = {"Wx1": layer.weight_ih_l0, "Wh1": layer.weight_hh_l0}
        if op == "gru":
            named.update(bx1=layer.bias_ih_l0, bh1=layer.bias_hh_l0)
        else:
            named["b1"] = layer.bias_ih_l0
        named.update(W2=W2, b2=b2)
        return layer, W2, b2, torch.from_numpy(X_np), torch.from_numpy(Y_np), named, params_np

    def loss_of(layer, W2, b2, X, Y):
        out, _ = layer(X)
        return 0.5 * ((F.linear(out, W2, b2) - Y) ** 2).sum() / X.shape[0]

    checks = []
    for name in CONFIGS:
        layer, W2, b2, X, Y, named, params_np = network(name, "float64")
        loss = loss_of(layer, W2, b2, X, Y)
        loss.backward()
        want = {key: value.grad.numpy() for key, value in named.items()}
        hand_loss, hand_grads = NETWORKS[name][0](copy_params(params_np), X.numpy(), Y.numpy())
        worst, error = worst_error(hand_loss, hand_grads, loss.item(), want)
        checks.append({"config": name, "worst": worst, "error": error})
    if any(not check["error"] <= TOLERANCE for check in checks):
        return {"checks": checks, "results": []}

    results = []
    for name in CONFIGS:
        for dtype in DTYPES:
            layer, W2, b2, X, Y, named, _ = network(name, dtype)
            trained = list(named.values())

            def step(layer=layer, W2=W2, b2=b2, X=X, Y=Y, trained=trained):
                loss_of(layer, W2, b2, X, Y).backward()
                with torch.no_grad():
                    for p in trained:
                        p -= LR * p.grad
                        p.grad = None

            count, median = timed_alone(step, BUDGET[0 if quick else 1] / 2 / rounds(quick),
                                        quick)
            results.append({"config": name, "dtype": dtype, "reps": count, "torch_us": median,
                            "fused": fused_kernels(step)})
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available())}
    return {"checks": checks, "results": results, "info": info}


def fused_kernels(step) -> list[str] | None:
    """The fused recurrent kernels (oneDNN's RNN layer, forward and backward) that one more
    ``step`` ran, from PyTorch's profiler: empty where the layer ran one ATen op at a time;
    None where the profiler could not tell (the timings stand either way)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return sorted({event.name for event in prof.events()
                       if event.name.startswith(FUSED_RNN_KERNEL)})
    except Exception:  # noqa: BLE001 - informational only
        return None


def run_worker(side: str, quick: bool, env: dict[str, str],
               extra: list[str] | None = None) -> dict:
    """Run one side in a fresh process (with extra environment ``env``); its JSON payload."""
    command = [sys.executable, __file__, "--worker", side] + (["--quick"] if quick else [])
    if THREADS is not None:
        command += ["--threads", str(THREADS)]
    command += extra or []
    return worker_payload(command, {**thread_environment(THREADS), **env})


# --- report -----------------------------------------------------------------------------------


def print_table(numpy: dict, alone: dict, torch: dict) -> None:
    def by_row(payload: dict) -> dict:
        return {(row["config"], row["dtype"]): row for row in payload.get("results", [])}

    alone_rows, torch_rows = by_row(alone), by_row(torch)
    print("| network | dtype | generated ms | hand-written ms | generated / hand-written "
          "| generated alone ms | PyTorch eager ms | generated alone / PyTorch "
          "| hand-written / PyTorch | targets |")
    print("|" + "---|" * 10)
    for row in numpy["results"]:
        key = (row["config"], row["dtype"])
        gen, hand = row["generated_us"], row["handwritten_us"]
        alone_us = alone_rows.get(key, {}).get("alone_us")
        torch_us = torch_rows.get(key, {}).get("torch_us")
        met = targets([("hand-written", gen, hand, HANDWRITTEN_TARGET),
                       ("PyTorch", alone_us, torch_us, TORCH_TARGET)])
        print(f"| {LABELS[row['config']]} | {row['dtype']} | {ms(gen)} | {ms(hand)} "
              f"| {ratio(gen, hand)} | {ms(alone_us)} | {ms(torch_us)} "
              f"| {ratio(alone_us, torch_us)} | {ratio(hand, torch_us)} | {met} |")


def print_kernels(torch: dict) -> None:
    """Which rows PyTorch ran as fused kernels (a compiled recurrent layer, one call forward
    and one backward), not one ATen op at a time."""
    rows = torch.get("results", [])
    if not rows:
        return
    if any(row.get("fused") is None for row in rows):
        print("PyTorch's kernels: not known (its profiler gave no answer)")
        return
    fused = [f"{row['config']} {row['dtype']} ({', '.join(row['fused'])})"
             for row in rows if row["fused"]]
    if not fused:
        print("PyTorch ran every row one ATen op at a time")
        return
    print(f"PyTorch ran {'; '.join(fused)} as fused oneDNN kernels, one call forward and one "
          "backward; every other row one ATen op at a time")


def print_targets() -> None:
    print("Targets (the issue), every network and dtype: generated / hand-written <= "
          f"{HANDWRITTEN_TARGET} (within {HANDWRITTEN_TARGET}x of the hand-written NumPy), "
          f"generated alone / PyTorch <= {TORCH_TARGET} (faster than PyTorch eager, hidden "
          "64)")


def print_checks(numpy: dict, torch: dict) -> tuple[bool, bool]:
    """Print the start-up checks: (hand-written vs PyTorch passed or not run, all passed)."""
    hand_ok = all_ok = True
    if "error" in torch:
        print(f"hand-written vs PyTorch autograd: NOT CHECKED ({torch['error']})")
    for check in torch.get("checks", []):
        good = check["error"] <= TOLERANCE
        hand_ok &= good
        print(f"hand-written vs PyTorch float64 autograd, {check['config']}: largest relative "
              f"error {check['error']:.1e} ({check['worst']}) {'ok' if good else 'FAILED'}")
    for check in numpy.get("checks", []):
        good = check["error"] <= TOLERANCE
        all_ok &= good
        print(f"generated vs hand-written float64, {check['config']}: largest relative "
              f"error {check['error']:.1e} ({check['worst']}) "
              f"{'ok' if good else 'FAILED: its generated column is not timed'}")
    for name, why in numpy.get("unavailable", {}).items():
        print(f"generated {name}: not available ({why})")
    return hand_ok, all_ok and hand_ok


def bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if os.getloadavg()[0] > available_cpus() / 2 and (args.threads or 2) > 1:
        print(f"(load average {load_average()}: the machine is busy; two-thread BLAS and PyTorch "
              "steps can then take many times longer; --threads 1 is steadier)")
    environments = [("default glibc malloc", {})]
    if not (args.quick or args.default_malloc_only):
        environments.append(("glibc malloc keeping freed memory: " + " ".join(
            f"{key}={value}" for key, value in TUNED_MALLOC.items()), TUNED_MALLOC))
    report, status = [], 0
    for label, env in environments:
        load_before = load_average()
        with memory_load(args.memory_load):
            numpy = run_worker("numpy", args.quick, env)
            timed = sorted({row["config"] for row in numpy.get("results", [])
                            if row["generated_us"] is not None}, key=list(CONFIGS).index)
            # the two processes compared with each other take turns (in_turns)
            alone, torch = in_turns(
                partial(run_worker, "alone", args.quick, env, ["--networks", ",".join(timed)])
                if timed else dict, partial(run_worker, "torch", args.quick, env), args.quick)
        if "error" in numpy:
            print(f"NumPy side failed: {numpy['error']}")
            return 1
        hand_ok, all_ok = print_checks(numpy, torch)
        if not hand_ok:
            print("the hand-written code disagrees with PyTorch: nothing timed")
            return 1
        status = status or (0 if all_ok else 1)
        if "error" in alone:
            print(f"generated alone: not measured ({alone['error']})")
        print(f"\n## {label}\n")
        print(f"NumPy {numpy['numpy']}, BLAS: {numpy['blas']}; {os.cpu_count()} CPUs; the "
              f"NumPy steps interleaved in one process; load average before {load_before}, "
              f"after {load_average()}")
        if args.memory_load:
            print(f"every side timed while another process streams over {args.memory_load} "
                  "MiB (--memory-load)")
        if "error" in torch:
            print(f"PyTorch eager: not measured ({torch['error']})")
        else:
            info = torch["info"]
            print(f"PyTorch {info['version']} eager in its own process: {info['threads']} "
                  f"intra-op threads, {info['interop_threads']} inter-op threads, oneDNN "
                  f"{'available' if info['mkldnn'] else 'not available'}")
        print()
        print_table(numpy, alone, torch)
        print()
        print_kernels(torch)
        report.append({"environment": label, "numpy": numpy, "alone": alone, "torch": torch})
    print_targets()
    print(f"\n(medians of ms per training step; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return status


# --- the NumPy idioms, side by side -------------------------------------------------------------


def nonlinearity_variants(rows: int, dtype: str) -> dict:
    """name -> (function, reference) for tanh and sigmoid of one step's block (rows, B). The
    "prescaled" forms take the pre-activation already multiplied by -2 or -1 (the hand-written
    code folds that into the weights' rows, exactly)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((rows, BATCH)).astype(dtype)
    minus_2z, minus_z, half_z = -2 * z, -z, 0.5 * z
    out = np.empty_like(z)

    def tanh_np():
        return np.tanh(z, out=out)

    def tanh_exp():
        np.exp(minus_2z, out=out)
        np.add(out, 1, out=out)
        np.divide(2, out, out=out)
        return np.subtract(out, 1, out=out)

    def tanh_exp_scaling():
        np.multiply(z, -2, out=out)
        np.exp(out, out=out)
        np.add(out, 1, out=out)
        np.divide(2, out, out=out)
        return np.subtract(out, 1, out=out)

    def sigmoid_exp():
        np.exp(minus_z, out=out)
        np.add(out, 1, out=out)
        return np.reciprocal(out, out=out)

    def sigmoid_exp_negating():
        np.negative(z, out=out)
        np.exp(out, out=out)
        np.add(out, 1, out=out)
        return np.reciprocal(out, out=out)

    def sigmoid_tanh():
        np.tanh(half_z, out=out)
        np.multiply(out, 0.5, out=out)
        return np.add(out, 0.5, out=out)

    tanh, sigmoid = np.tanh(z), 1 / (1 + np.exp(-z))
    return {
        "tanh: np.tanh [chosen in float32]": (tanh_np, tanh),
        "tanh: 2 / (1 + exp(-2z)) - 1, -2z prescaled [chosen in float64]": (tanh_exp, tanh),
        "tanh: 2 / (1 + exp(-2z)) - 1, multiplying by -2 first": (tanh_exp_scaling, tanh),
        "sigmoid: 1 / (1 + exp(-z)), -z prescaled [chosen]": (sigmoid_exp, sigmoid),
        "sigmoid: 1 / (1 + exp(-z)), negating first": (sigmoid_exp_negating, sigmoid),
        "sigmoid: tanh(z / 2) / 2 + 1 / 2, z / 2 prescaled": (sigmoid_tanh, sigmoid),
    }


def lstm_forward_variants(dtype: str) -> dict:
    """name -> function running the lstm's forward loop (gates precomputed from X in one
    batched GEMM, then T steps), in the two layouts, returning h_1..h_T as (T, B, h)."""
    params, X, _ = data("lstm_bench", dtype)
    h, T, B = HIDDEN, LENGTH, BATCH
    scale = np.full(4 * h, -1, dtype=dtype)
    scale[2 * h:3 * h] = -2
    Wxs, Whs, bs = (params["Wx1"] * scale[:, None], params["Wh1"] * scale[:, None],
                    params["b1"] * scale)
    X_rows = np.ascontiguousarray(X.transpose(1, 0, 2))                    # (T, B, n)
    X_cols = np.ascontiguousarray(X.transpose(1, 2, 0))                    # (T, n, B)

    def loop(G, Hs, Cs, TC, gate, recurrent):
        tmp = np.empty_like(Hs[0])
        for t in range(T):
            gates = G[t]
            if t:
                gates += recurrent(Hs[t])
            np.exp(gates, out=gates)
            gates += 1
            np.reciprocal(gates, out=gates)
            i, f, g, o = (gate(gates, k) for k in range(4))
            g *= 2
            g -= 1
            np.multiply(f, Cs[t], out=Cs[t + 1])
            np.multiply(i, g, out=tmp)
            Cs[t + 1] += tmp
            np.tanh(Cs[t + 1], out=TC[t])
            np.multiply(o, TC[t], out=Hs[t + 1])
        return Hs

    def rows(contiguous: bool = False):
        G = (X_rows.reshape(T * B, -1) @ Wxs.T).reshape(T, B, 4 * h)
        G += bs
        Hs, Cs = np.zeros((T + 1, B, h), dtype), np.zeros((T + 1, B, h), dtype)
        WhsT = np.ascontiguousarray(Whs.T) if contiguous else Whs.T
        Hs = loop(G, Hs, Cs, np.empty((T, B, h), dtype),
                  lambda gates, k: gates[:, k * h:(k + 1) * h], lambda state: state @ WhsT)
        return Hs[1:]

    def columns():
        G = np.matmul(Wxs, X_cols)
        G += bs[:, None]
        Hs, Cs = np.zeros((T + 1, h, B), dtype), np.zeros((T + 1, h, B), dtype)
        Hs = loop(G, Hs, Cs, np.empty((T, h, B), dtype),
                  lambda gates, k: gates[k * h:(k + 1) * h], lambda state: Whs @ state)
        return Hs[1:].transpose(0, 2, 1)

    return {"columns (T, 4h, B): Wh @ h, every gate a contiguous block [chosen]": columns,
            "rows (T, B, 4h): h @ Wh^T, the gates strided column blocks": rows,
            "rows, Wh^T copied contiguous once (BLAS is slower on a transposed view)":
                lambda: rows(contiguous=True)}


def precise_tanh_variants(name: str, dtype: str) -> dict:
    """name -> function: the hand-written gradients of one network as written (float64: tanh
    from exp, an absolute error of a few ulp(1) near 0) and with np.tanh for every tanh it
    computes in that form (full relative precision; the lstm's g gate keeps 2 sigma(2z) - 1)."""
    params, X, Y = data(name, dtype)
    gradients = NETWORKS[name][0]
    chosen = handwritten_rnn._tanh_scale

    def precise():
        handwritten_rnn._tanh_scale = lambda dtype: 1
        try:
            return gradients(params, X, Y)
        finally:
            handwritten_rnn._tanh_scale = chosen

    return {"tanh from exp [chosen]": lambda: gradients(params, X, Y), "np.tanh": precise}


def idioms(quick: bool) -> int:
    budget = 0.5 if quick else 2.0
    print(f"NumPy {np.__version__}, BLAS: {blas_description()}; {os.cpu_count()} CPUs; "
          f"load average before {load_average()}\n")
    print("## tanh and sigmoid of one time step's block (medians, µs)\n")
    for rows in (HIDDEN, 4 * HIDDEN):
        for dtype in DTYPES:
            variants = nonlinearity_variants(rows, dtype)
            for name, (function, want) in variants.items():
                assert np.allclose(function(), want, rtol=1e-5, atol=1e-6), name
            times = median_times({name: function for name, (function, _) in variants.items()},
                                  budget)
            print(f"### ({rows}, {BATCH}), {dtype}\n\n| variant | µs |\n|---|---|")
            for name, value in times.items():
                print(f"| {name} | {value:.1f} |")
            print()
    print("## the lstm's forward pass, T = 20, by layout (medians, µs)\n")
    for dtype in DTYPES:
        variants = lstm_forward_variants(dtype)
        results = [function() for function in variants.values()]
        assert np.allclose(results[0], results[1], rtol=1e-4, atol=1e-5)
        times = median_times(variants, 2 * budget)
        print(f"### {dtype}\n\n| variant | µs | vs chosen |\n|---|---|---|")
        chosen = next(iter(times.values()))
        for name, value in times.items():
            print(f"| {name} | {value:.0f} | {value / chosen:.2f}x |")
        print()
    print("## the hand-written gradients, float64, with tanh from exp or np.tanh (medians, µs)\n")
    print("| network | tanh from exp [chosen] | np.tanh | np.tanh / chosen |\n|---|---|---|---|")
    for name in NETWORKS:
        variants = precise_tanh_variants(name, "float64")
        results = [function()[1] for function in variants.values()]
        assert all(np.allclose(results[0][key], results[1][key], rtol=1e-10, atol=1e-12)
                   for key in results[0])
        times = list(median_times(variants, 2 * budget).values())
        print(f"| {name} | {times[0]:.0f} | {times[1]:.0f} | {times[1] / times[0]:.2f}x |")
    print(f"\n(load average after {load_average()})")
    return 0


def main() -> int:
    global THREADS  # read by the workers' functions
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, default malloc settings only")
    parser.add_argument("--idioms", action="store_true",
                        help="time the NumPy idioms of the hand-written code side by side")
    parser.add_argument("--worker", choices=("numpy", "alone", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--networks", default="", help=argparse.SUPPRESS)
    parser.add_argument("--default-malloc-only", action="store_true",
                        help="skip the second run with tuned glibc malloc settings")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--memory-load", type=int, metavar="MIB",
                        help="time every side while another process streams over MIB MiB "
                             "(a busy neighbour on the memory bus; with --threads 1 on 2 cores)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="BLAS threads of the NumPy processes and intra-op threads of "
                             "PyTorch (default: all CPUs this process may use)")
    args = parser.parse_args()
    THREADS = args.threads
    if (args.idioms and THREADS is not None
            and os.environ.get("OPENBLAS_NUM_THREADS") != str(THREADS)):
        # NumPy is loaded already: run again with the BLAS thread count in the environment
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, **thread_environment(THREADS)})
    if args.worker == "numpy":
        print(json.dumps(numpy_payload(args.quick)))
        return 0
    if args.worker == "alone":
        names = [name for name in args.networks.split(",") if name in CONFIGS]
        print(json.dumps(alone_payload(args.quick, names)))
        return 0
    if args.worker == "torch":
        print(json.dumps(torch_payload(args.quick)))
        return 0
    if args.idioms:
        return idioms(args.quick)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())

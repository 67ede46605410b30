"""Benchmark one training step (forward + backward + SGD update, lr 0.01) of two small CNNs:
derive's generated NumPy code vs hand-written im2col NumPy vs PyTorch eager on the CPU.

Networks (parameters W{l}, b{l}, l the layer's position from 1; conv kernels (C_out, C_in, kh,
kw), cross-correlation as torch's conv2d; flatten C-major as torch.flatten; softmax output with
the cross-entropy, batch cost the mean over the samples):

- digits_cnn, batch 32, X (B, 1, 8, 8): conv 8 3x3 pad 1 relu -> max-pool 2 -> flatten (128)
  -> dense 10 softmax.
- lenet (LeNet-5), batch 64, X (B, 1, 28, 28): conv 6 5x5 pad 2 tanh -> avg-pool 2 -> conv 16
  5x5 tanh -> avg-pool 2 -> flatten (400) -> dense 120 tanh -> dense 84 tanh -> dense 10
  softmax.

Contestants:

1. generated: generated/digits_cnn_net.py and generated/lenet_net.py (Contract 2 of
   shared/DESIGN.md), loaded with importlib; while a file is absent its column says so and is
   skipped. At start-up the bench checks that it gives the hand-written loss and gradients to
   1e-10 relative in float64.
2. hand-written im2col NumPy: bench/handwritten_cnn.py. At start-up, checked against PyTorch
   float64 autograd (loss and every gradient to 1e-10 relative), in the PyTorch process.
3. PyTorch eager on the CPU (torch.nn.functional), in its own process, with as many intra-op
   threads as this process may run on (or --threads).

The method is that of bench/train_step.py (whose timing helpers it uses): the NumPy steps run
interleaved in one process, in blocks whose order rotates, so machine noise hits them alike;
PyTorch runs in its own process, because with torch loaded NumPy's BLAS threads compete with
torch's; the generated step is also timed alone in a fresh process, as PyTorch is, and that
number is the one compared with PyTorch. Those two processes take turns, three times each (once
with --quick; train_step.in_turns), so that the machine's drift over minutes hits both alike.
Each number is the median over many steps (over the rounds, the median of their medians). The whole
is run twice, with glibc's default malloc and with malloc settings that keep freed memory (a
LeNet step allocates tens of MB; with the default settings much of it is returned to the OS
and page-faulted back each step). The load average is printed: another busy process on the
machine slows the two-thread BLAS calls down by large factors, so compare only tables taken on
a quiet machine. On a busy one, ``--threads 1`` (one BLAS thread for NumPy, one intra-op thread
for PyTorch) gives steadier numbers: a single thread is only time-sliced by a competing process,
where two threads that wait for each other stall for whole scheduler slices.

``--idioms`` instead times the alternatives for the NumPy building blocks the hand-written
code chose between (im2col layout, col2im, max-pool forward and backward) side by side, and
the convolutions' matrix products as the hand-written step computes them (one product each)
and as the generated module does (in blocks of positions where the kernels are few).

Usage (from the repository root):

    python bench/cnn_bench.py            # about 2 minutes on 2 quiet cores
    python bench/cnn_bench.py --quick    # fewer repetitions, one malloc setting (~30 s)
    python bench/cnn_bench.py --threads 1   # one thread on each side
    python bench/cnn_bench.py --threads 1 --memory-load 200   # beside a process streaming
                                         # over 200 MiB: a busy neighbour on the memory bus
    python bench/cnn_bench.py --idioms   # the NumPy idioms (~1 minute)
"""

from __future__ import annotations

import argparse
import importlib.util
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

from bench.handwritten_cnn import NETWORKS
from bench.train_step import (
    TUNED_MALLOC,
    blas_description,
    copy_params,
    in_turns,
    interleaved,
    load_average,
    median_times,
    memory_load,
    ratio,
    rounds,
    targets,
    thread_environment,
    timed_alone,
    worker_payload,
    worst_error,
)

#: name -> (batch, input shape (C, H, W), parameter shapes, init scale rule)
CONFIGS = {
    "digits_cnn": (32, (1, 8, 8), {"W1": (8, 1, 3, 3), "b1": (8,),
                                   "W4": (10, 128), "b4": (10,)}, "he"),
    "lenet": (64, (1, 28, 28), {"W1": (6, 1, 5, 5), "b1": (6,), "W3": (16, 6, 5, 5),
                                "b3": (16,), "W6": (120, 400), "b6": (120,),
                                "W7": (84, 120), "b7": (84,), "W8": (10, 84), "b8": (10,)},
              "lecun"),
}
LABELS = {
    "digits_cnn": "digits_cnn (conv8 3x3 relu, maxpool, dense 10; batch 32)",
    "lenet": "lenet (LeNet-5, tanh, avgpool; batch 64)",
}
DTYPES = ("float64", "float32")
LR = 0.01
CLASSES = 10
TOLERANCE = 1e-10
#: seconds of timed steps per side and configuration: (quick, full)
BUDGET = {"digits_cnn": (0.5, 2.0), "lenet": (1.0, 4.0)}
#: the issue's targets: network -> (largest generated-alone / PyTorch ratio, its wording)
TORCH_TARGET = {"digits_cnn": (1.0, "faster than PyTorch eager"),
                "lenet": (1.5, "within 1.5x of PyTorch eager")}
HANDWRITTEN_TARGET = 1.0
#: where the generated modules are looked for (--generated-dir)
GENERATED_DIR = ROOT / "generated"
#: threads of each side (--threads); None: as many as this process may run on
THREADS: int | None = None


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def generated_path(name: str) -> Path:
    return GENERATED_DIR / f"{name}_net.py"


def data(name: str, dtype: str, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Parameters and one batch, the same in every process: weights normal with variance
    2 / fan_in (He, for relu) or 1 / fan_in (LeCun, for tanh), biases 0.1 * normal, X standard
    normal, Y one-hot."""
    batch, shape, shapes, rule = CONFIGS[name]
    rng = np.random.default_rng(seed)
    gain = 2.0 if rule == "he" else 1.0
    params = {}
    for key, param_shape in shapes.items():
        if key.startswith("W"):
            fan_in = int(np.prod(param_shape[1:]))
            value = rng.standard_normal(param_shape) * np.sqrt(gain / fan_in)
        else:
            value = 0.1 * rng.standard_normal(param_shape)
        params[key] = value.astype(dtype)
    X = rng.standard_normal((batch, *shape)).astype(dtype)
    Y = np.eye(CLASSES, dtype=dtype)[rng.integers(0, CLASSES, batch)]
    return params, X, Y


# --- NumPy: generated and hand-written, interleaved -------------------------------------------


def load_generated(name: str):
    """The generated module of ``name``, or None when its file does not exist."""
    path = generated_path(name)
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_generated_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_generated(name: str, module) -> dict:
    """The generated module's loss and gradients vs the hand-written ones, float64."""
    params, X, Y = data(name, "float64")
    want_loss, want_grads = NETWORKS[name][0](copy_params(params), X, Y)
    try:
        loss, grads = module.gradients(copy_params(params), X, Y)
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        return {"config": name, "worst": f"{type(error).__name__}: {error}",
                "error": float("inf")}
    worst, error = worst_error(loss, grads, want_loss, want_grads)
    return {"config": name, "worst": worst, "error": error}


def numpy_payload(quick: bool) -> dict:
    modules = {name: load_generated(name) for name in CONFIGS}
    checks = [check_generated(name, module) for name, module in modules.items() if module]
    failed = [check for check in checks if not check["error"] <= TOLERANCE]
    if failed:
        return {"checks": checks, "results": []}
    rows = []
    for name, module in modules.items():
        hand_step = NETWORKS[name][1]
        for dtype in DTYPES:
            params_hand, X, Y = data(name, dtype)
            params_gen, _, _ = data(name, dtype)

            def handwritten_step(p=params_hand, X=X, Y=Y, step=hand_step):
                step(p, X, Y, LR)

            def generated_step(p=params_gen, X=X, Y=Y, module=module):
                _, grads = module.gradients(p, X, Y)
                module.sgd_step(p, grads, LR)

            steps = [handwritten_step] + ([generated_step] if module else [])
            medians, reps = interleaved(steps, BUDGET[name][0 if quick else 1], quick)
            rows.append({"config": name, "dtype": dtype, "reps": reps,
                         "handwritten_us": medians[0],
                         "generated_us": medians[1] if module else None})
            print(f"  {name} {dtype}: {reps} reps per side", file=sys.stderr, flush=True)
    return {"checks": checks, "results": rows, "blas": blas_description(),
            "numpy": np.__version__}


def alone_payload(quick: bool) -> dict:
    """The generated steps, each alone in this fresh process (for the ratio to PyTorch)."""
    rows = []
    for name in CONFIGS:
        module = load_generated(name)
        if module is None:
            continue
        for dtype in DTYPES:
            params, X, Y = data(name, dtype)

            def step(p=params, X=X, Y=Y, module=module):
                _, grads = module.gradients(p, X, Y)
                module.sgd_step(p, grads, LR)

            count, median = timed_alone(
                step, BUDGET[name][0 if quick else 1] / 2 / rounds(quick), quick)
            rows.append({"config": name, "dtype": dtype, "reps": count, "alone_us": median})
    return {"results": rows}


# --- PyTorch eager, in its own process: the autograd check, then the timing -----------------


def torch_payload(quick: bool) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS or available_cpus())
    torch.set_grad_enabled(True)

    def digits_cnn_loss(p, X, Y):
        a = torch.relu(F.conv2d(X, p["W1"], p["b1"], padding=1))
        a = torch.flatten(F.max_pool2d(a, 2), 1)
        z = F.linear(a, p["W4"], p["b4"])
        return -(Y * torch.log_softmax(z, dim=1)).sum() / X.shape[0]

    def lenet_loss(p, X, Y):
        a = F.avg_pool2d(torch.tanh(F.conv2d(X, p["W1"], p["b1"], padding=2)), 2)
        a = F.avg_pool2d(torch.tanh(F.conv2d(a, p["W3"], p["b3"])), 2)
        a = torch.flatten(a, 1)
        a = torch.tanh(F.linear(a, p["W6"], p["b6"]))
        a = torch.tanh(F.linear(a, p["W7"], p["b7"]))
        z = F.linear(a, p["W8"], p["b8"])
        return -(Y * torch.log_softmax(z, dim=1)).sum() / X.shape[0]

    losses = {"digits_cnn": digits_cnn_loss, "lenet": lenet_loss}

    def tensors(name, dtype):
        params_np, X_np, Y_np = data(name, dtype)
        params = {key: torch.tensor(value, requires_grad=True)
                  for key, value in params_np.items()}
        return params_np, X_np, Y_np, params, torch.from_numpy(X_np), torch.from_numpy(Y_np)

    checks = []
    for name, loss_of in losses.items():
        params_np, X_np, Y_np, params, X, Y = tensors(name, "float64")
        loss = loss_of(params, X, Y)
        loss.backward()
        want = {key: value.grad.numpy() for key, value in params.items()}
        hand_loss, hand_grads = NETWORKS[name][0](copy_params(params_np), X_np, Y_np)
        worst, error = worst_error(hand_loss, hand_grads, loss.item(), want)
        checks.append({"config": name, "worst": worst, "error": error})
    if any(not check["error"] <= TOLERANCE for check in checks):
        return {"checks": checks, "results": []}

    results = []
    for name, loss_of in losses.items():
        for dtype in DTYPES:
            *_, params, X, Y = tensors(name, dtype)

            def step(params=params, X=X, Y=Y, loss_of=loss_of):
                loss_of(params, X, Y).backward()
                with torch.no_grad():
                    for p in params.values():
                        p -= LR * p.grad
                        p.grad = None

            count, median = timed_alone(
                step, BUDGET[name][0 if quick else 1] / 2 / rounds(quick), quick)
            results.append({"config": name, "dtype": dtype, "reps": count, "torch_us": median})
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available())}
    return {"checks": checks, "results": results, "info": info}


def run_worker(side: str, quick: bool, env: dict[str, str]) -> dict:
    """Run one side in a fresh process (with extra environment ``env``); its JSON payload."""
    command = [sys.executable, __file__, "--worker", side, "--generated-dir",
               str(GENERATED_DIR)] + (["--quick"] if quick else [])
    if THREADS is not None:
        command += ["--threads", str(THREADS)]
    return worker_payload(command, {**thread_environment(THREADS), **env})


# --- report -----------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def verdict(name: str, gen: float | None, alone: float | None, hand: float,
            torch_us: float | None) -> str:
    """Whether the row meets the issue's targets (- while the generated column is missing)."""
    if gen is None:
        return "-"
    return targets([("hand-written", gen, hand, HANDWRITTEN_TARGET),
                    ("PyTorch", alone, torch_us, TORCH_TARGET[name][0])])


def print_table(numpy: dict, alone: dict, torch: dict) -> None:
    def by_row(payload: dict) -> dict:
        return {(row["config"], row["dtype"]): row for row in payload.get("results", [])}

    alone_rows, torch_rows = by_row(alone), by_row(torch)
    print("| network | dtype | generated µs | hand-written im2col µs | generated / hand-written "
          "| generated alone µs | PyTorch eager µs | generated alone / PyTorch "
          "| hand-written / PyTorch | targets |")
    print("|" + "---|" * 10)
    for row in numpy["results"]:
        key = (row["config"], row["dtype"])
        gen, hand = row["generated_us"], row["handwritten_us"]
        alone_us = alone_rows.get(key, {}).get("alone_us")
        torch_us = torch_rows.get(key, {}).get("torch_us")
        print(f"| {LABELS[row['config']]} | {row['dtype']} | {_us(gen)} | {_us(hand)} "
              f"| {ratio(gen, hand)} | {_us(alone_us)} | {_us(torch_us)} "
              f"| {ratio(alone_us, torch_us)} | {ratio(hand, torch_us)} "
              f"| {verdict(row['config'], gen, alone_us, hand, torch_us)} |")


def print_checks(numpy: dict, torch: dict) -> bool:
    """Print the start-up checks; False when one failed."""
    ok = True
    if "error" in torch:
        print(f"hand-written vs PyTorch autograd: NOT CHECKED ({torch['error']})")
    for check in torch.get("checks", []):
        good = check["error"] <= TOLERANCE
        ok &= good
        print(f"hand-written vs PyTorch float64 autograd, {check['config']}: largest relative "
              f"error {check['error']:.1e} ({check['worst']}) {'ok' if good else 'FAILED'}")
    for check in numpy.get("checks", []):
        good = check["error"] <= TOLERANCE
        ok &= good
        print(f"generated vs hand-written float64, {check['config']}: largest relative "
              f"error {check['error']:.1e} ({check['worst']}) {'ok' if good else 'FAILED'}")
    for name in CONFIGS:
        if not generated_path(name).is_file():
            print(f"{_shown(generated_path(name))} does not exist: the generated column of "
                  f"{name} is skipped (it appears once derive generates that module)")
    return ok


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def print_targets() -> None:
    print("Targets (the issue), generated step:")
    for name, (_, wording) in TORCH_TARGET.items():
        print(f"- {name}: {wording} (generated alone / PyTorch <= {TORCH_TARGET[name][0]})")
    print("- both networks, both dtypes: never slower than the hand-written im2col NumPy "
          f"(generated / hand-written <= {HANDWRITTEN_TARGET})")


def bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if os.getloadavg()[0] > available_cpus() / 2 and (args.threads or 2) > 1:
        print(f"(load average {load_average()}: the machine is busy; two-thread BLAS and PyTorch "
              "steps can then take many times longer; --threads 1 is steadier)")
    environments = [("default glibc malloc", {})]
    if not (args.quick or args.default_malloc_only):
        environments.append(("glibc malloc keeping freed memory: " + " ".join(
            f"{key}={value}" for key, value in TUNED_MALLOC.items()), TUNED_MALLOC))
    report = []
    for label, env in environments:
        load_before = load_average()
        with memory_load(args.memory_load):
            numpy = run_worker("numpy", args.quick, env)
            # the two processes compared with each other take turns (in_turns)
            alone, torch = in_turns(
                partial(run_worker, "alone", args.quick, env)
                if "error" not in numpy
                and any(generated_path(name).is_file() for name in CONFIGS) else dict,
                partial(run_worker, "torch", args.quick, env), args.quick)
        if "error" in numpy:
            print(f"NumPy side failed: {numpy['error']}")
            return 1
        if not print_checks(numpy, torch):
            print("a start-up check failed: nothing timed")
            return 1
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
        report.append({"environment": label, "numpy": numpy, "alone": alone, "torch": torch})
    print_targets()
    print(f"\n(medians; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


# --- the NumPy idioms, side by side -------------------------------------------------------------


def col2im_variants(O: int, C: int, k: int, B: int, H: int, pad: int, dtype: str) -> dict:
    """name -> function returning the input error (C, H, W, B) of a k x k convolution, stride 1,
    padding ``pad``, from its output error, the im2col matrix's GEMM included."""
    from numpy.lib.stride_tricks import sliding_window_view

    from bench.handwritten_cnn import conv_backward_input

    rng = np.random.default_rng(0)
    W = rng.standard_normal((O, C, k, k)).astype(dtype)
    Ho = H + 2 * pad - k + 1
    Hp = H + 2 * pad
    delta = rng.standard_normal((O, Ho, Ho, B)).astype(dtype)                 # batch last
    delta_cb = np.ascontiguousarray(delta.transpose(0, 3, 1, 2))             # (O, B, Ho, Wo)
    delta_nhwc = np.ascontiguousarray(delta.transpose(3, 1, 2, 0))           # (B, Ho, Wo, O)
    Wm = W.reshape(O, -1)
    flat_delta = delta.reshape(O, -1)

    def offset_loop():
        return conv_backward_input(delta, W, pad, (C, H, H, B))

    def gemm_per_offset():
        dA = np.zeros((C, Hp, Hp, B), dtype)
        for i in range(k):
            for j in range(k):
                dA[:, i:i + Ho, j:j + Ho] += (W[:, :, i, j].T @ flat_delta).reshape(C, Ho, Ho, B)
        return dA[:, pad:pad + H, pad:pad + H]

    W_full = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, -1)
    q = k - 1 - pad

    def full_correlation():
        padded = np.zeros((O, Ho + 2 * q, Ho + 2 * q, B), dtype)
        padded[:, q:q + Ho, q:q + Ho] = delta
        windows = sliding_window_view(padded, (k, k), axis=(1, 2))
        cols = windows.transpose(0, 4, 5, 1, 2, 3).reshape(O * k * k, -1)
        return (W_full @ cols).reshape(C, H, H, B)

    c, i, j, y, x, b = np.ogrid[:C, :k, :k, :Ho, :Ho, :B]
    flat = (((c * Hp + i + y) * Hp + j + x) * B + b).ravel()

    def add_at():
        dA = np.zeros(C * Hp * Hp * B, dtype)
        np.add.at(dA, flat, (Wm.T @ flat_delta).ravel())
        return dA.reshape(C, Hp, Hp, B)[:, pad:pad + H, pad:pad + H]

    def bincount():
        dA = np.bincount(flat, weights=(Wm.T @ flat_delta).ravel(), minlength=C * Hp * Hp * B)
        return dA.astype(dtype, copy=False).reshape(C, Hp, Hp, B)[:, pad:pad + H, pad:pad + H]

    def offset_loop_cbhw():
        dcols = (Wm.T @ delta_cb.reshape(O, -1)).reshape(C, k, k, B, Ho, Ho)
        dA = np.zeros((C, B, Hp, Hp), dtype)
        for i in range(k):
            for j in range(k):
                dA[:, :, i:i + Ho, j:j + Ho] += dcols[:, i, j]
        return dA[:, :, pad:pad + H, pad:pad + H].transpose(0, 2, 3, 1)

    def offset_loop_nchw():
        dcols = (delta_nhwc.reshape(-1, O) @ Wm).reshape(B, Ho, Ho, C, k, k)
        dA = np.zeros((B, C, Hp, Hp), dtype)
        for i in range(k):
            for j in range(k):
                dA[:, :, i:i + Ho, j:j + Ho] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dA[:, :, pad:pad + H, pad:pad + H].transpose(1, 2, 3, 0)

    return {
        "(C,H,W,B): GEMM W^T@delta, loop over kernel offsets adding slices [chosen]": offset_loop,
        "(C,H,W,B): one small GEMM per kernel offset, added into its slice": gemm_per_offset,
        "(C,H,W,B): full correlation (im2col of padded delta, flipped W, one GEMM)":
            full_correlation,
        "(C,H,W,B): GEMM, then np.add.at with precomputed flat indices": add_at,
        "(C,H,W,B): GEMM, then np.bincount with precomputed flat indices": bincount,
        "(C,B,H,W): GEMM, loop over kernel offsets adding slices": offset_loop_cbhw,
        "(B,C,H,W) NCHW, cols (B*Ho*Wo, C*kh*kw): GEMM, offset loop (cs231n style)":
            offset_loop_nchw,
    }


def max_pool_variants(shape: tuple[int, ...], dtype: str) -> dict:
    """name -> (forward, backward) of a 2x2 stride-2 max-pool of A (C, H, W, B); backward takes
    the forward's second result and returns the input error in (C, H, W, B)."""
    from bench.handwritten_cnn import max_pool_backward, max_pool_forward

    C, H, W, B = shape
    rng = np.random.default_rng(0)
    # relu of rounded values: many ties, as after a relu
    A = np.maximum(np.round(2 * rng.standard_normal(shape)), 0).astype(dtype)
    dP = rng.standard_normal((C, H // 2, W // 2, B)).astype(dtype)
    corners = [(slice(None), slice(dy, None, 2), slice(dx, None, 2)) for dy in (0, 1)
               for dx in (0, 1)]
    c, y, x, b = np.ogrid[:C, :H // 2, :W // 2, :B]
    base = (((c * H + 2 * y) * W + 2 * x) * B + b).ravel()
    offsets = np.array([0, B, W * B, W * B + B])

    def masks_forward():
        return max_pool_forward(A)[1]

    def masks_backward(masks):
        return max_pool_backward(dP, masks, shape)

    def index_forward():
        _, (left_top, left_bottom, upper) = max_pool_forward(A)
        return np.where(upper, ~left_top, 2 + ~left_bottom).astype(np.intp)

    def index_backward(window_index):
        dA = np.zeros(A.size, dtype)
        dA[base + offsets[window_index.ravel()]] = dP.ravel()
        return dA.reshape(shape)

    def argmax_forward():
        stacked = np.stack([A[corner] for corner in corners])
        return stacked.argmax(axis=0)

    def argmax_backward(index):
        dA = np.empty(shape, dtype)
        for k, corner in enumerate(corners):
            np.multiply(dP, index == k, out=dA[corner])
        return dA

    def equal_forward():
        P = np.maximum(np.maximum(A[corners[0]], A[corners[1]]),
                       np.maximum(A[corners[2]], A[corners[3]]))
        return A.reshape(C, H // 2, 2, W // 2, 2, B) == P[:, :, None, :, None]

    def equal_backward(mask):
        return (mask * dP[:, :, None, :, None]).reshape(shape)

    A_nchw = np.ascontiguousarray(A.transpose(3, 0, 1, 2))
    dP_nchw = np.ascontiguousarray(dP.transpose(3, 0, 1, 2))

    def nchw_masks_forward():
        a = [A_nchw[:, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]
        top, bottom = np.maximum(a[0], a[1]), np.maximum(a[2], a[3])
        return a[0] >= a[1], a[2] >= a[3], top >= bottom

    def nchw_masks_backward(masks):
        left_top, left_bottom, upper = masks
        dA = np.empty(A_nchw.shape, dtype)
        d_top = dP_nchw * upper
        d_bottom = dP_nchw - d_top
        np.multiply(d_top, left_top, out=dA[:, :, 0::2, 0::2])
        np.subtract(d_top, dA[:, :, 0::2, 0::2], out=dA[:, :, 0::2, 1::2])
        np.multiply(d_bottom, left_bottom, out=dA[:, :, 1::2, 0::2])
        np.subtract(d_bottom, dA[:, :, 1::2, 0::2], out=dA[:, :, 1::2, 1::2])
        return dA.transpose(1, 2, 3, 0)

    def nchw_argmax_forward():
        windows = A_nchw.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5)
        return windows.reshape(B, C, H // 2, W // 2, 4).argmax(axis=-1)

    def nchw_argmax_backward(index):
        routed = (index[..., None] == np.arange(4)) * dP_nchw[..., None]
        dA = routed.reshape(B, C, H // 2, W // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
        return dA.reshape(B, C, H, W).transpose(1, 2, 3, 0)

    return {
        "(C,H,W,B): pairwise compares -> 3 masks; error x masks into 4 strided slices "
        "[chosen]": (masks_forward, masks_backward),
        "(C,H,W,B): pairwise compares -> window index; zeros + flat-index scatter":
            (index_forward, index_backward),
        "(C,H,W,B): np.stack of the 4 slices + argmax; (index == k) x error into 4 slices":
            (argmax_forward, argmax_backward),
        "(C,H,W,B): pairwise max; A == max mask x error (ties: ALL get it, "
        "not torch's)": (equal_forward, equal_backward),
        "(B,C,H,W): pairwise compares -> 3 masks; error x masks into 4 strided slices":
            (nchw_masks_forward, nchw_masks_backward),
        "(B,C,H,W): window copy + argmax; one-hot (index == arange(4)) x error, transposed "
        "back": (nchw_argmax_forward, nchw_argmax_backward),
    }


def im2col_variants(C: int, H: int, k: int, B: int, dtype: str) -> dict:
    """name -> function building the im2col matrix of a k x k convolution (stride 1) of an
    (already padded) input of C channels, H x H, batch B, stored in one of the layouts."""
    from numpy.lib.stride_tricks import sliding_window_view

    A = np.random.default_rng(0).standard_normal((C, H, H, B)).astype(dtype)
    A_cbhw = np.ascontiguousarray(A.transpose(0, 3, 1, 2))
    A_nchw = np.ascontiguousarray(A.transpose(3, 0, 1, 2))

    def view(array, axes):
        return sliding_window_view(array, (k, k), axis=axes)

    return {
        "(C,H,W,B) -> (C*kh*kw, Ho*Wo*B) [chosen]":
            lambda: view(A, (1, 2)).transpose(0, 4, 5, 1, 2, 3).reshape(C * k * k, -1),
        "(C,B,H,W) -> (C*kh*kw, B*Ho*Wo)":
            lambda: view(A_cbhw, (2, 3)).transpose(0, 4, 5, 1, 2, 3).reshape(C * k * k, -1),
        "(B,C,H,W) -> (C*kh*kw, B*Ho*Wo)":
            lambda: view(A_nchw, (2, 3)).transpose(1, 4, 5, 0, 2, 3).reshape(C * k * k, -1),
        "(B,C,H,W) -> (B*Ho*Wo, C*kh*kw) (cs231n style)":
            lambda: view(A_nchw, (2, 3)).transpose(0, 2, 3, 1, 4, 5).reshape(-1, C * k * k),
    }


def product_variants(kernels: int, entries: int, positions: int, dtype: str) -> dict:
    """name -> function: a convolution of ``kernels`` kernels of ``entries`` window entries
    over ``positions`` positions (samples included) and its kernel's gradient, as one matrix
    product each (the hand-written step) or as the generated module's helpers compute them
    (in blocks of positions where the kernels are few: ``_block_size``)."""
    generated = load_generated("lenet")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((kernels, entries)).astype(dtype)
    cols = rng.standard_normal((entries, positions)).astype(dtype)
    delta = rng.standard_normal((kernels, positions)).astype(dtype)
    maps = (entries, positions, 1, 1)           # the helpers' (C * kh * kw, H', W', B)
    variants = {"forward, one product (hand-written)": lambda: w @ cols,
                "kernel's gradient, one product (hand-written)": lambda: delta @ cols.T}
    if generated is not None:
        variants["forward, generated `_correlate`"] = lambda: generated._correlate(
            w.reshape(kernels, entries, 1, 1), cols.reshape(maps))
        variants["kernel's gradient, generated `_correlate_kernel`"] = \
            lambda: generated._correlate_kernel(delta.reshape(kernels, positions, 1, 1),
                                                cols.reshape(maps), (1, 1))
    return variants


def idioms(quick: bool) -> int:
    budget = 0.6 if quick else 2.5
    print(f"NumPy {np.__version__}, BLAS: {blas_description()}; {os.cpu_count()} CPUs; "
          f"load average before {load_average()}\n")
    print("## im2col: the copy into the im2col matrix, by activation layout (medians, µs)\n")
    cases = {"lenet conv 1 (1 channel, 32x32 padded, 5x5, batch 64)": (1, 32, 5, 64),
             "lenet conv 2 (6 channels, 14x14, 5x5, batch 64)": (6, 14, 5, 64)}
    for label, case in cases.items():
        for dtype in DTYPES:
            times = median_times(im2col_variants(*case, dtype), budget / 2, most=200)
            print(f"### {label}, {dtype}\n\n| variant | µs | vs chosen |\n|---|---|---|")
            chosen = next(iter(times.values()))
            for name, value in times.items():
                print(f"| {name} | {value:.1f} | {value / chosen:.2f}x |")
            print()
    print("## col2im: the error of a convolution's input (medians, µs)\n")
    cases = {"lenet conv 2 (16 <- 6 channels, 5x5, 14x14 -> 10x10, batch 64)": (16, 6, 5, 64, 14, 0),
             "3x3 pad 1 (8 <- 8 channels, 8x8, batch 32)": (8, 8, 3, 32, 8, 1)}
    for label, case in cases.items():
        for dtype in DTYPES:
            variants = col2im_variants(*case, dtype)
            want = next(iter(variants.values()))()
            for name, function in variants.items():
                got = function()
                assert np.allclose(got, want, rtol=1e-4, atol=1e-3), name
            times = median_times(variants, budget, most=200)
            print(f"### {label}, {dtype}\n\n| variant | µs | vs chosen |\n|---|---|---|")
            chosen = next(iter(times.values()))
            for name, value in times.items():
                print(f"| {name} | {value:.1f} | {value / chosen:.2f}x |")
            print()
    print("## products of few kernels over many positions: one product or blocks (medians, "
          "µs)\n")
    cases = {"lenet conv 1 (6 kernels, 25 entries, 28x28 positions, batch 64)": (6, 25, 50176),
             "lenet conv 2 (16 kernels, 150 entries, 10x10 positions, batch 64)": (16, 150, 6400)}
    for label, case in cases.items():
        for dtype in DTYPES:
            times = median_times(product_variants(*case, dtype), budget / 2, most=100)
            print(f"### {label}, {dtype}\n\n| variant | µs |\n|---|---|")
            for name, value in times.items():
                print(f"| {name} | {value:.1f} |")
            print()
    print("## max-pool 2x2 stride 2: forward (keeping what backward needs) and backward "
          "(medians, µs)\n")
    for shape in ((8, 8, 8, 32), (6, 28, 28, 64)):
        for dtype in DTYPES:
            variants = max_pool_variants(shape, dtype)
            saved = {name: forward() for name, (forward, _) in variants.items()}
            want = next(iter(variants.values()))[1](next(iter(saved.values())))
            for name, (_, backward) in variants.items():
                if "ALL" not in name:
                    assert np.array_equal(backward(saved[name]), want), name
            forwards = median_times({name: forward for name, (forward, _) in variants.items()},
                                    budget / 2, most=200)
            backwards = median_times(
                {name: (lambda b=backward, s=saved[name]: b(s))
                 for name, (_, backward) in variants.items()}, budget / 2, most=200)
            print(f"### (C, H, W, B) = {shape}, {dtype}\n\n"
                  "| variant | forward µs | backward µs | sum | vs chosen |\n|---|---|---|---|---|")
            chosen = None
            for name in variants:
                total = forwards[name] + backwards[name]
                chosen = chosen or total
                print(f"| {name} | {forwards[name]:.1f} | {backwards[name]:.1f} | {total:.1f} "
                      f"| {total / chosen:.2f}x |")
            print()
    print(f"(load average after {load_average()})")
    return 0


def main() -> int:
    global GENERATED_DIR, THREADS  # read by the workers' functions
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, default malloc settings only")
    parser.add_argument("--idioms", action="store_true",
                        help="time the NumPy idioms for im2col, col2im, the convolutions' "
                        "products and max-pool side by side")
    parser.add_argument("--worker", choices=("numpy", "alone", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--default-malloc-only", action="store_true",
                        help="skip the second run with tuned glibc malloc settings")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--memory-load", type=int, metavar="MIB",
                        help="time every side while another process streams over MIB MiB "
                             "(a busy neighbour on the memory bus; with --threads 1 on 2 cores)")
    parser.add_argument("--generated-dir", metavar="DIR", type=Path,
                        default=ROOT / "generated",
                        help="folder of digits_cnn_net.py and lenet_net.py (default: "
                             "generated/)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="BLAS threads of the NumPy processes and intra-op threads of "
                             "PyTorch (default: all CPUs this process may use)")
    args = parser.parse_args()
    GENERATED_DIR = args.generated_dir.resolve()
    THREADS = args.threads
    if (args.idioms and THREADS is not None
            and os.environ.get("OPENBLAS_NUM_THREADS") != str(THREADS)):
        # NumPy is loaded already: run again with the BLAS thread count in the environment
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, **thread_environment(THREADS)})
    workers = {"numpy": numpy_payload, "alone": alone_payload, "torch": torch_payload}
    if args.worker:
        print(json.dumps(workers[args.worker](args.quick)))
        return 0
    if args.idioms:
        return idioms(args.quick)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark one training step (forward + backward + SGD update, lr 0.01) of a transformer block
(issue #11): derive's generated NumPy code vs PyTorch eager on the CPU.

Network: bench/transformer_block_bench.yaml, derive/examples/transformer_block.yaml scaled to
T = 32 steps of d = 64 features, batch 16, X (B, T, 64) and Y (B, T, 4) one-hot:

    attn = softmax(Q K^T / sqrt(d)) V,  Q = X Wq1^T, K = X Wk1^T, V = X Wv1^T (no biases)
    h1 = layer_norm(X + attn)                           (gamma3, beta3; eps 1e-5, biased var)
    f = W5 relu(W4 h1_t + b4) + b5 at every step        (W4 (128, 64), W5 (64, 128))
    h2 = layer_norm(h1 + f)                             (gamma7, beta7)
    a_t = softmax(W8 h2_t + b8) at every step           (W8 (4, 64))

The cost of a sample is the cross-entropy summed over the steps, C = -sum_t sum_i y_ti log a_ti,
and the batch cost its mean over the samples. Parameters are named as in the generated module
(l the layer's position from 1). Initialization (the same in every process): the weights
uniform in +-1/sqrt(fan_in) (PyTorch's nn.Linear), the biases likewise, gamma 1 + 0.1 normal
and beta 0.1 normal (not 1 and 0, so that their gradients are checked in general position),
X standard normal.

Contestants:

1. generated: the module derive generates from the spec (what ``python -m derive codegen
   bench/transformer_block_bench.yaml`` prints), built in the bench with derive's API
   (load_spec, build_model, derive, render_module, load_module), or read from ``--module
   FILE`` (a module written by ``derive codegen``, or a hand-edited copy of one to try a faster
   form of a statement); its step is sgd_step(params, gradients(params, X, Y)[1], lr). At
   start-up, in the PyTorch process, it is checked against PyTorch float64 autograd: the loss
   and every gradient to 1e-10 relative; a module that fails this check is not timed.
2. PyTorch eager on the CPU: an nn.Module with the same layers (q, k, v nn.Linear without
   bias, scores / sqrt(d), softmax, @ v; residual; nn.LayerNorm; nn.Linear + relu; nn.Linear;
   residual; nn.LayerNorm; nn.Linear; -(Y * log_softmax).sum() / B), forward + backward + SGD
   in torch (p -= lr * p.grad under no_grad, grads set to None, as zero_grad() does), in its
   own process, with as many intra-op threads as this process may run on (or --threads).

The method is that of bench/rnn_bench.py and bench/cnn_bench.py (and bench/train_step.py, whose
timing helpers it uses): each side runs alone in its own fresh process (with torch loaded,
NumPy's BLAS threads compete with torch's), and each number is the median over many steps. The
whole is run twice (once with --quick), with glibc's default malloc and with malloc settings
that keep freed memory (a step allocates a few MB: the (B, T, T) attention arrays and the
(B, T, 128) feed-forward ones). The load average is printed: another busy process on the
machine slows the two-thread BLAS calls down by large factors, so compare only tables taken on
a quiet machine; on a busy one ``--threads 1`` gives steadier numbers.

``--lines`` instead times every statement of the generated forward and backward (a line
tracer, in a fresh process; medians over many steps; each line's time includes the tracer's
overhead of about a microsecond), to see which dominate. ``--idioms`` times, side by side, the
NumPy forms of the dominant statements that the generated code could use instead.

Usage (from the repository root):

    python bench/attention_bench.py              # about 1 minute on 2 cores
    python bench/attention_bench.py --quick      # fewer repetitions, one malloc setting (~10 s)
    python bench/attention_bench.py --threads 1  # one thread on each side
    python bench/attention_bench.py --lines      # the generated statements' times (~10 s)
    python bench/attention_bench.py --idioms     # the NumPy alternatives (~15 s)
    python -m derive codegen bench/transformer_block_bench.yaml -o /tmp/tb.py --force
    python bench/attention_bench.py --module /tmp/tb.py   # time that file instead
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_step import (
    TUNED_MALLOC,
    blas_description,
    copy_params,
    load_average,
    median_times,
    ms,
    ratio,
    reason,
    targets,
    thread_environment,
    timed_alone,
    worker_payload,
    worst_error,
)

SPEC_PATH = Path(__file__).resolve().parent / "transformer_block_bench.yaml"
NAME = "transformer_block_bench"
LABEL = "transformer block (attention 64, layer norms, ff 128 relu, 4 classes; T 32, batch 16)"
BATCH, LENGTH, WIDTH, HIDDEN, CLASSES = 16, 32, 64, 128, 4
#: parameter -> shape, in the generated module's names
SHAPES = {
    "Wq1": (WIDTH, WIDTH), "Wk1": (WIDTH, WIDTH), "Wv1": (WIDTH, WIDTH),
    "gamma3": (WIDTH,), "beta3": (WIDTH,),
    "W4": (HIDDEN, WIDTH), "b4": (HIDDEN,), "W5": (WIDTH, HIDDEN), "b5": (WIDTH,),
    "gamma7": (WIDTH,), "beta7": (WIDTH,),
    "W8": (CLASSES, WIDTH), "b8": (CLASSES,),
}
DTYPES = ("float64", "float32")
LR = 0.01
TOLERANCE = 1e-10
#: seconds of timed steps per side and dtype: (quick, full)
BUDGET = (0.5, 2.5)
#: the issue's targets: dtype -> (largest generated-alone / PyTorch ratio, its wording)
TORCH_TARGET = {"float32": (1.2, "within 1.2x of PyTorch eager"),
                "float64": (1.0, "faster than PyTorch eager")}
#: a generated module file to time instead of building one from the spec (--module)
MODULE_FILE: Path | None = None
#: threads of each side (--threads); None: as many as this process may run on
THREADS: int | None = None


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def data(dtype: str, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Parameters and one batch, the same in every process (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in SHAPES.items():
        if key.startswith("gamma"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif key.startswith("beta"):
            value = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = SHAPES["W" + key[1:]][1] if key.startswith("b") else shape[1]
            bound = 1.0 / np.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        params[key] = value.astype(dtype)
    X = rng.standard_normal((BATCH, LENGTH, WIDTH)).astype(dtype)
    Y = np.eye(CLASSES, dtype=dtype)[rng.integers(0, CLASSES, (BATCH, LENGTH))]
    return params, X, Y


# --- the generated module ---------------------------------------------------------------------


def generated_source() -> str:
    """The generated module's source: --module's file, or derive's module of the spec."""
    if MODULE_FILE is not None:
        return MODULE_FILE.read_text()
    from derive.derivation import derive
    from derive.graph import build_model
    from derive.render.codegen import render_module
    from derive.spec import load_spec

    with contextlib.redirect_stdout(sys.stderr):           # stdout carries the JSON
        return render_module(derive(build_model(load_spec(SPEC_PATH))))


def build_generated():
    """(module, source, None), or (None, None, why not)."""
    try:
        from derive.render.codegen import load_module

        source = generated_source()
        module = load_module(source, f"{NAME}_net")
        for attribute in ("gradients", "sgd_step", "forward", "backward"):
            if not callable(getattr(module, attribute, None)):
                return None, None, f"the module has no {attribute}()"
        return module, source, None
    except Exception as error:  # noqa: BLE001 - reported, and the column skipped
        return None, None, reason(error)


def generated_step(module, params: dict, X: np.ndarray, Y: np.ndarray):
    def step():
        _, grads = module.gradients(params, X, Y)
        module.sgd_step(params, grads, LR)
    return step


def alone_payload(quick: bool) -> dict:
    """The generated step alone in this fresh process (for the ratio to PyTorch)."""
    module, _, reason = build_generated()
    if module is None:
        return {"unavailable": reason, "results": []}
    rows = []
    for dtype in DTYPES:
        params, X, Y = data(dtype)
        count, median = timed_alone(generated_step(module, params, X, Y),
                                    BUDGET[0 if quick else 1], quick)
        rows.append({"dtype": dtype, "reps": count, "alone_us": median})
        print(f"  generated {dtype}: {count} reps", file=sys.stderr, flush=True)
    return {"results": rows, "blas": blas_description(), "numpy": np.__version__}


# --- PyTorch eager, in its own process: the autograd check, then the timing -----------------


def torch_payload(quick: bool) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(THREADS or available_cpus())
    torch.set_grad_enabled(True)

    class TransformerBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(WIDTH, WIDTH, bias=False)
            self.k = nn.Linear(WIDTH, WIDTH, bias=False)
            self.v = nn.Linear(WIDTH, WIDTH, bias=False)
            self.norm1 = nn.LayerNorm(WIDTH)
            self.ff1 = nn.Linear(WIDTH, HIDDEN)
            self.ff2 = nn.Linear(HIDDEN, WIDTH)
            self.norm2 = nn.LayerNorm(WIDTH)
            self.out = nn.Linear(WIDTH, CLASSES)
            self.scale = 1.0 / WIDTH ** 0.5

        def forward(self, X):
            q, k, v = self.q(X), self.k(X), self.v(X)
            scores = (q @ k.transpose(-2, -1)) * self.scale
            h = self.norm1(X + torch.softmax(scores, dim=-1) @ v)
            h = self.norm2(h + self.ff2(torch.relu(self.ff1(h))))
            return self.out(h)

        def named(self) -> dict:
            """The parameters by the generated module's names."""
            return {"Wq1": self.q.weight, "Wk1": self.k.weight, "Wv1": self.v.weight,
                    "gamma3": self.norm1.weight, "beta3": self.norm1.bias,
                    "W4": self.ff1.weight, "b4": self.ff1.bias,
                    "W5": self.ff2.weight, "b5": self.ff2.bias,
                    "gamma7": self.norm2.weight, "beta7": self.norm2.bias,
                    "W8": self.out.weight, "b8": self.out.bias}

    def network(dtype: str):
        params_np, X_np, Y_np = data(dtype)
        model = TransformerBlock().to(getattr(torch, dtype))
        with torch.no_grad():
            for key, parameter in model.named().items():
                parameter.copy_(torch.from_numpy(params_np[key]))
        return model, torch.from_numpy(X_np), torch.from_numpy(Y_np), params_np

    def loss_of(model, X, Y):
        return -(Y * torch.log_softmax(model(X), dim=-1)).sum() / X.shape[0]

    model, X, Y, params_np = network("float64")
    loss = loss_of(model, X, Y)
    loss.backward()
    want = {key: value.grad.numpy() for key, value in model.named().items()}
    module, _, reason = build_generated()
    if module is None:
        check = {"worst": f"not available ({reason})", "error": float("inf")}
    else:
        try:
            got_loss, got = module.gradients(copy_params(params_np), X.numpy(), Y.numpy())
            worst, error = worst_error(got_loss, got, loss.item(), want)
            check = {"worst": worst, "error": error}
        except Exception as error:  # noqa: BLE001 - reported as a failed check
            check = {"worst": reason(error), "error": float("inf")}

    results = []
    for dtype in DTYPES:
        model, X, Y, _ = network(dtype)
        trained = list(model.parameters())

        def step(model=model, X=X, Y=Y, trained=trained):
            loss_of(model, X, Y).backward()
            with torch.no_grad():
                for p in trained:
                    p -= LR * p.grad
                    p.grad = None

        count, median = timed_alone(step, BUDGET[0 if quick else 1], quick)
        results.append({"dtype": dtype, "reps": count, "torch_us": median})
        print(f"  PyTorch {dtype}: {count} reps", file=sys.stderr, flush=True)
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available())}
    return {"check": check, "results": results, "info": info}


def run_worker(side: str, quick: bool, env: dict[str, str]) -> dict:
    """Run one side in a fresh process (with extra environment ``env``); its JSON payload."""
    command = [sys.executable, __file__, "--worker", side] + (["--quick"] if quick else [])
    if THREADS is not None:
        command += ["--threads", str(THREADS)]
    if MODULE_FILE is not None:
        command += ["--module", str(MODULE_FILE)]
    return worker_payload(command, {**thread_environment(THREADS), **env})


# --- report -----------------------------------------------------------------------------------


def verdict(dtype: str, alone: float | None, torch_us: float | None) -> str:
    """Whether the row meets the issue's target (- while a column is missing): "its wording:
    met" or "its wording: MISSED"."""
    limit, wording = TORCH_TARGET[dtype]
    return targets([(wording, alone, torch_us, limit)])


def print_table(alone: dict, torch: dict) -> None:
    torch_rows = {row["dtype"]: row for row in torch.get("results", [])}
    print("| network | dtype | generated ms | PyTorch eager ms | generated / PyTorch | target |")
    print("|" + "---|" * 6)
    for row in alone.get("results", []):
        dtype, alone_us = row["dtype"], row["alone_us"]
        torch_us = torch_rows.get(dtype, {}).get("torch_us")
        print(f"| {LABEL} | {dtype} | {ms(alone_us)} | {ms(torch_us)} "
              f"| {ratio(alone_us, torch_us)} | {verdict(dtype, alone_us, torch_us)} |")


def print_check(torch: dict) -> bool:
    """Print the start-up check; False when it failed or could not run."""
    if "error" in torch:
        print(f"generated vs PyTorch autograd: NOT CHECKED ({torch['error']})")
        return False
    check = torch["check"]
    good = check["error"] <= TOLERANCE
    print(f"generated vs PyTorch float64 autograd: largest relative error {check['error']:.1e} "
          f"({check['worst']}) {'ok' if good else 'FAILED: the generated step is not timed'}")
    return good


def print_targets() -> None:
    print("Targets (issue #11), generated step alone / PyTorch eager:")
    for dtype, (limit, wording) in TORCH_TARGET.items():
        print(f"- {dtype}: {wording} (generated alone / PyTorch <= {limit})")


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
    if MODULE_FILE is not None:
        print(f"generated module: {MODULE_FILE}")
    for label, env in environments:
        load_before = load_average()
        torch = run_worker("torch", args.quick, env)       # first: it holds the autograd check
        if not print_check(torch):
            status = 1
            alone = {}
        else:
            alone = run_worker("alone", args.quick, env)
        if "error" in alone:
            print(f"generated: not measured ({alone['error']})")
        print(f"\n## {label}\n")
        print(f"NumPy {alone.get('numpy', np.__version__)}, BLAS: "
              f"{alone.get('blas', blas_description())}; {os.cpu_count()} CPUs; each side alone "
              f"in its own process; load average before {load_before}, after {load_average()}")
        if "error" in torch:
            print(f"PyTorch eager: not measured ({torch['error']})")
        else:
            info = torch["info"]
            print(f"PyTorch {info['version']} eager in its own process: {info['threads']} "
                  f"intra-op threads, {info['interop_threads']} inter-op threads, oneDNN "
                  f"{'available' if info['mkldnn'] else 'not available'}")
        print()
        print_table(alone, torch)
        print()
        report.append({"environment": label, "alone": alone, "torch": torch})
    print_targets()
    print(f"\n(medians of ms per training step; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return status


# --- the generated statements, one by one -----------------------------------------------------


def line_times(module, step, steps: int) -> dict[tuple[str, int], list[float]]:
    """(function, line) -> µs of that line in each of ``steps`` traced steps, for the lines of
    the module's forward, backward, _batch_loss and sgd_step (a helper's time counts to the line
    that calls it)."""
    codes = {getattr(module, name).__code__: name
             for name in ("forward", "backward", "_batch_loss", "sgd_step")
             if hasattr(module, name)}
    totals: dict[tuple[str, int], float] = {}
    samples: dict[tuple[str, int], list[float]] = {}
    clock = time.perf_counter_ns

    def tracer(frame, event, arg):
        name = codes.get(frame.f_code)
        if name is None:
            return None
        last = [frame.f_lineno, clock()]

        def local(frame, event, arg):
            now = clock()
            key = (name, last[0])
            totals[key] = totals.get(key, 0.0) + (now - last[1]) / 1000.0
            last[0] = frame.f_lineno
            last[1] = clock()
            return local
        return local

    step()
    gc.disable()
    try:
        for _ in range(steps):
            totals.clear()
            sys.settrace(tracer)
            try:
                step()
            finally:
                sys.settrace(None)
            for key, value in totals.items():
                samples.setdefault(key, []).append(value)
    finally:
        gc.enable()
    return samples


def lines_report(quick: bool) -> int:
    module, source, reason = build_generated()
    if module is None:
        print(f"generated module: not available ({reason})")
        return 1
    text = source.splitlines()
    steps = 40 if quick else 200
    print(f"NumPy {np.__version__}, BLAS: {blas_description()}; {os.cpu_count()} CPUs; "
          f"load average before {load_average()}\n")
    for dtype in DTYPES:
        params, X, Y = data(dtype)
        step = generated_step(module, params, X, Y)
        _, untraced = timed_alone(step, BUDGET[0], quick=True)
        samples = line_times(module, step, steps)
        medians = {key: statistics.median(values) for key, values in samples.items()}
        total = sum(medians.values())
        print(f"## {dtype}: the generated step's statements (medians over {steps} traced "
              f"steps, µs)\n")
        print(f"untraced step {untraced:.0f} µs; traced lines sum to {total:.0f} µs\n")
        print("| function | line | µs | share | statement |\n|---|---|---|---|---|")
        for (name, line), value in sorted(medians.items(), key=lambda item: -item[1]):
            if value < 0.005 * total:
                continue
            statement = text[line - 1].strip() if 0 < line <= len(text) else "?"
            if len(statement) > 90:
                statement = statement[:87] + "..."
            print(f"| {name} | {line} | {value:.0f} | {100 * value / total:.1f}% "
                  f"| `{statement.replace('|', '/')}` |")
        by_function: dict[str, float] = {}
        for (name, _), value in medians.items():
            by_function[name] = by_function.get(name, 0.0) + value
        print("\nby function: " + ", ".join(f"{name} {value:.0f} µs"
                                             for name, value in by_function.items()) + "\n")
    print(f"(load average after {load_average()})")
    return 0


# --- NumPy alternatives for the dominant statements, side by side -----------------------------


def idiom_cases(dtype: str) -> dict[str, dict]:
    """title -> {variant -> function}; the first variant is the generated code's form, every
    variant returns the same array (checked)."""
    rng = np.random.default_rng(0)
    B, T, d, h = BATCH, LENGTH, WIDTH, HIDDEN

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    X, W, W4, D4 = normal(B, T, d), normal(d, d), normal(h, d), normal(B, T, h)
    S = normal(B, T, T)
    Alpha = np.exp(S - S.max(axis=-1, keepdims=True))
    Alpha /= Alpha.sum(axis=-1, keepdims=True)
    dAlpha, Q, D = normal(B, T, T), normal(B, T, d), normal(B, T, d)
    Wqkv = np.concatenate([W, W, W])

    gamma, beta = 1 + 0.1 * normal(d), 0.1 * normal(d)
    A = normal(B, T, d)
    mu = A.mean(axis=-1, keepdims=True)
    var = ((A - mu) ** 2).mean(axis=-1, keepdims=True)
    inv = 1 / np.sqrt(var + 1e-5)
    Xhat = (A - mu) * inv
    n = 1.0 / d

    def layer_norm_generated():
        mu = n * A.sum(axis=-1, keepdims=True)
        var = n * ((A - mu) ** 2).sum(axis=-1, keepdims=True)
        Xhat = (A[..., 0:d] - mu) / np.sqrt(var + 1e-05)
        return beta + gamma * Xhat

    def layer_norm_compact():
        xhat = A - A.mean(axis=-1, keepdims=True)
        inv = 1.0 / np.sqrt(np.einsum("btj,btj->bt", xhat, xhat)[..., None] * n + 1e-05)
        xhat *= inv
        out = xhat * gamma
        out += beta
        return out

    def layer_norm_backward_generated():
        dXhat = D * gamma
        shared = dXhat.sum(axis=-1, keepdims=True)
        dvar = (0.5 * shared * mu / (var + 1e-05) ** (3 / 2)
                - 0.5 * (A * dXhat).sum(axis=-1, keepdims=True) / (var + 1e-05) ** (3 / 2))
        dmu = (2 * dvar * mu - 2 * n * dvar * A.sum(axis=-1, keepdims=True)
               - shared / np.sqrt(var + 1e-05))
        return 2 * n * A * dvar + n * dmu + dXhat / np.sqrt(var + 1e-05) - 2 * n * dvar * mu

    def layer_norm_backward_compact():
        g = D * gamma
        out = g - g.mean(axis=-1, keepdims=True)
        out -= Xhat * (np.einsum("btj,btj->bt", g, Xhat)[..., None] * n)
        out *= inv
        return out

    def softmax_generated():
        e = np.exp(S - S.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def softmax_fused():
        e = S - S.max(axis=-1, keepdims=True)
        np.exp(e, out=e)
        e /= e.sum(axis=-1, keepdims=True)
        return e

    def softmax_backward_fused():
        product = Alpha * dAlpha
        rows = product.sum(axis=-1, keepdims=True)
        product -= Alpha * rows
        return product

    def softmax_backward_inplace():
        rows = np.einsum("btj,btj->bt", Alpha, dAlpha)[..., None]
        out = dAlpha - rows
        out *= Alpha
        return out

    return {
        "dense over the sequence: X (B, T, 64) @ W^T (64, 64)": {
            "X @ W.T (3-d matmul) [generated]": lambda: X @ W.T,
            "(X.reshape(-1, d) @ W.T).reshape(B, T, d) (one GEMM)":
                lambda: (X.reshape(-1, d) @ W.T).reshape(B, T, d),
            "np.tensordot(X, W, axes=([2], [1]))": lambda: np.tensordot(X, W, axes=([2], [1])),
            "np.einsum('btk,jk->btj', optimize=True)":
                lambda: np.einsum("btk,jk->btj", X, W, optimize=True),
        },
        "dense back-error: D4 (B, T, 128) @ W4 (128, 64)": {
            "D4 @ W4 (3-d matmul) [generated]": lambda: D4 @ W4,
            "(D4.reshape(-1, h) @ W4).reshape(B, T, d) (one GEMM)":
                lambda: (D4.reshape(-1, h) @ W4).reshape(B, T, d),
        },
        "Q, K and V: three products vs one with the weights stacked": {
            "X @ Wq.T, X @ Wk.T, X @ Wv.T [generated]": lambda: (X @ W.T, X @ W.T, X @ W.T),
            "X.reshape(-1, d) @ [Wq; Wk; Wv].T, one GEMM, then three views": lambda: tuple(
                np.split((X.reshape(-1, d) @ Wqkv.T).reshape(B, T, 3 * d), 3, axis=-1)),
        },
        "weight gradient: sum over (B, T) of D (B, T, 64) outer X": {
            "np.tensordot(D, X, axes=([0, 1], [0, 1])) [generated]":
                lambda: np.tensordot(D, X, axes=([0, 1], [0, 1])),
            "D.reshape(-1, d).T @ X.reshape(-1, d)":
                lambda: D.reshape(-1, d).T @ X.reshape(-1, d),
        },
        "attention scores Q @ K^T (B, T, T)": {
            "0.125*(Q @ K.swapaxes(-1, -2)) [generated]": lambda: 0.125 * (Q @ X.swapaxes(-1, -2)),
            "(0.125*Q) @ K.swapaxes(-1, -2) (scale the smaller operand)":
                lambda: (0.125 * Q) @ X.swapaxes(-1, -2),
            "np.einsum('btd,bsd->bts', optimize=True), scaled":
                lambda: 0.125 * np.einsum("btd,bsd->bts", Q, X, optimize=True),
        },
        "layer norm forward over the last axis (B, T, 64)": {
            "mu, var, (A - mu)/sqrt(var + eps), beta + gamma*xhat [generated]":
                layer_norm_generated,
            "xhat = A - mean; einsum row dot for var; in place": layer_norm_compact,
        },
        "layer norm backward: the input's error from delta (B, T, 64)": {
            "dXhat, dvar, dmu, then the 4-term delta [generated, 5 statements]":
                layer_norm_backward_generated,
            "inv_std * (g - mean(g) - xhat * mean(g * xhat)), g = delta * gamma":
                layer_norm_backward_compact,
        },
        "softmax over the last axis (B, T, T)": {
            "exp(x - max) / sum [generated _softmax]": softmax_generated,
            "in place: one temporary, exp and divide into it": softmax_fused,
        },
        "softmax backward: alpha * g - alpha * sum(alpha * g)": {
            "Alpha*dA - Alpha*(Alpha*dA).sum(-1) [generated]":
                lambda: Alpha * dAlpha - Alpha * (Alpha * dAlpha).sum(axis=-1, keepdims=True),
            "p = Alpha*dA; p -= Alpha*p.sum(-1)": softmax_backward_fused,
            "alpha * (g - rowdot(alpha, g)), einsum row dot, in place": softmax_backward_inplace,
        },
    }


def idioms(quick: bool) -> int:
    budget = 0.4 if quick else 1.5
    print(f"NumPy {np.__version__}, BLAS: {blas_description()}; {os.cpu_count()} CPUs; "
          f"load average before {load_average()}\n")
    for dtype in DTYPES:
        for title, variants in idiom_cases(dtype).items():
            want = next(iter(variants.values()))()
            for name, function in variants.items():
                got = function()
                pairs = zip(got, want) if isinstance(want, tuple) else [(got, want)]
                assert all(np.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in pairs), name
            times = median_times(variants, budget)
            print(f"### {title}, {dtype}\n\n| variant | µs | vs generated |\n|---|---|---|")
            chosen = next(iter(times.values()))
            for name, value in times.items():
                print(f"| {name} | {value:.1f} | {value / chosen:.2f}x |")
            print()
    print(f"(load average after {load_average()})")
    return 0


def main() -> int:
    global MODULE_FILE, THREADS  # read by the workers' functions
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, default malloc settings only")
    parser.add_argument("--lines", action="store_true",
                        help="time every statement of the generated step (a line tracer)")
    parser.add_argument("--idioms", action="store_true",
                        help="time NumPy alternatives for the dominant statements side by side")
    parser.add_argument("--worker", choices=("alone", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--default-malloc-only", action="store_true",
                        help="skip the second run with tuned glibc malloc settings")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--module", metavar="FILE", type=Path,
                        help="time this generated module file instead of building one from "
                             "bench/transformer_block_bench.yaml")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="BLAS threads of the NumPy processes and intra-op threads of "
                             "PyTorch (default: all CPUs this process may use)")
    args = parser.parse_args()
    MODULE_FILE = args.module.resolve() if args.module else None
    THREADS = args.threads
    if ((args.idioms or args.lines) and THREADS is not None
            and os.environ.get("OPENBLAS_NUM_THREADS") != str(THREADS)):
        # NumPy is loaded already: run again with the BLAS thread count in the environment
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, **thread_environment(THREADS)})
    if args.worker == "alone":
        print(json.dumps(alone_payload(args.quick)))
        return 0
    if args.worker == "torch":
        print(json.dumps(torch_payload(args.quick)))
        return 0
    if args.lines:
        return lines_report(args.quick)
    if args.idioms:
        return idioms(args.quick)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())

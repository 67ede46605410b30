"""Benchmark one training step (forward + backward + SGD update): derive's generated NumPy code
vs the hand-written vectorized reference (tests/reference_backprop.py) vs PyTorch eager.

Generated and hand-written steps run interleaved in this process (same data, same BLAS, same
moment), so machine noise hits both alike; PyTorch runs in its own subprocess, because with
torch loaded NumPy's BLAS threads compete with torch's. Each number is the median over many
repetitions. Usage (from the repository root):

    python bench/train_step.py            # about 1-3 minutes on 2 cores
    python bench/train_step.py --quick    # fewer repetitions, for a smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

#: name -> (layer sizes, hidden activation, output activation, loss, batch)
CONFIGS = {
    "xor": ([2, 3, 1], "sigmoid", "sigmoid", "mse", 4),
    "digits": ([64, 32, 10], "tanh", "softmax", "cross_entropy", 32),
    "mnist": ([784, 128, 64, 10], "relu", "softmax", "cross_entropy", 128),
    "wide": ([1024, 1024, 1024, 10], "relu", "softmax", "cross_entropy", 256),
}
DTYPES = ("float64", "float32")
LR = 1e-3
#: Steps of one side timed in a row before the other side's turn. Alternating single steps
#: would make each side pay for the other's memory traffic (glibc returns freed large blocks
#: to the OS, and the next allocation page-faults them back).
BLOCK = 10


def spec_dict(name: str) -> dict:
    sizes, hidden, output, loss, _ = CONFIGS[name]
    layers = [{"size": size, "activation": hidden} for size in sizes[1:-1]]
    layers.append({"size": sizes[-1], "activation": output})
    return {"name": f"bench_{name}", "input": sizes[0], "layers": layers, "loss": loss}


def data(name: str, dtype: str, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Parameters and one batch, the same in every process."""
    sizes, _, _, loss, rows = CONFIGS[name]
    rng = np.random.default_rng(seed)
    params = {}
    for l in range(1, len(sizes)):
        scale = np.sqrt(2.0 / sizes[l - 1])
        params[f"W{l}"] = (rng.standard_normal((sizes[l], sizes[l - 1])) * scale).astype(dtype)
        params[f"b{l}"] = (0.1 * rng.standard_normal(sizes[l])).astype(dtype)
    X = rng.standard_normal((rows, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        Y = np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], rows)]
    else:
        Y = rng.integers(0, 2, (rows, sizes[-1])).astype(dtype)
    return params, X, Y


def repetitions(step, budget_s: float, quick: bool) -> int:
    """How many timed steps fit the time budget (at least 15)."""
    for _ in range(3):
        step()
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    most = 300 if quick else 4000
    return int(min(most, max(15, budget_s / max(once, 1e-7))))


def _time(step) -> float:
    start = time.perf_counter_ns()
    step()
    return (time.perf_counter_ns() - start) / 1000.0


# --- NumPy: generated and hand-written, interleaved -------------------------------------------


def numpy_rows(quick: bool) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from derive.codegen import load_module, render_module
    from derive.derivation import derive
    from derive.model import build_model
    from derive.spec import load_spec
    from tests import reference_backprop as ref

    rows = []
    for name in CONFIGS:
        spec = load_spec(spec_dict(name))
        module = load_module(render_module(derive(build_model(spec))), spec.name)
        net = ref.Net.from_spec(spec)
        for dtype in DTYPES:
            params_gen, X, Y = data(name, dtype)
            params_ref, _, _ = data(name, dtype)

            def generated_step(p=params_gen, X=X, Y=Y, module=module):
                _, grads = module.gradients(p, X, Y)
                module.sgd_step(p, grads, LR)

            def reference_step(p=params_ref, X=X, Y=Y, net=net):
                ref.train_step(net, p, X, Y, LR)

            # the two compute the same numbers (the tests check 1e-10; here a sanity check)
            loss_gen = module.loss(params_gen, X, Y)
            loss_ref = ref.batch_loss(net, *ref.forward(net, params_ref, X), Y)
            assert abs(loss_gen - loss_ref) <= 1e-3 * abs(loss_ref), (name, dtype)

            count = repetitions(generated_step, 1.2 if quick else 3.0, quick)
            blocks = max(2, count // BLOCK) // 2 * 2
            times_gen, times_ref = [], []
            gc.disable()
            try:
                # alternate blocks of BLOCK steps (generated first, then hand-written first)
                for i in range(blocks):
                    order = [(generated_step, times_gen), (reference_step, times_ref)]
                    for step, times in (order if i % 2 == 0 else order[::-1]):
                        step()                       # the first step of a block is not timed
                        times.extend(_time(step) for _ in range(BLOCK))
            finally:
                gc.enable()
            count = blocks * BLOCK
            rows.append({"config": name, "dtype": dtype, "reps": count,
                         "generated_us": statistics.median(times_gen),
                         "reference_us": statistics.median(times_ref)})
            print(f"  {name:6s} {dtype}: {count} reps", file=sys.stderr, flush=True)
    return rows


# --- PyTorch eager, in its own process --------------------------------------------------------


def torch_worker(quick: bool) -> None:
    import torch

    torch.set_grad_enabled(True)
    results = []
    activation = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
    for name, (sizes, hidden, output, loss_name, batch) in CONFIGS.items():
        for dtype in DTYPES:
            params_np, X_np, Y_np = data(name, dtype)
            params = {key: torch.tensor(value, requires_grad=True)
                      for key, value in params_np.items()}
            X, Y = torch.from_numpy(X_np), torch.from_numpy(Y_np)
            depth = len(sizes) - 1

            def step(params=params, X=X, Y=Y, depth=depth, hidden=hidden, output=output,
                     loss_name=loss_name, batch=batch):
                a = X
                for l in range(1, depth + 1):
                    z = torch.addmm(params[f"b{l}"], a, params[f"W{l}"].T)
                    if l < depth:
                        a = activation[hidden](z)
                if loss_name == "cross_entropy":
                    loss = -(Y * torch.log_softmax(z, dim=1)).sum() / batch
                else:
                    a = activation[output](z)
                    loss = 0.5 * ((a - Y) ** 2).sum() / batch
                loss.backward()
                with torch.no_grad():
                    for p in params.values():
                        p -= LR * p.grad
                        p.grad = None

            count = repetitions(step, 0.8 if quick else 2.0, quick)
            gc.disable()
            try:
                times = [_time(step) for _ in range(count)]
            finally:
                gc.enable()
            results.append({"config": name, "dtype": dtype, "reps": count,
                            "torch_us": statistics.median(times)})
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads()}
    print(json.dumps({"results": results, "info": info}))


def run_worker(side: str, quick: bool, env: dict[str, str]) -> dict:
    """Run one side in a fresh process (with extra environment ``env``); its JSON payload."""
    command = [sys.executable, __file__, "--worker", side] + (["--quick"] if quick else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, **env})
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(result.stdout)


# --- which BLAS, how many threads -----------------------------------------------------------


def blas_description() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        parts = [f"{pool.get('internal_api')} {pool.get('version')} "
                 f"({pool.get('num_threads')} threads, {pool.get('threading_layer')})"
                 for pool in threadpool_info() if pool.get("user_api") == "blas"]
        return "; ".join(parts) or "no BLAS found by threadpoolctl"
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        name = f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - old NumPy: describe what we can
        name = "unknown BLAS"
    threads = _openblas_threads()
    return f"{name} ({threads} threads; threadpoolctl not installed)"


def _openblas_threads() -> str:
    """OpenBLAS's thread count, asked through ctypes (what threadpoolctl does)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        paths = []
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                       "openblas_get_num_threads", "scipy_openblas_get_num_threads"):
            function = getattr(library, symbol, None)
            if function is not None:
                return str(function())
    env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    return env or "default"


# --- report --------------------------------------------------------------------------------


#: glibc malloc settings that keep freed memory for reuse instead of returning it to the OS:
#: every fresh array above 128 KiB is otherwise page-faulted in again on each step.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def print_table(numpy_payload: dict, torch_payload: dict) -> None:
    torch_rows = {(row["config"], row["dtype"]): row
                  for row in torch_payload.get("results", [])}
    print("| config | dtype | generated µs | hand-written µs | generated / hand-written "
          "| PyTorch eager µs | generated / PyTorch |")
    print("|" + "---|" * 7)
    for row in numpy_payload["results"]:
        torch_row = torch_rows.get((row["config"], row["dtype"]))
        gen, ref = row["generated_us"], row["reference_us"]
        torch_us = f"{torch_row['torch_us']:.1f}" if torch_row else "-"
        torch_ratio = f"{gen / torch_row['torch_us']:.2f}x" if torch_row else "-"
        sizes, *_, batch = CONFIGS[row["config"]]
        label = f"{row['config']} ({'-'.join(map(str, sizes))}, batch {batch})"
        print(f"| {label} | {row['dtype']} | {gen:.1f} | {ref:.1f} | {gen / ref:.3f}x "
              f"| {torch_us} | {torch_ratio} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--worker", choices=("numpy", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--default-malloc-only", action="store_true",
                        help="skip the second run with tuned glibc malloc settings")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.worker == "torch":
        torch_worker(args.quick)
        return 0
    if args.worker == "numpy":
        results = numpy_rows(args.quick)
        print(json.dumps({"results": results, "blas": blas_description(),
                          "numpy": np.__version__}))
        return 0
    started = time.perf_counter()
    environments = [("default glibc malloc", {})]
    if not args.default_malloc_only:
        environments.append(("glibc malloc keeping freed memory: " + " ".join(
            f"{key}={value}" for key, value in TUNED_MALLOC.items()), TUNED_MALLOC))
    report = []
    for label, env in environments:
        numpy_payload = run_worker("numpy", args.quick, env)
        torch_payload = run_worker("torch", args.quick, env)
        if "error" in numpy_payload:
            print(f"NumPy side failed: {numpy_payload['error']}")
            return 1
        print(f"## {label}\n")
        print(f"NumPy {numpy_payload['numpy']}, BLAS: {numpy_payload['blas']}; "
              f"{os.cpu_count()} CPUs; generated and hand-written interleaved in one process")
        if "error" in torch_payload:
            print(f"PyTorch eager: not measured ({torch_payload['error']})")
        else:
            info = torch_payload["info"]
            print(f"PyTorch {info['version']} eager in its own process: {info['threads']} "
                  f"intra-op threads, {info['interop_threads']} inter-op threads")
        print()
        print_table(numpy_payload, torch_payload)
        print()
        report.append({"environment": label, "numpy": numpy_payload, "torch": torch_payload})
    print(f"(medians; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark one training step (forward + backward + SGD update): derive's generated NumPy code
vs hand-written NumPy vs PyTorch eager.

Two hand-written baselines:

- specialized (bench/handwritten.py): what a competent engineer writes for each fixed network,
  layers spelled out, with the same math and numerical practices as the generated code. This is
  the baseline of the issue's target (generated within 1.05x). At start-up the bench checks
  that it gives the generated module's loss and gradients to 1e-10 relative in float64.
- general (tests/reference_backprop.py): the test suite's reference, for any depth, activation
  and loss, dispatching per layer; slower than specialized code, so shown only for context.

The three NumPy steps run interleaved in one process (same data, same BLAS, same moment), so
machine noise hits them alike; PyTorch runs in its own subprocess, because with torch loaded
NumPy's BLAS threads compete with torch's. The generated step is also timed alone in a fresh
process, as PyTorch is, and that number is the one compared with PyTorch: the heap of the
interleaved process is in another state (see generated_alone_rows). Each number is the median
over many repetitions.
The load average is printed: other processes on the machine slow the two-thread BLAS calls
down by large factors, so compare only tables taken on a quiet machine. Usage (from the
repository root):

    python bench/train_step.py            # about 2-3 minutes on 2 cores
    python bench/train_step.py --quick    # fewer repetitions, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
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


def interleaved(steps: list, budget_s: float, quick: bool) -> tuple[list[float], int]:
    """Median µs of each step, run in blocks of BLOCK steps whose order rotates; steps each."""
    sides = [(step, []) for step in steps]
    count = repetitions(steps[0], budget_s, quick)
    blocks = max(len(sides), count // BLOCK) // len(sides) * len(sides)
    gc.disable()
    try:
        for i in range(blocks):
            shift = i % len(sides)
            for step, times in sides[shift:] + sides[:shift]:
                step()                       # the first step of a block is not timed
                times.extend(_time(step) for _ in range(BLOCK))
    finally:
        gc.enable()
    return [statistics.median(times) for _, times in sides], blocks * BLOCK


def timed_alone(step, budget_s: float, quick: bool) -> tuple[int, float]:
    """(repetitions, median µs) of ``step`` run on its own, the garbage collector off."""
    count = repetitions(step, budget_s, quick)
    gc.disable()
    try:
        times = [_time(step) for _ in range(count)]
    finally:
        gc.enable()
    return count, statistics.median(times)


# --- NumPy: generated, specialized hand-written and general reference, interleaved ---------


def relative_error(got: np.ndarray | float, want: np.ndarray | float) -> float:
    """|got - want| / |want| in the Euclidean norm (0 when both are 0)."""
    scale = float(np.linalg.norm(want))
    difference = float(np.linalg.norm(np.asarray(got) - np.asarray(want)))
    return difference / scale if scale else difference


def copy_params(params: dict) -> dict:
    return {key: value.copy() for key, value in params.items()}


def worst_error(loss: float, grads: dict, want_loss: float, want_grads: dict) -> tuple[str, float]:
    """(name, error) of the largest relative error among the loss and the gradients."""
    if sorted(grads) != sorted(want_grads):
        return f"keys {sorted(grads)} != {sorted(want_grads)}", float("inf")
    errors = {"loss": relative_error(loss, want_loss)}
    for key, want in want_grads.items():
        if np.shape(grads[key]) != np.shape(want):
            return f"shape of {key} {np.shape(grads[key])}", float("inf")
        errors[key] = relative_error(grads[key], want)
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def reason(error: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def median_times(functions: dict, budget_s: float, most: int = 400) -> dict:
    """Median µs of each function, run interleaved in blocks of 5 calls whose order rotates."""
    for function in functions.values():
        function()
    start = time.perf_counter()
    for function in functions.values():
        function()
    once = time.perf_counter() - start
    blocks = int(min(most, max(6, budget_s / max(once, 1e-7) / 5)))
    items = list(functions.items())
    times = {name: [] for name in functions}
    gc.disable()
    try:
        for i in range(blocks):
            shift = i % len(items)
            for name, function in items[shift:] + items[:shift]:
                for _ in range(5):
                    begin = time.perf_counter_ns()
                    function()
                    times[name].append((time.perf_counter_ns() - begin) / 1000.0)
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in times.items()}


def check_same_numbers(name: str, module, step) -> None:
    """The specialized step gives the generated module's loss and gradients (float64, 1e-10)."""
    params, X, Y = data(name, "float64")
    loss_gen, grads_gen = module.gradients(params, X, Y)
    loss_hand, grads_hand = step({key: value.copy() for key, value in params.items()}, X, Y, LR)
    assert sorted(grads_hand) == sorted(grads_gen), (name, sorted(grads_hand))
    errors = {"loss": relative_error(loss_hand, loss_gen)}
    errors.update({key: relative_error(grads_hand[key], grads_gen[key]) for key in grads_gen})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, f"{name}: hand-written {worst} differs by {errors[worst]:.1e}"


def numpy_rows(quick: bool) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from bench.handwritten import STEPS
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.render.codegen import load_module, render_module
    from derive.spec.load import load_spec
    from tests import reference_backprop as ref

    modules, nets = {}, {}
    for name in CONFIGS:
        spec = load_spec(spec_dict(name))
        modules[name] = load_module(render_module(derive(build_model(spec))), spec.name)
        nets[name] = ref.Net.from_spec(spec)
        check_same_numbers(name, modules[name], STEPS[name])

    rows = []
    for name in CONFIGS:
        module, net, hand_step = modules[name], nets[name], STEPS[name]
        for dtype in DTYPES:
            params_gen, X, Y = data(name, dtype)
            params_hand, _, _ = data(name, dtype)
            params_ref, _, _ = data(name, dtype)

            def generated_step(p=params_gen, X=X, Y=Y, module=module):
                _, grads = module.gradients(p, X, Y)
                module.sgd_step(p, grads, LR)

            def handwritten_step(p=params_hand, X=X, Y=Y, step=hand_step):
                step(p, X, Y, LR)

            def reference_step(p=params_ref, X=X, Y=Y, net=net):
                ref.train_step(net, p, X, Y, LR)

            medians, reps = interleaved([generated_step, handwritten_step, reference_step],
                                        1.0 if quick else 2.0, quick)
            rows.append({"config": name, "dtype": dtype, "reps": reps,
                         "generated_us": medians[0], "handwritten_us": medians[1],
                         "reference_us": medians[2]})
            print(f"  {name:6s} {dtype}: {reps} reps per side", file=sys.stderr,
                  flush=True)
    return rows


def generated_alone_rows(quick: bool) -> list[dict]:
    """The generated step alone in its process, timed as PyTorch's is (for that ratio).

    The heap of a process that also runs the hand-written steps is in another state: with the
    default glibc malloc, a step of mnist float64 alone returns about 2 MB to the OS and
    page-faults it back every time, which the interleaved process may not.
    """
    sys.path.insert(0, str(ROOT))
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.render.codegen import load_module, render_module
    from derive.spec.load import load_spec

    rows = []
    for name in CONFIGS:
        spec = load_spec(spec_dict(name))
        module = load_module(render_module(derive(build_model(spec))), spec.name)
        for dtype in DTYPES:
            params, X, Y = data(name, dtype)

            def step(p=params, X=X, Y=Y, module=module):
                _, grads = module.gradients(p, X, Y)
                module.sgd_step(p, grads, LR)

            count, median = timed_alone(step, 0.5 if quick else 1.0, quick)
            rows.append({"config": name, "dtype": dtype, "reps": count,
                         "alone_us": median})
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

            count, median = timed_alone(step, 0.8 if quick else 2.0, quick)
            results.append({"config": name, "dtype": dtype, "reps": count,
                            "torch_us": median})
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads()}
    print(json.dumps({"results": results, "info": info}))


def thread_environment(threads: int | None) -> dict[str, str]:
    """Environment that sets the BLAS libraries' thread count (read when NumPy loads)."""
    if threads is None:
        return {}
    return {name: str(threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                             "MKL_NUM_THREADS")}


def worker_payload(command: list[str], env: dict[str, str]) -> dict:
    """Run a bench's worker ``command`` in a fresh process with the extra environment
    ``env``: the JSON payload it prints, or {"error": its last line of stderr}."""
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, **env})
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(result.stdout)


#: rounds in which a bench's two sides timed each in a process of its own (the generated step
#: alone, PyTorch) take turns: (quick, full); each round times its share of the budget
ROUNDS = (1, 3)


def rounds(quick: bool) -> int:
    return ROUNDS[0 if quick else 1]


def in_turns(first, second, quick: bool) -> tuple[dict, dict]:
    """Run the workers ``first`` and ``second`` (callables returning a payload) in turns,
    rounds(quick) times each, so that the machine's drift over minutes (up to 30% between
    processes a minute apart) hits both alike: their payloads, each merged (merged_rounds)."""
    firsts, seconds = [], []
    for _ in range(rounds(quick)):
        firsts.append(first())
        seconds.append(second())
    return merged_rounds(firsts), merged_rounds(seconds)


def merged_rounds(payloads: list[dict]) -> dict:
    """One worker's payloads from several rounds as one: each row's timings (``*_us``) the
    median over the rounds, its repetitions summed; the rest as the first round has it, or
    the first failed round's error."""
    failed = next((payload for payload in payloads if "error" in payload), None)
    if failed is not None:
        return failed
    groups: dict[tuple, list[dict]] = {}
    for payload in payloads:
        for row in payload.get("results", []):
            groups.setdefault((row["config"], row["dtype"]), []).append(row)
    merged = []
    for group in groups.values():
        row = {key: statistics.median(r[key] for r in group) if key.endswith("_us") else value
               for key, value in group[0].items()}
        row["reps"] = sum(r["reps"] for r in group)
        merged.append(row)
    return {**payloads[0], "results": merged}


#: the streaming loop of memory_load's process: argv[1] MiB of float64, added to forever
_STREAM = ("import sys, numpy as np\n"
           "a = np.ones(int(sys.argv[1]) * 131072)\n"
           "while True:\n    a += 1.0\n")


@contextlib.contextmanager
def memory_load(mebibytes: int | None):
    """Inside: another process streams over ``mebibytes`` MiB (reading and writing all of it,
    over and over, one thread), so that the timed steps share the memory bus and the last-level
    cache with it, as with a busy neighbour on a shared machine; None or 0: nothing."""
    if not mebibytes:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", _STREAM, str(mebibytes)],
                               env={**os.environ, **thread_environment(1)})
    try:
        time.sleep(1.0)                 # its array allocated and being streamed over
        yield
    finally:
        process.kill()
        process.wait()


def load_average() -> str:
    """The 1-minute load average (about 0 on an idle machine, about 2 while a bench runs)."""
    return f"{os.getloadavg()[0]:.2f}"


def ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def ratio(top: float | None, bottom: float | None) -> str:
    return f"{top / bottom:.2f}x" if top and bottom else "-"


def targets(checks: list[tuple[str, float | None, float | None, float]]) -> str:
    """Whether a row meets an issue's targets: for each (what, ours, theirs, largest ratio),
    "what: met" when ours / theirs is at most the ratio, "what: MISSED" when above, nothing
    while a column is missing ("-" when every one is)."""
    parts = [f"{what}: {'met' if ours / theirs <= limit else 'MISSED'}"
             for what, ours, theirs, limit in checks if ours and theirs]
    return "; ".join(parts) or "-"


def run_worker(side: str, quick: bool, env: dict[str, str]) -> dict:
    """Run one side in a fresh process (with extra environment ``env``); its JSON payload."""
    command = [sys.executable, __file__, "--worker", side] + (["--quick"] if quick else [])
    return worker_payload(command, env)


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


def print_table(numpy_payload: dict, alone_payload: dict, torch_payload: dict) -> None:
    def by_row(payload: dict) -> dict:
        return {(row["config"], row["dtype"]): row for row in payload.get("results", [])}

    alone_rows, torch_rows = by_row(alone_payload), by_row(torch_payload)
    print("| config | dtype | generated µs | specialized hand-written µs | generated / specialized "
          "| general reference µs | generated / general | generated alone µs "
          "| PyTorch eager µs | generated alone / PyTorch |")
    print("|" + "---|" * 10)
    for row in numpy_payload["results"]:
        key = (row["config"], row["dtype"])
        gen, hand, ref = row["generated_us"], row["handwritten_us"], row["reference_us"]
        alone = alone_rows[key]["alone_us"] if key in alone_rows else None
        torch_us = torch_rows[key]["torch_us"] if key in torch_rows else None
        alone_text = f"{alone:.1f}" if alone else "-"
        torch_text = f"{torch_us:.1f}" if torch_us else "-"
        ratio = f"{alone / torch_us:.2f}x" if alone and torch_us else "-"
        sizes, *_, batch = CONFIGS[row["config"]]
        label = f"{row['config']} ({'-'.join(map(str, sizes))}, batch {batch})"
        print(f"| {label} | {row['dtype']} | {gen:.1f} | {hand:.1f} | {gen / hand:.3f}x "
              f"| {ref:.1f} | {gen / ref:.3f}x | {alone_text} | {torch_text} | {ratio} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--worker", choices=("numpy", "alone", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--default-malloc-only", action="store_true",
                        help="skip the second run with tuned glibc malloc settings")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.worker == "torch":
        torch_worker(args.quick)
        return 0
    if args.worker == "alone":
        print(json.dumps({"results": generated_alone_rows(args.quick)}))
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
        load_before = load_average()
        numpy_payload = run_worker("numpy", args.quick, env)
        alone_payload = run_worker("alone", args.quick, env)
        torch_payload = run_worker("torch", args.quick, env)
        if "error" in numpy_payload:
            print(f"NumPy side failed: {numpy_payload['error']}")
            return 1
        print(f"## {label}\n")
        print(f"NumPy {numpy_payload['numpy']}, BLAS: {numpy_payload['blas']}; "
              f"{os.cpu_count()} CPUs; the three NumPy steps interleaved in one process; "
              f"load average before {load_before}, after {load_average()}")
        if "error" in torch_payload:
            print(f"PyTorch eager: not measured ({torch_payload['error']})")
        else:
            info = torch_payload["info"]
            print(f"PyTorch {info['version']} eager in its own process: {info['threads']} "
                  f"intra-op threads, {info['interop_threads']} inter-op threads")
        print()
        print_table(numpy_payload, alone_payload, torch_payload)
        print()
        report.append({"environment": label, "numpy": numpy_payload, "alone": alone_payload,
                       "torch": torch_payload})
    print(f"(medians; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Performance targets of the graph refactor (networks as DAGs of ops), measured side by side.

1. Generic derivation of a residual graph: derive(build_model(load_spec(spec))) of 10 and 20
   residual blocks (dense relu -> dense -> add the block's input -> relu, width 8, a dense
   relu stem and a softmax + cross-entropy output; 20 blocks = 82 ops, 42 of them dense),
   cold (first call in a fresh process) and warm, wall clock and CPU time. Target: < 2 s for
   a 40-layer graph with skip connections (bench/derive_times.py has the same rows).
2. One training step (gradients + sgd_step) of the generated resmlp module: the built-in
   example (4-6-...-3, batch 32) and a larger one of the same topology (input 64, width 128,
   10 classes, batch 128), float64 and float32, against the specialized hand-written NumPy
   step bench/handwritten.resmlp_step (target: generated within 1.05x; checked at start-up to
   give the generated module's loss and gradients to 1e-10 relative in float64) and against
   PyTorch eager on the CPU (own process; compared with the generated step alone in a fresh
   process, as bench/train_step.py does).
3. Generated code of the v1 built-ins no slower than before the refactor: one training step
   of the module generated now vs the one committed before the refactor (generated/*_net.py
   at OLD_REVISION, read with `git show`), for xor, digits and deep_tanh, interleaved.

NumPy sides run interleaved in one process, in blocks of BLOCK steps whose order rotates, and
each number is the median over many steps (the method of bench/train_step.py). The load
average is printed with every table: on a busy machine the wall-clock numbers, and the ratios
of small steps, move. Usage (from the repository root):

    python bench/graph_bench.py            # about 2 minutes on 2 quiet cores (4 when busy)
    python bench/graph_bench.py --quick    # fewer repetitions, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.derive_times import RESIDUAL_TARGET_S, residual_in_fresh_process, residual_spec
from bench.train_step import (
    blas_description,
    interleaved,
    relative_error,
    timed_alone,
)

#: name -> (input, width, classes, batch); the topology of the built-in example resmlp
#: (a dense relu stem, two residual blocks, a softmax output), layers 1-10.
RESMLP = {
    "resmlp": (4, 6, 3, 32),
    "resmlp_large": (64, 128, 10, 128),
}
#: the dense layers of the resmlp topology (the others are add and activation ops)
DENSE_LAYERS = (1, 2, 3, 6, 7, 10)
TARGET_HANDWRITTEN = 1.05
#: The last commit before the graph refactor (HEAD~2 when this bench was written); its
#: generated/ holds the v1 modules. Overridden by --old-revision.
OLD_REVISION = "f6b846391089cf54ee1987ea0a2f777e8adf6683"
#: v1 built-in example -> batch of the timed step (the examples' demo batch sizes)
V1_EXAMPLES = {"xor": 4, "digits": 32, "deep_tanh": 32}
DTYPES = ("float64", "float32")
LR = 1e-3
DERIVATION_BLOCKS = (10, 20)


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


# --- data ------------------------------------------------------------------------------------


def resmlp_shapes(name: str) -> dict[str, tuple[int, ...]]:
    inputs, width, classes, _ = RESMLP[name]
    fan_in = {1: inputs, 2: width, 3: width, 6: width, 7: width, 10: width}
    shapes = {}
    for l in DENSE_LAYERS:
        size = classes if l == 10 else width
        shapes[f"W{l}"] = (size, fan_in[l])
        shapes[f"b{l}"] = (size,)
    return shapes


def resmlp_spec(name: str) -> dict:
    inputs, width, classes, _ = RESMLP[name]
    return residual_spec(2, width=width, inputs=inputs, classes=classes, name=name)


def resmlp_data(name: str, dtype: str, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Parameters (He-scaled weights, small random biases) and one batch, the same in every
    process."""
    *_, classes, rows = RESMLP[name]
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in resmlp_shapes(name).items():
        if key.startswith("W"):
            params[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / shape[1])).astype(dtype)
        else:
            params[key] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    X = rng.standard_normal((rows, resmlp_shapes(name)["W1"][1])).astype(dtype)
    Y = np.eye(classes, dtype=dtype)[rng.integers(0, classes, rows)]
    return params, X, Y


def v1_data(module, dtype: str, batch: int, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """The module's own initial parameters with small random biases, and one batch."""
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=np.float64)
    for key, value in params.items():
        if key.startswith("b"):
            value += 0.1 * rng.standard_normal(value.shape)
    params = {key: value.astype(dtype) for key, value in params.items()}
    inputs, outputs = params["W1"].shape[1], module.OUTPUT_SHAPE[0]
    X = rng.standard_normal((batch, inputs)).astype(dtype)
    if module.LOSS == "cross_entropy":
        Y = np.eye(outputs, dtype=dtype)[rng.integers(0, outputs, batch)]
    else:
        Y = rng.random((batch, outputs)).astype(dtype)
    return params, X, Y


# --- modules ---------------------------------------------------------------------------------


def generated_module(source_spec, name: str):
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.render.codegen import load_module, render_module
    from derive.spec.load import load_spec

    return load_module(render_module(derive(build_model(load_spec(source_spec)))), name)


def old_module(example: str, revision: str):
    """The v1 module of a built-in example as committed at ``revision`` (read-only git)."""
    from derive.render.codegen import load_module

    path = f"{revision}:generated/{example}_net.py"
    source = subprocess.run(["git", "-C", str(ROOT), "show", path], capture_output=True,
                            text=True, check=True)
    return load_module(source.stdout, f"{example}_net_old")


def compare(loss_a, grads_a: dict, loss_b, grads_b: dict) -> tuple[str, float]:
    """(worst quantity, its relative difference) between two (loss, grads)."""
    assert sorted(grads_a) == sorted(grads_b), (sorted(grads_a), sorted(grads_b))
    errors = {"loss": relative_error(loss_a, loss_b)}
    errors.update({key: relative_error(grads_a[key], grads_b[key]) for key in grads_b})
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def module_step(module, params, X, Y):
    def step():
        _, grads = module.gradients(params, X, Y)
        module.sgd_step(params, grads, LR)
    return step


def numpy_worker(quick: bool, revision: str) -> dict:
    from bench.handwritten import STEPS

    budget = 0.7 if quick else 1.5
    checks, resmlp_rows, v1_rows, notes = [], [], [], []
    modules = {}
    for name in RESMLP:
        source = "resmlp" if name == "resmlp" else resmlp_spec(name)
        module = modules[name] = generated_module(source, name)
        params, X, Y = resmlp_data(name, "float64")
        got = {key: value.shape for key, value in module.init_params().items()}
        assert got == resmlp_shapes(name), f"{name}: parameters {got}"
        loss_gen, grads_gen = module.gradients(params, X, Y)
        loss_hand, grads_hand = STEPS[name]({k: v.copy() for k, v in params.items()}, X, Y, LR)
        worst, error = compare(loss_hand, grads_hand, loss_gen, grads_gen)
        assert error <= 1e-10, f"{name}: hand-written {worst} differs by {error:.1e}"
        checks.append(f"{name}: hand-written = generated to {error:.1e} (worst: {worst})")
    for name in RESMLP:
        for dtype in DTYPES:
            params_gen, X, Y = resmlp_data(name, dtype)
            params_hand, _, _ = resmlp_data(name, dtype)

            def hand(p=params_hand, X=X, Y=Y, step=STEPS[name]):
                step(p, X, Y, LR)

            (gen_us, hand_us), reps = interleaved(
                [module_step(modules[name], params_gen, X, Y), hand], budget, quick)
            resmlp_rows.append({"config": name, "dtype": dtype, "reps": reps,
                                "generated_us": gen_us, "handwritten_us": hand_us})
            print(f"  {name} {dtype}: {reps} reps per side", file=sys.stderr, flush=True)

    for example, batch in V1_EXAMPLES.items():
        try:
            old = old_module(example, revision)
        except (subprocess.CalledProcessError, OSError) as error:
            notes.append(f"{example}: no old module at {revision[:12]} ({error})")
            continue
        new = generated_module(example, f"{example}_net_new")
        params, X, Y = v1_data(new, "float64", batch)
        worst, error = compare(*old.gradients(params, X, Y), *new.gradients(params, X, Y))
        checks.append(f"{example}: new module = old to {error:.1e} (worst: {worst})")
        for dtype in DTYPES:
            params_old, X, Y = v1_data(new, dtype, batch)
            params_new, _, _ = v1_data(new, dtype, batch)
            (old_us, new_us), reps = interleaved(
                [module_step(old, params_old, X, Y), module_step(new, params_new, X, Y)],
                budget, quick)
            v1_rows.append({"example": example, "dtype": dtype, "batch": batch, "reps": reps,
                            "old_us": old_us, "new_us": new_us})
            print(f"  {example} {dtype}: {reps} reps per side", file=sys.stderr, flush=True)
    return {"resmlp": resmlp_rows, "v1": v1_rows, "checks": checks, "notes": notes,
            "blas": blas_description(), "numpy": np.__version__}


def alone_worker(quick: bool) -> dict:
    """The generated resmlp step alone in its process (compared with PyTorch's)."""
    rows = []
    for name in RESMLP:
        module = generated_module("resmlp" if name == "resmlp" else resmlp_spec(name), name)
        for dtype in DTYPES:
            params, X, Y = resmlp_data(name, dtype)
            step = module_step(module, params, X, Y)
            count, median = timed_alone(step, 0.5 if quick else 1.0, quick)
            rows.append({"config": name, "dtype": dtype, "reps": count,
                         "alone_us": median})
    return {"results": rows}


def torch_worker(quick: bool, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(True)
    rows = []
    for name, (*_, batch) in RESMLP.items():
        for dtype in DTYPES:
            params_np, X_np, Y_np = resmlp_data(name, dtype)
            p = {key: torch.tensor(value, requires_grad=True) for key, value in params_np.items()}
            X, Y = torch.from_numpy(X_np), torch.from_numpy(Y_np)

            def step(p=p, X=X, Y=Y, batch=batch):
                h1 = torch.relu(torch.addmm(p["b1"], X, p["W1"].T))
                a2 = torch.relu(torch.addmm(p["b2"], h1, p["W2"].T))
                h2 = torch.relu(h1 + torch.addmm(p["b3"], a2, p["W3"].T))
                a6 = torch.relu(torch.addmm(p["b6"], h2, p["W6"].T))
                h3 = torch.relu(h2 + torch.addmm(p["b7"], a6, p["W7"].T))
                z10 = torch.addmm(p["b10"], h3, p["W10"].T)
                loss = -(Y * torch.log_softmax(z10, dim=1)).sum() / batch
                loss.backward()
                with torch.no_grad():
                    for value in p.values():
                        value -= LR * value.grad
                        value.grad = None

            count, median = timed_alone(step, 0.8 if quick else 2.0, quick)
            rows.append({"config": name, "dtype": dtype, "reps": count,
                         "torch_us": median})
    return {"results": rows, "info": {"version": torch.__version__,
                                      "threads": torch.get_num_threads()}}


def thread_environment(threads: int | None) -> dict[str, str]:
    """Environment that caps the BLAS (and OpenMP) threads of a worker, if asked."""
    if not threads:
        return {}
    return {key: str(threads) for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                          "MKL_NUM_THREADS")}


def run_worker(side: str, quick: bool, revision: str, threads: int | None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side,
               "--old-revision", revision] + (["--quick"] if quick else [])
    if threads:
        command += ["--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT,
                            env={**os.environ, **thread_environment(threads)})
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(result.stdout)


# --- report ----------------------------------------------------------------------------------


def derivation_table(rows: list[dict]) -> None:
    print("| graph | layers (dense) | cold s (CPU s) | warm s (CPU s) | imports s "
          f"| target < {RESIDUAL_TARGET_S:g} s |")
    print("|" + "---|" * 6)
    for row in rows:
        if "error" in row:
            print(f"| residual {row['blocks']} blocks | - | failed: {row['error']} | | | |")
            continue
        worst = max(row["cold_s"], row["warm_s"])
        met = "met" if worst < RESIDUAL_TARGET_S else "missed"
        print(f"| residual {row['blocks']} blocks x width 8 | {row['layers']} "
              f"({row['dense']}) | {row['cold_s']:.2f} ({row['cold_cpu_s']:.2f}) "
              f"| {row['warm_s']:.2f} ({row['warm_cpu_s']:.2f}) | {row['import_s']:.2f} "
              f"| {met} |")


def resmlp_table(numpy_payload: dict, alone_payload: dict, torch_payload: dict) -> None:
    def by_row(payload: dict) -> dict:
        return {(row["config"], row["dtype"]): row for row in payload.get("results", [])}

    alone, torch_rows = by_row(alone_payload), by_row(torch_payload)
    print("| config | dtype | generated µs | hand-written µs | generated / hand-written "
          f"(target ≤ {TARGET_HANDWRITTEN}) | generated alone µs | PyTorch eager µs "
          "| generated alone / PyTorch |")
    print("|" + "---|" * 8)
    for row in numpy_payload["resmlp"]:
        key = (row["config"], row["dtype"])
        gen, hand = row["generated_us"], row["handwritten_us"]
        alone_us = alone[key]["alone_us"] if key in alone else None
        torch_us = torch_rows[key]["torch_us"] if key in torch_rows else None
        inputs, width, classes, batch = RESMLP[row["config"]]
        label = f"{row['config']} ({inputs}-{width}x5-{classes}, batch {batch})"
        ratio = gen / hand
        print(f"| {label} | {row['dtype']} | {gen:.1f} | {hand:.1f} | {ratio:.3f}x "
              f"{'' if ratio <= TARGET_HANDWRITTEN else '(missed)'} "
              f"| {f'{alone_us:.1f}' if alone_us else '-'} "
              f"| {f'{torch_us:.1f}' if torch_us else '-'} "
              f"| {f'{alone_us / torch_us:.2f}x' if alone_us and torch_us else '-'} |")


def v1_table(numpy_payload: dict, revision: str) -> None:
    print(f"| example | dtype | batch | old µs ({revision[:7]}) | new µs | new / old |")
    print("|" + "---|" * 6)
    for row in numpy_payload["v1"]:
        print(f"| {row['example']} | {row['dtype']} | {row['batch']} | {row['old_us']:.1f} "
              f"| {row['new_us']:.1f} | {row['new_us'] / row['old_us']:.3f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--worker", choices=("numpy", "alone", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--old-revision", default=OLD_REVISION, metavar="REV",
                        help="commit whose generated/ holds the v1 modules (default: the last "
                             "commit before the graph refactor)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="cap BLAS/OpenMP threads (and PyTorch's) at N in the step "
                             "workers; on a busy machine two spinning BLAS threads can slow "
                             "the large steps down by large factors (default: library defaults)")
    parser.add_argument("--skip-derivation", action="store_true", help="skip part 1")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.worker == "numpy":
        print(json.dumps(numpy_worker(args.quick, args.old_revision)))
        return 0
    if args.worker == "alone":
        print(json.dumps(alone_worker(args.quick)))
        return 0
    if args.worker == "torch":
        print(json.dumps(torch_worker(args.quick, args.threads)))
        return 0

    started = time.perf_counter()
    report = {}
    if not args.skip_derivation:
        load_before = _load()
        derivations = [residual_in_fresh_process(blocks, repeat=2 if args.quick else 3)
                       for blocks in DERIVATION_BLOCKS]
        print(f"## 1. Generic derivation of a residual graph (fresh process per graph; "
              f"load average before {load_before}, after {_load()}, {os.cpu_count()} CPUs)\n")
        derivation_table(derivations)
        print()
        report["derivation"] = derivations

    load_before = _load()
    numpy_payload = run_worker("numpy", args.quick, args.old_revision, args.threads)
    alone_payload = run_worker("alone", args.quick, args.old_revision, args.threads)
    torch_payload = run_worker("torch", args.quick, args.old_revision, args.threads)
    load_after = _load()
    report.update(numpy=numpy_payload, alone=alone_payload, torch=torch_payload)
    if "error" in numpy_payload:
        print(f"NumPy side failed: {numpy_payload['error']}")
        return 1
    thread_note = f" (capped by --threads {args.threads})" if args.threads else ""
    print(f"## 2. resmlp training step (gradients + sgd_step)\n\nNumPy {numpy_payload['numpy']}, "
          f"BLAS: {numpy_payload['blas']}{thread_note}; generated and hand-written interleaved in one "
          f"process; load average before {load_before}, after {load_after}")
    if "error" in torch_payload:
        print(f"PyTorch eager: not measured ({torch_payload['error']})")
    else:
        info = torch_payload["info"]
        print(f"PyTorch {info['version']} eager in its own process, {info['threads']} threads")
    print("Checks: " + "; ".join(numpy_payload["checks"]))
    for note in numpy_payload["notes"]:
        print(f"Note: {note}")
    print()
    resmlp_table(numpy_payload, alone_payload, torch_payload)
    print()
    print(f"## 3. v1 built-ins: module generated now vs committed at {args.old_revision[:12]} "
          f"(interleaved, same process; load average before {load_before}, after "
          f"{load_after})\n")
    v1_table(numpy_payload, args.old_revision)
    print()
    print(f"(medians; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Times of the core pipeline, against the targets of the core issues.

    python bench/derive_times.py

Prints: generic derivation (symbolic sizes) of a 10-layer network (target < 1 s, measured
cold: first call in a fresh process, activation derivatives not yet cached, and warm); generic
derivation of a residual graph of 20 blocks (dense relu -> dense -> add the block's input ->
relu; 42 dense layers, 82 ops; target < 2 s), cold in a fresh process of its own and warm;
verification by expansion of the 2-3-1 xor network (< 2 s) and of a 4-4-4-4-2 tanh network
(< 30 s), each with the default 20 points at 50 digits. When ``derive.verify.expansion`` cannot be
imported, the verification rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESIDUAL_TARGET_S = 2.0


def _import_pipeline() -> float:
    """Import the core (spec, model, derivation) into this module's globals; seconds taken."""
    start = time.perf_counter()
    global derive, build_model, load_spec
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.spec.load import load_spec
    return time.perf_counter() - start


def spec(sizes: list[int], activations: list[str], loss: str, name: str):
    layers = [{"size": n, "activation": a} for n, a in zip(sizes[1:], activations)]
    return load_spec({"name": name, "input": sizes[0], "layers": layers, "loss": loss})


def residual_spec(blocks: int, width: int = 8, inputs: int | None = None, classes: int = 10,
                  name: str | None = None) -> dict:
    """A residual MLP as a spec dict: a dense relu stem, ``blocks`` blocks (dense relu ->
    dense -> add the block's input -> activation relu), a dense softmax output, cross-entropy.

    Layers: 1 + 4 * blocks + 1 (2 * blocks + 2 of them dense). ``blocks=2, width=6,
    inputs=4, classes=3`` is the built-in example resmlp.
    """
    layers = [{"size": width, "activation": "relu", "name": "h0"}]
    for k in range(1, blocks + 1):
        layers += [{"size": width, "activation": "relu"},
                   {"op": "dense", "size": width, "name": f"r{k}"},
                   {"op": "add", "inputs": [f"h{k - 1}", f"r{k}"]},
                   {"op": "activation", "activation": "relu", "name": f"h{k}"}]
    layers.append({"size": classes, "activation": "softmax"})
    return {"name": name or f"residual_{blocks}x{width}", "input": inputs or width,
            "layers": layers, "loss": "cross_entropy"}


def timed(fn, repeat: int = 1) -> tuple[float, float]:
    """(first run, median of the rest or the first) in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:] or times)


def residual_times(blocks: int, repeat: int = 3) -> dict:
    """Cold (first call in this process) and warm (median of the other calls) times of
    derive(build_model(load_spec(d))), wall clock and this process's CPU time (which other
    processes on the machine disturb less)."""
    source = residual_spec(blocks)
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        derive(build_model(load_spec(source)))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    layers = len(source["layers"])
    dense = sum(1 for layer in source["layers"] if layer.get("op", "dense") == "dense")
    return {"blocks": blocks, "layers": layers, "dense": dense, "repeat": repeat,
            "cold_s": wall[0], "warm_s": statistics.median(wall[1:] or wall),
            "cold_cpu_s": cpu[0], "warm_cpu_s": statistics.median(cpu[1:] or cpu)}


def residual_in_fresh_process(blocks: int, repeat: int = 3) -> dict:
    """residual_times in a fresh Python process (so "cold" is cold), plus its import time."""
    command = [sys.executable, str(Path(__file__).resolve()), "--residual-worker", str(blocks),
               "--repeat", str(repeat)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"blocks": blocks, "error": lines[-1] if lines else "failed"}
    payload = json.loads(result.stdout)
    payload["process_s"] = time.perf_counter() - started
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--residual-worker", type=int, metavar="BLOCKS", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import_s = _import_pipeline()
    if args.residual_worker is not None:
        payload = residual_times(args.residual_worker, args.repeat)
        payload["import_s"] = import_s
        print(json.dumps(payload))
        return

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    row = residual_in_fresh_process(20)
    if "error" in row:
        print(f"generic derivation, residual 20 blocks: failed ({row['error']})")
    else:
        print(f"generic derivation, residual graph of 20 blocks ({row['layers']} layers, "
              f"{row['dense']} dense, width 8, softmax+CE): cold {row['cold_s']:.3f} s "
              f"(CPU {row['cold_cpu_s']:.3f} s), warm {row['warm_s']:.3f} s "
              f"(CPU {row['warm_cpu_s']:.3f} s); fresh process, imports {row['import_s']:.2f} s"
              f"   (target < {RESIDUAL_TARGET_S:g} s)")

    ten = spec([8] + [16] * 9 + [10], ["tanh"] * 5 + ["relu"] * 4 + ["softmax"],
               "cross_entropy", "ten_layers")
    cold, warm = timed(lambda: derive(build_model(ten)), repeat=5)
    print(f"generic derivation, 10 layers (tanh/relu/softmax+CE): cold {cold:.3f} s, "
          f"warm {warm:.3f} s   (target < 1 s)")

    try:
        from derive.verify.expansion import verify
    except Exception as error:  # noqa: BLE001 - derive.verify.expansion is being rewritten
        print(f"verify rows skipped: derive.verify.expansion does not import "
              f"({type(error).__name__}: {error})")
        return
    from derive import derivation

    clear = getattr(getattr(derivation, "activation_derivative", None), "cache_clear", None)
    if clear is not None:
        clear()
    rows = [("xor 2-3-1", load_spec("xor"), 3, "< 2 s"),
            ("tanh 4-4-4-4-2", spec([4, 4, 4, 4, 2], ["tanh"] * 4, "mse", "tanh_4x4"), 2,
             "< 30 s")]
    for label, network, repeat, target in rows:
        try:
            cold, warm = timed(lambda network=network: verify(network), repeat=repeat)
        except Exception as error:  # noqa: BLE001 - derive.verify.expansion is being rewritten
            print(f"verify {label}: skipped, it raised {type(error).__name__}: {error}")
            continue
        print(f"verify {label}, 20 points x 50 digits: cold {cold:.2f} s, warm {warm:.2f} s"
              f"   (target {target})")

if __name__ == "__main__":
    main()

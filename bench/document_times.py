"""Time and peak memory of the commands that print a whole network, against issue 14's targets.

    python bench/document_times.py            # every row
    python bench/document_times.py --quick    # the MNIST-sized rows only

Each row runs one command line (``derive latex …``, ``derive show …``, ``derive codegen …``)
in a fresh Python process, imports included, and reports its wall time, CPU time and peak
resident memory (``resource.getrusage`` in that process). The networks: 784-128-64-10 (relu,
relu, softmax + cross-entropy: an MNIST classifier, 109 386 parameters) and a chain of 1000
dense tanh layers of width 4 (MSE). Targets: ``latex`` and ``latex --fragment`` of the MNIST
network under 5 s and 200 MB; ``latex`` of the 1000-layer chain under 30 s; ``show`` and
``codegen`` of it under 10 s. The load average is printed first: on a busy machine the wall
time exceeds the CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MNIST = {"name": "mnist", "input": 784, "loss": "cross_entropy",
         "layers": [{"size": 128, "activation": "relu"}, {"size": 64, "activation": "relu"},
                    {"size": 10, "activation": "softmax"}]}
CHAIN = {"name": "chain1000", "input": 4, "loss": "mse",
         "layers": [{"size": 4, "activation": "tanh"}] * 1000}

#: (label, spec, command line after the spec, seconds, MiB or None)
ROWS = [
    ("latex 784-128-64-10", MNIST, ["latex"], 5.0, 200),
    ("latex --fragment 784-128-64-10", MNIST, ["latex", "--fragment"], 5.0, 200),
    ("latex 1000-layer chain", CHAIN, ["latex"], 30.0, None),
    ("latex --fragment 1000-layer chain", CHAIN, ["latex", "--fragment"], 30.0, None),
    ("show 1000-layer chain", CHAIN, ["show"], 10.0, None),
    ("codegen 1000-layer chain", CHAIN, ["codegen"], 10.0, None),
]


def worker(argv: list[str]) -> None:
    """Run ``derive ARGV`` in this process and print its measurements as JSON."""
    start, start_cpu = time.perf_counter(), time.process_time()
    sys.path.insert(0, str(ROOT))
    from derive.cli.main import main

    code = main(argv)
    print(json.dumps({
        "code": code, "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - start_cpu,
        # ru_maxrss is in KiB on Linux
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def measure(spec: dict, command: list[str], folder: Path, timeout: float) -> dict:
    """One command in a fresh process; its output goes to a file in ``folder``."""
    spec_path = folder / f"{spec['name']}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    output = folder / f"{spec['name']}-{'-'.join(command)}.out"
    argv = [command[0], str(spec_path), *command[1:]]
    if command[0] != "show":
        argv += ["-o", str(output), "--force"]
    try:
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(argv)],
            capture_output=True, text=True, check=False, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"still running after {timeout:.0f} s"}
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {result.returncode}"}
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return row if row["code"] == 0 else {"error": f"exit {row['code']}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MNIST-sized rows only")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds after which a row is reported as still running")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows = [row for row in ROWS if not args.quick or row[1] is MNIST]
    with tempfile.TemporaryDirectory(prefix="derive-bench-") as folder:
        for label, spec, command, seconds, mib in rows:
            row = measure(spec, command, Path(folder), args.timeout)
            target = f"< {seconds:g} s" + (f", < {mib} MiB" if mib else "")
            if "error" in row:
                print(f"{label:<36} {row['error']}   (target {target})")
                continue
            ok = row["wall_s"] < seconds and (mib is None or row["peak_mib"] < mib)
            print(f"{label:<36} {row['wall_s']:6.2f} s (CPU {row['cpu_s']:6.2f} s), peak "
                  f"{row['peak_mib']:5.0f} MiB   (target {target}: {'met' if ok else 'MISSED'})",
                  flush=True)


if __name__ == "__main__":
    main()

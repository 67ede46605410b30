"""Times of `derive verify`: every built-in example, 8-8-8-8-2, depth 10 and 30 x width 8.

    python bench/verify_times.py            # every row
    python bench/verify_times.py xor digits # only these rows

Each row: the network, the widths of the copy that was expanded (depth 30 is over the
parameter budget: its repeated layers are left out, see derive/verify/reduction.py), its
parameter count, whether every formula agreed, and the time of ``derive.verify.verify`` with
the default 20 points at 50 digits, as wall clock and as this process's CPU time (which other processes on a shared machine disturb less). Targets (issue
14): every built-in example under 5 s; 8-8-8-8-2 checked at its own widths.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from derive.spec.load import NetworkSpec, list_examples, load_spec
from derive.verify import verify

TARGET_S = 5.0


def chain(name: str, sizes: list[int]) -> NetworkSpec:
    """A dense chain: tanh hidden layers, an identity output, squared error."""
    layers = [{"size": n, "activation": "tanh"} for n in sizes[1:-1]]
    layers.append({"size": sizes[-1], "activation": "identity"})
    return load_spec({"name": name, "input": sizes[0], "layers": layers, "loss": "mse"})


def cases() -> list[tuple[str, NetworkSpec]]:
    out = [(name, load_spec(name)) for name, _ in list_examples()]
    out.append(("8-8-8-8-2", chain("net_8_8_8_8_2", [8, 8, 8, 8, 2])))
    out.append(("depth10x8", chain("depth10x8", [8] * 10 + [2])))
    out.append(("depth30x8", chain("depth30x8", [8] * 30 + [2])))
    return out


def main(argv: list[str]) -> int:
    wanted = set(argv)
    print(f"{'network':<14} {'checked copy':<28} {'params':>6}  ok    wall s   cpu s")
    slow = []
    for name, spec in cases():
        if wanted and name not in wanted:
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        report = verify(spec)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        shape = "-".join(map(str, report.sizes))
        print(f"{name:<14} {shape:<28} {report.parameters:>6}  {report.ok!s:<5} "
              f"{wall:7.2f} {cpu:7.2f}", flush=True)
        if cpu > TARGET_S:
            slow.append(name)
    print(f"over {TARGET_S} s of CPU: {', '.join(slow) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Times of the core pipeline, against the targets of the core issue.

    python bench/derive_times.py

Prints: generic derivation (symbolic sizes) of a 10-layer network (target < 1 s, measured
cold: first call in a fresh process, activation derivatives not yet cached, and warm);
verification by expansion of the 2-3-1 xor network (< 2 s) and of a 4-4-4-4-2 tanh network
(< 30 s), each with the default 20 points at 50 digits.
"""

from __future__ import annotations

import statistics
import time

from derive.derivation import activation_derivative, derive
from derive.model import build_model
from derive.spec import load_spec
from derive.verify import verify


def spec(sizes: list[int], activations: list[str], loss: str, name: str):
    layers = [{"size": n, "activation": a} for n, a in zip(sizes[1:], activations)]
    return load_spec({"name": name, "input": sizes[0], "layers": layers, "loss": loss})


def timed(fn, repeat: int = 1) -> tuple[float, float]:
    """(first run, median of the rest or the first) in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:] or times)


def main() -> None:
    ten = spec([8] + [16] * 9 + [10], ["tanh"] * 5 + ["relu"] * 4 + ["softmax"],
               "cross_entropy", "ten_layers")
    cold, warm = timed(lambda: derive(build_model(ten)), repeat=5)
    print(f"generic derivation, 10 layers (tanh/relu/softmax+CE): cold {cold:.3f} s, "
          f"warm {warm:.3f} s   (target < 1 s)")
    activation_derivative.cache_clear()
    xor = load_spec("xor")
    cold, warm = timed(lambda: verify(xor), repeat=3)
    print(f"verify xor 2-3-1, 20 points x 50 digits: cold {cold:.2f} s, warm {warm:.2f} s"
          "   (target < 2 s)")
    deep = spec([4, 4, 4, 4, 2], ["tanh"] * 4, "mse", "tanh_4x4")
    cold, warm = timed(lambda: verify(deep), repeat=2)
    print(f"verify tanh 4-4-4-4-2, 20 points x 50 digits: cold {cold:.2f} s, warm {warm:.2f} s"
          "   (target < 30 s)")


if __name__ == "__main__":
    main()

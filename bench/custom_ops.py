"""Custom ops: a training step of the generated code vs the same layer hand-written with einsum.

Three layers written in the spec in index notation (README, "A new layer kind in five
lines"), each followed by a dense softmax output with cross-entropy:

- gated:    a_j = tanh(Σ_k U_jk x_k) · sigmoid(Σ_k V_jk x_k) + c_j     (64 -> 256 -> 10)
- rbf:      a_j = exp(-Σ_k (x_k - m_jk)² · g_j²)                       (32 -> 64 -> 10)
- bilinear: a_j = Σ_k Σ_m x_k U_jkm x_m + b_j                          (16 -> 32 -> 10)

The hand-written side is what someone writes with ``np.einsum`` for the same layer: forward,
backward and the SGD update, batch 128, in the dtype of the parameters. At start-up each
hand-written step is checked to give the generated module's loss and gradients (float64,
1e-10 relative). Both sides run interleaved in one process (bench/train_step.interleaved),
median µs per step. Usage:

    python bench/custom_ops.py            # about a minute on 2 quiet cores
    python bench/custom_ops.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_step import interleaved, relative_error

BATCH = 128
LR = 1e-3
DTYPES = ("float64", "float32")
#: name -> (input, width, classes, custom op)
LAYERS = {
    "gated": (64, 256, 10, {
        "name": "gated",
        "expr": "tanh(sum(U[j,k]*x[k], k)) * sigmoid(sum(V[j,k]*x[k], k)) + c[j]",
        "params": {"U": ["size", "in"], "V": ["size", "in"], "c": ["size"]}}),
    "rbf": (32, 64, 10, {
        "name": "rbf", "expr": "exp(-sum((x[k] - m[j,k])^2, k) * g[j]^2)",
        "params": {"m": ["size", "in"], "g": ["size"]}}),
    "bilinear": (16, 32, 10, {
        "name": "bilinear", "expr": "sum(sum(x[k]*U[j,k,m]*x[m], k), m) + b[j]",
        "params": {"U": ["size", "in", "in"], "b": ["size"]}}),
}


def spec_dict(name: str) -> dict:
    n_in, width, classes, op = LAYERS[name]
    return {"name": f"{name}_bench", "input": n_in, "loss": "cross_entropy",
            "layers": [{"size": width, "op": op}, {"size": classes, "activation": "softmax"}]}


def data(name: str, module, dtype: str, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {key: (value + 0.1 * rng.standard_normal(value.shape)).astype(dtype)
              for key, value in module.init_params(seed=seed).items()}
    n_in, _, classes, _ = LAYERS[name]
    X = rng.standard_normal((BATCH, n_in)).astype(dtype)
    Y = np.eye(classes, dtype=dtype)[rng.integers(0, classes, BATCH)]
    return params, X, Y


# --- the same layers by hand, with einsum ----------------------------------------------------


def _softmax_output(H, W2, b2, Y):
    """Dense softmax output with cross-entropy: (loss, its delta / B, dW2, db2)."""
    logits = np.einsum("bj,cj->bc", H, W2) + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    B = Y.shape[0]
    loss = float(np.sum(-Y * (shifted - np.log(total)))) / B
    delta = (exp / total - Y) / B
    return loss, delta, np.einsum("bc,bj->cj", delta, H), delta.sum(axis=0)


def gated_step(p: dict, X, Y, lr: float):
    U, V, c, W2, b2 = p["U1"], p["V1"], p["c1"], p["W2"], p["b2"]
    S1 = np.einsum("jk,bk->bj", U, X)
    S2 = np.einsum("jk,bk->bj", V, X)
    T = np.tanh(S1)
    G = 0.5 + 0.5 * np.tanh(0.5 * S2)
    H = T * G + c
    loss, delta2, dW2, db2 = _softmax_output(H, W2, b2, Y)
    delta1 = np.einsum("bc,cj->bj", delta2, W2)
    dS1 = delta1 * G * (1 - T * T)
    dS2 = delta1 * T * G * (1 - G)
    grads = {"U1": np.einsum("bj,bk->jk", dS1, X), "V1": np.einsum("bj,bk->jk", dS2, X),
             "c1": delta1.sum(axis=0), "W2": dW2, "b2": db2}
    for key, grad in grads.items():
        p[key] -= lr * grad
    return loss, grads


def rbf_step(p: dict, X, Y, lr: float):
    m, g, W2, b2 = p["m1"], p["g1"], p["W2"], p["b2"]
    D = X[:, None, :] - m[None, :, :]                       # (B, J, K)
    S = np.einsum("bjk,bjk->bj", D, D)
    H = np.exp(-S * g * g)
    loss, delta2, dW2, db2 = _softmax_output(H, W2, b2, Y)
    delta1 = np.einsum("bc,cj->bj", delta2, W2)
    dS = -delta1 * H * g * g
    grads = {"m1": np.einsum("bj,bjk->jk", -2 * dS, D),
             "g1": np.einsum("bj,bj->j", -2 * delta1 * H * S, np.broadcast_to(g, S.shape)),
             "W2": dW2, "b2": db2}
    for key, grad in grads.items():
        p[key] -= lr * grad
    return loss, grads


def bilinear_step(p: dict, X, Y, lr: float):
    U, b, W2, b2 = p["U1"], p["b1"], p["W2"], p["b2"]
    H = np.einsum("bk,jkm,bm->bj", X, U, X) + b
    loss, delta2, dW2, db2 = _softmax_output(H, W2, b2, Y)
    delta1 = np.einsum("bc,cj->bj", delta2, W2)
    grads = {"U1": np.einsum("bj,bk,bm->jkm", delta1, X, X), "b1": delta1.sum(axis=0),
             "W2": dW2, "b2": db2}
    for key, grad in grads.items():
        p[key] -= lr * grad
    return loss, grads


STEPS = {"gated": gated_step, "rbf": rbf_step, "bilinear": bilinear_step}


def check_same_numbers(name: str, module) -> None:
    """The hand-written step gives the generated module's loss and gradients (float64)."""
    params, X, Y = data(name, module, "float64")
    loss, grads = module.gradients(params, X, Y)
    hand_loss, hand = STEPS[name]({k: v.copy() for k, v in params.items()}, X, Y, LR)
    errors = {"loss": relative_error(hand_loss, loss)}
    errors.update({key: relative_error(hand[key], grads[key]) for key in grads})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, f"{name}: hand-written {worst} differs by {errors[worst]:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.render.codegen import load_module, render_module
    from derive.spec.load import load_spec

    print(f"# custom ops: one training step (gradients + SGD), batch {BATCH}, median µs; "
          f"load {os.getloadavg()[0]:.2f}")
    print("| layer | sizes | dtype | generated | hand-written einsum | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name in LAYERS:
        spec = load_spec(spec_dict(name))
        module = load_module(render_module(derive(build_model(spec))), spec.name)
        check_same_numbers(name, module)
        for dtype in DTYPES:
            params_gen, X, Y = data(name, module, dtype)
            params_hand, _, _ = data(name, module, dtype)

            def generated(p=params_gen, X=X, Y=Y, module=module):
                _, grads = module.gradients(p, X, Y)
                module.sgd_step(p, grads, LR)

            def handwritten(p=params_hand, X=X, Y=Y, step=STEPS[name]):
                step(p, X, Y, LR)

            (gen, hand), _reps = interleaved([generated, handwritten],
                                             0.5 if args.quick else 2.0, args.quick)
            sizes = "-".join(map(str, LAYERS[name][:3]))
            print(f"| {name} | {sizes} | {dtype} | {gen:.0f} | {hand:.0f} | "
                  f"{gen / hand:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

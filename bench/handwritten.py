"""Specialized hand-written training steps: the baseline of bench/train_step.py.

What a competent engineer writes by hand for each benchmark network when it is fixed: one
function per network, layers spelled out (no loop over layers, no dispatch on activation
names), vectorized over the batch (rows = samples), in the dtype of the parameters. The math
and the numerical practices are those of derive's generated code, so that the two do the same
work:

- sigmoid as 0.5 + 0.5 tanh(z / 2) (no overflow for any z);
- softmax after subtracting the row maximum, and the cross-entropy from the logits through
  log-sum-exp (no log(0)); the shifted logits and their exponentials are computed once and
  serve both the softmax and the loss, as anyone writing both by hand would;
- the fused softmax + cross-entropy output error A - Y, the batch mean taken once, by dividing
  the output delta by B;
- fresh matrix products reused in place, as the generated code does: the bias is added to
  X @ W1.T in place, and the hidden deltas multiply delta2 @ W2 in place by sigma'; SGD
  updates in place. (With these the baseline does no more work than the generated code, so
  the ratio measures what the generated module's structure costs, not an idiom.)

Each step updates ``params`` in place and returns the loss (computed before the update) and the
gradients, so bench/train_step.py can check at start-up that they equal the generated module's
(1e-10 relative in float64). The mnist and wide networks have the same structure (relu, relu,
softmax + cross-entropy), so one function serves both; likewise resmlp and resmlp_large
(bench/graph_bench.py), the residual topology of the built-in example resmlp.
"""

from __future__ import annotations

import numpy as np


def xor_step(params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> tuple[float, dict]:
    """2-3-1, sigmoid hidden and output layers, C = 1/2 |a - y|^2."""
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    X = np.asarray(X, dtype=W1.dtype)
    Y = np.asarray(Y, dtype=W1.dtype)
    B = X.shape[0]
    Z1 = X @ W1.T
    Z1 += b1
    A1 = 0.5 + 0.5 * np.tanh(0.5 * Z1)
    Z2 = A1 @ W2.T
    Z2 += b2
    A2 = 0.5 + 0.5 * np.tanh(0.5 * Z2)
    loss = float(np.sum(0.5 * (A2 - Y) ** 2)) / B
    delta2 = (A2 - Y) * A2 * (1 - A2) / B
    dW2 = delta2.T @ A1
    db2 = delta2.sum(axis=0)
    delta1 = delta2 @ W2
    delta1 *= A1 * (1 - A1)
    dW1 = delta1.T @ X
    db1 = delta1.sum(axis=0)
    W1 -= lr * dW1
    b1 -= lr * db1
    W2 -= lr * dW2
    b2 -= lr * db2
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def digits_step(params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> tuple[float, dict]:
    """64-32-10, tanh hidden layer, softmax output, cross-entropy."""
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    X = np.asarray(X, dtype=W1.dtype)
    Y = np.asarray(Y, dtype=W1.dtype)
    B = X.shape[0]
    Z1 = X @ W1.T
    Z1 += b1
    A1 = np.tanh(Z1)
    Z2 = A1 @ W2.T
    Z2 += b2
    shifted = Z2 - Z2.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    A2 = exp / total
    loss = float(np.sum(-Y * (shifted - np.log(total)))) / B
    delta2 = (A2 - Y) / B
    dW2 = delta2.T @ A1
    db2 = delta2.sum(axis=0)
    delta1 = delta2 @ W2
    delta1 *= 1 - A1**2
    dW1 = delta1.T @ X
    db1 = delta1.sum(axis=0)
    W1 -= lr * dW1
    b1 -= lr * db1
    W2 -= lr * dW2
    b2 -= lr * db2
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def relu_relu_softmax_step(params: dict, X: np.ndarray, Y: np.ndarray,
                           lr: float) -> tuple[float, dict]:
    """n0-n1-n2-n3, relu hidden layers, softmax output, cross-entropy (mnist and wide)."""
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    W3, b3 = params["W3"], params["b3"]
    X = np.asarray(X, dtype=W1.dtype)
    Y = np.asarray(Y, dtype=W1.dtype)
    B = X.shape[0]
    Z1 = X @ W1.T
    Z1 += b1
    A1 = np.maximum(Z1, 0)
    Z2 = A1 @ W2.T
    Z2 += b2
    A2 = np.maximum(Z2, 0)
    Z3 = A2 @ W3.T
    Z3 += b3
    shifted = Z3 - Z3.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    A3 = exp / total
    loss = float(np.sum(-Y * (shifted - np.log(total)))) / B
    delta3 = (A3 - Y) / B
    dW3 = delta3.T @ A2
    db3 = delta3.sum(axis=0)
    delta2 = delta3 @ W3
    delta2 *= Z2 > 0
    dW2 = delta2.T @ A1
    db2 = delta2.sum(axis=0)
    delta1 = delta2 @ W2
    delta1 *= Z1 > 0
    dW1 = delta1.T @ X
    db1 = delta1.sum(axis=0)
    W1 -= lr * dW1
    b1 -= lr * db1
    W2 -= lr * dW2
    b2 -= lr * db2
    W3 -= lr * dW3
    b3 -= lr * db3
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "W3": dW3, "b3": db3}


def resmlp_step(params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> tuple[float, dict]:
    """The resmlp topology (any sizes): h1 = relu(dense 1); two residual blocks, each
    h <- relu(h + dense(relu(dense h))) (layers 2-5 and 6-9); softmax output (layer 10) with
    cross-entropy. Parameters W1, b1, W2, b2, W3, b3, W6, b6, W7, b7, W10, b10, as derive
    numbers the layers of that spec (the add and activation ops, 4, 5, 8, 9, have none).

    The residual sum is added in place into the block's fresh second matrix product, and the
    error reaching a block's input (the skip path plus the path through the block) is summed in
    place into the fresh product delta @ W, then masked in place by relu'.
    """
    W1, b1, W2, b2, W3, b3 = (params[k] for k in ("W1", "b1", "W2", "b2", "W3", "b3"))
    W6, b6, W7, b7, W10, b10 = (params[k] for k in ("W6", "b6", "W7", "b7", "W10", "b10"))
    X = np.asarray(X, dtype=W1.dtype)
    Y = np.asarray(Y, dtype=W1.dtype)
    B = X.shape[0]
    Z1 = X @ W1.T
    Z1 += b1
    A1 = np.maximum(Z1, 0)
    # block 1
    Z2 = A1 @ W2.T
    Z2 += b2
    A2 = np.maximum(Z2, 0)
    S4 = A2 @ W3.T
    S4 += b3
    S4 += A1
    A5 = np.maximum(S4, 0)
    # block 2
    Z6 = A5 @ W6.T
    Z6 += b6
    A6 = np.maximum(Z6, 0)
    S8 = A6 @ W7.T
    S8 += b7
    S8 += A5
    A9 = np.maximum(S8, 0)
    # output
    Z10 = A9 @ W10.T
    Z10 += b10
    shifted = Z10 - Z10.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    A10 = exp / total
    loss = float(np.sum(-Y * (shifted - np.log(total)))) / B
    delta10 = (A10 - Y) / B
    dW10 = delta10.T @ A9
    db10 = delta10.sum(axis=0)
    # block 2 backward: delta8 is the error of S8 (and of the dense output Z7)
    delta8 = delta10 @ W10
    delta8 *= S8 > 0
    dW7 = delta8.T @ A6
    db7 = delta8.sum(axis=0)
    delta6 = delta8 @ W7
    delta6 *= Z6 > 0
    dW6 = delta6.T @ A5
    db6 = delta6.sum(axis=0)
    # block 1 backward: delta4, the error of S4 = (W6^T delta6 + delta8) * relu'(S4)
    delta4 = delta6 @ W6
    delta4 += delta8
    delta4 *= S4 > 0
    dW3 = delta4.T @ A2
    db3 = delta4.sum(axis=0)
    delta2 = delta4 @ W3
    delta2 *= Z2 > 0
    dW2 = delta2.T @ A1
    db2 = delta2.sum(axis=0)
    delta1 = delta2 @ W2
    delta1 += delta4
    delta1 *= Z1 > 0
    dW1 = delta1.T @ X
    db1 = delta1.sum(axis=0)
    W1 -= lr * dW1
    b1 -= lr * db1
    W2 -= lr * dW2
    b2 -= lr * db2
    W3 -= lr * dW3
    b3 -= lr * db3
    W6 -= lr * dW6
    b6 -= lr * db6
    W7 -= lr * dW7
    b7 -= lr * db7
    W10 -= lr * dW10
    b10 -= lr * db10
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "W3": dW3, "b3": db3,
                  "W6": dW6, "b6": db6, "W7": dW7, "b7": db7, "W10": dW10, "b10": db10}


#: benchmark configuration name -> its specialized step
STEPS = {
    "xor": xor_step,
    "digits": digits_step,
    "mnist": relu_relu_softmax_step,
    "wide": relu_relu_softmax_step,
    "resmlp": resmlp_step,          # bench/graph_bench.py: the built-in example
    "resmlp_large": resmlp_step,    # bench/graph_bench.py: 64-128-...-10, batch 128
}

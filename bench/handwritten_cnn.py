"""Hand-written im2col NumPy training steps of the two CNN benchmarks of bench/cnn_bench.py.

What a competent engineer writes by hand for a small convolutional network in NumPy when it is
fixed: one function per network, layers spelled out, vectorized over the batch, in the dtype of
the parameters, every convolution one GEMM on an im2col matrix. The idioms are those that
``python bench/cnn_bench.py --idioms`` measured fastest at these networks' sizes:

- Layout: batch last. Inside a step every convolutional activation is kept as (C, H, W, B), and
  every dense one as (n, B) (the textbook column form z = W a + b). Every slice a convolution or
  a 2x2 pool takes along H and W then has contiguous runs of W*B or B numbers, not of W: the
  im2col copy, the col2im additions and the pools run several times faster than in (B, C, H, W)
  or (C, B, H, W). X (B, C, H, W) is transposed into its zero-padded batch-last copy once;
  flatten (C-major, as torch.flatten) is then a free reshape, (C, h, w, B) -> (C*h*w, B), and
  so is its error back.
- im2col: numpy.lib.stride_tricks.sliding_window_view of the (zero-padded) input, transposed to
  (C_in, kh, kw, Ho, Wo, B) and reshaped into the (C_in*kh*kw, Ho*Wo*B) matrix (one copy);
  Z = W.reshape(C_out, -1) @ cols is then directly the next activation (C_out, Ho, Wo, B), and
  dW = delta.reshape(C_out, -1) @ cols.T, one GEMM with the same matrix.
- col2im (the error of a convolution's input): one GEMM W^T @ delta gives the error of every
  im2col column, (C_in, kh, kw, Ho, Wo, B); a loop over the kh*kw kernel offsets adds each
  offset's block into a slice of a zeros array of the (padded) input's shape. (For LeNet's
  second convolution this beats one GEMM per offset, np.add.at, np.bincount and the full
  correlation of the padded error with the flipped kernel; for a small 3x3 convolution the full
  correlation is faster, but neither network needs it there.)
- max-pool 2x2 stride 2: the forward pass takes the maximum of the four strided slices of the
  windows, pairwise, and keeps the three comparisons it made; the backward pass routes the error
  of each window to its first maximum in row-major window order (as PyTorch does: ties in a row
  go left, ties between the rows go up) by writing the error times the masks into the four
  strided slices of the input's error.
- avg-pool 2x2 stride 2: the sum of the four strided slices times 1/4; backward, dP / 4
  broadcast over the windows of a reshaped view, multiplied in place into tanh' = 1 - a^2.
- softmax after subtracting the maximum, cross-entropy through log-sum-exp, the fused output
  error (A - Y) / B (the batch mean taken once), activations in place where the
  pre-activation is not needed again, SGD updates in place.

``digits_cnn_gradients`` and ``lenet_gradients`` take (params, X, Y) with X (B, C, H, W) and Y
(B, 10) and return (loss, grads), grads with the keys and shapes of params; ``*_step`` take
(params, X, Y, lr), also apply the SGD update in place, and return the same.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# --- layers, batch last ----------------------------------------------------------------------


def batch_last(X: np.ndarray, pad: int) -> np.ndarray:
    """(B, C, H, W) -> zero-padded (C, H + 2 pad, W + 2 pad, B), a fresh array."""
    B, C, H, W = X.shape
    out = np.zeros((C, H + 2 * pad, W + 2 * pad, B), dtype=X.dtype)
    out[:, pad:pad + H, pad:pad + W] = X.transpose(1, 2, 3, 0)
    return out


def conv_forward(A: np.ndarray, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross-correlation, stride 1, of the already padded A (C, H, W, B) with W (O, C, kh, kw).

    Returns (Z, cols): Z (O, Ho, Wo, B) with the bias added, and the im2col matrix
    (C*kh*kw, Ho*Wo*B) that dW needs.
    """
    C, H, Wd, B = A.shape
    O, _, kh, kw = W.shape
    Ho, Wo = H - kh + 1, Wd - kw + 1
    windows = sliding_window_view(A, (kh, kw), axis=(1, 2))        # (C, Ho, Wo, B, kh, kw)
    cols = windows.transpose(0, 4, 5, 1, 2, 3).reshape(C * kh * kw, Ho * Wo * B)
    Z = W.reshape(O, -1) @ cols
    Z += b[:, None]
    return Z.reshape(O, Ho, Wo, B), cols


def conv_backward_weights(delta: np.ndarray, cols: np.ndarray,
                          W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dW, db) from the error delta (O, Ho, Wo, B) of the convolution's output."""
    delta = delta.reshape(W.shape[0], -1)
    return (delta @ cols.T).reshape(W.shape), delta.sum(axis=1)


def conv_backward_input(delta: np.ndarray, W: np.ndarray, pad: int,
                        in_shape: tuple[int, ...]) -> np.ndarray:
    """Error (C, H, W, B) of the unpadded input of the convolution, of shape ``in_shape``, from
    the error delta (O, Ho, Wo, B) of its output: col2im of W^T @ delta, a loop over the kernel
    offsets."""
    O, C, kh, kw = W.shape
    _, Ho, Wo, B = delta.shape
    _, H, Wd, _ = in_shape
    dcols = (W.reshape(O, -1).T @ delta.reshape(O, -1)).reshape(C, kh, kw, Ho, Wo, B)
    dA = np.zeros((C, H + 2 * pad, Wd + 2 * pad, B), dtype=delta.dtype)
    for i in range(kh):
        for j in range(kw):
            dA[:, i:i + Ho, j:j + Wo] += dcols[:, i, j]
    return dA[:, pad:pad + H, pad:pad + Wd] if pad else dA


def max_pool_forward(A: np.ndarray) -> tuple[np.ndarray, tuple]:
    """2x2 max-pool, stride 2, of A (C, H, W, B), H and W even: (P, masks), the masks being the
    comparisons that choose each window's first maximum in row-major window order."""
    a00, a01 = A[:, 0::2, 0::2], A[:, 0::2, 1::2]
    a10, a11 = A[:, 1::2, 0::2], A[:, 1::2, 1::2]
    left_top = a00 >= a01
    left_bottom = a10 >= a11
    P = np.maximum(a00, a01)
    bottom = np.maximum(a10, a11)
    upper = P >= bottom
    np.maximum(P, bottom, out=P)
    return P, (left_top, left_bottom, upper)


def max_pool_backward(dP: np.ndarray, masks: tuple, shape: tuple[int, ...]) -> np.ndarray:
    """Route the error dP (C, Ho, Wo, B) of each window to its first maximum: (C, H, W, B)."""
    left_top, left_bottom, upper = masks
    dA = np.empty(shape, dtype=dP.dtype)
    d_top = dP * upper
    d_bottom = dP - d_top                  # exact: d_top is dP or 0
    np.multiply(d_top, left_top, out=dA[:, 0::2, 0::2])
    np.subtract(d_top, dA[:, 0::2, 0::2], out=dA[:, 0::2, 1::2])
    np.multiply(d_bottom, left_bottom, out=dA[:, 1::2, 0::2])
    np.subtract(d_bottom, dA[:, 1::2, 0::2], out=dA[:, 1::2, 1::2])
    return dA


def avg_pool_forward(A: np.ndarray) -> np.ndarray:
    """2x2 average pool, stride 2, of A (C, H, W, B), H and W even."""
    P = A[:, 0::2, 0::2] + A[:, 0::2, 1::2]
    P += A[:, 1::2, 0::2]
    P += A[:, 1::2, 1::2]
    P *= 0.25
    return P


def tanh_avg_pool_backward(dP: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Error of Z, where A = tanh(Z) (C, H, W, B), from the error dP of the 2x2 average pool of
    A: (1 - A^2) times dP / 4 spread over each window."""
    C, H, Wd, B = A.shape
    delta = A * A
    np.subtract(1, delta, out=delta)
    delta.reshape(C, H // 2, 2, Wd // 2, 2, B)[...] *= (0.25 * dP)[:, :, None, :, None, :]
    return delta


def softmax_cross_entropy(Z: np.ndarray, Yt: np.ndarray) -> tuple[float, np.ndarray]:
    """(batch cost, output error (A - Y) / B) of softmax + cross-entropy of logits Z (n, B)
    against one-hot targets Yt (n, B)."""
    B = Z.shape[1]
    shifted = Z - Z.max(axis=0)
    exp = np.exp(shifted)
    total = exp.sum(axis=0)
    loss = float(np.sum(-Yt * (shifted - np.log(total)))) / B
    exp /= total
    exp -= Yt
    exp /= B
    return loss, exp


def sgd(params: dict, grads: dict, lr: float) -> None:
    """p <- p - lr * dC/dp, in place."""
    for key, value in params.items():
        value -= lr * grads[key]


# --- networks --------------------------------------------------------------------------------


def digits_cnn_gradients(params: dict, X: np.ndarray, Y: np.ndarray) -> tuple[float, dict]:
    """conv 8x3x3 pad 1 relu -> max-pool 2 -> flatten -> dense 10 softmax, cross-entropy."""
    W1, b1, W4, b4 = params["W1"], params["b1"], params["W4"], params["b4"]
    X = np.asarray(X, dtype=W1.dtype)
    Yt = np.asarray(Y, dtype=W1.dtype).T
    Z1, cols1 = conv_forward(batch_last(X, 1), W1, b1)             # (8, 8, 8, B)
    A1 = np.maximum(Z1, 0)
    P2, masks2 = max_pool_forward(A1)                              # (8, 4, 4, B)
    F3 = P2.reshape(-1, P2.shape[-1])                              # (128, B)
    Z4 = W4 @ F3
    Z4 += b4[:, None]
    loss, delta4 = softmax_cross_entropy(Z4, Yt)
    dW4 = delta4 @ F3.T
    db4 = delta4.sum(axis=1)
    dP2 = (W4.T @ delta4).reshape(P2.shape)
    delta1 = max_pool_backward(dP2, masks2, A1.shape)
    delta1 *= Z1 > 0
    dW1, db1 = conv_backward_weights(delta1, cols1, W1)
    return loss, {"W1": dW1, "b1": db1, "W4": dW4, "b4": db4}


def lenet_gradients(params: dict, X: np.ndarray, Y: np.ndarray) -> tuple[float, dict]:
    """LeNet-5: conv 6x5x5 pad 2 tanh -> avg-pool 2 -> conv 16x5x5 tanh -> avg-pool 2 ->
    flatten -> dense 120 tanh -> dense 84 tanh -> dense 10 softmax, cross-entropy."""
    W1, b1, W3, b3 = params["W1"], params["b1"], params["W3"], params["b3"]
    W6, b6, W7, b7 = params["W6"], params["b6"], params["W7"], params["b7"]
    W8, b8 = params["W8"], params["b8"]
    X = np.asarray(X, dtype=W1.dtype)
    Yt = np.asarray(Y, dtype=W1.dtype).T
    Z1, cols1 = conv_forward(batch_last(X, 2), W1, b1)             # (6, 28, 28, B)
    A1 = np.tanh(Z1, out=Z1)
    P2 = avg_pool_forward(A1)                                      # (6, 14, 14, B)
    Z3, cols3 = conv_forward(P2, W3, b3)                           # (16, 10, 10, B)
    A3 = np.tanh(Z3, out=Z3)
    P4 = avg_pool_forward(A3)                                      # (16, 5, 5, B)
    F5 = P4.reshape(-1, P4.shape[-1])                              # (400, B)
    Z6 = W6 @ F5
    Z6 += b6[:, None]
    A6 = np.tanh(Z6, out=Z6)
    Z7 = W7 @ A6
    Z7 += b7[:, None]
    A7 = np.tanh(Z7, out=Z7)
    Z8 = W8 @ A7
    Z8 += b8[:, None]
    loss, delta8 = softmax_cross_entropy(Z8, Yt)
    dW8 = delta8 @ A7.T
    db8 = delta8.sum(axis=1)
    delta7 = W8.T @ delta8
    delta7 *= 1 - A7 * A7
    dW7 = delta7 @ A6.T
    db7 = delta7.sum(axis=1)
    delta6 = W7.T @ delta7
    delta6 *= 1 - A6 * A6
    dW6 = delta6 @ F5.T
    db6 = delta6.sum(axis=1)
    dP4 = (W6.T @ delta6).reshape(P4.shape)
    delta3 = tanh_avg_pool_backward(dP4, A3)                       # (16, 10, 10, B)
    dW3, db3 = conv_backward_weights(delta3, cols3, W3)
    dP2 = conv_backward_input(delta3, W3, 0, P2.shape)             # (6, 14, 14, B)
    delta1 = tanh_avg_pool_backward(dP2, A1)                       # (6, 28, 28, B)
    dW1, db1 = conv_backward_weights(delta1, cols1, W1)
    return loss, {"W1": dW1, "b1": db1, "W3": dW3, "b3": db3, "W6": dW6, "b6": db6,
                  "W7": dW7, "b7": db7, "W8": dW8, "b8": db8}


def digits_cnn_step(params: dict, X: np.ndarray, Y: np.ndarray,
                    lr: float) -> tuple[float, dict]:
    """One training step of digits_cnn: gradients, then the SGD update in place."""
    loss, grads = digits_cnn_gradients(params, X, Y)
    sgd(params, grads, lr)
    return loss, grads


def lenet_step(params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> tuple[float, dict]:
    """One training step of lenet: gradients, then the SGD update in place."""
    loss, grads = lenet_gradients(params, X, Y)
    sgd(params, grads, lr)
    return loss, grads


#: benchmark network -> (gradients, training step)
NETWORKS = {
    "digits_cnn": (digits_cnn_gradients, digits_cnn_step),
    "lenet": (lenet_gradients, lenet_step),
}

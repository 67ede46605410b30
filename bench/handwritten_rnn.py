"""Hand-written NumPy backpropagation through time of the three recurrent benchmarks of
bench/rnn_bench.py.

Each network: X (B, T, n) -> a recurrent layer (rnn, lstm or gru; h_0 = c_0 = 0) whose whole
sequence of states h_1..h_T goes through one dense layer, the same at every time step, with
the identity activation; the batch cost is the mean over the samples of the mse
C = sum_t sum_i 1/2 (a_ti - y_ti)^2, Y (B, T, m). Parameters (l the layer's position from 1):
Wx1 (G h, n), Wh1 (G h, h) and b1 (G h) for rnn (G = 1) and lstm (G = 4, gates i, f, g, o
stacked in that order, PyTorch's); Wx1, Wh1, bx1 and bh1 for gru (G = 3, gates r, z, n,
PyTorch's equations: n = tanh(Wx_n x + bx_n + r (Wh_n h + bh_n)), h' = (1 - z) n + z h);
then W2 (m, h) and b2 (m).

What a strong engineer writes by hand for speed when the network is fixed: vectorized over the
batch, in the dtype of the parameters. The choices below were timed at these sizes (T = 20,
batch 32, hidden 64, float32 and float64, OpenBLAS, on 2 cores of a virtual machine;
``python bench/rnn_bench.py --idioms`` repeats the side-by-side ones):

- Layout: time-major and batch last, the column form z = W h + b of the textbook. Inside a
  step the states are (T + 1, h, B) arrays and the gates (T, G h, B), allocated once per call,
  so a time step's slice is a contiguous (h, B) or (G h, B) block, and so is every gate's
  block inside it. The recurrent GEMM is Wh @ h_{t-1}. (The row form (T, B, G h) with
  h_{t-1} @ Wh^T leaves each gate a strided column block, and the elementwise ops on those
  are 2-3x slower: the lstm's forward loop is 5-7% slower in float64, 17-28% in float32.)
- The input projection of every step is one batched GEMM before the loop, Wx @ X_t with X
  copied once into (T, n, B), written straight into the gates' array; the dense layer, its
  error and dW2 are one GEMM each over all T*B columns.
- The loop over t does the least per step: one GEMM, then in-place ufuncs with ``out=`` into
  the preallocated arrays and two (h, B) scratch buffers.
- Nonlinearities through np.exp. On the AVX2 machine these were chosen on, NumPy's float64
  tanh is scalar code (about 20 ns an element, np.exp about 10; on an AVX-512 machine it is
  vectorized, about 2 ns, and the exp form gains nothing: ``--idioms``), while its float32
  tanh and exp are SIMD, and a ufunc call on a (64, 32) block costs about a microsecond on
  top. So the rows of the weights and biases
  are scaled once per call, exactly (by -1 or -2: powers of two), that the pre-activation the
  loop computes is already -z for a sigmoid, sigma(z) = 1 / (1 + exp(-z)), and -2 z for a tanh
  in float64, tanh(z) = 2 / (1 + exp(-2 z)) - 1: no multiplication is left, and all four gates
  of an lstm step take a single np.exp, np.add and np.reciprocal (the g gate's sigma(2 z) is
  then turned into its tanh). A tanh in float32 stays np.tanh (one call beats the four of the
  exp form there), and so does the lstm cell's tanh(c_t) in float32; in float64 the cell's
  tanh uses the exp form after one multiplication by -2. (tanh(z) so computed has an absolute
  error of a few ulp(1) near 0 rather than a relative one: far below the 1e-10 the bench
  checks.) exp overflows to inf for large pre-activations, which gives the right limits
  (sigma -> 0, tanh -> -1); the warning is silenced.
- Backward, the loop over t reversed: one GEMM per step (Wh^T @ the gates' errors of step t+1,
  the error of h_t through the recurrence) plus in-place ufuncs; the errors of every step's
  gates are kept, and the parameter gradients are single GEMMs over all T*B columns after the
  loop (dWx = dZ X^T and dWh = dZ[1:] H[:-1]^T, h_0 = 0 contributing nothing; the columns of
  all steps side by side take one transposing copy each), db the row sums.
- The lstm's and gru's derivative factors (sigma' = s (1 - s), 1 - g^2, ...) are computed per
  step inside the backward loop, on blocks still in cache: computing them for all steps at once
  in (T, h, B) arrays before the loop, fewer but larger calls, made the whole step 10-30%
  slower in float64 (the memory traffic of the extra arrays; in float32 it was about even:
  the lstm a few % faster, the gru 10% slower). For the rnn, tanh' = 1 - h^2 of all steps at
  once is as fast.

``loss_and_grads_<net>(params, X, Y)`` (net rnn, lstm, gru) returns (loss, grads), grads with
the keys and shapes of params; ``step_<net>(params, X, Y, lr)`` also applies the SGD update in
place and returns the same. They work in float32 and float64, keeping the parameters' dtype.
"""

from __future__ import annotations

import numpy as np


def _columns(X: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """X (B, T, n) -> a contiguous (T, n, B) copy in ``dtype``: x_t as a column per sample."""
    B, T, n = X.shape
    out = np.empty((T, n, B), dtype=dtype)
    out[...] = np.asarray(X).transpose(1, 2, 0)
    return out


def _flat(A: np.ndarray) -> np.ndarray:
    """(T, k, B) -> a contiguous (k, T*B) copy: all time steps side by side, for one GEMM."""
    T, k, B = A.shape
    return np.ascontiguousarray(A.transpose(1, 0, 2)).reshape(k, T * B)


def _tanh_scale(dtype: np.dtype) -> int:
    """The factor the weights of a tanh's pre-activation are multiplied by (see
    _tanh_prescaled): -2 in float64, 1 (none) in float32."""
    return -2 if dtype == np.float64 else 1


def _tanh_prescaled(a: np.ndarray, scale: int) -> np.ndarray:
    """tanh(z) in place, ``a`` holding scale * z: 2 / (1 + exp(-2 z)) - 1 for the scale -2
    (float64, where NumPy's tanh is scalar code on AVX2 and twice as slow as its exp), np.tanh for 1
    (float32, where it is SIMD code and beats the four calls of the exp form)."""
    if scale == 1:
        return np.tanh(a, out=a)
    np.exp(a, out=a)
    a += 1
    np.divide(2, a, out=a)
    a -= 1
    return a


def _tanh(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """tanh(x) into ``out``, the form _tanh_prescaled chooses for the dtype."""
    scale = _tanh_scale(x.dtype)
    if scale == 1:
        return np.tanh(x, out=out)
    np.multiply(x, scale, out=out)
    return _tanh_prescaled(out, scale)


def _dense_mse(Hs: np.ndarray, W2: np.ndarray, b2: np.ndarray,
               Y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The dense layer at every time step and the mse, with their backward pass, as one GEMM
    each over all T*B columns.

    Hs (T, h, B) the states h_1..h_T; Y (B, T, m). Returns (batch cost, dW2, db2, dH, Hn):
    dH (h, T, B) the error of every state through the output layer (its step t the strided
    block dH[:, t]), Hn (h, T, B) the states side by side (a copy, for dWh too).
    """
    T, h, B = Hs.shape
    m = W2.shape[0]
    Hn = np.ascontiguousarray(Hs.transpose(1, 0, 2))            # (h, T, B)
    flat = Hn.reshape(h, T * B)
    D = W2 @ flat                                               # (m, T*B)
    D += b2[:, None]
    D.reshape(m, T, B)[...] -= np.asarray(Y, dtype=Hs.dtype).transpose(2, 1, 0)
    loss = 0.5 * float(np.vdot(D, D)) / B
    D *= 1.0 / B
    dW2 = D @ flat.T
    db2 = D.sum(axis=1)
    dH = (W2.T @ D).reshape(h, T, B)
    return loss, dW2, db2, dH, Hn


def _scaled(W: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W with row k multiplied by scale[k] (a fresh array; exact for powers of two)."""
    return W * scale.reshape((-1,) + (1,) * (W.ndim - 1))


def sgd(params: dict, grads: dict, lr: float) -> None:
    """p <- p - lr * dC/dp, in place."""
    for key, value in params.items():
        value -= lr * grads[key]


# --- rnn: h_t = tanh(Wx x_t + Wh h_{t-1} + b) ---------------------------------------------------


def loss_and_grads_rnn(params: dict, X: np.ndarray, Y: np.ndarray) -> tuple[float, dict]:
    """rnn 64 (tanh) -> dense 8 per step, mse: (batch cost, gradients)."""
    Wx, Wh, b, W2, b2 = (params[key] for key in ("Wx1", "Wh1", "b1", "W2", "b2"))
    dtype = Wx.dtype
    B, T, _ = X.shape
    h = Wh.shape[0]
    Xc = _columns(X, dtype)                                     # (T, n, B)
    s = _tanh_scale(dtype)                  # the loop computes s z (-2 z in float64)
    Wxs, Whs, bs = Wx * s, Wh * s, b * s
    Hs = np.empty((T + 1, h, B), dtype=dtype)                   # h_0 .. h_T
    Hs[0] = 0
    np.matmul(Wxs, Xc, out=Hs[1:])
    Hs[1:] += bs[:, None]
    tmp = np.empty((h, B), dtype=dtype)
    with np.errstate(over="ignore"):
        for t in range(1, T + 1):
            a = Hs[t]
            if t > 1:
                np.matmul(Whs, Hs[t - 1], out=tmp)
                a += tmp
            _tanh_prescaled(a, s)
    loss, dW2, db2, dH, Hn = _dense_mse(Hs[1:], W2, b2, Y)

    deriv = Hs[1:] * Hs[1:]                                     # tanh' = 1 - h^2, all steps
    np.subtract(1, deriv, out=deriv)
    dZ = np.empty((T, h, B), dtype=dtype)
    np.multiply(dH[:, T - 1], deriv[T - 1], out=dZ[T - 1])
    WhT = Wh.T
    for t in range(T - 2, -1, -1):
        z = dZ[t]
        np.matmul(WhT, dZ[t + 1], out=z)
        z += dH[:, t]
        z *= deriv[t]
    flat = _flat(dZ)                                            # (h, T*B)
    grads = {
        "Wx1": flat @ _flat(Xc).T,
        "Wh1": flat[:, B:] @ Hn[:, :T - 1].reshape(h, -1).T,
        "b1": flat.sum(axis=1),
        "W2": dW2,
        "b2": db2,
    }
    return loss, grads


# --- lstm: gates i, f, g, o --------------------------------------------------------------------


def loss_and_grads_lstm(params: dict, X: np.ndarray, Y: np.ndarray) -> tuple[float, dict]:
    """lstm 64 -> dense 8 per step, mse: (batch cost, gradients)."""
    Wx, Wh, b, W2, b2 = (params[key] for key in ("Wx1", "Wh1", "b1", "W2", "b2"))
    dtype = Wx.dtype
    B, T, _ = X.shape
    h = Wh.shape[1]
    Xc = _columns(X, dtype)
    # the loop computes -z for i, f, o and -2 z for g: one exp, add and reciprocal give
    # sigma(z) of i, f, o and sigma(2 z) of g, and tanh(z) = 2 sigma(2 z) - 1
    scale = np.full(4 * h, -1, dtype=dtype)
    scale[2 * h:3 * h] = -2
    Wxs, Whs, bs = _scaled(Wx, scale), _scaled(Wh, scale), b * scale
    G = np.matmul(Wxs, Xc)                                      # (T, 4h, B): the gates
    G += bs[:, None]
    Hs = np.empty((T + 1, h, B), dtype=dtype)                   # h_0 .. h_T
    Cs = np.empty((T + 1, h, B), dtype=dtype)                   # c_0 .. c_T
    TC = np.empty((T, h, B), dtype=dtype)                       # tanh(c_1) .. tanh(c_T)
    Hs[0] = 0
    Cs[0] = 0
    tmp4 = np.empty((4 * h, B), dtype=dtype)
    tmp = np.empty((h, B), dtype=dtype)
    with np.errstate(over="ignore"):
        for t in range(T):
            gates = G[t]
            if t:
                np.matmul(Whs, Hs[t], out=tmp4)
                gates += tmp4
            np.exp(gates, out=gates)
            gates += 1
            np.reciprocal(gates, out=gates)
            i, f, g, o = gates[:h], gates[h:2 * h], gates[2 * h:3 * h], gates[3 * h:]
            g *= 2
            g -= 1
            c = Cs[t + 1]
            np.multiply(f, Cs[t], out=c)
            np.multiply(i, g, out=tmp)
            c += tmp
            _tanh(c, out=TC[t])
            np.multiply(o, TC[t], out=Hs[t + 1])
    loss, dW2, db2, dH, Hn = _dense_mse(Hs[1:], W2, b2, Y)

    dZ = np.empty((T, 4 * h, B), dtype=dtype)                   # the gates' errors
    dh = np.empty((h, B), dtype=dtype)
    dc = np.empty((h, B), dtype=dtype)
    S = np.empty((4 * h, B), dtype=dtype)
    WhT = Wh.T
    for t in range(T - 1, -1, -1):
        gates = G[t]
        i, f, g, o = gates[:h], gates[h:2 * h], gates[2 * h:3 * h], gates[3 * h:]
        np.subtract(1, gates, out=S)          # sigma' = s (1 - s) of i, f, o
        S *= gates
        Sg = S[2 * h:3 * h]                   # tanh' = 1 - g^2
        np.multiply(g, g, out=Sg)
        np.subtract(1, Sg, out=Sg)
        if t < T - 1:
            np.matmul(WhT, dZ[t + 1], out=dh)
            dh += dH[:, t]
            dc *= G[t + 1, h:2 * h]
        else:
            dh[...] = dH[:, t]
            dc[...] = 0
        tc = TC[t]
        np.multiply(tc, tc, out=tmp)          # dc += dh o (1 - tanh(c)^2)
        np.subtract(1, tmp, out=tmp)
        tmp *= o
        tmp *= dh
        dc += tmp
        z = dZ[t]
        np.multiply(dc, S[:3 * h].reshape(3, h, B), out=z[:3 * h].reshape(3, h, B))
        z[:h] *= g
        z[h:2 * h] *= Cs[t]
        z[2 * h:3 * h] *= i
        zo = z[3 * h:]
        np.multiply(dh, S[3 * h:], out=zo)
        zo *= tc
    flat = _flat(dZ)                                            # (4h, T*B)
    grads = {
        "Wx1": flat @ _flat(Xc).T,
        "Wh1": flat[:, B:] @ Hn[:, :T - 1].reshape(h, -1).T,
        "b1": flat.sum(axis=1),
        "W2": dW2,
        "b2": db2,
    }
    return loss, grads


# --- gru: gates r, z, n (PyTorch's equations) ---------------------------------------------------


def loss_and_grads_gru(params: dict, X: np.ndarray, Y: np.ndarray) -> tuple[float, dict]:
    """gru 64 -> dense 8 per step, mse: (batch cost, gradients)."""
    Wx, Wh, bx, bh, W2, b2 = (params[key] for key in ("Wx1", "Wh1", "bx1", "bh1", "W2", "b2"))
    dtype = Wx.dtype
    B, T, _ = X.shape
    h = Wh.shape[1]
    Xc = _columns(X, dtype)
    # the loop computes -z for r and z, and s a for n's pre-activation a (its two terms
    # Wx_n x + bx_n and r (Wh_n h + bh_n) both scaled by s, -2 in float64)
    s = _tanh_scale(dtype)
    scale = np.full(3 * h, -1, dtype=dtype)
    scale[2 * h:] = s
    Wxs, Whs = _scaled(Wx, scale), _scaled(Wh, scale)
    bxs, bhs = bx * scale, bh * scale
    GX = np.matmul(Wxs, Xc)                       # (T, 3h, B): Wx x + bx, then r, z and n
    GX += bxs[:, None]
    GX[:, :2 * h] += bhs[:2 * h, None]            # the hidden biases of r and z fold in here
    bhs_n = bhs[2 * h:, None]
    GH = np.empty((T, 3 * h, B), dtype=dtype)     # Wh h + bh, scaled (n's block is gated by r)
    Hs = np.empty((T + 1, h, B), dtype=dtype)
    Hs[0] = 0
    tmp = np.empty((h, B), dtype=dtype)
    with np.errstate(over="ignore"):
        for t in range(T):
            gh = GH[t]
            if t:
                np.matmul(Whs, Hs[t], out=gh)
            else:
                gh[...] = 0
            gx = GX[t]
            rz = gx[:2 * h]
            rz += gh[:2 * h]
            np.exp(rz, out=rz)
            rz += 1
            np.reciprocal(rz, out=rz)
            r, z = rz[:h], rz[h:]
            gh_n = gh[2 * h:]
            gh_n += bhs_n
            n = gx[2 * h:]
            np.multiply(r, gh_n, out=tmp)
            n += tmp
            _tanh_prescaled(n, s)
            h_t = Hs[t + 1]
            np.subtract(Hs[t], n, out=h_t)            # h_t = n + z (h_{t-1} - n)
            h_t *= z
            h_t += n
    loss, dW2, db2, dH, Hn = _dense_mse(Hs[1:], W2, b2, Y)

    dGH = np.empty((T, 3 * h, B), dtype=dtype)   # dC/d(Wh h + bh)
    dAn = np.empty((T, h, B), dtype=dtype)        # dC/d(Wx_n x + bx_n)
    dh = np.empty((h, B), dtype=dtype)
    carry = np.empty((h, B), dtype=dtype)
    tmp2 = np.empty((h, B), dtype=dtype)
    WhT = Wh.T
    for t in range(T - 1, -1, -1):
        gx = GX[t]
        r, z, n = gx[:h], gx[h:2 * h], gx[2 * h:]
        if t < T - 1:
            np.add(dH[:, t], carry, out=dh)
        else:
            dh[...] = dH[:, t]
        dg = dGH[t]
        da = dAn[t]                                   # dh (1 - z)(1 - n^2)
        np.multiply(n, n, out=da)
        np.subtract(1, da, out=da)
        np.subtract(1, z, out=tmp)
        da *= tmp
        da *= dh
        np.multiply(da, r, out=dg[2 * h:])            # n's hidden part: gated by r
        dr = dg[:h]                                   # da (Wh_n h + bh_n) r (1 - r)
        np.subtract(1, r, out=dr)
        dr *= r
        gh_n = GH[t, 2 * h:]
        if s != 1:
            gh_n = np.multiply(gh_n, 1 / s, out=tmp2)  # (undoes the scale, exactly)
        dr *= gh_n
        dr *= da
        dz = dg[h:2 * h]                              # dh (h_{t-1} - n) z (1 - z)
        np.subtract(Hs[t], n, out=dz)
        dz *= z
        dz *= tmp
        dz *= dh
        if t:
            np.matmul(WhT, dg, out=carry)
            np.multiply(dh, z, out=tmp)
            carry += tmp
    flat_h = _flat(dGH)                           # (3h, T*B)
    flat_x = flat_h.copy()                        # the same but n's block: dh A_n
    flat_x.reshape(3 * h, T, B)[2 * h:] = dAn.transpose(1, 0, 2)
    grads = {
        "Wx1": flat_x @ _flat(Xc).T,
        "Wh1": flat_h[:, B:] @ Hn[:, :T - 1].reshape(h, -1).T,
        "bx1": flat_x.sum(axis=1),
        "bh1": flat_h.sum(axis=1),
        "W2": dW2,
        "b2": db2,
    }
    return loss, grads


# --- training steps ---------------------------------------------------------------------------


def step_rnn(params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> tuple[float, dict]:
    """One training step of rnn_bench: gradients, then the SGD update in place."""
    loss, grads = loss_and_grads_rnn(params, X, Y)
    sgd(params, grads, lr)
    return loss, grads


def step_lstm(params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> tuple[float, dict]:
    """One training step of lstm_bench: gradients, then the SGD update in place."""
    loss, grads = loss_and_grads_lstm(params, X, Y)
    sgd(params, grads, lr)
    return loss, grads


def step_gru(params: dict, X: np.ndarray, Y: np.ndarray, lr: float) -> tuple[float, dict]:
    """One training step of gru_bench: gradients, then the SGD update in place."""
    loss, grads = loss_and_grads_gru(params, X, Y)
    sgd(params, grads, lr)
    return loss, grads


#: benchmark network -> (gradients, training step)
NETWORKS = {
    "rnn_bench": (loss_and_grads_rnn, step_rnn),
    "lstm_bench": (loss_and_grads_lstm, step_lstm),
    "gru_bench": (loss_and_grads_gru, step_gru),
}

"""The NumPy code printer: vector-form expressions in their batch reading (rows = samples).

Code generation stage: takes expressions over the nodes of :mod:`derive.derivation.tensorform` (after the
rewrites of :mod:`derive.render.stability`) and gives Python source text for NumPy. The batch reading
(see :mod:`derive.derivation.tensorform`): a per-sample vector v^l becomes a matrix with one row per
sample (``A1``, ``Z1``, ``delta1``, ``Y``; the input a^0 is ``X``), ``MatVec(W, v, True)``
prints ``V @ W``, ``MatVec(W, v, False)`` prints ``V @ W.T``, ``Inner`` a row-wise sum (kept as
a column so it broadcasts), ``Outer(u, v)`` the sum over rows ``U.T @ V`` and :class:`RowSum`
``V.sum(axis=0)``. The mean over the batch is applied once, where the generated code divides
delta^L by the batch size ``B``.

Numbers print as Python literals (never ``np.sqrt(2)``): under NumPy's promotion rules a
Python float keeps a float32 array float32, a NumPy float64 scalar would not. Functions NumPy
lacks or computes unstably (sigmoid, softplus, softmax, log-sum-exp, erf) print as calls of
small helpers whose source is in :data:`HELPERS`; :attr:`NumPyBatchPrinter.helpers` records the
ones used, so a module defines only those.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import sympy as sp
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import PRECEDENCE

from derive.derivation.imageform import (
    FirstMaxMask,
    Flatten,
    Fold,
    Unflatten,
    Windows,
    WindowsMax,
)
from derive.derivation.stepform import (
    Block,
    Causal,
    Concat,
    MatProd,
    StepGuard,
    SumLast,
    Transposed,
)
from derive.derivation.tensorform import (
    ONE,
    Broadcast,
    Einsum,
    Inner,
    MatVec,
    Outer,
    SumAxes,
    Total,
)
from derive.quantities import LENGTH, NetTensor
from derive.registry.functions import sigmoid
from derive.render.stability import CausalSoftmax, LogSumExp, Softmax
from derive.render.timeloops import Guarded


class RowSum(sp.Function):
    """``RowSum(v)``: the sum of v over the samples of a batch (a bias gradient, BP3)."""

    nargs = 1


#: Helpers whose exp overflows by design, where their value reaches its limit (_sigmoid's
#: exp(-x)): the code that calls them runs with NumPy's overflow warning off, once around the
#: statement or the loop over time (about 1 µs each time, more than a small step's arithmetic).
QUIET_OVERFLOW = frozenset({"_sigmoid"})

#: The batch size, by which delta^L is divided so that row sums are batch means.
BATCH = sp.Symbol("B", positive=True, integer=True)

#: Source of each helper function a generated module may need, in the order modules list them.
HELPERS: dict[str, str] = {
    "_sigmoid": '''\
def _sigmoid(x, out=None):
    """The logistic function 1 / (1 + exp(-x)), with full relative precision everywhere:
    exp(-x) overflows to inf only where the value is below the smallest normal number (x
    below -709 in float64, -87 in float32), and 1 / inf gives its limit 0. Its callers turn
    the overflow warning off: around the statement, or once around a loop over time steps.
    Into `out` when given (x itself may be it)."""
    e = np.negative(x, out=out)
    np.exp(e, out=e)
    e += 1
    return np.reciprocal(e, out=e)
''',
    "_sum_squares": '''\
def _sum_squares(x, count):
    """The sum of x² over the last ``count`` axes of x, with no array of the squares."""
    x = x.reshape(*x.shape[:x.ndim - count], -1)
    return np.einsum("...i,...i->...", x, x)
''',
    "_softplus": '''\
def _softplus(x):
    """log(1 + exp(x)), as logaddexp(0, x): no overflow."""
    return np.logaddexp(0.0, x)
''',
    "_softmax": '''\
def _softmax(x):
    """Softmax of each row, after subtracting the row maximum (so exp cannot overflow)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
''',
    "_causal_softmax": '''\
def _causal_softmax(x):
    """Softmax of each row t of the last two axes over the columns up to t (0 beyond), the
    row maximum taken out first."""
    x = np.where(np.tri(x.shape[-1], dtype=bool), x, -np.inf)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
''',
    "_dot_rows": '''\
def _dot_rows(x, w):
    """x @ w for x of shape (..., n): one 2-D matrix product over every leading axis, x copied
    contiguous first when it is a view (X.swapaxes(0, 1)): the copy costs less than the stack
    of small products NumPy makes of a view."""
    if x.ndim == 2:
        return x @ w
    x = np.ascontiguousarray(x)
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])
''',
    "_dot_gates": '''\
def _dot_gates(x, w, gates):
    """x @ w.T for x of shape (T, B, n) and w stacking `gates` blocks of rows, gate-major
    within each step: an array (T, gates, B, m) whose [t, g] is x[t] @ w[g*m:(g+1)*m].T, one
    contiguous array; one batched product of contiguous operands (a view would be copied
    block by block)."""
    blocks = np.ascontiguousarray(w.reshape(gates, -1, w.shape[-1]).transpose(0, 2, 1))
    return np.matmul(np.ascontiguousarray(x)[:, None], blocks)
''',
    "_dot_steps": '''\
def _dot_steps(u, v):
    """The sum of the outer products of u's and v's rows (over samples and steps, or over
    positions): one 2-D matrix product of the rows (B*T, n), the transpose read by BLAS, not
    copied (summed over blocks of rows when one side is narrow: _block_size)."""
    u, v = u.reshape(-1, u.shape[-1]), v.reshape(-1, v.shape[-1])
    narrow, wide = sorted((u.shape[1], v.shape[1]))
    size = _block_size(narrow, wide, len(u))
    if size == len(u):
        return u.T @ v
    product = u[:size].T @ v[:size]
    for start in range(size, len(u), size):
        product += u[start:start + size].T @ v[start:start + size]
    return product
''',
    "_sum_steps": '''\
def _sum_steps(x):
    """The sum of x (T, B, n) or (B, T, n) over its steps and samples: one product of its rows
    with a vector of ones when x is contiguous (BLAS reads each row once, where NumPy's
    reduction over the two leading axes took 2.5-4x as long at T = 20, B = 32), else np.sum."""
    if not x.flags.c_contiguous:
        return x.sum(axis=(0, 1))
    rows = x.reshape(-1, x.shape[-1])
    return np.ones(len(rows), dtype=x.dtype) @ rows
''',
    "_logsumexp": '''\
def _logsumexp(x):
    """log(sum(exp(x))) of each row, as a column; the row maximum is taken out first."""
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
''',
    "_softmax_logsumexp": '''\
def _softmax_logsumexp(x):
    """(softmax of each row, log-sum-exp of each row as a column), from one exponential."""
    top = x.max(axis=-1, keepdims=True)
    e = np.exp(x - top)
    total = e.sum(axis=-1, keepdims=True)
    return e / total, top + np.log(total)
''',
    "_erf": '''\
def _erf(x):
    """The error function to double precision with NumPy alone (NumPy has no erf).

    |x| < 2.5: the series erf(x) = 2/sqrt(pi) x exp(-x^2) sum_k (2x^2)^k / (1*3*...*(2k+1)),
    whose terms are all positive (no cancellation); |x| >= 2.5: Laplace's continued fraction
    erfc(x) = exp(-x^2) / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / (x + ...)))), summed
    from the tail. The loops run over terms of the series, not over samples.
    """
    size = np.abs(x)
    near = np.minimum(size, 2.5)
    square = near * near
    series = 1.0
    for k in range(35, 0, -1):
        series = 1.0 + series * square * (2.0 / (2 * k + 1))
    small = 1.1283791670955126 * near * np.exp(-square) * series
    far = np.clip(size, 2.5, 6.0)
    fraction = far
    for k in range(30, 0, -1):
        fraction = far + (0.5 * k) / fraction
    large = 1.0 - np.exp(-far * far) / (1.7724538509055159 * fraction)
    return np.sign(x) * np.where(size < 2.5, small, large)
''',
}

HELPERS.update({
    "_windows": '''\
def _windows(x, kernel, stride, padding):
    """The sliding windows of feature maps x (C, H, W, B), zero-padded by `padding` rows
    and columns: a view (C, H', W', B, kh, kw) whose entry [c, r, s, b, p, q] is the padded
    x[c, stride_h * r + p, stride_w * s + q, b] (indices from 0)."""
    if padding != (0, 0):
        (top, left) = padding
        padded = np.zeros((x.shape[0], x.shape[1] + 2 * top, x.shape[2] + 2 * left,
                           x.shape[3]), dtype=x.dtype)
        padded[:, top:top + x.shape[1], left:left + x.shape[2]] = x
        x = padded
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(1, 2))
    return windows[:, ::stride[0], ::stride[1]]
''',
    "_times_tiles": '''\
def _times_tiles(out, small, kernel):
    """out (C, H, W, B) times small (C, H / kh, W / kw, B) spread over the kh x kw tiles of
    the maps, each tile by its one value (an average pool's error over its windows): in
    place, one multiplication of a reshaped view, with no array of out's size made for the
    spread error."""
    channels, rows, cols, batch = small.shape
    tiles = out.reshape(channels, rows, kernel[0], cols, kernel[1], batch)
    tiles *= small[:, :, None, :, None, :]
    return tiles.reshape(out.shape)
''',
    "_fold": '''\
def _fold(cols, shape, stride, padding, kernel):
    """The adjoint of _windows: every window entry of cols (C, H', W', B, kh, kw; it may be
    broadcast along the last two axes) added back at its place in feature maps of
    `shape` (H, W), (C, H, W, B); what lands in the padding is dropped. One addition per
    kernel offset, of a block whose rows run over W' * B numbers; one copy when each window
    holds one value and the windows tile the maps (an average pool's error)."""
    channels, rows, cols_, batch = cols.shape[:4]
    (sh, sw), (ph, pw) = stride, padding
    full = cols.shape[4:] == kernel
    if not full and stride == kernel and padding == (0, 0) and \
            tuple(shape) == (rows * sh, cols_ * sw):
        # one value per window and windows that tile the maps: one broadcast copy
        out = np.empty((channels, *shape, batch), dtype=cols.dtype)
        tiles = out.reshape(channels, rows, sh, cols_, sw, batch)
        tiles[...] = cols[:, :, None, :, None, :, 0, 0]
        return out
    out = np.zeros((channels, shape[0] + 2 * ph, shape[1] + 2 * pw, batch), dtype=cols.dtype)
    for p in range(kernel[0]):
        for q in range(kernel[1]):
            part = cols[..., p, q] if full else cols[..., 0, 0]
            out[:, p:p + sh * rows:sh, q:q + sw * cols_:sw] += part
    return out[:, ph:ph + shape[0], pw:pw + shape[1]]
''',
    "_window_max": '''\
def _window_max(x, kernel, stride):
    """The maximum over each window of feature maps x (C, H, W, B): (C, H', W', B), one
    np.maximum of strided slices per kernel offset."""
    rows = (x.shape[1] - kernel[0]) // stride[0] + 1
    cols = (x.shape[2] - kernel[1]) // stride[1] + 1
    out = None
    for p in range(kernel[0]):
        for q in range(kernel[1]):
            part = x[:, p:p + stride[0] * (rows - 1) + 1:stride[0],
                     q:q + stride[1] * (cols - 1) + 1:stride[1]]
            out = part.copy() if out is None else np.maximum(out, part, out=out)
    return out
''',
    "_im2col": '''\
def _im2col(x, kernel, stride, padding):
    """The windows of feature maps x (C, H, W, B), zero-padded, copied into one array
    (C * kh * kw, H', W', B): row (c, p, q) holds x[c] at kernel offset (p, q) of every
    window, for every sample; one copy per kernel offset, of rows of W' * B numbers (a
    convolution is then one matrix product)."""
    if padding != (0, 0):
        (top, left) = padding
        padded = np.zeros((x.shape[0], x.shape[1] + 2 * top, x.shape[2] + 2 * left,
                           x.shape[3]), dtype=x.dtype)
        padded[:, top:top + x.shape[1], left:left + x.shape[2]] = x
        x = padded
    rows = (x.shape[1] - kernel[0]) // stride[0] + 1
    cols = (x.shape[2] - kernel[1]) // stride[1] + 1
    out = np.empty((x.shape[0], kernel[0], kernel[1], rows, cols, x.shape[3]), dtype=x.dtype)
    for p in range(kernel[0]):
        for q in range(kernel[1]):
            out[:, p, q] = x[:, p:p + stride[0] * (rows - 1) + 1:stride[0],
                             q:q + stride[1] * (cols - 1) + 1:stride[1]]
    return out.reshape(-1, rows, cols, x.shape[3])
''',
    "_block_size": '''\
def _block_size(rows, inner, count):
    """How many of count at a time to take in a product of count rows-by-inner parts (a
    (rows, inner) matrix times count columns, or count outer products summed): for at most 8
    rows (a convolution of few kernels, a gradient of few inputs), blocks of at most 2**19
    multiply-adds, else all count at once. OpenBLAS, the BLAS of NumPy's wheels, computes a
    product of at most 10**6 multiply-adds with its kernels for small matrices, which run a
    product with so narrow a side 2-4x faster than its general path (python
    bench/cnn_bench.py --idioms)."""
    if rows > 8:
        return count
    return min(count, max(256, (1 << 19) // (rows * inner) // 64 * 64))
''',
    "_correlate": '''\
def _correlate(w, cols):
    """Σ over k, p, q of w[j, k, p, q] times the window entry (k, p, q) at each output
    position: kernels w (J, C, kh, kw) on the windows cols (C * kh * kw, H', W', B) of
    _im2col, one matrix product (in blocks of positions: _block_size); (J, H', W', B)."""
    kernels, windows = w.reshape(len(w), -1), cols.reshape(len(cols), -1)
    count = windows.shape[1]
    size = _block_size(*kernels.shape, count)
    if size == count:
        product = kernels @ windows
    else:
        product = np.empty((len(w), count), dtype=windows.dtype)
        for start in range(0, count, size):
            np.matmul(kernels, windows[:, start:start + size],
                      out=product[:, start:start + size])
    return product.reshape(len(w), *cols.shape[1:])
''',
    "_correlate_kernel": '''\
def _correlate_kernel(delta, cols, kernel):
    """Σ over the samples and output positions of delta[j, r, s, b] times the window entry
    (k, p, q) at (r, s) of the windows cols (C * kh * kw, H', W', B) of _im2col: a kernel's
    gradient (J, C, kh, kw), one matrix product (_dot_steps: summed over blocks of positions
    when the kernels are few)."""
    product = _dot_steps(delta.reshape(len(delta), -1).T, cols.reshape(len(cols), -1).T)
    return product.reshape(len(delta), -1, *kernel)
''',
    "_correlate_input": '''\
def _correlate_input(delta, w, shape, stride, padding):
    """The fold of Σ_j w[j, k, p, q] delta[j, u, v, b] over the windows (u, v) and kernel
    offsets (p, q) that cover each entry of feature maps of `shape` (H, W); what lands in the
    padding is dropped. (C, H, W, B): one matrix product of the kernels with delta
    (J, H' * W' * B), then one addition per kernel offset of a block whose rows run over
    W' * B numbers."""
    _, rows, cols, batch = delta.shape
    channels, kh, kw = w.shape[1:]
    (sh, sw), (ph, pw) = stride, padding
    parts = (w.reshape(len(w), -1).T @ delta.reshape(len(w), -1)).reshape(
        channels, kh, kw, rows, cols, batch)
    out = np.zeros((channels, shape[0] + 2 * ph, shape[1] + 2 * pw, batch), dtype=delta.dtype)
    for p in range(kh):
        for q in range(kw):
            at = out[:, p:p + sh * (rows - 1) + 1:sh, q:q + sw * (cols - 1) + 1:sw]
            at += parts[:, p, q]
    return out[:, ph:ph + shape[0], pw:pw + shape[1]]
''',
    "_window_sum": '''\
def _window_sum(x, kernel, stride):
    """The sum over each window of feature maps x (C, H, W, B): (C, H', W', B), one
    addition of strided slices per kernel offset."""
    rows = (x.shape[1] - kernel[0]) // stride[0] + 1
    cols = (x.shape[2] - kernel[1]) // stride[1] + 1
    out = None
    for p in range(kernel[0]):
        for q in range(kernel[1]):
            part = x[:, p:p + stride[0] * (rows - 1) + 1:stride[0],
                     q:q + stride[1] * (cols - 1) + 1:stride[1]]
            out = part.copy() if out is None else np.add(out, part, out=out)
    return out
''',
    "_max_unpool": '''\
def _max_unpool(delta, x, largest, kernel, stride):
    """The fold of delta times each window's first-maximum indicator: delta (C, H', W', B)
    added at the first maximum (row-major) of its window of x (C, H, W, B), 0 elsewhere;
    largest: the maximum of each window (_window_max, kept by the forward pass). The kernel
    offsets are visited in row-major order, each taking what is left of delta where it holds
    the maximum (exactly: all of it or nothing), so ties go to the first; the last offset
    takes what is left."""
    rows, cols = delta.shape[1:3]
    overlap = stride[0] < kernel[0] or stride[1] < kernel[1]
    # windows that tile x write every entry once: nothing to clear first
    tiles = (not overlap and rows * stride[0] == x.shape[1] == rows * kernel[0]
             and cols * stride[1] == x.shape[2] == cols * kernel[1])
    out = (np.empty if tiles else np.zeros)(x.shape, dtype=delta.dtype)
    rest = delta                    # the error of windows whose maximum is not reached yet
    offsets = [(p, q) for p in range(kernel[0]) for q in range(kernel[1])]
    for number, (p, q) in enumerate(offsets):
        at = (slice(None), slice(p, p + stride[0] * (rows - 1) + 1, stride[0]),
              slice(q, q + stride[1] * (cols - 1) + 1, stride[1]))
        if number == len(offsets) - 1:
            if overlap:
                out[at] += rest
            else:
                out[at] = rest
            break
        if overlap:
            taken = rest * np.equal(x[at], largest)
            out[at] += taken
        else:                       # each entry in one window at most: written once
            taken = np.multiply(rest, np.equal(x[at], largest), out=out[at])
        # a new array the first time (delta is the caller's), then in place
        rest = rest - taken if number == 0 else np.subtract(rest, taken, out=rest)
    return out
''',
    "_first_max": '''\
def _first_max(windows):
    """1 at the first maximum of each window (row-major order), 0 elsewhere: an array of the
    windows' shape (C, H', W', B, kh, kw)."""
    largest = windows.max(axis=(4, 5))
    mask = np.empty(windows.shape, dtype=windows.dtype)
    taken = np.zeros(largest.shape, dtype=bool)
    for p in range(windows.shape[4]):
        for q in range(windows.shape[5]):
            first = (windows[..., p, q] == largest) & ~taken
            mask[..., p, q] = first
            taken |= first
    return mask
''',
})

#: The helpers each helper's source calls (read from its body): a module that uses one
#: defines those too (and what they call in turn: helper_closure).
HELPER_CALLS: dict[str, tuple[str, ...]] = {
    name: tuple(other for other in HELPERS if other != name and re.search(
        rf"(?<![\w.]){re.escape(other)}\(", source.split("\n", 1)[1]))
    for name, source in HELPERS.items()}


def helper_closure(names: set[str]) -> set[str]:
    """``names`` with every helper they call, directly or through another (HELPER_CALLS)."""
    found, todo = set(names), list(names)
    while todo:
        for called in HELPER_CALLS.get(todo.pop(), ()):
            if called not in found:
                found.add(called)
                todo.append(called)
    return found


def _per_window(placed: sp.Expr) -> sp.Expr | None:
    """The feature maps δ when ``placed`` puts one entry of δ on each window (a Broadcast of
    δ's axes "jki" over the windows' "jki" and kernel offsets); else None."""
    if not isinstance(placed, Broadcast):
        return None
    tensor, axes, frame = placed.args
    return tensor if len(str(axes)) == 3 and str(frame)[:3] == str(axes) else None


def tiled(fold: sp.Expr) -> sp.Expr | None:
    """The tensor δ when ``fold`` spreads one value of δ per window over windows that tile the
    maps (stride the kernel, no padding, the maps' size a multiple of it: an average pool's
    error, before its factor 1/(kh kw)); else None."""
    if not isinstance(fold, Fold):
        return None
    cols, shape, stride, padding, kernel = fold.args
    if tuple(padding) != (0, 0) or tuple(stride) != tuple(kernel) or \
            any(int(size) % int(k) for size, k in zip(shape, kernel)):
        return None
    return _per_window(cols)


def routed_by_max(cols: sp.Expr, shape: sp.Expr, stride: sp.Expr, padding: sp.Expr,
                   kernel: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(δ, the windows of x) when ``Fold(cols, ...)`` folds δ placed on each window times the
    first-maximum indicator of the unpadded windows of x, with the same geometry, back onto
    x's shape; else None."""
    factors = sp.Mul.make_args(cols)
    masks = [f for f in factors if isinstance(f, FirstMaxMask)]
    placed = [f for f in factors if isinstance(f, Broadcast)]
    if len(masks) != 1 or len(placed) != 1 or len(factors) != 2:
        return None
    _tensor, w_kernel, w_stride, w_padding = masks[0].args[0].args
    delta = _per_window(placed[0])
    if (tuple(w_kernel), tuple(w_stride), tuple(w_padding)) != (
            tuple(kernel), tuple(stride), (0, 0)) or tuple(padding) != (0, 0) or delta is None:
        return None
    return delta, masks[0].args[0]


def _correlated(cols: sp.Expr, kernel: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(δ, w) when ``cols`` is Σ_j δ[j, u, v] w[j, k, p, q] with entries (k, u, v, p, q) and
    w's offsets the fold's kernel; else None."""
    if not isinstance(cols, Einsum) or len(cols.args) != 3:
        return None
    subscripts, delta, kernels = cols.args
    inputs, output = str(subscripts).split("->")
    if "," not in inputs:
        return None
    left, right = inputs.split(",")
    if not (isinstance(kernels, NetTensor) and kernels.is_parameter and kernels.rank == 4) \
            or len(left) != 3 or len(right) != 4 or left[0] != right[0] \
            or output != right[1] + left[1:] + right[2:]:
        return None
    return delta, kernels


#: Nodes that are not entrywise: what they read is not combined entry by entry with what is
#: around them (a parameter placed beside a contraction of feature maps is not among them).
_SHAPING = (Einsum, RowSum, Fold, Windows, WindowsMax, FirstMaxMask, Flatten, Unflatten, MatVec,
            Outer, Inner, Total, Block, Concat, Causal, SumLast, MatProd, Transposed, Softmax,
            CausalSoftmax, LogSumExp)


def map_valued(expr: sp.Expr) -> bool:
    """Whether ``expr`` gives feature maps (or their windows) per sample, whose batch arrays
    have the samples' axis at 3, after the channel, row and column (docs/architecture.md,
    "Images"); a contraction of them to fewer axes has it first."""
    if isinstance(expr, NetTensor):
        return expr.rank == 3 and not expr.is_parameter
    if isinstance(expr, Broadcast):
        return not expr.args[0].is_parameter and expr.args[0].rank == 3
    if isinstance(expr, Windows | WindowsMax | Fold | FirstMaxMask | Unflatten):
        return True
    if isinstance(expr, Einsum):
        output = str(expr.args[0]).split("->")[1]
        return len(output) >= 3 and any(map_valued(o) for o in expr.args[1:])
    if isinstance(expr, _SHAPING):
        return False
    return any(map_valued(arg) for arg in expr.args)


def among_maps(expr: sp.Expr) -> frozenset[Broadcast]:
    """The placed tensors of ``expr`` combined entry by entry with feature maps: their frame
    has the samples' axis where the maps have it (a bias b[:, None, None, None])."""
    found: set[Broadcast] = set()

    def walk(e: sp.Basic, among: bool) -> None:
        if isinstance(e, Broadcast):
            if among:
                found.add(e)
            return
        if isinstance(e, SumAxes):
            walk(e.args[0], map_valued(e.args[0]))
            return
        if isinstance(e, _SHAPING):
            among = False
        else:
            among = among or any(map_valued(arg) for arg in e.args)
        for arg in e.args:
            walk(arg, among)

    walk(expr, map_valued(expr))
    return frozenset(found)


def with_samples(letters: str, maps: bool) -> str:
    """Subscript ``letters`` of a per-sample array with "b", the samples' axis: after the
    first three (a feature map's channel, row and column) for feature maps and their windows,
    else first."""
    return letters[:3] + "b" + letters[3:] if maps else "b" + letters


#: One-argument functions printed as a call that can write its value into a given array
#: (``out=``: a NumPy ufunc, or a helper that takes ``out``).
_INTO = {sp.exp: "np.exp", sp.log: "np.log", sp.tanh: "np.tanh", sp.sinh: "np.sinh",
         sp.cosh: "np.cosh", sigmoid: "_sigmoid"}


def _elementwise(expr: sp.Expr) -> bool:
    """Whether ``expr`` is numbers and the network's arrays (not parameters) under sums,
    products, powers by numbers and the elementwise calls of _INTO (so that every operation
    gives a new float array)."""
    if expr.is_number:
        return True
    if isinstance(expr, NetTensor):
        return not expr.is_parameter
    if isinstance(expr, sp.Add | sp.Mul):
        return all(map(_elementwise, expr.args))
    if isinstance(expr, sp.Pow):
        return expr.exp.is_number and _elementwise(expr.base)
    return type(expr) in _INTO and _elementwise(expr.args[0])


def operations(expr: sp.Expr) -> int:
    """The array operations ``expr`` prints as: one per sum or product of two operands, power
    and call (a factor -1 is a subtraction, a step's guard a condition, neither an operation)."""
    if isinstance(expr, sp.Add | sp.Mul):
        operands = [a for a in expr.args if a != -1 and not isinstance(a, StepGuard)]
        return len(operands) - 1 + sum(map(operations, operands))
    if isinstance(expr, sp.Pow | sp.Function):
        return 1 + sum(map(operations, expr.args))
    return 0


def _ints(pair: sp.Expr) -> str:
    """A (rows, columns) pair as a tuple of Python ints."""
    return repr(tuple(int(n) for n in pair))


#: Batch names by role: a^l -> A1, w^l -> W1, ...; lse^l is LogSumExp(z^l), one per sample.
BATCH_NAMES = {"a": "A", "z": "Z", "delta": "delta", "w": "W", "b": "b", "gamma": "gamma",
               "beta": "beta", "mu": "mu", "var": "var", "xhat": "Xhat", "mask": "M",
               "lse": "LSE", "wx": "Wx", "wh": "Wh", "bx": "bx", "bh": "bh", "zx": "Zx",
               "zh": "Zh", "wq": "Wq", "wk": "Wk", "wv": "Wv", "q": "Q", "k": "K", "v": "V",
               "s": "S", "alpha": "Alpha"}


def batch_name(tensor: NetTensor) -> str:
    """The name of a quantity in generated code: X, Y, A1, Z1, delta2, W1, dC_dXhat3, ..."""
    if tensor.role == "y":
        return "Y"
    if tensor.role == "hoisted":      # an array the code generator names (docs: "Sequences")
        return tensor.of
    if tensor.role == "a" and tensor.node == 0:
        return "X"
    if tensor.role == "grad":
        return f"dC_d{batch_name(tensor.target)}"
    if tensor.node is None:
        raise ValueError(f"no batch name for the quantity {tensor}")
    if tensor.role in BATCH_NAMES:
        return f"{BATCH_NAMES[tensor.role]}{tensor.node}"
    # a custom op's parameter U at layer 3 is U3 (its key); its sum s1 is S1_3
    name = tensor.role if tensor.is_parameter else tensor.role.upper()
    return f"{name}_{tensor.node}" if name[-1].isdigit() else f"{name}{tensor.node}"


def _einsum_call(subscripts: str, operands: list[str]) -> str:
    """``np.einsum`` of printed operands; with two or more, NumPy chooses the order of the
    contraction (a sum over the samples first, a matrix product through BLAS). A contraction
    of two arrays of four or more axes (a convolution over sliding windows, its kernel's
    gradient) that is one matrix product is ``np.tensordot``: measured 2-25x faster than
    einsum's own choice on strided windows (bench/cnn_bench.py)."""
    tensordot = _tensordot(subscripts, operands)
    if tensordot is not None:
        return tensordot
    optimize = ", optimize=True" if len(operands) > 1 else ""
    return f"np.einsum({subscripts!r}, {', '.join(operands)}{optimize})"


def _tensordot(subscripts: str, operands: list[str]) -> str | None:
    """``np.tensordot`` (and a transpose) for ``subscripts`` of two operands where every
    letter the two share is summed and none repeats within one; else None."""
    inputs, output = subscripts.split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or max(map(len, parts)) < 4:
        return None
    left, right = parts
    shared = [letter for letter in left if letter in right]
    if any(len(set(p)) != len(p) for p in parts) or any(letter in output for letter in shared):
        return None
    kept = [letter for letter in left + right if letter not in shared]
    if sorted(kept) != sorted(output) or not shared:
        return None
    axes = ([left.index(x) for x in shared], [right.index(x) for x in shared])
    call = f"np.tensordot({operands[0]}, {operands[1]}, axes=({axes[0]}, {axes[1]}))"
    order = [kept.index(letter) for letter in output]
    if order != sorted(order):
        call += f".transpose({', '.join(map(str, order))})"
    return call


def fold_numbers(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every numeric subexpression (other than an integer) as one Float.

    sqrt(2)*z/2 becomes 0.7071067811865476*z; exponents are left alone (z**2 stays).
    """
    if isinstance(expr, sp.Integer) or not isinstance(expr, sp.Expr):
        return expr
    if expr.is_number:
        return sp.Float(float(sp.N(expr, 30)), 17)
    if not expr.args:
        return expr
    if isinstance(expr, sp.Pow):
        return sp.Pow(fold_numbers(expr.base), expr.exp, evaluate=False)
    if isinstance(expr, sp.Mul | sp.Add):
        numbers = [arg for arg in expr.args if arg.is_number]
        others = [fold_numbers(arg) for arg in expr.args if not arg.is_number]
        if numbers:
            constant = fold_numbers(expr.func(*numbers))
            if constant != (1 if isinstance(expr, sp.Mul) else 0):
                others.insert(0, constant)
        if len(others) == 1:
            return others[0]
        return expr.func(*others, evaluate=False)
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((fold_numbers(e), c) for e, c in expr.args), evaluate=False)
    return expr.func(*(fold_numbers(arg) for arg in expr.args))


def is_bracket(expr: sp.Expr) -> bool:
    """Whether ``expr`` is a bracket [condition], which prints as a boolean mask."""
    return isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and \
        [value for value, _ in expr.args] == [1, 0]


class NumPyBatchPrinter(NumPyPrinter):
    """Prints vector-form expressions as NumPy code over batches (rows = samples)."""

    _module = "np"
    printmethod = "_derive_numpy"

    def __init__(self, settings: dict | None = None) -> None:
        super().__init__({"fully_qualified_modules": True, **(settings or {})})
        self.helpers: set[str] = set()
        # whether the code printed since this was last cleared calls a QUIET_OVERFLOW helper
        self.overflows = False
        self.length = 0             # T of a sequence network (docs/architecture.md, "Sequences")
        # how step views print: None (every step at once: the whole (B, T, n) array), "loop"
        # (step t of a loop: Q[:, t + c]) or (first, stop): the steps a row-summed statement
        # reads, when its views are at several steps (δ_t h_{t-1}: steps 1.. and ..T-1)
        self._time: str | tuple[int, int] | None = None
        # sequences that a loop over time fills are stored step-major, (T, B, n), so that each
        # step is one contiguous block (named Q_steps); a statement over every step is printed
        # in one layout, "batch" (B, T, n) or "time" (T, B, n), the others' arrays swapped
        self.time_major: set[NetTensor] = set()
        self._layout = "batch"
        # a loop quantity read only at its own step: one (B, n) array per step, no index
        self.step_local: set[NetTensor] = set()
        # matrices whose transposes a loop reads from a contiguous copy: the copy's name
        self.transposes: dict[NetTensor, str] = {}
        # stacked gates' pre-activations stored gate-major (docs/architecture.md, "Sequences"):
        # each array, as a whole, with its (number of gates, gate width); (T, G, B, w), each
        # gate's block of a step one contiguous (B, w) array, a step one (G, B, w) array
        self.gates: dict[NetTensor, tuple[int, int]] = {}
        # printing the value of such an array: its (G, w), which its matrix products and bias
        # vectors are printed gate-major for; None for any other statement
        self.stacking: tuple[int, int] | None = None
        # the gate-major copies of the matrices a loop multiplies by for such an array, and
        # its bias vectors, repeated for every sample of the batch once: their names
        self.gate_weights: dict[NetTensor, str] = {}
        self.gate_biases: dict[NetTensor, str] = {}
        # the number of samples, as the function being printed has it (X.shape[0], B)
        self.batch_size = "X.shape[0]"
        # printing a statement over whole sequences (attention), in the batch layout
        self.whole = False
        # windows whose _im2col copy the forward pass keeps for a kernel's gradient, and the
        # maximum of each window of a max pool, which its error is routed by: their arrays
        self.columns: dict[Windows, NetTensor] = {}
        self.maxima: dict[Windows, NetTensor] = {}
        # the placed tensors (Broadcast) of the statement being printed that are combined with
        # feature maps, stored batch-last (C, H, W, B): their frame has the samples' axis
        # after its first three (a parameter gains a trailing axis for them)
        self.among_maps: frozenset[Broadcast] = frozenset()

    def name(self, tensor: NetTensor) -> str:
        """The variable that holds ``tensor``: its batch name; Q_steps when step-major."""
        name = batch_name(tensor)
        return f"{name}_steps" if tensor.whole in self.time_major else name

    @contextmanager
    def steps(self, found: set[NetTensor] | None, loop: bool = False,
              layout: str = "batch") -> Iterator[None]:
        """Print step views as in a loop over t, or, for a statement over every step that
        reads the views ``found``, as the slices of the steps where all of them exist, in
        ``layout``."""
        previous = self._time, self._layout
        shifts = {v.step for v in found or () if isinstance(v.step, int)}
        if loop:
            self._time = "loop"
        elif shifts - {0}:
            self._time = (max(0, -min(shifts)), self.length - max(0, max(shifts)))
        else:
            self._time = None
        self._layout = layout
        try:
            yield
        finally:
            self._time, self._layout = previous

    def _sequence(self, expr: sp.Expr) -> bool:
        """Whether ``expr`` is over every step of a sequence (a (B, T, ...) array)."""
        return self._time != "loop" and any(
            isinstance(t.step, int) or (t.rank == 2 and not t.is_parameter and t.step is None)
            for t in expr.atoms(NetTensor) if t.role != "hoisted" or t.step is not None)

    # numpy.exp -> np.exp; the generated module imports numpy as np
    def _module_format(self, fqn: str, register: bool = True) -> str:
        if fqn.startswith("numpy."):
            fqn = "np." + fqn[len("numpy."):]
        return super()._module_format(fqn, register)

    def doprint(self, expr: sp.Expr, assign_to: str | None = None) -> str:
        return super().doprint(fold_numbers(expr), assign_to)

    def into(self, expr: sp.Expr, out: str) -> str | None:
        """``expr``, a call of one array, printed to write its value into the array ``out``
        (``np.tanh(Z1, out=Z1)``, ``np.maximum(Z1, 0, out=Z1)``: no new array); None for
        anything else."""
        array = self.operand(expr)
        if array is None:
            return None
        if isinstance(expr, sp.Max | sp.Min):
            number = next(arg for arg in expr.args if arg is not array)
            call = "np.maximum" if isinstance(expr, sp.Max) else "np.minimum"
            return f"{call}({self.doprint(array)}, {self.doprint(number)}, out={out})"
        call = _INTO[type(expr)]
        if call.startswith("_"):
            self._use(call)
        return f"{call}({self.doprint(array)}, out={out})"

    def operand(self, expr: sp.Expr) -> sp.Expr | None:
        """The one argument of ``expr`` that :meth:`into` can write over: that of an
        elementwise call (tanh, exp, ...), or the array of a maximum or minimum of an array and
        a number (relu's max(z, 0)); None for anything else."""
        if type(expr) in _INTO:
            return expr.args[0]
        if isinstance(expr, sp.Max | sp.Min) and len(expr.args) == 2:
            arrays = [arg for arg in expr.args if not arg.is_number]
            if len(arrays) == 1:
                return arrays[0]
        return None

    def written_into(self, expr: sp.Expr, out: str) -> list[tuple[str, str, str]]:
        """Lines that leave ``expr`` in the existing array ``out`` with no array made for the
        result, as (target, op, code) (op "": the line is the target alone): a call writes
        into it (``np.tanh(Z, out=...)``); a sum or product gives its first two terms or
        factors to its ufunc with ``out=`` (``np.add(a, b, out=...)``) and adds, subtracts,
        multiplies or divides each further one in place; anything else is copied in."""
        expr = fold_numbers(expr)
        call = self.into(expr, out)
        if call is not None:
            return [(call, "", "")]
        if isinstance(expr, sp.Add):
            first, *rest = self.ordered_terms(expr)
            items = [(self.doprint(-t), "-") if t.could_extract_minus_sign()
                     else (self.doprint(t), "+") for t in rest]
        elif isinstance(expr, sp.Mul):
            coefficient, rest = expr.as_coeff_Mul()
            # in the order they print; divisions last, a number after the arrays (the result
            # keeps their dtype)
            factors = sorted(rest.as_ordered_factors(),
                             key=lambda f: bool(f.is_Pow and f.exp == -1)) + (
                [coefficient] if coefficient != 1 else [])
            first, *rest = factors
            items = [(self.doprint(f.base), "/") if f.is_Pow and f.exp == -1
                     else (self.doprint(f), "*") for f in rest]
        else:
            return [(out, "=", self.doprint(expr))]
        if first.is_Pow and first.exp == -1:                 # only divisions: 1 / (x y)
            return [(out, "=", self.doprint(expr))]
        (second, op), *items = items
        ufunc = {"+": "np.add", "-": "np.subtract", "*": "np.multiply", "/": "np.divide"}[op]
        return [(f"{ufunc}({self.doprint(first)}, {second}, out={out})", "", "")] + [
            (out, f"{op}=", code) for code, op in items]

    def chained(self, expr: sp.Expr, out: str) -> list[tuple[str, str, str]] | None:
        """Lines, as written_into gives them, that compute ``expr`` into a new array ``out``:
        for a sum or product of numbers, powers, elementwise calls and the network's arrays
        (not parameters) of one rank, so of one shape (a layer norm's mean or variance, a rank
        lower, would not broadcast into the array the chain starts from), its costliest
        compound term or factor first, recursively, then each other one added, subtracted,
        multiplied or divided in place (0.25 - 0.25*A1**2: ``out = A1**2``, ``out *= 0.25``,
        ``np.subtract(0.25, out, out=out)``: one array where the expression makes three). None
        for anything else, or when nothing is to be chained."""
        expr = fold_numbers(expr)
        if not (_elementwise(expr) and isinstance(expr, sp.Add | sp.Mul)
                and len({t.rank for t in expr.atoms(NetTensor)}) == 1):
            return None
        is_sum = isinstance(expr, sp.Add)
        parts = self.ordered_terms(expr) if is_sum else list(expr.as_ordered_factors())

        def unsigned(part: sp.Expr) -> sp.Expr:
            return -part if is_sum and part.could_extract_minus_sign() else part

        compound = [p for p in parts if not isinstance(unsigned(p), sp.Symbol)
                    and not unsigned(p).is_number and not (p.is_Pow and p.exp == -1)]
        if not compound:
            return None
        base = max(compound, key=lambda p: operations(unsigned(p)))
        lines = self.chained(unsigned(base), out) or [(out, "=", self.doprint(unsigned(base)))]
        rest = [p for p in parts if p is not base]
        if unsigned(base) != base:      # 1 - A**2: the first other term minus it, into it
            first, *rest = rest
            lines.append((f"np.subtract({self.doprint(first)}, {out}, out={out})", "", ""))
        for part in rest:
            if is_sum:
                lines.append((out, "-=", self.doprint(-part)) if part.could_extract_minus_sign()
                             else (out, "+=", self.doprint(part)))
            else:
                lines.append((out, "/=", self.doprint(part.base))
                             if part.is_Pow and part.exp == -1 else (out, "*=", self.doprint(part)))
        return lines

    def ordered_terms(self, expr: sp.Add, order: str | None = None) -> list[sp.Expr]:
        """The terms of a sum in the order it prints: matrix products first (``X @ W1.T +
        b1``, as z = W a + b is written), then a positive term (``Z3 - LSE3`` rather than
        ``-LSE3 + Z3``: an array negation fewer)."""
        return sorted(self._as_ordered_terms(expr, order=order),
                      key=lambda term: (not term.has(MatVec, Outer),
                                        bool(term.could_extract_minus_sign())))

    def _use(self, helper: str) -> None:
        self.helpers.add(helper)
        self.overflows |= helper in QUIET_OVERFLOW

    def _helper(self, name: str, *args: sp.Expr) -> str:
        self._use(name)
        return f"{name}({', '.join(self._print(arg) for arg in args)})"

    def parenthesize(self, item: sp.Basic, level: int, strict: bool = False) -> str:
        # `@` binds like `*` in Python: a matrix product inside a product needs parentheses
        if isinstance(item, MatVec | Outer | MatProd) and level >= PRECEDENCE["Mul"]:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

    # --- the network's quantities ----------------------------------------------------------

    def _print_NetTensor(self, expr: NetTensor) -> str:
        if expr.whole in self.gates and not expr.is_parameter:
            return self._gate_view(expr, None)
        if self.stacking is not None and expr.is_parameter and expr.rank == 1:
            if self._time == "loop":
                return self.gate_biases[expr]
            return self.repeated_bias(expr, self.stacking)
        name = self.name(expr)
        if expr.step is None:       # a whole sequence (attention) reads (B, T, n)
            return f"{name}.swapaxes(0, 1)" if self.whole and expr in self.time_major else name
        steps = expr.whole in self.time_major
        lead = "" if steps else ":, "
        if expr.step == "T":
            return f"{name}[{lead}-1]"
        if self._time == "loop" and expr.whole in self.step_local:
            return name
        if self._time == "loop":
            at = "t" if expr.step == 0 else f"t {'+-'[expr.step < 0]} {abs(expr.step)}"
            return f"{name}[{lead}{at}]"
        if isinstance(self._time, tuple):
            first, stop = (n + expr.step for n in self._time)
            name = f"{name}[{lead}{first or ''}:{'' if stop == self.length else stop}]"
        elif expr.step != 0:
            raise ValueError(f"{name} at step t{expr.step:+d} outside a loop over time")
        if steps != (self._layout == "time"):
            return f"{name}.swapaxes(0, 1)"
        return name

    def repeated_bias(self, bias: NetTensor, stacking: tuple[int, int]) -> str:
        """A bias vector of a gate-major array of (G, w) ``stacking`` as one (G, B, w) array, a
        row per gate and sample: added to a step, or to every step, it broadcasts over the
        leading axes only (a (G, 1, w) view broadcast over the samples is added w numbers at a
        time, 1.8-2x slower)."""
        gates, width = stacking
        return f"np.repeat({self.name(bias)}.reshape({gates}, 1, {width}), {self.batch_size}, axis=1)"

    def _gate_view(self, expr: NetTensor, gates: str | None) -> str:
        """A view of a gate-major array (``gates``: which of them, "2" or "0:2"; None: all),
        at its step (``Zh1_steps[t, 2]``), or over every step (``Zh1_steps[:, 2]``)."""
        name = self.name(expr)
        if self._time == "loop" and expr.whole in self.step_local:     # one step's (G, B, w)
            return f"{name}[{gates}]" if gates else name
        if expr.step is None or (self._time is None and expr.step == 0):
            at = ":"
        elif expr.step == "T":
            at = "-1"
        elif self._time == "loop":
            at = "t" if expr.step == 0 else f"t {'+-'[expr.step < 0]} {abs(expr.step)}"
        else:
            first, stop = (n + expr.step for n in self._time)
            at = f"{first or ''}:{'' if stop == self.length else stop}"
        view = f"{name}[{at}, {gates}]" if gates else name if at == ":" else f"{name}[{at}]"
        if ":" in at and self._layout != "time" and expr.step is not None:
            if gates is None or ":" in gates:   # (nothing reads several gates in (B, T, ...))
                raise ValueError(f"{name}: several gates of every step read batch-major")
            return f"{view}.swapaxes(0, 1)"
        return view

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if isinstance(expr, NetTensor):
            return self._print_NetTensor(expr)
        return super()._print_Symbol(expr)

    def _print_Float(self, expr: sp.Float) -> str:
        return repr(float(expr))

    # --- the batch reading of the vector-form nodes ----------------------------------------

    def _print_MatVec(self, expr: MatVec) -> str:
        matrix, vector, transposed = expr.args
        if self.stacking is not None:   # W v into a gate-major array: a (G, ..., w) product
            gates = self.stacking[0]
            if self._sequence(expr):
                self.helpers.add("_dot_gates")
                return f"_dot_gates({self._print(vector)}, {self._print(matrix)}, {gates})"
            return f"np.matmul({self._print(vector)}, {self.gate_weights[matrix]})"
        w = self._print(matrix) if transposed else self.transposes.get(
            matrix, f"{self._print(matrix)}.T")
        if self._sequence(expr):     # every step of every sample: one 2-D product
            self.helpers.add("_dot_rows")
            return f"_dot_rows({self._print(vector)}, {w})"
        return f"{self.parenthesize(vector, PRECEDENCE['Mul'])} @ {w}"

    def _print_Outer(self, expr: Outer) -> str:
        u, v = expr.args
        if self._sequence(expr):     # summed over the samples and the steps
            self.helpers.add("_dot_steps")
            return f"_dot_steps({self._print(u)}, {self._print(v)})"
        return (f"{self.parenthesize(u, PRECEDENCE['Atom'], strict=True)}.T @ "
                f"{self.parenthesize(v, PRECEDENCE['Mul'], strict=True)}")

    def _print_Inner(self, expr: Inner) -> str:
        u, v = expr.args
        body = v if u == ONE else u * v
        axis = -1 if self._sequence(expr) else 1
        return f"{self.parenthesize(body, PRECEDENCE['Atom'], strict=True)}" \
               f".sum(axis={axis}, keepdims=True)"

    def _print_Total(self, expr: Total) -> str:
        return f"np.sum({self._print(expr.args[0])})"

    def _print_Einsum(self, expr: Einsum, over_rows: bool = False) -> str:
        # batch reading: every per-sample operand, and then the result, gains the sample axis
        # (``over_rows``: summed over the samples instead)
        subscripts, *operands = expr.args
        inputs, output = str(subscripts).split("->")
        if not over_rows and len(operands) == 1 and isinstance(operands[0], Windows) and \
                inputs[:3] == output and len(inputs) == 5 and \
                tuple(operands[0].args[3]) == (0, 0):
            # an average pool's window sums: strided slices added, as the maximum's
            tensor, kernel, stride, _padding = operands[0].args
            self.helpers.add("_window_sum")
            return f"_window_sum({self._print(tensor)}, {_ints(kernel)}, {_ints(stride)})"
        correlation = self._correlation(inputs.split(","), output, operands, over_rows)
        if correlation is not None:
            return correlation
        batched = [not (isinstance(o, NetTensor) and o.is_parameter) for o in operands]
        maps = [map_valued(o) for o in operands]
        inputs = ",".join(with_samples(s, image) if b else s
                          for b, image, s in zip(batched, maps, inputs.split(",")))
        if any(batched) and not over_rows:
            output = with_samples(output, any(maps) and len(output) >= 3)
        return _einsum_call(f"{inputs}->{output}", [self._print(o) for o in operands])

    def _correlation(self, inputs: list[str], output: str, operands: list[sp.Expr],
                     over_rows: bool) -> str | None:
        """A convolution (kernels w[j,k,p,q] against the windows of x, output (j, r, s)) or
        a kernel's gradient (δ[j,r,s] against the windows of x, summed over the samples,
        output (j, k, p, q)) as one batched matrix product on _im2col's copy; else None."""
        if len(operands) != 2 or not any(isinstance(o, Windows) for o in operands):
            return None
        at = 0 if isinstance(operands[0], Windows) else 1
        windows, other = operands[at], operands[1 - at]
        window, letters = inputs[at], inputs[1 - at]
        if len(window) != 5:
            return None
        k, r, s_, p, q = window
        kernel = windows.args[1]
        parameter = isinstance(other, NetTensor) and other.is_parameter
        if parameter and not over_rows and len(letters) == 4 and letters[1:] == k + p + q \
                and output == letters[0] + r + s_:
            self.helpers.add("_correlate")
            return f"_correlate({self._print(other)}, {self.windows_copy(windows)})"
        if not parameter and over_rows and len(letters) == 3 and letters[1:] == r + s_ \
                and output == letters[0] + k + p + q:
            self.helpers.add("_correlate_kernel")
            return (f"_correlate_kernel({self._print(other)}, {self.windows_copy(windows)}, "
                    f"{_ints(kernel)})")
        return None

    def windows_copy(self, windows: Windows) -> str:
        """The _im2col copy of ``windows``: the forward pass's array when it keeps one."""
        if windows in self.columns:
            return self._print(self.columns[windows])
        tensor, kernel, stride, padding = windows.args
        self.helpers.add("_im2col")
        return (f"_im2col({self._print(tensor)}, {_ints(kernel)}, {_ints(stride)}, "
                f"{_ints(padding)})")

    def _print_RowSum(self, expr: RowSum) -> str:
        # a sum over the samples of products of tensors: inside np.einsum, with no array of
        # shape (B, ...) in between; anything else: summed over axis 0
        terms = [self._summed_product(term) for term in sp.Add.make_args(expr.args[0])]
        sequence = self._sequence(expr)
        if all(term is not None for term in terms) and not sequence:
            return " + ".join(terms).replace("+ -", "- ")
        if sequence:        # over the steps and the samples
            return self._helper("_sum_steps", expr.args[0])
        axis = "3" if map_valued(expr.args[0]) else "0"
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Atom'], strict=True)}" \
               f".sum(axis={axis})"

    def _summed_product(self, term: sp.Expr) -> str | None:
        """``coefficient * np.einsum(...)``, the sum over the samples of ``term``, when it is a
        number times a contraction or a product of placed tensors; else None."""
        coefficient, rest = term.as_coeff_Mul()
        if isinstance(rest, Einsum):
            printed = self._print_Einsum(rest, over_rows=True)
        else:
            factors = sp.Mul.make_args(rest)
            if not all(isinstance(f, Broadcast) for f in factors):
                return None
            inputs = []
            for tensor, axes, frame in (f.args for f in factors):
                inputs.append(str(axes) if tensor.is_parameter else
                              with_samples(str(axes), tensor.rank == 3))
            printed = _einsum_call(f"{','.join(inputs)}->{factors[0].args[2]}",
                                   [self._print(f.args[0]) for f in factors])
        return printed if coefficient == 1 else f"{self._print(coefficient)}*{printed}"

    def _print_Broadcast(self, expr: Broadcast) -> str:
        tensor, axes, frame = (expr.args[0], str(expr.args[1]), str(expr.args[2]))
        batched = not tensor.is_parameter
        name = self._print(tensor)
        # the axes of the result: the frame's, the samples' among them ("b": first, or after
        # the three of a feature map's frame); the array's own, in the order it is stored
        result = with_samples(frame, len(frame) >= 3 and (
            expr in self.among_maps or (batched and tensor.rank == 3)))
        own = with_samples(axes, tensor.rank == 3) if batched else axes
        ordered = "".join(letter for letter in result if letter in own)
        if ordered != own:      # its axes in the frame's order (a view)
            name = f"np.einsum({f'{own}->{ordered}'!r}, {name})"
        slots = [":" if letter in own else "None" for letter in result]
        if not batched and result[0] == "b":
            slots = slots[1:]       # broadcasting adds the leading axis of the samples
        if all(slot == ":" for slot in slots):
            return name
        return f"{name}[{', '.join(slots)}]"

    def _print_SumAxes(self, expr: SumAxes) -> str:
        body, frame, kept = expr.args[0], str(expr.args[1]), str(expr.args[2])
        result = with_samples(frame, len(frame) >= 3 and map_valued(body))
        axes = tuple(n - len(result) for n, letter in enumerate(result)
                     if letter != "b" and letter not in kept)
        if isinstance(body, sp.Pow) and body.exp == 2 and \
                axes == tuple(range(-len(axes), 0)):        # a squared distance
            self.helpers.add("_sum_squares")
            return f"_sum_squares({self._print(body.base)}, {len(axes)})"
        return f"np.sum({self._print(body)}, axis={axes!r})"

    # --- sequences (docs/architecture.md, "Sequences") -------------------------------------

    def _print_Guarded(self, expr: Guarded) -> str:
        # expr at the (1-based) steps low..high of a loop over t (from 0), else 0
        body, low, high = (e.xreplace({LENGTH: self.length}) for e in expr.args)
        first, last = int(low) - 1, int(high) - 1
        if first == last:
            condition = f"t == {first}"
        else:
            parts = ([f"t >= {first}"] if first > 0 else []) + (
                [f"t <= {last}"] if last < self.length - 1 else [])
            condition = " and ".join(parts) or "True"
        return f"({self._print(body)} if {condition} else 0)"

    def _print_Block(self, expr: Block) -> str:
        tensor, start, size = expr.args
        if isinstance(tensor, NetTensor) and tensor.whole in self.gates:
            count, width = self.gates[tensor.whole]
            first, stop = int(start) // width, int(start + size) // width
            return self._gate_view(tensor, str(first) if stop == first + 1 else None if (
                first, stop) == (0, count) else f"{first}:{stop}")
        return (f"{self.parenthesize(tensor, PRECEDENCE['Atom'], strict=True)}"
                f"[..., {int(start)}:{int(start + size)}]")

    def _print_Concat(self, expr: Concat) -> str:
        *parts, _size = expr.args
        return f"np.concatenate(({', '.join(self._print(p) for p in parts)}), axis=-1)"

    # --- feature maps (docs/architecture.md, "Images") -------------------------------------

    def _print_Windows(self, expr: Windows) -> str:
        tensor, kernel, stride, padding = expr.args
        self.helpers.add("_windows")
        return (f"_windows({self._print(tensor)}, {_ints(kernel)}, {_ints(stride)}, "
                f"{_ints(padding)})")

    def _print_WindowsMax(self, expr: WindowsMax) -> str:
        windows = expr.args[0]
        tensor, kernel, stride, padding = windows.args
        if tuple(padding) == (0, 0):       # a pooling layer: a maximum of strided slices
            self.helpers.add("_window_max")
            return f"_window_max({self._print(tensor)}, {_ints(kernel)}, {_ints(stride)})"
        return f"{self._print(windows)}.max(axis=(4, 5))"

    def _print_FirstMaxMask(self, expr: FirstMaxMask) -> str:
        return self._helper("_first_max", expr.args[0])

    def _print_Fold(self, expr: Fold) -> str:
        cols, shape, stride, padding, kernel = expr.args
        correlated = _correlated(cols, kernel)
        if correlated is not None:  # a convolution's δ: the full correlation, flipped kernel
            self.helpers.add("_correlate_input")
            delta, kernels = correlated
            return (f"_correlate_input({self._print(delta)}, {self._print(kernels)}, "
                    f"{_ints(shape)}, {_ints(stride)}, {_ints(padding)})")
        routed = routed_by_max(cols, shape, stride, padding, kernel)
        if routed is not None:    # max pooling's δ: routed to each window's first maximum
            self.helpers.add("_max_unpool")
            delta, windows = routed
            tensor = windows.args[0]
            largest = (self._print(self.maxima[windows]) if windows in self.maxima else
                       self._print_WindowsMax(WindowsMax(windows)))
            return (f"_max_unpool({self._print(delta)}, {self._print(tensor)}, {largest}, "
                    f"{_ints(kernel)}, {_ints(stride)})")
        self.helpers.add("_fold")
        return (f"_fold({self._print(cols)}, {_ints(shape)}, {_ints(stride)}, "
                f"{_ints(padding)}, {_ints(kernel)})")

    def times_tiles(self, out: str, small: sp.Expr, kernel: sp.Expr) -> str:
        """The code that multiplies the feature maps ``out`` by ``small``, one value per tile
        of ``kernel``'s size (see tiled)."""
        self.helpers.add("_times_tiles")
        return f"_times_tiles({out}, {self.doprint(small)}, {_ints(kernel)})"

    def _print_Flatten(self, expr: Flatten) -> str:
        # feature maps (C, H, W, B) -> rows (B, C * H * W), C-major: a transposed view
        name = self.parenthesize(expr.args[0], PRECEDENCE["Atom"], strict=True)
        return f"{name}.reshape(-1, {name}.shape[-1]).T"

    def _print_Unflatten(self, expr: Unflatten) -> str:
        # rows (B, C * H * W) -> feature maps (C, H, W, B)
        vector, (height, width) = expr.args
        name = self.parenthesize(vector, PRECEDENCE["Atom"], strict=True)
        return f"{name}.T.reshape(-1, {int(height)}, {int(width)}, len({name}))"

    # --- functions ---------------------------------------------------------------------------

    def _print_sigmoid(self, expr: sp.Function) -> str:
        return self._helper("_sigmoid", *expr.args)

    def _print_softplus(self, expr: sp.Function) -> str:
        return self._helper("_softplus", *expr.args)

    def _print_Softmax(self, expr: Softmax) -> str:
        return self._helper("_softmax", *expr.args)

    def _print_CausalSoftmax(self, expr: CausalSoftmax) -> str:
        return self._helper("_causal_softmax", *expr.args)

    # --- whole sequences (attention) -------------------------------------------------------

    def _print_MatProd(self, expr: MatProd) -> str:
        left, right = (self.parenthesize(a, PRECEDENCE["Mul"], strict=True) for a in expr.args)
        return f"{left} @ {right}"

    def _print_Transposed(self, expr: Transposed) -> str:
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Atom'], strict=True)}" \
               ".swapaxes(-1, -2)"

    def _print_SumLast(self, expr: SumLast) -> str:
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Atom'], strict=True)}" \
               ".sum(axis=-1, keepdims=True)"

    def _print_Causal(self, expr: Causal) -> str:
        return f"np.tri({self.length})"

    def _print_LogSumExp(self, expr: LogSumExp) -> str:
        return self._helper("_logsumexp", *expr.args)

    def _print_erf(self, expr: sp.Function) -> str:
        return self._helper("_erf", *expr.args)

    def _print_Max(self, expr: sp.Max) -> str:
        return self._pairwise("np.maximum", expr.args)

    def _print_Min(self, expr: sp.Min) -> str:
        return self._pairwise("np.minimum", expr.args)

    def _pairwise(self, function: str, args: tuple[sp.Expr, ...]) -> str:
        # arrays first, so the result has the arrays' dtype; nested for more than two
        ordered = sorted(args, key=lambda arg: arg.is_number)
        text = self._print(ordered[-1])
        for arg in reversed(ordered[:-1]):
            text = f"{function}({self._print(arg)}, {text})"
        return text

    def _print_Mul(self, expr: sp.Mul) -> str:
        # a boolean mask cannot be negated (NumPy refuses -mask): in a negative product the
        # masks come last, after the signed float factors; alone, the sign goes into the
        # bracket's value
        brackets = [factor for factor in expr.args if is_bracket(factor)]
        if not brackets or not expr.could_extract_minus_sign():
            return super()._print_Mul(expr)
        rest = sp.Mul(*(factor for factor in expr.args if not is_bracket(factor)))
        if rest.is_number:
            condition = sp.And(*(bracket.args[0].cond for bracket in brackets))
            return self._print(sp.Piecewise((rest, condition), (0, True)))
        return "*".join([self.parenthesize(rest, PRECEDENCE["Mul"]),
                         *(self._print(bracket) for bracket in brackets)])

    def _print_Add(self, expr: sp.Add, order: str | None = None) -> str:
        terms = self.ordered_terms(expr, order)
        text = self._print(terms[0])
        for term in terms[1:]:
            if term.could_extract_minus_sign():
                text += " - " + self.parenthesize(-term, PRECEDENCE["Add"], strict=True)
            else:
                text += " + " + self.parenthesize(term, PRECEDENCE["Add"])
        return text

    def _print_Relational(self, expr: sp.core.relational.Relational) -> str:
        prec = PRECEDENCE["Relational"]
        return (f"{self.parenthesize(expr.lhs, prec)} {expr.rel_op} "
                f"{self.parenthesize(expr.rhs, prec)}")

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        *pieces, (default, last) = expr.args
        if last != sp.true:
            raise ValueError(f"a Piecewise without a default branch cannot be printed: {expr}")
        values = [piece.expr for piece in expr.args]
        if is_bracket(expr):
            # an indicator: a boolean mask, which multiplies as 0/1 in the array's dtype
            return f"({self._print(pieces[0].cond)})"
        text = self._print(default)
        for piece in reversed(pieces):
            text = f"np.where({self._print(piece.cond)}, {self._print(piece.expr)}, {text})"
        if all(value.is_number for value in values):
            # np.where of Python numbers makes float64: keep the dtype of the array compared
            arrays = sorted(expr.atoms(NetTensor), key=sp.default_sort_key)
            text = f"{text}.astype({self._print(arrays[0])}.dtype)"
        return text

"""The image helpers a generated module may define (derive/render/numpy_printer.py) against
their definitions written entry by entry, over random sizes, strides and paddings: the
fallbacks too, which the built-in ops' modules do not reach. The definitions below index
feature maps as PyTorch does, (B, C, H, W); the helpers take and give them batch-last,
(C, H, W, B), and windows (C, H', W', B, kh, kw) (docs/architecture.md, "Images")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from derive.render.numpy_printer import HELPERS

NAMES = ("_windows", "_fold", "_first_max", "_window_max", "_window_sum", "_max_unpool",
         "_im2col", "_correlate", "_correlate_kernel", "_correlate_input", "_times_tiles",
         "_block_size", "_dot_steps")
SPACE: dict = {"np": np}
for _name in NAMES:
    exec(HELPERS[_name], SPACE)  # noqa: S102 (derive's own helper source, not user text)


def last(maps: np.ndarray) -> np.ndarray:
    """Feature maps (B, C, H, W) or their windows (B, C, H', W', kh, kw) batch-last."""
    return np.moveaxis(maps, 0, 3)


def batch_first(maps: np.ndarray) -> np.ndarray:
    """The inverse of last."""
    return np.moveaxis(maps, 3, 0)


def padded(x: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    top, left = padding
    return np.pad(x, ((0, 0), (0, 0), (top, top), (left, left)))


def window(x: np.ndarray, kernel, stride, padding, r: int, s: int) -> np.ndarray:
    """Window (r, s) (from 0) of the padded maps: (B, C, kh, kw)."""
    p = padded(x, padding)
    return p[:, :, r * stride[0]:r * stride[0] + kernel[0], s * stride[1]:s * stride[1] + kernel[1]]


geometry = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
                     st.integers(0, 1), st.integers(0, 1), st.integers(1, 3), st.integers(2, 7),
                     st.integers(2, 7), st.integers(0, 10_000))


def case(g):
    kh, kw, sh, sw, ph, pw, channels, height, width, seed = g
    rng = np.random.default_rng(seed)
    height, width = max(height, kh), max(width, kw)
    x = rng.standard_normal((2, channels, height, width))
    rows = (height + 2 * ph - kh) // sh + 1
    cols = (width + 2 * pw - kw) // sw + 1
    return rng, x, (kh, kw), (sh, sw), (ph, pw), rows, cols


@settings(max_examples=40, deadline=None, derandomize=True)
@given(geometry)
def test_windows_im2col_and_correlations(g) -> None:
    rng, x, kernel, stride, padding, rows, cols = case(g)
    windows = batch_first(SPACE["_windows"](last(x), kernel, stride, padding))
    assert windows.shape == (*x.shape[:2], rows, cols, *kernel)
    for r, s in itertools.product(range(rows), range(cols)):
        assert np.array_equal(windows[:, :, r, s], window(x, kernel, stride, padding, r, s))
    im2col = SPACE["_im2col"](last(x), kernel, stride, padding)
    assert np.array_equal(im2col, windows.transpose(1, 4, 5, 2, 3, 0).reshape(-1, rows, cols,
                                                                              len(x)))
    w = rng.standard_normal((3, x.shape[1], *kernel))
    expected = np.einsum("bkrspq,jkpq->bjrs", windows, w)
    assert np.allclose(batch_first(SPACE["_correlate"](w, im2col)), expected)
    delta = rng.standard_normal((len(x), 3, rows, cols))
    assert np.allclose(SPACE["_correlate_kernel"](last(delta), im2col, kernel),
                       np.einsum("bkrspq,bjrs->jkpq", windows, delta))
    # the fold is the adjoint of the windows: <fold(c), x> = <c, windows(x)>
    parts = rng.standard_normal(windows.shape)
    folded = batch_first(SPACE["_fold"](last(parts), x.shape[2:], stride, padding, kernel))
    assert np.isclose(np.sum(folded * x), np.sum(parts * windows))
    broadcast = SPACE["_fold"](last(delta[:, :1, :, :, None, None]), x.shape[2:], stride,
                               padding, kernel)
    full = SPACE["_fold"](last(np.broadcast_to(delta[:, :1, :, :, None, None],
                                               (len(x), 1, rows, cols, *kernel)).copy()),
                          x.shape[2:], stride, padding, kernel)
    assert np.allclose(broadcast, full)
    inputs = SPACE["_correlate_input"](last(delta), w, x.shape[2:], stride, padding)
    assert np.allclose(inputs, SPACE["_fold"](last(np.einsum("bjrs,jkpq->bkrspq", delta, w)),
                                              x.shape[2:], stride, padding, kernel))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(geometry, st.booleans())
# windows that tile the maps (every entry written once, nothing cleared first), and not
@example((2, 2, 2, 2, 0, 0, 2, 4, 6, 1), True)
@example((2, 3, 2, 3, 0, 0, 1, 4, 6, 2), False)
@example((2, 2, 2, 2, 0, 0, 2, 5, 4, 3), True)
@example((1, 1, 1, 1, 0, 0, 1, 3, 2, 4), False)
def test_pooling_helpers_route_to_the_first_maximum(g, ties) -> None:
    rng, x, kernel, stride, _padding, _rows, _cols = case(g)
    if ties:
        x = np.round(x)          # many equal entries in a window
    rows = (x.shape[2] - kernel[0]) // stride[0] + 1
    cols = (x.shape[3] - kernel[1]) // stride[1] + 1
    windows = batch_first(SPACE["_windows"](last(x), kernel, stride, (0, 0)))
    assert np.array_equal(batch_first(SPACE["_window_max"](last(x), kernel, stride)),
                          windows.max(axis=(4, 5)))
    assert np.allclose(batch_first(SPACE["_window_sum"](last(x), kernel, stride)),
                       windows.sum(axis=(4, 5)))
    mask = batch_first(SPACE["_first_max"](last(windows)))
    delta = rng.standard_normal((len(x), x.shape[1], rows, cols))
    expected = np.zeros_like(x)
    for b, c, r, s in itertools.product(*(range(n) for n in delta.shape)):
        flat = windows[b, c, r, s].reshape(-1)
        first = int(np.flatnonzero(flat == flat.max())[0])      # row-major: the first
        p, q = divmod(first, kernel[1])
        assert mask[b, c, r, s].reshape(-1).tolist() == [float(n == first)
                                                         for n in range(flat.size)]
        expected[b, c, r * stride[0] + p, s * stride[1] + q] += delta[b, c, r, s]
    largest = SPACE["_window_max"](last(x), kernel, stride)
    unchanged = delta.copy()
    assert np.allclose(batch_first(SPACE["_max_unpool"](last(delta), last(x), largest, kernel,
                                                  stride)), expected)
    assert np.array_equal(delta, unchanged)      # the caller's error is left as it was
    assert np.allclose(batch_first(SPACE["_fold"](last(delta[..., None, None] * mask), x.shape[2:],
                                            stride, (0, 0), kernel)), expected)


@pytest.mark.parametrize("kernel", [(1, 1), (2, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("cover", [True, False])
def test_a_fold_of_one_value_per_window_tiles_or_adds(kernel, cover) -> None:
    # an average pool's error: windows that tile the maps are one broadcast copy, the others
    # one addition per offset; both equal the fold of the window values written out
    rng = np.random.default_rng(sum(kernel))
    rows, cols = 3, 2
    shape = (rows * kernel[0] + (0 if cover else 1), cols * kernel[1])
    delta = rng.standard_normal((2, 3, rows, cols))
    spread = np.broadcast_to(delta[..., None, None], (*delta.shape, *kernel)).copy()
    expected = SPACE["_fold"](last(spread), shape, kernel, (0, 0), kernel)
    folded = SPACE["_fold"](last(delta[..., None, None]), shape, kernel, (0, 0), kernel)
    assert np.array_equal(folded, expected)
    assert folded.shape == (3, *shape, 2)


@pytest.mark.parametrize("kernel", [(1, 1), (2, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiles_times_their_window_value_in_place(kernel, dtype) -> None:
    # an average pool's error times f(a): each kh x kw tile of the maps times its window's
    # value, written entry by entry; in place, in the maps' dtype
    rng = np.random.default_rng(sum(kernel))
    small = rng.standard_normal((2, 3, 4, 2)).astype(dtype)          # (B, C, H', W')
    maps = rng.standard_normal((2, 3, 4 * kernel[0], 2 * kernel[1])).astype(dtype)
    expected = maps.copy()
    for b, c, h, w in itertools.product(*(range(n) for n in maps.shape)):
        expected[b, c, h, w] *= small[b, c, h // kernel[0], w // kernel[1]]
    out = np.ascontiguousarray(last(maps))
    result = SPACE["_times_tiles"](out, last(small), kernel)
    assert np.shares_memory(result, out) and result.dtype == dtype
    assert np.array_equal(batch_first(result), expected)


@pytest.mark.parametrize(("kernels", "channels"), [(1, 1), (6, 1), (8, 3), (9, 3), (16, 6)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_over_many_positions_in_blocks_equal_one_product(kernels, channels,
                                                                  dtype) -> None:
    # few kernels over many positions: blocks of at most 2**19 multiply-adds (OpenBLAS's
    # small-matrix kernels), each a multiple of 64 positions; the same numbers as one product
    rng = np.random.default_rng(kernels)
    w = rng.standard_normal((kernels, channels, 3, 3)).astype(dtype)
    cols = rng.standard_normal((channels * 9, 30, 31, 40)).astype(dtype)     # 37200 positions
    delta = rng.standard_normal((kernels, 30, 31, 40)).astype(dtype)
    count = 30 * 31 * 40
    size = SPACE["_block_size"](kernels, channels * 9, count)
    if kernels > 8 or kernels * channels * 9 * count <= 1 << 19:
        assert size == count
    else:
        assert size < count and size % 64 == 0 and kernels * channels * 9 * size <= 1 << 19
    tolerance = {"rtol": 1e-4, "atol": 1e-3} if dtype == np.float32 else {"rtol": 1e-12}
    one = (w.reshape(kernels, -1) @ cols.reshape(len(cols), -1)).reshape(delta.shape)
    assert np.allclose(SPACE["_correlate"](w, cols), one, **tolerance)
    kernel = (delta.reshape(kernels, -1) @ cols.reshape(len(cols), -1).T).reshape(w.shape)
    got = SPACE["_correlate_kernel"](delta, cols, (3, 3))
    assert got.dtype == dtype and np.allclose(got, kernel, **tolerance)

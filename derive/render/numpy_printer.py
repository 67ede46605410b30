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

import sympy as sp
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import PRECEDENCE

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
from derive.quantities import NetTensor
from derive.render.stability import LogSumExp, Softmax


class RowSum(sp.Function):
    """``RowSum(v)``: the sum of v over the samples of a batch (a bias gradient, BP3)."""

    nargs = 1


#: The batch size, by which delta^L is divided so that row sums are batch means.
BATCH = sp.Symbol("B", positive=True, integer=True)

#: Source of each helper function a generated module may need, in the order modules list them.
HELPERS: dict[str, str] = {
    "_sigmoid": '''\
def _sigmoid(x):
    """The logistic function 1 / (1 + exp(-x)), from e = exp(-|x|) <= 1: 1 / (1 + e) for
    x >= 0, e / (1 + e) below. No overflow, and full relative precision far below 0 too."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)
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
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
''',
    "_logsumexp": '''\
def _logsumexp(x):
    """log(sum(exp(x))) of each row, as a column; the row maximum is taken out first."""
    top = x.max(axis=1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))
''',
    "_softmax_logsumexp": '''\
def _softmax_logsumexp(x):
    """(softmax of each row, log-sum-exp of each row as a column), from one exponential."""
    top = x.max(axis=1, keepdims=True)
    e = np.exp(x - top)
    total = e.sum(axis=1, keepdims=True)
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

#: Batch names by role: a^l -> A1, w^l -> W1, ...; lse^l is LogSumExp(z^l), one per sample.
BATCH_NAMES = {"a": "A", "z": "Z", "delta": "delta", "w": "W", "b": "b", "gamma": "gamma",
               "beta": "beta", "mu": "mu", "var": "var", "xhat": "Xhat", "mask": "M",
               "lse": "LSE"}


def batch_name(tensor: NetTensor) -> str:
    """The name of a quantity in generated code: X, Y, A1, Z1, delta2, W1, dC_dXhat3, ..."""
    if tensor.role == "y":
        return "Y"
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
    contraction (a sum over the samples first, a matrix product through BLAS)."""
    optimize = ", optimize=True" if len(operands) > 1 else ""
    return f"np.einsum({subscripts!r}, {', '.join(operands)}{optimize})"


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


class NumPyBatchPrinter(NumPyPrinter):
    """Prints vector-form expressions as NumPy code over batches (rows = samples)."""

    _module = "np"
    printmethod = "_derive_numpy"

    def __init__(self, settings: dict | None = None) -> None:
        super().__init__({"fully_qualified_modules": True, **(settings or {})})
        self.helpers: set[str] = set()

    # numpy.exp -> np.exp; the generated module imports numpy as np
    def _module_format(self, fqn: str, register: bool = True) -> str:
        if fqn.startswith("numpy."):
            fqn = "np." + fqn[len("numpy."):]
        return super()._module_format(fqn, register)

    def doprint(self, expr: sp.Expr, assign_to: str | None = None) -> str:
        return super().doprint(fold_numbers(expr), assign_to)

    def _helper(self, name: str, *args: sp.Expr) -> str:
        self.helpers.add(name)
        return f"{name}({', '.join(self._print(arg) for arg in args)})"

    def parenthesize(self, item: sp.Basic, level: int, strict: bool = False) -> str:
        # `@` binds like `*` in Python: a matrix product inside a product needs parentheses
        if isinstance(item, MatVec | Outer) and level >= PRECEDENCE["Mul"]:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

    # --- the network's quantities ----------------------------------------------------------

    def _print_NetTensor(self, expr: NetTensor) -> str:
        return batch_name(expr)

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if isinstance(expr, NetTensor):
            return self._print_NetTensor(expr)
        return super()._print_Symbol(expr)

    def _print_Float(self, expr: sp.Float) -> str:
        return repr(float(expr))

    # --- the batch reading of the vector-form nodes ----------------------------------------

    def _print_MatVec(self, expr: MatVec) -> str:
        matrix, vector, transposed = expr.args
        rows = self.parenthesize(vector, PRECEDENCE["Mul"])
        w = self._print(matrix)
        return f"{rows} @ {w}" if transposed else f"{rows} @ {w}.T"

    def _print_Outer(self, expr: Outer) -> str:
        u, v = expr.args
        return (f"{self.parenthesize(u, PRECEDENCE['Atom'], strict=True)}.T @ "
                f"{self.parenthesize(v, PRECEDENCE['Mul'], strict=True)}")

    def _print_Inner(self, expr: Inner) -> str:
        u, v = expr.args
        body = v if u == ONE else u * v
        return f"{self.parenthesize(body, PRECEDENCE['Atom'], strict=True)}" \
               ".sum(axis=1, keepdims=True)"

    def _print_Total(self, expr: Total) -> str:
        return f"np.sum({self._print(expr.args[0])})"

    def _print_Einsum(self, expr: Einsum) -> str:
        # batch reading: every per-sample operand, and then the result, gains the sample axis
        subscripts, *operands = expr.args
        inputs, output = str(subscripts).split("->")
        batched = [not (isinstance(o, NetTensor) and o.is_parameter) for o in operands]
        inputs = ",".join(("b" if b else "") + s for b, s in zip(batched, inputs.split(",")))
        output = ("b" if any(batched) else "") + output
        return _einsum_call(f"{inputs}->{output}", [self._print(o) for o in operands])

    def _print_RowSum(self, expr: RowSum) -> str:
        # a sum over the samples of products of tensors: inside np.einsum, with no array of
        # shape (B, ...) in between; anything else: summed over axis 0
        terms = [self._summed_product(term) for term in sp.Add.make_args(expr.args[0])]
        if all(term is not None for term in terms):
            return " + ".join(terms).replace("+ -", "- ")
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Atom'], strict=True)}.sum(axis=0)"

    def _summed_product(self, term: sp.Expr) -> str | None:
        """``coefficient * np.einsum(...)``, the sum over the samples of ``term``, when it is a
        number times a contraction or a product of placed tensors; else None."""
        coefficient, rest = term.as_coeff_Mul()
        if isinstance(rest, Einsum):
            printed = self._print_Einsum(rest).replace("->b", "->", 1)
        else:
            factors = sp.Mul.make_args(rest)
            if not all(isinstance(f, Broadcast) for f in factors):
                return None
            inputs = []
            for tensor, axes, frame in (f.args for f in factors):
                inputs.append(("" if tensor.is_parameter else "b") + str(axes))
            printed = _einsum_call(f"{','.join(inputs)}->{factors[0].args[2]}",
                                   [self._print(f.args[0]) for f in factors])
        return printed if coefficient == 1 else f"{self._print(coefficient)}*{printed}"

    def _print_Broadcast(self, expr: Broadcast) -> str:
        tensor, axes, frame = (expr.args[0], str(expr.args[1]), str(expr.args[2]))
        batched = not tensor.is_parameter
        name = self._print(tensor)
        ordered = "".join(letter for letter in frame if letter in axes)
        if ordered != axes:     # its axes in the frame's order (a view)
            lead = "b" if batched else ""
            name = f"np.einsum({f'{lead}{axes}->{lead}{ordered}'!r}, {name})"
        slots = [":" if letter in axes else "None" for letter in frame]
        if all(slot == ":" for slot in slots):
            return name
        return f"{name}[{', '.join([':'] * batched + slots)}]"

    def _print_SumAxes(self, expr: SumAxes) -> str:
        body, frame, kept = expr.args[0], str(expr.args[1]), str(expr.args[2])
        axes = tuple(n - len(frame) for n, letter in enumerate(frame) if letter not in kept)
        if isinstance(body, sp.Pow) and body.exp == 2:      # a squared distance
            self.helpers.add("_sum_squares")
            return f"_sum_squares({self._print(body.base)}, {len(axes)})"
        return f"np.sum({self._print(body)}, axis={axes!r})"

    # --- functions ---------------------------------------------------------------------------

    def _print_sigmoid(self, expr: sp.Function) -> str:
        return self._helper("_sigmoid", *expr.args)

    def _print_softplus(self, expr: sp.Function) -> str:
        return self._helper("_softplus", *expr.args)

    def _print_Softmax(self, expr: Softmax) -> str:
        return self._helper("_softmax", *expr.args)

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

    def _print_Add(self, expr: sp.Add, order: str | None = None) -> str:
        # matrix products first: `X @ W1.T + b1`, as the formula z = W a + b is written; then
        # a positive term, so `Z3 - LSE3` rather than `-LSE3 + Z3` (an array negation fewer)
        terms = sorted(self._as_ordered_terms(expr, order=order),
                       key=lambda term: (not term.has(MatVec, Outer),
                                         bool(term.could_extract_minus_sign())))
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
        if values == [1, 0] and len(pieces) == 1:
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

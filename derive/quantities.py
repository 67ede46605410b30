"""The quantities of a network as SymPy atoms that carry their identity in fields.

Every stage names network quantities with :class:`NetTensor`: a SymPy symbol whose ``role``
(``a``, ``z``, ``w``, ``b``, ``gamma``, ``delta``, ...), ``node`` (the layer l, 0 for the input,
``None`` for the target y) and ``of`` (for an adjoint ∂C/∂q: the role of q) are fields. Printers
and code generators read these fields; the symbol's name is only a display string and is never
parsed back (docs/architecture.md, "Identity is structure").

In index form a quantity of rank r ≥ 1 is ``sp.IndexedBase(tensor)[i1, ..., ir]``; a per-sample
scalar (rank 0, e.g. the mean μ of a layer norm) is the tensor itself. In tensor form every
quantity is the tensor itself: a whole vector, matrix or per-sample scalar.
"""

from __future__ import annotations

from functools import cache

import sympy as sp

#: Roles of parameters (their gradients are what training needs): a dense layer's or kernel's
#: w and b; a recurrent layer's input and hidden weights wx, wh and a GRU's two biases.
PARAMETER_ROLES = frozenset({"w", "b", "gamma", "beta", "wx", "wh", "bx", "bh", "wq", "wk",
                             "wv"})
#: Parameters that the L1/L2 penalty covers (weights and kernels only; docs/architecture.md):
#: an attention layer's query, key and value weights wq, wk, wv are weights too.
WEIGHT_ROLES = frozenset({"w", "wx", "wh", "wq", "wk", "wv"})


class NetTensor(sp.Symbol):
    """A network quantity: ``role`` at ``node``, of rank ``rank``; ``of`` for an adjoint.

    ``NetTensor("a", 2)`` is a^2; ``NetTensor("delta", 2)`` is δ²; ``NetTensor("grad", 3, of="mu")`` is
    ∂C/∂μ³; ``NetTensor("y")`` the target; ``NetTensor("a", 0)`` the input x = a⁰.
    ``parameter`` says whether q (for an adjoint: the q it is of) is a parameter: the built-in
    roles by default, a custom op's parameters explicitly.

    ``step`` makes the tensor form's view of a sequence quantity at one time step
    (docs/architecture.md, "Sequences"): an int c is the quantity at step t + c (rank one
    less: the time axis taken out), ``"T"`` at the last step; ``None`` is the quantity itself.
    """

    role: str
    node: int | None
    of: str | None
    rank: int
    parameter: bool
    step: int | str | None

    def __new__(  # noqa: PYI034 (SymPy constructors return the instance they build)
        cls, role: str, node: int | None = None, of: str | None = None, rank: int = 1,
        parameter: bool | None = None, step: int | str | None = None,
    ) -> NetTensor:
        if parameter is None:   # the built-in roles; a custom op's parameters say so
            parameter = (of if role == "grad" else role) in PARAMETER_ROLES
        return _tensor(cls, role, node, of, rank, parameter, step)

    def _hashable_content(self) -> tuple:
        # SymPy orders atoms by comparing these tuples: no None in them
        node = -1 if self.node is None else self.node
        step = "" if self.step is None else str(self.step)
        return (*super()._hashable_content(), self.role, node, self.of or "", self.rank,
                self.parameter, step)

    def __getnewargs_ex__(self) -> tuple[tuple, dict]:
        return (self.role, self.node, self.of, self.rank, self.parameter, self.step), {}

    def at_step(self, step: int | str) -> NetTensor:
        """This sequence quantity's view at time step t + ``step`` (or ``"T"``, the last)."""
        return NetTensor(self.role, self.node, self.of, self.rank - 1, self.parameter, step)

    @property
    def whole(self) -> NetTensor:
        """The sequence quantity a step view is of (itself if it is none)."""
        if self.step is None:
            return self
        return NetTensor(self.role, self.node, self.of, self.rank + 1, self.parameter)

    @property
    def is_parameter(self) -> bool:
        """Whether this is a parameter (for an adjoint ∂C/∂q: False; its ``target`` says)."""
        return self.parameter and self.role != "grad"

    def adjoint(self) -> NetTensor:
        """The tensor of ∂C/∂q for this quantity q."""
        return NetTensor("grad", self.node, of=self.role, rank=self.rank,
                         parameter=self.parameter, step=self.step)

    @property
    def target(self) -> NetTensor:
        """The quantity q of an adjoint ∂C/∂q."""
        return NetTensor(self.of, self.node, rank=self.rank, parameter=self.parameter,
                         step=self.step)

    @property
    def indexed(self) -> sp.IndexedBase:
        """The indexed base of this quantity (rank ≥ 1)."""
        return _indexed_base(self)


# SymPy deduces every assumption of a new symbol, IndexedBase or Indexed from ``real=True``
# (about 0.1 ms each): a deep network names the same quantities thousands of times, so each
# is built once. SymPy objects are immutable, which makes sharing them safe.


@cache
def _tensor(cls: type, role: str, node: int | None, of: str | None, rank: int,
            parameter: bool, step: int | str | None) -> NetTensor:
    # not Symbol's cached constructor: two tensors with one display name but other fields
    # (w^2 as a matrix and as a rank-0 label) must stay two objects
    obj = sp.Symbol.__xnew__(cls, display_name(role, node, of), real=True)
    obj.role, obj.node, obj.of, obj.rank, obj.parameter = role, node, of, rank, parameter
    obj.step = step
    return obj


@cache
def _indexed_base(tensor: NetTensor) -> sp.IndexedBase:
    return sp.IndexedBase(tensor, real=True)


def display_name(role: str, node: int | None, of: str | None = None) -> str:
    """The display name of a quantity: ``a^2``, ``delta^2``, ``dC/dmu^3``, ``y``; an array
    the code generator names (role ``hoisted``) by that name, so that two of them sort by it
    in printed sums, never by hash."""
    if role == "hoisted":
        return f"hoisted {of}"
    head = f"dC/d{of}" if role == "grad" else role
    return head if node is None else f"{head}^{node}"


def tensor_of(expr: sp.Basic) -> NetTensor | None:
    """The NetTensor of an Indexed quantity or a rank-0 NetTensor; None for anything else."""
    if isinstance(expr, NetTensor):
        return expr
    if isinstance(expr, sp.Indexed) and isinstance(expr.base.label, NetTensor):
        return expr.base.label
    return None


def entry(tensor: NetTensor, indices: tuple[sp.Expr, ...]) -> sp.Expr:
    """``tensor`` at ``indices``: an Indexed, or the tensor itself for rank 0."""
    if not indices:
        return tensor
    return _entry(tensor, tuple(indices))


@cache
def _entry(tensor: NetTensor, indices: tuple[sp.Expr, ...]) -> sp.Indexed:
    return tensor.indexed[indices]


def size_symbol(node: int) -> sp.Symbol:
    """The generic width n_l of node l's output (n_0 is the input width)."""
    return sp.Symbol(f"n_{node}", integer=True, positive=True)


#: The length of a sequence: its time steps are t = 1..T.
LENGTH = sp.Symbol("T", integer=True, positive=True)


def shape_symbols(node: int, rank: int) -> tuple[sp.Symbol, ...]:
    """The per-sample shape of node l's output as symbols: (n_l,) for a vector, (T, n_l) for
    a sequence (T steps of n_l features), (n_l, H_l, W_l) for an image (n_l channels of H_l
    rows and W_l columns)."""
    if rank == 1:
        return (size_symbol(node),)
    if rank == 2:
        return (LENGTH, size_symbol(node))
    return (size_symbol(node), sp.Symbol(f"H_{node}", integer=True, positive=True),
            sp.Symbol(f"W_{node}", integer=True, positive=True))


#: Index symbols, in the order formulas take them: j (this layer), k (the layer it reads),
#: then i, m, p, q, r, s for consumers and sums.
INDEX_POOL: tuple[sp.Symbol, ...] = sp.symbols("j k i m p q r s t u", integer=True,
                                               positive=True)
j, k, i, m = INDEX_POOL[:4]

#: Index families of an image's axes, so a formula reads as the textbooks write it: channels
#: j, k, i, m; rows r, u, e; columns s, v, f; a kernel's row and column offsets p, g and q, h.
#: A summation index renamed away from others stays in its family.
_FAMILIES: dict[str, tuple[sp.Symbol, ...]] = {
    "channel": INDEX_POOL[:4],
    "row": (INDEX_POOL[6], *sp.symbols("u e", integer=True, positive=True)),
    "col": (INDEX_POOL[7], *sp.symbols("v f", integer=True, positive=True)),
    "offset_row": (INDEX_POOL[4], *sp.symbols("g p'", integer=True, positive=True)),
    "offset_col": (INDEX_POOL[5], *sp.symbols("h q'", integer=True, positive=True)),
    "time": (INDEX_POOL[8], *sp.symbols("tau t' tau' t''", integer=True, positive=True)),
}
_FAMILY_OF = {index: family for family, members in _FAMILIES.items() for index in members
              if family != "channel"}
#: The axes of per-sample images and kernels, by rank: (channel, row, column) of a feature
#: map; (out channel, in channel, row offset, column offset) of a kernel; a pooling layer's
#: window indicator has a feature map's axes and then a window's.
_IMAGE_AXES = ("channel", "row", "col")
_KERNEL_AXES = ("channel", "channel", "offset_row", "offset_col")
_WINDOW_AXES = (*_IMAGE_AXES, "offset_row", "offset_col")


def index_family(index: sp.Symbol) -> str:
    """The family of an index symbol: "channel" (j, k, i, m), "row", "col", "offset_row",
    "offset_col", "time" (t, τ, t'), or "" for the general pool's others."""
    if index in _FAMILIES["channel"]:
        return "channel"
    return _FAMILY_OF.get(index, "")


def fresh_indices(count: int, used: set[sp.Symbol]) -> tuple[sp.Symbol, ...]:
    """``count`` index symbols from the pool that are not in ``used`` (pool order)."""
    out = [index for index in INDEX_POOL if index not in used][:count]
    if len(out) < count:
        raise ValueError("index pool exhausted")
    return tuple(out)


def family_indices(families: tuple[str, ...], used: set[sp.Symbol]) -> tuple[sp.Symbol, ...]:
    """One index per family in ``families`` ("channel", "row", "col", "offset_row",
    "offset_col"), none in ``used`` and no two equal; the general pool when a family runs
    out."""
    out: list[sp.Symbol] = []
    for family in families:
        taken = used | set(out)
        choice = next((index for index in _FAMILIES[family] if index not in taken), None)
        if choice is None:
            choice = fresh_indices(1, taken)[0]
        out.append(choice)
    return tuple(out)


def fresh_like(indices: tuple[sp.Symbol, ...], used: set[sp.Symbol]) -> tuple[sp.Symbol, ...]:
    """Replacements for ``indices`` that avoid ``used``, each from its own family (a row
    index stays a row index); indices of no image family come from the general pool."""
    out: list[sp.Symbol] = []
    for index in indices:
        taken = used | set(out)
        family = _FAMILY_OF.get(index)
        if family is None:
            out.append(fresh_indices(1, taken)[0])
        else:
            out.append(family_indices((family,), taken)[0])
    return tuple(out)


def indices_for(tensor: NetTensor, used: set[sp.Symbol] | None = None,
                shape: tuple[sp.Expr, ...] | None = None) -> tuple[sp.Symbol, ...]:
    """The free indices a formula about ``tensor`` (or its adjoint) is written in: j, k, ...
    for vectors and matrices; (t, j) for a sequence; (j, r, s) for a feature map, (j, k, p,
    q) for a kernel. With its per-sample ``shape`` given, an axis of length T takes a time
    index: a layer norm's mean of each step μ_t, attention weights α_{tτ}."""
    used = used or set()
    if shape and not tensor.parameter and LENGTH in shape and len(shape) == tensor.rank:
        return family_indices(tuple("time" if n == LENGTH else "channel" for n in shape),
                              used)
    if not tensor.parameter and tensor.rank == 2:
        return family_indices(("time", "channel"), used)
    if not tensor.parameter and tensor.rank == 3:
        return family_indices(_IMAGE_AXES, used)
    if not tensor.parameter and tensor.rank == 5:
        return family_indices(_WINDOW_AXES, used)
    if tensor.rank == 4 and (tensor.of if tensor.role == "grad" else tensor.role) == "w":
        return family_indices(_KERNEL_AXES, used)
    return fresh_indices(tensor.rank, used)

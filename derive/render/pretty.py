"""Terminal printer: derived formulas in the classic notation with Unicode.

A SymPy ``StrPrinter`` subclass: w^l_{jk} prints as ``w²ⱼₖ``, sums as ``Σₖ``, partial
derivatives as ``∂C/∂a²ⱼ``, vector forms with ``⊙`` for the Hadamard product and ``ᵀ`` for the
transpose. With ``batch=True`` the vector forms print in batch form (rows = samples): vectors
become matrices A², Z², Δ², Y and ``(W³)ᵀ δ³`` becomes ``Δ³ W³``.

Feature maps (docs/architecture.md, "Images"): an entry of rank 3 or more, or at a shifted
index, prints with brackets, ``a⁰[k, 2r+p-3, 2s+q-3]``; the Iverson bracket ``[1 ≤ r-u+2 ≤
2]``, a window's maximum ``max_{p,q}`` and its indicator ``𝟙[(p, q) = argmax_{p,q} ...]``; in
tensor form ``W¹ ⋆ a⁰`` (a convolution), ``a⁰ ⋆ δ¹`` (a kernel's gradient), ``δ² ⋆full
rot180(W²)``, the sliding windows ``win`` and their adjoint ``winᵀ``, ``vec`` and ``vec⁻¹``,
as :mod:`derive.render.imagenotation` reads the tree.

Sequences (docs/architecture.md, "Sequences"): a quantity at a step ``h¹ₜ₋₁``, the brackets
``[t ≤ T - 1]`` and ``[t = T]``, blocks of stacked gates ``z¹ₜ[n₁ + 1:2*n₁]``, stacked errors
``[...; ...]``, a shared parameter's gradient ``Σₜ δ¹ₜ (h¹ₜ₋₁)ᵀ`` (in batch form
``(1/B) Σₜ (Δ¹ₜ)ᵀ H¹ₜ₋₁``).

Attention (:func:`derive.derivation.stepform.whole_sequence`): entries ``α¹ₜτ`` (τ, τ' and t''
as they are), a whole sequence as the matrix of its steps, one row per step, ``Q¹``, ``K¹``,
``V¹``, ``S¹``, ``α¹``, ``Δ¹``; matrix products ``Δ¹ (V¹)ᵀ``, row sums ``rowsum(...)``, the
causal mask ``M_causal`` and the softmax of each row.
"""

from __future__ import annotations

import math
from typing import ClassVar

import sympy as sp
from sympy.printing.conventions import split_super_sub
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

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
    SumSteps,
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
from derive.registry.windows import FirstMax, InRange, WindowMax
from derive.render.imagenotation import (
    Geometry,
    contraction,
    folded,
    index_terms,
    is_index_expression,
    spread_map,
    summed_axes,
    windows_geometry,
)
from derive.render.latex_printer import is_whole_tensor, plus_first, step_condition

_SUP = str.maketrans("0123456789+-()l", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾ˡ")
_SUB = str.maketrans("0123456789ijkmlnaeot+-", "₀₁₂₃₄₅₆₇₈₉ᵢⱼₖₘₗₙₐₑₒₜ₊₋")
_SUBSCRIPTABLE = frozenset("0123456789ijkmlnaeot")
_GREEK = {"delta": "δ", "sigma": "σ", "nabla": "∇", "gamma": "γ", "beta": "β", "mu": "μ",
          "var": "(σ²)", "xhat": "x̂", "mask": "m",
          # a recurrent layer's weights, biases and stacked pre-activations: wₓ, wₕ, ...
          "wx": "wₓ", "wh": "wₕ", "bx": "bₓ", "bh": "bₕ", "zx": "zₓ", "zh": "zₕ",
          # attention: weights, projections
          "alpha": "α", "wq": "w_q", "wk": "w_k", "wv": "w_v",
          # a second time index, the steps that read step t
          "tau": "τ", "tau'": "τ'"}
_BATCH = {"a": "A", "z": "Z", "delta": "Δ", "y": "Y", "w": "W", "xhat": "X̂", "mask": "M",
          # a recurrent layer's matrices, states and gates, one row per sample (the names of
          # the generated code: Wx1, H1, C1, ...)
          "wx": "Wₓ", "wh": "Wₕ", "zx": "Zₓ", "zh": "Zₕ", "h": "H", "c": "C", "i": "I",
          "f": "F", "g": "G", "o": "O", "r": "R", "u": "U",
          # attention's queries, keys, values, scores (a whole sequence, or a batch at a step)
          "q": "Q", "k": "K", "v": "V", "s": "S", "alpha": "α", "wq": "W_q", "wk": "W_k",
          "wv": "W_v"}


def _step(tensor: NetTensor) -> str:
    """A step view's time step as a subscript: ₜ, ₜ₋₁, T."""
    if tensor.step is None:
        return ""
    if tensor.step == "T":
        return "_T"
    return "ₜ" + ("" if tensor.step == 0 else sub(f"{tensor.step:+d}"))


def sup(text: object) -> str:
    return str(text).translate(_SUP)


def sub(text: object) -> str:
    return str(text).translate(_SUB)


class UnicodePrinter(StrPrinter):
    """Prints derive expressions for a terminal."""

    # Indexed prints itself through "_sympystr"; a method name no object defines makes the
    # printer dispatch to the _print_* methods below instead.
    printmethod = "_derive_unicode"
    _default_settings: ClassVar[dict] = {**StrPrinter._default_settings, "batch": False}

    def _name(self, tensor: NetTensor, *, batch: bool = False) -> str:
        role = tensor.of if tensor.role == "grad" else tensor.role
        inner = tensor.target if tensor.role == "grad" else tensor
        if batch or (inner is not None and is_whole_tensor(inner)):
            # a batch, or every step of one sample (attention's Q, K, V, S, α, Δ)
            symbol = _BATCH.get(role, _GREEK.get(role, role))
        elif tensor.rank >= 2 and tensor.is_parameter and tensor.role != "grad":
            # the matrix W^l (its entries print as w^l_jk); Wₓ^l of a recurrent layer
            symbol = _GREEK[role].capitalize() if role in _GREEK else role.upper()
        else:
            symbol = _GREEK.get(role, role)
        if tensor.node is not None:
            symbol += sup(tensor.node)
        if tensor.role == "grad":
            return f"∂C/∂{symbol}"
        return symbol

    def _print_NetTensor(self, expr: NetTensor) -> str:
        if expr == ONE:
            return "𝟏"
        if expr.role == "grad" and not self._settings["batch"] and expr.rank == 1:
            inner = expr.target
            return f"∇_{self._name(inner)}{_step(inner)} C"
        return self._name(expr, batch=self._settings["batch"]) + _step(expr)

    # --- sequences (docs/architecture.md, "Sequences") ----------------------------------

    def _print_SumSteps(self, expr: SumSteps) -> str:
        (body,) = expr.args
        if self._settings["batch"] and isinstance(body, Outer):
            # the batch mean of the sum over the steps: (1/B) Σₜ (Uₜ)ᵀ Vₜ
            u, v = (self._print(arg) for arg in body.args)
            return f"(1/B) Σₜ ({u})ᵀ {v}"
        return f"Σₜ {self.parenthesize(body, PRECEDENCE['Mul'])}"

    def _print_StepGuard(self, expr: StepGuard) -> str:
        return f"[{step_condition(expr, self._print, '≤ ')}]"

    def _print_Block(self, expr: Block) -> str:
        tensor, start, size = expr.args
        return f"{self._print(tensor)}[{self._print(start + 1)}:{self._print(start + size)}]"

    def _print_Concat(self, expr: Concat) -> str:
        *parts, _size = expr.args
        return f"[{'; '.join(self._print(part) for part in parts)}]"

    # --- whole sequences (attention) ---------------------------------------------------

    def _print_MatProd(self, expr: MatProd) -> str:
        # an operand ∂C/∂S¹ in brackets: ∂C/∂S¹ K¹ would read as ∂C/∂(S¹ K¹)
        left, right = (self._print(arg) if isinstance(arg, (MatProd, Transposed)) or (
            isinstance(arg, NetTensor) and arg.role != "grad") else f"({self._print(arg)})"
            for arg in expr.args)
        return f"{left} {right}"

    def _print_Transposed(self, expr: Transposed) -> str:
        return f"({self._print(expr.args[0])})ᵀ"

    def _print_SumLast(self, expr: SumLast) -> str:
        return f"rowsum({self._print(expr.args[0])})"

    def _print_Causal(self, expr: Causal) -> str:
        return "M_causal"

    def _print_Softmax(self, expr: sp.Function) -> str:
        return f"softmax({self._print(expr.args[0])})"

    def _print_CausalSoftmax(self, expr: sp.Function) -> str:
        return f"softmax_causal({self._print(expr.args[0])})"

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if isinstance(expr, NetTensor):
            return self._print_NetTensor(expr)
        name, _sups, subs = split_super_sub(expr.name)
        if len(subs) == 1 and subs[0].isdigit() and name in ("n", "H", "W"):
            return name + sub(subs[0])          # a layer's sizes: n₂, H₂, W₂
        return _GREEK.get(expr.name, expr.name)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        label = expr.base.label
        name = self._name(NetTensor(label.role, label.node, label.of, rank=0)) \
            if isinstance(label, NetTensor) else str(label)
        indices = [self._index(index) for index in expr.indices]
        if len(indices) <= 2 and all(len(i) == 1 and i in _SUBSCRIPTABLE for i in indices):
            return name + sub("".join(indices))
        # a feature map's entry, a kernel's, a shifted index: a¹[j, 2r+p-2, 2s+q-2]
        return f"{name}[{', '.join(indices)}]"

    def _index(self, index: sp.Expr) -> str:
        """One index: a shifted one compact and in reading order, 2r+p-3."""
        if not is_index_expression(index):
            return self._print(index)
        text = ""
        for term in index_terms(index):
            printed = self._print(term).replace("*", "").replace(" ", "")
            if text and not printed.startswith("-"):
                text += "+"
            text += printed
        return text

    def _print_Sum(self, expr: sp.Sum) -> str:
        indices = [self._print(limit[0]) for limit in expr.limits]
        body = self.parenthesize(expr.function, sp.printing.precedence.PRECEDENCE["Mul"])
        if all(i in _SUBSCRIPTABLE for i in "".join(indices)):
            return f"Σ{sub(''.join(indices))} {body}"
        return f"Σ_{''.join(indices)} {body}"

    # --- windows of feature maps -----------------------------------------------------------

    def _print_InRange(self, expr: InRange) -> str:
        value, low, high = (self._index(arg) for arg in expr.args)
        return f"[{low} ≤ {value} ≤ {high}]"

    def _print_WindowMax(self, expr: WindowMax) -> str:
        offsets = ",".join(str(limit[0]) for limit in expr.limits)
        return f"max_{offsets} {self._print(expr.function)}"

    def _print_FirstMax(self, expr: FirstMax) -> str:
        window, *at = expr.args
        avoid = set().union(*(a.free_symbols for a in at))
        renamed = {i: sp.Symbol(f"{i.name}'", integer=True, positive=True)
                   for i, _low, _high in window.limits if i in avoid}
        window = window.xreplace(renamed)
        offsets = ",".join(str(limit[0]) for limit in window.limits)
        position = ", ".join(self._index(a) for a in at)
        return f"𝟙[({position}) = argmax_{offsets} {self._print(window.function)}]"

    def _geometry(self, geometry: Geometry | None, *, kernel: bool, extra: str = "") -> str:
        notes = ([extra] if extra else []) + (geometry.notes(kernel=kernel)
                                              if geometry is not None else [])
        return f"[{', '.join(notes)}]" if notes else ""

    def _operand(self, expr: sp.Expr) -> str:
        return self.parenthesize(expr, PRECEDENCE["Mul"], strict=True)

    def _print_Windows(self, expr: Windows) -> str:
        return f"win{self._geometry(windows_geometry(expr), kernel=True)}({self._print(expr.args[0])})"

    def _print_WindowsMax(self, expr: WindowsMax) -> str:
        return f"max_p,q {self._print(expr.args[0])}"

    def _print_FirstMaxMask(self, expr: FirstMaxMask) -> str:
        return f"𝟙max({self._print(expr.args[0])})"

    def _print_Flatten(self, expr: Flatten) -> str:
        return f"vec({self._print(expr.args[0])})"

    def _print_Unflatten(self, expr: Unflatten) -> str:
        return f"vec⁻¹({self._print(expr.args[0])})"

    def _print_Fold(self, expr: Fold) -> str:
        found = folded(expr)
        if found.kind == "full":
            geometry = self._geometry(found.geometry, kernel=False, extra="full")
            return f"{self._operand(found.left)} ⋆{geometry} rot180({self._print(found.right)})"
        head = f"win{self._geometry(found.geometry, kernel=True)}ᵀ"
        if found.kind == "route":
            inner = f"{self._print(found.left)} ⊙ 𝟙max({self._print(found.right)})"
        else:
            inner = self._print(found.left)
        return f"{head}({inner})"

    def _as_ordered_terms(self, expr: sp.Add, order: str | None = None) -> list[sp.Expr]:
        # a convolution before its bias, W ⋆ a + b, as the dense W a + b
        terms = super()._as_ordered_terms(expr, order=order)
        return plus_first(sorted(terms, key=lambda term: 0 if term.has(Einsum) else 1))

    def _print_Derivative(self, expr: sp.Derivative) -> str:
        (var, _count), = expr.variable_count
        if isinstance(expr.expr, sp.core.function.AppliedUndef):
            name = expr.expr.func.__name__            # sigma_2 -> σ'₂(...)
            letter, _, layer = name.partition("_")
            return f"{_GREEK.get(letter, letter)}'{sub(layer)}({self._print(expr.expr.args[0])})"
        return f"∂{self._print(expr.expr)}/∂{self._print(var)}"

    def _print_Function(self, expr: sp.Function) -> str:
        if isinstance(expr, sp.core.function.AppliedUndef):
            letter, _, layer = expr.func.__name__.partition("_")
            args = ", ".join(self._print(a) for a in expr.args)
            return f"{_GREEK.get(letter, letter)}{sub(layer)}({args})"
        return super()._print_Function(expr)

    # --- math rather than SymPy's spelling: [z > 0], z², √x, 1e-5 ---------------------------

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        *pieces, (default, _) = expr.args
        if len(pieces) == 1 and (pieces[0].expr, default) == (1, 0):
            return f"[{self._print(pieces[0].cond)}]"       # an indicator (Iverson bracket)
        cases = [f"{self._print(e)} if {self._print(c)}" for e, c in pieces]
        return "{" + ", ".join([*cases, f"{self._print(default)} otherwise"]) + "}"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exponent = expr.args
        if exponent == sp.S.Half:
            return f"√{self.parenthesize(base, PRECEDENCE['Pow'], strict=True)}"
        if exponent == -sp.S.Half:
            return f"1/√{self.parenthesize(base, PRECEDENCE['Pow'], strict=True)}"
        text = self.parenthesize(base, PRECEDENCE["Pow"], strict=True)
        if exponent.is_Rational and not exponent.is_Integer:
            return f"{text}^({exponent})"                  # x^(3/2)
        if not exponent.is_Integer:
            return super()._print_Pow(expr, rational)
        if text[-1] in "⁰¹²³⁴⁵⁶⁷⁸⁹ˡ":
            text = f"({text})"          # (z¹)², not z¹² (which reads as z to the 12)
        return text + sup(exponent)

    def _print_Rational(self, expr: sp.Rational) -> str:
        return _decimal(expr) or super()._print_Rational(expr)

    def _print_KroneckerDelta(self, expr: sp.KroneckerDelta) -> str:
        if LENGTH in expr.args:        # the last step: [t = T], not δ_Tt (an error's letter)
            other = next(arg for arg in expr.args if arg != LENGTH)
            return f"[{self._print(other)} = T]"
        parts = [self._print(arg) for arg in expr.args]
        if all(len(part) == 1 and part.isascii() for part in parts):
            return "δ" + sub("".join(parts))
        return f"δ({', '.join(parts)})"       # δ(t, τ - 1): a step of the recurrence

    def _print_Total(self, expr: Total) -> str:
        return f"Σ({self._print(expr.args[0])})"

    def _print_Broadcast(self, expr: Broadcast) -> str:
        tensor, axes = expr.args[0], str(expr.args[1])
        if spread_map(expr):        # a bias per channel, δ over its window: the tensor itself
            return self._print(tensor) if not tensor.is_parameter else self._name(tensor)
        # an entry, in index notation: the axes are the indices
        return self._print(tensor) + sub(axes)

    def _print_SumAxes(self, expr: SumAxes) -> str:
        summed = "".join(c for c in str(expr.args[1]) if c not in str(expr.args[2]))
        body = self.parenthesize(expr.args[0], sp.printing.precedence.PRECEDENCE["Mul"])
        return f"Σ{sub(summed)} {body}"

    def _print_Einsum(self, expr: Einsum) -> str:
        found = contraction(expr)
        if found is not None and found.kind in ("conv", "correlate"):
            left, right = found.operands()
            geometry = self._geometry(found.geometry, kernel=False)
            return f"{self._operand(left)} ⋆{geometry} {self._operand(right)}"
        if found is not None and found.kind == "sum" and summed_axes(found):
            return f"Σ_{summed_axes(found).replace(',', '')} {self._operand(found.left)}"
        subscripts, *operands = expr.args
        inputs, output = str(subscripts).split("->")
        return f"einsum[{inputs}→{output}]({', '.join(self._print(o) for o in operands)})"

    def _print_MatVec(self, expr: MatVec) -> str:
        matrix, vector, transposed = expr.args
        w, v = self._print(matrix), self._print(vector)
        if self._settings["batch"]:
            return f"{v} {w}" if transposed else f"{v} ({w})ᵀ"
        return f"({w})ᵀ {v}" if transposed else f"{w} {v}"

    def _print_Outer(self, expr: Outer) -> str:
        u, v = (self._print(arg) for arg in expr.args)
        if self._settings["batch"]:
            return f"(1/B) ({u})ᵀ {v}"
        return f"{u} ({v})ᵀ"

    def _print_Inner(self, expr: Inner) -> str:
        u, v = expr.args
        if self._settings["batch"]:
            return f"rowsum({self._print(u * v if u != ONE else v)})"
        return f"({self._print(u)})ᵀ {self._print(v)}"

    def _print_Mul(self, expr: sp.Mul) -> str:
        guards = [f for f in expr.args if isinstance(f, StepGuard)]
        if guards and len(guards) < len(expr.args):
            # [t ≤ T - 1] (Wₕ¹)ᵀ δ¹ₜ₊₁: the bracket says at which steps the rest is there
            rest = sp.Mul(*(f for f in expr.args if not isinstance(f, StepGuard)))
            text = self._print(rest)
            if isinstance(rest, sp.Add):
                text = f"({text})"
            if rest.could_extract_minus_sign() and not isinstance(rest, sp.Add):
                return "-" + self._print(-expr)
            return " ".join(self._print(g) for g in guards) + " " + text
        coefficient, rest = expr.as_coeff_Mul()
        if _decimal(coefficient) and rest != 1:
            return f"{_decimal(coefficient)}·{self.parenthesize(rest, PRECEDENCE['Mul'])}"
        factors = expr.as_ordered_factors()
        vectors = [f for f in factors if _is_tensor(f)]
        if len(vectors) < 2:
            return super()._print_Mul(expr)
        scalar = sp.Mul(*(f for f in factors if f not in vectors))
        prec = sp.printing.precedence.PRECEDENCE["Mul"]
        text = " ⊙ ".join(f"({self._print(f)})" if _is_convolution(f) else
                          self.parenthesize(f, prec) for f in vectors)
        if scalar == -1:
            return "-" + text
        return text if scalar == 1 else self.parenthesize(scalar, prec) + "·" + text


def _decimal(number: sp.Expr) -> str | None:
    """A small constant such as ε = 1/100000 in scientific notation (``1e-5``), else None."""
    if not isinstance(number, sp.Rational) or number.q < 10000 or 10 ** int(
            math.log10(number.q)) != number.q:
        return None
    mantissa, _, exponent = f"{float(number):e}".partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _is_convolution(expr: sp.Expr) -> bool:
    from derive.render.latex_printer import is_convolution

    return is_convolution(expr)


def _is_tensor(expr: sp.Expr) -> bool:
    """Whether ``expr`` is a tensor-form vector or matrix (not a scalar, not an index form)."""
    if expr.has(sp.Indexed):
        return False
    if expr.has(MatVec, Outer, Einsum, Windows, Fold, Unflatten, Flatten, MatProd, Transposed,
                SumLast, Causal):
        return True
    return any(t.rank >= 1 and t != ONE for t in expr.atoms(NetTensor))


def pretty(expr: sp.Expr, *, batch: bool = False) -> str:
    """``expr`` in the terminal notation."""
    return UnicodePrinter({"batch": batch}).doprint(expr)

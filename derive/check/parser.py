"""The syntax of user formulas for ``derive check``: text to a small syntax tree, never eval.

A formula is ``LHS = RHS`` in the derive notation, in plain text, Unicode or LaTeX::

    delta^L = (a^L - y) * a^L * (1 - a^L)                 # vector form: elementwise
    delta^l_j = sum_k w^{l+1}_kj delta^{l+1}_k sigma'(z^l_j)   # index form
    dC/dw^2_jk = delta^2_j * a^1_k
    δᴸ = (aᴸ - y) ⊙ σ'(zᴸ)
    \\delta^L_j = (a^L_j - y_j)\\sigma'(z^L_j)
    \\frac{\\partial C}{\\partial w^l_{jk}} = a^{l-1}_k \\delta^l_j
    dC/dgamma^4 = delta^4 * xhat^4                       # a layer norm's scale γ
    ∂C/∂β⁴ⱼ = δ⁴ⱼ
    dC/dw^1_jkpq = sum_r sum_s delta^1_jrs a^0_{k,r+p-1,s+q-1}     # a convolution's kernel
    delta^1_{k,r,s} = sum_{j,u,v} [1 <= r-u+1 <= 2] [1 <= s-v+1 <= 2] delta^2_juv w^2_{j,k,r-u+1,s-v+1}
    δ¹[j, r, s] = [z¹[j, r, s] > 0]*Σ_uv (𝟙[(r-u+1, s-v+1) = argmax_p,q a¹[j, u+p-1, v+q-1]] ...)

The left-hand sides are ``delta^<layer>`` (also ``dC/dz^<layer>``), ``dC/d<q>^<layer>`` for a
parameter or intermediate q (``w``, ``b``, ``gamma``, ``beta``, ``a``, ``xhat``, ``mu``,
``var``) and ``sigma'(z^<layer>)``; a layer is a number, ``l``, ``L``, or ``{l+1}``-style
offsets. On the right, ``dC/d<q>^<layer>_j`` names the derived adjoint of q. Entries of
feature maps and kernels take up to four indices; on the right an index may be an expression
(``a^0_{k,r+p-1,s+q-1}``: commas separate the indices), and Iverson brackets (``[1 <= r-u+1 <=
2]``, ``[z^1_jrs > 0]``), window maxima (``max_{p,q} a^1_{j,u+p-1,v+q-1}``) and the indicator
of a window's first maximum (``[(r-u+1, s-v+1) = argmax_{p,q} a^1_{j,u+p-1,v+q-1}]``) say what
a pooling layer does. ``derive show``'s own output (``δ¹[j, r, s]``, ``Σ_rs``, ``𝟙[...]``) is
read as well. This module only parses: a hand-written tokenizer and
recursive-descent parser build :class:`Node` objects with the column of every piece. Nothing
from the text is executed, imported, looked up as an attribute or passed to ``sympify``;
anything outside the grammar is a :class:`FormulaSyntaxError` naming the column. Meaning
(which layer, which shape, SymPy expressions) is given by :mod:`derive.check.formulas`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from derive.errors import DeriveError
from derive.limits import MAX_EXPRESSION_LENGTH, MAX_EXPRESSION_NESTING
from derive.registry.functions import ACTIVATIONS, SCALAR_FUNCTIONS

MAX_LENGTH = MAX_EXPRESSION_LENGTH
MAX_DEPTH = MAX_EXPRESSION_NESTING          # nesting of parentheses, sums and calls
MAX_NUMBER_DIGITS = 30
#: Indices of an entry: a kernel's w^l_{jkpq} has four.
MAX_INDICES = 4

#: Names of network quantities; ``x`` is the input a^0, ``n`` a layer size n_l; ``gamma``,
#: ``beta`` a layer norm's scale and shift, ``xhat``, ``mu``, ``var`` its normalised input,
#: mean and variance; ``mask`` a dropout mask.
QUANTITIES = frozenset({"a", "z", "w", "W", "b", "y", "x", "delta", "n", "gamma", "beta",
                        "xhat", "mu", "var", "mask"})
#: What the left side dC/d<q> may differentiate by (and the right side name an adjoint of).
DENOMINATORS = {"w": "w", "W": "w", "b": "b", "a": "a", "z": "z", "gamma": "gamma",
                "beta": "beta", "xhat": "xhat", "mu": "mu", "var": "var"}
#: Functions a formula may call (meaning in derive.check.formulas), all from the registry: its
#: scalar functions (those a spec's expressions may call), the activations by name (with a
#: prime for their derivative) and ``sigma``, the activation of the layer it is applied to.
FUNCTIONS = frozenset({"sigma", *SCALAR_FUNCTIONS, *ACTIVATIONS})
#: ``eps`` is the epsilon of the network's layer norms.
CONSTANTS = frozenset({"pi", "e", "eps"})

_SUP = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾ˡᴸ", "0123456789+-()lL"))
_SUB = dict(zip("₀₁₂₃₄₅₆₇₈₉ᵢⱼₖₘₗₙₚᵣₛₜₐᵤᵥₑₕ", "0123456789ijkmlnprstauveh"))
_UNICODE_NAMES = {"δ": "delta", "σ": "sigma", "Σ": "sum", "∑": "sum", "∂": "partial",
                  "∇": "nabla",
                  "π": "pi", "Δ": "delta", "γ": "gamma", "β": "beta", "μ": "mu", "µ": "mu",
                  "ε": "eps", "ϵ": "eps", "𝟙": "indicator"}
_HAT = "\u0302"            # combining circumflex: x̂ is "x" followed by it
_UNICODE_OPS = {"⊙": "odot", "∘": "odot", "·": "*", "⋅": "*", "×": "*", "−": "-",
                "′": "'", "∗": "*", "≤": "<=", "≥": ">=", "⩽": "<=", "⩾": ">="}
_LATEX_NAMES = {"delta": "delta", "sigma": "sigma", "sum": "sum", "partial": "partial",
                "exp": "exp", "log": "log", "ln": "ln", "tanh": "tanh", "sinh": "sinh",
                "cosh": "cosh", "pi": "pi", "top": "T", "intercal": "T", "prime": "'",
                "max": "max", "min": "min", "gamma": "gamma", "beta": "beta", "mu": "mu",
                "epsilon": "eps", "varepsilon": "eps", "nabla": "nabla", "arg": "arg",
                "argmax": "argmax"}
_LATEX_OPS = {"cdot": "*", "times": "*", "odot": "odot", "circ": "odot", "ast": "*",
              "le": "<=", "leq": "<=", "leqslant": "<=", "ge": ">=", "geq": ">=",
              "geqslant": ">=", "lt": "<", "gt": ">"}
#: Comparisons, inside an Iverson bracket [...] only.
COMPARISONS = frozenset({"<", "<=", ">", ">=", "="})
_LATEX_STRUCTURE = frozenset({"frac", "sqrt", "dfrac", "tfrac"})
_LATEX_IGNORED = frozenset({"left", "right", "big", "Big", "bigg", "Bigg", "bigl", "bigr",
                            "Bigl", "Bigr", "displaystyle", "quad", "qquad", "limits",
                            "nolimits"})
# A font command and its argument: braced, or (as TeX reads it) the next letter or command
_LATEX_WRAPPER = re.compile(
    r"\\(?:mathbf|boldsymbol|bm|mathrm|mathit|mathsf|operatorname|text)"
    r"(?:\s*\{\s*(\\?[A-Za-z_]+)\s*\}|\s+([A-Za-z])(?![A-Za-z])|\s*(\\[A-Za-z]+))")
# \mathbb{1}, \mathbf 1, \mathds{1}: the indicator 𝟙 of an Iverson bracket 𝟙[...]
_LATEX_ONE = re.compile(r"\\(?:mathbb|mathbf|mathds|boldsymbol|bm)\s*(?:\{\s*1\s*\}|1)")
# \hat{x}, \hat x, \widehat{x}: the normalised input x̂ of a layer norm
_LATEX_HAT = re.compile(r"\\(?:hat|widehat)\s*(?:\{\s*x\s*\}|x(?![A-Za-z])|\s+x(?![A-Za-z]))")
_BRACKETS = {"{": "}", "(": ")", "[": "]"}
# Function names with an underscore, read as one word (longest first)
_MULTIWORD = tuple(sorted((name for name in FUNCTIONS if "_" in name), key=len, reverse=True))
_WORD = re.compile(r"[A-Za-z]+")
_DIGITS = frozenset("0123456789")
_NUMBER = re.compile(r"[0-9]*\.?[0-9]*")


class FormulaError(DeriveError):
    """A formula that cannot be checked as written; ``column`` is 1-based."""

    verb = "cannot check"

    def __init__(self, message: str, text: str, column: int) -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"{self.verb} formula {shown!r} at column {column}: {message}")
        self.column = column
        self.reason = message


class FormulaSyntaxError(FormulaError):
    """The formula text does not fit the grammar."""

    verb = "cannot parse"


@dataclass(frozen=True)
class Token:
    kind: str      # "num", "name", "op", "end"
    value: str
    pos: int       # 0-based offset in the original text
    latex: bool = False


# --- syntax tree -------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A layer reference: ``base`` "l", "L" or None (a number), plus ``offset``."""

    base: str | None
    offset: int
    pos: int

    def __str__(self) -> str:
        if self.base is None:
            return str(self.offset)
        if self.offset == 0:
            return self.base
        return f"{{{self.base}{self.offset:+d}}}"


@dataclass(frozen=True)
class Node:
    pos: int


@dataclass(frozen=True)
class Num(Node):
    text: str


@dataclass(frozen=True)
class Const(Node):
    name: str


#: One written index and its column: a letter, or (right side only) an index expression such
#: as r+p-1 (a :class:`Node` of :class:`IndexVar`, :class:`Num` and + - *).
Index = tuple["str | Node", int]


@dataclass(frozen=True)
class Ref(Node):
    """A network quantity: ``letter`` with an optional layer and indices."""

    letter: str
    layer: Layer | None
    indices: tuple[Index, ...]


@dataclass(frozen=True)
class IndexVar(Node):
    """An index letter inside an index expression (the r of a^0_{k,r+p-1,s+q-1})."""

    letter: str


@dataclass(frozen=True)
class ShapeSize(Node):
    """H_l or W_l: the rows or columns of layer l's feature maps."""

    dim: str                                 # "H" or "W"
    layer: Layer


@dataclass(frozen=True)
class Iverson(Node):
    """``[a <= b < c]``: 1 where every comparison holds, else 0 (``𝟙[...]`` too)."""

    operands: tuple[Node, ...]
    ops: tuple[str, ...]                     # "<", "<=", ">", ">=", "="


@dataclass(frozen=True)
class Coordinates(Node):
    """``(r-u+1, s-v+1)``: a position in a window, compared with an argmax."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class WindowMaxOf(Node):
    """``max_{p,q} body`` (``arg``: ``argmax_{p,q} body``): over a window's offsets."""

    offsets: tuple[tuple[str, int], ...]
    body: Node
    arg: bool


@dataclass(frozen=True)
class Call(Node):
    name: str
    prime: bool
    layer: Layer | None                      # sigma_2(...) names the layer of sigma
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Adjoint(Node):
    """``dC/d<role>^<layer>_<indices>`` on the right-hand side: a derived adjoint."""

    role: str
    layer: Layer
    indices: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Unary(Node):
    op: str                                  # "-"
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    op: str                                  # "+", "-", "^" (and "/" from \\frac)
    left: Node
    right: Node


@dataclass(frozen=True)
class Product(Node):
    """``first`` followed by (operator, column, factor) items; operator "" is juxtaposition."""

    first: Node
    rest: tuple[tuple[str, int, Node], ...]


@dataclass(frozen=True)
class Transpose(Node):
    operand: Node


@dataclass(frozen=True)
class SumOver(Node):
    index: str
    upper: Node | None                       # the written upper bound, if any
    body: Node


@dataclass(frozen=True)
class Target:
    """The left-hand side: what the formula claims to give.

    ``kind`` "delta" (delta^l, dC/dz^l), "grad" (dC/d``role``^l: a parameter's gradient or
    an intermediate's adjoint) or "sigma'" (an activation's derivative).
    """

    kind: str
    layer: Layer
    indices: tuple[tuple[str, int], ...]     # as written; () for the vector form
    pos: int
    activation: str | None = None            # sigmoid'(z^l): the named activation
    role: str | None = None                  # for "grad": w, b, gamma, beta, a, xhat, ...


@dataclass(frozen=True)
class ParsedFormula:
    text: str
    target: Target
    rhs: Node
    latex: bool                              # LaTeX commands were used
    index_form: bool                         # the left side names its indices


# --- tokenizer ---------------------------------------------------------------------------


def tokenize(text: str, words: tuple[str, ...] = ()) -> list[Token]:
    """The tokens of ``text``; Unicode super/subscripts become ``^{..}``/``_{..}`` tokens.
    ``words`` are more names read as one word (a custom op's sum ``s1``), longest first."""
    tokens: list[Token] = []
    multiword = tuple(sorted({*_MULTIWORD, *words, *(f"d{word}" for word in words)},
                             key=len, reverse=True))
    n = len(text)
    i = 0

    def fail(message: str, at: int) -> FormulaSyntaxError:
        return FormulaSyntaxError(message, text, at + 1)

    while i < n:
        ch = text[i]
        if ch.isspace() or ch == "$":
            i += 1
            continue
        if ch in _DIGITS or (ch == "." and i + 1 < n and text[i + 1] in _DIGITS):
            match = _NUMBER.match(text, i)
            assert match is not None
            digits = match.group()
            if match.end() < n and text[match.end()] == ".":
                raise fail("a number has at most one '.'", match.end())
            if len(digits.replace(".", "")) > MAX_NUMBER_DIGITS:
                raise fail(f"number longer than {MAX_NUMBER_DIGITS} digits", i)
            if match.end() < n and text[match.end()] in "eE" and re.match(
                    r"[eE][+-]?\d", text[match.end():]):
                raise fail("write powers of ten as 10^k, not with e", match.end())
            tokens.append(Token("num", digits, i))
            i = match.end()
            continue
        if ch == ".":
            raise fail("'.' (attribute access) is not allowed", i)
        if ch.isascii() and (ch.isalpha()):
            for word in multiword:
                if text.startswith(word, i) and not (
                        i + len(word) < n and text[i + len(word)].isalnum()):
                    tokens.append(Token("name", word, i))
                    i += len(word)
                    break
            else:
                match = _WORD.match(text, i)
                assert match is not None
                if match.group() == "x" and text.startswith(_HAT, match.end()):
                    tokens.append(Token("name", "xhat", i))
                    i = match.end() + len(_HAT)
                    continue
                tokens.append(Token("name", match.group(), i))
                i = match.end()
            continue
        if ch == "\\":
            one = _LATEX_ONE.match(text, i)
            if one:
                tokens.append(Token("name", "indicator", i, latex=True))
                i = one.end()
                continue
            hat = _LATEX_HAT.match(text, i)
            if hat:
                tokens.append(Token("name", "xhat", i, latex=True))
                i = hat.end()
                continue
            wrapper = _LATEX_WRAPPER.match(text, i)
            if wrapper:
                inner = next(group for group in wrapper.groups() if group)
                if inner.startswith("\\"):
                    tokens.extend(_latex_command(inner[1:], i, fail))
                elif inner == "T":
                    tokens.append(Token("name", "T", i, latex=True))
                else:
                    tokens.append(Token("name", inner, i, latex=True))
                i = wrapper.end()
                continue
            match = re.compile(r"\\([A-Za-z]+)").match(text, i)
            if match is None:
                if i + 1 < n and text[i + 1] in ",;:! ":
                    i += 2             # LaTeX spacing
                    continue
                raise fail(f"unexpected {text[i:i + 2]!r}", i)
            tokens.extend(_latex_command(match.group(1), i, fail))
            i = match.end()
            continue
        if ch in _SUP or ch in _SUB:
            table, mark = (_SUP, "^") if ch in _SUP else (_SUB, "_")
            start = i
            tokens.append(Token("op", mark, i))
            tokens.append(Token("op", "{", i))
            while i < n and text[i] in table:
                plain = table[text[i]]
                if plain.isdigit():
                    kind = "num"
                elif plain.isalpha():
                    kind = "name"
                else:
                    kind = "op"
                if kind == "name" and mark == "_" and tokens[-1].kind == "name":
                    last = tokens.pop()
                    tokens.append(Token("name", last.value + plain, last.pos))
                elif kind == "num" and tokens[-1].kind == "num":
                    last = tokens.pop()
                    tokens.append(Token("num", last.value + plain, last.pos))
                else:
                    tokens.append(Token(kind, plain, i))
                i += 1
            tokens.append(Token("op", "}", start))
            continue
        if ch == "ᵀ":
            tokens.append(Token("op", "^", i))
            tokens.append(Token("name", "T", i))
            i += 1
            continue
        if ch in _UNICODE_NAMES:
            tokens.append(Token("name", _UNICODE_NAMES[ch], i))
            i += 1
            continue
        if ch in _UNICODE_OPS:
            tokens.append(Token("op", _UNICODE_OPS[ch], i))
            i += 1
            continue
        if text.startswith("**", i):
            tokens.append(Token("op", "**", i))
            i += 2
            continue
        if text.startswith("==", i):
            raise fail("'==' is not allowed; a formula is LHS = RHS", i)
        if text.startswith("<=", i) or text.startswith(">=", i):
            tokens.append(Token("op", text[i:i + 2], i))
            i += 2
            continue
        if ch in "<>":
            tokens.append(Token("op", ch, i))
            i += 1
            continue
        if ch in "+-*/^_(){}[],='@":
            tokens.append(Token("op", ch, i))
            i += 1
            continue
        raise fail(f"unexpected character {ch!r}", i)
    tokens.append(Token("end", "", n))
    return tokens


def _latex_command(name: str, pos: int, fail) -> list[Token]:
    if name in _LATEX_IGNORED:
        return []
    if name in _LATEX_NAMES:
        value = _LATEX_NAMES[name]
        kind = "op" if value == "'" else "name"
        return [Token(kind, value, pos, latex=True)]
    if name in _LATEX_OPS:
        return [Token("op", _LATEX_OPS[name], pos, latex=True)]
    if name in _LATEX_STRUCTURE:
        return [Token("name", "\\" + name, pos, latex=True)]
    raise fail(f"unknown LaTeX command \\{name}", pos)


# --- parser ------------------------------------------------------------------------------


def parse_formula(text: str, names: Mapping[str, str] | None = None) -> ParsedFormula:
    """Parse ``LHS = RHS``; raises :class:`FormulaSyntaxError` with the column on failure.

    ``names`` are the network's own quantities beyond the built-in ones, as written and by
    role: a custom op's parameters (``U``) and sums (``s1``)."""
    names = dict(names or {})
    if not isinstance(text, str):
        raise DeriveError(f"a formula must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FormulaSyntaxError(f"formula longer than {MAX_LENGTH} characters", text[:80],
                                 MAX_LENGTH + 1)
    if not text.strip():
        raise FormulaSyntaxError("empty formula; write LHS = RHS", text, 1)
    tokens = tokenize(text, tuple(name for name in names if not name.isalpha()))
    return _Parser(text, tokens, names).formula()


class _Parser:
    def __init__(self, text: str, tokens: list[Token], names: Mapping[str, str]) -> None:
        self.text = text
        self.tokens = tokens
        self.names = names
        self.denominators = {**DENOMINATORS, **names}
        self.at = 0
        self.depth = 0
        self.brackets = 0         # inside [...]: a lone index letter is an index (r-u+1)

    # -- helpers --

    @property
    def token(self) -> Token:
        return self.tokens[self.at]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.at + ahead, len(self.tokens) - 1)]

    def fail(self, message: str, token: Token | None = None) -> FormulaSyntaxError:
        token = token or self.token
        return FormulaSyntaxError(message, self.text, token.pos + 1)

    def describe(self, token: Token) -> str:
        return "the end of the formula" if token.kind == "end" else repr(token.value)

    def is_op(self, value: str) -> bool:
        return self.token.kind == "op" and self.token.value == value

    def is_name(self, *values: str) -> bool:
        return self.token.kind == "name" and self.token.value in values

    def advance(self) -> Token:
        token = self.token
        self.at = min(self.at + 1, len(self.tokens) - 1)
        return token

    def expect(self, value: str, context: str) -> Token:
        if not self.is_op(value):
            raise self.fail(f"expected {value!r} {context}, found {self.describe(self.token)}")
        return self.advance()

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep")

    # -- formula --

    def formula(self) -> ParsedFormula:
        equals, braces = [], 0
        # an "=" inside brackets is a sum's lower bound or a comparison [(r, s) = argmax ...]
        for n, t in enumerate(self.tokens):
            if t.kind == "op":
                braces += {"{": 1, "}": -1, "[": 1, "]": -1, "(": 1, ")": -1}.get(t.value, 0)
                if t.value == "=" and braces <= 0:
                    equals.append(n)
        if not equals:
            raise FormulaSyntaxError("expected 'LHS = RHS' (no '=' found)", self.text,
                                     len(self.text) + 1)
        if len(equals) > 1:
            raise self.fail("only one '=' is allowed", self.tokens[equals[1]])
        target = self.target(equals[0])
        self.expect("=", "after the left-hand side")
        if self.token.kind == "end":
            raise self.fail("the right-hand side is empty")
        rhs = self.expression()
        if self.token.kind != "end":
            raise self.fail(f"unexpected {self.describe(self.token)}")
        latex = any(t.latex for t in self.tokens)
        return ParsedFormula(self.text, target, rhs, latex, bool(target.indices))

    # -- left-hand side --

    def target(self, end: int) -> Target:
        start = self.token
        if start.kind == "end" or self.at == end:
            raise self.fail("the left-hand side is empty")
        if self.is_name("delta"):
            self.advance()
            layer, indices = self.scripts(needs_layer="delta")
            return self.finish_target(Target("delta", layer, indices, start.pos), end)
        if self.is_name("\\frac", "\\dfrac", "\\tfrac"):
            self.advance()
            self.expect("{", "after \\frac")
            self.numerator_c()
            self.expect("}", "after the numerator")
            self.expect("{", "before the denominator")
            target = self.denominator(start)
            self.expect("}", "after the denominator")
            return self.finish_target(target, end)
        if self.token.kind == "name" and (self.token.value in ("dC", "partial", "d")):
            self.numerator_c()
            self.expect("/", "in dC/d...")
            return self.finish_target(self.denominator(start), end)
        if self.token.kind == "name" and self.token.value in FUNCTIONS and (
                self.token.value != "softmax"):
            name = self.advance().value
            layer = None
            if self.is_op("_"):
                layer = self.layer_script("_")
            if not self.prime():
                raise self.fail(f"expected {name}' (a derivative) on the left-hand side")
            if self.is_op("_") and layer is None:
                layer = self.layer_script("_")
            self.expect("(", f"after {name}'")
            inner = self.token
            if not self.is_name("z"):
                raise self.fail(f"the left-hand side {name}'(...) takes z^l, e.g. {name}'(z^l)")
            self.advance()
            z_layer, indices = self.scripts(needs_layer="z")
            self.expect(")", f"to close {name}'(")
            if layer is not None and (layer.base, layer.offset) != (z_layer.base,
                                                                    z_layer.offset):
                raise self.fail(f"{name}_{layer}' applied to z^{z_layer}", inner)
            activation = None if name == "sigma" else name
            return self.finish_target(Target("sigma'", z_layer, indices, start.pos, activation),
                                      end)
        raise self.fail("the left-hand side must be delta^l, dC/dw^l_jk, dC/db^l_j, dC/da^L, "
                        "dC/dgamma^l_j, dC/dbeta^l_j, sigma'(z^l) (or their LaTeX forms)")

    def finish_target(self, target: Target, end: int) -> Target:
        if self.at != end:
            raise self.fail(f"unexpected {self.describe(self.token)} on the left-hand side")
        return target

    def numerator_c(self) -> None:
        token = self.token
        if self.is_name("dC"):
            self.advance()
            return
        if self.is_name("partial", "d"):
            self.advance()
            if self.is_name("C"):
                self.advance()
                return
        raise self.fail("expected dC or \\partial C", token)

    def denominator(self, start: Token) -> Target:
        token = self.token
        letter = None
        if token.kind == "name" and token.value[:1] == "d" and \
                token.value[1:] in self.denominators:
            letter = token.value[1:]
            self.advance()
        elif self.is_name("partial", "d"):
            self.advance()
            if self.token.kind == "name" and self.token.value in self.denominators:
                letter = self.advance().value
            elif self.is_name("delta"):
                raise self.fail("differentiate by w, b, a, z, gamma, beta, xhat, mu or var")
        if letter is None:
            own = "".join(f", d{name}^l" for name in self.names)
            raise self.fail(f"expected dw^l, db^l, da^L, dz^l, dgamma^l, dbeta^l{own} after "
                            "dC/", token)
        layer, indices = self.scripts(needs_layer=letter)
        role = self.denominators[letter]
        if role == "z":
            return Target("delta", layer, indices, start.pos)
        return Target("grad", layer, indices, start.pos, role=role)

    def prime(self) -> bool:
        if self.is_op("'"):
            self.advance()
            return True
        if self.is_op("^") and self.peek().kind == "op" and self.peek().value == "'":
            self.advance()
            self.advance()
            return True
        if (self.is_op("^") and self.peek().value == "{" and self.peek(2).value == "'"
                and self.peek(3).value == "}"):
            for _ in range(4):
                self.advance()
            return True
        return False

    # -- super- and subscripts --

    def scripts(self, needs_layer: str, expressions: bool = False
                ) -> tuple[Layer | None, tuple[Index, ...]]:
        """``^layer`` and ``_indices``, in either order, after the quantity ``needs_layer``;
        or the indices in brackets right after it, as ``derive show`` prints a feature map's
        entries (``δ¹[j, r, s]``). ``expressions``: an index may be an expression (r+p-1).

        ``y`` and ``x`` take no layer (a ``^`` after them is a power); ``n`` takes its layer
        as a subscript (n_l).
        """
        if needs_layer == "n":
            if not self.is_op("_"):
                raise self.fail("a layer size is written n_l, n_L or n_{l+1}")
            return self.layer_script("_"), ()
        layered = needs_layer not in ("y", "x")
        if not layered and self.is_op("^"):
            # y^L or x^{l}: a layer where none is taken (a number after ^ is a power)
            script = self.peek(2) if self.peek().value == "{" else self.peek()
            if script.kind == "name" and script.value in ("l", "L"):
                what = "the target, compared with a^L" if needs_layer == "y" else "the input a^0"
                raise self.fail(f"{needs_layer} takes no layer ({what}); write "
                                f"{needs_layer}", script)
        layer: Layer | None = None
        indices: tuple[Index, ...] = ()
        for _ in range(2):
            if layered and layer is None and self.is_op("^") and not self.transpose_ahead():
                layer = self.layer_script("^")
            elif self.is_op("_") and not indices:
                indices = self.index_script(expressions)
        if layered and layer is None:
            raise self.fail(f"{needs_layer} needs a layer, e.g. {needs_layer}^l, "
                            f"{needs_layer}^L or {needs_layer}^2")
        if not indices and self.is_op("[") and self.adjacent():
            indices = self.index_list("]", expressions)
        return layer, indices

    def adjacent(self) -> bool:
        """Whether the current token follows the text before it without a space (δ¹[j])."""
        pos = self.token.pos
        return pos > 0 and not self.text[pos - 1].isspace()

    def transpose_ahead(self) -> bool:
        nxt = self.peek()
        if nxt.kind == "name" and nxt.value == "T":
            return True
        return (nxt.kind == "op" and nxt.value == "{" and self.peek(2).value == "T"
                and self.peek(3).value == "}")

    def layer_script(self, mark: str) -> Layer:
        """``^2``, ``^l``, ``^{l+1}``, and in LaTeX ``^{(l)}`` or ``^{[l]}`` (two styles of
        books and courses that keep the layer apart from a power)."""
        self.expect(mark, "")
        token = self.token
        closes: list[str] = []
        while self.token.kind == "op" and self.token.value in _BRACKETS and len(closes) < 2:
            closes.append(_BRACKETS[self.advance().value])
        if closes:
            layer = self.layer_expression()
            for close in reversed(closes):
                self.expect(close, "to close the layer")
            return layer
        if token.kind == "num":
            if not token.value.isdigit():
                raise self.fail("a layer is a whole number")
            self.advance()
            return Layer(None, int(token.value), token.pos)
        if token.kind == "name" and token.value in ("l", "L"):
            self.advance()
            return Layer(token.value, 0, token.pos)
        raise self.fail("expected a layer: a number, l, L or {l+1}")

    def layer_expression(self) -> Layer:
        token = self.token
        if token.kind == "num" and token.value.isdigit():
            self.advance()
            return Layer(None, int(token.value), token.pos)
        if token.kind == "name" and token.value in ("l", "L"):
            self.advance()
            offset = 0
            if self.is_op("+") or self.is_op("-"):
                sign = 1 if self.advance().value == "+" else -1
                number = self.token
                if number.kind != "num" or not number.value.isdigit():
                    raise self.fail("expected a whole number in the layer, as in l+1")
                self.advance()
                offset = sign * int(number.value)
            return Layer(token.value, offset, token.pos)
        raise self.fail("expected a layer: a number, l, L, l+1, L-1")

    def index_script(self, expressions: bool = False) -> tuple[Index, ...]:
        self.expect("_", "")
        if self.is_op("{") and (self.has_comma("}") or (expressions and not (
                self.peek().kind == "name" and self.peek(2).kind == "op"
                and self.peek(2).value == "}"))):
            return self.index_list("}", expressions)
        braced = self.is_op("{")
        if braced:
            self.advance()
        letters: list[tuple[str, int]] = []
        while True:
            token = self.token
            if token.kind == "name":
                if not all(c.islower() for c in token.value) or "l" in token.value:
                    raise self.fail(f"index {token.value!r}: indices are lowercase letters "
                                    "other than l (j, k, i, m, ...)")
                letters.extend((c, token.pos + n) for n, c in enumerate(token.value))
                self.advance()
            elif token.kind == "num":
                raise self.fail("concrete index numbers are not supported; use a letter "
                                "(j, k, ...)")
            else:
                raise self.fail("expected an index letter (j, k, ...)")
            if not braced:
                break
            if self.is_op(","):
                self.advance()
                continue
            if self.is_op("}"):
                self.advance()
                break
        if len(letters) > MAX_INDICES:
            raise self.fail(f"at most {MAX_INDICES} indices", self.tokens[self.at - 1])
        return tuple(letters)

    def has_comma(self, close: str) -> bool:
        """Whether a comma separates items before the bracket opened here closes."""
        depth = 0
        for token in self.tokens[self.at:]:
            if token.kind == "end":
                return False
            if token.kind == "op" and token.value in "{[(":
                depth += 1
            elif token.kind == "op" and token.value in "}])":
                depth -= 1
                if depth == 0:
                    return False
            elif token.kind == "op" and token.value == "," and depth == 1:
                return True
        return False

    def index_list(self, close: str, expressions: bool) -> tuple[Index, ...]:
        """``{k, r+p-1, s+q-1}`` or ``[j, r, s]``: one index per comma-separated item, each a
        letter or (where ``expressions``) an index expression."""
        self.advance()
        items: list[Index] = []
        while True:
            token = self.token
            if token.kind == "name" and self.peek().kind == "op" and self.peek().value in (
                    ",", close):
                items.append((self.index_letter(token), token.pos))
                self.advance()
            elif expressions:
                self.nest()
                items.append((self.index_expression(), token.pos))
                self.depth -= 1
            else:
                raise self.fail("expected an index letter (j, k, ...); index expressions "
                                "are for the right-hand side")
            if self.is_op(","):
                self.advance()
                continue
            self.expect(close, "to close the indices")
            break
        if len(items) > MAX_INDICES:
            raise self.fail(f"at most {MAX_INDICES} indices", self.tokens[self.at - 1])
        return tuple(items)

    def index_letter(self, token: Token) -> str:
        value = token.value
        if len(value) != 1 or not value.islower() or value == "l":
            raise self.fail(f"index {value!r}: an index is one lowercase letter other than "
                            "l (j, k, r, s, ...); separate indices with commas", token)
        return value

    def index_expression(self) -> Node:
        """An index as an expression of index letters: sums and differences of letters,
        whole numbers and their products (2v, 2(u-1)), and the sizes H_l, W_l, n_l."""
        node = self.index_term()
        while self.is_op("+") or self.is_op("-"):
            op = self.advance()
            node = Binary(op.pos, op.value, node, self.index_term())
        return node

    def index_term(self) -> Node:
        if self.is_op("-") or self.is_op("+"):
            op = self.advance()
            operand = self.index_term()
            return Unary(op.pos, "-", operand) if op.value == "-" else operand
        first = self.index_factor()
        rest: list[tuple[str, int, Node]] = []
        while True:
            if self.is_op("*"):
                op = self.advance()
                rest.append(("*", op.pos, self.index_factor()))
            elif self.token.kind in ("num", "name") or self.is_op("("):
                rest.append(("", self.token.pos, self.index_factor()))
            else:
                break
        return Product(first.pos, first, tuple(rest)) if rest else first

    def index_factor(self) -> Node:
        token = self.token
        if token.kind == "num":
            if not token.value.isdigit():
                raise self.fail("an index expression takes whole numbers")
            self.advance()
            return Num(token.pos, token.value)
        if self.is_op("("):
            self.advance()
            self.nest()
            inner = self.index_expression()
            self.depth -= 1
            self.expect(")", "to close the index expression")
            return inner
        if token.kind == "name" and token.value in ("H", "W", "n") and self.is_layer_subscript():
            return self.shape_size()
        if token.kind == "name":
            self.advance()
            return IndexVar(token.pos, self.index_letter(token))
        raise self.fail(f"expected an index expression (r+p-1, 2s+q-3), found "
                        f"{self.describe(token)}")

    def is_layer_subscript(self) -> bool:
        """Whether ``_`` and a layer (2, l, L, {l+1}) follow: H_2, W_l, n_{l+1}."""
        if not (self.peek().kind == "op" and self.peek().value == "_"):
            return False
        after = self.peek(2)
        if after.kind == "op" and after.value == "{":
            after = self.peek(3)
        return after.kind == "num" or (after.kind == "name" and after.value in ("l", "L"))

    def shape_size(self) -> Node:
        """H_l, W_l (a feature map's rows and columns) or n_l (a layer's width)."""
        token = self.advance()
        layer = self.layer_script("_")
        if token.value == "n":
            return Ref(token.pos, "n", layer, ())
        return ShapeSize(token.pos, token.value, layer)

    # -- right-hand side --

    def expression(self) -> Node:
        self.nest()
        node = self.term()
        while self.is_op("+") or self.is_op("-"):
            op = self.advance()
            node = Binary(op.pos, op.value, node, self.term())
        self.depth -= 1
        return node

    def starts_primary(self) -> bool:
        token = self.token
        if token.kind in ("num",):
            return True
        if token.kind == "name":
            return token.value not in ("T",)
        return token.kind == "op" and token.value in ("(", "{", "[")

    def term(self) -> Node:
        """A chain of factors joined by * / @ ⊙ or juxtaposition, kept flat: which products
        are matrix products is a question of shapes, answered by derive.check."""
        first = self.unary()
        rest: list[tuple[str, int, Node]] = []
        while True:
            if self.token.kind == "op" and self.token.value in ("*", "/", "@", "odot"):
                op = self.advance()
                rest.append((op.value, op.pos, self.unary()))
            elif self.starts_primary():
                last = rest[-1][2] if rest else first
                if self.token.kind == "num" and isinstance(last, Num):
                    raise self.fail("two numbers side by side; write * between them")
                pos = self.token.pos
                rest.append(("", pos, self.unary()))
            else:
                break
        return Product(first.pos, first, tuple(rest)) if rest else first

    def unary(self) -> Node:
        if self.is_op("-") or self.is_op("+"):
            op = self.advance()
            self.nest()
            operand = self.unary()
            self.depth -= 1
            return Unary(op.pos, "-", operand) if op.value == "-" else operand
        return self.power()

    def power(self) -> Node:
        node = self.postfix()
        if self.is_op("**") or (self.is_op("^") and not self.transpose_ahead()):
            op = self.advance()
            self.nest()
            if op.value == "^" and self.is_op("{"):
                self.advance()
                exponent = self.expression()
                self.expect("}", "to close the exponent")
            else:
                exponent = self.unary()
            self.depth -= 1
            return Binary(op.pos, "^", node, exponent)
        return node

    def postfix(self) -> Node:
        return self.postfix_of(self.primary())

    def postfix_of(self, node: Node) -> Node:
        while self.is_op("^") and self.transpose_ahead():
            pos = self.advance().pos
            if self.is_op("{"):
                self.advance()
                self.advance()
                self.expect("}", "after T")
            else:
                self.advance()
            node = Transpose(pos, node)
        return node

    def primary(self) -> Node:
        token = self.token
        if token.kind == "num":
            self.advance()
            return Num(token.pos, token.value)
        if self.is_op("(") and self.has_comma(")"):
            return self.coordinates()
        if self.is_op("["):
            return self.bracket()
        if self.is_op("(") or self.is_op("{"):
            close = {"(": ")", "{": "}"}[token.value]
            self.advance()
            self.nest()
            inner = self.expression()
            self.depth -= 1
            if not self.is_op(close):
                raise self.fail(f"expected {close!r} to close {token.value!r} at column "
                                f"{token.pos + 1}, found {self.describe(self.token)}")
            self.advance()
            return inner
        if token.kind == "end":
            raise self.fail("the formula ends too early")
        if token.kind != "name":
            raise self.fail(f"unexpected {self.describe(token)}")
        name = token.value
        if name in ("\\frac", "\\dfrac", "\\tfrac") and self.adjoint_ahead(2):
            self.advance()
            self.expect("{", "after \\frac")
            self.numerator_c()
            self.expect("}", "after the numerator")
            self.expect("{", "before the denominator")
            adjoint = self.adjoint(token)
            self.expect("}", "after the denominator")
            return adjoint
        if name == "nabla":
            return self.nabla_a(token)
        if name in ("dC", "partial", "d") and self.adjoint_ahead(0):
            self.numerator_c()
            self.expect("/", "in dC/d...")
            return self.adjoint(token)
        if name in ("\\frac", "\\dfrac", "\\tfrac"):
            self.advance()
            self.expect("{", "after \\frac")
            numerator = self.expression()
            self.expect("}", "to close the numerator")
            self.expect("{", "before the denominator")
            denominator = self.expression()
            self.expect("}", "to close the denominator")
            return Binary(token.pos, "/", numerator, denominator)
        if name == "\\sqrt":
            self.advance()
            self.expect("{", "after \\sqrt")
            inner = self.expression()
            self.expect("}", "to close \\sqrt{")
            return Call(token.pos, "sqrt", False, None, (inner,))
        if name == "sum":
            return self.sum_over()
        if name == "indicator":
            self.advance()
            if not self.is_op("["):
                raise self.fail("expected [ after 𝟙, as in 𝟙[z^1_jrs > 0]")
            return self.bracket(indicator=True)
        if name in ("H", "W") and self.is_layer_subscript() and not self.layer_ahead():
            return self.shape_size()
        if name in ("max", "argmax") and self.peek().kind == "op" and self.peek().value == "_":
            return self.window_max(token, name == "argmax")
        if name == "arg" and self.peek().kind == "name" and self.peek().value == "max":
            self.advance()
            return self.window_max(token, True)
        if name in self.names and name not in QUANTITIES:
            self.advance()
            layer, indices = self.scripts(needs_layer=name, expressions=True)
            return Ref(token.pos, self.names[name], layer, indices)
        if name in QUANTITIES:
            self.advance()
            needs = {"y": "y", "x": "x", "n": "n"}.get(name, name)
            layer, indices = self.scripts(needs_layer=needs, expressions=True)
            if name == "n":
                return Ref(token.pos, "n", layer, ())
            if name == "x":
                return Ref(token.pos, "a", Layer(None, 0, token.pos), indices)
            return Ref(token.pos, "w" if name == "W" else name, layer, indices)
        if name in FUNCTIONS:
            return self.call()
        if name in CONSTANTS:
            self.advance()
            return Const(token.pos, name)
        if self.brackets and len(name) == 1 and name.islower() and name != "l":
            self.advance()
            return IndexVar(token.pos, name)
        if name in ("partial", "dC", "C"):
            raise self.fail(f"{name!r} belongs on the left-hand side")
        own = "".join(f", {extra}" for extra in self.names)
        raise self.fail(f"unknown name {name!r}; allowed: the quantities a, z, w (or W), b, "
                        f"y, x, delta, n, gamma, beta, xhat, mu, var, mask{own}; dC/dq^l; "
                        "sum; functions " + ", ".join(sorted(FUNCTIONS)))

    def layer_ahead(self) -> bool:
        """Whether a superscript follows the subscript after the name here (W_{jk}^l: the
        weights, not the columns W_l)."""
        ahead = 3
        if self.peek(2).kind == "op" and self.peek(2).value == "{":
            while self.peek(ahead).kind != "end" and self.peek(ahead).value != "}":
                ahead += 1
            ahead += 1
        after = self.peek(ahead)
        return after.kind == "op" and after.value == "^"

    def coordinates(self) -> Coordinates:
        """``(r-u+1, s-v+1)``: a position in a window."""
        start = self.advance()
        self.nest()
        items = [self.expression()]
        while self.is_op(","):
            self.advance()
            items.append(self.expression())
        self.depth -= 1
        self.expect(")", f"to close '(' at column {start.pos + 1}")
        return Coordinates(start.pos, tuple(items))

    def bracket(self, indicator: bool = False) -> Node:
        """``[...]``: an Iverson bracket when it holds a comparison (``[1 <= r-u+1 <= 2]``,
        ``[z^1_jrs > 0]``, ``[(r, s) = argmax_{p,q} ...]``), else a parenthesis."""
        start = self.advance()
        self.nest()
        self.brackets += 1
        operands = [self.expression()]
        ops: list[str] = []
        while self.token.kind == "op" and self.token.value in COMPARISONS:
            ops.append(self.advance().value)
            operands.append(self.expression())
        self.brackets -= 1
        self.depth -= 1
        if not self.is_op("]"):
            raise self.fail(f"expected ']' to close '[' at column {start.pos + 1}, found "
                            f"{self.describe(self.token)}")
        self.advance()
        if not ops:
            if indicator:
                raise self.fail("𝟙[...] takes a condition, as in 𝟙[z^1_jrs > 0]", start)
            return operands[0]
        return Iverson(start.pos, tuple(operands), tuple(ops))

    def window_max(self, start: Token, arg: bool) -> WindowMaxOf:
        """``max_{p,q} body``, ``argmax_{p,q} body`` (also ``argmax_pq``, ``argmax_p,q`` as
        derive show prints it, ``\\arg\\max``): over a window's offsets p and q."""
        self.advance()
        self.expect("_", "after max (the window's offsets, as in max_{p,q})")
        offsets: list[tuple[str, int]] = []
        braced = self.is_op("{")
        if braced:
            self.advance()
        while True:
            token = self.token
            if token.kind != "name":
                raise self.fail("expected the window's offsets, as in max_{p,q}")
            for n, letter in enumerate(token.value):
                offsets.append((self.index_letter(Token("name", letter, token.pos + n)),
                                token.pos + n))
            self.advance()
            if not self.is_op(","):
                break
            self.advance()
        if braced:
            self.expect("}", "to close the window's offsets")
        self.nest()
        body = self.unary()
        self.depth -= 1
        return WindowMaxOf(start.pos, tuple(offsets), body, arg)

    def adjoint_ahead(self, ahead: int) -> bool:
        """Whether the tokens from ``ahead`` on start ``dC`` or ``partial C`` (then ``/``, or
        the end of a \\frac numerator)."""
        first = self.peek(ahead) if ahead else self.token
        if first.kind == "name" and first.value == "dC":
            after = self.peek(ahead + 1)
        elif first.kind == "name" and first.value in ("partial", "d") and (
                self.peek(ahead + 1).kind == "name" and self.peek(ahead + 1).value == "C"):
            after = self.peek(ahead + 2)
        else:
            return False
        if ahead:
            return self.peek(1).value == "{" and after.value == "}"
        return after.kind == "op" and after.value == "/"

    def nabla_a(self, start: Token) -> Adjoint:
        """``∇ₐC``, ``\\nabla_a C``, ``nabla_{a^L} C``: the gradient of C with respect to
        the output activations, ∂C/∂a^L (Nielsen's BP1 in vector form, δᴸ = ∇ₐC ⊙ σ′(zᴸ))."""
        self.advance()
        self.expect("_", "after nabla (as in nabla_a C)")
        braced = self.is_op("{")
        if braced:
            self.advance()
        if not self.is_name("a"):
            raise self.fail("nabla takes the output activations: nabla_a C")
        self.advance()
        layer = Layer("L", 0, start.pos)
        if braced and self.is_op("^"):
            layer = self.layer_script("^")
        if braced:
            self.expect("}", "to close nabla's subscript")
        if not self.is_name("C"):
            raise self.fail("expected C after nabla_a (the gradient of the cost C)")
        self.advance()
        return Adjoint(start.pos, "a", layer, ())

    def adjoint(self, start: Token) -> Adjoint:
        target = self.denominator(start)
        role = "z" if target.kind == "delta" else target.role
        return Adjoint(start.pos, role, target.layer, target.indices)

    def call(self) -> Node:
        token = self.advance()
        layer = None
        if self.is_op("_"):
            layer = self.layer_script("_")
        prime = self.prime()
        if self.is_op("_") and layer is None:
            layer = self.layer_script("_")
        if layer is not None and token.value != "sigma":
            raise self.fail(f"only sigma takes a layer subscript, not {token.value}", token)
        self.nest()
        if self.is_op("("):
            open_token = self.advance()
            args = [self.expression()]
            while self.is_op(","):
                self.advance()
                args.append(self.expression())
            if not self.is_op(")"):
                raise self.fail(f"expected ')' to close {token.value}( at column "
                                f"{open_token.pos + 1}, found {self.describe(self.token)}")
            self.advance()
        elif token.latex:
            args = [self.postfix()]     # \log a, \exp z, \sigma z
        else:
            raise self.fail(f"expected '(' after {token.value}")
        self.depth -= 1
        return Call(token.pos, token.value, prime, layer, tuple(args))

    def sum_over(self) -> Node:
        """``sum_k``, ``\\sum_{k=1}^{n_l}``, and over several indices ``sum_{r,s}``,
        ``Σ_rs`` (one sum per index, the first outermost)."""
        token = self.advance()
        if not self.is_op("_"):
            raise self.fail("expected _ and the summed index after sum, as in sum_k")
        self.advance()
        upper = None
        braced = self.is_op("{")
        if braced:
            self.advance()
        index = self.token
        if index.kind != "name" or not index.value.islower() or "l" in index.value:
            raise self.fail("expected the summed index, one lowercase letter (k, i, m, ...)")
        letters = [(letter, index.pos + n) for n, letter in enumerate(index.value)]
        self.advance()
        while braced and self.is_op(",") and self.peek().kind == "name":
            self.advance()
            more = self.advance()
            letters.append((self.index_letter(more), more.pos))
        if len(letters) > 1:
            if braced:
                self.expect("}", "to close the sum's subscript")
            self.nest()
            body = self.term()
            self.depth -= 1
            for letter, _pos in reversed(letters):
                body = SumOver(token.pos, letter, None, body)
            return body
        if braced:
            if self.is_op("="):
                self.advance()
                low = self.token
                if low.kind != "num" or low.value != "1":
                    raise self.fail("sums start at 1 (indices are 1-based)")
                self.advance()
            self.expect("}", "to close the sum's subscript")
        if self.is_op("^"):
            self.advance()
            if self.is_op("{"):
                self.advance()
                upper = self.expression()
                self.expect("}", "to close the sum's upper bound")
            else:
                upper = self.primary()
        self.nest()
        body = self.term()
        self.depth -= 1
        return SumOver(token.pos, index.value, upper, body)

"""An independent evaluator of custom-op expressions in index notation, for the test
references (nothing here imports ``derive``).

``evaluate(text, arrays, size, lib)`` gives entry j = 1..size of the op's output for a batch:
an array of shape (B, size). It walks the expression's syntax tree (``ast``; nothing is
executed) and loops over indices one value at a time: ``x[k]`` is column k of a (B, n) input,
``U[j, k]`` one entry of a parameter, ``sum(E, k)`` a Python loop over the range of the first
axis that ``E`` indexes with k. Slow and plain on purpose: the generated code must agree with
it, not resemble it.
"""

from __future__ import annotations

import ast
import math
from typing import Any


def _functions(lib: Any) -> dict[str, Any]:
    """The whitelisted functions in the array library ``lib`` (numpy or torch)."""
    if lib.__name__ == "torch":
        import torch
        import torch.nn.functional as F

        return {"exp": torch.exp, "log": torch.log, "ln": torch.log, "sqrt": torch.sqrt,
                "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus,
                "abs": torch.abs, "Abs": torch.abs, "cosh": torch.cosh, "sinh": torch.sinh,
                "erf": torch.erf, "max": torch.maximum, "min": torch.minimum,
                "Max": torch.maximum, "Min": torch.minimum,
                "step": lambda z: (z > 0).to(z.dtype)}
    np = lib
    return {"exp": np.exp, "log": np.log, "ln": np.log, "sqrt": np.sqrt, "tanh": np.tanh,
            "sigmoid": lambda z: 0.5 + 0.5 * np.tanh(0.5 * z),
            "softplus": lambda z: np.logaddexp(0.0, z), "abs": np.abs, "Abs": np.abs,
            "cosh": np.cosh, "sinh": np.sinh,
            "erf": np.vectorize(math.erf, otypes=[np.float64]),
            "max": np.maximum, "min": np.minimum, "Max": np.maximum, "Min": np.minimum,
            "step": lambda z: (z > 0).astype(np.float64)}


def evaluate(text: str, arrays: dict[str, Any], size: int, lib: Any,
             batched: frozenset[str]) -> Any:
    """Entry j of the output for j = 1..size, stacked to (B, size). ``batched`` names the
    arrays with a leading batch axis (the inputs)."""
    tree = ast.parse(text.replace("^", "**"), mode="eval").body
    functions = _functions(lib)

    def axis_size(node: ast.AST, index: str) -> int:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Subscript):
                items = sub.slice.elts if isinstance(sub.slice, ast.Tuple) else [sub.slice]
                for position, item in enumerate(items):
                    if item.id == index:
                        shape = arrays[sub.value.id].shape
                        return shape[position + (sub.value.id in batched)]
        raise ValueError(f"index {index} is not used")

    def value(node: ast.AST, env: dict[str, int]) -> Any:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return {"pi": math.pi, "e": math.e}[node.id]
        if isinstance(node, ast.UnaryOp):
            inner = value(node.operand, env)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp):
            a, b = value(node.left, env), value(node.right, env)
            return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                    ast.Div: lambda: a / b, ast.Pow: lambda: a ** b}[type(node.op)]()
        if isinstance(node, ast.Subscript):
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            where = tuple(env[item.id] for item in items)
            array = arrays[node.value.id]
            return array[(slice(None), *where)] if node.value.id in batched else array[where]
        if isinstance(node, ast.Call) and node.func.id == "sum":
            body, index = node.args[0], node.args[1].id
            total = 0.0
            for n in range(axis_size(body, index)):
                total = total + value(body, {**env, index: n})
            return total
        if isinstance(node, ast.Call):
            args = [value(arg, env) for arg in node.args]
            return functions[node.func.id](*args)
        raise ValueError(f"cannot evaluate {ast.dump(node)}")

    batch = next(arrays[name].shape[0] for name in batched)
    columns = []
    for j in range(size):
        column = value(tree, {"j": j})
        ones = lib.ones(batch, dtype=lib.float64)
        columns.append(column * ones)      # a column that does not depend on x is broadcast
    return lib.stack(columns, 1)

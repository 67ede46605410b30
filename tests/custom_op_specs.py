"""Specs with custom ops (layers written in index notation), shared by the tests: a gated
unit, a bilinear layer, a highway layer, an RBF layer and a two-input product layer."""

from __future__ import annotations


def spec(name: str, n_in: int, size: int, expr: str, params: dict, tail: list,
          loss: str = "mse", inputs: list | None = None, head: list | None = None) -> dict:
    layer = {"size": size, "op": {"name": name, "expr": expr, "params": params}}
    if inputs is not None:
        layer["inputs"] = inputs
    return {"name": f"{name}_net", "input": n_in, "loss": loss,
            "layers": [*(head or []), layer, *tail]}


GATED = spec("gated", 4, 5,
              "tanh(sum(U[j,k]*x[k], k)) * sigmoid(sum(V[j,k]*x[k], k)) + c[j]",
              {"U": ["size", "in"], "V": ["size", "in"], "c": ["size"]},
              [{"size": 3, "activation": "softmax"}], loss="cross_entropy")
BILINEAR = spec("bilinear", 3, 4, "sum(sum(x[k]*U[j,k,m]*x[m], k), m) + b[j]",
                 {"U": ["size", "in", "in"], "b": ["size"]},
                 [{"op": "activation", "activation": "tanh"}, {"size": 2}])
HIGHWAY = spec("highway", 4, 4,
                "sigmoid(sum(T[j,k]*x[k], k) + t[j]) * tanh(sum(H[j,k]*x[k], k) + h[j])"
                " + (1 - sigmoid(sum(T[j,k]*x[k], k) + t[j])) * x[j]",
                {"H": ["size", "in"], "h": ["size"], "T": ["size", "in"], "t": ["size"]},
                [{"size": 2, "activation": "sigmoid"}], loss="binary_cross_entropy")
RBF = spec("rbf", 3, 5, "exp(-sum((x[k] - m[j,k])^2, k) * g[j]^2)",
            {"m": ["size", "in"], "g": ["size"]},
            [{"size": 2, "activation": "softmax"}], loss="cross_entropy")
PRODUCT = spec("product", 3, 4, "sum(P[j,k]*x1[k], k) * sum(Q[j,m]*x2[m], m)",
                {"P": ["size", "in1"], "Q": ["size", "in2"]}, [{"size": 2}],
                inputs=["a", "input"], head=[{"size": 5, "activation": "tanh", "name": "a"}])
SPECS = {"gated": GATED, "bilinear": BILINEAR, "highway": HIGHWAY, "rbf": RBF,
         "product": PRODUCT}

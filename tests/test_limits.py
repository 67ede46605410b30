"""The documented limits: input past one is refused in one line that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from derive import limits
from derive.cli.main import main
from derive.errors import DeriveError
from derive.spec.load import load_spec

README = Path(__file__).resolve().parents[1] / "README.md"
LIMITS = [name for name in vars(limits) if name.startswith("MAX_")]


def spec(input_width: int = 2, layers: list | None = None) -> dict:
    return {"name": "net", "input": input_width, "layers": layers or [{"size": 1}],
            "loss": "mse"}


def custom(expr: str) -> dict:
    return spec(layers=[{"size": 1, "activation": {"name": "f", "expr": expr}}])


OVER = {
    "MAX_WIDTH": (spec(limits.MAX_WIDTH + 1), "input"),
    "MAX_DEPTH": (spec(layers=[{"size": 2}] * (limits.MAX_DEPTH + 1)), "layers"),
    "MAX_PARAMETERS": (spec(5000, [{"size": 5000}]), "layers"),
    "MAX_EXPRESSION_LENGTH": (custom("z" + " + z" * limits.MAX_EXPRESSION_LENGTH),
                              "layers[0].activation.expr"),
    "MAX_EXPRESSION_NESTING": (custom("(" * 61 + "z" + ")" * 61),
                               "layers[0].activation.expr"),
}


@pytest.mark.parametrize("name", OVER)
def test_a_spec_past_a_limit_is_refused_naming_it(name):
    data, field = OVER[name]
    with pytest.raises(DeriveError) as refused:
        load_spec(data)
    message = str(refused.value)
    assert f"derive.limits.{name}" in message and message.startswith(f"{field}: ")
    assert "\n" not in message


def test_a_spec_at_the_limits_is_accepted():
    assert load_spec(spec(limits.MAX_WIDTH)).input == limits.MAX_WIDTH
    assert load_spec(custom("(" * 60 + "z" + ")" * 60)).depth == 1


def test_points_past_the_limit_exit_2(capsys):
    assert main(["verify", "xor", "--points", str(limits.MAX_POINTS + 1)]) == 2
    assert "MAX_POINTS" in capsys.readouterr().err
    assert main(["verify", "xor", "--points", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", LIMITS)
def test_every_limit_is_documented(name):
    assert f"`{name}`" in README.read_text(encoding="utf-8")

"""The command line, run as a user runs it: through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DERIVE = shutil.which("derive")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [DERIVE] if DERIVE else [sys.executable, "-m", "derive.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, check=False)


def test_console_script_is_installed():
    assert DERIVE, "the `derive` console script is not on PATH: pip install -e ."
    assert run("--version").stdout.startswith("derive ")


def test_default_runs_the_whole_pipeline_on_xor(tmp_path):
    result = run(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "'xor'" in result.stdout and "(BP2)" in result.stdout
    assert "all formulas agree" in result.stdout


def test_show_prints_the_classic_formulas():
    result = run("show", "xor")
    assert result.returncode == 0, result.stderr
    assert "δ¹ⱼ = (1 - a¹ⱼ)*a¹ⱼ*Σₖ (δ²ₖ*w²ₖⱼ)" in result.stdout
    assert "a¹ ⊙ (1 - a¹) ⊙ (W²)ᵀ δ²" in result.stdout
    assert "(1/B) (Δ²)ᵀ A¹" in result.stdout


def test_show_with_steps_and_stages():
    steps = run("show", "digits", "--steps")
    assert "chain rule" in steps.stdout and "assuming sum_j y_j = 1" in steps.stdout
    spec = run("show", "xor", "--stage", "spec")
    assert json.loads(spec.stdout)["name"] == "xor"
    model = run("show", "xor", "--stage", "model")
    assert "z¹ⱼ = b¹ⱼ + Σₖ (a⁰ₖ*w¹ⱼₖ)" in model.stdout
    derivation = run("show", "bce", "--stage", "derivation")
    assert "delta^2 [BP1]" in derivation.stdout


def test_show_a_user_file(tmp_path):
    spec = tmp_path / "net.yaml"
    spec.write_text("name: net\ninput: 2\nlayers:\n  - {size: 2, activation: softplus}\n"
                    "  - {size: 1, activation: identity}\nloss: mse\n")
    result = run("show", str(spec))
    assert result.returncode == 0, result.stderr
    assert "1 - exp(-a)" in result.stdout


def test_verify_reports_each_formula():
    result = run("verify", "custom_mish", "--points", "5")
    assert result.returncode == 0, result.stderr
    for tag in ("BP1", "BP2", "BP3", "BP4"):
        assert tag in result.stdout
    assert "numeric: 5 points, 50 digits" in result.stdout


def test_examples_lists_every_built_in():
    result = run("examples")
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"xor", "digits", "deep_tanh", "custom_mish", "bce"} <= set(names)


def test_schema_is_json():
    schema = json.loads(run("schema").stdout)
    assert schema["type"] == "object" and "layers" in schema["properties"]


@pytest.mark.parametrize("command", [[], ["show"], ["verify"], ["examples"], ["schema"]])
def test_help_has_examples(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "example" in result.stdout


BAD = [
    ("name: x\ninput: 2\nlayers:\n  - {size: 1, activation: swish}\nloss: mse\n",
     "layers[0].activation", "known:"),
    ("name: x\ninput: 0\nlayers:\n  - {size: 1, activation: sigmoid}\nloss: mse\n",
     "input", ""),
    ("name: x\ninput: 2\nlayers:\n  - {size: 1, activation: sigmoid}\nloss: cross_entropy\n",
     "loss", "softmax"),
    (("name: x\ninput: 2\nlayers:\n  - {size: 1, activation: {name: f, expr: 'open(z)'}}\n"
      "loss: mse\n"), "layers[0].activation.expr", "not allowed"),
    ("name: x\ninput: 2\nlayers: [\n", "", "line"),
]


@pytest.mark.parametrize(("text", "field", "hint"), BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, text, field, hint):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    before = sorted(tmp_path.iterdir())
    result = run("verify", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(spec) in result.stderr and field in result.stderr and hint in result.stderr
    assert sorted(tmp_path.iterdir()) == before


def test_unknown_spec_and_usage_errors_exit_2():
    for args in (["show", "no_such_example"], ["show"], ["frobnicate"], ["verify", "xor",
                                                                          "--points", "0"]):
        result = run(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_wheel_ships_examples_and_templates(tmp_path):
    """A plain (non-editable) install needs the examples and templates as package data."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("backprop_derive-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "derive/examples/xor.yaml" in names
    templates = [n for n in names if n.startswith("derive/codegen_templates/")]
    expected = [p.name for p in (ROOT / "codegen_templates").glob("*.j2")]
    assert sorted(Path(n).name for n in templates if n.endswith(".j2")) == sorted(expected)
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.mark.parametrize("args", [["--help"], ["examples"]])
def test_help_and_examples_load_no_heavy_library(args):
    """`derive --help` and `derive examples` start at once: SymPy, NumPy, SymEngine, jinja2
    and PyYAML are imported only by the commands that use them."""
    heavy = {"numpy", "sympy", "symengine", "jinja2", "yaml"}
    code = (f"import sys\nfrom derive.cli.main import main\nassert main({args!r}) == 0\n"
            f"print(sorted(set(sys.modules) & {heavy!r}), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "[]"


def test_every_command_is_listed_and_runs_its_own_parser():
    listed = run("--help").stdout
    for command in ("show", "verify", "examples", "schema", "codegen", "latex", "check",
                    "regen", "train"):
        assert f"    {command} " in listed
    assert "--fragment" in run("latex", "--help").stdout
    assert run("codegen", "xor", "--fragment").returncode == 2  # codegen's parser, not latex's

"""Same input, same bytes: outputs do not depend on hash seeds or the process they ran in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

COMMANDS = [
    ["show", "digits", "--steps"],
    ["codegen", "custom_mish"],
    ["latex", "bce"],
    ["latex", "xor", "--lang", "zh"],
    ["latex", "xor", "--format", "markdown"],
]


def output(args: list[str], seed: str) -> bytes:
    command = [shutil.which("derive") or sys.executable, *args]
    if not shutil.which("derive"):
        command[1:1] = ["-m", "derive.cli.main"]
    env = {**os.environ, "PYTHONHASHSEED": seed}
    result = subprocess.run(command, capture_output=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_output_is_independent_of_the_hash_seed(args):
    assert output(args, "1") == output(args, "4242")

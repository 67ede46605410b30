"""No traceback from any command on any input (docs/architecture.md, "The command line").

Every subcommand meets every failure class: a spec file that cannot be read, is binary, holds
a NUL byte or is huge; an output that cannot be written (a read-only folder, a device, a full
disk as standard output); an output file that exists; a reader that has gone away. Each must
end with exit code 2 (or the verdict's 1 or 0 where the reader went away), exactly one line on
stderr, no traceback, and nothing half-written.

Bad spec files are run in process (the exit code and the lines are main's); the cases about
standard output and files run as subprocesses, all at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from derive.cli.main import main
from derive.files import MARKER
from derive.limits import MAX_SPEC_BYTES

ROOT = Path(__file__).resolve().parents[1]
WRONG = "delta^L = a^L"  # an INCORRECT formula for xor: `derive check` exits with 1
#: Every subcommand that reads a SPEC, with the other arguments it needs.
SPEC_COMMANDS = {
    "show": [], "verify": ["--points", "1"], "codegen": [], "latex": [], "check": [WRONG],
    "train": ["--data", "xor"],
}

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


# --- bad spec files, in process ------------------------------------------------------------

BAD_SPECS = {  # name -> (bytes or None for a folder, a word the one line says)
    "unreadable.yaml": (None, "cannot read"),
    "binary.yaml": (bytes(range(256)) * 8, "UTF-8"),
    "nul.yaml": (b"name: x\ninput: 2\x00\nlayers: []\nloss: mse\n", "NUL"),
    "huge.yaml": (b"# padding\n" * (MAX_SPEC_BYTES // 10 + 1), "MAX_SPEC_BYTES"),
}


@pytest.mark.parametrize("command", SPEC_COMMANDS)
def test_a_bad_spec_file_is_one_line_and_exit_2(command, tmp_path, monkeypatch, capsys):
    for name, (content, _) in BAD_SPECS.items():
        if content is None:
            (tmp_path / name).mkdir()  # opening it fails as an unreadable file does, even for root
        else:
            (tmp_path / name).write_bytes(content)
    before = sorted(tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    for name, (_, word) in BAD_SPECS.items():
        code = main([command, name, *SPEC_COMMANDS[command]])
        out, err = capsys.readouterr()
        assert code == 2, (name, err)
        assert out == "" and len(err.splitlines()) == 1, (name, err)
        assert name in err and word in err, err
    assert sorted(tmp_path.iterdir()) == before


# --- standard output and files, as subprocesses --------------------------------------------


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    stdout: str = "full"  # "full": /dev/full; "gone": a pipe closed before the first line
    word: str = ""  # a word the one line on stderr must say


def _read_only_folder(base: Path) -> Path | None:
    """A folder no file can be made in; None where there is none (root ignores modes)."""
    folder = base / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    return None


def _cases(base: Path) -> dict[str, Case]:
    existing = base / "existing"
    existing.write_text("hand written\n")
    read_only = _read_only_folder(base)
    cases = {
        # a reader gone before the first line: the exit code stays the command's
        "check gone": Case(("check", "xor", WRONG), 1, "gone"),
        "help gone": Case(("--help",), 0, "gone"),
        "examples gone": Case(("examples",), 0, "gone"),
        # a full disk as standard output, for every command
        "bare full": Case(("-o", str(base / "out")), 2, word="standard output"),
        "help full": Case(("--help",), 2, word="standard output"),
        "version full": Case(("--version",), 2, word="standard output"),
        "examples full": Case(("examples",), 2, word="standard output"),
        "schema full": Case(("schema",), 2, word="standard output"),
        **{f"{command} full": Case((command, "xor", *args), 2, word="standard output")
           for command, args in SPEC_COMMANDS.items()},
        # a device as the output file or folder
        "bare -o device": Case(("-o", "/dev/full"), 2, word="not a folder"),
        "regen --dir device": Case(("regen", "--dir", "/dev/full"), 2, word="does not exist"),
        "codegen -o device": Case(("codegen", "xor", "-o", "/dev/full", "--force"), 2,
                                  word="not a regular file"),
        "latex -o device": Case(("latex", "xor", "-o", "/dev/full"), 2,
                                word="not a regular file"),
        "train -o device": Case(("train", "xor", "--data", "xor", "-o", "/dev/full"), 2,
                                word="not a regular file"),
        # an output file that exists and is not derive's
        "bare -o file": Case(("-o", str(existing)), 2, word="not a folder"),
        "codegen -o file": Case(("codegen", "xor", "-o", str(existing)), 2, word="--force"),
        "latex -o file": Case(("latex", "xor", "-o", str(existing)), 2, word="--force"),
        "train -o file": Case(("train", "xor", "--data", "xor", "-o", str(existing)), 2,
                              word="--force"),
    }
    if read_only is not None:
        cases.update({
            "bare read-only": Case(("-o", str(read_only / "out")), 2, word="cannot write"),
            "codegen read-only": Case(("codegen", "xor", "-o", str(read_only / "n.py")), 2,
                                      word="cannot write"),
            "latex read-only": Case(("latex", "xor", "-o", str(read_only / "n.tex")), 2,
                                    word="cannot write"),
            "train read-only": Case(("train", "xor", "--data", "xor", "-o",
                                     str(read_only / "n.py")), 2, word="cannot write"),
            "regen read-only": Case(("regen", "--dir", str(read_only)), 2,
                                    word="cannot write"),
        })
    return cases


def _run(case: Case, cwd: Path) -> tuple[int, str]:
    command = [sys.executable, "-m", "derive", *case.args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if case.stdout == "gone":
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        process.stdout.close()
        err = process.stderr.read()
        process.stderr.close()
        return process.wait(timeout=300), err
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    return done.returncode, done.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[Case, int, str]]:
    base = tmp_path_factory.mktemp("outputs")
    cwd = tmp_path_factory.mktemp("cwd")  # where each command runs: it must stay empty
    cases = _cases(base)
    before = sorted(base.rglob("*"))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(cases, pool.map(lambda case: _run(case, cwd), cases.values())))
    assert sorted(base.rglob("*")) == before, "a failed command left a file behind"
    assert (base / "existing").read_text() == "hand written\n"
    assert list(cwd.iterdir()) == [], "a failed command wrote into the working folder"
    return {name: (cases[name], *results[name]) for name in cases}


def _wrong(outcomes: dict[str, tuple[Case, int, str]], names: list[str]) -> str:
    wrong = []
    for name in names:
        case, code, err = outcomes[name]
        lines = 1 if case.code == 2 else 0  # a verdict or success says nothing on stderr
        # indented lines are progress, which a slow machine shows (`  ... checking dC/db^1`)
        said = [line for line in err.splitlines() if not line.startswith("  ")]
        if (code != case.code or len(said) != lines or "Traceback" in err
                or case.word not in err):
            wrong.append(f"{name}: exit {code} (expected {case.code}), stderr {err!r}")
    return "\n".join(wrong)


def test_every_case_is_one_line_with_its_exit_code(outcomes):
    names = [name for name in outcomes if "read-only" not in name]
    assert not _wrong(outcomes, names)


def test_a_read_only_folder_is_one_line_with_exit_2(outcomes):
    names = [name for name in outcomes if "read-only" in name]
    if not names:
        pytest.skip("no folder here refuses a new file (root, and /sys is writable)")
    assert not _wrong(outcomes, names)


def test_bare_derive_does_not_suggest_a_force_it_lacks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "xor_net.py").write_text("# my own network\n")
    done = subprocess.run([sys.executable, "-m", "derive", "-o", str(out)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if not line.startswith("  ")]
    assert len(said) == 1 and "xor_net.py" in said[0] and "--force" not in said[0]
    assert [path.name for path in out.iterdir()] == ["xor_net.py"]
    assert MARKER not in (out / "xor_net.py").read_text()

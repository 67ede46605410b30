"""Writing generated files: atomic, permission-preserving, never over a foreign file."""

from __future__ import annotations

import os
import stat

import pytest

from derive.errors import DeriveError
from derive.files import MARKER, is_generated, write_generated


def test_writes_with_the_mode_a_plain_open_would_give(tmp_path):
    target = write_generated(tmp_path / "net.py", f"# {MARKER}\nx = 1\n")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert is_generated(target)


def test_refuses_a_foreign_file_unless_forced(tmp_path):
    target = tmp_path / "mine.py"
    target.write_text("print('hand written')\n")
    with pytest.raises(DeriveError, match="--force"):
        write_generated(target, f"# {MARKER}\n")
    assert target.read_text() == "print('hand written')\n"
    write_generated(target, f"# {MARKER}\n", force=True)
    assert is_generated(target)


def test_overwrites_its_own_output_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "net.py"
    write_generated(target, f"# {MARKER}\nv = 1\n")
    write_generated(target, f"# {MARKER}\nv = 2\n")
    assert target.read_text().endswith("v = 2\n")
    assert [p.name for p in tmp_path.iterdir()] == ["net.py"]


@pytest.mark.parametrize("where", ["missing/net.py", "."])
def test_bad_output_paths_are_clear_errors(tmp_path, where):
    with pytest.raises(DeriveError, match="does not exist|is a directory"):
        write_generated(tmp_path / where, f"# {MARKER}\n")

"""Writing generated files: atomic, permission-preserving, never over a foreign file."""

from __future__ import annotations

import os
import stat

import pytest

from derive.errors import DeriveError
from derive.files import MARKER, check_folder, is_generated, write_generated


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
        write_generated(target, f"# {MARKER}\n", force=False)
    with pytest.raises(DeriveError, match="move it away") as refused:  # a caller without --force
        write_generated(target, f"# {MARKER}\n")
    assert "--force" not in str(refused.value)
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


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_device_is_never_replaced_even_with_force():
    with pytest.raises(DeriveError, match="not a regular file"):
        write_generated("/dev/full", f"# {MARKER}\n", force=True)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_writes_through_a_link_and_keeps_it(tmp_path):
    real = tmp_path / "real.py"
    real.write_text(f"# {MARKER}\nv = 1\n")
    (tmp_path / "link.py").symlink_to(real)
    write_generated(tmp_path / "link.py", f"# {MARKER}\nv = 2\n")
    assert (tmp_path / "link.py").is_symlink() and real.read_text().endswith("v = 2\n")


def test_an_output_folder_is_checked_before_the_work(tmp_path):
    assert check_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # checking made nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeriveError, match="not a folder"):
        check_folder(tmp_path / "file" / "out")

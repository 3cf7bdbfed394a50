"""data/atomic.py: a write is all or nothing, and its temporary file is recognisable."""
import os

import pytest

from data.atomic import is_partial, partial_path, write_atomically, write_text_atomically


def test_write_creates_folders_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    assert write_text_atomically(path, "first é\n") == str(path)
    write_text_atomically(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert os.listdir(path.parent) == ["out.txt"]


def test_a_failing_writer_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "out.bin"
    write_atomically(path, lambda fh: fh.write(b"old"))

    def half_then_fail(fh):
        fh.write(b"new but incomplete")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_partial_names_are_hidden_and_recognised(tmp_path):
    staged = os.path.basename(partial_path(tmp_path / "photo.png"))
    assert staged.startswith(".photo.png")
    assert is_partial(staged)
    assert not is_partial("photo.png")
    assert not is_partial(".hidden_but_final")

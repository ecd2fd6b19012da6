"""outputs: a directory appears whole or not at all, and never over something that exists."""

from __future__ import annotations

import pytest

from gptlab.outputs import OutputExistsError, atomic_directory, check_new_output


def test_atomic_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "nested" / "export"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "a"
    assert [p.name for p in out.parent.iterdir()] == ["export"]  # no temporary left beside it


def test_atomic_directory_leaves_nothing_when_the_write_fails(tmp_path):
    out = tmp_path / "export"
    out.mkdir()  # an empty directory may be replaced
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["export"]
    with atomic_directory(out) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert [p.name for p in out.iterdir()] == ["whole.bin"]


def test_an_existing_output_is_refused_before_any_work(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file.pt").write_text("x")
    for taken, needle in [(tmp_path / "full", "already exists and is not empty"), (tmp_path / "file.pt", "already exists")]:
        with pytest.raises(OutputExistsError, match=needle):
            check_new_output(taken)
        with pytest.raises(OutputExistsError), atomic_directory(taken):
            pass
    assert check_new_output(tmp_path / "new") == tmp_path / "new"

"""Packaging: the checkout never shadows the installed package.

A clone is a directory named `gptlab` without an `__init__.py`: run from its parent directory, Python's path
finder takes it for a namespace package, ahead of an editable install that works through an import hook
(setuptools' flat-layout editable installs do). With the src/ layout the editable install is a plain path
entry to src/, where the regular package wins over any namespace directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gptlab

SOURCE = Path(gptlab.__file__).resolve().parent  # the package these tests run (installed or on PYTHONPATH)


def test_the_package_lives_under_src():
    assert SOURCE.parent.name == "src" and (SOURCE.parent.parent / "pyproject.toml").is_file()


def test_import_gptlab_next_to_a_clone_gets_the_package(tmp_path):
    clone = tmp_path / "gptlab"  # what `git clone .../gptlab` leaves in the current directory
    (clone / "src").mkdir(parents=True)
    (clone / "pyproject.toml").write_text("[project]\nname = 'gptlab'\n")
    code = "import gptlab; print(gptlab.__file__); print(callable(gptlab.load))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    where, has_load = result.stdout.split()
    assert Path(where).resolve() == SOURCE / "__init__.py" and has_load == "True"

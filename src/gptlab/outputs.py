"""Writing outputs: never over something that exists, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path

from gptlab.errors import GptlabError

UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(UMASK)


class OutputExistsError(GptlabError):
    """The output path of a command already holds something."""


def check_new_output(out: str | Path) -> Path:
    """`out` may be written: it does not exist, or is an empty directory. Checked before the work starts."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists{' and is not empty' if out.is_dir() else ''}: "
                                "remove it or choose another --out")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """A temporary directory beside `out` to write into; renamed to `out` when the block succeeds, removed
    if it fails, so no reader sees a half-written directory. `out` may exist only as an empty directory.
    What it holds gets the permissions of any file the user writes (the umask's), not mkdtemp's 0700 and the
    0600 of files written through temporary files (safetensors)."""
    out = check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~UMASK)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path) -> Iterator[typing.TextIO]:
    """A text file to write `out` through: a temporary file beside it, renamed to `out` when the block
    succeeds, removed if it fails. `out` must not exist."""
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists: remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

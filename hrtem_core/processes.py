"""Worker processes that never outlive the process that started them, and the signals that stop them."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import NamedTuple

from .errors import InputError

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
    try:
        target(*args)
    except InputError as exc:  # as every command line says it (hrtem_core.cli.run_command): one line, exit 2
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


class ChildExit(NamedTuple):
    """How a child of :func:`run_in_child` ended: its exit code and the first line that says why (its first
    ``error:`` line without the prefix, else the last line of its traceback; None when it printed neither)."""
    code: int
    reason: str | None


def first_reason(lines: list[str]) -> str | None:
    """The first ``error: ...`` line of a process's stderr (without ``error: ``), else the exception line that ends
    its last traceback (``ValueError: ...``), else None."""
    for line in lines:
        if line.startswith("error: "):
            return line[len("error: "):].strip()
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        for line in reversed(lines):
            if line.strip() and not line.startswith((" ", "\t")):
                return line.strip()
    return None


def run_in_child(target, *args, cwd: str | None = None) -> ChildExit:
    """``target(*args)`` in a fresh Python process (a module-level function, pickled by reference); how it ended.

    For work that needs a process of its own inside a host that is not one: a Dask worker runs tasks in threads
    of a daemonic process, where signal handlers cannot be installed and multiprocessing may not start children.
    The child's stderr still goes to ours (the Dask worker's log), line by line; its first error line also comes
    back (:class:`ChildExit`), so that the command that sent the work can say why it failed, not only that it did.
    An :class:`~hrtem_core.errors.InputError` in the child is its ``error:`` line and exit status 2, as on a command
    line.
    """
    code = "from hrtem_core.processes import _child_main; _child_main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    lines: list[str] = []
    try:
        proc.stdin.write(pickle.dumps((target, args)))
        proc.stdin.close()
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            if len(lines) < 10_000:  # enough for the first error line; a chatty child cannot fill our memory
                lines.append(line.rstrip("\n"))
    except BaseException:  # our thread stopped waiting: the child must not go on alone
        proc.kill()
        raise
    finally:
        proc.wait()
    return ChildExit(proc.returncode, first_reason(lines))

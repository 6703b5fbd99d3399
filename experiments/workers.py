"""Local worker processes of a sweep or study: each joins the shared queue as a worker on another machine would."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

from hrtem_core.errors import InputError
from hrtem_core.processes import run_in_child


def share_cores(workers: int) -> None:
    """Give each of ``workers`` local processes its share of the cores: torch's default (all cores per process)
    oversubscribes the machine and slows every worker down many times over. A thread count the user set for the whole
    machine's work (OMP_NUM_THREADS, as torch itself reads it) is a ceiling, never raised."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        ceiling = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        ceiling = 0
    torch.set_num_threads(min(threads, ceiling) if ceiling > 0 else threads)


def run_processes(target, arg_lists: list[tuple], label: str) -> None:
    """Run ``target(*args)`` for each args tuple in its own spawned process and wait for all of them. Plain
    processes, not a pool: a pool waits forever for the task of a worker that was killed, while here the others go on
    and the queue hands the dead one's work out again. A worker that ends badly is named on stderr."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, name=f"{label}-worker-{i}", args=args) for i, args in enumerate(arg_lists)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    for p in procs:
        if p.exitcode:
            print(f"{label}: worker {p.name} (pid {p.pid}) ended with exit code {p.exitcode}", file=sys.stderr)


class WorkerFailed(Exception):
    """The work a Dask task ran in a process of its own ended badly: where (the Dask worker's address), how (the exit
    code) and why (the child's first error line, :class:`hrtem_core.processes.ChildExit`)."""

    def __init__(self, address: str, code: int, reason: str | None):
        super().__init__(address, code, reason)
        self.address, self.code, self.reason = address, code, reason

    def __str__(self) -> str:
        why = self.reason or "no error line (see the worker's log)"
        return f"worker {self.address}: exit code {self.code}: {why}"


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not inside a Dask task
        import socket

        return socket.gethostname()


def _in_child_process(cwd: str, target, *args) -> None:
    """``target(*args)`` in a process of its own (signals, its own torch threads, killed with the Dask worker), in
    the submitting command's working directory: configs name data relative to it (the workers share its
    filesystem). A child that ends badly is a :class:`WorkerFailed` saying where and why."""
    code, reason = run_in_child(target, *args, cwd=cwd)
    if code:
        raise WorkerFailed(_worker_address(), code, reason)


def run_on_dask(target, make_args, label: str, scheduler) -> None:
    """``target(*make_args(slot, share))`` as one long-running task per slot of a Dask cluster (one per GPU where
    workers advertise ``GPU`` resources, else one per worker process; ``share``: the slots on that slot's host, for
    :func:`share_cores`), and wait for all of them. A task whose Dask worker dies is started again on another by the
    scheduler; the shared queue hands its unit out again, so nothing is lost or recorded twice. A task that ends
    badly is named on stderr with its worker and its first error line, as a local worker process would be; when
    every task refused its input (an ``error:`` line, exit status 2: a worker without the database password, a path
    it cannot see), nothing can get done, and that is one InputError naming the first of them."""
    import uuid

    from hrtem_core.cluster import check_workers, connect, worker_slots

    client = connect(scheduler)
    try:
        check_workers(client, [os.getcwd()])
        slots, per_host = worker_slots(client)
        hosts = {addr: w.get("host", addr) for addr, w in client.scheduler_info()["workers"].items()}
        tag = uuid.uuid4().hex[:8]
        futures = [client.submit(_in_child_process, os.getcwd(), target,
                                 *make_args(i, per_host[hosts[options["workers"][0]]]),
                                 key=f"{label.replace(' ', '-')}-worker-{i}-{tag}", pure=False, **options)
                   for i, options in enumerate(slots)]
        client.gather(futures, errors="skip")  # waits for all; failures are reported below
        failed = [(future.key, future.exception()) for future in futures if future.status != "finished"]
    finally:
        client.close()
    refused = [exc for _, exc in failed if isinstance(exc, WorkerFailed) and exc.code == 2 and exc.reason]
    if failed and len(refused) == len(futures):
        others = f" (and {len(refused) - 1} more Dask worker(s) the same way or similar: see above)" \
            if len(refused) > 1 else ""
        for exc in refused[1:]:
            print(f"{label}: {exc}", file=sys.stderr)
        raise InputError(f"{label}: no Dask worker could start its work; worker {refused[0].address}: "
                         f"{refused[0].reason}{others}")
    for key, exc in failed:
        print(f"{label}: Dask task {key} ended badly: {exc}", file=sys.stderr)


def dispatch(target, make_args, label: str, workers: int, scheduler=None, inline=None) -> None:
    """The one way a sweep or a study hands out its work: ``target(*make_args(slot, share))`` in one worker per slot
    of the Dask cluster ``scheduler`` (:func:`run_on_dask`), else in ``workers`` local processes
    (:func:`run_processes`; ``share`` = ``workers``, for :func:`share_cores`), else — one worker, no cluster —
    ``inline()`` in this process when given. Every worker joins the same queue, so the result is the same."""
    if scheduler is not None:
        run_on_dask(target, make_args, label, scheduler)
    elif workers <= 1 and inline is not None:
        inline()
    else:
        run_processes(target, [make_args(slot, workers) for slot in range(max(1, workers))], label)

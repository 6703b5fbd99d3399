"""Local worker processes of a sweep or study: each joins the shared queue as a worker on another machine would."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys


def share_cores(workers: int) -> None:
    """Give each of ``workers`` local processes its share of the cores: torch's default (all cores per process)
    oversubscribes the machine and slows every worker down many times over."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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

"""Dask, the one execution engine beyond local processes (it is also what abTEM uses).

``--scheduler`` takes the address of a running Dask scheduler (``tcp://HOST:8786``) or the path of the JSON file a
scheduler wrote with ``--scheduler-file`` (the usual hand-over on SLURM/PBS); the Python API also takes a Dask
cluster object (``dask_jobqueue.SLURMCluster``, ``distributed.LocalCluster``). The work sent to it is the same pure
function a local process runs, so results do not depend on where they were computed.

Every worker must see the same files as the process that submits (a shared filesystem) and have this project
installed in the same version: :func:`check_workers` says which ones do not, before any work is sent.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import InputError

CONNECT_TIMEOUT_S = 30


def connect(scheduler: Any):
    """A ``distributed.Client`` on ``scheduler`` (address, scheduler file or cluster object), or InputError."""
    from distributed import Client

    kwargs: dict[str, Any]
    if isinstance(scheduler, str) and "://" not in scheduler:
        if not Path(scheduler).is_file():
            raise InputError(f"--scheduler {scheduler!r}: neither a scheduler address (tcp://HOST:PORT) nor an "
                             "existing scheduler file (dask scheduler --scheduler-file PATH)")
        kwargs = {"scheduler_file": scheduler}
    else:
        kwargs = {"address": scheduler}
        _refuse_fast(scheduler)
    try:
        client = Client(timeout=CONNECT_TIMEOUT_S, set_as_default=False, **kwargs)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"--scheduler {scheduler}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s "
                         f"({type(exc).__name__}: {exc})") from None
    if not client.scheduler_info()["workers"]:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            address = client.scheduler.address
            client.close()
            raise InputError(f"--scheduler {scheduler}: the scheduler has no workers, and none joined within "
                             f"{CONNECT_TIMEOUT_S} s (start some: dask worker {address})") from None
    return client


def _refuse_fast(address: Any) -> None:
    """A ``tcp://HOST:PORT`` where nothing listens is said at once: Dask's client retries a refused connection until
    its timeout. Anything else (no answer yet, another scheme, a cluster object) is left to the client's timeout."""
    if not isinstance(address, str) or not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://"):].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return  # no explicit port: Dask's default applies and its client reports
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except ConnectionRefusedError:
        raise InputError(f"--scheduler {address}: connection refused: no Dask scheduler listens there (start one: "
                         "dask scheduler --port PORT, or give its --scheduler-file)") from None
    except OSError:
        pass  # unreachable or slow: the client's timeout decides, with its own message


def _worker_view(paths: list[str]) -> dict:
    import importlib.metadata as md

    try:
        version = md.version("hrtem-curation")
    except md.PackageNotFoundError:
        version = None
    return {"host": socket.gethostname(), "missing": [p for p in paths if not Path(p).exists()], "version": version}


def check_workers(client, shared_paths: list[str | Path] = ()) -> dict[str, dict]:
    """Each worker's view (host, which of ``shared_paths`` it cannot see, the installed version of this project);
    InputError naming the workers that cannot take part."""
    import importlib.metadata as md

    paths = [str(Path(p).absolute()) for p in shared_paths]
    try:
        views = client.run(_worker_view, paths)
    except Exception as exc:  # a worker without this project installed cannot even unpickle the function
        raise InputError(f"the Dask workers cannot run this project's code ({type(exc).__name__}: {exc}); install "
                         "it on every worker (see docker/)") from None
    blind = {addr: v["missing"] for addr, v in views.items() if v["missing"]}
    if blind:
        listed = "; ".join(f"{addr}: {', '.join(missing)}" for addr, missing in sorted(blind.items()))
        raise InputError(f"Dask workers that do not see the output folder (it must be on a filesystem every worker "
                         f"shares): {listed}")
    mine = md.version("hrtem-curation")
    other = {addr: v["version"] for addr, v in views.items() if v["version"] != mine}
    if other:
        raise InputError(f"Dask workers with another version of this project than {mine}: "
                         f"{', '.join(f'{a} ({v})' for a, v in sorted(other.items()))}")
    return views


def worker_slots(client) -> tuple[list[dict], dict[str, int]]:
    """Where long-running workers of a sweep or study go: one per GPU where workers advertise a ``GPU`` resource
    (``dask worker --resources GPU=1``), else one per Dask worker process. Returns (submit options per slot,
    slots per host) — the latter to give each its share of the host's cores."""
    workers = client.scheduler_info()["workers"]
    gpus = {addr: int(w.get("resources", {}).get("GPU", 0)) for addr, w in workers.items()}
    slots = []
    per_host: Counter = Counter()
    for addr, w in sorted(workers.items()):
        for _ in range(gpus[addr] if any(gpus.values()) else 1):
            # a preference, not a pin: if this worker dies, its loop moves to another (the claims keep it exact)
            options = {"workers": [addr], "allow_other_workers": True}
            if gpus[addr]:
                options["resources"] = {"GPU": 1}
            slots.append(options)
            per_host[w.get("host", addr)] += 1
    return slots, dict(per_host)

"""Where a sweep or a study is: the driver watches its queue in the claims database while the workers run.

One line per unit (or trial slot) as it is recorded, with its final Dice, and a progress bar on a terminal's stderr
(done of total, running, failed, ETA from the pace so far). It only reads: the workers, wherever they run (local
processes, Dask, other machines on the same queue), decide everything; a monitor that stops or lags changes nothing.
"""

from __future__ import annotations

import sys
import threading
import time

from mlflow import MlflowClient

from . import claims
from .claims import CLAIMED, DONE, FAILED

POLL_S = 2.0


class QueueProgress:
    """``with QueueProgress(engine, queue, tracking_uri, label, metric, enabled):`` around the workers' run.
    ``select(row)``: the rows that count (a study's slots within its budget); ``name(row)``: a unit's name."""

    def __init__(self, engine, queue: str, tracking_uri: str, label: str, metric: str = "ood/mean/dice",
                 enabled: bool = True, select=lambda row: True, name=lambda row: f"{row['cell_key']}:{row['phase']}"):
        self.engine, self.queue, self.uri, self.label, self.metric = engine, queue, tracking_uri, label, metric
        self.enabled, self.select, self.name = enabled, select, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[tuple] = set()
        self._bar = None

    def __enter__(self) -> QueueProgress:
        if self.enabled:  # what was done before this run started is not announced again
            self._seen = {(r["cell"], r["phase"]) for r in self._rows() if r["state"] in (DONE, FAILED)}
            self._started, self._done_at_start = time.time(), len(self._seen)
            self._thread = threading.Thread(target=self._watch, name=f"progress-{self.queue}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            try:
                self._poll()  # the last units, recorded as the workers ended
            except Exception:  # noqa: BLE001  the summary that follows says what was recorded
                pass
        if self._bar is not None:
            self._bar.close()
        return False

    def _rows(self) -> list[dict]:
        return [r for r in claims.unit_rows(self.engine, self.queue) if self.select(r)]

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._poll()
            except Exception:  # noqa: BLE001  a database hiccup: look again on the next tick
                continue

    def _final(self, run_id: str | None) -> str:
        if not run_id or ":" in run_id:  # a failed trial's slot records "trial:<number>", not a run
            return "no run recorded"
        try:
            value = MlflowClient(self.uri).get_run(run_id).data.metrics.get(self.metric)
        except Exception:  # noqa: BLE001  the line is for a person; the report reads the store properly
            return f"run {run_id[:8]}"
        return f"{self.metric} {value:.3f} (run {run_id[:8]})" if value is not None else f"run {run_id[:8]}"

    def _poll(self) -> None:
        from tqdm import tqdm

        rows = self._rows()
        total = len(rows)
        done = [r for r in rows if r["state"] == DONE]
        failed = [r for r in rows if r["state"] == FAILED]
        running = sum(r["state"] == CLAIMED for r in rows)
        if self._bar is None:
            self._bar = tqdm(total=total, unit="unit", desc=self.label, dynamic_ncols=True, disable=None,
                             file=sys.stderr, leave=False)
        for r in sorted(done + failed, key=lambda r: r["updated"]):
            key = (r["cell"], r["phase"])
            if key in self._seen:
                continue
            self._seen.add(key)
            what = self._final(r["run_id"]) if r["state"] == DONE else f"FAILED: {(r['error'] or '')[:120]}"
            line = f"{self.label}: {self.name(r)} {what} [{len(self._seen)}/{total}]"
            if self._bar.disable:
                print(line, flush=True)
            else:
                self._bar.write(line)
        self._bar.n = len(done) + len(failed)
        rate = (self._bar.n - self._done_at_start) / max(time.time() - self._started, 1e-9)
        eta = (total - self._bar.n) / rate if rate > 0 else None
        self._bar.set_postfix_str(f"running {running}, failed {len(failed)}"
                                  + (f", ETA {eta / 60:.1f} min" if eta is not None else ""), refresh=False)
        self._bar.refresh()

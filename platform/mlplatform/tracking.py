"""One tracked run in MLflow: created and ended here (not by Lightning's logger), never left RUNNING.

Where the store is and how it is opened is ``store``'s business (a local SQLite file by default, or a tracking
server). Inside a :class:`TrackedRun` the process's MLflow tracking URI is the run's (MLflow's model logging reads it
from there); it is put back when the run ends.

A run that was interrupted (KILLED), failed, or whose process was killed outright (left RUNNING) can be reopened:
``TrackedRun(..., resume_run_id=ID)`` makes it RUNNING again and writes to it as before (``mlplatform.train``
continues its training from its checkpoint). A run's checkpoints live in ``checkpoint_folder(tracking_uri, run_id)``,
and its training process holds ``RunLock`` on that folder from start to end, so that a run is never trained by two
processes at once (on one machine, or on machines sharing that folder).

``resolve_tracking_uri`` and ``load_model`` are re-exported: models logged before ``pyfunc_model.py`` existed carry a
copy of the old serving.py, which imports ``mlplatform.tracking.resolve_tracking_uri``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from hrtem_core.databases import redact
from hrtem_core.errors import ConfigError, ServiceError
from hrtem_core.files import cache_dir

from mlplatform.model_format import METADATA, MODEL_URI_TAG, REQUIRED_METADATA, THRESHOLD, WEIGHTS
from mlplatform.mlflow_ui import EXPERIMENT_KIND_TAG, NOTE_TAG, TRAINING_KIND, describe_experiment
from mlplatform.models import build_model
from mlplatform.provenance import __version__, git_tags, package_versions
from mlplatform.serving import load_model  # noqa: F401  (re-exported, see the module docstring)
from mlplatform.store import (artifact_location, artifact_store_problem, ensure_store, has_scheme, is_unreachable,
                              process_tracking_uri, quiet_mlflow, record_pending_end, resolve_tracking_uri,
                              server_error, short_http_retries)

# the pyfunc's code: MLflow stores a copy with each model and executes it on load (never imported here, see the file)
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")

# MLflow's limits (mlflow.utils.validation): longer values are refused, and a refused param would crash the run
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_INPUT_TAG_VALUE, MAX_DIGEST = 6000, 8000, 500, 36
_TRUNCATED = " ...[truncated; full value in params.json]"


def _clip(text: str, limit: int, note: str = " ...[truncated]") -> str:
    return text if len(text) <= limit else text[: limit - len(note)] + note


EXPERIMENT_DESCRIPTION = (
    "Segmentation networks trained on simulated HRTEM micrographs and scored on out-of-distribution benchmarks "
    "after every epoch (`ood/<benchmark>/dice`, their mean `ood/mean/dice`).\n\n"
    "A sweep or study is a parent run (tag `kind` = `sweep` or `study`) with a summary, its description and its "
    "report; its runs are tagged `subset`, `seed` and `phase`. `python -m experiments ui` prints the URL of the "
    "latest sweep's comparison view (runs grouped by subset and phase, charted per epoch). Each run's dataset "
    "inputs identify the exact samples it read (digest over the selected samples; filter, counts and a profile).")


def get_or_create_experiment(name: str, tracking_uri: str | None = None) -> str:
    """Experiment id by name, created (with local artifacts next to a SQLite store) when missing."""
    uri = resolve_tracking_uri(tracking_uri)
    ensure_store(uri)
    client = MlflowClient(uri)
    for attempt in range(2):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ConfigError(f"tracking.experiment={name!r}: experiment {exp.experiment_id} of that name is "
                                  f"deleted in {redact(uri)}: restore it (MlflowClient().restore_experiment), remove "
                                  "it for good (mlflow gc), or name another experiment")
            if exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:  # made before we marked ours, or by someone else
                describe_experiment(client, exp.experiment_id, EXPERIMENT_DESCRIPTION)
            return exp.experiment_id
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location(uri),
                                              tags={EXPERIMENT_KIND_TAG: TRAINING_KIND,
                                                    NOTE_TAG: EXPERIMENT_DESCRIPTION})
            return exp_id
        except MlflowException as exc:  # another worker created it between our two calls: read it back
            if attempt or "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
    raise AssertionError("unreachable")


def find_runs(tracking_uri: str | None, experiment: str, filter_string: str = "") -> list:
    """All runs (mlflow.entities.Run) of an experiment matching an MLflow filter, newest first; [] if none."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def is_insert_race(exc: BaseException) -> bool:
    """An insert that lost a race with another process's identical insert (SQLite, PostgreSQL, MySQL wording)."""
    text = str(exc)
    return any(s in text for s in ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry",
                                   "RESOURCE_ALREADY_EXISTS"))


def close_run(client: MlflowClient, run_id: str, status: str, reason: str, superseded: bool = False) -> None:
    """End a run left open by another process (a dead worker's, a superseded one's), saying why."""
    client.set_tag(run_id, "failure_reason", _clip(reason, 1000))
    if superseded:
        client.set_tag(run_id, "superseded", "true")
    client.set_terminated(run_id, status)


def _array_schema(image_shape: tuple[int, ...] | None) -> str | None:
    """MLflow schema JSON of a sample as training reads it: a float32 image and a uint8 mask of one shape."""
    if not image_shape:
        return None
    import numpy as np
    from mlflow.types import Schema, TensorSpec

    shape = (-1, *(int(n) for n in image_shape))
    schema = Schema([TensorSpec(np.dtype("float32"), shape, "image"), TensorSpec(np.dtype("uint8"), shape, "mask")])
    return json.dumps({"mlflow_colspec": schema.to_dict()})


# ------------------------------------------------------------------------------------------------ checkpoints, locks


def checkpoint_folder(tracking_uri: str, run_id: str) -> Path:
    """Where a run's checkpoints (``last.ckpt``, the resume point, and the best epoch's) are written while it trains:
    ``<folder of the SQLite file>/checkpoints/<run id>`` for a local store; for any other store (a tracking server, a
    database), ``$HRTEM_CACHE_DIR/checkpoints/<run id>``, else ``~/.cache/hrtem-curation/checkpoints/<run id>`` (such
    runs also upload ``last.ckpt`` as the artifact ``checkpoints/last.ckpt``: ``uploads_checkpoints``)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
        return db.absolute().parent / "checkpoints" / run_id
    base = cache_dir() or Path(tempfile.gettempdir()) / "hrtem-curation"  # no HOME: the temp folder
    return base / "checkpoints" / run_id


def uploads_checkpoints(tracking_uri: str) -> bool:
    """Whether a run of this store uploads its resume point every epoch (everything but a local SQLite store, whose
    checkpoint folder sits beside it: another machine can resume a server's run only from its artifacts)."""
    return not tracking_uri.startswith("sqlite:///")


class RunBusy(Exception):
    """Another process holds the run's lock: it is training the run now."""


class RunLock:
    """An exclusive ``flock`` on ``<checkpoint folder>/lock``, held by the process that trains the run. The operating
    system releases it when that process dies, however it dies (a SIGKILL, a lost machine with a local folder), so a
    run whose lock is free is one no live process trains. The file names the holder (pid and host)."""

    def __init__(self):
        self._fh = None

    def acquire(self, folder: Path) -> None:
        """Take the lock (creating the folder), or RunBusy naming the holder."""
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / "lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "a process"
            fh.close()
            raise RunBusy(holder) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh, fh = None, self._fh
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


class Interrupted(KeyboardInterrupt):
    """A signal turned into KeyboardInterrupt, so that `finally` blocks and our __exit__ run."""


class Superseded(Exception):
    """The work this run does was handed to another worker (its claim was taken over): the run must not count.
    It ends KILLED, tagged ``superseded``."""


class TrackedRun:
    """Context manager around one MLflow run; see the module docstring and docs/architecture.md "A tracked run"."""

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str | None, params: dict, tags: dict,
                 parent_run_id: str | None = None, system_metrics: bool = True,
                 stop_exceptions: tuple[type[BaseException], ...] = (), on_start=None, commit=None,
                 resume_run_id: str | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        ensure_store(self.tracking_uri)  # a store that cannot work is one clear error, before MLflow opens it
        self.experiment, self.run_name = experiment, run_name
        self.params, self.tags = dict(params), dict(tags)
        self.parent_run_id, self.system_metrics = parent_run_id, system_metrics
        # exceptions that stop a run on purpose (an Optuna pruning decision): FINISHED, tagged stopped_by
        self.stop_exceptions = tuple(stop_exceptions)
        # on_start(run_id) right after the run exists (so a queue can map its unit of work to the run);
        # commit(run_id) -> bool just before the run would end FINISHED: False means another worker's run is the
        # record of this work, and this one ends KILLED as superseded
        self.on_start, self.commit = on_start, commit
        # an existing run to reopen (RUNNING again) instead of a new one: its name, parent and provenance tags stay,
        # its failure_reason goes, and resume.* tags say what it was resumed from and with which code
        self.resume_run_id = resume_run_id
        self.client = MlflowClient(self.tracking_uri)
        self._run_id: str | None = None
        self._signal: str | None = None  # which interruption we saw, for failure_reason
        self._old_handlers: dict = {}
        self._datasets: set = set()
        self._uri_scope = None

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("TrackedRun has no run yet: use it as a context manager")
        return self._run_id

    # lifecycle
    def __enter__(self) -> TrackedRun:
        self._signal, self._datasets = None, set()
        self._uri_scope = process_tracking_uri(self.tracking_uri)  # MLflow's model logging reads it there
        self._uri_scope.__enter__()
        try:
            return self._start()
        except BaseException:
            self._leave_uri_scope()
            raise

    def _leave_uri_scope(self) -> None:
        if self._uri_scope is not None:
            self._uri_scope, scope = None, self._uri_scope
            scope.__exit__(None, None, None)

    def _start(self) -> TrackedRun:
        if self.resume_run_id:
            return self._reopen()
        experiment_id = get_or_create_experiment(self.experiment, self.tracking_uri)
        tags = {str(k): _clip(str(v), MAX_TAG_VALUE) for k, v in self.tags.items()}
        tags.update(git_tags())
        tags["platform.version"] = __version__
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # nesting in the UI; lineage is the caller's parent_run tag
        # nested only when another run is active in this thread (fluent MLflow refuses a second top-level run)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name, tags=tags,
                               nested=mlflow.active_run() is not None, log_system_metrics=self.system_metrics)
        self._run_id = run.info.run_id
        try:
            if self.parent_run_id:  # a nested start_run points mlflow.parentRunId at the active run: ours wins
                self.client.set_tag(self._run_id, "mlflow.parentRunId", self.parent_run_id)
            if self.on_start is not None:
                self.on_start(self._run_id)
            self._log_params(self.params)
            self._install_handlers()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _reopen(self) -> TrackedRun:
        before = self.client.get_run(self.resume_run_id)
        previous = before.info.status
        reason = before.data.tags.get("failure_reason")
        run = mlflow.start_run(run_id=self.resume_run_id, nested=mlflow.active_run() is not None,
                               log_system_metrics=self.system_metrics)  # RUNNING again; system metrics continue
        self._run_id = run.info.run_id
        try:
            count = int(before.data.tags.get("resume.count", "0")) + 1
            versions = {f"resume.{k}": v for k, v in git_tags().items()}
            self.set_tags({**{str(k): v for k, v in self.tags.items()}, **versions,
                           "resume.count": str(count), "resume.platform.version": __version__,
                           "resume.from": f"{previous}" + (f": {reason}" if reason else "")})
            if reason is not None:
                self.client.delete_tag(self._run_id, "failure_reason")
            if self.on_start is not None:
                self.on_start(self._run_id)
            self._log_params(self.params)  # the same values, which MLflow accepts again (a run killed early lacks them)
            self._install_handlers()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore_handlers()
        stopped = exc_type is not None and self.stop_exceptions and issubclass(exc_type, self.stop_exceptions)
        finished = stopped or exc_type is None or (issubclass(exc_type, SystemExit) and exc.code in (0, None)
                                                   and not self._signal)
        if finished and not self._committed():
            lost = Superseded("another worker recorded this work first")
            self._supersede(lost)
            raise lost  # the caller must not take this run for the result
        if stopped:
            self.client.set_tag(self.run_id, "stopped_by", _clip(f"{exc_type.__name__}: {exc}".strip(), 1000))
            self._end("FINISHED", None, None)
            return False
        if finished:
            status, reason = "FINISHED", None
        elif issubclass(exc_type, Superseded):
            self._supersede(exc)
            return False
        elif issubclass(exc_type, KeyboardInterrupt) or (issubclass(exc_type, SystemExit) and self._signal):
            # Lightning catches KeyboardInterrupt and calls sys.exit(1): the signal we recorded names the cause
            status, reason = "KILLED", f"interrupted ({self._signal or 'KeyboardInterrupt'})"
        else:
            status, reason = "FAILED", _clip(f"{exc_type.__name__}: {exc}".strip(), 1000)
            if server_error(exc) is not None:
                self._server_failed(exc)  # raises ServiceError
            if is_unreachable(exc):
                self._lost(exc)  # raises ServiceError
        self._end(status, reason, "".join(traceback.format_exception(exc_type, exc, tb)) if exc_type else None)
        return False  # always propagate

    def _lost(self, exc: BaseException) -> None:
        """The store stopped answering (after MLflow's bounded retries, see ``store.HTTP_RETRY_ENV``): end the run
        FAILED there if it answers one more quick try, else keep that on this machine (``store.record_pending_end``:
        the next command that reaches the store records it); then raise one ServiceError for the command line."""
        text = str(exc).lower()
        cause = "connection refused" if "refused" in text else "no answer (timeout)" if "timeout" in text or \
            "timed out" in text else _clip(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 300)
        reason = f"tracking store lost during the run: {cause}"
        try:
            with short_http_retries():
                self._end("FAILED", reason, None)
            done = "the run was ended FAILED there"
        except Exception as end_exc:
            if not is_unreachable(end_exc):
                raise
            try:
                kept = record_pending_end(self.tracking_uri, self.run_id, "FAILED", reason)
                done = (f"the run is still RUNNING there; it is recorded FAILED by the next command that reaches the "
                        f"store (kept in {kept})")
            except OSError:
                done = "the run is still RUNNING there"
        raise ServiceError(f"tracking store {self.tracking_uri}: lost during run {self.run_id} ({cause}); {done}: "
                           f"start the store again, then add --resume {self.run_id} to the same command to continue "
                           "from its last checkpoint") from exc

    def _server_failed(self, exc: BaseException) -> None:
        """The tracking server answered with a server error (5xx) after MLflow's retries: it is up, and something
        behind it failed (most often its artifact store: a missing bucket, no S3 credentials). End the run FAILED
        there if it lets us, and raise one ServiceError with the status, the server's own words where it has any
        (:func:`store.artifact_store_problem`) and the fix; never "lost", which would send the user to restart a
        server that is running."""
        code = server_error(exc)
        said = artifact_store_problem(self.tracking_uri.rstrip("/")) if self.tracking_uri.startswith("http") else None
        if said is None:  # not its artifact store: the request, the server's words if it sent any, its log
            text = str(exc)
            found = re.search(r"(?:url: |API request to (?:endpoint )?)(\S+)", text)
            body = text.split("Response body:", 1)[1].strip() if "Response body:" in text else ""
            said = (f"the request to {found.group(1)}" if found else "a request") + \
                (f" got: {_clip(body, 300)}" if body else "") + "; the server's log says why"
        reason = f"tracking server answered HTTP {code} (server error): {said}"
        try:
            with short_http_retries():
                self._end("FAILED", _clip(reason, 1000), None)
            done = "the run was ended FAILED there"
        except Exception:  # noqa: BLE001  the server that failed may fail this too: say so, keep the first error
            done = "the run could not be ended there (it may be left RUNNING)"
        raise ServiceError(f"tracking server {self.tracking_uri} answered HTTP {code} (a server error; the server is "
                           f"up) during run {self.run_id}: {said}; {done}: fix the server, then add --resume "
                           f"{self.run_id} to the same command to continue from its last checkpoint") from exc

    def _supersede(self, exc: BaseException) -> None:
        self.client.set_tag(self.run_id, "superseded", "true")
        self._end("KILLED", _clip(f"superseded: {exc}", 1000), None)

    def _committed(self) -> bool:
        """The commit hook's answer (True without one). If the hook itself fails, the run ends FAILED and the
        hook's exception propagates."""
        if self.commit is None:
            return True
        try:
            return bool(self.commit(self.run_id))
        except BaseException:
            self._end("FAILED", "could not record the result (commit failed)", traceback.format_exc())
            raise

    def _end(self, status: str, reason: str | None, trace: str | None) -> None:
        try:
            if reason:
                self.client.set_tag(self.run_id, "failure_reason", reason)
            if trace:
                self.client.log_text(self.run_id, trace, "failure/traceback.txt")
        except Exception as exc:  # recording the cause must not stop us from ending the run
            print(f"warning: could not record why run {self.run_id} ended: {exc}", file=sys.stderr)
        finally:
            active = mlflow.active_run()
            try:
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run(status)  # also stops the system-metrics thread
                else:
                    self.client.set_terminated(self.run_id, status)
            finally:
                self._leave_uri_scope()

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread handle signals
        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # respect an ignored Ctrl+C
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

    def _restore_handlers(self) -> None:
        while self._old_handlers:
            sig, old = self._old_handlers.popitem()
            signal.signal(sig, old)

    def _on_signal(self, signum, frame):
        self._signal = "KeyboardInterrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        raise Interrupted(self._signal)

    # logging
    def _log_params(self, params: dict) -> None:
        values = {str(k): json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v) for k, v in params.items()}
        if any(len(v) > MAX_PARAM_VALUE for v in values.values()):
            self.log_dict(params, "params.json")  # the full values, which the truncated params point to
        self.client.log_batch(self.run_id, params=[Param(k, _clip(v, MAX_PARAM_VALUE, _TRUNCATED))
                                                   for k, v in values.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(str(k), _clip(str(v), MAX_TAG_VALUE))
                                                 for k, v in tags.items()])

    def log_dataset(self, role: str, name: str, path: str, content_hash: str, n_samples: int,
                    filter: str | None, digest: str | None = None, profile: dict | None = None,
                    image_shape: tuple[int, ...] | None = None, subset: str | None = None) -> None:
        """A dataset input (context = role) for the samples this run reads, plus one run tag to query by.

        Its digest is ``digest`` (of the selected samples and filter, curation.selection_digest), so runs that read
        different subsets of one dataset show different inputs; without it, the dataset's content hash. The input's
        profile (shown in the UI's dataset drawer) is ``profile`` with the filter, the sample count and the dataset's
        full content hash; its schema, the image and mask arrays of ``image_shape``. The input's tags add the role,
        path and ``subset`` (this run's subset name, for train and validation data)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset as DatasetEntity

        path = str(path)
        local = str(Path(path).absolute()) if not has_scheme(path) else path
        try:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": all candidates are local
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(local)
        except MlflowException:  # e.g. WebDataset pipe: URLs, which no MLflow source understands
            source = CodeDatasetSource(tags={"uri": path})
        digest = (digest or content_hash)[:MAX_DIGEST]
        # MLflow keeps one input per (dataset name, digest) and run: a second role of the same samples would
        # silently vanish, so it gets its own name
        ds_name = name if (name, digest) not in self._datasets else f"{name}/{role}"
        self._datasets.add((ds_name, digest))
        # MLflow stores one dataset per (name, digest) and experiment, shared by every run that logs it: the profile
        # holds only what the digest pins (the samples and the filter), never this run's role or subset
        full_profile = {"filter": filter or "all", "n_samples": int(n_samples), **(profile or {}),
                        "dataset_content_hash": content_hash}
        entity = DatasetEntity(name=ds_name, digest=digest, source_type=source._get_source_type(),
                               source=source.to_json(), schema=_array_schema(image_shape),
                               profile=json.dumps(full_profile))
        input_tags = {"mlflow.data.context": role, "content_hash": content_hash, "filter": filter or "",
                      "n_samples": str(int(n_samples)), "path": path, **({"subset": subset} if subset else {})}
        entry = DatasetInput(entity, tags=[InputTag(k, _clip(v, MAX_INPUT_TAG_VALUE)) for k, v in input_tags.items()])
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=[entry])
                break
            except Exception as exc:  # noqa: BLE001
                # two runs logging the same new dataset at once: the loser's insert violates the store's unique
                # key; on the next try it finds the winner's row and links to it
                if attempt == 2 or not is_insert_race(exc):
                    raise
        key = f"dataset.{role}." + re.sub(r"[^\w. /:-]", "_", name)  # tag keys allow only these characters
        self.set_tags({f"{key}.content_hash": content_hash})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_dict(self, d: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, json.loads(json.dumps(d, default=str)), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image, key: str, step: int) -> None:
        """An image in MLflow's per-step image view (compared across steps and runs in the UI)."""
        with quiet_mlflow():
            self.client.log_image(self.run_id, image, key=key, step=int(step))

    def log_figure(self, fig, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def log_model(self, model, metadata: dict, name: str = "model", step: int = 0,
                  description: str | None = None) -> str:
        """Log the network as a models-from-code pyfunc (pyfunc_model.py + weights.pt + metadata.json) named ``name``;
        its models:/ URI, also recorded in the run's ``model.uri`` tag. The run's metrics at ``step`` become the
        model's metrics (MLflow links them): log it at the step of the epoch whose weights it holds.

        ``metadata`` needs at least preset, pixel_size_A and normalization; threshold defaults to
        ``model_format.THRESHOLD`` and package versions are added. The weights are checked against build_model(preset) here, not at first load.
        """
        import torch

        missing = [k for k in REQUIRED_METADATA if k not in metadata]
        if missing:
            raise ValueError(f"log_model: metadata lacks {', '.join(missing)} (required: {REQUIRED_METADATA})")
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError("log_model must be called in the thread that entered the TrackedRun, with no other "
                               "run started inside it: MLflow attaches models to the thread's active run")
        packages = package_versions()
        versions = {**packages, **git_tags()}
        meta = {"threshold": THRESHOLD, **metadata,
                "versions": {**versions, **metadata.get("versions", {})}}
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        build_model(meta["preset"]).load_state_dict(state)  # fails now, with torch's key list, if they differ
        with tempfile.TemporaryDirectory() as tmp:
            weights, meta_file = Path(tmp) / WEIGHTS, Path(tmp) / METADATA
            torch.save(state, weights)
            meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            # explicit requirements: inferring them would load the model in a subprocess (slow); mlplatform itself
            # is not on PyPI and must be installed from this repository (git.commit in the metadata)
            reqs = [f"mlflow=={packages['mlflow']}", f"torch=={packages['torch'].split('+')[0]}",
                    f"monai=={packages['monai']}", f"numpy=={packages['numpy']}", "scipy"]
            with quiet_mlflow():
                info = mlflow.pyfunc.log_model(name=name, python_model=str(MODEL_CODE),
                                               artifacts={"weights": str(weights), "metadata": str(meta_file)},
                                               pip_requirements=reqs, step=int(step))
        if description:  # shown on the model's page
            self.client.set_logged_model_tags(info.model_id, {NOTE_TAG: description})
        self.set_tags({MODEL_URI_TAG: info.model_uri})
        return info.model_uri


__all__ = ["TrackedRun", "Interrupted", "Superseded", "RunLock", "RunBusy", "checkpoint_folder", "uploads_checkpoints",
           "close_run", "resolve_tracking_uri",
           "get_or_create_experiment", "find_runs", "load_model"]

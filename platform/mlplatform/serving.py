"""Loading a logged model back, without unpickling code: (network, metadata) from a run id, a URI or a folder.

A logged model (see ``model_format``) holds ``weights.pt`` (a plain state_dict, read with
``torch.load(weights_only=True)``) and ``metadata.json``. Loading rebuilds the network from
``models.build_model(preset)`` and fills in the tensors, so nothing pickled is ever executed. The MLflow pyfunc
flavour (``pyfunc_model.py``) loads the same files with :func:`build_from_files`.

Models logged before that split carry a copy of the old serving.py as their code, which imports
``mlplatform.models.build_model``, ``mlplatform.predict.predict_array`` and
``mlplatform.tracking.resolve_tracking_uri``: those names stay where they are.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import torch

from mlplatform.model_format import METADATA, MODEL_URI_TAG, REQUIRED_METADATA, RUN_ID, THRESHOLD, WEIGHTS
from mlplatform.models import build_model
from mlplatform.store import URI_SCHEME, process_tracking_uri, quiet_mlflow, resolve_tracking_uri

ACCEPTED_FORMS = ("accepted: a run id (32 hex characters: the model that run logged), an MLflow model URI "
                  "(runs:/<run_id>/<name>, models:/<model_id>, models:/<name>/<version>, file:///...), "
                  "or a local folder of a logged model (holding MLmodel and artifacts/, or weights.pt + metadata.json)")


class ModelRefError(ValueError):
    """A model reference that does not resolve to a logged model; the message says which forms are accepted."""


def build_from_files(weights_path: str | Path, metadata_path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network named in the metadata and load the weights (tensors only): (model on CPU in eval, meta)."""
    meta = json.loads(Path(metadata_path).read_text())
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelRefError(f"{metadata_path}: metadata lacks {', '.join(missing)}")
    meta.setdefault("threshold", THRESHOLD)
    model = build_model(meta["preset"])
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval(), meta


def _model_files(folder: Path) -> Path | None:
    for cand in (folder / "artifacts", folder):  # a logged model folder, or a bare weights + metadata folder
        if (cand / WEIGHTS).is_file() and (cand / METADATA).is_file():
            return cand
    return None


def _model_of_run(run_id: str, tracking_uri: str) -> str:
    """The URI of the model a run logged: its ``model.uri`` tag; ``runs:/<id>/model`` for runs that have none."""
    from mlflow import MlflowClient

    try:
        tag = MlflowClient(tracking_uri).get_run(run_id).data.tags.get(MODEL_URI_TAG)
    except Exception as exc:  # noqa: BLE001  MlflowException (no such run), a refused connection...
        raise ModelRefError(f"model {run_id!r}: run {run_id} could not be read from {tracking_uri}: "
                            f"{type(exc).__name__}: {exc}; {ACCEPTED_FORMS}") from None
    return tag or f"runs:/{run_id}/model"


def load_model(ref: str | Path, tracking_uri: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model, metadata) from a run id, an MLflow model URI or a local logged-model folder; model on CPU, in eval."""
    ref = str(ref)
    local = Path(ref).expanduser()
    if local.exists():
        files = _model_files(local) if local.is_dir() else None
        if files is None:
            raise ModelRefError(f"model {ref!r}: neither it nor its artifacts/ holds {WEIGHTS} and {METADATA}; "
                                f"{ACCEPTED_FORMS}")
        return build_from_files(files / WEIGHTS, files / METADATA)
    turi = resolve_tracking_uri(tracking_uri)
    if RUN_ID.fullmatch(ref):
        uri = _model_of_run(ref, turi)
    elif URI_SCHEME.match(ref):
        uri = ref
    else:
        raise ModelRefError(f"model {ref!r}: no such file or folder, not a run id and not a URI; {ACCEPTED_FORMS}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_mlflow(), process_tracking_uri(turi):
                folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=turi))
        except Exception as exc:  # MlflowException, OSError...: the message names the store and the forms
            raise ModelRefError(f"model {ref!r} ({uri}) could not be fetched from {turi}: "
                                f"{type(exc).__name__}: {exc}; {ACCEPTED_FORMS}") from None
        files = _model_files(folder)
        if files is None:
            raise ModelRefError(f"model {ref!r} ({uri}) holds no {WEIGHTS} + {METADATA}: not a model logged by "
                                f"mlplatform; {ACCEPTED_FORMS}")
        return build_from_files(files / WEIGHTS, files / METADATA)


__all__ = ["ModelRefError", "ACCEPTED_FORMS", "build_from_files", "load_model"]

"""The logged model format, and loading it back without unpickling code.

A final model is an MLflow "model from code": MLflow stores this file itself as the model's code, plus two artifacts,
``weights.pt`` (a plain state_dict, read with ``torch.load(weights_only=True)``) and ``metadata.json`` (preset, pixel
size, normalisation, threshold, provenance). Loading rebuilds the network from ``models.build_model(preset)`` and
fills in the tensors, so nothing pickled is ever executed, and the pyfunc flavour serves the very same
``predict.predict_array`` used by ``predict`` and by the training-time OOD evaluation.

MLflow executes this file as a standalone module when it loads the pyfunc: imports must be absolute (``mlplatform``
must be installed where the model is served).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch

WEIGHTS, METADATA = "weights.pt", "metadata.json"
REQUIRED_METADATA = ("preset", "pixel_size_A", "normalization")
DEFAULT_THRESHOLD = 0.5
ACCEPTED_FORMS = ("accepted: a run id (32 hex characters, meaning runs:/<id>/model), an MLflow model URI "
                  "(runs:/<run_id>/<name>, models:/<model_id>, models:/<name>/<version>, file:///...), "
                  "or a local folder of a logged model (holding MLmodel and artifacts/, or weights.pt + metadata.json)")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # two+ letters so a Windows drive letter is not a scheme


class ModelRefError(ValueError):
    """A model reference that does not resolve to a logged model; the message says which forms are accepted."""


@contextmanager
def quiet_mlflow():
    """No per-file progress bars and no "cannot infer signature" warning (our pyfunc takes any H x W, on purpose)
    in every training run's log or every prediction; errors still show."""
    old_env, logger = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"), logging.getLogger("mlflow.pyfunc")
    old_level = logger.level
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if old_env is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old_env


@contextmanager
def process_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for the duration, then put back (public API only).

    Needed because MLflow 3 resolves models:/ URIs (also behind runs:/<id>/model) with a client on the process-wide
    URI, ignoring the tracking_uri passed to download_artifacts.
    """
    was_set, old, old_env = mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri(), os.environ.get(
        "MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old if was_set else None)
        if old_env is not None:  # set_tracking_uri also writes the environment variable: restore it exactly
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def build_from_files(weights_path: str | Path, metadata_path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network named in the metadata and load the weights (tensors only): (model on CPU in eval, meta)."""
    from mlplatform.models import build_model

    meta = json.loads(Path(metadata_path).read_text())
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelRefError(f"{metadata_path}: metadata lacks {', '.join(missing)}")
    meta.setdefault("threshold", DEFAULT_THRESHOLD)
    model = build_model(meta["preset"])
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval(), meta


def _model_files(folder: Path) -> Path | None:
    for cand in (folder / "artifacts", folder):  # a logged model folder, or a bare weights + metadata folder
        if (cand / WEIGHTS).is_file() and (cand / METADATA).is_file():
            return cand
    return None


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
    if _RUN_ID.fullmatch(ref):
        uri = f"runs:/{ref}/model"
    elif _URI.match(ref):
        uri = ref
    else:
        raise ModelRefError(f"model {ref!r}: no such file or folder, not a run id and not a URI; {ACCEPTED_FORMS}")
    from mlplatform.tracking import resolve_tracking_uri

    turi = resolve_tracking_uri(tracking_uri)
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


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """pyfunc: float images [H, W] or [N, H, W] at the model's pixel size -> particle probabilities, same shape."""

    def load_context(self, context):
        self.model, self.meta = build_from_files(context.artifacts["weights"], context.artifacts["metadata"])
        if torch.cuda.is_available():
            self.model.cuda()

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        from mlplatform.predict import predict_array

        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
        x = np.asarray(x, dtype=np.float32)
        if x.ndim not in (2, 3) or x.size == 0:
            raise ValueError(f"model input must be a non-empty [H, W] or [N, H, W] array, got shape {x.shape}")
        probs = [predict_array(self.model, self.meta, img, None) for img in (x if x.ndim == 3 else x[None])]
        return np.stack(probs) if x.ndim == 3 else probs[0]


mlflow.models.set_model(SegmentationModel())

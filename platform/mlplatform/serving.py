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
import math
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch

from hrtem_core.errors import InputError
from mlplatform.model_format import METADATA, MODEL_URI_TAG, REQUIRED_METADATA, RUN_ID, THRESHOLD, WEIGHTS
from mlplatform.models import PRESETS, build_model

ACCEPTED_FORMS = ("accepted: a run id (32 hex characters: the model that run logged), an MLflow model URI "
                  "(runs:/<run_id>/<name>, models:/<model_id>, models:/<name>/<version>, file:///...), "
                  "or a local folder of a logged model (holding MLmodel and artifacts/, or weights.pt + metadata.json)")


class ModelRefError(InputError):
    """A model reference that does not resolve to a usable logged model: the message (one line) names the reference
    or the file, what is wrong, and which forms are accepted. An InputError (so a ValueError): commands exit 2."""


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (torch's and MLflow's messages run over many lines)."""
    text = " ".join(str(exc).strip().split("\n")[0].split())
    if len(text) > 160 and ". " in text:  # torch adds paragraphs of advice after the first sentence
        text = text.split(". ")[0]
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metadata(path: str | Path, where: str | None = None) -> dict:
    """A model's metadata.json, checked: a JSON object with the required keys, a known preset, a positive pixel size,
    a normalisation :func:`mlplatform.transforms.normalize` knows and a threshold in (0, 1). ``where`` names the file
    in errors (default: its path)."""
    from mlplatform.transforms import normalize

    path, where = Path(path), where or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelRefError(f"{where}: no such file; a logged model holds {WEIGHTS} and {METADATA} side by side") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelRefError(f"{where}: unreadable ({_one_line(exc)})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelRefError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); it must "
                            "be the metadata the model was logged with") from None
    if not isinstance(meta, dict):
        raise ModelRefError(f"{where}: a JSON {type(meta).__name__}, not an object; the metadata of a model is a "
                            f"mapping with {', '.join(REQUIRED_METADATA)}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelRefError(f"{where}: metadata lacks {', '.join(missing)} (required: {', '.join(REQUIRED_METADATA)})")
    if not isinstance(meta["preset"], str) or meta["preset"] not in PRESETS:
        raise ModelRefError(f"{where}: preset {meta['preset']!r} is unknown; known presets: {', '.join(PRESETS)}")
    if not (_is_number(meta["pixel_size_A"]) and meta["pixel_size_A"] > 0):
        raise ModelRefError(f"{where}: pixel_size_A {meta['pixel_size_A']!r}: must be a number of Å > 0")
    try:
        normalize(np.zeros((2, 2), np.float32), meta["normalization"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelRefError(f"{where}: normalization {meta['normalization']!r} cannot be applied ({_one_line(exc)}); "
                            "allowed: {'kind': 'per_image_zscore' | 'per_image_minmax', 'clip_sigma': ...}") from None
    meta.setdefault("threshold", THRESHOLD)
    if not (_is_number(meta["threshold"]) and 0 < meta["threshold"] < 1):
        raise ModelRefError(f"{where}: threshold {meta['threshold']!r}: must lie strictly between 0 and 1")
    return meta


def read_state(path: str | Path, where: str | None = None) -> dict[str, torch.Tensor]:
    """A plain state_dict file, tensors only (``torch.load(weights_only=True)``: nothing but tensors and containers is
    unpickled, no code runs). Missing, truncated or foreign: a one-line ModelRefError naming the file (``where``,
    default its path)."""
    path, where = Path(path), where or str(path)
    if not path.is_file():
        raise ModelRefError(f"{where}: no such file; a logged model holds {WEIGHTS} and {METADATA} side by side")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ModelRefError(f"{where}: holds Python objects other than tensors, which weights-only loading "
                                "refuses (nothing was run); a model's weights are a plain state_dict") from None
        raise ModelRefError(f"{where}: not a PyTorch weights file ({_one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001  RuntimeError (zip), EOFError, KeyError...: a damaged or foreign file
        raise ModelRefError(f"{where}: truncated, corrupt or not a PyTorch weights file ({_one_line(exc)}); "
                            "log or copy the model again") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise ModelRefError(f"{where}: holds a {type(state).__name__}, not a state_dict (parameter names -> tensors)")
    return state


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], preset: str, where: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch (keys or shapes: weights of another architecture) as one
    ModelRefError line naming the file ``where``, the preset and a few of the differences."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        def some(items: list[str]) -> str:
            return ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")

        parts = ([f"{len(missing)} missing ({some(missing)})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected ({some(unexpected)})"] if unexpected else []) + \
            ([f"{len(reshaped)} of another shape (file vs network: {some(reshaped)})"] if reshaped else [])
        raise ModelRefError(f"{where}: the weights do not fit preset {preset!r} named in {METADATA}: "
                            f"{'; '.join(parts)}; weights and metadata must come from the same logged model")
    model.load_state_dict(state)


def build_from_files(weights_path: str | Path, metadata_path: str | Path,
                     where: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network named in the metadata and load the weights (tensors only): (model on CPU in eval, meta).

    Every defect of the two files is a one-line :class:`ModelRefError` naming the file (under ``where``, e.g. the
    model's URI, instead of its folder when given)."""
    def name(path) -> str | None:
        return f"{where}/{Path(path).name}" if where else None

    meta = read_metadata(metadata_path, name(metadata_path))
    state = read_state(weights_path, name(weights_path))  # before the network is built: a bad file fails fast
    model = build_model(meta["preset"])
    load_state(model, state, meta["preset"], name(weights_path) or str(weights_path))
    return model.eval(), meta


def _model_files(folder: Path) -> Path | None:
    """The folder holding a model's files: ``artifacts/`` of a logged model folder, or the folder itself; the first
    that holds either file (the missing one is named when it is read), None when neither does."""
    for cand in (folder / "artifacts", folder):
        if (cand / WEIGHTS).exists() or (cand / METADATA).exists():
            return cand
    return None


def _check_store(ref: str, tracking_uri: str) -> None:
    """A SQLite store that does not exist holds no run and no model: say so, rather than create an empty one."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):].split("?")[0]
        if db != ":memory:" and not Path(db).exists():
            raise ModelRefError(f"model {ref!r}: the tracking store {tracking_uri} does not exist, so no run or model "
                                "is in it: give --tracking-uri of the store the model was logged to, or a model "
                                f"folder; {ACCEPTED_FORMS}")


def _model_of_run(run_id: str, tracking_uri: str) -> str:
    """The URI of the model a run logged: its ``model.uri`` tag; ``runs:/<id>/model`` for runs that have none."""
    from mlflow import MlflowClient

    try:
        tag = MlflowClient(tracking_uri).get_run(run_id).data.tags.get(MODEL_URI_TAG)
    except Exception as exc:  # noqa: BLE001  MlflowException (no such run), a refused connection...
        raise ModelRefError(f"model {run_id!r}: run {run_id} could not be read from {tracking_uri} "
                            f"({_one_line(exc)}); {ACCEPTED_FORMS}") from None
    return tag or f"runs:/{run_id}/model"


def model_uri(ref: str | Path, tracking_uri: str | None = None) -> str:
    """Where a model reference points: the model URI a run logged (run id), the URI as given, or a folder's path."""
    ref = str(ref)
    if Path(ref).expanduser().exists():
        return str(Path(ref).expanduser().resolve())
    if RUN_ID.fullmatch(ref):
        from mlplatform.store import resolve_tracking_uri

        return _model_of_run(ref, resolve_tracking_uri(tracking_uri))
    return ref


def load_model(ref: str | Path, tracking_uri: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model, metadata) from a run id, an MLflow model URI or a local logged-model folder; model on CPU, in eval.

    Whatever is wrong (no such run or model, a missing, truncated or foreign weights file, weights of another
    architecture, missing or corrupt metadata, an unknown preset) is a one-line :class:`ModelRefError` naming the
    reference or the file. A local folder is read without importing MLflow."""
    ref = str(ref)
    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelRefError(f"model {ref!r}: is a file; give the folder that holds {WEIGHTS} and {METADATA} "
                                f"(or a logged model's folder); {ACCEPTED_FORMS}")
        files = _model_files(local)
        if files is None:
            raise ModelRefError(f"model {ref!r}: neither it nor its artifacts/ holds {WEIGHTS} and {METADATA}; "
                                f"{ACCEPTED_FORMS}")
        return build_from_files(files / WEIGHTS, files / METADATA)
    import mlflow

    from mlplatform.store import URI_SCHEME, process_tracking_uri, quiet_mlflow, resolve_tracking_uri

    if not (RUN_ID.fullmatch(ref) or URI_SCHEME.match(ref)):
        raise ModelRefError(f"model {ref!r}: no such file or folder, not a run id and not a URI; {ACCEPTED_FORMS}")
    turi = resolve_tracking_uri(tracking_uri)
    if RUN_ID.fullmatch(ref) or ref.startswith(("runs:", "models:")):
        _check_store(ref, turi)
    uri = _model_of_run(ref, turi) if RUN_ID.fullmatch(ref) else ref
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_mlflow(), process_tracking_uri(turi):
                folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=turi))
        except Exception as exc:  # noqa: BLE001  MlflowException, OSError...: the message names the store and forms
            raise ModelRefError(f"model {ref!r} ({uri}) could not be fetched from {turi} ({_one_line(exc)}); "
                                f"{ACCEPTED_FORMS}") from None
        files = _model_files(folder)
        if files is None:
            raise ModelRefError(f"model {ref!r} ({uri}) holds no {WEIGHTS} + {METADATA}: not a model logged by "
                                f"mlplatform; {ACCEPTED_FORMS}")
        where = uri if files == folder else f"{uri}/{files.relative_to(folder)}"
        return build_from_files(files / WEIGHTS, files / METADATA, where=where)


__all__ = ["ModelRefError", "ACCEPTED_FORMS", "build_from_files", "load_model", "model_uri", "read_metadata", "read_state", "load_state"]

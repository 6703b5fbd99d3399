"""The MLflow "model from code" of a logged model: only MLflow runs this file; nothing in mlplatform imports it.

``TrackedRun.log_model`` passes this file as ``python_model``: MLflow stores a copy with each model and executes it as
a standalone module when the pyfunc is loaded, and ``set_model`` below tells it which object is the model. Importing
it would register that model in the importing process, which is why it lives apart from ``serving``. Imports must be
absolute (``mlplatform`` must be installed where the model is served).

The pyfunc serves the very same ``predict.predict_array`` used by ``predict`` and by the training-time evaluation.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from mlplatform.predict import predict_array
from mlplatform.serving import build_from_files


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """pyfunc: float images [H, W] or [N, H, W] at the model's pixel size -> particle probabilities, same shape."""

    def load_context(self, context):
        self.model, self.meta = build_from_files(context.artifacts["weights"], context.artifacts["metadata"])
        if torch.cuda.is_available():
            self.model.cuda()

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
        x = np.asarray(x, dtype=np.float32)
        if x.ndim not in (2, 3) or x.size == 0:
            raise ValueError(f"model input must be a non-empty [H, W] or [N, H, W] array, got shape {x.shape}")
        probs = [predict_array(self.model, self.meta, img, None) for img in (x if x.ndim == 3 else x[None])]
        return np.stack(probs) if x.ndim == 3 else probs[0]


mlflow.models.set_model(SegmentationModel())

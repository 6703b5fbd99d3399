"""What a logged model is and how it is referred to, shared by training, logging, loading and prediction (it imports
no other mlplatform module: anything may use it).

A logged model is two files, ``weights.pt`` (a plain state_dict) and ``metadata.json`` (preset, pixel size,
normalisation, threshold, provenance), next to the MLflow "model from code" file ``pyfunc_model.py``. A reference to
one may be the id of the run that logged it (meaning ``runs:/<id>/model``).
"""

import re

RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
WEIGHTS, METADATA = "weights.pt", "metadata.json"
REQUIRED_METADATA = ("preset", "pixel_size_A", "normalization")

# probability above which a pixel is particle (prob > 0.5 <=> logit > 0): it binarises the predictions, and the
# target masks (0/1, read as floats), in training, evaluation and figures alike, and it is the threshold a logged
# model carries unless its metadata says otherwise
THRESHOLD = 0.5

__all__ = ["RUN_ID", "WEIGHTS", "METADATA", "REQUIRED_METADATA", "THRESHOLD"]

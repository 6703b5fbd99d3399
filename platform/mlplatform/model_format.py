"""What a logged model is and how it is referred to, shared by training, logging, loading and prediction (it imports
no other mlplatform module: anything may use it).

A logged model is two files, ``weights.pt`` (a plain state_dict) and ``metadata.json`` (preset, pixel size,
normalisation, threshold, provenance), next to the MLflow "model from code" file ``pyfunc_model.py``. A reference to
one may be the id of the run that logged it: the model its ``model.uri`` tag names (runs logged before models had
their own names: ``runs:/<id>/model``).
"""

import re

RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
WEIGHTS, METADATA = "weights.pt", "metadata.json"
REQUIRED_METADATA = ("preset", "pixel_size_A", "normalization")

# probability above which a pixel is particle (prob > 0.5 <=> logit > 0): it binarises the predictions, and the
# target masks (0/1, read as floats), in training, evaluation and figures alike, and it is the threshold a logged
# model carries unless its metadata says otherwise
THRESHOLD = 0.5

# run tags of the lineage: a fine-tune's ``pretrain_run`` is the run its model came from (runs before this tag:
# ``parent_run``, which MLflow's UI confused with the nesting parent); its metrics are logged at steps
# ``epoch_offset`` + epoch, continuing the pretrain's count
PRETRAIN_RUN, LEGACY_PRETRAIN_RUN, EPOCH_OFFSET = "pretrain_run", "parent_run", "epoch_offset"
MODEL_URI_TAG = "model.uri"

__all__ = ["RUN_ID", "WEIGHTS", "METADATA", "REQUIRED_METADATA", "THRESHOLD", "PRETRAIN_RUN", "LEGACY_PRETRAIN_RUN",
           "EPOCH_OFFSET", "MODEL_URI_TAG"]

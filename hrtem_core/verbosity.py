"""How much the libraries say: by default only what matters to the user (warnings and errors of our own, progress),
with ``--verbose`` everything (MLflow's INFO lines and system-metrics messages, Lightning's tips and "GPU available"
lines, deprecation warnings).

The choice travels in the environment (``HRTEM_VERBOSE``), so the worker processes a command starts (local spawned
workers, Dask tasks' children) say as much as the command; :func:`apply` is called where the libraries are loaded
(training), after their imports, since MLflow and Lightning set up their own loggers when imported.
"""

from __future__ import annotations

import logging
import os
import warnings

ENV = "HRTEM_VERBOSE"
# the loggers that speak at INFO during a run: MLflow (store creation, system metrics, run links) and Lightning
# (devices, tips, "`Trainer.fit` stopped")
CHATTY = ("mlflow", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "alembic")


def set_verbose(verbose: bool) -> None:
    """The command's choice, for this process and every process it starts."""
    os.environ[ENV] = "1" if verbose else "0"
    apply()


def verbose() -> bool:
    """Verbose unless a command chose otherwise: library code used from Python keeps the libraries' defaults."""
    return os.environ.get(ENV, "1") != "0"


def apply() -> None:
    """Quiet the libraries' INFO lines and deprecation warnings unless verbose (idempotent; call after importing
    MLflow or Lightning)."""
    if verbose():
        return
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    try:  # Lightning's "consider more workers/batches" advice: useful to tune, noise in every run of a sweep
        from lightning.fabric.utilities.warnings import PossibleUserWarning
    except ImportError:
        return
    warnings.filterwarnings("ignore", category=PossibleUserWarning)

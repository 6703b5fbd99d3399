"""Which code made a run or a model: the platform's version, the git state of its checkout, the libraries' versions.

The version is defined here, not in the package's ``__init__`` (which re-exports it), so that the modules recording
it need not import the package itself.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

__version__ = "0.1.0"


@lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """git.commit / git.dirty of the checkout holding mlplatform (absent outside a git checkout)."""
    where = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        # tracked changes only: scratch files in the tree do not change what the platform computes
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def package_versions() -> dict[str, str]:
    """Versions of the platform and of the libraries a logged model is served with."""
    import mlflow
    import monai
    import numpy
    import torch

    return {"mlplatform": __version__, "torch": torch.__version__, "mlflow": mlflow.__version__,
            "monai": monai.__version__, "numpy": numpy.__version__}


__all__ = ["__version__", "git_tags", "package_versions"]

"""Training platform: curated shard subsets -> Lightning models -> OOD callbacks -> MLflow tracking.

Its source root is ``platform/`` (never a package itself: ``platform`` is a standard-library module).
"""

from .provenance import __version__  # defined there, so that the modules recording it need not import the package

__all__ = ["__version__"]

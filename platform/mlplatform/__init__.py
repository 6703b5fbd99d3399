"""Training platform: curated shard subsets -> Lightning models -> OOD callbacks -> MLflow tracking.

Its source root is ``platform/`` (never a package itself: ``platform`` is a standard-library module).
"""

__version__ = "0.1.0"

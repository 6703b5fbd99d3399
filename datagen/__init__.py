"""Synthetic HRTEM data: recipes -> czone structures -> multislice exit waves -> images + masks -> WebDataset shards."""

__version__ = "0.1.0"

"""The contracts every layer shares: the dataset format, configuration files and overrides, errors, CLI types.

``datagen`` (writes datasets) and ``mlplatform`` (reads them, trains, tracks) both depend on this package and never
on each other; ``experiments`` composes both. This package imports nothing from them (tests/test_architecture.py
checks it). The contracts themselves are written down in docs/architecture.md.
"""

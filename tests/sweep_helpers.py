"""Helpers of the sweep and study tests: definition files and run look-ups (the data are conftest's ``workspace``)."""

import yaml
from mlflow import MlflowClient


def write_spec(root, name, spec):
    path = root / name
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_spec(name, seeds=(0, 1, 2), **extra):
    """Two subsets (all, near-focus) x seeds, fine-tuned on PLACEHOLDER data (tests set the target set)."""
    return {"kind": "sweep", "name": name, "base": "base.yaml",
            "subsets": [{"name": "all", "set": {}},
                        {"name": "near-focus", "set": {"data.train.0.filter": "abs(imaging.defocus_A) <= 300"}}],
            "seeds": list(seeds), "finetune": {"set": {"data.train": [{"path": "PLACEHOLDER"}]}}, **extra}


def tracked_runs(store, experiment="exp-test", filter_string=""):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string) if exp else []

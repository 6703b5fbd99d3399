"""Everything a config implies is checked before the first run exists: a bad value is a one-line error naming the key,
where its value came from (the file or --set), the value and what is allowed; the command exits 2 without a
traceback, and leaves no run in the tracking store (and no claim or trial for sweeps and studies)."""

import sqlite3

import pytest
import torch
import yaml

from sweep_helpers import write_spec

def _cli(cli, tmp_path, command, config, *args):
    """``python -m experiments <command>`` (its ``main`` in a process of its own: conftest's ``cli``) on a store and a
    claims/trials storage in ``tmp_path``."""
    argv = ["experiments", command, "--config", str(config), "--quiet",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args]
    if command == "sweep":
        argv += ["--storage", f"sqlite:///{tmp_path / 'claims.db'}"]
    elif command == "study":
        argv += ["--storage", f"journal:{tmp_path / 'journal.log'}"]
    return cli.run(argv, tmp_path, timeout_s=600)


def _tables(db) -> dict[str, int]:
    """Rows per table of a SQLite file (none if it does not exist)."""
    if not db.exists():
        return {}
    with sqlite3.connect(db) as con:
        names = [r[0] for r in con.execute("select name from sqlite_master where type = 'table'")]
        return {n: con.execute(f'select count(*) from "{n}"').fetchone()[0] for n in names}


def _refused(res, tmp_path, *words):
    """Exit 2, one line `error: ...` holding ``words``, no traceback, and nothing made: no run, claim or trial."""
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _tables(tmp_path / "mlflow.db").get("runs", 0) == 0
    claims = _tables(tmp_path / "claims.db")
    assert not any(claims.get(t) for t in ("sweeps", "units")), claims
    journal = tmp_path / "journal.log"
    assert not journal.exists() or journal.stat().st_size == 0
    return errors[0]


def _config(workspace, tmp_path, name="train.yaml", text=None, **changes):
    """The workspace's base config written to ``tmp_path`` (with top-level ``changes``), or ``text`` as it is."""
    path = tmp_path / name
    if text is None:
        data = yaml.safe_load((workspace / "base.yaml").read_text())
        data.update(changes)
        text = yaml.safe_dump(data)
    path.write_text(text)
    return path


# -- numbers: finite, and never booleans; booleans only true/false --------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ("optim.lr=.inf", ["--set optim.lr: .inf:", "finite number"]),
    ("data.train.0.weight=.nan", ["--set data.train.0.weight: .nan:", "finite number"]),
])
def test_non_finite_numbers_are_refused(cli, workspace, tmp_path, override, words):
    res = _cli(cli, tmp_path, "train", _config(workspace, tmp_path), "--set", override)
    _refused(res, tmp_path, *words)


def test_a_non_finite_number_in_the_file_names_the_file(cli, workspace, tmp_path):
    path = _config(workspace, tmp_path, optim={"lr": float("inf")})
    _refused(_cli(cli, tmp_path, "train", path), tmp_path, f"config {path}: optim.lr: .inf:", "finite number")


@pytest.mark.parametrize("override, words", [
    ("epochs=true", ["--set epochs: true:", "expected a whole number, not true/false"]),
    ("optim.lr=false", ["--set optim.lr: false:", "expected a number, not true/false"]),
    ("data.augmentation.dihedral=1", ["--set data.augmentation.dihedral: 1:", "expected true or false"]),
    ("trainer.devices=true", ["--set trainer.devices: true:", "allowed"]),
])
def test_booleans_and_numbers_are_kept_apart(cli, workspace, tmp_path, override, words):
    res = _cli(cli, tmp_path, "train", _config(workspace, tmp_path), "--set", override)
    _refused(res, tmp_path, *words)


# -- YAML: a key given twice ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("seed: 0\nepochs: 1\nepochs: 3\n", ["'epochs' is given twice", "line 3", "first on line 2"]),
    ("data:\n  crop_px: 32\n  batch_size: 4\n  crop_px: 48\n", ["'data.crop_px' is given twice", "line 4",
                                                                "first on line 2"]),
])
def test_a_yaml_key_given_twice_is_refused(cli, workspace, tmp_path, text, words):
    base = yaml.safe_load((workspace / "base.yaml").read_text())
    rest = {k: v for k, v in base.items() if k not in ("seed", "epochs", "data")}
    data = {k: v for k, v in base["data"].items() if k not in ("crop_px", "batch_size")}
    text = text + yaml.safe_dump(rest) + ("" if text.startswith("data:") else "data:\n") + \
        "".join(f"  {line}\n" for line in yaml.safe_dump(data).splitlines())
    path = _config(workspace, tmp_path, text=text)
    _refused(_cli(cli, tmp_path, "train", path), tmp_path, f"--config {path}", *words)


def test_a_key_given_twice_in_a_sweep_definition_is_refused(cli, workspace, tmp_path):
    path = tmp_path / "dup-sweep.yaml"
    path.write_text(f"kind: sweep\nname: dup\nbase: {workspace / 'base.yaml'}\nseeds: [0]\nsubsets:\n"
                    "  - name: all\n    set: {data.crop_px: 32, data.crop_px: 48}\n")
    _refused(_cli(cli, tmp_path, "sweep", path), tmp_path, f"sweep {path}",
             "'subsets.0.set.data.crop_px' is given twice", "line 7")


# -- data: a crop larger than the images ----------------------------------------------------------------------------

def test_a_crop_larger_than_the_images_is_refused(cli, workspace, tmp_path):
    res = _cli(cli, tmp_path, "train", _config(workspace, tmp_path), "--set", "data.crop_px=96")
    _refused(res, tmp_path, "--set data.crop_px: 96:", "larger than the training images (64 x 64 px",
             "data.crop_px <= 64")


# -- the trainer: values Lightning accepts, and hardware this machine has --------------------------------------------

_NO_GPU = not torch.cuda.is_available() and not torch.backends.mps.is_available()


@pytest.mark.parametrize("override, words", [
    ("trainer.accelerator=gpux", ["--set trainer.accelerator: 'gpux':", "'cpu'", "'gpu'"]),
    ("trainer.precision=17", ["--set trainer.precision: 17:", "32-true", "bf16-mixed"]),
    ("trainer.devices=0", ["--set trainer.devices: 0:", "allowed"]),
    pytest.param("trainer.accelerator=gpu", ["--set trainer.accelerator: 'gpu':", "not available on this machine",
                                             "cpu"],
                 marks=pytest.mark.skipif(not _NO_GPU, reason="this machine has a GPU")),
])
def test_trainer_settings_are_checked_before_the_run(cli, workspace, tmp_path, override, words):
    res = _cli(cli, tmp_path, "train", _config(workspace, tmp_path), "--set", override)
    _refused(res, tmp_path, *words)


@pytest.mark.skipif(not _NO_GPU, reason="this machine has a GPU")
def test_a_sweep_asking_for_a_missing_accelerator_is_refused_before_it_exists(cli, workspace, tmp_path):
    spec = {"kind": "sweep", "name": "gpu", "base": str(workspace / "base.yaml"), "seeds": [0],
            "set": {"trainer.accelerator": "gpu"}, "subsets": [{"name": "all"}]}
    path = write_spec(tmp_path, "gpu.yaml", spec)
    _refused(_cli(cli, tmp_path, "sweep", path), tmp_path, f"sweep {path}, set: trainer.accelerator", "'gpu'",
             "not available on this machine")


# -- studies: an objective the runs do not log ---------------------------------------------------------------------

def test_a_study_whose_objective_is_not_logged_is_refused_at_start(cli, workspace, tmp_path):
    spec = {"kind": "study", "name": "nosuch", "base": str(workspace / "base.yaml"), "n_trials": 2,
            "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "objective": {"metric": "ood/nosuch/dice"}}
    path = write_spec(tmp_path, "study.yaml", spec)
    line = _refused(_cli(cli, tmp_path, "study", path), tmp_path, f"study {path}: objective.metric: 'ood/nosuch/dice':",
                    "allowed:", "ood/bench/dice", "ood/mean/dice", "val/dice")
    assert "ood/nosuch" not in line.split("allowed:")[1]


# -- sweeps: a subset whose filter selects nothing, or too little to split -----------------------------------------

@pytest.mark.parametrize("subset_filter, words", [
    ("structure.radius_A <= 1", ["selected none"]),
    ("structure.structure_index == 0", ["cannot split", "1 structure(s)"]),
])
def test_a_sweep_subset_that_selects_too_little_is_refused_before_it_exists(cli, workspace, tmp_path, subset_filter,
                                                                             words):
    spec = {"kind": "sweep", "name": "empty", "base": str(workspace / "base.yaml"), "seeds": [0, 1],
            "subsets": [{"name": "all", "set": {}},
                        {"name": "tiny-subset", "set": {"data.train.0.filter": subset_filter}}]}
    path = write_spec(tmp_path, "sweep.yaml", spec)
    _refused(_cli(cli, tmp_path, "sweep", path), tmp_path, f"sweep {path}, subset tiny-subset: data.train.0.filter:",
             repr(subset_filter), *words)


def test_a_sweep_whose_fine_tune_data_select_nothing_is_refused_before_it_exists(cli, workspace, tmp_path):
    spec = {"kind": "sweep", "name": "ft", "base": str(workspace / "base.yaml"), "seeds": [0],
            "subsets": [{"name": "all"}],
            "finetune": {"set": {"data.train": [{"path": str(workspace / "target"),
                                                 "filter": "imaging.dose_e_per_A2 > 1e6"}]}}}
    path = write_spec(tmp_path, "ft.yaml", spec)
    _refused(_cli(cli, tmp_path, "sweep", path), tmp_path, f"sweep {path}, finetune: data.train",
             "subset all, fine-tune", "selected none")

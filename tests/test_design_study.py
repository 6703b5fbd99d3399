"""Design studies: Optuna over the recipe of the training data, generated and scored in the loop, exactly once."""

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from datagen.pipeline import PROGRESS_DIR
from experiments import claims
from experiments.datasets import ensure_datasets
from experiments.design import recipe_params, trial_experiment
from experiments.specs import load_experiment
from experiments.storage import study_storage
from experiments.study import claims_url, trial_queue
from hrtem_core.errors import ConfigError
from sweep_helpers import assert_one_run_per_trial, tracked_runs, wait_while_running

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "design-smoke.yaml"


def _load_with(tmp_path, change) -> None:
    spec = yaml.safe_load(SMOKE.read_text())
    change(spec)
    spec["base"] = str(SMOKE.parent / spec["base"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    load_experiment(path, "study")


@pytest.mark.parametrize("key, param, message", [
    # ranges that can cross: named by the two ends that make the recipe invalid
    ("datasets.pool.imaging.defocus_A.low", {"type": "float", "low": -600, "high": 300},
     "not valid where datasets.pool.imaging.defocus_A.low=300.0, datasets.pool.imaging.defocus_A.high=100.0"),
    # particles that can outgrow the cell
    ("datasets.pool.structure.particle.radius_A.high", {"type": "float", "low": 8, "high": 30},
     "radius_A.high=30.0 (with the other parameters at an end of their range)"),
    ("datasets.pool.n", {"type": "int", "low": 8, "high": 32}, "not its n: every trial generates it with n=8"),
    ("datasets.pool.imaging.focal_spread_A", {"type": "template", "template": "{x}", "params": {"x": {
        "type": "float", "low": 0, "high": 1}}}, "type template fills text"),
    ("datasets.poool.imaging.focal_spread_A", {"type": "float", "low": 0, "high": 30},
     "dataset 'poool' is not declared in datasets (pool, bench, target)"),
    ("datasets.target.imaging.focal_spread_A", {"type": "float", "low": 0, "high": 30},
     "designs dataset 'target', but the trials do not train on it"),
])
def test_the_search_space_is_checked_against_the_recipe_schema_at_load(tmp_path, key, param, message):
    with pytest.raises(ConfigError, match="search_space") as err:
        _load_with(tmp_path, lambda s: s["search_space"].__setitem__(key, param))
    assert message in str(err.value)


def test_the_declared_test_must_be_able_to_reach_alpha_on_fresh_data(tmp_path):
    with pytest.raises(ConfigError, match=r"wilcoxon test on 6 seeds .* Holm over the 2 benchmarks makes that 0\.0625"):
        _load_with(tmp_path, lambda s: s["confirm"].__setitem__("test", "wilcoxon"))
    with pytest.raises(ConfigError, match="data_seed 21 is the seed dataset 'pool' was designed on"):
        _load_with(tmp_path, lambda s: s["confirm"].__setitem__("data_seed", 21))
    with pytest.raises(ConfigError, match="at least 6 items"):
        _load_with(tmp_path, lambda s: s["confirm"].__setitem__("seeds", [0, 1, 2, 3, 4]))


def test_a_trial_trains_on_its_own_recipe_in_a_folder_named_by_its_identity():
    exp = load_experiment(SMOKE, "study")
    keys = recipe_params(exp.spec)["pool"]
    values = {skey: (1 if "n_phonons" in skey else exp.spec.search_space[skey].low) for skey in keys.values()}
    t1, train, recipes = trial_experiment(exp, {**values, "optim.lr": 0.002})
    assert train == {"optim.lr": 0.002} and recipes["pool"].imaging.defocus_A.low == -600
    folder = t1.spec.dataset_path("pool")
    assert folder.parent == Path("data/design-smoke") and folder.name.startswith("pool-")
    assert t1.config(train).data.train[0].path == str(folder) and exp.spec.dataset_path("pool").name == "pool"
    same, _, _ = trial_experiment(exp, {**values, "optim.lr": 0.009})  # the same recipe: the same data
    other, _, _ = trial_experiment(exp, {**values, "datasets.pool.simulation.n_phonons": 2, "optim.lr": 0.002})
    assert same.spec.dataset_path("pool") == folder != other.spec.dataset_path("pool")


@pytest.mark.slow
def test_design_smoke_killed_while_generating_and_while_training_records_each_trial_once(tmp_path):
    """experiments/configs/design-smoke.yaml as shipped: SIGKILLed while a trial's data are half written and again
    while a trial trains, then run to the end. Each trial slot records one trial, the killed trial is re-run with its
    own values and its data resume with the content hash of an uninterrupted generation, the best recipe file
    regenerates the best trial's data, and the declared test ran once per unit."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = tmp_path / "journal.log"
    # one epoch per trial and per confirmation run: the file as shipped otherwise
    cmd = [sys.executable, "-m", "experiments", "study", "--config", str(SMOKE), "--workers", "2", "--quiet",
           "--tracking-uri", store, "--storage", str(journal), "--set", "epochs=1"]
    data = tmp_path / "data" / "design-smoke"
    marker = tmp_path / "hold"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exp = load_experiment(SMOKE, "study", ["epochs=1"])
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the study's benchmarks first, as the command makes them: the hold below lands in a trial
    try:
        ensure_datasets(exp, ["bench", "target"], claims_url(str(journal)), workers=2, log=lambda line: None)
    finally:
        os.chdir(cwd)

    def start(hold=None):
        return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**env, **({"HRTEM_FAULT_HOLD": hold} if hold else {})}, start_new_session=True)

    def kill(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # 1. a trial's generation holds with a shard written but not recorded, and is killed there
    proc = start(f"unrecorded:{marker}")
    assert wait_while_running(proc, marker.exists), "no trial began to write its data"
    kill(proc)
    # the held folder: a shard in place whose progress record is not written (the other worker's, if it was making
    # data too, has only recorded shards)
    half = [p for p in data.glob("pool-*") if not (p / "manifest.json").exists()
            and any(not (p / PROGRESS_DIR / f"{tar.name}.json").exists() for tar in p.glob("shard-*.tar"))]
    assert len(half) == 1
    # 2. killed while a trial trains
    proc = start()
    assert wait_while_running(proc, lambda: tracked_runs(store, "design-smoke", "attributes.status = 'RUNNING'"))
    kill(proc)
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    study = optuna.load_study(study_name="study:design-smoke", storage=study_storage(str(journal)))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["slot"] for t in complete) == [0, 1, 2, 3]  # each slot: one counted trial
    assert all(t.state == optuna.trial.TrialState.FAIL and "worker died" in t.user_attrs["fail_reason"]
               for t in trials if t not in complete)
    engine, queue = trial_queue(str(journal), "design-smoke")
    rows = claims.unit_rows(engine, queue)
    assert {(r["cell"], r["state"]) for r in rows} == {(i, "done") for i in range(4)}
    runs = tracked_runs(store, "design-smoke", "tags.kind = 'trial'")
    assert_one_run_per_trial(study, runs)  # killed trials' runs ended KILLED, none RUNNING
    finished = {r.info.run_id: r for r in runs if r.info.status == "FINISHED"}
    assert set(finished) == {t.user_attrs["mlflow_run"] for t in complete} == {r["run_id"] for r in rows}

    # the trial killed while generating was re-run in its slot with its own values, on its own (resumed) data
    killed_folder = half[0].name
    rerun = [t for t in complete if "rerun_of" in t.user_attrs
             and finished[t.user_attrs["mlflow_run"]].data.params["design.pool.folder"] == killed_folder]
    assert len(rerun) == 1
    assert rerun[0].params == study.trials[rerun[0].user_attrs["rerun_of"]].params
    from datagen.pipeline import generate
    from datagen.recipe import recipe_from_dict

    made = yaml.safe_load((half[0] / "manifest.json").read_text())
    reference = generate(recipe_from_dict(made["recipe"]), n=8, seed=21, out=tmp_path / "reference", workers=2,
                         dataset="pool", progress=False)
    assert made["content_hash"] == reference["content_hash"]

    # every trial's run names its data: input, recipe values, content hash, the recipe itself
    for t in complete:
        run = finished[t.user_attrs["mlflow_run"]]
        folder = data / run.data.params["design.pool.folder"]
        manifest = yaml.safe_load((folder / "manifest.json").read_text())
        assert run.data.params["design.pool.content_hash"] == manifest["content_hash"]
        assert float(run.data.params["trial.datasets.pool.imaging.defocus_A.low"]) == pytest.approx(
            t.params["datasets.pool.imaging.defocus_A.low"])
        assert [i.dataset.name for i in run.inputs.dataset_inputs if "pool" in i.dataset.name]

    # the best recipe file remakes the best trial's data (the command its header gives)
    best = study.best_trial
    best_file = data / "design-smoke-design" / "best-pool.yaml"
    header = best_file.read_text().splitlines()
    command = next(line for line in header if "python -m datagen generate" in line).split("python -m ", 1)[1]
    regen = subprocess.run([sys.executable, "-m", *command.replace("DIR", str(tmp_path / "regen")).split(),
                            "--quiet", "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert regen.returncode == 0, regen.stderr[-2000:]
    best_run = finished[best.user_attrs["mlflow_run"]]
    assert f"content_hash {best_run.data.params['design.pool.content_hash']}" in regen.stdout

    # the declared test ran as its sweep: 2 recipes x 6 seeds, each once, and its findings are printed
    confirm = tracked_runs(store, "design-smoke", f"tags.sweep = 'design-smoke-confirm-t{best.number}'")
    units = Counter((r.data.tags["sweep.cell"]) for r in confirm if r.info.status == "FINISHED"
                    and r.data.tags.get("kind") == "cell")
    assert len(units) == 12 and set(units.values()) == {1}
    assert "target: best - default" in done.stdout and "bench: best - default" in done.stdout

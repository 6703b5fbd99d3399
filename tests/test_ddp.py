"""Training on several devices (Lightning DDP, CPU gloo): one tracked run written by rank 0 only, evaluation scores
summed across ranks equal to one process's, and too few shards for the ranks refused before training."""

import json
import multiprocessing
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

from hrtem_core.config import set_dotted
from mlplatform.callbacks import score_loader
from mlplatform.config import ConfigError, config_from_dict
from mlplatform.data import DataError, EvalStream, SegmentationDataModule, curate
from mlplatform.metrics import SegmentationScores, confusion, scores_from_totals, totals
from mlplatform.module import SegmentationModule
from mlplatform.train import train

EPOCHS = 2
MORE_SHARDS = "output.structures_per_shard=1"  # one structure (two images) per shard


@pytest.fixture(scope="module")
def datasets(tiny_dataset):
    return {"train": tiny_dataset(16, 1, MORE_SHARDS), "bench": tiny_dataset(6, 2, MORE_SHARDS),
            "one-shard": tiny_dataset(2, 5)}


def _config(datasets, **over):
    cfg = {
        "seed": 3, "epochs": EPOCHS,
        "data": {"train": [{"path": str(datasets["train"])}], "val_fraction": 0.25, "crop_px": 48, "batch_size": 4,
                 "steps_per_epoch": 3, "eval_batch_size": 4},
        "benchmarks": [{"name": "bench", "path": str(datasets["bench"])}],
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
        "tracking": {"experiment": "ddp", "n_prediction_images": 2, "system_metrics": False},
    }
    for key, value in over.items():
        set_dotted(cfg, key, value)
    return config_from_dict(cfg)


def test_strategy_and_num_nodes_are_validated(datasets):
    with pytest.raises(ConfigError, match=r"trainer\.strategy: 'ddp_spawn': allowed: auto, ddp"):
        _config(datasets, **{"trainer.strategy": "ddp_spawn"})
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes"):
        _config(datasets, **{"trainer.num_nodes": 0})


def test_totals_of_parts_add_up_to_the_whole():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand((7, 1, 9, 9), generator=g) > 0.5, torch.rand((7, 1, 9, 9), generator=g) > 0.6
    rows = confusion(pred, target)
    whole = SegmentationScores([rows]).compute()
    parts = scores_from_totals(totals(rows[:3]) + totals(rows[3:]))
    assert parts["dice"] == whole["dice"] and parts["iou"] == whole["iou"] and parts["n_images"] == 7
    assert parts["dice_mean_image"] == pytest.approx(whole["dice_mean_image"], abs=1e-12)


@pytest.mark.slow
def test_two_process_ddp_records_one_run_from_rank_zero(datasets, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    calls = {"on_start": 0, "commit": 0}

    def on_start(run_id):
        calls["on_start"] += 1

    def commit(run_id):
        calls["commit"] += 1
        return True

    started = time.perf_counter()
    run_id = train(_config(datasets), tracking_uri=store, progress=False, on_start=on_start, commit=commit)
    wall_s = time.perf_counter() - started
    print(f"two-process DDP train(): {wall_s:.1f} s")
    assert calls == {"on_start": 1, "commit": 1}  # the work-queue hooks ran in rank 0 only
    assert not torch.distributed.is_initialized()  # the process is left as train() found it
    client = MlflowClient(store)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("ood/bench/dice", "ood/bench/iou", "ood/mean/dice", "val/dice", "train/loss"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), (key, steps)
    assert run.data.params["trainer.strategy"] == "ddp" and run.data.params["trainer.devices"] == "2"
    models = client.search_logged_models(experiment_ids=[e.experiment_id for e in experiments])
    assert [m.source_run_id for m in models] == [run_id]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoints", "images"} <= artifacts  # prediction panels, drawn by rank 0 alone


def _score_rank(rank: int, world: int, init_file: str, weights: str, config, curated, out: str) -> None:
    """One rank of a gloo process group scoring the fixed model with the OOD callback's path (score_loader)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module = SegmentationModule(config)
        module.model.load_state_dict(torch.load(weights, weights_only=True))
        module.eval()
        datamodule = SegmentationDataModule(config, curated)
        result = {"bench": score_loader(module, datamodule.benchmark_dataloader("bench")),
                  "val": score_loader(module, datamodule.val_dataloader()),
                  "keys": [k for batch in EvalStream(curated.benchmarks["bench"], config.data) for k in batch["key"]]}
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ood_dice_of_two_ranks_equals_one_process(datasets, tmp_path):
    config = _config(datasets, **{"data.num_workers": 0})
    curated = curate(config)
    torch.manual_seed(11)
    module = SegmentationModule(config).eval()
    weights = tmp_path / "weights.pt"
    torch.save(module.model.state_dict(), weights)
    datamodule = SegmentationDataModule(config, curated)
    single = {"bench": score_loader(module, datamodule.benchmark_dataloader("bench")),
              "val": score_loader(module, datamodule.val_dataloader())}

    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_score_rank, args=(r, 2, str(tmp_path / "pg"), str(weights), config, curated,
                                                   str(outs[r]))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed or hung"
    ranks = [json.loads(o.read_text()) for o in outs]
    print(f"ood/bench/dice: 1 process {single['bench']['dice']!r}, 2 processes {ranks[0]['bench']['dice']!r}; "
          f"val/dice: 1 process {single['val']['dice']!r}, 2 processes {ranks[0]['val']['dice']!r}")
    for result in ranks:  # every rank holds the whole set's scores
        for name in ("bench", "val"):
            assert result[name]["n_images"] == single[name]["n_images"]
            for key in ("dice", "iou", "dice_mean_image"):
                assert result[name][key] == pytest.approx(single[name][key], abs=1e-6), (name, key)
    # exactly once: the ranks read disjoint shards that together hold every selected benchmark sample
    keys = [set(r["keys"]) for r in ranks]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == {r.key for r in curated.benchmarks["bench"]}


def test_too_few_shards_for_the_ranks_fails_before_training(datasets, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _config(datasets, **{"benchmarks": [{"name": "tiny", "path": str(datasets["one-shard"])}],
                                  "data.num_workers": 2})
    outcome = {}

    def attempt():
        try:
            train(config, tracking_uri=store, progress=False)
        except BaseException as exc:  # noqa: BLE001  reported to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=attempt, daemon=True)  # a hang fails the test instead of blocking it
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "train() hung instead of refusing too few shards"
    error = outcome.get("error")
    assert isinstance(error, DataError), error
    assert "benchmark tiny: 1 shard for 2 ranks x 2 loader workers" in str(error)
    assert not MlflowClient(store).search_runs([e.experiment_id for e in MlflowClient(store).search_experiments()])

"""Streams (exactly once, seeded, mixed by weight), model presets, and Dice/IoU against hand-computed values."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from mlplatform.config import config_from_dict
from mlplatform.data import EvalStream, TrainStream, curate
from mlplatform.metrics import SegmentationScores, confusion
from mlplatform.models import build_model, count_parameters, encoder_parameters

ONE_PER_SHARD = "output.structures_per_shard=1"  # 6 shards each: enough to split between loader workers


@pytest.fixture(scope="module")
def config(tiny_dataset):
    a = tiny_dataset(12, 1, ONE_PER_SHARD)
    b = tiny_dataset(12, 2, ONE_PER_SHARD, "imaging.dose_e_per_A2=100")
    return config_from_dict({
        "data": {"train": [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}],
                 "val_fraction": 0.34, "crop_px": 32, "batch_size": 4, "eval_batch_size": 5},
        "benchmarks": [{"name": "b", "path": str(b), "max_samples": 7}],
    })


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.parametrize("workers", [0, 2, 5])
def test_evaluation_sees_each_sample_exactly_once(config, workers):
    curated = curate(config)
    stream = EvalStream(curated.benchmarks["b"], config.data)
    keys = _keys(DataLoader(stream, batch_size=None, num_workers=workers))
    assert sorted(keys) == sorted(r.key for r in curated.benchmarks["b"]) and len(keys) == 7
    val = _keys(DataLoader(EvalStream(curated.val, config.data), batch_size=None, num_workers=workers))
    assert Counter(val) == Counter(r.key for r in curated.val)


def test_validation_holds_whole_structures(config):
    curated = curate(config)
    train_structures = {r.structure_id for r in curated.train}
    assert train_structures.isdisjoint({r.structure_id for r in curated.val})
    # structure 0000003 contributes both its imaging variants to one side only
    assert len(curated.val) % 2 == 0


def _batches(config, epoch, n=6, workers=0):
    curated = curate(config)
    stream = TrainStream(curated.train, curated.train_weights, config.data, seed=7, epoch=epoch)
    loader = DataLoader(stream, batch_size=config.data.batch_size, num_workers=workers)
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if i + 1 == n:
            break
    return out


def test_training_stream_is_seeded_per_epoch_and_augmented_crops(config):
    a, b, c = _batches(config, 0), _batches(config, 0), _batches(config, 1)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c))
    assert a[0]["image"].shape == (4, 1, 32, 32) and a[0]["mask"].shape == (4, 1, 32, 32)
    assert set(torch.unique(a[0]["mask"]).tolist()) <= {0.0, 1.0}
    w0, w2 = _batches(config, 0, workers=2), _batches(config, 0, workers=2)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(w0, w2))


def test_training_stream_mixes_datasets_by_weight(config):
    curated = curate(config)
    stream = TrainStream(curated.train, curated.train_weights, config.data, seed=1, epoch=0)
    # count which dataset the shards come from, through the stream's own shard sampler
    import random

    draws = [u["url"] for u, _ in zip(stream._shards(random.Random(0)), range(4000))]
    a = str(config.data.train[0].path)  # the weight-3 dataset
    from_a = sum(d.startswith(a + "/") for d in draws) / len(draws)
    assert from_a == pytest.approx(0.75, abs=0.03)


def test_presets_have_the_documented_sizes():
    compact, r18 = build_model("compact"), build_model("resnet18-unet")
    assert 90_000 < count_parameters(compact) < 110_000
    assert 13_000_000 < count_parameters(r18) < 15_000_000
    for preset, model in (("compact", compact), ("resnet18-unet", r18)):
        enc = {id(p) for p in encoder_parameters(model, preset)}
        assert 0 < len(enc) < len(list(model.parameters()))
        assert model(torch.zeros(1, 1, 50, 70)).shape == (1, 1, 50, 70)


def test_dice_and_iou_from_counts_match_hand_computed_values():
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 1, 0]]], dtype=torch.uint8)
    true = torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 1, 1, 1]]], dtype=torch.uint8)
    assert confusion(pred, true).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 2]]
    s = SegmentationScores()
    s.update(pred[:2], true[:2])
    s.update(pred[2:], true[2:])
    scores = s.compute()
    # summed: tp 2, fp 2, fn 2 -> Dice 4/8, IoU 2/6; per image: 2/3, 1 (empty vs empty), 2/5
    assert scores["dice"] == pytest.approx(0.5)
    assert scores["iou"] == pytest.approx(1 / 3)
    assert scores["dice_mean_image"] == pytest.approx((2 / 3 + 1 + 2 / 5) / 3)
    with pytest.raises(ValueError):
        SegmentationScores().compute()

"""Streams (exactly once, seeded, mixed by weight), model presets, and Dice/IoU against hand-computed values."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlplatform.config import config_from_dict
from mlplatform.data import EvalStream, TrainStream, curate
from mlplatform.metrics import SegmentationScores, confusion
from mlplatform.models import build_model, count_parameters, encoder_parameters, frozen_parameters

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


def _whole_shard_order(stream, rank=0, worker=0):
    """The keys of the webdataset pipeline the stream replaced: whole shards through tarfile, the filter, then the
    shuffle buffer, with the stream's seeds."""
    import random

    import webdataset as wds

    from mlplatform.data import stream_seed

    s = stream_seed(stream.seed, stream.epoch, rank, worker)
    rng = random.Random(s)
    wanted = {(shard, x.key) for shard, xs in stream.by_shard.items() for x in xs}
    pipeline = wds.DataPipeline(lambda: stream._shards(rng), wds.tarfile_to_samples(),
                                wds.select(lambda x: (x["__url__"], x["__key__"]) in wanted),
                                wds.shuffle(stream.buffer, initial=min(stream.buffer, 64), rng=random.Random(s + 1)))
    return pipeline


def test_training_stream_reads_the_samples_and_order_of_a_whole_shard_pipeline(config):
    from itertools import islice

    from mlplatform.data import MemberReader, _decode

    curated = curate(config)
    stream = TrainStream(curated.train, curated.train_weights, config.data, seed=7, epoch=3)
    for rank, worker in ((0, 0), (1, 2)):
        old = list(islice(_whole_shard_order(stream, rank, worker), 300))
        new = list(islice(stream.order(rank, worker), 300))
        assert [(x["__url__"], x["__key__"]) for x in old] == [(x.shard, x.key) for x in new]
    reader = MemberReader(max_open=2)  # fewer than the shards: files are closed and opened again
    for x, y in zip(old[:40], new[:40]):
        a, b = _decode(x), _decode(reader.read(y))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and b[0].flags.writeable
    assert len(reader.files) == 2
    reader.close()


def test_loaders_read_only_the_selected_members_of_a_shard_they_indexed(tiny_dataset, tmp_path):
    import os
    import shutil

    from mlplatform.curation import scan_dataset
    from mlplatform.data import DataError, read_samples

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset(12, 1, ONE_PER_SHARD), ds)
    index = scan_dataset(ds)
    shard = index.records[0].shard
    in_shard = [r for r in index.records if r.shard == shard]
    keep, drop = in_shard[0], in_shard[1]
    cfg = config_from_dict({"data": {"train": [{"path": str(ds)}]}}).data
    # overwrite the unselected sample's image member, its tar header (a reader of the whole tar stops there: bad
    # checksum) and its data, in place, keeping the file's size and mtime: the selected sample is still read fine
    st = os.stat(shard)
    _, offset, size = next(m for m in drop.members if m[0] == "image.npy")
    with open(shard, "r+b") as fh:
        fh.seek(offset - 512)
        fh.write(b"\xff" * (512 + size))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    [(meta, image, mask)] = read_samples([keep], cfg)
    assert meta["id"] == keep.meta["id"] and image.shape == mask.shape
    with pytest.raises(DataError, match="not a .npy array"):  # the overwritten one, if it were selected
        read_samples([drop], cfg)
    # the shard changes after the index was made: refused, not read at stale offsets
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"changed since the dataset was indexed.*run again"):
        read_samples([keep], cfg)
    with pytest.raises(DataError, match="changed since"):
        next(iter(TrainStream([keep], {str(ds): 1.0}, cfg, seed=0, epoch=0)))


def test_presets_have_the_documented_sizes():
    compact, r18 = build_model("compact"), build_model("resnet18-unet")
    assert 90_000 < count_parameters(compact) < 110_000
    assert 13_000_000 < count_parameters(r18) < 15_000_000
    for preset, model in (("compact", compact), ("resnet18-unet", r18)):
        enc = {id(p) for p in encoder_parameters(model, preset)}
        assert 0 < len(enc) < len(list(model.parameters()))
        # freezing the decoder leaves exactly the encoder to train
        dec = {id(p) for p in frozen_parameters(model, preset, "decoder")}
        assert dec.isdisjoint(enc) and dec | enc == {id(p) for p in model.parameters()}
        assert frozen_parameters(model, preset, "none") == []
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

"""Data: shard datasets -> curated subsets -> batches, read through webdataset.

* Curation (:mod:`mlplatform.curation`) indexes the samples' metadata, applies the filter and caps, and splits
  train/validation by structure. The result is a list of (shard, key) records per role.
* Training streams: shards are drawn with replacement, weighted by how many selected samples they hold (and by each
  train dataset's mixing weight); their samples pass a shuffle buffer. An epoch is a fixed number of batches (the
  trainer's ``limit_train_batches``); every epoch's stream is seeded by (seed, epoch, rank, worker), so a run is
  reproducible for a given number of loader workers.
* Validation and benchmark passes are finite: each shard goes to exactly one (rank, worker), and only selected keys
  pass, so every selected sample is seen exactly once whatever the number of ranks and workers. Under DDP every rank
  must hold at least one shard of every evaluation set (``check_eval_shards``, before training).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hrtem_core.dataset import ARRAY_FIELDS, check_image_and_mask, load_npy
from hrtem_core.errors import DatasetError, InputError
from hrtem_core.locations import is_url, open_read, register_webdataset_schemes

from .config import DataConfig, DatasetRef, TrainConfig
from .curation import (SampleRecord, scan_dataset, select, selection_digest, selection_profile, split_by_structure,
                       subset_name)
from .transforms import PhysicsAugmentation, build_augmentation, normalize

# the benchmark subsets must not depend on the training seed: every run is scored on the same images
BENCHMARK_SEED = 0

register_webdataset_schemes()  # shards on object storage (s3://...) are read through fsspec


class DataError(InputError):
    """Data that cannot be used as configured; the message names the dataset and the problem."""

    def __init__(self, message: str = ""):
        super().__init__(_worker_message(message))


def _worker_message(message):
    """The message a DataLoader worker raised. torch re-raises a worker's exception in the main process as
    ``type(exc)(text)``, ``text`` being "Caught DataError in DataLoader worker process N.\nOriginal Traceback (most
    recent call last): ...\nmlplatform.data.DataError: <message>": bad data is bad input, reported in one line
    like any other, not a traceback."""
    if not (isinstance(message, str) and message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    marker = f"{__name__}.DataError: "
    at = message.rfind(marker)
    return message[at + len(marker):].strip() if at >= 0 else message


def pixel_size_of(meta: dict) -> float | None:
    """Detector pixel size of a sample in Å: simulated data record it under imaging, imported data under source."""
    for section in ("imaging", "source"):
        value = (meta.get(section) or {}).get("pixel_size_A")
        if value is not None:
            return float(value)
    return None


@dataclass
class DatasetUse:
    """One dataset as read by a run: what MLflow records as an input."""

    role: str  # train | validation | benchmark
    name: str
    path: str
    content_hash: str  # of the whole dataset
    filter: str | None
    n_samples: int
    digest: str = ""  # of the selected samples and the filter (curation.selection_digest)
    profile: dict = field(default_factory=dict)  # curation.selection_profile of the selected samples
    image_shape: tuple[int, ...] | None = None

    @classmethod
    def of(cls, role: str, name: str, index, filter: str | None, records: list) -> DatasetUse:
        shape = next((tuple(r.meta["imaging"]["shape"]) for r in records
                      if isinstance((r.meta.get("imaging") or {}).get("shape"), list)), None)
        return cls(role, name, str(index.path), index.content_hash, filter, len(records),
                   selection_digest(records, filter), selection_profile(records), shape)


@dataclass
class CuratedData:
    train: list[SampleRecord]
    val: list[SampleRecord]
    benchmarks: dict[str, list[SampleRecord]]
    train_weights: dict[str, float]  # dataset path -> mixing weight
    uses: list[DatasetUse] = field(default_factory=list)
    subset: str = ""
    subset_filter: str = ""
    pixel_size_A: float = 0.0
    # shards left out under data.skip_bad_shards: {role, dataset, path, shard, reason, n_samples}, train first
    skipped: list[dict] = field(default_factory=list)


def _records_for(ref: DatasetRef, seed: int, skip_bad_shards: bool = False) -> tuple[list[SampleRecord], object]:
    index = scan_dataset(ref.path, skip_bad_shards=skip_bad_shards)
    records = select(index, ref.filter, ref.max_samples, ref.max_images_per_structure, seed)
    return records, index


def _common_pixel_size(records: list[SampleRecord], what: str) -> float:
    sizes = Counter(round(p, 6) for p in (pixel_size_of(r.meta) for r in records) if p is not None)
    if not sizes:
        raise DataError(f"{what}: the samples record no pixel size (imaging.pixel_size_A or source.pixel_size_A)")
    if len(sizes) > 1:
        raise DataError(f"{what}: samples have different pixel sizes {sorted(sizes)} Å; a model is trained at one "
                        "pixel size: filter to one, or resample the data")
    return next(iter(sizes))


def curate(config: TrainConfig) -> CuratedData:
    """Resolve every configured dataset to its selected records. Fails before any training or tracking starts.
    With ``data.skip_bad_shards``, the shards that fail their checks are left out of every dataset (train and
    benchmarks) and listed in ``skipped``; otherwise the first such shard fails the curation."""
    d = config.data
    train_all, weights, uses = [], {}, []
    for ref in d.train:
        records, index = _records_for(ref, config.seed, d.skip_bad_shards)
        train_all.extend(records)
        weights[str(index.path)] = ref.weight
        uses.append((ref, index, records))
    train, val = split_by_structure(train_all, d.val_fraction, config.seed)
    if d.max_val_samples and len(val) > d.max_val_samples:
        val = sorted(random.Random(config.seed).sample(val, d.max_val_samples), key=lambda r: (r.dataset_path, r.key))
    pixel = _common_pixel_size(train_all, "train data")

    out = CuratedData(train=train, val=val, benchmarks={}, train_weights=weights, pixel_size_A=pixel,
                      subset=config.tracking.subset or subset_name(d.train),
                      subset_filter=" ; ".join(f"{ref.name or index.name}: {ref.filter or 'all'}"
                                               for ref, index, _ in uses))
    for ref, index, records in uses:
        name = ref.name or index.name
        out.skipped += [{"role": "train", **s.as_dict(), "dataset": name} for s in index.skipped]
        mine = {id(r) for r in records}
        out.uses.append(DatasetUse.of("train", name, index, ref.filter, [r for r in train if id(r) in mine]))
        out.uses.append(DatasetUse.of("validation", name, index, ref.filter, [r for r in val if id(r) in mine]))
    for ref in config.benchmarks:
        records, index = _records_for(ref, BENCHMARK_SEED, d.skip_bad_shards)
        out.skipped += [{"role": "benchmark", **s.as_dict(), "dataset": ref.name} for s in index.skipped]
        bench_pixel = _common_pixel_size(records, f"benchmark {ref.name}")
        if abs(bench_pixel - pixel) > 1e-6:
            raise DataError(f"benchmark {ref.name}: pixel size {bench_pixel} Å differs from the training data's "
                            f"{pixel} Å; resample it (predict rescales, evaluation does not)")
        out.benchmarks[ref.name] = records
        out.uses.append(DatasetUse.of("benchmark", ref.name, index, ref.filter, records))
    return out


# ------------------------------------------------------------------------------------------------ pipelines


def _decode(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of a sample as a loader read it, checked: both members present and valid ``.npy``, 2-D, of one
    shape, the mask 0/1 (uint8 or bool). DataError naming the shard and the sample key otherwise. The arrays are
    views of the members' buffers (each sample's are its own)."""
    where = f"shard {sample.get('__url__', '?')}, sample {sample.get('__key__', '?')}"
    missing = [name for name in ARRAY_FIELDS if name not in sample]
    if missing:
        raise DataError(f"{where}: has no {' and no '.join(missing)} member (a sample is <key>.image.npy, "
                        "<key>.mask.npy and <key>.json)")
    try:
        image = load_npy(sample["image.npy"], f"{where}, image.npy", view=True)
        mask = load_npy(sample["mask.npy"], f"{where}, mask.npy", view=True)
        check_image_and_mask(image, mask, where)
    except DatasetError as exc:
        raise DataError(str(exc)) from None
    return image, mask


@dataclass(frozen=True)
class _Sample:
    """What a loader needs of a selected sample to read it: where its members lie in its shard (from the scan)."""

    shard: str
    key: str
    members: tuple  # SampleRecord.members: ((field, offset, size), ...)
    stamp: tuple  # SampleRecord.shard_stamp


def _by_shard(records: list[SampleRecord]) -> dict[str, list[_Sample]]:
    """The selected samples of each shard, in file order (the order a pass over the tar meets them)."""
    out: dict[str, list[_Sample]] = {}
    for r in records:
        if not r.members:
            raise DataError(f"shard {r.shard}, sample {r.key}: the record does not say where its members lie (index "
                            "the dataset with mlplatform.curation.scan_dataset)")
        out.setdefault(r.shard, []).append(_Sample(r.shard, r.key, r.members, r.shard_stamp))
    for samples in out.values():
        samples.sort(key=lambda s: s.members[0][1])
    return out


class MemberReader:
    """Reads the array members of selected samples by their byte offsets (random access: nothing else in the shard
    is read), each into a buffer of its own, with one open file per shard (the last ``max_open``).

    A shard is used only while it is the file the sha256-checked scan indexed: its (size, mtime_ns) when opened must
    equal the record's ``shard_stamp`` (size alone on object storage, whose objects are replaced whole), checked on
    the open descriptor; otherwise DataError."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self.files: dict[str, object] = {}  # shard -> fd (local) or file object (object storage), oldest first

    def _open(self, s: _Sample):
        f = self.files.pop(s.shard, None)
        if f is None:
            try:
                if is_url(s.shard):
                    f = open_read(s.shard)
                    now = (int(f.size), -1)
                else:
                    f = os.open(s.shard, os.O_RDONLY)
                    st = os.fstat(f)
                    now = (st.st_size, st.st_mtime_ns)
            except OSError as exc:
                raise DataError(f"shard {s.shard}: cannot be opened ({type(exc).__name__}: {exc}); it was there "
                                "when the dataset was indexed") from None
            if tuple(s.stamp) != now:
                self._close(f)
                raise DataError(f"shard {s.shard}: changed since the dataset was indexed (size, mtime {tuple(s.stamp)} "
                                f"then, {now} now); its checked index no longer describes it: run again (it is "
                                "indexed and checked anew), and `python -m datagen verify` the dataset")
            while len(self.files) >= self.max_open:
                self._close(self.files.pop(next(iter(self.files))))
        self.files[s.shard] = f  # most recently used last
        return f

    @staticmethod
    def _close(f) -> None:
        if isinstance(f, int):
            os.close(f)
        else:
            f.close()

    def read(self, s: _Sample, fields=ARRAY_FIELDS) -> dict:
        """{"__key__", "__url__", field: buffer (a uint8 array)} of the sample's members among ``fields``."""
        f = self._open(s)
        out: dict = {"__key__": s.key, "__url__": s.shard}
        for name, offset, size in s.members:
            if name not in fields:
                continue
            buf = np.empty(size, np.uint8)  # not zero-filled: every byte is read into
            if isinstance(f, int):
                n = os.preadv(f, [buf], offset)
            else:
                f.seek(offset)
                n = f.readinto(buf)
            if n != size:
                raise DataError(f"shard {s.shard}, sample {s.key}, {name}: {n} of its {size} bytes could be read at "
                                f"offset {offset}: the shard is truncated; `python -m datagen verify` the dataset")
            out[name] = buf
        return out

    def close(self) -> None:
        while self.files:
            self._close(self.files.pop(next(iter(self.files))))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def stream_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class TrainStream(IterableDataset):
    """Infinite, seeded stream of augmented (image, mask) crops from the selected training samples.

    Shards are drawn with replacement, weighted by their share (below); each drawn shard's selected samples enter a
    shuffle buffer in file order, and each sample leaving the buffer is read by random access (``MemberReader``):
    the buffer holds references, not arrays, and the samples a filter drops are never read. The samples and their
    order are those of a webdataset pipeline that reads whole shards (``tarfile_to_samples``, ``select``,
    ``shuffle`` with the same seeds), which this stream replaced (tests/test_data_and_metrics.py compares them)."""

    def __init__(self, records: list[SampleRecord], dataset_weights: dict[str, float], d: DataConfig, seed: int,
                 epoch: int):
        self.by_shard = _by_shard(records)
        per_dataset = Counter(str(r.dataset_path) for r in records)
        dataset_of = {r.shard: str(r.dataset_path) for r in records}
        total_w = sum(dataset_weights[p] for p in per_dataset)
        # a shard's share: its dataset's mixing weight, spread over the dataset's selected samples
        self.shards = sorted(self.by_shard)
        self.weights = [dataset_weights[dataset_of[s]] / total_w * len(self.by_shard[s]) / per_dataset[dataset_of[s]]
                        for s in self.shards]
        self.norm = d.normalization.model_dump()
        self.aug = d.augmentation.model_dump()
        self.crop = d.crop_px
        self.buffer = d.shuffle_buffer
        self.seed, self.epoch = seed, epoch

    def _shards(self, rng: random.Random):
        while True:
            yield {"url": rng.choices(self.shards, weights=self.weights)[0]}

    def _samples(self, rng: random.Random):
        for drawn in self._shards(rng):
            yield from self.by_shard[drawn["url"]]

    def order(self, rank: int = 0, worker: int = 0):
        """The stream's samples (``_Sample``) in order, unread, for (rank, loader worker)."""
        s = stream_seed(self.seed, self.epoch, rank, worker)
        return wds.shuffle(self.buffer, initial=min(self.buffer, 64), rng=random.Random(s + 1))(
            self._samples(random.Random(s)))

    def __iter__(self):
        rank, _ = _rank_world()
        wid, _ = _worker()
        s = stream_seed(self.seed, self.epoch, rank, wid)
        augment = build_augmentation(self.aug, self.crop)
        augment.set_random_seed(s % 2**32)
        physics = PhysicsAugmentation(self.aug, s + 2)
        reader = MemberReader()
        try:
            for item in self.order(rank, wid):
                image, mask = _decode(reader.read(item))
                out = augment(image=normalize(physics.before_normalization(image), self.norm, inplace=True),
                              mask=mask)
                out["image"] = physics.after_normalization(out["image"])
                yield {"image": torch.from_numpy(np.ascontiguousarray(out["image"]))[None],
                       "mask": torch.from_numpy(np.ascontiguousarray(out["mask"]))[None].float()}
        finally:
            reader.close()


class EvalStream(IterableDataset):
    """Finite pass over selected samples: each exactly once across ranks and workers; batches of one image size."""

    def __init__(self, records: list[SampleRecord], d: DataConfig, batch_size: int | None = None):
        self.by_shard = _by_shard(records)
        self.shards = sorted(self.by_shard)
        self.norm = d.normalization.model_dump()
        self.batch_size = batch_size or d.eval_batch_size
        self.n = len(records)

    def __iter__(self):
        rank, world = _rank_world()
        wid, workers = _worker()
        mine = self.shards[rank::world][wid::workers]
        if not mine:  # more workers than shards: this one has nothing to read
            return
        batch: list = []
        reader = MemberReader()
        try:
            for shard in mine:
                for s in self.by_shard[shard]:
                    image, mask = _decode(reader.read(s))
                    item = (s.key, normalize(image, self.norm, inplace=True), mask)
                    if batch and (item[1].shape != batch[-1][1].shape or len(batch) == self.batch_size):
                        yield _collate(batch)
                        batch = []
                    batch.append(item)
        finally:
            reader.close()
        if batch:
            yield _collate(batch)


def _collate(items) -> dict:
    return {"key": [k for k, _, _ in items],
            "image": torch.from_numpy(np.stack([i for _, i, _ in items]))[:, None],
            "mask": torch.from_numpy(np.stack([m for _, _, m in items]))[:, None].float()}


def showcase_records(records: list[SampleRecord], n: int) -> list[SampleRecord]:
    """``n`` samples of a selection to show predictions on: of different structures where there are enough, spread
    over the defocus range, chosen by the records alone (the same for every run that reads the same selection)."""
    if n <= 0 or not records:
        return []
    first_per_structure = {}
    for r in sorted(records, key=lambda r: (r.dataset_path, r.key)):
        first_per_structure.setdefault(r.structure_id, r)
    pool = list(first_per_structure.values()) if len(first_per_structure) >= n else \
        sorted(records, key=lambda r: (r.dataset_path, r.key))
    pool.sort(key=lambda r: ((r.meta.get("imaging") or {}).get("defocus_A") or 0.0, r.dataset_path, r.key))
    if len(pool) <= n:
        return pool
    return [pool[round(i * (len(pool) - 1) / (n - 1))] for i in range(n)] if n > 1 else [pool[len(pool) // 2]]


def read_samples(records: list[SampleRecord], d: DataConfig) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(metadata, normalised image, mask) of each record, in the records' order, read in this process (no ranks, no
    loader workers)."""
    if not records:
        return []
    by_shard = _by_shard(records)
    found = {}
    norm = d.normalization.model_dump()
    reader = MemberReader()
    try:
        for shard in sorted(by_shard):
            for s in by_shard[shard]:
                image, mask = _decode(reader.read(s))
                found[(s.shard, s.key)] = (normalize(image, norm, inplace=True), mask)
    finally:
        reader.close()
    return [(r.meta, *found[(r.shard, r.key)]) for r in records]


def check_eval_shards(curated: CuratedData, ranks: int, workers: int) -> None:
    """Fail unless every one of ``ranks`` DDP ranks gets at least one shard of the validation set and of each
    benchmark. Shards are dealt to ranks, then to each rank's loader workers; a worker without a shard just idles,
    but a rank without one would skip the evaluation steps the others take and wait for them in a collective."""
    if ranks <= 1:
        return
    train_names = sorted({u.name for u in curated.uses if u.role == "train"})
    sets = [(f"the validation split of {', '.join(train_names)}", curated.val),
            *((f"benchmark {name}", records) for name, records in curated.benchmarks.items())]
    for what, records in sets:
        n = len({r.shard for r in records})
        if n < ranks:
            raise DataError(
                f"{what}: {n} shard{'s' * (n != 1)} for {ranks} ranks x {max(workers, 1)} loader workers; every rank "
                f"evaluates whole shards and needs at least one ({ranks * max(workers, 1)} keep every worker busy): "
                "train on fewer devices, or write the dataset with more shards (smaller output.structures_per_shard)")


class SegmentationDataModule(L.LightningDataModule):
    def __init__(self, config: TrainConfig, curated: CuratedData):
        super().__init__()
        self.config = config
        self.curated = curated
        self.d = config.data

    def _loader(self, dataset, batch_size=None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.d.num_workers,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        stream = TrainStream(self.curated.train, self.curated.train_weights, self.d, self.config.seed, epoch)
        return self._loader(stream, batch_size=self.d.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(EvalStream(self.curated.val, self.d))

    def benchmark_dataloader(self, name: str) -> DataLoader:
        return self._loader(EvalStream(self.curated.benchmarks[name], self.d))

"""Training configuration: typed, validated once at load, with ``--set dotted.key=value`` overrides.

A config is YAML. ``load_config(path, overrides)`` returns a :class:`TrainConfig`; every error names the dotted key,
where its value came from (the file or ``--set``), the value and what is allowed. Numbers are finite and never
booleans; the trainer's accelerator, devices and precision are values Lightning accepts. Inside the platform the
config is trusted; what depends on the data or the machine (filters, crop size, the accelerator being there) is
checked by ``mlplatform.train`` (``check_trainer``, ``curate_checked``) before a run exists, its errors naming keys by :meth:`TrainConfig.origin`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_serializer, model_validator

# the override grammar, YAML reading, error formatting and hashing are shared with recipes and experiments
from hrtem_core.config import (Origins, StrictModel, apply_overrides, config_hash, read_yaml_mapping, require_unique,
                               validate)
from hrtem_core.errors import ConfigError

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "flatten", "require_unique", "Origins",
           "ACCELERATORS", "PRECISIONS"]

# Lightning's names (lightning.pytorch.trainer.connectors.accelerator_connector: its registry's cpu, cuda, mps, tpu,
# plus auto and gpu) and precision values (lightning.fabric.plugins.precision.precision: _PRECISION_INPUT)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")


class _Section(StrictModel):
    """Unknown keys refused, numbers finite and not booleans, booleans only true/false (hrtem_core.config)."""


class DatasetRef(_Section):
    """A shard dataset (a folder with manifest.json) and the subset of it to use."""

    name: str | None = None
    """Name in metrics and tags (default: the dataset's manifest name)."""
    path: str
    filter: str | None = None
    """Expression over sample metadata, e.g. ``imaging.defocus_A >= -200 and structure.n_defects >= 1``."""
    max_samples: int | None = Field(default=None, ge=1)
    max_images_per_structure: int | None = Field(default=None, ge=1)
    weight: float = Field(default=1.0, gt=0)
    """Mixing weight of this dataset in the training stream (relative to the other train datasets)."""


class Augmentation(_Section):
    dihedral: bool = True
    """The 8 symmetries of the square (flips and 90 degree rotations): physics does not prefer an orientation."""
    brightness_contrast: float = Field(default=0.0, ge=0, le=1)
    """Limit of random brightness/contrast changes (0 = off), applied after normalisation."""
    gaussian_noise_std: float = Field(default=0.0, ge=0)
    """Std of additive Gaussian noise in normalised units (0 = off)."""
    gaussian_blur_sigma_px: float = Field(default=0.0, ge=0)
    """Largest sigma of a random Gaussian blur in pixels (0 = off): a defocus-like loss of resolution."""
    dose_resample: float = Field(default=0.0, ge=0, le=1)
    """Probability of redrawing an image at a lower dose (0 = off): its counts are thinned binomially by a factor
    drawn log-uniformly from [dose_min_factor, 1], which is exactly Poisson noise at that fraction of the dose (of
    the counts before the recipe's median filter; after it, approximately). Needs counts: a sample whose image is
    not whole non-negative numbers is left as it is."""
    dose_min_factor: float = Field(default=0.25, gt=0, le=1)
    """Lowest dose fraction of ``dose_resample``."""
    contrast_inversion: float = Field(default=0.0, ge=0, le=1)
    """Probability of inverting the normalised image (0 = off). Phase contrast changes sign with the defocus, but a
    strongly scattering particle's low-frequency contrast does not (it is dark at every defocus): use it for weak
    phase objects only. The demo measured it lowering OOD Dice on metal particles."""

    @model_serializer(mode="wrap")
    def _omit_unset_physics(self, handler):
        # left out while off, so configs written before these keys keep their hashes
        data = handler(self)
        if not self.dose_resample:
            data.pop("dose_resample", None)
            data.pop("dose_min_factor", None)
        if not self.contrast_inversion:
            data.pop("contrast_inversion", None)
        return data


class Normalization(_Section):
    kind: Literal["per_image_zscore", "per_image_minmax"] = "per_image_zscore"
    clip_sigma: float | None = Field(default=None, gt=0)
    """Clip normalised values to +/- this many standard deviations (zscore only)."""


class DataConfig(_Section):
    train: list[DatasetRef] = Field(min_length=1)
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Fraction of the training structures (not images) held out for validation."""
    crop_px: int = Field(default=128, ge=16)
    batch_size: int = Field(default=8, ge=1)
    steps_per_epoch: int = Field(default=50, ge=1)
    """An epoch is a fixed number of training batches drawn from the stream (nnU-Net style)."""
    eval_batch_size: int = Field(default=8, ge=1)
    num_workers: int = Field(default=0, ge=0)
    shuffle_buffer: int = Field(default=256, ge=1)
    normalization: Normalization = Normalization()
    augmentation: Augmentation = Augmentation()
    max_val_samples: int | None = Field(default=None, ge=1)
    skip_bad_shards: bool = False
    """Leave out the shards of any dataset (train or benchmark) that differ from their manifest's sha256 or cannot be
    read or decoded, recording each in the run (tag ``data.skipped_shards``, artifact ``data/skipped_shards.json``),
    instead of refusing the dataset; ``--skip-bad-shards`` on the command line. Left out of the resolved config (and
    so of its hash) while false, so the configs written before this key keep their hashes."""

    @model_serializer(mode="wrap")
    def _omit_unset_skip(self, handler):
        data = handler(self)
        if not self.skip_bad_shards:
            data.pop("skip_bad_shards", None)
        return data


class BenchmarkRef(DatasetRef):
    """An out-of-distribution benchmark; ``max_samples`` keeps the per-epoch evaluation affordable."""

    name: str  # required: it names the metrics ood/<name>/...
    max_samples: int | None = Field(default=64, ge=1)

    @field_validator("name")
    @classmethod
    def _metric_safe(cls, value: str):
        if value == "mean":
            raise ValueError("benchmark name 'mean' is reserved for the mean over benchmarks (ood/mean/dice)")
        if not value or any(c in value for c in " /\\:"):
            raise ValueError(f"benchmark name {value!r} must be non-empty without spaces, '/', '\\\\' or ':'")
        return value


class ModelConfig(_Section):
    preset: Literal["compact", "resnet18-unet"] = "compact"


class LossConfig(_Section):
    dice_weight: float = Field(default=1.0, ge=0)
    ce_weight: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _some(self):
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("loss.dice_weight and loss.ce_weight cannot both be 0")
        return self


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """SGD only."""
    scheduler: Literal["exponential", "cosine", "none"] = "exponential"
    gamma: float = Field(default=0.95, gt=0, le=1)
    """Per-epoch decay factor of the exponential schedule (the reference study's)."""


FREEZE = ("none", "encoder", "decoder")


class FinetuneConfig(_Section):
    freeze_encoder: bool = False
    """Old spelling of ``freeze: encoder``."""
    freeze: Literal[FREEZE] | None = None
    """What a fine-tune leaves untrained: ``none``, ``encoder`` (the contracting path and the bridge) or ``decoder``
    (everything else: the expanding path and the output layer). Left out of the resolved config while unset, so
    configs written before this key keep their hashes."""

    @model_validator(mode="after")
    def _one_spelling(self):
        if self.freeze_encoder and self.freeze not in (None, "encoder"):
            raise ValueError(f"finetune.freeze_encoder: true and finetune.freeze: {self.freeze} contradict each "
                             "other; use finetune.freeze alone")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = handler(self)
        if self.freeze is None:
            data.pop("freeze", None)
        return data

    @property
    def frozen(self) -> str:
        """What is frozen: none, encoder or decoder."""
        return self.freeze or ("encoder" if self.freeze_encoder else "none")


class TrainerConfig(_Section):
    accelerator: Literal[ACCELERATORS] = "auto"
    """One of Lightning's: auto, cpu, gpu, cuda, mps, tpu; it must exist on the machine that trains (checked before
    the run, ``mlplatform.train.check_trainer``)."""
    devices: int | str = "auto"
    """Devices per node: a number >= 1, -1 (all), ``auto``, or device indices as text (``"0,1"``); more than one
    process in all (devices x num_nodes) trains with DDP."""
    strategy: str = "auto"
    """``auto`` (one device, or DDP over several) or ``ddp``. The calling process is rank 0 and owns the tracked run;
    mlplatform starts the other ranks of its node (``mlplatform.train``). Lightning's ``ddp_spawn``/``ddp_fork`` would
    run rank 0 in a new process, away from the run, the sweep's claim and the study's trial: not offered."""
    num_nodes: int = Field(default=1, ge=1)
    """Nodes of a DDP run: start the same command on each node with ``NODE_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` set (or under SLURM / torchrun, one process per device)."""
    precision: str = "32-true"
    """One of Lightning's: 64-true, 32-true, 16-true, 16-mixed, bf16-true, bf16-mixed, transformer-engine(-float16), or
    the short forms 64, 32, 16, bf16 (numbers are kept as text: ``32`` is ``"32"``)."""
    deterministic: bool = True
    log_every_n_steps: int = Field(default=10, ge=1)

    @field_validator("devices", mode="before")
    @classmethod
    def _known_devices(cls, value: Any):
        allowed = "allowed: a number >= 1, -1 (every device), auto, or device indices as text like \"0,1\""
        if isinstance(value, int) and not isinstance(value, bool):
            if value >= 1 or value == -1:
                return value
            raise ValueError(allowed)
        if isinstance(value, str):
            text, parts = value.strip(), [p.strip() for p in value.split(",")]
            if text in ("auto", "-1") or (text.isdigit() and int(text) >= 1) or \
                    ("," in text and any(parts) and all(p.isdigit() for p in parts if p)):
                return value
        raise ValueError(allowed)

    @field_validator("precision", mode="before")
    @classmethod
    def _known_precision(cls, value: Any):
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in PRECISIONS:
            return str(value)
        if isinstance(value, str) and value in PRECISIONS:
            return value
        raise ValueError(f"allowed: {', '.join(PRECISIONS)}")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str):
        if value not in ("auto", "ddp"):
            raise ValueError("allowed: auto, ddp (ddp_spawn and ddp_fork would start rank 0 away from the process "
                             "that holds the tracked run)")
        return value


class TrackingConfig(_Section):
    experiment: str = "hrtem-segmentation"
    run_name: str | None = None

    @field_validator("experiment")
    @classmethod
    def _named(cls, value: str):
        if not value.strip() or value != value.strip():
            raise ValueError(f"an MLflow experiment name must be non-empty without leading or trailing spaces, "
                             f"got {value!r}")
        return value
    subset: str | None = None
    """Name of the curated training subset (default: derived from the train datasets and filters)."""
    n_prediction_images: int = Field(default=4, ge=0)
    system_metrics: bool = True


class TrainConfig(_Section):
    seed: int = Field(default=0, ge=0)
    epochs: int = Field(default=3, ge=1)
    ood_interval: int = Field(default=1, ge=1)
    """Evaluate the benchmarks every this many epochs (and always after the last)."""
    data: DataConfig
    benchmarks: list[BenchmarkRef] = Field(default_factory=list)
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    _origins: Origins | None = PrivateAttr(default=None)
    """Where each value came from (not part of the config: its hash and resolved form ignore it)."""

    @model_validator(mode="after")
    def _unique_benchmarks(self):
        require_unique([b.name for b in self.benchmarks], "benchmarks")
        return self

    def origin(self, key: str) -> str:
        """The dotted ``key`` named with where its value came from ("--set data.crop_px", "config a.yaml:
        data.crop_px"): what an error about the value prints first."""
        return self._origins.name(key) if self._origins is not None else key

    def with_origins(self, origins: Origins | None) -> "TrainConfig":
        self._origins = origins
        return self

    def resolved(self) -> dict:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return config_hash(self.resolved())


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON text (MLflow params are flat strings)."""
    out: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = json.dumps(value, sort_keys=True)
        else:
            out[name] = value
    return out


def config_from_dict(data: dict, overrides=(), source: str = "<dict>", origins: Origins | None = None
                     ) -> TrainConfig:
    """``data`` with the ``--set`` texts ``overrides`` applied, validated. ``origins``: where the values of ``data``
    came from (default: all from ``config <source>``); the overrides are added to it as ``--set``."""
    origins = (origins or Origins(f"config {source}")).add_sets(overrides)
    return validate(TrainConfig, apply_overrides(data, overrides), origins.source, origins=origins) \
        .with_origins(origins)


def load_config(path: str | Path, overrides=()) -> TrainConfig:
    data = read_yaml_mapping(path, "--config")
    # relative dataset paths are relative to the working directory, as on the command line
    return config_from_dict(data, overrides, source=str(path))

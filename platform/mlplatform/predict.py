"""Segment micrographs with a logged model: read, rescale to the model's pixel size, normalise, predict, write.

Reading is :mod:`hrtem_core.micrographs`, the same reader as ``datagen import`` (gray images only; a .npy or TIFF
stack gives one prediction per page).

Resampling. The image is resampled to the model's pixel size by Fourier (DCT) cropping or padding: the training
images were band-limited the same way (``datagen.image.fourier_resample``), so a finer micrograph keeps its lattice
fringes up to the model's Nyquist frequency and nothing above it aliases into spurious low-frequency fringes, which
linear interpolation (``scipy.ndimage.zoom(order=1)``) would do when shrinking. The DCT is the Fourier transform of
the mirrored image, so real, non-periodic micrographs do not ring at their edges. The probability map goes back to
the input grid by bilinear interpolation: it is smooth, and linear interpolation cannot leave [0, 1] as Fourier
interpolation of a sharp map would. Both use the pixel-centred convention (the two grids cover the same field).

Nothing half-done. Everything is checked before the first prediction: the output folder (``--out``: a folder, new or
existing, never a file), the model (its files, see ``serving``), every input file (read whole: readable, gray, finite,
within ``hrtem_core.micrographs.MAX_PIXELS``, also once resampled to the model's pixel size) and the output names. All
bad inputs are reported at once, and then nothing is written. The outputs are written into a staging folder
(``hrtem_core.files.staged_folder``) and appear only once all are complete: a new ``--out`` by one rename; in an
existing folder they are added (same-named outputs of an earlier prediction replaced). A failure on the way (a full
disk, Ctrl-C) leaves ``--out`` as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dctn, idctn

from hrtem_core.errors import InputError
from hrtem_core.files import atomic_writer, check_output_folder, staged_folder
from hrtem_core.micrographs import MAX_PIXELS, SUFFIXES, read_images
from mlplatform.model_format import THRESHOLD
from mlplatform.serving import load_model
from mlplatform.transforms import normalize

__all__ = ["InputError", "fourier_rescale", "model_grid", "predict_array", "predict_path", "read_images"]


def fourier_rescale(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Band-limited resampling of a [H, W] image onto ``shape`` over the same field of view (keeps the mean)."""
    if tuple(shape) == image.shape:
        return image.astype(np.float32)
    coef = dctn(image.astype(np.float64), type=2, norm="ortho")
    out = np.zeros(shape)
    h, w = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    out[:h, :w] = coef[:h, :w]
    scale = np.sqrt(shape[0] * shape[1] / image.size)  # orthonormal DCT: keeps the mean intensity
    return (idctn(out, type=2, norm="ortho") * scale).astype(np.float32)


# the smallest side, in pixels at the model's pixel size, that every preset segments (the compact U-Net's deepest
# level is 8x coarser and its instance norms need more than one element there)
MIN_SIDE_PX = 16


def model_grid(shape: tuple[int, int], pixel_size_A: float | None, model_pixel_size_A: float) -> tuple[int, int]:
    """Pixels per side of the same field of view at the model's pixel size."""
    if pixel_size_A is None:
        return tuple(shape)
    f = float(pixel_size_A) / float(model_pixel_size_A)
    return max(1, round(shape[0] * f)), max(1, round(shape[1] * f))


def predict_array(model: torch.nn.Module, meta: dict, image: np.ndarray, pixel_size_A: float | None) -> np.ndarray:
    """Particle probability (float32, the image's shape) of one [H, W] micrograph of pixel size ``pixel_size_A``.

    ``None`` means the image is already at the model's pixel size. The model runs in eval mode on its own device and
    gets its previous train/eval mode back, so a training-time callback can call this between epochs.
    """
    image = np.asarray(image, np.float32)
    grid = model_grid(image.shape, pixel_size_A, meta["pixel_size_A"])
    x = normalize(fourier_rescale(image, grid), meta["normalization"])  # statistics at the training pixel size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prob = torch.sigmoid(model(torch.from_numpy(x)[None, None].to(device)).float())
            if grid != image.shape:
                prob = F.interpolate(prob, size=image.shape, mode="bilinear", align_corners=False)
    finally:
        model.train(was_training)
    return prob[0, 0].cpu().numpy().astype(np.float32)


def list_inputs(input_path: str | Path) -> list[Path]:
    """One file, or the supported files directly in a folder (sorted); others in a folder are skipped."""
    path = Path(input_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise InputError(f"{path}: no micrographs ({', '.join(SUFFIXES)}) in this folder")
    return files


def _output_names(files: list[Path]) -> list[str]:
    """The output stem of each input file: its stem, with its suffix when two inputs share one (a.npy and a.png)."""
    stems = [f.stem for f in files]
    return [f.stem if stems.count(f.stem) == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}" for f in files]


def _report(problems: list[str], n_files: int) -> None:
    if len(problems) == 1 and n_files == 1:
        raise InputError(problems[0])
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(f"{len(problems)} of {n_files} micrograph file(s) cannot be used, nothing was written: "
                         + "; ".join(problems[:5]) + more)


def check_inputs(files: list[Path]) -> list[tuple[Path, str, tuple[int, int]]]:
    """Read every file whole (nothing is kept): (file, where, shape) of every image, else InputError listing every
    problem (unreadable, not gray, not finite, too large, two inputs writing the same outputs)."""
    problems, names, images = [], {}, []
    for file, stem in zip(files, _output_names(files)):
        try:
            for page, image in read_images(file):
                where = str(file) if page is None else f"{file} page {page}"
                name = stem if page is None else f"{stem}_p{page:03d}"
                if name in names:
                    raise InputError(f"{where}: its outputs {name}_* would overwrite those of {names[name]}; rename "
                                     "one of them")
                names[name] = where
                images.append((file, where, image.shape))
        except InputError as exc:
            problems.append(str(exc))
    _report(problems, len(files))
    return images


def check_grids(images: list[tuple[Path, str, tuple[int, int]]], pixel_size_A: float | None,
                model_pixel_size_A: float) -> None:
    """InputError unless every image, resampled to the model's pixel size, stays within MAX_PIXELS and has at least
    MIN_SIDE_PX pixels a side."""
    problems = {}
    for file, where, shape in images:
        grid = model_grid(shape, pixel_size_A, model_pixel_size_A)
        if file in problems:
            continue
        size = (f"{shape[0]} x {shape[1]} pixels" + ("" if pixel_size_A is None else f" of {pixel_size_A} Å")
                + ("" if tuple(grid) == tuple(shape) else f" become {grid[0]} x {grid[1]}")
                + f" at the model's {model_pixel_size_A} Å")
        if grid[0] * grid[1] > MAX_PIXELS:
            problems[file] = f"{where}: {size}, more than {MAX_PIXELS:,} pixels: check --pixel-size"
        elif min(grid) < MIN_SIDE_PX:
            problems[file] = (f"{where}: {size}; the model needs at least {MIN_SIDE_PX} x {MIN_SIDE_PX} pixels (its "
                              "deepest features are 8x coarser): check --pixel-size, or give a larger micrograph")
    _report(list(problems.values()), len({file for file, _, _ in images}))


def predict_path(model_ref: str, input_path: str | Path, out_dir: str | Path, pixel_size_A: float | None,
                 tracking_uri: str | None = None, threshold: float | None = None) -> list[dict]:
    """Segment every micrograph in ``input_path``; write <stem>_mask.png, <stem>_mask.npy, <stem>_prob.npy into
    ``out_dir`` (all of them, or, on any error, nothing: see the module docstring).

    Returns one record per image (per page of a multi-page TIFF); its paths are where the outputs end up.
    """
    from PIL import Image

    if pixel_size_A is not None and not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise InputError(f"pixel_size_A={pixel_size_A}: must be a positive number of Å")
    if threshold is not None and not 0 < threshold < 1:
        raise InputError(f"threshold={threshold}: must lie strictly between 0 and 1")
    out = check_output_folder(out_dir, "predict --out")
    files = list_inputs(input_path)
    images = check_inputs(files)  # every input, before the model is fetched
    model, meta = load_model(model_ref, tracking_uri)
    model_px = float(meta["pixel_size_A"])
    check_grids(images, pixel_size_A, model_px)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    thr = float(meta.get("threshold", THRESHOLD) if threshold is None else threshold)
    note = None
    if pixel_size_A is None:
        note = f"no pixel size given: assuming the model's training pixel size, {model_px} Å"
        print(f"note: {note}", file=sys.stderr)
    records = []
    with staged_folder(out) as stage:
        for file, stem in zip(files, _output_names(files)):
            for page, image in read_images(file):  # read again: memory holds one file, not all of them
                name = stem if page is None else f"{stem}_p{page:03d}"
                prob = predict_array(model, meta, image, pixel_size_A)
                mask = (prob > thr).astype(np.uint8)  # the default, model_format.THRESHOLD, is the one of training
                names = {"mask_png": f"{name}_mask.png", "mask_npy": f"{name}_mask.npy",
                         "prob_npy": f"{name}_prob.npy"}
                with atomic_writer(stage / names["mask_png"]) as fh:
                    Image.fromarray(mask * 255).save(fh, format="PNG")
                with atomic_writer(stage / names["mask_npy"]) as fh:
                    np.save(fh, mask)
                with atomic_writer(stage / names["prob_npy"]) as fh:
                    np.save(fh, prob)
                records.append({
                    "input": str(file), "page": page, "outputs": {k: str(out / v) for k, v in names.items()},
                    "shape": list(image.shape), "model_shape": list(model_grid(image.shape, pixel_size_A, model_px)),
                    "pixel_size_A": model_px if pixel_size_A is None else float(pixel_size_A),
                    "pixel_size_assumed": pixel_size_A is None, "model_pixel_size_A": model_px, "threshold": thr,
                    "particle_fraction": float(mask.mean()), "note": note,
                })
    return records

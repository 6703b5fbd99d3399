"""Segment micrographs with a logged model: read, rescale to the model's pixel size, normalise, predict, write.

Resampling. The image is resampled to the model's pixel size by Fourier (DCT) cropping or padding: the training
images were band-limited the same way (``datagen.image.fourier_resample``), so a finer micrograph keeps its lattice
fringes up to the model's Nyquist frequency and nothing above it aliases into spurious low-frequency fringes, which
linear interpolation (``scipy.ndimage.zoom(order=1)``) would do when shrinking. The DCT is the Fourier transform of
the mirrored image, so real, non-periodic micrographs do not ring at their edges. The probability map goes back to
the input grid by bilinear interpolation: it is smooth, and linear interpolation cannot leave [0, 1] as Fourier
interpolation of a sharp map would. Both use the pixel-centred convention (the two grids cover the same field).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dctn, idctn

from mlplatform.transforms import normalize

SUFFIXES = (".npy", ".tif", ".tiff", ".png")


class InputError(ValueError):
    """An input that cannot be segmented; the message names the file."""


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


def _check(image, where: str) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype.kind not in "biuf":
        raise InputError(f"{where}: data type {a.dtype} is not a real-valued image")
    if a.ndim != 2:
        raise InputError(f"{where}: expected one 2-D image [H, W], got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{where}: empty image (shape {a.shape})")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError(f"{where}: {int((~np.isfinite(a)).sum())} non-finite pixel values (NaN or inf)")
    return a


def _gray(a: np.ndarray) -> np.ndarray:
    """RGB(A) [H, W, 3|4] -> luminance (ITU-R 601, as Pillow's 'L'); anything else unchanged."""
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return a


def read_images(file: Path) -> list[tuple[int | None, np.ndarray]]:
    """[(page or None, float32 [H, W])] from one .npy, .png or (multi-page) .tif file; clear errors name the file."""
    suffix = file.suffix.lower()
    try:
        if suffix == ".npy":
            a = np.load(file, allow_pickle=False)
            if a.ndim != 2:
                raise InputError(f"{file}: .npy inputs must hold one 2-D image [H, W], got shape {a.shape} "
                                 "(save a stack as a multi-page .tif, or one .npy per image)")
            return [(None, _check(a, str(file)))]
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(file) as tif:
                pages = [_gray(p.asarray()) for p in tif.pages]
            if len(pages) == 1:
                return [(None, _check(pages[0], str(file)))]
            return [(i, _check(p, f"{file} page {i}")) for i, p in enumerate(pages)]
        if suffix == ".png":
            from PIL import Image

            with Image.open(file) as img:
                keep = img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;16")  # gray: keep 16-bit depth
                a = np.asarray(img if keep else img.convert("L"))
            return [(None, _check(a, str(file)))]
    except InputError:
        raise
    except Exception as exc:  # a truncated or mislabelled file: say which and why
        raise InputError(f"{file}: cannot be read as {suffix}: {type(exc).__name__}: {exc}") from None
    raise InputError(f"{file}: unsupported file type {suffix or '(none)'}; supported: {', '.join(SUFFIXES)}")


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


def _write(path: Path, write) -> None:
    """Atomic: a reader never sees a half-written output, and an interrupted run leaves no truncated file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict_path(model_ref: str, input_path: str | Path, out_dir: str | Path, pixel_size_A: float | None,
                 tracking_uri: str | None = None, threshold: float | None = None) -> list[dict]:
    """Segment every micrograph in ``input_path``; write <stem>_mask.png, <stem>_mask.npy, <stem>_prob.npy.

    Returns one record per image (per page of a multi-page TIFF).
    """
    from PIL import Image

    from mlplatform.serving import load_model

    if pixel_size_A is not None and not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise InputError(f"pixel_size_A={pixel_size_A}: must be a positive number of Å")
    if threshold is not None and not 0 < threshold < 1:
        raise InputError(f"threshold={threshold}: must lie strictly between 0 and 1")
    files = list_inputs(input_path)  # before loading the model: a wrong path fails fast
    model, meta = load_model(model_ref, tracking_uri)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model_px = float(meta["pixel_size_A"])
    thr = float(meta.get("threshold", 0.5) if threshold is None else threshold)
    note = None
    if pixel_size_A is None:
        note = f"no pixel size given: assuming the model's training pixel size, {model_px} Å"
        print(f"note: {note}", file=sys.stderr)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stems = [f.stem for f in files]
    records = []
    for file in files:
        # a.npy and a.png in one folder would write the same outputs: keep the suffix in the name then
        stem = file.stem if stems.count(file.stem) == 1 else f"{file.stem}_{file.suffix.lstrip('.').lower()}"
        for page, image in read_images(file):
            name = stem if page is None else f"{stem}_p{page:03d}"
            prob = predict_array(model, meta, image, pixel_size_A)
            mask = (prob > thr).astype(np.uint8)  # prob > 0.5 <=> logit > 0, as in training
            paths = {"mask_png": out / f"{name}_mask.png", "mask_npy": out / f"{name}_mask.npy",
                     "prob_npy": out / f"{name}_prob.npy"}
            _write(paths["mask_png"], lambda fh: Image.fromarray(mask * 255).save(fh, format="PNG"))
            _write(paths["mask_npy"], lambda fh: np.save(fh, mask))
            _write(paths["prob_npy"], lambda fh: np.save(fh, prob))
            records.append({
                "input": str(file), "page": page, "outputs": {k: str(v) for k, v in paths.items()},
                "shape": list(image.shape), "model_shape": list(model_grid(image.shape, pixel_size_A, model_px)),
                "pixel_size_A": model_px if pixel_size_A is None else float(pixel_size_A),
                "pixel_size_assumed": pixel_size_A is None, "model_pixel_size_A": model_px, "threshold": thr,
                "particle_fraction": float(mask.mean()), "note": note,
            })
    return records

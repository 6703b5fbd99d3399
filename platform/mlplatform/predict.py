"""Segment micrographs with a logged model: read, rescale to the model's pixel size, normalise, predict, measure,
write.

Reading is :mod:`hrtem_core.micrographs`, the same reader as ``datagen import`` (gray images only; TIFF, PNG, .npy and
the microscope formats .dm3/.dm4, .ser, .emd, .mrc; a stack gives one prediction per frame, ``<stem>_frameNNN``).
The pixel size of an image is its file's calibration; ``--pixel-size`` is needed only for files without one (and
must agree with a file's own unless ``--override-pixel-size``); with neither, the model's training pixel size is
assumed, and a note says so.

Outputs, per image, at the input's own size and pixel size: ``<name>_mask.tif`` (uint8 0/255) and
``<name>_prob.tif`` (float32 particle probability), both ImageJ TIFFs that Fiji opens with their calibration (pixel
size in nm); ``<name>_overlay.png`` (the micrograph with the particles outlined and numbered); ``<name>_mask.png``,
``<name>_mask.npy`` (0/1) and ``<name>_prob.npy`` for scripts. Over all images: ``particles.csv`` (and
``particles.parquet`` where pyarrow is installed), one row per particle (``mlplatform.particles.COLUMNS``), and
``particle_sizes.png``, the histogram of their equivalent diameters.

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
from hrtem_core.micrographs import MAX_PIXELS, SUFFIXES, read_images, resolve_pixel_size
from mlplatform import particles as measure
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


def _image_name(stem: str, page: int | None) -> str:
    return stem if page is None else f"{stem}_frame{page:03d}"


def _report(problems: list[str], n_files: int) -> None:
    if len(problems) == 1 and n_files == 1:
        raise InputError(problems[0])
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(f"{len(problems)} of {n_files} micrograph file(s) cannot be used, nothing was written: "
                         + "; ".join(problems[:5]) + more)


def _bar(progress: bool, total: int, what: str, unit: str, leave: bool = True):
    """A tqdm bar on stderr, shown only with ``progress`` and only on a terminal (``disable=None``): a log file or a
    test's captured stderr keeps its one ``error:`` line."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit=unit, disable=None if progress else True, leave=leave,
                dynamic_ncols=True)


def check_inputs(files: list[Path], pixel_size_A: float | None = None, override: bool = False,
                 progress: bool = False) -> list[tuple[Path, str, tuple[int, int], float | None]]:
    """Read every file whole (nothing is kept): (file, where, shape, pixel size in Å or None) of every image, else
    InputError listing every problem (unreadable, not gray, not finite, too large, not a micrograph, unequal pixel
    sizes, a calibration that contradicts ``--pixel-size``, two inputs writing the same outputs)."""
    problems, names, images = [], {}, []
    with _bar(progress, len(files), "check", "file", leave=False) as bar:
        for file, stem in zip(files, _output_names(files)):
            _check_file(file, stem, pixel_size_A, override, problems, names, images)
            bar.update()
    _report(problems, len(files))
    return images


def _check_file(file: Path, stem: str, pixel_size_A: float | None, override: bool, problems: list[str],
                names: dict[str, str], images: list) -> None:
    """check_inputs for one file: its images appended to ``images``, or its problem to ``problems``."""
    try:
        pages, file_A = read_images(file)
        pixel = resolve_pixel_size(str(file), file_A, pixel_size_A, override)
        for page, image in pages:
            where = str(file) if page is None else f"{file} frame {page}"
            name = _image_name(stem, page)
            if name in names:
                raise InputError(f"{where}: its outputs {name}_* would overwrite those of {names[name]}; rename one "
                                 "of them")
            names[name] = where
            images.append((file, where, image.shape, pixel))
    except InputError as exc:
        problems.append(str(exc))


def check_grids(images: list[tuple[Path, str, tuple[int, int], float | None]], model_pixel_size_A: float) -> None:
    """InputError unless every image, resampled to the model's pixel size, stays within MAX_PIXELS and has at least
    MIN_SIDE_PX pixels a side."""
    problems = {}
    for file, where, shape, pixel_size_A in images:
        grid = model_grid(shape, pixel_size_A, model_pixel_size_A)
        if file in problems:
            continue
        size = (f"{shape[0]} x {shape[1]} pixels" + ("" if pixel_size_A is None else f" of {pixel_size_A:.6g} Å")
                + ("" if tuple(grid) == tuple(shape) else f" become {grid[0]} x {grid[1]}")
                + f" at the model's {model_pixel_size_A} Å")
        if grid[0] * grid[1] > MAX_PIXELS:
            problems[file] = (f"{where}: {size}, more than {MAX_PIXELS:,} pixels: check --pixel-size or the file's "
                              "calibration")
        elif min(grid) < MIN_SIDE_PX:
            problems[file] = (f"{where}: {size}; the model needs at least {MIN_SIDE_PX} x {MIN_SIDE_PX} pixels (its "
                              "deepest features are 8x coarser): check --pixel-size or the file's calibration, or "
                              "give a larger micrograph")
    _report(list(problems.values()), len({file for file, *_ in images}))


def _write_tiff(path: Path, array: np.ndarray, pixel_size_A: float) -> None:
    """An ImageJ TIFF (what Fiji reads its calibration from): resolution in pixels per nm, unit nm."""
    import tifffile

    per_nm = 10.0 / pixel_size_A
    with atomic_writer(path) as fh:
        tifffile.imwrite(fh, array, imagej=True, resolution=(per_nm, per_nm), metadata={"unit": "nm"})


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_writer(path) as fh:
        Image.fromarray(array).save(fh, format="PNG")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_writer(path) as fh:
        np.save(fh, array)


def write_table(stage: Path, rows: list[dict]) -> list[str]:
    """particles.csv (and particles.parquet where pyarrow is installed) of ``rows``; the names written."""
    import importlib.util

    import pandas as pd

    table = pd.DataFrame(measure.table_rows(rows), columns=list(measure.COLUMNS))
    with atomic_writer(stage / "particles.csv") as fh:
        fh.write(table.to_csv(index=False, float_format="%.6g").encode())
    names = ["particles.csv"]
    if importlib.util.find_spec("pyarrow") is not None:
        with atomic_writer(stage / "particles.parquet") as fh:
            table.to_parquet(fh, index=False)
        names.append("particles.parquet")
    return names


def predict_path(model_ref: str, input_path: str | Path, out_dir: str | Path, pixel_size_A: float | None,
                 tracking_uri: str | None = None, threshold: float | None = None, override_pixel_size: bool = False,
                 min_area_nm2: float = 0.0, track: bool = False, progress: bool = False) -> list[dict]:
    """Segment every micrograph in ``input_path`` and measure its particles; write the outputs of the module
    docstring into ``out_dir`` (all of them, or, on any error, nothing: see the module docstring). With ``track``,
    the prediction then becomes an MLflow run of its own (:func:`track_prediction`). With ``progress``, bars on a
    terminal's stderr say where the work is (files checked, images predicted; nothing when stderr is not a terminal).

    Returns one record per image (per frame of a stack): its paths are where the outputs end up, ``particles`` its
    rows of the particle table (``mlplatform.particles.summary`` of all of them is the printed summary), ``table``
    the files of the whole table, and, with ``track``, ``run_id`` the prediction's run.
    """
    if pixel_size_A is not None and not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise InputError(f"pixel_size_A={pixel_size_A}: must be a positive number of Å")
    if override_pixel_size and pixel_size_A is None:
        raise InputError("--override-pixel-size needs --pixel-size: the value to use instead of the files' own")
    if threshold is not None and not 0 < threshold < 1:
        raise InputError(f"threshold={threshold}: must lie strictly between 0 and 1")
    if not (np.isfinite(min_area_nm2) and min_area_nm2 >= 0):
        raise InputError(f"--min-area-nm2 {min_area_nm2}: must be a number of nm² >= 0")
    out = check_output_folder(out_dir, "predict --out")
    if track:  # a store that cannot record the run is found before any work, not after the outputs are written
        from mlplatform.store import ensure_store, resolve_tracking_uri

        ensure_store(resolve_tracking_uri(tracking_uri))
    files = list_inputs(input_path)
    images = check_inputs(files, pixel_size_A, override_pixel_size, progress)  # all, before the model is fetched
    model, meta = load_model(model_ref, tracking_uri)
    model_px = float(meta["pixel_size_A"])
    check_grids(images, model_px)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    thr = float(meta.get("threshold", THRESHOLD) if threshold is None else threshold)
    note = None
    if any(px is None for *_, px in images):
        note = f"no pixel size in the file or given: assuming the model's training pixel size, {model_px} Å"
        print(f"note: {note}", file=sys.stderr)
    records, rows = [], []
    pixel_of = {file: px for file, *_, px in images}
    bar = _bar(progress, len(images), "predict", "image")
    with staged_folder(out) as stage, bar:
        for file, stem in zip(files, _output_names(files)):
            pages, file_A = read_images(file)  # read again: memory holds one file, not all of them
            given = pixel_of[file]
            pixel = model_px if given is None else given
            source = "assumed" if given is None else "file" if given == file_A else "--pixel-size"
            for page, image in pages:
                name = _image_name(stem, page)
                prob = predict_array(model, meta, image, given)
                mask = (prob > thr).astype(np.uint8)  # the default, model_format.THRESHOLD, is the one of training
                found = measure.measure_particles(mask, pixel, name, min_area_nm2)
                rows.extend(found)
                names = {"mask_tif": f"{name}_mask.tif", "prob_tif": f"{name}_prob.tif",
                         "overlay_png": f"{name}_overlay.png", "mask_png": f"{name}_mask.png",
                         "mask_npy": f"{name}_mask.npy", "prob_npy": f"{name}_prob.npy"}
                _write_tiff(stage / names["mask_tif"], mask * np.uint8(255), pixel)
                _write_tiff(stage / names["prob_tif"], prob, pixel)
                _write_png(stage / names["overlay_png"], measure.overlay(image, mask, found))
                _write_png(stage / names["mask_png"], mask * np.uint8(255))
                _write_npy(stage / names["mask_npy"], mask)
                _write_npy(stage / names["prob_npy"], prob)
                records.append({
                    "input": str(file), "page": page, "name": name,
                    "outputs": {k: str(out / v) for k, v in names.items()},
                    "shape": list(image.shape), "model_shape": list(model_grid(image.shape, given, model_px)),
                    "pixel_size_A": pixel, "pixel_size_from": source, "pixel_size_assumed": given is None,
                    "model_pixel_size_A": model_px, "threshold": thr, "particle_fraction": float(mask.mean()),
                    "particles": measure.table_rows(found), "note": note if given is None else None,
                })
                bar.update()
        table_files = write_table(stage, rows)
        with atomic_writer(stage / "particle_sizes.png") as fh:
            fh.write(measure.size_histogram_png(rows, f"{len(rows)} particles in {len(records)} image(s)"))
    table = {n: str(out / n) for n in [*table_files, "particle_sizes.png"]}
    for rec in records:
        rec["table"] = table
    if track:
        run_id = track_prediction(model_ref, meta, files, records, min_area_nm2, tracking_uri)
        for rec in records:
            rec["run_id"] = run_id
    return records


def track_prediction(model_ref: str, meta: dict, files: list[Path], records: list[dict], min_area_nm2: float,
                     tracking_uri: str | None) -> str:
    """Record a finished prediction as an MLflow run (experiment ``predict``); its id.

    Tags: ``kind=predict``, the model as given (``predict.model``) and as a URI (``predict.model_uri``), and
    ``training_run``, the run that trained the model (from its metadata, or the run id given), so the prediction is
    found from the model's lineage and back. Params: the pixel sizes, threshold and minimum area. Artifacts:
    ``inputs.json`` (each input file's sha256), every output under ``outputs/``."""
    from hrtem_core.dataset import file_sha256
    from mlplatform.model_format import RUN_ID
    from mlplatform.serving import model_uri
    from mlplatform.tracking import TrackedRun

    ref = str(model_ref)
    training_run = meta.get("run_id") or (ref if RUN_ID.fullmatch(ref) else None)
    tags = {"kind": "predict", "predict.model": ref, "predict.model_uri": model_uri(ref, tracking_uri)}
    if training_run:
        tags["training_run"] = training_run
    params = {"threshold": records[0]["threshold"], "min_area_nm2": float(min_area_nm2),
              "model_pixel_size_A": float(meta["pixel_size_A"]), "n_inputs": len(files), "n_images": len(records),
              "pixel_sizes_A": sorted({round(r["pixel_size_A"], 6) for r in records}),
              "pixel_size_from": sorted({r["pixel_size_from"] for r in records})}
    name = files[0].name if len(files) == 1 else f"{files[0].parent.name} ({len(files)} files)"
    with TrackedRun(tracking_uri, "predict", f"predict {name}", params, tags, system_metrics=False) as run:
        run.log_dict({str(f.resolve()): file_sha256(f) for f in files}, "inputs.json")
        s = measure.summary([row for rec in records for row in rec["particles"]])
        run.log_metrics({k: v for k, v in (("particles", s["count"]), ("particles_touching_edge", s["touching_edge"]),
                                           ("median_diameter_nm", s["median_diameter_nm"]),
                                           ("mean_diameter_nm", s["mean_diameter_nm"])) if v is not None}, step=0)
        for path in [*(p for rec in records for p in rec["outputs"].values()), *records[0]["table"].values()]:
            run.log_artifact(path, "outputs")
    return run.run_id

"""``python -m datagen import``: experimental micrographs and their masks -> a dataset in the shard format.

Inputs: ``--images`` and ``--masks`` are each a file or a folder (searched recursively; hidden files and folders,
names starting with ".", and TIA's .emi companions are skipped; any other file must be one that
``hrtem_core.micrographs`` reads: .tif/.tiff, .png, .npy, .dm3/.dm4, .ser, .emd, .mrc, case-insensitive). A TIFF may
hold several pages, a .npy, .mrc or .ser may be 3-D: all are stacks [N, H, W], one sample per page. The pixel size
of each image is its file's calibration, converted to Å; ``--pixel-size`` is needed only for files without one (and
must agree with a file's own unless ``--override-pixel-size``).

Pairing (never guessed): a file's *stem* is its path relative to its root without the extension (``sub/a.tif`` ->
``sub/a``). A mask pairs with the image whose stem equals the mask's stem, or the mask's stem less one of the
suffixes in ``MASK_SUFFIXES`` (``_mask``, ``-mask``, ``_label`` ..., case-insensitive): ``a.tif`` pairs with
``a.png``, ``a_mask.png`` or ``a-Label.npy`` in the same relative folder. Page i of an image stack pairs with page
i of its mask stack. An image without a mask, a mask without an image, a mask that fits two images and two masks
(or two images) for one stem all fail the import, listing the names. Two single files are paired as given. When
``--images`` and ``--masks`` are the same folder, the files whose stems carry a mask suffix are the masks.

Samples: keys ``img-NNNNNN`` number the images in order of their relative path; the pages of a stack are
``img-NNNNNN_pPPPP``. The part before "_" is the structure id the platform splits train/validation by
(mlplatform.curation), so the frames of one stack, usually a series of one area, stay on one side of the split.
The image keeps the file's values as float32 (RGB files of identical channels become gray); the mask becomes
uint8 0/1 from {0, 1}, {0, 255} or bool. Every pair is read and checked before anything is written; the output
is written like ``generate``'s (shards, then the manifest last) and removed again if the import fails.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

from hrtem_core.config import config_hash
from hrtem_core.dataset import (FORMAT_VERSION, MANIFEST, SHARD_PATTERN, build_manifest, check_output,
                                encode_sample, file_sha256, sample_hash, software_versions, utc_now, write_manifest,
                                write_shard)
from hrtem_core.errors import InputError
from hrtem_core.micrographs import COMPANION_SUFFIXES, SUFFIXES, as_image, as_mask, read_pages, resolve_pixel_size

MASK_SUFFIXES = tuple(f"{sep}{tag}" for tag in ("mask", "masks", "label", "labels") for sep in "_-")
SHARD_BYTES = 256 << 20  # a new shard starts once a shard holds this much encoded sample data
MAX_LISTED = 20


def _names(items: list[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


# --------------------------------------------------------------------------------------------- listing, pairing


def list_inputs(path: Path, what: str) -> tuple[Path, list[str]]:
    """(root, sorted relative paths) of a file or a folder of supported files."""
    path = Path(path)
    if path.is_file():
        root, rels = path.parent, [path.name]
    elif path.is_dir():
        root = path
        rels = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                      and p.suffix.lower() not in COMPANION_SUFFIXES)
    else:
        raise InputError(f"--{what} {path}: no such file or folder")
    unsupported = [r for r in rels if PurePosixPath(r).suffix.lower() not in SUFFIXES]
    if unsupported:
        raise InputError(f"--{what} {path}: unsupported file(s) (only {', '.join(SUFFIXES)}): {_names(unsupported)}")
    if not rels:
        raise InputError(f"--{what} {path}: no files found")
    return root, rels


def _stem(rel: str) -> str:
    return PurePosixPath(rel).with_suffix("").as_posix()


def image_stems_of_mask(rel: str) -> list[str]:
    """The image stems a mask file may belong to: its own stem, and that stem less a mask suffix."""
    stem = _stem(rel)
    return [stem] + [stem[:-len(s)] for s in MASK_SUFFIXES
                     if stem.lower().endswith(s) and len(PurePosixPath(stem).name) > len(s)]


def pair_files(images: list[str], masks: list[str]) -> list[tuple[str, str]]:
    """[(image, mask)] in image order by the stem rule (module docstring); raises InputError listing mismatches."""
    images, masks = sorted(images), sorted(masks)  # messages and keys must not depend on listing order
    by_stem = defaultdict(list)
    for rel in images:
        by_stem[_stem(rel)].append(rel)
    claims, orphans, ambiguous = defaultdict(list), [], []
    for rel in masks:
        fits = [s for s in image_stems_of_mask(rel) if s in by_stem]
        if not fits:
            orphans.append(rel)
        elif len(fits) > 1:
            ambiguous.append(f"{rel} (fits {' and '.join(by_stem[s][0] for s in fits)})")
        else:
            claims[fits[0]].append(rel)
    problems = []
    if same := [" and ".join(v) for v in by_stem.values() if len(v) > 1]:
        problems.append(f"images sharing a stem: {_names(same)}")
    if lonely := [r for r in images if not claims.get(_stem(r))]:
        problems.append(f"images without a mask: {_names(lonely)}")
    if orphans:
        problems.append(f"masks without an image: {_names(orphans)}")
    if ambiguous:
        problems.append(f"masks fitting more than one image: {_names(ambiguous)}")
    if multi := [f"{by_stem[s][0]} ({', '.join(m)})" for s, m in claims.items() if len(m) > 1]:
        problems.append(f"images claimed by several masks: {_names(multi)}")
    if problems:
        raise InputError("images and masks do not pair up (mask stem = image stem, optionally + one of "
                         f"{'/'.join(MASK_SUFFIXES)}): " + "; ".join(problems))
    return [(rel, claims[_stem(rel)][0]) for rel in images]


def _layout(stack: bool, n: int) -> str:
    return f"a stack of {n} page(s)" if stack else "a single image"


def read_pair(images_root: Path, image: str, masks_root: Path, mask: str, pixel_size_A: float | None = None,
              override: bool = False) -> list[tuple[int | None, np.ndarray, np.ndarray, dict]]:
    """[(page or None, image float32, mask uint8 0/1, source fields)] of one checked pair. The pixel size is the
    image file's calibration, else ``pixel_size_A`` (``--pixel-size``; see micrographs.resolve_pixel_size)."""
    read = read_pages(images_root / image, image)
    pixel = resolve_pixel_size(image, read.pixel_size_A, pixel_size_A, override)
    if pixel is None:
        raise InputError(f"{image}: the file has no pixel size calibration; give --pixel-size (Å)")
    mread = read_pages(masks_root / mask, mask)
    pages, mpages, stack, mstack = read.pages, mread.pages, read.stack, mread.stack
    if (stack, len(pages)) != (mstack, len(mpages)):
        raise InputError(f"{image} is {_layout(stack, len(pages))} but its mask {mask} is "
                         f"{_layout(mstack, len(mpages))}")
    out = []
    for i, (a, m) in enumerate(zip(pages, mpages)):
        page = i if stack else None
        iname, mname = (f"{image} page {i}", f"{mask} page {i}") if stack else (image, mask)
        img, msk = as_image(a, iname), as_mask(m, mname)
        if img.shape != msk.shape:
            raise InputError(f"{iname}: image shape {img.shape} differs from its mask {mname} {msk.shape}")
        out.append((page, img, msk, {"file": image, "page": page, "n_pages": len(pages) if stack else None,
                                     "dtype": read.dtype, "shape": list(a.shape), "mask_file": mask,
                                     "pixel_size_A": pixel,
                                     "pixel_size_from": "file" if pixel == read.pixel_size_A else "--pixel-size"}))
    return out


# ------------------------------------------------------------------------------------------------------- import


def import_dataset(images: Path, masks: Path, pixel_size_A: float | None, out: Path, name: str | None = None,
                   dose_e_per_A2: float | None = None, split: str = "test",
                   override_pixel_size: bool = False) -> tuple[dict, bool]:
    """Import micrographs and masks as a dataset at ``out``; returns (manifest, whether it was already there).

    ``pixel_size_A`` (Å) is needed for the files without a calibration; where a file has one, it must agree with it
    unless ``override_pixel_size``."""
    for flag, value in (("--pixel-size", pixel_size_A), ("--dose", dose_e_per_A2)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InputError(f"{flag} must be a number > 0, got {value}")
    if override_pixel_size and pixel_size_A is None:
        raise InputError("--override-pixel-size needs --pixel-size: the value to use instead of the files' own")
    images, masks, out = Path(images), Path(masks), Path(out)
    images_root, image_files = list_inputs(images, "images")
    masks_root, mask_files = list_inputs(masks, "masks")
    if images.is_file() and masks.is_file():
        pairs = [(image_files[0], mask_files[0])]  # named one by one: the user paired them
    else:
        if images.resolve() == masks.resolve():  # one folder holding both: the mask suffix tells them apart
            mask_files = [r for r in image_files if len(image_stems_of_mask(r)) > 1]
            image_files = [r for r in image_files if r not in mask_files]
        pairs = pair_files(image_files, mask_files)
    # not the --out folder's name: the same inputs give the same content hash wherever they are written
    name = name or (images.resolve().stem if images.is_file() else images.resolve().name)
    files = [{"image": i, "image_sha256": file_sha256(images_root / i), "mask": m,
              "mask_sha256": file_sha256(masks_root / m)} for i, m in pairs]
    params = {"pixel_size_A": None if pixel_size_A is None else float(pixel_size_A),
              "dose_e_per_A2": None if dose_e_per_A2 is None else float(dose_e_per_A2), "split": split}
    if override_pixel_size:  # only then: the identity of earlier imports without it stays the same
        params["override_pixel_size"] = True
    ident = {"format_version": FORMAT_VERSION, "kind": "import", "dataset": name, **params,
             "inputs_sha256": config_hash(files)}
    state, done = check_output(out, ident)
    if state == "done":
        return done, True

    # every pair is read and checked before anything is written; the arrays are read again to write them, so
    # memory holds one pair and one shard, not the whole input
    problems, pixel_sizes = [], set()
    for image, mask in pairs:
        try:
            pixel_sizes.update(s["pixel_size_A"] for *_, s in
                               read_pair(images_root, image, masks_root, mask, pixel_size_A, override_pixel_size))
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(f"{len(problems)} of {len(pairs)} pair(s) cannot be imported: "
                         + "; ".join(problems[:5]) + more)

    versions, now = software_versions(extra=("tifffile", "pillow", "rosettasciio")), utc_now()
    new_dirs = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        shards, hashes, samples, size = [], [], [], 0

        def flush():
            nonlocal samples, size
            shard_name = SHARD_PATTERN.format(len(shards))
            written.append(out / shard_name)
            write_shard(out / shard_name, samples)
            shards.append({"name": shard_name, "sha256": file_sha256(out / shard_name), "n_samples": len(samples),
                           "samples": hashes[-len(samples):]})
            samples, size = [], 0

        for n, (rec, (image, mask)) in enumerate(zip(files, pairs)):
            if (file_sha256(images_root / image), file_sha256(masks_root / mask)) != (rec["image_sha256"],
                                                                                       rec["mask_sha256"]):
                raise InputError(f"{image} or its mask {mask} changed during the import; run it again")
            rec["keys"] = []
            for page, img, msk, source in read_pair(images_root, image, masks_root, mask, pixel_size_A,
                                                    override_pixel_size):
                key = f"img-{n:06d}" if page is None else f"img-{n:06d}_p{page:04d}"
                meta = {
                    "id": f"{name}/{key}",
                    "dataset": name,
                    "split": split,
                    "source": {**source, "file_sha256": rec["image_sha256"], "mask_sha256": rec["mask_sha256"],
                               "dose_e_per_A2": params["dose_e_per_A2"], "import_time_utc": now},
                    "mask": {"method": "imported", "n_pixels": int(msk.sum()), "area_fraction": float(msk.mean())},
                    "provenance": {"command": "import", "parameters": params, "versions": versions},
                }
                arrays = {"image.npy": img, "mask.npy": msk}
                samples.append(encode_sample(key, arrays, meta))
                hashes.append([key, sample_hash(key, arrays, meta)])
                size += img.nbytes + msk.nbytes
                rec["keys"].append(key)
                if size >= SHARD_BYTES:
                    flush()
        if samples:
            flush()
        manifest = build_manifest(
            name, shards, generation=ident, software=versions, created_utc=now, n_structures=len(pairs),
            source={"kind": "experimental", "images": str(images.resolve()), "masks": str(masks.resolve()),
                    **params, "import_time_utc": now, "files": files,
                    # the samples' own (from the files' calibration or --pixel-size): one value, or all of them
                    "pixel_size_A": pixel_sizes.pop() if len(pixel_sizes) == 1 else sorted(pixel_sizes)})
        written.append(out / MANIFEST)
        write_manifest(out, manifest)
    except BaseException:
        # nothing partial stays behind: this run's shards, their temporary files, and the folders it made
        for path in written:
            path.unlink(missing_ok=True)
        for stale in out.glob(f"*.{os.getpid()}.partial"):
            stale.unlink()
        for d in new_dirs:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return manifest, False

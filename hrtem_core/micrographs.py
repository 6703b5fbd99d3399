"""Reading micrographs and masks from image files: the one reader of ``datagen import`` and ``mlplatform predict``.

Supported: TIFF (pages are a stack; thumbnails and pyramid levels skipped), PNG, and .npy ([H, W] or a stack
[N, H, W]), and what microscopes write, read by rosettasciio (HyperSpy's I/O library): Gatan DigitalMicrograph
(.dm3, .dm4), FEI/TIA (.ser; its .emi companion is skipped in folders), Thermo Fisher Velox and Berkeley EMD (.emd)
and MRC (.mrc; a 3-D MRC is a stack of frames). Values are kept as recorded (16-bit and float TIFFs included):
normalising is the model's business.

Calibration. The pixel size comes from the file where it has one (the microscope formats; a TIFF written by ImageJ,
DigitalMicrograph, FEI/Thermo, Zeiss, TVIPS, Olympus or JEOL software), converted to Å; PNG, .npy and plain TIFFs
have none (:attr:`Pages.pixel_size_A` is None). :func:`resolve_pixel_size` settles it against a ``--pixel-size``
flag. Unequal x and y pixel sizes are refused (a model sees square pixels), and so is a file that holds something
other than micrographs: a spectrum (one signal axis, e.g. EELS), a diffraction pattern (reciprocal or angular
units), a 4-D dataset (a scan of images or patterns), or several different images (export the one to segment).

Colour: a detector records one channel, so a colour file is accepted only when it is gray in disguise (RGB or
RGBA whose colour channels are equal and whose alpha is constant); a false-colour rendering is refused, because
any conversion to one channel would invent intensities the detector never recorded. Palette PNGs are expanded
(indices are not values).

Size. A file's header says how many pixels it holds before any pixel is decoded, and a few kilobytes of compressed
zeros (or a .npy header alone) can claim billions: every reader checks the header against :data:`MAX_PIXELS` per image
(page) and :data:`MAX_FILE_PIXELS` per file before it decodes or allocates anything, and refuses a larger file with an
InputError naming the file, its size and the limit. A damaged file (truncated, or not what its suffix says) is an
InputError naming the file too; nothing here unpickles (.npy object arrays are refused).
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

# rosettasciio's reader of each microscope format, by suffix
MICROSCOPE_READERS = {".dm3": "digitalmicrograph", ".dm4": "digitalmicrograph", ".ser": "tia", ".emd": "emd",
                      ".mrc": "mrc"}
SUFFIXES = (".tif", ".tiff", ".png", ".npy", *MICROSCOPE_READERS)
# files that travel with a micrograph and are read through it (TIA's .emi holds the settings of its .ser files):
# listing a folder skips them rather than refusing them
COMPANION_SUFFIXES = (".emi",)
# relative difference under which two pixel sizes are the same: files store them as float32 and people type 4 digits
PIXEL_SIZE_RTOL = 1e-3
# Å per unit of a length axis, keys lower-case; rosettasciio writes "A" for DigitalMicrograph's Å, ImageJ escapes Å
_A_PER_UNIT = {"m": 1e10, "cm": 1e8, "mm": 1e7, "um": 1e4, "µm": 1e4, "μm": 1e4, "micron": 1e4, "microns": 1e4,
               "nm": 10.0, "a": 1.0, "å": 1.0, "\\u00c5": 1.0, "angstrom": 1.0, "angstroms": 1.0, "pm": 0.01}
# what an axis without a calibration says about its unit
_NO_UNIT = {"", "none", "<undefined>", "undefined", "px", "pixel", "pixels", "inch"}

# the most pixels one image (one page of a stack) may have: 2**27, e.g. 11585 x 11585, above the largest detector
# frames (K3 super-resolution: 11520 x 8184); as float32 that is 512 MiB, and prediction resamples it in float64.
# It lies below Pillow's own refusal (2 * Image.MAX_IMAGE_PIXELS), so one limit, this one, applies to every format.
MAX_PIXELS = 2**27
# the most pixels of all pages of one file together (a stack is read whole): 2**30, 4 GiB as float32
MAX_FILE_PIXELS = 2**30
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_size(name: str, shape: tuple[int, ...], n_pages: int = 1, total: int | None = None) -> None:
    """InputError unless images of ``shape`` ([H, W, ...] as a header states it) are within :data:`MAX_PIXELS`, and
    the file's ``total`` pixels (default: ``n_pages`` such images) within :data:`MAX_FILE_PIXELS`."""
    h, w = int(shape[0]), int(shape[1])
    if h * w > MAX_PIXELS:
        raise InputError(f"{name}: image of {h} x {w} pixels ({h * w:,}): more than the {MAX_PIXELS:,} pixels an "
                         "image may have (hrtem_core.micrographs.MAX_PIXELS); refused before decoding it (a "
                         "decompression bomb, or not a micrograph): give a smaller image or crop it into tiles")
    total = n_pages * h * w if total is None else total
    if total > MAX_FILE_PIXELS:
        raise InputError(f"{name}: stack of {n_pages} pages ({total:,} pixels in all): more than the "
                         f"{MAX_FILE_PIXELS:,} pixels a file may hold (hrtem_core.micrographs.MAX_FILE_PIXELS); "
                         "refused before decoding it: split the stack into several files")


@dataclass(frozen=True)
class Pages:
    """What one file holds: its pages ([H, W] or [H, W, C] as stored), their original dtype, whether the file is a
    stack (pages numbered even if there is one), and the pixel size in Å from its calibration (None: it has none)."""

    pages: list
    dtype: str
    stack: bool
    pixel_size_A: float | None = None


# ------------------------------------------------------------------------------------------------ calibration


def _unit_text(unit) -> str:
    return "" if unit is None else str(unit).strip()


def _is_reciprocal(unit: str) -> bool:
    u = unit.replace(" ", "").lower()
    return u.startswith("1/") or u.endswith(("^-1", "⁻¹", "-1")) or u in ("rad", "mrad", "µrad", "urad", "deg")


def _axis_A(axis: dict, name: str) -> float | None:
    """Å per pixel along one signal axis of rosettasciio's description; None when the axis has no calibration."""
    unit, scale = _unit_text(axis.get("units")), axis.get("scale", 1.0)
    if unit.lower() in _NO_UNIT or scale is None or not (np.isfinite(float(scale)) and float(scale) > 0):
        return None
    factor = _A_PER_UNIT.get(unit.lower())
    if factor is None:
        raise InputError(f"{name}: its {axis.get('name') or 'image'} axis is calibrated in {unit!r}, not a length "
                         f"(known: {', '.join(sorted(k for k in _A_PER_UNIT if k.isascii()))}); give an image "
                         "calibrated in lengths, or one without a calibration and --pixel-size")
    return float(scale) * factor


def calibration_A(y_axis: dict, x_axis: dict, name: str) -> float | None:
    """The pixel size in Å of an image whose row and column axes rosettasciio describes (``scale``, ``units``);
    None when neither is calibrated; InputError when they differ or only one is calibrated."""
    y, x = _axis_A(y_axis, name), _axis_A(x_axis, name)
    if y is None and x is None:
        return None
    if y is None or x is None or abs(y - x) > PIXEL_SIZE_RTOL * max(y, x):
        shown = ", ".join(f"{what} {'uncalibrated' if v is None else f'{v:.6g} Å'}"
                          for what, v in (("y", y), ("x", x)))
        raise InputError(f"{name}: unequal pixel sizes ({shown}); only square pixels are segmented: resample it "
                         "to square pixels first")
    return (y + x) / 2


def resolve_pixel_size(name: str, file_A: float | None, flag_A: float | None, override: bool = False) -> float | None:
    """The pixel size in Å to use for one file: its calibration, else ``--pixel-size``; None when neither is known.

    A flag that disagrees with the file's calibration (by more than :data:`PIXEL_SIZE_RTOL`) stops the command,
    naming both, unless ``override`` (``--override-pixel-size``) says the flag wins: a wrong pixel size silently
    rescales every particle size."""
    if file_A is None or flag_A is None:
        return file_A if flag_A is None else float(flag_A)
    if override or abs(file_A - flag_A) <= PIXEL_SIZE_RTOL * max(file_A, flag_A):
        return float(flag_A) if override else file_A
    raise InputError(f"{name}: --pixel-size {flag_A:g} Å differs from the file's calibration, {file_A:.6g} Å; drop "
                     f"--pixel-size to use the file's, or add --override-pixel-size to use {flag_A:g} Å anyway")


# ------------------------------------------------------------------------------------------- microscope files


def _describe(d: dict) -> str:
    """What a rosettasciio dataset holds, in words, when it is not a micrograph or a stack of them; '' when it is.

    The image is the last two axes. Readers that say which axes navigate (DigitalMicrograph, TIA, Velox, MRC) mark
    the frames of a stack, the scan of a 4-D dataset and the pixels of a spectrum image so; Berkeley EMD marks no axis:
    there a 3-D array is a stack of frames and a 4-D one a 4-D dataset."""
    axes = [a for a in d["axes"] if int(a.get("size", 2)) > 1 or not a.get("navigate", False)]
    signal = [a for a in axes if not a.get("navigate", False)]
    nav = [a for a in axes if a.get("navigate", False)]
    kind = (d.get("metadata", {}).get("Signal", {}) or {}).get("signal_type") or ""
    kind = f"{kind}: " if kind else ""
    shape = " x ".join(str(int(a["size"])) for a in axes)
    if len(signal) == 1:
        a, unit = signal[0], _unit_text(signal[0].get("units"))
        return (f"a spectrum ({kind}one signal axis, {a.get('name') or '?'}, {int(a['size'])} channels"
                + (f" in {unit}" if unit else "") + (f", {len(nav)} navigation axes" if nav else "") + ")")
    if not signal:
        return f"no image axes ({kind}{shape})"
    units = [_unit_text(a.get("units")) for a in axes[-2:]]
    if len(axes) > 3 or len(nav) > 1:
        scan = "diffraction patterns" if any(_is_reciprocal(u) for u in units) else "images"
        return f"a {len(axes)}-D dataset ({kind}{shape}: a scan or series of {scan})"
    if any(_is_reciprocal(u) for u in units):
        what = "a stack of diffraction patterns" if len(axes) > 2 else "a diffraction pattern"
        return f"{what} ({kind}{shape}, axes in {' and '.join(sorted(set(units)))})"
    return ""


def _read_microscope_file(path: Path, name: str, suffix: str) -> Pages:
    """Pages and calibration of a file rosettasciio reads; the shape is checked before any pixel is decoded."""
    import importlib

    reader = importlib.import_module(f"rsciio.{MICROSCOPE_READERS[suffix]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its readers warn about metadata they skip; refusals here say what matters
        datasets = reader.file_reader(str(path), lazy=True)  # lazy: headers and axes only, nothing decoded yet
    if not datasets:
        raise InputError(f"{name}: holds no data")
    what = [_describe(d) for d in datasets]
    images = [d for d, w in zip(datasets, what) if not w]
    if not images:
        raise InputError(f"{name}: not a micrograph: it holds {'; '.join(dict.fromkeys(what))}; give an image")
    if len(images) > 1:
        titles = [str((d.get("metadata", {}).get("General", {}) or {}).get("title") or i) for i, d in enumerate(images)]
        raise InputError(f"{name}: holds {len(images)} different images ({', '.join(titles)}); export the one to "
                         "segment to a file of its own")
    d = images[0]
    axes = d["axes"]
    if len(axes) != d["data"].ndim or any(a.get("navigate", False) for a in axes[-2:]) or d["data"].ndim > 3:
        raise InputError(f"{name}: unsupported layout of its axes ({[a.get('name') for a in axes]}); give a 2-D "
                         "image or a stack of them")
    h, w = int(d["data"].shape[-2]), int(d["data"].shape[-1])
    n = math.prod(int(s) for s in d["data"].shape[:-2])
    check_size(name, (h, w), n)
    pixel_A = calibration_A(axes[-2], axes[-1], name)
    stack, data = d["data"].ndim > 2, d["data"]
    data = np.asarray(data.compute(scheduler="synchronous") if hasattr(data, "compute") else data)
    if data.dtype.names:  # rosettasciio's RGB(A) as a structured array: back to channels
        data = np.stack([data[c] for c in data.dtype.names], axis=-1)
    return Pages(list(data.reshape(n, h, w, *data.shape[d["data"].ndim:])), data.dtype.name, stack, pixel_A)


def _tiff_calibration_A(path: Path, name: str) -> float | None:
    """Pixel size in Å of a TIFF written by microscope or image software (rosettasciio's TIFF reader knows them);
    None for a plain TIFF. ImageJ's own unit (``unit=nm`` in its description) rosettasciio keeps only for microns:
    it is taken from the description here."""
    import tifffile
    from rsciio.tiff import file_reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = file_reader(str(path), lazy=True)[0]["axes"]
    y, x = dict(axes[-2]), dict(axes[-1])
    if _unit_text(x.get("units")) == "" and _unit_text(y.get("units")) == "":
        with tifffile.TiffFile(path) as tif:
            unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
        if unit is None:
            return None
        y["units"] = x["units"] = unit
    return calibration_A(y, x, name)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[0].split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _read_npy(path: Path, name: str) -> np.ndarray:
    """A .npy array, its header (shape, dtype) checked before any data are read; nothing unpickled."""
    from numpy.lib import format as npformat

    with open(path, "rb") as fh:
        try:
            version = npformat.read_magic(fh)
        except ValueError:
            raise InputError(f"{name}: not a .npy file (no NumPy header); give an array saved with numpy.save") \
                from None
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fh)
        else:  # 3.0 exists only for structured arrays with non-Latin-1 field names, never a micrograph
            raise InputError(f"{name}: .npy format version {version[0]}.{version[1]}: only 1.0 and 2.0 (plain "
                             "numeric arrays) are read")
        if dtype.hasobject or dtype.kind not in "biuf":
            raise InputError(f"{name}: unsupported value type {dtype} (Python objects and structured, complex or "
                             "text arrays are refused); give a numeric array")
        if len(shape) not in (2, 3):
            raise InputError(f"{name}: a .npy must be 2-D [H, W] or a 3-D stack [N, H, W], got shape {shape}")
        if min(shape) < 0:
            raise InputError(f"{name}: unreadable: corrupt .npy header (shape {shape}); write it again")
        if 0 in shape:
            raise InputError(f"{name}: empty image (shape {shape})")
        check_size(name, shape[-2:], 1 if len(shape) == 2 else shape[0])
        data_bytes = math.prod(shape) * dtype.itemsize
        held = path.stat().st_size - fh.tell()
        if held < data_bytes:
            raise InputError(f"{name}: truncated: its header promises {shape} {dtype} ({data_bytes:,} bytes of data), "
                             f"the file holds {held:,}; write it again")
        fh.seek(0)
        return npformat.read_array(fh, allow_pickle=False)


def _png_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from a PNG's IHDR chunk, without decoding anything; None if the file does not start like a PNG."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) == 24 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    return None


def _read_png(path: Path, name: str) -> np.ndarray:
    """A PNG's pixels, its size (from the header: Image.open decodes nothing) checked before they are decoded."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit applies, checked below
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:  # Pillow's own limit (above ours, unless lowered): ours speaks
            size = _png_size(path)
            if size is not None:
                check_size(name, size)
            raise
    with im:
        check_size(name, (im.size[1], im.size[0]))
        if getattr(im, "n_frames", 1) > 1:
            raise InputError(f"{name}: animated PNG ({im.n_frames} frames); give one image per file or a TIFF stack")
        im.load()  # decodes: a truncated or corrupt file fails here
        im = im.convert("RGBA") if im.mode in ("P", "PA") else im  # palette indices are not the values
        return np.asarray(im)


def to_gray(a: np.ndarray, name: str) -> np.ndarray:
    """[H, W, C] with C = 2 (gray, alpha), 3 (RGB) or 4 (RGBA) -> [H, W] when it is gray; else InputError."""
    n_colour = 3 if a.shape[-1] >= 3 else 1
    colour, alpha = a[..., :n_colour], a[..., n_colour:]
    if alpha.size and np.any(alpha != alpha.flat[0]):
        raise InputError(f"{name}: has transparent pixels (alpha channel not constant); give a gray image")
    if np.any(colour != colour[..., :1]):
        raise InputError(f"{name}: is a colour image (its channels differ); give a gray image")
    return colour[..., 0]


def read_pages(path: Path, name: str | None = None) -> Pages:
    """The pages of one file as stored, with their calibration (:class:`Pages`); ``name`` in errors."""
    path = Path(path)
    name = name or str(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{name}: unsupported file type {suffix or '(none)'}; supported: {', '.join(SUFFIXES)}")
    # readers raise anything from struct.error to NotImplementedError on a damaged or exotic file: all mean the same
    try:
        if suffix in MICROSCOPE_READERS:
            return _read_microscope_file(path, name, suffix)
        if suffix == ".npy":
            a = _read_npy(path, name)
            return Pages([a] if a.ndim == 2 else list(a), a.dtype.name, a.ndim == 3)
        if suffix == ".png":
            a = _read_png(path, name)
            return Pages([a], a.dtype.name, False)
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if not p.is_reduced]  # skip thumbnails and pyramid levels
            layouts = []
            for i, page in enumerate(pages):  # every page's header first: nothing is decoded before all are checked
                where = f"{name} page {i}" if len(pages) > 1 else name
                sep, depth, h, w, contig = page.shaped
                rgb = page.photometric == tifffile.PHOTOMETRIC.RGB
                gray = page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
                if depth != 1 or not (rgb or (gray and page.samplesperpixel == 1)):
                    raise InputError(f"{where}: unsupported TIFF layout (photometric {page.photometric.name}, "
                                     f"{page.samplesperpixel} samples per pixel, depth {depth}); give gray pages")
                check_size(where, (h, w))
                layouts.append((page, rgb, h, w, sep * contig))
            if not layouts:
                raise InputError(f"{name}: the TIFF holds no image")
            check_size(name, (1, 1), len(layouts), total=sum(h * w for _, _, h, w, _ in layouts))
            out = []
            for page, rgb, h, w, channels in layouts:
                a = np.moveaxis(page.asarray().reshape(page.shaped)[:, 0], 0, -1).reshape(h, w, channels)
                out.append(a if rgb else a[..., 0])
        return Pages(out, out[0].dtype.name, len(out) > 1, _tiff_calibration_A(path, name))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{name}: unreadable: truncated, corrupt or not a {suffix[1:].upper()} file "
                         f"({_first_line(exc)}); write it again") from None


def as_plane(a: np.ndarray, name: str) -> np.ndarray:
    """One page as a real-valued [H, W] array (gray-in-colour reduced to one channel)."""
    if a.ndim == 3 and a.shape[-1] in (2, 3, 4):
        a = to_gray(a, name)
    if a.ndim != 2:
        raise InputError(f"{name}: not a 2-D image (shape {a.shape})")
    if 0 in a.shape:
        raise InputError(f"{name}: empty image (shape {a.shape})")
    if a.dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported value type {a.dtype}")
    return a


def as_image(a: np.ndarray, name: str) -> np.ndarray:
    """float32 [H, W] with the recorded values; refuses NaN or inf (also values beyond float32's range)."""
    image = as_plane(a, name).astype(np.float32)
    if not np.isfinite(image).all():
        raise InputError(f"{name}: has non-finite values ({int((~np.isfinite(image)).sum())} pixels NaN or inf as "
                         "float32)")
    return image


def as_mask(a: np.ndarray, name: str) -> np.ndarray:
    """uint8 0/1 from a mask stored as {0, 1}, {0, 255} or bool."""
    mask = as_plane(a, name)
    values = np.unique(mask)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = [f"{v:g}" for v in values[:20]]
        more = f", ... ({len(values)} in all)" if len(values) > 20 else ""
        raise InputError(f"{name}: mask values must be 0/1, 0/255 or bool, found {', '.join(shown)}{more}")
    return (mask != 0).astype(np.uint8)


def read_images(path: Path, name: str | None = None) -> tuple[list[tuple[int | None, np.ndarray]], float | None]:
    """([(page or None, float32 [H, W])], pixel size in Å or None) of one file: the page is None for a single image."""
    name = name or str(path)
    read = read_pages(path, name)
    return ([(i if read.stack else None, as_image(a, f"{name} page {i}" if read.stack else name))
             for i, a in enumerate(read.pages)], read.pixel_size_A)

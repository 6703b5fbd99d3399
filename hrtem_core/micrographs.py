"""Reading micrographs and masks from image files: the one reader of ``datagen import`` and ``mlplatform predict``.

Supported: TIFF (pages are a stack; thumbnails and pyramid levels skipped), PNG, and .npy ([H, W] or a stack
[N, H, W]). Values are kept as recorded (16-bit and float TIFFs included): normalising is the model's business.

Colour: a detector records one channel, so a colour file is accepted only when it is gray in disguise (RGB or
RGBA whose colour channels are equal and whose alpha is constant); a false-colour rendering is refused, because
any conversion to one channel would invent intensities the detector never recorded. Palette PNGs are expanded
(indices are not values).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

SUFFIXES = (".tif", ".tiff", ".png", ".npy")


def to_gray(a: np.ndarray, name: str) -> np.ndarray:
    """[H, W, C] with C = 2 (gray, alpha), 3 (RGB) or 4 (RGBA) -> [H, W] when it is gray; else InputError."""
    n_colour = 3 if a.shape[-1] >= 3 else 1
    colour, alpha = a[..., :n_colour], a[..., n_colour:]
    if alpha.size and np.any(alpha != alpha.flat[0]):
        raise InputError(f"{name}: has transparent pixels (alpha channel not constant); give a gray image")
    if np.any(colour != colour[..., :1]):
        raise InputError(f"{name}: is a colour image (its channels differ); give a gray image")
    return colour[..., 0]


def read_pages(path: Path, name: str | None = None) -> tuple[list[np.ndarray], str, bool]:
    """(pages [H, W] or [H, W, C] as stored, original dtype, whether the file is a stack); ``name`` in errors."""
    path = Path(path)
    name = name or str(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{name}: unsupported file type {suffix or '(none)'}; supported: {', '.join(SUFFIXES)}")
    # readers raise anything from struct.error to NotImplementedError on a damaged or exotic file: all mean the same
    try:
        if suffix == ".npy":
            a = np.load(path, allow_pickle=False)
            if a.ndim not in (2, 3):
                raise InputError(f"{name}: a .npy must be 2-D [H, W] or a 3-D stack [N, H, W], got shape {a.shape}")
            return ([a] if a.ndim == 2 else list(a)), a.dtype.name, a.ndim == 3
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                if getattr(im, "n_frames", 1) > 1:
                    raise InputError(f"{name}: animated PNG ({im.n_frames} frames); give one image per file or a "
                                     "TIFF stack")
                im = im.convert("RGBA") if im.mode in ("P", "PA") else im  # palette indices are not the values
                a = np.asarray(im)
            return [a], a.dtype.name, False
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if not p.is_reduced]  # skip thumbnails and pyramid levels
            out = []
            for i, page in enumerate(pages):
                where = f"{name} page {i}" if len(pages) > 1 else name
                sep, depth, h, w, contig = page.shaped
                rgb = page.photometric == tifffile.PHOTOMETRIC.RGB
                gray = page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
                if depth != 1 or not (rgb or (gray and page.samplesperpixel == 1)):
                    raise InputError(f"{where}: unsupported TIFF layout (photometric {page.photometric.name}, "
                                     f"{page.samplesperpixel} samples per pixel, depth {depth}); give gray pages")
                a = np.moveaxis(page.asarray().reshape(page.shaped)[:, 0], 0, -1).reshape(h, w, sep * contig)
                out.append(a if rgb else a[..., 0])
            if not out:
                raise InputError(f"{name}: the TIFF holds no image")
            return out, out[0].dtype.name, len(out) > 1
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{name}: unreadable ({type(exc).__name__}: {exc})") from None


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


def read_images(path: Path, name: str | None = None) -> list[tuple[int | None, np.ndarray]]:
    """[(page or None, float32 [H, W])] of one file: the page number is None for a single image."""
    name = name or str(path)
    pages, _, stack = read_pages(path, name)
    return [(i if stack else None, as_image(a, f"{name} page {i}" if stack else name)) for i, a in enumerate(pages)]

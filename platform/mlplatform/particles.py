"""Particles in a predicted mask: what a microscopist counts and measures, and the pictures that show it.

A particle is a connected component of the mask (8-connected: pixels touching at a corner belong together, as the
eye joins them), found and measured by scikit-image (``measure.label``, ``measure.regionprops``). Sizes are in nm,
from the image's pixel size in Å (nm = Å / 10): area = pixels x (pixel size)², equivalent diameter = the diameter
of the disc of that area, major and minor axis = the axes of the ellipse with the component's second moments.
Particles are numbered 1, 2, ... in scan order of their first pixel (row by row), the numbers of the overlay.

``touches_edge``: a particle with a pixel on the image border is cut by the field of view; its size is a lower bound
(summaries count them; a size distribution of whole particles leaves them out).

Pure functions: arrays in, rows and pictures out; ``mlplatform.predict`` writes them.
"""

from __future__ import annotations

import io

import numpy as np

# the columns of the particle table, in order; units in the names (px: pixels of the input image)
COLUMNS = ("image", "particle", "area_nm2", "equivalent_diameter_nm", "centroid_row_px", "centroid_col_px",
           "centroid_row_nm", "centroid_col_nm", "major_axis_nm", "minor_axis_nm", "touches_edge")
OUTLINE_RGB, NUMBER_RGB = (255, 48, 48), (255, 255, 0)


def measure_particles(mask: np.ndarray, pixel_size_A: float, image: str = "",
                      min_area_nm2: float = 0.0) -> list[dict]:
    """One row (:data:`COLUMNS`) per particle of a [H, W] mask (non-zero = particle) of pixel size ``pixel_size_A``
    (Å); particles smaller than ``min_area_nm2`` (nm²) are left out and the others numbered without gaps."""
    from skimage.measure import label, regionprops

    labels = label(np.asarray(mask) != 0, connectivity=2)
    nm = float(pixel_size_A) / 10.0
    h, w = labels.shape
    rows = []
    for region in regionprops(labels):  # in label order: scan order of each component's first pixel
        area_nm2 = float(region.area) * nm * nm
        if area_nm2 < min_area_nm2:
            continue
        r0, c0, r1, c1 = region.bbox
        row, col = region.centroid
        rows.append({"image": image, "particle": len(rows) + 1, "area_nm2": area_nm2,
                     "equivalent_diameter_nm": float(region.equivalent_diameter_area) * nm,
                     "centroid_row_px": float(row), "centroid_col_px": float(col),
                     "centroid_row_nm": float(row) * nm, "centroid_col_nm": float(col) * nm,
                     "major_axis_nm": float(region.axis_major_length) * nm,
                     "minor_axis_nm": float(region.axis_minor_length) * nm,
                     "touches_edge": bool(r0 == 0 or c0 == 0 or r1 == h or c1 == w),
                     "_label": region.label})
    return rows


def particle_labels(mask: np.ndarray, rows: list[dict]) -> np.ndarray:
    """int32 [H, W]: each kept particle's pixels carry its number (0 elsewhere, and for particles left out)."""
    from skimage.measure import label

    labels = label(np.asarray(mask) != 0, connectivity=2)
    lut = np.zeros(labels.max() + 1, np.int32)
    for r in rows:
        lut[r["_label"]] = r["particle"]
    return lut[labels]


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows as written: :data:`COLUMNS` only."""
    return [{k: r[k] for k in COLUMNS} for r in rows]


def summary(rows: list[dict]) -> dict:
    """Count, median and mean equivalent diameter (nm; None without particles) and how many touch the edge."""
    d = np.array([r["equivalent_diameter_nm"] for r in rows], float)
    return {"count": len(rows), "median_diameter_nm": float(np.median(d)) if d.size else None,
            "mean_diameter_nm": float(d.mean()) if d.size else None,
            "touching_edge": sum(bool(r["touches_edge"]) for r in rows)}


def overlay(image: np.ndarray, mask: np.ndarray, rows: list[dict]) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the micrograph (1st-99th percentile as black-white), each kept particle outlined and its
    number written at its centroid."""
    from PIL import Image, ImageDraw, ImageFont
    from skimage.segmentation import find_boundaries

    image = np.asarray(image, np.float64)
    lo, hi = np.percentile(image, [1, 99])
    grey = (np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    numbered = particle_labels(mask, rows)
    edge = find_boundaries(numbered, mode="inner") & (numbered > 0)
    if min(image.shape) >= 256:  # a one-pixel line vanishes when a large image is shown on a screen
        edge |= find_boundaries(numbered, mode="outer") & (numbered == 0)
    rgb[edge] = OUTLINE_RGB
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(image.shape) // 40))
    for r in rows:
        draw.text((r["centroid_col_px"], r["centroid_row_px"]), str(r["particle"]), fill=NUMBER_RGB, font=font,
                  anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def size_histogram_png(rows: list[dict], title: str = "") -> bytes:
    """A PNG: histogram of the equivalent diameters (nm), particles touching the image edge stacked apart."""
    from matplotlib.figure import Figure

    whole = [r["equivalent_diameter_nm"] for r in rows if not r["touches_edge"]]
    cut = [r["equivalent_diameter_nm"] for r in rows if r["touches_edge"]]
    fig = Figure(figsize=(5, 3.4), dpi=100)
    ax = fig.add_subplot()
    if rows:
        d = whole + cut
        bins = np.histogram_bin_edges(d, bins=min(30, max(5, len(d) // 3)))
        ax.hist([whole, cut], bins=bins, stacked=True, color=["tab:blue", "tab:gray"],
                label=[f"whole ({len(whole)})", f"touching the edge ({len(cut)})"])
        ax.axvline(float(np.median(d)), color="k", ls="--", lw=1, label=f"median {np.median(d):.2f} nm")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no particles", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("equivalent diameter (nm)")
    ax.set_ylabel("particles")
    ax.set_title(title or f"{len(rows)} particles", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

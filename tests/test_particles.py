"""Particles in masks (mlplatform.particles): counted and sized right on generated images whose metadata say where
each particle is, with sizes in nm from the pixel size; the minimum area, edge flags, overlay and histogram."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mlplatform.particles import measure_particles, overlay, size_histogram_png, summary

# three gold spheres, none across the edge, in the tiny recipe's 32 Å field (128 px of 0.25 Å)
SEVERAL = ("structure.particle.count=3", "structure.particle.min_gap_A=2", "structure.particle.off_field_probability=0",
           "structure.particle.radius_A={dist: uniform, low: 3.5, high: 4.5}", "imaging.crop_px=128")


@pytest.fixture(scope="module")
def sample(tiny_dataset):
    from hrtem_core.dataset import iter_dataset

    ((_, arrays, meta),) = iter_dataset(tiny_dataset(1, 7, *SEVERAL))
    return arrays["image.npy"], arrays["mask.npy"], meta


def test_particles_of_a_generated_image_are_counted_placed_and_sized(sample):
    """The true mask is the truth for size: each particle's equivalent diameter is that of the mask pixels nearest
    to its centre in the metadata (no labelling involved), and the areas add up to the mask's."""
    image, mask, meta = sample
    px_A, truth = meta["imaging"]["pixel_size_A"], meta["structure"]["particles"]
    rows = measure_particles(mask, px_A, "img")
    assert len(rows) == len(truth) == meta["structure"]["n_particles"] == 3
    centres = np.array([p["center_px"] for p in truth])  # [row, col]
    rr, cc = np.nonzero(mask)
    nearest = np.argmin((rr[:, None] - centres[:, 0]) ** 2 + (cc[:, None] - centres[:, 1]) ** 2, axis=1)
    nm = px_A / 10
    for row in rows:
        here = np.array([row["centroid_row_px"], row["centroid_col_px"]])
        k = int(np.argmin(np.linalg.norm(centres - here, axis=1)))
        assert np.linalg.norm(centres[k] - here) < truth[k]["radius_A"] / px_A  # found where it was put
        own_d_nm = 2 * np.sqrt((nearest == k).sum() / np.pi) * nm
        assert row["equivalent_diameter_nm"] == pytest.approx(own_d_nm, rel=0.05)
        assert row["centroid_row_nm"] == pytest.approx(row["centroid_row_px"] * nm)
        assert not row["touches_edge"]
    assert sum(r["area_nm2"] for r in rows) == pytest.approx(meta["mask"]["n_pixels"] * nm**2)
    assert [r["particle"] for r in rows] == [1, 2, 3]
    # the smallest left out by a minimum area between it and the next; the others numbered without a gap
    areas = sorted(r["area_nm2"] for r in rows)
    kept = measure_particles(mask, px_A, "img", min_area_nm2=(areas[0] + areas[1]) / 2)
    assert [r["particle"] for r in kept] == [1, 2] and min(r["area_nm2"] for r in kept) == areas[1]
    # cut through the first particle's centre: it now touches the edge
    cut = measure_particles(mask[int(rows[0]["centroid_row_px"]):], px_A)
    assert cut[0]["touches_edge"] and summary(cut)["touching_edge"] == 1
    picture = overlay(image, mask, rows)
    assert picture.shape == (*mask.shape, 3) and picture.dtype == np.uint8


def test_axes_of_an_ellipse_and_the_summary():
    from skimage.draw import ellipse

    mask = np.zeros((120, 200), np.uint8)
    mask[ellipse(60, 60, 20, 40)] = 1  # semi-axes 20 rows, 40 cols
    mask[ellipse(60, 150, 10, 10)] = 1
    rows = measure_particles(mask, 2.0)  # 0.2 nm pixels
    assert rows[0]["major_axis_nm"] == pytest.approx(80 * 0.2, rel=0.03)
    assert rows[0]["minor_axis_nm"] == pytest.approx(40 * 0.2, rel=0.03)
    assert rows[1]["equivalent_diameter_nm"] == pytest.approx(20 * 0.2, rel=0.05)
    s = summary(rows)
    assert s["count"] == 2 and s["touching_edge"] == 0
    assert s["median_diameter_nm"] == pytest.approx(np.mean([r["equivalent_diameter_nm"] for r in rows]))
    assert summary([]) == {"count": 0, "median_diameter_nm": None, "mean_diameter_nm": None, "touching_edge": 0}
    assert Image.open(io.BytesIO(size_histogram_png(rows))).format == "PNG"

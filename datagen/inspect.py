"""Looking at a dataset: a contact sheet of images with their mask outlines, and metadata distributions.

Both read through :func:`hrtem_core.dataset.iter_dataset`, one sample at a time: the contact sheet stops after its
panels, and ``dataset_info`` keeps scalars only, never images.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np

from hrtem_core.dataset import iter_dataset, read_manifest
from hrtem_core.errors import InputError
from hrtem_core.files import write_atomic
from hrtem_core.locations import Location, as_location, name_of

MAX_PANELS = 64
COLUMNS = 4
SCALE_BARS_NM = (0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
MASK_COLOUR = "#ffb000"
CENTRE_COLOUR = "#00e5ff"


def _sec(meta: dict, name: str) -> dict:
    """A metadata section, empty where the sample has none (imported data: no structure, imaging or seed)."""
    return meta.get(name) or {}


# (label, unit, value of one sample from its arrays and metadata); a missing value (e.g. no particle) is None
NUMERIC = (
    ("structure.radius_A", "Å", lambda a, m: _sec(m, "structure").get("radius_A")),
    ("structure.n_defects", "", lambda a, m: _sec(m, "structure").get("n_defects")),
    ("structure.substrate_thickness_A", "Å", lambda a, m: _sec(m, "structure").get("substrate_thickness_A")),
    ("imaging.defocus_A", "Å", lambda a, m: _sec(m, "imaging").get("defocus_A")),
    ("imaging.dose_e_per_A2", "e/Å²", lambda a, m: _sec(m, "imaging").get("dose_e_per_A2")),
    ("imaging.focal_spread_A", "Å", lambda a, m: _sec(m, "imaging").get("focal_spread_A")),
    ("mask.area_fraction", "", lambda a, m: m["mask"].get("area_fraction")),
    ("image mean counts", "e/px", lambda a, m: float(a["image.npy"].mean(dtype=np.float64))),
)
CATEGORICAL = (
    ("structure.kind", lambda m: _sec(m, "structure").get("kind")),
    ("structure.material", lambda m: _sec(m, "structure").get("material")),
    ("structure.has_twin", lambda m: _sec(m, "structure").get("has_twin")),
    ("structure.has_stacking_fault", lambda m: _sec(m, "structure").get("has_stacking_fault")),
    ("structure.orientation_mode", lambda m: _sec(m, "structure").get("orientation_mode")),
    ("split", lambda m: m.get("split")),
    ("image shape", lambda m: "×".join(map(str, _sec(m, "imaging")["shape"])) if "shape" in _sec(m, "imaging")
     else None),
    ("imaging.pixel_size_A", lambda m: _sec(m, "imaging").get("pixel_size_A")),
)
HIST_BINS = 12
BLOCKS = " ▁▂▃▄▅▆▇█"


# ------------------------------------------------------------------------------------------------- contact sheet


def _caption(meta: dict, mask: np.ndarray) -> str:
    s, im = meta.get("structure"), meta.get("imaging")
    if s is None or im is None:  # imported: what the source section knows
        src = _sec(meta, "source")
        page = f" page {src['page']}" if src.get("page") is not None else ""
        dose = f" · {src['dose_e_per_A2']:.0f} e/Å²" if src.get("dose_e_per_A2") is not None else ""
        return (f"{src.get('file', '?')}{page}\n{src.get('pixel_size_A', 0):.3g} Å/px{dose}\n"
                f"mask {100 * mask.mean():.1f} % ({int(mask.sum())} px)")
    if s.get("kind", "none") == "none":
        particle = "no particle"
    else:
        particle = (f"{s.get('material', '?')} r {s['radius_A']:.1f} Å · {s.get('n_twins', 0)} twin, "
                    f"{s.get('n_stacking_faults', 0)} SF")
    return (f"{particle}\n"
            f"Δf {im['defocus_A'] / 10:+.1f} nm · {im['dose_e_per_A2']:.0f} e/Å²\n"
            f"{s.get('substrate_element', '')} substrate {s.get('substrate_thickness_A', 0):.1f} Å · "
            f"mask {100 * mask.mean():.1f} % ({int(mask.sum())} px)")


def _scale_bar_nm(width_A: float) -> float:
    """The longest round length that takes at most a third of the panel."""
    fitting = [nm for nm in SCALE_BARS_NM if 10 * nm <= width_A / 3]
    return fitting[-1] if fitting else SCALE_BARS_NM[0]


def _panel(ax, key: str, image: np.ndarray, mask: np.ndarray, meta: dict) -> None:
    from matplotlib.patheffects import withStroke

    h, w = image.shape
    # per panel: dose differs between samples, and a few hot pixels must not wash the lattice out
    lo, hi = np.percentile(image, [1, 99])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if 0 < mask.sum() < mask.size:
        # sample [i, j] sits at (x=j, y=i), as imshow draws it: the 0.5 level runs on the pixel edges
        ax.contour(np.arange(w), np.arange(h), mask, levels=[0.5], colors=MASK_COLOUR, linewidths=0.9)
    if "center_px" in _sec(meta, "structure"):
        row, col = meta["structure"]["center_px"]
        ax.plot(col, row, "+", color=CENTRE_COLOUR, ms=7, mew=1.2)
    pixel_A = _sec(meta, "imaging").get("pixel_size_A") or _sec(meta, "source")["pixel_size_A"]
    nm = _scale_bar_nm(w * pixel_A)
    x1, y = w - 0.5 - 0.05 * w, h - 0.5 - 0.07 * h
    x0 = x1 - 10 * nm / pixel_A
    outline = [withStroke(linewidth=4.5, foreground="black")]  # legible on bright and dark areas alike
    ax.plot([x0, x1], [y, y], color="white", lw=2.5, solid_capstyle="butt", path_effects=outline)
    ax.text((x0 + x1) / 2, y - 0.03 * h, f"{nm:g} nm", color="white", fontsize=8, ha="center", va="bottom",
            path_effects=[withStroke(linewidth=2, foreground="black")])
    ax.set_xlim(-0.5, w - 0.5)  # the marker and the bar must not widen the view
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(key, fontsize=9, family="monospace", loc="left", pad=3)
    ax.set_xlabel(_caption(meta, mask), fontsize=8, loc="left", linespacing=1.3, labelpad=3)


def contact_sheet(root: Location, out: Path, n: int = 16) -> Path:
    """A PNG grid of the first ``n`` samples (key order): image, mask outline, particle centre, key metadata."""
    from matplotlib.figure import Figure

    root, out = as_location(root), Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the contact sheet is a PNG; give a path ending in .png")
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give a path ending in .png")
    if not 1 <= n <= MAX_PANELS:
        raise InputError(f"--n {n}: a contact sheet holds 1 to {MAX_PANELS} panels")
    manifest = read_manifest(root)
    samples = list(islice(iter_dataset(root), n))
    if not samples:
        raise InputError(f"{root}: the dataset holds no samples")

    cols = min(COLUMNS, len(samples))
    rows = math.ceil(len(samples) / cols)
    # at least two panels wide, so that the title and the legend fit above and below a single panel
    fig = Figure(figsize=(3.2 * max(cols, 2), 3.9 * rows + 0.9), dpi=150, layout="compressed")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, arrays, meta) in zip(axes, samples):
        _panel(ax, key, arrays["image.npy"], arrays["mask.npy"], meta)
    for ax in axes[len(samples):]:
        ax.set_axis_off()
    recipe = manifest.get("generation", {}).get("recipe_name", "?")
    origin = "imported" if manifest.get("source") else f"recipe {recipe}"
    fig.suptitle(f"{manifest.get('name', name_of(root))}\n{origin}  ·  content {manifest['content_hash'][:12]}"
                 f"  ·  first {len(samples)} of {manifest['n_samples']} samples", fontsize=11)
    fig.supxlabel("outline: particle mask    +: structure.center_px\n"
                  "contrast: 1st–99th percentile per image    Δf: defocus (positive = underfocus)",
                  fontsize=7.5, color="0.3")
    fig.get_layout_engine().set(h_pad=0.08)

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=150, facecolor="white")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, png.getvalue())
    return out


# ------------------------------------------------------------------------------------------------- dataset info


def _category(value) -> str:
    if value is None:
        return "(missing)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _numeric_summary(values: list[float], unit: str) -> dict:
    if not values:
        return {"unit": unit, "n": 0}
    v = np.asarray(values, np.float64)
    out = {"unit": unit, "n": len(v), "min": float(v.min()), "mean": float(v.mean()), "median": float(np.median(v)),
           "max": float(v.max())}
    if v.max() > v.min():
        integral = np.all(v == np.round(v)) and v.max() - v.min() < HIST_BINS
        # whole numbers get one bin per value, so that 0, 1, 2 defects do not fall into uneven bins
        bins = np.arange(v.min(), v.max() + 2) - 0.5 if integral else HIST_BINS
        counts, edges = np.histogram(v, bins=bins)
        out["hist"] = {"edges": edges.tolist(), "counts": counts.tolist()}
    return out


def _sparkline(counts: list[int]) -> str:
    top = max(counts)
    return "".join(BLOCKS[math.ceil(8 * c / top)] for c in counts)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _text(info: dict) -> str:
    c = info["counts"]
    src, per = info.get("source"), info["imaging_conditions_per_structure"]
    lines = [
        f"dataset     {info['name']}  ({info['path']})",
        (f"source      imported from {src['images']}: {src['n_files']} files, pixel {src['pixel_size_A']} Å, "
         f"dose {src['dose_e_per_A2'] or '-'} e/Å²") if src else
        f"recipe      {info['recipe']['name']}  hash {info['recipe']['hash'][:12]}   seed {info['seed']}",
        f"content     {info['content_hash']}",
        f"samples     {c['samples']} in {c['shards']} shards, {c['structures']} structures"
        + (f" × {per} imaging conditions" if per else ""),
        "splits      " + ", ".join(f"{k}: {v}" for k, v in c["splits"].items()),
        "",
    ]
    header = ("field", "unit", "n", "min", "mean", "median", "max")
    rows = [(name, s["unit"], str(s["n"]), *(_fmt(s[k]) if s["n"] else "-" for k in ("min", "mean", "median", "max")))
            for name, s in info["numeric"].items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row, hist=""):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [x.rjust(w) for x, w in zip(row[2:], widths[2:])]
        return "  ".join(cells) + (f"  {hist}" if hist else "")

    lines.append(line(header, "histogram min→max"))
    for row, s in zip(rows, info["numeric"].values()):
        lines.append(line(row, f"▕{_sparkline(s['hist']['counts'])}▏" if "hist" in s else ""))
    lines.append("")
    width = max(len(name) for name in info["categorical"])
    for name, counts in info["categorical"].items():
        lines.append(f"{name.ljust(width)}  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)


def dataset_info(root: Location) -> dict:
    """Counts, identity and metadata distributions of a finished dataset (a folder or an object-storage prefix);
    ``info['text']`` is a readable table."""
    root = as_location(root)
    manifest = read_manifest(root)
    numeric: dict[str, list[float]] = {name: [] for name, _, _ in NUMERIC}
    categorical: dict[str, Counter] = {name: Counter() for name, _ in CATEGORICAL}
    structures = set()
    n = 0
    for key, arrays, meta in iter_dataset(root):
        n += 1
        # as mlplatform.curation: without seed.structure, the key up to "_" names the structure
        structures.add(_sec(meta, "seed").get("structure", key.partition("_")[0]))
        for name, _, get in NUMERIC:
            value = get(arrays, meta)
            if value is not None:
                numeric[name].append(float(value))
        for name, get in CATEGORICAL:
            categorical[name][_category(get(meta))] += 1
    info = {
        "name": manifest.get("name"),
        "path": str(root),
        "recipe": {"name": manifest.get("generation", {}).get("recipe_name"), "hash": manifest.get("recipe_hash")},
        "seed": manifest.get("seed"),
        # an import's origin, without its per-file list
        "source": {**{k: v for k, v in manifest["source"].items() if k != "files"},
                   "n_files": len(manifest["source"]["files"])} if manifest.get("source") else None,
        "content_hash": manifest.get("content_hash"),
        "imaging_conditions_per_structure": manifest.get("imaging_conditions_per_structure"),
        "counts": {"samples": n, "structures": len(structures), "shards": len(manifest["shards"]),
                   "splits": dict(categorical["split"].most_common())},
        "numeric": {name: _numeric_summary(numeric[name], unit) for name, unit, _ in NUMERIC},
        "categorical": {name: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
                        for name, c in categorical.items()},
    }
    info["text"] = _text(info)
    return info

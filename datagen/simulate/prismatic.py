"""Prismatic 2.x backend: plane-wave HRTEM exit waves through ``pyprismatic`` (``simulation.backend: prismatic``).

PyPI's pyprismatic (1.1.x, 2017) predates HRTEM mode; Prismatic 2.x comes from conda-forge or a source build, and
its pyprismatic kept a 1.x version number, so HRTEM support is detected by feature (2.x Metadata fields).

What this module relies on, as read in github.com/prism-em/prismatic (2.x sources):

* ``pyprismatic/core.cpp``: ``E0`` is given in keV (``meta.E0 = E0 * 1000``), tilts in mrad; ``algorithm`` "hrtem"
  (or "t") selects HRTEM. ``go()`` writes ``scratch_param.txt`` into the working directory and, on parameters it
  rejects, only prints "Invalid parameters detected" and returns, so we run it in a scratch folder and check that the
  output file exists.
* ``include/params.h`` (``Parameters``): the potential grid is ``4 f round(L / (realspacePixelSize 4 f))`` points,
  ``f`` the interpolation factor, pixel ``L / N``; in HRTEM mode the interpolation factor only thins the tilt grid.
  ``src/PRISM02_calcSMatrix.cpp`` (``setupSMatrixCoordinates``, ``downsampleFourierComponents``): the output keeps the
  inner half of the spectrum (the anti-aliasing band), i.e. ``N / 2`` points at twice the potential pixel.
* ``src/atom.cpp`` (``readAtoms_xyz``): comment line; ``a b c``; lines ``Z x y z occupancy thermal_sigma``
  (whitespace or commas); a line of at most 3 characters (``-1``) ends the list; ``Z <= NUM_SPECIES_KIRKLAND = 103``
  (``include/kirkland_params.h``). A file it cannot read ends the whole process (``HRTEM_entry.cpp``: "Terminating",
  ``exit(1)``), hence the checks in :func:`write_xyz`.
* ``src/PRISM01_calcPotential.cpp`` (``generateProjectedPotentials``, the 2-D potential used with ``potential3D``
  off): slice index ``round((z_top - z) / dz + 0.5) - 1``, so the beam enters at the *largest* z (the file holds
  ``z' = Lz - z``); atoms are stamped at the nearest potential pixel, ``round(x / pixel)``. The 3-D path orders its
  slices the other way round in the version read, so it is not used.
* ``src/HRTEM_entry.cpp`` (``HRTEM_entry_pars``, ``HRTEM_runFP``) and ``src/fileIO.cpp`` (``setupHRTEMOutput``,
  ``saveHRTEM``): with ``saveComplexOutputWave`` each frozen-phonon configuration is written to
  ``4DSTEM_simulation/data/realslices/HRTEM_fp0000/data`` (``_fp0001``...), a compound ``{r, i}`` float32 array
  (h5py reads it as complex64) of shape ``(Nx/2, Ny/2, n_tilts)``, axis 0 being x (``dim1`` = "R_x"); earlier 2.0
  builds wrote ``HRTEM/realslice``. ``datacubes/HRTEM_virtual`` is only a virtual (x, y, tilt_x, tilt_y) view of it.
  The wave is scaled so that vacuum has amplitude 1, as abTEM's unnormalised plane wave.
* ``include/meta.h``: the HRTEM tilt window defaults to 0..0 mrad, i.e. the untilted plane wave only.
* ``src/PRISM02_calcSMatrix.cu`` (HRTEM branch, "center defocus at middle of cell"): before cropping, the wave is
  multiplied by ``propBack``, ``exp(+i pi lambda (Lz/2) q^2 - i chi)`` (CPU source of 2.0,
  ``PRISM02_calcSMatrix.cpp``, ``setupCoordinates`` and ``propagatePlaneWave_CPU_batch``; chi is zero here: no
  defocus, C3, C5 or aberration file). The saved wave is therefore
  referred to the cell mid-plane; :func:`to_exit_plane` propagates it forward by ``Lz/2`` to the exit surface.

What real runs (Prismatic 2.0 built by ``make prismatic``, against our abTEM backend with Kirkland potentials, the same
atoms, grid and 2 Å slices; 2026-11-28) showed:

* Axis order: Prismatic's (x, y) output transposed to [row=y, col=x] matches abTEM (complex correlation 0.976 as read,
  0.12 transposed, 0.04 / 0.19 flipped), and an off-centre particle's projected centre lands on ``center_px``
  (tests/test_prismatic.py).
* Mid-plane reference, sign and distance: one Au atom at depth 1, 3, 9 or 17 Å in an 18 Å cell matches abTEM best
  after a forward propagation of exactly ``Lz/2`` (scanned 7-12 Å in 0.5 Å steps; correlation 0.998-0.999 there).
  For a 7 Å Au particle in that cell: 0.976 forward by Lz/2, 0.80 without propagation, 0.67 backward by Lz/2.
  ``propBack`` uses ``tiledCellDim[0]``, which is z (``meta.h``: cellDim is z, y, x), and the slices run
  transmit-then-propagate from our z = 0 like abTEM's, so the output plane is the exit surface minus Lz/2.
* Band: Prismatic keeps the inner half of its spectrum, a square reaching the exit-wave Nyquist frequency; abTEM's
  waves stop at its antialiasing disc (2/3 of Nyquist, power beyond it 3e-15). Prismatic put 1e-3 of the wave's
  power beyond that disc, which lowered the correlation with abTEM from 0.992 to 0.978 for a 7 Å particle;
  :func:`to_exit_plane` applies abTEM's own antialiasing aperture so both backends hand on the same band.
* Scale: vacuum comes out at amplitude 1.0000 as abTEM's unnormalised plane wave; no rescaling needed.
* Reproducibility: two runs on the same atoms differ by up to 1.5e-6 in the wave (amplitude ~1), with
  ``numThreads`` 1 or 2 alike: the S-matrix propagation plans its FFTs with ``FFTW_MEASURE``
  (``PRISM02_calcSMatrix.cpp``), whose choice of algorithm varies from run to run. A Prismatic dataset is therefore
  reproducible to a tolerance, not bit for bit (README, "Prismatic"); ``verify`` checks the stored arrays against the
  manifest as for any dataset, and a resumed dataset keeps its finished shards, so it stays self-consistent.
* Side effects: ``go()`` writes ``scratch_param.txt`` into the working directory and ``prismatic_gui_params.txt`` into
  ``$HOME`` (it needs HOME set). Each backend run works in its own temporary folder, with HOME pointed there when it is
  unset; the working directory and file descriptors 1/2 belong to the whole process, so runs in threads of one
  process take turns (:data:`_PROCESS_STATE`); separate worker processes run side by side.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from hrtem_core.errors import InputError

from ..recipe import Simulation
from ..structures import Scene
from .backend import Backend, electron_wavelength_A

MAX_ATOMIC_NUMBER = 103  # NUM_SPECIES_KIRKLAND: Prismatic has Kirkland potentials for Z <= 103 only
POT_BOUND_A = 3.0  # radius within which each atom's projected potential is summed (Prismatic's default, meta.h)
REFERENCE_PLANE_FRACTION = 0.5  # Prismatic refers its HRTEM wave to z = Lz * this (propBack, see module docstring)
HRTEM_DATASETS = (  # newest layout first
    "4DSTEM_simulation/data/realslices/HRTEM_fp0000/data",
    "4DSTEM_simulation/data/realslices/HRTEM/data",
    "4DSTEM_simulation/data/realslices/HRTEM/realslice",
)
HRTEM_FIELDS = ("saveComplexOutputWave", "maxXtilt", "minXtilt", "potential3D")  # Metadata attributes of 2.x only
_NEEDS = ("simulation.backend=prismatic needs Prismatic 2.x with HRTEM mode "
          "(pyprismatic from conda-forge or built from source)")


def write_xyz(path, positions, numbers, cell_A, comment: str = "") -> None:
    """Prismatic's XYZ file of atoms at ``positions`` (Å, beam along +z), occupancy 1, thermal sigma 0.

    The beam enters Prismatic's cell at the largest z, so z is written as ``z' = Lz - z``; z' is clipped into
    [0, Lz) because Prismatic drops atoms whose slice falls outside the cell. x and y are written as given: Prismatic
    wraps the potential of atoms outside [0, L) periodically.
    """
    positions = np.asarray(positions, float).reshape(-1, 3)
    numbers = np.asarray(numbers, int).reshape(-1)
    if len(numbers) == 0 or len(numbers) != len(positions):
        raise ValueError(f"Prismatic needs at least one atom and a number per position "
                         f"(got {len(numbers)} numbers, {len(positions)} positions)")
    if numbers.min() < 1 or numbers.max() > MAX_ATOMIC_NUMBER:
        raise ValueError(f"atomic numbers must be 1..{MAX_ATOMIC_NUMBER} for Prismatic, got "
                         f"{numbers.min()}..{numbers.max()}")
    lx, ly, lz = (float(v) for v in cell_A)
    z = np.clip(lz - positions[:, 2], 0.0, lz - 1e-6)
    lines = [" ".join(comment.split()), f"{lx:.8f} {ly:.8f} {lz:.8f}"]  # one comment line, whatever it held
    lines += [f"{n:d} {x:.8f} {y:.8f} {zz:.8f} 1.0 0.0" for n, x, y, zz in zip(numbers, positions[:, 0],
                                                                           positions[:, 1], z)]
    lines.append("-1")
    Path(path).write_text("\n".join(lines) + "\n")


def prismatic_gpts(gpts: int) -> int:
    """Prismatic's output points per side for our ``gpts``: its potential grid is a multiple of 4 (params.h with
    interpolation factor 1) and its output half of that, so even; an odd ``gpts`` is simulated on ``gpts + 1``."""
    return gpts + gpts % 2


def prismatic_parameters(sim: Simulation, cell_A, gpts: int, atoms_path, output_path, device: str = "cpu",
                         threads: int = 1) -> dict:
    """pyprismatic ``Metadata`` attributes for one configuration, exit wave on ``gpts`` points per side.

    The potential pixel is ``L / (2 n)`` with ``n = prismatic_gpts(gpts)``: Prismatic rounds it to a grid of ``2 n``
    points (a multiple of 4) and returns ``n`` points, i.e. ``gpts`` at ``L / gpts`` when ``gpts`` is even.
    Frozen phonons are ours (``randomSeed`` is ignored in HRTEM mode and the particle-only and full scenes must share
    the displacements), so Prismatic runs one configuration with its thermal displacements off.
    """
    lx, ly, lz = (float(v) for v in cell_A)
    n = prismatic_gpts(gpts)
    zero_tilt = {k: 0.0 for k in ("minXtilt", "maxXtilt", "minYtilt", "maxYtilt", "xTiltOffset", "yTiltOffset")}
    return {
        "filenameAtoms": str(atoms_path), "filenameOutput": str(output_path),  # first: setting it may read the cell
        "algorithm": "hrtem", "E0": sim.energy_eV / 1e3,  # keV
        "realspacePixelSizeX": lx / (2 * n), "realspacePixelSizeY": ly / (2 * n),
        "interpolationFactorX": 1, "interpolationFactorY": 1,
        "cellDimX": lx, "cellDimY": ly, "cellDimZ": lz, "tileX": 1, "tileY": 1, "tileZ": 1,
        "potBound": POT_BOUND_A, "sliceThickness": sim.slice_thickness_A, "potential3D": False,
        "numSlices": 0, "zStart": 0.0,
        "numFP": 1, "includeThermalEffects": False, "includeOccupancy": False, "randomSeed": 0,
        "probeDefocus": 0.0, "C3": 0.0, "C5": 0.0, "aberrations_file": "",  # chi = 0 in propBack
        **zero_tilt,  # the untilted plane wave only
        "saveComplexOutputWave": True, "save2DOutput": False, "save3DOutput": False, "save4DOutput": False,
        "savePotentialSlices": False, "saveSMatrix": False,
        "numGPUs": 1 if device == "gpu" else 0, "alsoDoCPUWork": True, "numThreads": int(threads),
    }


def read_hrtem_output(h5path, gpts) -> np.ndarray:
    """The complex HRTEM wave of a Prismatic output file as complex64 ``[row=y, col=x]``.

    ``gpts`` is the expected output size, an int (square) or ``(rows, cols)``. Prismatic stores ``(x, y, tilt)``;
    exactly one (the untilted) plane wave is expected.
    """
    import h5py

    rows, cols = (gpts, gpts) if np.isscalar(gpts) else tuple(gpts)
    with h5py.File(h5path, "r") as f:
        name = next((p for p in HRTEM_DATASETS if p in f), None)
        if name is None:
            raise ValueError(f"{h5path}: no HRTEM output (looked for {', '.join(HRTEM_DATASETS)}); "
                             "did Prismatic run in HRTEM mode with saveComplexOutputWave?")
        data = f[name][()]
    where = f"{h5path}:{name}"
    if data.dtype.names == ("r", "i"):  # h5py maps this compound to complex by default; be explicit if not
        data = data["r"] + 1j * data["i"]
    if not np.iscomplexobj(data):
        raise ValueError(f"{where} holds {data.dtype} intensities, not the complex wave (saveComplexOutputWave off)")
    if data.ndim != 3 or data.shape[2] != 1:
        raise ValueError(f"{where} has shape {data.shape}; expected (x, y, tilt) = ({cols}, {rows}, 1), "
                         "one untilted plane wave")
    if data.shape[:2] != (cols, rows):
        raise ValueError(f"{where} is {data.shape[0]} x {data.shape[1]} (x, y) points; expected {cols} x {rows}: "
                         "the pixel size given to Prismatic does not match the requested grid")
    return np.ascontiguousarray(data[:, :, 0].T, dtype=np.complex64)  # (x, y) -> [row=y, col=x]


def _fourier_resize(spectrum: np.ndarray, shape) -> np.ndarray:
    """Crop or zero-pad an unshifted 2-D spectrum to ``shape``, keeping the frequencies centred on zero."""
    for axis, n in enumerate(shape):
        m = spectrum.shape[axis]
        if n == m:
            continue
        s = np.fft.fftshift(spectrum, axes=axis)
        if n < m:
            s = np.take(s, np.arange(m // 2 - n // 2, m // 2 - n // 2 + n), axis=axis)
        else:
            pad = [(0, 0), (0, 0)]
            pad[axis] = (n // 2 - m // 2, n - m - (n // 2 - m // 2))
            s = np.pad(s, pad)
        spectrum = np.fft.ifftshift(s, axes=axis)
    return spectrum


def to_exit_plane(wave: np.ndarray, extent_xy, distance_A: float, energy_eV: float, shape,
                  band_limit: bool = True) -> np.ndarray:
    """Propagate Prismatic's wave ``[row=y, col=x]`` forward by ``distance_A`` (its reference plane lies that far
    before the exit surface), resample it onto ``shape`` by Fourier cropping or padding (only when Prismatic's even
    grid differs from an odd requested one) and, with ``band_limit``, keep abTEM's antialiasing disc on that grid (2/3
    of the Nyquist frequency; Prismatic's own band is a square reaching Nyquist, see the module docstring). All act on
    the spectrum, so one FFT pair does them all.
    """
    ny, nx = wave.shape
    qy = np.fft.fftfreq(ny, extent_xy[1] / ny)[:, None]
    qx = np.fft.fftfreq(nx, extent_xy[0] / nx)[None, :]
    lam = electron_wavelength_A(energy_eV)
    spectrum = np.fft.fft2(wave) * np.exp(-1j * np.pi * lam * distance_A * (qx ** 2 + qy ** 2))
    spectrum = _fourier_resize(spectrum, shape)
    if band_limit:
        from abtem.antialias import antialias_aperture

        # rows are y: the aperture only depends on |q|, so (rows, cols) with (y, x) sampling gives it [row, col]
        spectrum = spectrum * antialias_aperture(tuple(shape), (extent_xy[1] / shape[0], extent_xy[0] / shape[1]), np)
    return (np.fft.ifft2(spectrum) * (shape[0] * shape[1] / (ny * nx))).astype(np.complex64)


_PROCESS_STATE = threading.Lock()
"""Held while a run has changed what the whole process shares: its working directory, file descriptors 1 and 2,
and HOME where it was unset."""


@contextlib.contextmanager
def _run_in(folder: Path, log: Path):
    """The process's working directory in ``folder`` (``go()`` writes ``scratch_param.txt`` there), HOME set to it if
    unset (``go()`` writes ``$HOME/prismatic_gui_params.txt`` and fails without HOME), and stdout/stderr to ``log``;
    one thread of the process at a time."""
    with _PROCESS_STATE:
        cwd, home_unset = os.getcwd(), not os.environ.get("HOME")
        if home_unset:
            os.environ["HOME"] = str(folder)
        try:
            os.chdir(folder)
            with _output_to(log):
                yield
        finally:
            os.chdir(cwd)
            if home_unset:
                os.environ.pop("HOME", None)


@contextlib.contextmanager
def _output_to(path: Path):
    """Send the process's stdout/stderr (Prismatic prints thousands of lines from C++) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            with contextlib.suppress(Exception):  # flush C stdio (std::cout is synced with it) before switching back
                ctypes.CDLL(None).fflush(None)
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def _new_metadata(pyprismatic):
    """A fresh ``pyprismatic.Metadata``; its constructor draws a seed from numpy's global RNG, which is put back."""
    state = np.random.get_state()
    try:
        return pyprismatic.Metadata()
    finally:
        np.random.set_state(state)


def _has(meta, key: str) -> bool:
    """Whether ``meta`` has parameter ``key``; on the class too, as some are properties unset on a fresh object."""
    return hasattr(meta, key) or hasattr(type(meta), key)


def _load_pyprismatic():
    try:
        import pyprismatic
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "pyprismatic":
            raise RuntimeError(f"{_NEEDS}; pyprismatic is not installed") from None
        raise RuntimeError(f"{_NEEDS}; pyprismatic is installed but does not import: {err}") from err
    try:
        from importlib.metadata import version

        found = version("pyprismatic")
    except Exception:
        found = getattr(pyprismatic, "__version__", "of unknown version")
    meta = _new_metadata(pyprismatic)
    missing = [k for k in HRTEM_FIELDS if not _has(meta, k)]
    if missing:
        raise RuntimeError(f"{_NEEDS}; the installed pyprismatic {found} lacks it (its Metadata has no "
                           f"{', '.join(missing)}; PyPI's pyprismatic 1.1.x predates HRTEM mode)")
    return pyprismatic, found


class PrismaticBackend(Backend):
    """Prismatic HRTEM: one run per frozen-phonon configuration, stacked. The displacements are the ones
    ``simulate`` draws for every backend (``backend.phonon_displacements``, from the sample's seed), written as
    displaced coordinates with Prismatic's own thermal effects off: the same structure and seed give the abTEM and the
    Prismatic backend the same atoms.

    Differences from the abTEM backend to keep in mind: Kirkland potentials only, each atom's summed within
    ``potBound`` = 3 Å (masks of Au r = 8 and 20 Å came out 0.2 % and 0.1 % smaller than abTEM's); atoms snapped to the nearest potential pixel (half
    the exit-wave sampling); the wave is cut to abTEM's band (:func:`to_exit_plane`); slices are anchored at the
    entrance face (older 2.x builds: at the first atom met); reproducible to ~1e-6, not bit for bit.
    """

    name = "prismatic"

    def __init__(self):
        self.pyprismatic, self.version = _load_pyprismatic()

    def versions(self):
        return {"pyprismatic": self.version}

    def exit_waves(self, scene: Scene, displacements, sim: Simulation, gpts, device):
        if sim.parametrization != "kirkland":
            raise InputError(f"simulation.parametrization={sim.parametrization!r}: simulation.backend=prismatic "
                             "uses Kirkland's parametrization only; set simulation.parametrization=kirkland")
        n_phonons = displacements.shape[0]
        if len(scene.numbers) == 0:  # Prismatic cannot read an empty atom list; vacuum is a unit plane wave
            return np.ones((n_phonons, gpts, gpts), np.complex64)
        lx, ly, lz = scene.cell_A
        n = prismatic_gpts(gpts)
        out = np.empty((n_phonons, gpts, gpts), np.complex64)
        with tempfile.TemporaryDirectory(prefix="prismatic-") as tmp:
            tmp = Path(tmp)
            for i in range(n_phonons):
                atoms, output = tmp / f"atoms_{i:04d}.xyz", tmp / f"hrtem_{i:04d}.h5"
                write_xyz(atoms, scene.positions + displacements[i], scene.numbers, scene.cell_A,
                          comment=f"hrtem-curation scene, phonon configuration {i}")
                params = prismatic_parameters(sim, scene.cell_A, gpts, atoms, output, device, os.cpu_count() or 1)
                self._run(params, tmp)
                wave = read_hrtem_output(output, n)
                out[i] = to_exit_plane(wave, (lx, ly), lz * REFERENCE_PLANE_FRACTION, sim.energy_eV, (gpts, gpts))
        return out

    def _run(self, params: dict, folder: Path) -> None:
        meta = _new_metadata(self.pyprismatic)
        for key, value in params.items():  # pyprismatic passes only the fields it knows: a typo would be ignored
            if not _has(meta, key):
                raise RuntimeError(f"the installed pyprismatic {self.version} has no parameter {key!r}")
            setattr(meta, key, value)
        log = folder / "prismatic.log"
        with _run_in(folder, log):
            meta.go()
        if not Path(params["filenameOutput"]).is_file():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:]) if log.exists() else ""
            raise RuntimeError(f"Prismatic wrote no output file {params['filenameOutput']}; end of its log:\n{tail}")

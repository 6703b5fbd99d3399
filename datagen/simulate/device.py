"""Where the multislice runs: ``simulation.device`` (cpu, gpu or auto) resolved against what this machine has."""

from __future__ import annotations

import importlib.util


def resolve_device(device: str) -> str:
    """'cpu' or 'gpu' for ``simulation.device``; 'auto' takes a CUDA GPU through CuPy where there is one."""
    if device == "cpu":
        return "cpu"
    has_cupy = importlib.util.find_spec("cupy") is not None
    if device == "gpu":
        if not has_cupy:
            raise RuntimeError("simulation.device=gpu needs CuPy (pip install cupy-cuda12x) and a CUDA GPU")
        return "gpu"
    if has_cupy:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return "gpu"
        except Exception:  # no driver or no device: the CPU it is
            pass
    return "cpu"

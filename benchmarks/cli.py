"""``python -m benchmarks [--quick] [--only a,b,c,d,e,f] [--json FILE]``: run the sections, print one table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

from hrtem_core.cli import ArgumentParser

SECTIONS = "abcdefg"


def _sections(text: str) -> set[str]:
    chosen = {s.strip().lower() for s in text.split(",") if s.strip()}
    bad = sorted(chosen - set(SECTIONS))
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"--only takes letters from {','.join(SECTIONS)}, got {text!r}")
    return chosen


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a few minutes)")
    parser.add_argument("--only", type=_sections, default=set(SECTIONS), help="sections to run, e.g. a,c")
    parser.add_argument("--json", type=Path, help="also write the rows (with notes) to this JSON file")
    parser.add_argument("--workdir", type=Path, help="keep the generated data here instead of a temporary folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    warnings.filterwarnings("ignore")

    from . import generation, scaleout, sweeps, training
    from .table import render

    started = time.perf_counter()
    rows = []
    if args.only & set("abc"):
        rows += generation.run(args.only, args.quick, args.workdir)
    if args.only & set("de"):
        rows += training.run(args.only, args.quick, args.workdir)
    if "f" in args.only:
        rows += sweeps.run(args.only, args.quick, args.workdir)
    if "g" in args.only:
        rows += scaleout.run(args.only, args.quick, args.workdir)
    elapsed = time.perf_counter() - started
    import torch

    print(f"benchmarks ({'quick' if args.quick else 'full'}), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {elapsed:.0f} s")
    print(render(rows))
    missed = [r for r in rows if r.met is False]
    if missed:
        print(f"\ngoals missed: {len(missed)}")
        for r in missed:
            profile = r.notes.get("profile")
            print(f"  {r.section}: {r.metric}" + (f"; profile: {json.dumps(_rounded(profile))}" if profile else ""))
    if args.json:
        args.json.write_text(json.dumps({"quick": args.quick, "seconds": elapsed, "rows": [r.as_dict() for r in rows]},
                                        indent=1, default=str))
    sys.stdout.flush()
    return 0

"""``python -m datagen``: recipes, generate, import, verify, show, info."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from hrtem_core.cli import ArgumentParser, nonneg_int, positive_float, positive_int, run_command
from hrtem_core.config import read_yaml_mapping
from hrtem_core.errors import InputError
from hrtem_core.locations import as_location

from .recipe import available_recipes, load_recipe


def _cmd_recipes(args) -> int:
    for name, path in available_recipes().items():
        data = read_yaml_mapping(path, "recipe")
        print(f"{name:10s} {data.get('description', '').strip().splitlines()[0] if data.get('description') else ''}")
    return 0


def _cmd_generate(args) -> int:
    from .pipeline import generate

    if args.scheduler and args.workers is not None:
        raise InputError("--workers (local processes) and --scheduler (a Dask cluster's workers) exclude each "
                         "other; give one")
    recipe = load_recipe(args.recipe, args.set or [])
    manifest = generate(recipe, n=args.n, seed=args.seed, out=as_location(args.out),
                        workers=args.workers or len(os.sched_getaffinity(0)), keep_waves=args.keep_waves,
                        dataset=args.name, progress=not args.quiet, scheduler=args.scheduler)
    per = manifest["timing_s"]["per_sample_by_stage"]
    print(f"dataset {manifest['name']}: {manifest['n_samples']} samples in {len(manifest['shards'])} shards at "
          f"{args.out}")
    print("per-sample seconds by stage: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    print(f"content_hash {manifest['content_hash']}")
    return 0


def _cmd_import(args) -> int:
    from .importer import import_dataset

    manifest, done = import_dataset(Path(args.images), Path(args.masks), args.pixel_size, Path(args.out),
                                    name=args.name, dose_e_per_A2=args.dose, split=args.split,
                                    override_pixel_size=args.override_pixel_size)
    files = len(manifest["source"]["files"])
    print(f"{'already imported' if done else 'imported'}: dataset {manifest['name']}, {manifest['n_samples']} "
          f"samples from {files} image file(s) in {len(manifest['shards'])} shards at {args.out}")
    print(f"content_hash {manifest['content_hash']}")
    return 0


def _cmd_verify(args) -> int:
    from hrtem_core.dataset import verify_dataset

    summary = verify_dataset(as_location(args.dir))
    print(f"OK {args.dir}: {summary['n_samples']} samples in {summary['n_shards']} shards, "
          f"content_hash {summary['content_hash']}")
    return 0


def _cmd_show(args) -> int:
    from .inspect import contact_sheet

    path = contact_sheet(as_location(args.dir), Path(args.out), n=args.n)
    print(f"wrote {path}")
    return 0


def _cmd_info(args) -> int:
    from .inspect import dataset_info

    info = dataset_info(as_location(args.dir))
    print(json.dumps(info, indent=1) if args.json else info["text"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m datagen", description="Synthetic HRTEM datasets with exact masks.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("recipes", help="list the preset recipes").set_defaults(func=_cmd_recipes)

    g = sub.add_parser("generate", help="generate (or resume) a dataset")
    g.add_argument("--recipe", required=True, help="preset name (see 'recipes') or path to a YAML recipe")
    g.add_argument("--n", type=positive_int, required=True, help="number of samples (images)")
    g.add_argument("--seed", type=nonneg_int, required=True)
    g.add_argument("--out", required=True,
                   help="output folder (created; an unfinished one is resumed), or s3://BUCKET/PREFIX")
    g.add_argument("--workers", type=positive_int, help="local processes (default: all cores)")
    g.add_argument("--scheduler", metavar="ADDRESS|FILE",
                   help="make the shards on a Dask cluster instead: tcp://HOST:PORT or a scheduler file; --out must "
                   "be on a filesystem its workers share")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    g.add_argument("--keep-waves", action="store_true", help="also write the exit waves as waves-*.tar shards")
    g.add_argument("--name", help="dataset name, recorded in every sample (default: RECIPE-seedSEED)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("import", help="experimental micrographs and their masks as a dataset")
    m.add_argument("--images", required=True, help="file or folder: TIFF, PNG, .npy, .dm3/.dm4, .ser, .emd, .mrc "
                   "(stacks: one sample per page)")
    m.add_argument("--masks", required=True, help="file or folder; a mask's stem is its image's, optionally + "
                   "_mask, -mask, _label, ...")
    m.add_argument("--pixel-size", type=positive_float, metavar="A",
                   help="pixel size in Å of the images whose files have no calibration")
    m.add_argument("--override-pixel-size", action="store_true",
                   help="use --pixel-size even where a file's calibration says otherwise")
    m.add_argument("--out", required=True, help="output folder (new or empty)")
    m.add_argument("--name", help="dataset name (default: the name of --images)")
    m.add_argument("--dose", type=positive_float, metavar="E_PER_A2", help="electron dose in e/Å², if known")
    m.add_argument("--split", default="test", help="split recorded in every sample (default: test)")
    m.set_defaults(func=_cmd_import)

    v = sub.add_parser("verify", help="recompute every hash of a dataset")
    v.add_argument("dir")
    v.set_defaults(func=_cmd_verify)

    s = sub.add_parser("show", help="contact sheet: images with mask outlines and key metadata")
    s.add_argument("dir")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--n", type=positive_int, default=16)
    s.set_defaults(func=_cmd_show)

    i = sub.add_parser("info", help="counts and distributions of the main metadata fields")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: what runs is stopped and cleaned up
    (workers killed, half-written files deleted, finally blocks run) before the command exits 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _stop_on_sigterm(func):
    def run(args) -> int:
        try:
            return func(args)
        except Terminated:
            print("terminated (SIGTERM); run the same command again to resume", file=sys.stderr)
            return 128 + signal.SIGTERM

    return run


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # only there can Python handle signals
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        return run_command(_stop_on_sigterm(args.func), args,
                           interrupted="interrupted; run the same command again to resume")
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

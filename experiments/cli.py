"""``python -m experiments``: train, finetune, predict (sweeps, studies and reports build on these)."""

from __future__ import annotations

import argparse
import sys

from hrtem_core.cli import (ArgumentParser, check_port_free, nonneg_float, port, positive_float, positive_int,
                            run_command)
from hrtem_core.errors import InputError


def _cmd_train(args) -> int:
    from mlplatform.config import load_config
    from mlplatform.train import train

    overrides = [*(args.set or []), *(["data.skip_bad_shards=true"] if args.skip_bad_shards else [])]
    config = load_config(args.config, overrides)
    phase = "finetune" if args.command == "finetune" else "pretrain"
    run_id = train(config, phase=phase, init_from=getattr(args, "init_from", None), tracking_uri=args.tracking_uri,
                   progress=not args.quiet, resume=args.resume)
    print(run_id)
    return 0


def _cmd_predict(args) -> int:
    from mlplatform.particles import summary
    from mlplatform.predict import predict_path

    records = predict_path(args.model, args.input, args.out, pixel_size_A=args.pixel_size,
                           tracking_uri=args.tracking_uri, override_pixel_size=args.override_pixel_size,
                           min_area_nm2=args.min_area_nm2, track=args.track, progress=not args.quiet)
    for r in records:
        where = r["input"] if r["page"] is None else f"{r['input']} frame {r['page']}"
        print(f"{where}: {len(r['particles'])} particle(s), particle fraction {r['particle_fraction']:.3f}, pixel "
              f"{r['pixel_size_A']:.6g} Å ({r['pixel_size_from']}) -> {r['outputs']['overlay_png']}")
    s = summary([row for r in records for row in r["particles"]])
    sizes = "" if not s["count"] else (f"; equivalent diameter median {s['median_diameter_nm']:.3g} nm, mean "
                                       f"{s['mean_diameter_nm']:.3g} nm")
    print(f"{s['count']} particle(s) in {len(records)} image(s){sizes}; {s['touching_edge']} touch the image edge"
          f"{'' if not args.min_area_nm2 else f' (smaller than {args.min_area_nm2:g} nm² left out)'}")
    print(f"table: {', '.join(records[0]['table'].values())}")
    if "run_id" in records[0]:
        print(f"tracked as run {records[0]['run_id']}")
    print(f"{len(records)} image(s) written to {args.out}")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import run_sweep

    summary = run_sweep(args.config, args.set or [], _local_workers(args), args.storage, args.tracking_uri,
                        progress=not args.quiet and _local_workers(args) == 1 and not args.scheduler,
                        scheduler=args.scheduler, quiet=args.quiet)
    print(f"sweep {summary['sweep']}: {summary['cells']} cells x {'+'.join(summary['phases'])}; "
          f"units {summary['units_by_state']}; runs by status {summary['runs_by_status']}; "
          f"parent run {summary['parent_run']}")
    return 1 if report_sweep_problems(summary) else 0


def report_sweep_problems(summary: dict) -> bool:
    """Print (to stderr) every unit that is missing, recorded twice or descended from the wrong pretrain; True if
    there was any."""
    from .sweep import record_problems

    for line in summary["aligned"]:
        print(f"aligned with the claims: {line}", file=sys.stderr)
    for unit, error in summary["failed"].items():
        print(f"failed beyond its retries: {unit}: {error}", file=sys.stderr)
    if summary["missing"]:
        print(f"not recorded: {', '.join(summary['missing'])}", file=sys.stderr)
    problems = record_problems(summary)
    for line in problems:
        print(line, file=sys.stderr)
    return bool(summary["missing"] or problems)


def _cmd_study(args) -> int:
    from .study import run_study

    summary = run_study(args.config, args.set or [], args.n_trials, _local_workers(args), args.storage,
                        args.tracking_uri, progress=not args.quiet and _local_workers(args) == 1 and not args.scheduler,
                        scheduler=args.scheduler, quiet=args.quiet)
    print(f"study {summary['study']}: trials {summary['trials']}; storage {summary['storage']}; "
          f"parent run {summary['parent_run']}")
    if summary["best"]:
        print(f"best trial {summary['best']['number']}: {summary['best']['value']:.4f} {summary['best']['params']}")
    for line in summary["aligned"]:
        print(f"aligned trials and runs: {line}", file=sys.stderr)
    for line in summary["problems"]:
        print(f"out of line: {line}", file=sys.stderr)
    design = summary.get("design")
    failed = False
    if design:
        failed = _print_design(design)
    return 1 if summary["problems"] or failed else 0


def _print_design(design: dict) -> bool:
    """A design study's outcome: its best recipes, the declared test; True if the test's sweep is incomplete."""
    if design.get("note"):
        print(f"design: {design['note']}")
    for name, path in design["recipes"].items():
        print(f"best recipe of dataset {name} (trial {design['best_trial']}): {path}")
    confirm = design.get("confirm")
    if confirm is None:
        return False
    print(f"best against default: sweep {confirm['sweep']} (units {confirm['units_by_state']}; report: python -m "
          f"experiments report --sweep {confirm['sweep']} --out DIR)")
    found = design.get("findings")
    if found is None or not len(found):
        return report_sweep_problems(confirm) or True
    for r in found.itertuples():
        print(f"  {r.benchmark}: best - default {r.effect:+.3f} [{r.ci_lo:+.3f}, {r.ci_hi:+.3f}], p {r.p_value:.3g}, "
              f"Holm {r.p_adjusted:.3g}{' (significant)' if r.significant else ''}")
    return False


def _cmd_doctor(args) -> int:
    from mlplatform.store import resolve_tracking_uri

    from .doctor import doctor

    lines, left = doctor(args.sweep, args.study, args.storage, resolve_tracking_uri(args.tracking_uri), args.fix)
    for line in lines:
        print(line)
    if left:
        print("problems remain" + ("" if args.fix else " (--fix repairs claims and runs of dead workers)"),
              file=sys.stderr)
    return 1 if left else 0


def _cmd_report(args) -> int:
    from mlplatform.report import write_report
    from mlplatform.store import resolve_tracking_uri

    kind, name = ("sweep", args.sweep) if args.sweep else ("study", args.study)
    index = write_report(kind, name, resolve_tracking_uri(args.tracking_uri), args.out, ui_url=args.ui_url)
    print(f"report: {index}")
    return 0


def _cmd_ui(args) -> int:
    import os

    from mlflow import MlflowClient

    from mlplatform import mlflow_ui
    from mlplatform.store import ensure_store, resolve_tracking_uri

    from .sweep import latest_sweep, sweep_view

    uri = resolve_tracking_uri(args.tracking_uri)
    ensure_store(uri)
    check_port_free(args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    client = MlflowClient(uri)
    parent = latest_sweep(client)
    if parent is not None:
        exp_id, name = parent.info.experiment_id, parent.data.tags.get("sweep")
        url = mlflow_ui.view_url(base, exp_id, sweep_view(client, exp_id, name))
        print(f"MLflow UI for {uri}; sweep {name!r} (the latest), runs grouped by subset and phase:\n  {url}",
              flush=True)
    else:
        print(f"MLflow UI for {uri} at {base} (no sweep yet)", flush=True)
    print("Ctrl-C stops it.", flush=True)
    # one web worker and no job runner (enough for one user, and light on a laptop); no usage telemetry
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    os.execve(sys.executable, cmd, env)  # the UI takes over this process: Ctrl-C and exit codes are its own


def _cmd_dashboard(args) -> int:
    import signal
    import socket
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna_dashboard

    from .storage import existing_study

    storage, study_name, study_id = existing_study(args.study, args.storage)  # creates nothing; ValueError: exit 2

    # requests are served in threads (as optuna-dashboard's own command line does), and Ctrl-C asks the server loop to
    # stop instead of raising KeyboardInterrupt wherever the main thread happens to be: raised inside a request, as in
    # a single-threaded wsgiref server (optuna_dashboard.run_server), wsgiref's bare except swallows it and the server
    # runs on; raised while a connection is handed to its thread, socketserver closes the socket under that thread
    class Server(ThreadingMixIn, WSGIServer):
        address_family = socket.AF_INET6 if ":" in args.host else socket.AF_INET

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *log_args) -> None:  # the page polls the API: no line per request
            pass

    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    try:
        httpd = make_server(args.host, args.port, optuna_dashboard.wsgi(storage), server_class=Server,
                            handler_class=QuietHandler)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise InputError(f"cannot serve on {host}:{args.port}: {exc.strerror or exc}") from None
    # the storage's study id is the one the dashboard's pages and API use
    print(f"optuna-dashboard of study {args.study!r} ({study_name}) at "
          f"http://{host}:{args.port}/dashboard/studies/{study_id} (Ctrl-C stops it)", flush=True)

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        threading.Thread(target=httpd.shutdown, daemon=True).start()  # serve_forever returns within 0.5 s

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        httpd.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        httpd.server_close()  # waits for the requests in flight (a note or a rename being written)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, args.workers, args.tracking_uri)
    return 1 if report_sweep_problems(summary) else 0


def _local_workers(args) -> int:
    if args.scheduler and args.workers is not None:
        raise InputError("--workers (local processes) and --scheduler (one worker per Dask worker) exclude each "
                         "other; give one")
    return args.workers or 1


def _queue_options(parser: argparse.ArgumentParser, storage_help: str) -> None:
    """Options shared by the commands that hand work to several workers through a shared database."""
    parser.add_argument("--workers", type=positive_int, help="local worker processes (default 1)")
    parser.add_argument("--scheduler", metavar="ADDRESS|FILE",
                        help="run one worker per Dask worker (or per GPU resource) of this cluster instead: "
                        "tcp://HOST:PORT or a scheduler file; --storage and the tracking store must be reachable "
                        "from every worker, and the data on a filesystem they share")
    parser.add_argument("--storage", help=storage_help)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override every run's config")
    parser.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m experiments", description="Train, fine-tune and apply segmentation "
                                "models on curated synthetic HRTEM data, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)
    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                          "sqlite:///mlruns/mlflow.db with artifacts in mlruns/artifacts)")
    for name, helptext in (("train", "pretrain a model from scratch"), ("finetune", "fine-tune a tracked model")):
        t = sub.add_parser(name, help=helptext, parents=[tracking])
        t.add_argument("--config", required=True, help="training config YAML (see experiments/configs/)")
        if name == "finetune":
            t.add_argument("--from", dest="init_from", required=True, metavar="RUN_ID|MODEL_URI",
                           help="the model to start from: a run id, runs:/..., models:/... or a model folder")
        t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
        t.add_argument("--resume", metavar="RUN_ID", help="continue this interrupted run (KILLED, FAILED, or left "
                       "RUNNING by a killed process) from its last epoch's checkpoint, in the same run; give the same "
                       "--config, --set and --skip-bad-shards as when it started")
        t.add_argument("--skip-bad-shards", action="store_true", help="leave out shards that differ from their "
                       "manifest's sha256 or do not decode, recorded in the run (data.skip_bad_shards=true), instead "
                       "of refusing the dataset")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
        t.set_defaults(func=_cmd_train)
    sw = sub.add_parser("sweep", help="subsets x seeds x (pretrain, fine-tune); resumable, parallel",
                        parents=[tracking])
    sw.add_argument("--config", required=True, help="sweep definition YAML (kind: sweep)")
    _queue_options(sw, "database of the sweep's claims, shared by all its workers (default: SQLite in "
                   "mlruns/sweeps.db; postgresql://user@host/db to spread over machines)")
    sw.set_defaults(func=_cmd_sweep)
    st = sub.add_parser("study", help="Optuna search over hyperparameters and data curation, with pruning",
                        parents=[tracking])
    st.add_argument("--config", required=True, help="study definition YAML (kind: study)")
    st.add_argument("--n-trials", type=positive_int, help="total trials of the study (default: the definition's)")
    _queue_options(st, "Optuna storage: journal:PATH (default mlruns/optuna-journal.log), sqlite:///PATH or "
                   "postgresql://... (shared by workers on many machines)")
    st.set_defaults(func=_cmd_study)
    rp = sub.add_parser("report", help="statistical report of a sweep or a study (HTML, PNG, CSV)",
                        parents=[tracking])
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", metavar="NAME")
    which.add_argument("--study", metavar="NAME")
    rp.add_argument("--out", required=True, help="folder for index.html, figures and tables")
    rp.add_argument("--ui-url", metavar="URL", help="the MLflow UI the report's run ids link to (default: the "
                    "tracking URI when it is http(s)://, else http://127.0.0.1:5000 as served by `ui`)")
    rp.set_defaults(func=_cmd_report)
    dr = sub.add_parser("doctor", help="find (--fix: repair) orphaned runs, dead workers' claims or trials, and "
                        "duplicates",
                        parents=[tracking])
    which = dr.add_mutually_exclusive_group()
    which.add_argument("--sweep", metavar="NAME", help="one sweep (default: every sweep in --storage)")
    which.add_argument("--study", metavar="NAME", help="one study: its trials and their runs")
    dr.add_argument("--storage", help="the sweeps' claims database (default: SQLite in mlruns/sweeps.db), or with "
                    "--study the study's Optuna storage (default: journal mlruns/optuna-journal.log)")
    dr.add_argument("--fix", action="store_true", help="give back dead workers' claims and close their runs")
    dr.set_defaults(func=_cmd_doctor)
    ui = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1, on the store the runs used", parents=[tracking])
    ui.add_argument("--port", type=port, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.set_defaults(func=_cmd_ui)
    db = sub.add_parser("dashboard", help="optuna-dashboard of a study, on the Optuna storage it lives in")
    db.add_argument("--study", required=True, metavar="NAME", help="the study's name (as in its definition)")
    db.add_argument("--storage", help="the study's Optuna storage, as given to study (default: journal "
                    "mlruns/optuna-journal.log; journal:PATH, sqlite:///PATH or postgresql://...)")
    db.add_argument("--port", type=port, default=8080)
    db.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                    "only; the dashboard can change the study: rename, delete, notes)")
    db.set_defaults(func=_cmd_dashboard)
    dm = sub.add_parser("demo", help="the main job: a miniature curation study end to end", parents=[tracking])
    dm.add_argument("--out", default="demo", help="folder for data and report (default demo/)")
    dm.add_argument("--workers", type=positive_int, default=2)
    dm.set_defaults(func=_cmd_demo)
    pr = sub.add_parser("predict", help="masks and probability maps for micrographs", parents=[tracking])
    pr.add_argument("--model", required=True, metavar="RUN_ID|MODEL_URI|PATH")
    pr.add_argument("--input", required=True, help="a micrograph (.dm3/.dm4, .ser, .emd, .mrc, .tif, .png, .npy) or "
                    "a folder of them")
    pr.add_argument("--pixel-size", type=positive_float, metavar="A",
                    help="pixel size in Å of inputs whose files have no calibration (default: the model's training "
                    "pixel size)")
    pr.add_argument("--override-pixel-size", action="store_true",
                    help="use --pixel-size even where a file's calibration says otherwise")
    pr.add_argument("--min-area-nm2", type=nonneg_float, default=0.0, metavar="NM2",
                    help="leave particles smaller than this (nm²) out of the table and overlay (default 0)")
    pr.add_argument("--track", action="store_true", help="record the prediction as an MLflow run (model, inputs' "
                    "sha256, outputs), tagged with the model's training run")
    pr.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")
    pr.add_argument("--out", required=True, help="output folder: a new one appears with all outputs, or an existing "
                    "one gets them added, only once every input was read and predicted (on an error: nothing)")
    pr.set_defaults(func=_cmd_predict)
    return p


# the commands that read or write the tracking store whatever their arguments (predict needs it only for a run id or
# models:/ reference, and checks it then)
USES_STORE = ("train", "finetune", "sweep", "study", "report", "doctor", "ui", "demo")


def _with_store_checked(func):
    """``func`` after the tracking store was checked (:func:`mlplatform.store.ensure_store`: scheme, database file,
    driver, a server that answers within a bounded time) — before any config, data or claim is touched."""
    def checked(args) -> int:
        from hrtem_core import verbosity
        from mlplatform.store import ensure_store, resolve_tracking_uri

        verbosity.apply()  # MLflow is imported now: its store-creation lines follow the command's --verbose
        ensure_store(resolve_tracking_uri(args.tracking_uri))
        return func(args)
    return checked


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    for command in parser._subparsers._group_actions[0].choices.values():
        command.add_argument("--verbose", action="store_true", help="show the libraries' INFO lines and deprecation "
                             "warnings (MLflow, Lightning), in every worker too; without it only what matters to "
                             "you is printed")


def main(argv=None) -> int:
    parser = build_parser()
    _add_verbose(parser)
    args = parser.parse_args(argv)
    from hrtem_core import verbosity

    verbosity.set_verbose(args.verbose)
    return run_command(_with_store_checked(args.func) if args.command in USES_STORE else args.func, args)

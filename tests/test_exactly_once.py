"""Exactly once, with real processes: simultaneous first starts, SIGKILLs at random points, a worker stalled past
its lease — each against SQLite (one machine) and PostgreSQL (the shared database of many machines).

After every completed ``sweep`` command: one FINISHED run per (cell, phase), each fine-tune descended from its cell's
recorded pretrain, no run RUNNING, no unit missing; at every point in between, never two FINISHED runs of one unit.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest
from mlflow import MlflowClient

from sweep_helpers import sweep_spec, tracked_runs, wait_while_running, write_spec

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


# -- simultaneous first starts ---------------------------------------------------------------------------------------

CLAIMER = r"""
import json, sys, time
from experiments import claims
url, start_at, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))          # every process leaves this line at the same instant
woke = time.time()
engine = claims.open_engine(url)                        # creates the tables on a fresh database
units = [(i, f"c/s{i}", phase) for i in range(n) for phase in ("pretrain", "finetune")]
claims.register_sweep(engine, "race", "fp", "exp", units)
me, mine = claims.worker_identity(), []
while True:
    rows = [r for r in claims.unit_rows(engine, "race") if r["state"] == "pending"]
    if not rows:
        break
    for row in rows:
        claim = claims.try_claim(engine, row, me, grace_s=600)
        if claim is not None:
            assert claim.commit(f"{me}:{row['cell']}:{row['phase']}")
            mine.append([row["cell"], row["phase"]])
print(json.dumps({"woke": woke, "claimed": mine}))
"""


def _fresh_claims_url(stores_kind, tmp_path, server, i):
    if stores_kind == "sqlite":
        return f"sqlite:///{tmp_path / f'race-{i}.db'}"
    return server.new_database(f"race_{os.getpid()}_{i}_{int(time.time() * 1000) % 10**8}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_workers_starting_at_the_same_instant_on_a_fresh_queue_never_claim_a_unit_twice(kind, tmp_path, request):
    """Four processes leave a sleep at the same instant and hit a fresh database together (table creation, queueing,
    claims): no unit is ever claimed twice, in any round. A round counts towards the proof only if its starts landed
    within 50 ms of each other (the harness's spread, not the code's: on a loaded machine the scheduler may wake one
    process late); rounds are repeated until five were that tight, or twelve were run."""
    server = request.getfixturevalue("postgres_server") if kind == "postgresql" else None
    n_cells, n_procs, tight_rounds, max_rounds, spreads = 6, 4, 5, 12, []
    for i in range(max_rounds):
        url = _fresh_claims_url(kind, tmp_path, server, i)
        start_at = time.time() + 3.0
        procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, url, str(start_at), str(n_cells)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for _ in range(n_procs)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
        results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
        claimed = Counter(tuple(u) for r in results for u in r["claimed"])
        assert len(claimed) == 2 * n_cells and set(claimed.values()) == {1}, (i, claimed)
        from experiments import claims
        rows = claims.unit_rows(claims.open_engine(url), "race")
        assert {(r["state"], r["epoch"]) for r in rows} == {("done", 1)}
        spreads.append(max(r["woke"] for r in results) - min(r["woke"] for r in results))
        if sum(s < 0.05 for s in spreads) >= tight_rounds:
            break
    print(f"{kind}: {len(spreads)} rounds of {n_procs} simultaneous starts, {sum(s < 0.05 for s in spreads)} within "
          f"50 ms (spreads {', '.join(f'{s * 1000:.0f}' for s in spreads)} ms), 0 duplicate claims")


LOCKER = r"""
import os, sys, time
from experiments import claims
url, start_at, log, die = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
engine = claims.open_engine(url)
time.sleep(max(0.0, start_at - time.time()))

def note(what):
    with open(log, "a") as f:  # one short O_APPEND write per line: lines of several processes never interleave
        f.write(f"{os.getpid()} {what} {time.time():.6f}\n")

if die:  # takes the key and holds it until the test SIGKILLs it
    with claims.exclusive(engine, "sweep-mlflow-writes:race"):
        note("in")
        time.sleep(600)
for _ in range(3):
    with claims.exclusive(engine, "sweep-mlflow-writes:race"):
        note("in")
        time.sleep(0.05)
        with claims.exclusive(engine, "sweep-mlflow-writes:race"):  # taken again inside: no self-deadlock
            pass
        note("out")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_exclusive_sections_never_overlap_across_processes_and_a_killed_holder_frees_them(kind, tmp_path, request):
    """The lock behind a sweep's shared MLflow writes (parent run, runs out of line): four processes asking at the
    same instant hold it one after another, and a holder SIGKILLed inside does not keep it."""
    server = request.getfixturevalue("postgres_server") if kind == "postgresql" else None
    url = _fresh_claims_url(kind, tmp_path, server, 0)
    log = tmp_path / "sections.log"
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, url, "0", str(log), "1"], env=ENV,
                              stderr=subprocess.PIPE, text=True)
    procs: list[subprocess.Popen] = []
    try:
        deadline = time.time() + 120  # the others start only once the holder has the key, however slow its start-up
        while not (log.exists() and f"{holder.pid} in" in log.read_text()):
            assert holder.poll() is None and time.time() < deadline, "the holder never took the key"
            time.sleep(0.05)
        start_at = time.time() + 3.0
        procs = [subprocess.Popen([sys.executable, "-c", LOCKER, url, str(start_at), str(log), "0"], env=ENV,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        time.sleep(max(0.0, start_at + 0.5 - time.time()))  # (they are asking for it now, unless the machine is slow)
        killed_at = time.time()
        holder.kill()  # SIGKILL inside the section: only the server or the kernel can give the key back
        assert holder.wait(timeout=60) == -signal.SIGKILL
        outs = [p.communicate(timeout=120)[1] for p in procs]
    finally:  # a failed assertion above must not leave the holder asleep for ten minutes
        for p in [holder, *procs]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [o[-1500:] for o in outs]
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert [ln[1] for ln in lines if ln[0] == str(holder.pid)] == ["in"]
    live = [ln for ln in lines if ln[0] != str(holder.pid)]
    assert len(live) == 4 * 3 * 2
    for enter, leave in zip(live[::2], live[1::2]):  # in/out pairs of one process, never another's in between
        assert (enter[1], leave[1], enter[0]) == ("in", "out", leave[0]), live
    assert float(live[0][2]) >= killed_at  # nobody got in while the holder lived


# -- kills -----------------------------------------------------------------------------------------------------------

def _assert_exactly_once(store, sweep, n_units):
    cells = tracked_runs(store, filter_string=f"tags.kind = 'cell' and tags.sweep = '{sweep}'")
    finished = Counter((r.data.tags["sweep.cell"], r.data.tags["phase"]) for r in cells if r.info.status == "FINISHED")
    assert len(finished) == n_units and set(finished.values()) == {1}, finished
    assert not [r.info.run_id for r in cells if r.info.status == "RUNNING"]
    by_id = {r.info.run_id: r for r in cells}
    for r in cells:
        if r.data.tags["phase"] == "finetune" and r.info.status == "FINISHED":
            pre = by_id.get(r.data.tags["pretrain_run"]) or MlflowClient(store).get_run(r.data.tags["parent_run"])
            assert pre.info.status == "FINISHED" and pre.data.tags["phase"] == "pretrain"
            assert pre.data.tags["sweep.cell"] == r.data.tags["sweep.cell"]
    return cells


def _never_twice(store, sweep):
    cells = tracked_runs(store, filter_string=f"tags.kind = 'cell' and tags.sweep = '{sweep}' and "
                                        "attributes.status = 'FINISHED'")
    twice = {k: n for k, n in Counter((r.data.tags["sweep.cell"], r.data.tags["phase"]) for r in cells).items()
             if n > 1}
    assert not twice, twice
    return len(cells)


def _sweep_workers(proc) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(proc.pid).children(recursive=True)
                if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


KILLED_IN_SCHEMA = r"""
import os, signal, sys
import sqlalchemy as sa
from sqlalchemy import event
from mlplatform.store import ensure_store
uri, kill_at, seen = sys.argv[1], int(sys.argv[2]), [0]

@event.listens_for(sa.engine.Engine, "after_cursor_execute")
def _count(conn, cursor, statement, params, context, executemany):
    if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP", "INSERT", "UPDATE")):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # as a sweep's first process killed while MLflow builds its tables

ensure_store(uri)
print(seen[0])
"""


@pytest.mark.slow
@pytest.mark.parametrize("source", ["migrations", "template"])
def test_a_process_killed_while_mlflow_creates_a_new_sqlite_store_leaves_it_usable(source, tmp_path):
    """MLflow's migrations on SQLite commit statement by statement: a first process killed among them must not leave
    a half-made schema that every later process fails on ("table ... already exists", seen in CI). The same for a
    store made from the schema template (mlplatform.store.schema_template: a copy, then MLflow's Default experiment);
    without a cache folder to keep the template in, every store is migrated."""
    cache = tmp_path / "cache"
    if source == "migrations":
        cache.write_text("")  # a file, not a folder: no template can be kept
    env = {**ENV, "HRTEM_CACHE_DIR": str(cache)}
    run = lambda uri, at: subprocess.run([sys.executable, "-c", KILLED_IN_SCHEMA, uri, str(at)],  # noqa: E731
                                         capture_output=True, text=True, env=env, timeout=300)
    if source == "template":
        made = run(f"sqlite:///{tmp_path / 'makes-the-template.db'}", 10**9)
        assert made.returncode == 0 and list(cache.glob("mlflow-sqlite-schema/mlflow-*.db")), made.stderr[-2000:]
    first = run(f"sqlite:///{tmp_path / 'whole.db'}", 10**9)
    assert first.returncode == 0, first.stderr[-2000:]
    n = int(first.stdout.split()[-1])  # DDL and data statements of a whole creation
    assert n > 100 if source == "migrations" else 1 <= n < 20, n
    for at in sorted({1, max(1, n // 2), n}):  # the first statement, mid-migrations, the default experiment's insert
        db = tmp_path / f"killed-{at}.db"
        killed = run(f"sqlite:///{db}", at)
        assert killed.returncode == -signal.SIGKILL, (at, killed.stderr[-2000:])
        assert not db.exists() or db.stat().st_size == 0, f"a half-made store was left in place (kill at {at}/{n})"
        again = run(f"sqlite:///{db}", 10**9)
        assert again.returncode == 0, (at, again.stderr[-2000:])
        assert [p.name for p in tmp_path.glob(f"{db.name}.*.partial")] == []  # the killed one's leftover is gone
        client = MlflowClient(f"sqlite:///{db}")
        exp = client.create_experiment(f"after-kill-{at}")
        client.set_terminated(client.create_run(exp).info.run_id)
        assert [e.name for e in client.search_experiments(order_by=["name"])] == ["Default", f"after-kill-{at}"]


def _cell_runs(store, sweep, status):
    return tracked_runs(store, filter_string=f"tags.kind = 'cell' and tags.sweep = '{sweep}' and "
                                             f"attributes.status = '{status}'")


def _running_here(store, proc) -> bool:
    """Whether a worker of the sweep command ``proc`` has a RUNNING unit (its pid is in the run's sweep.worker tag,
    host/pid/start time/random)."""
    pids = {str(w.pid) for w in _sweep_workers(proc)}
    holders = [r.data.tags.get("sweep.worker", "").split("/") for r in _cell_runs(store, "kills", "RUNNING")]
    return any(len(h) > 1 and h[1] in pids for h in holders)


# Where a kill lands, as the run's own state says (polled every 0.1 s), not after a sleep of random length:
#   started:    the sweep's worker processes exist (starting up, or claiming their first units)
#   training:   a unit's run is RUNNING (a worker is inside training, its claim held)
#   recorded:   one more unit than at the cycle's start was recorded (a worker is between units)
#   worker:     a unit's run is RUNNING; one worker is SIGKILLed, the other goes on until one more unit is recorded
#               (or 60 s pass), then the whole sweep is
#   (each point once: tests/test_study_language.py kills a sweep while it generates its data and while it trains too)
KILL_POINTS = ("started", "training", "recorded", "worker")


@pytest.mark.slow
# SQLite, the default store (the queue's SQL is the same on PostgreSQL, whose races at start and whose stalled
# workers are tested below and in tests/test_study_language.py)
@pytest.mark.parametrize("stores", ["sqlite"], indirect=True)
def test_sigkill_at_state_triggered_points_then_restart_records_every_unit_once(workspace, stores, tmp_path, cli):
    """Four SIGKILLs of a two-worker sweep (the whole process group, or one worker and then the rest), each at a point
    of the run's own state (KILL_POINTS, in a seeded order); after each, no unit is recorded twice. A restart then
    finishes the sweep with every unit recorded once, and a second restart has nothing to do."""
    claims_url, store = stores
    spec = sweep_spec("kills", seeds=(0, 1))
    spec["finetune"]["set"]["data.train"] = [{"path": str(workspace / "target")}]
    path = write_spec(workspace, f"kills-{tmp_path.name}.yaml", spec)
    cmd = [sys.executable, "-m", "experiments", "sweep", "--config", str(path), "--workers", "2", "--quiet",
           "--tracking-uri", store, "--storage", claims_url]
    points = random.Random(20261127).sample(KILL_POINTS, len(KILL_POINTS))
    kills = []

    for point in points:
        recorded, started = len(_cell_runs(store, "kills", "FINISHED")), time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                                start_new_session=True)
        if point == "started":
            landed = wait_while_running(proc, lambda: _sweep_workers(proc))
        elif point == "recorded":
            landed = wait_while_running(proc, lambda: len(_cell_runs(store, "kills", "FINISHED")) > recorded)
        else:  # a RUNNING run of one of this command's workers (a killed cycle leaves its own RUNNING until resumed)
            landed = wait_while_running(proc, lambda: _running_here(store, proc))
            if landed and point == "worker":
                random.Random(len(kills)).choice(_sweep_workers(proc)).kill()  # the other takes its unit over
                now = len(_cell_runs(store, "kills", "FINISHED"))
                wait_while_running(proc, lambda: len(_cell_runs(store, "kills", "FINISHED")) > now, timeout_s=60)
        if proc.poll() is not None:
            break  # the sweep finished before this point
        assert landed, f"{point}: the sweep did not reach this point within 300 s"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((point, len(_cell_runs(store, "kills", "FINISHED")), round(time.time() - started, 1)))
        _never_twice(store, "kills")
    assert len(kills) == len(KILL_POINTS), f"only {len(kills)} kill points landed before the sweep finished: {kills}"
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    cells = _assert_exactly_once(store, "kills", n_units=8)
    top = _assert_the_parent_summarises(store, "kills", cells)
    again = cli.run(cmd[2:], tmp_path, timeout_s=300)  # nothing left to do (main in a process of its own)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(_assert_exactly_once(store, "kills", n_units=8)) == len(cells)
    # the summary is written when the sweep completes, not again by a run that found nothing to do
    assert len(MlflowClient(store).get_metric_history(top.info.run_id, "summary/all/pretrain/ood_bench_dice")) == 1
    print(f"kill points (point, units recorded after it, seconds from start to kill): {kills}")


def _assert_the_parent_summarises(store, sweep, cells):
    """One parent run of the sweep, parent of every cell run, summarising the recorded runs for the MLflow UI: a
    link to each, the mean over seeds of each subset's benchmark Dice, the end time of the last one."""
    parent = tracked_runs(store, filter_string=f"tags.kind = 'sweep' and tags.sweep = '{sweep}'")
    assert len(parent) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parent[0].info.run_id}
    top = MlflowClient(store).get_run(parent[0].info.run_id)
    note = top.data.tags["mlflow.note.content"]
    recorded = [r for r in cells if r.info.status == "FINISHED"]
    assert all(f"/runs/{r.info.run_id})" in note for r in recorded) and "viewStateShareKey=" in note
    for subset in ("all", "near-focus"):
        mine = [r.data.metrics["ood/bench/dice"] for r in recorded
                if r.data.tags["sweep.subset"] == subset and r.data.tags["phase"] == "pretrain"]
        assert top.data.metrics[f"summary/{subset}/pretrain/ood_bench_dice"] == pytest.approx(sum(mine) / len(mine))
    assert top.info.end_time == max(r.info.end_time for r in recorded)
    return top


# -- a stalled worker ------------------------------------------------------------------------------------------------

def _inside_a_transaction(*urls) -> bool:
    """Whether a stopped process holds a lock on one of the stores (SQLite: any lock on the file, a reader's shared
    lock included, which would keep every writer out until it continues; PostgreSQL: a session idle in a
    transaction). This test is about a worker stalled between database calls; one stalled inside a
    write blocks an SQLite store for everyone until it continues (a limit of SQLite, see the README), and on
    PostgreSQL the claims connections end such sessions after a minute."""
    import sqlite3

    import sqlalchemy as sa

    for url in urls:
        if url.startswith("sqlite:///"):
            conn = sqlite3.connect(url[len("sqlite:///"):], timeout=0.5)
            try:
                conn.execute("BEGIN EXCLUSIVE")  # refused while any other connection holds even a shared lock
                conn.rollback()
            except sqlite3.OperationalError:
                return True
            finally:
                conn.close()
        else:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                busy = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in "
                                            "transaction%' AND datname = current_database()")).scalar()
            engine.dispose()
            if busy:
                return True
    return False


@pytest.mark.slow
def test_a_worker_stopped_past_its_lease_never_records_its_unit(workspace, stores, tmp_path):
    """SIGSTOP a worker mid-training past the lease grace: another worker takes the unit over and records it; the
    stopped worker, continued, finds its claim gone and ends its run KILLED (superseded), not FINISHED."""
    claims_url, store = stores
    spec = sweep_spec("stall", seeds=(0,))
    spec["finetune"]["set"]["data.train"] = [{"path": str(workspace / "target")}]
    path = write_spec(workspace, f"stall-{tmp_path.name}.yaml", spec)
    env = {**ENV, "SWEEP_HEARTBEAT_GRACE_S": "4"}
    cmd = [sys.executable, "-m", "experiments", "sweep", "--config", str(path), "--workers", "1", "--quiet",
           "--tracking-uri", store, "--storage", claims_url, "--set", "epochs=3"]
    from experiments import claims

    engine = claims.open_engine(claims_url)
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stalled = None
    try:
        deadline = time.time() + 300
        while stalled is None and time.time() < deadline and a.poll() is None:
            for r in tracked_runs(store, filter_string="tags.kind = 'cell' and tags.sweep = 'stall' and "
                                                "attributes.status = 'RUNNING'"):
                if f"/{a.pid}/" in r.data.tags.get("sweep.worker", ""):
                    os.kill(a.pid, signal.SIGSTOP)
                    unit = next(u for u in claims.unit_rows(engine, "stall")
                                if (u["cell_key"], u["phase"]) == (r.data.tags["sweep.cell"], r.data.tags["phase"]))
                    if (unit["state"] == "claimed" and str(unit["epoch"]) == r.data.tags["sweep.claim_epoch"]
                            and not _inside_a_transaction(claims_url, store)):
                        stalled = (r.info.run_id, unit)
                    else:  # stopped too late (already committed) or holding a database lock: try again later
                        os.kill(a.pid, signal.SIGCONT)
                        time.sleep(0.5)
                    break
            time.sleep(0.1)
        assert stalled is not None, "worker A never ran a unit"
        run_a, unit = stalled
        time.sleep(6)  # past the 4 s grace
        b = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert b.returncode == 0, b.stderr[-3000:]
        row = next(u for u in claims.unit_rows(engine, "stall") if (u["cell"], u["phase"]) == (unit["cell"],
                                                                                            unit["phase"]))
        assert row["state"] == "done" and row["run_id"] != run_a and row["epoch"] > unit["epoch"]
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err[-3000:]
    stopped = MlflowClient(store).get_run(run_a)
    assert stopped.info.status == "KILLED" and stopped.data.tags.get("superseded") == "true", stopped.data.tags
    _assert_exactly_once(store, "stall", n_units=4)


# -- doctor ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_doctor_lists_and_repairs_what_a_killed_sweep_left_and_names_duplicates(workspace, tmp_path, cli):
    spec = sweep_spec("doc", seeds=(0,))
    spec["finetune"]["set"]["data.train"] = [{"path": str(workspace / "target")}]
    path = write_spec(workspace, f"doc-{tmp_path.name}.yaml", spec)
    claims_url, store = f"sqlite:///{tmp_path / 'sweeps.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    where = ["--tracking-uri", store, "--storage", claims_url]
    cmd = [sys.executable, "-m", "experiments", "sweep", "--config", str(path), "--workers", "1", "--quiet", *where]
    doctor = ["experiments", "doctor", "--sweep", "doc", *where]  # run by conftest's cli: main in a process of its own
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not tracked_runs(store, filter_string="tags.kind = 'cell' and "
                                                                     "attributes.status = 'RUNNING'"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    orphan = tracked_runs(store, filter_string="tags.kind = 'cell' and attributes.status = 'RUNNING'")[0].info.run_id

    found = cli.run(doctor, tmp_path, timeout_s=120)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "its holder is dead" in found.stdout and f"{orphan} " in found.stdout, found.stdout
    assert MlflowClient(store).get_run(orphan).info.status == "RUNNING"  # without --fix nothing changes
    fixed = cli.run([*doctor, "--fix"], tmp_path, timeout_s=120)
    assert fixed.returncode == 0 and "given back" in fixed.stdout, fixed.stdout + fixed.stderr
    killed = MlflowClient(store).get_run(orphan)
    assert killed.info.status == "KILLED" and "died" in killed.data.tags["failure_reason"]
    from experiments import claims
    assert "claimed" not in {r["state"] for r in claims.unit_rows(claims.open_engine(claims_url), "doc")}
    clean = cli.run(doctor, tmp_path, timeout_s=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_exactly_once(store, "doc", n_units=4)
    # a second FINISHED run of a recorded unit (copied by hand, as a buggy tool might): named, never "fixed"
    client = MlflowClient(store)
    original = tracked_runs(store, filter_string="tags.kind = 'cell' and tags.phase = 'pretrain' and "
                                          "attributes.status = 'FINISHED'")[0]
    copy = client.create_run(original.info.experiment_id, tags=original.data.tags).info.run_id
    client.set_terminated(copy, "FINISHED")
    unit = f"{original.data.tags['sweep.cell']}:pretrain"
    for command in ([*doctor, "--fix"], cmd[2:]):  # the sweep refuses before it would start its workers
        res = cli.run(command, tmp_path, timeout_s=300)
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"recorded more than once: {unit}" in res.stdout + res.stderr and copy in res.stdout + res.stderr
    assert client.get_run(copy).info.status == "FINISHED"


def test_runs_of_a_sweep_made_before_claims_are_adopted_not_run_again(workspace, tmp_path):
    """Upgrading: a sweep recorded in MLflow by an earlier version (no claims database) keeps its runs."""
    from experiments import claims
    from experiments.specs import load_experiment
    from experiments.sweep import open_sweep, summarize
    from mlplatform.tracking import get_or_create_experiment

    spec = sweep_spec("legacy", seeds=(0,))
    spec["finetune"]["set"]["data.train"] = [{"path": str(workspace / "target")}]
    exp = load_experiment(write_spec(workspace, "legacy.yaml", spec), "sweep")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    exp_id = get_or_create_experiment("exp-test", store)
    parent = client.create_run(exp_id, tags={"sweep": "legacy", "kind": "sweep",
                                             "sweep.fingerprint": exp.fingerprint()}).info.run_id
    client.set_terminated(parent, "FINISHED")
    made = {}
    for i, cell in enumerate(("all/s0", "near-focus/s0", "all/s0")):  # all/s0 twice: the old sweep's duplicate
        pre = client.create_run(exp_id, start_time=int(time.time() * 1000) + 1000 * i, tags={
            "sweep": "legacy", "kind": "cell", "sweep.cell": cell, "phase": "pretrain",
            "mlflow.parentRunId": parent}).info.run_id
        client.set_terminated(pre, "FINISHED")
        made.setdefault(cell, []).append(pre)
    ctx = open_sweep(exp, f"sqlite:///{tmp_path / 'sweeps.db'}", store)
    assert ctx.parent == parent
    rows = {(r["cell_key"], r["phase"]): r for r in claims.unit_rows(ctx.engine, "legacy")}
    assert rows[("all/s0", "pretrain")]["run_id"] == made["all/s0"][0]  # the earliest, which the old sweep reused
    assert rows[("near-focus/s0", "pretrain")]["state"] == "done"
    assert rows[("all/s0", "finetune")]["state"] == "pending"  # never finished: still to do
    summary = summarize(ctx)
    assert summary["duplicates"] == {"all/s0:pretrain": made["all/s0"]}
    assert sorted(summary["missing"]) == ["all/s0:finetune", "near-focus/s0:finetune"]
    other = dict(spec, seeds=[0, 1])
    with pytest.raises(ValueError, match="different definition"):
        open_sweep(load_experiment(write_spec(workspace, "legacy2.yaml", other), "sweep"),
                   f"sqlite:///{tmp_path / 'other.db'}", store)

"""Faults during and after generation.

* SIGTERM and Ctrl-C to a multi-worker ``python -m datagen generate``: it exits 143 / 130 with one message line, and
  leaves nothing running (no worker, no server process, no resource tracker: every process of its session is gone),
  no POSIX semaphore that any of its processes had mapped, no temporary folder ($TMPDIR is private to the run) and no
  half-written file in the output folder (what stays is the resume state: finished shards and their records).
* SIGKILL at five points of a run into one folder (the test-only hook ``HRTEM_FAULT_HOLD`` of datagen.pipeline
  parks the run at an exact point; one point is "after k shards", k drawn from a seeded RNG): every process of the
  killed run dies with it (PDEATHSIG), and the reruns end with the uninterrupted run's content hash, a dataset that
  ``verify`` passes, and no temporary file left.
* Corruptions of a finished dataset that tests/test_verified_reads.py and tests/test_generate.py do not already cover
  (a flipped byte, a 0/255 mask, a corrupt .npy header, a missing member, a manifest of the wrong shape are there):
  ``python -m datagen verify`` exits 2 with one ``error:`` line naming the shard (and sample), and curation — what
  every training run reads a dataset through — refuses the dataset.

Linux only (/proc, PR_SET_PDEATHSIG, /dev/shm).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from datagen.cli import main as datagen_main
from datagen.pipeline import FAULT_HOLD_ENV, PROGRESS_DIR
from hrtem_core.errors import InputError
from hrtem_core.shard_hashes import ShardHashCache
from mlplatform.curation import scan_dataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG")

ROOT = Path(__file__).resolve().parents[1]
N, SEED = 8, 31
OVERRIDES = ("output.structures_per_shard=1",)  # on top of TINY: 4 shards of one structure (2 samples) each
N_SHARDS = 4
WAIT_S = 300  # generous: the machine may be busy; every wait polls for a condition and ends as soon as it holds
KILL_POINTS_SEED = 20240611


@pytest.fixture(scope="module")
def reference(tiny_dataset) -> Path:
    """The uninterrupted run (one process, in-process): the content hash every interrupted run must end with."""
    return tiny_dataset(N, SEED, *OVERRIDES)


def _content_hash(root: Path) -> str:
    return json.loads((root / "manifest.json").read_text())["content_hash"]


# ---------------------------------------------------------------------------------------- processes of one run


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...); None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _session(sid: int) -> dict[int, str]:
    """pid -> command line of the live (not zombie) processes of session ``sid``. The run is started in a session of
    its own, which every process it starts stays in, wherever it is reparented."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[3] == str(sid) and fields[0] not in "ZX":
                try:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                found[int(entry)] = cmd.strip()
    return found


def _semaphores_of(pids) -> set[str]:
    """The POSIX semaphores (/dev/shm/sem.*) that processes ``pids`` have mapped (sem_open maps the file)."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
            if path.startswith("/dev/shm/sem."):
                found.add(path.removesuffix(" (deleted)"))
    return found


class Run:
    """One ``python -m datagen generate`` in a session of its own, its $TMPDIR private, its output in a log file;
    what it started and the semaphores they mapped are recorded while it is polled."""

    def __init__(self, out: Path, work: Path, hold: str | None = None):
        self.out, self.work = out, work
        self.tmp = work / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log = work / f"run-{len(list(work.glob('run-*.log')))}.log"
        self.marker = work / f"hold-{hold}-{self.log.stem}" if hold else None
        env = {**os.environ, "TMPDIR": str(self.tmp), "PYTHONWARNINGS": "ignore"}
        env.pop(FAULT_HOLD_ENV, None)
        if hold:
            env[FAULT_HOLD_ENV] = f"{hold}:{self.marker}"
        args = [sys.executable, "-m", "datagen", "generate", "--recipe", "tiny", "--n", str(N), "--seed", str(SEED),
                "--out", str(out), "--workers", "2", "--quiet",
                *[a for o in (*TINY, *OVERRIDES) for a in ("--set", o)]]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, cwd=ROOT, start_new_session=True)
        self.seen: dict[int, str] = {}
        self.semaphores: set[str] = set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def watch(self) -> None:
        procs = _session(self.proc.pid)
        self.seen.update(procs)
        self.semaphores |= _semaphores_of(procs)

    def until(self, condition, what: str) -> None:
        """Poll (recording the run's processes) until ``condition()``; fail if the run ends first or it takes long."""
        deadline = time.monotonic() + WAIT_S
        while True:
            self.watch()
            if condition():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"{what}: the run ended first (exit {self.proc.returncode}):\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {WAIT_S} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def held(self) -> int:
        """Wait until a process of the run is parked at the hold point; its pid."""
        self.until(lambda: self.marker.exists() and self.marker.read_text(), f"hold {self.marker.name}")
        return int(self.marker.read_text())

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the run did not exit within {WAIT_S} s:\n{self.output()[-3000:]}")

    def assert_nothing_left(self, context: str) -> None:
        """Every process of the run gone (the workers and the resource tracker exit on their own, at once: polled),
        no semaphore any of them mapped still in /dev/shm, nothing in its $TMPDIR, no half-written file in the
        output folder."""
        deadline = time.monotonic() + 30
        while (alive := _session(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"{context}: processes of the run survived it: {alive} (it had started {self.seen})"
        leaked = sorted(s for s in self.semaphores if os.path.exists(s))
        assert not leaked, f"{context}: semaphores left in /dev/shm: {leaked}"
        assert not list(self.tmp.iterdir()), f"{context}: left in $TMPDIR: {list(self.tmp.iterdir())}"


def _records(out: Path) -> list[str]:
    return sorted(p.name for p in (out / PROGRESS_DIR).glob("shard-*.json"))


def _shards(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("shard-*.tar"))


def _partials(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.partial")) if out.exists() else []


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------- SIGTERM, Ctrl-C


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_a_stopped_generate_leaves_nothing_running_or_leaked(how, tmp_path):
    out = tmp_path / "out"
    run = Run(out, tmp_path / "work", hold="partial")
    worker = run.held()  # a worker parked with a shard half written: the worst moment to stop
    run.watch()
    assert worker in run.seen and worker != run.proc.pid
    workers = [p for p, cmd in run.seen.items() if "spawn_main" in cmd]
    assert len(workers) == 2, run.seen
    partial = [p for p in _partials(out) if p.endswith(f".{worker}.partial")]
    assert partial, _partials(out)
    if how == "sigterm":
        run.proc.send_signal(signal.SIGTERM)  # to the command only, as `kill PID` does
    else:
        os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    code = run.finish()
    expected = (143, "terminated (SIGTERM); run the same command again to resume") if how == "sigterm" else \
        (130, "interrupted; run the same command again to resume")
    assert (code, _one_line(run.output())) == expected
    run.assert_nothing_left(how)
    assert _partials(out) == []  # the parked worker's half-written shard is deleted by the driver
    # what stays is the resume state: finished shards and their records, the substrate cache
    kept = {p.relative_to(out).parts[0] for p in out.iterdir()}
    assert kept <= {PROGRESS_DIR, *(f"shard-{i:06d}.tar" for i in range(N_SHARDS))}, kept
    # (that it resumes to the uninterrupted run's dataset: the SIGKILL test below, from states worse than this)


# ------------------------------------------------------------------------------------- SIGKILL at five points


def _kill_points(rng: random.Random) -> list[tuple[str, object]]:
    """Five points, in the order a run passes them: before any shard; a shard mid-write (its tar half written, or
    written but unrecorded: drawn); after k more shards (k drawn); all shards made but no manifest; the manifest
    written but the progress folder still there."""
    return [("hold", "start"), ("hold", rng.choice(["partial", "unrecorded"])), ("after shards", rng.randint(1, 2)),
            ("hold", "manifest"), ("hold", "cleanup")]


@pytest.mark.slow
def test_sigkill_at_five_points_then_rerun_gives_the_uninterrupted_dataset(reference, tmp_path):
    points = _kill_points(random.Random(KILL_POINTS_SEED))
    out, work = tmp_path / "out", tmp_path / "work"
    story = []
    for kind, point in points:
        where = f"kill points {points}, at {kind} {point} (so far: {story})"
        before = _records(out) if out.exists() else []
        run = Run(out, work, hold=point if kind == "hold" else None)
        if kind == "hold":
            holder = run.held()
        else:
            run.until(lambda: len(_records(out)) >= len(before) + point, where)
            holder = run.proc.pid
        run.watch()
        run.proc.kill()
        assert run.finish() == -signal.SIGKILL
        run.assert_nothing_left(where)  # the workers died with the driver (PDEATHSIG), the tracker on its own
        records, shards = _records(out), _shards(out)
        story.append((point, len(records), _partials(out)))
        # the kill landed where it was meant to
        if point == "start":
            assert shards == [] and (out / PROGRESS_DIR / "run.json").exists(), where
        elif point == "partial":
            assert any(p.endswith(f".{holder}.partial") for p in _partials(out)), where
        elif point == "unrecorded":
            assert set(shards) - {r.removesuffix(".json") for r in records}, where
        elif point == "manifest":
            assert len(records) == N_SHARDS and not (out / "manifest.json").exists(), where
        elif point == "cleanup":
            assert (out / "manifest.json").exists() and (out / PROGRESS_DIR).exists(), where
        else:
            assert len(records) >= len(before) + point and not (out / "manifest.json").exists(), where
    final = Run(out, work)
    assert final.finish() == 0, final.output()
    final.assert_nothing_left("the final run")
    where = f"kill points {points}: {story}"
    assert _content_hash(out) == _content_hash(reference), where
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir()), where
    assert _partials(out) == [] and not (out / PROGRESS_DIR).exists(), where
    res = subprocess.run([sys.executable, "-m", "datagen", "verify", str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=WAIT_S)
    assert res.returncode == 0 and _content_hash(reference) in res.stdout, (where, res.stderr[-3000:])


# ----------------------------------------------------------------------------------- corruptions, after the fact


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_shard(root: Path):
    _truncate(root / "shard-000001.tar")
    return "shard-000001.tar", None


def _deleted_shard(root: Path):
    (root / "shard-000002.tar").unlink()
    return "shard-000002.tar", None


def _another_shards_bytes(root: Path):
    shutil.copyfile(root / "shard-000000.tar", root / "shard-000001.tar")
    first = _manifest(root)["shards"][0]["samples"][0][0]  # found in shard 1, which does not list it
    return "shard-000001.tar", first


def _dropped_sample(root: Path):
    """Shard 1 written again without its second sample, the manifest's sha256 of it updated (a bad repair): only the
    sample list can tell."""
    from hrtem_core.dataset import file_sha256, iter_tar_samples, write_shard

    manifest = _manifest(root)
    entry = manifest["shards"][1]
    samples = list(iter_tar_samples(root / entry["name"]))
    write_shard(root / entry["name"], [{"__key__": k, **f} for k, f in samples[:1]])
    entry["sha256"] = file_sha256(root / entry["name"])
    (root / "manifest.json").write_text(json.dumps(manifest))
    return entry["name"], samples[1][0]


def _wrong_shard_digest(root: Path):
    manifest = _manifest(root)
    entry = manifest["shards"][3]
    entry["sha256"] = manifest["shards"][2]["sha256"]  # well formed, but another file's
    (root / "manifest.json").write_text(json.dumps(manifest))
    return entry["name"], None


def _manifest_truncated(root: Path):
    _truncate(root / "manifest.json")
    return "manifest.json", None


def _manifest_not_json(root: Path):
    (root / "manifest.json").write_bytes(b"\x00\x9cPK\x03\x04 not a manifest")
    return "manifest.json", None


CORRUPTIONS = {
    "truncated shard": (_truncated_shard, "shard shard-000001.tar"),
    "deleted shard": (_deleted_shard, "shard shard-000002.tar: missing"),
    "shard replaced by another shard's bytes": (_another_shards_bytes, "not listed in the manifest"),
    "sample dropped, shard sha256 updated": (_dropped_sample, "listed in the manifest but missing"),
    "wrong shard digest in the manifest": (_wrong_shard_digest, "does not match the manifest"),
    "manifest truncated": (_manifest_truncated, "not valid JSON"),
    "manifest not JSON": (_manifest_not_json, "not valid JSON"),
}


@pytest.fixture
def copy(reference, tmp_path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(reference, root)
    return root


def _verify(root: Path, capsys) -> tuple[int, str]:
    """``python -m datagen verify ROOT``, in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = datagen_main(["verify", str(root)])
    return code, capsys.readouterr().err


def _scan(root: Path, tmp_path: Path):
    return scan_dataset(root, hash_cache=ShardHashCache(tmp_path / "hash-cache" / "shard-hashes.json"))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupted_dataset_is_refused_by_verify_and_curation(case, copy, tmp_path, capsys):
    corrupt, what = CORRUPTIONS[case]
    assert _verify(copy, capsys)[0] == 0
    assert _scan(copy, tmp_path).n_samples == N
    name, key = corrupt(copy)
    code, err = _verify(copy, capsys)
    line = _one_line(err)
    assert code == 2 and line.startswith("error: ") and what in line, line
    assert name in line, line
    if key is not None:
        assert f"sample {key}" in line, line
    with pytest.raises(InputError) as refused:  # what training reads a dataset through, before any run exists
        _scan(copy, tmp_path)
    assert name in str(refused.value), str(refused.value)


def test_a_wrong_content_hash_is_found_by_verify(copy, capsys):
    manifest = _manifest(copy)
    manifest["content_hash"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = _verify(copy, capsys)
    assert code == 2 and "'content_hash' " + "0" * 16 in _one_line(err), err


def test_a_wrong_content_hash_is_refused_by_curation(copy, tmp_path):
    """The manifest's content hash is checked against its own sample list when it is read: a run never records a
    content hash its data do not have."""
    manifest = _manifest(copy)
    manifest["content_hash"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="content_hash"):
        _scan(copy, tmp_path)


def test_files_the_manifest_does_not_list_are_ignored(copy, tmp_path, capsys):
    """A dataset is what its manifest lists: a stray file, even a shard-like one, is neither read nor an error."""
    (copy / "notes.txt").write_text("mine")
    shutil.copyfile(copy / "shard-000000.tar", copy / "shard-000099.tar")
    code, _ = _verify(copy, capsys)
    assert code == 0
    index = _scan(copy, tmp_path)
    assert index.n_samples == N and index.content_hash == _content_hash(copy)

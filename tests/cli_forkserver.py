"""A fork server for command-line tests: ``python tests/cli_forkserver.py`` imports the project's command lines and
their heavy dependencies once (torch, Lightning, MLflow: ~3 s per interpreter start), then for each request forks a
child that runs ``<package>.cli.main(argv)`` exactly as ``python -m <package>`` does (``__main__`` is
``sys.exit(main())``), in its own process, working directory, stdout and stderr.

The server itself computes nothing (a process that has run OpenMP code cannot safely fork children that do), so it
is a fresh interpreter started by the test, not the pytest process. Protocol, one JSON object per line:
request ``{"argv": [...], "cwd": ..., "stdout": path, "stderr": path, "timeout_s": ..., "env": {...}}`` on stdin, answer
``{"exit": code}`` on stdout (code -9 when the child was killed at the timeout).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

CLIS = {"datagen": "datagen.cli", "experiments": "experiments.cli", "benchmarks": "benchmarks.cli"}


def _preload() -> None:
    warnings.simplefilter("ignore")
    for name in (*CLIS.values(), "torch", "lightning", "mlflow", "mlplatform.train", "mlplatform.tracking",
                 "mlplatform.predict", "datagen.pipeline", "experiments.sweep", "experiments.study", "optuna"):
        importlib.import_module(name)


def _child(request: dict) -> int:
    os.chdir(request["cwd"])
    if "env" in request:  # the test's environment at the time of the request, as a subprocess would get it
        os.environ.clear()
        os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.stdin = open(os.devnull)
    argv = request["argv"]
    sys.argv = [f"python -m {argv[0]}", *argv[1:]]
    try:
        code = importlib.import_module(CLIS[argv[0]]).main(argv[1:])
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    return code if isinstance(code, int) else 0


def serve() -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = time.monotonic() + request.get("timeout_s", 300)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = -9
                break
            time.sleep(0.02)
        print(json.dumps({"exit": code}), flush=True)


# -- the client: what the tests call ----------------------------------------------------------------------------------

def _env() -> dict:
    """This process's environment at call time (conftest sets HRTEM_CACHE_DIR for the session) without warnings."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


class ForkServer:
    """Runs ``python -m <argv>`` through ``tests/cli_forkserver.py``: the same ``main(argv)`` in a process of its own,
    without paying the interpreter start and the torch/MLflow/Lightning imports per command (about 3 s each), which is
    what lets the refusal tests (tests/test_bad_inputs.py, tests/test_fail_before_work.py, ...) hold ~150 commands and
    stay a small part of CI; conftest's session fixture ``cli`` is one per test process. ``BAD_INPUT_SUBPROCESS=1``
    runs real ``python -m`` processes instead (slower, same results)."""

    def __init__(self):
        self.proc = None
        if os.environ.get("BAD_INPUT_SUBPROCESS") != "1":
            self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, env=_env())
            assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
        if self.proc is None:
            return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=_env(),
                                  cwd=cwd, timeout=timeout_s)
        out, err = cwd.parent / f"{cwd.name}.stdout", cwd.parent / f"{cwd.name}.stderr"  # outside the case folder
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                                          "timeout_s": timeout_s, "env": _env()}) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["exit"]
        if code == -9:
            raise subprocess.TimeoutExpired(argv, timeout_s)
        return subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()

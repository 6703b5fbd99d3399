"""docker/: the compose file renders (``docker-compose config``, no daemon needed) and keeps its promises — non-root
users, ports on 127.0.0.1 unless told otherwise, credentials only from variables — and the Dockerfile installs the
project the way the Makefile does. No image is built here.

Without ``docker-compose`` (Debian package ``docker-compose``) the compose tests are skipped on a developer machine
but fail when ``CI=true``: ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
DOCKERFILE = ROOT / "docker" / "Dockerfile"

PROJECT_SERVICES = {"mlflow", "dask-scheduler", "dask-worker", "worker"}  # run the worker image
ALL_SERVICES = PROJECT_SERVICES | {"postgres", "minio", "createbuckets"}
REQUIRED_VARS = ["POSTGRES_USER", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"]
SECRET_VARS = ["POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"]
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|^PGPASSWORD$")
# where each secret must arrive: service -> environment variables holding it
SECRET_USES = {
    "POSTGRES_PASSWORD": {"postgres": "POSTGRES_PASSWORD", "mlflow": "PGPASSWORD", "dask-worker": "PGPASSWORD",
                          "worker": "PGPASSWORD"},
    "MINIO_ROOT_PASSWORD": {"minio": "MINIO_ROOT_PASSWORD", "createbuckets": "MINIO_ROOT_PASSWORD",
                            "mlflow": "AWS_SECRET_ACCESS_KEY"},
}


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _render(env_file: Path, **overrides: str) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        unavailable("docker-compose", "no docker-compose on PATH (install the Debian package 'docker-compose')")
    # a clean environment: variables of the developer's shell would override the env file
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ} | overrides
    return subprocess.run([exe, "-f", str(COMPOSE), "--env-file", str(env_file), "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _config(env_file: Path = ENV_EXAMPLE, **overrides: str) -> dict:
    proc = _render(env_file, **overrides)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def rendered() -> dict:
    return _config()


def _ports(service: dict) -> list[tuple[str, str, str]]:
    """(host ip, published, target) of each published port, short or long syntax."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((str(p.get("host_ip", "")), str(p.get("published", "")), str(p.get("target", ""))))
        else:
            parts = str(p).split("/")[0].rsplit(":", 2)
            out.append(tuple([""] * (3 - len(parts)) + parts))
    return out


def test_compose_renders_every_service(rendered):
    assert set(rendered["services"]) == ALL_SERVICES
    assert rendered["services"]["worker"]["profiles"] == ["sweep"]  # an example, not started by a plain `up`
    command = rendered["services"]["worker"]["command"]
    command = command if isinstance(command, str) else " ".join(command)
    for part in ("experiments sweep", "--storage postgresql://", "--tracking-uri http://mlflow:5000",
                 "--scheduler tcp://dask-scheduler:8786"):
        assert part in command


def test_users_are_not_root(rendered):
    for name, service in rendered["services"].items():
        if "user" in service:
            user = str(service["user"]).split(":")[0]
            assert user not in ("root", "0", ""), f"{name} runs as {service['user']}"
    # every service whose image allows it sets one (minio's volume mount point is root-owned: see compose.yaml)
    assert {n for n, s in rendered["services"].items() if "user" in s} >= PROJECT_SERVICES | {"postgres",
                                                                                                "createbuckets"}


def test_ports_bind_to_loopback_by_default_and_can_be_opened(rendered):
    published = {name: _ports(s) for name, s in rendered["services"].items() if _ports(s)}
    assert {t for ports in published.values() for _, _, t in ports} >= {"5000", "8787", "9001"}
    for name, ports in published.items():
        for host_ip, _, target in ports:
            assert host_ip == "127.0.0.1", f"{name}: port {target} is published on {host_ip or 'every address'}"
    opened = _config(BIND_ADDRESS="0.0.0.0")
    assert {ip for s in opened["services"].values() for ip, _, _ in _ports(s)} == {"0.0.0.0"}


def test_credentials_come_only_from_variables():
    markers = {var: f"marker-{var.lower().replace('_', '-')}" for var in REQUIRED_VARS}
    config = _config(**markers)
    services = config["services"]
    for var, uses in SECRET_USES.items():
        for name, key in uses.items():
            assert services[name]["environment"].get(key) == markers[var], f"{name}.{key} does not read ${var}"
    # secrets only in environment sections: never on a command line, in a healthcheck or a URL
    for name, service in services.items():
        rest = yaml.safe_dump({k: v for k, v in service.items() if k != "environment"})
        for var in SECRET_VARS:
            assert markers[var] not in rest, f"{name} carries ${var} outside its environment"
    # and nothing secret-looking is written into compose.yaml as a literal
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key):
                assert "${" in str(value), f"{name}.{key} is a literal in compose.yaml"


@pytest.mark.parametrize("var", REQUIRED_VARS)
def test_missing_credentials_stop_compose(tmp_path, var):
    env = {k: v for k, v in _env_file(ENV_EXAMPLE).items() if k != var}
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    proc = _render(env_file)
    assert proc.returncode != 0 and var in proc.stderr, proc.stderr


def test_env_example_holds_placeholders_and_env_is_ignored():
    values = _env_file(ENV_EXAMPLE)
    assert set(REQUIRED_VARS) <= set(values)
    for var in SECRET_VARS:
        assert values[var].startswith("change-me"), f"{var} in .env.example must be a placeholder"
    assert values.get("BIND_ADDRESS") == "127.0.0.1"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "docker/.env" in ignored or "/docker/.env" in ignored
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    for entry in (".git", ".venv", "mlruns", "demo", "data", "docker/.env"):
        assert entry in dockerignore, f".dockerignore does not exclude {entry}"


def test_dockerfile_installs_like_the_makefile():
    dockerfile = DOCKERFILE.read_text()
    makefile = (ROOT / "Makefile").read_text()
    instructions = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    assert any(re.match(r"FROM \$\{PYTHON_IMAGE\}|FROM python:3\.11-slim", i) for i in instructions)
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile)
    # the same pins as the Makefile
    for pattern in (r"'pip==([\d.]+)'", r"'torch==([\d.]+)'", r"--no-deps 'czone==([\d.]+)'"):
        in_makefile = re.search(pattern, makefile)
        assert in_makefile, f"Makefile no longer matches {pattern}"
        assert in_makefile.group(0) in dockerfile, f"Dockerfile lacks {in_makefile.group(0)} (as in the Makefile)"
    assert "download.pytorch.org/whl/cpu" in dockerfile  # CPU torch unless a build argument says otherwise
    assert "NO_ALBUMENTATIONS_UPDATE=1" in dockerfile
    assert re.search(r"pip install /tmp/src\b", dockerfile) and " -e " not in dockerfile  # not editable
    users = [i.split(None, 1)[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert any(i.startswith("WORKDIR ") for i in instructions) and any(i.startswith("CMD ") for i in instructions)
    assert not re.search(r"(?i)(PASSWORD|SECRET|ACCESS_KEY)\s*=", dockerfile), "no credentials in the image"


def test_pyproject_lists_every_package():
    """A non-editable install (the image) only contains the packages pyproject.toml names."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for top, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            package = ".".join((top, *init.parent.relative_to(ROOT / folder).parts))
            assert package in listed, f"{package} is missing from [tool.setuptools] packages"

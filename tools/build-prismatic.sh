#!/usr/bin/env bash
#
# Copied from ../shared/vendor/prismatic/build.sh (the script that accompanies this project's vendored
# prismatic-2.0-src.tar.gz, see that folder's README for what building taught us), unchanged below this note, so the
# repository does not depend on ../shared for the script: only the source archive comes from outside
# (`make prismatic PRISMATIC_SRC=...`). Its original header follows.
#
# Build Prismatic 2.0 (CPU-only, single precision) from a source tarball and
# install the `pyprismatic` Python module (and the `prismatic` CLI) into a venv.
#
# usage:  build.sh /path/to/prismatic-2.0-src.tar.gz /path/to/venv/bin/python
#
# Environment knobs (all optional):
#   JOBS=N            parallel compile jobs            (default: nproc)
#   BUILD_CLI=0|1     also build/install bin/prismatic  (default: 1)
#   SKIP_APT=1        do not check/install Debian build deps
#   FORCE=1           rebuild even if this tarball is already installed
#   WORK_DIR=dir      build directory                   (default: mktemp, removed at exit)
#
# Idempotent: Debian packages are only installed when missing, and if the venv
# already has pyprismatic built from the same tarball (sha256 stamp) and it
# imports, the script exits 0 without rebuilding.
set -euo pipefail

die() { echo "build.sh: ERROR: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

[ $# -eq 2 ] || die "usage: $0 <prismatic-src.tar.gz> <venv-python>"
TARBALL=$(readlink -f "$1") || die "cannot resolve tarball path '$1'"
PY=$2
[ -f "$TARBALL" ] || die "tarball not found: $1"
[ -x "$PY" ] || die "python not found/executable: $PY"
"$PY" -c 'import sys; assert sys.version_info >= (3, 6)' 2>/dev/null \
  || die "$PY is not a working Python >= 3.6"
VENV_BIN=$(dirname "$PY")   # keep the venv's bin/ (do not resolve symlinks)
JOBS=${JOBS:-$(nproc)}
BUILD_CLI=${BUILD_CLI:-1}

# ---------------------------------------------------------------- skip check
SHA=$(sha256sum "$TARBALL" | cut -d' ' -f1)
STAMP=$("$PY" -c 'import sys; print(sys.prefix)')/share/pyprismatic-build.stamp
if [ "${FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SHA" ] \
   && "$PY" -c 'import pyprismatic.core' >/dev/null 2>&1 \
   && { [ "$BUILD_CLI" != 1 ] || [ -x "$VENV_BIN/prismatic" ]; }; then
  log "pyprismatic from this tarball is already installed in $("$PY" -c 'import sys; print(sys.prefix)'); nothing to do (FORCE=1 to rebuild)"
  exit 0
fi

# ---------------------------------------------------------- Debian build deps
DEPS="cmake make g++ pkg-config libfftw3-dev libhdf5-dev libboost-dev"
if [ "${SKIP_APT:-0}" != 1 ]; then
  missing=""
  for p in $DEPS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    command -v apt-get >/dev/null || die "apt-get not found; install manually:$missing"
    log "installing Debian packages:$missing"
    $SUDO apt-get update -q || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing \
      || die "apt-get install failed for:$missing"
  fi
fi
for t in cmake make g++; do command -v $t >/dev/null || die "'$t' not found"; done

# ------------------------------------------------------ Python headers, pip
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$PYINC/Python.h" ] || die "Python.h not found in $PYINC (install the python dev headers, e.g. python3-dev)"
PYLIB=$("$PY" -c 'import sysconfig, os; v = sysconfig.get_config_var
d = v("LIBDIR") or ""; c = [os.path.join(d, n) for n in (v("LDLIBRARY"), v("LIBRARY")) if n]
print(next((p for p in c if os.path.exists(p)), c[0] if c else "/nonexistent/libpython.so"))')
# (PYLIB only satisfies CMake's FindPythonLibs; on Linux core.so is not linked against it)
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is not available in $PY"
"$PY" -c 'import setuptools, wheel' 2>/dev/null || "$PY" -m pip install -q setuptools wheel \
  || die "could not install setuptools/wheel into the venv"

# ------------------------------------------------------------------ unpack
if [ -n "${WORK_DIR:-}" ]; then mkdir -p "$WORK_DIR"; W=$(readlink -f "$WORK_DIR")
else W=$(mktemp -d -t prismbuild.XXXXXX); trap 'rm -rf "$W"' EXIT; fi
rm -rf "$W/src" && mkdir -p "$W/src"
tar -xzf "$TARBALL" -C "$W/src" --strip-components=1 || die "cannot extract $TARBALL"
[ -f "$W/src/setup.py" ] && [ -f "$W/src/CMakeLists.txt" ] || die "tarball does not look like Prismatic source"

CMAKE_OPTS="-DPRISMATIC_ENABLE_GPU=0 -DPRISMATIC_ENABLE_GUI=0 -DPRISMATIC_ENABLE_DOUBLE_PRECISION=0"

# ----------------------------------------------------------- pyprismatic
log "building pyprismatic with $PY (jobs=$JOBS) ..."
# setup.py forwards any -D... argument to CMake; pass the target interpreter's headers
# (config-settings only reach setup.py via PEP 517; old pips (<25.3) need --use-pep517 for that)
PEP517=""; "$PY" -m pip install --help 2>/dev/null | grep -q -- '--use-pep517' && PEP517="--use-pep517"
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
"$PY" -m pip install --no-build-isolation --no-deps --force-reinstall -v $PEP517 \
  --config-settings="--build-option=-DPYTHON_INCLUDE_DIR=$PYINC -DPYTHON_LIBRARY=$PYLIB $CMAKE_OPTS" \
  "$W/src" > "$W/pyprismatic-build.log" 2>&1 \
  || { tail -n 60 "$W/pyprismatic-build.log" >&2; die "pyprismatic build failed (log above)"; }
grep -q "Found PythonLibs: .*\"$("$PY" -c 'import platform; print(platform.python_version())')\"" "$W/pyprismatic-build.log" \
  || log "WARNING: CMake may have used other Python headers than $PY's ($PYINC): $(grep -o 'Found PythonLibs.*' "$W/pyprismatic-build.log")"
# runtime deps: numpy (declared); h5py + scipy are imported by pyprismatic/process.py but not declared
"$PY" -m pip install -q "numpy>=1.13" h5py scipy || die "could not install numpy/h5py/scipy"
( cd "$W" && "$PY" -c 'import pyprismatic, pyprismatic.core' ) \
  || die "pyprismatic was installed but does not import"

# ------------------------------------------------------------- CLI (opt.)
if [ "$BUILD_CLI" = 1 ]; then
  log "building prismatic CLI ..."
  mkdir -p "$W/build-cli"
  ( cd "$W/build-cli" \
    && cmake "$W/src" -DPRISMATIC_ENABLE_CLI=1 -DPRISMATIC_ENABLE_PYPRISMATIC=0 $CMAKE_OPTS \
         -DCMAKE_INSTALL_PREFIX="$("$PY" -c 'import sys; print(sys.prefix)')" \
    && cmake --build . -j "$JOBS" && cmake --install . ) > "$W/cli-build.log" 2>&1 \
    || { tail -n 60 "$W/cli-build.log" >&2; die "prismatic CLI build failed (log above)"; }
  [ -x "$VENV_BIN/prismatic" ] || die "prismatic CLI not found in $VENV_BIN after install"
  ( cd "$W" && HOME="$W" "$VENV_BIN/prismatic" -i src/SI100.XYZ -a m -j 1 -o cli-test.h5 >/dev/null 2>&1 \
      && [ -s cli-test.h5 ] ) || die "prismatic CLI self-test failed"
fi

mkdir -p "$(dirname "$STAMP")" && echo "$SHA" > "$STAMP"
log "OK: pyprismatic installed for $PY$([ "$BUILD_CLI" = 1 ] && echo ", CLI at $VENV_BIN/prismatic")"

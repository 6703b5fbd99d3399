# Setup, main job and tests. Every target installs what it needs into .venv/ first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= data
# source archive of Prismatic 2.x for the optional Prismatic backend (make prismatic)
PRISMATIC_SRC ?= ../shared/vendor/prismatic/prismatic-2.0-src.tar.gz

.PHONY: setup prismatic demo smoke smoke-data bench bench-quick test test-fast clean-data

setup: $(VENV)/.installed

# pip is pinned to 24.0 in the venv: czone 2022.9.20 (the czone release without the broken pymatgen import) declares
# "pymatgen (>=2022.x.x)", a specifier that pip >= 24.1 refuses even with --no-deps. czone goes in with --no-deps;
# its real dependencies (pymatgen, ase, wulffpack, numpy, scipy) are ours in pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check 'pip==24.0'
	# torch first and pinned: unpinned, a dependency would pull a multi-GB CUDA build onto CPU-only machines
	$(PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.0'
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'czone==2022.9.20'
	NO_ALBUMENTATIONS_UPDATE=1 $(PY) -c "import czone, abtem, webdataset, torch, lightning, mlflow, monai, albumentations; print('environment ready: abTEM', abtem.__version__, 'torch', torch.__version__)"
	touch $@

# Optional: the Prismatic backend (simulation.backend: prismatic). Builds pyprismatic and the prismatic CLI, CPU-only,
# into .venv from a Prismatic 2.x source archive (~2 min on 2 cores; a rerun with the same archive is a no-op). As
# root it installs the missing Debian build dependencies itself (tools/build-prismatic.sh says which).
prismatic: setup
	@test -f "$(PRISMATIC_SRC)" || { echo "make prismatic: no Prismatic source archive at" \
	    "PRISMATIC_SRC=$(PRISMATIC_SRC); pass one (make prismatic PRISMATIC_SRC=/path/to/prismatic-2.x-src.tar.gz, e.g. a tarball of" \
	    "github.com/prism-em/prismatic) or install Prismatic 2.x from conda-forge instead" >&2; exit 2; }
	bash tools/build-prismatic.sh "$(PRISMATIC_SRC)" "$(abspath $(PY))"  # absolute: the script runs it from its build folder

# main job: a miniature curation study end to end (data -> sweep of pretrain + fine-tune runs -> report).
# Everything it writes is under demo/ and mlruns/; a second run reuses finished data and cells.
demo: setup
	$(PY) -m experiments demo

smoke-data: setup
	$(PY) -m datagen generate --recipe tiny --n 32 --seed 1 --out $(OUT)/tiny-seed1 --quiet
	$(PY) -m datagen generate --recipe tiny --n 16 --seed 2 --out $(OUT)/tiny-seed2 --quiet
	$(PY) -m datagen generate --recipe tiny --n 16 --seed 3 --out $(OUT)/tiny-lowdose --set imaging.dose_e_per_A2=100 --quiet
	$(PY) -m datagen generate --recipe tiny --n 12 --seed 4 --out $(OUT)/tiny-target --set imaging.dose_e_per_A2=150 --quiet

smoke: smoke-data
	$(PY) -m experiments train --config experiments/configs/smoke.yaml

bench: setup
	$(PY) -m benchmarks

bench-quick: setup
	$(PY) -m benchmarks --quick

# two pytest-xdist workers, one per core (three were slower: 826 s against 757 s for the whole suite); tests that
# share a service run on one worker (tests/conftest.py)
PYTEST_PARALLEL ?= -n 2 --dist loadgroup

test: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

test-fast: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

clean-data:
	rm -rf $(OUT) demo

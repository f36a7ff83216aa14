# make demo   - the main job: digits teacher (D = 128) -> IPFM one-step generator -> runs/demo/
# make test   - create/reuse .venv, install the pinned deps, build ipfm_fast._C, run pytest (+ make test-fid)
# make test-slow - the `slow` tests: deep property runs, sizes past 2^31, long-run memory
# make test-isa - the CPU kernels' tests again on each narrower instruction-set path (avx2, generic)
# make bench  - microbenchmarks of every op and backend -> benchmarks/results/<device>/
# make study  - finite D vs D = inf under equal budgets -> runs/study/
# make bench-e2e - images/s of a full distillation iteration vs a reference-style loop
# All work on a fresh clone of a CPU machine with Python 3.11.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Local wheel folders of this machine kind (torch 2.13.0 CPU, triton 3.6.0), if present.
FIND_LINKS := $(foreach d,/opt/wheels /opt/pypi/files /opt/pypi-more/files,$(if $(wildcard $(d)),--find-links $(d)))
PIP    := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS)
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.inc' 2>/dev/null)

.PHONY: test test-slow test-isa test-fid bench bench-e2e install clean demo study

$(VENV)/.stamp-deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements-dev.txt
	touch $@

# Editable install: Python and Triton sources are used in place; _C is rebuilt when
# csrc/ changes. --no-build-isolation reuses the pinned build deps installed above.
$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(SOURCES)
	$(PIP) --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.stamp-build

# The wheel check is marked slow but has always run here: it stays.
test: install
	$(PY) -m pytest -q -m "not slow" tests
	$(PY) -m pytest -q -m slow tests/test_build.py
	$(MAKE) --no-print-directory test-isa
	$(MAKE) --no-print-directory test-fid

# `make test` ran everything on the widest path this CPU has; the CPU kernels' own tests run
# again on each narrower one (IPFM_FAST_CPU_ISA, csrc/cpu/isa.h), so an AVX-512 machine also
# tests the AVX2 and generic code (~3 min each on 2 cores).
ISA_TESTS := tests/test_cpu_isa.py tests/test_perturb.py tests/test_field_target.py tests/test_properties.py
test-isa: install
	set -e; for isa in $$($(PY) -c "from ipfm_fast.testing import cpu_isa_paths; print(*cpu_isa_paths()[1:])"); do \
	  echo "== IPFM_FAST_CPU_ISA=$$isa"; IPFM_FAST_CPU_ISA=$$isa $(PY) -m pytest -q -m "not slow" $(ISA_TESTS); done

# The `slow` tests (deep property runs, sizes past 2^31, long-run memory; ~7 min, ~13 GiB);
# -s: they print their figures (docs/reliability.md quotes them)
test-slow: install
	$(PY) -m pytest -q -s -m slow tests

# FID through torch-fidelity needs torchvision, which does not load beside the pinned CPU
# torch: its tests run in a second environment (torch 2.14.1 + torchvision 0.29.1, ~5 GB, ~1 min
# to install from local wheels) on this checkout's sources and extension.
VENV_FID := .venv-fid
$(VENV_FID)/.stamp: requirements-fid.txt
	test -x $(VENV_FID)/bin/python || $(PYTHON) -m venv $(VENV_FID)
	$(VENV_FID)/bin/python -m pip install --disable-pip-version-check -q $(FIND_LINKS) -r requirements-fid.txt
	touch $@

test-fid: install $(VENV_FID)/.stamp
	IPFM_FAST_REQUIRE_FIDELITY=1 PYTHONPATH=$(CURDIR) $(VENV_FID)/bin/python -m pytest -q -p no:cacheprovider tests/test_fid.py

bench: install
	$(PY) -m pytest -q benchmarks

# make bench-e2e - images/s of a full IPFM iteration, reference-style loop vs ipfm_fast loop
# (the profile breakdown, the eager loop, then the compiled one: its `speedup:` prints last). ~2.5 min.
bench-e2e: install
	$(PY) benchmarks/profile_step.py --compile off
	$(PY) benchmarks/e2e.py --compile off
	$(PY) benchmarks/e2e.py

# make demo  - the main job: digits teacher (cached) -> IPFM distillation -> scores, PNGs (~6 min on 2 CPU cores)
demo: install
	$(PY) -m ipfm_fast demo

# make study - finite D vs D = inf (SiD) under equal budgets -> runs/study/
study: install
	$(PY) -m ipfm_fast study

clean:
	rm -rf build $(VENV) $(VENV_FID) *.egg-info ipfm_fast/_C*.so

# Two commands set everything up on a fresh machine (Python >= 3.10, pip, g++, CMake, make):
#   make run    build and install into .venv, then run steering/reco.py on its embedded default
#   make test   the same set-up, then the test suite
# Both are idempotent: nothing is rebuilt when no source changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

SOURCES := $(shell find cpp modules python third_party/msgpack-cxx/include -type f 2>/dev/null) CMakeLists.txt pyproject.toml
# A source removed (a module deleted or renamed away) leaves no newer file behind: the list of the
# sources is a prerequisite too, rewritten only when it changes (make then sees it newer).
SOURCE_LIST := $(VENV)/.sources

.PHONY: all install run test bench clean FORCE
all: install

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch for training, pinned: the shipped models were trained with 2.13.0 and `eclreco train`
	# reproduces them byte for byte with it (the version is written into the ONNX file). Where pip
	# finds the local CPU wheel (--find-links) it takes that, not PyPI's CUDA build (~5 GB more).
	# Build tools so that the package can be rebuilt incrementally.
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.13" "torch==2.13.0" "onnx>=1.15" \
	  pytest pytest-timeout numpy msgpack pyzmq onnxruntime uproot xxhash awkward prometheus-client tqdm matplotlib scipy
	# atheris for the fuzz harnesses (tests/test_fuzz.py skips, saying so, where it cannot be installed)
	$(PIP) install -q atheris || echo "make: atheris could not be installed; the fuzz tests will be skipped"
	touch $@

$(SOURCE_LIST): FORCE
	@mkdir -p $(VENV)
	@echo '$(SOURCES)' | cmp -s - $@ || echo '$(SOURCES)' > $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCE_LIST) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) steering/reco.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/eclreco bench

clean:
	rm -rf build $(VENV) *.egg-info

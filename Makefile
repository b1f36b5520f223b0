# segclip developer tasks. `make test` is the CI command (see .ci/run and README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install test lint demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[train,serve,openvino,ray,dev]'
	touch $@

install: $(VENV)/.installed

# The OpenVINO/NNCF tests run in a second pytest process: in one process with the rest of the
# suite, the process crashed (SIGSEGV) in later, unrelated tests after NNCF had run.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check segclip export runtime bench tests
	$(PY) -m pytest -q -m "not openvino"
	$(PY) -m pytest -q -m openvino

# The pipeline end to end on the synthetic world: export the shipped demo model, segment the
# held-out eval set with segclip-run, print mIoU (segclip/demo.py). TRAIN=1 trains it first.
demo: $(VENV)/.installed
	$(PY) -m segclip.demo $(if $(filter 1,$(TRAIN)),--train)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check segclip export runtime bench tests

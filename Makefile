# make up    set up a virtual environment and run gpufleet up (real GPUs if NVML works, else simulated)
# make test  set up the virtual environment with the test tools and run the test suite (pytest)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gpufleet-installed

.PHONY: up test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# grafana-client's niquests brings urllib3-future, whose wheel overwrites the real urllib3 at every
	# interpreter start (its .pth file); built from source with URLLIB3_NO_OVERRIDE=1 the two live side by side.
	URLLIB3_NO_OVERRIDE=1 $(PY) -m pip install -q --no-binary urllib3-future -e '.[dev]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/gpufleet up $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) gpufleet.db gpufleet.db-wal gpufleet.db-shm

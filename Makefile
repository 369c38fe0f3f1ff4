# make up    set up a virtual environment and run gpufleet up (real GPUs if NVML works, else simulated)
# make test  set up the virtual environment with the test tools, the system packages the tests use
#            (Prometheus, promtool, Chromium, tmux; PostgreSQL running), and run the test suite (pytest)
# make lint  the static checks CI runs
# make generated  regenerate what is built from the code and committed: the chart's PrometheusRule packs (one
#            per agent naming mode) and the dashboards' JSON; the tests fail while any of them is stale
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gpufleet-installed

.PHONY: up test test-system-deps lint generated clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/gpufleet up $(ARGS)

test-system-deps:
	@scripts/test-system-deps.sh

test: $(STAMP) test-system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	scripts/lint-layout.sh
	cd .lint && $(abspath $(VENV))/bin/mypy --config-file ../pyproject.toml -p gpufleet
	cd .lint && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports ../.importlinter

CHART_FILES := helm/gpufleet/files
generated: $(STAMP)
	$(VENV)/bin/gpufleet alerts export --format prometheusrule --metric-names gpufleet \
		--runbook-base-url http://localhost:9446/runbooks -o $(CHART_FILES)/prometheusrule.yaml
	$(VENV)/bin/gpufleet alerts export --format prometheusrule --metric-names dcgm \
		--runbook-base-url http://localhost:9446/runbooks -o $(CHART_FILES)/prometheusrule-dcgm.yaml
	$(VENV)/bin/gpufleet dashboards build

clean:
	rm -rf $(VENV) gpufleet.db gpufleet.db-wal gpufleet.db-shm

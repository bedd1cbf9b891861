# celery-langfuse: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install worker enqueue demo test lint bench bench-quick bench-taskpath clean

# Which interpreter a virtualenv runs: its base installation and version. A .venv made by
# another interpreter than PYTHON (say PYTHON=python3.13 after a default build) is made anew.
WHICH_PYTHON := import sys; print(sys.base_prefix, *sys.version_info[:3])
WANTED := $(shell $(PYTHON) -c '$(WHICH_PYTHON)' 2>/dev/null)
PRESENT := $(shell [ -x $(PY) ] && $(PY) -c '$(WHICH_PYTHON)' 2>/dev/null)
ifneq ($(WANTED),$(PRESENT))
.PHONY: $(STAMP)
endif

install: $(STAMP)

$(STAMP): pyproject.toml
	@[ -n "$(WANTED)" ] || { echo "PYTHON=$(PYTHON) does not run: set PYTHON to a Python 3.11+ interpreter" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(v < (3, 11) and f"PYTHON=$(PYTHON) is Python {v[0]}.{v[1]}: celery-langfuse needs 3.11+ (the floor of langfuse 5.x)")'
ifneq ($(WANTED),$(PRESENT))
	@[ -z "$(PRESENT)" ] || echo "$(VENV) runs $(PRESENT), PYTHON=$(PYTHON) is $(WANTED): making it anew"
	rm -rf $(VENV)
endif
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,demo]'
	touch $(STAMP)

## worker: a prefork worker for this service (CELERY_BROKER_URL, LANGFUSE_* from the environment)
worker: install
	$(PY) -m celery -A worker worker -P prefork -c 2 --loglevel=INFO

## enqueue: a job from a separate producer, e.g. make enqueue ARGS='summarize --text "..."'
ARGS ?= summarize --text "Celery runs the job. Langfuse shows the trace. Nothing is lost."
enqueue: install
	$(PY) -m tasks enqueue $(ARGS)

## demo: Redis, a Langfuse-compatible capture server, a worker, a producer, then the traces
demo: install
	$(PY) -m worker.demo

## test: unit tests plus real redis-server + real celery worker integration tests
test: install
	$(PY) -m pytest -q

## lint: ruff, mypy, and the import contract (a span's path runs one way; see pyproject.toml)
lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

## bench: throughput vs the alternatives, overhead, shipper, latency, memory (~12 min)
bench: install
	$(PY) -m bench --out bench/results.jsonl

bench-quick: install
	$(PY) -m bench --quick

## bench-taskpath: the task path of BEFORE (a commit) and of this tree side by side, rounds
## alternated, then the chart docs/benchmarks-taskpath.png from bench/results.jsonl (~15 min)
BEFORE ?= HEAD~1
bench-taskpath: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.taskpath --before $(BEFORE) --rounds 4 --out bench/results.jsonl
	$(PY) -m bench.chart

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

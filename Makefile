# celery-langfuse: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install worker enqueue demo test lint bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# The two commands: `make run` (the service on the embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install demo worker beat flower schemas bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Installs, migrates the SQLite database under ./var/, sends the demo messages, then runs
# worker and beat in the foreground and reports what happened (Ctrl-C stops).
run: $(STAMP)
	$(BIN)/comms db upgrade
	$(BIN)/comms demo
	$(BIN)/comms run --batch-now $(if $(RUN_FOR),--for $(RUN_FOR))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

worker: $(STAMP)
	$(BIN)/celery -A comms_tasks worker --loglevel=INFO

beat: $(STAMP)
	$(BIN)/celery -A comms_tasks beat --loglevel=INFO

# Flower on FLOWER_PORT, behind basic auth: refuses to start without FLOWER_BASIC_AUTH
# (user:password). The check comes before the install, so nothing starts without it;
# the password reaches Flower in its environment, never on a command line.
FLOWER_PORT ?= 5555
# Flower itself binds to 127.0.0.1 unless told otherwise; 0.0.0.0 for every interface.
FLOWER_ADDRESS ?= 127.0.0.1
flower:
	@$(if $(strip $(FLOWER_BASIC_AUTH)),true,echo "set FLOWER_BASIC_AUTH=user:password" >&2; exit 2)
	@$(MAKE) --no-print-directory $(STAMP)
	@$(BIN)/celery -A comms_tasks flower --port=$(FLOWER_PORT) --address=$(FLOWER_ADDRESS)
flower: export FLOWER_BASIC_AUTH := $(FLOWER_BASIC_AUTH)

# The benchmark (SPEC §11): seeds PostgreSQL, runs a real worker against baselines measured in
# the same run; report in var/bench/. BENCH_SIZE=tiny proves it works in a minute.
BENCH_SIZE ?= full
bench: $(STAMP)
	$(BIN)/python -m bench --size $(BENCH_SIZE)

schemas: $(STAMP)
	$(BIN)/comms contracts write

clean:
	rm -rf var

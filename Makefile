# The two commands: `make run` and `make test`. Everything else supports them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SECRETS_DIR ?= .local/secrets
PORT ?= 8083
USER_ID ?= dev-user
RESULTS ?= .local/bench/RESULTS.md

.PHONY: run test lint token secrets clean bench image-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	@$(BIN)/python tools/dev_token.py --secrets-dir $(SECRETS_DIR) --curl http://localhost:$(PORT)
	SECRETS_DIR=$(SECRETS_DIR) GUNICORN_BIND=0.0.0.0:$(PORT) $(BIN)/gunicorn app:app

token: $(VENV)/.runtime
	@$(BIN)/python tools/dev_token.py --secrets-dir $(SECRETS_DIR) --user-id $(USER_ID)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck docker-entrypoint.sh tools/*.sh .ci/run
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

test: lint
	$(BIN)/pytest

secrets:
	sh tools/make-secrets.sh

# make bench RESULTS=bench/RESULTS.md writes the committed results.
bench: $(VENV)/.dev
	$(BIN)/python bench/run.py --out $(RESULTS)

# The image and the compose stack, built and run (needs Docker with Compose v2); not part of test.
image-test: $(VENV)/.runtime
	$(BIN)/python tools/image_test.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The two commands: `make run` and `make test`. Everything else supports them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The compose stack's JWT secret file (docker-compose.yml reads the same variable), so that one
# token works against `make run` and the stack alike.
JWT_SECRET_FILE ?= secrets/jwt_secret.txt
STORE_PATH ?= .local/store.sqlite3
HOST ?= 127.0.0.1
PORT ?= 8083
USER_SERVICE_PORT ?= 8082
USER_ID ?= dev-user
RESULTS ?= .local/bench/RESULTS.md

.DEFAULT_GOAL := help
.PHONY: help run user-service test test-servers lint token secrets bench image-test nutrition-data clean

# `make help` prints the `##` line of each target, in this file's order.
help: ## list the targets (the default)
	@printf 'Image Service. Try: make run, make user-service (another terminal), make test.\n\n'
	@awk -F ':.*## ' '/^[a-z-]+:.*## / { printf "  make %-13s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

# Every package of requirements-servers.txt, and what they need beyond the dev tools, is pinned
# there: installed as listed, nothing else.
$(VENV)/.servers: requirements-servers.txt $(VENV)/.dev
	$(BIN)/pip install -q --no-deps -r requirements-servers.txt
	touch $@

run: $(VENV)/.runtime ## serve on http://127.0.0.1:8083 (HOST=, PORT= move it) and print curl lines
	@$(BIN)/python tools/dev_token.py --secret-file '$(JWT_SECRET_FILE)' --serve $(HOST):$(PORT)
	JWT_SECRET="$$(cat '$(JWT_SECRET_FILE)')" STORE_PATH=$(STORE_PATH) GUNICORN_BIND=$(HOST):$(PORT) \
		$(BIN)/gunicorn app:app

user-service: $(VENV)/.runtime ## a development User Service on port 8082, for ?save=true (keeps entries in memory)
	HOST=$(HOST) PORT=$(USER_SERVICE_PORT) $(BIN)/python tools/user_service_stub.py

token: $(VENV)/.runtime ## print a 12-hour token for make run and the compose stack (USER_ID=alice for another)
	@$(BIN)/python tools/dev_token.py --secret-file '$(JWT_SECRET_FILE)' --user-id $(USER_ID)

lint: $(VENV)/.dev ## ruff, ruff format, mypy, hadolint, shellcheck, compose schema
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck docker-entrypoint.sh tools/*.sh .ci/run
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

test: lint ## lint, then run the tests on two processes (needs redis-server and nc)
	$(BIN)/pytest -n 2

test-servers: $(VENV)/.servers ## the service against llama.cpp's real server (installs ~290 MB)
	$(BIN)/pytest tests/servers_llama

nutrition-data: $(VENV)/.runtime ## fetch USDA SR28 into data/usda-sr28 and compare it with the bundled usda-sr28/
	$(BIN)/python tools/fetch_usda_sr28.py --dest data/usda-sr28

secrets: ## write the secret files the compose stack mounts into secrets/ (keeps existing ones)
	sh tools/make-secrets.sh

bench: $(VENV)/.dev ## measure the real stack (~3.5 min); RESULTS=bench/RESULTS.md to commit it
	$(BIN)/python bench/run.py --out $(RESULTS)

image-test: $(VENV)/.runtime ## build the image and try it and the compose stack (needs Docker)
	$(BIN)/python tools/image_test.py

clean: ## remove .venv and the tools' caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

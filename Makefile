# Two commands: `make run` and `make test`. Both create .venv on their own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/governor.toml

.PHONY: run test lint clean install bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/governor run --config $(CONFIG)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check governor tests
	$(BIN)/mypy governor

test: lint
	$(BIN)/pytest

# Governor beside its peers (node_exporter, cpulimit, wrk: installed from Debian when
# missing); prints a table, writes bench/results.json and the table in README.md.
bench: $(VENV)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .governor .governor-demo .pytest_cache .mypy_cache .ruff_cache

# Two toy jobs heat two simulated GPUs; watch them slow, pause, cool and resume in
# `governor top` (examples/demo.sh; config/demo/). Ctrl-C, or closing the terminal,
# stops everything.
.PHONY: demo
demo: $(VENV)/.installed
	@examples/demo.sh

# The service: a venv in $(PREFIX), the CLI on the PATH, the unit, and a production config
# (only if none is there). DESTDIR stages it elsewhere (the tests install into a temp dir).
PREFIX  ?= /opt/governor
DESTDIR ?=
UNITDIR ?= /etc/systemd/system

install:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q .
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/README.md
	install -d $(DESTDIR)/usr/local/bin
	ln -sf $(PREFIX)/bin/governor $(DESTDIR)/usr/local/bin/governor
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|/opt/governor|$(PREFIX)|g' systemd/governor.service > $(DESTDIR)$(UNITDIR)/governor.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/governor.service
	install -d -m 0755 $(DESTDIR)/etc/governor
	test -e $(DESTDIR)/etc/governor/governor.toml || \
		install -m 0644 config/production.toml $(DESTDIR)/etc/governor/governor.toml
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start it with: systemctl enable --now governor"

# AffectEdge — everything a fresh machine (Python 3.11 + venv) needs is installed from here.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed-stamp
DURATION ?= 0
PYTEST_ARGS ?=

.PHONY: install system-deps test test-fast demo lint proto bench clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[edge,coordinator,export,dev]'
	touch $@

install: $(STAMP)  ## create .venv and install the project with all extras

system-deps:  ## as root: apt-get mosquitto, chromium, postgresql, systemd when missing
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "not root: cannot apt-get$$missing; the tests that need them will be skipped"; \
	fi

test: install system-deps  ## run the whole suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install  ## the suite without slow tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install  ## the whole system on this machine; DURATION=60 runs headless for 60 s
	$(PY) -m coordinator demo --duration $(DURATION)

lint: install  ## ruff
	$(VENV)/bin/ruff check .

proto: install  ## regenerate Python code from proto/ (committed; a test checks it is current)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
		proto/affectedge/v1/affectedge.proto

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

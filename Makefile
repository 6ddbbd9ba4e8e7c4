# The two commands of the README:
#   make serve   install, then start the hub on its embedded defaults at http://127.0.0.1:8000
#   make test    install, then run the whole test suite
#   make screenshots  refresh docs/screenshots/ from the browser tests (make test never touches them)
# and the lock's upkeep (docs/install.md):
#   make lock         resolve today's latest versions within pyproject's ranges into requirements/*.lock
#   make test-latest  the suite in a separate venv resolved fresh, without the lock: drift shows here first
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
PORT ?= 8000
# pip itself and torch sit outside the lock: pip installs the lock, and torch is the CPU
# build on this machine's disk (find-links /opt/wheels); a looser pin pulls a CUDA build.
PIP_VERSION = 26.3
TORCH = torch==2.13.0
UV_VERSION = 0.13.9
TORCH_FIND_LINKS ?= /opt/wheels
LATEST_VENV = .venv-latest
LOCK_VENV = .venv-lock

.PHONY: install serve test test-latest lock lint bench clean screenshots

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)

# Exactly the lock, hashes checked, nothing resolved at install time: --no-deps everywhere,
# then `pip check` proves the locked set is complete and consistent.
$(VENV)/.installed: pyproject.toml requirements/dev.lock | $(BIN)/python
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/dev.lock
	$(BIN)/pip install -q --no-deps $(TORCH)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/hubctl serve --port $(PORT)

test: install
	bash scripts/test.sh

# The browser tests write their screenshots to test-artifacts/ (ignored) so `make test`
# leaves the checkout clean; this refreshes the README's copies in docs/screenshots/.
screenshots: install
	UPDATE_SCREENSHOTS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q tests/browser

# The same suite on whatever the resolver picks today (the lock ignored). Run it before
# `make lock`, and weekly: a failure here is the next fresh-install break, seen early.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q $(TORCH)
	$(LATEST_VENV)/bin/pip install -q -e '.[dev]'
	$(LATEST_VENV)/bin/pip list --format=freeze > $(LATEST_VENV)/resolved.txt
	VENV=$(LATEST_VENV) bash scripts/test.sh

# Moves the lock forward on purpose. The dev set is resolved first and the runtime set
# within it, so the two never disagree on a version. torch's own dependencies are
# locked from its CPU build's metadata.
lock:
	test -x $(LOCK_VENV)/bin/uv || ($(PY) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION))
	$(LOCK_VENV)/bin/uv pip compile -q pyproject.toml requirements/build.in --extra dev --upgrade \
	  --generate-hashes --python-version 3.11 --find-links $(TORCH_FIND_LINKS) \
	  -c requirements/torch.txt --no-emit-package torch --custom-compile-command 'make lock' \
	  -o requirements/dev.lock
	$(LOCK_VENV)/bin/uv pip compile -q pyproject.toml requirements/build.in \
	  --generate-hashes --python-version 3.11 --find-links $(TORCH_FIND_LINKS) \
	  -c requirements/torch.txt -c requirements/dev.lock --no-emit-package torch \
	  --custom-compile-command 'make lock' -o requirements/runtime.lock

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) var

# Two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned to 2.13.0 because that
# version resolves to the CPU wheel on these machines; any other spec pulls
# several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BACKENDS := tensorflow torch jax
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean benchmarks

# pip's output goes to .venv/install.log, shown (its end) only on failure.
$(STAMP): pyproject.toml Makefile
	@echo "Setting up .venv (first run only; log: $(VENV)/install.log) ..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@( $(PY) -m pip install -q --upgrade pip && \
	   $(PY) -m pip install -q torch==2.13.0 && \
	   $(PY) -m pip install -q -e ".[tensorflow,jax,test]" && \
	   $(PY) -m pip install -q --no-deps "keras-hub==0.32.0" \
	 ) > $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

venv: $(STAMP)

# The demo's screen is its progress and results: what TensorFlow logs
# while it loads goes to runs/demo.stderr, shown only if the demo fails.
demo: $(STAMP)
	@mkdir -p runs
	@$(PY) -m keras_kd.demo $(DEMO_ARGS) 2> runs/demo.stderr || \
	  { cat runs/demo.stderr >&2; exit 1; }

# Each backend gets its own interpreter; any failing run fails the target.
test: $(STAMP)
	@status=0; for b in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$b"; \
	  KERAS_BACKEND=$$b $(PY) -m pytest -q $(PYTEST_ARGS) || status=1; \
	done; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check .

benchmarks: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache

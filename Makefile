# Two commands do everything on a fresh machine (see README.md):
#   make demo   -- create .venv, install, generate the demo data, run the pipeline on it
#   make test   -- create .venv if missing, run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= data/demo
RUN    ?= runs/demo

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test venv bench clean-demo

venv: $(VENV)/.installed

# pip (not uv/poetry): pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk
# instead of downloading ~3 GB.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/exits demo-data $(DEMO)
	$(VENV)/bin/exits run --images $(DEMO)/images --annotations $(DEMO)/instances.json \
		--workdir $(RUN) --config configs/demo.yaml

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/run_all.py

clean-demo:
	rm -rf $(DEMO) $(RUN)
